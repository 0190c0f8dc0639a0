"""MAFT's mask-aware fine-tuning of CLIP's image tower, on the shared training engine.

    finetune_maft(clip, "voc20", "data/VOCdevkit/VOC2012", "runs/maft", proposals=source,
                  unseen_classes=["cat", "dog"])                          # as published
    finetune_maft(clip, "voc20", root, "runs/maft-u", proposals=source,
                  supervision="pseudo", teacher_run="runs/reclip")        # no label opened

What trains (Jiao et al. 2023; official code in METHODS.md s.5): a copy of CLIP's image
tower whose attention (``in_proj``, ``out_proj``) and LayerNorm (``ln_1``, ``ln_2``)
parameters of every block, and ``ln_post``, are trainable; everything else is frozen
(:data:`TRAINABLE`). Each step, on a batch of augmented crops:

1. proposals (B, N, H, W) from the proposal source, on the crop;
2. class masks: the seen classes of the ground truth (``supervision="labels"``, as
   published), or the argmax pseudo labels of a frozen ReCLIP++ rectifier run on the
   same crop (``supervision="pseudo"``, new: no ground truth is read);
3. the IP-CLIP embeddings of the proposals (:func:`reclip.maft.ipclip.ip_clip_embeddings`)
   through the fine-tuned tower, scored against the seen classes' text embeddings;
4. loss = mask-aware + 0.1 x self-distillation (:mod:`reclip.maft.losses`), the latter
   comparing the fine-tuned and the frozen CLIP's whole-crop class scores.

The text classifier holds the SEEN classes only (unseen names are never used in
training); pixels of unseen classes carry no class mask. The optimiser is AdamW, lr
1e-5, weight decay 1e-4 except on LayerNorms, constant lr, 1000 steps of 16 crops
(METHODS.md). Not reproduced: the official gradient clipping (total norm 0.01), which
the engine does not have.

A run directory holds config.json (``"method": "maft"``, ``start_layer``, ``classes``,
the seen/unseen split, supervision, teacher, proposal source, CLIP spec and
fingerprint, templates, training settings) and model.safetensors: the fine-tuned
parameters only, named as under ``clip.visual`` (e.g.
``transformer.resblocks.9.attn.in_proj_weight``, ``ln_post.weight``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from reclip.class_split import ClassSplit, class_split
from reclip.clip.model import CLIP, weights_fingerprint
from reclip.data.datasets import SegmentationDataset
from reclip.data.io import MAX_PIXELS
from reclip.data.protocol import Protocol, load_protocol
from reclip.files import atomic_write_json
from reclip.heads.rectify import class_query_weights
from reclip.maft.ipclip import default_start_layer, ip_clip_embeddings
from reclip.maft.losses import SELF_DISTILLATION_WEIGHT, class_probabilities, maft_loss
from reclip.maft.trainset import MaftTrainSet, seen_lookup
from reclip.text import Vocabulary, query_embeddings
from reclip.train import AdamWConfig, RunFiles, TrainConfig, TrainResult, describe, load_run, train
from reclip.train.checkpoint import WEIGHTS_NAME, save_weights
from reclip.train.distributed import is_rank0

__all__ = ["MAFT_TEMPLATES", "SUPERVISIONS", "TRAINABLE", "MaftTrainee", "ProposalSource", "finetune_maft",
           "load_maft_clip", "mark_trainable", "maft_clip_from_run", "save_maft_run"]

SUPERVISIONS = ("labels", "pseudo")
# Text embeddings of the classes (reclip.templates); the official code uses 14 ViLD prompts.
MAFT_TEMPLATES = "imagenet80"
# Parameter names under clip.visual that fine-tune: every block's attention and LayerNorms, and ln_post.
TRAINABLE = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
             "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")
# Augmentation: the official crops 640 px windows of images rescaled to a short side of 320..1280 and feeds
# CLIP the crop resized to 480 x 480, i.e. a 480 window of an image of short side 240..960: base 480 x [0.5, 2].
MAFT_CROP = 480
MAFT_BASE_SHORT_SIDE = 480
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"steps"}

# reclip.maft.proposals' interface: source(image (H, W, 3) uint8, image_id) -> (N, H, W) float32 in [0, 1]
ProposalSource = Callable[[np.ndarray, str], Tensor]


def _is_trainable(name: str) -> bool:
    if name.startswith("ln_post."):
        return True
    return name.startswith("transformer.resblocks.") and name.split(".", 3)[3] in TRAINABLE


def mark_trainable(visual: nn.Module) -> list[str]:
    """Set ``requires_grad`` on MAFT's parameters of a CLIP image tower (and off on all
    others); returns their names under the tower, in order."""
    names = []
    for name, p in visual.named_parameters():
        p.requires_grad_(_is_trainable(name))
        if p.requires_grad:
            names.append(name)
    if not any(n.startswith("transformer.") for n in names):
        raise ValueError(f"{type(visual).__name__} has no transformer.resblocks.*.attn / ln_*: MAFT fine-tunes a ViT "
                         "image tower (not a ResNet one)")
    return names


class MaftTrainee(nn.Module):
    """The CLIP being fine-tuned: a copy of ``clip`` with only :data:`TRAINABLE` (and
    ``ln_post``) of its image tower trainable; its text tower is frozen and unused.

    ``clip`` here is a genuine :class:`CLIP`, so the IP-CLIP encoder runs on it as on any
    CLIP. The engine's checkpoints name its parameters ``clip.visual.*``; a run's weights
    (:meth:`visual_state_dict`) are named as under ``clip.visual``.
    """

    def __init__(self, clip: CLIP) -> None:
        super().__init__()
        self.clip = copy.deepcopy(clip)
        self.clip.__dict__.pop("_reclip_fingerprint", None)  # the copy's weights will change
        self.clip.requires_grad_(False)
        self.trainable_names = mark_trainable(self.clip.visual)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {f"clip.visual.{n}": p for n, p in self.clip.visual.named_parameters() if n in self.trainable_names}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = {f"clip.visual.{n}" for n in self.trainable_names}
        if set(state) != expected:
            raise ValueError(f"trainable state does not fit MAFT's parameters: missing {sorted(expected - set(state))[:6]}"
                             f", unexpected {sorted(set(state) - expected)[:6]}")
        self.load_state_dict(state, strict=False)

    def visual_state_dict(self) -> dict[str, Tensor]:
        """The fine-tuned parameters named as under ``clip.visual`` (what a run stores), CPU copies."""
        return {n: p.detach().to("cpu", copy=True).contiguous()
                for n, p in self.clip.visual.named_parameters() if n in self.trainable_names}


class _FrozenSide:
    """What does not train: the frozen CLIP (self-distillation teacher), the seen classes'
    text embeddings and, for pseudo supervision, the rectifier."""

    def __init__(self, clip: CLIP, text: Tensor, *, teacher: Any = None, lookup: Tensor | None = None,
                 ignore_index: int = 255) -> None:
        self.clip = clip.eval()
        self.text = text  # (S, D) unit rows, the seen classes
        self.teacher = teacher  # reclip.distillation._Teacher of a rectifier, or None
        self.lookup = lookup  # class id -> seen index / ignore (pseudo labels)
        self.ignore_index = ignore_index

    def to(self, device: torch.device) -> None:
        if next(self.clip.parameters()).device != device:  # each process's own device (DDP)
            self.clip.to(device)
        self.text = self.text.to(device)
        if self.lookup is not None:
            self.lookup = self.lookup.to(device)

    @torch.no_grad()
    def pseudo_targets(self, images: Tensor, valid: Tensor) -> Tensor:
        """The rectifier's argmax on the crop, as seen-class indices (ignore: unseen, padding)."""
        _, logits = self.teacher(images)  # (B, C, H, W) on the crop
        targets = self.lookup[logits.argmax(1)]
        return targets.masked_fill(~valid, self.ignore_index)


