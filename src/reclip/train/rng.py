"""Random state: seed every generator at once, save and restore them exactly.

Every stage seeds with :func:`seed_everything` before anything random is drawn
(model initialisation included), so the same command and seed give the same result.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["rng_state", "seed_everything", "set_rng_state"]


def seed_everything(seed: int, *stream: int) -> None:
    """Seed Python's, numpy's and torch's global generators (every CUDA device too).

    ``stream`` gives independent seeds from one user seed (e.g. one per purpose and
    process rank): the value used is ``SeedSequence([seed, *stream])``'s first word.
    """
    value = int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """The global generators' states, as tensors and plain values (``torch.load(weights_only=True)`` safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    """Python's random state as nested tuples again (a checkpoint may give lists)."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
