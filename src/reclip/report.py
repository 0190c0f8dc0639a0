"""Plots (matplotlib, PNG) and a self-contained HTML report.

- :func:`plot_confusion`: the row-normalised confusion matrix (paper Fig. 1b);
- :func:`plot_space_curves`: mIoU against object distance from the centre, one line per
  method (paper Fig. 1a);
- :func:`write_html_report`: a table, the bias scores, plots and example masks in one
  page (images inlined, so the file can be mailed or opened anywhere).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from reclip.files import atomic_write, atomic_write_text  # noqa: E402


def _save(fig: Any, path: str | os.PathLike) -> Path:
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: str | os.PathLike,
                   title: str = "") -> Path:
    """Row-normalised confusion matrix (rows = ground truth) as a heat map with values."""
    m = np.asarray(confusion, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.nan_to_num(m / m.sum(axis=1, keepdims=True))
    C = len(class_names)
    size = max(4.0, 0.45 * C + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(C), class_names, rotation=60, ha="right")
    ax.set_yticks(range(C), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if C <= 25:
        for i in range(C):
            for j in range(C):
                if norm[i, j] >= 0.01:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion (row-normalised)")
    return _save(fig, path)


def plot_space_curves(curves: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """mIoU per distance bin for each method; ``curves`` maps a label to SpacePreference.compute()."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, curve in curves.items():
        centres, miou = np.asarray(curve["centres"]), np.asarray(curve["miou"])
        kept = ~np.isnan(miou)
        ax.plot(centres[kept], 100 * miou[kept], marker="o", label=f"{label} (slope {curve['score']:+.2f})")
    ax.set_xlabel("distance of object centroid from image centre (fraction of half-diagonal)")
    ax.set_ylabel("mIoU (%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 100)
    if not any((~np.isnan(np.asarray(c["miou"]))).any() for c in curves.values()):
        ax.text(0.5, 50, "too few objects per distance bin", ha="center", color="grey")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "space preference")
    return _save(fig, path)


def _img_tag(path: str | os.PathLike, width: int | None = None) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    kind = "jpeg" if str(path).lower().endswith((".jpg", ".jpeg")) else "png"
    size = f' width="{width}"' if width else ""
    return f'<img src="data:image/{kind};base64,{data}"{size}>'


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG file bytes (for inlining arrays)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_html_report(
    path: str | os.PathLike,
    title: str,
    table: Sequence[Mapping[str, Any]],
    notes: Sequence[str] = (),
    figures: Sequence[tuple[str, str | os.PathLike]] = (),
    examples: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]] = (),
) -> Path:
    """One HTML file: a title, notes, a table (rows of equal keys), figures, example rows.

    Args:
        table: rows such as {"method": "maskclip", "mIoU": 31.2, ...}; floats shown with 2 decimals.
        figures: (caption, PNG path) pairs.
        examples: (row caption, [(column caption, (H, W, 3) uint8 image), ...]) rows.
    """
    esc = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th{background:#f3f3f3}td:first-child{text-align:left}figure{display:inline-block;margin:8px}"
             ".ex img{image-rendering:pixelated;margin:2px}</style>",
             f"<h1>{esc(title)}</h1>"]
    parts += [f"<p>{esc(n)}</p>" for n in notes]
    if table:
        keys = list(table[0])
        parts.append("<table><tr>" + "".join(f"<th>{esc(str(k))}</th>" for k in keys) + "</tr>")
        for row in table:
            cells = (f"{v:.2f}" if isinstance(v, float) else str(v) for v in (row.get(k, "") for k in keys))
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    for caption, figure in figures:
        parts.append(f"<figure>{_img_tag(figure)}<figcaption>{esc(caption)}</figcaption></figure>")
    if examples:
        parts.append("<h2>Examples</h2><table class='ex'>")
        header = [c for c, _ in examples[0][1]]
        parts.append("<tr><th></th>" + "".join(f"<th>{esc(c)}</th>" for c in header) + "</tr>")
        for caption, images in examples:
            cells = "".join(
                f'<td><img src="data:image/png;base64,{base64.b64encode(png_bytes(img)).decode()}" '
                f'width="{2 * img.shape[1]}"></td>' for _, img in images)
            parts.append(f"<tr><td>{esc(caption)}</td>{cells}</tr>")
        parts.append("</table>")
    return atomic_write_text(path, "\n".join(parts))
