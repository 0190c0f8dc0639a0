"""MAFT's training crops: images augmented as every reclip training stage, with their
mask proposals and, for supervised MAFT, their class-mask map.

:class:`MaftTrainSet` reads a split's images and applies the official ReCLIP++ /
mmseg training pipeline (:func:`reclip.data.augment.augment`: random rescale, crop,
flip, photometric distortion), seeded per sample so that a resumed run sees the same
crops. With ``labels=True`` (MAFT as published) it also reads each ground-truth label,
transforms it with the same geometry and maps it to the SEEN classes' indices: pixels of
unseen classes, void and the crop's padding become ``ignore_index``. With
``labels=False`` (the unsupervised variant) no label file is ever opened; the class
masks then come from a teacher during training.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from reclip.data.augment import _pair, augment, sample_rng
from reclip.data.datasets import SegmentationDataset
from reclip.data.io import ImageReadError, read_image
from reclip.data.transforms import CLIP_MEAN, CLIP_STD, resize_labels, to_tensor_normalized
from reclip.maft.proposals import ProposalError, check_masks

__all__ = ["MaftTrainSet", "seen_lookup"]


def seen_lookup(num_classes: int, seen: Sequence[int], ignore_index: int = 255) -> torch.Tensor:
    """(max(C, ignore_index) + 1,) int64 table: class id -> its position among ``seen``,
    every other id (unseen classes, ``ignore_index``) -> ``ignore_index``."""
    table = torch.full((max(num_classes, ignore_index) + 1,), ignore_index, dtype=torch.int64)
    table[torch.as_tensor(list(seen), dtype=torch.int64)] = torch.arange(len(seen), dtype=torch.int64)
    return table


class MaftTrainSet(Dataset):
    """A split's images as augmented training crops, with their proposals and, if asked,
    their seen-class map.

    Items::

        {"image": (3, h, w) float32,      # augmented, normalised, padded to ``crop`` with 0
         "valid": (h, w) bool,            # True on the image, False on the padding
         "proposals": (M, h, w) uint8,    # the source's masks on the crop, x 255; 0 on padding
         "proposal_keep": (M,) bool,      # the real ones (the rest pads to M = max_proposals)
         "target": (h, w) int64,          # only with labels: seen-class index or ignore_index
         "index": int, "image_id": str}

    Proposals come from ``proposals(image, image_id)`` on the ORIGINAL image (files made
    for it, or a method's prediction of it) and follow the crop's geometry exactly: the
    augmentation transforms a map of pixel indices (nearest, as for labels) and the
    masks, like the label, are read through it. The first ``max_proposals`` are kept
    (sources put the whole image and the largest regions first).

    Args:
        dataset: a :class:`~reclip.data.SegmentationDataset` (labelled when ``labels``).
        proposals: a proposal source (:mod:`reclip.maft.proposals`): ``(image (H, W, 3)
            uint8, image_id) -> (N, H, W)`` in [0, 1]; other masks (values outside [0, 1],
            NaN, another shape) are a :class:`~reclip.maft.proposals.ProposalError` naming
            the image.
        labels: read the ground truth (supervised MAFT); False never opens a label file.
        seen: the seen class ids (default all classes, in order).
        base_short_side, crop, seed: augmentation (see :func:`reclip.data.augment.augment`).
        max_proposals: M, proposals per crop (MAFT: 100).
        mean, std: normalisation (the CLIP's).

    An unreadable image (or label) is reported with a warning and replaced by the next
    readable item, deterministically.
    """

    def __init__(self, dataset: SegmentationDataset, proposals: Callable[[np.ndarray, str], Any], *, labels: bool,
                 base_short_side: int, crop: int | Sequence[int], seen: Sequence[int] | None = None, seed: int = 0,
                 max_proposals: int = 100, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> None:
        if labels and not dataset.has_labels:
            raise ValueError(f"split {dataset.split!r} of {dataset.protocol.name!r} has no labels; supervised MAFT "
                             "needs them (or use the unsupervised variant, supervision='pseudo')")
        if max_proposals < 1:
            raise ValueError(f"max_proposals={max_proposals!r}: give at least 1")
        self.dataset = dataset
        self.proposals = proposals
        self.labels = bool(labels)
        self.ignore_index = dataset.protocol.ignore_index
        self.seen = list(range(dataset.num_classes)) if seen is None else [int(c) for c in seen]
        self.lookup = seen_lookup(dataset.num_classes, self.seen, self.ignore_index).numpy()
        self.base_short_side = int(base_short_side)
        self.crop = _pair(crop, "MaftTrainSet: crop")
        self.seed = int(seed)
        self.epoch = 0
        self.max_proposals = int(max_proposals)
        self.mean, self.std = tuple(mean), tuple(std)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations the next items use."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def _read(self, position: int) -> tuple[int, np.ndarray, np.ndarray | None]:
        """(index, image, seen-class map or None) of the item at ``position``, or of the next readable one."""
        n = len(self.dataset)
        for step in range(n):
            index = (position + step) % n
            if not self.labels:
                try:
                    return index, read_image(self.dataset.image_paths[index], max_pixels=self.dataset.max_pixels), None
                except ImageReadError as err:
                    warnings.warn(f"MaftTrainSet: {err}; using the next image instead", stacklevel=3)
                    continue
            item = self.dataset[index]
            if item["error"] is not None:
                warnings.warn(f"MaftTrainSet: {item['error']}; using the next image instead", stacklevel=3)
                continue
            label = item["label"]
            if label.shape != item["image"].shape[:2]:  # an image read downscaled (max_pixels)
                label = resize_labels(label, item["image"].shape[:2])
            return index, item["image"], self.lookup[np.clip(label, 0, len(self.lookup) - 1)]
        raise ImageReadError(self.dataset.image_paths[position], "no item of the training set can be read")

    def __getitem__(self, position: int) -> dict[str, Any]:
        index, image, target = self._read(position)
        image_id = self.dataset.image_ids[index]
        # (N, H, W) float32 in [0, 1]: values outside, or NaN, would wrap in the uint8 cast below
        masks = check_masks(self.proposals(image, image_id), f"proposals of image {image_id!r}")
        if tuple(masks.shape[1:]) != image.shape[:2]:
            raise ProposalError(f"the proposal source gave masks of shape {tuple(masks.shape)} for image "
                                f"{image_id!r} of size {image.shape[:2]}; expected (N, H, W) at the image's size")
        masks = masks[: self.max_proposals]
        # the crop's geometry as a map of source pixel indices (nearest, exact in float64): labels and
        # proposals are read through it
        pixels = np.arange(image.shape[0] * image.shape[1], dtype=np.int64).reshape(image.shape[:2])
        rng = sample_rng(self.seed, self.epoch, index)
        image, pixels = augment(image, rng, base_short_side=self.base_short_side, crop=self.crop, pad=False,
                                label=pixels)
        x = to_tensor_normalized(image, self.mean, self.std)  # (3, h', w')
        h, w = x.shape[1:]
        pad = (0, self.crop[1] - w, 0, self.crop[0] - h)
        flat = torch.from_numpy(pixels.reshape(-1))
        valid = torch.zeros(self.crop, dtype=torch.bool)
        valid[:h, :w] = True
        crop_masks = (masks.flatten(1)[:, flat].reshape(-1, h, w) * 255).round().to(torch.uint8)
        proposals = torch.zeros(self.max_proposals, *self.crop, dtype=torch.uint8)
        proposals[: crop_masks.shape[0], :h, :w] = crop_masks
        keep = torch.zeros(self.max_proposals, dtype=torch.bool)
        keep[: crop_masks.shape[0]] = True
        item = {"image": F.pad(x, pad, value=0.0), "valid": valid, "proposals": proposals, "proposal_keep": keep,
                "index": index, "image_id": image_id}
        if target is not None:
            t = torch.from_numpy(target.reshape(-1)[pixels.reshape(-1)].reshape(h, w).astype(np.int64))
            item["target"] = F.pad(t, pad, value=self.ignore_index)
        return item
