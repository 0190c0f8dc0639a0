"""Datasets as protocols (YAML), robust image reading and transforms."""

from reclip.data.datasets import SegmentationDataset
from reclip.data.io import ImageReadError, read_image, read_label
from reclip.data.protocol import Protocol, list_protocols, load_protocol

__all__ = ["ImageReadError", "Protocol", "SegmentationDataset", "list_protocols", "load_protocol", "read_image",
           "read_label"]
