"""Listing the images of a folder tree: every real folder once, every real file once.

Folders are walked with symbolic links followed, but each real folder (device and inode)
is listed once: a link back up the tree (a loop) or a second link to a folder already
listed is not followed and is reported. Folders reached without a symbolic link are
walked before linked ones, so a folder is listed under its own path where it has one.

Two paths to one real file (a symbolic link or a hard link to an image also listed
elsewhere) are ONE image: it is listed once, under the path that goes through no
symbolic link where there is one (else the first in sorted order), and the other path
is reported as a duplicate. Broken symbolic links (and file links that loop) are
reported, not listed; so are folders that cannot be read.
"""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

__all__ = ["IMAGE_EXTENSIONS", "ImageScan", "file_identity", "iter_images", "link_problem", "scan_images"]

# Extensions listed by scan_images (lower case, compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm",
)

Identity = tuple[int, int]  # (st_dev, st_ino): one real file or folder, whatever its path


class ImageScan(NamedTuple):
    """What :func:`scan_images` found.

    Attributes:
        files: image files, each real file once, sorted by path relative to the folder.
        skipped: (path, reason) of what was left out: symbolic-link loops, folders and
            files already listed under another path, broken links, unreadable folders.
    """

    files: list[Path]
    skipped: list[tuple[str, str]]


def file_identity(path: str | os.PathLike) -> Identity | None:
    """(device, inode) of what ``path`` points to, or None when it cannot be reached."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def link_problem(path: Path) -> str:
    """Why the symbolic link ``path`` leads nowhere (a loop, or a missing target)."""
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"symbolic link loop (-> {target}); fix or remove the link"
    return f"broken symbolic link (-> {target}, which does not exist); fix or remove the link"


def _is_within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def scan_images(folder: str | os.PathLike, recursive: bool = True, *,
                exclude: Iterable[str | os.PathLike] = (), suffix: str | None = None) -> ImageScan:
    """List the image files under ``folder``, each real folder and file once.

    Files are recognised by extension (IMAGE_EXTENSIONS, case-insensitive), or by their
    name's ending when ``suffix`` is given; hidden files and folders (name starting with
    ".", e.g. macOS "._x.jpg" forks) are skipped.

    Args:
        folder: folder to list.
        recursive: descend into sub-folders (symbolic links to folders included).
        exclude: folders not to list (e.g. an output folder inside the input), compared
            as real folders, silently.
        suffix: keep the files whose name ends with this (a protocol's ``img_suffix``,
            e.g. "_leftImg8bit.png"; case-sensitive) instead of every image extension.

    Returns:
        ImageScan(files sorted by relative path, skipped (path, reason) pairs).

    Raises:
        NotADirectoryError: the folder does not exist or is not a directory.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: image folder does not exist or is not a directory")
    excluded = {i for i in map(file_identity, exclude) if i is not None}
    skipped: list[tuple[str, str]] = []
    walked: dict[Identity, Path] = {}
    candidates: list[tuple[Path, bool]] = []  # (file, reached without any symbolic link)
    plain: list[tuple[Path, bool]] = [(root, True)]  # folders still to walk, depth first
    linked: list[Path] = []  # symbolic links to folders, walked after every plain folder
    while plain or linked:
        folder_path, direct = plain.pop() if plain else (linked.pop(0), False)
        identity = file_identity(folder_path)
        if identity is None:
            skipped.append((str(folder_path), "cannot open folder; check its permissions"))
            continue
        if identity in excluded:
            continue
        if identity in walked:
            first = walked[identity]
            real, parent = os.path.realpath(folder_path), os.path.realpath(folder_path.parent)
            if _is_within(parent, real):
                reason = f"symbolic link loop: points back to {first}, not followed"
            else:
                reason = f"same folder as {first}, already listed; not followed"
            skipped.append((str(folder_path), reason))
            continue
        walked[identity] = folder_path
        try:
            with os.scandir(folder_path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skipped.append((str(folder_path), f"cannot list folder ({e.strerror or e}); check its permissions"))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows links; False for broken links and loops
            except OSError:
                is_dir = False
            if is_dir:
                if recursive:
                    if entry.is_symlink():
                        linked.append(Path(entry.path))
                    else:
                        subfolders.append((Path(entry.path), direct))
            elif (entry.name.endswith(suffix) if suffix is not None
                  else os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS):
                candidates.append((Path(entry.path), direct and not entry.is_symlink()))
        plain.extend(reversed(subfolders))

    def rank(candidate: tuple[Path, bool]) -> tuple[bool, str]:
        path, direct = candidate
        return not direct, path.relative_to(root).as_posix()

    kept: dict[Identity, Path] = {}
    for path, _ in sorted(candidates, key=rank):
        identity = file_identity(path)
        if identity is None:
            skipped.append((str(path), link_problem(path) if path.is_symlink() else "cannot be opened"))
        elif identity in kept:
            skipped.append((str(path), f"same file as {kept[identity]}, listed once"))
        else:
            kept[identity] = path
    files = sorted(kept.values(), key=lambda q: q.relative_to(root).as_posix())
    return ImageScan(files, sorted(skipped))


def iter_images(folder: str | os.PathLike, recursive: bool = True, *, suffix: str | None = None) -> list[Path]:
    """The image files of :func:`scan_images`, sorted by relative path.

    What was left out (loops, duplicates, broken links, unreadable folders) is named in
    one UserWarning; call :func:`scan_images` to get it as data.

    Returns:
        Sorted list of paths (a list, not a generator, so it can be sorted and re-used).

    Raises:
        NotADirectoryError: the folder does not exist or is not a directory.
    """
    scan = scan_images(folder, recursive, suffix=suffix)
    if scan.skipped:
        listed = "; ".join(f"{path}: {reason}" for path, reason in scan.skipped[:10])
        more = f"; ... and {len(scan.skipped) - 10} more" if len(scan.skipped) > 10 else ""
        warnings.warn(f"{folder}: left out {len(scan.skipped)} path(s): {listed}{more}", stacklevel=2)
    return scan.files