def maft_step_loss(model: MaftTrainee, frozen: _FrozenSide, batch: dict[str, Any], *, start_layer: int,
                   threshold: float = 0.5, weight: float = SELF_DISTILLATION_WEIGHT) -> tuple[Tensor, dict[str, Any]]:
    """Mask-aware + weighted self-distillation loss of one batch: (loss, logged terms)."""
    images, valid, keep = batch["image"], batch["valid"], batch["proposal_keep"]
    frozen.to(images.device)
    if "target" in batch:
        targets = batch["target"]
    else:
        targets = frozen.pseudo_targets(images, valid)
    with torch.no_grad():
        proposals = batch["proposals"].float() / 255  # (B, M, H, W), 0 on the padding
        teacher_probs = class_probabilities(frozen.clip.encode_image(images), frozen.text)  # (B, S)
    embeddings = ip_clip_embeddings(model.clip, images, proposals, start_layer=start_layer, threshold=threshold)
    probs = class_probabilities(embeddings, frozen.text)  # (B, N, S)
    student_probs = class_probabilities(model.clip.encode_image(images), frozen.text)  # (B, S), the whole crop
    loss, terms = maft_loss(probs, proposals, targets, student_probs, teacher_probs, keep=keep,
                            valid=valid, ignore_index=frozen.ignore_index, weight=weight)
    return loss, {"loss": loss.detach(), **terms, "proposals": keep.sum(1).float().mean()}


