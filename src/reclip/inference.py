"""Inference: turn any segmentor into full-resolution logits and label maps.

A segmentor is any callable ``segmentor(images) -> logits`` mapping a normalised batch
(B, 3, H, W) to raw scores on its own feature grid (DESIGN.md, "one segmentor
interface"). The scores are QUERY logits (B, S, h, w), reduced to classes by
``class_index``: a segmentor may expose ``class_index`` (S,) long, the class of each
query channel (synonyms: several queries per class, as the zero-shot head's text
queries), and ``num_classes`` C. A segmentor without ``class_index`` has S == C, one
channel per class (trained heads). This module knows nothing about which method runs:

- :func:`infer_logits` runs it on the whole image or with mmseg-style sliding windows
  (all windows batched) and returns logits at the original image size; it does not
  care what the channels are;
- :func:`postprocess` / :func:`predict_labels` turn query logits into class
  probabilities and labels in the official SCLIP / ClearCLIP / NACLIP order
  (``postprocess_result``): the query logits, already averaged over windows, go
  through softmax(logit_scale * logits) over all S queries; a class's probability is
  the max over its synonyms (:func:`probabilities`); everything after that works on
  class probabilities (B, C, H, W). The steps are small pure functions:
  :func:`prompt_denoise` (ReCLIP/ReCLIP++ "PD"), :func:`pamr` (pixel-adaptive mask
  refinement, Araslanov & Roth, CVPR 2020), :func:`area_filter` and
  :func:`background_threshold` (SCLIP family);
- :func:`segment` is the predictor-style convenience: uint8 image in, label map out.

Why the order matters: with a synonym-heavy class (SCLIP's VOC21 background is 26
background words) the softmax spreads over all its words, so the class's probability
(the max over its words) is much lower than a softmax over per-class max logits would
give; the ``prob_thd`` background threshold is defined on the former. The argmax is
the same either way (softmax is monotone and shares one denominator per pixel).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reclip.data.transforms import CLIP_MEAN, CLIP_STD, resize_short_side, to_tensor_normalized
from reclip.text import max_over_synonyms

__all__ = [
    "AUTOCAST_MODES",
    "InferenceConfig",
    "Segmentation",
    "slide_windows",
    "infer_logits",
    "class_logits",
    "probabilities",
    "prompt_denoise",
    "pamr",
    "area_filter",
    "background_threshold",
    "postprocess",
    "predict_labels",
    "segment",
]

Segmentor = Callable[[Tensor], Tensor]

# ReCLIP++ official test script: removed classes get this logit (dogehhh/ReCLIP tools/test.py).
PD_SUPPRESSED_LOGIT = -100.0
# PAMR defaults of the official implementation (visinf/1-stage-wseg, core/config.py:
# PAMR_ITER = 10, PAMR_KERNEL = [1, 2, 4, 8, 12, 24]).
PAMR_ITERATIONS = 10
PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)
# InferenceConfig.autocast values (besides True = "bf16" and False = off) and their dtypes.
AUTOCAST_MODES = {"bf16": torch.bfloat16, "fp16": torch.float16, "auto": torch.bfloat16}


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """(h, w) from an int or a pair of positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a (h, w) pair of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


