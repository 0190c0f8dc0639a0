"""Mask proposals for MAFT: where they come from, per image.

A proposal source is any callable ``source(image, image_id) -> masks``: image (H, W, 3)
uint8 RGB, image_id its dataset id (the path relative to the split's image folder,
without suffix; for ``reclip segment``, the path relative to the input folder without
suffix) -> float32 tensor (N, H, W) in [0, 1], N >= 1, at the image's size. Three ship:

- :class:`ProposalFiles`: proposals made elsewhere (FreeSeg, Mask2Former, SAM, ...),
  one file per image in a folder;
- :class:`PredictionProposals`: class-agnostic regions of another method's prediction
  (:func:`regions_from_labels`: the whole image, then the connected regions of each
  predicted class), e.g. of NACLIP or a ReCLIP++ run;
- :class:`GridProposals`: the whole image and a regular grid (no knowledge of the image;
  the fallback of a segmentor given no source, and a baseline).

Proposal file format (``ProposalFiles``): for image ``<image_id>``, the folder holds
``<image_id>.npz`` OR ``<image_id>.png`` (the same sub-folders as the image ids; both
at once is an error):

- ``.npz``: a NumPy archive (``np.savez_compressed(path, masks=masks)``) with the array
  ``masks`` of shape (N, H, W), N >= 1: bool, or uint8 with values 0/1, or float in
  [0, 1] (soft masks, e.g. sigmoid of a proposal generator's mask logits). Proposals
  may overlap.
- ``.png``: a single-channel PNG of proposal ids, 8- or 16-bit grayscale (or palette
  indices), shape (H, W): 0 = no proposal, every other value one binary proposal,
  ordered by value (e.g. a panoptic-style or SAM "automatic" segment map). Proposals
  cannot overlap in this format; use .npz for overlapping or soft ones.

(H, W) should be the image's size; a file of another size is resized (bilinear for
.npz, nearest for .png ids) with a warning naming the file. A missing file, another
ndim, values outside [0, 1], NaN, or no proposal at all is a :class:`ProposalError`
naming the file.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import Tensor

__all__ = ["GridProposals", "PredictionProposals", "ProposalError", "ProposalFiles", "ProposalSource",
           "check_masks", "describe_source", "grid_proposals", "read_proposal_file", "regions_from_labels",
           "write_proposal_files"]

PROPOSAL_SUFFIXES = (".npz", ".png")
NPZ_KEY = "masks"


class ProposalError(ValueError):
    """Proposals that cannot be used: a missing or malformed file, or masks of the wrong kind."""


class ProposalSource(Protocol):
    """``source(image (H, W, 3) uint8, image_id) -> masks (N, H, W) float32 in [0, 1]``."""

    def __call__(self, image: np.ndarray, image_id: str) -> Tensor: ...


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def describe_source(source: Any) -> str:
    """A description of a proposal source that is the same in every process (what a run records).

    A description (folder, ``from:...``, ``grid``) as given; a source with a ``name``
    (:class:`PredictionProposals`: its description); a source whose class has its own
    ``__repr__`` without a memory address (:class:`ProposalFiles`, :class:`GridProposals`):
    that repr; any other callable (a function, a lambda, a method, an object printed with
    its address): ``module.qualname`` of the function, else of its class. Two functions of
    the same name in one module read the same: the description names the code, not its state.
    """
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    name = getattr(source, "name", None)
    if isinstance(name, str):
        return name
    if type(source).__repr__ is not object.__repr__ and not hasattr(source, "__qualname__"):
        text = repr(source)
        if not _ADDRESS.search(text):
            return text
    named = source if hasattr(source, "__qualname__") else type(source)
    return f"{getattr(named, '__module__', None) or '?'}.{named.__qualname__}"


def check_masks(masks: Any, where: str) -> Tensor:
    """Proposals as float32 (N, H, W) in [0, 1], or a ProposalError naming ``where``.

    Accepts bool, integer arrays of 0/1 and float arrays in [0, 1] (NumPy or torch).
    """
    array = masks.detach().cpu().numpy() if isinstance(masks, Tensor) else np.asarray(masks)
    if array.ndim != 3:
        raise ProposalError(f"{where}: masks of shape {array.shape}; expected (N, H, W), one mask per proposal")
    if array.shape[0] == 0:
        raise ProposalError(f"{where}: no proposal (N = 0); give at least one mask (e.g. the whole image)")
    if array.dtype == bool:
        return torch.from_numpy(array.astype(np.float32))
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ProposalError(f"{where}: integer masks must hold 0/1, found values {array.min()}..{array.max()}; "
                                f"for 0..255 soft masks save float masks / 255")
        return torch.from_numpy(array.astype(np.float32))
    if not np.issubdtype(array.dtype, np.floating):
        raise ProposalError(f"{where}: masks of dtype {array.dtype}; expected bool, uint8 (0/1) or float in [0, 1]")
    if not np.isfinite(array).all():
        raise ProposalError(f"{where}: masks contain NaN or infinity")
    if array.size and (array.min() < 0 or array.max() > 1):
        raise ProposalError(f"{where}: mask values {array.min():.4g}..{array.max():.4g} are outside [0, 1]; "
                            f"give probabilities (e.g. sigmoid of mask logits), not logits")
    return torch.from_numpy(array.astype(np.float32))


def _png_masks(path: Path) -> tuple[Tensor, np.ndarray]:
    """(masks (N, H, W) float32, the id map (H, W)) of a proposal-id PNG."""
    with Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise ProposalError(f"{path}: a {img.mode} PNG; proposal PNGs are single-channel maps of proposal ids "
                                f"(8- or 16-bit grayscale, or palette indices), 0 = none")
        ids = np.array(img)
    if ids.ndim != 2:
        raise ProposalError(f"{path}: an id map of shape {ids.shape}; expected (H, W)")
    values = np.unique(ids)
    values = values[values != 0]
    if values.size == 0:
        raise ProposalError(f"{path}: every pixel is 0 (no proposal); mark each proposal with its own id > 0")
    return torch.from_numpy(ids[None] == values[:, None, None]).float(), ids


def read_proposal_file(path: str | os.PathLike, size: tuple[int, int] | None = None) -> Tensor:
    """The proposals of one file (.npz or .png, see the module docstring): (N, H, W) float32.

    ``size`` (H, W): the image's; a file of another size is resized to it with a warning.
    """
    path = Path(path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                if NPZ_KEY not in archive.files:
                    raise ProposalError(f"{path}: no array {NPZ_KEY!r} (found {archive.files}); save it with "
                                        f"np.savez_compressed(path, masks=masks)")
                masks = check_masks(archive[NPZ_KEY], str(path))
        except (OSError, ValueError) as err:
            if isinstance(err, ProposalError):
                raise
            raise ProposalError(f"{path}: not a readable .npz archive ({err})") from None
        if size is not None and tuple(masks.shape[-2:]) != tuple(size):
            warnings.warn(f"{path}: proposals of size {tuple(masks.shape[-2:])} for an image of size {tuple(size)}; "
                          f"resized (bilinear)", stacklevel=2)
            masks = F.interpolate(masks[None], size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
        return masks
    if path.suffix == ".png":
        try:
            masks, ids = _png_masks(path)
        except (OSError, Image.DecompressionBombError) as err:
            raise ProposalError(f"{path}: not a readable PNG ({err})") from None
        if size is not None and ids.shape != tuple(size):
            warnings.warn(f"{path}: proposal ids of size {ids.shape} for an image of size {tuple(size)}; "
                          f"resized (nearest)", stacklevel=2)
            masks = F.interpolate(masks[None], size=size, mode="nearest")[0]
        return masks
    raise ProposalError(f"{path}: proposal files are {' or '.join(PROPOSAL_SUFFIXES)}, not {path.suffix!r}")


class ProposalFiles:
    """Proposals read from ``folder/<image_id>.npz`` or ``.png`` (format: module docstring)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"proposal folder {self.folder} does not exist; give a folder of "
                                    f"<image_id>.npz / .png files")

    def path_for(self, image_id: str) -> Path:
        """The file holding ``image_id``'s proposals (ProposalError when there is none, or two)."""
        found = [p for p in (self.folder / f"{image_id}{s}" for s in PROPOSAL_SUFFIXES) if p.is_file()]
        if not found:
            raise ProposalError(f"no proposals for image {image_id!r}: expected {self.folder / image_id}.npz or "
                                f".png")
        if len(found) > 1:
            raise ProposalError(f"two proposal files for image {image_id!r}: {found[0]} and {found[1]}; keep one")
        return found[0]

    def __call__(self, image: np.ndarray, image_id: str) -> Tensor:
        return read_proposal_file(self.path_for(image_id), tuple(image.shape[:2]))

    def __repr__(self) -> str:
        return f"ProposalFiles({str(self.folder)!r})"


