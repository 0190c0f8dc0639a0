"""Methods by name.

A method builds a *segmentor* (normalised images (B, 3, H, W) -> class logits
(B, C, h, w)) and names the protocol family whose published test settings it is
evaluated with. Inference, evaluation, the CLI and reports only see the segmentor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from reclip.clip.model import CLIP
from reclip.features import get_strategy
from reclip.heads.zero_shot import ZeroShotSegmentor
from reclip.inference import InferenceConfig
from reclip.text import QueryEmbeddings, Vocabulary, query_embeddings


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: CLI / API name.
        family: protocol section its test settings come from ("zero_shot" | "reclip").
        strategy: the dense-feature preset (features.STRATEGIES) it reads CLIP with.
        templates: the prompt template set its paper uses (templates.TEMPLATE_SETS).
        summary: one line for listings.
    """

    name: str
    family: str
    strategy: str
    templates: str
    summary: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("raw", "zero_shot", "raw", "imagenet80", "CLIP's last block unchanged (lower bound)"),
        # MaskCLIP / ReCLIP use the 85 templates; SCLIP / ClearCLIP / NACLIP the 80 (METHODS.md s.1).
        Method("maskclip", "zero_shot", "maskclip", "reclip85", "MaskCLIP: value path of the last block"),
        Method("sclip", "zero_shot", "sclip", "imagenet80", "SCLIP: q-q + k-k correlative attention"),
        Method("clearclip", "zero_shot", "clearclip", "imagenet80", "ClearCLIP: q-q attention, no residual/FFN"),
        Method("naclip", "zero_shot", "naclip", "imagenet80", "NACLIP: k-k + Gaussian, no residual/FFN"),
        # Trained heads: `reclip rectify` makes the checkpoint (RUN_DIR) they need.
        Method("reclip++", "reclip", "maskclip", "reclip85", "ReCLIP++ rectified CLIP (needs --checkpoint)"),
        Method("reclip", "reclip", "maskclip", "reclip85", "ReCLIP, the conference version (needs --checkpoint)"),
    )
}


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name raises listing the available ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


def build_segmentor(
    method: str | Method,
    clip: CLIP,
    vocabulary: Vocabulary,
    *,
    strategy_overrides: Mapping[str, Any] | None = None,
    templates: str | None = None,
    queries: QueryEmbeddings | None = None,
    checkpoint: str | os.PathLike | None = None,
    text_cache: Any = None,
    progress: bool = False,
) -> nn.Module:
    """The segmentor of ``method`` for ``vocabulary`` on ``clip`` (same device as clip).

    Args:
        strategy_overrides: LastBlock fields replacing the method's preset, e.g.
            ``{"residual": False}`` for "maskclip without residual".
        templates: template set name overriding the method's.
        queries: precomputed query embeddings (skips text encoding).
        checkpoint: the run directory of a trained head (``reclip rectify``); required by
            the "reclip" family, refused by the training-free one.
        text_cache: cache_dir for query embeddings (None: default, False: off).
    """
    method = method if isinstance(method, Method) else get_method(method)
    if method.family == "reclip":
        return _load_trained(method, clip, vocabulary, checkpoint, strategy_overrides, text_cache)
    if checkpoint is not None:
        raise ValueError(f"method {method.name!r} is training-free and takes no checkpoint; "
                         f"trained methods: {[m.name for m in METHODS.values() if m.family != 'zero_shot']}")
    if queries is None:
        queries = query_embeddings(clip, vocabulary, templates or method.templates, cache_dir=text_cache,
                                   progress=progress)
    strategy = get_strategy(method.strategy, **dict(strategy_overrides or {}))
    return ZeroShotSegmentor(clip, queries, strategy).eval()


def _load_trained(method: Method, clip: CLIP, vocabulary: Vocabulary, checkpoint: Any,
                  strategy_overrides: Mapping[str, Any] | None, text_cache: Any) -> nn.Module:
    from reclip.rectification import load_rectifier  # the training stack loads only when needed

    if checkpoint is None:
        raise ValueError(f"method {method.name!r} needs a trained head: pass --checkpoint RUN_DIR "
                         f"(made by `reclip rectify`)")
    if strategy_overrides:
        raise ValueError("a trained head reads CLIP the way it was trained; strategy overrides do not apply")
    model = load_rectifier(checkpoint, clip, vocabulary, text_cache=text_cache)
    trained = json.loads((Path(checkpoint) / "config.json").read_text())["method"]
    if trained != method.name:
        raise ValueError(f"{checkpoint} holds a {trained!r} run, not {method.name!r}: use --method {trained}")
    return model


_INFERENCE_KEYS = {f.name for f in fields(InferenceConfig)}


def inference_config(method: str | Method, protocol: Any, **overrides: Any) -> InferenceConfig:
    """The published test settings of ``protocol`` for ``method``'s family, then overrides.

    This is the one place where a protocol's test settings and per-run options (CLI
    flags, API ``inference=`` dicts) become an :class:`InferenceConfig`.

    From the family section (``protocol.zero_shot`` or ``protocol.reclip``): ``mode``,
    ``short_side``, ``max_long_side``, and ``window`` / ``stride`` in slide mode; the
    zero-shot family adds ``logit_scale``, and ``prob_thd`` / ``area_thd`` when the protocol
    has a background class (both assign pixels to class 0); the ReCLIP family adds
    ``pd_threshold``.

    Args:
        method: a method name or Method.
        protocol: a reclip.data.protocol.Protocol (anything with ``zero_shot`` / ``reclip``
            settings and ``background``).
        overrides: InferenceConfig fields; ``None`` values are ignored so CLI flags that
            were not given leave the protocol's value.
    Raises:
        ValueError: an override that is not an InferenceConfig field (lists the allowed
            ones), or settings InferenceConfig rejects.
    """
    method = method if isinstance(method, Method) else get_method(method)
    unknown = set(overrides) - _INFERENCE_KEYS
    if unknown:
        raise ValueError(f"unknown inference settings {sorted(unknown)}; allowed: {sorted(_INFERENCE_KEYS)}")
    settings = getattr(protocol, method.family)
    values: dict[str, Any] = {
        "mode": settings.mode,
        "short_side": settings.short_side,
        "max_long_side": settings.max_long_side,
    }
    if settings.mode == "slide":
        values["window"], values["stride"] = settings.window, settings.stride
    if method.family == "zero_shot":
        values["logit_scale"] = settings.logit_scale
        values["prob_thd"] = settings.prob_thd if protocol.background else None
        values["area_thd"] = settings.area_thd if protocol.background else None
    elif method.name == "reclip":
        # The conference version's PD (official tools/test.py): its own threshold where the
        # protocol has one (ReCLIP_PD), on softmax(100 * logits).
        values["pd_threshold"] = settings.pd_threshold_v1 if settings.pd_threshold_v1 is not None \
            else settings.pd_threshold
        values["pd_scale"] = 100.0
    else:
        values["pd_threshold"] = settings.pd_threshold
    values.update({k: v for k, v in overrides.items() if v is not None})
    return InferenceConfig(**values)
