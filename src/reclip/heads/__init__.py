"""Heads: map dense features Z (B, D, h, w) to logits (B, C, h, w); segmentors that use them.

- :mod:`~reclip.heads.zero_shot`: cosines with text queries (the training-free family);
- :mod:`~reclip.heads.rectify`: ReCLIP++'s rectification head, made of
  :mod:`~reclip.heads.reference` (Reference prompt), :mod:`~reclip.heads.bias` (bias
  logits), :mod:`~reclip.heads.decoder` (mask decoder) and :mod:`~reclip.heads.losses`;
- :mod:`~reclip.heads.aspp`: DeepLab V2's ASPP (:class:`ASPPV2`), the student's classifier.
"""

from reclip.heads.aspp import ASPPV2
from reclip.heads.rectify import PRESETS, Rectifier, RectifierConfig, RectifierHead
from reclip.heads.zero_shot import QueryHead, ZeroShotSegmentor

__all__ = ["ASPPV2", "PRESETS", "QueryHead", "Rectifier", "RectifierConfig", "RectifierHead", "ZeroShotSegmentor"]