def _split(vocabulary: Vocabulary, seen_classes: Any, unseen_classes: Any) -> ClassSplit | None:
    if seen_classes is None and unseen_classes is None:
        return None
    return class_split(vocabulary, seen=seen_classes, unseen=unseen_classes)


def finetune_maft(
    clip: CLIP,
    dataset: str | os.PathLike | Protocol,
    data_root: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    proposals: ProposalSource,
    proposals_name: str | None = None,
    max_proposals: int = 100,
    supervision: str = "labels",
    teacher_run: str | os.PathLike | None = None,
    seen_classes: str | os.PathLike | Sequence[str] | None = None,
    unseen_classes: str | os.PathLike | Sequence[str] | None = None,
    classes_file: str | os.PathLike | None = None,
    split: str = "train",
    start_layer: int | None = None,
    threshold: float = 0.5,
    templates: str = MAFT_TEMPLATES,
    max_steps: int = 1000,
    train_overrides: dict[str, Any] | None = None,
    base_short_side: int = MAFT_BASE_SHORT_SIDE,
    crop: int = MAFT_CROP,
    resume: bool = False,
    progress: bool = True,
    text_cache: Any = None,
    max_pixels: int | None = MAX_PIXELS,
) -> TrainResult:
    """Fine-tune CLIP's image tower with MAFT's losses; writes a run directory.

    Args:
        clip: the CLIP to fine-tune (left unchanged: a copy trains); also the frozen
            self-distillation teacher.
        dataset, data_root, split, classes_file: the training images (protocol, root,
            split) and the class list (default: the protocol's).
        proposals: the proposal source (:mod:`reclip.maft.proposals`: files, another
            method's prediction, a grid): ``proposals(image, image_id) -> (N, H, W)`` on each
            original image; the masks follow the crop's geometry (:class:`MaftTrainSet`).
            ``proposals_name`` is what the run records (default: the source's repr).
        max_proposals: proposals per crop (the first ones; MAFT: 100).
        supervision: "labels" (class masks from the ground truth, seen classes only, as
            published) or "pseudo" (from the argmax of the frozen rectifier ``teacher_run``,
            a ``reclip rectify`` run on the same CLIP; no ground truth is read).
        seen_classes, unseen_classes: the zero-shot split (one of them; a split file or
            names, see :mod:`reclip.class_split`); default: every class is seen.
        start_layer: the first IP-CLIP masked block (default :func:`default_start_layer`).
        threshold: patch coverage inside a proposal (IP-CLIP).
        templates: prompt templates of the class embeddings.
        max_steps: optimiser steps (MAFT: 1000).
        train_overrides: TrainConfig fields (batch_size default 16, seed, device, ...) and
            ``lr`` (AdamW, default 1e-5).
        base_short_side, crop: augmentation (default 480 / 480, see :data:`MAFT_CROP`).
        resume, progress, text_cache, max_pixels: as for the other training stages.
    """
    if supervision not in SUPERVISIONS:
        raise ValueError(f"supervision={supervision!r}; allowed: {list(SUPERVISIONS)}")
    if (supervision == "pseudo") != (teacher_run is not None):
        raise ValueError("supervision='pseudo' needs teacher_run (a `reclip rectify` run) and 'labels' takes none")
    if not callable(proposals):
        raise TypeError(f"proposals must be a proposal source (a callable), got {type(proposals).__name__}")
    protocol = dataset if isinstance(dataset, Protocol) else load_protocol(dataset)
    overrides = dict(train_overrides or {})
    unknown = sorted(set(overrides) - _TRAIN_FIELDS - {"lr"})
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; allowed: {sorted(_TRAIN_FIELDS | {'lr'})}")
    depth = len(clip.visual.transformer.resblocks) if hasattr(clip.visual, "transformer") else 0
    start_layer = default_start_layer(depth) if start_layer is None else start_layer
    images = SegmentationDataset(protocol, data_root, split, classes_file=classes_file, check_sizes=False,
                                 max_pixels=max_pixels)
    vocabulary = images.vocabulary
    zero_shot = _split(vocabulary, seen_classes, unseen_classes)
    seen = list(range(vocabulary.num_classes)) if zero_shot is None else list(zero_shot.seen)
    augment = {"base_short_side": base_short_side, "crop": crop}
    trainset = MaftTrainSet(images, proposals, labels=supervision == "labels", seen=seen,
                            seed=overrides.get("seed", 0), max_proposals=max_proposals, mean=clip.image_mean,
                            std=clip.image_std, **augment)
    queries = query_embeddings(clip, vocabulary, templates, cache_dir=text_cache)
    text = class_query_weights(queries)[seen]  # (S, D): the seen classes only
    teacher, teacher_id, lookup = None, None, None
    if supervision == "pseudo":
        teacher, teacher_id = _rectifier_teacher(clip, teacher_run, vocabulary, text_cache)
        lookup = seen_lookup(vocabulary.num_classes, seen, protocol.ignore_index)
    frozen = _FrozenSide(clip, text, teacher=teacher, lookup=lookup, ignore_index=protocol.ignore_index)

    batch_size = overrides.pop("batch_size", 16)
    optimizer = AdamWConfig(lr=overrides.pop("lr", 1e-5), weight_decay=1e-4, no_decay=("ln_",))
    train_config = TrainConfig(steps=max_steps, batch_size=batch_size, **overrides)
    source = proposals_name or repr(proposals)
    identity = {"method": "maft", "classes": vocabulary.to_lines(), "seen": seen, "supervision": supervision,
                "teacher": teacher_id, "proposals": source, "clip_fingerprint": weights_fingerprint(clip),
                "start_layer": start_layer, "threshold": threshold, "templates": templates,
                "max_proposals": max_proposals, "protocol": protocol.name, "split": split, "augment": augment}

    def loss(model: MaftTrainee, batch: dict[str, Any]):
        return maft_step_loss(model, frozen, batch, start_layer=start_layer, threshold=threshold)

    result = train(lambda: MaftTrainee(clip), loss, trainset, train_config, run_dir, optimizer=optimizer,
                   run_settings=identity, resume=resume, progress=progress)
    split_record = (zero_shot.to_dict() if zero_shot is not None
                    else {"seen": list(vocabulary.names), "unseen": []})
    save_maft_run(run_dir, result.model, {
        "method": "maft",
        "start_layer": start_layer,
        "threshold": threshold,
        "classes": vocabulary.to_lines(),
        "seen_classes": split_record["seen"],
        "unseen_classes": split_record["unseen"],
        "supervision": supervision,
        "teacher": teacher_id,
        "proposals": source,
        "max_proposals": max_proposals,
        "clip": getattr(clip, "spec", None),
        "clip_fingerprint": weights_fingerprint(clip),
        "templates": templates,
        "trainable": result.model.trainable_names,
        "train": dataclasses.asdict(train_config),
        "optimizer": describe(optimizer),
        "augment": augment,
        "protocol": protocol.name,
        "split": split,
        "train_images": len(trainset),
    })
    return result


