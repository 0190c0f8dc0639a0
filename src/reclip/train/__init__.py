"""The training engine shared by every stage (:func:`train`), in small modules:

- :mod:`~reclip.train.loop`: the loop, the run's settings and its data order;
- :mod:`~reclip.train.optim`: optimiser configs and schedules (the caller chooses);
- :mod:`~reclip.train.checkpoint`: trainable state, checkpoints, a finished run's files;
- :mod:`~reclip.train.distributed`: one process or torchrun's;
- :mod:`~reclip.train.rng`: seeding and exact RNG states.
"""

from reclip.train.checkpoint import (
    RunFiles,
    atomic_torch_save,
    load_run,
    load_trainable_state,
    save_run,
    trainable_state,
)
from reclip.train.loop import TrainConfig, TrainResult, epoch_indices, steps_per_epoch, train
from reclip.train.optim import AdamWConfig, PolySchedule, SGDConfig, describe, poly_lr
from reclip.train.rng import seed_everything

__all__ = [
    "AdamWConfig",
    "PolySchedule",
    "RunFiles",
    "SGDConfig",
    "TrainConfig",
    "TrainResult",
    "atomic_torch_save",
    "describe",
    "epoch_indices",
    "load_run",
    "load_trainable_state",
    "poly_lr",
    "save_run",
    "seed_everything",
    "steps_per_epoch",
    "train",
    "trainable_state",
]
