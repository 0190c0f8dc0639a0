"""COCO-Stuff id tables and the stuffthingmaps -> train-id converter.

Raw COCO-Stuff 164k labels ("stuffthingmaps_trainval2017", one PNG per image) hold
ids 0..181 (= COCO category id - 1; 0..90 things, 91..181 stuff) and 255 = unlabeled.
Eleven thing ids are never used (COCO's missing categories), which leaves 171 classes.

Protocols written by the converter (``python -m reclip.data.cocostuff SRC DST``):

- ``171``: mmseg's COCO-Stuff-171 train ids 0..170 (used ids in increasing order),
  255 ignore -> ``<stem>_labelTrainIds.png`` (mmseg tools/dataset_converters/coco_stuff164k.py).
- ``27``: the 12 thing + 15 stuff super-categories of PiCIE / STEGO (``fine_to_coarse``),
  255 ignore -> ``<stem>_27labelTrainIds.png`` (the file name ReCLIP's loader reads).
- ``object``: COCO-Object (GroupViT / TCL / SCLIP ``cvt_coco_object.py``): 0 = background
  (every stuff class AND unlabeled pixels), 1..80 = things -> ``<stem>_instanceTrainIds.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from reclip.data.io import read_label
from reclip.files import atomic_write

__all__ = [
    "COCOSTUFF_UNUSED_RAW_IDS",
    "COCOSTUFF171_RAW_IDS",
    "COCOSTUFF27_FINE_TO_COARSE",
    "COCOSTUFF27_THING_IDS",
    "COCOSTUFF27_STUFF_IDS",
    "TRAIN_ID_SUFFIX",
    "LABEL_MAPS",
    "label_lut",
    "convert_stuffthingmaps",
    "main",
]

NUM_RAW_IDS = 182  # 0..181
IGNORE = 255
NUM_THING_RAW_IDS = 91  # raw ids 0..90 are things (80 used), 91..181 stuff

# COCO category ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91 do not exist; minus 1.
COCOSTUFF_UNUSED_RAW_IDS: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)

# COCO-Stuff-171: train id = position of the raw id in this tuple (mmseg convention).
COCOSTUFF171_RAW_IDS: tuple[int, ...] = tuple(i for i in range(NUM_RAW_IDS) if i not in COCOSTUFF_UNUSED_RAW_IDS)

# COCO-Stuff-27: raw id -> super-category (PiCIE / STEGO ``fine_to_coarse``; 0..11 things:
# electronic, appliance, food, furniture, indoor, kitchen, accessory, animal, outdoor,
# person, sports, vehicle; 12..26 stuff: ceiling, floor, food, furniture, raw material,
# textile, wall, window, building, ground, plant, sky, solid, structural, water).
COCOSTUFF27_FINE_TO_COARSE: tuple[int, ...] = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7,  # raw ids 0-19
    7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10,  # raw ids 20-39
    10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2,  # raw ids 40-59
    2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1,  # raw ids 60-79
    1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25, 16,  # raw ids 80-99
    13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26,  # raw ids 100-119
    14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21,  # raw ids 120-139
    17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24,  # raw ids 140-159
    15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19,  # raw ids 160-179
    19, 24,  # raw ids 180-181
)
COCOSTUFF27_THING_IDS: tuple[int, ...] = tuple(range(12))
COCOSTUFF27_STUFF_IDS: tuple[int, ...] = tuple(range(12, 27))

# Output file suffix per protocol.
TRAIN_ID_SUFFIX: dict[str, str] = {
    "171": "_labelTrainIds.png",  # mmseg
    "27": "_27labelTrainIds.png",  # dogehhh/ReCLIP utils/preprocess.py
    "object": "_instanceTrainIds.png",  # SCLIP / ClearCLIP datasets/cvt_coco_object.py
}


def _lut_171() -> np.ndarray:
    lut = np.full(256, IGNORE, dtype=np.int64)
    for train_id, raw in enumerate(COCOSTUFF171_RAW_IDS):
        lut[raw] = train_id
    return lut


def _lut_27() -> np.ndarray:
    lut = np.full(256, IGNORE, dtype=np.int64)
    lut[:NUM_RAW_IDS] = COCOSTUFF27_FINE_TO_COARSE
    return lut


def _lut_object() -> np.ndarray:
    # Everything that is not a used thing id, unlabeled 255 included, is background 0
    # (cvt_coco_object.py maps 255 -> 0 as well).
    lut = np.zeros(256, dtype=np.int64)
    things = [i for i in COCOSTUFF171_RAW_IDS if i < NUM_THING_RAW_IDS]
    assert len(things) == 80
    for k, raw in enumerate(things):
        lut[raw] = k + 1
    return lut


# Named raw-id -> train-id tables that protocol YAML files may reference by name
# (``label_map: cocostuff27``). Each value builds a (256,) int64 look-up table.
LABEL_MAPS = {
    "cocostuff171": _lut_171,
    "cocostuff27": _lut_27,
    "cocoobject": _lut_object,
}

_PROTOCOL_TO_MAP = {"171": "cocostuff171", "27": "cocostuff27", "object": "cocoobject"}


def label_lut(name: str) -> np.ndarray:
    """The (256,) int64 look-up table raw id -> train id for a named label map.

    Args:
        name: a key of LABEL_MAPS ("cocostuff171", "cocostuff27", "cocoobject").

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    if name not in LABEL_MAPS:
        raise KeyError(f"unknown label map {name!r}; available: {sorted(LABEL_MAPS)}")
    return LABEL_MAPS[name]()


