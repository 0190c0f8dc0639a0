"""The segmentation dataset: a protocol (:mod:`reclip.data.protocol`) + a data root -> items.

``SegmentationDataset`` finds one split's images and labels where the protocol says,
checks the data root against it (missing paths, sizes, label values) and reads items
robustly; ``collate_items`` batches its variable-size items.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from reclip.data.io import MAX_PIXELS, ImageReadError, check_max_pixels, image_size, iter_images, load_image, read_label
from reclip.data.protocol import Protocol, SplitSpec, load_protocol
from reclip.files import read_text_file

__all__ = ["DatasetError", "SegmentationDataset", "collate_items"]

_MAX_LISTED = 20  # problems listed in one error message before "... and N more"


class DatasetError(ValueError):
    """A data root does not match its protocol (missing paths, size mismatches, bad labels)."""


def problem_list(problems: list[str]) -> str:
    """Problems as an indented list for an error message, the first few of many shown."""
    shown = problems[:_MAX_LISTED]
    extra = len(problems) - len(shown)
    return "\n  " + "\n  ".join(shown) + (f"\n  ... and {extra} more" if extra > 0 else "")


class SegmentationDataset(Dataset):
    """Images (and labels) of one split of a protocol, as dicts.

    Every item has the same keys::

        {"image_id": str,                 # id relative to the image folder, no suffix
         "path": str,                     # image file
         "image": (H, W, 3) uint8 | None, # RGB, EXIF orientation applied
         "label": (H, W) int64 | None,    # train ids, ignore_index for unlabeled pixels
         "instances": (H, W) | None,      # object ids where the protocol has instance masks
         "error": str | None}             # why the item could not be read

    An image of more than ``max_pixels`` pixels is read downscaled (aspect kept), so
    "image" is then smaller than "label": score predictions at the label's size
    (nearest). Labels are never resized; one of more than 4 x max_pixels pixels is an
    unreadable item (see :mod:`reclip.data.io`).

    Unreadable files (missing at read time, corrupt, truncated, label/image size
    mismatch, too large) do NOT raise: the item comes back with image = label = None and the reason
    in "error", so a run over thousands of images reports and skips the bad one. Problems
    that concern the whole data root (missing folders or files, size mismatches found by
    the construction check, label values outside the protocol's classes) raise
    DatasetError.

    Args:
        protocol: a Protocol or a protocol name / YAML path.
        data_root: the dataset's root folder (e.g. VOCdevkit/VOC2012; for the `folder`
            layout, the folder of images).
        split: a split of the protocol ("val", "train").
        classes_file: class list overriding the protocol's (required for `folder`).
        check_sizes: compare image and label sizes (headers only) at construction.
        max_pixels: pixel limit of images read (default :data:`reclip.data.io.MAX_PIXELS`;
            None: no limit).
    """

    def __init__(
        self,
        protocol: Protocol | str | os.PathLike,
        data_root: str | os.PathLike,
        split: str = "val",
        classes_file: str | os.PathLike | None = None,
        check_sizes: bool = True,
        max_pixels: int | None = MAX_PIXELS,
    ) -> None:
        self.max_pixels = check_max_pixels(max_pixels)
        if not isinstance(protocol, Protocol):
            protocol = load_protocol(protocol)
        if classes_file is not None:
            # Another class list on the same folder layout (e.g. a VOC-layout tree of other
            # classes): the protocol's class count no longer applies; label values are
            # still checked against the new list when read.
            protocol = protocol.with_overrides(classes_file=str(classes_file), num_classes=None)
        if split not in protocol.splits:
            raise DatasetError(f"protocol {protocol.name!r} has no split {split!r}; splits: {sorted(protocol.splits)}")
        self.protocol = protocol
        self.split = split
        self.root = Path(data_root).expanduser()
        self.vocabulary = protocol.vocabulary()
        self.classes = self.vocabulary.to_list()  # one list of synonyms per class
        self.class_names = list(self.vocabulary.names)
        self.num_classes = len(self.classes)
        spec = protocol.splits[split]
        self.has_labels = spec.label_dir is not None

        self._check_folders(spec)
        self.image_ids, self.image_paths = self._list_images(spec)
        self.label_paths: list[Path | None] = [None] * len(self.image_ids)
        missing = [str(p) for p in self.image_paths if not p.is_file()]
        if self.has_labels:
            self.label_paths = [self.root / spec.label_dir / f"{i}{spec.label_suffix}" for i in self.image_ids]
            missing += [str(p) for p in self.label_paths if not p.is_file()]
        if missing:
            raise DatasetError(
                f"{self._where()}: {len(missing)} listed file(s) do not exist:{problem_list(missing)}"
                + self._hint()
            )
        if check_sizes and self.has_labels:
            self._check_sizes()

    # -- construction helpers --------------------------------------------------------
    def _where(self) -> str:
        return f"dataset {self.protocol.name!r} split {self.split!r} at {self.root}"

    def _hint(self) -> str:
        return f"\nExpected layout: {self.protocol.prepare.strip()}" if self.protocol.prepare else ""

    def _check_folders(self, spec: SplitSpec) -> None:
        if not self.root.is_dir():
            raise DatasetError(f"{self._where()}: the data root does not exist or is not a folder{self._hint()}")
        expected = [self.root / spec.img_dir]
        if spec.label_dir is not None:
            expected.append(self.root / spec.label_dir)
        if spec.split_file is not None:
            expected.append(self.root / spec.split_file)
        missing = [str(p) for p in expected if not p.exists()]
        if missing:
            raise DatasetError(f"{self._where()}: missing path(s):{problem_list(missing)}{self._hint()}")

    def _list_images(self, spec: SplitSpec) -> tuple[list[str], list[Path]]:
        img_dir = self.root / spec.img_dir
        if spec.split_file is not None:
            split_file = self.root / spec.split_file
            # "\n" only: line numbers as an editor counts them
            lines = read_text_file(split_file, "split file").split("\n")
            ids, numbers = [], []
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    ids.append(line.strip())
                    numbers.append(number)
            if not ids:
                raise DatasetError(
                    f"{self._where()}: the split file {split_file} lists no image (it is empty or blank); "
                    f"write one image id per line (a file name in {img_dir} without {spec.img_suffix!r})"
                    + self._hint()
                )
            twice: dict[str, list[int]] = {}
            for i, number in zip(ids, numbers):
                twice.setdefault(i, []).append(number)
            twice = {i: n for i, n in twice.items() if len(n) > 1}
            if twice:
                listed = [f"{i} (lines {', '.join(map(str, n))})" for i, n in twice.items()]
                raise DatasetError(f"{self._where()}: the split file {split_file} lists image id(s) more than once; "
                                   f"keep one line each:{problem_list(listed)}")
            paths = [img_dir / f"{i}{spec.img_suffix}" for i in ids]
        else:
            label_dir = (self.root / spec.label_dir).resolve() if spec.label_dir else None
            files = iter_images(img_dir, suffix=spec.img_suffix)  # each real file once, links followed
            if label_dir is not None:  # folder layout: labels may sit inside the image folder
                files = [p for p in files if label_dir not in p.resolve().parents]
            ids, paths = [], []
            for p in files:
                rel = p.relative_to(img_dir).as_posix()
                ids.append(rel[: -len(spec.img_suffix)] if spec.img_suffix else rel.rsplit(".", 1)[0])
                paths.append(p)
        if not ids:
            what = f"*{spec.img_suffix}" if spec.img_suffix else "image"
            raise DatasetError(f"{self._where()}: no {what} files in {img_dir}{self._hint()}")
        seen: dict[str, int] = {}
        for i in ids:
            seen[i] = seen.get(i, 0) + 1
        dupes = sorted(i for i, n in seen.items() if n > 1)
        if dupes:
            raise DatasetError(f"{self._where()}: image id(s) listed twice (e.g. a.jpg and a.png):{problem_list(dupes)}")
        return ids, paths

    def _check_sizes(self) -> None:
        bad = []
        for img, lab in zip(self.image_paths, self.label_paths):
            hw_img, hw_lab = image_size(img), image_size(lab, apply_exif=False)
            if hw_img is not None and hw_lab is not None and hw_img != hw_lab:
                bad.append(f"{img} is (H, W) = {hw_img} but {lab} is {hw_lab}")
        if bad:
            raise DatasetError(
                f"{self._where()}: {len(bad)} label(s) differ in size from their image "
                f"(image sizes after EXIF orientation):{problem_list(bad)}\n"
                "Fix: use labels made for these images (or pass check_sizes=False to skip such items at read time)."
            )

    # -- items -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id, path = self.image_ids[index], self.image_paths[index]
        item: dict[str, Any] = {"image_id": image_id, "path": str(path), "image": None, "label": None,
                                "instances": None, "error": None}
        try:
            loaded = load_image(path, max_pixels=self.max_pixels)
            image = loaded.image
            label = None
            if self.label_paths[index] is not None:
                raw = read_label(self.label_paths[index], max_pixels=self.max_pixels)
                if raw.shape != loaded.size:  # the file's size: a downscaled image still matches
                    raise ImageReadError(self.label_paths[index],
                                         f"label (H, W) = {raw.shape} differs from image {path} {loaded.size}")
                label = self.protocol.convert_label(raw)
                self._check_values(label, raw, self.label_paths[index])
        except ImageReadError as e:
            item["error"] = str(e)
            return item
        item["image"], item["label"] = image, label
        item["instances"] = self._instances(index, loaded.size)
        return item

    def _instances(self, index: int, size: tuple[int, int]) -> np.ndarray | None:
        """Object ids (H, W) (0 = none, 255 = boundary) where the protocol has instance masks.

        Optional data: a missing or unreadable file gives None (callers fall back to
        connected components), never a skipped image.
        """
        spec = self.protocol.splits[self.split]
        if spec.instance_dir is None:
            return None
        path = self.root / spec.instance_dir / f"{self.image_ids[index]}.png"
        try:
            instances = read_label(path, max_pixels=self.max_pixels) if path.is_file() else None
        except ImageReadError:
            return None
        return instances if instances is not None and instances.shape == size else None

    def _check_values(self, label: np.ndarray, raw: np.ndarray, path: Path) -> None:
        ign = self.protocol.ignore_index
        bad = (label != ign) & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            raw_bad = np.unique(raw[bad])[:10].tolist()
            raise DatasetError(
                f"{path}: raw label value(s) {raw_bad} become train ids outside 0..{self.num_classes - 1} "
                f"(ignore {ign}) under protocol {self.protocol.name!r} (reduce_zero_label="
                f"{self.protocol.reduce_zero_label}, label_map={self.protocol.label_map!r}); "
                "check the protocol, its label_suffix and that the labels were converted to train ids"
            )


def collate_items(batch: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """DataLoader collate keeping variable-size items: dict of per-key lists, in batch order."""
    if not batch:
        return {}
    return {key: [item[key] for item in batch] for key in batch[0]}
