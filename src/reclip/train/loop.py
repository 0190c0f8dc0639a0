"""The training loop shared by every stage, read top to bottom.

    result = train(lambda: Rectifier(clip, queries, names), loss_fn, UnlabeledTrainSet(...),
                   TrainConfig(steps=2000, batch_size=8), run_dir, optimizer=SGDConfig(lr=0.01))
    save_run(run_dir, {"method": "reclip++", ...}, result.model)   # config.json + weights

``build_model()`` makes the model AFTER every generator is seeded (so the same seed gives
the same initial parameters); ``loss_fn(model, batch) -> (loss, metrics)``: ``batch`` is
the collated dict of the dataset's items moved to the device; ``loss`` a scalar (the
MEAN over the batch: DDP averages gradients over ranks, so per-rank means of equal-size
batches give the global mean), ``metrics`` a dict of floats / scalar tensors (same keys
on every rank). The loss must stay connected to every trainable parameter even when a
batch has nothing to learn (e.g. ``0 * logits.sum()``): skipping a step on one rank
would stall the others.

Design (the "why"):

- Seeding: every generator (Python, numpy, torch, CUDA) is seeded from ``config.seed``
  before ``build_model()`` (stream :data:`INIT_STREAM`, the same on every rank, so every
  rank builds the same model), then from (seed, :data:`TRAIN_STREAM`, rank) before the
  first step, so initialisation and training never share random numbers. Resume
  restores the saved states.
- Optimiser: the caller's (:mod:`reclip.train.optim`: SGD + poly for ReCLIP++, AdamW for
  MAFT); the engine builds it over the trainable parameters and sets each group's lr to
  its base lr times the schedule's factor before every step.
- Processes: one, or one per device under ``torchrun`` (DDP; gloo on CPU, nccl on
  CUDA). ``batch_size`` is GLOBAL: each of the R ranks takes ``batch_size / R`` images
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
- Resume is exact: the checkpoint (:mod:`reclip.train.checkpoint`) holds the trainable
  state (parameters AND buffers of the modules that own trainable parameters, e.g. BN
  running statistics), the optimiser (momentum), the step, the RNG states (torch, CUDA,
  numpy, python) of EVERY rank, and the data position, which is a pure function of
  (seed, step, batch size, world size); the DataLoader gets its own generator so creating
  one mid-epoch consumes no global randomness, and augmentations are seeded per sample
  (:func:`reclip.data.augment.sample_rng`). A run resumed from step k reaches bit-for-bit
  the parameters of an uninterrupted run (same processes, same library versions).
- Only rank 0 writes: ``metrics.jsonl`` (one JSON object appended per line; lines a
  killed run wrote after its last checkpoint are dropped on resume), ``checkpoint.pt``
  every ``checkpoint_every`` steps and at the end, ``model.safetensors`` (trainable state
  only) at the end; the last two atomically.
- Validation is optional (``validate(model) -> dict``, off by default), runs on rank 0 in
  eval mode under no_grad with the RNG states restored afterwards (so it does not change
  training), and picks a model only when ``select_best`` names a metric (then
  ``best.safetensors`` is written besides the final ``model.safetensors``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from reclip.files import remove_stale_temporaries
from reclip.train.checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    METRICS_NAME,
    WEIGHTS_NAME,
    load_trainable_state,
    read_checkpoint,
    save_weights,
    trainable_state,
    truncate_metrics,
    write_checkpoint,
)
from reclip.train.distributed import Processes, gather, on_rank0, setup_processes, to_device
from reclip.train.optim import SGDConfig, describe
from reclip.train.rng import rng_state, seed_everything, set_rng_state

__all__ = ["TrainConfig", "TrainResult", "epoch_indices", "steps_per_epoch", "train"]

LossFn = Callable[[nn.Module, dict[str, Any]], tuple[Tensor, Mapping[str, Any]]]
# Random streams of one seed (reclip.train.rng.seed_everything): model initialisation, then training per rank.
INIT_STREAM = 0
TRAIN_STREAM = 1


@dataclass(frozen=True)
class TrainConfig:
    """How one training run proceeds (the optimiser is the caller's, see :func:`train`).

    Attributes:
        steps: optimiser steps in total.
        batch_size: GLOBAL images per step (split evenly over the processes).
        checkpoint_every: steps between checkpoints (one is always written at the end).
        log_every: steps between metrics.jsonl lines (losses averaged over the window
            and the processes).
        seed: model initialisation, data order, per-sample augmentation and the global
            RNGs (rank r trains with a seed derived from (seed, r)).
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
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainConfig.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.workers < 0 or self.validate_every < 0:
            raise ValueError("TrainConfig.workers and validate_every must be >= 0")


# TrainConfig fields that change the trajectory: a resumed run must use the same values.
_TRAJECTORY_FIELDS = ("batch_size", "seed", "amp", "sync_bn")


@dataclass
class TrainResult:
    """What a finished (or already finished) run reached, and the trained model."""

    step: int
    run_dir: Path
    last_metrics: dict[str, Any]
    best: dict[str, Any] | None
    model: nn.Module


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


# -- helpers ----------------------------------------------------------------------------------
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


def _validate(model: nn.Module, validate: Callable[[nn.Module], Mapping[str, Any]]) -> dict[str, Any]:
    """Run ``validate`` in eval mode under no_grad without disturbing any RNG."""
    state = rng_state()
    model.eval()
    try:
        with torch.no_grad():
            result = {k: (v.item() if isinstance(v, Tensor) else v) for k, v in validate(model).items()}
    finally:
        model.train()
        set_rng_state(state)
    return result


def _run_validation(
    model: nn.Module,
    validate: Callable[[nn.Module], Mapping[str, Any]],
    config: TrainConfig,
    step: int,
    best: dict[str, Any] | None,
    procs: Processes,
    run_dir: Path,
) -> dict[str, Any] | None:
    """Validate on rank 0 (the others wait); keep best.safetensors only when select_best asks."""
    if procs.rank == 0:
        result = _validate(model, validate)
        with open(run_dir / METRICS_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "validation": result}) + "\n")
        if config.select_best is not None:
            if config.select_best not in result:
                raise KeyError(
                    f"select_best={config.select_best!r} is not among the validation metrics {sorted(result)}"
                )
            value = float(result[config.select_best])
            if best is None or value > best["value"]:
                best = {"step": step, "metric": config.select_best, "value": value}
                save_weights(trainable_state(model), run_dir / BEST_NAME)
    if procs.world_size > 1:
        best = gather(best, procs.world_size)[0]  # also the barrier that keeps the ranks together
    return best