def _rectifier_teacher(clip: CLIP, teacher_run: Any, vocabulary: Vocabulary, text_cache: Any):
    """The frozen rectifier of a ``reclip rectify`` run and what identifies it."""
    from reclip.distillation import _Teacher
    from reclip.rectification import rectifier_from_run

    run = load_run(teacher_run)
    rectifier = rectifier_from_run(run, clip, None, text_cache)  # its own class names (ReCLIP's prompt names)
    if len(run.config["classes"]) != vocabulary.num_classes:
        raise ValueError(f"the teacher {teacher_run} was trained for {len(run.config['classes'])} classes, this "
                         f"dataset's list has {vocabulary.num_classes}: train the teacher on the same dataset")
    rectifier.requires_grad_(False)
    digest = hashlib.sha256((run.run_dir / WEIGHTS_NAME).read_bytes()).hexdigest()[:16]
    return _Teacher(rectifier), {"run": str(teacher_run), "method": run.config["method"], "weights": digest}


def save_maft_run(run_dir: str | os.PathLike, model: MaftTrainee, config: dict[str, Any]) -> None:
    """RUN_DIR/config.json (``config``) and RUN_DIR/model.safetensors (the fine-tuned
    parameters named as under ``clip.visual``), atomically, on rank 0.

    The files :func:`reclip.train.save_run` writes, but the weights' names are the
    tower's, not the trainee's (``clip.visual.`` dropped), so that a run applies to any
    copy of ``clip.visual``.
    """
    if not is_rank0():
        return
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "config.json", dict(config))
    save_weights(model.visual_state_dict(), run_dir / WEIGHTS_NAME)


