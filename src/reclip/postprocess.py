"""Post-processing: query logits (B, S, H, W) -> class probabilities and label maps.

The logits are those of :func:`reclip.inference.infer_logits`: QUERY logits at full
resolution, already averaged over windows, reduced to classes by ``class_index`` (S,)
long, the class of each query channel (None when S == C, one channel per class).
:func:`postprocess` / :func:`predict_labels` follow the official SCLIP / ClearCLIP /
NACLIP order (``postprocess_result``): softmax(logit_scale * logits) over all S
queries; a class's probability is the max over its synonyms (:func:`probabilities`);
everything after that works on class probabilities (B, C, H, W). The steps are small
pure functions: :func:`prompt_denoise` (ReCLIP/ReCLIP++ "PD", the project's variant;
:func:`prompt_denoise_official` is the official one, which runs on the segmentor's grid
inside :func:`reclip.inference.infer_logits`), :func:`pamr`
(pixel-adaptive mask refinement, Araslanov & Roth, CVPR 2020), :func:`area_filter` and
:func:`background_threshold` (SCLIP family).

Why the order matters: with a synonym-heavy class (SCLIP's VOC21 background is 26
background words) the softmax spreads over all its words, so the class's probability
(the max over its words) is much lower than a softmax over per-class max logits would
give; the ``prob_thd`` background threshold is defined on the former. The argmax is
the same either way (softmax is monotone and shares one denominator per pixel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from reclip.data.transforms import resize_bilinear
from reclip.text import max_over_synonyms

__all__ = [
    "PostprocessConfig",
    "class_logits",
    "probabilities",
    "PD_MODES",
    "prompt_denoise",
    "prompt_denoise_official",
    "pamr",
    "area_filter",
    "background_threshold",
    "postprocess",
    "predict_labels",
]

# ReCLIP++ official test script: removed classes get this logit (dogehhh/ReCLIP tools/test.py).
PD_SUPPRESSED_LOGIT = -100.0
# PostprocessConfig.pd_mode values: "safe" = :func:`prompt_denoise` on the full-resolution
# logits in :func:`postprocess`; "official" = :func:`prompt_denoise_official` on the
# segmentor's grid, in :func:`reclip.inference.infer_logits` (whole-image mode only).
PD_MODES = ("safe", "official")
# PAMR defaults of the official implementation (visinf/1-stage-wseg, core/config.py:
# PAMR_ITER = 10, PAMR_KERNEL = [1, 2, 4, 8, 12, 24]).
PAMR_ITERATIONS = 10
PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)


@dataclass(kw_only=True)
class PostprocessConfig:
    """How query logits become class probabilities and labels (:func:`postprocess`).

    :class:`reclip.inference.InferenceConfig` extends it with how the segmentor runs.

    Attributes:
        logit_scale: multiplies logits before the softmax (SCLIP 40-65 / ClearCLIP 50 on
            cosines; 1.0 for trained heads). Only probabilities, ``prob_thd`` and PAMR
            depend on it; argmax does not.
        prob_thd: SCLIP-family background threshold on the max softmax probability
            (None = off).
        area_thd: SCLIP-family area filter: a non-background class whose predicted area
            is below this fraction of the predicted foreground area loses its pixels
            (None = off).
        pd_threshold: ReCLIP prompt denoising threshold (None = off); paper values VOC
            1.0, Context 0.85, ADE 0.5, Cityscapes 0.5, COCO 0.95.
        pd_scale: scale inside PD's softmax (ReCLIP++ 10; conference ReCLIP 100).
        pd_mode: which PD runs when ``pd_threshold`` is set. "safe" (default):
            :func:`prompt_denoise`, the project's variant, applied here by
            :func:`postprocess` to the full-resolution logits; it never removes an
            image's most confident class. "official": :func:`prompt_denoise_official`,
            exactly the official evaluator's, applied by
            :func:`reclip.inference.infer_logits` to the segmentor's grid before any
            upsampling (whole-image mode only); it can remove every class.
            :func:`postprocess` does not apply it again: its logits are already
            denoised, and applying it to upsampled logits would not be the official PD.
        pamr: refine probabilities with PAMR at full resolution.
        pamr_iter, pamr_dilations: PAMR iterations and dilations (default: the official
            PAMR's, 10 and (1, 2, 4, 8, 12, 24); NACLIP: 10 and (8, 16)).
    """

    logit_scale: float = 1.0
    prob_thd: float | None = None
    area_thd: float | None = None
    pd_threshold: float | None = None
    pd_scale: float = 10.0
    pd_mode: str = "safe"
    pamr: bool = False
    pamr_iter: int = PAMR_ITERATIONS
    pamr_dilations: tuple[int, ...] = PAMR_DILATIONS

    def __post_init__(self) -> None:
        if not self.logit_scale > 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale!r}")
        for name in ("prob_thd", "area_thd", "pd_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] or None (off), got {value!r}")
        if not self.pd_scale > 0:
            raise ValueError(f"pd_scale must be > 0, got {self.pd_scale!r}")
        if self.pd_mode not in PD_MODES:
            raise ValueError(f"pd_mode must be one of {list(PD_MODES)}, got {self.pd_mode!r} (safe = the project's "
                             "PD on full-resolution logits; official = the official PD on the segmentor's grid)")
        if not (isinstance(self.pamr_iter, int) and not isinstance(self.pamr_iter, bool) and self.pamr_iter > 0):
            raise ValueError(f"pamr_iter must be a positive int, got {self.pamr_iter!r}")
        dilations = self.pamr_dilations
        if (not isinstance(dilations, (list, tuple)) or not dilations
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dilations)):
            raise ValueError(f"pamr_dilations must be a non-empty sequence of positive ints (e.g. (8, 16), "
                             f"NACLIP's), got {dilations!r}")
        self.pamr_dilations = tuple(dilations)


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


def _pd_confidence(logits: Tensor, scale: float, class_index: Tensor | None) -> Tensor:
    """(B, C) spatial max of softmax(scale * class logits) over classes, per image."""
    scores = class_logits(logits, class_index)  # (B, C, H, W)
    return torch.softmax(scores.float() * scale, dim=1).flatten(2).amax(-1)


def _queries_of(remove: Tensor, class_index: Tensor | None) -> Tensor:
    """(B, C) per-class mask -> (B, S) per-query mask."""
    if _is_identity(class_index):
        return remove
    return remove[:, class_index.to(remove.device)]


def prompt_denoise(logits: Tensor, threshold: float, scale: float = 10.0,
                   class_index: Tensor | None = None) -> Tensor:
    """ReCLIP prompt denoising, the project's variant ("safe"): drop classes that are
    nowhere confident, but never an image's most confident class.

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
    it applies to whatever resolution it is given (:func:`postprocess`: the full-resolution
    logits). The exact official PD is :func:`prompt_denoise_official`.

    Args:
        logits: (B, S, H, W) raw query logits.
        class_index: (S,) int64 class of each query, or None when S == C.
    Returns:
        (B, S, H, W) query logits with the queries of removed classes filled.
    """
    conf = _pd_confidence(logits, scale, class_index)  # (B, C)
    remove = (conf < threshold) & (conf < conf.amax(dim=1, keepdim=True))  # keep the best
    remove = _queries_of(remove, class_index)  # (B, S)
    fill = min(PD_SUPPRESSED_LOGIT, float(logits.detach().amin()) - 1.0)
    return logits.masked_fill(remove[:, :, None, None], fill)


def prompt_denoise_official(logits: Tensor, threshold: float, scale: float = 10.0,
                            class_index: Tensor | None = None) -> Tensor:
    """ReCLIP prompt denoising exactly as the official evaluator (dogehhh/ReCLIP
    tools/test.py) applies it.

    For each image, a class whose spatial max of softmax(scale * class logits) over the
    classes is strictly below ``threshold`` gets the logit -100 everywhere (exactly -100,
    whatever the other logits are), on every one of its queries (with synonyms the class
    logits are the max over each class's synonyms, as in :func:`prompt_denoise`; the
    official head has one channel per class). Nothing protects the most confident
    class: when no class reaches the threshold (at VOC's 1.0, any class whose softmax
    does not round to exactly 1.0 in float32) every class is removed, all logits are -100,
    and the argmax returns class 0 at every pixel (``torch.argmax`` returns the first of
    equal maxima; bilinear upsampling keeps the classes equal). A kept class whose logit
    is below -100 somewhere loses those pixels to the removed classes, as officially.

    The official code runs it on the head's grid, before upsampling:
    :func:`reclip.inference.infer_logits` does that when ``cfg.pd_mode == "official"``.

    Args:
        logits: (B, S, h, w) raw query logits on the segmentor's grid.
        threshold: per-dataset threshold (ReCLIP++: VOC 1.0, Context 0.85, ADE 0.5,
            Cityscapes 0.5, COCO 0.95).
        scale: scale inside the softmax (ReCLIP++ 10, ReCLIP 100).
        class_index: (S,) int64 class of each query, or None when S == C.
    Returns:
        (B, S, h, w) query logits with the queries of removed classes set to -100.
    """
    remove = _queries_of(_pd_confidence(logits, scale, class_index) < threshold, class_index)  # (B, S)
    return logits.masked_fill(remove[:, :, None, None], PD_SUPPRESSED_LOGIT)


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
    image = resize_bilinear(image.float(), size)  # (B, K, H, W)
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
    probability 0 (SCLIP ``postprocess_result``; SCLIP's VOC21 config sets area_thd 0.1,
    its COCO-Object config none).

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


def postprocess(
    logits: Tensor,
    cfg: PostprocessConfig,
    class_index: Tensor | None = None,
    *,
    background_index: int | None = 0,
    image: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Query logits -> (labels, class probabilities) with the configured post-processing.

    Order: prompt denoising on class logits (ReCLIP; removes whole classes; only
    ``pd_mode="safe"``: the official PD already ran on the grid in
    :func:`reclip.inference.infer_logits` and is not applied again here), then the
    official SCLIP-family order: softmax(logit_scale * logits) over all S queries, class
    probability = max over each class's synonyms (:func:`probabilities`); then, on class
    probabilities: PAMR, SCLIP area filter, argmax, SCLIP background threshold.

    Args:
        logits: (B, S, H, W) query logits at full resolution (S == C without synonyms).
        cfg: logit_scale, pd_threshold/pd_scale/pd_mode, pamr*, area_thd, prob_thd.
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
    if cfg.pd_threshold is not None and cfg.pd_mode == "safe":
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
    cfg: PostprocessConfig,
    class_index: Tensor | None = None,
    *,
    background_index: int | None = 0,
    image: Tensor | None = None,
) -> Tensor:
    """Label map (B, H, W) int64 from query logits (B, S, H, W); see :func:`postprocess`."""
    return postprocess(logits, cfg, class_index, background_index=background_index, image=image)[0]
