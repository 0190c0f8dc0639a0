"""Contrastive pre-training of a tiny CLIP on the toy world, on a CPU in minutes.

Radford et al. 2021 (CLIP), scaled down: our ``CLIP`` module (OpenAI names), our real
BPE tokenizer (49,408 tokens, context 77), symmetric InfoNCE with a learnable logit scale
(clamped at 100), AdamW with linear warm-up and cosine decay. Captioned photos are
rendered on the fly by :class:`~reclip.toy.world.ToyWorld` from a seeded generator, so a
run is a pure function of ``(config, seed)``.

Identical captions in a batch are positives of each other: each distinct caption is
encoded once (U <= B texts); image -> text is a cross-entropy over the U captions, text ->
image averages the log-probabilities of all images that carry it.

    metrics = pretrain_tiny_clip("tiny.pt", ToyConfig.default(), seed=0)
    path = get_or_train("~/.cache/reclip/toy", ToyConfig.default())  # cached by config hash
    clip = load_checkpoint(path)

The checkpoint is an OpenAI-format state dict (what ``reclip.clip.load.load_clip`` reads
like any released CLIP); vision and text heads are ``width // 64`` as OpenAI's, so the
architecture is recoverable from tensor shapes alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from reclip.clip.model import CLIP, weights_fingerprint
from reclip.clip.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE, tokenize
from reclip.data.transforms import CLIP_MEAN, CLIP_STD
from reclip.files import atomic_write_json
from reclip.toy.world import ToyWorld, WorldConfig

__all__ = [
    "ToyConfig",
    "build_clip",
    "contrastive_loss",
    "get_or_train",
    "images_to_tensor",
    "load_checkpoint",
    "pretrain_tiny_clip",
    "save_checkpoint",
    "zero_shot_accuracy",
]

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learnt temperature at 100


# CPU kernels split sums between threads, so their results depend on the thread count
# (measured: 1 and 2 threads give other weights after 5 steps). Pre-training always runs
# on this many threads, with deterministic algorithms: the same (config, seed) gives the
# same tiny CLIP on any machine of one kind, whatever its core count.
PRETRAIN_THREADS = 1
# Part of the cache key: checkpoints of an earlier recipe (any thread count) are not reused.
RECIPE = f"threads={PRETRAIN_THREADS},deterministic"


@dataclass(frozen=True)
class ToyConfig:
    """World, model and training sizes of one toy pre-training run (hashable, JSON-able).

    Model fields use OpenAI's ``CLIP.__init__`` meanings; heads are ``width // 64`` (at
    least 1), as OpenAI's loader infers them, so widths must be multiples of 64.
    """

    world: WorldConfig = field(default_factory=WorldConfig)
    embed_dim: int = 128
    vision_width: int = 128
    vision_layers: int = 4
    vision_patch_size: int = 8
    text_width: int = 128
    text_layers: int = 4
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.02  # cosine decays to this fraction of lr
    eval_images: int = 1000

    @classmethod
    def default(cls) -> ToyConfig:
        """The demo: 8 classes, 96 px, 8 px patches (12 x 12 grid), 38k pairs."""
        return cls()

    @classmethod
    def ci(cls) -> ToyConfig:
        """A much smaller run for tests (about 1.5 minutes on one core): 64 px, 8 x 8 grid, 4 classes.

        Without the space correlation of the default world (named objects centred,
        distractors peripheral, vignette): at this size it leaves the probability-threshold
        background too weak for the tests' baselines; the tests check learning, not bias.
        """
        world = WorldConfig(image_size=64, scene_size=64, num_classes=4, empty_prob=0.10,
                            photo_spread=1.0, distractor_min_offset=0.0, vignette=0.0)
        return cls(
            world=world, embed_dim=64, vision_width=64, vision_layers=3, text_width=64, text_layers=2,
            steps=400, batch_size=64, lr=2e-3, eval_images=400,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToyConfig:
        data = dict(data)
        world = {k: tuple(v) if isinstance(v, list) else v for k, v in data.pop("world").items()}
        return cls(world=WorldConfig(**world), **data)

    def key(self) -> str:
        """sha256 (16 hex) of the config JSON and the pre-training recipe: the cache key of its checkpoint."""
        values = self.to_dict()
        if values["world"]["classes"] == "objects":  # keys from before class sets existed stay valid
            del values["world"]["classes"]
        text = json.dumps({**values, "recipe": RECIPE}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def clip_kwargs(self) -> dict[str, Any]:
        """Arguments of ``CLIP(...)`` for this config."""
        return dict(
            embed_dim=self.embed_dim,
            image_resolution=self.world.image_size,
            vision_layers=self.vision_layers,
            vision_width=self.vision_width,
            vision_patch_size=self.vision_patch_size,
            context_length=CONTEXT_LENGTH,  # 77 like every CLIP: ReCLIP++'s Reference needs it
            vocab_size=VOCAB_SIZE,
            transformer_width=self.text_width,
            transformer_heads=max(self.text_width // 64, 1),
            transformer_layers=self.text_layers,
            # vision_heads None = width // 64, what loaders infer: the fingerprint (which
            # includes the config) then matches after load_clip.
        )


def build_clip(config: ToyConfig) -> CLIP:
    """A randomly initialised CLIP of the config's architecture (seed torch first)."""
    return CLIP(**config.clip_kwargs())


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> CLIP-normalised float32 (N, 3, H, W), as reclip's transforms."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class _CaptionTokens:
    """Tokenises captions once each (there are only ~85 x (K + 1) distinct ones)."""

    def __init__(self) -> None:
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            for c, row in zip(missing, tokenize(missing)):
                self._cache[c] = row
        tokens = torch.stack([self._cache[c] for c in captions])  # (U, 77)
        # The text tower is causal and read at EOT: positions after EOT cannot change
        # the embedding, so cut them (about 5x less text compute).
        last = int((tokens != 0).sum(dim=1).max())
        return tokens[:, :last]


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_index: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where identical captions are one text with several positive images.

    Args:
        image_emb: (B, D) unnormalised image embeddings.
        text_emb: (U, D) unnormalised embeddings of the U distinct captions of the batch.
        caption_index: (B,) long, which distinct caption each image carries.
        logit_scale: scalar, log of the temperature's inverse.

    Returns:
        scalar: (image -> text CE + text -> image mean positive log-likelihood) / 2.
    """
    img = F.normalize(image_emb, dim=-1)
    txt = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp() * img @ txt.t()  # (B, U)
    i2t = F.cross_entropy(logits, caption_index)
    positives = F.one_hot(caption_index, txt.shape[0]).float()  # (B, U)
    log_p = F.log_softmax(logits, dim=0)  # over images, per caption
    t2i = -((log_p * positives).sum(0) / positives.sum(0)).mean()
    return (i2t + t2i) / 2


def _lr_factor(step: int, config: ToyConfig) -> float:
    """Linear warm-up then cosine decay to ``min_lr_frac``."""
    warmup = max(int(config.warmup_frac * config.steps), 1)
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(config.steps - warmup, 1)
    return config.min_lr_frac + (1 - config.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))


def _param_groups(clip: CLIP, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on gains, biases, embeddings and the logit scale (as CLIP)."""
    decay, no_decay = [], []
    for name, p in clip.named_parameters():
        skip = p.ndim < 2 or "embedding" in name or "ln_" in name or name == "logit_scale"
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def zero_shot_accuracy(
    clip: CLIP,
    world: ToyWorld,
    num_images: int = 1000,
    seed: int = 12345,
    templates: str | Sequence[str] = "reclip85",
    batch_size: int = 250,
) -> float:
    """Top-1 image zero-shot accuracy over the K object classes on held-out captioned photos.

    The classifier is CLIP's prompt ensemble of ``templates`` (``reclip.text``); photos
    without an object are skipped. ``seed`` draws the photos: keep it apart from training
    seeds (training streams come from ``SeedSequence(seed).spawn``, never this seed itself).
    """
    from reclip.text import query_embeddings

    was_training = clip.training
    clip.eval()
    weights = query_embeddings(clip, list(world.class_names), templates=templates, cache_dir=False).weights
    rng = np.random.default_rng(seed)
    correct = total = 0
    while total < num_images:
        batch = world.captioned(batch_size, rng)
        keep = batch.labels > 0
        emb = F.normalize(clip.encode_image(images_to_tensor(batch.images[keep])).float(), dim=-1)
        pred = (emb @ weights.t()).argmax(dim=1).numpy() + 1
        take = min(int(keep.sum()), num_images - total)
        correct += int((pred[:take] == batch.labels[keep][:take]).sum())
        total += take
    clip.train(was_training)
    return correct / total