def maft_clip_from_run(run: RunFiles, clip: CLIP) -> CLIP:
    """A copy of ``clip`` with a MAFT run's fine-tuned image-tower parameters, in eval mode.

    Refuses another CLIP than the run's (weights fingerprint) and weights that do not
    name exactly the run's fine-tuned parameters of this tower.
    """
    saved = run.config
    if saved.get("method") != "maft":
        raise ValueError(f"{run.run_dir} is a {saved.get('method')!r} run, not a MAFT one (`reclip maft`)")
    if saved.get("clip_fingerprint") != weights_fingerprint(clip):
        raise ValueError(
            f"{run.run_dir} fine-tuned CLIP {saved.get('clip')!r} (fingerprint {saved.get('clip_fingerprint')}); the "
            f"loaded CLIP {getattr(clip, 'spec', None)!r} has fingerprint {weights_fingerprint(clip)}: pass the same "
            "--clip as for training")
    tuned = copy.deepcopy(clip)
    tuned.__dict__.pop("_reclip_fingerprint", None)
    own = dict(tuned.visual.named_parameters())
    state = run.state_dict
    bad = sorted(n for n in state if n not in own or own[n].shape != state[n].shape)
    if bad or set(state) != set(saved.get("trainable", state)):
        raise ValueError(f"{run.run_dir / WEIGHTS_NAME} does not fit this CLIP's image tower (unknown or misshapen "
                         f"{bad[:6]}); the file is damaged or from another run")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.to(own[name].dtype))
    return tuned.requires_grad_(False).eval()


def load_maft_clip(run_dir: str | os.PathLike, clip: CLIP) -> CLIP:
    """The fine-tuned CLIP of ``run_dir`` (see :func:`maft_clip_from_run`)."""
    return maft_clip_from_run(load_run(run_dir), clip)
