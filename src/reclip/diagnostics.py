"""Can the rectification loss (eq. 7) teach anything on this data? A check with labels.

ReCLIP++ learns from eq. 7 alone: a class's masked, pooled CLIP feature must be
classified as that class by the fixed queries W_q. That only pulls the masks towards the
truth if CLIP classifies a correctly masked region correctly. :func:`contrastive_signal`
measures this on labelled images (the labels are read here, never in training):

- ``region_accuracy``: per class, how often W_q classifies the class's pooled ground-truth
  region as that class (features pooled over the true mask, argmax over classes);
- ``loss``: eq. 7 (the model's pooling and scale, each image's true classes as its
  hypotheses) for three sets of masks: the ground truth, CLIP's own argmax of M_q, and
  the model's current prediction (argmax of M_o).

CLIP's own argmax is close to a fixed point of eq. 7 (each region is, by construction,
classified as its class), so it scores low; what matters is how far the truth is above
it, and which classes W_q cannot recognise even on their true region: for those, no head
trained by eq. 7 alone is pulled towards the truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reclip.heads.losses import contrastive_loss
from reclip.heads.rectify import Rectifier

__all__ = ["ContrastiveSignal", "contrastive_signal", "grid_masks"]


@dataclass
class ContrastiveSignal:
    """What :func:`contrastive_signal` measured (module docstring)."""

    class_names: list[str]
    region_accuracy: list[float | None]  # per class; None where the class never occurs
    loss: dict[str, float]  # "ground truth", "clip argmax", "model argmax" -> mean eq. 7 loss
    images: int

    def summary(self) -> str:
        accuracy = ", ".join(f"{n} {a:.2f}" for n, a in zip(self.class_names, self.region_accuracy) if a is not None)
        return (f"eq. 7 on {self.images} labelled images: ground-truth masks {self.loss['ground truth']:.3f}, "
                f"CLIP's argmax {self.loss['clip argmax']:.3f}, the model's argmax {self.loss['model argmax']:.3f}; "
                f"W_q's accuracy on pooled true regions: {accuracy}")


def grid_masks(labels: Tensor, num_classes: int, size: tuple[int, int], ignore_index: int = 255) -> Tensor:
    """Labels (B, H, W) -> one-hot masks (B, C, h, w) of each cell's majority class.

    Each cell of the (h, w) grid takes the class covering most of its pixels (ignored pixels
    do not vote); a cell with no valid pixel is all zeros.
    """
    valid = labels != ignore_index
    onehot = F.one_hot(labels.masked_fill(~valid, 0).long(), num_classes).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None]
    share = F.interpolate(onehot, size=size, mode="area")  # (B, C, h, w) pixel shares
    masks = F.one_hot(share.argmax(1), num_classes).permute(0, 3, 1, 2).float()
    return masks * (share.sum(1, keepdim=True) > 0)


@torch.no_grad()
def contrastive_signal(model: Rectifier, dataset, mean, std, *, limit: int | None = None,
                       batch_size: int = 16) -> ContrastiveSignal:
    """Measure eq. 7's preference on ``dataset`` (items with "image" (H, W, 3) uint8 and
    "label" (H, W)), with the model's pooling and scale; all images must have one size.

    ``mean``/``std``: CLIP's normalisation (``clip.image_mean`` / ``clip.image_std``).
    """
    model.eval()
    device = model.head.fixed_query.device
    C = model.num_classes
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n < 1:
        raise ValueError(f"nothing to measure: {len(dataset)} images, limit {limit!r}")
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    hits, counts = np.zeros(C), np.zeros(C)
    totals = {"ground truth": 0.0, "clip argmax": 0.0, "model argmax": 0.0}
    cfg = model.config
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        images = torch.stack([torch.from_numpy(np.array(it["image"])).permute(2, 0, 1) for it in items])
        labels = torch.stack([torch.from_numpy(np.array(it["label"])).long() for it in items]).to(device)
        images = (images.to(device).float() / 255 - mean_t) / std_t
        out = model.forward_train(images)
        z, w_q = out.features, model.query_weights
        truth = grid_masks(labels, C, tuple(z.shape[-2:]))
        present = truth.sum((2, 3)) > 0  # (B, C): each image's true classes as its hypotheses
        pooled = torch.einsum("bdhw,bchw->bcd", z, truth)
        predicted = (pooled @ w_q.t()).argmax(-1)  # (B, C)
        correct = (predicted == torch.arange(C, device=device)) & present
        hits += correct.sum(0).cpu().numpy()
        counts += present.sum(0).cpu().numpy()
        masks = {
            "ground truth": truth,
            "clip argmax": F.one_hot(out.query_logits.argmax(1), C).permute(0, 3, 1, 2).float(),
            "model argmax": F.one_hot(out.decoded.argmax(1), C).permute(0, 3, 1, 2).float(),
        }
        for name, m in masks.items():
            loss = contrastive_loss(z, m, w_q, present, scale=cfg.contrastive_scale, pool=cfg.pool)
            totals[name] += float(loss) * len(items)
    accuracy = [float(h / c) if c else None for h, c in zip(hits, counts)]
    names = list(getattr(model.head.reference, "class_names", [str(i) for i in range(C)]))
    return ContrastiveSignal(names, accuracy, {k: v / n for k, v in totals.items()}, n)
