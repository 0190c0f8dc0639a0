"""The training-free family: MaskCLIP, SCLIP, ClearCLIP, NACLIP, SC-CLIP, ResCLIP, ProxyCLIP
(and raw CLIP) on one head.

Each method is a dense-feature strategy (:mod:`reclip.features`) under the zero-shot
head (:class:`reclip.heads.zero_shot.ZeroShotSegmentor`), tested with the protocol's
``zero_shot`` section (one protocol for all of them: ClearCLIP's), or with another
section of the same schema when asked (``naclip``: NACLIP's own protocol; ``sc_clip``,
``resclip``, ``proxyclip`` likewise; ResCLIP's per-dataset mixing weights, in its section's
``strategy``, apply to ResCLIP under any section).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reclip.clip.model import CLIP
from reclip.data.protocol import ZeroShotSettings
from reclip.families.spec import Family, Method, common_test_settings
from reclip.features import get_strategy
from reclip.heads.zero_shot import ZeroShotSegmentor
from reclip.text import QueryEmbeddings, Vocabulary, query_embeddings

__all__ = ["FAMILY"]

NAME = "zero_shot"

METHODS = (
    Method("raw", NAME, "raw", "imagenet80", "CLIP's last block unchanged (lower bound)"),
    # MaskCLIP / ReCLIP use the 85 templates; SCLIP / ClearCLIP / NACLIP the 80 (METHODS.md s.1).
    Method("maskclip", NAME, "maskclip", "reclip85", "MaskCLIP: value path of the last block"),
    Method("sclip", NAME, "sclip", "imagenet80", "SCLIP: q-q + k-k correlative attention"),
    Method("clearclip", NAME, "clearclip", "imagenet80", "ClearCLIP: q-q attention, no residual/FFN"),
    Method("naclip", NAME, "naclip", "imagenet80", "NACLIP: k-k + Gaussian, no residual/FFN", own_section="naclip"),
    # SuleBai/SC-CLIP scclip_segmentor.py: prompts.imagenet_template.openai_imagenet_template = the 80.
    Method("sc_clip", NAME, "sc_clip", "imagenet80", "SC-CLIP: LOF-calibrated tokens, mid-layer similarity, fusion",
           own_section="sc_clip"),
    Method("resclip", NAME, "resclip", "imagenet80", "ResCLIP: NACLIP + intermediate attention + semantic feedback",
           own_section="resclip"),
    # mc-lan/ProxyCLIP proxyclip_segmentor.py: openai_imagenet_template, the 80.
    Method("proxyclip", NAME, "proxyclip", "imagenet80", "ProxyCLIP: attention from a DINO proxy's patch similarities",
           own_section="proxyclip"),
)


def build(
    method: Method,
    clip: CLIP,
    vocabulary: Vocabulary,
    *,
    strategy_overrides: Mapping[str, Any] | None = None,
    templates: str | None = None,
    queries: QueryEmbeddings | None = None,
    text_cache: Any = None,
    progress: bool = False,
) -> ZeroShotSegmentor:
    """The method's strategy (with ``strategy_overrides``) under the zero-shot head, in eval mode."""
    if queries is None:
        queries = query_embeddings(clip, vocabulary, templates or method.templates, cache_dir=text_cache,
                                   progress=progress)
    strategy = get_strategy(method.strategy, **dict(strategy_overrides or {}))
    return ZeroShotSegmentor(clip, queries, strategy).eval()


def test_settings(method: Method, settings: ZeroShotSettings, protocol: Any) -> dict[str, Any]:
    """A training-free section (``zero_shot``, ``naclip``); ``prob_thd`` / ``area_thd`` only
    where the protocol has a background class (both assign pixels to class 0); PAMR's
    iterations and dilations where the section gives them (else reclip.postprocess's)."""
    values = {
        **common_test_settings(settings),
        "logit_scale": settings.logit_scale,
        "prob_thd": settings.prob_thd if protocol.background else None,
        "area_thd": settings.area_thd if protocol.background else None,
        "pamr": settings.pamr,
    }
    for name in ("pamr_iter", "pamr_dilations"):
        if getattr(settings, name) is not None:
            values[name] = getattr(settings, name)
    return values


FAMILY = Family(name=NAME, section="zero_shot", methods=METHODS, test_settings=test_settings, build=build)
