"""Image-level class hypotheses (ReCLIP++ eq. 6): geometry, rules, batching, the file, resume, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from layouts import write_voc
from tiny import tiny_clip
from reclip.cli import main
from reclip.clip.load import load_clip, save_clip
from reclip.clip.model import weights_fingerprint
from reclip.data.datasets import SegmentationDataset
from reclip.data.protocol import ProtocolError, load_protocol
from reclip.data.transforms import CLIP_MEAN, CLIP_STD
from reclip.hypotheses import (
    HypothesesFileError,
    HypothesisConfig,
    config_for_protocol,
    crop_boxes,
    crop_scores,
    generate_hypotheses,
    image_hypotheses,
    load_hypotheses,
    select_classes,
)
from reclip.text import QueryEmbeddings, Vocabulary

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def random_queries(num_classes: int, dim: int = 32, seed: int = 0) -> QueryEmbeddings:
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=-1)
    return QueryEmbeddings(w, torch.arange(num_classes), num_classes)


class ColourCLIP(nn.Module):
    """A CLIP stand-in whose image embedding is the mean normalised colour of its input.

    With W_q = red, green, blue and grey directions, a crop is classified by its mean
    colour, so the classes drawn in a synthetic image are known.
    """

    def __init__(self, resolution: int = 16) -> None:
        super().__init__()
        self.visual = nn.Module()
        self.visual.input_resolution = resolution
        self.calls: list[int] = []

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(images.shape[0])
        assert images.shape[-2:] == (self.visual.input_resolution,) * 2
        return images.mean(dim=(2, 3))  # (B, 3)


COLOUR_QUERIES = QueryEmbeddings(
    torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 1.0]]), dim=-1),
    torch.arange(4), 4,
)  # red, green, blue, grey


def canvas(h: int, w: int, colour: tuple[int, int, int]) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = colour
    return img


def colour_hypotheses(image: np.ndarray, **config) -> list[int]:
    cfg = HypothesisConfig(**config)
    return image_hypotheses(ColourCLIP(), [image], COLOUR_QUERIES, config=cfg, mean=CLIP_MEAN, std=CLIP_STD)[0]


# -- geometry ---------------------------------------------------------------------------------


def test_crop_boxes_are_r_times_the_image_with_half_window_stride_and_cover_it():
    boxes = crop_boxes(120, 60, 1 / 6)
    assert {(y1 - y0, x1 - x0) for y0, y1, x0, x1 in boxes} == {(20, 10)}
    ys = sorted({b[0] for b in boxes})
    xs = sorted({b[2] for b in boxes})
    assert ys == list(range(0, 101, 10)) and xs == list(range(0, 51, 5))  # 11 x 11, last flush
    assert len(boxes) == 121
    covered = np.zeros((120, 60), bool)
    for y0, y1, x0, x1 in boxes:
        covered[y0:y1, x0:x1] = True
    assert covered.all()


def test_crop_boxes_add_a_flush_window_when_the_stride_does_not_reach_the_border():
    boxes = crop_boxes(125, 40, 1 / 6)  # window round(20.83) = 21, stride 10
    ys = sorted({b[0] for b in boxes})
    assert ys == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 104]
    assert max(b[1] for b in boxes) == 125 and max(b[3] for b in boxes) == 40
    assert crop_boxes(30, 50, 1.0) == [(0, 30, 0, 50)]
    assert len(crop_boxes(3, 3, 1 / 6)) == 9  # 1-pixel windows, stride 1
    with pytest.raises(ValueError, match="r must be"):
        crop_boxes(10, 10, 0.0)


# -- rules --------------------------------------------------------------------------------------


def votes_to_scores(votes: list[int], num_classes: int) -> torch.Tensor:
    rows = [torch.nn.functional.one_hot(torch.tensor(k), num_classes).float() for k, n in enumerate(votes)
            for _ in range(n)]
    return torch.stack(rows)  # (N, C), top-1 = the voted class


def test_windows_rule_keeps_frequencies_strictly_above_t():
    scores = votes_to_scores([15, 4, 1, 0], 4)  # f = 0.75, 0.2, 0.05, 0
    assert select_classes(scores, config=HypothesisConfig(t=0.07)) == [0, 1]
    assert select_classes(scores, config=HypothesisConfig(t=0.2)) == [0]  # 0.2 is not > 0.2
    assert select_classes(scores, config=HypothesisConfig(t=0.0)) == [0, 1, 2]
    assert select_classes(scores, config=HypothesisConfig(rule="any_vote", t=0.5)) == [0, 1, 2]


def test_windows_rule_never_returns_an_empty_set():
    assert select_classes(votes_to_scores([5, 3, 2], 3), config=HypothesisConfig(t=0.9)) == [0]
    assert select_classes(votes_to_scores([4, 4, 2], 3), config=HypothesisConfig(t=0.9)) == [0, 1]


def test_whole_image_rule_thresholds_scaled_scores_with_top_k_fallback():
    scores = torch.tensor([[0.30, 0.22, 0.25, 0.10]])
    assert select_classes(scores, config=HypothesisConfig(rule="whole_image", threshold=23), logit_scale=100) == [0, 2]
    assert select_classes(scores, config=HypothesisConfig(rule="whole_image", threshold=40, top_k=3),
                          logit_scale=100) == [0, 1, 2]
    assert select_classes(scores, config=HypothesisConfig(rule="whole_image", threshold=23),
                          logit_scale=50) == [0, 2]  # none passes at 50x: top-2


def test_config_for_protocol_uses_the_published_values():
    assert config_for_protocol("voc20").t == 0.07 and config_for_protocol("cityscapes19").t == 0.07
    ctx = config_for_protocol("context59", rule="whole_image")
    assert (ctx.t, ctx.threshold, ctx.top_k, ctx.rule) == (0.0, 20.0, 6, "whole_image")
    assert config_for_protocol("folder", t=0.1, r=None).t == 0.1
    city = config_for_protocol(load_protocol("cityscapes19"))  # a Protocol object
    assert (city.r, city.t, city.threshold, city.top_k) == (1 / 6, 0.07, 21.5, 2)
    mine = load_protocol("voc20").with_overrides(name="mine", hypotheses={"t": 0.2, "top_k": 3})
    assert (config_for_protocol(mine).t, config_for_protocol(mine).top_k) == (0.2, 3)  # read from the protocol
    with pytest.raises(ProtocolError, match="unknown dataset protocol 'voc'.*voc20"):
        config_for_protocol("voc")


def _user_yaml(tmp_path, **sections):
    """voc20 as a user's own protocol file "mine", without its hypotheses section unless given."""
    data = yaml.safe_load(open(load_protocol("voc20").source))
    del data["hypotheses"]
    data.update(name="mine", **sections)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_for_protocol_of_a_user_yaml(tmp_path):
    default = config_for_protocol(_user_yaml(tmp_path))  # no section: the schema's defaults, t = 0
    assert (default.r, default.t, default.threshold, default.top_k) == (1 / 6, 0.0, 23.0, 2)
    given = config_for_protocol(str(_user_yaml(tmp_path, hypotheses={"t": 0.2, "threshold": 19.5})))
    assert (given.r, given.t, given.threshold, given.top_k) == (1 / 6, 0.2, 19.5, 2)
    assert config_for_protocol(_user_yaml(tmp_path, hypotheses={"t": 0.2}), t=0.3).t == 0.3  # overrides win
    with pytest.raises(ValueError, match="rule must be one of"):
        HypothesisConfig(rule="vote")


