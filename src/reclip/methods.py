"""Methods by name, grouped in families (:mod:`reclip.families`).

A method builds a *segmentor* (normalised images (B, 3, H, W) -> class logits
(B, C, h, w)) and is evaluated with its family's section of a dataset protocol.
Inference, evaluation, the CLI and reports only see the segmentor. A family is one file
of :mod:`reclip.families` plus one line in :data:`FAMILIES`; trained runs load through
the method their config.json names (:func:`load_trained`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from torch import nn

from reclip.clip.model import CLIP
from reclip.families import distilled, maft, rectified, zero_shot
from reclip.families.spec import Family, Method
from reclip.inference import InferenceConfig
from reclip.text import QueryEmbeddings, Vocabulary
from reclip.train import load_run

__all__ = ["FAMILIES", "METHODS", "Family", "Method", "build_segmentor", "classes_file_for", "get_family",
           "get_method", "inference_config", "load_trained", "published_strategy_overrides", "settings_section",
           "TEST_SETTINGS"]

# The registry: one line per family.
FAMILIES: dict[str, Family] = {
    zero_shot.FAMILY.name: zero_shot.FAMILY,
    rectified.FAMILY.name: rectified.FAMILY,
    distilled.FAMILY.name: distilled.FAMILY,
    maft.FAMILY.name: maft.FAMILY,
    maft.FREE_FAMILY.name: maft.FREE_FAMILY,
}
METHODS: dict[str, Method] = {m.name: m for family in FAMILIES.values() for m in family.methods}
# Every protocol section some family can read its test settings from (``--test-settings``).
TEST_SETTINGS: tuple[str, ...] = tuple(dict.fromkeys(k for family in FAMILIES.values() for k in family.sections))


def get_method(name: str | Method) -> Method:
    """The registered method ``name`` (a Method as is); an unknown name raises listing the available ones."""
    if isinstance(name, Method):
        return name
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


def get_family(method: str | Method) -> Family:
    """The family of a method (a name or a Method)."""
    method = get_method(method)
    try:
        return FAMILIES[method.family]
    except KeyError:
        raise ValueError(f"method {method.name!r} names an unknown family {method.family!r}; "
                         f"available: {', '.join(FAMILIES)}") from None


def build_segmentor(
    method: str | Method,
    clip: CLIP,
    vocabulary: Vocabulary,
    *,
    strategy_overrides: Mapping[str, Any] | None = None,
    templates: str | None = None,
    queries: QueryEmbeddings | None = None,
    checkpoint: str | os.PathLike | None = None,
    output: str | None = None,
    text_cache: Any = None,
    progress: bool = False,
    protocol: Any = None,
) -> nn.Module:
    """The segmentor of ``method`` for ``vocabulary`` on ``clip`` (same device as clip).

    Args:
        strategy_overrides: LastBlock fields replacing the method's preset, e.g.
            ``{"residual": False}`` for "maskclip without residual" (training-free only).
        templates: template set name overriding the method's (training-free only).
        queries: precomputed query embeddings (skips text encoding; training-free only).
        checkpoint: the run directory of a trained method (``reclip rectify``); required
            by trained families, refused by training-free ones.
        output: which logits a trained segmentor returns (its family's ``outputs``, e.g.
            "decoded", "rectified" or "query" for ReCLIP++); None: the family's default.
        text_cache: cache_dir for query embeddings (None: default, False: off).
        protocol: the dataset protocol it will run on (training-free only): the strategy
            settings the method's own section publishes there
            (:func:`published_strategy_overrides`, e.g. ResCLIP's weights) apply first,
            ``strategy_overrides`` over them.
    """
    method = get_method(method)
    family = get_family(method)
    if family.trained:
        if checkpoint is None:
            raise ValueError(f"method {method.name!r} needs a trained head: pass --checkpoint RUN_DIR "
                             f"(made by `reclip rectify`)")
        if strategy_overrides:
            raise ValueError("a trained head reads CLIP the way it was trained; strategy overrides do not apply")
        return load_trained(checkpoint, clip, vocabulary, method=method.name, output=output, text_cache=text_cache)
    if output is not None:
        raise ValueError(f"method {method.name!r} has one output; --output chooses between the logits of a "
                         f"trained head ({', '.join(m.name for m in METHODS.values() if get_family(m).outputs)})")
    if checkpoint is not None:
        trained = [m.name for m in METHODS.values() if get_family(m).trained]
        raise ValueError(f"method {method.name!r} is training-free and takes no checkpoint; trained methods: {trained}")
    if protocol is not None:
        strategy_overrides = {**published_strategy_overrides(method, protocol), **dict(strategy_overrides or {})}
    return family.build(method, clip, vocabulary, strategy_overrides=strategy_overrides, templates=templates,
                        queries=queries, text_cache=text_cache, progress=progress)


def load_trained(
    run_dir: str | os.PathLike,
    clip: CLIP,
    vocabulary: Vocabulary | None = None,
    *,
    method: str | None = None,
    output: str | None = None,
    text_cache: Any = None,
) -> nn.Module:
    """The segmentor of a finished training run, built by the family of the method its
    config.json names; ``method`` (if given) must be that one; ``output`` one of the
    family's ``outputs`` (None: its default)."""
    run = load_run(run_dir)
    name = run.config.get("method")
    if name not in METHODS or not get_family(name).trained:
        raise ValueError(f"{run_dir}/config.json names method {name!r}, which is not a trained method of this "
                         f"reclip; trained methods: {[m for m in METHODS if get_family(m).trained]}")
    if method is not None and name != method:
        raise ValueError(f"{run_dir} holds a {name!r} run, not {method!r}: use --method {name}")
    family = get_family(name)
    if output is not None and output not in family.outputs:
        raise ValueError(f"a {name!r} run has no output {output!r}; available: {', '.join(family.outputs) or 'none'}")
    segmentor = family.from_run(run, clip, vocabulary, text_cache)
    if output is not None:
        segmentor.select_output(output)
    return segmentor


_INFERENCE_KEYS = {f.name for f in fields(InferenceConfig)}


def settings_section(method: str | Method, protocol: Any, test_settings: str | None = None) -> tuple[str, Any]:
    """``(name, settings)`` of the protocol section ``method`` is tested with.

    ``test_settings`` None: the family's own section (``Family.section``: ``zero_shot``,
    ClearCLIP's protocol for every training-free method; ``reclip``); else another section
    of the same kind (``Family.sections``, e.g. ``naclip``: NACLIP's own protocol).

    Raises:
        ValueError: a section the method's family cannot read, or one the protocol leaves out.
    """
    method = get_method(method)
    family = get_family(method)
    name = family.section if test_settings is None else test_settings
    if name not in family.sections:
        owners = [f.name for f in FAMILIES.values() if name in f.sections]
        whose = (f"are for the {' and '.join(owners)} famil{'ies' if len(owners) > 1 else 'y'}" if owners
                 else "are unknown")
        raise ValueError(f"test settings {name!r} {whose}; {method.name!r} ({family.name}) reads "
                         f"{' or '.join(repr(k) for k in family.sections)}")
    settings = getattr(protocol, name, None)
    if settings is None:
        where = getattr(protocol, "source", None) or getattr(protocol, "name", "the protocol")
        raise ValueError(f"protocol {getattr(protocol, 'name', '?')!r} has no {name!r} section ({where}); "
                         f"add one (schema: reclip.data.protocol) or use the default {family.section!r}")
    return name, settings


def published_strategy_overrides(method: str | Method, protocol: Any) -> dict[str, Any]:
    """The strategy settings ``protocol`` publishes for ``method``: the ``strategy`` mapping
    of the method's own section (``Method.own_section``, e.g. ResCLIP's per-dataset
    weights), or {} where it has none. They apply whichever section the test settings come
    from; a user's strategy overrides replace them field by field."""
    name = get_method(method).own_section
    section = getattr(protocol, name, None) if name is not None else None
    return dict(getattr(section, "strategy", None) or {})


def classes_file_for(method: str | Method, protocol: Any, given: str | os.PathLike | None = None,
                     test_settings: str | None = None):
    """The class file ``method`` reads on ``protocol``: ``given`` (a user's) if any, else the
    one its test settings name (the ``classes_file`` of the section, e.g. the official
    ReCLIP prompt names, or NACLIP's), else None: the protocol's ``classes_file``."""
    if given is not None:
        return given
    return protocol.section_classes_path(settings_section(method, protocol, test_settings)[0])


def inference_config(method: str | Method, protocol: Any, test_settings: str | None = None,
                     **overrides: Any) -> InferenceConfig:
    """The published test settings of ``protocol`` for ``method``'s family, then overrides.

    This is the one place where a protocol's test settings and per-run options (CLI
    flags, API ``inference=`` dicts) become an :class:`InferenceConfig`: the family
    reads its section of the protocol (``Family.section``, e.g. ``zero_shot`` or
    ``reclip``, or the one ``test_settings`` names) with its ``test_settings``.

    Args:
        method: a method name or Method.
        protocol: a reclip.data.protocol.Protocol (anything with the family's section
            and ``background``).
        test_settings: the protocol section to start from (:func:`settings_section`;
            None: the family's own). E.g. ``"naclip"``: NACLIP's own protocol (sizes,
            thresholds, PAMR 10 x (8, 16)) for a training-free method. The section's
            ``classes_file`` is not read here: :func:`reclip.api.evaluate` applies it.
        overrides: InferenceConfig fields, and the family's ``test_options`` (e.g.
            ``prompt_denoising`` and ``pd_threshold`` of the rectified family), which its
            ``test_settings`` reads; ``None`` values are ignored (also for another
            family's options) so CLI flags that were not given leave the protocol's value.
    Raises:
        ValueError: an override that is neither an InferenceConfig field nor an option of
            the method's family (lists the allowed ones), settings InferenceConfig rejects,
            or a ``test_settings`` section the family cannot read or the protocol lacks.
    """
    method = get_method(method)
    family = get_family(method)
    # Names are checked even when their value is None (a typo never passes silently); an
    # option of another family given as None is simply not set.
    foreign = {k for k, v in overrides.items() if v is None and any(k in f.test_options for f in FAMILIES.values())}
    unknown = set(overrides) - _INFERENCE_KEYS - set(family.test_options) - foreign
    overrides = {k: v for k, v in overrides.items() if v is not None}
    options = {k: overrides.pop(k) for k in family.test_options if k in overrides}
    if unknown:
        for key in sorted(unknown):
            owners = [f.name for f in FAMILIES.values() if key in f.test_options]
            if owners:
                raise ValueError(f"{key!r} is an option of the {' and '.join(owners)} family, not of "
                                 f"{method.name!r} ({family.name})")
        raise ValueError(f"unknown inference settings {sorted(unknown)}; allowed: {sorted(_INFERENCE_KEYS)}"
                         + (f" and {list(family.test_options)}" if family.test_options else ""))
    _, settings = settings_section(method, protocol, test_settings)
    values = family.test_settings(method, settings, protocol, **options)
    values.update(overrides)
    if family.proposals and values.get("mode") == "slide":
        raise ValueError(f"{method.name!r} classifies mask proposals of the whole image; sliding windows would cut "
                         f"them: use mode 'whole' (drop --mode slide)")
    return InferenceConfig(**values)
