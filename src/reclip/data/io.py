"""Robust image and label reading.

Every reader forces a full decode (``Image.load()``) so that truncated or corrupt files
fail here, with the file's path, instead of deep inside a model. Pillow's global
``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set: a truncated file is an error, not a
grey stripe.

Conventions (documented choices):

- Images come back as ``(H, W, 3) uint8`` RGB with the EXIF orientation applied (as
  OpenCV's ``IMREAD_COLOR``, hence mmseg, does).
- Alpha is DROPPED, never composited: RGBA/LA/PA pixels keep their stored colour
  (again what OpenCV/mmseg does with a 4-channel PNG).
- 16-bit data (``I;16*``, ``I``) is SCALED to 8 bit with ``round(v * 255 / 65535)``,
  never clipped; 32-bit integer values outside 0..65535 are clipped to that range first.
  Float images (``F``) are taken as 0..1 when their maximum is <= 1, else as 0..255.
- Labels are never colour-converted: a palette ("P") PNG gives its palette INDICES
  (VOC's SegmentationClass), and no EXIF rotation is applied to labels.

Size limits (the work per image is bounded before anything is allocated):

- An image of more than ``max_pixels`` pixels (default :data:`MAX_PIXELS`, 4096 x 4096,
  above every benchmark's images) is read DOWNSCALED to at most ``max_pixels``, aspect
  kept (area-averaged, as a box filter). A JPEG is decoded directly at 1/2, 1/4 or 1/8
  scale (Pillow's ``draft``: the full image is never materialised); other formats are
  decoded whole and then reduced, which is allowed up to ``DECODE_FACTOR x max_pixels``
  decoded pixels (:func:`decode_limit`); a file that would need more is refused with
  ImageReadError (callers report and skip it). :func:`load_image` also returns the
  file's own size, so an evaluation scores the prediction at its label's size.
- A label is never resized (class ids): up to ``decode_limit(max_pixels)`` pixels it is
  read whole, beyond that it is refused with ImageReadError.
- Pillow's own decompression-bomb check (``Image.MAX_IMAGE_PIXELS``; warning, then
  DecompressionBombError) is replaced by these limits while reclip reads a file, so a
  huge JPEG can still be read reduced. ``max_pixels=None`` removes reclip's limits and
  leaves Pillow's check in place as the safety net; its error (or its warning, where
  warnings are errors) is then an ImageReadError like any unreadable file.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from reclip.data.folders import IMAGE_EXTENSIONS, ImageScan, iter_images, link_problem, scan_images

__all__ = [
    "DECODE_FACTOR",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "ImageReadError",
    "ImageScan",
    "LoadedImage",
    "check_max_pixels",
    "decode_limit",
    "downscaled_size",
    "image_size",
    "iter_images",
    "load_image",
    "read_image",
    "read_label",
    "scan_images",
]

# Pixels of the largest image handed on unchanged; larger ones are read downscaled to it.
# 4096 x 4096 is above every benchmark's images (Cityscapes 2048 x 1024), so published
# protocols are unaffected; a 48-megapixel photo is read at about 16.8 megapixels.
MAX_PIXELS: int = 4096 * 4096

# A file may be decoded whole up to DECODE_FACTOR x max_pixels pixels to be downscaled
# (about 0.27 GB for the default in Pillow's 4 bytes per RGB pixel), and a label, never
# resized, may hold that many pixels.
DECODE_FACTOR: int = 4

EXIF_ORIENTATION = 0x0112  # EXIF tag number of the Orientation field
# Orientation value -> the transposition that undoes it (as ImageOps.exif_transpose).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Exceptions Pillow raises for unreadable data (SyntaxError for some broken headers,
# struct.error / ValueError / IndexError for inconsistent chunks, EOFError for short files).
# DecompressionBombWarning only raises where warnings are errors (python -W error).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, Image.DecompressionBombError,
                  Image.DecompressionBombWarning)


class ImageReadError(OSError):
    """An image or label file could not be read.

    Attributes:
        path: the offending file.
        reason: what is wrong with it (missing, empty, corrupt, truncated, bad mode).
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep the (path, reason) signature through pickling (DataLoader workers)
        return (type(self), (self.path, self.reason))