# -- synthetic images: the classes drawn are found --------------------------------------------


def test_two_coloured_halves_give_exactly_their_two_classes():
    img = np.concatenate([canvas(60, 45, RED), canvas(60, 45, GREEN)], axis=1)
    assert colour_hypotheses(img) == [0, 1]
    assert colour_hypotheses(img, rule="any_vote") == [0, 1]
    top = np.concatenate([canvas(30, 90, BLUE), canvas(30, 90, GREEN)], axis=0)
    assert colour_hypotheses(top) == [1, 2]


def test_a_small_region_gets_votes_but_not_the_frequency_threshold():
    img = canvas(120, 120, RED)
    img[:20, :20] = BLUE  # one window's area in a corner: a few of the 121 crops
    assert colour_hypotheses(img, rule="any_vote") == [0, 2]
    assert colour_hypotheses(img, t=0.07) == [0]
    assert colour_hypotheses(img, t=0.0) == [0, 2]


def test_clip_resize_centre_crops_and_squash_keeps_the_whole_crop():
    img = np.concatenate([canvas(30, 30, GREEN), canvas(30, 30, RED), canvas(30, 30, GREEN)], axis=1)
    whole = dict(rule="whole_image", threshold=1e9, top_k=1)  # top-1 of the whole image
    assert colour_hypotheses(img, resize="clip", **whole) == [0]  # the centre 30 x 30 only
    assert colour_hypotheses(img, resize="squash", **whole) == [1]  # two thirds green


def test_images_are_checked():
    with pytest.raises(ValueError, match="uint8"):
        colour_hypotheses(np.zeros((10, 10, 3), np.float32))


# -- batching ------------------------------------------------------------------------------------


