"""The Python API under the CLI: segment files, evaluate on a dataset protocol.

    import reclip
    clip = reclip.load_clip("ViT-B/16")
    result = reclip.evaluate(clip, "clearclip", "voc20", "data/VOCdevkit/VOC2012")
    print(result.table())
    reclip.segment_files(clip, "maskclip", "cat,dog", ["photos/"], "masks/")

Both stream the images through :func:`reclip.inference.segment_many`, with results equal
to one at a time: in slide mode the windows of consecutive images share batches of
``batch_size`` windows; in whole mode the images of one size among the next
``whole_batch_size`` read are batched. DataLoader workers (``num_workers``) decode, resize
and normalise the images ahead of the model (pinned memory on CUDA), with the numbers of
no workers. Both show a tqdm bar and report unreadable images (from the workers) instead
of stopping: what was skipped is in the result.

Under torchrun (``torchrun --nproc-per-node N -m reclip.cli evaluate ...``; in Python:
any initialised process group) the images are split over the ranks in contiguous blocks
(:func:`reclip.train.distributed.shard`): rank r takes images [r n / N, (r + 1) n / N).
``evaluate`` sums the confusion matrices (all-reduce) and gathers the bias objects and
the skipped images in rank order, so every rank returns the result of one process;
``segment_files`` lists the inputs on rank 0 (broadcast: every rank shards the same list;
a listing error is raised on every rank), writes each rank's masks and returns the
merged summary everywhere.
Only rank 0 shows a progress bar (the CLI: prints and writes the JSON); it counts the
whole dataset, each of rank 0's images standing for one on every rank (an estimate,
exact at the end), without any communication per image.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from reclip.clip.model import CLIP, weights_fingerprint
from reclip.data.datasets import SegmentationDataset, problem_list
from reclip.data.folders import file_identity, link_problem, scan_images
from reclip.data.io import MAX_PIXELS, ImageReadError, check_max_pixels, load_image
from reclip.data.transforms import resize_labels
from reclip.data.protocol import Protocol, load_protocol
from reclip.files import atomic_write_json
from reclip.features import strategy_to_dict
from reclip.inference import (InferenceConfig, PreparedImage, device_of, image_context, prepare_image, segment,
                              segment_many, warm_up)
from reclip.maft.proposals import GridProposals, PredictionProposals, ProposalFiles, ProposalSource
from reclip.methods import (METHODS, build_segmentor, classes_file_for, get_family, get_method, inference_config,
                            load_trained, settings_section)
from reclip.bias import SpacePreference, class_preference
from reclip.class_split import ClassSplit, class_split
from reclip.metrics import ConfusionMatrix, seen_unseen_miou
from reclip.train.distributed import current_processes, gather, on_rank0, shard
from reclip.text import Vocabulary, read_class_file
from reclip.visualize import LEGEND_FILE, save_legend, save_segmentation, segmentation_files


def as_vocabulary(classes: Vocabulary | str | os.PathLike | Sequence[str]) -> Vocabulary:
    """A Vocabulary from a Vocabulary, a class file given as a path object, or names.

    The type says which, never the file system: a ``pathlib.Path`` (any ``os.PathLike``)
    is a class file (:func:`reclip.text.read_class_file`); a string is always names
    ("cat,dog", even when a file of that name exists); a list has one class per item
    (:meth:`Vocabulary.from_names`). To use a class file named by a string, pass
    ``Path(name)`` or ``read_class_file(name)``.
    """
    if isinstance(classes, Vocabulary):
        return classes
    if isinstance(classes, os.PathLike):
        return read_class_file(classes)
    if isinstance(classes, bytes):
        raise TypeError(f"classes {classes!r} are bytes; give names as str or a class file as a pathlib.Path")
    if isinstance(classes, str) and "," not in classes and os.path.isfile(classes):
        warnings.warn(f"classes {classes!r} is read as one class name although a file of that name exists; "
                      f"pass Path({classes!r}) to read it as a class file", stacklevel=2)
    return Vocabulary.from_names(classes)


# --------------------------------------------------------------------------- evaluate

# The zero-shot split's metrics (with unseen classes): mIoU of the seen and unseen classes, their harmonic mean.
ZERO_SHOT_KEYS = ("mIoU_seen", "mIoU_unseen", "hIoU")

# Images each DataLoader worker keeps ready ahead of the model (torch's prefetch_factor; its
# default is 2). Prepared VOC-sized inputs are ~3 MB each, so a few per worker cost little.
PREFETCH = 4


class NothingEvaluatedError(ValueError):
    """An evaluation scored no pixel: every image was skipped, or every labelled pixel is
    ``ignore_index``. Its mIoU would be NaN, not a result. ``skipped`` lists (path, reason)
    and ``num_images`` counts the images that were read."""

    def __init__(self, message: str, skipped: list[tuple[str, str]], num_images: int) -> None:
        super().__init__(message)
        self.skipped = skipped
        self.num_images = num_images


@dataclass
class EvaluationResult:
    """What ``evaluate`` measured; ``metrics`` holds mIoU etc. as fractions in [0, 1]."""

    method: str
    protocol: str
    split: str
    class_names: list[str]
    metrics: dict[str, Any]
    confusion: np.ndarray  # (C, C) rows = ground truth, columns = prediction
    num_images: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0  # the evaluation's wall time, without warmup_seconds
    settings: dict[str, Any] = field(default_factory=dict)
    bias: dict[str, Any] | None = None  # {"class_preference": ..., "space_preference": ...}
    downscaled: list[str] = field(default_factory=list)  # images read below their size (max_pixels), still scored
    warmup_seconds: float = 0.0  # torch.compile's compilation before the timed run (InferenceConfig.compile)

    @property
    def miou(self) -> float:
        return self.metrics["mIoU"]

    def table(self) -> str:
        """Per-class IoU then the summary rows, in percent, as a plain-text table."""
        iou = self.metrics["IoU"]
        width = max(12, *(len(n) for n in self.class_names))
        lines = [f"{'class':<{width}}  {'IoU':>6}", "-" * (width + 8)]
        for name, value in zip(self.class_names, iou):
            lines.append(f"{name:<{width}}  {'-' if math.isnan(value) else f'{100 * value:6.2f}':>6}")
        lines.append("-" * (width + 8))
        for key in ("mIoU", "mAcc", "aAcc", *(k for k in ZERO_SHOT_KEYS if k in self.metrics)):
            value = self.metrics[key]
            lines.append(f"{key:<{width}}  {'-' if math.isnan(value) else f'{100 * value:6.2f}':>6}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def clean(v: float) -> float | None:
            return None if math.isnan(v) else round(100 * v, 4)

        out = {
            "method": self.method,
            "protocol": self.protocol,
            "split": self.split,
            "num_images": self.num_images,
            "mIoU": clean(self.metrics["mIoU"]),
            "mAcc": clean(self.metrics["mAcc"]),
            "aAcc": clean(self.metrics["aAcc"]),
            **{k: clean(self.metrics[k]) for k in ZERO_SHOT_KEYS if k in self.metrics},
            "IoU": {n: clean(float(v)) for n, v in zip(self.class_names, self.metrics["IoU"])},
            "skipped": [{"path": p, "error": e} for p, e in self.skipped],
            "downscaled": list(self.downscaled),
            "seconds": round(self.seconds, 2),
            "warmup_seconds": round(self.warmup_seconds, 2),
            "settings": self.settings,
            "confusion": self.confusion.tolist(),
        }
        if self.bias is not None:
            cp, sp = self.bias["class_preference"], self.bias["space_preference"]
            out["bias"] = {
                "class_preference": _finite(cp["score"]),
                "class_preference_per_class": {n: _finite(v) for n, v in zip(self.class_names, cp["per_class"])},
                "space_preference": _finite(sp["score"]),
                "space_curve": {"distance": sp["centres"].tolist(), "mIoU": [_finite(v) for v in sp["miou"]],
                                "objects": sp["counts"].tolist()},
            }
        return out

    def bias_summary(self) -> str:
        """One line with both bias scores (higher = less bias), or '' without diagnostics."""
        if self.bias is None:
            return ""
        return (f"class-preference score {self.bias['class_preference']['score']:.3f}, "
                f"space-preference score {self.bias['space_preference']['score']:+.3f} (higher = less bias)")

    def save_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())


def input_normalisation(segmentor: Any, clip: CLIP) -> tuple[tuple, tuple]:
    """The (mean, std) a segmentor's inputs are normalised with: its own where it has one
    (a distilled student: ``image_mean`` / ``image_std``), else its CLIP's."""
    return getattr(segmentor, "image_mean", clip.image_mean), getattr(segmentor, "image_std", clip.image_std)

