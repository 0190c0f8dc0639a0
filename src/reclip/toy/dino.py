"""DINO self-distillation of a tiny ViT on the toy world, on a CPU in minutes (ProxyCLIP's proxy).

Caron et al. 2021 (DINO), scaled down; facts from facebookresearch/dino @ 7c446df:

- ``main_dino.py`` ``train_dino`` / ``train_one_epoch``: a student and a teacher of the same
  architecture (backbone + DINO head), the teacher starts as the student's copy and is
  never trained by gradients: after every step it becomes the EMA of the student
  (momentum from ``momentum_teacher`` 0.996 to 1 on a cosine schedule); the teacher sees the
  two global crops, the student every crop; AdamW, lr linear warm-up then cosine decay,
  weight decay cosine from 0.04 to 0.4 (weights only: no decay on biases and norms,
  ``utils.get_params_groups``), per-parameter gradient-norm clipping at 3.0
  (``utils.clip_gradients``), the head's last layer frozen during the first epoch
  (``cancel_gradients_last_layer``);
- ``main_dino.py`` ``DINOLoss``: cross-entropy between the teacher's centred, sharpened
  softmax (temperature warmed up linearly from 0.04 to ``teacher_temp``) and the student's
  softmax at 0.1, over every (teacher global crop, student crop) pair of different views,
  averaged; the centre is the EMA (momentum 0.9) of the teacher's batch-mean output,
  updated after the loss;
- ``vision_transformer.py`` ``DINOHead``: MLP of 3 linear layers (GELU), L2 normalisation
  of the bottleneck, a weight-normalised bias-free last layer to K outputs with its norm
  fixed to 1 (``norm_last_layer=True``); ``VisionTransformer`` returns the CLS token after
  the final norm, ``MultiCropWrapper`` runs the backbone once per crop resolution.

Scaled to the toy world: a ViT of patch 8 on 96 px images (12 x 12 grid, as the tiny
CLIP), width 64, depth 4, one head of width 64 (every official DINO ViT has heads of 64,
and ``load_dino`` infers heads = width / 64 from the file, so the saved file runs with
the heads it was trained with), a small head (hidden 256, bottleneck 64, K = 1024), 4
local crops, a lower teacher momentum and the default teacher temperature 0.04 (see
:class:`ToyDinoConfig`); one process in float32, and no stochastic depth in the student
(official ``drop_path_rate`` 0.1: ``DinoViT`` has none, and a 200-step run does not overfit). Images are rendered on the fly by
:class:`~reclip.toy.world.ToyWorld` (no labels, no captions read), so a run is a pure
function of ``(world config, config, seed)``.

What it buys (experiments/toy_proxyclip.py, on the demo's scenes and tiny CLIP): little.
A randomly initialised ViT of the same architecture is already a fair proxy there
(likely because its patch tokens are random projections of the patches' pixels, and the
toy world's objects are flat saturated colours on muted backgrounds). The default 200-step
teacher is no better than its random init (22.91 +/- 0.45 against 22.82 +/- 0.19 mIoU,
seeds 0-2); 600 steps give 23.40 +/- 0.32 (figures in ``toy_proxy``'s docstring).

    path = get_or_train_dino(cache_dir, WorldConfig(), ToyDinoConfig(), seed=0)
    dino = load_dino(path)  # the teacher backbone, official DINO key layout
    ProxyAttention(proxy=str(path))
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from reclip.backbones.dino.model import DinoConfig, DinoViT
from reclip.files import atomic_write, atomic_write_json
from reclip.toy.multicrop import MultiCropConfig, multi_crop
from reclip.toy.pretrain import PRETRAIN_THREADS
from reclip.toy.world import ToyWorld, WorldConfig

__all__ = [
    "DinoHead",
    "DinoLoss",
    "DinoTrainer",
    "ToyDinoConfig",
    "build_backbone",
    "cosine_schedule",
    "ema_update",
    "get_or_train_dino",
    "pretrain_tiny_dino",
    "toy_proxy",
    "train_dino",
]

HEAD_WIDTH = 64  # every official DINO ViT (384 / 6, 768 / 12); what load_dino infers heads from
# Part of the cache key: a change of the recipe (threads, algorithms) never reuses old files.
RECIPE = f"dino-v1,threads={PRETRAIN_THREADS},deterministic"


@dataclass(frozen=True)
class ToyDinoConfig:
    """Model and training sizes of one toy DINO run (hashable, JSON-able).

    Attributes:
        width, depth, patch_size: the ViT (heads = width / 64, MLP 4 x width).
        out_dim, hidden_dim, bottleneck_dim: the DINO head (official 65536, 2048, 256).
        steps, batch_size: images per step, each giving 2 global + ``crops.local_crops`` crops.
            200 steps of 32 take ~2.5 minutes on one thread of a busy 2-core CPU (load ~4),
            ~3.7 minutes with another run beside it.
        lr: peak lr (official 0.0005 x batch / 256 for 100 epochs of ImageNet; a 200-step
            run needs a larger one; 5e-4 gave the same mIoU), ``min_lr`` at the end;
            ``warmup_frac`` of the steps linear warm-up (official 10 of 100 epochs).
        weight_decay, weight_decay_end: cosine schedule of AdamW's decay (official 0.04 -> 0.4).
        momentum_teacher: start of the teacher's EMA momentum, cosine to 1. Official 0.996
            over ~500k steps; over a few hundred steps 0.996 leaves the teacher mostly its
            random initialisation (0.996^200 = 0.45), so the toy run starts at 0.99 (0.996 gave
            23.2 mIoU against 23.4, seed 0).
        teacher_temp, warmup_teacher_temp, warmup_teacher_temp_frac: the teacher's
            temperature, linear from ``warmup_teacher_temp`` to ``teacher_temp`` over this
            share of the run, then constant; ``student_temp`` 0.1. 0.04 throughout (the
            official default, ``main_dino.py`` ``--teacher_temp``: "starting with the default
            value of 0.04"): the ViT-S/16 recipe's warm-up to 0.07 (over 30 of 100 epochs)
            let the 200-step toy run's targets go nearly uniform (final loss 6.89 against
            log 1024 = 6.93; 6.67 at 0.04, teacher entropy 6.38).
        center_momentum: 0.9 as official.
        clip_grad: per-parameter gradient-norm clip (official 3.0; 0 = off).
        freeze_last_layer_frac: share of the run with the head's last layer frozen (official 1 of 100 epochs).
        images: which toy-world images are rendered: "photos" (the captioned photos the tiny
            CLIP was pre-trained on, object-centric like ImageNet; captions dropped) or
            "scenes" (the segmentation scenes' distribution, labels dropped; 23.4 mIoU too,
            seed 0, but its targets nearly uniform: teacher entropy 6.72 of 6.93).
        crops: the multi-crop augmentation.
    """

    width: int = 64
    depth: int = 4
    patch_size: int = 8
    out_dim: int = 1024
    hidden_dim: int = 256
    bottleneck_dim: int = 64
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_frac: float = 0.1
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.99
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_frac: float = 0.3
    student_temp: float = 0.1
    center_momentum: float = 0.9
    clip_grad: float = 3.0
    freeze_last_layer_frac: float = 0.01
    images: str = "photos"
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)

    def __post_init__(self) -> None:
        if self.width % HEAD_WIDTH:
            raise ValueError(f"ToyDinoConfig.width={self.width}: must be a multiple of {HEAD_WIDTH} (heads of 64, "
                             "what load_dino infers from the saved file)")
        if self.images not in ("photos", "scenes"):
            raise ValueError(f"ToyDinoConfig.images={self.images!r}: expected 'photos' or 'scenes'")
        if self.crops.global_size % self.patch_size or self.crops.local_size % self.patch_size:
            raise ValueError(f"crop sizes {self.crops.global_size} / {self.crops.local_size} must be multiples of the "
                             f"patch size {self.patch_size}")

    @classmethod
    def tiny(cls) -> ToyDinoConfig:
        """A few-second run for tests: width 64, depth 1, 64 px world crops."""
        crops = MultiCropConfig(global_size=64, local_size=32, local_crops=2)
        return cls(depth=1, out_dim=64, hidden_dim=32, bottleneck_dim=16, steps=3, batch_size=4, crops=crops)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToyDinoConfig:
        """Inverse of :meth:`to_dict` (JSON lists back to tuples)."""
        data = dict(data)
        crops = {k: tuple(v) if isinstance(v, list) else v for k, v in data.pop("crops").items()}
        return cls(crops=MultiCropConfig(**crops), **data)

    def dino_config(self, image_size: int) -> DinoConfig:
        """The backbone: DINO v1 layout, positional grid of the world's images."""
        return DinoConfig("dino", self.patch_size, self.width, self.depth, self.width // HEAD_WIDTH,
                          4 * self.width, image_size // self.patch_size)


def cache_key(world: WorldConfig, config: ToyDinoConfig) -> str:
    """sha256 (16 hex) of the world, the config and the recipe: the cache key of a checkpoint."""
    text = json.dumps({"world": dataclasses.asdict(world), "dino": config.to_dict(), "recipe": RECIPE},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- model ------------------------------------------------------------------------------


def _trunc_normal_(tensor: Tensor, std: float = 0.02) -> None:
    # Truncated at +-2 std. DINO's utils.trunc_normal_(std=.02) passes timm's absolute bounds
    # +-2 (~+-100 std, in effect untruncated); the toy DINO keeps +-2 std, the recipe its
    # cached models and measured figures were made with.
    nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def build_backbone(config: ToyDinoConfig, image_size: int) -> DinoViT:
    """A DINO v1 ViT initialised as ``VisionTransformer.__init__`` does (seed torch first):
    pos_embed and cls_token truncated normal 0.02, linear weights truncated normal 0.02 with
    zero biases, LayerNorms 1 / 0, the patch conv torch's default (truncated at +-2 std,
    see :func:`_trunc_normal_`)."""
    model = DinoViT(config.dino_config(image_size))
    _trunc_normal_(model.pos_embed)
    _trunc_normal_(model.cls_token)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            _trunc_normal_(module.weight)
            nn.init.zeros_(module.bias)
    return model


class DinoHead(nn.Module):
    """DINO's projection head: (B, D) -> (B, K) logits (``vision_transformer.py`` ``DINOHead``,
    ``use_bn=False``, ``nlayers=3``, ``norm_last_layer=True``).

    The last layer is weight-normalised per output unit (``nn.utils.weight_norm``, dim 0)
    with its norm fixed to 1, i.e. a linear map by the row-normalised ``last_direction``.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                _trunc_normal_(module.weight)
                nn.init.zeros_(module.bias)
        # Created after the official self.apply(_init_weights): nn.Linear's default init.
        self.last_direction = nn.Parameter(nn.Linear(bottleneck_dim, out_dim, bias=False).weight.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # (B, bottleneck)
        return x @ F.normalize(self.last_direction, dim=1).t()  # (B, K); weight_g = 1


class Student(nn.Module):
    """Backbone + head, run once per crop resolution (``MultiCropWrapper``): crops -> (sum of N_i, K)."""

    def __init__(self, backbone: DinoViT, head: DinoHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[Tensor]) -> Tensor:
        cls_tokens, start = [], 0
        sizes = [c.shape[-1] for c in crops]
        while start < len(crops):  # consecutive crops of one size share a backbone pass
            end = start
            while end < len(crops) and sizes[end] == sizes[start]:
                end += 1
            cls_tokens.append(self.backbone(torch.cat(crops[start:end]))[:, 0])  # (n, D) CLS after norm
            start = end
        return self.head(torch.cat(cls_tokens))


# -- loss and schedules -------------------------------------------------------------------


class DinoLoss(nn.Module):
    """``DINOLoss``: teacher (2 global crops) -> student (all crops), centring + sharpening."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: Tensor, teacher_out: Tensor, crops: int, teacher_temp: float) -> Tensor:
        """student_out (crops * B, K), teacher_out (2 * B, K), crop-major; updates the centre."""
        student = (student_out / self.student_temp).chunk(crops)
        teacher_p = F.softmax((teacher_out - self.center) / teacher_temp, dim=-1).detach()  # (2B, K)
        # Collapse diagnostics: entropy of the teacher's targets (log K = uniform collapse,
        # 0 = one-hot), and of their batch mean (low = every image gets the same target).
        self.last_entropy = float(-(teacher_p * teacher_p.clamp_min(1e-12).log()).sum(-1).mean())
        mean_p = teacher_p.mean(0)
        self.last_mean_entropy = float(-(mean_p * mean_p.clamp_min(1e-12).log()).sum())
        teacher = teacher_p.chunk(2)
        total, terms = student_out.new_zeros(()), 0
        for iq, q in enumerate(teacher):
            for v, s in enumerate(student):
                if v == iq:  # the same view: skipped
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher_out)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        batch_center = teacher_out.mean(dim=0, keepdim=True)  # one process: sum / len
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


def cosine_schedule(base: float, final: float, steps: int, warmup_steps: int = 0, start_warmup: float = 0.0) -> np.ndarray:
    """``utils.cosine_scheduler`` per step: linear warm-up from ``start_warmup``, then cosine to ``final``."""
    warmup = np.linspace(start_warmup, base, warmup_steps) if warmup_steps > 0 else np.array([])
    t = np.arange(steps - warmup_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    return np.concatenate((warmup, cosine))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    for p_t, p_s in zip(teacher.parameters(), student.parameters(), strict=True):
        p_t.mul_(momentum).add_(p_s.detach() * (1 - momentum))


def _param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """``utils.get_params_groups``: no weight decay on biases and 1-d parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class DinoTrainer:
    """Student, teacher, loss, optimiser and schedules of one run; :meth:`step` does one iteration."""

    def __init__(self, config: ToyDinoConfig, image_size: int) -> None:
        c = config
        self.config = c
        self.student = Student(build_backbone(c, image_size), DinoHead(c.width, c.out_dim, c.hidden_dim,
                                                                      c.bottleneck_dim))
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.loss = DinoLoss(c.out_dim, c.student_temp, c.center_momentum)
        self.optimizer = torch.optim.AdamW(_param_groups(self.student))  # lr, wd set per step
        warmup = int(c.warmup_frac * c.steps)
        self.lr = cosine_schedule(c.lr, c.min_lr, c.steps, warmup)
        self.wd = cosine_schedule(c.weight_decay, c.weight_decay_end, c.steps)
        self.momentum = cosine_schedule(c.momentum_teacher, 1.0, c.steps)
        temp_steps = int(c.warmup_teacher_temp_frac * c.steps)
        self.teacher_temp = np.concatenate((np.linspace(c.warmup_teacher_temp, c.teacher_temp, temp_steps),
                                            np.full(c.steps - temp_steps, c.teacher_temp)))
        self.freeze_last_layer = int(round(c.freeze_last_layer_frac * c.steps))

    def step(self, crops: list[Tensor], it: int) -> float:
        """One iteration on ``crops`` ([global 1, global 2, locals...], each (B, 3, s, s)); returns the loss."""
        self.optimizer.param_groups[0]["weight_decay"] = float(self.wd[it])
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr[it])
        self.student.train()
        with torch.no_grad():
            teacher_out = self.teacher(crops[:2])  # (2B, K)
        student_out = self.student(crops)  # (crops * B, K)
        loss = self.loss(student_out, teacher_out, len(crops), float(self.teacher_temp[it]))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DINO loss is {loss.item()} at step {it}: lower ToyDinoConfig.lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip_grad:
            for p in self.student.parameters():  # utils.clip_gradients: each parameter on its own
                if p.grad is not None:
                    norm = p.grad.norm(2)
                    p.grad.mul_(torch.clamp(self.config.clip_grad / (norm + 1e-6), max=1.0))
        if it < self.freeze_last_layer:
            self.student.head.last_direction.grad = None
        self.optimizer.step()
        ema_update(self.teacher, self.student, float(self.momentum[it]))
        return loss.item()


# -- the run ------------------------------------------------------------------------------


def _render(world: ToyWorld, config: ToyDinoConfig, rng: np.random.Generator) -> Tensor:
    """(B, H, W, 3) uint8 images of the world, labels and captions dropped."""
    if config.images == "photos":
        return torch.from_numpy(world.captioned(config.batch_size, rng).images)
    return torch.from_numpy(world.scenes(config.batch_size, rng, size=world.config.image_size).images)


def train_dino(world_config: WorldConfig, config: ToyDinoConfig, seed: int = 0,
               progress: bool = True) -> tuple[DinoViT, dict[str, Any]]:
    """The teacher backbone (eval mode) after ``config.steps`` DINO steps, and the run's record.

    Deterministic for a given ``(world_config, config, seed)``: it runs on
    :data:`~reclip.toy.pretrain.PRETRAIN_THREADS` threads with deterministic algorithms
    (the caller's settings are restored afterwards).
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(PRETRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(world_config, config, seed, progress)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def _train(world_config: WorldConfig, config: ToyDinoConfig, seed: int, progress: bool) -> tuple[DinoViT, dict]:
    world = ToyWorld(world_config)
    torch.manual_seed(seed)
    image_seq, crop_seq = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(image_seq)
    g = torch.Generator().manual_seed(int(crop_seq.generate_state(1)[0]))
    trainer = DinoTrainer(config, world_config.image_size)
    losses: list[float] = []
    entropy: list[tuple[float, float]] = []
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="toy DINO pre-training", disable=not progress, mininterval=2.0)
    for it in bar:
        crops = multi_crop(_render(world, config, rng), config.crops, g)
        losses.append(trainer.step(crops, it))
        entropy.append((trainer.loss.last_entropy, trainer.loss.last_mean_entropy))
        if it % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", entropy=f"{entropy[-1][0]:.2f}")
    seconds = time.perf_counter() - start
    teacher = trainer.teacher.backbone.eval()
    record = {
        "seed": seed, "config_key": cache_key(world_config, config), "recipe": RECIPE,
        "train_seconds": seconds, "images_seen": config.steps * config.batch_size,
        "first_loss": losses[0], "final_loss": float(np.mean(losses[-20:])), "losses": losses,
        # The teacher's targets over the last 20 steps (nats; log out_dim is uniform): their mean
        # entropy (near log K: collapsed to uniform) and the entropy of their batch mean (near 0:
        # collapsed to one dimension).
        "teacher_entropy": float(np.mean([e for e, _ in entropy[-20:]])),
        "teacher_mean_entropy": float(np.mean([m for _, m in entropy[-20:]])),
        "log_out_dim": float(np.log(config.out_dim)),
        "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
    }
    return teacher, record


def pretrain_tiny_dino(out_path: str | os.PathLike, world_config: WorldConfig | None = None,
                       config: ToyDinoConfig | None = None, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Pre-train, then write ONLY the teacher backbone to ``out_path`` (official DINO key
    layout: ``load_dino(out_path)`` reads it strictly) and ``<out_path>.json`` (world,
    config, seed, losses, seconds). Returns the record."""
    world_config = world_config or WorldConfig()
    config = config or ToyDinoConfig()
    teacher, record = train_dino(world_config, config, seed, progress)
    state = {k: v.detach().clone().contiguous() for k, v in teacher.state_dict().items()}
    atomic_write(out_path, lambda tmp: torch.save(state, tmp))
    atomic_write_json(f"{out_path}.json", {"world": dataclasses.asdict(world_config), "config": config.to_dict(),
                                           "record": record})
    return record


def get_or_train_dino(cache_dir: str | os.PathLike, world_config: WorldConfig | None = None,
                      config: ToyDinoConfig | None = None, seed: int = 0, progress: bool = True) -> Path:
    """Path of the teacher of ``(world_config, config, seed)`` in ``cache_dir``
    (``tinydino-<key>-s<seed>.pth``), pre-training it if missing."""
    world_config = world_config or WorldConfig()
    config = config or ToyDinoConfig()
    path = Path(cache_dir).expanduser() / f"tinydino-{cache_key(world_config, config)}-s{seed}.pth"
    if not path.is_file():
        pretrain_tiny_dino(path, world_config, config, seed, progress)
    return path


def toy_proxy(cache_dir: str | os.PathLike, world_config: WorldConfig | None = None, seed: int = 0,
              progress: bool = True) -> Path:
    """The demo's ProxyCLIP proxy: the default toy DINO of the demo's world (trained once, then
    reused); pass ``str(path)`` as ``ProxyAttention(proxy=...)`` / ``--proxy``.

    Measured (2026-11-29, experiments/toy_proxyclip.py; the demo's 300 val scenes, tiny CLIP
    and settings; DINO seeds 0-2, mean +/- SD): ProxyCLIP 22.91 +/- 0.45 mIoU with this
    proxy, 22.82 +/- 0.19 with the same ViT at its random initialisation (maskclip 8.91,
    maskclip-nores 19.75, naclip 18.35). The 200 steps (1.5 to 3.7 minutes on one thread of
    the shared 2-core CPU, load 2 to 4.7) do not get DINO past its early phase: the
    loss rises from ~5.0 to ~6.7 (log K = 6.93), and the teacher's CLS token is a worse
    photo-class 20-NN feature than the random ViT's (22.7 +/- 2.1% against 31.9 +/- 3.4%,
    chance ~17%). ProxyCLIP's gain over the other rows comes from its attention on a
    pixel-like proxy, not from what DINO learnt. 600 steps (5-6 minutes, over the budget)
    give 23.40 +/- 0.32, each seed above its random init, the CLS probe still near chance.
    """
    return get_or_train_dino(cache_dir, world_config, ToyDinoConfig(), seed, progress)


def toy_random_proxy(cache_dir: str | os.PathLike, world_config: WorldConfig | None = None,
                     seed: int = 0) -> Path:
    """The control of :func:`toy_proxy`: the same ViT at its random initialisation (the init
    recipe of :func:`build_backbone` after ``torch.manual_seed(seed)``), untrained, written
    in the same layout (``tinydino-<key>-s<seed>-init.pth`` in ``cache_dir``)."""
    world_config = world_config or WorldConfig()
    config = ToyDinoConfig()
    path = Path(cache_dir).expanduser() / f"tinydino-{cache_key(world_config, config)}-s{seed}-init.pth"
    if not path.is_file():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = build_backbone(config, world_config.image_size)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path
