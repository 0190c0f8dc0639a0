"""The benchmark code runs (on a tiny model) so `reclip bench` cannot rot; its figures are not asserted."""

import re

import pytest
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


def test_distillation_benches_run_on_a_tiny_model(capsys):
    import dataclasses

    from reclip.bench_distill import bench_distill_step, bench_student_inference
    from reclip.heads.rectify import RECLIPPP

    small = dict(backbone="resnet18", width=8, aspp_channels=16, num_classes=3,
                 rectifier_config=dataclasses.replace(RECLIPPP, reference_length=8))
    step = bench_distill_step(tiny_clip(), crop=32, batch_size=2, steps=1, **small)
    assert step["steps_per_s"] > 0 and step["peak_mib"] > 0
    inference = bench_student_inference("cpu", size=32, images=1, clip=tiny_clip(), **small)
    assert inference["student_images_per_s"] > 0 and inference["teacher_images_per_s"] > 0
    out = capsys.readouterr().out
    assert "steps/s" in out and "peak memory" in out and "student / teacher" in out
    if not torch.cuda.is_available():  # the bf16 path exists and says why it did not run
        assert bench_distill_step(tiny_clip(), device="cuda", crop=32, batch_size=2, **small) is None
        assert "skipped: no CUDA device" in capsys.readouterr().out


def test_maft_bench_runs_on_a_tiny_model(capsys):
    from reclip.bench_maft import bench_proposals, box_proposals, masked_crop_embeddings

    figures = bench_proposals(tiny_clip(vision_layers=2), size=48, proposals=5, crop=32)
    assert figures["ipclip_per_s"] > 0 and figures["crop_per_s"] > 0
    assert figures["speedup"] == figures["crop_s"] / figures["ipclip_s"]
    assert "proposals/s" in capsys.readouterr().out
    # the classic way: a crop of each box, masked, at the crop size; a whole-image box is CLIP on the image
    clip = tiny_clip(vision_layers=2)
    image = torch.randn(1, 3, 32, 32)
    whole = masked_crop_embeddings(clip, image, torch.ones(1, 32, 32), crop=32)
    torch.testing.assert_close(whole, clip.encode_image(image))
    boxes = box_proposals(4, (40, 30))
    assert boxes.shape == (4, 40, 30) and ((boxes == 0) | (boxes == 1)).all() and (boxes.sum((1, 2)) > 0).all()
    if not torch.cuda.is_available():
        assert bench_proposals(tiny_clip(), device="cuda", size=32, proposals=2, crop=32) is None


def test_maft_bench_refuses_outputs_that_disagree(monkeypatch):
    import reclip.bench_maft as bench_maft

    real = bench_maft.masked_crop_embeddings
    monkeypatch.setattr(bench_maft, "masked_crop_embeddings",
                        lambda *args, **kwargs: real(*args, **kwargs)[:, :-1])  # one width fewer
    with pytest.raises(RuntimeError, match="no longer compute the same thing"):
        bench_maft.bench_proposals(tiny_clip(vision_layers=2), size=48, proposals=3, crop=32)


def test_evaluation_bench_runs_on_a_few_images(capsys, monkeypatch):
    from reclip.bench_eval import main

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert main(["--images", "3", "--batch-size", "2", "--short-side", "32", "--repeats", "1",
                 "--attention-grid", "3", "--slide-size", "48", "--window", "32", "--slide-batch-size", "3",
                 "--compile"]) == 0
    out = capsys.readouterr().out
    assert "one image at a time" in out and "2 processes" in out and "images/s" in out
    for kind in ("normal", "qq", "kk", "qq+kk", "kk+gaussian"):
        assert f"last-block attention {kind!r}" in out
    assert "windows per forward vs one (mmseg slide_inference)" in out and "windows/s" in out
    assert re.search(r"windows of several images per forward \(batch 3\) vs each image's alone: .* images/s = "
                     r"[\d.]+x \(0 of \d+ pixels labelled differently\)", out)
    assert "torch.compile vs eager" in out
    # batching scores every pixel as one image at a time ("10 of" must not pass), and so do workers
    assert re.search(r"\(0 of \d+ pixels scored differently\)", out.splitlines()[1])
    assert "2 DataLoader workers (read, resize, normalise) vs none" in out.splitlines()[2]
    assert re.search(r"\(0 of \d+ pixels scored differently\)", out.splitlines()[2])


