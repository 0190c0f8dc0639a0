"""The rectified family: ReCLIP++ and its conference version ReCLIP, trained by ``reclip rectify``.

A segmentor comes from a finished run (config.json + model.safetensors,
:mod:`reclip.rectification`); it is tested with the protocol's ``reclip`` section.
"""

from __future__ import annotations

import os
from typing import Any

from reclip.clip.model import CLIP
from reclip.data.protocol import ReclipSettings
from reclip.families.spec import Family, Method, common_test_settings
from reclip.heads.rectify import OUTPUTS, PRESETS, Rectifier
from reclip.rectification import QUERY_TEMPLATES, rectifier_from_run, save_rectifier_run
from reclip.text import Vocabulary, query_embeddings

__all__ = ["FAMILY"]

NAME = "rectified"

METHODS = (
    Method("reclip++", NAME, "maskclip", "reclip85", "ReCLIP++ rectified CLIP (needs --checkpoint)"),
    Method("reclip", NAME, "maskclip", "reclip85", "ReCLIP, the conference version (needs --checkpoint)"),
)

# Prompt denoising of each method as the official evaluator applies it (dogehhh/ReCLIP
# tools/test.py): the protocol fields that may hold its threshold (the first one set wins)
# and the scale inside PD's softmax. The conference version has its own threshold
# (ReCLIP_PD), never ReCLIP++'s.
PROMPT_DENOISING: dict[str, tuple[tuple[str, ...], float]] = {
    "reclip++": (("pd_threshold",), 10.0),
    "reclip": (("pd_threshold_v1",), 100.0),
}
# ``prompt_denoising`` choices: "none" is the paper (section III-D, Inference: the label
# of a pixel is the argmax of M_o); "official" is the official evaluator's PD exactly, at
# its per-dataset thresholds (the protocol's ``reclip`` section): on the head's grid,
# before upsampling, with no protection, so it can remove every class (then every pixel
# is class 0); it depends on the absolute scale of the logits (at VOC's 1.0 a class
# survives only where softmax(10 M_o) rounds to exactly 1 in float32) and so can remove
# classes that are present. "official-safe" is the project's variant at the same
# thresholds and scale: on the full-resolution logits, never removing an image's most
# confident class. PD_CHOICE_MODES maps each PD choice to ``PostprocessConfig.pd_mode``.
PD_CHOICES = ("none", "official", "official-safe")
PD_CHOICE_MODES = {"official": "official", "official-safe": "safe"}
PD_HELP = {
    "none": "the paper: argmax of M_o, no prompt denoising (default)",
    "official": "the official evaluator's PD exactly: on the head's grid at the protocol's per-dataset threshold; "
                "can remove every class (every pixel is then class 0)",
    "official-safe": "the project's PD at the same thresholds: on the full-resolution logits, always keeps each "
                     "image's most confident class",
}


def test_settings(method: Method, settings: ReclipSettings, protocol: Any, *,
                  prompt_denoising: str | None = None, pd_threshold: float | None = None) -> dict[str, Any]:
    """The ``reclip`` section: whole image at the test short side, and prompt denoising:

    - by default none (the paper);
    - ``prompt_denoising="official"``: the official evaluator's PD exactly
      (``pd_mode="official"``), at the protocol's threshold;
    - ``prompt_denoising="official-safe"``: the project's PD (``pd_mode="safe"``) at the
      protocol's threshold;
    - ``pd_threshold=T``: PD at T (a user's threshold; with "official" or "official-safe"
      it replaces the protocol's, alone it is the project's PD, with "none" it is a
      contradiction and refused).

    PD always uses the method's own softmax scale (ReCLIP++ 10, ReCLIP 100).
    """
    if prompt_denoising not in (None, *PD_CHOICES):
        raise ValueError(f"prompt_denoising={prompt_denoising!r}; allowed: {list(PD_CHOICES)} "
                         "(none = the paper's argmax of M_o; official = the official evaluator's PD exactly; "
                         "official-safe = the project's PD at the official thresholds)")
    if prompt_denoising == "none" and pd_threshold is not None:
        raise ValueError(f"prompt denoising 'none' contradicts a PD threshold of {pd_threshold}; give one of them")
    values = common_test_settings(settings)
    if prompt_denoising in (None, "none") and pd_threshold is None:
        return values
    if method.name not in PROMPT_DENOISING:
        raise ValueError(f"no prompt-denoising setting for method {method.name!r}; add it to "
                         f"reclip.families.rectified.PROMPT_DENOISING (known: {sorted(PROMPT_DENOISING)})")
    fields, scale = PROMPT_DENOISING[method.name]
    if pd_threshold is None:
        pd_threshold = next((getattr(settings, f) for f in fields if getattr(settings, f) is not None), None)
        if pd_threshold is None:
            raise ValueError(f"protocol {protocol.name!r} gives no official prompt-denoising threshold for "
                             f"{method.name} (reclip section: {' or '.join(fields)}); give one with --pd-threshold")
    mode = PD_CHOICE_MODES.get(prompt_denoising, "safe")  # a threshold alone: the project's PD
    return {**values, "pd_threshold": pd_threshold, "pd_scale": scale, "pd_mode": mode}


def new_model(method: Method, clip: CLIP, vocabulary: Vocabulary, text_cache: Any = None) -> Rectifier:
    """An untrained rectifier with the method's published configuration."""
    queries = query_embeddings(clip, vocabulary, QUERY_TEMPLATES, cache_dir=text_cache)
    return Rectifier(clip, queries, vocabulary.names, PRESETS[method.name])


def write_run(run_dir: str | os.PathLike, model: Rectifier, method: Method, clip: CLIP, vocabulary: Vocabulary) -> None:
    """A run that :func:`reclip.rectification.rectifier_from_run` loads."""
    save_rectifier_run(run_dir, model, method.name, clip, vocabulary)


FAMILY = Family(name=NAME, section="reclip", methods=METHODS, test_settings=test_settings,
                from_run=rectifier_from_run, new_model=new_model, write_run=write_run,
                test_options=("prompt_denoising", "pd_threshold"), outputs=tuple(OUTPUTS))
