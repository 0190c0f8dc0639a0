"""Dense backbones: images (B, 3, H, W) -> features Z (B, D, h, w) on a grid of stride ``stride``.

Heads (:mod:`reclip.heads`) map Z to logits; :class:`reclip.segmentor.DenseSegmentor` puts a
backbone and a head together. A backbone exposes ``stride`` (input pixels per grid cell)
and ``embed_dim`` (D).
"""

from reclip.backbones.clip import DenseCLIP

__all__ = ["DenseCLIP"]
