"""Tests for reclip.visualize: palettes, palette PNGs, overlays and legends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reclip.visualize import legend_image, overlay, palette, save_label_png, save_segmentation


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
    with pytest.raises(ValueError, match="0..255"):
        save_label_png(tmp_path / "bad.png", np.full((2, 2), 300))


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
    stamp = paths["legend"].stat().st_mtime_ns
    save_segmentation(tmp_path, "img_002", image, labels, names)
    assert paths["legend"].stat().st_mtime_ns == stamp  # written once per folder
