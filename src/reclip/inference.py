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
- :func:`segment` is the predictor-style convenience: uint8 image in, label map out;
- :func:`segment_many` segments a stream of images as :func:`segment` would, batching
  across images (whole mode: the images of one size; slide mode: the windows of
  consecutive images share calls), from pixels or from :func:`prepare_image`'s
  normalised, resized inputs (what DataLoader workers make ahead of the model);
  :func:`warm_up` compiles a ``torch.compile`` segmentor before a timed run.

Turning query logits into class probabilities and labels (synonym reduction, prompt
denoising, PAMR, the SCLIP-family filters) is :mod:`reclip.postprocess`, with one
exception: the official prompt denoising (``pd_mode="official"``) acts on the
segmentor's grid, before upsampling, so :func:`infer_logits` applies it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from reclip.data.transforms import (CLIP_MEAN, CLIP_STD, resize_bilinear, resize_short_side, short_side_size,
                                    to_tensor_normalized)
from reclip.postprocess import PostprocessConfig, postprocess, prompt_denoise_official

__all__ = [
    "AUTOCAST_MODES",
    "InferenceConfig",
    "Segmentation",
    "slide_windows",
    "image_context",
    "infer_logits",
    "device_of",
    "input_size",
    "PreparedImage",
    "prepare_image",
    "warm_up",
    "segment",
    "segment_many",
]

Segmentor = Callable[[Tensor], Tensor]