def test_batched_and_one_crop_at_a_time_give_the_same_votes():
    clip = tiny_clip()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)]
    queries = random_queries(6)
    kw = dict(mean=CLIP_MEAN, std=CLIP_STD)
    batched = crop_scores(clip, images, queries, config=HypothesisConfig(r=1 / 4, batch_size=7), **kw)
    single = crop_scores(clip, images, queries, config=HypothesisConfig(r=1 / 4, batch_size=1), **kw)
    assert [s.shape for s in batched] == [(49, 6), (56, 6)]  # 33 x 47: flush windows add a row and a column
    for b, s in zip(batched, single):
        torch.testing.assert_close(b, s, rtol=1e-5, atol=1e-5)
        assert torch.equal(b.argmax(1), s.argmax(1))
    for rule in ("windows", "any_vote"):
        cfg = dict(r=1 / 4, rule=rule, t=0.05)
        assert image_hypotheses(clip, images, queries, config=HypothesisConfig(batch_size=64, **cfg), **kw) == \
            image_hypotheses(clip, images, queries, config=HypothesisConfig(batch_size=1, **cfg), **kw)


def test_crops_of_several_images_share_batches():
    stub = ColourCLIP()
    images = [canvas(60, 60, RED), canvas(36, 96, GREEN), canvas(48, 48, BLUE)]  # 11 x 11 crops each
    image_hypotheses(stub, images, COLOUR_QUERIES, config=HypothesisConfig(batch_size=100),
                     mean=CLIP_MEAN, std=CLIP_STD)
    assert stub.calls == [100, 100, 100, 63]


# -- the file, resume, CLI -----------------------------------------------------------------------


def write_folder_dataset(root, n: int = 5, corrupt: int | None = None) -> SegmentationDataset:
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    for i in range(n):
        path = root / "images" / f"img{i}.png"
        if i == corrupt:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (24 + 4 * i, 40, 3), dtype=np.uint8)).save(path)
    (root / "classes.txt").write_text("sky\ntree\nroad\ncar\n")
    return SegmentationDataset("folder", root / "images", "train", classes_file=root / "classes.txt")


CFG = HypothesisConfig(r=1 / 3, t=0.1)


def test_file_is_refused_for_another_class_list_or_clip(tmp_path):
    data = write_folder_dataset(tmp_path / "d", n=2)
    clip = tiny_clip()
    summary = generate_hypotheses(clip, data, random_queries(4), config=CFG, out_path=tmp_path / "h.json",
                                  progress=False, templates="single")
    hyps = load_hypotheses(summary.path, vocabulary=data.vocabulary, clip=clip)
    assert sorted(hyps) == ["img0", "img1"] and all(hyps.values())
    assert load_hypotheses(summary.path, vocabulary=data.vocabulary, clip=weights_fingerprint(clip)) == hyps
    header = json.loads(summary.path.read_text())
    assert (header["rule"], header["r"], header["t"], header["templates"]) == ("windows", 1 / 3, 0.1, "single")
    with pytest.raises(HypothesesFileError, match="another class list"):
        load_hypotheses(summary.path, vocabulary=Vocabulary.from_names("sky,tree,road,bus"), clip=clip)
    with pytest.raises(HypothesesFileError, match="CLIP weights"):
        load_hypotheses(summary.path, vocabulary=data.vocabulary, clip=tiny_clip(seed=1))