# -- the loop -----------------------------------------------------------------------------------
def train(
    build_model: Callable[[], nn.Module],
    loss_fn: LossFn,
    dataset: Dataset,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    optimizer: Any = SGDConfig(),
    run_settings: Mapping[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    validate: Callable[[nn.Module], Mapping[str, Any]] | None = None,
) -> TrainResult:
    """Train the model that ``build_model()`` makes with ``loss_fn`` on ``dataset`` (see the module doc).

    Args:
        build_model: makes the model, called once after the generators are seeded; its
            trainable parameters are those with ``requires_grad``. Moved to the device.
        loss_fn: ``loss_fn(model, batch) -> (scalar loss, metrics dict)``.
        dataset: items are dicts of tensors (and strings / ints); ``set_epoch(epoch)`` is
            called before each epoch when the dataset has it.
        config: steps, batch, seed, processes, checkpoints.
        run_dir: where metrics.jsonl, checkpoint.pt and model.safetensors go.
        optimizer: an optimiser config of :mod:`reclip.train.optim` (``build(model)`` and a
            ``schedule``); default SGD + poly, the official ReCLIP++ settings.
        run_settings: what else defines the run (the model's configuration, the classes,
            the CLIP, the augmentation: plain values): recorded in the checkpoint, and a
            resume with other values is refused like one with another optimiser.
        resume: continue from RUN_DIR/checkpoint.pt (start from scratch when there is
            none). Without it an existing checkpoint is an error (no silent overwrite).
        progress: tqdm bar on rank 0.
        validate: optional ``validate(model) -> metrics`` on rank 0 (see TrainConfig).

    Returns:
        TrainResult (step reached, run_dir, last logged metrics, best validation or None,
        the trained model).
    """
    if isinstance(build_model, nn.Module):
        raise TypeError(f"train() takes a function that builds the model (so that it is built after seeding), "
                        f"not a {type(build_model).__name__} instance: pass e.g. `lambda: MyModel(...)`")
    run_dir = Path(run_dir)
    ckpt_path, metrics_path = run_dir / CHECKPOINT_NAME, run_dir / METRICS_NAME
    procs = setup_processes(config.device)
    try:
        if config.batch_size % procs.world_size:
            raise ValueError(
                f"batch_size {config.batch_size} is the GLOBAL batch and must be divisible by the "
                f"{procs.world_size} processes"
            )
        if procs.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(run_dir)  # what a killed writer of this run left
        spe = steps_per_epoch(len(dataset), config.batch_size)
        horizon = optimizer.schedule.resolve_horizon(config.steps, spe)
        # the optimiser with its horizon resolved: an explicit horizon equal to the resolved one is the same run,
        # and a constant schedule (power 0) has none, so such a run may be extended
        recorded = horizon if optimizer.schedule.power else None
        resolved = dataclasses.replace(optimizer, schedule=dataclasses.replace(optimizer.schedule, horizon=recorded))
        trajectory = {**{f: getattr(config, f) for f in _TRAJECTORY_FIELDS}, "optimizer": describe(resolved),
                      "training images": len(dataset)}
        clash = sorted(set(trajectory) & set(run_settings or {}))
        if clash:
            raise ValueError(f"run_settings may not redefine the engine's own settings {clash}")
        trajectory.update(run_settings or {})
        # rank 0 reads the checkpoint and sends it to the others (no shared file system needed)
        ckpt = on_rank0(lambda: read_checkpoint(ckpt_path, resume=resume, trajectory=trajectory,
                                                world_size=procs.world_size), procs)

        seed_everything(config.seed, INIT_STREAM)  # the same on every rank: every rank builds the same model
        model = build_model().to(procs.device)
        if config.sync_bn and procs.world_size > 1:
            if procs.device.type != "cuda":
                raise ValueError("TrainConfig.sync_bn needs CUDA (SyncBatchNorm has no CPU implementation)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        opt = optimizer.build(model)
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
        trainable_state(model)  # fail now, not at the first checkpoint, if the state is incomplete

        step, best = 0, None
        window: dict[str, float] = {}  # metric sums since the last log line, and their step count
        count = 0
        if ckpt is not None:
            load_trainable_state(model, ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            step, best = ckpt["step"], ckpt["best"]
            rank_state = ckpt["ranks"][procs.rank]
            set_rng_state(rank_state["rng"])
            window, count = dict(rank_state["window"]), rank_state["count"]
            if procs.rank == 0:
                truncate_metrics(metrics_path, step)
        else:
            seed_everything(config.seed, TRAIN_STREAM, procs.rank)
            if procs.rank == 0 and metrics_path.exists():
                metrics_path.unlink()

        model.train()
        _warn_frozen_in_train_mode(model)
        wrapped: nn.Module = _LossModule(model, loss_fn)
        if procs.world_size > 1:
            wrapped = nn.parallel.DistributedDataParallel(
                wrapped, device_ids=[procs.device.index] if procs.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters)
        autocast = config.amp and procs.device.type == "cuda"

        bar = None
        if progress and procs.rank == 0 and step < config.steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)
        t_window = time.perf_counter()
        last: dict[str, Any] = {}
        local_batch = config.batch_size // procs.world_size
        while step < config.steps:
            epoch, offset = divmod(step, spe)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            indices = epoch_indices(dataset, epoch=epoch, seed=config.seed, rank=procs.rank,
                                    world_size=procs.world_size, batch_size=config.batch_size)
            loader = DataLoader(
                dataset, batch_size=local_batch, sampler=indices[offset * local_batch:], num_workers=config.workers,
                drop_last=True, pin_memory=procs.device.type == "cuda",
                # own generator: building a loader mid-epoch on resume must not consume global randomness
                generator=torch.Generator().manual_seed(config.seed * 100003 + epoch),
            )
            for batch in loader:
                factor = optimizer.schedule.factor(step, spe, horizon)
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * factor
                lr = opt.param_groups[0]["lr"]
                batch = to_device(batch, procs.device)
                with torch.autocast(procs.device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss, metrics = wrapped(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {step} (epoch {epoch})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1

                values = {"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}}
                for k, v in values.items():
                    window[k] = window.get(k, 0.0) + v
                count += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
                if step % config.log_every == 0 or step == config.steps:
                    sums = gather(window, procs.world_size)
                    elapsed = time.perf_counter() - t_window
                    last = {"step": step, "epoch": epoch, "lr": lr,
                            **{k: sum(s.get(k, 0.0) for s in sums) / (count * len(sums)) for k in window},
                            "images_per_s": count * config.batch_size / max(elapsed, 1e-9)}
                    if procs.rank == 0:
                        with open(metrics_path, "a", encoding="utf-8") as f:
                            f.write(json.dumps(last) + "\n")
                    window, count, t_window = {}, 0, time.perf_counter()
                if validate is not None and (
                    (config.validate_every and step % config.validate_every == 0) or step == config.steps
                ):
                    best = _run_validation(model, validate, config, step, best, procs, run_dir)
                if step % config.checkpoint_every == 0 or step == config.steps:
                    ranks = gather({"rng": rng_state(), "window": window, "count": count}, procs.world_size)
                    if procs.rank == 0:
                        write_checkpoint({
                            "version": CHECKPOINT_VERSION, "step": step, "trajectory": trajectory,
                            # where the data order continues (a function of the step; recorded for readers)
                            "sampler": {"seed": config.seed, "epoch": step // spe, "offset": step % spe},
                            "model": trainable_state(model), "optimizer": opt.state_dict(), "ranks": ranks,
                            "config": dataclasses.asdict(config), "world_size": procs.world_size, "best": best,
                        }, ckpt_path)
                if step >= config.steps:
                    break
        if bar is not None:
            bar.close()
        if procs.rank == 0:
            save_weights(trainable_state(model), run_dir / WEIGHTS_NAME)
        if procs.world_size > 1:
            dist.barrier()
        return TrainResult(step=step, run_dir=run_dir, last_metrics=last, best=best, model=model)
    finally:
        procs.close()