# InferenceConfig.autocast values (besides True = "bf16" and False = off) and their dtypes.
AUTOCAST_MODES = {"bf16": torch.bfloat16, "fp16": torch.float16, "auto": torch.bfloat16}


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """(h, w) from an int or a pair of positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a (h, w) pair of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


@dataclass(kw_only=True)
class InferenceConfig(PostprocessConfig):
    """How to run a segmentor, and (inherited from :class:`~reclip.postprocess.PostprocessConfig`:
    ``logit_scale``, ``prob_thd``, ``area_thd``, ``pd_threshold``, ``pd_scale``, ``pd_mode``,
    ``pamr*``) how to post-process its logits. ``pd_mode="official"`` with a
    ``pd_threshold`` needs ``mode="whole"``: the official PD is defined on each whole
    image's grid (the official evaluator is whole-image only); per window it would judge
    each window on its own and average -100 fills into other windows' logits.

    Attributes:
        mode: "whole" (one forward per image) or "slide" (overlapping windows).
        short_side: resize so the short side equals this before inference (None: keep).
        max_long_side: cap on the long side of that resize (mmseg's Resize(scale=(2048,
            short_side)) in the published protocols; None: no cap).
        antialias: low-pass filter when that resize downsamples. Off by default, as in
            the published protocols (mmseg / OpenCV INTER_LINEAR).
        window: sliding-window crop size, int or (h, w).
        stride: sliding-window stride, int or (h, w); must not exceed ``window``.
        batch_size: windows per segmentor call in slide mode (default 16). In
            :func:`segment_many` (and so evaluation) the windows of consecutive images
            share these batches (an image's windows may span two calls).
        whole_batch_size: images per segmentor call in whole mode (default 1: one image
            per forward, so a whole-mode run needs the memory of its largest image, as
            before batching existed). Larger values batch the images of one size (after
            ``short_side``) that many per call, with results equal to one at a time, and
            a forward then holds that many images: raise it only when they fit.
        autocast: mixed precision of the segmentor call: False = off, True or "bf16" =
            bfloat16 on any device, "fp16" = float16 on any device, "auto" = bfloat16 on
            CUDA and off elsewhere. Window accumulation and post-processing are always
            float32 (and the zero-shot head computes its cosines in float32).
        compile: run the segmentor through ``torch.compile`` (default False). Opt-in: the
            first call of each new input shape compiles (seconds to minutes; a few
            distinct shapes, after which dynamic shapes or eager are used), so it pays
            only over many calls of few shapes (slide mode's fixed windows, or whole mode
            after a fixed resize). Labels are those of the uncompiled segmentor up to
            float rounding. The compiled wrapper is cached per segmentor; :func:`warm_up`
            compiles ahead of a timed run (evaluation reports that time apart).
    """

    mode: Literal["whole", "slide"] = "whole"
    short_side: int | None = None
    max_long_side: int | None = None
    antialias: bool = False
    window: int | tuple[int, int] = 224
    stride: int | tuple[int, int] = 112
    batch_size: int = 16
    whole_batch_size: int = 1
    autocast: bool | Literal["auto", "bf16", "fp16"] = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {self.mode!r}")
        if self.pd_mode == "official" and self.pd_threshold is not None and self.mode != "whole":
            raise ValueError(
                f"the official prompt denoising runs on each whole image's grid, but mode is {self.mode!r}; "
                "use mode='whole' (--mode whole, as the official evaluator) or the project's PD, which works "
                "on the full-resolution logits of any mode (--prompt-denoising official-safe; pd_mode='safe')"
            )
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
        if not (isinstance(self.whole_batch_size, int) and not isinstance(self.whole_batch_size, bool)
                and self.whole_batch_size > 0):
            raise ValueError(f"whole_batch_size must be a positive int, got {self.whole_batch_size!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
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


_COMPILED_ATTR = "_reclip_compiled"


def compiled(segmentor: Segmentor) -> Segmentor:
    """``torch.compile(segmentor)``, built once per segmentor and kept on it (in its
    ``__dict__``, not as a submodule: its state dict is unchanged), so every call of an
    evaluation reuses the compiled graphs and both go when the segmentor goes. The wrapper
    holds the segmentor (``_orig_mod``): a cycle, so a dropped compiled segmentor (and its
    device memory) is freed by the garbage collector, not at once (``gc.collect()``)."""
    fn = segmentor.__dict__.get(_COMPILED_ATTR)
    if fn is None:
        fn = segmentor.__dict__[_COMPILED_ATTR] = torch.compile(segmentor)
    return fn


def _call(segmentor: Segmentor, images: Tensor, cfg: InferenceConfig) -> Tensor:
    """One segmentor call with shape checks; returns float32 logits (n, S, h, w)."""
    with _autocast(images.device, cfg):
        logits = (compiled(segmentor) if cfg.compile else segmentor)(images)
    if not isinstance(logits, Tensor) or logits.ndim != 4 or logits.shape[0] != images.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"segmentor must return logits (B, S, h, w) with B = {images.shape[0]}, got {shape}; "
            "wrap it so that it returns one logits tensor"
        )
    return logits.float()


def _infer_whole(segmentor: Segmentor, images: Tensor, cfg: InferenceConfig, size: tuple[int, int]) -> Tensor:
    """Whole-image inference, ``whole_batch_size`` images per call; logits resized to ``size``.

    With ``cfg.pd_mode == "official"`` and a ``pd_threshold``, the official prompt
    denoising runs on each image's grid logits before the resize (as the official
    evaluator), with the segmentor's ``class_index`` when it has one.
    """
    official_pd = cfg.pd_threshold is not None and cfg.pd_mode == "official"
    class_index = getattr(segmentor, "class_index", None)
    chunks = []
    for i in range(0, images.shape[0], cfg.whole_batch_size):
        grid = _call(segmentor, images[i : i + cfg.whole_batch_size], cfg)  # (n, S, h, w)
        if official_pd:
            grid = prompt_denoise_official(grid, cfg.pd_threshold, cfg.pd_scale, class_index)
        chunks.append(resize_bilinear(grid, size))
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
        logits = resize_bilinear(_call(segmentor, crops, cfg), tuple(crops.shape[-2:]))  # (n, S, ch, cw)
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
    resized and averaged over windows as they are; reduce them with
    :func:`reclip.postprocess.postprocess`. The one exception is the official prompt
    denoising (``cfg.pd_mode == "official"`` with a ``pd_threshold``, whole mode only),
    applied here to each image's grid logits before upsampling
    (:func:`reclip.postprocess.prompt_denoise_official`, with the segmentor's
    ``class_index``); the project's PD (``pd_mode="safe"``) is left to ``postprocess``.

    Args:
        segmentor: callable (B, 3, H, W) -> (B, S, h, w) raw scores.
        image: normalised images (B, 3, H, W) or (3, H, W), on the segmentor's device.
        cfg: mode, short-side resize, window/stride, batch sizes, autocast.
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
        return resize_bilinear(_infer_slide(segmentor, image, cfg), out_size)


# --------------------------------------------------------------------------- per image


def image_context(segmentor: Segmentor, image: np.ndarray, image_id: str) -> contextlib.AbstractContextManager:
    """The segmentor's per-image context, for segmentors that need more than the pixels.

    A segmentor may define ``for_image(image, image_id)``, a context manager entered
    around the segmentation of one image (``image`` (H, W, 3) uint8 as read, ``image_id``
    its dataset id or output name): MAFT looks up that image's mask proposals there
    (:meth:`reclip.maft.segmentor.MAFTSegmentor.for_image`). Every other segmentor gets
    a null context. The evaluation and file-segmentation loops of :mod:`reclip.api` use
    it; a caller of :func:`segment` may too.
    """
    hook = getattr(segmentor, "for_image", None)
    return hook(image, image_id) if callable(hook) else contextlib.nullcontext()


# --------------------------------------------------------------------------- predictor


class Segmentation(NamedTuple):
    """Result of :func:`segment`: labels (H, W) int64; probs (C, H, W) float32 or None.

    ``probs`` are class probabilities (:func:`reclip.postprocess.probabilities`), after
    PAMR and the area filter when configured; with synonyms they need not sum to 1 per
    pixel.
    """

    labels: np.ndarray
    probs: np.ndarray | None


def device_of(segmentor: Segmentor) -> torch.device:
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
    :func:`reclip.postprocess.postprocess` with the segmentor's ``class_index`` (None
    when it has none: one channel per class) and returns results at the original (H, W).
    The raw image goes to the device only when PAMR needs it.

    Returns:
        Segmentation(labels (H, W) int64, class probs (C, H, W) float32 if
        ``return_probs`` else None).
    """
    _check_mean_std(mean, std)
    device = torch.device(device) if device is not None else device_of(segmentor)
    normalised, raw = _prepare(image, cfg, mean, std, device)
    logits = infer_logits(segmentor, normalised, cfg)  # (1, S, H, W)
    return _finish(segmentor, logits, cfg, raw, background_index, return_probs)


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    if mean_t.shape != (3,) or std_t.shape != (3,) or bool((std_t <= 0).any()):
        raise ValueError(f"mean and std must be 3 values with std > 0, got {mean!r}, {std!r}")
    if bool((mean_t > 1).any()):
        raise ValueError(f"mean {mean!r} looks like 0-255 units; pass 0-1 units (divide mean and std by 255)")


