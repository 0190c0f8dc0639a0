"""reclip: semantic segmentation without pixel labels, built on CLIP."""

__version__ = "0.1.0"