def _whole(size: tuple[int, int]) -> Tensor:
    return torch.ones(1, *size)


def regions_from_labels(
    labels: np.ndarray | Tensor,
    *,
    min_area: float = 1e-3,
    max_regions: int | None = 99,
    ignore_index: int | None = None,
    whole_image: bool = True,
) -> Tensor:
    """Class-agnostic proposals from a label map: the connected regions of each class.

    Args:
        labels: (H, W) integer label map (a method's prediction).
        min_area: regions smaller than this fraction of the image are dropped (noise of a
            dense prediction); 0 keeps every region.
        max_regions: keep at most this many regions, the largest (None: all).
        ignore_index: a label value that is no region (e.g. 255), if any.
        whole_image: put the whole image first, as one more proposal (MAFT's inference
            weights every pixel by the proposals covering it: the whole image covers
            the pixels of dropped regions).

    Returns:
        binary float32 masks (N, H, W): [whole image;] regions largest first. Regions are
        4-connected (pixels sharing an edge); two blobs of one class are two proposals.
    """
    array = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels of shape {array.shape} and dtype {array.dtype}: expected an (H, W) integer label map")
    if not 0 <= min_area < 1:
        raise ValueError(f"min_area={min_area!r}: give a fraction of the image in [0, 1)")
    if max_regions is not None and max_regions < 0:
        raise ValueError(f"max_regions={max_regions!r}: give a count >= 0, or None for every region")
    height, width = array.shape
    regions: list[np.ndarray] = []
    for value in np.unique(array):
        if ignore_index is not None and value == ignore_index:
            continue
        components, count = ndimage.label(array == value)  # 4-connectivity
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        for k in range(1, count + 1):
            if sizes[k] >= max(min_area * height * width, 1):
                regions.append(components == k)
    regions.sort(key=lambda r: -int(r.sum()))
    if max_regions is not None:
        regions = regions[:max_regions]
    masks = torch.from_numpy(np.stack(regions)).float() if regions else torch.zeros(0, height, width)
    if whole_image:
        masks = torch.cat([_whole((height, width)), masks])
    if masks.shape[0] == 0:
        raise ValueError("no region is left (every pixel ignored or below min_area) and whole_image is off")
    return masks


