"""The Python API under the CLI: segment files, evaluate on a dataset protocol.

    import reclip
    clip = reclip.load_clip("ViT-B/16")
    result = reclip.evaluate(clip, "clearclip", "voc20", "data/VOCdevkit/VOC2012")
    print(result.table())
    reclip.segment_files(clip, "maskclip", "cat,dog", ["photos/"], "masks/")

Both stream one image at a time (sliding windows are batched inside), show a tqdm bar,
and report unreadable images instead of stopping: what was skipped is in the result.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from reclip.clip.model import CLIP, weights_fingerprint
from reclip.data.datasets import Protocol, SegmentationDataset, load_protocol
from reclip.data.io import ImageReadError, iter_images, read_image
from reclip.inference import InferenceConfig, segment
from reclip.methods import build_segmentor, get_method, inference_config
from reclip.metrics import ConfusionMatrix
from reclip.text import Vocabulary, read_class_file
from reclip.visualize import save_segmentation


def as_vocabulary(classes: Vocabulary | str | os.PathLike | Sequence[str]) -> Vocabulary:
    """A Vocabulary from a Vocabulary, a class file path, "cat,dog" or a list of names."""
    if isinstance(classes, Vocabulary):
        return classes
    if isinstance(classes, os.PathLike) or (isinstance(classes, str) and os.path.isfile(classes)):
        return read_class_file(classes)
    return Vocabulary.from_names(classes)


def _image_stats(clip: CLIP) -> tuple[Sequence[float], Sequence[float]]:
    """Preprocessing belongs to the weights: the loader records mean/std on the model."""
    from reclip.data.transforms import CLIP_MEAN, CLIP_STD

    return getattr(clip, "image_mean", CLIP_MEAN), getattr(clip, "image_std", CLIP_STD)


# --------------------------------------------------------------------------- evaluate


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
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

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
        for key in ("mIoU", "mAcc", "aAcc"):
            lines.append(f"{key:<{width}}  {100 * self.metrics[key]:6.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def clean(v: float) -> float | None:
            return None if math.isnan(v) else round(100 * v, 4)

        return {
            "method": self.method,
            "protocol": self.protocol,
            "split": self.split,
            "num_images": self.num_images,
            "mIoU": clean(self.metrics["mIoU"]),
            "mAcc": clean(self.metrics["mAcc"]),
            "aAcc": clean(self.metrics["aAcc"]),
            "IoU": {n: clean(float(v)) for n, v in zip(self.class_names, self.metrics["IoU"])},
            "skipped": [{"path": p, "error": e} for p, e in self.skipped],
            "seconds": round(self.seconds, 2),
            "settings": self.settings,
            "confusion": self.confusion.tolist(),
        }

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)
        return path


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
    limit: int | None = None,
    progress: bool = True,
    text_cache: Any = None,
) -> EvaluationResult:
    """Score ``method`` on a dataset protocol: dataset-level confusion matrix -> mIoU.

    Args:
        dataset: a protocol name (``voc20``, ``ade150``, ...), a protocol YAML or a Protocol.
        classes_file: class list replacing the protocol's (same order as the label ids).
        inference: InferenceConfig fields overriding the protocol's published settings
            (``short_side``, ``window``, ``stride``, ``mode``, ``prob_thd`` ...).
        absent_as_zero: the official ReCLIP mean (classes that never occur count as 0).
        limit: evaluate only the first ``limit`` images (a quick look, not a result).
    """
    protocol = dataset if isinstance(dataset, Protocol) else load_protocol(dataset)
    data = SegmentationDataset(protocol, data_root, split, classes_file=classes_file)
    if not data.has_labels:
        raise ValueError(f"{data_root}: split {split!r} of {protocol.name!r} has no labels to evaluate against")
    cfg = inference_config(method, protocol, **dict(inference or {}))
    segmentor = build_segmentor(method, clip, data.vocabulary, strategy_overrides=strategy_overrides,
                                templates=templates, text_cache=text_cache)
    mean, std = _image_stats(clip)
    background = 0 if protocol.background else None
    confusion = ConfusionMatrix(data.num_classes, ignore_index=protocol.ignore_index)
    skipped: list[tuple[str, str]] = []
    count = len(data) if limit is None else min(limit, len(data))
    start = time.perf_counter()
    bar = tqdm(range(count), desc=f"{method} on {protocol.name}/{split}", unit="img", disable=not progress)
    for index in bar:
        item = data[index]
        if item["error"] is not None:
            skipped.append((item["path"], item["error"]))
            bar.write(f"skipped {item['path']}: {item['error']}")
            continue
        with torch.inference_mode():
            result = segment(segmentor, item["image"], cfg, mean, std, background_index=background)
        confusion.update(result.labels, item["label"])
        bar.set_postfix(mIoU=f"{100 * confusion.compute()['mIoU']:.1f}", refresh=False)
    seconds = time.perf_counter() - start
    return EvaluationResult(
        method=method,
        protocol=protocol.name,
        split=split,
        class_names=data.class_names,
        metrics=confusion.compute(absent_as_zero=absent_as_zero),
        confusion=confusion.matrix.copy(),
        num_images=count - len(skipped),
        skipped=skipped,
        seconds=seconds,
        settings={"inference": _jsonable(vars(cfg)), "clip": getattr(clip, "spec", None),
                  "clip_fingerprint": weights_fingerprint(clip), "absent_as_zero": absent_as_zero,
                  "strategy_overrides": dict(strategy_overrides or {}), "templates": templates},
    )


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# --------------------------------------------------------------------------- segment


@dataclass
class SegmentSummary:
    """What ``segment_files`` wrote and what it skipped."""

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def collect_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files from a mix of files and folders (folders searched recursively)."""
    paths: list[Path] = []
    for entry in inputs:
        entry = Path(entry)
        if entry.is_dir():
            paths.extend(iter_images(entry))
        elif entry.exists():
            paths.append(entry)
        else:
            raise FileNotFoundError(f"{entry}: no such file or folder")
    return paths


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
    progress: bool = True,
    text_cache: Any = None,
) -> SegmentSummary:
    """Segment image files (or folders of them) and write masks, overlays and a legend.

    Writes ``out_dir/<stem>.png`` (palette PNG of class indices), ``<stem>_overlay.jpg``
    and ``legend.png``. Inference settings default to the ``folder`` protocol's (the
    ClearCLIP protocol: short side 448, 448/224 windows); ``background=True`` makes class
    0 a background class for ``prob_thd``.
    """
    vocabulary = as_vocabulary(classes)
    paths = collect_images(inputs)
    if not paths:
        raise ValueError(f"no images found in {[str(p) for p in inputs]}")
    if isinstance(inference, InferenceConfig):
        cfg = inference
    else:
        cfg = inference_config(method, load_protocol("folder"), **dict(inference or {}))
    segmentor = build_segmentor(method, clip, vocabulary, strategy_overrides=strategy_overrides,
                                templates=templates, text_cache=text_cache)
    mean, std = _image_stats(clip)
    out_dir = Path(out_dir)
    summary = SegmentSummary()
    stems = _unique_stems(paths)
    start = time.perf_counter()
    bar = tqdm(list(zip(paths, stems)), desc=f"{get_method(method).name}", unit="img", disable=not progress)
    for path, stem in bar:
        try:
            image = read_image(path)
        except ImageReadError as err:
            summary.skipped.append((str(path), err.reason))
            bar.write(f"skipped {path}: {err.reason}")
            continue
        with torch.inference_mode():
            result = segment(segmentor, image, cfg, mean, std, background_index=0 if background else None)
        written = save_segmentation(out_dir, stem, image, result.labels, list(vocabulary.names))
        summary.written.append(written["mask"])
    summary.seconds = time.perf_counter() - start
    return summary


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    """File stems, disambiguated with the parent folder when two images share a stem."""
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.stem] = counts.get(p.stem, 0) + 1
    return [f"{p.parent.name}_{p.stem}" if counts[p.stem] > 1 else p.stem for p in paths]
