"""The evaluation pipeline: images resized and normalised in DataLoader workers score
exactly as in the main process; slide windows of several images share batches and give
what one image at a time gives; torch.compile's warm-up is timed apart; rank 0's bar
counts the whole dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layouts import write_voc
from tiny import tiny_clip
from reclip import api, inference
from reclip.data.datasets import SegmentationDataset
from reclip.data.transforms import CLIP_MEAN, CLIP_STD
from reclip.inference import InferenceConfig, prepare_image, segment, segment_many, slide_windows
from reclip.methods import build_segmentor, inference_config
from reclip.train.distributed import Processes

CORRUPT = "2008_000002"
# 24/12 windows at the images' own size: (30, 40) has 6, (24, 36) and (36, 24) have 2; (16, 20) is
# smaller than a window: one (16, 20) window, a shape of its own
SIZES = [(30, 40), (16, 20), (24, 36), (36, 24), (30, 40)]


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in SIZES]


def _conv_segmentor(calls: list[int]):
    """A stand-in segmentor: a strided conv to 5 channels; records each call's batch."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 4, stride=4)

    def segmentor(x):
        calls.append(x.shape[0])
        return conv(x)

    return segmentor


@pytest.mark.parametrize("batch_size", [1, 3, 4, 64])
def test_slide_windows_of_several_images_share_batches_and_equal_one_at_a_time(batch_size):
    calls: list[int] = []
    segmentor = _conv_segmentor(calls)
    cfg = InferenceConfig(mode="slide", window=24, stride=12, batch_size=batch_size, pamr=True)
    images = _images()

    def batches(windows: int) -> list[int]:
        return [batch_size] * (windows // batch_size) + ([windows % batch_size] if windows % batch_size else [])

    alone = [segment(segmentor, image, cfg, return_probs=True) for image in images]
    windows = [len(slide_windows(*hw, 24, 12)) for hw in SIZES]
    assert windows == [6, 1, 2, 2, 6]
    assert calls == [n for w in windows for n in batches(w)]  # one image at a time: its own windows only
    calls.clear()
    together = segment_many(segmentor, images, cfg, return_probs=True)
    # windows in image order, cut at batch_size and where the window shape changes (image 1's lone window)
    assert calls == batches(6) + [1] + batches(2 + 2 + 6)
    if batch_size == 3:
        assert calls == [3, 3, 1, 3, 3, 3, 1]  # images 2 and 3 meet in a call; image 3's windows span two
    for one, many, hw in zip(alone, together, SIZES):
        assert many.labels.shape == hw
        np.testing.assert_array_equal(many.labels, one.labels)
        np.testing.assert_allclose(many.probs, one.probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_prepared_images_segment_exactly_as_the_pixels(mode):
    calls: list[int] = []
    segmentor = _conv_segmentor(calls)
    cfg = InferenceConfig(mode=mode, short_side=24, window=24, stride=12, batch_size=3, whole_batch_size=2,
                          pamr=True)
    images = _images()
    prepared = [prepare_image(image, cfg) for image in images]
    assert prepared[0].input.shape == (3, 24, 32) and prepared[0].size == (30, 40)
    assert prepared[0].raw.dtype == torch.uint8 and prepared[0].raw.shape == (3, 30, 40)  # PAMR needs the image
    assert prepare_image(images[0], InferenceConfig(short_side=24)).raw is None
    for a, b in zip(segment_many(segmentor, images, cfg, return_probs=True),
                    segment_many(segmentor, prepared, cfg, return_probs=True)):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.probs, b.probs)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = write_voc(tmp_path_factory.mktemp("voc"), n_val=5)
    (root / "JPEGImages" / f"{CORRUPT}.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.mark.parametrize("settings", [
    dict(mode="whole", short_side=32, whole_batch_size=2),
    dict(mode="slide", short_side=40, window=32, stride=16, batch_size=3),
    dict(mode="whole", short_side=32, test_settings="naclip"),  # PAMR: the raw image comes from the worker too
])
def test_workers_prepare_images_and_score_exactly_as_the_main_process(voc, settings, tmp_path, monkeypatch):
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    data = SegmentationDataset("voc21", voc, "val")
    segmentor = build_segmentor("naclip", tiny_clip(vision_layers=2, perturb=0.05), data.vocabulary,
                                templates="single")
    cfg = inference_config("naclip", data.protocol, **settings)
    assert cfg.pamr == ("test_settings" in settings)
    results = {workers: api.evaluate_segmentor(segmentor, data, cfg, mean=CLIP_MEAN, std=CLIP_STD, bias=True,
                                               progress=False, num_workers=workers, prefetch=2)
               for workers in (0, 2)}
    np.testing.assert_array_equal(results[2].confusion, results[0].confusion)
    one, two = (results[w].to_dict() for w in (0, 2))
    for out in (one, two):
        out.pop("seconds")
    assert two == one
    # the unreadable image is reported from the worker and skipped, as in this process
    assert one["num_images"] == 4 and [s["path"].endswith(f"{CORRUPT}.jpg") for s in one["skipped"]] == [True]
    with pytest.raises(ValueError, match="prefetch"):
        api.evaluate_segmentor(segmentor, data, cfg, mean=CLIP_MEAN, std=CLIP_STD, prefetch=0)


