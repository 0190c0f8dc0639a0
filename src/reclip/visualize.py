"""Visual outputs: colour palettes, label PNGs, overlays and legends.

Label maps of up to 256 classes are palette-mode PNGs (pixel value = class index, shown
in the class colours); larger vocabularies (ADE-847, PASCAL Context-459) are 16-bit
grayscale PNGs, whose pixel values are still the class indices.

All writers are atomic (:func:`reclip.files.atomic_write`), so a
killed run never leaves a half-written image behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from reclip.files import atomic_write

__all__ = ["LEGEND_FILE", "palette", "save_label_png", "overlay", "legend_image", "save_legend", "save_segmentation",
           "segmentation_files"]

LEGEND_FILE = "legend.png"  # the legend's name in an output folder; no mask or overlay may take it
IGNORE_INDEX = 255  # mmseg / VOC "ignore" label value
PALETTE_SIZE = 256  # entries of a palette-mode ("P") PNG: indices 0..255
UINT16_MAX = 65535  # largest index of a 16-bit grayscale PNG


def palette(num_classes: int = 256) -> np.ndarray:
    """Colour per class index, (num_classes, 3) uint8.

    Indices 0..255 use the PASCAL VOC bit-interleaving palette (VOC devkit
    ``VOClabelcolormap``: bits of the index spread over R, G, B from the most
    significant bit down), so VOC masks look as usual and 255 is VOC's ignore colour
    (224, 224, 192). Indices >= 256 get fixed pseudo-random colours (seeded, so
    identical across runs).
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    index = np.arange(min(num_classes, 256))
    colours = np.zeros((index.size, 3), dtype=np.int64)
    for bit in range(8):  # 3 bits of the index per round, into bit (7 - round) of R, G, B
        for channel in range(3):
            colours[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    extra = np.random.default_rng(0x5EC11B).integers(0, 256, size=(max(num_classes - 256, 0), 3))
    return np.concatenate([colours, extra]).astype(np.uint8)


def _labels_array(labels) -> np.ndarray:
    """(H, W) integer label map as a numpy array (accepts torch tensors)."""
    array = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be an integer (H, W) map, got {array.dtype} {array.shape}")
    return array


def save_label_png(
    path: str | os.PathLike,
    labels,
    colours: np.ndarray | None = None,
    num_classes: int | None = None,
) -> Path:
    """Write an (H, W) label map as a PNG whose pixel values are the indices.

    Palette mode ("P", shown in the class colours) when the indices fit in 0..255;
    16-bit grayscale ("I;16", values 0..65535, no colours) when the vocabulary has more
    than 256 classes or, if ``num_classes`` is not given, when some label exceeds 255.
    Give ``num_classes`` so that every mask of a vocabulary gets the same format. In
    palette mode 255 is VOC's ignore colour; entries the palette lacks are filled from
    the VOC palette. Reading back with ``np.asarray(Image.open(path))`` returns the same
    indices (uint8 or uint16).

    Args:
        path: output .png path.
        labels: (H, W) integer array or tensor, values >= 0.
        colours: (N, 3) uint8 palette for palette mode; default :func:`palette` (256).
        num_classes: size of the vocabulary the labels index; more than 256 selects 16-bit.
    """
    array = _labels_array(labels)
    if array.size and (array.min() < 0 or array.max() > UINT16_MAX):
        raise ValueError(
            f"labels span {array.min()}..{array.max()} but a label PNG holds 0..{UINT16_MAX}; "
            "save such maps as .npy instead"
        )
    sixteen_bit = (num_classes is not None and num_classes > PALETTE_SIZE) or bool(
        array.size and array.max() >= PALETTE_SIZE)
    if sixteen_bit:
        image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint16))  # mode "I;16"
    else:
        full = palette(PALETTE_SIZE)
        if colours is not None:
            colours = np.asarray(colours, dtype=np.uint8)[:PALETTE_SIZE]
            full[: len(colours)] = colours
        image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="P")
        image.putpalette(full.reshape(-1).tolist())
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def _colourise(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8 colours; labels beyond the palette raise."""
    if labels.size and (labels.min() < 0 or labels.max() >= len(colours)):
        raise ValueError(f"labels span {labels.min()}..{labels.max()} but the palette has "
                         f"{len(colours)} colours; pass palette(num_classes) with enough entries")
    return np.asarray(colours, dtype=np.uint8)[labels]


def overlay(
    image: np.ndarray,
    labels,
    colours: np.ndarray | None = None,
    alpha: float = 0.5,
    ignore_index: int | None = IGNORE_INDEX,
) -> np.ndarray:
    """Blend class colours over an image: (1 - alpha) * image + alpha * colour.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) integer labels; ``ignore_index`` pixels keep the image unchanged.
        colours: (N, 3) uint8 palette; default :func:`palette` (256).
        alpha: colour weight in [0, 1].
    Returns:
        (H, W, 3) uint8.
    """
    image = np.asarray(image)
    array = _labels_array(labels)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if image.shape[:2] != array.shape:
        raise ValueError(f"labels {array.shape} and image {image.shape[:2]} differ in size; "
                         "resize the labels to the image (nearest) first")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = palette(256) if colours is None else np.asarray(colours, dtype=np.uint8)
    ignored = array == ignore_index if ignore_index is not None else np.zeros(array.shape, bool)
    colour = _colourise(np.where(ignored, 0, array), colours).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colour
    blended[ignored] = image[ignored]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def legend_image(
    class_names: Sequence[str],
    colours: np.ndarray | None = None,
    present: Sequence[int] | None = None,
    rows_per_column: int = 30,
) -> np.ndarray:
    """Legend of colour swatches and class names, (H, W, 3) uint8 (PIL ImageDraw).

    Args:
        class_names: name per class index.
        colours: (N, 3) uint8 palette; default :func:`palette` (len(class_names)).
        present: class indices to list (e.g. ``np.unique(labels)``); default all.
            Indices outside the names (such as 255 = ignore) are skipped.
        rows_per_column: entries per column before wrapping.
    """
    colours = palette(max(len(class_names), 1)) if colours is None else np.asarray(colours, dtype=np.uint8)
    indices = range(len(class_names)) if present is None else sorted({int(i) for i in present})
    indices = [i for i in indices if 0 <= i < len(class_names)]
    if len(colours) < len(class_names):
        raise ValueError(f"palette has {len(colours)} colours for {len(class_names)} classes; "
                         "pass palette(len(class_names))")
    font = ImageFont.load_default()
    swatch, pad, line = 14, 6, 20
    text_width = max([int(font.getlength(f"{i} {class_names[i]}")) for i in indices] + [40])
    column_width = swatch + 2 * pad + text_width + pad
    n_cols = max(1, -(-len(indices) // rows_per_column))
    n_rows = max(1, min(len(indices), rows_per_column))
    canvas = Image.new("RGB", (n_cols * column_width + pad, n_rows * line + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    for k, i in enumerate(indices):
        x = pad + (k // rows_per_column) * column_width
        y = pad + (k % rows_per_column) * line
        draw.rectangle([x, y + 2, x + swatch, y + 2 + swatch], fill=tuple(int(c) for c in colours[i]),
                       outline=(0, 0, 0))
        draw.text((x + swatch + pad, y + 3), f"{i} {class_names[i]}", fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def save_legend(
    path: str | os.PathLike,
    class_names: Sequence[str],
    colours: np.ndarray | None = None,
) -> Path:
    """Write :func:`legend_image` of all classes to ``path`` (PNG, atomic, overwriting)."""
    image = Image.fromarray(legend_image(class_names, colours))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def segmentation_files(stem: str) -> dict[str, str]:
    """File names :func:`save_segmentation` writes for ``stem`` besides the legend:
    {"mask": "<stem>.png", "overlay": "<stem>_overlay.jpg"}. The one place these names
    are made, so that callers can keep outputs apart before writing any."""
    return {"mask": f"{stem}.png", "overlay": f"{stem}_overlay.jpg"}


def save_segmentation(
    out_dir: str | os.PathLike,
    stem: str,
    image: np.ndarray,
    labels,
    class_names: Sequence[str],
    colours: np.ndarray | None = None,
    alpha: float = 0.5,
    write_legend: bool = True,
) -> dict[str, Path | None]:
    """Write ``{stem}.png`` (label PNG), ``{stem}_overlay.jpg`` and ``legend.png`` into ``out_dir``
    (names from :func:`segmentation_files` and :data:`LEGEND_FILE`).

    The legend lists all classes of ``class_names`` and is (over)written on every call
    with ``write_legend`` (cheap), so a legend left in the folder by a run with other
    classes never survives: a caller that writes many masks into one folder passes
    ``write_legend=True`` for its first image (or calls :func:`save_legend` once) and
    False afterwards.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) integer map of class indices. With at most 255 classes, 255 is
            ignore (left uncoloured in the overlay); larger vocabularies have no ignore
            value and are written as 16-bit PNGs (see :func:`save_label_png`).
        class_names: name per class index (C).
        write_legend: write ``legend.png``.
    Returns:
        {"mask": path, "overlay": path, "legend": path, or None when not written}.

    Raises:
        ValueError: with ``write_legend``, a ``stem`` whose mask or overlay would be
            the legend's file (``stem="legend"``).
    """
    out_dir = Path(out_dir)
    names = segmentation_files(stem)
    if write_legend and LEGEND_FILE.casefold() in {n.casefold() for n in names.values()}:
        raise ValueError(f"stem {stem!r} would write its mask over {LEGEND_FILE}; pick another stem "
                         "or pass write_legend=False and write the legend elsewhere")
    num_classes = len(class_names)
    colours = (palette(max(num_classes, PALETTE_SIZE)) if colours is None
               else np.asarray(colours, dtype=np.uint8))
    ignore_index = IGNORE_INDEX if num_classes <= IGNORE_INDEX else None  # else 255 is a class
    paths: dict[str, Path | None] = {
        "mask": save_label_png(out_dir / names["mask"], labels, colours, num_classes=num_classes),
        "overlay": atomic_write(
            out_dir / names["overlay"],
            lambda tmp: Image.fromarray(overlay(image, labels, colours, alpha, ignore_index)).save(
                tmp, format="JPEG", quality=90),
        ),
        "legend": save_legend(out_dir / LEGEND_FILE, class_names, colours) if write_legend else None,
    }
    return paths
