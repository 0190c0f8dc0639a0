"""Whole-image batching: the images of one size after the resize go through a segmentor
together, and every registered method gives what it gives one image at a time."""

from __future__ import annotations

import numpy as np
import pytest

from layouts import write_voc
from tiny import tiny_clip
from reclip import api
from reclip.data.datasets import SegmentationDataset
from reclip.data.protocol import load_protocol
from reclip.data.transforms import CLIP_MEAN, CLIP_STD
from reclip.inference import segment, segment_many
from reclip.methods import METHODS, build_segmentor, get_family, get_method, inference_config, load_trained
from reclip.text import Vocabulary

# short side 32: (40, 60), (20, 30) and (30, 45) all become (32, 48); (50, 40) becomes (40, 32)
SIZES = [(40, 60), (50, 40), (20, 30), (30, 45), (40, 60)]
BATCHED = [m for m in METHODS if not get_family(m).proposals]  # MAFT / IP-CLIP: one image at a time (for_image)


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in SIZES]


def _segmentor(method: str, clip, vocabulary: Vocabulary, tmp_path):
    family = get_family(method)
    if family.build is not None:
        return build_segmentor(method, clip, vocabulary, templates="single")
    model = family.new_model(get_method(method), clip, vocabulary, None)  # untrained, written and read as a run
    family.write_run(tmp_path / "run", model, get_method(method), clip, vocabulary)
    return load_trained(tmp_path / "run", clip)


@pytest.mark.parametrize("method", [*BATCHED, "naclip-own"])
def test_batched_whole_images_equal_one_at_a_time(method, tmp_path, monkeypatch):
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    clip = tiny_clip(vision_layers=2, perturb=0.05)
    vocabulary = Vocabulary.from_names("background,cat,dog,grass")
    settings = {}
    if method == "naclip-own":  # NACLIP's own test settings: PAMR on each image
        method, settings = "naclip", {"test_settings": "naclip"}
    segmentor = _segmentor(method, clip, vocabulary, tmp_path)
    cfg = inference_config(method, load_protocol("voc21"), mode="whole", short_side=32, whole_batch_size=2, **settings)
    assert cfg.pamr or not settings
    calls: list[int] = []
    hook = segmentor.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[0]))
    images = _images()
    try:
        alone = [segment(segmentor, image, cfg, CLIP_MEAN, CLIP_STD, return_probs=True) for image in images]
        assert calls == [1] * len(images)
        calls.clear()
        together = segment_many(segmentor, images, cfg, CLIP_MEAN, CLIP_STD, return_probs=True)
    finally:
        hook.remove()
    assert calls == [2, 2, 1]  # (32, 48): images 0, 2 | 3, 4; (40, 32): image 1
    for one, many, hw in zip(alone, together, SIZES):
        assert many.labels.shape == hw
        np.testing.assert_array_equal(many.labels, one.labels)
        np.testing.assert_allclose(many.probs, one.probs, rtol=1e-5, atol=1e-6)


def test_evaluation_batches_and_scores_as_one_image_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    root = write_voc(tmp_path / "voc", n_val=6)
    clip = tiny_clip(vision_layers=2, perturb=0.05)
    data = SegmentationDataset("voc21", root, "val")
    segmentor = build_segmentor("clearclip", clip, data.vocabulary, templates="single")
    calls: list[int] = []
    segmentor.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[0]))
    results = {}
    for batch in (1, 4):
        calls.clear()
        cfg = inference_config("clearclip", data.protocol, mode="whole", short_side=32, whole_batch_size=batch)
        results[batch] = api.evaluate_segmentor(segmentor, data, cfg, mean=CLIP_MEAN, std=CLIP_STD, bias=True,
                                                progress=False, num_workers=0)
        assert sum(calls) == 6 and (calls == [1] * 6 if batch == 1 else max(calls) > 1)  # some images share a size
    one, four = results[1].to_dict(), results[4].to_dict()
    for out in (one, four):
        out.pop("seconds")
        out["settings"]["inference"].pop("whole_batch_size")  # recorded as given
    np.testing.assert_array_equal(results[4].confusion, results[1].confusion)
    assert four == one and four["num_images"] == 6


def test_segment_files_batches_and_writes_what_one_at_a_time_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(_images()):
        Image.fromarray(image).save(folder / f"p{i}.png")
    clip = tiny_clip(vision_layers=2, perturb=0.05)
    real, groups = api.segment_many, []

    def spy(segmentor, images, *args, **kwargs):
        groups.append(len(images))
        return real(segmentor, images, *args, **kwargs)

    monkeypatch.setattr(api, "segment_many", spy)
    files = {}
    for batch in (1, 3):
        out = tmp_path / f"out{batch}"
        summary = api.segment_files(clip, "clearclip", "cat,dog,grass", [folder], out, templates="single",
                                    inference={"mode": "whole", "short_side": 32, "whole_batch_size": batch},
                                    progress=False)
        assert [p.name for p in summary.written] == [f"p{i}.png" for i in range(len(SIZES))]
        files[batch] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert files[3] == files[1] and len(files[1]) == 2 * len(SIZES) + 1
    assert groups == [1] * len(SIZES) + [3, 2]  # batch 3: the images read in threes, then grouped by size


def test_whole_mode_runs_one_image_per_forward_unless_asked():
    from reclip.inference import InferenceConfig

    assert InferenceConfig().whole_batch_size == 1 and InferenceConfig().batch_size == 16  # windows only
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="whole_batch_size"):
            InferenceConfig(whole_batch_size=bad)


@pytest.mark.parametrize("pamr", [False, True])
def test_segment_many_prepares_each_call_s_images_only_when_it_runs(pamr, monkeypatch):
    """At most one call's model inputs exist at a time: images are normalised per call,
    and only the raw pixels PAMR needs outlive it."""
    import torch

    from reclip import inference
    from reclip.inference import InferenceConfig

    events: list[tuple[str, int]] = []
    real = inference._prepare

    def spy(image, cfg, mean, std, device):
        events.append(("prepare", image.shape[0]))
        normalised, raw = real(image, cfg, mean, std, device)
        assert (raw is not None) == pamr
        return normalised, raw

    def segmentor(x):
        events.append(("call", x.shape[0]))
        return torch.stack([x[:, 0], -x[:, 0]], dim=1)[..., ::4, ::4]  # (n, 2, h/4, w/4)

    monkeypatch.setattr(inference, "_prepare", spy)
    cfg = InferenceConfig(mode="whole", short_side=32, whole_batch_size=2, pamr=pamr)
    images = _images()
    many = segment_many(segmentor, images, cfg)
    # (32, 48): images 0, 2 | 3, 4; (40, 32): image 1; each call's images prepared just before it
    assert events == [("prepare", 40), ("prepare", 20), ("call", 2), ("prepare", 30), ("prepare", 40), ("call", 2),
                      ("prepare", 50), ("call", 1)]
    one = [segment(segmentor, image, cfg) for image in images]
    for a, b in zip(many, one):
        np.testing.assert_array_equal(a.labels, b.labels)
