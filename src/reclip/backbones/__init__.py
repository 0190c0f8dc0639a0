"""Dense backbones: images (B, 3, H, W) -> features Z (B, D, h, w) on a grid of stride ``stride``.

Heads (:mod:`reclip.heads`) map Z to logits; :class:`reclip.segmentor.DenseSegmentor` puts a
backbone and a head together. A backbone exposes ``stride`` (input pixels per grid cell)
and ``embed_dim`` (D).

- :mod:`~reclip.backbones.clip`: CLIP's ViT read densely (:class:`DenseCLIP`);
- :mod:`~reclip.backbones.resnet`: the DeepLab V2 student's dilated ResNets (output stride
  8; :func:`build_student_backbone`, :func:`load_backbone_weights`);
- :mod:`~reclip.backbones.dino`: DINO / DINOv2 ViTs with the official weights, the proxy
  models of ProxyCLIP (:func:`load_dino`; ``patch_features(images)`` -> (B, C, h, w)).
"""

from reclip.backbones.clip import DenseCLIP
from reclip.backbones.resnet import (
    STUDENT_BACKBONES,
    BackboneWeightsError,
    ResNet,
    build_student_backbone,
    load_backbone_weights,
)

__all__ = [
    "STUDENT_BACKBONES", "BackboneWeightsError", "DenseCLIP", "ResNet", "build_student_backbone",
    "load_backbone_weights",
]
