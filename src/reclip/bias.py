"""The two bias diagnostics of ReCLIP++ (paper Fig. 1 and Table VII, section IV-D(2)).

- **Class preference**: row-normalise the dataset's confusion matrix; for each class take
  its diagonal entry minus the largest off-diagonal entry of its row; average over
  classes. 1 is a perfect predictor; a predictor that prefers a wrong class over the right
  one for some class scores below 0 there. Higher = less bias.
- **Space preference**: for every ground-truth object, its IoU with the prediction and the
  distance of its centroid from the image centre; objects are binned by distance, each
  bin's mIoU computed, and the score is the mean slope between consecutive bins
  (delta mIoU / delta distance). Central objects segmented better than peripheral ones
  give a negative slope; 0 = no space preference. Higher = less bias.

The paper gives the curve's construction in an appendix we do not have; the choices here
(stated so results can be compared): distance = |centroid - centre| / half the image
diagonal, in [0, 1]; 5 equal-width bins; objects = instance masks where the dataset has
them, else 8-connected components of each class; an object's IoU counts as false
positives only the predicted pixels of its class that lie inside its bounding box grown by
a quarter of its size on each side and are not ground truth of that class (so other
objects of the same class are not charged to it); a bin's mIoU sums intersections and
unions per class over its objects, then averages over the classes present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

# 8-connectivity: a thin diagonal object is one object, not many.
_EIGHT = np.ones((3, 3), dtype=bool)


def class_preference(confusion: np.ndarray, exclude: tuple[int, ...] = ()) -> dict[str, Any]:
    """Class-preference score of a (C, C) confusion matrix (rows = ground truth).

    Args:
        exclude: class indices left out of the average (e.g. a background class).

    Returns:
        {"score": mean over scored classes, "per_class": (C,) float (NaN for classes that
        never occur in the ground truth or are excluded), "preferred": (C,) int, the
        most-confused other class of each class (-1 where not scored)}.
    """
    m = np.asarray(confusion, dtype=np.float64)
    rows = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = m / rows  # (C, C), NaN rows for absent classes
    C = m.shape[0]
    off = norm.copy()
    np.fill_diagonal(off, -np.inf)
    preferred = off.argmax(axis=1)
    per_class = np.diag(norm) - off.max(axis=1) if C > 1 else np.diag(norm).copy()
    scored = (rows[:, 0] > 0) & ~np.isin(np.arange(C), exclude)
    per_class = np.where(scored, per_class, np.nan)
    score = float(np.nanmean(per_class)) if scored.any() else float("nan")
    return {"score": score, "per_class": per_class, "preferred": np.where(scored, preferred, -1)}


@dataclass
class SpacePreference:
    """Streaming space-preference accumulator: ``update`` per image, then ``compute``.

    Args:
        num_classes: C.
        background_index: a class that is not an object (never scored), or None.
        ignore_index: label value ignored everywhere.
        bins: number of equal-width distance bins over [0, 1].
        min_objects: bins with fewer objects are left out of the curve and the slope.
    """

    num_classes: int
    background_index: int | None = None
    ignore_index: int = 255
    bins: int = 5
    min_objects: int = 5
    objects: list[tuple[float, int, float, float]] = field(default_factory=list)  # (distance, class, I, U)

    def update(self, pred: np.ndarray, label: np.ndarray, instances: np.ndarray | None = None) -> None:
        """Add one image: pred, label (H, W) class ids; instances (H, W) object ids (0 = none) or None."""
        pred, label = np.asarray(pred), np.asarray(label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
        H, W = label.shape
        half_diagonal = 0.5 * float(np.hypot(H, W))
        centre = np.array([(H - 1) / 2, (W - 1) / 2])
        valid = label != self.ignore_index
        for cls, (sy, sx), mask in _objects(label, instances, self.ignore_index, self.background_index):
            ys, xs = np.nonzero(mask)
            ys, xs = ys + sy.start, xs + sx.start  # image coordinates
            distance = float(np.hypot(ys.mean() - centre[0], xs.mean() - centre[1])) / half_diagonal
            inter = float(np.count_nonzero(pred[sy, sx][mask] == cls))
            window = _grown_box(ys, xs, H, W)
            false_pos = (pred[window] == cls) & (label[window] != cls) & valid[window]
            union = float(ys.size) + float(np.count_nonzero(false_pos))
            self.objects.append((min(distance, 1.0), int(cls), inter, union))

    def merge(self, other: "SpacePreference") -> "SpacePreference":
        self.objects.extend(other.objects)
        return self

    def compute(self) -> dict[str, Any]:
        """{"score": mean slope, "centres": (B,), "miou": (B,) NaN for thin bins,
        "counts": (B,), "slopes": (B-1,) between consecutive kept bins}."""
        edges = np.linspace(0.0, 1.0, self.bins + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        miou = np.full(self.bins, np.nan)
        counts = np.zeros(self.bins, dtype=int)
        if self.objects:
            data = np.array(self.objects, dtype=np.float64)  # (N, 4)
            which = np.clip(np.searchsorted(edges, data[:, 0], side="right") - 1, 0, self.bins - 1)
            for b in range(self.bins):
                rows = data[which == b]
                counts[b] = len(rows)
                if counts[b] < self.min_objects:
                    continue
                classes = rows[:, 1].astype(int)
                inter = np.bincount(classes, rows[:, 2], minlength=self.num_classes)
                union = np.bincount(classes, rows[:, 3], minlength=self.num_classes)
                present = union > 0
                miou[b] = float((inter[present] / union[present]).mean())
        kept = ~np.isnan(miou)
        slopes = np.diff(miou[kept]) / np.diff(centres[kept])
        score = float(slopes.mean()) if slopes.size else float("nan")
        return {"score": score, "centres": centres, "miou": miou, "counts": counts, "slopes": slopes}


def _objects(label: np.ndarray, instances: np.ndarray | None, ignore_index: int, background: int | None):
    """Yield (class, (row slice, column slice), mask inside the slices) for every object."""
    not_object = {ignore_index} | ({background} if background is not None else set())
    if instances is not None:
        instances = np.asarray(instances)
        if instances.shape != label.shape:
            raise ValueError(f"instance map {instances.shape} and label {label.shape} differ in size")
        ids = np.where(instances == ignore_index, 0, instances).astype(np.int64)
        for obj, box in enumerate(ndimage.find_objects(ids), start=1):
            if box is None:
                continue
            inside = ids[box] == obj
            classes = label[box][inside]
            classes = classes[~np.isin(classes, list(not_object))]
            if classes.size:  # an instance takes its majority class (VOC: one class each)
                cls = int(np.bincount(classes).argmax())
                yield cls, box, inside & (label[box] == cls)
        return
    for cls in np.unique(label):
        if int(cls) in not_object:
            continue
        components, _ = ndimage.label(label == cls, structure=_EIGHT)
        for k, box in enumerate(ndimage.find_objects(components), start=1):
            yield int(cls), box, components[box] == k


def _grown_box(ys: np.ndarray, xs: np.ndarray, H: int, W: int) -> tuple[slice, slice]:
    """The object's bounding box grown by a quarter of its size per side, clipped to the image."""
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    gy, gx = (y1 - y0 + 3) // 4, (x1 - x0 + 3) // 4
    return slice(max(0, y0 - gy), min(H, y1 + gy)), slice(max(0, x0 - gx), min(W, x1 + gx))
