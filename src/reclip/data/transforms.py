"""Pure image transforms: short-side resize, CLIP normalisation, padding.

Everything works on numpy arrays (H, W[, C]) or torch tensors (..., H, W) and returns
the same kind it was given. No randomness here (training augmentations live with the
training code).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Defaults of the functions below: OpenAI CLIP's normalisation (one home, with the model;
# re-exported here). A loaded model's own is clip.image_mean / image_std.
from reclip.clip.model import CLIP_MEAN, CLIP_STD

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "short_side_size",
    "resize_short_side",
    "resize_labels",
    "to_tensor_normalized",
    "resize_bilinear",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "renormalise",
]


def short_side_size(
    height: int, width: int, short_side: int, max_long_side: int | None = None
) -> tuple[int, int]:
    """Output (H, W) of a keep-ratio resize whose short side becomes ``short_side``.

    With ``max_long_side`` the scale is ``min(short_side / min(H, W), max_long_side /
    max(H, W))``, i.e. mmseg's ``Resize(scale=(max_long_side, short_side),
    keep_ratio=True)``; the published protocols use max_long_side=2048. Sizes are
    rounded as mmcv does: ``int(x * scale + 0.5)``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"short_side_size: image size must be positive, got (H, W) = ({height}, {width})")
    if short_side <= 0:
        raise ValueError(f"short_side_size: short_side must be positive, got {short_side}")
    scale = short_side / min(height, width)
    if max_long_side is not None:
        scale = min(scale, max_long_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_short_side(
    image: np.ndarray | torch.Tensor,
    short_side: int,
    mode: str = "bilinear",
    max_long_side: int | None = None,
    antialias: bool = True,
) -> np.ndarray | torch.Tensor:
    """Resize so that the short side equals ``short_side`` (aspect ratio kept).

    Args:
        image: numpy (H, W, C) or (H, W), or torch (C, H, W), (B, C, H, W) or (H, W).
            numpy uint8 images come back uint8 (rounded); labels keep their dtype.
        short_side: target length of the shorter side, in pixels.
        mode: "bilinear" for images, "nearest" for label maps (ids are never blended).
        max_long_side: optional cap on the long side (mmseg's 2048), see short_side_size.
        antialias: low-pass filter when downscaling in bilinear mode (default). mmseg/
            OpenCV resize without it; pass False to reproduce published numbers exactly.

    Returns:
        Same kind (numpy / torch) and layout as the input, resized to short_side_size().
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"resize_short_side: mode must be 'bilinear' or 'nearest', got {mode!r}")
    is_numpy = isinstance(image, np.ndarray)
    if not is_numpy and not isinstance(image, torch.Tensor):
        raise TypeError(f"resize_short_side: expected a numpy array or torch tensor, got {type(image).__name__}")
    if is_numpy:
        if image.ndim not in (2, 3):
            raise ValueError(f"resize_short_side: numpy input must be (H, W) or (H, W, C), got shape {image.shape}")
        h, w = image.shape[:2]
    else:
        if image.ndim not in (2, 3, 4):
            raise ValueError(
                f"resize_short_side: tensor input must be (H, W), (C, H, W) or (B, C, H, W), got {tuple(image.shape)}"
            )
        h, w = image.shape[-2:]
    out_h, out_w = short_side_size(h, w, short_side, max_long_side)

    # Bring everything to (B, C, H, W) for F.interpolate.
    if is_numpy:
        t = torch.from_numpy(np.ascontiguousarray(image))
        t = t[None, None] if image.ndim == 2 else t.permute(2, 0, 1)[None]  # (1, C, H, W)
    else:
        t = image
        t = t[None, None] if image.ndim == 2 else (t[None] if image.ndim == 3 else t)
    orig_dtype = t.dtype

    if mode == "nearest":
        # "nearest-exact" samples at pixel centres (PIL's NEAREST; OpenCV's INTER_NEAREST
        # is torch's shifted "nearest").
        src = t if t.is_floating_point() else t.to(torch.float64)  # float64 keeps ids exact
        out = F.interpolate(src, size=(out_h, out_w), mode="nearest-exact").to(orig_dtype)
    else:
        src = t if t.is_floating_point() else t.to(torch.float32)
        out = F.interpolate(src, size=(out_h, out_w), mode="bilinear", align_corners=False,
                            antialias=antialias)
        if not orig_dtype.is_floating_point:
            info = torch.iinfo(orig_dtype)
            out = out.round().clamp(info.min, info.max).to(orig_dtype)

    if is_numpy:
        out = out[0, 0] if image.ndim == 2 else out[0].permute(1, 2, 0)
        return np.ascontiguousarray(out.numpy())
    if image.ndim == 2:
        return out[0, 0]
    return out[0] if image.ndim == 3 else out


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (h, w) label map to ``size`` = (H, W), sampling at
    pixel centres (as "nearest-exact"); ids are copied, never blended, dtype kept.

    Index arithmetic only: the output is the one array allocated (no float copy), so it
    scores a prediction at a large label's size cheaply.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"resize_labels: labels must be (h, w), got shape {labels.shape}")
    (h, w), (out_h, out_w) = labels.shape, (int(size[0]), int(size[1]))
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"resize_labels: size must be positive, got {size}")
    if (h, w) == (out_h, out_w):
        return labels
    rows = ((2 * np.arange(out_h, dtype=np.int64) + 1) * h) // (2 * out_h)  # floor((i + 0.5) * h / H)
    cols = ((2 * np.arange(out_w, dtype=np.int64) + 1) * w) // (2 * out_w)
    return labels[rows[:, None], cols[None, :]]


def to_tensor_normalized(
    image: np.ndarray,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """uint8 RGB image -> normalised float tensor: (x / 255 - mean) / std.

    Args:
        image: (H, W, 3) uint8 RGB.
        mean, std: per-channel statistics on the 0..1 scale (CLIP's by default).

    Returns:
        (3, H, W) float32 tensor.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"to_tensor_normalized: expected a (H, W, 3) numpy array, got shape {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"to_tensor_normalized: expected uint8 (0..255), got {image.dtype}; use read_image()")
    t = torch.as_tensor(np.array(image, copy=True)).permute(2, 0, 1).to(torch.float32) / 255.0  # (3, H, W)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (t - m) / s


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (..., H, W) maps to ``size`` (align_corners=False, no antialias:
    cv2 INTER_LINEAR / mmseg's resize of logits); the input itself when the size matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# ImageNet's normalisation (0..1 scale): torchvision / mmseg ResNets, DINO and DINOv2.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def renormalise(images: torch.Tensor, src: tuple, dst: tuple) -> torch.Tensor:
    """Images normalised with ``src`` = (mean, std) (0..1 scale) -> normalised with ``dst``."""
    if tuple(map(tuple, src)) == tuple(map(tuple, dst)):
        return images
    shape = (1, -1, 1, 1)
    (m0, s0), (m1, s1) = ((images.new_tensor(v).view(shape) for v in pair) for pair in (src, dst))
    return (images * s0 + m0 - m1) / s1
