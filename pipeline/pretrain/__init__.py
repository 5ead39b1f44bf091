"""Pretraining a pixel-space DDPM on unlabeled images: the paper's first step."""