def test_crops_are_normalised_with_the_models_mean_and_std(tmp_path):
    data = write_folder_dataset(tmp_path / "d", n=2)
    other_mean = (0.5, 0.4, 0.3)
    seen = {}
    for name, clip in (("openai", tiny_clip()), ("other", tiny_clip(image_mean=other_mean))):
        batches = seen[name] = []
        encode = clip.encode_image
        clip.encode_image = lambda images, encode=encode, batches=batches: batches.append(images) or encode(images)
        generate_hypotheses(clip, data, random_queries(4), config=CFG, out_path=tmp_path / f"{name}.json",
                            progress=False)
    shift = ((torch.tensor(other_mean) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).view(1, 3, 1, 1)
    assert len(seen["openai"]) == len(seen["other"]) > 0
    for a, b in zip(seen["openai"], seen["other"]):
        torch.testing.assert_close(a - b, shift.expand_as(a), atol=1e-5, rtol=0)


def test_resume_after_interruption_writes_the_same_file(tmp_path, monkeypatch):
    data = write_folder_dataset(tmp_path / "d", n=5, corrupt=3)
    clip, queries = tiny_clip(), random_queries(4)
    kw = dict(config=CFG, progress=False, save_every=2)
    full = generate_hypotheses(clip, data, queries, out_path=tmp_path / "full.json", **kw)
    assert (full.num_images, full.computed) == (4, 4)
    assert [i for i, _ in full.skipped] == ["img3"]

    import reclip.data.io as io

    real, reads = io.read_image, []

    def killed_on_the_fourth_read(path, *a, **k):  # during the second group
        reads.append(path)
        if len(reads) == 4:
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(io, "read_image", killed_on_the_fourth_read)
    part = tmp_path / "part.json"
    with pytest.raises(KeyboardInterrupt):
        generate_hypotheses(clip, data, queries, out_path=part, **kw)
    monkeypatch.setattr(io, "read_image", real)
    assert sorted(json.loads(part.read_text())["images"]) == ["img0", "img1"]  # group 1 saved, group 2 lost

    resumed = generate_hypotheses(clip, data, queries, out_path=part, **kw)
    assert (resumed.num_images, resumed.computed) == (4, 2)  # img2 and img4; img3 skipped again
    assert part.read_bytes() == full.path.read_bytes()

    with pytest.raises(HypothesesFileError, match="t 0.1 vs 0.2"):
        generate_hypotheses(clip, data, queries, out_path=part, config=HypothesisConfig(r=1 / 3, t=0.2),
                            progress=False)
    again = generate_hypotheses(clip, data, queries, out_path=part, config=HypothesisConfig(r=1 / 3, t=0.2),
                                progress=False, resume=False)
    assert again.computed == 4 and json.loads(part.read_text())["t"] == 0.2


def test_cli_writes_a_file_with_the_protocol_threshold(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    clip_file = save_clip(tiny_clip(), tmp_path / "tiny.pt", format="openai")
    root = write_voc(tmp_path / "voc", n_train=2, n_val=1)
    out = tmp_path / "hyp.json"
    code = main(["hypotheses", "--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root),
                 "--out", str(out), "--templates", "single", "--r", "0.5", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "wrote hypotheses of 2 images" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["t"] == 0.07 and data["r"] == 0.5 and data["dataset"] == "voc20" and data["split"] == "train"
    # the ReCLIP family's own class names (the protocol's reclip.classes_file), not ClearCLIP's
    assert data["classes"][0] == "airplane" and data["classes"][-1] == "tv monitor"
    vocab = SegmentationDataset("voc20", root, "train", classes_file="reclip_voc20.txt").vocabulary
    hyps = load_hypotheses(out, vocabulary=vocab, clip=load_clip(clip_file))
    assert sorted(hyps) == ["2007_000000", "2007_000001"]
    code = main(["hypotheses", "--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root),
                 "--out", str(out), "--templates", "single", "--r", "0.5", "--t", "0.3", "--quiet"])
    assert code == 2 and "--no-resume" in capsys.readouterr().err
    # a user's --classes-file wins over the ReCLIP names
    mine = tmp_path / "mine.json"
    assert main(["hypotheses", "--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root),
                 "--out", str(mine), "--templates", "single", "--classes-file", "voc20.txt", "--quiet"]) == 0
    assert json.loads(mine.read_text())["classes"][0] == "aeroplane"


def test_cli_uses_the_hypotheses_section_of_a_user_yaml(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    clip_file = save_clip(tiny_clip(), tmp_path / "tiny.pt", format="openai")
    root = write_voc(tmp_path / "voc", n_train=2, n_val=1)
    protocol = _user_yaml(tmp_path, hypotheses={"r": 0.5, "t": 0.2})
    out = tmp_path / "hyp.json"
    code = main(["hypotheses", "--clip", str(clip_file), "--dataset", str(protocol), "--data-root", str(root),
                 "--out", str(out), "--templates", "single", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "r 0.5, t 0.2" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert (data["r"], data["t"], data["dataset"]) == (0.5, 0.2, "mine")


def test_the_pixel_limit_reaches_hypotheses_and_training_and_nothing_read_is_an_error(tmp_path, capsys):
    from reclip.data.augment import UnlabeledTrainSet

    root = write_voc(tmp_path / "voc", n_train=2, n_val=1)  # images of about 30 x 40 pixels
    data = SegmentationDataset("voc20", root, "train", check_sizes=False, max_pixels=300)
    train_set = UnlabeledTrainSet(data, {i: [0] for i in data.image_ids}, 20, base_short_side=16, crop=16)
    _, image = train_set._read(0)
    assert image.shape[0] * image.shape[1] <= 300  # read downscaled, as the dataset says
    clip_file = save_clip(tiny_clip(), tmp_path / "tiny.pt", format="openai")
    common = ["hypotheses", "--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--split",
              "train", "--quiet", "--max-pixels", "300"]
    assert main([*common, "--out", str(tmp_path / "h.json")]) == 0
    for path in (root / "JPEGImages").iterdir():
        path.write_bytes(b"not an image")
    assert main([*common, "--out", str(tmp_path / "none.json")]) == 1
    assert "no image could be read" in capsys.readouterr().err
