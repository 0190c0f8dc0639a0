"""Zero-shot segmentation head: dense CLIP features against text query embeddings.

The training-free methods (MaskCLIP, SCLIP, ClearCLIP, NACLIP) differ only in the
dense-feature strategy (:mod:`reclip.features`); the head is the same for all of them:
raw cosine similarity between each patch feature and each L2-normalised query
embedding (METHODS.md section 1). The head returns these per-QUERY logits, one channel
per synonym, and says how they reduce to classes (``class_index``): the official
SCLIP / ClearCLIP / NACLIP code averages query logits over sliding windows and applies
the softmax over all queries BEFORE taking each class's max over its synonyms, so the
reduction belongs to post-processing (:func:`reclip.postprocess.postprocess`), not to the
head. DESIGN.md's "class logits" of the segmentor interface are, here, query logits
reduced to classes by ``class_index``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reclip.backbones.clip import DenseCLIP
from reclip.clip.model import CLIP
from reclip.features import DenseStrategy, get_strategy
from reclip.segmentor import CLIPSegmentor
from reclip.text import QueryEmbeddings

__all__ = ["QueryHead", "ZeroShotSegmentor"]


class QueryHead(nn.Module):
    """Z (B, D, h, w) -> per-query cosines (B, S, h, w) against fixed text queries W_q.

    Args:
        queries: the query embeddings (``reclip.text.query_embeddings``): (S, D)
            L2-normalised rows, one per name, and the class of each row (synonyms).

    Attributes:
        text_weights: (S, D) buffer, the L2-normalised query embeddings.
        class_index: (S,) int64 buffer, the class of each query channel.
        num_classes: C.

    The cosines are computed in float32 even under autocast (bf16 cosines are off by
    ~1e-3, which a logit scale of 50 turns into flipped labels between close classes).
    """

    def __init__(self, queries: QueryEmbeddings) -> None:
        super().__init__()
        norms = queries.weights.detach().float().norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-2):
            raise ValueError(
                f"query rows must be L2-normalised (norms {norms.min().item():.4g}.."
                f"{norms.max().item():.4g}); pass F.normalize(weights, dim=-1)"
            )
        self.num_classes = queries.num_classes
        self.register_buffer("text_weights", queries.weights.detach().clone())
        self.register_buffer("class_index", queries.class_index.detach().clone())

    def queries(self) -> Tensor:
        """W_q (S, D), one row per query (synonyms separate): what a class-aware strategy reads."""
        return self.text_weights

    def forward(self, features: Tensor) -> Tensor:
        """Z (B, D, h, w) -> query logits (B, S, h, w), float32 raw cosines (no temperature)."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            return torch.einsum("bdhw,sd->bshw", features.float(), self.text_weights.float())


class ZeroShotSegmentor(CLIPSegmentor):
    """Training-free segmentor: dense CLIP features (:class:`~reclip.backbones.DenseCLIP`)
    -> :class:`QueryHead`.

    Args:
        clip: a CLIP with a ViT image tower (not copied; frozen by the caller).
        queries: the query embeddings W_q (``reclip.text.query_embeddings``).
        strategy: last-block strategy, a preset name of ``reclip.features.STRATEGIES``
            or a ``reclip.strategies.DenseStrategy``.
        aux: the strategy's auxiliary module (e.g. a proxy model in memory), instead of
            the one the strategy builds (``DenseCLIP``).

    Output contract of ``forward(images)``, images (B, 3, H, W) normalised:
        query logits (B, S, h', w') of raw cosine similarities (no temperature), one
        channel per query (synonym), reduced to classes by ``class_index`` in
        post-processing (softmax over queries, then max over each class's synonyms;
        for class scores without a softmax use
        ``reclip.text.max_over_synonyms(logits, head.class_index, head.num_classes)``).
        S == C when every class has one name. They cover exactly the input
        (:func:`reclip.segmentor.align_to_input`): the patch grid when H and W are
        multiples of the patch, else upsampled to the padded size and cropped to (H, W).
    """

    def __init__(self, clip: CLIP, queries: QueryEmbeddings, strategy: str | DenseStrategy = "maskclip",
                 aux: nn.Module | None = None) -> None:
        if queries.embed_dim != clip.visual.output_dim:
            raise ValueError(f"queries have D={queries.embed_dim} but the CLIP embeds to {clip.visual.output_dim}")
        super().__init__(DenseCLIP(clip, get_strategy(strategy), aux=aux), QueryHead(queries))
        # class-aware strategies (ResCLIP's semantic feedback) read the head's W_q
        self.backbone.set_queries(self.head.queries)

    @property
    def class_index(self) -> Tensor:
        """(S,) int64, the class of each query channel; ``reclip.inference.segment`` reads it."""
        return self.head.class_index

    def query_logits(self, images: Tensor) -> Tensor:
        """Per-query cosines on the patch grid: (B, 3, H, W) -> (B, S, h, w), not aligned to the input."""
        return self.head(self.features(images))
