"""Hostile-but-fair inputs to segment and evaluate (issue "Reliability", 5a, 6, 9): images
too large to process whole, symbolic-link loops and duplicates, output names that would
collide, and output permissions. Every run goes on past the bad input."""

from __future__ import annotations

import os
import stat
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
from reclip.visualize import save_segmentation, segmentation_files

pytestmark = pytest.mark.usefixtures("isolated_cache")

FAST = {"short_side": 24, "mode": "whole"}


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


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


# -------------------------------------------------------------------- C: output names

def _outputs(found) -> list[str]:
    paths = [found.legend]
    for _, name in found.pairs:
        paths += [(name.parent / f).as_posix() for f in segmentation_files(name.name).values()]
    return paths


def test_output_names_never_collide(tmp_path):
    root = tmp_path / "in"
    rels = ["legend.jpg", "Legend.PNG", "a.png", "a_overlay.jpg", "x.jpg", "x.png", "X.jpg", "y.jpg", "y.png/z.jpg",
            "sub/legend.jpg", "sub/x.jpg"]
    for i, rel in enumerate(rels):
        _image(root / rel, 8 + i, 8)
    found = api.collect_images([root])
    names = {p.relative_to(root).as_posix(): name.as_posix() for p, name in found.pairs}
    assert found.legend == "legend.png" and names["legend.jpg"] == "legend_jpg"
    assert names["y.jpg"] == "y_jpg"  # y.png is an input sub-folder: its masks go in there
    assert names["sub/legend.jpg"] == "sub/legend" and names["sub/x.jpg"] == "sub/x"  # no clash in a sub-folder
    outputs = [p.casefold() for p in _outputs(found)]  # as a case-insensitive file system sees them
    folders = {parent.as_posix().casefold() for _, n in found.pairs for parent in n.parents if parent != Path(".")}
    assert len(set(outputs)) == len(outputs) == 2 * len(rels) + 1 and not set(outputs) & folders


def test_segment_writes_every_image_its_own_mask_and_keeps_the_legend(tmp_path, clip):
    root = tmp_path / "in"
    rels = ["legend.jpg", "a.png", "a_overlay.jpg", "x.jpg", "x.png", "y.jpg", "y.png/z.jpg", "sub/x.jpg"]
    sizes = {rel: (10 + 2 * i, 12 + i) for i, rel in enumerate(rels)}  # tells the masks apart
    for i, rel in enumerate(rels):
        _image(root / rel, *sizes[rel], seed=i)
    out = tmp_path / "out"
    summary = _segment(clip, [root], out)
    assert summary.skipped == [] and len(summary.written) == len(rels) == len(set(summary.written))
    found = api.collect_images([root], exclude=out)
    for path, name in found.pairs:
        mask = Image.open(out / name.parent / segmentation_files(name.name)["mask"])
        overlay = Image.open(out / name.parent / segmentation_files(name.name)["overlay"])
        h, w = sizes[path.relative_to(root).as_posix()]
        assert mask.mode == "P" and mask.size == overlay.size == (w, h)
    legend = Image.open(out / "legend.png")
    assert legend.mode == "RGB" and summary.legend == out / "legend.png"  # a legend, not legend.jpg's mask


def test_a_sub_folder_named_like_the_legend_moves_the_legend(tmp_path, clip):
    _image(tmp_path / "in" / "legend.png" / "p.jpg", 12, 12)
    summary = _segment(clip, [tmp_path / "in"], tmp_path / "out")
    assert summary.legend == tmp_path / "out" / "legend_2.png" and summary.legend.is_file()
    assert (tmp_path / "out" / "legend.png" / "p.png").is_file()


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_honour_the_umask(tmp_path, clip, umask, expected):
    _image(tmp_path / "in" / "p.jpg", 12, 12)
    _image(tmp_path / "in" / "sub" / "q.jpg", 12, 12)
    saved = os.umask(umask)
    try:
        summary = _segment(clip, [tmp_path / "in"], tmp_path / "out")
    finally:
        os.umask(saved)
    out = tmp_path / "out"
    files = [out / "p.png", out / "p_overlay.jpg", out / "sub" / "q.png", out / "sub" / "q_overlay.jpg", summary.legend]
    assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {oct(expected)}


def test_save_segmentation_never_writes_a_mask_over_its_legend(tmp_path):
    image, labels = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int64)
    with pytest.raises(ValueError, match="over legend.png"):
        save_segmentation(tmp_path, "legend", image, labels, ["a"])
    assert not (tmp_path / "legend.png").exists()
    assert save_segmentation(tmp_path, "legend", image, labels, ["a"], write_legend=False)["legend"] is None
