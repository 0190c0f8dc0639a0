"""The benchmark code runs (on a tiny model) so `reclip bench` cannot rot; its figures are not asserted."""

import torch

from reclip.bench import bench_vs_hf, bench_zero_shot
from tiny import tiny_clip


def test_bench_functions_run_and_report_positive_figures():
    clip = tiny_clip().requires_grad_(False)
    zs = bench_zero_shot(clip, torch.device("cpu"), images=1, num_classes=3)
    assert zs["images_per_s"] > 0 and zs["peak_mib"] > 0
    hf = bench_vs_hf(clip, batch=1, repeats=1)
    assert hf is not None and hf["image_ratio"] > 0 and hf["text_ratio"] > 0


def test_rectification_benches_run_on_a_tiny_model():
    from reclip.bench_rectify import bench_hypotheses, bench_reference, bench_train_step

    clip = tiny_clip().requires_grad_(False)
    reference = bench_reference(clip, num_classes=(3,), repeats=1)
    assert set(reference) == {3} and all(v > 0 for v in reference[3].values())
    hypotheses = bench_hypotheses(clip, images=1, height=48, width=64, num_classes=3)
    assert hypotheses
    train = bench_train_step(clip, batch_size=2, crop=32, num_classes=3, steps=1)
    assert train["steps_per_s"] > 0 and train["peak_mib"] > 0
