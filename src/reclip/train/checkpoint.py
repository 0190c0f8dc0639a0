"""What a run writes: the trainable state, the resumable checkpoint, the finished run's files.

A run directory holds ``checkpoint.pt`` (everything an exact resume needs, written
atomically every ``checkpoint_every`` steps) and the one before it,
``checkpoint.previous.pt``, ``metrics.jsonl`` and, when training ends,
``model.safetensors`` (the trainable state only); its stage adds ``config.json``
(:func:`save_run`). Only rank 0 writes.

A damaged checkpoint (truncated, empty, garbage, refused by the safe unpickler, or not a
reclip checkpoint) is reported by name and the previous one is used instead; a
checkpoint that cannot be written (a full disk) stops the run with an error that says
which earlier checkpoint is intact.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from reclip.clip.checks import check_finite, load_safetensors
from reclip.clip.convert import CheckpointError
from reclip.clip.torchsave import scan_torch_file
from reclip.files import atomic_write, atomic_write_json, atomic_write_text
from reclip.train.distributed import is_rank0

__all__ = [
    "BEST_NAME", "CHECKPOINT_NAME", "CHECKPOINT_VERSION", "CONFIG_NAME", "METRICS_NAME", "PREVIOUS_NAME",
    "WEIGHTS_NAME", "CheckpointWriteError", "DamagedRunError", "RunFiles", "atomic_torch_save", "load_run",
    "load_trainable_state", "read_checkpoint", "save_run", "save_weights", "trainable_state", "truncate_metrics",
    "write_checkpoint",
]

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.previous.pt"
METRICS_NAME = "metrics.jsonl"
WEIGHTS_NAME = "model.safetensors"
BEST_NAME = "best.safetensors"
CONFIG_NAME = "config.json"
# 2: the optimiser is the caller's (its config is part of the trajectory), the model is built after seeding.
CHECKPOINT_VERSION = 2
# What every checkpoint of this version holds (a file without them is not one).
_CHECKPOINT_KEYS = {"version", "step", "trajectory", "model", "optimizer", "ranks", "world_size", "best"}


class DamagedRunError(CheckpointError, ValueError):
    """A run directory's checkpoint, weights or config cannot be read; the message names the file.

    A :class:`~reclip.clip.convert.CheckpointError` (what every unreadable weights file raises)
    and a ValueError (bad input)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. a full disk); the message says which one is intact."""


# -- the trainable state ------------------------------------------------------------------------
def _required_keys(model: nn.Module) -> set[str]:
    """Trainable parameters + persistent buffers of modules that own a trainable parameter (BN stats)."""
    persistent = set(model.state_dict().keys())
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    for mod_name, mod in model.named_modules():
        if any(p.requires_grad for p in mod.parameters(recurse=False)):
            for b, _ in mod.named_buffers(recurse=False):
                key = f"{mod_name}.{b}" if mod_name else b
                if key in persistent:
                    keys.add(key)
    return keys


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """CPU copies of ``model.trainable_state_dict()`` (or the full state dict without one).

    Raises ValueError when that dict misses a trainable parameter or a buffer of a module
    owning one (e.g. BN running statistics): resume would not be exact.
    """
    fn = getattr(model, "trainable_state_dict", None)
    state = fn() if callable(fn) else model.state_dict()
    missing = sorted(_required_keys(model) - set(state))
    if missing:
        raise ValueError(
            f"{type(model).__name__}.trainable_state_dict() misses {len(missing)} trainable tensor(s) "
            f"{missing[:8]}: include every parameter with requires_grad and the buffers of their modules"
        )
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def load_trainable_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a :func:`trainable_state` into ``model``; unknown or missing trainable keys raise.

    Uses the model's own ``load_trainable_state_dict`` when it has one (its checks apply).
    """
    own = getattr(model, "load_trainable_state_dict", None)
    if callable(own):
        own(dict(state))
        return
    result = model.load_state_dict(dict(state), strict=False)
    missing = sorted(set(result.missing_keys) & _required_keys(model))
    if result.unexpected_keys or missing:
        raise ValueError(
            f"trainable state does not fit {type(model).__name__}: unexpected keys "
            f"{sorted(result.unexpected_keys)[:8]}, missing trainable keys {missing[:8]}; was it saved from "
            "another model or configuration?"
        )


# -- files --------------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`reclip.files.atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_weights(state: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """A trainable state as safetensors, atomically."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(dict(state), str(tmp), metadata={"format": "reclip-trainable"}))