def save_checkpoint(clip: CLIP, path: str | os.PathLike) -> Path:
    """Write an OpenAI-format state dict atomically (``save_clip(..., format="openai")``)."""
    from reclip.clip.load import save_clip

    return save_clip(clip, path, format="openai")


def load_checkpoint(path: str | os.PathLike) -> CLIP:
    """Read a toy checkpoint with ``reclip.clip.load.load_clip`` (or, without it, from the
    state dict's shapes, OpenAI's way) in eval mode."""
    try:
        from reclip.clip.load import load_clip
    except ImportError:
        pass
    else:
        return load_clip(path).eval()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    n_vis = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    n_txt = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    vw, tw = sd["visual.conv1.weight"].shape[0], sd["ln_final.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    clip = CLIP(
        embed_dim=sd["text_projection"].shape[1], image_resolution=patch * grid, vision_layers=n_vis,
        vision_width=vw, vision_patch_size=patch, context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0], transformer_width=tw,
        transformer_heads=max(tw // 64, 1), transformer_layers=n_txt, vision_heads=max(vw // 64, 1),
    )
    clip.load_state_dict(sd, strict=True)
    return clip.eval()


def pretrain_tiny_clip(
    out_path: str | os.PathLike,
    config: ToyConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Pre-train a tiny CLIP from scratch on the toy world and save it to ``out_path``.

    Deterministic for a given (config, seed): it runs on :data:`PRETRAIN_THREADS` threads
    with deterministic algorithms whatever the caller's settings (restored afterwards).
    Also writes ``<out_path>.json`` with the config and the metrics.

    Returns:
        metrics: ``zero_shot_accuracy``, ``train_seconds``, ``pairs_seen``, ``final_loss``
        (mean of the last 20 steps), ``logit_scale``, ``fingerprint``, ``seed``, ``config_key``.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(PRETRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        return _pretrain(out_path, config or ToyConfig.default(), seed, progress)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def _pretrain(out_path: str | os.PathLike, config: ToyConfig, seed: int, progress: bool) -> dict[str, Any]:
    world = ToyWorld(config.world)
    torch.manual_seed(seed)
    data_seq, eval_seq = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(data_seq)
    clip = build_clip(config)
    clip.train()
    optimizer = torch.optim.AdamW(_param_groups(clip, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    tokens_of = _CaptionTokens()

    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="toy CLIP pre-training", disable=not progress, mininterval=2.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config)
        batch = world.captioned(config.batch_size, rng)
        distinct = list(dict.fromkeys(batch.captions))
        index = torch.tensor([distinct.index(c) for c in batch.captions])
        image_emb = clip.encode_image(images_to_tensor(batch.images))
        text_emb = clip.encode_text(tokens_of(distinct))
        loss = contrastive_loss(image_emb, text_emb, index, clip.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(loss.detach().item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", scale=f"{clip.logit_scale.exp().item():.1f}")
    train_seconds = time.perf_counter() - start

    clip.eval()
    accuracy = zero_shot_accuracy(clip, world, config.eval_images, seed=int(eval_seq.generate_state(1)[0]))
    save_checkpoint(clip, out_path)
    metrics = {
        "zero_shot_accuracy": accuracy,
        "train_seconds": train_seconds,
        "pairs_seen": config.steps * config.batch_size,
        "final_loss": float(np.mean(losses[-20:])),
        "logit_scale": clip.logit_scale.detach().exp().item(),
        "fingerprint": weights_fingerprint(clip, refresh=True),
        "seed": seed,
        "config_key": config.key(),
        "torch_threads": torch.get_num_threads(),
        "recipe": RECIPE,
    }
    atomic_write_json(f"{out_path}.json", {"config": config.to_dict(), "metrics": metrics})
    return metrics


def get_or_train(
    cache_dir: str | os.PathLike,
    config: ToyConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Path of the checkpoint of ``(config, seed)`` in ``cache_dir``, pre-training it if missing.

    The file name carries the config hash and the seed (``tinyclip-<key>-s<seed>.pt``);
    its metrics are beside it (``.pt.json``).
    """
    config = config or ToyConfig.default()
    path = Path(cache_dir).expanduser() / f"tinyclip-{config.key()}-s{seed}.pt"
    if not path.is_file():
        pretrain_tiny_clip(path, config, seed=seed, progress=progress)
    return path

