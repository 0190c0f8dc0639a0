"""The rectifier's head on a student's features (paper III-E, Table IX).

The distilled student replaces CLIP's Z by its own feature Z_hat (B, D, h, w) and
inherits, frozen, what the rectification stage learnt: the Query head W_q, the bias
logits and the mask decoder. Everything CLIP contributed is stored as tensors, so a
student runs without CLIP:

- ``query``: W_q (C, D), unit rows;
- ``reference``: W_r (C, D), the Reference prompt's embeddings (ReCLIP's dependent bias
  reads Z_hat W_r^T; ReCLIP++'s independent bias only through ``bias_map``);
- ``bias_map``: the positional part of M_b on the teacher's training grid, (1, C, h0, w0):
  ReCLIP++'s W_p W_r^T (eq. 2), or ReCLIP's ProjNet(PE). On a student's grid it is resized
  bilinearly; resizing W_p and then multiplying by W_r is the same map, since both are
  linear;
- ``decoder``: the trained mask decoder (eq. 4), in eval mode (its BN running statistics).

:class:`InheritedHead` with ``decoder=None`` and no bias is MaskCLIP+'s head (the query
alone). :func:`inherit` builds it from a trained :class:`~reclip.heads.rectify.Rectifier`
with the parts of a Table IX row: all three (the paper's), the Query head alone, Query +
bias, or none ("deeplab": DeepLab's own trained 1x1 classifier); ``fresh`` (an option of
ours) keeps the structure of all three but re-initialises the decoder and the bias map as
trainable parameters.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reclip.heads.bias import DependentBias, positional_grid
from reclip.heads.decoder import MaskDecoder
from reclip.heads.rectify import OUTPUTS, Rectifier, RectifierOutputs

__all__ = ["PARTS", "InheritedHead", "inherit"]


class InheritedHead(nn.Module):
    """Z_hat (B, D, h, w) -> :class:`RectifierOutputs` with the teacher's frozen parts.

    Args:
        query: W_q (C, D).
        reference: W_r (C, D), or None (no dependent bias term).
        bias_map: (1, C, h0, w0) positional bias logits, or None (no bias: MaskCLIP+).
        decoder: a :class:`MaskDecoder`, or None (M_o = M).
        dependent: ReCLIP's bias (adds Z_hat W_r^T to the positional map).
        bias_op: "subtract" (eq. 3) or "add".
        trainable: the decoder and the bias map are trained (a fresh head); else
            frozen (requires_grad False, decoder kept in eval mode).
    """

    def __init__(self, query: Tensor, reference: Tensor | None = None, bias_map: Tensor | None = None,
                 decoder: MaskDecoder | None = None, *, dependent: bool = False, bias_op: str = "subtract",
                 trainable: bool = False, classifier: bool = False) -> None:
        super().__init__()
        if dependent and reference is None:
            raise ValueError("a dependent bias needs the Reference embeddings W_r")
        self.register_buffer("query", F.normalize(query.detach().float(), dim=-1).clone())
        self.register_buffer("reference", None if reference is None else reference.detach().float().clone())
        if bias_map is None:
            self.bias_map = None
        elif trainable:
            self.bias_map = nn.Parameter(bias_map.detach().float().clone())
        else:
            self.register_buffer("bias_map", bias_map.detach().float().clone())
        self.decoder = decoder
        # Table IX's "Ori. Head": DeepLab's own classifier (a trained 1x1 conv D -> C)
        # gives M_q; W_q stays for L_text.
        self.classifier = nn.Conv2d(self.query.shape[1], self.query.shape[0], 1) if classifier else None
        self.dependent = dependent
        self.bias_op = bias_op
        self.trainable = trainable
        self.output = "decoded"
        if decoder is not None and not trainable:
            decoder.requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return self.query.shape[0]

    @property
    def query_weights(self) -> Tensor:
        return self.query

    def train(self, mode: bool = True) -> InheritedHead:
        super().train(mode)
        if self.decoder is not None and not self.trainable:
            self.decoder.eval()  # frozen: BN uses the teacher's running statistics
        return self

    def select_output(self, name: str) -> InheritedHead:
        if name not in OUTPUTS:
            raise ValueError(f"unknown output {name!r}; available: {', '.join(OUTPUTS)}")
        self.output = name
        return self

    def outputs(self, features: Tensor) -> RectifierOutputs:
        z = features.float()
        h, w = z.shape[-2:]
        with torch.autocast(z.device.type, enabled=False):
            m_q = self.classifier(z) if self.classifier is not None else torch.einsum("bdhw,cd->bchw", z, self.query)
            m_b = torch.zeros_like(m_q)
            if self.bias_map is not None:
                m_b = m_b + F.interpolate(self.bias_map, size=(h, w), mode="bilinear", align_corners=False)
            if self.dependent:
                m_b = m_b + torch.einsum("bdhw,cd->bchw", z, self.reference)
            m = m_q - m_b if self.bias_op == "subtract" else m_q + m_b
            m_o = self.decoder(z, m) if self.decoder is not None else m
        return RectifierOutputs(z, m_q, m_b, m, m_o)

    def forward(self, features: Tensor) -> Tensor:
        return getattr(self.outputs(features), OUTPUTS[self.output])


PARTS = ("all", "query", "query_bias", "query_reference", "deeplab", "fresh")


@torch.no_grad()
def inherit(teacher: Rectifier, grid: tuple[int, int], *, fresh: bool = False, parts: str = "all") -> InheritedHead:
    """The head a student inherits from a trained rectifier (paper III-E).

    ``grid``: (h0, w0), the teacher's feature grid at the training crop, where its
    positional bias is read. ``parts`` (Table IX): "all" (Query, bias and decoder, the
    paper's), "query" (the Query head alone), "query_bias" (Query and bias, no decoder),
    "deeplab" (DeepLab's own classifier, "Ori. Head": nothing inherited), or "fresh" (not a
    paper row: the structure of "all" with a new trainable decoder and a zero trainable
    bias map), or "query_reference" (the official ReCLIP distillation head, ReCLIP_DISTILL_HEAD:
    Z_hat W_q^T - Z_hat W_r^T, the positional ProjNet term dropped; a ReCLIP teacher only).
    ``fresh=True`` is ``parts="fresh"``.
    """
    parts = "fresh" if fresh else parts
    if parts not in PARTS:
        raise ValueError(f"parts={parts!r}; allowed: {list(PARTS)}")
    if parts in ("query", "deeplab"):
        return InheritedHead(teacher.head.query_weights.detach(), classifier=parts == "deeplab")
    head = teacher.head
    cfg = teacher.config
    w_q = head.query_weights.detach()
    w_r = head.reference().detach()
    pe = positional_grid(teacher.clip.visual, *grid).to(w_q.device)
    dependent = isinstance(head.bias, DependentBias)
    if parts == "query_reference":
        if not dependent:
            raise ValueError("parts='query_reference' is the official ReCLIP (conference) student head; it needs a "
                             "ReCLIP teacher (dependent bias), not a ReCLIP++ one")
        return InheritedHead(w_q, w_r, None, None, dependent=True, bias_op=cfg.bias_op)
    if dependent:
        bias_map = head.bias.proj_net(pe)  # (1, C, h0, w0)
    else:
        bias_map = torch.einsum("odhw,cd->ochw", head.bias.pe_proj(pe), w_r)  # eq. 2 on the grid
    decoder = copy.deepcopy(head.decoder) if head.decoder is not None and parts != "query_bias" else None
    fresh = parts == "fresh"
    if fresh:
        bias_map = torch.zeros_like(bias_map)
        if decoder is not None:
            decoder = MaskDecoder(w_q.shape[1], w_q.shape[0]).to(w_q.device)
    return InheritedHead(w_q, w_r, bias_map, decoder, dependent=dependent, bias_op=cfg.bias_op, trainable=fresh)
