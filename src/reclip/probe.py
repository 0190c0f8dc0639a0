"""Linear probing (ReCLIP++ Table I, "LP"): a SUPERVISED diagnostic of frozen dense features.

The unsupervised-segmentation works that ReCLIP++'s Table I compares with report two
numbers per method: clustering (no labels) and a linear probe, a linear classifier
trained WITH the ground-truth labels on the frozen features. The probe measures how
much class information the features hold, linearly; it is not an unsupervised result
and is never reported as one (every result and printout of this module says so).

What is probed: the ``features`` of a :class:`~reclip.segmentor.DenseSegmentor`, Z (B,
D, h, w) on its backbone's grid: CLIP's dense features under the method's last-block
strategy for the CLIP-based methods (a rectified head does not change them: reclip++ and
reclip probe their strategy's CLIP features), the student's Z_hat for ``student``. The
segmentor is frozen and untouched: features are computed under ``no_grad`` in eval mode
(BatchNorm statistics unchanged, its training flag restored afterwards), nothing of it is
optimised, and its own head is not used.

Protocol (STEGO-style linear probe):

- classifier: a 1x1 convolution D -> C (with bias) on the feature grid, initialised to
  zero (softmax regression is convex; zero needs no random draw);
- loss: per-pixel cross-entropy of the grid logits upsampled bilinearly (align_corners
  False) to the label's resolution, ``ignore_index`` pixels ignored, averaged over the
  labelled pixels of the batch. Upsampling the logits (rather than downsampling the
  labels to the grid by a per-cell majority) trains the classifier on exactly what is
  scored: the upsampled logits at every labelled pixel; it costs one (C, H, W) map per
  image, which a 1x1 classifier affords;
- training images: resized so that the short side is ``short_side`` (long side capped at
  ``max_long_side``; bilinear, no antialias, as inference), labels resized nearest to the
  same size, then the centre ``crop`` x ``crop`` (padded bottom/right with ignored pixels
  where the image is smaller) so that a batch stacks; no augmentation. Features are
  recomputed each epoch (memory stays one batch; frozen, so every epoch sees the same);
- optimiser: Adam (``lr``, no weight decay), ``epochs`` passes over the training split
  in an order drawn from ``seed`` (numpy), ``batch_size`` crops per step;
- evaluation: the whole validation image at the same short side (one forward, as the
  protocols' ``mode: whole``), logits upsampled to the label's size, argmax, dataset-level
  confusion matrix -> mIoU (:func:`reclip.api.evaluate_segmentor`, so skipped and
  downscaled images are handled as in ``reclip evaluate``).

Determinism: the same seed, data and device give the same classifier and result (on CPU
bit for bit; on CUDA up to the atomics of the bilinear upsampling's backward).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from reclip.api import EvaluationResult, evaluate_segmentor, input_normalisation
from reclip.data.datasets import SegmentationDataset
from reclip.data.io import MAX_PIXELS
from reclip.data.protocol import Protocol, load_protocol
from reclip.data.transforms import resize_bilinear, resize_labels, resize_short_side, to_tensor_normalized
from reclip.features import strategy_to_dict
from reclip.inference import InferenceConfig
from reclip.segmentor import DenseSegmentor

__all__ = ["DIAGNOSTIC", "LinearProbeHead", "ProbeResult", "ProbeSegmentor", "linear_probe", "probe"]

DIAGNOSTIC = "SUPERVISED diagnostic: linear probe on frozen features, trained WITH labels"


def supervised_banner(features: str) -> str:
    """The line every probe printout starts with, naming what was probed."""
    return f"SUPERVISED diagnostic: linear probe on frozen {features} features, trained WITH labels"


class LinearProbeHead(nn.Module):
    """Z (B, D, h, w) -> class logits (B, C, h, w): a 1x1 convolution, zero-initialised,
    always run in float32 (outside any autocast)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_channels

    def forward(self, features: Tensor) -> Tensor:
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.classifier(features.float())


