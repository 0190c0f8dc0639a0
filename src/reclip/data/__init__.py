"""Datasets as protocols (YAML), robust image reading and transforms."""

from reclip.data.datasets import Protocol, SegmentationDataset, list_protocols, load_protocol
from reclip.data.io import ImageReadError, read_image, read_label

__all__ = ["ImageReadError", "Protocol", "SegmentationDataset", "list_protocols", "load_protocol", "read_image",
           "read_label"]
