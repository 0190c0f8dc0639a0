"""The training engine (reclip.train): loss falls, exact resume, atomic checkpoints, CPU DDP."""

from __future__ import annotations

import datetime
import os
import functools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from processes import run_workers
from reclip.train import (
    AdamWConfig,
    PolySchedule,
    SGDConfig,
    TrainConfig,
    atomic_torch_save,
    epoch_indices,
    load_run,
    poly_lr,
    save_run,
    train,
    trainable_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# -- toys ---------------------------------------------------------------------------------------
class ToyData(Dataset):
    """Random images and regression targets; with ``noise`` the item also depends on the epoch
    (like augmentations), through a per-(epoch, index) generator."""

    def __init__(self, n: int = 10, noise: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        # a learnable target: channel means of the image
        self.y = torch.stack([self.x[:, 0].mean((1, 2)), self.x[:, 1].mean((1, 2))], dim=1) * 4
        self.noise, self.epoch = noise, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        x = self.x[i]
        if self.noise:
            x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 * self.epoch + i))
        return {"image": x, "target": self.y[i], "index": i}


class ToyNet(nn.Module):
    """conv -> [BN] -> ReLU -> [dropout] -> pool -> linear, plus a frozen 'backbone' conv kept in eval."""

    def __init__(self, seed: int = 0, bn: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.frozen = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Dropout(0.5))
        self.frozen.requires_grad_(False)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(8, 2)

    def train(self, mode: bool = True) -> ToyNet:
        super().train(mode)
        self.frozen.eval()  # frozen parts stay in eval mode (the engine's contract)
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("frozen.")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.frozen(x)
        h = self.drop(torch.relu(self.bn(self.conv(x))))  # (B, 8, H, W)
        return self.fc(h.mean(dim=(2, 3)))  # (B, 2)


def toy_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    pred = model(batch["image"])
    loss = ((pred - batch["target"]) ** 2).mean()
    return loss, {"pred_norm": pred.detach().norm()}


class Killed(RuntimeError):
    pass


