"""Optimisers and learning-rate schedules: chosen by each stage, stepped by the engine.

    SGDConfig(lr=0.01, momentum=0.9, weight_decay=5e-4)            # ReCLIP++ (poly 0.9 per step)
    AdamWConfig(lr=1e-5, weight_decay=1e-4, no_decay=("ln_",))    # MAFT (constant lr)

A config ``build``s the optimiser over the model's trainable parameters (those with
``requires_grad``) and its ``schedule`` gives the learning-rate factor of every step: the
engine sets each parameter group's lr to its base lr times that factor. Configs are
frozen dataclasses, so the engine records them in the checkpoint and refuses to resume
a run with another one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["AdamWConfig", "PolySchedule", "SGDConfig", "describe", "poly_lr"]

UNITS = ("step", "epoch")


def poly_lr(t: int, *, base_lr: float, horizon: int, power: float) -> float:
    """Poly schedule: ``base_lr * (1 - min(t, horizon) / horizon) ** power``."""
    return base_lr * (1.0 - min(t, horizon) / horizon) ** power


@dataclass(frozen=True)
class PolySchedule:
    """lr factor ``(1 - t / horizon) ** power``; power 0 keeps the lr constant.

    Attributes:
        power: the exponent (official ReCLIP++ 0.9).
        horizon: the t at which the lr reaches 0; None = the run's length (its steps, or
            its epochs with ``unit="epoch"``). A horizon longer than the run keeps the lr
            above 0 (the official ReCLIP schedules: e.g. VOC 50 epochs of a 200-epoch poly).
        unit: "step" (t = step, lr updated every step) or "epoch" (t = epoch index: the
            official ReCLIP loop updates the lr once per epoch).
        min_factor: the factor never falls below this (the lr is clamped at base lr x
            min_factor; official ReCLIP distillation: min lr 1e-4 at lr 0.01, i.e. 0.01,
            tools/distill.py adjust_learning_rate_poly). 0: no floor (the paper states none).
    """

    power: float = 0.9
    horizon: int | None = None
    unit: str = "step"
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"PolySchedule.unit must be one of {list(UNITS)}, got {self.unit!r}")
        if self.horizon is not None and self.horizon <= 0:
            raise ValueError(f"PolySchedule.horizon must be positive or None, got {self.horizon}")
        if self.power < 0:
            raise ValueError(f"PolySchedule.power must be >= 0, got {self.power}")
        if not 0.0 <= self.min_factor <= 1.0:
            raise ValueError(f"PolySchedule.min_factor must be in [0, 1], got {self.min_factor}")

    def resolve_horizon(self, steps: int, steps_per_epoch: int) -> int:
        """The horizon in this schedule's unit for a run of ``steps`` steps."""
        if self.horizon is not None:
            return self.horizon
        return steps if self.unit == "step" else math.ceil(steps / steps_per_epoch)

    def factor(self, step: int, steps_per_epoch: int, horizon: int) -> float:
        """The lr factor at optimiser step ``step`` (0-based)."""
        t = step if self.unit == "step" else step // steps_per_epoch
        return max(poly_lr(t, base_lr=1.0, horizon=horizon, power=self.power), self.min_factor)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True; nothing to train")
    return params


@dataclass(frozen=True)
class SGDConfig:
    """SGD with momentum; weight decay on every trainable parameter (official ReCLIP++:
    lr 0.01, momentum 0.9, weight decay 5e-4, poly 0.9)."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: PolySchedule = PolySchedule()

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(f"SGDConfig needs lr > 0, momentum >= 0, weight_decay >= 0; got {self}")

    def build(self, model: nn.Module) -> torch.optim.SGD:
        params = [p for _, p in _trainable(model)]
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class AdamWConfig:
    """AdamW; parameters whose name contains one of ``no_decay`` get no weight decay (MAFT:
    lr 1e-5, weight decay 1e-4, none on LayerNorms)."""

    lr: float = 1e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    no_decay: tuple[str, ...] = ()
    schedule: PolySchedule = PolySchedule(power=0.0)

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"AdamWConfig needs lr > 0 and weight_decay >= 0; got {self}")
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "no_decay", tuple(self.no_decay))

    def build(self, model: nn.Module) -> torch.optim.AdamW:
        params = _trainable(model)
        decay = [p for n, p in params if not any(s in n for s in self.no_decay)]
        plain = [p for n, p in params if any(s in n for s in self.no_decay)]
        groups = [g for g in ({"params": decay}, {"params": plain, "weight_decay": 0.0}) if g["params"]]
        return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)


def describe(config: Any) -> dict[str, Any]:
    """An optimiser config as a plain dict with its type (recorded in checkpoints and run configs)."""
    out = {"type": type(config).__name__, **dataclasses.asdict(config)}
    if isinstance(out.get("schedule"), dict) and out["schedule"].get("min_factor") == 0.0:
        del out["schedule"]["min_factor"]  # recorded only when set: runs from before the floor existed resume
    return out