def _prepare(image: np.ndarray | Tensor, cfg: InferenceConfig, mean: Sequence[float], std: Sequence[float],
             device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The normalised image (1, 3, H, W) on ``device``, and the raw one (1, 3, H, W) uint8 when PAMR needs it."""
    array = image.cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)  # (H, W, 3) uint8
    normalised = to_tensor_normalized(array, mean, std)[None].to(device)  # (1, 3, H, W)
    raw = None
    if cfg.pamr:  # PAMR works on the image itself; nothing else needs it on the device
        raw = torch.as_tensor(np.array(array, copy=True)).permute(2, 0, 1)[None].to(device)  # (1, 3, H, W) uint8
    return normalised, raw


def _finish(segmentor: Segmentor, logits: Tensor, cfg: InferenceConfig, raw: Tensor | None,
            background_index: int | None, return_probs: bool) -> Segmentation:
    """Post-processing of one image's full-size logits (1, S, H, W) into its Segmentation."""
    class_index = getattr(segmentor, "class_index", None)
    labels, probs = postprocess(logits, cfg, class_index, background_index=background_index, image=raw)
    return Segmentation(
        labels=labels[0].cpu().numpy().astype(np.int64),
        probs=probs[0].cpu().numpy() if return_probs else None,
    )


class PreparedImage(NamedTuple):
    """An image made ready for a segmentor by :func:`prepare_image`, e.g. in a DataLoader
    worker, ahead of the model; :func:`segment_many` takes it in place of the pixels.

    Attributes:
        input: normalised float32 (3, h, w) at the inference size (after ``cfg.short_side``),
            on the CPU (pinned by a DataLoader with ``pin_memory``).
        size: (H, W) of the image as given: results come back at this size.
        raw: the image itself, uint8 (3, H, W), when post-processing needs it (PAMR); else None.
    """

    input: Tensor
    size: tuple[int, int]
    raw: Tensor | None


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread inside (the previous count restored after). torch's CPU bilinear
    resize rounds the last bit differently with other thread counts, and DataLoader workers
    run one thread: preparing on one thread everywhere gives the same numbers with workers
    or without."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def prepare_image(image: np.ndarray | Tensor, cfg: InferenceConfig, mean: Sequence[float] = CLIP_MEAN,
                  std: Sequence[float] = CLIP_STD) -> PreparedImage:
    """Normalise and resize one uint8 (H, W, 3) image on the CPU as :func:`segment` and
    :func:`segment_many` do (the same operations in the same order: normalise, then
    :func:`~reclip.data.transforms.resize_short_side` of the float image). It runs on one
    intra-op thread, so its numbers are the same wherever it runs (a DataLoader worker or
    this process); the resize on more threads (or a GPU) may differ in the last bit. Pure:
    safe in DataLoader workers."""
    _check_mean_std(mean, std)
    with _one_thread():
        normalised, raw = _prepare(image, cfg, mean, std, torch.device("cpu"))
        if cfg.short_side is not None:
            normalised = resize_short_side(normalised, cfg.short_side, max_long_side=cfg.max_long_side,
                                           antialias=cfg.antialias)
    return PreparedImage(normalised[0], _image_size(image), None if raw is None else raw[0])