def test_compile_warm_up_runs_before_the_timer_and_is_reported_apart(voc, tmp_path, monkeypatch):
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    data = SegmentationDataset("voc21", voc, "val")
    segmentor = build_segmentor("maskclip", tiny_clip(vision_layers=1), data.vocabulary, templates="single")
    events: list[tuple] = []
    real_warm_up = inference.warm_up

    def fake_compiled(seg):  # stands in for torch.compile: records the shapes it is called with
        return lambda x: events.append(("call", tuple(x.shape))) or seg(x)

    def spy_warm_up(*args, **kwargs):
        events.append(("warm_up",))
        return real_warm_up(*args, **kwargs)

    monkeypatch.setattr(inference, "compiled", fake_compiled)
    monkeypatch.setattr(api, "warm_up", spy_warm_up)
    cfg = InferenceConfig(mode="slide", short_side=40, window=32, stride=16, batch_size=3, compile=True)
    result = api.evaluate_segmentor(segmentor, data, cfg, mean=CLIP_MEAN, std=CLIP_STD, progress=False,
                                    num_workers=0)
    # compiled for a full batch, one less and one of the first image's windows, before any image runs
    assert events[:4] == [("warm_up",), ("call", (3, 3, 32, 32)), ("call", (2, 3, 32, 32)), ("call", (1, 3, 32, 32))]
    assert events.count(("warm_up",)) == 1 and len(events) > 4
    assert result.warmup_seconds > 0 and result.to_dict()["warmup_seconds"] == round(result.warmup_seconds, 2)
    events.clear()
    eager = api.evaluate_segmentor(segmentor, data, InferenceConfig(mode="slide", short_side=40, window=32,
                                                                    stride=16, batch_size=3),
                                   mean=CLIP_MEAN, std=CLIP_STD, progress=False, num_workers=0)
    assert events == [] and eager.warmup_seconds == 0.0
    np.testing.assert_array_equal(eager.confusion, result.confusion)


@pytest.mark.parametrize("world_size", [1, 2])
def test_rank0_bar_counts_the_whole_dataset(voc, world_size, tmp_path, monkeypatch):
    """Rank 0's bar has every image as its total and ends there (its own images count
    world_size each); the other ranks' part is stubbed out here (tests/test_scale_out.py
    runs real ranks)."""
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    bars = []
    real_tqdm = api.tqdm

    def spy(*args, **kwargs):
        bars.append(real_tqdm(*args, **kwargs))
        bars[-1].seen = []
        update = bars[-1].update
        bars[-1].update = lambda n=1: bars[-1].seen.append(n) or update(n)
        return bars[-1]

    monkeypatch.setattr(api, "tqdm", spy)
    monkeypatch.setattr(api, "current_processes", lambda: Processes(0, world_size, torch.device("cpu"), False))
    monkeypatch.setattr(api, "_merge_ranks", lambda confusion, space, skipped, downscaled, world: (skipped, downscaled))
    data = SegmentationDataset("voc21", voc, "val")
    segmentor = build_segmentor("maskclip", tiny_clip(vision_layers=1), data.vocabulary, templates="single")
    api.evaluate_segmentor(segmentor, data, InferenceConfig(short_side=32), mean=CLIP_MEAN, std=CLIP_STD,
                           progress=True, num_workers=0)
    (bar,) = bars
    assert bar.total == 5 and bar.n == 5
    # world 2: rank 0 holds images 0, 1 (of 5); each advances the bar by 2, the merge by the last 1
    assert bar.seen == ([1] * 5 + [0] if world_size == 1 else [2, 2, 1])


