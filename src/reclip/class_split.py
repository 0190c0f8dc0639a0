"""Seen / unseen class splits of the zero-shot segmentation protocol.

    split = class_split(vocabulary, unseen="cocostuff171_unseen.txt")
    split.seen, split.unseen          # class indices (a partition of 0..C-1)

The zero-shot literature (ZS3Net, SPNet, ZegFormer, MAFT) trains on the SEEN classes
only (pixels of unseen classes carry no label) and reports mIoU on the seen classes, on
the unseen ones and their harmonic mean hIoU (:func:`reclip.metrics.seen_unseen_miou`).

A split file lists class names, one per line (``#`` starts a comment, blank lines are
skipped); a name matches a class by its display name, any of its synonyms or its whole
class-file line, compared as CLIP reads names (case and runs of whitespace ignored).
One file is enough: the classes it does not list are the other group. A file is looked
up as given, then in the package's ``configs/classes/`` (``cocostuff171_unseen.txt``:
the 15 unseen classes of COCO-Stuff 171).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from reclip.files import read_text_file
from reclip.text import Vocabulary

__all__ = ["ClassSplit", "class_split", "read_class_names", "resolve_class_file"]

Names = str | os.PathLike | Sequence[str]


def resolve_class_file(path: str | os.PathLike) -> Path:
    """A class or split file: as given (absolute or from the cwd), else in ``configs/classes/``."""
    from reclip.data.protocol import _package_dir

    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [given, _package_dir("classes") / given]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"class split file {str(path)!r} not found; looked in: "
                            + ", ".join(str(c) for c in candidates))


def read_class_names(path: str | os.PathLike) -> list[str]:
    """The names of a split file (one per line, ``#`` comments, blank lines skipped)."""
    resolved = resolve_class_file(path)
    lines = read_text_file(resolved, "class split file").split("\n")
    names = [" ".join(line.split("#", 1)[0].split()) for line in lines]  # comments dropped, spaces collapsed
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"class split file {str(resolved)!r} lists no class; write one class name per line")
    return names


def _key(name: str) -> str:
    return " ".join(name.split()).lower()


@dataclass(frozen=True)
class ClassSplit:
    """A partition of a vocabulary's C classes into seen and unseen (indices, ascending)."""

    seen: tuple[int, ...]
    unseen: tuple[int, ...]
    names: tuple[str, ...]  # the vocabulary's display names, (C,)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def unseen_mask(self) -> np.ndarray:
        """(C,) bool, True for unseen classes."""
        mask = np.zeros(self.num_classes, dtype=bool)
        mask[list(self.unseen)] = True
        return mask

    @property
    def seen_names(self) -> list[str]:
        return [self.names[i] for i in self.seen]

    @property
    def unseen_names(self) -> list[str]:
        return [self.names[i] for i in self.unseen]

    def to_dict(self) -> dict[str, list[str]]:
        return {"seen": self.seen_names, "unseen": self.unseen_names}


def _indices(vocabulary: Vocabulary, names: Names, what: str) -> set[int]:
    if isinstance(names, (str, os.PathLike)):
        where, listed = f"{what} file {str(names)!r}", read_class_names(names)
    else:
        where, listed = f"{what} list", [" ".join(str(n).split()) for n in names]
    lookup: dict[str, int] = {}
    for index, (syns, line) in enumerate(zip(vocabulary.classes, vocabulary.to_lines())):
        for name in (vocabulary.names[index], line, *syns):
            lookup.setdefault(_key(name), index)
    unknown = [n for n in listed if _key(n) not in lookup]
    if unknown:
        raise ValueError(
            f"{where}: {len(unknown)} name(s) are not classes of this vocabulary: {unknown[:10]}; the "
            f"{vocabulary.num_classes} classes are {list(vocabulary.names)[:12]}"
            + (" ..." if vocabulary.num_classes > 12 else "")
            + " (use the dataset's class names, one per line)"
        )
    return {lookup[_key(n)] for n in listed}


def class_split(vocabulary: Vocabulary, *, seen: Names | None = None, unseen: Names | None = None) -> ClassSplit:
    """Split ``vocabulary`` by a list of seen OR unseen classes (a file path or names).

    Raises ValueError for an unknown name, for both or neither list given, and for a
    split that leaves either group empty.
    """
    if (seen is None) == (unseen is None):
        raise ValueError("give the seen classes or the unseen classes (one list; the other group is the rest)")
    everything = set(range(vocabulary.num_classes))
    if seen is not None:
        seen_idx = _indices(vocabulary, seen, "seen classes")
        unseen_idx = everything - seen_idx
    else:
        unseen_idx = _indices(vocabulary, unseen, "unseen classes")
        seen_idx = everything - unseen_idx
    if not seen_idx or not unseen_idx:
        empty = "seen" if not seen_idx else "unseen"
        raise ValueError(f"this class split leaves no {empty} class among the {vocabulary.num_classes}; a zero-shot "
                         "split needs both groups")
    return ClassSplit(tuple(sorted(seen_idx)), tuple(sorted(unseen_idx)), tuple(vocabulary.names))