def _ready(image: np.ndarray | Tensor | PreparedImage, cfg: InferenceConfig, mean: Sequence[float],
           std: Sequence[float], device: torch.device) -> tuple[Tensor, tuple[int, int], Tensor | None]:
    """(model input (1, 3, h, w) on ``device``, (H, W) of the image, raw (1, 3, H, W) uint8 or None)
    of an image as given or prepared; a prepared one is only moved (asynchronously from pinned memory)."""
    if isinstance(image, PreparedImage):  # its size may come back a list from pin_memory: only read as (H, W)
        raw = None if image.raw is None else image.raw[None].to(device, non_blocking=True)
        return image.input[None].to(device, non_blocking=True), image.size, raw
    normalised, raw = _prepare(image, cfg, mean, std, device)
    if cfg.short_side is not None:
        normalised = resize_short_side(normalised, cfg.short_side, max_long_side=cfg.max_long_side,
                                       antialias=cfg.antialias)
    return normalised, _image_size(image), raw


def warm_up(segmentor: Segmentor, cfg: InferenceConfig, inputs: tuple[int, int],
            device: torch.device | str | None = None) -> float:
    """Seconds of untimed calls that compile ``segmentor`` (``cfg.compile``) for the shapes
    a run with inputs of size ``inputs`` (h, w, after the short-side resize) feeds it: a full
    batch (``batch_size`` windows in slide mode, ``whole_batch_size`` images in whole mode),
    one less (torch.compile's second batch size compiles a graph with a dynamic batch, which
    serves the partial batches at the ends of chunks) and one (torch specialises sizes 0 and
    1). Other input sizes (whole mode) still compile on their first call. 0.0 without
    ``cfg.compile``. Zeros go in: not for a segmentor with a per-image context
    (``for_image``), whose calls need that context."""
    if not cfg.compile:
        return 0.0
    device = torch.device(device) if device is not None else device_of(segmentor)
    h, w = inputs
    if cfg.mode == "slide":
        window = _pair(cfg.window, "window")
        shape, full = (min(window[0], h), min(window[1], w)), cfg.batch_size
    else:
        shape, full = (h, w), cfg.whole_batch_size
    start = time.perf_counter()
    with torch.no_grad():
        for n in dict.fromkeys(n for n in (full, full - 1, 1) if n > 0):
            _call(segmentor, torch.zeros((n, 3, *shape), device=device), cfg)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def segment_many(
    segmentor: Segmentor,
    images: Sequence[np.ndarray | Tensor | PreparedImage],
    cfg: InferenceConfig,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    background_index: int | None = 0,
    return_probs: bool = False,
    device: torch.device | str | None = None,
) -> list[Segmentation]:
    """:func:`segment` of several images, equal to segmenting them one at a time.

    ``images`` are uint8 (H, W, 3) images or :class:`PreparedImage` (from
    :func:`prepare_image` with the same ``cfg``, ``mean`` and ``std``, e.g. made in
    DataLoader workers); prepared ones are only moved to the device.

    Whole mode: the images whose size after ``cfg.short_side`` is the same go through the
    segmentor together, ``cfg.whole_batch_size`` images per call (in list order within a
    size); each image's grid logits are then resized to its own size and post-processed
    alone. Only one call's images are on the device at a time: each is normalised and
    moved there when its call comes (its input size is computed without reading its
    pixels), and nothing of an image but its size (and, with PAMR, its raw pixels, moved
    for its post-processing) is kept after its call.

    Slide mode: the windows of consecutive images (any sizes) share segmentor calls of at
    most ``cfg.batch_size`` windows (a call holds windows of one shape: a smaller image's
    smaller windows start a new call); each image's windows are summed into its own map and
    divided by its window count as in :func:`infer_logits`, and the image is post-processed
    as soon as its last window is in, so only the images whose windows are in flight are
    held. Equal to one image at a time up to the float rounding of other batch shapes.

    Segmentors with a per-image context (``for_image``, see :func:`image_context`: the
    caller enters it around each image) run one image at a time. Returns one Segmentation
    per image, in order.
    """
    if callable(getattr(segmentor, "for_image", None)):
        return [segment(segmentor, image, cfg, mean, std, background_index, return_probs, device)
                for image in images]
    _check_mean_std(mean, std)
    device = torch.device(device) if device is not None else device_of(segmentor)
    with torch.no_grad():
        if cfg.mode == "slide":
            return _segment_slide(segmentor, images, cfg, mean, std, background_index, return_probs, device)
        return _segment_whole(segmentor, images, cfg, mean, std, background_index, return_probs, device)


