"""``python -m reclip.bench_eval``: printed evaluation throughput figures (not timed tests).

Measured side by side in one run, on CPU, with a small random ViT (MaskCLIP head, whole
image, 21 VOC classes) over a synthetic VOC layout of VOC-shaped images:

- the evaluation pipeline (whole-mode batching of the images of one size, ``--batch-size`` = whole_batch_size)
  against one image at a time (the official repositories' loop), same settings;
- DataLoader workers reading, resizing and normalising the images (``--workers``) against
  none (all in the main process), same settings and the same scores;
- one process against two (``torchrun``-style: a gloo process group, each rank its
  contiguous block of the images, statistics merged), the same threads in all;
- the last block's fused attention (``features._attend``: ``F.scaled_dot_product_attention``)
  against the explicit path (``attention_weights(q, k) @ v``, the matrix materialised), per
  attention kind, with their max abs difference;
- slide-mode segmentation of several VOC-shaped images, the windows of consecutive images
  sharing batches of ``--slide-batch-size`` (``segment_many``) against each image's windows
  in batches of their own (``segment`` per image), same labels;
- sliding-window inference with ``--slide-batch-size`` windows per forward against a
  per-window loop (mmseg's ``slide_inference``: one window per forward), same logits;
  with ``--compile``, also against itself through ``torch.compile`` (compilation excluded).

Random weights: the figures measure compute, not accuracy. Ratios, not absolute figures,
are what carries over to other machines.

    python -m reclip.bench_eval [--images 32] [--batch-size 8] [--short-side 224]
                                [--slide-size 448] [--slide-batch-size 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from reclip.clip.model import CLIP
from reclip.data.datasets import SegmentationDataset
from reclip.data.transforms import CLIP_MEAN, CLIP_STD, resize_bilinear
from reclip.heads.zero_shot import ZeroShotSegmentor
from reclip.features import ATTENTIONS, _attend, attention_weights, get_strategy
from reclip.inference import InferenceConfig, infer_logits, segment, segment_many, slide_windows
from reclip.text import QueryEmbeddings
from reclip.train.distributed import free_port

# a small ViT: ViT-B/16's patch size and text tower shape, a quarter of its vision depth and width
SMALL_VIT = dict(embed_dim=256, image_resolution=224, vision_layers=4, vision_width=256, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=256, transformer_heads=4,
                 transformer_layers=2)
# VOC's most common image shapes (H, W): most of val is 375 x 500 or 500 x 375, then 333 x 500
VOC_SHAPES = ((375, 500), (375, 500), (500, 375), (333, 500))
NUM_CLASSES = 21


def write_dataset(root: str | os.PathLike, images: int, seed: int = 0) -> Path:
    """A VOC2012 layout (JPEGImages, SegmentationClass palette PNGs, ImageSets val.txt) of random
    images of VOC's common shapes; returns its root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    ids = [f"2008_{i:06d}" for i in range(images)]
    palette = [v for c in range(256) for v in (c, (37 * c) % 256, (91 * c) % 256)]
    for i, image_id in enumerate(ids):
        h, w = VOC_SHAPES[i % len(VOC_SHAPES)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        label = np.repeat(rng.integers(0, NUM_CLASSES, (h, 1), dtype=np.uint8), w, axis=1)  # (H, W) stripes
        png = Image.fromarray(label, mode="P")
        png.putpalette(palette)
        png.save(root / "SegmentationClass" / f"{image_id}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{i}\n" for i in ids))
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("")
    return root


def small_segmentor(seed: int = 0, **clip_shape: Any) -> ZeroShotSegmentor:
    """MaskCLIP on a random CLIP of shape ``SMALL_VIT | clip_shape`` with random class queries."""
    torch.manual_seed(seed)
    clip = CLIP(**{**SMALL_VIT, **clip_shape}).eval().requires_grad_(False)
    weights = torch.nn.functional.normalize(torch.randn(NUM_CLASSES, clip.config.embed_dim), dim=-1)
    queries = QueryEmbeddings(weights, torch.arange(NUM_CLASSES), NUM_CLASSES)
    return ZeroShotSegmentor(clip, queries, "maskclip").eval()