def grid_proposals(size: tuple[int, int], grid: tuple[int, int] = (3, 3), whole_image: bool = True) -> Tensor:
    """The whole image (first, if ``whole_image``) and a rows x cols grid of cells: (N, H, W) binary float32."""
    height, width = size
    rows, cols = grid
    if rows < 1 or cols < 1:
        raise ValueError(f"grid={grid!r}: give (rows, cols) >= 1")
    ys = np.linspace(0, height, rows + 1).round().astype(int)
    xs = np.linspace(0, width, cols + 1).round().astype(int)
    cells = torch.zeros(rows * cols, height, width)
    for i in range(rows):
        for j in range(cols):
            cells[i * cols + j, ys[i]:ys[i + 1], xs[j]:xs[j + 1]] = 1
    return torch.cat([_whole(size), cells]) if whole_image else cells


class GridProposals:
    """The whole image and a regular ``grid`` (rows, cols) of cells, whatever the image shows."""

    def __init__(self, grid: tuple[int, int] = (3, 3)) -> None:
        self.grid = tuple(grid)

    def __call__(self, image: np.ndarray, image_id: str) -> Tensor:
        return grid_proposals(tuple(image.shape[:2]), self.grid)

    def __repr__(self) -> str:
        return f"GridProposals({self.grid})"


