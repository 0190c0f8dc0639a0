"""Tests for reclip.visualize: palettes, palette PNGs, overlays and legends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reclip.visualize import legend_image, overlay, palette, save_label_png, save_legend, save_segmentation


def test_palette_is_voc_then_deterministic():
    colours = palette(300)
    assert colours.shape == (300, 3) and colours.dtype == np.uint8
    # PASCAL VOC colour map: background, aeroplane, bicycle, bird, ..., person (15), ignore (255)
    assert colours[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert colours[15].tolist() == [192, 128, 128]
    assert colours[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in colours[:256]}) == 256
    np.testing.assert_array_equal(palette(300), colours)
    np.testing.assert_array_equal(palette(21), colours[:21])


def test_label_png_round_trip_preserves_indices(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 21, size=(13, 17))
    labels[0, :5] = 255  # ignore
    path = save_label_png(tmp_path / "sub" / "mask.png", torch.from_numpy(labels), palette(21))
    with Image.open(path) as img:
        assert img.mode == "P"
        np.testing.assert_array_equal(np.asarray(img), labels)
        assert img.getpalette()[3:6] == [128, 0, 0]
    assert [p.name for p in path.parent.iterdir()] == ["mask.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="0..65535"):
        save_label_png(tmp_path / "bad.png", np.full((2, 2), 70000))
    with pytest.raises(ValueError, match="0..65535"):
        save_label_png(tmp_path / "bad.png", np.full((2, 2), -1))


def test_large_vocabularies_are_written_as_16_bit_png(tmp_path):
    labels = np.random.default_rng(1).integers(0, 847, size=(9, 11))  # ADE-847
    labels[0, 0] = 846
    path = save_label_png(tmp_path / "ade.png", labels)
    with Image.open(path) as img:
        assert img.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(img), labels)
    # num_classes > 256 keeps one format for every mask of the vocabulary
    small = np.zeros((4, 5), np.int64)
    with Image.open(save_label_png(tmp_path / "small.png", small, num_classes=459)) as img:
        assert img.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(img), small)
    with Image.open(save_label_png(tmp_path / "voc.png", small, num_classes=21)) as img:
        assert img.mode == "P"


def test_overlay_blends_and_keeps_ignored_pixels():
    image = np.full((6, 8, 3), 100, np.uint8)
    labels = np.zeros((6, 8), np.int64)
    labels[:, 4:] = 1
    labels[0, 0] = 255
    out = overlay(image, labels, palette(2), alpha=0.5)
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    assert out[3, 6].tolist() == [114, 50, 50]  # 0.5 * 100 + 0.5 * (128, 0, 0)
    assert out[3, 1].tolist() == [50, 50, 50]
    assert out[0, 0].tolist() == [100, 100, 100]
    with pytest.raises(ValueError, match="differ in size"):
        overlay(image, labels[:3], palette(2))


def test_legend_and_save_segmentation_write_files(tmp_path):
    names = ["background", "cat", "dog"]
    full = legend_image(names)
    subset = legend_image(names, present=[0, 2, 255])
    assert full.dtype == np.uint8 and full.ndim == 3 and full.shape[2] == 3
    assert subset.shape[0] < full.shape[0]  # fewer rows
    image = np.zeros((10, 12, 3), np.uint8)
    labels = np.zeros((10, 12), np.int64)
    labels[5:] = 2
    paths = save_segmentation(tmp_path, "img_001", image, labels, names)
    assert {p.name for p in tmp_path.iterdir()} == {"img_001.png", "img_001_overlay.jpg", "legend.png"}
    np.testing.assert_array_equal(np.asarray(Image.open(paths["mask"])), labels)
    assert Image.open(paths["overlay"]).size == (12, 10)
    np.testing.assert_array_equal(np.asarray(Image.open(paths["legend"]).convert("RGB")), full)


def test_legend_is_rewritten_so_a_stale_one_cannot_survive(tmp_path):
    image = np.zeros((10, 12, 3), np.uint8)
    labels = np.zeros((10, 12), np.int64)
    save_segmentation(tmp_path, "old", image, labels, ["background", "cat", "dog"])
    paths = save_segmentation(tmp_path, "new", image, labels, ["sky", "road", "car", "tree"])
    legend = np.asarray(Image.open(tmp_path / "legend.png").convert("RGB"))
    np.testing.assert_array_equal(legend, legend_image(["sky", "road", "car", "tree"]))
    assert paths["legend"] == tmp_path / "legend.png"
    # write_legend=False leaves the legend alone and says so
    later = save_segmentation(tmp_path, "next", image, labels, ["other"], write_legend=False)
    assert later["legend"] is None
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "legend.png").convert("RGB")), legend)
    assert save_legend(tmp_path / "legend.png", ["other"]) == tmp_path / "legend.png"
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "legend.png").convert("RGB")),
                                  legend_image(["other"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "legend.png", "new.png", "new_overlay.jpg", "next.png", "next_overlay.jpg", "old.png", "old_overlay.jpg"]


def test_save_segmentation_with_more_than_256_classes(tmp_path):
    names = [f"class {i}" for i in range(300)]
    image = np.full((8, 10, 3), 100, np.uint8)
    labels = np.full((8, 10), 255, np.int64)  # an ordinary class here, not ignore
    labels[:, 5:] = 299
    paths = save_segmentation(tmp_path, "x", image, labels, names, alpha=1.0)
    with Image.open(paths["mask"]) as img:
        assert img.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(img), labels)
    colours = palette(300)
    overlay_rgb = np.asarray(Image.open(paths["overlay"])).astype(int)
    assert np.abs(overlay_rgb[4, 1] - colours[255].astype(int)).max() <= 8  # coloured (JPEG), not skipped
    assert np.abs(overlay_rgb[4, 8] - colours[299].astype(int)).max() <= 8
