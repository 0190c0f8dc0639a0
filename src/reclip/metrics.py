"""Streaming semantic-segmentation metrics from a confusion matrix.

mIoU is dataset-level, as in mmsegmentation's IoUMetric: intersections and unions are
summed over all images, IoU_c = I_c / U_c per class, and the mean is a nanmean, where a
class with U_c = 0 (never in the ground truth AND never predicted) is NaN and skipped. A
class absent from the ground truth but predicted has U_c > 0 and I_c = 0: IoU 0, counted.

``compute(absent_as_zero=True)`` reproduces the official ReCLIP evaluation
(dogehhh/ReCLIP utils/test_mIoU.py with nan_to_num=0, then sum / C): skipped classes
count as 0 in the mean.

:func:`seen_unseen_miou` splits the per-class IoUs as the zero-shot segmentation
literature reports them (ZS3Net, SPNet, ZegFormer, MAFT): mIoU over the seen classes,
over the unseen classes, and their harmonic mean hIoU.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["ConfusionMatrix", "seen_unseen_miou"]


class ConfusionMatrix:
    """Accumulates a (C, C) confusion matrix: rows = ground truth, columns = prediction.

    Args:
        num_classes: C; valid label and prediction values are 0..C-1.
        ignore_index: label value whose pixels are skipped (255 in every protocol).

    Attributes:
        matrix: (C, C) int64 numpy array, ``matrix[g, p]`` = pixels of class g predicted p.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes <= 0:
            raise ValueError(f"ConfusionMatrix: num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def reset(self) -> None:
        """Zero the matrix."""
        self.matrix[:] = 0

    def update(self, pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor) -> None:
        """Add one image (H, W) or a batch (B, H, W) of predictions against labels.

        Args:
            pred: integer class ids 0..C-1, same shape as label (upsample logits to the
                label size before the argmax).
            label: integer ground truth 0..C-1 or ignore_index.

        Raises:
            ValueError: shape mismatch, non-integer inputs, or ids outside 0..C-1 (labels
                other than ignore_index; predictions anywhere on non-ignored pixels).
        """
        if tuple(pred.shape) != tuple(label.shape):
            raise ValueError(
                f"ConfusionMatrix.update: pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}; "
                "resize predictions to the label size (H, W) first"
            )
        if pred.ndim not in (2, 3):
            raise ValueError(f"ConfusionMatrix.update: expected (H, W) or (B, H, W), got shape {tuple(pred.shape)}")
        use_torch = isinstance(pred, torch.Tensor) or isinstance(label, torch.Tensor)
        if use_torch:
            p = torch.as_tensor(pred)
            g = torch.as_tensor(label, device=p.device)
            if p.is_floating_point() or g.is_floating_point():
                raise ValueError("ConfusionMatrix.update: pred and label must be integer class ids, not floats")
            p, g = p.reshape(-1).long(), g.reshape(-1).long()
            keep = g != self.ignore_index
            p, g = p[keep], g[keep]
            self._check_range(int(g.min()) if g.numel() else 0, int(g.max()) if g.numel() else 0, "label")
            self._check_range(int(p.min()) if p.numel() else 0, int(p.max()) if p.numel() else 0, "pred")
            counts = torch.bincount(g * self.num_classes + p, minlength=self.num_classes ** 2)  # (C*C,)
            self.matrix += counts.cpu().numpy().astype(np.int64).reshape(self.num_classes, self.num_classes)
        else:
            p, g = np.asarray(pred), np.asarray(label)
            if not (np.issubdtype(p.dtype, np.integer) and np.issubdtype(g.dtype, np.integer)):
                raise ValueError("ConfusionMatrix.update: pred and label must be integer class ids, not floats")
            p, g = p.reshape(-1).astype(np.int64), g.reshape(-1).astype(np.int64)
            keep = g != self.ignore_index
            p, g = p[keep], g[keep]
            self._check_range(int(g.min()) if g.size else 0, int(g.max()) if g.size else 0, "label")
            self._check_range(int(p.min()) if p.size else 0, int(p.max()) if p.size else 0, "pred")
            counts = np.bincount(g * self.num_classes + p, minlength=self.num_classes ** 2)  # (C*C,)
            self.matrix += counts.reshape(self.num_classes, self.num_classes)

    def _check_range(self, lo: int, hi: int, what: str) -> None:
        if lo < 0 or hi >= self.num_classes:
            extra = f" or {self.ignore_index} (ignore)" if what == "label" else ""
            raise ValueError(
                f"ConfusionMatrix.update: {what} values span {lo}..{hi} but must be 0..{self.num_classes - 1}{extra}; "
                "check num_classes and the label conversion of the dataset protocol"
            )

    # -- combining -------------------------------------------------------------------
    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix (e.g. from another process) into this one; returns self."""
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"ConfusionMatrix.merge: incompatible matrices (num_classes {self.num_classes} vs "
                f"{other.num_classes}, ignore_index {self.ignore_index} vs {other.ignore_index})"
            )
        self.matrix += other.matrix
        return self

    def state_dict(self) -> dict[str, Any]:
        """Plain state for checkpoints: {"num_classes", "ignore_index", "matrix" (C, C) int64}."""
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index, "matrix": self.matrix.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from state_dict() (must have the same num_classes)."""
        m = np.asarray(state["matrix"], dtype=np.int64)
        if m.shape != self.matrix.shape or int(state["num_classes"]) != self.num_classes:
            raise ValueError(f"ConfusionMatrix.load_state_dict: matrix shape {m.shape} != {self.matrix.shape}")
        self.ignore_index = int(state["ignore_index"])
        self.matrix = m.copy()

    def all_reduce(self, group: Any = None) -> ConfusionMatrix:
        """Sum the matrix over all torch.distributed processes (no-op if not initialised)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            backend = dist.get_backend(group)
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            t = torch.from_numpy(self.matrix).to(device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            self.matrix = t.cpu().numpy().astype(np.int64)
        return self

    # -- metrics ---------------------------------------------------------------------
    def row_normalized(self) -> np.ndarray:
        """(C, C) float64: each ground-truth row divided by its pixel count (NaN rows for absent classes)."""
        rows = self.matrix.sum(axis=1, keepdims=True).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.matrix / rows

    def compute(self, absent_as_zero: bool = False) -> dict[str, Any]:
        """Metrics as fractions in [0, 1].

        Args:
            absent_as_zero: count classes with union 0 as IoU (and accuracy) 0 in the means,
                dividing by C (official ReCLIP evaluation). Default: nanmean (mmseg).

        Returns:
            dict with
              "mIoU": float, mean IoU (NaN when no class can be scored),
              "IoU": (C,) float64, NaN for classes with union 0,
              "aAcc": float, pixel accuracy over all non-ignored pixels,
              "mAcc": float, mean per-class accuracy,
              "Acc": (C,) float64, per-class accuracy (recall), NaN for classes absent from the labels,
              "num_pixels": int, non-ignored pixels counted,
              "present": (C,) bool, classes present in the labels.
        """
        m = self.matrix.astype(np.float64)
        inter = np.diag(m)  # (C,)
        area_label = m.sum(axis=1)  # (C,) ground truth per class
        area_pred = m.sum(axis=0)  # (C,) predictions per class
        union = area_label + area_pred - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / union  # 0/0 -> NaN
            acc = inter / area_label
            a_acc = inter.sum() / area_label.sum()
        return {
            "mIoU": _mean(iou, absent_as_zero),
            "IoU": iou,
            "aAcc": float(a_acc),
            "mAcc": _mean(acc, absent_as_zero),
            "Acc": acc,
            "num_pixels": int(self.matrix.sum()),
            "present": area_label > 0,
        }


def _mean(values: np.ndarray, absent_as_zero: bool) -> float:
    if values.size == 0:
        return float("nan")
    if absent_as_zero:
        return float(np.nan_to_num(values, nan=0.0).sum() / values.size)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def seen_unseen_miou(iou: np.ndarray, unseen: np.ndarray, absent_as_zero: bool = False) -> dict[str, float]:
    """The zero-shot split of per-class IoUs: mIoU of the seen classes, of the unseen ones, and hIoU.

    hIoU = 2 s u / (s + u), the harmonic mean of the two (ZS3Net / SPNet / ZegFormer /
    MAFT); 0 when both are 0, NaN when either is NaN (a group without a scored class).
    Each group's mean follows :meth:`ConfusionMatrix.compute`: a nanmean over the group's
    classes (classes with union 0 skipped), or with ``absent_as_zero`` those count as 0
    and the sum is divided by the group's size.

    Args:
        iou: (C,) per-class IoU (``compute()["IoU"]``), NaN for classes with union 0.
        unseen: (C,) bool, True for the unseen classes.

    Returns:
        {"mIoU_seen", "mIoU_unseen", "hIoU"} as fractions in [0, 1] (or NaN).
    """
    iou = np.asarray(iou, dtype=np.float64)
    unseen = np.asarray(unseen, dtype=bool)
    if iou.ndim != 1 or unseen.shape != iou.shape:
        raise ValueError(f"seen_unseen_miou: iou {iou.shape} and unseen {unseen.shape} must both be (C,)")
    seen_miou = _mean(iou[~unseen], absent_as_zero)
    unseen_miou = _mean(iou[unseen], absent_as_zero)
    if math.isnan(seen_miou) or math.isnan(unseen_miou):
        h = float("nan")
    elif seen_miou + unseen_miou == 0:
        h = 0.0
    else:
        h = 2 * seen_miou * unseen_miou / (seen_miou + unseen_miou)
    return {"mIoU_seen": seen_miou, "mIoU_unseen": unseen_miou, "hIoU": h}
