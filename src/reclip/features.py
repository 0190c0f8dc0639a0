"""Dense CLIP features: every training-free strategy, by name.

A strategy (:class:`reclip.strategies.DenseStrategy`) reads CLIP densely: normalised
images (B, 3, H, W) -> Z (B, D, h, w), float32, unit L2 norm per patch. Each family of
strategies is one file of :mod:`reclip.strategies`; this module is their registry:

- :data:`STRATEGIES`: the published presets by name (``reclip methods`` lists them);
- :func:`get_strategy`: a preset (or a strategy as is) with fields overridden, e.g.
  ``get_strategy("maskclip", residual=False)``;
- :func:`strategy_to_dict` / :func:`strategy_from_dict`: a strategy in a run's config.json;
- :func:`dense_features`: Z of a batch under a strategy.

The last-block machinery (:class:`LastBlock`, :func:`apply_last_block`, ...) is
re-exported from :mod:`reclip.strategies.last_block`, where its docstring says what each
method changes and where the official codes do it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from reclip.clip.model import CLIP
from reclip.strategies.base import DenseStrategy, FeatureContext, project_patches
from reclip.strategies.last_block import (
    ATTENTIONS,
    LAST_BLOCK_PRESETS,
    MMSEG_LAYERNORM_EPS,
    LastBlock,
    _attend,
    apply_last_block,
    attention_bias,
    attention_weights,
    gaussian_window,
    reclip_official_numerics,
)
from reclip.strategies.sc_clip import SelfCalibrated
from reclip.strategies.proxyclip import ProxyAttention
from reclip.strategies.resclip import ResidualAttention

__all__ = [
    "ATTENTIONS",
    "DenseStrategy",
    "FeatureContext",
    "LastBlock",
    "MMSEG_LAYERNORM_EPS",
    "ProxyAttention",
    "ResidualAttention",
    "SelfCalibrated",
    "STRATEGIES",
    "STRATEGY_KINDS",
    "_attend",
    "apply_last_block",
    "attention_bias",
    "attention_weights",
    "dense_features",
    "gaussian_window",
    "get_strategy",
    "project_patches",
    "reclip_official_numerics",
    "strategy_from_dict",
    "strategy_to_dict",
]

# Every strategy class by its ``kind`` (the name config.json records).
STRATEGY_KINDS: dict[str, type[DenseStrategy]] = {
    cls.kind: cls for cls in (LastBlock, SelfCalibrated, ResidualAttention, ProxyAttention)}

# The published presets by name.
STRATEGIES: dict[str, DenseStrategy] = {
    **LAST_BLOCK_PRESETS,
    "sc_clip": SelfCalibrated(),
    "resclip": ResidualAttention(),
    "proxyclip": ProxyAttention(),  # its proxy model is loaded (or downloaded) when a backbone is built
}


def get_strategy(strategy: str | DenseStrategy, **overrides: object) -> DenseStrategy:
    """A preset by name (or a strategy as is), with fields overridden.

    ``get_strategy("maskclip", residual=False)`` is MaskCLIP without the residual.
    Unknown names or fields raise ``ValueError`` listing what exists.
    """
    if isinstance(strategy, DenseStrategy):
        base = strategy
    elif isinstance(strategy, str):
        try:
            base = STRATEGIES[strategy]
        except KeyError:
            raise ValueError(
                f"unknown dense-feature strategy {strategy!r}; available: {sorted(STRATEGIES)} "
                f"(or pass a reclip.strategies.DenseStrategy, e.g. a reclip.features.LastBlock)"
            ) from None
    else:
        raise TypeError(f"strategy must be a name or a DenseStrategy, got {type(strategy).__name__}")
    if not overrides:
        return base
    fields = [f.name for f in dataclasses.fields(base)]  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown {type(base).__name__} field(s) {unknown}; available: {fields}")
    return dataclasses.replace(base, **overrides)  # type: ignore[type-var]


def strategy_to_dict(strategy: DenseStrategy) -> dict[str, Any]:
    """A strategy as JSON-ready data: ``{"kind": ..., field: value, ...}``.

    A :class:`LastBlock` is written without ``kind``, as every run recorded it before
    other kinds existed: run identities (resume checks, the demo's run keys) stay the same.
    """
    values = {k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(strategy).items()}  # type: ignore[call-overload]
    return values if isinstance(strategy, LastBlock) else {"kind": strategy.kind, **values}


def strategy_from_dict(values: dict[str, Any]) -> DenseStrategy:
    """Inverse of :func:`strategy_to_dict`; a dict without ``kind`` is a :class:`LastBlock`
    (what runs recorded before strategies had kinds). Unknown kinds or fields raise."""
    values = dict(values)
    kind = values.pop("kind", LastBlock.kind)
    try:
        cls = STRATEGY_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown dense-feature strategy kind {kind!r}; available: {sorted(STRATEGY_KINDS)}") from None
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; available: {list(fields)}")
    # JSON has no tuples: give tuple-typed fields their tuples back
    for name, value in values.items():
        if isinstance(value, list) and "tuple" in str(fields[name].type):
            values[name] = tuple(value)
    return cls(**values)


def dense_features(clip: CLIP, images: Tensor, strategy: str | DenseStrategy = "maskclip",
                   context: FeatureContext | None = None) -> Tensor:
    """Dense CLIP features of normalised images: (B, 3, H, W) -> (B, D, h, w), unit L2 norm per patch.

    Args:
        clip: a CLIP with a ViT image tower.
        images: (B, 3, H, W) CLIP-normalised; padded by the model at the bottom/right
            when H or W is not a multiple of the patch, so (h, w) = ceil((H, W) / patch).
        strategy: a preset name of :data:`STRATEGIES` or a strategy.
        context: what the strategy reads besides CLIP (:class:`FeatureContext`); strategies
            with an auxiliary model or that read the head's queries need it (the backbone,
            :class:`reclip.backbones.DenseCLIP`, fills it).

    Returns:
        float32 features (B, D, h, w).

    Runs under the caller's grad mode and autocast: nothing here forces ``no_grad``
    (ReCLIP++ training calls it under ``torch.no_grad()``; a gradient check can enable
    it). The output is cast to float32 before the normalisation, so bf16/fp16 towers
    give float32 unit vectors.
    """
    return get_strategy(strategy).features(clip, images, context)
