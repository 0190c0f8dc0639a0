"""``python -m reclip.bench_methods``: images/s of every training-free method, relative to
MaskCLIP, at the same resolution (printed figures, not timed tests).

Each method of the training-free family is built from the registry on the same random
ViT-B/16-shaped CLIP, for the same 21 classes, and its segmentor (dense features, the
query head and, for class-aware strategies such as ResCLIP's feedback, their first pass)
runs on the same batch of square images; the figure is the median of ``--repeats`` timed
calls after a warm-up, and the ratio is MaskCLIP's seconds over the method's. A method
with a proxy model (ProxyCLIP) gets a random proxy of the architecture its preset names
(DINO ViT-B/8 by default), so no weights are needed: the figures measure compute only.
Post-processing (PAMR, thresholds) is the same for every method and is not timed, except
inside a strategy that runs it (ResCLIP's feedback pass).

    python -m reclip.bench_methods [--size 448] [--batch 2] [--repeats 3] [--device cuda]
                                   [--methods maskclip,sc_clip,...] [--small]

On CUDA the methods run under bf16 autocast, as evaluation does.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
import torch

from reclip.bench import VIT_B16
from reclip.clip.model import CLIP
from reclip.features import get_strategy
from reclip.heads.zero_shot import ZeroShotSegmentor
from reclip.methods import METHODS, get_family
from reclip.text import QueryEmbeddings

# --small: a ViT of 4 blocks (enough for every method's scaled layer choices) for a quick look / the test
SMALL = dict(VIT_B16, vision_layers=4, vision_width=128, embed_dim=64, transformer_width=64, transformer_heads=1,
             transformer_layers=1)


def training_free_methods() -> list[str]:
    """Names of the registered methods that read CLIP through a dense-feature strategy, MaskCLIP first."""
    names = [m.name for m in METHODS.values() if get_family(m).name == "zero_shot"]
    return sorted(names, key=lambda n: n != "maskclip")


def random_queries(clip: CLIP, classes: int = 21, seed: int = 0) -> QueryEmbeddings:
    g = torch.Generator().manual_seed(seed)
    weights = torch.nn.functional.normalize(torch.randn(classes, clip.visual.output_dim, generator=g), dim=-1)
    return QueryEmbeddings(weights=weights, class_index=torch.arange(classes), num_classes=classes)


def build(name: str, clip: CLIP, queries: QueryEmbeddings) -> ZeroShotSegmentor:
    """The method's segmentor on ``clip``; a proxy model (ProxyCLIP) is a random one of its preset's architecture."""
    strategy = get_strategy(METHODS[name].strategy)
    aux = None
    if getattr(strategy, "proxy", None) is not None:
        from reclip.backbones.dino import random_dino
        from reclip.strategies.proxyclip import ProxyFeatures

        aux = ProxyFeatures(random_dino(strategy.proxy), (clip.image_mean, clip.image_std))
    return ZeroShotSegmentor(clip, queries, strategy, aux=aux).eval()


def _forward(segmentor: ZeroShotSegmentor, images: torch.Tensor) -> float:
    """Seconds of one forward of ``images`` (bf16 autocast on CUDA)."""
    cuda = images.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        segmentor(images)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_methods(methods: Sequence[str], *, size: int = 448, batch: int = 2, repeats: int = 3,
                  device: str = "cpu", small: bool = False) -> dict[str, dict[str, float]]:
    """{method: {"images_per_s", "seconds", "vs_maskclip"}} at ``size`` x ``size``, batch ``batch``.

    Every segmentor is built and warmed up first; then the methods are timed in turns, one
    forward each per round, ``repeats`` rounds, and each method's median is kept, so a
    change in the machine's load during the run falls on all methods alike."""
    dev = torch.device(device)
    torch.manual_seed(0)
    clip = CLIP(**(SMALL if small else VIT_B16)).eval().requires_grad_(False).to(dev)
    queries = random_queries(clip)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dev)
    methods = list(dict.fromkeys(["maskclip", *methods]))
    segmentors = {name: build(name, clip, queries).to(dev) for name in methods}
    for segmentor in segmentors.values():
        _forward(segmentor, images)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, segmentor in segmentors.items():
            times[name].append(_forward(segmentor, images))
    results = {name: {"seconds": statistics.median(t), "images_per_s": batch / statistics.median(t)}
               for name, t in times.items()}
    base = results["maskclip"]["seconds"]
    for r in results.values():
        r["vs_maskclip"] = base / r["seconds"]
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reclip.bench_methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=448, help="square input side (px)")
    p.add_argument("--batch", type=int, default=2, help="images per forward")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", help="comma-separated methods (default: every training-free method)")
    p.add_argument("--small", action="store_true", help="a 4-block ViT instead of ViT-B/16 (quick look)")
    args = p.parse_args(argv)
    methods = args.methods.split(",") if args.methods else training_free_methods()
    unknown = [m for m in methods if m not in training_free_methods()]
    if unknown:
        p.error(f"not training-free methods of this reclip: {unknown}; available: {training_free_methods()}")
    shape = "4-block ViT (patch 16)" if args.small else "ViT-B/16"
    print(f"reclip bench_methods: random {shape} CLIP, {args.size}x{args.size}, batch {args.batch}, "
          f"{args.device}{' bf16 autocast' if args.device.startswith('cuda') else ' fp32'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} rounds, methods in turns", flush=True)
    results = bench_methods(methods, size=args.size, batch=args.batch, repeats=args.repeats, device=args.device,
                            small=args.small)
    print(f"{'method':<12} {'images/s':>10} {'vs MaskCLIP':>12}")
    for name, r in results.items():
        print(f"{name:<12} {r['images_per_s']:>10.3g} {r['vs_maskclip']:>11.3g}x")
    strategies = {name: dataclasses.asdict(get_strategy(METHODS[name].strategy)) for name in results}
    proxies = {n: s["proxy"] for n, s in strategies.items() if "proxy" in s}
    if proxies:
        print("proxy models (random weights): " + ", ".join(f"{n}: {p}" for n, p in proxies.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