def write_checkpoint(payload: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` the checkpoint atomically, keeping the one it replaces as ``checkpoint.previous.pt``.

    Raises :class:`CheckpointWriteError` naming the file, the cause and the checkpoint left
    intact (the one being replaced is only moved once the new one is complete on disk).
    """
    previous = path.with_name(PREVIOUS_NAME)
    try:
        atomic_write(path, lambda tmp: torch.save(dict(payload), tmp), keep_previous=previous)
    except (OSError, RuntimeError) as err:  # the disk (torch's zip writer raises RuntimeError on ENOSPC)
        intact = next((p for p in (path, previous) if p.exists()), None)
        kept = (f"the last good checkpoint {intact} is intact: free space and continue with --resume" if intact
                else "no earlier checkpoint exists")
        raise CheckpointWriteError(f"could not write the checkpoint {path} ({type(err).__name__}: {err}); {kept}") from err


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file's contents; :class:`DamagedRunError` naming it if it is not a readable one."""
    try:
        scan_torch_file(path)  # declared storages and views checked before anything is allocated
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, garbage, empty file, a global the safe unpickler refuses
        raise DamagedRunError(f"{path} cannot be read ({type(err).__name__}: {str(err)[:200]})") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("version"), int) and ckpt["version"] != CHECKPOINT_VERSION:
        return ckpt  # another version's checkpoint: refused by _check_fits with its own message
    if not isinstance(ckpt, dict) or not _CHECKPOINT_KEYS <= set(ckpt):
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DamagedRunError(f"{path} is not a reclip training checkpoint (it holds {found})")
    return ckpt


def read_checkpoint(path: Path, *, resume: bool, trajectory: Mapping[str, Any], world_size: int
                    ) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: start from scratch), after checking it fits this run.

    ``path`` (``checkpoint.pt``) first, then ``checkpoint.previous.pt`` when ``path`` is
    missing or damaged (with a warning naming the damaged file). ``trajectory``: the
    values an exact resume needs unchanged (batch size, seed, optimiser, poly horizon,
    number of training images, ...), compared with the saved ones.
    """
    candidates = [p for p in (path, path.with_name(PREVIOUS_NAME)) if p.exists()]
    if not candidates:
        return None
    if not resume:
        raise FileExistsError(f"{candidates[0]} exists: pass resume=True (--resume) to continue it, or use another "
                              "run dir")
    damaged: list[str] = []
    for candidate in candidates:
        try:
            ckpt = _load_checkpoint(candidate)
        except DamagedRunError as err:
            damaged.append(str(err))
            continue
        _check_fits(candidate, ckpt, trajectory, world_size)
        if damaged:
            # set the damaged file aside, so the next checkpoint does not rotate it over this good one
            aside = path.with_name(path.name + ".damaged")
            os.replace(path, aside)
            warnings.warn(f"{'; '.join(damaged)}; kept as {aside}; resuming from {candidate} (step {ckpt['step']}) "
                          "instead", stacklevel=3)
        return ckpt
    raise DamagedRunError(f"no usable checkpoint to resume from: {'; '.join(damaged)}. Restore a copy, or start again "
                          f"without --resume in an empty run directory")


def _check_fits(path: Path, ckpt: Mapping[str, Any], trajectory: Mapping[str, Any], world_size: int) -> None:
    """Refuse to resume a checkpoint of another engine version, other settings or another process count."""
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: checkpoint version {ckpt.get('version')} is not {CHECKPOINT_VERSION} (written by another "
            "version of reclip, which initialised and optimised differently); start a new run directory"
        )
    changed = _differences(ckpt["trajectory"], dict(trajectory))
    if changed:
        raise ValueError(
            f"{path}: cannot resume with other training settings: {'; '.join(changed[:6])} (saved -> now); an exact "
            "resume needs the same values (set the poly horizon explicitly to extend a run's steps)"
        )
    if ckpt["world_size"] != world_size:
        raise ValueError(
            f"{path}: the run used {ckpt['world_size']} process(es), this one {world_size}; resume with the same "
            "number (the per-process random states and batch split depend on it)"
        )


def _differences(saved: Any, now: Any, where: str = "") -> list[str]:
    """The leaves where two nested dicts differ, as "key.sub: saved -> now" (keys of either side)."""
    if isinstance(saved, Mapping) and isinstance(now, Mapping):
        out: list[str] = []
        for key in sorted(set(saved) | set(now), key=str):
            out += _differences(saved.get(key, "(absent)"), now.get(key, "(absent)"), f"{where}{key}.")
        return out
    if saved == now:
        return []
    short = [repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..." for v in (saved, now)]
    return [f"{where.rstrip('.')}: {short[0]} -> {short[1]}"]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run wrote after its last checkpoint (they will be written again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    atomic_write_text(path, "".join(line + "\n" for line in kept))


# -- a finished run -----------------------------------------------------------------------------
class RunFiles(NamedTuple):
    """A finished run: its config.json, its trainable state (model.safetensors) and its folder."""

    config: dict[str, Any]
    state_dict: dict[str, Tensor]
    run_dir: Path


def save_run(run_dir: str | os.PathLike, config_dict: Mapping[str, Any], model: nn.Module) -> None:
    """Write RUN_DIR/config.json (``config_dict``, JSON) and RUN_DIR/model.safetensors (trainable state).

    Rank 0 only (a no-op on other ranks). Both files are written atomically.
    """
    if not is_rank0():
        return
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / CONFIG_NAME, dict(config_dict))
    save_weights(trainable_state(model), run_dir / WEIGHTS_NAME)


def load_run(run_dir: str | os.PathLike, model: nn.Module | None = None) -> RunFiles:
    """Read a run's config.json and model.safetensors; load the weights into ``model`` if given.

    The weights pass the checks every CLIP checkpoint passes (``reclip.clip.checks``):
    a safetensors header consistent with the file, within the size limit, and finite
    values; a refusal is a ``CheckpointError`` naming the file.
    """
    run_dir = Path(run_dir)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (run_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{run_dir} is not a finished training run: missing {missing} (a run writes model.safetensors when "
            "it ends and its caller config.json; resume an interrupted run with --resume)"
        )
    try:
        config = json.loads((run_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedRunError(f"{run_dir / CONFIG_NAME} is not valid JSON ({err}); restore it or train again") from None
    if not isinstance(config, dict):
        raise DamagedRunError(f"{run_dir / CONFIG_NAME} holds a {type(config).__name__}, not a run's settings")
    weights = run_dir / WEIGHTS_NAME
    try:
        state = load_safetensors(weights)
    except CheckpointError as err:  # truncated, foreign or inconsistent file
        raise DamagedRunError(f"{weights} cannot be read ({err}); the run's weights are damaged: restore them, or "
                              "train again (--resume rewrites them from checkpoint.pt)") from None
    check_finite(state, weights, fix="the training diverged (lower the learning rate, check the data) or the file "
                 "is damaged: train again or use another run")
    if model is not None:
        load_trainable_state(model, state)
    return RunFiles(config, state, run_dir)