def check_max_pixels(max_pixels: int | None) -> int | None:
    """``max_pixels`` itself when it is a positive int or None (no limit); else ValueError."""
    if max_pixels is None or (isinstance(max_pixels, int) and not isinstance(max_pixels, bool) and max_pixels > 0):
        return max_pixels
    raise ValueError(
        f"max_pixels must be a positive number of pixels or None (no limit), got {max_pixels!r}; "
        f"the default is {MAX_PIXELS} (4096 x 4096)"
    )


def decode_limit(max_pixels: int | None) -> int | None:
    """Most pixels decoded for one file (an image before its reduction, or a label)."""
    return None if max_pixels is None else DECODE_FACTOR * max_pixels


def downscaled_size(height: int, width: int, max_pixels: int | None) -> tuple[int, int]:
    """(h, w) of an (height, width) image read under ``max_pixels``: itself when it fits,
    else the largest size with h * w <= max_pixels and the same aspect (to whole pixels;
    a side is never below 1)."""
    if max_pixels is None or height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    h, w = max(1, int(height * scale)), max(1, int(width * scale))
    if h * w > max_pixels:  # a side held at 1 pixel (extreme aspect), or float rounding
        if h <= w:
            w = max(1, max_pixels // h)
        else:
            h = max(1, max_pixels // w)
    return h, w


# Pillow's decompression-bomb limit is a module global; reclip's readers switch it off
# for the time they read (their own limits apply instead) and restore it afterwards.
# The count lets threads read at the same time: the last one out restores the value.
_pillow_limit_lock = threading.Lock()
_pillow_limit_users = 0
_pillow_limit_saved: int | None = None


@contextlib.contextmanager
def _own_pixel_limits(active: bool = True) -> Iterator[None]:
    """Pillow's ``Image.MAX_IMAGE_PIXELS`` off inside when ``active`` (reclip's limits
    replace it); a no-op otherwise."""
    global _pillow_limit_users, _pillow_limit_saved
    if not active:
        yield
        return
    with _pillow_limit_lock:
        if _pillow_limit_users == 0:
            _pillow_limit_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _pillow_limit_users += 1
    try:
        yield
    finally:
        with _pillow_limit_lock:
            _pillow_limit_users -= 1
            if _pillow_limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _pillow_limit_saved


def _decode_error(path: Path, error: BaseException) -> ImageReadError:
    reason = str(error) or type(error).__name__
    if "truncated" in reason.lower():
        return ImageReadError(path, f"file is truncated ({reason}); re-download it")
    return ImageReadError(path, f"cannot decode image ({type(error).__name__}: {reason})")


def _open(path: Path) -> Image.Image:
    """Open ``path``, reading its header only; ImageReadError for a missing, empty or
    unrecognised file. Call inside :func:`_own_pixel_limits`."""
    if not path.exists():
        raise ImageReadError(path, link_problem(path) if path.is_symlink() else
                             "file does not exist; check the data root and the split list")
    if not path.is_file():
        raise ImageReadError(path, "is not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes); re-download or remove it")
    try:
        return Image.open(path)
    except _DECODE_ERRORS as e:
        raise _decode_error(path, e) from e


def _load(img: Image.Image, path: Path) -> None:
    """Decode every pixel (truncation and corrupt chunks raise here, as ImageReadError)."""
    try:
        img.load()
    except _DECODE_ERRORS as e:
        raise _decode_error(path, e) from e


def _sixteen_to_eight(arr: np.ndarray) -> np.ndarray:
    """Scale 0..65535 data to 0..255 with rounding: round(v * 255 / 65535)."""
    a = np.clip(arr.astype(np.int64), 0, 65535)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _float_to_eight(arr: np.ndarray) -> np.ndarray:
    """Floats in 0..1 (when max <= 1) or 0..255 -> uint8 with rounding and clipping."""
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0)
    if a.size and a.max() <= 1.0:
        a = a * 255.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _to_rgb_array(img: Image.Image, path: Path) -> np.ndarray:
    """Convert a decoded PIL image of any supported mode to (H, W, 3) uint8 RGB."""
    mode = img.mode
    if mode == "RGB":
        rgb = np.asarray(img, dtype=np.uint8)
    elif mode in ("RGBA", "RGBa", "RGBX"):
        rgb = np.asarray(img.convert("RGBA"), dtype=np.uint8)[..., :3]  # drop alpha
    elif mode in ("P", "PA"):
        # Through RGBA so palette transparency is kept aside (then dropped) without warnings.
        rgb = np.asarray(img.convert("RGBA"), dtype=np.uint8)[..., :3]
    elif mode in ("L", "LA", "1"):
        gray = np.asarray(img.convert("L"), dtype=np.uint8)  # LA -> L drops alpha
        rgb = np.repeat(gray[..., None], 3, axis=2)
    elif mode.startswith("I;16") or mode == "I":
        gray = _sixteen_to_eight(np.asarray(img))
        rgb = np.repeat(gray[..., None], 3, axis=2)
    elif mode == "F":
        gray = _float_to_eight(np.asarray(img))
        rgb = np.repeat(gray[..., None], 3, axis=2)
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    else:
        raise ImageReadError(path, f"unsupported image mode {mode!r}; convert the file to RGB")
    return np.ascontiguousarray(rgb)


def _resizable(img: Image.Image, path: Path) -> Image.Image:
    """``img`` in a mode whose box-filter resize keeps :func:`_to_rgb_array`'s meaning:
    RGB, L, I or F (alpha dropped and palettes expanded first, never composited)."""
    mode = img.mode
    if mode in ("RGB", "L", "I", "F"):
        return img
    if mode in ("RGBA", "RGBa", "RGBX", "P", "PA"):
        return img.convert("RGBA").convert("RGB")  # RGBA -> RGB drops alpha, keeps the stored colour
    if mode in ("LA", "1"):
        return img.convert("L")
    if mode.startswith("I;16"):
        return img.convert("I")  # same values; Pillow resizes I, not I;16
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    raise ImageReadError(path, f"unsupported image mode {mode!r}; convert the file to RGB")


class LoadedImage(NamedTuple):
    """What :func:`load_image` read.

    Attributes:
        image: (h, w, 3) uint8 RGB, EXIF orientation applied, h * w <= max_pixels.
        size: (H, W) of the file itself after the EXIF orientation; equals
            ``image.shape[:2]`` unless the image was downscaled.
    """

    image: np.ndarray
    size: tuple[int, int]

    @property
    def downscaled(self) -> bool:
        return self.image.shape[:2] != self.size


def load_image(path: str | os.PathLike, apply_exif: bool = True, *, max_pixels: int | None = MAX_PIXELS
               ) -> LoadedImage:
    """Read an image file as RGB, downscaled when it has more than ``max_pixels`` pixels.

    A larger image comes back at :func:`downscaled_size` (aspect kept, box filter). JPEGs
    are decoded straight at 1/2, 1/4 or 1/8 scale where that still covers the target;
    other formats are decoded whole first, which is refused (ImageReadError) above
    :func:`decode_limit` pixels.

    Args:
        path: image file (any format Pillow decodes).
        apply_exif: rotate/flip by the EXIF orientation tag (default, as OpenCV/mmseg).
        max_pixels: most pixels of the returned image (default :data:`MAX_PIXELS`);
            None: no reclip limit (Pillow's decompression-bomb check then applies).

    Returns:
        LoadedImage(image (h, w, 3) uint8, size (H, W) of the file).

    Raises:
        ImageReadError: missing, empty, corrupt or truncated file, an unsupported mode,
            or a file too large to decode under ``max_pixels``.
        ValueError: ``max_pixels`` is not a positive int or None.
    """
    p = Path(path)
    check_max_pixels(max_pixels)
    with _own_pixel_limits(max_pixels is not None), _open(p) as img:  # closes multi-frame files too
        try:
            width, height = img.size
            target_h, target_w = downscaled_size(height, width, max_pixels)
            if (target_h, target_w) != (height, width):
                img.draft(img.mode, (target_w, target_h))  # JPEG: DCT scaling; other formats: no-op
                decoded = img.size[0] * img.size[1]
                limit = decode_limit(max_pixels)
                if limit is not None and decoded > limit:
                    raise ImageReadError(
                        p,
                        f"image is {width} x {height} = {width * height:,} pixels; reading it at most "
                        f"max_pixels = {max_pixels:,} (--max-pixels) would first decode {decoded:,} pixels, more "
                        f"than the {limit:,} allowed ({DECODE_FACTOR} x max_pixels); downscale the file (e.g. to "
                        f"{target_w} x {target_h}, or save it as JPEG) or raise --max-pixels to at least "
                        f"{-(-decoded // DECODE_FACTOR):,}",
                    )
            _load(img, p)  # first frame of a GIF / multi-page TIFF
            orientation = img.getexif().get(EXIF_ORIENTATION, 1) if apply_exif else 1
            if img.size != (target_w, target_h):
                img = _resizable(img, p).resize((target_w, target_h), Image.Resampling.BOX)
            if orientation in _EXIF_TRANSPOSE:
                img = img.transpose(_EXIF_TRANSPOSE[orientation])
            size = (width, height) if orientation in (5, 6, 7, 8) else (height, width)  # transposes swap H, W
            return LoadedImage(_to_rgb_array(img, p), size)
        except ImageReadError:
            raise
        except _DECODE_ERRORS as e:
            raise ImageReadError(p, f"cannot convert image ({type(e).__name__}: {e})") from e


def read_image(path: str | os.PathLike, apply_exif: bool = True, *, max_pixels: int | None = MAX_PIXELS
               ) -> np.ndarray:
    """Read an image file as RGB: :func:`load_image`'s image.

    Args:
        path: image file (any format Pillow decodes).
        apply_exif: rotate/flip by the EXIF orientation tag (default, as OpenCV/mmseg).
        max_pixels: larger images are read downscaled to this many pixels (see
            :func:`load_image`); None: no reclip limit.

    Returns:
        (H, W, 3) uint8 RGB array (H, W after the EXIF orientation and any downscaling).

    Raises:
        ImageReadError: missing, empty, corrupt or truncated file, an unsupported mode,
            or a file too large to decode under ``max_pixels``.
    """
    return load_image(path, apply_exif, max_pixels=max_pixels).image


def read_label(path: str | os.PathLike, *, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Read a label map of raw class indices.

    Palette PNGs (VOC) give their palette indices, 8-bit grey PNGs their values,
    16-bit PNGs their 16-bit values. No EXIF rotation, no colour conversion, and never
    resized: a label of more than ``decode_limit(max_pixels)`` pixels is refused.

    Args:
        path: label file, normally a PNG.
        max_pixels: the images' limit; labels may hold :data:`DECODE_FACTOR` times as
            many pixels. None: no reclip limit.

    Returns:
        (H, W) array: uint8 for 8-bit labels ("P", "L", "1"), int32 for 16/32-bit ones.

    Raises:
        ImageReadError: missing, empty, corrupt or truncated file, a colour (RGB)
            label that has no class indices, or a label over the size limit.
    """
    p = Path(path)
    check_max_pixels(max_pixels)
    limit = decode_limit(max_pixels)
    with _own_pixel_limits(limit is not None), _open(p) as img:
        width, height = img.size
        if limit is not None and width * height > limit:
            raise ImageReadError(
                p,
                f"label is {width} x {height} = {width * height:,} pixels, more than the {limit:,} read for a label "
                f"({DECODE_FACTOR} x max_pixels = {max_pixels:,}; labels are never resized); raise --max-pixels "
                f"to at least {-(-width * height // DECODE_FACTOR):,} or leave this image out",
            )
        _load(img, p)
        mode = img.mode
        if mode in ("P", "L"):
            return np.array(img, dtype=np.uint8)
        if mode == "1":
            return np.array(img, dtype=np.uint8)  # bool -> 0/1
        if mode.startswith("I;16") or mode == "I":
            return np.array(img).astype(np.int32)
    raise ImageReadError(
        p,
        f"label has mode {mode!r}, which holds colours, not class indices; save labels as "
        "single-channel index PNGs (mode 'L', 'P' or 16-bit) with one class id per pixel",
    )


def image_size(path: str | os.PathLike, apply_exif: bool = True) -> tuple[int, int] | None:
    """(H, W) of an image from its header only (fast), after EXIF orientation; the file's
    own size, whatever its pixel count (nothing is decoded).

    Returns None when the header cannot be read (the file will fail later in read_image).
    """
    try:
        with _own_pixel_limits(), Image.open(path) as img:
            w, h = img.size
            # A PNG's eXIf chunk after the pixel data is only seen after a full decode; skip
            # it here (header-only), read_image still applies it.
            late_png_exif = img.format == "PNG" and "exif" not in img.info
            if apply_exif and not late_png_exif:
                orientation = img.getexif().get(EXIF_ORIENTATION, 1)
                if orientation in (5, 6, 7, 8):  # transposes / 90-degree rotations
                    w, h = h, w
    except _DECODE_ERRORS:
        return None
    return h, w
