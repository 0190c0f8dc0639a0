"""Printed speed and memory figures of the ReCLIP++ distillation stage (not timed tests).

- ``bench_distill_step``: distillation training steps/s and peak memory (default crop 512,
  batch 8, ResNet-101 student): the frozen rectified CLIP teacher's forward, then the
  student's forward, the three losses of eq. 10 (L_mask, L_feat, L_text), backward and an
  SGD update, as :func:`reclip.distillation.distill` runs them. On CUDA the loss is computed
  under bf16 autocast (``TrainConfig.amp``; the teacher's CLIP features are bf16 there
  anyway, the heads float32).
- ``bench_student_inference``: images/s of the student (ResNet + ASPP-V2 + the inherited
  head) against the rectified CLIP teacher (ViT-B/16 + rectifier head) at the same
  resolution: whole-image forward, one image per forward, no grad.

Run: ``python -m reclip.bench_distill [--only step|inference] [--device cpu|cuda]
[--crop 512] [--batch-size 8] [--backbone resnet101]``. Without ``--device`` both run on
the CPU, then again on CUDA in bf16 when a GPU is present (skipped with a message if not).

Memory: on the CPU a crop-512 step with the ResNet-101 student took 6.2 GB of RSS at
batch 1 and 10.3 GB at batch 2 (about 4.1 GB per image; L_feat alone holds several
D-channel maps at the crop's size, 0.5 GB per image each), so batch 8 needs about 35 GB;
use ``--batch-size`` or ``--crop`` to fit a smaller machine.

Random weights (a ViT-B/16-shaped CLIP, a randomly initialised student): the figures
measure compute, not accuracy.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from reclip.bench import VIT_B16, _peak_rss_mib, _reset_peak_rss
from reclip.clip.model import CLIP
from reclip.heads.rectify import RECLIPPP, Rectifier, RectifierConfig
from reclip.text import QueryEmbeddings

__all__ = ["bench_distill_step", "bench_student_inference"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_missing(device: torch.device, what: str) -> bool:
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{what} on CUDA (bf16) skipped: no CUDA device here")
        return True
    return False


def _models(clip: CLIP | None, *, num_classes: int, backbone: str, width: int, aspp_channels: int, crop: int,
            rectifier_config: RectifierConfig, device: torch.device, seed: int):
    """A random rectified teacher (frozen, eval) and a student with its inherited head, on ``device``."""
    from reclip.distillation import INPUT_NORMS, DistillConfig, Student, StudentBackbone
    from reclip.heads.inherited import inherit

    torch.manual_seed(seed)
    if clip is None:
        clip = CLIP(**VIT_B16)
    clip = clip.to(device).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    weights = torch.nn.functional.normalize(torch.randn(num_classes, clip.visual.output_dim, generator=g), dim=-1)
    queries = QueryEmbeddings(weights.to(device), torch.arange(num_classes, device=device), num_classes)
    teacher = Rectifier(clip, queries, [str(i) for i in range(num_classes)], rectifier_config).to(device)
    teacher.requires_grad_(False).eval()
    grid = (-(-crop // clip.visual.patch_size),) * 2  # the teacher's grid at the training crop
    config = DistillConfig(backbone=backbone, width=width, aspp_channels=aspp_channels)
    student_backbone = StudentBackbone(backbone, clip.visual.output_dim, aspp_channels, weights=None, width=width)
    student = Student(student_backbone, inherit(teacher, grid), *INPUT_NORMS[config.input_norm], config)
    return teacher, student.to(device), config


def bench_distill_step(
    clip: CLIP | None = None,
    *,
    device: str | torch.device = "cpu",
    crop: int = 512,
    batch_size: int = 8,
    backbone: str = "resnet101",
    steps: int = 2,
    num_classes: int = 20,
    width: int = 64,
    aspp_channels: int = 512,
    rectifier_config: RectifierConfig = RECLIPPP,
    seed: int = 0,
) -> dict[str, float] | None:
    """Distillation steps/s (median of ``steps`` timed steps after one warm-up) and peak memory.

    One step = the teacher's Z and M_o (no grad), the student's forward, L_mask + 0.5 L_feat
    + 0.5 L_text (:func:`reclip.distillation.distillation_loss`), backward and SGD (lr 0.01,
    momentum 0.9, weight decay 5e-4) on a random (batch, 3, crop, crop) batch with random
    hypotheses. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, process RSS
    (weights included) on the CPU, over the timed steps.

    Args:
        clip: the teacher's CLIP; default a random ViT-B/16-shaped one.
        backbone, width, aspp_channels: the student (DistillConfig fields).
        rectifier_config: the teacher's settings (ReCLIP++ by default).

    Returns:
        {"steps_per_s", "images_per_s", "step_s", "peak_mib"}, or None when ``device`` is
        CUDA and none is present (a message says so).
    """
    from reclip.distillation import _Teacher, distillation_loss
    from reclip.train import SGDConfig

    device = torch.device(device)
    if _cuda_missing(device, "distillation step"):
        return None
    teacher, student, config = _models(clip, num_classes=num_classes, backbone=backbone, width=width,
                                       aspp_channels=aspp_channels, crop=crop, rectifier_config=rectifier_config,
                                       device=device, seed=seed)
    student.train()
    rc = teacher.config
    gumbel = {"tau": rc.gumbel_tau, "scale": rc.gumbel_scale, "contrastive_scale": rc.contrastive_scale,
              "pool": rc.pool}
    frozen = _Teacher(teacher)
    optimizer = SGDConfig(lr=0.01, momentum=0.9, weight_decay=5e-4).build(student)
    hypotheses = torch.rand(batch_size, num_classes, device=device) < 0.2
    hypotheses[:, 0] = True
    batch = {"image": torch.randn(batch_size, 3, crop, crop, device=device),
             "valid": torch.ones(batch_size, crop, crop, dtype=torch.bool, device=device),
             "hypotheses": hypotheses}
    bf16 = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = distillation_loss(student, frozen, config, gumbel, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ", bf16 autocast"
    print(f"distillation step: {backbone} student (width {width}, ASPP {aspp_channels}), random ViT-B/16-shaped "
          f"teacher, batch {batch_size}, crop {crop}, {num_classes} classes, {device}{threads}", flush=True)
    start = time.perf_counter()
    step()  # warm-up
    _sync(device)
    print(f"  warm-up step {time.perf_counter() - start:.1f} s", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "GPU allocated"
    else:
        peak, kind = _peak_rss_mib(), "process RSS, weights included"
    print(f"  {1 / seconds:.4f} steps/s ({batch_size / seconds:.3f} images/s; median of {steps} step(s), "
          f"{seconds:.1f} s/step), peak memory {peak:.0f} MiB ({kind})", flush=True)
    return {"steps_per_s": 1 / seconds, "images_per_s": batch_size / seconds, "step_s": seconds, "peak_mib": peak}


def bench_student_inference(
    device: str | torch.device = "cpu",
    size: int = 512,
    images: int = 4,
    *,
    clip: CLIP | None = None,
    backbone: str = "resnet101",
    num_classes: int = 20,
    width: int = 64,
    aspp_channels: int = 512,
    rectifier_config: RectifierConfig = RECLIPPP,
    seed: int = 0,
) -> dict[str, Any] | None:
    """images/s of the student vs the rectified CLIP teacher on ``images`` (size x size) images.

    Each model segments every image with one whole-image forward (``model(image)``: logits
    aligned to the input; the teacher also encodes its Reference prompt, as it does at
    every call), under ``inference_mode``, bf16 autocast on CUDA; one warm-up image each,
    then the time of all ``images``.

    Returns:
        {"student_images_per_s", "teacher_images_per_s", "speedup"} (student over teacher),
        or None when ``device`` is CUDA and none is present.
    """
    device = torch.device(device)
    if _cuda_missing(device, "student vs teacher inference"):
        return None
    teacher, student, _ = _models(clip, num_classes=num_classes, backbone=backbone, width=width,
                                  aspp_channels=aspp_channels, crop=size, rectifier_config=rectifier_config,
                                  device=device, seed=seed)
    student.eval()
    g = torch.Generator().manual_seed(seed)
    batch = [torch.randn(1, 3, size, size, generator=g).to(device) for _ in range(images)]
    bf16 = device.type == "cuda"

    def rate(model: torch.nn.Module) -> float:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model(batch[0])  # warm-up
            _sync(device)
            start = time.perf_counter()
            for image in batch:
                model(image)
            _sync(device)
        return images / (time.perf_counter() - start)

    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ", bf16 autocast"
    print(f"inference, {images} images {size}x{size}, whole image, one per forward, {num_classes} classes, "
          f"{device}{threads}", flush=True)
    student_rate = rate(student)
    print(f"  student ({backbone} + ASPP-V2 + inherited head): {student_rate:.3f} images/s", flush=True)
    teacher_rate = rate(teacher)
    print(f"  rectified CLIP teacher (ViT-B/16 + ReCLIP++ head): {teacher_rate:.3f} images/s", flush=True)
    print(f"  student / teacher: {student_rate / teacher_rate:.2f}x", flush=True)
    return {"student_images_per_s": student_rate, "teacher_images_per_s": teacher_rate,
            "speedup": student_rate / teacher_rate}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("step", "inference"))
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cpu, then cuda in bf16 if present)")
    parser.add_argument("--crop", type=int, default=512, help="training crop and inference size (default 512)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--steps", type=int, default=2, help="timed distillation steps after one warm-up")
    parser.add_argument("--images", type=int, default=4, help="images of the inference comparison")
    args = parser.parse_args(argv)
    devices = [args.device] if args.device else ["cpu", "cuda"]
    for device in devices:
        if args.only in (None, "step"):
            bench_distill_step(device=device, crop=args.crop, batch_size=args.batch_size, backbone=args.backbone,
                               steps=args.steps)
        if args.only in (None, "inference"):
            bench_student_inference(device, size=args.crop, images=args.images, backbone=args.backbone)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