def _raw_label_files(src: Path) -> list[Path]:
    files = [
        p for p in src.rglob("*.png")
        if not p.name.endswith("TrainIds.png") and not any(part.startswith(".") for part in p.relative_to(src).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(src).as_posix())


def convert_stuffthingmaps(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    protocol: str = "171",
    overwrite: bool = False,
    progress: bool = True,
) -> int:
    """Convert raw COCO-Stuff stuffthingmaps PNGs to train-id PNGs.

    Walks ``src_dir`` recursively (so ``annotations/`` with ``train2017/`` and
    ``val2017/`` converts both), skips files already named ``*TrainIds.png``, and writes
    ``dst_dir/<same sub-folder>/<stem><suffix>`` (suffix: TRAIN_ID_SUFFIX[protocol]).
    ``dst_dir`` may equal ``src_dir`` (mmseg keeps both next to each other).

    Args:
        src_dir: folder of raw label PNGs (values 0..181 and 255).
        dst_dir: output folder.
        protocol: "171", "27" or "object".
        overwrite: rewrite outputs that already exist (default: skip them, so an
            interrupted run resumes).
        progress: show a tqdm bar.

    Returns:
        Number of files written.

    Raises:
        ValueError: unknown protocol, no raw PNG found, or a file holding values that are
            not raw COCO-Stuff ids (e.g. an already converted file).
    """
    protocol = str(protocol)
    if protocol not in TRAIN_ID_SUFFIX:
        raise ValueError(f"convert_stuffthingmaps: protocol must be one of {sorted(TRAIN_ID_SUFFIX)}, got {protocol!r}")
    src, dst = Path(src_dir), Path(dst_dir)
    if not src.is_dir():
        raise ValueError(f"convert_stuffthingmaps: source folder {src} does not exist; "
                         "pass the unzipped stuffthingmaps_trainval2017 folder")
    files = _raw_label_files(src)
    if not files:
        raise ValueError(f"convert_stuffthingmaps: no raw label PNG under {src}")
    lut = label_lut(_PROTOCOL_TO_MAP[protocol]).astype(np.uint8)
    valid = np.zeros(256, dtype=bool)
    valid[:NUM_RAW_IDS] = True
    valid[IGNORE] = True
    suffix = TRAIN_ID_SUFFIX[protocol]

    iterator = files
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc=f"COCO-Stuff -> {protocol}", unit="img")
    written = 0
    for f in iterator:
        out = dst / f.relative_to(src).parent / (f.stem + suffix)
        if out.exists() and not overwrite:
            continue
        raw = read_label(f)
        if raw.dtype != np.uint8 or not valid[raw].all():
            bad = np.setdiff1d(np.unique(raw), np.flatnonzero(valid))[:10]
            raise ValueError(
                f"{f}: values {bad.tolist()} are not raw COCO-Stuff ids (0..181, 255); "
                "pass the original stuffthingmaps, not converted files"
            )
        # uint8 (H, W) -> 8-bit grey PNG; atomic: an interrupted run never leaves a half-written PNG
        atomic_write(out, lambda tmp: Image.fromarray(lut[raw]).save(tmp, format="PNG"))
        written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m reclip.data.cocostuff SRC DST [--protocol 171|27|object]``."""
    parser = argparse.ArgumentParser(
        prog="python -m reclip.data.cocostuff",
        description="Convert raw COCO-Stuff stuffthingmaps (ids 0..181, 255) to train-id PNGs.",
    )
    parser.add_argument("src", help="folder of raw stuffthingmaps PNGs (e.g. coco_stuff164k/annotations)")
    parser.add_argument("dst", help="output folder (may be the same as SRC)")
    parser.add_argument("--protocol", default="171", choices=sorted(TRAIN_ID_SUFFIX),
                        help="171: mmseg COCO-Stuff-171; 27: PiCIE/STEGO super-categories; object: COCO-Object")
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing outputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        n = convert_stuffthingmaps(args.src, args.dst, args.protocol, overwrite=args.overwrite,
                                   progress=not args.no_progress)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} file(s) with suffix {TRAIN_ID_SUFFIX[args.protocol]} under {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
