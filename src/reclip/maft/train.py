"""MAFT's mask-aware fine-tuning of CLIP's image tower, on the shared training engine.

    finetune_maft(clip, "voc20", "data/VOCdevkit/VOC2012", "runs/maft", proposals=source,
                  unseen_classes=["cat", "dog"])                          # as published
    finetune_maft(clip, "voc20", root, "runs/maft-u", proposals=source,
                  supervision="pseudo", teacher_run="runs/reclip")        # no label opened

What trains (Jiao et al. 2023; official code in METHODS.md s.5): a copy of CLIP whose
image tower's attention (``in_proj``, ``out_proj``) and LayerNorm (``ln_1``, ``ln_2``)
parameters of every block, and ``ln_post``, are trainable; everything else is frozen
(:func:`reclip.maft.segmentor.tuned_copy`). The model is the MAFT segmentor itself
(:class:`~reclip.maft.segmentor.MAFTSegmentor`), so training scores proposals exactly as
inference does. Each step, on a batch of augmented crops:

1. proposals (B, M, H, W) from the proposal source, made on each original image and
   carried through the crop's geometry (:class:`~reclip.maft.trainset.MaftTrainSet`);
2. class masks: the seen classes of the ground truth (``supervision="labels"``, as
   published), or the argmax pseudo labels of a frozen ReCLIP++ rectifier run on the
   same crop (``supervision="pseudo"``, new: no ground truth is read);
3. the IP-CLIP class scores of the proposals through the fine-tuned tower
   (``MAFTSegmentor.proposal_probabilities``), against the seen classes' text embeddings;
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

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from reclip.class_split import ClassSplit, class_split
from reclip.clip.model import CLIP, weights_fingerprint
from reclip.data.datasets import SegmentationDataset
from reclip.data.io import MAX_PIXELS
from reclip.data.protocol import Protocol, load_protocol
from reclip.files import atomic_write_json
from reclip.families.maft import TEMPLATES
from reclip.maft.ipclip import _check_start_layer, _check_threshold
from reclip.maft.losses import SELF_DISTILLATION_WEIGHT, maft_loss
from reclip.maft.proposals import ProposalSource, describe_source
from reclip.maft.segmentor import MAFTSegmentor, tuned_copy
from reclip.maft.trainset import MaftTrainSet, seen_lookup
from reclip.text import Vocabulary, max_over_synonyms, query_embeddings
from reclip.train import AdamWConfig, TrainConfig, TrainResult, describe, load_run, train
from reclip.train.checkpoint import CONFIG_NAME, WEIGHTS_NAME, save_weights
from reclip.train.distributed import is_rank0

__all__ = ["MAFT_BASE_SHORT_SIDE", "MAFT_CROP", "MAFT_STEPS", "SUPERVISIONS", "finetune_maft", "maft_step_loss",
           "save_maft_run", "visual_state_dict", "whole_image_probabilities"]

SUPERVISIONS = ("labels", "pseudo")
# Augmentation: the official crops 640 px windows of images rescaled to a short side of 320..1280 and feeds
# CLIP the crop resized to 480 x 480, i.e. a 480 window of an image of short side 240..960: base 480 x [0.5, 2].
MAFT_CROP = 480
MAFT_BASE_SHORT_SIDE = 480
MAFT_STEPS = 1000  # official SOLVER.MAX_ITER (batch 16, IMS_PER_BATCH)
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"steps"}


def whole_image_probabilities(model: MAFTSegmentor, clip: CLIP, images: Tensor) -> Tensor:
    """Class scores of ``clip``'s ordinary image embedding (the CLS path, no proposal) with
    ``model``'s classifier and rule (softmax of ``logit_scale`` x cosine over the queries,
    then each class's max over its synonyms): images (B, 3, H, W) -> (B, C)."""
    emb = clip.encode_image(images)  # (B, D)
    with torch.autocast(device_type=emb.device.type, enabled=False):  # float32 scores, as proposal_logits
        emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        probs = (model.logit_scale * emb @ model.text_weights.t()).softmax(dim=-1)  # (B, S)
    if probs.shape[-1] == model.num_classes:
        return probs
    return max_over_synonyms(probs, model.query_class, model.num_classes, dim=-1)


