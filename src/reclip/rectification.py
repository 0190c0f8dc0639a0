"""The ReCLIP++ rectification stage as a pipeline: train a rectifier, save it, load it.

    rectify(clip, "voc20", "data/VOCdevkit/VOC2012", "hyp.json", "runs/voc")
    segmentor = load_rectifier("runs/voc", clip)      # a segmentor: images -> (B, C, h, w)

Training uses only the unlabelled train images and their image-level hypotheses
(``reclip.hypotheses``): the ground truth is never read. A run directory holds
``config.json`` (method, rectifier and training settings, CLIP spec and fingerprint,
vocabulary) and ``model.safetensors`` (trained parameters only), plus the engine's
``checkpoint.pt`` and ``metrics.jsonl`` while it trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import torch

from reclip.clip.model import CLIP, weights_fingerprint
from reclip.data.augment import UnlabeledTrainSet
from reclip.data.datasets import SegmentationDataset
from reclip.data.io import MAX_PIXELS
from reclip.data.protocol import Protocol, load_protocol
from reclip.heads.rectify import PRESETS, Rectifier, RectifierConfig, rectification_loss
from reclip.hypotheses import load_hypotheses
from reclip.text import Vocabulary, query_embeddings
from reclip.train import (
    PolySchedule,
    RunFiles,
    SGDConfig,
    TrainConfig,
    TrainResult,
    describe,
    load_run,
    save_run,
    steps_per_epoch,
    train,
)
from reclip.train.checkpoint import WEIGHTS_NAME, DamagedRunError

__all__ = ["QUERY_TEMPLATES", "load_rectifier", "rectifier_from_run", "rectify", "save_rectifier_run"]

# The templates of W_q: ReCLIP/ReCLIP++ use the 85 (METHODS.md section 1).
QUERY_TEMPLATES = "reclip85"
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"steps"}


def rectify(
    clip: CLIP,
    dataset: str | os.PathLike | Protocol,
    data_root: str | os.PathLike,
    hypotheses: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    method: str = "reclip++",
    config: RectifierConfig | None = None,
    classes_file: str | os.PathLike | None = None,
    split: str = "train",
    max_steps: int | None = None,
    train_overrides: dict[str, Any] | None = None,
    optimizer: Any = None,
    base_short_side: int | None = None,
    crop: int | None = None,
    resume: bool = False,
    progress: bool = True,
    text_cache: Any = None,
    max_pixels: int | None = MAX_PIXELS,
) -> TrainResult:
    """Train the rectifier of ``method`` ("reclip++" or "reclip") on unlabelled images.

    The rectifier is built after the seed is set (``train_overrides["seed"]``, default 0),
    so the same call gives the same run. The optimiser is SGD with the official momentum
    and weight decay, the protocol's lr and a per-step poly schedule whose horizon is the
    protocol's ``poly_epochs`` (at the batch size used), unless ``optimizer`` is given.

    Args:
        hypotheses: the file of ``reclip hypotheses`` for the same CLIP and class list.
        classes_file: the class list; default: the protocol's ``reclip.classes_file`` (the
            official ReCLIP prompt names) where it names one, else the protocol's list.
        config: rectifier settings (default: the method's preset; ablations are fields).
        max_steps: stop after this many steps (default: the preset's epochs).
        train_overrides: :class:`~reclip.train.TrainConfig` fields (batch_size, seed,
            device, workers, checkpoint_every, ...) and ``lr`` (of the default optimiser)
            replacing the protocol's ``rectify:`` preset and the defaults.
        optimizer: an optimiser config of :mod:`reclip.train.optim` used as it is (its
            horizon None = the run's length), instead of the default SGD + poly.
        base_short_side, crop: augmentation scale and crop (default: the protocol's preset).
        resume: continue an interrupted run in ``run_dir`` exactly.
        max_pixels: images of more pixels are read downscaled (:mod:`reclip.data.io`).
    """
    for name, value in (("max_steps", max_steps), ("base_short_side", base_short_side), ("crop", crop)):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"{name} must be a positive int or None (the protocol's preset), got {value!r}")
    protocol = dataset if isinstance(dataset, Protocol) else load_protocol(dataset)
    overrides = dict(train_overrides or {})
    unknown = sorted(set(overrides) - _TRAIN_FIELDS - {"lr"})
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; allowed: {sorted(_TRAIN_FIELDS | {'lr'})}")
    if optimizer is not None and "lr" in overrides:
        raise ValueError("give the learning rate in the optimizer config, not as a training override as well")
    if classes_file is None:  # the ReCLIP family's own class names where the protocol names them
        classes_file = protocol.section_classes_path("reclip")
    images = SegmentationDataset(protocol, data_root, split, classes_file=classes_file, check_sizes=False,
                                 max_pixels=max_pixels)
    vocabulary = images.vocabulary
    config = config or PRESETS[method]
    preset = protocol.rectify  # the protocol YAML's `rectify:` section
    augment = {"base_short_side": base_short_side or preset.base_short_side, "crop": crop or preset.crop}
    hyp = load_hypotheses(hypotheses, vocabulary=vocabulary, clip=clip)
    trainset = UnlabeledTrainSet(images, hyp, vocabulary.num_classes, **augment, seed=overrides.get("seed", 0),
                                 mean=clip.image_mean, std=clip.image_std)
    batch_size = overrides.pop("batch_size", preset.batch_size)
    spe = steps_per_epoch(len(trainset), batch_size)  # at the batch size actually used
    if optimizer is None:
        optimizer = SGDConfig(lr=overrides.pop("lr", preset.lr),
                              schedule=PolySchedule(horizon=preset.poly_epochs * spe))
    steps = max_steps if max_steps is not None else preset.epochs * spe
    train_config = TrainConfig(steps=steps, batch_size=batch_size, **overrides)
    queries = query_embeddings(clip, vocabulary, QUERY_TEMPLATES, cache_dir=text_cache)
    # a resumed run must be this run: same rectifier, classes, CLIP, images, hypotheses, augmentation
    identity = {"method": method, "rectifier": config.to_dict(), "classes": vocabulary.to_lines(),
                "clip_fingerprint": weights_fingerprint(clip), "protocol": protocol.name, "split": split,
                "hypotheses": _digest(hyp), "augment": augment}
    result = train(lambda: Rectifier(clip, queries, vocabulary.names, config), _loss, trainset, train_config, run_dir,
                   optimizer=optimizer, run_settings=identity, resume=resume, progress=progress)
    save_rectifier_run(
        run_dir, result.model, method, clip, vocabulary,
        train=dataclasses.asdict(train_config), optimizer=describe(optimizer), augment=augment,
        preset=dataclasses.asdict(preset), protocol=protocol.name, split=split, hypotheses=str(hypotheses),
        train_images=len(trainset), skipped_images=dict(trainset.skipped),
    )
    return result


def _digest(hypotheses: dict[str, list[int]]) -> str:
    """sha256 of image-level hypotheses (image id -> classes), whatever the file's formatting."""
    return hashlib.sha256(json.dumps(hypotheses, sort_keys=True).encode()).hexdigest()[:16]


def _loss(model: Rectifier, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Paper eq. 7 on the Gumbel masks of the decoder output, over each image's hypotheses."""
    outputs = model.forward_train(batch["image"])
    loss = rectification_loss(model, outputs, batch["hypotheses"])
    return loss, {"loss": loss.detach()}


def save_rectifier_run(run_dir: str | os.PathLike, model: Rectifier, method: str, clip: CLIP,
                       vocabulary: Vocabulary, **extra: Any) -> None:
    """RUN_DIR/config.json (what loading needs: method, rectifier settings, CLIP spec and
    fingerprint, classes, query templates; plus ``extra``) and RUN_DIR/model.safetensors."""
    save_run(run_dir, {
        "method": method,
        "rectifier": model.config.to_dict(),
        "clip": getattr(clip, "spec", None),
        "clip_fingerprint": weights_fingerprint(clip),
        "classes": vocabulary.to_lines(),
        "query_templates": QUERY_TEMPLATES,
        **extra,
    }, model)


def rectifier_from_run(run: RunFiles, clip: CLIP, vocabulary: Vocabulary | None = None,
                       text_cache: Any = None) -> Rectifier:
    """The trained rectifier of a finished run (``reclip.train.load_run``) on ``clip``, in eval mode.

    Refuses another CLIP (weights fingerprint) or another class list than the run's,
    naming both; ``vocabulary`` None means the run's own.
    """
    saved = run.config
    if saved.get("clip_fingerprint") != weights_fingerprint(clip):
        raise ValueError(
            f"{run.run_dir} was trained on CLIP {saved.get('clip')!r} (fingerprint {saved.get('clip_fingerprint')}); "
            f"the loaded CLIP {getattr(clip, 'spec', None)!r} has fingerprint {weights_fingerprint(clip)}: "
            "pass the same --clip as for training"
        )
    # checked when the run was made; a list that shares a name (SCLIP's COCO-Object) reloads as it was
    trained = Vocabulary.from_names(saved["classes"], shared_names=True)
    if vocabulary is not None and vocabulary != trained:
        raise ValueError(
            f"{run.run_dir} was trained for the classes {list(trained.names)}, not {list(vocabulary.names)}: "
            "a rectifier's Reference prompt and decoder are per class: pass --classes-file with the run's list "
            "(config.json 'classes'; a run trained before the ReCLIP class files existed used the protocol's "
            "own, e.g. voc20.txt), or train one for this class list"
        )
    queries = query_embeddings(clip, trained, saved.get("query_templates", QUERY_TEMPLATES), cache_dir=text_cache)
    model = Rectifier(clip, queries, trained.names, RectifierConfig.from_dict(saved["rectifier"]))
    try:
        model.load_trainable_state_dict(run.state_dict)
    except ValueError as err:
        raise DamagedRunError(f"{run.run_dir / WEIGHTS_NAME} does not fit the run's own settings ({err}); the file "
                              "is damaged or from another run: restore it or train again") from None
    return model.to(next(clip.parameters()).device).eval()


def load_rectifier(run_dir: str | os.PathLike, clip: CLIP, vocabulary: Vocabulary | None = None,
                   text_cache: Any = None) -> Rectifier:
    """The trained rectifier of ``run_dir`` (see :func:`rectifier_from_run`)."""
    return rectifier_from_run(load_run(run_dir), clip, vocabulary, text_cache)
