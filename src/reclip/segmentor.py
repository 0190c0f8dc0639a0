"""A segmentor = a dense backbone followed by a head; one pad-and-align step for every head.

The segmentor interface (README, Design): normalised images (B, 3, H, W) -> logits
(B, S, h', w') covering exactly the input's field of view, which :mod:`reclip.inference`
resizes to the image. :class:`DenseSegmentor` composes any backbone (:mod:`reclip.backbones`:
CLIP with a last-block strategy, later a student CNN) with any head (:mod:`reclip.heads`:
Z -> logits on the backbone's grid): it pads the input at the bottom/right to a multiple
of the backbone's stride, so the grid is exactly (H, W) / stride rounded up, and
:func:`align_to_input` maps the grid logits back onto the unpadded input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reclip.clip.model import CLIP, pad_to_patch
from reclip.features import DenseStrategy

__all__ = ["CLIPSegmentor", "DenseSegmentor", "align_to_input"]


def align_to_input(logits: Tensor, input_size: tuple[int, int], stride: int) -> Tensor:
    """Grid logits (B, S, h, w) of an input of ``input_size`` (H, W) -> logits aligned with it.

    - (h * stride, w * stride) == (H, W): the grid logits as they are (the inference
      layer upsamples them);
    - otherwise the backbone padded the input at the bottom/right to (h * stride,
      w * stride): the logits are upsampled bilinearly (align_corners=False, float32) to
      that padded size, where each cell covers exactly its pixels, and cropped to (H, W),
      so pixel (i, j) of the logits is pixel (i, j) of the input.
    """
    h, w = logits.shape[-2:]
    H, W = input_size
    if (h * stride, w * stride) == (H, W):
        return logits
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = F.interpolate(logits.float(), size=(h * stride, w * stride), mode="bilinear", align_corners=False)
    return logits[..., :H, :W]


class DenseSegmentor(nn.Module):
    """images -> ``backbone`` -> Z (B, D, h, w) -> ``head`` -> logits (B, S, h, w) -> aligned to the input.

    Subclasses change how features are computed by overriding :meth:`features` (e.g. a
    frozen backbone under no_grad).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def num_classes(self) -> int:
        """C, the head's classes."""
        return self.head.num_classes

    def features(self, images: Tensor) -> Tensor:
        """Z: images (B, 3, H, W) normalised -> (B, D, h, w)."""
        return self.backbone(images)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) normalised -> logits (B, S, h', w') covering the input (:func:`align_to_input`)."""
        stride = self.backbone.stride
        padded = pad_to_patch(images, stride)  # bottom/right, zeros (CLIP's own rule)
        logits = self.head(self.features(padded))  # (B, S, h, w)
        grid = (padded.shape[-2] // stride, padded.shape[-1] // stride)
        if tuple(logits.shape[-2:]) != grid:
            raise RuntimeError(f"{type(self.backbone).__name__} with stride {stride} gave a {tuple(logits.shape[-2:])} "
                               f"grid for a {tuple(padded.shape[-2:])} input; a backbone must give input / stride")
        return align_to_input(logits, tuple(images.shape[-2:]), stride)


class CLIPSegmentor(DenseSegmentor):
    """A :class:`DenseSegmentor` on CLIP's dense features (:class:`~reclip.backbones.DenseCLIP`):
    its ``clip`` and last-block ``strategy`` are the backbone's."""

    @property
    def clip(self) -> CLIP:
        return self.backbone.clip

    @property
    def strategy(self) -> DenseStrategy:
        return self.backbone.strategy
