"""Writers of small synthetic datasets in the real benchmark folder layouts.

Import from any test (tests/ is on sys.path)::

    from layouts import write_voc
    root = write_voc(tmp_path / "VOC2012")
    ds = SegmentationDataset("voc21", root)

Every writer takes the folder to create, fills it with random RGB images and random
label maps in the layout and file formats of the real dataset (VOC palette PNGs,
Context / ADE 8-bit PNGs, Cityscapes *_gtFine_labelTrainIds.png, COCO-Stuff raw
stuffthingmaps + converted train-id PNGs), and returns the data root to pass to
SegmentationDataset. Images of one split have slightly different sizes (variable-size
batches). Everything is deterministic for a given seed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "voc_palette",
    "write_voc",
    "write_context",
    "write_ade",
    "write_cityscapes",
    "write_cocostuff",
    "write_folder",
    "write_for_layout",
]

BASE_SIZE = (20, 28)  # (H, W) of the first image; image i is (H + i, W + 2 * i)


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triplets, flattened), as in VOCdevkit's labelcolormap."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _size(i: int) -> tuple[int, int]:
    return BASE_SIZE[0] + i, BASE_SIZE[1] + 2 * i


def _write_rgb(path: Path, rng: np.random.Generator, hw: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(path)


def _label(rng: np.random.Generator, hw: tuple[int, int], values: list[int], ignore: int | None = 255,
           ensure_all: bool = False) -> np.ndarray:
    lab = rng.choice(np.asarray(values, dtype=np.uint8), size=hw)
    if ensure_all:  # every value at least once (needs H * W >= len(values))
        flat = lab.reshape(-1)
        idx = rng.permutation(flat.size)[: len(values)]
        flat[idx] = values
    if ignore is not None:
        lab[0, :] = ignore  # a line of ignored pixels (like VOC object borders)
    return lab


def _write_label(path: Path, lab: np.ndarray, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(lab.astype(np.uint8))  # mode "L"
    if palette is not None:
        img = img.convert("P")
        img.putpalette(palette)
    img.save(path)


def _write_split_files(root: Path, folder: str, ids: dict[str, list[str]]) -> None:
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    for split, names in ids.items():
        (d / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))


def write_voc(root: str | Path, n_train: int = 2, n_val: int = 3, seed: int = 0) -> Path:
    """PASCAL VOC 2012 (the folder that mmseg calls VOCdevkit/VOC2012).

    Writes JPEGImages/<id>.jpg, SegmentationClass/<id>.png as PALETTE PNGs with the VOC
    colour map (values 0..20, row 0 = 255 "boundary"), and
    ImageSets/Segmentation/{train,val}.txt. Ids look like "2007_000000".
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    pal = voc_palette()
    ids = {"train": [f"2007_{i:06d}" for i in range(n_train)],
           "val": [f"2008_{i:06d}" for i in range(n_val)]}
    for names in ids.values():
        for i, n in enumerate(names):
            hw = _size(i)
            _write_rgb(root / "JPEGImages" / f"{n}.jpg", rng, hw)
            _write_label(root / "SegmentationClass" / f"{n}.png", _label(rng, hw, list(range(21))), pal)
    _write_split_files(root, "ImageSets/Segmentation", ids)
    return root


def write_context(root: str | Path, n_train: int = 2, n_val: int = 3, seed: int = 1) -> Path:
    """PASCAL Context on VOC2010 (mmseg layout; the folder VOCdevkit/VOC2010).

    Writes JPEGImages/<id>.jpg, SegmentationClassContext/<id>.png (8-bit, 0 = background,
    1..59, as mmseg's pascal_context.py converter writes) and
    ImageSets/SegmentationContext/{train,val}.txt.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    ids = {"train": [f"2008_{i:06d}" for i in range(n_train)],
           "val": [f"2010_{i:06d}" for i in range(n_val)]}
    for names in ids.values():
        for i, n in enumerate(names):
            hw = _size(i)
            _write_rgb(root / "JPEGImages" / f"{n}.jpg", rng, hw)
            _write_label(root / "SegmentationClassContext" / f"{n}.png", _label(rng, hw, list(range(60)), ignore=None))
    _write_split_files(root, "ImageSets/SegmentationContext", ids)
    return root


def write_ade(root: str | Path, n_train: int = 2, n_val: int = 3, seed: int = 2) -> Path:
    """ADE20K (the folder ADEChallengeData2016).

    Writes images/{training,validation}/ADE_{train,val}_<8 digits>.jpg and
    annotations/{training,validation}/<same>.png (8-bit, 0 = unlabeled, 1..150).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, tag, n in (("training", "train", n_train), ("validation", "val", n_val)):
        for i in range(n):
            name, hw = f"ADE_{tag}_{i + 1:08d}", _size(i)
            _write_rgb(root / "images" / split / f"{name}.jpg", rng, hw)
            _write_label(root / "annotations" / split / f"{name}.png", _label(rng, hw, list(range(151)), ignore=None))
    return root


