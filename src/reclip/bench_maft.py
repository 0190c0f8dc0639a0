"""Printed speed figures of MAFT's proposal classification (not timed tests).

``bench_proposals``: mask proposals classified per second, two ways, on one image:

- IP-CLIP (:func:`reclip.maft.ipclip.ip_clip_embeddings`): the image once through CLIP's
  ViT, every proposal a masked CLS copy in the last blocks, N proposals in one pass;
- the classic way (ZegFormer / OVSeg / FreeSeg's region classification, the one MAFT
  replaces): for each proposal, crop its bounding box, fill the pixels outside the mask
  with the mean colour (0 after normalisation), resize the crop to CLIP's input size and
  encode it as an image (all crops in one batch).

Both give one (not normalised) embedding per proposal; the text side, the same for both,
is left out. Random weights (a ViT-B/16-shaped CLIP) and random box proposals: the
figures measure compute, not accuracy.

Run: ``python -m reclip.bench_maft [--device cpu|cuda] [--dtype fp32|bf16] [--size 448]
[--proposals 100] [--crop 224]``. Without ``--device``: the CPU in float32, then CUDA in
bf16 autocast when a GPU is present (skipped with a message if not).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from reclip.bench import VIT_B16
from reclip.clip.model import CLIP
from reclip.maft.ipclip import default_start_layer, ip_clip_embeddings

__all__ = ["bench_proposals", "box_proposals", "masked_crop_embeddings"]

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def box_proposals(n: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """``n`` random binary box proposals (n, H, W), each 10-60 % of the image's sides."""
    g = torch.Generator().manual_seed(seed)
    H, W = size
    masks = torch.zeros(n, H, W)
    for k in range(n):
        h = int(H * (0.1 + 0.5 * torch.rand(1, generator=g)))
        w = int(W * (0.1 + 0.5 * torch.rand(1, generator=g)))
        y = int(torch.randint(0, H - h + 1, (1,), generator=g))
        x = int(torch.randint(0, W - w + 1, (1,), generator=g))
        masks[k, y:y + h, x:x + w] = 1
    return masks


def masked_crop_embeddings(clip: CLIP, image: torch.Tensor, masks: torch.Tensor, crop: int = 224) -> torch.Tensor:
    """The classic region classification's embeddings: image (1, 3, H, W) normalised,
    masks (N, H, W) -> (N, output_dim): per proposal its bounding box, pixels outside the
    mask set to 0 (the mean colour), resized to ``crop`` x ``crop``, through ``clip.encode_image``."""
    crops = []
    for mask in masks:
        inside = mask > 0.5
        rows, cols = inside.any(1).nonzero(), inside.any(0).nonzero()
        if rows.numel() == 0:  # an empty proposal: the whole image
            y0, y1, x0, x1 = 0, mask.shape[0], 0, mask.shape[1]
        else:
            y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        region = image[:, :, y0:y1, x0:x1] * mask[y0:y1, x0:x1].to(image.dtype)  # (1, 3, h, w)
        crops.append(F.interpolate(region, size=(crop, crop), mode="bilinear", align_corners=False))
    return clip.encode_image(torch.cat(crops))  # (N, output_dim)


def bench_proposals(
    clip: CLIP | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    size: int = 448,
    proposals: int = 100,
    crop: int = 224,
    repeats: int = 1,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Proposals classified per second by IP-CLIP (one pass) and by masked crops.

    Each way runs once to warm up (the crops on 2 proposals), then the median of
    ``repeats`` timed runs, under ``inference_mode`` (``dtype="bf16"``: bf16 autocast).

    Args:
        clip: default a random ViT-B/16-shaped CLIP.
        size: the image is size x size (IP-CLIP's input).
        proposals: N, random boxes.
        crop: the classic way's crop size (CLIP's own input size, 224 for ViT-B/16).

    Returns:
        {"ipclip_per_s", "crop_per_s", "speedup", "ipclip_s", "crop_s"} (speedup = IP-CLIP
        over crops), or None when ``device`` is CUDA and none is present.
    """
    device = torch.device(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {list(DTYPES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("proposal classification on CUDA skipped: no CUDA device here")
        return None
    torch.manual_seed(seed)
    clip = (clip if clip is not None else CLIP(**VIT_B16)).to(device).eval().requires_grad_(False)
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)
    masks = box_proposals(proposals, (size, size), seed).to(device)
    autocast = DTYPES[dtype]

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def run(fn):
        def call():
            with torch.inference_mode(), torch.autocast(device.type, dtype=autocast or torch.float32,
                                                        enabled=autocast is not None):
                return fn()
        return call

    ipclip = run(lambda: ip_clip_embeddings(clip, image, masks[None]))
    crops = run(lambda: masked_crop_embeddings(clip, image, masks, crop))
    depth = len(clip.visual.transformer.resblocks)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"proposal classification: {proposals} random box proposals on a {size}x{size} image, random "
          f"{depth}-block ViT/{clip.visual.patch_size} CLIP, {device}, {dtype}{threads}", flush=True)
    warm_ipclip = ipclip()  # warm-up
    warm_crops = run(lambda: masked_crop_embeddings(clip, image, masks[:2], crop))()  # warm-up, 2 proposals
    if warm_ipclip.shape[1:] != (proposals, *warm_crops.shape[1:]):  # the two ways must measure the same output
        raise RuntimeError(f"IP-CLIP gave embeddings {tuple(warm_ipclip.shape)} and the masked crops "
                           f"{tuple(warm_crops.shape)}; expected (1, {proposals}, D) and (2, D) with one D: the "
                           f"two ways no longer compute the same thing, so their speeds cannot be compared")
    ipclip_s = timed(ipclip)
    print(f"  IP-CLIP, one pass (blocks {default_start_layer(depth)}..{depth - 1} masked): {ipclip_s:.3f} s, "
          f"{proposals / ipclip_s:.1f} proposals/s", flush=True)
    crop_s = timed(crops)
    print(f"  masked crops at {crop}x{crop}, one batch: {crop_s:.3f} s, {proposals / crop_s:.1f} proposals/s",
          flush=True)
    print(f"  IP-CLIP / crops: {crop_s / ipclip_s:.1f}x", flush=True)
    return {"ipclip_per_s": proposals / ipclip_s, "crop_per_s": proposals / crop_s, "speedup": crop_s / ipclip_s,
            "ipclip_s": ipclip_s, "crop_s": crop_s}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cpu in fp32, then cuda in bf16 if present)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="fp32 or bf16 autocast (default: fp32 on the CPU, "
                                                              "bf16 on CUDA)")
    parser.add_argument("--size", type=int, default=448, help="image side in pixels (default 448)")
    parser.add_argument("--proposals", type=int, default=100, help="N (default 100)")
    parser.add_argument("--crop", type=int, default=224, help="the crops' size (default 224, CLIP's input)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up (median)")
    args = parser.parse_args(argv)
    for device in [args.device] if args.device else ["cpu", "cuda"]:
        dtype = args.dtype or ("bf16" if torch.device(device).type == "cuda" else "fp32")
        bench_proposals(device=device, dtype=dtype, size=args.size, proposals=args.proposals, crop=args.crop,
                        repeats=args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
