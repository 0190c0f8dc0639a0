"""Training augmentations on uint8 images, driven by a passed ``numpy.random.Generator``.

The pipeline of the official ReCLIP++ training (dogehhh/ReCLIP ``utils/preprocess.py``,
itself mmseg's ``train_pipeline``) in its order:

1. :func:`random_rescale` - ratio ~ U[0.5, 2.0) of the base scale: mmseg
   ``Resize(img_scale=(2048, base_short_side), ratio_range=(0.5, 2.0), keep_ratio=True)``,
   i.e. short side ``int(base * ratio)`` with the long side capped at ``int(2048 * ratio)``;
   bilinear without antialiasing (OpenCV ``INTER_LINEAR``) by default.
2. :func:`random_crop` - a uniformly placed ``crop`` window (smaller images are taken
   whole). The official crop retries up to 10 times until no class covers more than 75%
   of the GROUND-TRUTH label (mmseg ``cat_max_ratio``): that reads pixel labels, so it is
   NOT reproduced here - training in reclip never sees ground truth.
3. :func:`random_flip` - horizontal, probability 0.5.
4. :func:`photometric_distortion` - mmseg ``PhotoMetricDistortion`` (brightness delta 32,
   contrast 0.5-1.5, saturation 0.5-1.5, hue delta 18; each applied with probability 0.5,
   contrast before or after the colour steps at random), on uint8 as the official code.

Every function takes the generator explicitly (never the global numpy/python RNG), so a
sample's augmentation is a pure function of its seed: a resumed run, another worker count
or another process count sees the same crops. The number and order of draws is fixed
(draws are made even when their branch is not taken where that keeps later draws
aligned; see each function). Labels are optional and only for tools that want them;
unsupervised training never passes one.

:class:`UnlabeledTrainSet` applies the pipeline to a split's images (never its labels)
and pairs each image with its class hypotheses.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from reclip.data.io import MAX_PIXELS, ImageReadError, image_size, read_image
from reclip.data.transforms import CLIP_MEAN, CLIP_STD, resize_short_side, short_side_size, to_tensor_normalized

__all__ = [
    "OFFICIAL_MAX_LONG_SIDE",
    "random_rescale",
    "random_crop",
    "random_flip",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "photometric_distortion",
    "augment",
    "sample_rng",
    "UnlabeledTrainSet",
]

# Long-side cap of the base scale in the official configs (DATASET.SCALE: [2048, short]).
OFFICIAL_MAX_LONG_SIDE = 2048


def _check_image(image: np.ndarray, name: str) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name}: expected a (H, W, 3) uint8 RGB array, got {desc}")


def _check_label(image: np.ndarray, label: np.ndarray | None, name: str) -> None:
    if label is not None and (label.ndim != 2 or label.shape != image.shape[:2]):
        raise ValueError(f"{name}: label must be (H, W) = {image.shape[:2]}, got shape {label.shape}")


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(int(v) == v and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or an (h, w) pair of positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


# -- geometry ----------------------------------------------------------------------------
def random_rescale(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    base_short_side: int,
    ratio_range: tuple[float, float] = (0.5, 2.0),
    max_long_side: int | None = OFFICIAL_MAX_LONG_SIDE,
    antialias: bool = False,
    label: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Keep-ratio resize to a random multiple of the base scale (mmseg ``ratio_range`` mode).

    One draw: ``ratio = U[lo, hi)``; the target is short side ``int(base_short_side *
    ratio)`` with the long side capped at ``int(max_long_side * ratio)`` (as mmseg scales
    both sides of ``img_scale``), sizes rounded as mmcv (``int(x * s + 0.5)``).

    Args:
        image: (H, W, 3) uint8.
        rng: the sample's generator.
        base_short_side: the dataset's base short side (official: VOC 336, Context 448,
            ADE 512, Cityscapes 448, COCO 512).
        ratio_range: (lo, hi) of the uniform ratio.
        max_long_side: base long-side cap (None: no cap).
        antialias: low-pass when shrinking (off = OpenCV INTER_LINEAR, as the official).
        label: optional (H, W) map, resized with nearest neighbour.

    Returns:
        (image (H', W', 3) uint8, label (H', W') or None).
    """
    _check_image(image, "random_rescale")
    _check_label(image, label, "random_rescale")
    lo, hi = ratio_range
    if not 0 < lo <= hi:
        raise ValueError(f"random_rescale: ratio_range must satisfy 0 < lo <= hi, got {ratio_range}")
    ratio = lo + (hi - lo) * rng.random()
    short = max(1, int(base_short_side * ratio))
    cap = None if max_long_side is None else max(1, int(max_long_side * ratio))
    if short_side_size(*image.shape[:2], short, cap) == image.shape[:2]:
        return image, label
    if not image.flags.writeable:  # torch.from_numpy refuses read-only arrays (PIL's np.asarray)
        image = image.copy()
    out = resize_short_side(image, short, mode="bilinear", max_long_side=cap, antialias=antialias)
    if label is not None:
        label = resize_short_side(np.array(label), short, mode="nearest", max_long_side=cap)
    return out, label