def _segment_whole(segmentor: Segmentor, images: Sequence[np.ndarray | Tensor | PreparedImage],
                   cfg: InferenceConfig, mean: Sequence[float], std: Sequence[float],
                   background_index: int | None, return_probs: bool, device: torch.device) -> list[Segmentation]:
    """Whole mode of :func:`segment_many`: the images of one input size batched."""
    sizes = [image.size if isinstance(image, PreparedImage) else _image_size(image) for image in images]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (image, hw) in enumerate(zip(images, sizes)):
        key = tuple(image.input.shape[-2:]) if isinstance(image, PreparedImage) else input_size(hw, cfg)
        by_size.setdefault(key, []).append(i)
    official_pd = cfg.pd_threshold is not None and cfg.pd_mode == "official"
    class_index = getattr(segmentor, "class_index", None)
    results: list[Segmentation | None] = [None] * len(images)
    for members in by_size.values():
        for start in range(0, len(members), cfg.whole_batch_size):
            chunk = members[start : start + cfg.whole_batch_size]
            inputs, raws = [], []
            for i in chunk:  # each resized alone: exactly what segment() feeds the segmentor
                normalised, _, raw = _ready(images[i], cfg, mean, std, device)
                inputs.append(normalised)
                raws.append(raw)
            batch = torch.cat(inputs)
            del inputs
            grids = _call(segmentor, batch, cfg)  # (n, S, h, w)
            del batch
            for i, grid, raw in zip(chunk, grids, raws):
                grid = grid[None]  # (1, S, h, w)
                if official_pd:
                    grid = prompt_denoise_official(grid, cfg.pd_threshold, cfg.pd_scale, class_index)
                logits = resize_bilinear(grid, sizes[i])  # (1, S, H, W)
                results[i] = _finish(segmentor, logits, cfg, raw, background_index, return_probs)
            del grids, raws
    return results  # type: ignore[return-value]


