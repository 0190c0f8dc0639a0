"""The training engine shared by every stage: plain functions, read top to bottom.

    config = TrainConfig(steps=2000, batch_size=1, lr=0.01)
    train(model, loss_fn, UnlabeledTrainSet(...), config, run_dir)   # or under torchrun
    save_run(run_dir, {"method": "reclip++", ...}, model)            # config.json + weights

``loss_fn(model, batch) -> (loss, metrics)``: ``batch`` is the collated dict of the
dataset's items moved to the device; ``loss`` a scalar (the MEAN over the batch: DDP
averages gradients over ranks, so per-rank means of equal-size batches give the global
mean), ``metrics`` a dict of floats / scalar tensors (same keys on every rank). The
loss must stay connected to every trainable parameter even when a batch has nothing to
learn (e.g. ``0 * logits.sum()``): skipping a step on one rank would stall the others.

Design (the "why"):

- Optimiser: SGD over ``requires_grad`` parameters, weight decay on all of them, poly
  schedule ``lr = base * (1 - t / horizon) ** power`` (official: lr 0.01, momentum 0.9,
  wd 5e-4, power 0.9; the official loop updates lr once per EPOCH with a horizon longer
  than the run, e.g. VOC 50 epochs of a 200-epoch poly: ``poly_unit="epoch"``).
- Processes: one process, or one per device under ``torchrun`` (DDP; gloo on CPU, nccl
  on CUDA). ``batch_size`` is GLOBAL: each of the R ranks takes ``batch_size / R`` images
  per step. The epoch order is a permutation seeded by (seed, epoch) (DistributedSampler:
  rank r takes positions r, r + R, ...), so step k consumes the same images
  ``perm[k B:(k + 1) B]`` whatever R is, and R processes reach the parameters of one
  process (floating-point sums aside) unless the model has batch-statistics layers.
- BatchNorm: plain BN (no SyncBatchNorm; it has no CPU implementation) normalises with
  the statistics of each rank's local batch. With batch 1 (the official setting) that is
  ONE image: BN standardises each channel over that image's h * w positions - an
  instance norm during training - while its running statistics (momentum 0.1) average
  over images and are what evaluation (``model.eval()``) uses. DDP broadcasts rank 0's
  buffers (running statistics) at every forward. ``sync_bn=True`` converts to
  SyncBatchNorm on CUDA for global-batch statistics.
- Train / eval mode: the engine calls ``model.train()`` once before training (and again
  after validation); models keep their FROZEN parts (CLIP) in eval mode themselves (a
  ``train()`` override), and compute them under no_grad. The engine warns when a module
  without trainable parameters has dropout or batch norm in training mode.
- Resume is exact: the checkpoint holds the trainable state (parameters AND buffers of
  the modules that own trainable parameters, e.g. BN running statistics), the optimiser
  (momentum), the step, the RNG states (torch, CUDA, numpy, python) of EVERY rank, and
  the data position, which is a pure function of (seed, step, batch size, world size);
  the DataLoader gets its own generator so creating one mid-epoch consumes no global
  randomness, and augmentations are seeded per sample (:func:`reclip.data.augment.sample_rng`).
  A run resumed from step k reaches bit-for-bit the parameters of an uninterrupted run
  (same processes, same library versions).
- Only rank 0 writes: ``metrics.jsonl`` (one JSON object per line), ``checkpoint.pt``
  (atomic: temporary file + fsync + rename, so a crash while writing leaves the previous
  checkpoint) every ``checkpoint_every`` steps and at the end, ``model.safetensors``
  (trainable state only) at the end.
- Validation is optional (``validate(model) -> dict``, off by default), runs on rank 0 in
  eval mode under no_grad with the RNG states restored afterwards (so it does not change
  training), and picks a model only when ``select_best`` names a metric (then
  ``best.safetensors`` is written besides the final ``model.safetensors``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from reclip.files import atomic_write

__all__ = [
    "TrainConfig",
    "poly_lr",
    "build_optimizer",
    "steps_per_epoch",
    "epoch_indices",
    "trainable_state",
    "load_trainable_state",
    "atomic_torch_save",
    "TrainResult",
    "train",
    "RunFiles",
    "save_run",
    "load_run",
]

LossFn = Callable[[nn.Module, dict[str, Any]], tuple[Tensor, Mapping[str, Any]]]
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
WEIGHTS_NAME = "model.safetensors"
BEST_NAME = "best.safetensors"
CONFIG_NAME = "config.json"
CHECKPOINT_VERSION = 1


# -- configuration ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (official ReCLIP++ values as defaults).

    Attributes:
        steps: optimiser steps in total.
        batch_size: GLOBAL images per step (split evenly over the processes).
        lr: base learning rate (official 0.01; Cityscapes 0.16 at batch 16).
        momentum, weight_decay: SGD (official 0.9, 5e-4).
        poly_power: poly exponent (official 0.9).
        poly_horizon: steps (or epochs, see ``poly_unit``) at which the poly lr reaches 0;
            None = ``steps`` (resp. the number of epochs of the run).
        poly_unit: "step" (lr updated every step) or "epoch" (the official: once per
            epoch, t = epoch index).
        checkpoint_every: steps between checkpoints (one is always written at the end).
        log_every: steps between metrics.jsonl lines (losses averaged over the window
            and the processes).
        seed: data order, per-sample augmentation and the global RNGs (rank r uses a
            seed derived from (seed, r)).
        workers: DataLoader worker processes per rank.
        amp: bf16 autocast of the forward pass on CUDA (ignored on CPU).
        device: "auto" (CUDA rank-local device when available, else CPU), "cpu", "cuda".
        sync_bn: SyncBatchNorm across ranks (CUDA only).
        find_unused_parameters: DDP option for models whose forward skips some
            trainable parameters.
        validate_every: steps between validations (0: only at the end, when a
            ``validate`` function is given).
        select_best: validation metric (higher is better) whose best model is also
            saved as best.safetensors; None (default): validation never picks a model.
    """

    steps: int
    batch_size: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    poly_horizon: int | None = None
    poly_unit: str = "step"
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    workers: int = 0
    amp: bool = False
    device: str = "auto"
    sync_bn: bool = False
    find_unused_parameters: bool = False
    validate_every: int = 0
    select_best: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.poly_unit not in ("step", "epoch"):
            raise ValueError(f"TrainConfig.poly_unit must be 'step' or 'epoch', got {self.poly_unit!r}")
        if self.poly_horizon is not None and self.poly_horizon <= 0:
            raise ValueError(f"TrainConfig.poly_horizon must be positive or None, got {self.poly_horizon}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainConfig.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.workers < 0 or self.validate_every < 0:
            raise ValueError("TrainConfig.workers and validate_every must be >= 0")


# Fields that change the trajectory: a resumed run must use the same values.
_TRAJECTORY_FIELDS = ("batch_size", "lr", "momentum", "weight_decay", "poly_power", "poly_unit", "seed", "amp",
                      "sync_bn")


# -- schedule and optimiser -------------------------------------------------------------------
def poly_lr(t: int, *, base_lr: float, horizon: int, power: float) -> float:
    """Poly schedule: ``base_lr * (1 - min(t, horizon) / horizon) ** power``."""
    return base_lr * (1.0 - min(t, horizon) / horizon) ** power


def build_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over the parameters that require grad (official: every one gets weight decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: the model has no parameter with requires_grad=True; nothing to train")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


# -- data order -------------------------------------------------------------------------------
def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Full global batches in one pass over the data (the incomplete last batch is dropped)."""
    if num_samples < batch_size:
        raise ValueError(f"the training set has {num_samples} image(s), fewer than one batch of {batch_size}")
    return num_samples // batch_size


def epoch_indices(dataset: Dataset, *, epoch: int, seed: int, rank: int, world_size: int, batch_size: int) -> list[int]:
    """This rank's sample indices for one epoch, truncated to full steps.

    DistributedSampler(shuffle, seed) order: permutation seeded by seed + epoch, rank r
    takes positions r, r + R, ...; the rank's step k is its positions [k b, (k + 1) b)
    with b = batch_size / R, so all ranks together take perm[k B:(k + 1) B].
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    local = batch_size // world_size
    return list(sampler)[: steps_per_epoch(len(dataset), batch_size) * local]


# -- trainable state --------------------------------------------------------------------------
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
            f"{sorted(result.unexpected_keys)[:8]}, missing trainable keys {missing[:8]}; was it saved from another model or configuration?"
        )


# -- files --------------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file renamed over ``path``."""
    atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


def _save_weights(state: Mapping[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(dict(state), str(tmp), metadata={"format": "reclip-trainable"}))


class RunFiles(NamedTuple):
    """A finished run: its config.json and its trainable state (model.safetensors)."""

    config: dict[str, Any]
    state_dict: dict[str, Tensor]


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_run(run_dir: str | os.PathLike, config_dict: Mapping[str, Any], model: nn.Module) -> None:
    """Write RUN_DIR/config.json (``config_dict``, JSON) and RUN_DIR/model.safetensors (trainable state).

    Rank 0 only (a no-op on other ranks). Both files are written atomically.
    """
    if not _is_rank0():
        return
    run_dir = Path(run_dir)
    text = json.dumps(dict(config_dict), indent=2) + "\n"
    atomic_write(run_dir / CONFIG_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    _save_weights(trainable_state(model), run_dir / WEIGHTS_NAME)


def load_run(run_dir: str | os.PathLike, model: nn.Module | None = None) -> RunFiles:
    """Read a run's config.json and model.safetensors; load the weights into ``model`` if given."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (run_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{run_dir} is not a finished training run: missing {missing} (a run writes model.safetensors when "
            "it ends and its caller config.json; resume an interrupted run with --resume)"
        )
    config = json.loads((run_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    state = load_file(str(run_dir / WEIGHTS_NAME))
    if model is not None:
        load_trainable_state(model, state)
    return RunFiles(config, state)


# -- RNG states ---------------------------------------------------------------------------------
def _seed_everything(seed: int, rank: int) -> None:
    value = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # also seeds every CUDA device


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# -- processes ----------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int
    world_size: int
    device: torch.device
    created_group: bool


def _setup_distributed(device: str) -> _Dist:
    """Join the process group (already initialised, or from torchrun's environment) or run alone."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TrainConfig.device='cuda' but CUDA is not available")
    created = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")  # env:// from torchrun
        created = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return _Dist(rank, world, torch.device("cuda", local_rank), created)
    return _Dist(rank, world, torch.device("cpu"), created)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class _LossModule(nn.Module):
    """model + loss_fn as one module, so DDP's forward (which prepares the gradient sync)
    runs whatever methods loss_fn calls (e.g. ``forward_train``)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Mapping[str, Any]]:
        return self.loss_fn(self.model, batch)


def _warn_frozen_in_train_mode(model: nn.Module) -> None:
    """Warn about frozen sub-trees (parameters, none trainable) left in training mode with
    dropout or batch norm inside: their outputs would change with model.train()."""
    culprits: list[str] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in culprits):
            continue
        params = list(m.parameters())
        if not params or any(p.requires_grad for p in params):
            continue
        noisy = any(sub.training and (isinstance(sub, nn.modules.batchnorm._BatchNorm)
                                      or (isinstance(sub, nn.Dropout) and sub.p > 0)) for sub in m.modules())
        if noisy:
            culprits.append(name)
    if culprits:
        warnings.warn(
            f"frozen module(s) {culprits[:3]} have dropout or batch norm in training mode after model.train(): "
            "frozen parts should stay in eval mode (override train() in the model)",
            stacklevel=3,
        )


# -- the loop -----------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a finished (or already finished) run reached."""

    step: int
    run_dir: Path
    last_metrics: dict[str, Any]
    best: dict[str, Any] | None


def _resolve_horizon(config: TrainConfig, spe: int) -> int:
    if config.poly_horizon is not None:
        return config.poly_horizon
    return config.steps if config.poly_unit == "step" else math.ceil(config.steps / spe)


def _lr_at(step: int, config: TrainConfig, spe: int, horizon: int) -> float:
    t = step if config.poly_unit == "step" else step // spe
    return poly_lr(t, base_lr=config.lr, horizon=horizon, power=config.poly_power)


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _read_checkpoint(
    path: Path, resume: bool, config: TrainConfig, world: int, horizon: int, num_samples: int
) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: start from scratch), after checking it fits this run."""
    if not path.exists():
        return None
    if not resume:
        raise FileExistsError(f"{path} exists: pass resume=True (--resume) to continue it, or use another run dir")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')} is not {CHECKPOINT_VERSION}")
    saved = ckpt["config"]
    changed = {f: (saved.get(f), getattr(config, f)) for f in _TRAJECTORY_FIELDS if saved.get(f) != getattr(config, f)}
    if ckpt["horizon"] != horizon:
        changed["poly horizon"] = (ckpt["horizon"], horizon)
    if ckpt["num_samples"] != num_samples:  # another image list or hypothesis file: another data order
        changed["training images"] = (ckpt["num_samples"], num_samples)
    if changed:
        raise ValueError(
            f"{path}: cannot resume with other training settings {changed} (saved, now); an exact resume needs "
            "the same values (set poly_horizon explicitly to extend a run's steps)"
        )
    if ckpt["world_size"] != world:
        raise ValueError(
            f"{path}: the run used {ckpt['world_size']} process(es), this one {world}; resume with the same number "
            "(the per-process random states and batch split depend on it)"
        )
    return ckpt


def _on_rank0(fn: Callable[[], Any], env: _Dist) -> Any:
    """fn() on rank 0, its result (or its exception) broadcast to every rank."""
    if env.world_size == 1:
        return fn()
    box: list[Any] = [None]
    if env.rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # re-raised on every rank, so no rank waits for the others forever
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def _truncate_metrics(path: Path, step: int) -> None:
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
    text = "".join(line + "\n" for line in kept)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _validate(model: nn.Module, validate: Callable[[nn.Module], Mapping[str, Any]]) -> dict[str, Any]:
    """Run ``validate`` in eval mode under no_grad without disturbing any RNG."""
    state = _rng_state()
    model.eval()
    try:
        with torch.no_grad():
            result = {k: (v.item() if isinstance(v, Tensor) else v) for k, v in validate(model).items()}
    finally:
        model.train()
        _set_rng_state(state)
    return result


def train(
    model: nn.Module,
    loss_fn: LossFn,
    dataset: Dataset,
    config: TrainConfig,
    run_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    validate: Callable[[nn.Module], Mapping[str, Any]] | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters with ``loss_fn`` on ``dataset`` (see the module doc).

    Args:
        model: the model (moved to the device in place); trainable = ``requires_grad``.
        loss_fn: ``loss_fn(model, batch) -> (scalar loss, metrics dict)``.
        dataset: items are dicts of tensors (and strings / ints); ``set_epoch(epoch)`` is
            called before each epoch when the dataset has it.
        config: the run's hyper-parameters.
        run_dir: where metrics.jsonl, checkpoint.pt and model.safetensors go.
        resume: continue from RUN_DIR/checkpoint.pt (start from scratch when there is
            none). Without it an existing checkpoint is an error (no silent overwrite).
        progress: tqdm bar on rank 0.
        validate: optional ``validate(model) -> metrics`` on rank 0 (see TrainConfig).

    Returns:
        TrainResult (step reached, run_dir, last logged metrics, best validation or None).
    """
    run_dir = Path(run_dir)
    ckpt_path, metrics_path = run_dir / CHECKPOINT_NAME, run_dir / METRICS_NAME
    env = _setup_distributed(config.device)
    try:
        if config.batch_size % env.world_size:
            raise ValueError(
                f"batch_size {config.batch_size} is the GLOBAL batch and must be divisible by the "
                f"{env.world_size} processes"
            )
        if env.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        spe = steps_per_epoch(len(dataset), config.batch_size)
        horizon = _resolve_horizon(config, spe)
        # rank 0 reads the checkpoint and sends it to the others (no shared file system needed)
        ckpt = _on_rank0(
            lambda: _read_checkpoint(ckpt_path, resume, config, env.world_size, horizon, len(dataset)), env)

        model.to(env.device)
        if config.sync_bn and env.world_size > 1:
            if env.device.type != "cuda":
                raise ValueError("TrainConfig.sync_bn needs CUDA (SyncBatchNorm has no CPU implementation)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        optimizer = build_optimizer(model, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        trainable_state(model)  # fail now, not at the first checkpoint, if the state is incomplete

        step, best = 0, None
        window: dict[str, float] = {}  # metric sums since the last log line, and their step count
        count = 0
        if ckpt is not None:
            load_trainable_state(model, ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step, best = ckpt["step"], ckpt["best"]
            rank_state = ckpt["ranks"][env.rank]
            _set_rng_state(rank_state["rng"])
            window, count = dict(rank_state["window"]), rank_state["count"]
            if env.rank == 0:
                _truncate_metrics(metrics_path, step)
        else:
            _seed_everything(config.seed, env.rank)
            if env.rank == 0 and metrics_path.exists():
                metrics_path.unlink()

        model.train()
        _warn_frozen_in_train_mode(model)
        wrapped: nn.Module = _LossModule(model, loss_fn)
        if env.world_size > 1:
            wrapped = nn.parallel.DistributedDataParallel(
                wrapped, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters)
        autocast = config.amp and env.device.type == "cuda"

        bar = None
        if progress and env.rank == 0 and step < config.steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)
        t_window = time.perf_counter()
        last: dict[str, Any] = {}
        local_batch = config.batch_size // env.world_size
        while step < config.steps:
            epoch, offset = divmod(step, spe)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            indices = epoch_indices(dataset, epoch=epoch, seed=config.seed, rank=env.rank,
                                    world_size=env.world_size, batch_size=config.batch_size)
            loader = DataLoader(
                dataset, batch_size=local_batch, sampler=indices[offset * local_batch:], num_workers=config.workers,
                drop_last=True, pin_memory=env.device.type == "cuda",
                # own generator: building a loader mid-epoch on resume must not consume global randomness
                generator=torch.Generator().manual_seed(config.seed * 100003 + epoch),
            )
            for batch in loader:
                lr = _lr_at(step, config, spe, horizon)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = _to_device(batch, env.device)
                with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss, metrics = wrapped(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {step} (epoch {epoch})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1

                values = {"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}}
                for k, v in values.items():
                    window[k] = window.get(k, 0.0) + v
                count += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
                if step % config.log_every == 0 or step == config.steps:
                    sums = _gather(window, env.world_size)
                    elapsed = time.perf_counter() - t_window
                    last = {"step": step, "epoch": epoch, "lr": lr,
                            **{k: sum(s.get(k, 0.0) for s in sums) / (count * len(sums)) for k in window},
                            "images_per_s": count * config.batch_size / max(elapsed, 1e-9)}
                    if env.rank == 0:
                        with open(metrics_path, "a", encoding="utf-8") as f:
                            f.write(json.dumps(last) + "\n")
                    window, count, t_window = {}, 0, time.perf_counter()
                if validate is not None and (
                    (config.validate_every and step % config.validate_every == 0) or step == config.steps
                ):
                    best = _run_validation(model, validate, config, step, best, env, run_dir, metrics_path)
                if step % config.checkpoint_every == 0 or step == config.steps:
                    ranks = _gather({"rng": _rng_state(), "window": window, "count": count}, env.world_size)
                    if env.rank == 0:
                        atomic_torch_save({
                            "version": CHECKPOINT_VERSION, "step": step,
                            # where the data order continues (a function of the step; recorded for readers)
                            "sampler": {"seed": config.seed, "epoch": step // spe, "offset": step % spe},
                            "num_samples": len(dataset), "model": trainable_state(model),
                            "optimizer": optimizer.state_dict(), "ranks": ranks, "config": dataclasses.asdict(config),
                            "horizon": horizon, "world_size": env.world_size, "best": best,
                        }, ckpt_path)
                if step >= config.steps:
                    break
        if bar is not None:
            bar.close()
        if env.rank == 0:
            _save_weights(trainable_state(model), run_dir / WEIGHTS_NAME)
        if env.world_size > 1:
            dist.barrier()
        return TrainResult(step=step, run_dir=run_dir, last_metrics=last, best=best)
    finally:
        if env.created_group and dist.is_initialized():
            dist.destroy_process_group()


def _run_validation(
    model: nn.Module,
    validate: Callable[[nn.Module], Mapping[str, Any]],
    config: TrainConfig,
    step: int,
    best: dict[str, Any] | None,
    env: _Dist,
    run_dir: Path,
    metrics_path: Path,
) -> dict[str, Any] | None:
    """Validate on rank 0 (the others wait); keep best.safetensors only when select_best asks."""
    if env.rank == 0:
        result = _validate(model, validate)
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "validation": result}) + "\n")
        if config.select_best is not None:
            if config.select_best not in result:
                raise KeyError(
                    f"select_best={config.select_best!r} is not among the validation metrics {sorted(result)}"
                )
            value = float(result[config.select_best])
            if best is None or value > best["value"]:
                best = {"step": step, "metric": config.select_best, "value": value}
                _save_weights(trainable_state(model), run_dir / BEST_NAME)
    if env.world_size > 1:
        best = _gather(best, env.world_size)[0]  # also the barrier that keeps the ranks together
    return best