def write_cityscapes(root: str | Path, n_train: int = 1, n_val: int = 2,
                     cities: tuple[str, ...] = ("frankfurt", "lindau"), seed: int = 3) -> Path:
    """Cityscapes (the cityscapes folder), n images per split in EACH city.

    Writes leftImg8bit/<split>/<city>/<city>_<6d>_<6d>_leftImg8bit.png and
    gtFine/<split>/<city>/<same>_gtFine_labelTrainIds.png (8-bit, 0..18, 255 ignore).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for city in cities:
            for i in range(n):
                stem, hw = f"{city}_{i:06d}_{19 + i:06d}", _size(i)
                _write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rng, hw)
                _write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png",
                             _label(rng, hw, list(range(19))))
    return root


def write_cocostuff(root: str | Path, n_train: int = 1, n_val: int = 3,
                    converted: tuple[str, ...] = ("171", "27", "object"), seed: int = 4) -> Path:
    """COCO-Stuff 164k (the folder coco_stuff164k, mmseg layout).

    Writes images/{train2017,val2017}/<12 digits>.jpg and the RAW stuffthingmaps
    annotations/{train2017,val2017}/<id>.png (ids 0..181 minus the 11 unused thing ids,
    255 unlabeled; the first image of each split contains every valid id), then runs
    reclip.data.cocostuff.convert_stuffthingmaps for each protocol in ``converted``
    (writing <id>_labelTrainIds.png, <id>_27labelTrainIds.png, <id>_instanceTrainIds.png).
    """
    from reclip.data.cocostuff import convert_stuffthingmaps

    root = Path(root)
    rng = np.random.default_rng(seed)
    unused = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}  # COCO's missing thing ids, minus 1
    valid = [i for i in range(182) if i not in unused] + [255]
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        for i in range(n):
            name, hw = f"{139 + 1000 * i:012d}", _size(i)
            _write_rgb(root / "images" / split / f"{name}.jpg", rng, hw)
            _write_label(root / "annotations" / split / f"{name}.png",
                         _label(rng, hw, valid, ignore=None, ensure_all=(i == 0)))
    for protocol in converted:
        convert_stuffthingmaps(root / "annotations", root / "annotations", protocol, progress=False)
    return root


def write_folder(root: str | Path, n: int = 3, num_classes: int = 3, with_labels: bool = True,
                 seed: int = 5) -> Path:
    """A user's folder: root/images/ (JPEG and PNG, one in a sub-folder), optional
    root/labels/ (8-bit train-id PNGs 0..C-1 with 255 ignore, same relative path and stem)
    and root/classes.txt with ``num_classes`` classes (the second with a synonym).

    Returns root; the data root for the `folder` protocol is ``root / "images"``, its
    overrides ``label_dir=str(root / "labels")`` and classes_file ``root / "classes.txt"``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n):
        rel = f"sub/img{i}" if i == n - 1 else f"img{i}"
        ext = ".png" if i % 2 else ".jpg"
        hw = _size(i)
        _write_rgb(root / "images" / f"{rel}{ext}", rng, hw)
        if with_labels:
            _write_label(root / "labels" / f"{rel}.png", _label(rng, hw, list(range(num_classes))))
    names = [f"thing{k}" if k != 1 else "thing1, other name" for k in range(num_classes)]
    (root / "classes.txt").write_text("# synthetic classes\n" + "\n".join(names) + "\n")
    return root


def write_for_layout(layout: str, root: str | Path) -> Path:
    """Write the synthetic dataset of a protocol layout (see the protocols' `layout`) and
    return its data root ("cocoobject" shares the COCO-Stuff writer; "folder" returns the
    root of write_folder, whose images are under root / "images")."""
    writers = {"voc": write_voc, "context": write_context, "ade": write_ade, "cityscapes": write_cityscapes,
               "cocostuff": write_cocostuff, "cocoobject": write_cocostuff, "folder": write_folder}
    if layout not in writers:
        raise KeyError(f"no synthetic writer for layout {layout!r}; known: {sorted(writers)}")
    return writers[layout](root)


@contextlib.contextmanager
def labels_unreadable(who: str) -> Iterator[None]:
    """Inside the block every ground-truth label read fails (AssertionError naming ``who``):
    what proves that an unsupervised stage opens no label."""
    import pytest

    import reclip.data.datasets as datasets_mod
    import reclip.data.io as io_mod

    def poisoned(*args, **kwargs):
        raise AssertionError(f"{who} read a ground-truth label")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(io_mod, "read_label", poisoned)
        patch.setattr(datasets_mod, "read_label", poisoned)
        yield