class PredictionProposals:
    """Class-agnostic regions of another method's prediction (:func:`regions_from_labels`).

    Args:
        predict: ``predict(image (H, W, 3) uint8) -> labels (H, W)``, e.g. a closure over
            :func:`reclip.inference.segment` with a segmentor and its test settings
            (``reclip.api.proposal_source`` builds it from ``from:METHOD`` / ``from:RUN_DIR``).
        name: what made the prediction, for messages.
        min_area, max_regions, whole_image: as in :func:`regions_from_labels`. The whole
            image is one more vote on every pixel of MAFT's sum over proposals: with the
            few regions of one prediction it can outvote them (the toy world, ipclip,
            seed 0 only: 30.7 mIoU without it, 19.2 with it, ``reclip.demo.ToyMaft``).
    """

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], name: str, *, min_area: float = 1e-3,
                 max_regions: int | None = 99, whole_image: bool = True) -> None:
        self.predict = predict
        self.name = name if whole_image else f"{name} (no whole image)"  # what a run records (describe_source)
        self.min_area = min_area
        self.max_regions = max_regions
        self.whole_image = whole_image

    def __call__(self, image: np.ndarray, image_id: str) -> Tensor:
        labels = np.asarray(self.predict(image))
        if labels.shape != image.shape[:2]:
            raise ProposalError(f"{self.name} predicted labels of shape {labels.shape} for image {image_id!r} of "
                                f"size {image.shape[:2]}")
        return regions_from_labels(labels, min_area=self.min_area, max_regions=self.max_regions,
                                   whole_image=self.whole_image)

    def __repr__(self) -> str:
        return f"PredictionProposals({self.name!r})"


def _save_npz(path: Path, masks: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: given a name, NumPy would append ".npz"
        np.savez_compressed(f, **{NPZ_KEY: masks})


def write_proposal_files(source: ProposalSource, images: Any, folder: str | os.PathLike, *,
                         progress: bool = False) -> list[tuple[str, str]]:
    """Write ``source``'s proposals of every image of ``images`` as ``folder/<image_id>.npz``
    (binary masks stored as bool, soft ones as float16), for :class:`ProposalFiles`: made
    once, read at every epoch.

    ``images``: a dataset with ``image_ids`` and ``image_paths`` (a
    :class:`~reclip.data.datasets.SegmentationDataset`, with its ``max_pixels``); only the
    images are read, never a label. Files already there are kept (a killed run continues);
    each is written atomically. An unreadable image is skipped with a warning; returns the
    skipped (path, reason) pairs.
    """
    from tqdm.auto import tqdm

    from reclip.data.io import MAX_PIXELS, ImageReadError, load_image
    from reclip.files import atomic_write

    folder = Path(folder)
    skipped = []
    pairs = list(zip(images.image_ids, images.image_paths))
    for image_id, image_path in tqdm(pairs, desc="proposals", unit="img", disable=not progress):
        path = folder / f"{image_id}.npz"
        if path.is_file():
            continue
        try:
            image = load_image(image_path, max_pixels=getattr(images, "max_pixels", MAX_PIXELS)).image
        except ImageReadError as e:
            warnings.warn(f"no proposals for image {image_id!r}: {e}", stacklevel=2)
            skipped.append((str(image_path), str(e)))
            continue
        masks = check_masks(source(image, image_id), f"proposals of image {image_id!r}")
        binary = bool(((masks == 0) | (masks == 1)).all())
        array = masks.bool().numpy() if binary else masks.half().numpy()
        atomic_write(path, lambda tmp: _save_npz(tmp, array))
    return skipped