def random_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    crop: int | Sequence[int],
    pad: bool = True,
    pad_value: int = 0,
    ignore_index: int = 255,
    label: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """A uniformly placed (h, w) window; sides shorter than the crop are taken whole.

    Two draws always (offset y, then x, each uniform over the valid offsets, as mmseg's
    ``RandomCrop.get_crop_bbox``).

    Args:
        image: (H, W, 3) uint8.
        rng: the sample's generator.
        crop: int or (h, w).
        pad: pad a smaller result at the bottom/right to exactly ``crop`` (image with
            ``pad_value``, label with ``ignore_index``). The official pipeline pads AFTER
            normalisation with 0, i.e. with the mean colour:
            :class:`UnlabeledTrainSet` passes ``pad=False`` and pads the
            normalised tensor to reproduce that.
        pad_value: image fill when padding.
        ignore_index: label fill when padding.
        label: optional (H, W) map, cropped identically.

    Returns:
        (image (h', w', 3) uint8, label or None); (h', w') = crop when ``pad``, else
        (min(H, h), min(W, w)).
    """
    _check_image(image, "random_crop")
    _check_label(image, label, "random_crop")
    ch, cw = _pair(crop, "random_crop: crop")
    h, w = image.shape[:2]
    y0 = int(rng.integers(0, max(h - ch, 0) + 1))
    x0 = int(rng.integers(0, max(w - cw, 0) + 1))
    image = image[y0:y0 + ch, x0:x0 + cw]
    if label is not None:
        label = label[y0:y0 + ch, x0:x0 + cw]
    if pad:
        return _pad_bottom_right(image, (ch, cw), pad_value=pad_value, label=label, ignore_index=ignore_index)
    return np.ascontiguousarray(image), (None if label is None else np.ascontiguousarray(label))


