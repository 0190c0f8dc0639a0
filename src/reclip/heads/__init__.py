"""Heads: map dense CLIP features to class logits (B, C, h, w)."""

from reclip.heads.rectify import PRESETS, Rectifier, RectifierConfig
from reclip.heads.zero_shot import ZeroShotSegmentor

__all__ = ["PRESETS", "Rectifier", "RectifierConfig", "ZeroShotSegmentor"]
