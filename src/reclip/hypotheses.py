"""Image-level class hypotheses H: which classes may be in each training image.

ReCLIP++'s contrastive loss (paper eq. 7) runs over the classes hypothesised for an
image, found without any label (paper section III-D, eq. 6):

1. slide a window of r x (H, W) over the image with a stride of half the window;
2. classify every crop with CLIP's *global* image embedding (CLS token, ln_post, proj,
   L2-normalised) against the query embeddings W_q; each crop votes for its top-1 class;
3. keep the classes whose vote frequency f(k) = votes(k) / #crops is > t.

Three rules (``HypothesisConfig.rule``):

- ``"windows"``: eq. 6 above (paper default r = 1/6; t = 7% for VOC and Cityscapes, 0
  for the other datasets, section IV-A; each protocol's ``hypotheses:`` section).
- ``"any_vote"``: the official code (dogehhh/ReCLIP tools/pseudo_class.py ``ReCLIPPP``):
  every class with at least one vote.
- ``"whole_image"``: ReCLIP, the conference version (same file, ``ReCLIP``): the whole
  image scored once; classes with logit_scale * cosine >= threshold, else the top-K.

Official geometry, for reference (we follow the paper and say where we differ): the
official window is a *square* of int(crop_size / 6) pixels on the original image
(crop_size = the training crop, 336 for VOC -> 56 px), stride int(window / 2), and the
last window is not flush with the border (``range(0, H - w, s)``), so images no larger
than one window get no crop. Each crop goes through CLIP's own preprocessing (bicubic
short-side resize to the input resolution, centre crop, CLIP mean / std), one crop per
forward pass. Here all crops of all images go through CLIP in batches.

    config = config_for_protocol("voc20")                  # rule "windows", r 1/6, t 0.07
    hyps = image_hypotheses(clip, [image], queries, config=config, mean=m, std=s)  # [[3, 14]]
    generate_hypotheses(clip, dataset, queries, config=config, out_path="hyp.json")
    by_id = load_hypotheses("hyp.json", vocabulary=dataset.vocabulary, clip=clip)
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from reclip.data.protocol import HypothesisSettings, Protocol, load_protocol
from reclip.files import atomic_write_json
from reclip.text import QueryEmbeddings, Vocabulary
from reclip.train.distributed import current_processes, gather, on_rank0, shard

if TYPE_CHECKING:
    from reclip.clip.model import CLIP

__all__ = [
    "FORMAT_VERSION",
    "GenerationSummary",
    "HypothesesFileError",
    "HypothesisConfig",
    "config_for_protocol",
    "crop_boxes",
    "crop_scores",
    "generate_hypotheses",
    "image_hypotheses",
    "load_hypotheses",
    "save_hypotheses",
    "select_classes",
]

RULES = ("windows", "any_vote", "whole_image")
RESIZES = ("clip", "squash")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class HypothesisConfig:
    """How the hypotheses of an image are found.

    Attributes:
        rule: "windows" (paper eq. 6: f(k) > t), "any_vote" (official code: >= 1 vote) or
            "whole_image" (ReCLIP conference rule: whole-image score >= threshold, top-K
            fallback).
        r: window side as a fraction of the image side (paper IV-A: r = 1/6).
        t: frequency threshold of eq. 6, in [0, 1) (paper IV-A: 0.07 for VOC and
            Cityscapes, 0 otherwise; each protocol's ``hypotheses.t``).
        threshold: "whole_image" only, on logit_scale.exp() * cosine (official
            DATASET.THRESHOLD; default VOC's 23; each protocol's ``hypotheses.threshold``).
        top_k: "whole_image" only: classes kept when none reaches the threshold
            (official DATASET.K; default VOC's 2).
        batch_size: crops per CLIP forward pass.
        resize: how a crop becomes CLIP's input resolution R x R: "clip" = CLIP's own
            preprocessing as in the official code (bicubic resize of the short side to R,
            centre crop R x R) or "squash" (bicubic resize to R x R, aspect not kept).
    """

    # r, t, threshold and top_k: the defaults and checks of a protocol's `hypotheses:` section
    rule: str = "windows"
    r: float = HypothesisSettings.r
    t: float = HypothesisSettings.t
    threshold: float = HypothesisSettings.threshold
    top_k: int = HypothesisSettings.top_k
    batch_size: int = 64
    resize: str = "clip"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {list(RULES)}, got {self.rule!r}")
        if self.resize not in RESIZES:
            raise ValueError(f"resize must be one of {list(RESIZES)}, got {self.resize!r}")
        HypothesisSettings(r=self.r, t=self.t, threshold=self.threshold, top_k=self.top_k)  # raises naming the value
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def config_for_protocol(protocol: Protocol | str | os.PathLike, **overrides: Any) -> HypothesisConfig:
    """A protocol's hypothesis settings (its ``hypotheses:`` section: r, t, threshold, top_k),
    then ``overrides`` (HypothesisConfig fields; those whose value is None are ignored).

    Args:
        protocol: a :class:`~reclip.data.protocol.Protocol`, or a shipped protocol name or
            YAML path (:func:`~reclip.data.protocol.load_protocol`). A YAML without the
            section gets the schema's defaults (t = 0, the paper's value for all datasets
            but VOC and Cityscapes).
    """
    if not isinstance(protocol, Protocol):
        protocol = load_protocol(protocol)
    values: dict[str, Any] = asdict(protocol.hypotheses)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return HypothesisConfig(**values)


# -- geometry ------------------------------------------------------------------------------


def _window_starts(size: int, window: int) -> list[int]:
    """Starts of windows of ``window`` pixels over ``size``: stride window // 2, last one flush."""
    stride = max(1, window // 2)
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)  # flush with the border (the official loop stops short)
    return starts


def crop_boxes(height: int, width: int, r: float) -> list[tuple[int, int, int, int]]:
    """Sliding windows of the paper (section III-D): r x the image size, stride half a window.

    The window is round(r * H) x round(r * W) (at least 1 pixel, at most the image), the
    stride half the window (at least 1), and the last window of each row / column is
    flush with the border, so every pixel is covered. Row-major order.

    Returns:
        [(y0, y1, x0, x1), ...], half-open pixel boxes.
    """
    if height < 1 or width < 1:
        raise ValueError(f"crop_boxes: image size must be positive, got (H, W) = ({height}, {width})")
    if not 0.0 < r <= 1.0:
        raise ValueError(f"crop_boxes: r must be in (0, 1], got {r}")
    wh = min(height, max(1, math.floor(r * height + 0.5)))
    ww = min(width, max(1, math.floor(r * width + 0.5)))
    return [(y, y + wh, x, x + ww) for y in _window_starts(height, wh) for x in _window_starts(width, ww)]


def _boxes(height: int, width: int, config: HypothesisConfig) -> list[tuple[int, int, int, int]]:
    if config.rule == "whole_image":
        return [(0, height, 0, width)]
    return crop_boxes(height, width, config.r)


def _resize_crops(crops: torch.Tensor, resolution: int, resize: str) -> torch.Tensor:
    """(N, 3, h, w) uint8 crops of one size -> (N, 3, R, R) float in 0..255.

    "clip" follows OpenAI's preprocess (torchvision Resize(R) bicubic on the short side,
    long side int(R * long / short), then CenterCrop(R)); the resized pixels are clamped
    and rounded to 0..255 as Pillow's uint8 output is. Pillow's and torch's bicubic
    kernels differ slightly, so values match the official pipeline to about one grey level.
    """
    h, w = crops.shape[-2:]
    if resize == "clip":
        if h <= w:
            size = (resolution, int(resolution * w / h))
        else:
            size = (int(resolution * h / w), resolution)
    else:
        size = (resolution, resolution)
    x = F.interpolate(crops.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp_(0, 255).round_()
    top = int(round((size[0] - resolution) / 2.0))
    left = int(round((size[1] - resolution) / 2.0))
    return x[..., top : top + resolution, left : left + resolution]


# -- classification -------------------------------------------------------------------------


def _check_image(image: Any, index: int) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}".strip()
        raise ValueError(f"image {index} must be an (H, W, 3) uint8 RGB array, got {desc}; read it with read_image()")


def _device_of(clip: torch.nn.Module) -> torch.device:
    param = next(clip.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def crop_scores(
    clip: CLIP,
    images: Sequence[np.ndarray],
    queries: QueryEmbeddings,
    *,
    config: HypothesisConfig,
    mean: Sequence[float],
    std: Sequence[float],
) -> list[torch.Tensor]:
    """Cosine scores of every crop of every image against every class.

    The crops of all images are streamed through CLIP ``config.batch_size`` at a time
    (a batch may hold crops of several images); each is resized to CLIP's input
    resolution (``config.resize``), normalised ((x / 255 - mean) / std), encoded with
    ``clip.encode_image`` (the global embedding), L2-normalised and scored against the
    queries (max over a class's synonyms).

    Args:
        clip: anything with ``encode_image((B, 3, R, R)) -> (B, D)`` and
            ``visual.input_resolution`` (R).
        images: (H, W, 3) uint8 RGB arrays, any sizes.
        queries: W_q, (S, D) rows for C classes.
        config: geometry (rule, r), batch size and resize.
        mean, std: CLIP's normalisation on the 0..1 scale (``clip.image_mean`` / ``image_std``).

    Returns:
        One (N_i, C) float32 CPU tensor per image, N_i = number of crops (1 for "whole_image").
    """
    for i, image in enumerate(images):
        _check_image(image, i)
    device = _device_of(clip)
    resolution = int(clip.visual.input_resolution)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
    qs = queries.to(device)
    boxes = [_boxes(im.shape[0], im.shape[1], config) for im in images]
    jobs = [(i, box) for i, bs in enumerate(boxes) for box in bs]  # image-major, row-major
    tensors: dict[int, torch.Tensor] = {}
    scores: list[torch.Tensor] = []
    for start in range(0, len(jobs), config.batch_size):
        chunk = jobs[start : start + config.batch_size]
        pieces = []
        j = 0
        while j < len(chunk):  # consecutive crops of one image share a size: one resize call
            i = chunk[j][0]
            k = j
            while k < len(chunk) and chunk[k][0] == i:
                k += 1
            if i not in tensors:
                tensors.clear()  # images are visited in order: keep one on the device at a time
                tensors[i] = torch.tensor(images[i], device=device).permute(2, 0, 1)  # a copy: inputs may be read-only
            img = tensors[i]  # (3, H, W) uint8
            crops = torch.stack([img[:, y0:y1, x0:x1] for _, (y0, y1, x0, x1) in chunk[j:k]])  # (n, 3, h, w)
            pieces.append(_resize_crops(crops, resolution, config.resize))
            j = k
        batch = (torch.cat(pieces) - m) / s  # (b, 3, R, R)
        emb = F.normalize(clip.encode_image(batch).float(), dim=-1)  # (b, D)
        scores.append(qs.classify(emb, dim=1).float().cpu())  # (b, C)
    flat = torch.cat(scores) if scores else torch.empty(0, queries.num_classes)
    return list(flat.split([len(bs) for bs in boxes]))


def select_classes(scores: torch.Tensor, *, config: HypothesisConfig, logit_scale: float = 100.0) -> list[int]:
    """Apply ``config.rule`` to one image's crop scores.

    Args:
        scores: (N, C) cosine scores of the image's crops (N = 1 for "whole_image").
        config: the rule and its thresholds.
        logit_scale: CLIP's ``logit_scale.exp()`` ("whole_image" only: the official
            threshold is on logit_scale * cosine).

    Returns:
        Sorted class indices. "windows": f(k) = votes(k) / N > t (eq. 6); when no class
        passes (possible with t > 0 and votes spread over many classes) the most-voted
        class(es) are kept, so no image has an empty set (the paper does not say; an empty
        set leaves eq. 7 undefined). "any_vote": votes >= 1. "whole_image":
        logit_scale * score >= threshold, else the ``top_k`` best.
    """
    n, c = scores.shape
    if n == 0:
        return []
    if config.rule == "whole_image":
        logits = logit_scale * scores[0]  # (C,)
        keep = (logits >= config.threshold).nonzero().flatten().tolist()
        if not keep:
            keep = logits.topk(min(config.top_k, c)).indices.tolist()
        return sorted(keep)
    votes = torch.bincount(scores.argmax(dim=1), minlength=c)  # (C,) top-1 votes
    if config.rule == "any_vote":
        return (votes > 0).nonzero().flatten().tolist()
    keep = (votes.double() / n > config.t).nonzero().flatten().tolist()
    if not keep:
        keep = (votes == votes.max()).nonzero().flatten().tolist()
    return keep


def _logit_scale(clip: torch.nn.Module) -> float:
    scale = getattr(clip, "logit_scale", None)
    return float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0


def image_hypotheses(
    clip: CLIP,
    images: Sequence[np.ndarray],
    queries: QueryEmbeddings,
    *,
    config: HypothesisConfig,
    mean: Sequence[float],
    std: Sequence[float],
) -> list[list[int]]:
    """Class hypotheses of each image (paper eq. 6 or another ``config.rule``).

    Args:
        clip: a CLIP (``encode_image``, ``visual.input_resolution``, ``logit_scale``).
        images: (H, W, 3) uint8 RGB arrays.
        queries: W_q for C classes.
        config: rule, r, t, threshold, top_k, batch size, resize.
        mean, std: CLIP's normalisation on the 0..1 scale.

    Returns:
        One sorted list of class indices in [0, C) per image.
    """
    per_image = crop_scores(clip, images, queries, config=config, mean=mean, std=std)
    scale = _logit_scale(clip)
    return [select_classes(s, config=config, logit_scale=scale) for s in per_image]


# -- the hypotheses file ---------------------------------------------------------------------


class HypothesesFileError(ValueError):
    """A hypotheses file is unreadable or was made for other classes, weights or settings."""


def _header(
    *,
    vocabulary: Vocabulary,
    config: HypothesisConfig,
    clip_fingerprint: str,
    templates: str | Sequence[str] | None,
    dataset: str | None,
    split: str | None,
) -> dict[str, Any]:
    cfg = asdict(config)
    cfg.pop("batch_size")  # does not change the result
    return {
        "version": FORMAT_VERSION,
        "classes": vocabulary.to_lines(),
        **cfg,
        "clip_fingerprint": clip_fingerprint,
        "templates": templates if templates is None or isinstance(templates, str) else list(templates),
        "dataset": dataset,
        "split": split,
    }


def save_hypotheses(
    path: str | os.PathLike,
    images: Mapping[str, Sequence[int]],
    *,
    vocabulary: Vocabulary,
    config: HypothesisConfig,
    clip_fingerprint: str,
    templates: str | Sequence[str] | None = None,
    dataset: str | None = None,
    split: str | None = None,
    skipped: Mapping[str, str] | None = None,
) -> Path:
    """Write a hypotheses file atomically (:func:`reclip.files.atomic_write`).

    JSON: {"version", "classes" (class-file lines), "rule", "r", "t", "threshold", "top_k",
    "resize", "clip_fingerprint", "templates", "dataset", "split",
    "images": {image_id: [class indices]}, "skipped": {image_id: reason}}.
    """
    path = Path(path)
    payload = _header(vocabulary=vocabulary, config=config, clip_fingerprint=clip_fingerprint,
                      templates=templates, dataset=dataset, split=split)
    payload["images"] = {str(k): [int(c) for c in v] for k, v in images.items()}
    payload["skipped"] = dict(skipped or {})
    atomic_write_json(path, payload, indent=1, ensure_ascii=False)
    return path


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"hypotheses file {str(path)!r} does not exist; make it with `reclip hypotheses`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HypothesesFileError(f"{path}: not a hypotheses JSON file ({err}); regenerate it") from None
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or not isinstance(data.get("images"), dict):
        version = data.get("version") if isinstance(data, dict) else None
        raise HypothesesFileError(
            f"{path}: not a version-{FORMAT_VERSION} hypotheses file (version {version!r}); "
            "regenerate it with `reclip hypotheses`"
        )
    return data


def load_hypotheses(
    path: str | os.PathLike,
    *,
    vocabulary: Vocabulary,
    clip: torch.nn.Module | str,
) -> dict[str, list[int]]:
    """Read a hypotheses file made for ``vocabulary`` and ``clip``.

    Args:
        path: a file written by :func:`save_hypotheses` / :func:`generate_hypotheses`.
        vocabulary: the class list training will use; must equal the file's (same lines,
            same order), since the file stores class indices.
        clip: the CLIP (or its ``weights_fingerprint``) training will use; must be the
            one that produced the file.

    Returns:
        {image_id: sorted class indices}.

    Raises:
        HypothesesFileError: unreadable file, another class list or another CLIP.
    """
    from reclip.clip.model import weights_fingerprint

    path = Path(path)
    data = _read(path)
    expected = vocabulary.to_lines()
    if data.get("classes") != expected:
        got = data.get("classes") or []
        diff = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        raise HypothesesFileError(
            f"{path} was made for another class list ({len(got)} classes; first difference at class {diff}: "
            f"{got[diff] if diff < len(got) else None!r} vs {expected[diff] if diff < len(expected) else None!r}); "
            "pass the class file it was made for, or regenerate it with `reclip hypotheses`"
        )
    fingerprint = clip if isinstance(clip, str) else weights_fingerprint(clip)
    if data.get("clip_fingerprint") != fingerprint:
        raise HypothesesFileError(
            f"{path} was made with CLIP weights {data.get('clip_fingerprint')!r}, not these ({fingerprint!r}); "
            "use the same --clip or regenerate the hypotheses with this one"
        )
    c = len(expected)
    out: dict[str, list[int]] = {}
    for image_id, classes in data["images"].items():
        if not isinstance(classes, list) or not all(isinstance(k, int) and 0 <= k < c for k in classes):
            raise HypothesesFileError(f"{path}: image {image_id!r} has class indices {classes!r} outside 0..{c - 1}")
        out[image_id] = classes
    return out


# -- a whole dataset, resumable -------------------------------------------------------------


@dataclass
class GenerationSummary:
    """What :func:`generate_hypotheses` did."""

    path: Path
    num_images: int  # images with hypotheses in the file
    computed: int  # of which computed by this call (the rest came from the resumed file)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image_id, reason)
    seconds: float = 0.0


def generate_hypotheses(
    clip: CLIP,
    dataset: Any,
    queries: QueryEmbeddings,
    *,
    config: HypothesisConfig,
    out_path: str | os.PathLike,
    progress: bool = True,
    resume: bool = True,
    vocabulary: Vocabulary | None = None,
    templates: str | Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    save_every: int = 16,
) -> GenerationSummary:
    """Hypotheses of every image of a dataset, written to ``out_path`` as it goes.

    Images are read from ``dataset.image_paths`` (never the labels: hypotheses use no
    ground truth) in dataset order, ``save_every`` at a time through
    :func:`image_hypotheses` (crops of several images share CLIP batches); after each
    group the file is rewritten atomically, so a killed run loses at most one group.
    With ``resume`` an existing file is continued: images already in it (by image id)
    are kept, the others computed; its header (classes, CLIP fingerprint, rule and
    thresholds, templates, dataset, split) must match or the run stops with an error.
    Unreadable images are reported in the summary and the file's "skipped" and retried
    by a later resumed run.

    Under torchrun (an initialised process group) the images still to do are split
    over the ranks in contiguous blocks, rank 0 alone reads and writes the file, after
    each group of ``save_every`` images per rank; the file is the one a single process
    writes, and a run killed under N processes resumes under any number. Every rank
    returns the same summary.

    Args:
        clip: the CLIP whose image embedding classifies the crops.
        dataset: a :class:`~reclip.data.datasets.SegmentationDataset` (or anything with
            ``image_ids``, ``image_paths`` and, unless ``vocabulary`` is given, ``vocabulary``;
            ``protocol.name`` and ``split`` are recorded when present; its ``max_pixels``,
            when it has one, bounds the images read).
        queries: W_q of the vocabulary's C classes.
        config: the rule and its settings.
        out_path: the JSON file.
        progress: tqdm bar over images.
        resume: continue an existing file (False: start over and overwrite it).
        vocabulary: the class list recorded in the file (default ``dataset.vocabulary``).
        templates: the query templates, recorded in the file.
        mean, std: CLIP normalisation (default ``clip.image_mean`` / ``image_std``).
        save_every: images per group (and per atomic rewrite).
    """
    from reclip.clip.model import weights_fingerprint
    from reclip.data.io import MAX_PIXELS, read_image

    max_pixels = getattr(dataset, "max_pixels", MAX_PIXELS)

    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    vocab = vocabulary if vocabulary is not None else dataset.vocabulary
    if queries.num_classes != vocab.num_classes:
        raise ValueError(f"queries have {queries.num_classes} classes but the vocabulary {vocab.num_classes}")
    mean = mean if mean is not None else clip.image_mean
    std = std if std is not None else clip.image_std
    protocol = getattr(dataset, "protocol", None)
    header_kw = dict(vocabulary=vocab, config=config, clip_fingerprint=weights_fingerprint(clip),
                     templates=templates, dataset=getattr(protocol, "name", None),
                     split=getattr(dataset, "split", None))
    path = Path(out_path)
    start = time.perf_counter()

    def resumed() -> dict[str, list[int]]:
        if not (resume and path.exists()):
            return {}
        data = _read(path)
        expected = _header(**header_kw)
        differ = sorted(k for k, v in expected.items() if data.get(k) != v)
        if differ:
            raise HypothesesFileError(
                f"{path} exists but was made with other settings ({', '.join(differ)} differ: "
                + "; ".join(f"{k} {data.get(k)!r} vs {expected[k]!r}" for k in differ[:3])
                + "); give another --out, delete it, or pass --no-resume to overwrite it"
            )
        return {str(k): list(v) for k, v in data["images"].items()}

    # Under torchrun rank 0 alone reads and writes the file; the images still to do are
    # split into contiguous blocks (reclip.train.distributed.shard), each rank hands its
    # group's results to all the others after every group, and rank 0 rewrites the file.
    procs = current_processes()
    done: dict[str, list[int]] = on_rank0(resumed, procs)  # its error, if any, on every rank

    ids = [str(i) for i in dataset.image_ids]
    order = {image_id: i for i, image_id in enumerate(ids)}
    todo = [i for i, image_id in enumerate(ids) if image_id not in done]
    blocks = [[todo[i] for i in shard(len(todo), r, procs.world_size)] for r in range(procs.world_size)]
    mine = blocks[procs.rank]
    skipped: dict[str, str] = {}
    bar = None
    if progress and procs.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc="hypotheses", unit="img")

    def ordered() -> dict[str, list[int]]:
        # dataset order, so a resumed run writes the same file as an uninterrupted one
        known = {image_id: done[image_id] for image_id in ids if image_id in done}
        known.update({k: v for k, v in done.items() if k not in known})
        return known

    def save() -> None:
        if procs.rank == 0:
            in_order = dict(sorted(skipped.items(), key=lambda item: order.get(item[0], len(ids))))
            save_hypotheses(path, ordered(), skipped=in_order, **header_kw)

    computed = 0
    rounds = max(math.ceil(len(block) / save_every) for block in blocks)
    for g in range(0, rounds * save_every, save_every):
        group = mine[g : g + save_every]  # empty on a rank whose block is done
        images, group_ids, found = [], [], {}
        group_skipped: dict[str, str] = {}
        for index in group:
            try:
                images.append(read_image(dataset.image_paths[index], max_pixels=max_pixels))
                group_ids.append(ids[index])
            except OSError as err:  # ImageReadError is an OSError
                group_skipped[ids[index]] = str(err)
        if images:
            found = dict(zip(group_ids, image_hypotheses(clip, images, queries, config=config, mean=mean, std=std)))
        for rank_found, rank_skipped in gather((found, group_skipped), procs.world_size):
            done.update(rank_found)
            skipped.update(rank_skipped)
            computed += len(rank_found)
        save()
        if bar is not None:
            bar.update(sum(len(block[g : g + save_every]) for block in blocks))
            bar.set_postfix(skipped=len(skipped))
    if not todo:
        save()
    if bar is not None:
        bar.close()
    return GenerationSummary(path=path, num_images=len(done), computed=computed,
                             skipped=sorted(skipped.items()), seconds=time.perf_counter() - start)
