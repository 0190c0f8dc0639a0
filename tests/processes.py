"""Process-group tests: forked gloo workers with a deadline, on a free port (``reclip.train.distributed.free_port``).

    run_workers(worker, out_dir, nprocs=2)   # worker(rank, world, port, out_dir) in each process

Fork, not spawn: the workers inherit the imported torch (spawn re-imports it, ~20 s more
on a busy CI machine); workers set one intra-op thread before any computation, so no
OpenMP pool crosses the fork.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest
import torch.multiprocessing as mp

from reclip.train.distributed import free_port


def run_workers(worker: Callable[..., None], *args: Any, nprocs: int = 2, timeout: float = 120) -> None:
    """Run ``worker(rank, nprocs, port, *args)`` in ``nprocs`` forked processes; a worker's
    failure is raised here, and workers still running after ``timeout`` seconds fail the test."""
    ctx = mp.start_processes(worker, args=(nprocs, free_port(), *args), nprocs=nprocs, join=False,
                             start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the workers did not finish in {timeout:.0f} s (deadlock?)")
