"""``python -m reclip.bench_gpu``: the GPU throughput figures, in one command (printed, not timed tests).

On a GPU (H200 class) with random weights (the figures measure compute, not accuracy):

1. zero-shot evaluation throughput on a VOC-sized set: ``--images`` (default 1,449, VOC
   2012 val) synthetic images of VOC's common shapes (~500 x 375,
   :func:`reclip.bench_eval.write_dataset`), a random ViT-B/16 (:data:`reclip.bench.VIT_B16`),
   ClearCLIP, short side 448, slide 448/224, bf16 autocast, through the real evaluation
   path (:func:`reclip.api.evaluate_segmentor`: DataLoader workers, shared window batches,
   confusion matrix); images/s after an untimed warm-up run;
2. the backbone's forward FLOP utilisation: ``CLIP.encode_image`` (the whole ViT) on a
   batch of 64 at 448 x 448 in bf16 autocast; FLOPs from :func:`vit_flops` (matmuls and
   attention: ~157 GFLOP per image for ViT-B/16 at 448, the issue's "about 156"), checked
   against ``torch.utils.flop_counter`` (which counts CUDA attention kernels but not the
   CPU one), divided by the time and by the device's peak dense bf16 FLOP/s
   (:data:`PEAK_BF16_TFLOPS` by device name, or ``--peak-tflops``);
3. ReCLIP++ rectification training steps/s (:func:`reclip.bench_rectify.bench_train_step`:
   batch 8, crop 336).

Bounded to a few minutes on an H200 (the sizes are capped; each section prints its wall
time). ``--quick`` runs the same code on tiny sizes (a small ViT, a few small images), so
a CPU test can exercise it:

    python -m reclip.bench_gpu [--device cuda] [--images 1449] [--compile]
    python -m reclip.bench_gpu --quick --device cpu
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

import torch
from torch.utils.flop_counter import FlopCounterMode

from reclip.bench import VIT_B16
from reclip.clip.model import CLIP
from reclip.data.datasets import SegmentationDataset
from reclip.data.transforms import CLIP_MEAN, CLIP_STD
from reclip.heads.zero_shot import ZeroShotSegmentor
from reclip.inference import InferenceConfig
from reclip.text import QueryEmbeddings

__all__ = ["PEAK_BF16_TFLOPS", "peak_tflops", "vit_flops", "bench_evaluation", "bench_backbone_flops", "main"]

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets; matched
# in this order as a substring of torch.cuda.get_device_name() (specific names first).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200 NVL": 835.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}
VOC_VAL_IMAGES = 1449  # PASCAL VOC 2012 val
MAX_IMAGES = 5000  # the cap that keeps a run within minutes (COCO-Stuff val's size)
NUM_CLASSES = 21
# --quick: a small ViT and small images, for a CPU test of the code path
QUICK_VIT = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=32, transformer_heads=2,
                 transformer_layers=1)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's peak dense bf16 TFLOP/s: ``override``, else :data:`PEAK_BF16_TFLOPS` by
    name; None where unknown (a CPU, an unlisted GPU)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def vit_flops(*, width: int, layers: int, patch: int, size: int, mlp_ratio: int = 4) -> float:
    """Forward FLOPs of one image through a ViT (2 per multiply-add; matmuls and attention,
    as ``torch.utils.flop_counter`` counts): patch embedding 2 (size / patch)^2 (3 patch^2) D; per block
    qkv 6 N D^2, output 2 N D^2, MLP 4 mlp_ratio N D^2, attention 4 N^2 D, with N = 1 + (size /
    patch)^2 tokens. ViT-B/16 at 448: N = 785, D = 768, 12 blocks -> ~157 GFLOP."""
    grid = (size // patch) ** 2
    tokens = 1 + grid
    embed = 2 * grid * (3 * patch * patch) * width
    block = (8 + 4 * mlp_ratio) * tokens * width**2 + 4 * tokens**2 * width
    return float(embed + layers * block)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _segmentor(clip_shape: dict[str, Any], strategy: str, device: torch.device, seed: int = 0) -> ZeroShotSegmentor:
    """A zero-shot head on a random CLIP of ``clip_shape`` with random class queries."""
    torch.manual_seed(seed)
    clip = CLIP(**clip_shape).eval().requires_grad_(False)
    weights = torch.nn.functional.normalize(torch.randn(NUM_CLASSES, clip.config.embed_dim), dim=-1)
    queries = QueryEmbeddings(weights, torch.arange(NUM_CLASSES), NUM_CLASSES)
    return ZeroShotSegmentor(clip, queries, strategy).eval().to(device)


def bench_evaluation(segmentor: Any, root: Path, cfg: InferenceConfig, *, workers: int,
                     warmup_images: int) -> dict[str, float]:
    """images/s of :func:`reclip.api.evaluate_segmentor` over the VOC layout at ``root``,
    after an untimed run over its first ``warmup_images`` (CUDA kernels, cuDNN plans and,
    with ``cfg.compile``, the compilation); the evaluation's own ``seconds`` (DataLoader
    start included)."""
    from reclip.api import evaluate_segmentor

    data = SegmentationDataset("voc21", root, "val")
    evaluate_segmentor(segmentor, data, cfg, mean=CLIP_MEAN, std=CLIP_STD, limit=warmup_images,
                       num_workers=workers, progress=False)
    result = evaluate_segmentor(segmentor, data, cfg, mean=CLIP_MEAN, std=CLIP_STD, num_workers=workers,
                                progress=False)
    return {"images": result.num_images, "seconds": result.seconds,
            "images_per_s": result.num_images / result.seconds, "warmup_seconds": result.warmup_seconds}


def bench_backbone_flops(clip: CLIP, device: torch.device, *, batch: int = 64, size: int = 448,
                         repeats: int = 10, compile: bool = False, peak: float | None = None) -> dict[str, float]:
    """Forward time of ``clip.encode_image`` on a (batch, 3, size, size) batch in bf16
    autocast (fp32 on a CPU); its FLOPs per image by :func:`vit_flops` (``gflop_per_image``)
    and by ``torch.utils.flop_counter`` on one image (``counted_gflop_per_image``); the
    achieved TFLOP/s and, with ``peak`` TFLOP/s, the utilisation (fraction), both from
    :func:`vit_flops`. With ``compile``, through torch.compile (compiled in the warm-up,
    not timed)."""
    visual = clip.visual
    analytic = vit_flops(width=visual.conv1.out_channels, layers=len(visual.transformer.resblocks),
                         patch=visual.conv1.kernel_size[0], size=size)
    images = torch.randn(batch, 3, size, size, device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    forward = torch.compile(clip.encode_image) if compile else clip.encode_image
    with torch.inference_mode(), autocast:
        with FlopCounterMode(display=False) as counter:
            clip.encode_image(images[:1])
        counted = float(counter.get_total_flops())
        for _ in range(3):  # warm-up (and compilation)
            forward(images)
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            forward(images)
        _sync(device)
    seconds = (time.perf_counter() - start) / repeats
    achieved = analytic * batch / seconds / 1e12
    return {"gflop_per_image": analytic / 1e9, "counted_gflop_per_image": counted / 1e9, "seconds": seconds,
            "images_per_s": batch / seconds,
            "tflops": achieved, "utilisation": achieved / peak if peak else float("nan")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reclip.bench_gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs (default cuda when there is one)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (small ViT, 4 small images): checks the code path, e.g. on a CPU")
    parser.add_argument("--images", type=int, default=VOC_VAL_IMAGES,
                        help=f"synthetic VOC-shaped images of the evaluation (default {VOC_VAL_IMAGES}, at most "
                             f"{MAX_IMAGES})")
    parser.add_argument("--strategy", default="clearclip", help="zero-shot strategy of the evaluation")
    parser.add_argument("--window-batch", type=int, default=32, help="windows per forward of the evaluation")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers of the evaluation")
    parser.add_argument("--flop-batch", type=int, default=64, help="batch of the FLOP-utilisation forward")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak dense bf16 TFLOP/s (default: from a table by device name)")
    parser.add_argument("--compile", action="store_true",
                        help="also the evaluation and the backbone through torch.compile (compilation not timed)")
    parser.add_argument("--only", choices=("evaluation", "flops", "train"), help="run one section only")
    args = parser.parse_args(argv)
    if not 0 < args.images <= MAX_IMAGES:
        parser.error(f"--images must be in 1..{MAX_IMAGES}, got {args.images}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu (with --quick)")
    quick = args.quick
    shape = QUICK_VIT if quick else VIT_B16
    images = min(args.images, 4) if quick else args.images
    short_side, window = (32, 32) if quick else (448, 448)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_tflops(device, args.peak_tflops)
    print(f"reclip bench_gpu {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {name} "
          f"({device}), torch {torch.__version__}, {'tiny sizes (--quick)' if quick else 'ViT-B/16, random weights'}; "
          f"peak bf16 {f'{peak:g} TFLOP/s' if peak else 'unknown (--peak-tflops)'}")

    if args.only in (None, "evaluation"):
        start = time.perf_counter()
        segmentor = _segmentor(shape, args.strategy, device)
        cfg = InferenceConfig(mode="slide", short_side=short_side, window=window, stride=window // 2,
                              batch_size=args.window_batch, autocast="bf16" if device.type == "cuda" else False,
                              logit_scale=50.0)
        with tempfile.TemporaryDirectory() as tmp:
            from reclip.bench_eval import write_dataset

            root = write_dataset(Path(tmp) / "voc", images)
            runs = {"eager": cfg, **({"compiled": dataclasses.replace(cfg, compile=True)} if args.compile else {})}
            for label, run_cfg in runs.items():
                e = bench_evaluation(segmentor, root, run_cfg, workers=0 if quick else args.workers,
                                     warmup_images=min(images, 2 if quick else 64))
                print(f"zero-shot evaluation ({args.strategy}, {label}), {e['images']} VOC-shaped images, short side "
                      f"{short_side}, slide {window}/{window // 2}, {args.window_batch} windows per forward, "
                      f"{'bf16' if cfg.autocast else 'fp32'}: {e['images_per_s']:.1f} images/s "
                      f"({e['seconds']:.1f} s; compile warm-up {e['warmup_seconds']:.1f} s, not counted)")
        print(f"  [evaluation section: {time.perf_counter() - start:.0f} s]")

    if args.only in (None, "flops"):
        start = time.perf_counter()
        clip = _segmentor(shape, "raw", device).clip
        size = 32 if quick else 448
        batch = 2 if quick else args.flop_batch
        for compile in (False, True) if args.compile else (False,):
            f = bench_backbone_flops(clip, device, batch=batch, size=size, repeats=2 if quick else 10,
                                     compile=compile, peak=peak)
            util = f"{100 * f['utilisation']:.1f}% of peak" if peak else "utilisation unknown (give --peak-tflops)"
            print(f"backbone forward ({'compiled' if compile else 'eager'}), batch {batch} at {size}x{size}, "
                  f"{'bf16' if device.type == 'cuda' else 'fp32'}: {f['images_per_s']:.1f} images/s, "
                  f"{f['gflop_per_image']:.1f} GFLOP/image (flop_counter: {f['counted_gflop_per_image']:.1f}) = "
                  f"{f['tflops']:.1f} TFLOP/s, {util}")
        print(f"  [FLOP section: {time.perf_counter() - start:.0f} s]")

    if args.only in (None, "train"):
        from reclip.bench_rectify import bench_train_step

        start = time.perf_counter()
        if quick:
            bench_train_step(CLIP(**QUICK_VIT), batch_size=2, crop=32, num_classes=3, steps=1, device=device)
        else:
            bench_train_step(device=device, steps=5)
        print(f"  [training section: {time.perf_counter() - start:.0f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
