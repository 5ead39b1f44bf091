"""Evaluation: predictions on a store's images, scores against their labels, reports and pictures."""
