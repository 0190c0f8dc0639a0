"""``reclip bench``: printed speed and memory figures (not timed tests).

- zero-shot inference (MaskCLIP head, sliding 448/224 windows) at a 448 short side with
  a ViT-B/16-shaped random CLIP: images/s and peak memory;
- our CLIP forward against Hugging Face transformers' CLIPModel on the same weights
  (image tower at 224, text tower on 80 prompts): time ratio, goal ours <= 1.0x;
- on a GPU, the same in bf16 at batch 1 and 64.

Random weights: the figures measure compute, not accuracy.
"""

from __future__ import annotations

import gc
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from reclip.clip.convert import to_hf
from reclip.clip.model import CLIP
from reclip.clip.tokenizer import tokenize
from reclip.features import dense_features
from reclip.heads.zero_shot import ZeroShotSegmentor
from reclip.inference import InferenceConfig, segment
from reclip.text import QueryEmbeddings

VIT_B16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
               context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
               transformer_layers=12)


def _timeit(fn: Callable[[], Any], repeats: int, warmup: int = 1, cuda: bool = False) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timed_pair(first: Callable[[], Any], second: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median seconds of two functions timed in alternation (after one warm-up each)."""
    first(), second()
    a, b = [], []
    for _ in range(repeats):
        a.append(_timeit(first, repeats=1, warmup=0))
        b.append(_timeit(second, repeats=1, warmup=0))
    return statistics.median(a), statistics.median(b)


def _reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (Linux: VmHWM), so a peak covers one phase only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then covers the whole process


def _peak_rss_mib() -> float:
    """Peak resident memory since the last reset (weights included), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_zero_shot(clip: CLIP, device: torch.device, images: int, num_classes: int = 20) -> dict[str, float]:
    """images/s of MaskCLIP zero-shot segmentation of 448 x 597 images (2 windows each)."""
    weights = torch.nn.functional.normalize(torch.randn(num_classes, clip.config.embed_dim), dim=-1)
    queries = QueryEmbeddings(weights.to(device), torch.arange(num_classes, device=device), num_classes)
    head = ZeroShotSegmentor(clip, queries, "maskclip").eval()
    cfg = InferenceConfig(mode="slide", short_side=448, window=448, stride=224, logit_scale=50.0)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (448, 597, 3), dtype=np.uint8) for _ in range(images)]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()

    def run() -> None:
        with torch.inference_mode():
            for frame in frames:
                segment(head, frame, cfg, device=device)

    seconds = _timeit(run, repeats=2, warmup=1, cuda=cuda)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib()
    return {"images_per_s": images / seconds, "peak_mib": peak}


def bench_vs_hf(clip: CLIP, batch: int, repeats: int) -> dict[str, float] | None:
    """Forward time of our towers relative to HF transformers' CLIPModel, same weights."""
    try:
        import transformers
    except ImportError:
        return None
    sd, hf_cfg = to_hf(clip.state_dict(), clip.config)
    config = transformers.CLIPConfig(text_config=hf_cfg["text_config"], vision_config=hf_cfg["vision_config"],
                                     projection_dim=hf_cfg["projection_dim"])
    hf = transformers.CLIPModel(config).eval()
    hf.load_state_dict(sd, strict=True)
    res = clip.visual.input_resolution
    images = torch.randn(batch, 3, res, res)
    tokens = tokenize([f"a photo of a class number {i}." for i in range(80)])
    with torch.inference_mode():
        # Alternate the two implementations so that load from other processes hits both alike.
        ours_img, hf_img = _timed_pair(lambda: clip.encode_image(images),
                                       lambda: hf.get_image_features(pixel_values=images), repeats)
        ours_txt, hf_txt = _timed_pair(lambda: clip.encode_text(tokens),
                                       lambda: hf.get_text_features(input_ids=tokens), repeats)
    return {"image_ours_s": ours_img, "image_hf_s": hf_img, "image_ratio": ours_img / hf_img,
            "text_ours_s": ours_txt, "text_hf_s": hf_txt, "text_ratio": ours_txt / hf_txt}


def bench_gpu_bf16(clip: CLIP, device: torch.device) -> dict[int, dict[str, float]]:
    """Dense MaskCLIP features at 448 x 448 in bf16 autocast: images/s and peak memory per batch size."""
    results = {}
    for batch in (1, 64):
        images = torch.randn(batch, 3, 448, 448, device=device)
        torch.cuda.reset_peak_memory_stats()

        def run() -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                dense_features(clip, images, "maskclip")

        seconds = _timeit(run, repeats=10, warmup=3, cuda=True)
        results[batch] = {"images_per_s": batch / seconds, "peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    return results


def main(device: str = "auto", images: int = 4, repeats: int = 5) -> int:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    torch.manual_seed(0)
    clip = CLIP(**VIT_B16).eval().requires_grad_(False)
    print(f"reclip bench: ViT-B/16-shaped random CLIP on {dev}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    cpu_clip = clip
    clip = clip.to(dev)
    zs = bench_zero_shot(clip, dev, images)
    print(f"zero-shot maskclip, 448 short side, slide 448/224 (448x597: 2 windows), fp32: "
          f"{zs['images_per_s']:.2f} images/s, peak memory {zs['peak_mib']:.0f} MiB"
          f" ({'GPU allocated' if dev.type == 'cuda' else 'process RSS, weights included'})")
    gc.collect()
    hf = bench_vs_hf(cpu_clip.cpu(), batch=8, repeats=repeats)
    if hf is None:
        print("HF comparison skipped: transformers is not installed (pip install transformers)")
    else:
        print(f"CLIP forward vs HF transformers (CPU, fp32, same weights): image tower batch 8 @224 "
              f"{hf['image_ours_s'] * 1e3:.0f} ms vs {hf['image_hf_s'] * 1e3:.0f} ms = {hf['image_ratio']:.2f}x; "
              f"text tower 80 prompts {hf['text_ours_s'] * 1e3:.0f} ms vs {hf['text_hf_s'] * 1e3:.0f} ms = "
              f"{hf['text_ratio']:.2f}x")
    if dev.type == "cuda":
        clip = cpu_clip.to(dev)
        for batch, r in bench_gpu_bf16(clip, dev).items():
            print(f"GPU bf16 dense features 448x448, batch {batch}: {r['images_per_s']:.1f} images/s, "
                  f"peak {r['peak_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
