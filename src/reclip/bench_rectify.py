"""Printed speed figures of the ReCLIP++ rectification stage (not timed tests).

- ``bench_hypotheses``: image-level hypotheses (paper eq. 6), all crops through CLIP in
  batches against the official one-crop-per-forward loop; goal >= 5x.
- ``bench_reference``: the Reference prompt's text encoding with the shared prefix computed
  once against every class encoding its full 77 tokens, for C = 20, 59, 150; goal >= 10x.
- ``bench_train_step``: rectification training steps/s and peak memory at crop 336,
  batch 8 (bf16 features on a GPU).

Run: ``python -m reclip.bench_rectify [--only hypotheses|reference|train]``.

Random weights: the figures measure compute, not accuracy.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from reclip.bench import VIT_B16
from reclip.clip.model import CLIP
from reclip.hypotheses import HypothesisConfig, crop_boxes, image_hypotheses
from reclip.text import QueryEmbeddings

__all__ = ["bench_hypotheses", "bench_reference", "bench_train_step"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_hypotheses(
    clip: CLIP | None = None,
    *,
    images: int = 2,
    height: int = 375,
    width: int = 500,
    r: float = 1 / 6,
    batch_size: int = 64,
    num_classes: int = 20,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """Time hypotheses of ``images`` random images: batched crops vs one crop per forward pass.

    Both runs use :func:`reclip.hypotheses.image_hypotheses` (same crops, resize and
    rule), once with ``batch_size`` crops per CLIP call, once with 1 (the official loop,
    dogehhh/ReCLIP tools/pseudo_class.py); each is warmed up on one image first, and the
    hypotheses of both are checked to agree.

    Args:
        clip: the model; default a random ViT-B/16-shaped CLIP (VOC-sized images give
            11 x 11 = 121 crops each at r = 1/6).
        images, height, width: the random uint8 images.
        r, batch_size: hypothesis settings.
        num_classes: random unit query rows.
        device: where CLIP runs.

    Returns:
        {"crops", "batched_s", "single_s", "batched_crops_per_s", "single_crops_per_s", "speedup"}.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    if clip is None:
        clip = CLIP(**VIT_B16)
    clip = clip.to(device).eval()
    dim = clip.visual.output_dim
    g = torch.Generator().manual_seed(seed)
    weights = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=-1)
    queries = QueryEmbeddings(weights.to(device), torch.arange(num_classes, device=device), num_classes)
    rng = np.random.default_rng(seed)
    imgs = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(images)]
    crops = images * len(crop_boxes(height, width, r))
    kw = dict(mean=clip.image_mean, std=clip.image_std)

    def run(bs: int) -> tuple[float, list[list[int]]]:
        cfg = HypothesisConfig(r=r, t=0.0, batch_size=bs)
        small = np.ascontiguousarray(imgs[0][: height // 3, : width // 3])
        image_hypotheses(clip, [small], queries, config=cfg, **kw)  # warm-up
        _sync(device)
        start = time.perf_counter()
        out = image_hypotheses(clip, imgs, queries, config=cfg, **kw)
        _sync(device)
        return time.perf_counter() - start, out

    print(f"hypotheses: {images} images {height}x{width}, r={r:.4g} -> {crops} crops at "
          f"{clip.visual.input_resolution}px, {num_classes} classes, {device}, {torch.get_num_threads()} threads")
    batched_s, batched = run(batch_size)
    print(f"  batched ({batch_size} crops / forward): {batched_s:8.2f} s  {crops / batched_s:8.1f} crops/s")
    single_s, single = run(1)
    print(f"  one crop per forward (official loop): {single_s:8.2f} s  {crops / single_s:8.1f} crops/s")
    speedup = single_s / batched_s
    agree = "same hypotheses" if batched == single else "HYPOTHESES DIFFER"
    print(f"  speedup {speedup:.2f}x (goal >= 5x); {agree}")
    return {"crops": float(crops), "batched_s": batched_s, "single_s": single_s,
            "batched_crops_per_s": crops / batched_s, "single_crops_per_s": crops / single_s, "speedup": speedup}



def bench_reference(
    clip: CLIP | None = None,
    *,
    num_classes: tuple[int, ...] = (20, 59, 150),
    backward: bool = True,
    repeats: int = 2,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[int, dict[str, float]]:
    """Time the Reference prompt W_r: shared-prefix encoding vs every class's full sequence.

    :class:`reclip.heads.reference.ReferencePrompt` ``forward`` (prefix [SOT; 73 context]
    once, then the per-class [name; EOT] suffixes) against ``forward_full`` (C sequences of
    77 tokens, the official TextEncoder), with gradients into the context when
    ``backward`` (one training step's text cost). Each is warmed up once, then timed as
    the median of ``repeats`` runs; the two W_r are checked to agree.

    Args:
        clip: the model; default a random CLIP with ViT-B/16's text tower (width 512,
            8 heads, 12 layers, 77 tokens; a 1-layer image tower, unused here).
        num_classes: the C values (VOC 20, Context 59, ADE 150).
        backward: time forward + backward (training) instead of forward only.
        repeats: timed runs per measurement.
        device: where the text tower runs.

    Returns:
        {C: {"shared_s", "full_s", "speedup", "max_abs_diff"}}.
    """
    import contextlib

    from reclip.clip.tokenizer import get_tokenizer
    from reclip.heads.reference import ReferencePrompt

    device = torch.device(device)
    torch.manual_seed(seed)
    if clip is None:
        clip = CLIP(**{**VIT_B16, "vision_layers": 1})
    clip = clip.to(device).eval().requires_grad_(False)
    # Class names that fit the 2 slots L = 73 leaves (1-2 BPE tokens), cycled to C.
    tok = get_tokenizer()
    words = ("cat dog person car bus train boat bird horse sheep cow bottle chair table sofa tree sky grass "
             "road wall floor ceiling window door building mountain water sea sand snow rock field fence bed "
             "lamp book cup bowl").split() + ["potted plant", "traffic light"]
    names = [w for w in words if len(tok.encode(w)) <= 2]

    def timed(fn) -> tuple[float, torch.Tensor]:
        def once() -> torch.Tensor:
            w = fn()
            if backward:
                w.sum().backward()
            return w.detach()

        out = once()  # warm-up
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            once()
            _sync(device)
            times.append(time.perf_counter() - start)
        return float(np.median(times)), out

    mode = "forward + backward" if backward else "forward"
    print(f"reference prompt W_r ({mode}), text tower width {clip.transformer.width}, "
          f"{clip.transformer.layers} layers, {clip.context_length} tokens, {device}, "
          f"{torch.get_num_threads()} threads")
    results: dict[int, dict[str, float]] = {}
    for C in num_classes:
        ref = ReferencePrompt(clip, [names[i % len(names)] for i in range(C)], init="normal").to(device)
        grad = contextlib.nullcontext() if backward else torch.no_grad()
        with grad:
            shared_s, shared = timed(ref.forward)
            full_s, full = timed(ref.forward_full)
        diff = (shared - full).abs().max().item()
        results[C] = {"shared_s": shared_s, "full_s": full_s, "speedup": full_s / shared_s, "max_abs_diff": diff}
        goal = " (goal >= 10x)" if C == 150 else ""
        print(f"  C={C:4d}: shared prefix {shared_s * 1e3:9.1f} ms   full {full_s * 1e3:9.1f} ms   "
              f"speedup {full_s / shared_s:6.1f}x{goal}   max |diff| {diff:.2e}")
    return results

def bench_train_step(
    clip: CLIP | None = None,
    *,
    batch_size: int = 8,
    crop: int = 336,
    num_classes: int = 20,
    steps: int = 3,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """ReCLIP++ rectification training steps/s and peak memory (random ViT-B/16 by default).

    One step = frozen CLIP features (no grad; bf16 autocast on CUDA), Reference encoding,
    decoder, Gumbel masks, eq. 7, backward and an SGD update, on a (batch, 3, crop, crop)
    batch with random hypotheses. Peak memory: CUDA allocated, or process RSS (weights
    included) on CPU.
    """
    from reclip.bench import _peak_rss_mib, _reset_peak_rss
    from reclip.heads.rectify import Rectifier, rectification_loss
    from reclip.train import SGDConfig

    device = torch.device(device)
    torch.manual_seed(seed)
    if clip is None:
        clip = CLIP(**VIT_B16)
    clip = clip.to(device).eval().requires_grad_(False)
    weights = torch.nn.functional.normalize(torch.randn(num_classes, clip.config.embed_dim), dim=-1)
    queries = QueryEmbeddings(weights.to(device), torch.arange(num_classes, device=device), num_classes)
    model = Rectifier(clip, queries, [str(i) for i in range(num_classes)]).to(device).train()
    optimizer = SGDConfig(lr=0.01, momentum=0.9, weight_decay=5e-4).build(model)
    images = torch.randn(batch_size, 3, crop, crop, device=device)
    hypotheses = torch.rand(batch_size, num_classes, device=device) < 0.2
    hypotheses[:, 0] = True

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = rectification_loss(model, model.forward_train(images), hypotheses)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_rss_mib()
    print(f"rectification step, batch {batch_size}, crop {crop}, {num_classes} classes on {device}: "
          f"{1 / seconds:.3f} steps/s ({batch_size / seconds:.2f} images/s), peak memory {peak:.0f} MiB")
    return {"steps_per_s": 1 / seconds, "peak_mib": peak}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--only", choices=("hypotheses", "reference", "train"))
    args = parser.parse_args()
    if args.only in (None, "reference"):
        bench_reference()
    if args.only in (None, "train"):
        bench_train_step(device=args.device)
    if args.only in (None, "hypotheses"):
        bench_hypotheses(images=args.images, batch_size=args.batch_size, device=args.device)