class KillAt:
    """toy_loss that 'kills the process' at its n-th call (before that step's update)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.n:
            raise Killed(f"killed at call {self.n}")
        return toy_loss(model, batch)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def _assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _scrambled(**kwargs) -> ToyNet:
    """The same model (same frozen part, as a reloaded CLIP) with other trainable values."""
    model = ToyNet(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
        model.bn.running_mean.add_(1.0)
    return model


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- schedule and data order ------------------------------------------------------------------------
def test_poly_and_data_order():
    assert poly_lr(0, base_lr=0.01, horizon=10, power=0.9) == 0.01
    assert poly_lr(10, base_lr=0.01, horizon=10, power=0.9) == 0.0
    assert poly_lr(5, base_lr=1.0, horizon=10, power=1.0) == 0.5
    data = ToyData(n=11)
    one = epoch_indices(data, epoch=3, seed=5, rank=0, world_size=1, batch_size=4)
    r0 = epoch_indices(data, epoch=3, seed=5, rank=0, world_size=2, batch_size=4)
    r1 = epoch_indices(data, epoch=3, seed=5, rank=1, world_size=2, batch_size=4)
    assert len(one) == 8 and len(r0) == len(r1) == 4  # 2 full steps, the rest dropped
    for k in range(2):  # step k: the same images whatever the number of processes
        assert sorted(one[4 * k:4 * k + 4]) == sorted(r0[2 * k:2 * k + 2] + r1[2 * k:2 * k + 2])
    assert one != epoch_indices(data, epoch=4, seed=5, rank=0, world_size=1, batch_size=4)


# -- one process ------------------------------------------------------------------------------------
def test_loss_falls_and_files(tmp_path):
    frozen_before = {k: v.clone() for k, v in ToyNet().frozen.state_dict().items()}
    cfg = TrainConfig(steps=60, batch_size=5, checkpoint_every=20, log_every=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model that keeps its frozen part in eval: no warning
        result = train(ToyNet, toy_loss, ToyData(n=10), cfg, tmp_path / "run", progress=False,
                       optimizer=SGDConfig(lr=0.05, weight_decay=0.0))
    model = result.model
    assert result.step == 60
    lines = _metrics(tmp_path / "run")
    assert [m["step"] for m in lines] == [10, 20, 30, 40, 50, 60]
    assert all({"loss", "lr", "epoch", "pred_norm", "images_per_s"} <= m.keys() for m in lines)
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]
    assert lines[-1]["lr"] < lines[0]["lr"]
    # the frozen part never changed (not even BN running statistics: eval mode)
    _assert_same(frozen_before, model.frozen.state_dict())
    # final weights: trainable state only; save_run / load_run round trip
    weights = _weights(tmp_path / "run")
    assert not any(k.startswith("frozen.") for k in weights) and "bn.running_mean" in weights
    save_run(tmp_path / "run", {"method": "toy", "steps": 60}, model)
    fresh = ToyNet(seed=1)
    files = load_run(tmp_path / "run", fresh)
    assert files.config == {"method": "toy", "steps": 60}
    _assert_same(trainable_state(fresh), trainable_state(model))
    with pytest.raises(FileExistsError, match="resume"):
        train(ToyNet, toy_loss, ToyData(n=10), cfg, tmp_path / "run", progress=False)


def test_engine_warns_about_frozen_parts_in_train_mode(tmp_path):
    class Careless(ToyNet):
        def train(self, mode: bool = True):
            return nn.Module.train(self, mode)

    with pytest.warns(UserWarning, match="frozen module"):
        train(Careless, toy_loss, ToyData(n=4), TrainConfig(steps=1, batch_size=2), tmp_path / "r", progress=False)


def test_incomplete_trainable_state_is_refused(tmp_path):
    class Forgetful(ToyNet):
        def trainable_state_dict(self):
            return {k: v for k, v in super().trainable_state_dict().items() if "running" not in k}

    with pytest.raises(ValueError, match="bn.running_mean"):
        train(Forgetful, toy_loss, ToyData(n=4), TrainConfig(steps=1, batch_size=2), tmp_path / "r", progress=False)


RESUME_CFG = dict(steps=14, batch_size=2, checkpoint_every=3, log_every=4, seed=3)
LR = SGDConfig(lr=0.05)
DROPOUT = functools.partial(ToyNet, dropout=0.3)


def test_resume_is_exact(tmp_path):
    # BN buffers, dropout (global torch RNG), epoch-dependent data, momentum: all must be restored
    cfg = TrainConfig(**RESUME_CFG)
    train(DROPOUT, toy_loss, ToyData(n=10, noise=True), cfg, tmp_path / "full", progress=False, optimizer=LR)
    # 10 images / batch 2 = 5 steps per epoch; killed during step 9 -> the checkpoint of step 6 (epoch 1, offset 1)
    with pytest.raises(Killed):
        train(DROPOUT, KillAt(9), ToyData(n=10, noise=True), cfg, tmp_path / "cut", progress=False, optimizer=LR)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 6
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    # a new process: other trainable values, other global RNG state; resume overrides both
    torch.manual_seed(1234)
    result = train(functools.partial(_scrambled, dropout=0.3), toy_loss, ToyData(n=10, noise=True), cfg, tmp_path / "cut",
                   resume=True, progress=False, optimizer=LR)
    assert result.step == 14
    _assert_same(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))
    full, cut = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
    assert [m["step"] for m in cut] == [m["step"] for m in full] == [4, 8, 12, 14]  # each line once
    # step 8's line averages steps 5-8 across the checkpoint at 6: the partial window is restored too
    assert [m["loss"] for m in cut] == [m["loss"] for m in full]
    # resuming a finished run is a no-op; other settings are refused
    train(ToyNet, toy_loss, ToyData(n=10, noise=True), cfg, tmp_path / "cut", resume=True, progress=False, optimizer=LR)
    _assert_same(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))
    with pytest.raises(ValueError, match="lr"):
        train(ToyNet, toy_loss, ToyData(n=10), TrainConfig(**RESUME_CFG), tmp_path / "cut",
              resume=True, progress=False, optimizer=SGDConfig(lr=0.1))
    with pytest.raises(ValueError, match="training images"):  # another image list: another data order
        train(ToyNet, toy_loss, ToyData(n=12), TrainConfig(**{**RESUME_CFG, "steps": 15}),
              tmp_path / "cut", resume=True, progress=False, optimizer=SGDConfig(lr=0.05, schedule=PolySchedule(horizon=14)))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    cfg = TrainConfig(**{**RESUME_CFG, "checkpoint_every": 4})
    run = tmp_path / "run"
    train(ToyNet, toy_loss, ToyData(n=10), TrainConfig(**{**RESUME_CFG, "checkpoint_every": 4, "steps": 14}),
          tmp_path / "ref", progress=False, optimizer=LR)
    with pytest.raises(Killed):
        train(ToyNet, KillAt(6), ToyData(n=10), cfg, run, progress=False, optimizer=LR)
    good = (run / "checkpoint.pt").read_bytes()

    real_save = torch.save

    def crash_mid_write(obj, f, *args, **kwargs):  # half a file, then the machine dies
        real_save(obj, f, *args, **kwargs)
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        train(ToyNet, toy_loss, ToyData(n=10), cfg, run, resume=True, progress=False, optimizer=LR)
    assert (run / "checkpoint.pt").read_bytes() == good  # the previous checkpoint is intact
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]  # no temporary left
    with pytest.raises(OSError):
        atomic_torch_save({"x": 1}, run / "checkpoint.pt")
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(torch, "save", real_save)
    train(ToyNet, toy_loss, ToyData(n=10), cfg, run, resume=True, progress=False, optimizer=LR)
    _assert_same(_weights(tmp_path / "ref"), _weights(run))


def test_validation_does_not_change_training(tmp_path):
    cfg = TrainConfig(**{**RESUME_CFG, "validate_every": 5, "select_best": "neg_loss"})
    data = ToyData(n=10, noise=True)

    def validate(model):
        torch.randn(100)  # consumes RNG: must not leak into training
        pred = model(data.x)
        return {"neg_loss": -((pred - data.y) ** 2).mean()}

    train(DROPOUT, toy_loss, data, TrainConfig(**RESUME_CFG), tmp_path / "plain", progress=False, optimizer=LR)
    result = train(DROPOUT, toy_loss, ToyData(n=10, noise=True), cfg, tmp_path / "val",
                   progress=False, validate=validate, optimizer=LR)
    _assert_same(_weights(tmp_path / "plain"), _weights(tmp_path / "val"))
    vals = [m for m in _metrics(tmp_path / "val") if "validation" in m]
    assert [m["step"] for m in vals] == [5, 10, 14]
    assert result.best["step"] in (5, 10, 14) and (tmp_path / "val" / "best.safetensors").exists()


class RandomInit(nn.Module):
    """A model whose initial values come from the global RNG (no seed of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x).mean(dim=(2, 3))))


