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
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "read_image",
    "read_label",
    "iter_images",
    "image_size",
]

# Extensions listed by iter_images (lower case, compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm",
)

# Exceptions Pillow raises for unreadable data (SyntaxError for some broken headers,
# struct.error / ValueError / IndexError for inconsistent chunks, EOFError for short files).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, Image.DecompressionBombError)


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


def _open_fully(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` and decode every pixel; raise ImageReadError on any failure."""
    p = Path(path)
    if not p.exists():
        raise ImageReadError(p, "file does not exist; check the data root and the split list")
    if not p.is_file():
        raise ImageReadError(p, "is not a regular file")
    if p.stat().st_size == 0:
        raise ImageReadError(p, "file is empty (0 bytes); re-download or remove it")
    try:
        img = Image.open(p)
        img.load()  # full decode: truncation and corrupt chunks raise here
    except _DECODE_ERRORS as e:
        reason = str(e) or type(e).__name__
        if "truncated" in reason.lower():
            reason = f"file is truncated ({reason}); re-download it"
        else:
            reason = f"cannot decode image ({type(e).__name__}: {reason})"
        raise ImageReadError(p, reason) from e
    return img


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


def read_image(path: str | os.PathLike, apply_exif: bool = True) -> np.ndarray:
    """Read an image file as RGB.

    Args:
        path: image file (any format Pillow decodes).
        apply_exif: rotate/flip by the EXIF orientation tag (default, as OpenCV/mmseg).

    Returns:
        (H, W, 3) uint8 RGB array (H, W after the EXIF orientation).

    Raises:
        ImageReadError: missing, empty, corrupt or truncated file, or an unsupported mode.
    """
    p = Path(path)
    with _open_fully(p) as img:  # closes the file (multi-frame files keep it open otherwise)
        try:
            if apply_exif:
                img = ImageOps.exif_transpose(img)  # first frame of a GIF / multi-page TIFF
            return _to_rgb_array(img, p)
        except ImageReadError:
            raise
        except _DECODE_ERRORS as e:
            raise ImageReadError(p, f"cannot convert image ({type(e).__name__}: {e})") from e


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a label map of raw class indices.

    Palette PNGs (VOC) give their palette indices, 8-bit grey PNGs their values,
    16-bit PNGs their 16-bit values. No EXIF rotation, no colour conversion.

    Args:
        path: label file, normally a PNG.

    Returns:
        (H, W) array: uint8 for 8-bit labels ("P", "L", "1"), int32 for 16/32-bit ones.

    Raises:
        ImageReadError: missing, empty, corrupt or truncated file, or a colour (RGB)
            label that has no class indices.
    """
    p = Path(path)
    with _open_fully(p) as img:
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
    """(H, W) of an image from its header only (fast), after EXIF orientation.

    Returns None when the header cannot be read (the file will fail later in read_image).
    """
    try:
        with Image.open(path) as img:
            w, h = img.size
            # A PNG's eXIf chunk after the pixel data is only seen after a full decode; skip
            # it here (header-only), read_image still applies it.
            late_png_exif = img.format == "PNG" and "exif" not in img.info
            if apply_exif and not late_png_exif:
                orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation tag
                if orientation in (5, 6, 7, 8):  # transposes / 90-degree rotations
                    w, h = h, w
    except _DECODE_ERRORS:
        return None
    return h, w


def iter_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """List the image files in a folder, sorted by relative path.

    Files are recognised by extension (IMAGE_EXTENSIONS, case-insensitive); hidden files
    and folders (name starting with ".", e.g. macOS "._x.jpg" forks) are skipped.

    Args:
        folder: folder to list.
        recursive: descend into sub-folders.

    Returns:
        Sorted list of paths (a list, not a generator, so it can be sorted and re-used).

    Raises:
        NotADirectoryError: the folder does not exist or is not a directory.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: image folder does not exist or is not a directory")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if not recursive:
            dirnames[:] = []
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda q: q.relative_to(root).as_posix())
