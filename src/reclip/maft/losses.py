"""MAFT's fine-tuning losses (Jiao et al. 2023, section 3.3), as pure functions.

    l_ma = mask_aware_loss(probs, proposals, targets, keep=keep)   # probs (B, N, C) of the proposals
    l_sd = self_distillation_loss(student_probs, teacher_probs)    # whole image, (B, C)
    loss = l_ma + SELF_DISTILLATION_WEIGHT * l_sd

Class scores come from the segmentor being trained (``MAFTSegmentor.proposal_probabilities``
and ``reclip.maft.train.whole_image_probabilities``: softmax of 100 x cosine).

Mask-aware loss: for each image and each class c present in its class-mask map, the N
proposals' softmax scores for c are regressed (SmoothL1, beta 1) onto their IoUs with
c's mask, min-max normalised over the proposals. The IoU is the soft IoU of the
proposal (values in [0, 1]) and the binary class mask, and carries no gradient.

Self-distillation: SmoothL1 between the softmax class scores of the fine-tuned and the
frozen CLIP on the WHOLE image (the ordinary CLS embedding, no proposal), so that the
fine-tuned encoder keeps CLIP's image-level predictions (its transferability).

Facts from the official code (jiaosiyu1999/MAFT @ cfff847, freeseg/MAFT.py ``forward``,
``get_iou``, ``mynorm``; freeseg/modeling/clip_adapter/adapter.py ``get_sim_logits``;
freeseg/config.py ``dis_weight``), which these functions follow:

- scores: softmax over the classes of ``100 * cosine(embedding, text)`` (a trailing
  "non-object" column is dropped there before the softmax; reclip has none);
- IoU: ``sum(G * M) / (sum(G) + sum(M) - sum(G * M) + 1e-7)``, M the sigmoid proposal
  resized (bilinear) to the label size, G the binary mask of one ground-truth class,
  detached; min-max over the proposals with ``+1e-8`` in the denominator, so a
  constant column (all proposals with the same IoU) gives targets 0, not a division by 0;
- SmoothL1 (PyTorch default beta 1, mean over every (class, proposal) entry);
- self-distillation compares WHOLE-IMAGE scores: ``IPCLIP(clip_images_480, None)``
  (the fine-tuned encoder without masks: the ordinary CLS path) against the frozen
  CLIP's ``get_image_features(clip_images_480, None)``, both softmaxed over the classes,
  SmoothL1, weight ``dis_weight = 0.1``. It is not a comparison of proposal scores.

Differences here: the proposal's area ``sum(M)`` counts only ``valid`` pixels (the
image, not a training crop's padding; the official code counts its padding too), and
proposals marked False in ``keep`` (padding of a batch whose images have different
numbers of proposals) are left out of the loss and of the min-max.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IOU_EPS", "MINMAX_EPS", "SELF_DISTILLATION_WEIGHT", "mask_aware_loss", "maft_loss", "minmax_normalize",
           "proposal_class_iou", "self_distillation_loss"]

IOU_EPS = 1e-7  # official get_iou
MINMAX_EPS = 1e-8  # official mynorm
SELF_DISTILLATION_WEIGHT = 0.1  # official cfg.MODEL.dis_weight


def minmax_normalize(x: Tensor, dim: int = 0, eps: float = MINMAX_EPS) -> Tensor:
    """``(x - min) / (max - min + eps)`` along ``dim``: a constant slice gives zeros."""
    low = x.amin(dim=dim, keepdim=True)
    high = x.amax(dim=dim, keepdim=True)
    return (x - low) / (high - low + eps)


@torch.no_grad()
def proposal_class_iou(proposals: Tensor, targets: Tensor, classes: Tensor, *, valid: Tensor | None = None,
                       eps: float = IOU_EPS) -> Tensor:
    """Soft IoU of each proposal with each listed class's mask, for ONE image.

    Args:
        proposals: (N, H, W) proposal masks in [0, 1] (resized bilinearly to the
            targets' size when they differ).
        targets: (H, W) int class map; class c's mask is ``targets == c``.
        classes: (K,) the classes to score.
        valid: optional (H, W) bool: pixels outside (a crop's padding) count in no area.

    Returns:
        (N, K) float32 ``sum(G M) / (sum G + sum M - sum(G M) + eps)``, no gradient.
    """
    if proposals.shape[-2:] != targets.shape[-2:]:
        proposals = F.interpolate(proposals[None].float(), size=tuple(targets.shape[-2:]), mode="bilinear",
                                  align_corners=False)[0]
    m = proposals.float().flatten(1)  # (N, P)
    if valid is not None:
        m = m * valid.flatten().to(m.dtype)
    g = (targets.flatten()[None] == classes.to(targets.device)[:, None]).to(m.dtype)  # (K, P)
    inter = m @ g.t()  # (N, K)
    union = g.sum(1)[None] + m.sum(1)[:, None] - inter
    return inter / (union + eps)


def mask_aware_loss(probs: Tensor, proposals: Tensor, targets: Tensor, *, keep: Tensor | None = None,
                    valid: Tensor | None = None, ignore_index: int = 255) -> Tensor:
    """MAFT's mask-aware loss over a batch.

    Args:
        probs: (B, N, C) softmax class scores of the proposals.
        proposals: (B, N, H, W) proposal masks in [0, 1] (no gradient needed).
        targets: (B, H, W) class-mask map: class ids 0..C-1 (the classes supervised,
            e.g. the seen classes' ground truth or a teacher's pseudo labels) and
            ``ignore_index`` where no class mask applies (void, unseen classes, padding).
        keep: (B, N) bool, the real proposals (False: batch padding); default all.
        valid: (B, H, W) bool, the image's pixels (False: a crop's padding); default all.

    Returns:
        Scalar: SmoothL1 (beta 1) mean over every (image, present class, kept proposal)
        between the score and the min-max normalised IoU. A batch without any class mask
        gives ``0 * probs.sum()`` (connected to the graph, as the engine needs).
    """
    B, N, C = probs.shape
    if proposals.shape[:2] != (B, N) or targets.shape[0] != B:
        raise ValueError(f"mask_aware_loss: probs {tuple(probs.shape)}, proposals {tuple(proposals.shape)} and "
                         f"targets {tuple(targets.shape)} disagree (expected (B, N, C), (B, N, H, W), (B, H, W))")
    scores, goals = [], []
    for b in range(B):
        present = targets[b].unique()
        present = present[(present != ignore_index) & (present >= 0) & (present < C)]
        rows = torch.ones(N, dtype=torch.bool, device=probs.device) if keep is None else keep[b].to(probs.device)
        if present.numel() == 0 or not rows.any():
            continue
        iou = proposal_class_iou(proposals[b][rows.to(proposals.device)], targets[b], present,
                                 valid=None if valid is None else valid[b])  # (n, K)
        goals.append(minmax_normalize(iou, dim=0).to(probs.device).flatten())
        scores.append(probs[b][rows][:, present.to(probs.device)].flatten())  # (n * K,)
    if not scores:
        return 0.0 * probs.sum()
    return F.smooth_l1_loss(torch.cat(scores), torch.cat(goals).to(probs.dtype), beta=1.0)


def self_distillation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """SmoothL1 (beta 1, mean) between the fine-tuned and the frozen CLIP's whole-image
    class scores, both (B, C) softmax probabilities; the teacher's carry no gradient."""
    if student.shape != teacher.shape:
        raise ValueError(f"self_distillation_loss: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    return F.smooth_l1_loss(student, teacher.detach(), beta=1.0)


def maft_loss(proposal_probs: Tensor, proposals: Tensor, targets: Tensor, student_probs: Tensor,
              teacher_probs: Tensor, *, keep: Tensor | None = None, valid: Tensor | None = None,
              ignore_index: int = 255, weight: float = SELF_DISTILLATION_WEIGHT) -> tuple[Tensor, dict[str, Tensor]]:
    """``mask_aware + weight * self_distillation`` and its two terms (the second weighted)."""
    ma = mask_aware_loss(proposal_probs, proposals, targets, keep=keep, valid=valid, ignore_index=ignore_index)
    sd = weight * self_distillation_loss(student_probs, teacher_probs)
    return ma + sd, {"mask_aware": ma.detach(), "self_distillation": sd.detach()}