def test_the_model_is_built_after_seeding(tmp_path):
    """Same seed -> same initial parameters and the same run, whatever the RNG did before."""
    built = []

    def build():
        built.append(RandomInit())
        return built[-1]

    cfg = TrainConfig(steps=3, batch_size=2, seed=5)
    torch.manual_seed(1)
    train(build, toy_loss, ToyData(n=4), cfg, tmp_path / "a", progress=False)
    torch.randn(100)  # other global state before the second run
    train(build, toy_loss, ToyData(n=4), cfg, tmp_path / "b", progress=False)
    _assert_same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    train(build, toy_loss, ToyData(n=4), TrainConfig(steps=3, batch_size=2, seed=6), tmp_path / "c", progress=False)
    assert not torch.equal(_weights(tmp_path / "a")["conv.weight"], _weights(tmp_path / "c")["conv.weight"])


def test_adamw_with_no_decay_groups_and_exact_resume(tmp_path):
    adamw = AdamWConfig(lr=0.01, weight_decay=0.5, no_decay=("norm.",))
    groups = adamw.build(RandomInit()).param_groups
    assert [len(g["params"]) for g in groups] == [4, 2] and [g["weight_decay"] for g in groups] == [0.5, 0.0]
    cfg = TrainConfig(steps=8, batch_size=2, checkpoint_every=3, log_every=1, seed=2)
    result = train(RandomInit, toy_loss, ToyData(n=6), cfg, tmp_path / "full", progress=False, optimizer=adamw)
    assert isinstance(result.model, RandomInit)
    assert {m["lr"] for m in _metrics(tmp_path / "full")} == {0.01}  # AdamW's default schedule is constant
    with pytest.raises(Killed):
        train(RandomInit, KillAt(5), ToyData(n=6), cfg, tmp_path / "cut", progress=False, optimizer=adamw)
    train(RandomInit, toy_loss, ToyData(n=6), cfg, tmp_path / "cut", resume=True, progress=False, optimizer=adamw)
    _assert_same(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))
    with pytest.raises(ValueError, match="optimizer"):  # SGD cannot continue AdamW's run
        train(RandomInit, toy_loss, ToyData(n=6), cfg, tmp_path / "cut", resume=True, progress=False)