def _evaluate(segmentor: Any, root: Path, cfg: InferenceConfig, workers: int = 0) -> tuple[float, np.ndarray]:
    """(seconds, confusion matrix) of one evaluation over ``root``."""
    from reclip.api import evaluate_segmentor

    data = SegmentationDataset("voc21", root, "val")
    start = time.perf_counter()
    result = evaluate_segmentor(segmentor, data, cfg, mean=CLIP_MEAN, std=CLIP_STD, num_workers=workers,
                                progress=False)
    return time.perf_counter() - start, result.confusion


def bench_batching(segmentor: Any, root: Path, *, short_side: int, batch_size: int,
                   repeats: int = 1) -> dict[str, float]:
    """images/s of whole-mode evaluation, batched (``batch_size``) and one image at a time,
    timed in alternation after a warm-up of each; ``differ``: pixels scored differently (0)."""
    images = len(SegmentationDataset("voc21", root, "val"))
    configs = {name: InferenceConfig(mode="whole", short_side=short_side, whole_batch_size=size,
                                      logit_scale=50.0)
               for name, size in (("batched", batch_size), ("single", 1))}
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    confusions = {}
    for name, cfg in configs.items():  # warm-up
        _, confusions[name] = _evaluate(segmentor, root, cfg)
    for _ in range(repeats):
        for name, cfg in configs.items():
            seconds[name].append(_evaluate(segmentor, root, cfg)[0])
    best = {name: min(times) for name, times in seconds.items()}
    return {"batched_images_per_s": images / best["batched"], "single_images_per_s": images / best["single"],
            "speedup": best["single"] / best["batched"], "differ": _differ(*confusions.values()),
            "pixels": int(confusions["single"].sum())}


def bench_workers(segmentor: Any, root: Path, *, short_side: int, batch_size: int, workers: int = 2,
                  repeats: int = 1) -> dict[str, float]:
    """images/s of whole-mode evaluation with ``workers`` DataLoader workers (decoding, resizing
    and normalising) and with none, timed in alternation after a warm-up of each (worker start-up
    included: it is part of every evaluation); ``differ``: pixels scored differently (0)."""
    images = len(SegmentationDataset("voc21", root, "val"))
    cfg = InferenceConfig(mode="whole", short_side=short_side, whole_batch_size=batch_size, logit_scale=50.0)
    counts = {"workers": workers, "main": 0}
    confusions = {name: _evaluate(segmentor, root, cfg, n)[1] for name, n in counts.items()}  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in counts}
    for _ in range(repeats):
        for name, n in counts.items():
            seconds[name].append(_evaluate(segmentor, root, cfg, n)[0])
    best = {name: min(times) for name, times in seconds.items()}
    return {"workers_images_per_s": images / best["workers"], "main_images_per_s": images / best["main"],
            "speedup": best["main"] / best["workers"], "differ": _differ(*confusions.values()),
            "pixels": int(confusions["main"].sum())}


