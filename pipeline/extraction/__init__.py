"""Extraction: images through a feature source into a store, in this process or on a Dask cluster."""
