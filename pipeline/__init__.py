"""segcache: label-efficient semantic segmentation with cached diffusion features."""

__version__ = "0.1.0"
