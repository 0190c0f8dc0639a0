"""Processes: one, or one per device under ``torchrun`` (DDP; gloo on CPU, nccl on CUDA).

Training runs DDP on them; evaluation, hypotheses and file segmentation split their
images over them (:func:`shard`): rank r takes the r-th contiguous block, and the
per-rank results are gathered in rank order, which is dataset order.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Processes", "current_processes", "free_port", "gather", "is_rank0", "on_rank0", "setup_processes", "shard",
           "to_device"]


@dataclass
class Processes:
    """This process's place: rank, world size, device, and whether it created the process group."""

    rank: int
    world_size: int
    device: torch.device
    created_group: bool

    def close(self) -> None:
        """Leave the process group this process created (a no-op otherwise)."""
        if self.created_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_processes(device: str) -> Processes:
    """Join the process group (already initialised, or from torchrun's environment) or run alone.

    ``device``: "auto" (the rank-local CUDA device when available, else CPU), "cpu" or "cuda".
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available")
    created = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")  # env:// from torchrun
        created = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return Processes(rank, world, torch.device("cuda", local_rank), created)
    return Processes(rank, world, torch.device("cpu"), created)


def current_processes() -> Processes:
    """This process's place in an initialised process group (rank, world size), or a single
    process; ``device`` is CPU and ``created_group`` False (the caller that joined owns it)."""
    if dist.is_available() and dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), False)
    return Processes(0, 1, torch.device("cpu"), False)


def shard(count: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s share of ``count`` items: the contiguous block
    ``[rank * count // world_size, (rank + 1) * count // world_size)``.

    Every item is in exactly one block, blocks differ in size by at most one (any
    ``count``, also fewer items than ranks: some blocks are then empty), and the blocks
    in rank order are the items in order, so results gathered in rank order are in
    dataset order.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return range(rank * count // world_size, (rank + 1) * count // world_size)


def is_rank0() -> bool:
    """True in a single process and on rank 0 of a process group (or of torchrun's processes,
    read from ``RANK`` once the group is gone)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def gather(obj: Any, world_size: int) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def on_rank0(fn: Callable[[], Any], procs: Processes) -> Any:
    """fn() on rank 0, its result (or its exception) broadcast to every rank."""
    if procs.world_size == 1:
        return fn()
    box: list[Any] = [None]
    if procs.rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # re-raised on every rank, so no rank waits for the others forever
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch moved to ``device``; other values as they are."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def free_port() -> int:
    """A TCP port free on this machine now: MASTER_PORT for processes started on one host
    (``torch.multiprocessing`` in tests and benchmarks; torchrun picks its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
