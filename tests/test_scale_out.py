"""Evaluation, hypotheses and file segmentation split over processes (torch.distributed, gloo on CPU).

Two processes on an odd number of images (one unreadable) must give what one process
gives: the same confusion matrix, bias statistics and JSON, the same hypotheses file
(also resumed), the same mask files; the per-image context (MAFT's proposals) sees
every image id exactly once, with its own image. A second dataset, with an unreadable
and a downscaled image in each rank's block and whole images batched two per forward,
checks that the merged ``skipped`` and ``downscaled`` lists are in dataset order.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layouts import write_voc
from processes import run_workers
from tiny import tiny_clip
from reclip import api
from reclip.clip.load import save_clip
from reclip.data.datasets import SegmentationDataset
from reclip.data.transforms import CLIP_MEAN, CLIP_STD
from reclip.hypotheses import HypothesisConfig, generate_hypotheses
from reclip.inference import InferenceConfig
from reclip.text import QueryEmbeddings
from reclip.train.distributed import shard

SRC = Path(__file__).resolve().parents[1] / "src"
N_VAL = 5  # odd: ranks of two processes get 2 and 3 images
CORRUPT = "2008_000003"  # in rank 1's block: its skip is gathered
INFERENCE = dict(short_side=48, mode="slide", window=32, stride=16)
# The merge-order dataset: an unreadable image in each rank's block (ids 1 | 3), and every
# readable one (ids 0 | 2, 4) over ORDER_MAX_PIXELS, so read downscaled, on both ranks.
ORDER_CORRUPT = (1, 3)
ORDER_MAX_PIXELS = 400  # the images are 560, 704 and 864 pixels; labels are never resized
ORDER_INFERENCE = dict(mode="whole", short_side=48, whole_batch_size=2)  # batched whole images


def _dataset(root: Path) -> Path:
    root = write_voc(root, n_val=N_VAL)
    (root / "JPEGImages" / f"{CORRUPT}.jpg").write_bytes(b"not a jpeg")
    return root


def _order_dataset(root: Path) -> Path:
    root = write_voc(root, n_val=N_VAL)
    ids = SegmentationDataset("voc21", root, "val").image_ids
    for i in ORDER_CORRUPT:
        (root / "JPEGImages" / f"{ids[i]}.jpg").write_bytes(b"not a jpeg")
    return root


class IdSegmentor(nn.Module):
    """A per-image-context segmentor (as MAFT): its logits depend on the image id held by
    ``for_image``, so a context entered with another image's id changes the confusion."""

    num_classes = 21

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.held: int | None = None

    @contextlib.contextmanager
    def for_image(self, image: np.ndarray, image_id: str):
        self.ids.append(image_id)
        self.held = (7 * int(image_id[-1]) + image.shape[0]) % 21
        try:
            yield
        finally:
            self.held = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert self.held is not None, "segmented outside for_image"
        pooled = F.adaptive_avg_pool2d(images, 4)  # (B, 3, 4, 4)
        logits = F.pad(pooled, (0, 0, 0, 0, 0, 18))  # (B, 21, 4, 4)
        logits[:, self.held] += 0.5
        return logits


def _runs(results: Path, shared: Path, root: Path) -> None:
    """Everything under test, as one process or as one rank; per-rank results to ``results``,
    files to ``shared`` (hypotheses, masks), which rank 0 (or each rank, masks) writes."""
    results.mkdir(parents=True, exist_ok=True)
    clip = tiny_clip(vision_layers=2)
    evaluation = api.evaluate(clip, "maskclip", "voc21", root, inference=INFERENCE, templates="single", bias=True,
                              progress=False, num_workers=0)
    data = SegmentationDataset("voc21", root, "val")
    context = IdSegmentor()
    by_id = api.evaluate_segmentor(context, data, InferenceConfig(mode="whole"), mean=CLIP_MEAN, std=CLIP_STD,
                                   progress=False, num_workers=0)
    g = torch.Generator().manual_seed(0)
    queries = QueryEmbeddings(F.normalize(torch.randn(21, 32, generator=g), dim=-1), torch.arange(21), 21)
    config = HypothesisConfig(r=1 / 3, t=0.1)
    fresh = generate_hypotheses(clip, data, queries, config=config, out_path=shared / "fresh.json", progress=False,
                                save_every=1)
    resumed = None
    if (shared / "resumed.json").exists():
        resumed = generate_hypotheses(clip, data, queries, config=config, out_path=shared / "resumed.json",
                                      progress=False, save_every=2)
    masks = api.segment_files(clip, "maskclip", "cat,dog,grass", [root / "JPEGImages"], shared / "masks",
                              inference=INFERENCE, templates="single", progress=False)
    order = api.evaluate(clip, "maskclip", "voc21", root.parent / "voc_order", inference=ORDER_INFERENCE,
                         templates="single", bias=True, progress=False, num_workers=0, max_pixels=ORDER_MAX_PIXELS)
    out = {"evaluation": {k: v for k, v in evaluation.to_dict().items() if k != "seconds"},
           "order": {k: v for k, v in order.to_dict().items() if k != "seconds"}, "order_confusion": order.confusion,
           "confusion": evaluation.confusion, "space_objects": evaluation.bias["space_preference"]["counts"],
           "context_confusion": by_id.confusion, "context_ids": context.ids, "context_skipped": by_id.skipped,
           "hypotheses": (fresh.num_images, fresh.computed, fresh.skipped),
           "resumed": None if resumed is None else (resumed.num_images, resumed.computed, resumed.skipped),
           "masks": ([p.relative_to(shared / "masks") for p in masks.written], masks.skipped, masks.downscaled)}
    (results / "results.pkl").write_bytes(pickle.dumps(out))


