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
import torch.nn.functional as F
from torch import Tensor, nn

from reclip.clip.model import CLIP
from reclip.features import LastBlock, dense_features_with_grid, get_strategy
from reclip.text import QueryEmbeddings

__all__ = ["ZeroShotSegmentor"]


class ZeroShotSegmentor(nn.Module):
    """Training-free segmentor: cosine similarity of dense CLIP features and text queries.

    Args:
        clip: a CLIP with a ViT image tower (not copied; frozen by the caller).
        queries: the query embeddings W_q (``reclip.text.query_embeddings``): (S, D)
            L2-normalised rows, one per name, and the class of each row (synonyms).
        strategy: last-block strategy, a preset name of ``reclip.features.STRATEGIES``
            or a ``LastBlock``.

    Attributes:
        class_index: (S,) int64 buffer, the class of each query channel (synonyms share
            a class); ``reclip.inference.segment`` reads it.
        num_classes: C.
        text_weights: (S, D) buffer, the L2-normalised query embeddings.

    Output contract of ``forward(images)``, images (B, 3, H, W) normalised:
        query logits (B, S, h', w') of raw cosine similarities (no temperature), one
        channel per query (synonym), reduced to classes by ``class_index`` in
        post-processing (softmax over queries, then max over each class's synonyms;
        for class scores without a softmax use
        ``reclip.text.max_over_synonyms(logits, head.class_index, head.num_classes)``).
        S == C when every class has one name. The cosines are computed in float32 even
        under autocast (bf16 cosines are off by ~1e-3, which a logit scale of 50 turns
        into flipped labels between close classes). They are aligned with the UNPADDED
        input:

        - H and W multiples of the patch: the logits of the patch grid as they are,
          (h', w') = (H / patch, W / patch); the inference layer upsamples them;
        - otherwise the model padded the input at the bottom/right to (h*patch, w*patch);
          the grid logits are upsampled bilinearly (align_corners=False) to that padded
          size and cropped to (H, W), so (h', w') = (H, W) and pixel (i, j) of the logits
          is pixel (i, j) of the input.

        Either way the logits cover exactly the input's field of view, so upsampling them
        to (H, W) aligns them with the image.
    """

    def __init__(self, clip: CLIP, queries: QueryEmbeddings, strategy: str | LastBlock = "maskclip") -> None:
        super().__init__()
        if queries.embed_dim != clip.visual.output_dim:
            raise ValueError(f"queries have D={queries.embed_dim} but the CLIP embeds to {clip.visual.output_dim}")
        norms = queries.weights.detach().float().norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-2):
            raise ValueError(
                f"query rows must be L2-normalised (norms {norms.min().item():.4g}.."
                f"{norms.max().item():.4g}); pass F.normalize(weights, dim=-1)"
            )
        self.clip = clip
        self.num_classes = queries.num_classes
        self.strategy = get_strategy(strategy)
        self.register_buffer("text_weights", queries.weights.detach().clone())
        self.register_buffer("class_index", queries.class_index.detach().clone())

    @property
    def patch_size(self) -> int:
        return self.clip.visual.patch_size

    def query_logits(self, images: Tensor) -> Tensor:
        """Per-query cosine similarities on the patch grid: (B, 3, H, W) -> (B, S, h, w).

        float32 whatever the autocast state; not cropped (``forward`` applies the crop
        contract of the class docstring).
        """
        feats = dense_features_with_grid(self.clip, images, self.strategy).features  # (B, D, h, w)
        # Under autocast the einsum would run in bf16/fp16; cosines need float32.
        with torch.autocast(device_type=feats.device.type, enabled=False):
            return torch.einsum("bdhw,sd->bshw", feats.float(), self.text_weights.float())

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) normalised -> query logits (B, S, h', w') float32; see the class docstring."""
        H, W = images.shape[-2:]
        logits = self.query_logits(images)  # (B, S, h, w)
        h, w = logits.shape[-2:]
        p = self.patch_size
        if (h * p, w * p) != (H, W):
            # Padding happened: resample to the padded pixel grid, where each patch covers
            # exactly its pixels, then drop the padded bottom/right border.
            with torch.autocast(device_type=logits.device.type, enabled=False):
                logits = F.interpolate(logits, size=(h * p, w * p), mode="bilinear", align_corners=False)
            logits = logits[..., :H, :W]
        return logits