# -- two processes (gloo on CPU) ----------------------------------------------------------------------
DDP_CFG = dict(steps=8, batch_size=4, checkpoint_every=2, log_every=2, seed=1)  # with LR


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        out_dir = Path(out)
        # 1. no batch-statistics layer: must match one process at the same global batch
        train(functools.partial(ToyNet, bn=False), toy_loss, ToyData(n=12), TrainConfig(**DDP_CFG), out_dir / "ddp", progress=False, optimizer=LR)
        # 2. exact resume under DDP, with BN and dropout (per-rank RNG states restored)
        cfg = TrainConfig(**DDP_CFG)
        train(DROPOUT, toy_loss, ToyData(n=12, noise=True), cfg, out_dir / "full", progress=False, optimizer=LR)
        try:
            train(DROPOUT, KillAt(5), ToyData(n=12, noise=True), cfg, out_dir / "cut", progress=False, optimizer=LR)
        except Killed:
            pass
        torch.manual_seed(777 + rank)
        train(functools.partial(_scrambled, dropout=0.3), toy_loss, ToyData(n=12, noise=True), cfg, out_dir / "cut", resume=True,
              progress=False, optimizer=LR)
        # 3. an error found by rank 0 (here: other settings) is raised on every rank, none waits forever
        try:
            train(ToyNet, toy_loss, ToyData(n=12), TrainConfig(**DDP_CFG), out_dir / "cut",
                  resume=True, progress=False, optimizer=SGDConfig(lr=0.5))
        except ValueError as e:
            (out_dir / f"error{rank}.txt").write_text(str(e))
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_matches_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    train(functools.partial(ToyNet, bn=False), toy_loss, ToyData(n=12), TrainConfig(**DDP_CFG), tmp_path / "single", progress=False, optimizer=LR)
    run_workers(_ddp_worker, str(tmp_path))
    ddp, single = _weights(tmp_path / "ddp"), _weights(tmp_path / "single")
    _assert_same(ddp, single, atol=1e-6)
    init = trainable_state(ToyNet(bn=False))
    assert any((ddp[k] - init[k]).abs().max() > 1e-3 for k in init)  # it did train
    # logged losses: averaged over both ranks = the one-process batch mean
    np.testing.assert_allclose([m["loss"] for m in _metrics(tmp_path / "ddp")],
                               [m["loss"] for m in _metrics(tmp_path / "single")], rtol=1e-5)
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2
    _assert_same(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))
    assert all("lr" in (tmp_path / f"error{r}.txt").read_text() for r in range(2))
    # a 2-process checkpoint cannot be resumed by one process (RNG states, batch split)
    with pytest.raises(ValueError, match="2 process"):
        train(ToyNet, toy_loss, ToyData(n=12), TrainConfig(**{**DDP_CFG, "steps": 9}),
              tmp_path / "cut", resume=True, progress=False, optimizer=SGDConfig(lr=0.05, schedule=PolySchedule(horizon=8)))


# -- with the unlabelled training set -----------------------------------------------------------------
class HypothesisNet(nn.Module):
    """Image-level multi-label toy: conv -> BN -> global pool -> C logits."""

    def __init__(self, num_classes: int = 21) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 3, padding=1)
        self.bn = nn.BatchNorm2d(num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(images)).mean(dim=(2, 3))  # (B, C)


def hypothesis_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    logits = model(batch["image"])
    return nn.functional.binary_cross_entropy_with_logits(logits, batch["hypotheses"].float()), {}


def test_unlabeled_set_through_the_engine_any_worker_count(tmp_path):
    from layouts import write_voc

    from reclip.data import SegmentationDataset
    from reclip.data.augment import UnlabeledTrainSet

    split = SegmentationDataset("voc21", write_voc(tmp_path / "voc", n_train=6, n_val=1), split="train")
    hyp = {i: [k % 3, 10 + k] for k, i in enumerate(split.image_ids)}

    def run(workers: int, name: str) -> dict:
        data = UnlabeledTrainSet(split, hyp, num_classes=21, base_short_side=24, crop=16, seed=2)
        cfg = TrainConfig(steps=5, batch_size=2, workers=workers, log_every=1)  # 3 steps per epoch
        train(HypothesisNet, hypothesis_loss, data, cfg, tmp_path / name, progress=False, optimizer=SGDConfig(lr=0.1))
        return _weights(tmp_path / name)

    _assert_same(run(0, "w0"), run(2, "w2"))


def test_a_model_instance_is_refused_and_rank_comes_from_the_environment(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="builds the model"):
        train(ToyNet(), toy_loss, ToyData(n=4), TrainConfig(steps=1, batch_size=2), tmp_path / "r", progress=False)
    from reclip.train.distributed import is_rank0

    monkeypatch.setenv("RANK", "1")  # a torchrun process after its group was destroyed
    assert not is_rank0()
    monkeypatch.setenv("RANK", "0")
    assert is_rank0()


