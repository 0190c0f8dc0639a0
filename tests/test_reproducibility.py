"""The README's promise, end to end through the command line in real processes: the same
`reclip rectify` command and seed give the same model.safetensors, and a run killed with
SIGKILL after a checkpoint, continued with --resume, ends exactly where an uninterrupted
run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from layouts import write_voc
from reclip.cli import main
from reclip.clip.load import save_clip
from tiny import tiny_clip

STEPS = 300  # long enough that the kill lands mid-run


@pytest.fixture(scope="module")
def command(tmp_path_factory):
    """`reclip rectify` (all flags but --out) on a tiny CLIP and 8 synthetic VOC train images."""
    base = tmp_path_factory.mktemp("repro")
    clip_file = save_clip(tiny_clip(), base / "tiny.pt", format="openai")
    root = write_voc(base / "voc", n_train=8, n_val=1)
    common = ["--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--quiet"]
    assert main(["hypotheses", *common, "--split", "train", "--out", str(base / "hyp.json"), "--t", "0"]) == 0
    return [sys.executable, "-m", "reclip.cli", "rectify", *common, "--hypotheses", str(base / "hyp.json"),
            "--max-steps", str(STEPS), "--batch-size", "2", "--crop", "32", "--base-short-side", "40",
            "--checkpoint-every", "5", "--seed", "3", "--device", "cpu"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count in every process


def _run(command: list[str], out) -> bytes:
    done = subprocess.run([*command, "--out", str(out)], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return (out / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(command, tmp_path_factory) -> bytes:
    """model.safetensors of one uninterrupted run of the command."""
    return _run(command, tmp_path_factory.mktemp("reference"))


def test_the_same_command_twice_gives_the_same_weights(command, reference, tmp_path):
    assert _run(command, tmp_path / "again") == reference
    other_seed = [*command]
    other_seed[other_seed.index("--seed") + 1] = "4"
    assert _run(other_seed, tmp_path / "other") != reference


def test_kill_9_after_a_checkpoint_then_resume_ends_where_an_uninterrupted_run_ends(command, reference, tmp_path):
    run = tmp_path / "cut"
    process = subprocess.Popen([*command, "--out", str(run)], env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < STEPS and not (run / "model.safetensors").exists()  # killed mid-run, after a checkpoint
    resumed = subprocess.run([*command, "--out", str(run), "--resume"], env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run / "model.safetensors").read_bytes() == reference