def _best_seconds(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Best wall time of each callable, after one warm-up call of each, timed in alternation."""
    for fn in fns.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: min(times) for name, times in seconds.items()}


def bench_attention(*, batch: int = 2, grid: tuple[int, int] = (28, 28), width: int = SMALL_VIT["vision_width"],
                    heads: int = SMALL_VIT["vision_width"] // 64, repeats: int = 3,
                    seed: int = 0) -> dict[str, dict[str, float]]:
    """Per last-block attention kind (all but "identity", which attends nothing): seconds of the
    fused path (``_attend``) and of the explicit one (``attention_weights(q, k) @ v``) on random
    q, k, v (batch, heads, 1 + h*w, width / heads), ``speedup`` explicit / fused, and the max
    abs difference of their outputs (``max_abs_diff``)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = 1 + grid[0] * grid[1]
    q, k, v = (torch.randn(batch, heads, tokens, width // heads, generator=gen) for _ in range(3))
    figures = {}
    with torch.no_grad():
        for kind in ATTENTIONS:
            if kind == "identity":
                continue
            strategy = get_strategy("raw", attention=kind)
            fns = {"fused": lambda: _attend(q, k, v, strategy, grid),
                   "explicit": lambda: attention_weights(q, k, strategy, grid) @ v}
            diff = float((fns["fused"]() - fns["explicit"]()).abs().max())
            best = _best_seconds(fns, repeats)
            figures[kind] = {"fused_s": best["fused"], "explicit_s": best["explicit"],
                             "speedup": best["explicit"] / best["fused"], "max_abs_diff": diff}
    return figures


def slide_per_window(segmentor: Any, image: torch.Tensor, window: int | tuple[int, int],
                     stride: int | tuple[int, int]) -> torch.Tensor:
    """mmseg's ``slide_inference``: one window per segmentor call, each window's logits upsampled
    to the window, summed into place and divided by the per-pixel window count.
    (B, 3, H, W) -> float32 (B, S, H, W)."""
    _, _, height, width = image.shape
    preds: torch.Tensor | None = None
    count = image.new_zeros((1, 1, height, width), dtype=torch.float32)
    with torch.no_grad():
        for y1, y2, x1, x2 in slide_windows(height, width, window, stride):
            crop = image[:, :, y1:y2, x1:x2]
            logits = resize_bilinear(segmentor(crop).float(), tuple(crop.shape[-2:]))
            if preds is None:
                preds = image.new_zeros((image.shape[0], logits.shape[1], height, width), dtype=torch.float32)
            preds[:, :, y1:y2, x1:x2] += logits
            count[..., y1:y2, x1:x2] += 1
    assert preds is not None
    return preds / count


def bench_slide(segmentor: Any, *, size: tuple[int, int] = (448, 597), window: int = 224, stride: int = 112,
                batch_size: int = 16, repeats: int = 2, seed: int = 0, compile: bool = False) -> dict[str, float]:
    """Sliding-window inference of one random normalised image of ``size``: our slide mode
    (``batch_size`` windows per call) against :func:`slide_per_window`, timed in alternation
    after a warm-up of each. Raises ``RuntimeError`` if their logits differ (atol 1e-4).
    With ``compile``, also our slide mode with ``InferenceConfig.compile`` (torch.compile;
    its compilation happens in the warm-up, outside the figures): ``compiled_speedup`` is
    eager / compiled, same check of the logits."""
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))
    cfg = InferenceConfig(mode="slide", window=window, stride=stride, batch_size=batch_size, logit_scale=50.0)
    fns = {"batched": lambda: infer_logits(segmentor, image, cfg),
           "loop": lambda: slide_per_window(segmentor, image, window, stride)}
    if compile:
        fns["compiled"] = lambda: infer_logits(segmentor, image, dataclasses.replace(cfg, compile=True))
    reference = fns["batched"]()
    diffs = {name: float((fn() - reference).abs().max()) for name, fn in fns.items() if name != "batched"}
    for name, d in diffs.items():
        if not d <= 1e-4:
            raise RuntimeError(f"batched and {name} sliding inference no longer compute the same logits "
                               f"(max abs difference {d:.3g})")
    diff = diffs["loop"]
    best = _best_seconds(fns, repeats)
    windows = len(slide_windows(size[0], size[1], window, stride))
    if compile:
        extra = {"compiled_windows_per_s": windows / best["compiled"],
                 "compiled_speedup": best["batched"] / best["compiled"], "compiled_max_abs_diff": diffs["compiled"]}
    else:
        extra = {}
    return {**extra, "windows": windows, "batched_windows_per_s": windows / best["batched"],
            "loop_windows_per_s": windows / best["loop"], "speedup": best["loop"] / best["batched"],
            "max_abs_diff": diff}


def bench_shared_windows(segmentor: Any, *, images: int = 8, short_side: int = 224, window: int = 224,
                         batch_size: int = 16, repeats: int = 2, seed: int = 0) -> dict[str, float]:
    """images/s of slide-mode segmentation of ``images`` random VOC-shaped images: windows of
    consecutive images sharing calls of ``batch_size`` windows (:func:`segment_many`) against
    one image at a time (:func:`segment`: its windows alone), timed in alternation after a
    warm-up of each; ``differ``: pixels labelled differently (0 expected)."""
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (*VOC_SHAPES[i % len(VOC_SHAPES)], 3), dtype=np.uint8) for i in range(images)]
    cfg = InferenceConfig(mode="slide", short_side=short_side, window=window, stride=max(window // 2, 1),
                          batch_size=batch_size, logit_scale=50.0)
    fns = {"shared": lambda: segment_many(segmentor, frames, cfg),
           "alone": lambda: [segment(segmentor, frame, cfg) for frame in frames]}
    differ = sum(int((a.labels != b.labels).sum()) for a, b in zip(fns["shared"](), fns["alone"]()))
    best = _best_seconds(fns, repeats)
    return {"shared_images_per_s": images / best["shared"], "alone_images_per_s": images / best["alone"],
            "speedup": best["alone"] / best["shared"], "differ": differ,
            "pixels": sum(f.shape[0] * f.shape[1] for f in frames)}


def _differ(a: np.ndarray, b: np.ndarray) -> int:
    """Pixels scored differently in two runs' confusion matrices (at least; 0: the same matrix)."""
    return int(np.abs(a - b).sum()) // 2


def _rank(rank: int, world: int, port: int, root: str, cfg: InferenceConfig, threads: int, out: str) -> None:
    """One process of the multi-process run: join the group, evaluate its block, rank 0 writes the time."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        segmentor = small_segmentor()
        dist.barrier()  # start together, after the model is built
        seconds, confusion = _evaluate(segmentor, Path(root), cfg)
        if rank == 0:
            np.save(Path(out) / "confusion.npy", confusion)
            (Path(out) / "seconds.txt").write_text(repr(seconds))
    finally:
        dist.destroy_process_group()


def bench_processes(root: Path, *, short_side: int, batch_size: int, processes: int = 2,
                    threads: int | None = None) -> dict[str, float]:
    """Evaluation time of one process against ``processes`` processes on gloo (each
    ``threads`` intra-op threads, default the machine's share per process, the single
    process as many), after a warm-up; ``differ``: pixels scored differently, which only
    the intra-op thread count changes (float rounding; equal thread counts give equal
    matrices, tests/test_scale_out.py)."""
    import torch.multiprocessing as mp

    threads = threads or max(1, torch.get_num_threads() // processes)
    cfg = InferenceConfig(mode="whole", short_side=short_side, whole_batch_size=batch_size, logit_scale=50.0)
    images = len(SegmentationDataset("voc21", root, "val"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads * processes)
    try:
        segmentor = small_segmentor()
        _evaluate(segmentor, root, cfg)  # warm-up
        one, confusion = _evaluate(segmentor, root, cfg)
    finally:
        torch.set_num_threads(before)
    with tempfile.TemporaryDirectory() as out:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        # fork: the workers inherit the imported modules, so the time is the evaluation's, not Python's start
        mp.start_processes(_rank, args=(processes, free_port(), str(root), cfg, threads, out), nprocs=processes,
                           join=True, start_method="fork")
        many = float((Path(out) / "seconds.txt").read_text())
        differ = _differ(np.load(Path(out) / "confusion.npy"), confusion)
    return {"one_images_per_s": images / one, "many_images_per_s": images / many, "speedup": one / many,
            "threads": threads, "differ": differ, "pixels": int(confusion.sum())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reclip.bench_eval", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32, help="images in the synthetic VOC layout")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per forward pass of the pipeline (whole_batch_size)")
    parser.add_argument("--short-side", type=int, default=224, help="short side of the whole-image resize")
    parser.add_argument("--processes", type=int, default=2, help="processes of the multi-process run")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the workers-vs-none run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each pipeline (best kept)")
    parser.add_argument("--attention-grid", type=int, default=28,
                        help="patch grid side of the attention bench (28: 448 px at patch 16)")
    parser.add_argument("--slide-size", type=int, default=448,
                        help="short side of the sliding-window bench's image (long side 4/3 of it)")
    parser.add_argument("--window", type=int, default=224, help="sliding window (stride: half of it)")
    parser.add_argument("--slide-batch-size", type=int, default=16, help="windows per forward of the batched slide")
    parser.add_argument("--compile", action="store_true",
                        help="also the batched slide through torch.compile (compilation in the warm-up, not timed)")
    args = parser.parse_args(argv)
    print(f"reclip bench_eval: random small ViT ({SMALL_VIT['vision_layers']} layers, width "
          f"{SMALL_VIT['vision_width']}, patch {SMALL_VIT['vision_patch_size']}), MaskCLIP whole image at short side "
          f"{args.short_side}, {args.images} VOC-shaped images, CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        root = write_dataset(Path(tmp) / "voc", args.images)
        b = bench_batching(small_segmentor(), root, short_side=args.short_side, batch_size=args.batch_size,
                           repeats=args.repeats)
        print(f"evaluation, batch {args.batch_size} vs one image at a time: {b['batched_images_per_s']:.2f} vs "
              f"{b['single_images_per_s']:.2f} images/s = {b['speedup']:.2f}x"
              f" ({b['differ']} of {b['pixels']} pixels scored differently)")
        w = bench_workers(small_segmentor(), root, short_side=args.short_side, batch_size=args.batch_size,
                          workers=args.workers, repeats=args.repeats)
        print(f"evaluation, {args.workers} DataLoader workers (read, resize, normalise) vs none: "
              f"{w['workers_images_per_s']:.2f} vs {w['main_images_per_s']:.2f} images/s = {w['speedup']:.2f}x "
              f"({w['differ']} of {w['pixels']} pixels scored differently)")
        p = bench_processes(root, short_side=args.short_side, batch_size=args.batch_size, processes=args.processes)
        print(f"evaluation, {args.processes} processes x {p['threads']} thread(s) vs 1 process x "
              f"{args.processes * p['threads']}: {p['many_images_per_s']:.2f} vs {p['one_images_per_s']:.2f} "
              f"images/s = {p['speedup']:.2f}x ({p['differ']} of {p['pixels']} pixels scored differently: other "
              f"thread counts round differently)")
    side = args.attention_grid
    for kind, a in bench_attention(grid=(side, side), repeats=max(args.repeats, 1)).items():
        print(f"last-block attention {kind!r} ({side}x{side} patches), fused SDPA vs explicit matrix: "
              f"{a['fused_s'] * 1e3:.2f} vs {a['explicit_s'] * 1e3:.2f} ms = {a['speedup']:.2f}x "
              f"(max abs difference {a['max_abs_diff']:.2e})")
    sh = bench_shared_windows(small_segmentor(), images=min(args.images, 8), short_side=args.short_side,
                              window=args.window, batch_size=args.slide_batch_size, repeats=args.repeats)
    print(f"slide mode {args.window}/{max(args.window // 2, 1)} at short side {args.short_side}, "
          f"{min(args.images, 8)} VOC-shaped images, windows of several images per forward (batch "
          f"{args.slide_batch_size}) vs each image's alone: {sh['shared_images_per_s']:.2f} vs "
          f"{sh['alone_images_per_s']:.2f} images/s = {sh['speedup']:.2f}x ({sh['differ']} of {sh['pixels']} pixels "
          f"labelled differently)")
    size = (args.slide_size, args.slide_size * 4 // 3)
    sl = bench_slide(small_segmentor(), size=size, window=args.window, stride=max(args.window // 2, 1),
                    batch_size=args.slide_batch_size, repeats=args.repeats, compile=args.compile)
    print(f"sliding window {args.window}/{max(args.window // 2, 1)} on {size[0]}x{size[1]} ({sl['windows']} windows), "
          f"{args.slide_batch_size} windows per forward vs one (mmseg slide_inference): "
          f"{sl['batched_windows_per_s']:.2f} vs {sl['loop_windows_per_s']:.2f} windows/s = {sl['speedup']:.2f}x "
          f"(max abs difference {sl['max_abs_diff']:.2e})")
    if args.compile:
        print(f"sliding window, torch.compile vs eager ({args.slide_batch_size} windows per forward, compilation "
              f"excluded): {sl['compiled_windows_per_s']:.2f} vs {sl['batched_windows_per_s']:.2f} windows/s = "
              f"{sl['compiled_speedup']:.2f}x (max abs difference {sl['compiled_max_abs_diff']:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