class _FrozenSide:
    """What does not train: the frozen CLIP (the self-distillation teacher) and, for pseudo
    supervision, the rectifier whose argmax gives the class masks."""

    def __init__(self, clip: CLIP, *, teacher: Any = None, lookup: Tensor | None = None,
                 ignore_index: int = 255) -> None:
        self.clip = clip.eval()
        self.teacher = teacher  # reclip.distillation._Teacher of a rectifier, or None
        self.lookup = lookup  # class id -> seen index / ignore (pseudo labels)
        self.ignore_index = ignore_index

    def to(self, device: torch.device) -> None:
        if next(self.clip.parameters()).device != device:  # each process's own device (DDP)
            self.clip.to(device)
        if self.lookup is not None:
            self.lookup = self.lookup.to(device)

    @torch.no_grad()
    def pseudo_targets(self, images: Tensor, valid: Tensor) -> Tensor:
        """The rectifier's argmax on the crop, as seen-class indices (ignore: unseen, padding)."""
        _, logits = self.teacher(images)  # (B, C, H, W) on the crop
        targets = self.lookup[logits.argmax(1)]
        return targets.masked_fill(~valid, self.ignore_index)


def maft_step_loss(model: MAFTSegmentor, frozen: _FrozenSide, batch: dict[str, Any], *,
                   weight: float = SELF_DISTILLATION_WEIGHT) -> tuple[Tensor, dict[str, Any]]:
    """Mask-aware + weighted self-distillation loss of one batch: (loss, logged terms).

    ``model``: the segmentor being fine-tuned (its CLIP a :func:`tuned_copy`, its classes
    the seen ones); ``batch``: collated :class:`MaftTrainSet` items."""
    images, valid, keep = batch["image"], batch["valid"], batch["proposal_keep"]
    frozen.to(images.device)
    if "target" in batch:
        targets = batch["target"]
    else:
        targets = frozen.pseudo_targets(images, valid)
    with torch.no_grad():
        proposals = batch["proposals"].float() / 255  # (B, M, H, W), 0 on the padding
        teacher_probs = whole_image_probabilities(model, frozen.clip, images)  # (B, S), the frozen CLIP
    probs = model.proposal_probabilities(images, proposals)  # (B, M, S): IP-CLIP, as at inference
    student_probs = whole_image_probabilities(model, model.clip, images)  # (B, S), the whole crop
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
    proposals: str | os.PathLike | ProposalSource,
    max_proposals: int = 100,
    supervision: str = "labels",
    teacher_run: str | os.PathLike | None = None,
    seen_classes: str | os.PathLike | Sequence[str] | None = None,
    unseen_classes: str | os.PathLike | Sequence[str] | None = None,
    classes_file: str | os.PathLike | None = None,
    split: str = "train",
    start_layer: int | None = None,
    threshold: float = 0.5,
    templates: str | None = None,
    max_steps: int = MAFT_STEPS,
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
        proposals: the proposal source: a description (a folder of files, ``from:METHOD``,
            ``from:RUN_DIR``, ``grid``; :func:`reclip.api.proposal_source`) or a callable
            ``(image, image_id) -> (N, H, W)`` (:mod:`reclip.maft.proposals`), applied to each
            ORIGINAL image; the masks follow the crop's geometry (:class:`MaftTrainSet`).
            The source runs where the training set's items are read: a source that
            segments with CLIP on CUDA needs ``workers`` 0 (the default). The run records
            it by :func:`~reclip.maft.proposals.describe_source` (a description as given; a
            function by ``module.qualname``), and a resume needs the same description.
        max_proposals: proposals per crop (the first ones; MAFT: 100).
        supervision: "labels" (class masks from the ground truth, seen classes only, as
            published) or "pseudo" (from the argmax of the frozen rectifier ``teacher_run``,
            a ``reclip rectify`` run on the same CLIP; no ground truth is read).
        seen_classes, unseen_classes: the zero-shot split (one of them; a split file or
            names, see :mod:`reclip.class_split`); default: every class is seen.
        start_layer: the first IP-CLIP masked block (default
            :func:`~reclip.maft.ipclip.default_start_layer`).
        threshold: patch coverage inside a proposal (IP-CLIP), in (0, 1].
        templates: prompt templates of the class embeddings (None: the ``maft`` method's).
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
    protocol = dataset if isinstance(dataset, Protocol) else load_protocol(dataset)
    overrides = dict(train_overrides or {})
    unknown = sorted(set(overrides) - _TRAIN_FIELDS - {"lr"})
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; allowed: {sorted(_TRAIN_FIELDS | {'lr'})}")
    if not hasattr(clip.visual, "transformer"):
        raise ValueError(f"MAFT fine-tunes a ViT image tower; this CLIP's is a {type(clip.visual).__name__}")
    start_layer = _check_start_layer(start_layer, len(clip.visual.transformer.resblocks))
    threshold = _check_threshold(threshold)
    images = SegmentationDataset(protocol, data_root, split, classes_file=classes_file, check_sizes=False,
                                 max_pixels=max_pixels)
    vocabulary = images.vocabulary
    zero_shot = _split(vocabulary, seen_classes, unseen_classes)
    seen = list(range(vocabulary.num_classes)) if zero_shot is None else list(zero_shot.seen)
    augment = {"base_short_side": base_short_side, "crop": crop}
    source = proposals
    if isinstance(proposals, (str, os.PathLike)):
        from reclip.api import proposal_source

        source = proposal_source(proposals, clip, vocabulary, protocol, background=protocol.background,
                                 text_cache=text_cache)
    trainset = MaftTrainSet(images, source, labels=supervision == "labels", seen=seen,
                            seed=overrides.get("seed", 0), max_proposals=max_proposals, mean=clip.image_mean,
                            std=clip.image_std, **augment)
    templates = templates or TEMPLATES
    lines = vocabulary.to_lines()  # the classifier holds the seen classes only
    seen_vocabulary = Vocabulary.from_names([lines[c] for c in seen], shared_names=vocabulary.shared_names)
    queries = query_embeddings(clip, seen_vocabulary, templates, cache_dir=text_cache)
    teacher, teacher_id, lookup = None, None, None
    if supervision == "pseudo":
        teacher, teacher_id = _rectifier_teacher(clip, teacher_run, vocabulary, text_cache)
        lookup = seen_lookup(vocabulary.num_classes, seen, protocol.ignore_index)
    frozen = _FrozenSide(clip, teacher=teacher, lookup=lookup, ignore_index=protocol.ignore_index)

    batch_size = overrides.pop("batch_size", 16)
    optimizer = AdamWConfig(lr=overrides.pop("lr", 1e-5), weight_decay=1e-4, no_decay=("ln_",))
    train_config = TrainConfig(steps=max_steps, batch_size=batch_size, **overrides)
    source_name = describe_source(proposals)  # the same in every process: the run can be resumed
    identity = {"method": "maft", "classes": vocabulary.to_lines(), "seen": seen, "supervision": supervision,
                "teacher": teacher_id, "proposals": source_name, "clip_fingerprint": weights_fingerprint(clip),
                "start_layer": start_layer, "threshold": threshold, "templates": templates,
                "max_proposals": max_proposals, "protocol": protocol.name, "split": split, "augment": augment}

    def build() -> MAFTSegmentor:  # a fresh copy of CLIP, its MAFT parameters trainable
        return MAFTSegmentor(tuned_copy(clip), queries, start_layer=start_layer, threshold=threshold)

    def loss(model: MAFTSegmentor, batch: dict[str, Any]):
        return maft_step_loss(model, frozen, batch)

    result = train(build, loss, trainset, train_config, run_dir, optimizer=optimizer,
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
        "proposals": source_name,
        "max_proposals": max_proposals,
        "clip": getattr(clip, "spec", None),
        "clip_fingerprint": weights_fingerprint(clip),
        "templates": templates,
        "trainable": sorted(visual_state_dict(result.model)),
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


def visual_state_dict(model: MAFTSegmentor) -> dict[str, Tensor]:
    """The fine-tuned parameters named as under ``clip.visual`` (what a run stores), CPU copies."""
    prefix = "clip.visual."
    return {name[len(prefix):]: value.detach().to("cpu", copy=True).contiguous()
            for name, value in model.trainable_state_dict().items()}


def save_maft_run(run_dir: str | os.PathLike, model: MAFTSegmentor, config: dict[str, Any]) -> None:
    """RUN_DIR/config.json (``config``) and RUN_DIR/model.safetensors (the fine-tuned
    parameters named as under ``clip.visual``), atomically, on rank 0.

    The files :func:`reclip.train.save_run` writes, with the weights' names relative to
    the image tower (``clip.visual.`` dropped), so that a run applies to any copy of
    ``clip.visual``; :func:`reclip.families.maft.from_run` reads it (``--method maft
    --checkpoint RUN_DIR``). The one writer of MAFT runs: ``reclip maft`` and the family's
    ``write_run`` (the minimal config: method, start_layer, threshold, classes, ...).
    """
    if not is_rank0():
        return
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / CONFIG_NAME, dict(config))
    save_weights(visual_state_dict(model), run_dir / WEIGHTS_NAME)
