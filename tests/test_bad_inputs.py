"""Hostile-but-fair inputs to segment and evaluate (issue "Reliability"): images too
large to process whole, symbolic-link loops and duplicates. Every run goes on past the
bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hostile import png_header
from layouts import write_voc
from tiny import tiny_clip
from reclip import api
from reclip.cli import main
from reclip.clip.load import save_clip
from reclip.data.datasets import SegmentationDataset
from reclip.data.io import downscaled_size, read_label

FAST = {"short_side": 24, "mode": "whole"}


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(autouse=True)
def _text_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))


def _image(path: Path, h: int, w: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _segment(clip, inputs, out, **kw):
    return api.segment_files(clip, "maskclip", "a,b", inputs, out, templates="single", inference=FAST,
                             progress=False, **kw)


# ------------------------------------------------------------------ A: resource limits

def test_segment_goes_on_past_huge_images_and_link_trouble(tmp_path, clip):
    photos = tmp_path / "photos"
    good = _image(photos / "good.jpg", 24, 32)
    big = _image(photos / "big.png", 200, 300)  # over max_pixels below: segmented downscaled
    png_header(photos / "huge.png", 60000, 60000)  # a small file claiming 3.6 gigapixels
    _image(photos / "sub" / "c.jpg", 20, 20)
    (photos / "sub" / "up").symlink_to("..")  # a loop: once made every image be segmented ~40 times
    (photos / "self.jpg").symlink_to("self.jpg")  # once aborted the run (Path.resolve)
    (photos / "broken.jpg").symlink_to("gone.jpg")
    (photos / "again.jpg").symlink_to("good.jpg")
    summary = _segment(clip, [photos, good], tmp_path / "out", max_pixels=20000)
    out = tmp_path / "out"
    assert sorted(p.relative_to(out).as_posix() for p in summary.written) == ["big.png", "good.png", "sub/c.png"]
    reasons = {Path(p).relative_to(tmp_path).as_posix(): r for p, r in summary.skipped}
    assert sorted(reasons) == ["photos/again.jpg", "photos/broken.jpg", "photos/good.jpg", "photos/huge.png",
                               "photos/self.jpg", "photos/sub/up"]
    assert "60000 x 60000" in reasons["photos/huge.png"] and "--max-pixels" in reasons["photos/huge.png"]
    assert reasons["photos/good.jpg"] == f"same file as {good}, segmented once"  # given twice: one image
    h, w = downscaled_size(200, 300, 20000)
    assert summary.downscaled == [(str(big), (200, 300), (h, w))]
    assert Image.open(out / "big.png").size == (w, h)  # the mask has the size segmented


def test_a_broken_link_given_by_name_is_reported_a_typo_stops_before_any_work(tmp_path):
    (tmp_path / "gone.jpg").symlink_to("nothing.jpg")  # e.g. from a shell glob
    found = api.collect_images([tmp_path / "gone.jpg"])
    assert found.pairs == [] and found.skipped[0][1].startswith("broken symbolic link")
    with pytest.raises(FileNotFoundError, match="typo.jpg: no such file or folder"):
        api.collect_images([tmp_path / "typo.jpg"])


def test_segment_cli_takes_max_pixels_and_reports_downscaled_images(tmp_path, clip, capsys):
    clip_file = save_clip(clip, tmp_path / "tiny.pt", format="openai")
    _image(tmp_path / "in" / "big.png", 200, 300)
    png_header(tmp_path / "in" / "huge.png", 30000, 40000)
    argv = ["segment", "--clip", str(clip_file), "--classes", "a,b", "--templates", "single", "--quiet",
            "--short-side", "24", "--mode", "whole", "--out", str(tmp_path / "out"), str(tmp_path / "in")]
    assert main([*argv, "--max-pixels", "100x200"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 masks" in printed and "(1 skipped)" in printed and "huge.png" in printed
    assert "downscaled" in printed and "300 x 200 read as 173 x 115" in printed
    with pytest.raises(SystemExit):
        main([*argv, "--max-pixels", "0"])
    assert "positive number" in capsys.readouterr().err


def test_evaluate_scores_a_downscaled_image_at_its_labels_size(tmp_path, clip):
    root = write_voc(tmp_path / "voc", n_val=2)  # images 20 x 28 and 21 x 30
    labels = [read_label(p) for p in sorted((root / "SegmentationClass").glob("2008_*.png"))]
    data = SegmentationDataset("voc21", root, "val", max_pixels=200)
    item = data[0]
    assert item["error"] is None and item["image"].shape[:2] == downscaled_size(20, 28, 200)
    assert item["label"].shape == (20, 28)
    result = api.evaluate(clip, "maskclip", "voc21", root, templates="single", inference=FAST, progress=False,
                          max_pixels=200)
    assert result.num_images == 2 and result.skipped == [] and len(result.downscaled) == 2
    assert result.confusion.sum() == sum(int((lab != 255).sum()) for lab in labels)  # every labelled pixel
    assert result.settings["max_pixels"] == 200
    # A label beyond 4 x max_pixels is never resized: that image is reported and skipped.
    result = api.evaluate(clip, "maskclip", "voc21", root, templates="single", inference=FAST, progress=False,
                          max_pixels=150)  # labels 560 and 630 px; 600 allowed
    assert result.num_images == 1 and "label is 30 x 21" in result.skipped[0][1]
