"""The losses of the rectification stage, as functions (paper eq. 5 and eq. 7).

- :func:`gumbel_masks`: hard Gumbel-softmax masks over classes with a straight-through
  gradient (eq. 5; official ``F.gumbel_softmax(100 * M_o, tau=1, hard=True)``);
- :func:`contrastive_loss`: masked features pooled per class and classified against
  W_q, cross-entropy over each image's hypotheses (eq. 7; official pooling
  ``AdaptiveAvgPool2d(1)`` = sum / n, scale ``exp(logit_scale)`` = 100, summed over images
  and divided by the batch size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["POOLS", "contrastive_loss", "gumbel_masks"]

POOLS = ("official", "mask_area", "cosine")


def gumbel_masks(
    logits: Tensor, tau: float = 1.0, scale: float = 100.0, generator: torch.Generator | None = None
) -> Tensor:
    """Hard Gumbel-softmax over classes with a straight-through gradient (eq. 5).

    Official: ``F.gumbel_softmax(100 * M_o, tau=1, hard=True)`` over the class axis; with
    ``generator=None`` this draws the same noise as ``F.gumbel_softmax`` would from the
    global RNG (same sampling call), so the two agree for the same seed.

    Args:
        logits: (B, C, h, w).
        tau: temperature tau_1.
        scale: factor applied to the logits first.
        generator: optional RNG for reproducible noise.

    Returns:
        (B, C, h, w) one-hot over C in the forward pass; gradients of the soft sample.
    """
    scaled = logits * scale
    # Gumbel(0, 1) noise exactly as F.gumbel_softmax draws it
    noise = torch.empty_like(scaled, memory_format=torch.legacy_contiguous_format).exponential_(generator=generator)
    noise = -noise.log()
    soft = ((scaled + noise) / tau).softmax(dim=1)
    hard = torch.zeros_like(soft).scatter_(1, soft.argmax(dim=1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


def contrastive_loss(
    features: Tensor,
    masks: Tensor,
    query_weights: Tensor,
    hypotheses: Tensor,
    scale: float = 100.0,
    pool: str = "official",
) -> Tensor:
    """The contrastive loss of eq. 7 on masked, pooled features.

    For image b and class k in its hypotheses H_b: Z_g[b, k] = pool(Z_b * mask_b[k]),
    S[b, k, j] = scale * <Z_g[b, k], W_q[j]>, loss_b = mean over k in H_b of
    CE(S[b, k, :], k). Loss = sum_b loss_b / B: an image without hypotheses adds 0 but
    still counts in B (official ``loss / batch_size``).

    Args:
        features: Z (B, D, h, w).
        masks: (B, C, h, w), one-hot over C (e.g. :func:`gumbel_masks`).
        query_weights: W_q (C, D).
        hypotheses: (B, C) bool, the classes each image may contain.
        scale: 1 / tau (official ``exp(logit_scale)`` = 100).
        pool: "official" (sum / n, the official AdaptiveAvgPool2d), "mask_area"
            (sum / mask area) or "cosine" (cosine of the masked mean with W_q).

    Returns:
        Scalar loss.
    """
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; available: {list(POOLS)}")
    B, C = masks.shape[:2]
    if hypotheses.shape != (B, C):
        raise ValueError(f"hypotheses must be (B, C) = {(B, C)}, got {tuple(hypotheses.shape)}")
    n = features.shape[-2] * features.shape[-1]
    pooled = torch.einsum("bdhw,bchw->bcd", features, masks)  # (B, C, D) masked sums
    if pool == "official":
        pooled = pooled / n
    elif pool == "mask_area":
        pooled = pooled / masks.sum(dim=(2, 3)).clamp(min=1.0)[..., None]
    else:
        pooled = F.normalize(pooled, dim=-1)
    logits = scale * pooled @ query_weights.t()  # (B, C, C): row k scores class k's region
    ce = -logits.log_softmax(dim=-1).diagonal(dim1=1, dim2=2)  # (B, C): -log p(k | region k)
    weights = hypotheses.to(ce.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)  # mean over H_b
    return (ce * weights).sum() / B