def test_rank0_bar_of_segment_files_counts_every_image(tmp_path, monkeypatch):
    """As evaluate's: 5 images over 2 ranks, rank 0 holds 2, each advancing the bar by 2."""
    from PIL import Image

    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(_images()):
        Image.fromarray(image).save(folder / f"p{i}.png")
    bars = []
    real_tqdm = api.tqdm

    def spy(*args, **kwargs):
        bar = real_tqdm(*args, **kwargs)
        bar.seen, update = [], bar.update
        bar.update = lambda n=1: bar.seen.append(n) or update(n)
        bars.append(bar)
        return bar

    monkeypatch.setattr(api, "tqdm", spy)
    monkeypatch.setattr(api, "current_processes", lambda: Processes(0, 2, torch.device("cpu"), False))
    monkeypatch.setattr(api, "on_rank0", lambda fn, procs: fn())
    monkeypatch.setattr(api, "gather", lambda parts, world: [parts])  # rank 1 stubbed out
    summary = api.segment_files(tiny_clip(vision_layers=1), "maskclip", "cat,dog", [folder], tmp_path / "out",
                                templates="single", inference={"short_side": 16}, progress=True)
    assert len(summary.written) == 2
    (bar,) = bars
    assert bar.total == 5 and bar.n == 5 and bar.seen == [2, 2, 1]


def test_prepared_images_survive_the_dataloader_s_pin_memory_conversion():
    """DataLoader's pin_memory keeps named tuples but turns plain tuples into lists (the
    prepared image's size): the results are unchanged. (Pinning needs CUDA: the
    conversion is replayed here.)"""
    calls: list[int] = []
    segmentor = _conv_segmentor(calls)
    images = _images()
    for mode, short_side in (("whole", 24), ("slide", 24), ("whole", None)):  # None: the size itself groups images
        cfg = InferenceConfig(mode=mode, short_side=short_side, window=24, stride=12, whole_batch_size=2)
        prepared = [prepare_image(image, cfg) for image in images]
        converted = [inference.PreparedImage(p.input, list(p.size), p.raw) for p in prepared]
        for a, b in zip(segment_many(segmentor, prepared, cfg), segment_many(segmentor, converted, cfg)):
            assert b.labels.shape == a.labels.shape
            np.testing.assert_array_equal(a.labels, b.labels)


def test_prepare_image_gives_the_same_numbers_in_a_worker_and_on_several_threads():
    """torch's CPU bilinear resize rounds differently with other thread counts; workers run
    one thread, so preparation runs on one everywhere: bitwise the same input either way."""
    from torch.utils.data import DataLoader

    image = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)  # big enough to go parallel
    cfg = InferenceConfig(short_side=448)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        here = prepare_image(image, cfg).input
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(threads)
    (there,) = DataLoader([image], batch_size=None, num_workers=1, collate_fn=lambda x: prepare_image(x, cfg))
    assert here.shape == (3, 448, 597)
    assert torch.equal(there.input, here)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_segment_files_with_workers_writes_and_skips_what_the_main_process_does(mode, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(_images()):
        Image.fromarray(image).save(folder / f"p{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    clip = tiny_clip(vision_layers=1)
    files, summaries = {}, {}
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        summaries[workers] = api.segment_files(
            clip, "maskclip", "cat,dog", [folder], out, templates="single", progress=False, num_workers=workers,
            prefetch=1, inference={"mode": mode, "short_side": 24, "window": 24, "stride": 12, "batch_size": 3,
                                   "whole_batch_size": 2})
        files[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert files[2] == files[0] and len(files[0]) == 2 * len(SIZES) + 1
    assert [p.name for p in summaries[2].written] == [p.name for p in summaries[0].written]
    assert summaries[2].skipped == summaries[0].skipped and len(summaries[0].skipped) == 1
    assert summaries[0].skipped[0][0].endswith("broken.png")