class _FrozenFeatures:
    """The probed segmentor's ``features`` under no_grad, as a backbone. Deliberately not
    an ``nn.Module``: the probe's parameters, state_dict, ``train()`` and ``to()`` never
    reach the probed segmentor."""

    def __init__(self, segmentor: DenseSegmentor) -> None:
        self.segmentor = segmentor
        self.stride = int(segmentor.backbone.stride)

    def __call__(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.segmentor.features(images).float()


class ProbeSegmentor(DenseSegmentor):
    """A linear probe as a segmentor: the frozen features of ``segmentor`` -> :class:`LinearProbeHead`.

    Its only parameters are the classifier's; the input is padded to the stride and the
    logits aligned with it exactly as ``segmentor`` itself does (:class:`DenseSegmentor`).
    """

    def __init__(self, segmentor: DenseSegmentor, num_classes: int, dim: int | None = None) -> None:
        if not (callable(getattr(segmentor, "features", None)) and hasattr(getattr(segmentor, "backbone", None),
                                                                           "stride")):
            raise TypeError(f"a linear probe needs a DenseSegmentor (features(images) on a backbone with a stride); "
                            f"got {type(segmentor).__name__}")
        frozen = _FrozenFeatures(segmentor)
        if dim is None:
            dim = _feature_dim(segmentor)
        super().__init__(frozen, LinearProbeHead(dim, num_classes))  # type: ignore[arg-type]
        self.head.to(_device_of(segmentor))


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _feature_dim(segmentor: DenseSegmentor) -> int:
    """D of the segmentor's features: its backbone's ``embed_dim``, else one no_grad call
    on a small zero image."""
    dim = getattr(segmentor.backbone, "embed_dim", None)
    if isinstance(dim, int) and dim > 0:
        return dim
    stride = int(segmentor.backbone.stride)
    with torch.no_grad():
        z = segmentor.features(torch.zeros(1, 3, 4 * stride, 4 * stride, device=_device_of(segmentor)))
    return int(z.shape[1])


# --------------------------------------------------------------------------- data


class _ProbeCrops(Dataset):
    """Training items: the normalised image at ``short_side`` and its labels, centre ``crop``."""

    def __init__(self, data: SegmentationDataset, short_side: int, max_long_side: int | None, crop: int,
                 mean: Sequence[float], std: Sequence[float], ignore_index: int) -> None:
        self.data, self.short_side, self.max_long_side, self.crop = data, short_side, max_long_side, crop
        self.mean, self.std, self.ignore_index = tuple(mean), tuple(std), ignore_index

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.data[index]
        if item["error"] is not None:
            return {"path": item["path"], "error": item["error"]}
        image, label = item["image"], item["label"]
        if label is None:
            return {"path": item["path"], "error": "no label (a linear probe is trained with labels)"}
        if label.shape != image.shape[:2]:  # an image read downscaled (max_pixels): its label to its size
            label = resize_labels(label, image.shape[:2])
        x = to_tensor_normalized(image, self.mean, self.std)  # (3, H, W)
        x = resize_short_side(x, self.short_side, max_long_side=self.max_long_side, antialias=False)
        y = torch.from_numpy(np.ascontiguousarray(resize_labels(label, tuple(x.shape[-2:])))).long()
        x, y = _centre_crop(x, y, self.crop, self.ignore_index)
        return {"path": item["path"], "error": None, "image": x, "label": y}


def _centre_crop(x: Tensor, y: Tensor, crop: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """The centre crop x crop of (3, H, W) and (H, W); a side shorter than crop is padded
    at the bottom/right (image 0, label ``ignore_index``)."""
    height, width = y.shape
    top, left = max(height - crop, 0) // 2, max(width - crop, 0) // 2
    x, y = x[:, top:top + crop, left:left + crop], y[top:top + crop, left:left + crop]
    pad_h, pad_w = crop - y.shape[0], crop - y.shape[1]
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
        y = F.pad(y, (0, pad_w, 0, pad_h), value=ignore_index)
    return x, y


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [i for i in items if i["error"] is None]
    return {
        "skipped": [(i["path"], i["error"]) for i in items if i["error"] is not None],
        "images": torch.stack([i["image"] for i in good]) if good else None,
        "labels": torch.stack([i["label"] for i in good]) if good else None,
    }


# --------------------------------------------------------------------------- result


@dataclass
class ProbeResult(EvaluationResult):
    """An :class:`~reclip.api.EvaluationResult` of a linear probe on the validation split
    (``metrics``: mIoU, IoU per class ...; ``confusion``), with how the probe was trained.

    ``probe``: the training settings and record (``losses``: mean training loss per
    epoch, ``train_images``, ``train_skipped``); ``model``: the trained
    :class:`ProbeSegmentor` (not serialised). ``supervised`` is always True.
    """

    probe: dict[str, Any] = field(default_factory=dict)
    model: ProbeSegmentor | None = None
    supervised: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = {"supervised": True, "diagnostic": DIAGNOSTIC}
        out.update(super().to_dict())
        out["probe"] = self.probe
        return out


# --------------------------------------------------------------------------- probe


def linear_probe(
    segmentor: DenseSegmentor,
    train_data: SegmentationDataset,
    val_data: SegmentationDataset,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 8,
    short_side: int | None = None,
    max_long_side: int | None = None,
    crop: int | None = None,
    seed: int = 0,
    limit_train: int | None = None,
    limit: int | None = None,
    num_workers: int = 0,
    autocast: bool | str = "auto",
    progress: bool = True,
    description: str = "linear probe",
) -> ProbeResult:
    """Train a linear classifier WITH labels on the frozen features of ``segmentor`` over
    ``train_data`` and score it on ``val_data`` (see the module docstring for the protocol).

    Args:
        segmentor: a DenseSegmentor; left as it was (parameters, buffers, training flag).
        train_data, val_data: labelled splits with the same classes.
        mean, std: the image normalisation of the segmentor's weights.
        short_side: training and evaluation short side (default: the validation
            protocol's ``reclip.short_side``); ``max_long_side`` likewise (default its
            ``reclip.max_long_side``).
        crop: training crop side (default ``short_side``: the centre square).
        limit_train: train on the first N images only; ``limit``: score the first N
            validation images (quick looks, not results).
        autocast: mixed precision of the feature extraction (InferenceConfig.autocast);
            the classifier always runs in float32.

    Raises:
        ValueError: bad settings, splits without labels or of different classes, or no
            readable training image.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if limit_train is not None and not (isinstance(limit_train, int) and limit_train > 0):
        raise ValueError(f"limit_train must be a positive number of images or None, got {limit_train!r}")
    for data, what in ((train_data, "training"), (val_data, "validation")):
        if not data.has_labels:
            raise ValueError(f"the {what} split {data.split!r} at {data.root} has no labels: a linear probe is "
                             f"trained and scored WITH labels")
    if train_data.num_classes != val_data.num_classes:
        raise ValueError(f"the training split has {train_data.num_classes} classes and the validation split "
                         f"{val_data.num_classes}; a probe needs one class list")
    settings = val_data.protocol.reclip
    short_side = settings.short_side if short_side is None else short_side
    max_long_side = settings.max_long_side if max_long_side is None else max_long_side
    crop = short_side if crop is None else crop
    cfg = InferenceConfig(mode="whole", short_side=short_side, max_long_side=max_long_side, batch_size=1,
                          autocast=autocast)  # checks the sizes and autocast before any work
    if not (isinstance(crop, int) and crop > 0):
        raise ValueError(f"crop must be a positive int, got {crop!r}")
    ignore_index = train_data.protocol.ignore_index

    start = time.perf_counter()
    model = ProbeSegmentor(segmentor, train_data.num_classes)
    device = _device_of(model)
    was_training = segmentor.training
    segmentor.eval()
    try:
        losses, skipped, seen = _train(model, train_data, cfg, crop, mean, std, ignore_index, epochs=epochs, lr=lr,
                                       batch_size=batch_size, seed=seed, limit_train=limit_train,
                                       num_workers=num_workers, progress=progress, device=device,
                                       description=description)
        model.eval()
        result = evaluate_segmentor(model, val_data, cfg, mean=mean, std=std, limit=limit,
                                    num_workers=num_workers, progress=progress,
                                    description=f"{description}: scoring {val_data.split}")
    finally:
        segmentor.train(was_training)
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(EvaluationResult)}
    fields["method"] = f"linear probe on {type(segmentor).__name__}"
    fields["seconds"] = time.perf_counter() - start  # training and scoring
    probe_settings = {
        "supervised": True,
        "classifier": "1x1 conv D -> C with bias, zero init",
        "loss": "per-pixel cross-entropy on grid logits upsampled bilinearly to the label size",
        "optimizer": "Adam, no weight decay",
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
        "short_side": short_side, "max_long_side": max_long_side, "crop": crop,
        "feature_dim": model.head.classifier.in_channels, "stride": model.backbone.stride,
        "train_split": train_data.split, "train_root": str(train_data.root), "limit_train": limit_train,
        "train_images": seen, "train_skipped": [{"path": p, "error": e} for p, e in skipped],
        "losses": [round(v, 6) for v in losses],
    }
    return ProbeResult(**fields, probe=probe_settings, model=model)


def _train(model: ProbeSegmentor, data: SegmentationDataset, cfg: InferenceConfig, crop: int,
           mean: Sequence[float], std: Sequence[float], ignore_index: int, *, epochs: int, lr: float,
           batch_size: int, seed: int, limit_train: int | None, num_workers: int, progress: bool,
           device: torch.device, description: str) -> tuple[list[float], list[tuple[str, str]], int]:
    """The probe's training loop; returns (mean loss per epoch, skipped images, images trained on)."""
    crops = _ProbeCrops(data, cfg.short_side, cfg.max_long_side, crop, mean, std, ignore_index)
    count = len(crops) if limit_train is None else min(limit_train, len(crops))
    optimizer = torch.optim.Adam(model.head.parameters(), lr=lr)
    dtype = cfg.autocast_dtype(device)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    skipped: dict[str, str] = {}
    for epoch in range(epochs):
        order = rng.permutation(count).tolist()
        loader = DataLoader(Subset(crops, order), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=_collate)
        total, pixels = 0.0, 0
        bar = tqdm(loader, desc=f"{description}: epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress)
        for batch in bar:
            skipped.update(batch["skipped"])
            if batch["images"] is None:
                continue
            images, labels = batch["images"].to(device), batch["labels"].to(device)
            valid = int((labels != ignore_index).sum())
            if valid == 0:
                continue
            if dtype is None:
                grid = model(images)
            else:
                with torch.autocast(device_type=device.type, dtype=dtype):
                    grid = model(images)
            logits = resize_bilinear(grid.float(), tuple(labels.shape[-2:]))  # (B, C, crop, crop)
            loss = F.cross_entropy(logits, labels, ignore_index=ignore_index)  # mean over labelled pixels
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * valid
            pixels += valid
            bar.set_postfix(loss=f"{total / pixels:.4f}", refresh=False)
        bar.close()
        if pixels == 0:
            reasons = [f"{p}: {e}" for p, e in skipped.items()]
            raise ValueError(f"no labelled training pixel in {count} image(s) of split {data.split!r} at {data.root}"
                             + (f"; skipped: {'; '.join(reasons[:5])}" if reasons else ""))
        losses.append(total / pixels)
    return losses, sorted(skipped.items()), count - len(skipped)


def probe(
    clip: Any,
    method: str,
    dataset: str | os.PathLike | Protocol,
    data_root: str | os.PathLike,
    *,
    train_split: str = "train",
    split: str = "val",
    checkpoint: str | os.PathLike | None = None,
    classes_file: str | os.PathLike | None = None,
    label_dir: str | os.PathLike | None = None,
    strategy_overrides: dict[str, Any] | None = None,
    text_cache: Any = None,
    max_pixels: int | None = MAX_PIXELS,
    **options: Any,
) -> ProbeResult:
    """:func:`linear_probe` of ``method``'s features on a dataset protocol (the CLI's ``reclip probe``).

    The segmentor is built as ``reclip evaluate`` builds it (``checkpoint``: a trained
    run; ``strategy_overrides``: another last-block strategy of a training-free method);
    its text head is not used, so a training-free method's queries are made from one
    template. ``options`` are :func:`linear_probe`'s (epochs, lr, batch_size, short_side,
    crop, seed, limit_train, limit, num_workers, autocast, progress).
    """
    from reclip.clip.model import weights_fingerprint
    from reclip.methods import build_segmentor, classes_file_for, get_family, get_method

    protocol = dataset if isinstance(dataset, Protocol) else load_protocol(dataset)
    if label_dir is not None:
        protocol = protocol.with_overrides(label_dir=str(label_dir))
    family = get_family(method)
    classes_file = classes_file_for(method, protocol, classes_file)
    train_data = SegmentationDataset(protocol, data_root, train_split, classes_file=classes_file, max_pixels=max_pixels)
    val_data = SegmentationDataset(protocol, data_root, split, classes_file=classes_file, max_pixels=max_pixels)
    segmentor = build_segmentor(method, clip, val_data.vocabulary, strategy_overrides=strategy_overrides,
                                templates=None if family.trained else "single", checkpoint=checkpoint,
                                text_cache=text_cache, protocol=None if family.trained else protocol)
    mean, std = input_normalisation(segmentor, clip)
    result = linear_probe(segmentor, train_data, val_data, mean=mean, std=std,
                          description=f"linear probe of {method} on {protocol.name}", **options)
    result.method = method
    strategy = getattr(segmentor, "strategy", None)
    result.settings.update({
        "features": features_description(method, segmentor),
        "strategy": strategy_to_dict(strategy) if strategy is not None else None,
        "method_family": get_method(method).family,
        "clip": getattr(clip, "spec", None),
        "clip_fingerprint": weights_fingerprint(clip),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
    })
    return result


def features_description(method: str, segmentor: Any) -> str:
    """What a probe of ``method`` reads, in words: the student's Z_hat or CLIP's dense
    features under a last-block strategy (a preset's name where it is one)."""
    from reclip.features import STRATEGIES

    strategy = getattr(segmentor, "strategy", None)
    if strategy is None:
        return f"{method} (the student's Z_hat)" if method == "student" else method
    name = next((k for k, v in STRATEGIES.items() if v == strategy), None)
    if name is not None:
        how = f"{name} strategy" if strategy.kind != "last_block" else f"{name} last block"
    elif strategy.kind == "last_block":
        how = f"last block attention {strategy.attention}, residual {strategy.residual}, FFN {strategy.ffn}"
    else:
        how = strategy.describe()
    return f"{method} (CLIP dense features, {how})"