# -- a damaged run directory -------------------------------------------------------------------------
class Forbidden:
    """Not a tensor or a plain container: the safe unpickler refuses to rebuild it."""


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "refused", "foreign"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    cfg = TrainConfig(**{**RESUME_CFG, "checkpoint_every": 3})
    train(DROPOUT, toy_loss, ToyData(n=10, noise=True), cfg, tmp_path / "full", progress=False, optimizer=LR)
    run = tmp_path / "cut"
    with pytest.raises(Killed):  # checkpoints at steps 3 and 6, killed during step 8
        train(DROPOUT, KillAt(8), ToyData(n=10, noise=True), cfg, run, progress=False, optimizer=LR)
    assert torch.load(run / "checkpoint.previous.pt", weights_only=True)["step"] == 3
    latest = run / "checkpoint.pt"
    if damage == "truncated":
        latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    elif damage == "empty":
        latest.write_bytes(b"")
    elif damage == "garbage":
        latest.write_bytes(os.urandom(4096))
    elif damage == "refused":
        torch.save({"step": 6, "payload": Forbidden()}, latest)
    else:
        torch.save({"step": 6, "weights": torch.zeros(3)}, latest)
    with pytest.warns(UserWarning, match="checkpoint.pt") as record:
        result = train(DROPOUT, toy_loss, ToyData(n=10, noise=True), cfg, run, resume=True, progress=False,
                       optimizer=LR)
    assert "step 3" in str(record[0].message) and (run / "checkpoint.pt.damaged").exists()
    assert result.step == 14
    for name in ("checkpoint.pt", "checkpoint.previous.pt"):  # the last two are good ones again
        assert torch.load(run / name, weights_only=True)["step"] in (12, 14)
    _assert_same(_weights(tmp_path / "full"), _weights(run))  # still exact: resumed from step 3
    assert [m["step"] for m in _metrics(run)] == [m["step"] for m in _metrics(tmp_path / "full")]


def test_no_usable_checkpoint_is_a_clear_error_naming_the_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"checkpoint\.pt cannot be read") as err:
        train(ToyNet, toy_loss, ToyData(n=4), TrainConfig(steps=2, batch_size=2), run, resume=True, progress=False)
    assert "no usable checkpoint" in str(err.value) and str(run) in str(err.value)


def test_a_full_disk_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = TrainConfig(**{**RESUME_CFG, "checkpoint_every": 3})
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(ToyNet, KillAt(5), ToyData(n=10), cfg, run, progress=False, optimizer=LR)
    good = (run / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):  # what torch's zip writer raises on ENOSPC
        Path(f).write_bytes(b"\x00" * 100)
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="could not write the checkpoint") as err:
        train(ToyNet, toy_loss, ToyData(n=10), cfg, run, resume=True, progress=False, optimizer=LR)
    assert "checkpoint.pt is intact" in str(err.value) and "file write failed" in str(err.value)
    assert (run / "checkpoint.pt").read_bytes() == good
    monkeypatch.setattr(torch, "save", real_save)
    assert train(ToyNet, toy_loss, ToyData(n=10), cfg, run, resume=True, progress=False, optimizer=LR).step == 14


def test_a_killed_writers_leftovers_are_removed_on_the_next_run(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a writer still running
    run = tmp_path / "run"
    run.mkdir()
    stale = run / f".checkpoint.pt.{int(dead.stdout)}-0123abcd.tmp"
    reused = run / f".model.safetensors.{os.getpid()}-0123abcd.tmp"  # a dead writer whose id this process has now
    live = run / f".checkpoint.pt.{writer.pid}-0123abcd.tmp"
    for path in (stale, reused, live):
        path.write_bytes(b"half a file")
    try:
        train(ToyNet, toy_loss, ToyData(n=4), TrainConfig(steps=2, batch_size=2), run, progress=False)
    finally:
        writer.kill()
        writer.wait()
    assert not stale.exists() and not reused.exists() and live.exists()


def test_a_damaged_finished_run_is_named(tmp_path):
    run = tmp_path / "run"
    result = train(ToyNet, toy_loss, ToyData(n=4), TrainConfig(steps=2, batch_size=2), run, progress=False)
    save_run(run, {"method": "toy"}, result.model)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"model\.safetensors cannot be read"):
        load_run(run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_run(run)


def test_a_checkpoint_of_another_engine_version_says_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"version": 1, "step": 4, "config": {}}, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="checkpoint version 1 is not 2"):
        train(ToyNet, toy_loss, ToyData(n=4), TrainConfig(steps=2, batch_size=2), run, resume=True, progress=False)