def test_attention_bench_paths_agree():
    from reclip.bench_eval import bench_attention

    figures = bench_attention(batch=1, grid=(3, 4), width=16, heads=2, repeats=1)
    assert set(figures) == {"normal", "qq", "kk", "qq+kk", "kk+gaussian"}
    for f in figures.values():
        assert f["speedup"] > 0 and f["max_abs_diff"] < 1e-5


def test_slide_bench_loop_matches_batched_inference_and_refuses_a_mismatch(monkeypatch):
    import reclip.bench_eval as bench_eval

    segmentor = bench_eval.small_segmentor(vision_layers=1, vision_width=32, transformer_heads=2, embed_dim=16)
    figures = bench_eval.bench_slide(segmentor, size=(40, 56), window=32, stride=16, batch_size=3, repeats=1)
    assert figures["windows"] == 6 and figures["speedup"] > 0 and figures["max_abs_diff"] <= 1e-4
    real = bench_eval.slide_per_window
    monkeypatch.setattr(bench_eval, "slide_per_window", lambda *a, **k: real(*a, **k) + 1e-3)
    with pytest.raises(RuntimeError, match="no longer compute the same logits"):
        bench_eval.bench_slide(segmentor, size=(40, 56), window=32, stride=16, batch_size=3, repeats=1)


def test_methods_bench_times_every_training_free_method_against_maskclip(capsys):
    from reclip.bench_methods import main, training_free_methods

    names = training_free_methods()
    assert names[0] == "maskclip" and {"sclip", "clearclip", "naclip"} <= set(names)
    assert main(["--small", "--size", "32", "--batch", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.split() and line.split()[0] in names}
    assert set(rows) == set(names)  # one row per method, from the registry
    assert float(rows["maskclip"][2].rstrip("x")) == 1.0
    assert all(float(r[1]) > 0 and float(r[2].rstrip("x")) > 0 for r in rows.values())
    with pytest.raises(SystemExit):
        main(["--methods", "reclip++"])  # trained: not in this benchmark


def test_gpu_bench_runs_its_sections_on_tiny_sizes(capsys):
    """``python -m reclip.bench_gpu --quick`` runs every section's code (the real evaluation
    path, the FLOP count and the training step) and prints each figure."""
    from reclip.bench_gpu import main

    assert main(["--quick", "--device", "cpu", "--peak-tflops", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"zero-shot evaluation \(clearclip, eager\), 4 VOC-shaped images.*: [\d.]+ images/s", out)
    assert re.search(r"backbone forward \(eager\), batch 2 at 32x32.*TFLOP/s, [\d.]+% of peak", out)
    assert "rectification step" in out and "steps/s" in out
    with pytest.raises(SystemExit):
        main(["--quick", "--device", "cpu", "--images", "0"])


def test_gpu_bench_flops_and_peaks():
    from reclip.bench import VIT_B16
    from reclip.bench_gpu import peak_tflops, vit_flops

    # ViT-B/16 at 448 x 448: the "about 156 GFLOP per image"
    flops = vit_flops(width=VIT_B16["vision_width"], layers=VIT_B16["vision_layers"],
                      patch=VIT_B16["vision_patch_size"], size=448)
    assert 150e9 < flops < 160e9
    # torch's own count: the same, plus the output projection of the CLS token, less the attention
    # where torch does not count the kernel (its CPU one)
    from torch.utils.flop_counter import FlopCounterMode

    clip = tiny_clip()
    size, cfg = 32, clip.config
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        clip.encode_image(torch.randn(1, 3, size, size))
    tokens, width = 1 + (size // cfg.vision_patch_size) ** 2, cfg.vision_width
    attention = 4 * tokens**2 * width * cfg.vision_layers
    analytic = vit_flops(width=width, layers=cfg.vision_layers, patch=cfg.vision_patch_size, size=size)
    projection = 2 * width * cfg.embed_dim
    assert counter.get_total_flops() - projection in (analytic, analytic - attention)
    assert peak_tflops(torch.device("cpu")) is None and peak_tflops(torch.device("cpu"), 5.0) == 5.0
