"""MAFT's inference: classify each mask proposal with IP-CLIP, paint the classes back through the masks.

For an image and its proposals M_1..M_N (soft or binary masks in [0, 1]):

    e_n   = IP-CLIP embedding of proposal n, L2-normalised   (reclip.maft.ipclip)
    s_n   = logit_scale * e_n . W_q                           (S query logits; W_q: reclip.text)
    p_n   = softmax over the S queries of s_n, then each class's max over its synonyms
    semseg[c, y, x] = sum_n p_n[c] * M_n[y, x]

(the published MAFT: ``einsum("qc,qhw->chw", softmax(logits), sigmoid(mask logits))``;
our masks are already probabilities, so M_n is used as given). The segmentor returns
``log(semseg)``, so that the inference layer's softmax (logit scale 1, MAFT's test
settings) gives ``semseg`` normalised per pixel and the argmax is MAFT's.

Proposals reach the segmentor per image: the evaluation and segmentation loops enter
``segmentor.for_image(image, image_id)`` (:func:`reclip.inference.image_context`), which
asks the segmentor's proposal source (:mod:`reclip.maft.proposals`) for that image's
masks and holds them while the image is segmented. Called outside such a context (a
plain ``segmentor(images)``), it uses the whole image and a regular grid
(:func:`~reclip.maft.proposals.grid_proposals`). Proposals cover the whole image, so
MAFT runs whole-image only: sliding windows are refused (``Family.proposals``).
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reclip.clip.model import CLIP, VisionTransformer, weights_fingerprint
from reclip.maft.ipclip import _check_start_layer, _check_threshold, ip_clip_embeddings
from reclip.maft.proposals import ProposalError, ProposalSource, check_masks, grid_proposals
from reclip.text import QueryEmbeddings, max_over_synonyms

__all__ = ["MAFTSegmentor", "PUBLISHED_LOGIT_SCALE", "is_maft_trainable", "load_visual_state", "tuned_copy"]

# MAFT's class scores: 100 x cosine (its CLIP adapter's get_sim_logits temperature).
PUBLISHED_LOGIT_SCALE = 100.0
# log(semseg) of a pixel no proposal covers: every class equal.
_FLOOR = 1e-6
# What MAFT fine-tunes, as names relative to CLIP's vision tower: every block's attention
# and its two LayerNorms, and ln_post (official freeseg/MAFT.py `_freeze`).
_TRAINABLE = re.compile(r"^(transformer\.resblocks\.\d+\.(attn|ln_1|ln_2)\.|ln_post\.)")


def is_maft_trainable(name: str) -> bool:
    """Whether MAFT fine-tunes the vision-tower parameter ``name`` (relative to ``clip.visual``)."""
    return bool(_TRAINABLE.match(name))


def tuned_copy(clip: CLIP) -> CLIP:
    """A copy of ``clip`` to fine-tune or load fine-tuned weights into: MAFT's trainable
    vision parameters require grad, everything else is frozen; its fingerprint is its own."""
    tuned = copy.deepcopy(clip)
    for name, param in tuned.named_parameters():
        param.requires_grad_(name.startswith("visual.") and is_maft_trainable(name[len("visual."):]))
    weights_fingerprint(tuned, refresh=True)
    return tuned


def load_visual_state(visual: VisionTransformer, state: Mapping[str, Tensor], where: str) -> list[str]:
    """Copy fine-tuned vision-tower tensors into ``visual``; returns the names loaded.

    Names are relative to ``clip.visual`` (``ln_post.weight``); a prefix ending in
    ``visual.`` (``visual.``, ``clip.visual.``) is dropped. Unknown names, shapes that do
    not fit, two tensors for one parameter, or an empty state raise ValueError naming
    ``where``.
    """
    own = dict(visual.named_parameters())
    tensors: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key.split("visual.", 1)[1] if "visual." in key else key
        if name in tensors:
            raise ValueError(f"{where}: two tensors for the vision parameter {name!r} (one of them {key!r})")
        tensors[name] = value
    if not tensors:
        raise ValueError(f"{where}: holds no tensor; a MAFT run stores the fine-tuned vision parameters")
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} tensor(s) are not parameters of this CLIP's vision tower, e.g. "
                         f"{unknown[:4]}; was the run made with another CLIP?")
    wrong = [f"{n} {tuple(t.shape)} vs {tuple(own[n].shape)}" for n, t in tensors.items() if t.shape != own[n].shape]
    if wrong:
        raise ValueError(f"{where}: shapes do not fit this CLIP: {wrong[:4]}; was the run made with another CLIP?")
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)
    return sorted(tensors)


class MAFTSegmentor(nn.Module):
    """Mask-proposal classification with IP-CLIP (MAFT's inference; frozen CLIP: the baseline).

    Args:
        clip: a CLIP with a ViT vision tower (MAFT: the fine-tuned copy; not copied here).
        queries: the query embeddings W_q (``reclip.text.query_embeddings``), synonyms allowed.
        start_layer: IP-CLIP's first masked block (None: ``default_start_layer``, 8 of 12).
        threshold: patch coverage at which a patch is inside a proposal, in (0, 1] (IP-CLIP's 0.5).
        logit_scale: temperature of the class scores (MAFT: 100).
        chunk: at most this many proposals per IP-CLIP pass (memory; None: one pass).
        proposals: the proposal source used inside :meth:`for_image` (None: whole image + grid).
        grid: (rows, cols) of the grid proposals used without a source.

    Output of ``forward(images)``: ``log(semseg)`` (B, C, h', w'), one channel per class
    (synonyms already reduced), float32, covering the input (see the module docstring).
    """

    def __init__(
        self,
        clip: CLIP,
        queries: QueryEmbeddings,
        *,
        start_layer: int | None = None,
        threshold: float = 0.5,
        logit_scale: float = PUBLISHED_LOGIT_SCALE,
        chunk: int | None = None,
        proposals: ProposalSource | None = None,
        grid: tuple[int, int] = (3, 3),
    ) -> None:
        super().__init__()
        start_layer = _check_start_layer(start_layer, len(clip.visual.transformer.resblocks))
        threshold = _check_threshold(threshold)
        if not logit_scale > 0:
            raise ValueError(f"logit_scale={logit_scale!r}: give a temperature > 0 (MAFT: 100)")
        self.clip = clip
        self.start_layer = start_layer
        self.threshold = threshold
        self.logit_scale = float(logit_scale)
        self.chunk = chunk
        self.proposals = proposals
        self.grid = tuple(grid)
        self.num_classes = queries.num_classes
        self.register_buffer("text_weights", F.normalize(queries.weights.detach().float(), dim=-1).clone())
        # named so that the inference layer does not take the channels for queries: they are classes
        self.register_buffer("query_class", queries.class_index.detach().clone())
        self._held: Tensor | None = None  # the proposals of the image being segmented (N, H, W)

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.clip.image_mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self.clip.image_std

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What a MAFT run stores (``reclip.train.save_run``): the MAFT-trainable vision
        parameters (:func:`is_maft_trainable`), under their names in this module (``clip.visual.*``)."""
        return {f"clip.visual.{n}": p.detach() for n, p in self.clip.visual.named_parameters() if is_maft_trainable(n)}

    # -- scores ------------------------------------------------------------------------------

    def proposal_logits(self, images: Tensor, masks: Tensor) -> Tensor:
        """images (B, 3, H, W) normalised, masks (B, N, H', W') -> query logits (B, N, S):
        ``logit_scale`` x cosine of each proposal's IP-CLIP embedding with each query."""
        emb = ip_clip_embeddings(self.clip, images, masks, start_layer=self.start_layer, threshold=self.threshold,
                                 chunk=self.chunk)  # (B, N, D)
        with torch.autocast(device_type=emb.device.type, enabled=False):
            emb = F.normalize(emb.float(), dim=-1)
            return self.logit_scale * emb @ self.text_weights.t()  # (B, N, S)

    def proposal_probabilities(self, images: Tensor, masks: Tensor) -> Tensor:
        """(B, N, C): softmax over the queries of :meth:`proposal_logits`, then each class's max
        over its synonyms (the project's synonym rule; one name per class: the softmax over classes)."""
        probs = self.proposal_logits(images, masks).softmax(dim=-1)  # (B, N, S)
        if probs.shape[-1] == self.num_classes:
            return probs
        return max_over_synonyms(probs, self.query_class, self.num_classes, dim=-1)

    def semantic_scores(self, images: Tensor, masks: Tensor) -> Tensor:
        """MAFT's semseg (B, C, H', W') at the masks' size: sum_n p_n[c] * M_n."""
        probs = self.proposal_probabilities(images, masks)  # (B, N, C)
        return torch.einsum("bnc,bnhw->bchw", probs, masks.to(probs.device, probs.dtype))

    # -- per image ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def for_image(self, image: np.ndarray, image_id: str) -> Iterator[Tensor]:
        """Hold the proposals of one image while it is segmented (one image per forward).

        image (H, W, 3) uint8 as read, image_id its id (see :mod:`reclip.maft.proposals`);
        yields the masks (N, H, W).
        """
        height, width = image.shape[:2]
        if self.proposals is None:
            masks = grid_proposals((height, width), self.grid)
        else:
            masks = check_masks(self.proposals(image, image_id), f"proposals of image {image_id!r}")
        if tuple(masks.shape[-2:]) != (height, width):
            raise ProposalError(f"proposals of image {image_id!r} have size {tuple(masks.shape[-2:])}, the image "
                                f"{(height, width)}")
        self._held = masks.to(self.text_weights.device)
        try:
            yield self._held
        finally:
            self._held = None

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) normalised -> log(semseg) (B, C, h', w'), see the class docstring.

        Inside :meth:`for_image`: one image, the held proposals, logits at their size.
        Outside: the whole image and a grid, logits at the input's size.
        """
        B, _, H, W = images.shape
        if self._held is None:
            masks = grid_proposals((H, W), self.grid).to(images.device).expand(B, -1, -1, -1)
        else:
            masks = self._held[None]
            h0, w0 = masks.shape[-2:]
            if B != 1 or abs(H * w0 - W * h0) > 0.02 * h0 * W:
                raise ValueError(f"MAFT classifies proposals of the whole image ({h0} x {w0}); it got a batch of {B} "
                                 f"input(s) of {H} x {W}. Run it whole-image (--mode whole), one image at a time")
        semseg = self.semantic_scores(images, masks)  # (B, C, h', w')
        return torch.log(semseg.float().clamp_min(_FLOOR))