def _pad_bottom_right(
    image: np.ndarray, size: tuple[int, int], *, pad_value: int, label: np.ndarray | None, ignore_index: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pad (H, W, 3) [and (H, W)] at the bottom/right up to ``size`` (mmseg ``Pad(size=crop)``)."""
    ph, pw = max(size[0] - image.shape[0], 0), max(size[1] - image.shape[1], 0)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=pad_value)
        if label is not None:
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=ignore_index)
    return np.ascontiguousarray(image), (None if label is None else np.ascontiguousarray(label))


def random_flip(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    prob: float = 0.5,
    label: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Horizontal flip with probability ``prob`` (one draw always).

    Returns:
        (image (H, W, 3) uint8, label or None).
    """
    _check_image(image, "random_flip")
    _check_label(image, label, "random_flip")
    if rng.random() < prob:
        image = np.ascontiguousarray(image[:, ::-1])
        label = None if label is None else np.ascontiguousarray(label[:, ::-1])
    return image, label


# -- colour ------------------------------------------------------------------------------
def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV in OpenCV's 8-bit convention (H = degrees / 2 in 0..179, S, V in 0..255).

    The official code converts with ``cv2.cvtColor(BGR2HSV)`` on uint8; this is the same
    formula (rounded), without the OpenCV dependency.

    Args:
        image: (H, W, 3) uint8 RGB.

    Returns:
        (H, W, 3) uint8 HSV.
    """
    rgb = image.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = np.maximum(np.maximum(r, g), b)  # (elementwise: much faster than a reduction over the size-3 axis)
    diff = v - np.minimum(np.minimum(r, g), b)
    s = np.where(v > 0, 255.0 * diff / np.maximum(v, 1e-6), 0.0)
    safe = np.maximum(diff, 1e-6)
    h = np.where(v == r, 60.0 * (g - b) / safe,
                 np.where(v == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe))
    h = np.where(diff > 0, h, 0.0)
    h = np.mod(h, 360.0)
    hsv = np.stack([np.mod(np.rint(h / 2.0), 180.0), np.rint(s), v], axis=-1)
    return hsv.astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 HSV (OpenCV 8-bit convention, see :func:`rgb_to_hsv`) -> uint8 RGB.

    Args:
        hsv: (H, W, 3) uint8.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    h = hsv[..., 0].astype(np.float32) * (2.0 / 60.0)  # hue in sixths of the circle, 0..6
    vs = hsv[..., 2].astype(np.float32) * (hsv[..., 1].astype(np.float32) / 255.0)  # chroma v * s
    v = hsv[..., 2].astype(np.float32)
    out = np.empty(hsv.shape, dtype=np.float32)
    # channel = v - chroma * clip(min(k, 4 - k), 0, 1) with k = (n + h) mod 6, n = 5, 3, 1 for R, G, B
    for c, n in enumerate((5.0, 3.0, 1.0)):
        k = np.mod(n + h, 6.0)
        out[..., c] = v - vs * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """x * alpha + beta, clipped to 0..255 and truncated to uint8 (mmseg ``convert``)."""
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    brightness_delta: float = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion`` on uint8 RGB (defaults = mmseg's = the official code's).

    In order: brightness (+U[-delta, delta]); a coin ``mode`` puts contrast (x U[lo, hi])
    first (mode 1) or last (mode 0); saturation (S x U[lo, hi]); hue (H + integer in
    [-hue_delta, hue_delta], modulo 180 in OpenCV's half-degree units); each step applied
    with probability 1/2. Values are clipped and truncated to uint8 after each step, as
    mmseg/official. Only the coins of taken branches are followed by a value draw (as
    mmseg); the draw sequence is still a pure function of the generator's state.
    Difference: mmseg draws the hue shift with numpy's exclusive ``randint(-18, 18)``
    ([-18, 17]); here the shift is symmetric, [-18, 18].

    Args:
        image: (H, W, 3) uint8 RGB.
        rng: the sample's generator.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    _check_image(image, "photometric_distortion")
    img = image
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = int(rng.integers(2))
    if mode == 1 and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        hsv = rgb_to_hsv(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        img = hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv(img)
        shift = int(rng.integers(-hue_delta, hue_delta + 1))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int64) + shift) % 180).astype(np.uint8)
        img = hsv_to_rgb(hsv)
    if mode == 0 and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast_range))
    return np.ascontiguousarray(img)


# -- the pipeline --------------------------------------------------------------------------
def augment(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    base_short_side: int,
    crop: int | Sequence[int],
    ratio_range: tuple[float, float] = (0.5, 2.0),
    max_long_side: int | None = OFFICIAL_MAX_LONG_SIDE,
    flip_prob: float = 0.5,
    photometric: bool = True,
    pad: bool = True,
    antialias: bool = False,
    ignore_index: int = 255,
    label: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The official training pipeline: rescale, crop, flip, photometric distortion.

    Args:
        image: (H, W, 3) uint8 RGB.
        rng: the sample's generator (e.g. ``np.random.default_rng([seed, epoch, index])``).
        base_short_side, ratio_range, max_long_side, antialias: see :func:`random_rescale`.
        crop: int or (h, w) of the random crop.
        pad: pad the result at the bottom/right to ``crop`` after every other step (image
            with 0, label with ``ignore_index``); without it the result may be smaller.
        flip_prob: horizontal flip probability.
        photometric: apply :func:`photometric_distortion`.
        label: optional (H, W) map transformed geometrically with the image.

    Returns:
        (image (h, w, 3) uint8, label (h, w) or None); (h, w) = crop when ``pad``.
    """
    image, label = random_rescale(image, rng, base_short_side=base_short_side, ratio_range=ratio_range,
                                  max_long_side=max_long_side, antialias=antialias, label=label)
    image, label = random_crop(image, rng, crop=crop, pad=False, label=label)
    image, label = random_flip(image, rng, prob=flip_prob, label=label)
    if photometric:
        image = photometric_distortion(image, rng)
    if pad:  # last, as mmseg's Pad: the padding is never distorted
        image, label = _pad_bottom_right(image, _pair(crop, "augment: crop"), pad_value=0, label=label,
                                         ignore_index=ignore_index)
    return image, label


# -- the unlabelled training set ----------------------------------------------------------
def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's augmentation: a pure function of (seed, epoch, index)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index)]))


class UnlabeledTrainSet(Dataset):
    """A split's images, augmented, with their image-level class hypotheses; NEVER labels.

    Items::

        {"image": (3, h, w) float32,   # augmented, CLIP-normalised, padded to ``crop``
         "valid": (h, w) bool,         # True on the image, False on the padding
         "hypotheses": (C,) bool,      # classes of the image's hypothesis set H (eq. 6)
         "index": int,                 # index in ``dataset`` (for logs)
         "image_id": str}

    Only ``dataset.image_ids`` and ``dataset.image_paths`` are used: images are read
    here with :func:`reclip.data.io.read_image`, so ``dataset[i]`` (which reads labels)
    is never called and a split without label files works as well.

    Padding: crops smaller than ``crop`` are padded at the bottom/right AFTER
    normalisation with 0, i.e. with the mean colour, as the official pipeline (mmseg
    ``Normalize`` then ``Pad``); every item has the same size so batches stack.

    Skipped images (listed in :attr:`skipped`, id -> reason, with one warning): images
    without an entry in ``hypotheses`` (only with ``missing="skip"``, otherwise an
    error), images with an EMPTY hypothesis set (the official loop skips them: there is
    nothing to contrast, eq. 7 averages over H), and images whose header cannot be read
    at construction. An image that fails to decode later (truncated) is reported with a
    warning and replaced by the next kept image, deterministically.

    Determinism: a sample's augmentation uses :func:`sample_rng` (seed, epoch, dataset
    index); :meth:`set_epoch` is called by the engine before each epoch, so a resumed
    run, any worker count and any process count see the same crops.

    Args:
        dataset: a :class:`reclip.data.SegmentationDataset` (or anything with
            ``image_ids`` and ``image_paths``).
        hypotheses: image id -> class indices (``reclip.hypotheses.load_hypotheses``).
        num_classes: C.
        base_short_side: base scale of the random rescale (official per dataset: VOC 336,
            Context 448, ADE 512, Cityscapes 448, COCO 512).
        crop: crop size, int or (h, w) (official: 336 / 480 / 512 / 512 / 512).
        seed: augmentation seed.
        ratio_range, max_long_side, flip_prob, photometric, antialias: see :func:`augment`.
        mean, std: normalisation on the 0..1 scale (the CLIP model's).
        missing: "error" (default) or "skip" for images absent from ``hypotheses``.
        check_headers: read every image's header at construction and skip unreadable ones.
    """

    def __init__(
        self,
        dataset: Any,
        hypotheses: Mapping[str, Sequence[int]],
        num_classes: int,
        base_short_side: int,
        crop: int | Sequence[int],
        seed: int = 0,
        *,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        max_long_side: int | None = OFFICIAL_MAX_LONG_SIDE,
        flip_prob: float = 0.5,
        photometric: bool = True,
        antialias: bool = False,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        missing: str = "error",
        check_headers: bool = True,
    ) -> None:
        if not (hasattr(dataset, "image_ids") and hasattr(dataset, "image_paths")):
            raise TypeError(
                f"UnlabeledTrainSet: dataset must have image_ids and image_paths (a SegmentationDataset), "
                f"got {type(dataset).__name__}"
            )
        if missing not in ("error", "skip"):
            raise ValueError(f"UnlabeledTrainSet: missing must be 'error' or 'skip', got {missing!r}")
        if num_classes <= 0:
            raise ValueError(f"UnlabeledTrainSet: num_classes must be positive, got {num_classes}")
        self.image_ids: list[str] = list(dataset.image_ids)
        self.image_paths: list[str] = [str(p) for p in dataset.image_paths]
        self.max_pixels = getattr(dataset, "max_pixels", MAX_PIXELS)  # the dataset's pixel limit on reading
        self.num_classes = int(num_classes)
        self.base_short_side = int(base_short_side)
        self.crop = _pair(crop, "UnlabeledTrainSet: crop")
        self.seed = int(seed)
        self.epoch = 0
        self.ratio_range = tuple(ratio_range)
        self.max_long_side = max_long_side
        self.flip_prob = flip_prob
        self.photometric = photometric
        self.antialias = antialias
        self.mean, self.std = tuple(mean), tuple(std)

        absent = [i for i in self.image_ids if i not in hypotheses]
        if absent and missing == "error":
            raise ValueError(
                f"UnlabeledTrainSet: {len(absent)} of {len(self.image_ids)} image(s) have no hypotheses "
                f"(e.g. {absent[:5]}); the hypothesis file was made for another split or is incomplete. "
                "Fix: run (or resume) `reclip hypotheses` on this split, or pass missing='skip'."
            )
        self.skipped: dict[str, str] = {i: "no entry in the hypothesis file" for i in absent}
        self._targets: dict[int, np.ndarray] = {}
        self.indices: list[int] = []
        for index, image_id in enumerate(self.image_ids):
            if image_id in self.skipped:
                continue
            classes = [int(c) for c in hypotheses[image_id]]
            bad = [c for c in classes if not 0 <= c < self.num_classes]
            if bad:
                raise ValueError(
                    f"UnlabeledTrainSet: image {image_id!r} has class indices {bad} outside 0..{self.num_classes - 1}; "
                    "the hypothesis file was made for another class list"
                )
            if not classes:
                self.skipped[image_id] = "empty hypothesis set (nothing to contrast; the official loop skips it)"
                continue
            if check_headers and image_size(self.image_paths[index]) is None:
                self.skipped[image_id] = f"unreadable image header: {self.image_paths[index]}"
                continue
            target = np.zeros(self.num_classes, dtype=bool)
            target[classes] = True
            self._targets[index] = target
            self.indices.append(index)
        if self.skipped:
            reasons: dict[str, int] = {}
            for r in self.skipped.values():
                key = r.split(":")[0]
                reasons[key] = reasons.get(key, 0) + 1
            warnings.warn(
                f"UnlabeledTrainSet: skipped {len(self.skipped)} of {len(self.image_ids)} image(s): "
                + "; ".join(f"{n} x {r}" for r, n in reasons.items()) + " (see .skipped for the ids)",
                stacklevel=2,
            )
        if not self.indices:
            raise ValueError("UnlabeledTrainSet: no trainable image left (see the warning above)")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations the next items use."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, position: int) -> tuple[int, np.ndarray]:
        """(dataset index, image) of the kept image at ``position``, or the next readable one."""
        for step in range(len(self.indices)):
            index = self.indices[(position + step) % len(self.indices)]
            try:
                return index, read_image(self.image_paths[index], max_pixels=self.max_pixels)
            except ImageReadError as e:
                warnings.warn(f"UnlabeledTrainSet: {e}; using the next image instead", stacklevel=3)
        raise ImageReadError(self.image_paths[self.indices[position]], "no image of the training set can be read")

    def __getitem__(self, position: int) -> dict[str, Any]:
        index, image = self._read(position)
        rng = sample_rng(self.seed, self.epoch, index)
        image, _ = augment(image, rng, base_short_side=self.base_short_side, crop=self.crop,
                           ratio_range=self.ratio_range, max_long_side=self.max_long_side,
                           flip_prob=self.flip_prob, photometric=self.photometric, pad=False,
                           antialias=self.antialias)
        x = to_tensor_normalized(image, self.mean, self.std)  # (3, h', w'), h' <= crop h
        valid = torch.zeros(self.crop, dtype=torch.bool)
        valid[: x.shape[1], : x.shape[2]] = True  # the image's pixels, not the padding
        x = F.pad(x, (0, self.crop[1] - x.shape[2], 0, self.crop[0] - x.shape[1]), value=0.0)  # (3, h, w)
        item = {"image": x, "valid": valid, "hypotheses": torch.from_numpy(self._targets[index].copy()),
                "index": index, "image_id": self.image_ids[index]}
        assert "label" not in item  # unsupervised training: ground truth never leaves the dataset
        return item