@dataclass
class InferenceConfig:
    """How to run a segmentor and post-process its logits.

    Attributes:
        mode: "whole" (one forward per image) or "slide" (overlapping windows).
        short_side: resize so the short side equals this before inference (None: keep).
        max_long_side: cap on the long side of that resize (mmseg's Resize(scale=(2048,
            short_side)) in the published protocols; None: no cap).
        antialias: low-pass filter when that resize downsamples. Off by default, as in
            the published protocols (mmseg / OpenCV INTER_LINEAR).
        window: sliding-window crop size, int or (h, w).
        stride: sliding-window stride, int or (h, w); must not exceed ``window``.
        batch_size: images (whole) or windows (slide) per segmentor call.
        logit_scale: multiplies logits before the softmax of post-processing
            (SCLIP 40-65 / ClearCLIP 50 on cosines; 1.0 for trained heads). Only
            probabilities, ``prob_thd`` and PAMR depend on it; argmax does not.
        prob_thd: SCLIP-family background threshold on the max softmax probability
            (None = off).
        area_thd: SCLIP-family area filter: a non-background class whose predicted area
            is below this fraction of the predicted foreground area loses its pixels
            (None = off).
        pd_threshold: ReCLIP prompt denoising threshold (None = off); paper values VOC
            1.0, Context 0.85, ADE 0.5, Cityscapes 0.5, COCO 0.95.
        pd_scale: scale inside PD's softmax (ReCLIP++ 10; conference ReCLIP 100).
        pamr: refine probabilities with PAMR at full resolution.
        pamr_iter, pamr_dilations: PAMR iterations and dilations.
        autocast: mixed precision of the segmentor call: False = off, True or "bf16" =
            bfloat16 on any device, "fp16" = float16 on any device, "auto" = bfloat16 on
            CUDA and off elsewhere. Window accumulation and post-processing are always
            float32 (and the zero-shot head computes its cosines in float32).
    """

    mode: Literal["whole", "slide"] = "whole"
    short_side: int | None = None
    max_long_side: int | None = None
    antialias: bool = False
    window: int | tuple[int, int] = 224
    stride: int | tuple[int, int] = 112
    batch_size: int = 16
    logit_scale: float = 1.0
    prob_thd: float | None = None
    area_thd: float | None = None
    pd_threshold: float | None = None
    pd_scale: float = 10.0
    pamr: bool = False
    pamr_iter: int = PAMR_ITERATIONS
    pamr_dilations: tuple[int, ...] = PAMR_DILATIONS
    autocast: bool | Literal["auto", "bf16", "fp16"] = "auto"

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {self.mode!r}")
        if self.short_side is not None and not (isinstance(self.short_side, int) and self.short_side > 0):
            raise ValueError(f"short_side must be a positive int or None, got {self.short_side!r}")
        if self.max_long_side is not None and not (isinstance(self.max_long_side, int) and self.max_long_side > 0):
            raise ValueError(f"max_long_side must be a positive int or None, got {self.max_long_side!r}")
        window, stride = _pair(self.window, "window"), _pair(self.stride, "stride")
        if stride[0] > window[0] or stride[1] > window[1]:
            raise ValueError(
                f"stride {stride} exceeds window {window}: windows would leave pixels uncovered; "
                "use stride <= window"
            )
        if not (isinstance(self.batch_size, int) and self.batch_size > 0):
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not self.logit_scale > 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale!r}")
        for name in ("prob_thd", "area_thd", "pd_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] or None (off), got {value!r}")
        if not self.pd_scale > 0:
            raise ValueError(f"pd_scale must be > 0, got {self.pd_scale!r}")
        if not (isinstance(self.pamr_iter, int) and self.pamr_iter > 0):
            raise ValueError(f"pamr_iter must be a positive int, got {self.pamr_iter!r}")
        self.pamr_dilations = tuple(self.pamr_dilations)
        if not self.pamr_dilations or not all(isinstance(d, int) and d > 0 for d in self.pamr_dilations):
            raise ValueError(f"pamr_dilations must be positive ints, got {self.pamr_dilations!r}")
        if not (isinstance(self.autocast, bool) or (isinstance(self.autocast, str) and self.autocast in AUTOCAST_MODES)):
            raise ValueError(
                f"autocast must be False (off), True or 'bf16' (bfloat16), 'fp16' (float16) or 'auto' "
                f"(bfloat16 on CUDA, off elsewhere), got {self.autocast!r}"
            )

    def autocast_dtype(self, device: torch.device | str) -> torch.dtype | None:
        """The autocast dtype of the segmentor call on ``device``, None when off."""
        if self.autocast is False or (self.autocast == "auto" and torch.device(device).type != "cuda"):
            return None
        return torch.bfloat16 if self.autocast is True else AUTOCAST_MODES[self.autocast]

    @classmethod
    def from_dict(cls, values: dict) -> "InferenceConfig":
        """Build from a plain dict (e.g. a protocol YAML), rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown inference option(s) {unknown}; valid options: {sorted(known)}")
        values = dict(values)
        for key in ("window", "stride", "pamr_dilations"):
            if isinstance(values.get(key), list):  # YAML gives lists
                values[key] = tuple(values[key])
        return cls(**values)


# --------------------------------------------------------------------------- geometry


def slide_windows(
    height: int, width: int, window: int | Sequence[int], stride: int | Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """Sliding windows (y1, y2, x1, x2) covering an (height, width) image.

    mmseg ``slide_inference`` semantics (also SCLIP ``forward_slide``):
    h_grids = max(H - crop_h + stride_h - 1, 0) // stride_h + 1, the last window is
    flush with the border, and windows shrink to the image when it is smaller than the
    crop. All windows therefore have the same size (min(crop_h, H), min(crop_w, W)).
    """
    (crop_h, crop_w), (stride_h, stride_w) = _pair(window, "window"), _pair(stride, "stride")
    h_grids = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    w_grids = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * stride_h + crop_h, height)
            x2 = min(w_idx * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


# --------------------------------------------------------------------------- inference


def _autocast(device: torch.device, cfg: InferenceConfig) -> contextlib.AbstractContextManager:
    """Autocast context of the segmentor call (see ``InferenceConfig.autocast``)."""
    dtype = cfg.autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _call(segmentor: Segmentor, images: Tensor, cfg: InferenceConfig) -> Tensor:
    """One segmentor call with shape checks; returns float32 logits (n, S, h, w)."""
    with _autocast(images.device, cfg):
        logits = segmentor(images)
    if not isinstance(logits, Tensor) or logits.ndim != 4 or logits.shape[0] != images.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"segmentor must return logits (B, S, h, w) with B = {images.shape[0]}, got {shape}; "
            "wrap it so that it returns one logits tensor"
        )
    return logits.float()


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=False, no antialias: like cv2 INTER_LINEAR / mmseg)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _infer_whole(segmentor: Segmentor, images: Tensor, cfg: InferenceConfig, size: tuple[int, int]) -> Tensor:
    """Whole-image inference, ``batch_size`` images per call; logits resized to ``size``."""
    chunks = [_resize(_call(segmentor, images[i : i + cfg.batch_size], cfg), size)
              for i in range(0, images.shape[0], cfg.batch_size)]
    return torch.cat(chunks)  # (B, S, *size)


def _infer_slide(segmentor: Segmentor, images: Tensor, cfg: InferenceConfig) -> Tensor:
    """Sliding-window inference at the images' size; all windows of the batch are batched.

    Each window's logits are upsampled to the window size, summed into place and divided
    by the per-pixel window count (mmseg slide_inference).
    """
    batch, _, height, width = images.shape
    windows = slide_windows(height, width, cfg.window, cfg.stride)
    jobs = [(b, win) for b in range(batch) for win in windows]  # image-major order
    count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
    for y1, y2, x1, x2 in windows:
        count[..., y1:y2, x1:x2] += 1
    assert bool((count > 0).all()), "sliding windows must cover every pixel"
    preds: Tensor | None = None
    for start in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[start : start + cfg.batch_size]
        crops = torch.stack([images[b, :, y1:y2, x1:x2] for b, (y1, y2, x1, x2) in chunk])  # (n, 3, ch, cw)
        logits = _resize(_call(segmentor, crops, cfg), tuple(crops.shape[-2:]))  # (n, S, ch, cw)
        if preds is None:
            preds = images.new_zeros((batch, logits.shape[1], height, width), dtype=torch.float32)
        for logit, (b, (y1, y2, x1, x2)) in zip(logits, chunk):
            preds[b, :, y1:y2, x1:x2] += logit
    assert preds is not None
    return preds / count  # (B, S, H, W)


def infer_logits(
    segmentor: Segmentor,
    image: Tensor,
    cfg: InferenceConfig,
    out_size: tuple[int, int] | None = None,
) -> Tensor:
    """Run ``segmentor`` on a normalised image batch and return logits at full size.

    Channel-agnostic: the S channels (query logits, or class logits when S == C) are
    resized and averaged over windows as they are; reduce them with :func:`postprocess`.

    Args:
        segmentor: callable (B, 3, H, W) -> (B, S, h, w) raw scores.
        image: normalised images (B, 3, H, W) or (3, H, W), on the segmentor's device.
        cfg: mode, short-side resize, window/stride, batch size, autocast.
        out_size: (H_out, W_out) of the result; default the input's (H, W), i.e. the
            original size even when ``cfg.short_side`` resizes for inference.

    Returns:
        float32 logits (B, S, H_out, W_out). Whole mode upsamples the segmentor's grid
        straight to ``out_size``; slide mode averages windows at the (resized) image
        size, then resizes to ``out_size``; both bilinear, align_corners=False.
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W) or (3, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image must be a normalised float tensor, got {image.dtype}; normalise it first")
    height, width = image.shape[-2:]
    out_size = (int(height), int(width)) if out_size is None else (int(out_size[0]), int(out_size[1]))
    if cfg.short_side is not None:  # mmcv rounding, see reclip.data.transforms.short_side_size
        image = resize_short_side(image, cfg.short_side, max_long_side=cfg.max_long_side, antialias=cfg.antialias)
    with torch.no_grad():
        if cfg.mode == "whole":
            return _infer_whole(segmentor, image, cfg, out_size)
        return _resize(_infer_slide(segmentor, image, cfg), out_size)


# --------------------------------------------------------------------------- post-processing


def _num_classes(class_index: Tensor | None, num_queries: int) -> int:
    """C of a query-to-class map (S,), checked against the S logit channels."""
    if class_index is None:
        return num_queries
    if not isinstance(class_index, Tensor) or class_index.dtype != torch.long or class_index.shape != (num_queries,):
        what = f"{class_index.dtype} {tuple(class_index.shape)}" if isinstance(class_index, Tensor) else repr(class_index)
        raise ValueError(
            f"class_index must be an int64 tensor (S,) = ({num_queries},), the class of each logit channel, "
            f"got {what}; pass segmentor.class_index, or None when channels are classes"
        )
    counts = torch.bincount(class_index.cpu().clamp_min(0)).tolist()
    if num_queries and (int(class_index.min()) < 0 or 0 in counts):
        raise ValueError(f"class_index must map queries onto classes 0..C-1, each class at least once; "
                         f"got class counts {counts} (min index {int(class_index.min())})")
    return len(counts)


def _is_identity(class_index: Tensor | None) -> bool:
    """True when channel c is class c (no reduction needed)."""
    return class_index is None or bool(
        (class_index.cpu() == torch.arange(class_index.numel())).all())


def class_logits(logits: Tensor, class_index: Tensor | None = None) -> Tensor:
    """Class logits: the max over each class's synonyms of the query logits.

    (B, S, H, W) -> (B, C, H, W); the identity when ``class_index`` is None or maps
    channel c to class c (S == C). Used by :func:`prompt_denoise`; labels and
    probabilities come from :func:`probabilities`, which reduces after the softmax.
    """
    num_classes = _num_classes(class_index, logits.shape[1])
    if _is_identity(class_index):
        return logits
    return max_over_synonyms(logits, class_index, num_classes, dim=1)


def probabilities(logits: Tensor, logit_scale: float = 1.0, class_index: Tensor | None = None) -> Tensor:
    """Class probabilities from query logits, in the official SCLIP-family order.

    softmax(logit_scale * logits) over all S queries (B, S, H, W), then a class's
    probability is the max over its synonyms (``reclip.text.max_over_synonyms``):
    (B, C, H, W). With several synonyms per class the class probabilities need not sum
    to 1 (SCLIP / ClearCLIP / NACLIP ``postprocess_result``). Without ``class_index``
    (or with one query per class) this is the softmax over classes.

    Args:
        logits: (B, S, H, W) query logits (averaged over windows).
        logit_scale: temperature applied before the softmax.
        class_index: (S,) int64 class of each query, or None when S == C.
    Returns:
        (B, C, H, W) float32.
    """
    num_classes = _num_classes(class_index, logits.shape[1])
    probs = torch.softmax(logits.float() * logit_scale, dim=1)  # (B, S, H, W)
    if _is_identity(class_index):
        return probs
    return max_over_synonyms(probs, class_index, num_classes, dim=1)  # (B, C, H, W)


def prompt_denoise(logits: Tensor, threshold: float, scale: float = 10.0,
                   class_index: Tensor | None = None) -> Tensor:
    """ReCLIP prompt denoising: drop classes that are nowhere confident.

    PD is defined on class logits (ReCLIP has one query per class): with synonyms the
    class logits are the max over each class's synonyms of the query logits
    (:func:`class_logits`; the identity when S == C). A class whose spatial max of
    softmax(scale * class logits) is below ``threshold`` gets the logit -100 everywhere,
    on every one of its queries (ReCLIP++ official test script: scale 10; ReCLIP: 100).
    Unlike the official code, the most confident class(es) of an image are never
    removed, so at least one class always survives (officially, with VOC's threshold
    1.0 every class can be removed and argmax then silently returns class 0). The fill
    is -100, or lower when a logit is already below -100, so a removed class never wins
    an argmax. The official code applies PD on the head's grid before upsampling; here
    it applies to whatever resolution it is given.

    Args:
        logits: (B, S, H, W) raw query logits.
        class_index: (S,) int64 class of each query, or None when S == C.
    Returns:
        (B, S, H, W) query logits with the queries of removed classes filled.
    """
    scores = class_logits(logits, class_index)  # (B, C, H, W)
    conf = torch.softmax(scores.float() * scale, dim=1).flatten(2).amax(-1)  # (B, C)
    remove = (conf < threshold) & (conf < conf.amax(dim=1, keepdim=True))  # keep the best
    if not _is_identity(class_index):
        remove = remove[:, class_index.to(remove.device)]  # (B, S)
    fill = min(PD_SUPPRESSED_LOGIT, float(logits.detach().amin()) - 1.0)
    return logits.masked_fill(remove[:, :, None, None], fill)


def _shift(x: Tensor, padded: Tensor, pad: int, dy: int, dx: int) -> Tensor:
    """x shifted so that out[y, x] = x[y + dy, x + dx], borders replicated."""
    height, width = x.shape[-2:]
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def _neighbours(dilations: Sequence[int]) -> list[tuple[int, int, int]]:
    """(dilation, dy, dx) of the 8 neighbours at each dilation."""
    return [(d, dy * d, dx * d) for d in dilations
            for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def pamr(
    image: Tensor,
    probs: Tensor,
    num_iter: int = PAMR_ITERATIONS,
    dilations: Sequence[int] = PAMR_DILATIONS,
) -> Tensor:
    """Pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020; visinf/1-stage-wseg).

    Affinity to each of the 8 neighbours at every dilation:
    softmax over neighbours of mean over image channels of -|I(p) - I(q)| / (1e-8 + 0.1 sigma),
    where sigma is the per-channel std of the 9 x len(dilations) local values (unbiased,
    borders replicated). The masks are then averaged over neighbours with these weights
    ``num_iter`` times. Weights sum to 1, so each refined value is a convex combination
    of neighbouring values: probabilities stay in [0, 1] and per-pixel sums are kept
    (1 for a softmax over classes; at most 1 for synonym-reduced class probabilities).
    Because sigma scales with the image, a per-channel affine normalisation does not change the
    result: raw or normalised images give the same refinement.
    SCLIP applies PAMR to the query logits; here it refines class probabilities, which
    keeps them valid.

    Args:
        image: (B, 3, H', W') image (any per-channel scale); resized to the masks' size.
        probs: (B, C, H, W) class probabilities (or any masks).
    Returns:
        (B, C, H, W) refined masks, float32.
    """
    size = tuple(probs.shape[-2:])
    image = _resize(image.float(), size)  # (B, K, H, W)
    masks = probs.float()
    neighbours = _neighbours(dilations)
    pads = {d: F.pad(image, [d] * 4, mode="replicate") for d in dilations}
    # std over centre + 8 neighbours per dilation, all dilations pooled (two passes, exact)
    n_values = 9 * len(dilations)
    total = image * len(dilations)
    for d, dy, dx in neighbours:
        total = total + _shift(image, pads[d], d, dy, dx)
    mean = total / n_values
    sq = (image - mean).square() * len(dilations)
    for d, dy, dx in neighbours:
        sq = sq + (_shift(image, pads[d], d, dy, dx) - mean).square()
    sigma = (sq / (n_values - 1)).sqrt()  # (B, K, H, W)
    denom = 1e-8 + 0.1 * sigma
    affinity = torch.stack([(-(image - _shift(image, pads[d], d, dy, dx)).abs() / denom).mean(1)
                            for d, dy, dx in neighbours], dim=1)  # (B, P, H, W)
    affinity = torch.softmax(affinity, dim=1)
    del pads
    for _ in range(num_iter):
        padded = {d: F.pad(masks, [d] * 4, mode="replicate") for d in dilations}
        refined = torch.zeros_like(masks)
        for p, (d, dy, dx) in enumerate(neighbours):
            refined += affinity[:, p : p + 1] * _shift(masks, padded[d], d, dy, dx)
        masks = refined
    return masks


def area_filter(probs: Tensor, area_thd: float, background_index: int = 0) -> Tensor:
    """SCLIP area filter: zero classes predicted on too small a share of the foreground.

    For each image, the argmax area of every non-background class is compared with
    ``area_thd`` x the total non-background argmax area; classes at or below it get
    probability 0 (SCLIP ``postprocess_result``, area_thd 0.1 for VOC21/COCO-Object).

    Args:
        probs: (B, C, H, W) probabilities.
    Returns:
        (B, C, H, W) probabilities, filtered classes zeroed (not renormalised, as SCLIP).
    """
    num_classes = probs.shape[1]
    area = F.one_hot(probs.argmax(1), num_classes).flatten(1, 2).sum(1).float()  # (B, C)
    foreground = torch.ones(num_classes, dtype=torch.bool, device=probs.device)
    foreground[background_index] = False
    area = area * foreground
    keep = (area > area_thd * area.sum(1, keepdim=True)) | ~foreground  # (B, C)
    return probs * keep[:, :, None, None]


def background_threshold(
    labels: Tensor, probs: Tensor, prob_thd: float, background_index: int = 0
) -> Tensor:
    """SCLIP background threshold: pixels whose max probability is below ``prob_thd``
    become ``background_index``.

    As in SCLIP, ``probs`` are class probabilities from :func:`probabilities`: the
    softmax over all queries (every background word included), then the max over each
    class's synonyms.

    Args:
        labels: (B, H, W) int64; probs: (B, C, H, W).
    Returns:
        (B, H, W) int64.
    """
    return labels.masked_fill(probs.amax(1) < prob_thd, background_index)


class Segmentation(NamedTuple):
    """Result of :func:`segment`: labels (H, W) int64; probs (C, H, W) float32 or None.

    ``probs`` are class probabilities (:func:`probabilities`), after PAMR and the area
    filter when configured; with synonyms they need not sum to 1 per pixel.
    """

    labels: np.ndarray
    probs: np.ndarray | None


def postprocess(
    logits: Tensor,
    cfg: InferenceConfig,
    class_index: Tensor | None = None,
    *,
    background_index: int | None = 0,
    image: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Query logits -> (labels, class probabilities) with the configured post-processing.

    Order: prompt denoising on class logits (ReCLIP; removes whole classes), then the
    official SCLIP-family order: softmax(logit_scale * logits) over all S queries, class
    probability = max over each class's synonyms (:func:`probabilities`); then, on class
    probabilities: PAMR, SCLIP area filter, argmax, SCLIP background threshold.

    Args:
        logits: (B, S, H, W) query logits at full resolution (S == C without synonyms).
        cfg: logit_scale, pd_threshold/pd_scale, pamr*, area_thd, prob_thd.
        class_index: (S,) int64 class of each logit channel (``segmentor.class_index``),
            or None when channel c is class c.
        background_index: index of the background class, or None when the vocabulary
            has none (then ``prob_thd`` and ``area_thd`` must be off).
        image: (B, 3, H', W') image, needed only when ``cfg.pamr``.
    Returns:
        labels (B, H, W) int64 and class probabilities (B, C, H, W) float32.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, S, H, W), got {tuple(logits.shape)}")
    num_classes = _num_classes(class_index, logits.shape[1])
    if _is_identity(class_index):
        class_index = None  # channel c is class c: skip the reductions
    needs_bg = [n for n in ("prob_thd", "area_thd") if getattr(cfg, n) is not None]
    if needs_bg and background_index is None:
        raise ValueError(f"{needs_bg} assign pixels to background but background_index is None; "
                         "pass the background class index or set them to None")
    if background_index is not None and not 0 <= background_index < num_classes:
        raise ValueError(f"background_index {background_index} is outside the classes 0..{num_classes - 1}")
    if cfg.pamr and image is None:
        raise ValueError("cfg.pamr is on but no image was given; pass image=(B, 3, H, W) or set pamr=False")
    if cfg.pd_threshold is not None:
        logits = prompt_denoise(logits, cfg.pd_threshold, cfg.pd_scale, class_index)
    probs = probabilities(logits, cfg.logit_scale, class_index)  # (B, C, H, W)
    if cfg.pamr:
        probs = pamr(image.to(probs.device), probs, cfg.pamr_iter, cfg.pamr_dilations)
    if cfg.area_thd is not None:
        probs = area_filter(probs, cfg.area_thd, background_index)
    labels = probs.argmax(1)
    if cfg.prob_thd is not None:
        labels = background_threshold(labels, probs, cfg.prob_thd, background_index)
    return labels, probs


def predict_labels(
    logits: Tensor,
    cfg: InferenceConfig,
    class_index: Tensor | None = None,
    *,
    background_index: int | None = 0,
    image: Tensor | None = None,
) -> Tensor:
    """Label map (B, H, W) int64 from query logits (B, S, H, W); see :func:`postprocess`."""
    return postprocess(logits, cfg, class_index, background_index=background_index, image=image)[0]


# --------------------------------------------------------------------------- predictor


def _device_of(segmentor: Segmentor) -> torch.device:
    """Device of the segmentor's first parameter or buffer, CPU if it has none."""
    if isinstance(segmentor, torch.nn.Module):
        for tensor in (*segmentor.parameters(), *segmentor.buffers()):
            return tensor.device
    return torch.device("cpu")


def segment(
    segmentor: Segmentor,
    image: np.ndarray | Tensor,
    cfg: InferenceConfig,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    background_index: int | None = 0,
    return_probs: bool = False,
    device: torch.device | str | None = None,
) -> Segmentation:
    """Segment one uint8 RGB image (H, W, 3); preprocessing is hidden (SAM predictor style).

    Normalises with ``mean``/``std`` (0-1 units, applied to image / 255; default CLIP's),
    resizes to ``cfg.short_side`` for inference, runs :func:`infer_logits` and
    :func:`postprocess` with the segmentor's ``class_index`` (None when it has none:
    one channel per class) and returns results at the original (H, W). The raw image
    goes to the device only when PAMR needs it.

    Returns:
        Segmentation(labels (H, W) int64, class probs (C, H, W) float32 if
        ``return_probs`` else None).
    """
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    if mean_t.shape != (3,) or std_t.shape != (3,) or bool((std_t <= 0).any()):
        raise ValueError(f"mean and std must be 3 values with std > 0, got {mean!r}, {std!r}")
    if bool((mean_t > 1).any()):
        raise ValueError(f"mean {mean!r} looks like 0-255 units; pass 0-1 units (divide mean and std by 255)")
    device = torch.device(device) if device is not None else _device_of(segmentor)
    array = image.cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)  # (H, W, 3) uint8
    normalised = to_tensor_normalized(array, mean, std)[None].to(device)  # (1, 3, H, W)
    raw = None
    if cfg.pamr:  # PAMR works on the image itself; nothing else needs it on the device
        raw = torch.as_tensor(np.array(array, copy=True)).permute(2, 0, 1)[None].to(device)  # (1, 3, H, W) uint8
    logits = infer_logits(segmentor, normalised, cfg)  # (1, S, H, W)
    class_index = getattr(segmentor, "class_index", None)
    labels, probs = postprocess(logits, cfg, class_index, background_index=background_index, image=raw)
    return Segmentation(
        labels=labels[0].cpu().numpy().astype(np.int64),
        probs=probs[0].cpu().numpy() if return_probs else None,
    )