class _SlideImage:
    """One image of :func:`_segment_slide` while its windows are in flight: the window sum
    (allocated at its first logits), the per-pixel window count, windows still to come."""

    def __init__(self, size: tuple[int, int], input_size: tuple[int, int], windows: int, raw: Tensor | None,
                 count: Tensor) -> None:
        self.size, self.input_size, self.left, self.raw, self.count = size, input_size, windows, raw, count
        self.preds: Tensor | None = None


def _segment_slide(segmentor: Segmentor, images: Sequence[np.ndarray | Tensor | PreparedImage],
                   cfg: InferenceConfig, mean: Sequence[float], std: Sequence[float],
                   background_index: int | None, return_probs: bool, device: torch.device) -> list[Segmentation]:
    """Slide mode of :func:`segment_many`: the windows of consecutive images share calls."""
    results: list[Segmentation | None] = [None] * len(images)
    open_images: dict[int, _SlideImage] = {}
    crops: list[Tensor] = []  # the next call's windows (3, ch, cw), all of one shape
    placed: list[tuple[int, tuple[int, int, int, int]]] = []  # (image index, window) of each crop

    def run() -> None:
        logits = _call(segmentor, torch.stack(crops), cfg)  # (n, S, h, w)
        logits = resize_bilinear(logits, tuple(crops[0].shape[-2:]))  # (n, S, ch, cw)
        crops.clear()
        for logit, (i, (y1, y2, x1, x2)) in zip(logits, placed):
            state = open_images[i]
            if state.preds is None:
                state.preds = torch.zeros((logits.shape[1], *state.input_size), dtype=torch.float32, device=device)
            state.preds[:, y1:y2, x1:x2] += logit
            state.left -= 1
            if state.left == 0:  # its last window: average, resize to its size, post-process (infer_logits' steps)
                done = open_images.pop(i)
                full = resize_bilinear((done.preds / done.count)[None], done.size)  # (1, S, H, W)
                results[i] = _finish(segmentor, full, cfg, done.raw, background_index, return_probs)
        placed.clear()

    for i, image in enumerate(images):
        normalised, size, raw = _ready(image, cfg, mean, std, device)  # (1, 3, h, w)
        height, width = normalised.shape[-2:]
        windows = slide_windows(height, width, cfg.window, cfg.stride)
        count = torch.zeros((1, height, width), dtype=torch.float32, device=device)
        for y1, y2, x1, x2 in windows:
            count[:, y1:y2, x1:x2] += 1
        assert bool((count > 0).all()), "sliding windows must cover every pixel"
        open_images[i] = _SlideImage(size, (height, width), len(windows), raw, count)
        for y1, y2, x1, x2 in windows:
            crop = normalised[0, :, y1:y2, x1:x2]  # (3, ch, cw)
            if crops and (len(crops) == cfg.batch_size or crop.shape != crops[0].shape):
                run()
            crops.append(crop)
            placed.append((i, (y1, y2, x1, x2)))
        del normalised
    if crops:
        run()
    return results  # type: ignore[return-value]


def _image_size(image: np.ndarray | Tensor) -> tuple[int, int]:
    """(H, W) of an (H, W, 3) image, without copying it (:func:`_prepare` checks the image)."""
    shape = np.shape(image) if not isinstance(image, Tensor) else tuple(image.shape)
    return int(shape[0]), int(shape[1])


def input_size(size: tuple[int, int], cfg: InferenceConfig) -> tuple[int, int]:
    """(h, w) the segmentor gets for an image of ``size``: after ``cfg.short_side``, as
    :func:`reclip.data.transforms.resize_short_side` resizes it."""
    if cfg.short_side is None:
        return size
    return short_side_size(size[0], size[1], cfg.short_side, max_long_side=cfg.max_long_side)
