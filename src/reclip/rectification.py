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
import os
from typing import Any

import torch

from reclip.clip.model import CLIP, weights_fingerprint
from reclip.data.augment import UnlabeledTrainSet
from reclip.data.datasets import SegmentationDataset
from reclip.data.protocol import Protocol, load_protocol
from reclip.heads.rectify import PRESETS, Rectifier, RectifierConfig, rectification_loss
from reclip.hypotheses import load_hypotheses
from reclip.text import Vocabulary, query_embeddings
from reclip.train import TrainConfig, TrainResult, load_run, save_run, train

# The templates of W_q: ReCLIP/ReCLIP++ use the 85 (METHODS.md section 1).
QUERY_TEMPLATES = "reclip85"


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
    base_short_side: int | None = None,
    crop: int | None = None,
    resume: bool = False,
    progress: bool = True,
    text_cache: Any = None,
) -> TrainResult:
    """Train the rectifier of ``method`` ("reclip++" or "reclip") on unlabelled images.

    Args:
        hypotheses: the file of ``reclip hypotheses`` for the same CLIP and class list.
        config: rectifier settings (default: the method's preset; ablations are fields).
        max_steps: stop after this many steps (default: the official epochs).
        train_overrides: TrainConfig fields replacing the preset's (batch_size, lr, ...).
        base_short_side, crop: augmentation scale and crop (default: the dataset's preset).
        resume: continue an interrupted run in ``run_dir`` exactly.
    """
    protocol = dataset if isinstance(dataset, Protocol) else load_protocol(dataset)
    images = SegmentationDataset(protocol, data_root, split, classes_file=classes_file, check_sizes=False)
    vocabulary = images.vocabulary
    config = config or PRESETS[method]
    preset = protocol.rectify  # the protocol YAML's `rectify:` section
    hyp = load_hypotheses(hypotheses, vocabulary=vocabulary, clip=clip)
    trainset = UnlabeledTrainSet(images, hyp, vocabulary.num_classes,
                                 base_short_side=base_short_side or preset.base_short_side,
                                 crop=crop or preset.crop, seed=(train_overrides or {}).get("seed", 0),
                                 mean=clip.image_mean, std=clip.image_std)
    spe = max(1, len(trainset) // preset.batch_size)
    settings = {
        "steps": max_steps or preset.epochs * spe,
        "batch_size": preset.batch_size,
        "lr": preset.lr,
        "poly_horizon": preset.poly_epochs * spe,
        **(train_overrides or {}),
    }
    train_config = TrainConfig(**settings)
    queries = query_embeddings(clip, vocabulary, QUERY_TEMPLATES, cache_dir=text_cache)
    model = Rectifier(clip, queries, vocabulary.names, config)
    result = train(model, _loss, trainset, train_config, run_dir, resume=resume, progress=progress)
    save_run(run_dir, {
        "method": method,
        "rectifier": config.to_dict(),
        "train": dataclasses.asdict(train_config),
        "augment": {"base_short_side": base_short_side or preset.base_short_side, "crop": crop or preset.crop},
        "preset": dataclasses.asdict(preset),
        "protocol": protocol.name,
        "split": split,
        "hypotheses": str(hypotheses),
        "clip": getattr(clip, "spec", None),
        "clip_fingerprint": weights_fingerprint(clip),
        "classes": vocabulary.to_lines(),
        "query_templates": QUERY_TEMPLATES,
        "train_images": len(trainset),
        "skipped_images": dict(trainset.skipped),
    }, model)
    return result


def _loss(model: Rectifier, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Paper eq. 7 on the Gumbel masks of the decoder output, over each image's hypotheses."""
    outputs = model.forward_train(batch["image"])
    loss = rectification_loss(model, outputs, batch["hypotheses"])
    return loss, {"loss": loss.detach()}


def load_rectifier(run_dir: str | os.PathLike, clip: CLIP, vocabulary: Vocabulary | None = None,
                   text_cache: Any = None) -> Rectifier:
    """The trained rectifier of ``run_dir`` on ``clip``, in eval mode (a segmentor).

    Refuses another CLIP (weights fingerprint) or another class list than the run's,
    naming both; ``vocabulary`` None means the run's own.
    """
    run = load_run(run_dir)
    saved = run.config
    if saved.get("clip_fingerprint") != weights_fingerprint(clip):
        raise ValueError(
            f"{run_dir} was trained on CLIP {saved.get('clip')!r} (fingerprint {saved.get('clip_fingerprint')}); "
            f"the loaded CLIP {getattr(clip, 'spec', None)!r} has fingerprint {weights_fingerprint(clip)}: "
            "pass the same --clip as for training"
        )
    trained = Vocabulary.from_names(saved["classes"])
    if vocabulary is not None and vocabulary != trained:
        raise ValueError(
            f"{run_dir} was trained for the classes {list(trained.names)}, not {list(vocabulary.names)}: "
            "a rectifier's Reference prompt and decoder are per class; train one for this class list"
        )
    queries = query_embeddings(clip, trained, saved.get("query_templates", QUERY_TEMPLATES), cache_dir=text_cache)
    model = Rectifier(clip, queries, trained.names, RectifierConfig.from_dict(saved["rectifier"]))
    load_run(run_dir, model)
    return model.to(next(clip.parameters()).device).eval()