def _worker(rank: int, world: int, port: int, out: str, root: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        _runs(Path(out) / f"rank{rank}", Path(out), Path(root))
    finally:
        dist.destroy_process_group()


def _listing_worker(rank: int, world: int, port: int, out: str, folder: str, fail: bool) -> None:
    """segment_files under 2 processes with a spy on collect_images: who lists, and what
    each rank raises when rank 0's listing fails."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    calls: list[int] = []
    real = api.collect_images

    def spy(*args, **kwargs):
        calls.append(rank)
        if fail:
            raise OSError(f"listing failed on rank {rank}")
        return real(*args, **kwargs)

    api.collect_images = spy  # a forked worker: the parent's module is not touched
    try:
        try:
            summary = api.segment_files(tiny_clip(vision_layers=2), "maskclip", "cat,dog", [folder],
                                        Path(out) / "masks", templates="single", inference=ORDER_INFERENCE,
                                        progress=False)
            result = {"written": [p.name for p in summary.written]}
        except OSError as err:
            result = {"error": str(err)}
        result["calls"] = calls
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        api.collect_images = real
        dist.destroy_process_group()


@pytest.mark.parametrize("fail", [False, True])
def test_segment_files_lists_on_rank0_only(fail, tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    root = write_voc(tmp_path / "voc", n_train=0, n_val=3)
    run_workers(_listing_worker, str(tmp_path), str(root / "JPEGImages"), fail)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["calls"] for g in got] == [[0], []]  # rank 0 alone lists
    if fail:  # rank 0's error, raised on both ranks
        assert [g["error"] for g in got] == ["listing failed on rank 0"] * 2
    else:
        assert got[0]["written"] == got[1]["written"] == [f"2008_{i:06d}.png" for i in range(3)]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shards_cover_every_item_once_in_order():
    for count in range(0, 12):
        for world in (1, 2, 3, 5):
            blocks = [shard(count, r, world) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(count))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    with pytest.raises(ValueError, match="rank 2"):
        shard(4, 2, 2)


def test_two_processes_give_the_results_of_one(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    root = _dataset(tmp_path / "voc")
    order_root = _order_dataset(tmp_path / "voc_order")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        _runs(tmp_path / "single", tmp_path / "single", root)
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    two.mkdir()
    # a run killed after some images: the two processes resume it
    partial = json.loads((tmp_path / "single" / "fresh.json").read_text())
    kept = sorted(partial["images"])[:2]
    partial["images"] = {k: partial["images"][k] for k in kept}
    (two / "resumed.json").write_text(json.dumps(partial))
    run_workers(_worker, str(two), str(root), timeout=240)
    single = pickle.loads((tmp_path / "single" / "results.pkl").read_bytes())
    ranks = [pickle.loads((two / f"rank{r}" / "results.pkl").read_bytes()) for r in range(2)]
    assert single["evaluation"]["num_images"] == N_VAL - 1
    assert [p for p, _ in single["context_skipped"]] == [str(root / "JPEGImages" / f"{CORRUPT}.jpg")]
    for got in ranks:  # every rank returns the merged result
        np.testing.assert_array_equal(got["confusion"], single["confusion"])
        np.testing.assert_array_equal(got["context_confusion"], single["context_confusion"])
        np.testing.assert_array_equal(got["space_objects"], single["space_objects"])
        assert got["evaluation"] == single["evaluation"]  # mIoU, IoU, skipped, bias curve, settings
        np.testing.assert_array_equal(got["order_confusion"], single["order_confusion"])
        assert got["order"] == single["order"]  # whole mode, 2 images per forward; skipped and downscaled in order
        assert got["context_skipped"] == single["context_skipped"]
        assert got["hypotheses"] == single["hypotheses"]
        assert got["masks"] == single["masks"]
    assert single["space_objects"].sum() > 0 and single["evaluation"]["bias"]["class_preference"] is not None
    # the merged lists are in dataset order: rank 0's block, then rank 1's (both ranks have entries)
    ids = SegmentationDataset("voc21", order_root, "val").image_ids
    path = {i: str(order_root / "JPEGImages" / f"{ids[i]}.jpg") for i in range(N_VAL)}
    for got in [single, *ranks]:
        assert [s["path"] for s in got["order"]["skipped"]] == [path[1], path[3]]
        assert got["order"]["downscaled"] == [path[0], path[2], path[4]]
        assert got["order"]["num_images"] == 3
    # the per-image context saw each readable image once, on one rank, in blocks
    ids = SegmentationDataset("voc21", root, "val").image_ids
    readable = [i for i in ids if i != CORRUPT]
    assert single["context_ids"] == readable
    assert ranks[0]["context_ids"] + ranks[1]["context_ids"] == readable
    assert ranks[0]["context_ids"] == ids[:2]
    # one hypotheses file, byte for byte one process's, also when resumed
    expected = (tmp_path / "single" / "fresh.json").read_bytes()
    assert (two / "fresh.json").read_bytes() == expected
    assert (two / "resumed.json").read_bytes() == expected
    assert ranks[0]["resumed"][1] == N_VAL - 1 - len(kept)  # computed now: the rest, without the unreadable one
    # each rank wrote its share of the masks; together the files of one process
    assert _files(two / "masks") == _files(tmp_path / "single" / "masks")


def test_torchrun_evaluate_writes_one_json_on_rank0(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    root = _dataset(tmp_path / "voc")
    clip_file = save_clip(tiny_clip(vision_layers=2), tmp_path / "tiny.pt", format="openai")
    argv = ["evaluate", "--clip", str(clip_file), "--method", "maskclip", "--dataset", "voc21", "--data-root",
            str(root), "--device", "cpu", "--templates", "single", "--bias", "--workers", "0",
            *[f"--{k.replace('_', '-')}={v}" for k, v in INFERENCE.items()]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "reclip.cli", *argv, "--json", str(tmp_path / "one.json")],
                            env=env, capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr
    (tmp_path / "out").mkdir()
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "reclip.cli", *argv, "--json", str(tmp_path / "out" / "two.json")],
                         env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path / "out")
    assert two.returncode == 0, two.stderr
    one, both = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "out/two.json"))
    assert one.pop("seconds") >= 0 and both.pop("seconds") >= 0
    assert both == one and both["num_images"] == N_VAL - 1 and len(both["skipped"]) == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["two.json"]  # rank 1 wrote nothing
    assert two.stdout.count("mIoU") == single.stdout.count("mIoU") > 0  # one report, rank 0's
    def listed(out: str) -> list[str]:  # the final list of skipped images (rank 1's skip is not printed as it goes)
        return [line for line in out.splitlines() if line.startswith("  skipped ")]

    assert listed(two.stdout) == listed(single.stdout) and len(listed(two.stdout)) == 1
    shutil.rmtree(tmp_path / "out")


def test_torchrun_hypotheses_and_segment_match_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    root = _dataset(tmp_path / "voc")
    clip_file = save_clip(tiny_clip(vision_layers=2), tmp_path / "tiny.pt", format="openai")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}

    def run(processes: int, *argv: str) -> subprocess.CompletedProcess:
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)] if processes > 1 else []
        done = subprocess.run([sys.executable, *launch, "-m", "reclip.cli", *argv, "--clip", str(clip_file),
                               "--device", "cpu", "--quiet"], env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        return done

    hyp = ["hypotheses", "--dataset", "voc21", "--data-root", str(root), "--split", "val", "--templates", "single",
           "--window-ratio", "0.34", "--t", "0.1", "--save-every", "1"]  # --r: torchrun's abbreviation
    run(1, *hyp, "--out", str(tmp_path / "one.json"))
    two = run(2, *hyp, "--out", str(tmp_path / "two.json"))
    assert (tmp_path / "two.json").read_bytes() == (tmp_path / "one.json").read_bytes()
    assert two.stdout.count("wrote hypotheses of 4 images (4 computed now") == 1  # rank 0 alone reports
    # resumed under two processes: a file of one process without its last two images
    data = json.loads((tmp_path / "one.json").read_text())
    data["images"] = dict(list(data["images"].items())[:2])
    (tmp_path / "cut.json").write_text(json.dumps(data))
    resumed = run(2, *hyp, "--out", str(tmp_path / "cut.json"))
    assert "(2 computed now" in resumed.stdout
    assert (tmp_path / "cut.json").read_bytes() == (tmp_path / "one.json").read_bytes()

    seg = ["segment", "--method", "maskclip", "--classes", "cat,dog,grass", *COMMON_SEGMENT, str(root / "JPEGImages")]
    single = run(1, *seg, "--out", str(tmp_path / "one"))
    both = run(2, *seg, "--out", str(tmp_path / "two"))
    assert _files(tmp_path / "two") == _files(tmp_path / "one") and len(_files(tmp_path / "one")) == 2 * 6 + 1  # train and val images
    assert both.stdout.count("wrote 6 masks") == single.stdout.count("wrote 6 masks") == 1
    listed = [[line for line in out.stdout.splitlines() if line.startswith("  skipped ")] for out in (single, both)]
    assert listed[0] == listed[1] and len(listed[0]) == 1


COMMON_SEGMENT = ["--templates", "single", *[f"--{k.replace('_', '-')}={v}" for k, v in INFERENCE.items()]]
