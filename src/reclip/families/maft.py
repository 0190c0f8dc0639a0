"""The MAFT families: mask proposals classified by IP-CLIP (:mod:`reclip.maft`).

Two families, because a family is either trained or training-free:

- ``maft`` (trained): MAFT, IP-CLIP on the mask-aware fine-tuned CLIP of a run
  (``--checkpoint RUN_DIR``);
- ``ipclip`` (training-free): the same segmentor on the frozen CLIP, the baseline
  "plain CLIP proposal classification" MAFT is measured against.

Both take mask proposals (``--proposals``, :mod:`reclip.maft.proposals`), run whole-image
only, and read the protocol's ``maft`` section (one default for every dataset).

A MAFT run (:func:`reclip.maft.train.save_maft_run`, the one writer of both
``reclip maft`` and :func:`write_run`) is config.json with ``"method": "maft"``,
``"start_layer"`` (IP-CLIP's first masked block) and ``"classes"`` (the training
vocabulary; informative: MAFT is open-vocabulary and classifies any class list),
optionally ``"threshold"`` (IP-CLIP's patch coverage, default 0.5), ``"templates"`` and
``"clip_fingerprint"`` (of the CLIP it was fine-tuned from, checked when present), and
model.safetensors with the fine-tuned vision parameters (attention, ln_1, ln_2 of every
block, ln_post) under their names relative to ``clip.visual`` (a prefix ending in
``visual.``, e.g. ``clip.visual.``, as runs written by ``reclip.train.save_run`` have, is
accepted).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from reclip.clip.model import CLIP, weights_fingerprint
from reclip.data.protocol import MaftSettings
from reclip.families.spec import Family, Method
from reclip.maft.ipclip import _check_threshold
from reclip.maft.segmentor import MAFTSegmentor, load_visual_state, tuned_copy
from reclip.text import QueryEmbeddings, Vocabulary, query_embeddings
from reclip.train import RunFiles

__all__ = ["FAMILY", "FREE_FAMILY"]

# The official text classifier: ViLD's 14 prompts (reclip.templates.VILD_TEMPLATES).
TEMPLATES = "vild14"

METHODS = (Method("maft", "maft", "raw", TEMPLATES,
                  "MAFT: mask proposals classified by mask-aware fine-tuned IP-CLIP (needs --checkpoint, "
                  "--proposals)"),)
FREE_METHODS = (Method("ipclip", "ipclip", "raw", TEMPLATES,
                       "mask proposals classified by frozen CLIP's IP-CLIP (MAFT's baseline; needs --proposals)"),)


def test_settings(method: Method, settings: MaftSettings, protocol: Any) -> dict[str, Any]:
    """The ``maft`` section: whole image at its short side; logits are log class
    probabilities, so the softmax runs at scale 1 and no threshold applies."""
    return {"mode": "whole", "short_side": settings.short_side, "max_long_side": settings.max_long_side}


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
) -> MAFTSegmentor:
    """IP-CLIP proposal classification on the frozen ``clip`` (no proposal source yet:
    ``segmentor.proposals``; without one it classifies the whole image and a grid)."""
    if strategy_overrides:
        raise ValueError(f"{method.name!r} reads CLIP's CLS token through IP-CLIP, not a dense last block: "
                         f"--attention / --residual / --ffn do not apply")
    if queries is None:
        queries = query_embeddings(clip, vocabulary, templates or method.templates, cache_dir=text_cache,
                                   progress=progress)
    return MAFTSegmentor(clip, queries).eval()


def new_model(method: Method, clip: CLIP, vocabulary: Vocabulary, text_cache: Any = None) -> MAFTSegmentor:
    """An untrained MAFT: IP-CLIP on a copy of ``clip`` whose MAFT-trainable vision
    parameters require grad (the starting point of fine-tuning)."""
    queries = query_embeddings(clip, vocabulary, method.templates, cache_dir=text_cache)
    return MAFTSegmentor(tuned_copy(clip), queries)


def write_run(run_dir: str | os.PathLike, model: MAFTSegmentor, method: Method, clip: CLIP,
              vocabulary: Vocabulary) -> None:
    """A run :func:`from_run` reads: the module docstring's format, written as ``reclip maft`` writes it."""
    from reclip.maft.train import save_maft_run

    save_maft_run(run_dir, model, {
        "method": method.name,
        "start_layer": model.start_layer,
        "threshold": model.threshold,
        "classes": vocabulary.to_lines(),
        "templates": method.templates,
        "clip": getattr(clip, "spec", None),
        "clip_fingerprint": weights_fingerprint(clip),
    })


def from_run(run: RunFiles, clip: CLIP, vocabulary: Vocabulary | None = None, text_cache: Any = None) -> MAFTSegmentor:
    """MAFT from a finished run on a copy of ``clip`` (the given one is not changed), in eval mode.

    ``vocabulary`` None: the run's training classes. Refuses another CLIP than the run's
    (when the run records its fingerprint) and weights that do not fit.
    """
    saved = run.config
    where = run.run_dir / "config.json"
    start_layer = saved.get("start_layer")
    if isinstance(start_layer, bool) or not isinstance(start_layer, int):
        raise ValueError(f"{where}: 'start_layer' is {start_layer!r}; a MAFT run records IP-CLIP's first masked "
                         f"block as an int")
    try:  # runs written before the threshold was recorded: IP-CLIP's 0.5
        threshold = _check_threshold(saved.get("threshold", 0.5))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    fingerprint = saved.get("clip_fingerprint")
    if fingerprint is not None and fingerprint != weights_fingerprint(clip):
        raise ValueError(f"{run.run_dir} was fine-tuned from CLIP {saved.get('clip')!r} (fingerprint {fingerprint}); "
                         f"the loaded CLIP {getattr(clip, 'spec', None)!r} has fingerprint "
                         f"{weights_fingerprint(clip)}: pass the same --clip as for training")
    if vocabulary is None:
        if not saved.get("classes"):
            raise ValueError(f"{where}: no 'classes'; give the class list to segment with")
        vocabulary = Vocabulary.from_names(saved["classes"], shared_names=True)
    tuned = tuned_copy(clip)
    load_visual_state(tuned.visual, run.state_dict, str(run.run_dir / "model.safetensors"))
    tuned.requires_grad_(False)
    weights_fingerprint(tuned, refresh=True)
    # the text tower is not fine-tuned: the frozen CLIP's query embeddings (and their cache) serve
    queries = query_embeddings(clip, vocabulary, saved.get("templates", TEMPLATES), cache_dir=text_cache)
    return MAFTSegmentor(tuned, queries, start_layer=start_layer, threshold=threshold).to(
        next(clip.parameters()).device).eval()


FAMILY = Family(name="maft", section="maft", methods=METHODS, test_settings=test_settings, from_run=from_run,
                new_model=new_model, write_run=write_run, proposals=True)
FREE_FAMILY = Family(name="ipclip", section="maft", methods=FREE_METHODS, test_settings=test_settings, build=build,
                     proposals=True)
