"""Heads: what turns cached pixel features into class predictions."""
