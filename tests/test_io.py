"""Robust image/label reading (reclip.data.io) and the pure transforms (reclip.data.transforms)."""

from __future__ import annotations

import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hostile import png_chunk, png_header
from reclip.data.io import (
    ImageReadError,
    check_max_pixels,
    downscaled_size,
    image_size,
    iter_images,
    load_image,
    read_image,
    read_label,
    scan_images,
)
from reclip.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    resize_short_side,
    short_side_size,
    to_tensor_normalized,
)

RNG = np.random.default_rng(0)


def _rgb(h: int = 4, w: int = 5) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png16(path: Path, arr: np.ndarray) -> None:
    """Hand-written 16-bit RGB PNG (Pillow cannot write one): big-endian samples, filter 0."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bit, colour type 2 (RGB)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw))
                     + png_chunk(b"IEND", b""))


# ------------------------------------------------------------------------- image modes

def test_rgb_png_roundtrip_exact(tmp_path):
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out, a)


def test_grayscale_l_is_replicated(tmp_path):
    g = RNG.integers(0, 256, (3, 6), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (3, 6, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_16bit_gray_is_scaled_not_clipped(tmp_path):
    v = np.array([[0, 257, 1000, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = read_image(tmp_path / "g16.png")
    expected = np.round(v.astype(np.float64) * 255 / 65535).astype(np.uint8)  # [0, 1, 4, 156, 255]
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 2], expected)
    assert out[0, 2, 0] == 4  # clipping would give 255


def test_32bit_int_image_treated_as_16bit(tmp_path):
    v = np.array([[0, 514, 65535]], dtype=np.int32)
    Image.fromarray(v, mode="I").save(tmp_path / "i32.tif")
    out = read_image(tmp_path / "i32.tif")
    np.testing.assert_array_equal(out[0, :, 1], [0, 2, 255])


def test_float_image_in_unit_range(tmp_path):
    v = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(v, mode="F").save(tmp_path / "f.tif")
    out = read_image(tmp_path / "f.tif")
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])


def test_16bit_rgb_png_scaled(tmp_path):
    k = RNG.integers(0, 256, (3, 4, 3))
    _png16(tmp_path / "rgb16.png", (k * 257).astype(np.uint16))  # v = k * 257 -> exactly k
    out = read_image(tmp_path / "rgb16.png")
    np.testing.assert_array_equal(out, k.astype(np.uint8))


def test_rgba_drops_alpha(tmp_path):
    a = np.zeros((2, 2, 4), dtype=np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 10, 20, 30
    a[0, 0, 3] = 0  # fully transparent pixel keeps its stored colour
    a[1, 1, 3] = 255
    Image.fromarray(a, mode="RGBA").save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png")
    np.testing.assert_array_equal(out, np.broadcast_to([10, 20, 30], (2, 2, 3)))


def test_la_drops_alpha(tmp_path):
    Image.new("LA", (3, 2), (100, 0)).save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), np.full((2, 3, 3), 100))


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_image_gives_colours(tmp_path, transparency):
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    img = Image.fromarray(idx).convert("P")
    pal = [0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    img.putpalette(pal)
    if transparency:
        img.info["transparency"] = 1  # index 1 transparent: its colour is still returned
        img.save(tmp_path / "p.png", transparency=1)
    else:
        img.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    lut = np.array(pal[:9]).reshape(3, 3)
    np.testing.assert_array_equal(out, lut[idx])


def test_cmyk(tmp_path):
    a = np.zeros((1, 2, 4), dtype=np.uint8)
    a[0, 1, 0] = 255  # pure cyan
    Image.fromarray(a, mode="CMYK").save(tmp_path / "c.tif")
    out = read_image(tmp_path / "c.tif")
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [0, 255, 255])


def test_bilevel(tmp_path):
    Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1").save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_image(tmp_path / "b.png")[0, :, 0], [0, 255])


def test_exif_orientation_applied(tmp_path):
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "e.png", exif=exif)
    out = read_image(tmp_path / "e.png")
    assert out.shape == (3, 2, 3)
    np.testing.assert_array_equal(out, np.rot90(a, k=-1))
    np.testing.assert_array_equal(read_image(tmp_path / "e.png", apply_exif=False), a)
    assert image_size(tmp_path / "e.png") == (3, 2)
    assert image_size(tmp_path / "e.png", apply_exif=False) == (2, 3)


# ------------------------------------------------------------------------------ errors

def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    files["missing"] = tmp_path / "nope.jpg"
    files["empty"] = tmp_path / "empty.png"
    files["empty"].write_bytes(b"")
    files["corrupt"] = tmp_path / "corrupt.jpg"
    files["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
    big = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for ext in ("png", "jpg"):
        p = tmp_path / f"full.{ext}"
        Image.fromarray(big).save(p)
        data = p.read_bytes()
        files[f"truncated_{ext}"] = tmp_path / f"trunc.{ext}"
        files[f"truncated_{ext}"].write_bytes(data[: len(data) // 2])
    return files


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt", "truncated_png", "truncated_jpg"])
@pytest.mark.parametrize("reader", [read_image, read_label])
def test_bad_files_raise_with_path(tmp_path, kind, reader):
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(ImageReadError) as err:
        reader(path)
    assert err.value.path == str(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, OSError)
    if kind == "empty":
        assert "empty" in err.value.reason
    if kind.startswith("truncated"):
        assert "truncat" in err.value.reason or "decode" in err.value.reason


def test_image_read_error_pickles():
    e = pickle.loads(pickle.dumps(ImageReadError("/x/y.jpg", "broken")))
    assert e.path == "/x/y.jpg" and e.reason == "broken"


# ------------------------------------------------------------------------------ labels

def test_label_palette_png_gives_indices_not_rgb(tmp_path):
    idx = np.array([[0, 1, 15], [20, 255, 3]], dtype=np.uint8)
    img = Image.fromarray(idx).convert("P")
    img.putpalette(list(RNG.integers(0, 256, 768)))
    img.save(tmp_path / "voc.png")
    out = read_label(tmp_path / "voc.png")
    assert out.shape == (2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, idx)


def test_label_16bit_values_preserved(tmp_path):
    v = np.array([[0, 300, 1000, 65535]], dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "l16.png")
    out = read_label(tmp_path / "l16.png")
    np.testing.assert_array_equal(out, v.astype(np.int32))


def test_label_rgb_rejected_with_fix(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "rgb.png")
    with pytest.raises(ImageReadError, match="class indices"):
        read_label(tmp_path / "rgb.png")


# ------------------------------------------------------------------------- size limits

def test_downscaled_size_bounds_the_pixels_and_keeps_the_aspect():
    assert downscaled_size(200, 300, None) == (200, 300)
    assert downscaled_size(200, 300, 60000) == (200, 300)  # fits: unchanged
    h, w = downscaled_size(200, 300, 20000)
    assert h * w <= 20000 and h * w > 19000 and abs(w / h - 1.5) < 0.02
    assert downscaled_size(1, 10**9, 1000) == (1, 1000)  # a side never drops below one pixel
    assert downscaled_size(10**9, 3, 1000) == (1000, 1)
    rng = np.random.default_rng(1)
    for _ in range(200):
        height, width, limit = (int(v) for v in rng.integers(1, 100_000, 3))
        h, w = downscaled_size(height, width, limit)
        assert 1 <= h <= height and 1 <= w <= width and (h * w <= limit or (h, w) == (1, 1))


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "100"])
def test_max_pixels_must_be_a_positive_count(tmp_path, bad):
    with pytest.raises(ValueError, match="positive number of pixels"):
        check_max_pixels(bad)
    Image.fromarray(_rgb()).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="positive number of pixels"):
        read_image(tmp_path / "a.png", max_pixels=bad)


def test_a_huge_header_is_refused_before_anything_is_decoded(tmp_path):
    huge = png_header(tmp_path / "huge.png", 60000, 60000)  # 3.6 gigapixels, 10.8 GB decoded
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even Pillow's DecompressionBombWarning
        with pytest.raises(ImageReadError, match=r"60000 x 60000 = 3,600,000,000 pixels.*--max-pixels"):
            read_image(huge)
        with pytest.raises(ImageReadError, match=r"label is 60000 x 60000 .* labels are never resized"):
            read_label(huge)
        assert image_size(huge) == (60000, 60000)  # the header alone, whatever its size


def test_a_large_image_is_read_downscaled_with_its_own_size(tmp_path):
    a = _rgb(200, 300)
    Image.fromarray(a).save(tmp_path / "big.png")
    loaded = load_image(tmp_path / "big.png", max_pixels=20000)  # 60000 px decoded whole: within 4 x 20000
    h, w = downscaled_size(200, 300, 20000)
    assert loaded.size == (200, 300) and loaded.image.shape == (h, w, 3) and loaded.downscaled
    np.testing.assert_array_equal(loaded.image, np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BOX)))
    assert not load_image(tmp_path / "big.png", max_pixels=60000).downscaled
    with pytest.raises(ImageReadError, match=r"decode 60,000 pixels, more than the 40,000 allowed.*--max-pixels"):
        read_image(tmp_path / "big.png", max_pixels=10000)  # 60000 > 4 x 10000: no PNG decoder reads it reduced


def test_a_jpeg_is_decoded_reduced_never_whole(tmp_path):
    y, x = np.mgrid[0:640, 0:800]
    a = np.stack([x * 255 // 800, y * 255 // 640, (x + y) * 255 // 1440], axis=-1).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(a).save(tmp_path / "big.png")
    # 512,000 pixels, 4 x 8000 = 32,000 may be decoded: only the JPEG's 1/8-scale decode fits.
    with pytest.raises(ImageReadError, match="more than the 32,000 allowed"):
        read_image(tmp_path / "big.png", max_pixels=8000)
    out = read_image(tmp_path / "big.jpg", max_pixels=8000)
    h, w = downscaled_size(640, 800, 8000)
    assert out.shape == (h, w, 3)
    full = np.asarray(Image.fromarray(read_image(tmp_path / "big.jpg", max_pixels=None)).resize(
        (w, h), Image.Resampling.BOX))
    assert np.abs(out.astype(int) - full).mean() < 3  # the same picture


def _mode_file(tmp_path: Path, mode: str) -> Path:
    """A 30 x 40 file whose pixels Pillow decodes in ``mode``."""
    rng = np.random.default_rng(3)
    path = tmp_path / f"{mode.replace(';', '_')}.{'tif' if mode in ('CMYK', 'I', 'F') else 'png'}"
    if mode == "RGB16":
        _png16(path, rng.integers(0, 65536, (30, 40, 3)).astype(np.uint16))
        return path
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 4, (30, 40), dtype=np.uint8), mode="P")
        img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 90, 90, 90])
        img.save(path, transparency=0)  # index 0 transparent: its colour is kept, not composited
        return path
    channels = {"L": 1, "LA": 2, "RGBA": 4, "CMYK": 4}
    if mode == "1":
        img = Image.fromarray(rng.integers(0, 2, (30, 40)).astype(bool))
    elif mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (30, 40)).astype(np.uint16))
    elif mode == "I":
        img = Image.fromarray(rng.integers(0, 65536, (30, 40)).astype(np.int32))
    elif mode == "F":
        img = Image.fromarray(rng.random((30, 40)).astype(np.float32))
    else:
        shape = (30, 40) if channels[mode] == 1 else (30, 40, channels[mode])
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
    img.save(path)
    assert Image.open(path).mode == mode
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "1", "RGBA", "P", "CMYK", "I;16", "I", "F", "RGB16"])
def test_every_mode_reads_downscaled_as_the_full_read_box_filtered(tmp_path, mode):
    path = _mode_file(tmp_path, mode)
    full = read_image(path, max_pixels=None)  # (30, 40, 3): alpha dropped, 16 bit scaled, ...
    out = read_image(path, max_pixels=300)  # half the size: (15, 20)
    expected = np.asarray(Image.fromarray(full).resize((20, 15), Image.Resampling.BOX))
    assert out.shape == (15, 20, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out, expected, atol=1)


def test_exif_orientation_applies_to_a_downscaled_image(tmp_path):
    a = _rgb(20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    Image.fromarray(a).save(tmp_path / "e.png", exif=exif)
    loaded = load_image(tmp_path / "e.png", max_pixels=150)
    assert loaded.size == (30, 20) and loaded.image.shape == (15, 10, 3)
    full = read_image(tmp_path / "e.png", max_pixels=None)
    np.testing.assert_allclose(loaded.image, np.asarray(Image.fromarray(full).resize((10, 15), Image.Resampling.BOX)),
                               atol=1)


def test_labels_are_read_whole_up_to_four_times_the_limit(tmp_path):
    lab = RNG.integers(0, 21, (200, 300), dtype=np.uint8)
    Image.fromarray(lab).save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_label(tmp_path / "l.png", max_pixels=15000), lab)  # never resized
    with pytest.raises(ImageReadError, match=r"label is 300 x 200 = 60,000 pixels.*at least 15,000"):
        read_label(tmp_path / "l.png", max_pixels=14999)


def test_pillows_bomb_check_never_aborts_a_read_and_is_restored(tmp_path, monkeypatch):
    Image.fromarray(_rgb(40, 40)).save(tmp_path / "a.png")  # 1600 pixels
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "l.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow alone would raise (> 2 x 500)
    assert read_image(tmp_path / "a.png").shape == (40, 40, 3)  # reclip's limits replace Pillow's
    assert read_label(tmp_path / "l.png").shape == (40, 40)
    assert Image.MAX_IMAGE_PIXELS == 500  # and Pillow's is back
    # Without reclip's limits Pillow's check is the safety net; it never escapes as such.
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(tmp_path / "a.png", max_pixels=None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: Pillow only warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageReadError, match="decompression bomb"):
            read_image(tmp_path / "a.png", max_pixels=None)


# ------------------------------------------------------------------------- iter_images

def test_iter_images_sorted_recursive_filtered(tmp_path):
    for rel in ["b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.webp", "notes.txt", ".hidden.jpg",
                ".cache/e.jpg", "sub/._f.jpg"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    rel = [p.relative_to(tmp_path).as_posix() for p in iter_images(tmp_path)]
    assert rel == ["a.PNG", "b.jpg", "sub/c.jpeg", "sub/deeper/d.webp"]
    assert [p.name for p in iter_images(tmp_path, recursive=False)] == ["a.PNG", "b.jpg"]
    with pytest.raises(NotADirectoryError):
        iter_images(tmp_path / "missing")


# -------------------------------------------------------------------------- transforms

def test_short_side_size_matches_mmcv_rounding():
    assert short_side_size(375, 500, 448) == (448, 597)  # 500 * 448 / 375 = 597.33
    assert short_side_size(500, 333, 336) == (505, 336)  # 500 * 336 / 333 = 504.5 -> 505 (+0.5 rule)
    assert short_side_size(100, 1000, 448, max_long_side=2048) == (205, 2048)  # long-side cap wins


def test_resize_short_side_numpy_image_and_label():
    img = _rgb(30, 40)
    out = resize_short_side(img, 15)
    assert out.shape == (15, 20, 3) and out.dtype == np.uint8
    lab = RNG.integers(0, 3, (30, 40)).astype(np.int64)
    lab[0, 0] = 255
    small = resize_short_side(lab, 15, mode="nearest")
    assert small.shape == (15, 20) and small.dtype == np.int64
    assert set(np.unique(small)) <= {0, 1, 2, 255}  # ids are never blended
    big = resize_short_side(lab, 60, mode="nearest")  # exact 2x: every pixel is a 2x2 block
    np.testing.assert_array_equal(big, np.kron(lab, np.ones((2, 2), dtype=np.int64)))


def test_resize_short_side_tensor_and_constant_image():
    t = torch.full((2, 3, 10, 20), 0.25)
    out = resize_short_side(t, 5)
    assert out.shape == (2, 3, 5, 10)
    torch.testing.assert_close(out, torch.full((2, 3, 5, 10), 0.25))
    assert resize_short_side(torch.zeros(3, 8, 4), 2).shape == (3, 4, 2)
    with pytest.raises(ValueError, match="mode"):
        resize_short_side(t, 5, mode="cubic")


def test_to_tensor_normalized_values():
    img = np.zeros((2, 3, 3), dtype=np.uint8)
    img[0, 0] = [255, 128, 0]
    t = to_tensor_normalized(img)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    expected = [(1.0 - CLIP_MEAN[0]) / CLIP_STD[0], (128 / 255 - CLIP_MEAN[1]) / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]]
    torch.testing.assert_close(t[:, 0, 0], torch.tensor(expected, dtype=torch.float32))
    with pytest.raises(ValueError, match="uint8"):
        to_tensor_normalized(img.astype(np.float32))


def test_pad_to_patch():
    from reclip.clip.model import pad_to_patch

    x = torch.ones(1, 3, 17, 32)
    y = pad_to_patch(x, 16)
    assert y.shape == (1, 3, 32, 32)
    torch.testing.assert_close(y[..., :17, :32], x)
    assert float(y[..., 17:, :].abs().sum()) == 0.0
    assert pad_to_patch(x[..., :16, :], 16).shape[-2:] == (16, 32)


# ---------------------------------------------------------------- folders: links, loops

def _touch(root: Path, *rels: str) -> None:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")  # listing goes by name; nothing is decoded


def test_scan_lists_each_real_folder_and_file_once(tmp_path):
    root = tmp_path / "in"
    _touch(root, "a.jpg", "sub/b.jpg", "zzz/c.jpg")
    _touch(tmp_path, "outside/d.jpg")
    (root / "sub" / "up").symlink_to("..")  # loop back up the tree: followed, it lists everything again
    (root / "aaa").symlink_to("zzz")  # a second path to a folder, sorted before the folder itself
    (root / "ext").symlink_to(tmp_path / "outside")  # the only path to a folder: listed through the link
    (root / "link.jpg").symlink_to("sub/b.jpg")
    os.link(root / "a.jpg", root / "hard.jpg")
    (root / "broken.jpg").symlink_to("missing.jpg")
    (root / "self.jpg").symlink_to("self.jpg")  # a file link that loops
    scan = scan_images(root)
    assert [p.relative_to(root).as_posix() for p in scan.files] == ["a.jpg", "ext/d.jpg", "sub/b.jpg", "zzz/c.jpg"]
    reasons = {Path(p).relative_to(root).as_posix(): r for p, r in scan.skipped}
    assert sorted(reasons) == ["aaa", "broken.jpg", "hard.jpg", "link.jpg", "self.jpg", "sub/up"]
    assert reasons["sub/up"].startswith("symbolic link loop") and reasons["self.jpg"].startswith("symbolic link loop")
    assert reasons["aaa"].startswith("same folder as") and str(root / "zzz") in reasons["aaa"]
    assert reasons["link.jpg"] == f"same file as {root / 'sub/b.jpg'}, listed once"
    assert reasons["hard.jpg"] == f"same file as {root / 'a.jpg'}, listed once"
    assert reasons["broken.jpg"].startswith("broken symbolic link (-> missing.jpg")
    with pytest.warns(UserWarning, match="left out 6 path"):
        assert iter_images(root) == scan.files
    # An excluded folder (an output folder inside the input) is left out silently.
    assert "sub/b.jpg" not in [p.relative_to(root).as_posix() for p in scan_images(root, exclude=[root / "sub"]).files]
    assert not any("sub" in p for p, _ in scan_images(root, exclude=[root / "sub"]).skipped)


def test_reading_a_broken_or_looping_link_says_so(tmp_path):
    (tmp_path / "broken.jpg").symlink_to("missing.jpg")
    (tmp_path / "self.jpg").symlink_to("self.jpg")
    with pytest.raises(ImageReadError, match="broken symbolic link"):
        read_image(tmp_path / "broken.jpg")
    with pytest.raises(ImageReadError, match="symbolic link loop"):
        read_label(tmp_path / "self.jpg")