def evaluate(
    clip: CLIP,
    method: str,
    dataset: str | os.PathLike | Protocol,
    data_root: str | os.PathLike,
    split: str = "val",
    *,
    classes_file: str | os.PathLike | None = None,
    inference: Mapping[str, Any] | None = None,
    strategy_overrides: Mapping[str, Any] | None = None,
    templates: str | None = None,
    absent_as_zero: bool = False,
    bias: bool = False,
    limit: int | None = None,
    label_dir: str | os.PathLike | None = None,
    num_workers: int = 1,
    prefetch: int = PREFETCH,
    checkpoint: str | os.PathLike | None = None,
    output: str | None = None,
    progress: bool = True,
    text_cache: Any = None,
    max_pixels: int | None = MAX_PIXELS,
    proposals: str | os.PathLike | ProposalSource | None = None,
    unseen_classes: str | os.PathLike | Sequence[str] | None = None,
    seen_classes: str | os.PathLike | Sequence[str] | None = None,
) -> EvaluationResult:
    """Score ``method`` on a dataset protocol: dataset-level confusion matrix -> mIoU.

    Args:
        dataset: a protocol name (``voc20``, ``ade150``, ...), a protocol YAML or a Protocol.
        classes_file: class list replacing the protocol's (same order as the label ids);
            default: the method family's own list where the protocol names one (the
            ReCLIP family's official prompt names), else the protocol's.
        inference: InferenceConfig fields overriding the protocol's published settings
            (``short_side``, ``window``, ``stride``, ``mode``, ``prob_thd`` ...), the
            family's options, and ``test_settings``: the protocol section those settings
            come from (:func:`reclip.methods.inference_config`; e.g. ``"naclip"``, NACLIP's
            own protocol). A section's ``classes_file`` replaces the protocol's unless
            ``classes_file`` is given.
        absent_as_zero: the official ReCLIP mean (classes that never occur count as 0).
        bias: also compute the bias diagnostics (``reclip.bias``) in the same pass.
        limit: evaluate only the first ``limit`` images (a quick look, not a result); a
            positive int, or None for all.
        label_dir: label folder replacing the protocol's (e.g. for the ``folder`` protocol).
        num_workers: processes reading images ahead of the model (0: read in this process):
            they decode each image and its label, resize it to the inference size and
            normalise it (:func:`reclip.inference.prepare_image`, the same numbers as in
            this process), into pinned memory when the segmentor is on CUDA.
        prefetch: images each worker keeps ready ahead of the model (DataLoader's
            ``prefetch_factor``; default :data:`PREFETCH`).
        checkpoint: run directory of a trained head (methods "reclip++", "reclip").
        output: which logits of a trained head to evaluate (reclip++/reclip: "decoded"
            M_o, the default and the paper's; "rectified" M; "query" M_q).
        max_pixels: images of more pixels are segmented downscaled and scored at their
            label's size; labels of more than 4 x max_pixels are skipped (see
            :mod:`reclip.data.io`). None: no reclip limit (Pillow's own check stays).
        proposals: the mask proposals of a method that classifies them (maft, ipclip;
            required there, refused elsewhere): see :func:`proposal_source`. Looked up
            per image by its dataset id.
        unseen_classes: the zero-shot split's unseen classes (a split file, e.g.
            ``cocostuff171_unseen.txt``, or names; :mod:`reclip.class_split`): the result
            also holds mIoU_seen, mIoU_unseen and hIoU (their harmonic mean). Any method.
        seen_classes: the same split given by its seen classes (the rest are unseen), as
            ``reclip maft --seen-classes``; give one of the two.

    Raises:
        NothingEvaluatedError: no pixel was scored (every image skipped, or every label
            pixel ``ignore_index``): a run that measured nothing never returns a NaN mIoU.
    """
    _check_limit_and_workers(limit, num_workers)
    if seen_classes is not None and unseen_classes is not None:
        raise ValueError("give the seen classes or the unseen classes of the zero-shot split, not both (the other "
                         "group is the rest)")
    protocol = dataset if isinstance(dataset, Protocol) else load_protocol(dataset)
    if label_dir is not None:
        protocol = protocol.with_overrides(label_dir=str(label_dir))
    cfg = inference_config(method, protocol, **dict(inference or {}))  # settings errors before any data is read
    _check_proposals_option(method, proposals)
    section, _ = settings_section(method, protocol, dict(inference or {}).get("test_settings"))
    # the class file the method's test settings were published with (ReCLIP's or NACLIP's own)
    classes_file = classes_file_for(method, protocol, classes_file, section)
    data = SegmentationDataset(protocol, data_root, split, classes_file=classes_file, max_pixels=max_pixels)
    if not data.has_labels:
        raise ValueError(f"{data_root}: split {split!r} of {protocol.name!r} has no labels to evaluate against")
    zero_shot = None
    if seen_classes is not None or unseen_classes is not None:
        zero_shot = class_split(data.vocabulary, seen=seen_classes, unseen=unseen_classes)
    segmentor = build_segmentor(method, clip, data.vocabulary, strategy_overrides=strategy_overrides,
                                templates=templates, checkpoint=checkpoint, output=output, text_cache=text_cache,
                                protocol=None if get_family(method).trained else protocol)
    if proposals is not None:
        segmentor.proposals = proposal_source(proposals, clip, data.vocabulary, protocol,
                                              background=protocol.background, text_cache=text_cache)
    # preprocessing belongs to the weights: CLIP's, or what a student was trained with
    mean, std = input_normalisation(segmentor, clip)
    result = evaluate_segmentor(segmentor, data, cfg, mean=mean, std=std, absent_as_zero=absent_as_zero,
                                bias=bias, limit=limit, num_workers=num_workers, prefetch=prefetch,
                                progress=progress,
                                description=f"{method} on {protocol.name}/{split}", unseen_classes=zero_shot)
    result.method = method
    result.settings.update({
        "test_settings": section,
        "strategy": strategy_to_dict(segmentor.strategy) if hasattr(segmentor, "strategy") else None,
        "templates": templates or get_method(method).templates,
        "clip": getattr(clip, "spec", None),
        "clip_fingerprint": weights_fingerprint(clip),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "output": getattr(getattr(segmentor, "head", None), "output", None),
        "proposals": _describe(proposals),
    })
    return result


class _PreparedItems(Dataset):
    """A SegmentationDataset whose items also carry the model input, made where the item
    is read (a DataLoader worker): ``item["input"]`` a :class:`~reclip.inference.PreparedImage`,
    and ``item["image"]`` dropped (the pixels travel once, inside the input, and as its
    ``raw`` where PAMR needs them). Items that failed to read are passed on as they are."""

    def __init__(self, data: SegmentationDataset, cfg: InferenceConfig, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        self.data, self.cfg, self.mean, self.std = data, cfg, mean, std

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.data[index]
        if item["error"] is None:
            item["input"] = prepare_image(item["image"], self.cfg, self.mean, self.std)
            item["image"] = None
        return item


def evaluate_segmentor(
    segmentor: Any,
    data: SegmentationDataset,
    cfg: InferenceConfig,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    absent_as_zero: bool = False,
    bias: bool = False,
    limit: int | None = None,
    num_workers: int = 1,
    prefetch: int = PREFETCH,
    progress: bool = True,
    description: str = "evaluate",
    unseen_classes: ClassSplit | str | os.PathLike | Sequence[str] | None = None,
) -> EvaluationResult:
    """Run any segmentor over a labelled dataset: confusion matrix, mIoU and, with
    ``bias``, the class- and space-preference diagnostics in the same pass; with
    ``unseen_classes`` (a :class:`~reclip.class_split.ClassSplit`, a split file or
    names) also the zero-shot mIoU_seen, mIoU_unseen and hIoU.

    ``num_workers`` DataLoader workers read, resize and normalise the images ahead of the
    model (``prefetch`` each; see :func:`evaluate`); a segmentor with a per-image context
    (``for_image``: MAFT) gets the pixels as read. With ``cfg.compile`` the segmentor is
    compiled before the timer starts (:func:`reclip.inference.warm_up`, at the first
    image's input size): ``warmup_seconds`` holds that time and ``seconds`` leaves it out
    (a segmentor with a per-image context compiles during the run: counted in ``seconds``).

    Raises NothingEvaluatedError when no pixel was scored (see :func:`evaluate`)."""
    _check_limit_and_workers(limit, num_workers)
    _check_prefetch(prefetch)
    zero_shot = unseen_classes
    if zero_shot is not None and not isinstance(zero_shot, ClassSplit):
        zero_shot = class_split(data.vocabulary, unseen=zero_shot)  # before any image: a bad name fails now
    if zero_shot is not None and list(zero_shot.names) != list(data.class_names):
        raise ValueError(f"the class split is for the classes {list(zero_shot.names)[:8]}, not this dataset's "
                         f"{data.class_names[:8]}")
    protocol = data.protocol
    background = 0 if protocol.background else None
    confusion = ConfusionMatrix(data.num_classes, ignore_index=protocol.ignore_index)
    space = SpacePreference(data.num_classes, background_index=background, ignore_index=protocol.ignore_index)
    skipped: list[tuple[str, str]] = []
    downscaled: list[str] = []
    count = len(data) if limit is None else min(limit, len(data))
    procs = current_processes()  # under torchrun: this rank's block of the images, merged below
    rank0 = procs.rank == 0
    # Workers decode, resize and normalise the next images while the model runs on these; a
    # segmentor with a per-image context (MAFT) takes the pixels as read.
    per_image = callable(getattr(segmentor, "for_image", None))
    items = data if per_image else _PreparedItems(data, cfg, mean, std)
    on_cuda = device_of(segmentor).type == "cuda"
    loader = DataLoader(Subset(items, shard(count, procs.rank, procs.world_size)), batch_size=None, shuffle=False,
                        num_workers=num_workers, collate_fn=_identity, pin_memory=on_cuda,
                        prefetch_factor=prefetch if num_workers > 0 else None)
    pending: list[dict[str, Any]] = []
    warmup_seconds = 0.0

    def score(items: list[dict[str, Any]]) -> None:
        results = _segment_images(segmentor, [(item["image"] if per_image else item["input"], item["image_id"])
                                              for item in items], cfg, mean, std, background)
        for item, result in zip(items, results):
            # An image read downscaled (over max_pixels) is still scored at its label's size.
            if result.labels.shape != item["label"].shape:
                downscaled.append(item["path"])
            pred = resize_labels(result.labels, item["label"].shape)
            confusion.update(pred, item["label"])
            if bias:
                space.update(pred, item["label"], item.get("instances"))
        bar.set_postfix(mIoU=f"{100 * confusion.compute()['mIoU']:.1f}", refresh=False)

    start = time.perf_counter()
    # Rank 0's bar counts the whole dataset: each of its images stands for one image on every rank
    # (the ranks' blocks differ by at most one image), so the bar is an estimate until the merge.
    bar = tqdm(total=count, desc=description, unit="img", disable=not (progress and rank0))
    for item in loader:
        bar.update(min(procs.world_size, count - bar.n))
        if item["error"] is not None:
            skipped.append((item["path"], item["error"]))
            if rank0:
                bar.write(f"skipped {item['path']}: {item['error']}")
            continue
        if cfg.compile and not per_image and not warmup_seconds:  # (a per-image context compiles in the run)
            warmup_seconds = warm_up(segmentor, cfg, tuple(item["input"].input.shape[-2:]))
        pending.append(item)
        if len(pending) == _images_per_step(segmentor, cfg):
            score(pending)
            pending = []
    if pending:
        score(pending)
    if procs.world_size > 1:
        skipped, downscaled = _merge_ranks(confusion, space, skipped, downscaled, procs.world_size)
    bar.update(count - bar.n)  # every rank is done
    bar.close()
    if confusion.matrix.sum() == 0:
        raise _nothing_evaluated(data, count, skipped)
    diagnostics = None
    if bias:
        # Background is not an object: left out of both scores.
        diagnostics = {"class_preference": class_preference(confusion.matrix, exclude=(0,) if background == 0 else ()),
                       "space_preference": space.compute()}
    metrics = confusion.compute(absent_as_zero=absent_as_zero)
    settings: dict[str, Any] = {}
    if zero_shot is not None:
        metrics.update(seen_unseen_miou(metrics["IoU"], zero_shot.unseen_mask(), absent_as_zero=absent_as_zero))
        settings["zero_shot"] = zero_shot.to_dict()
    return EvaluationResult(
        method=type(segmentor).__name__,
        protocol=protocol.name,
        split=data.split,
        class_names=data.class_names,
        metrics=metrics,
        confusion=confusion.matrix.copy(),
        num_images=count - len(skipped),
        skipped=skipped,
        seconds=time.perf_counter() - start - warmup_seconds,
        warmup_seconds=warmup_seconds,
        settings={"inference": _jsonable(vars(cfg)), "classes": data.vocabulary.to_lines(),
                  "data_root": str(data.root), "absent_as_zero": absent_as_zero, "limit": limit,
                  "max_pixels": data.max_pixels, **settings},
        bias=diagnostics,
        downscaled=downscaled,
    )


def _images_per_step(segmentor: Any, cfg: InferenceConfig) -> int:
    """Images read before the model runs: ``cfg.whole_batch_size`` in whole mode, where
    :func:`_segment_images` batches those of one size; ``cfg.batch_size`` in slide mode, whose
    windows (at least one each) share calls of ``cfg.batch_size`` windows; 1 for a segmentor
    with a per-image context."""
    if callable(getattr(segmentor, "for_image", None)):
        return 1
    return cfg.whole_batch_size if cfg.mode == "whole" else cfg.batch_size


def _segment_images(segmentor: Any, images: list[tuple[np.ndarray | PreparedImage, str]], cfg: InferenceConfig,
                    mean: Sequence[float], std: Sequence[float], background: int | None) -> list[Any]:
    """Segmentations of (image, image id) pairs, equal to one at a time: whole mode batches
    the images of one size (:func:`reclip.inference.segment_many`); a segmentor with a
    per-image context (MAFT's proposals, by image id) runs each image inside it."""
    with torch.inference_mode():
        if not callable(getattr(segmentor, "for_image", None)):
            return segment_many(segmentor, [image for image, _ in images], cfg, mean, std,
                                background_index=background)
        results = []
        for image, image_id in images:
            with image_context(segmentor, image, image_id):
                results.append(segment(segmentor, image, cfg, mean, std, background_index=background))
        return results


def _merge_ranks(confusion: ConfusionMatrix, space: SpacePreference, skipped: list[tuple[str, str]],
                 downscaled: list[str], world_size: int) -> tuple[list[tuple[str, str]], list[str]]:
    """Every rank's statistics merged into ``confusion`` and ``space`` on every rank; the
    skipped and downscaled images of all ranks.

    The confusion matrix is summed (an all-reduce of int64 counts: exact). The space
    preference's objects, the skipped and the downscaled images are gathered and joined
    in rank order; ranks hold contiguous blocks of the dataset (:func:`shard`), so that
    is the order of one process, and the curve's sums are added in the same order.
    """
    confusion.all_reduce()
    parts = gather((space.objects, skipped, downscaled), world_size)
    space.objects = []
    for objects, _, _ in parts:
        space.merge(SpacePreference(space.num_classes, objects=objects))
    return [s for _, part, _ in parts for s in part], [d for _, _, part in parts for d in part]


def _check_limit_and_workers(limit: int | None, num_workers: int) -> None:
    def whole(value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if limit is not None and not (whole(limit) and limit > 0):
        raise ValueError(f"limit must be a positive number of images, or None for all of them; got {limit!r}")
    if not (whole(num_workers) and num_workers >= 0):
        raise ValueError(f"num_workers must be an int >= 0 (0: read images in this process); got {num_workers!r}")


def _check_prefetch(prefetch: int) -> None:
    if not (isinstance(prefetch, numbers.Integral) and not isinstance(prefetch, bool) and prefetch > 0):
        raise ValueError(f"prefetch must be a positive number of images per worker; got {prefetch!r}")


def _nothing_evaluated(data: SegmentationDataset, count: int,
                       skipped: list[tuple[str, str]]) -> NothingEvaluatedError:
    """The error of an evaluation that scored no pixel, saying why."""
    protocol = data.protocol
    what = f"nothing was evaluated on {protocol.name}/{data.split} at {data.root}"
    read = count - len(skipped)
    if read == 0:
        reasons = [reason if reason.startswith(path) else f"{path}: {reason}" for path, reason in skipped]
        message = (f"{what}: all {count} image(s) were skipped:{problem_list(reasons)}\n"
                   "Fix or replace these files (or check the data root) and run again.")
    else:
        message = (
            f"{what}: the {read} image(s) read have no labelled pixel: every label pixel is ignore_index "
            f"{protocol.ignore_index} after the protocol's conversion (reduce_zero_label="
            f"{protocol.reduce_zero_label}, label_map={protocol.label_map!r})"
            + (f", and {len(skipped)} image(s) were skipped" if skipped else "")
            + ". Check that the labels are this protocol's (--label-dir, --dataset) and hold class ids"
        )
    return NothingEvaluatedError(message, skipped, read)


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 4)


def _identity(item: Any) -> Any:
    return item


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# --------------------------------------------------------------------------- segment


@dataclass
class SegmentSummary:
    """What ``segment_files`` wrote and what it skipped.

    ``downscaled`` lists the images read smaller than they are (more than ``max_pixels``
    pixels) as (path, (H, W) of the file, (h, w) segmented); their masks and overlays
    have the smaller size.
    """

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    downscaled: list[tuple[str, tuple[int, int], tuple[int, int]]] = field(default_factory=list)
    legend: Path | None = None


class ImageInputs(NamedTuple):
    """What :func:`collect_images` found.

    Attributes:
        pairs: (image file, output name) per image; the name is a relative path without
            suffix, whose files are :func:`reclip.visualize.segmentation_files`.
        skipped: (path, reason) of what was left out: broken links, symbolic-link
            loops, second paths to a folder or file already listed, unreadable folders.
        legend: the legend's file name in the output folder (``legend.png`` unless an
            input sub-folder of that name needs the path).
    """

    pairs: list[tuple[Path, Path]]
    skipped: list[tuple[str, str]]
    legend: str


def collect_images(inputs: Iterable[str | os.PathLike], exclude: str | os.PathLike | None = None) -> ImageInputs:
    """(image file, output name) pairs from a mix of files and folders (searched recursively).

    Listing: folders are listed by :func:`reclip.data.folders.scan_images` (every real
    folder once; symbolic-link loops and second links to a folder are reported, not
    followed). Each real file is ONE image, however many paths lead to it (symbolic or
    hard links, a file given twice, or given and also found in a folder): it is kept
    under its first path (in a folder, one through no symbolic link) and the other paths
    are reported. Broken links are reported. Files under ``exclude`` (the output folder)
    are left out silently, so a re-run never segments its own masks. A path that does
    not exist at all raises FileNotFoundError (a typo, found before any work).

    Names: an image found in a folder keeps its path relative to that folder (``a/x.jpg``
    -> ``a/x``), a file given by itself its stem; then :func:`_output_names` makes every
    output path distinct.
    """
    skip = Path(exclude) if exclude is not None else None
    real_skip = Path(os.path.realpath(skip)) if skip is not None else None
    pairs: list[tuple[Path, Path]] = []
    skipped: list[tuple[str, str]] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            scan = scan_images(entry, exclude=[skip] if skip is not None else [])
            skipped.extend(scan.skipped)
            pairs.extend((p, p.relative_to(entry).with_suffix("")) for p in scan.files)
        elif entry.is_symlink() and not entry.exists():
            skipped.append((str(entry), link_problem(entry)))
        elif entry.exists():
            if real_skip is None or not Path(os.path.realpath(entry)).is_relative_to(real_skip):
                pairs.append((entry, Path(entry.stem)))
        else:
            raise FileNotFoundError(f"{entry}: no such file or folder; check the path")
    kept: dict[tuple[int, int], Path] = {}
    unique = []
    for path, name in pairs:
        identity = file_identity(path)
        if identity is None:
            skipped.append((str(path), "cannot be opened"))
        elif identity in kept:
            skipped.append((str(path), f"same file as {kept[identity]}, segmented once"))
        else:
            kept[identity] = path
            unique.append((path, name))
    named, legend = _output_names(unique)
    return ImageInputs(named, skipped, legend)


def _output_names(pairs: list[tuple[Path, Path]]) -> tuple[list[tuple[Path, Path]], str]:
    """Output names whose files never meet, and the legend's file name.

    Every path that segment_files writes is distinct from every other, compared
    case-insensitively (outputs may land on a case-insensitive file system): first the
    sub-folders the names need are reserved (they mirror the input's), then the legend
    (``legend.png``, else ``legend_2.png``, ... when a sub-folder has that name), then
    each image in turn takes its name unless one of its files (mask, overlay) is taken,
    in which case it gets its extension appended (``x.png`` -> ``x_png``), then ``_2``,
    ``_3``, ...: first come, first served.
    """
    def key(name: Path | str) -> str:
        return Path(name).as_posix().casefold()

    taken = {key(parent) for _, name in pairs for parent in name.parents if parent != Path(".")}
    stem, suffix = os.path.splitext(LEGEND_FILE)
    legend = next(f for f in itertools.chain([LEGEND_FILE], (f"{stem}_{i}{suffix}" for i in itertools.count(2)))
                  if key(f) not in taken)
    taken.add(key(legend))
    named = []
    for path, name in pairs:
        ext = path.suffix.lstrip(".").lower()
        base = name.with_name(f"{name.name}_{ext}") if ext else name
        numbered = (base.with_name(f"{base.name}_{i}") for i in itertools.count(2))
        for candidate in itertools.chain([name, base], numbered):
            files = [key(candidate.parent / f) for f in segmentation_files(candidate.name).values()]
            if not any(f in taken for f in files):
                break
        taken.update(files)
        named.append((path, candidate))
    return named, legend


def segment_files(
    clip: CLIP,
    method: str,
    classes: Vocabulary | str | os.PathLike | Sequence[str],
    inputs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    inference: InferenceConfig | Mapping[str, Any] | None = None,
    background: bool = False,
    strategy_overrides: Mapping[str, Any] | None = None,
    templates: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    output: str | None = None,
    progress: bool = True,
    text_cache: Any = None,
    max_pixels: int | None = MAX_PIXELS,
    proposals: str | os.PathLike | ProposalSource | None = None,
    num_workers: int = 1,
    prefetch: int = PREFETCH,
) -> SegmentSummary:
    """Segment image files (or folders of them) and write masks, overlays and a legend.

    Writes ``out_dir/<name>.png`` (palette PNG of class indices), ``<name>_overlay.jpg``
    and ``legend.png``, where no two outputs ever share a path (names from
    :func:`collect_images`). Inference settings default to the ``folder`` protocol's (the
    ClearCLIP protocol: short side 448, 448/224 windows; ``inference={"test_settings":
    "naclip"}``: its NACLIP settings, short side 336, 224/112 windows, PAMR);
    ``background=True`` makes class 0 a background class for ``prob_thd``.

    Bad input never stops the run: unreadable files, broken links, symbolic-link loops
    and duplicate paths are reported in ``skipped``; an image of more than
    ``max_pixels`` pixels (default :data:`reclip.data.io.MAX_PIXELS`, 4096 x 4096;
    None: no reclip limit) is segmented downscaled (listed in ``downscaled``), or
    skipped when even that would decode too much (:func:`reclip.data.io.load_image`).

    ``proposals``: the mask proposals of a method that classifies them (maft, ipclip):
    see :func:`proposal_source`; files are looked up by each image's output name (its
    path relative to the input folder, without suffix; a file given alone: its stem).

    ``num_workers`` DataLoader workers (0: none) read, resize and normalise the images
    ahead of the model, ``prefetch`` each, as :func:`evaluate`'s (the same masks either way).
    """
    check_max_pixels(max_pixels)
    _check_limit_and_workers(None, num_workers)
    _check_prefetch(prefetch)
    _check_proposals_option(method, proposals)
    vocabulary = as_vocabulary(classes)
    out_dir = Path(out_dir)
    inputs = list(inputs)
    # under torchrun: rank 0 lists the inputs and every rank shards that one list (a listing
    # on each rank could differ, e.g. files still being written); its error is raised everywhere
    procs = current_processes()
    found = on_rank0(lambda: collect_images(inputs, exclude=out_dir), procs)
    if not found.pairs:
        listed = "".join(f"\n  {path}: {reason}" for path, reason in found.skipped[:10])
        raise ValueError(f"no images found in {[str(p) for p in inputs]}{listed}")
    if isinstance(inference, InferenceConfig):
        cfg = inference
    else:
        cfg = inference_config(method, load_protocol("folder"), **dict(inference or {}))
    segmentor = build_segmentor(method, clip, vocabulary, strategy_overrides=strategy_overrides,
                                templates=templates, checkpoint=checkpoint, output=output, text_cache=text_cache)
    if proposals is not None:
        segmentor.proposals = proposal_source(proposals, clip, vocabulary, load_protocol("folder"),
                                              background=background, text_cache=text_cache)
    # preprocessing belongs to the weights: CLIP's, or what a student was trained with
    mean, std = input_normalisation(segmentor, clip)
    names = list(vocabulary.names)
    out_dir.mkdir(parents=True, exist_ok=True)
    # under torchrun: each rank segments and writes its block of the images
    rank0 = procs.rank == 0
    summary = SegmentSummary(skipped=list(found.skipped) if rank0 else [])
    summary.legend = out_dir / found.legend
    if rank0:
        save_legend(summary.legend, names)  # one per run, replacing a stale one
    start = time.perf_counter()
    mine = [found.pairs[i] for i in shard(len(found.pairs), procs.rank, procs.world_size)]
    per_image = callable(getattr(segmentor, "for_image", None))
    files = _ImageFiles(mine, max_pixels, None if per_image else (cfg, mean, std))
    on_cuda = device_of(segmentor).type == "cuda"
    loader = DataLoader(files, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity,
                        pin_memory=on_cuda, prefetch_factor=prefetch if num_workers > 0 else None)
    pending: list[dict[str, Any]] = []

    def write(items: list[dict[str, Any]]) -> None:
        results = _segment_images(segmentor, [(item["image"] if per_image else item["input"], item["name"].as_posix())
                                              for item in items], cfg, mean, std, 0 if background else None)
        for item, result in zip(items, results):
            name = item["name"]
            written = save_segmentation(out_dir / name.parent, name.name, item["image"], result.labels, names,
                                        write_legend=False)
            summary.written.append(written["mask"])

    # rank 0's bar counts every image, each of its own standing for one on every rank (as evaluate's)
    total = len(found.pairs)
    bar = tqdm(total=total, desc=f"{get_method(method).name}", unit="img", disable=not (progress and rank0))
    for item in loader:
        bar.update(min(procs.world_size, total - bar.n))
        if item["error"] is not None:
            summary.skipped.append((item["path"], item["error"]))
            if rank0:
                bar.write(f"skipped {item['path']}: {item['error']}")
            continue
        if item["downscaled"] is not None:  # (tuples: pin_memory hands tuples back as lists)
            size, read = item["downscaled"]
            summary.downscaled.append((item["path"], tuple(size), tuple(read)))
        pending.append(item)
        if len(pending) == _images_per_step(segmentor, cfg):  # batched: images of one size, or slide windows
            write(pending)
            pending = []
    if pending:
        write(pending)
    if procs.world_size > 1:  # every rank's lists, in rank order: the order of one process
        parts = gather((summary.written, summary.skipped, summary.downscaled), procs.world_size)
        summary.written = [p for part, _, _ in parts for p in part]
        summary.skipped = [s for _, part, _ in parts for s in part]
        summary.downscaled = [d for _, _, part in parts for d in part]
    bar.update(total - bar.n)  # every rank is done
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


class _ImageFiles(Dataset):
    """Image files read (and, given ``prepare`` = (cfg, mean, std), prepared for the model:
    ``item["input"]``) where the item is read, a DataLoader worker. Each item: ``path``,
    ``name`` (the output name), ``image`` (uint8 (H, W, 3) as read: the overlay is drawn on
    it), ``input``, ``downscaled`` ((H, W) of the file, (h, w) read) or None, and ``error``
    (the reason it could not be read) or None."""

    def __init__(self, pairs: list[tuple[Path, Path]], max_pixels: int | None,
                 prepare: tuple[InferenceConfig, Sequence[float], Sequence[float]] | None) -> None:
        self.pairs, self.max_pixels, self.prepare = pairs, max_pixels, prepare

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, name = self.pairs[index]
        item: dict[str, Any] = {"path": str(path), "name": name, "image": None, "input": None, "downscaled": None,
                                "error": None}
        try:
            loaded = load_image(path, max_pixels=self.max_pixels)
        except ImageReadError as err:
            item["error"] = err.reason
            return item
        item["image"] = loaded.image
        if loaded.downscaled:
            item["downscaled"] = (loaded.size, loaded.image.shape[:2])
        if self.prepare is not None:
            item["input"] = prepare_image(loaded.image, *self.prepare)
        return item


# --------------------------------------------------------------------------- proposals

PROPOSALS_HELP = ("a folder of <image id>.npz / .png files (reclip.maft.proposals), from:METHOD (the regions of a "
                  "training-free method's prediction, e.g. from:naclip), from:RUN_DIR (of a trained run, e.g. a "
                  "ReCLIP++ run), or grid / grid:RxC (the whole image and a grid, no knowledge of the image)")


def _check_proposals_option(method: str, proposals: Any) -> None:
    """Proposals go with the methods that classify them, and those need them."""
    takes = [m for m in METHODS if get_family(m).proposals]
    if get_family(method).proposals and proposals is None:
        raise ValueError(f"{get_method(method).name!r} classifies mask proposals: give them (--proposals SRC): "
                         f"{PROPOSALS_HELP}")
    if not get_family(method).proposals and proposals is not None:
        raise ValueError(f"{get_method(method).name!r} takes no mask proposals; they are for {', '.join(takes)}")


def _describe(proposals: Any) -> str | None:
    if proposals is None:
        return None
    return os.fspath(proposals) if isinstance(proposals, (str, os.PathLike)) else repr(proposals)


def _run_method(run_dir: Path) -> str | None:
    """The method a run's config.json names; None when it cannot be read (``load_trained`` then says why)."""
    try:
        method = json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("method")
    except (OSError, ValueError, AttributeError):
        return None
    return method if isinstance(method, str) else None


def _grid(text: str) -> tuple[int, int]:
    rows, _, cols = text.partition("x")
    if rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0:
        return int(rows), int(cols)
    raise ValueError(f"proposals 'grid:{text}': give the grid as RxC, e.g. grid:3x3")


def proposal_source(
    proposals: str | os.PathLike | ProposalSource,
    clip: CLIP,
    vocabulary: Vocabulary,
    protocol: Protocol,
    *,
    background: bool = False,
    text_cache: Any = None,
    whole_image: bool = True,
) -> ProposalSource:
    """A proposal source (:mod:`reclip.maft.proposals`) from its description.

    Args:
        proposals: a callable ``(image, image_id) -> masks`` (used as it is), or
            - a folder: :class:`~reclip.maft.proposals.ProposalFiles`;
            - ``from:METHOD``: the regions of a training-free method's prediction
              (``from:naclip``), made with ``clip`` for ``vocabulary`` at that method's
              published test settings on ``protocol``;
            - ``from:RUN_DIR``: the same with a trained run (its own method, classes and
              test settings), e.g. a ReCLIP++ run; not a run of a method that classifies
              proposals itself (a MAFT run), as ``from:maft`` is refused;
            - ``grid`` or ``grid:RxC``: the whole image and a 3 x 3 (R x C) grid.
        background: class 0 is a background class (for the source method's thresholds).
        whole_image: ``from:`` sources add the whole image to the regions
            (:class:`~reclip.maft.proposals.PredictionProposals`).
    """
    if callable(proposals) and not isinstance(proposals, (str, os.PathLike)):
        return proposals
    text = os.fspath(proposals)
    if text == "grid" or text.startswith("grid:"):
        return GridProposals(_grid(text[len("grid:"):]) if text != "grid" else (3, 3))
    if not text.startswith("from:"):
        if not Path(text).is_dir():
            raise ValueError(f"proposals {text!r}: no such folder; give {PROPOSALS_HELP}")
        return ProposalFiles(text)
    target = text[len("from:"):]
    if target in METHODS:
        if get_family(target).proposals:
            raise ValueError(f"proposals {text!r}: {target} classifies proposals itself; make them with a method that "
                             f"segments (e.g. from:naclip)")
        if get_family(target).trained:
            raise ValueError(f"proposals {text!r}: {target} is a trained method; give its run: from:RUN_DIR")
        segmentor = build_segmentor(target, clip, vocabulary, text_cache=text_cache, protocol=protocol)
        method = target
    elif Path(target).is_dir():
        method = _run_method(Path(target))
        if method in METHODS and get_family(method).proposals:
            raise ValueError(f"proposals {text!r}: that is a {method} run, which classifies proposals itself; make "
                             f"them with a run or method that segments (e.g. a ReCLIP++ run, or from:naclip)")
        segmentor = load_trained(target, clip, text_cache=text_cache)  # checks the run; its own classes
    else:
        free = [m for m in METHODS if not get_family(m).trained and not get_family(m).proposals]
        raise ValueError(f"proposals {text!r}: {target!r} is neither a training-free method ({', '.join(free)}) nor "
                         f"a run folder")
    cfg = inference_config(method, protocol)
    mean, std = input_normalisation(segmentor, clip)
    index = 0 if background else None

    def predict(image: np.ndarray) -> np.ndarray:
        return segment(segmentor, image, cfg, mean, std, background_index=index).labels

    return PredictionProposals(predict, text, whole_image=whole_image)
