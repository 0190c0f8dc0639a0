"""Zero-shot segmentation head: dense CLIP features against text query embeddings.

The training-free methods (MaskCLIP, SCLIP, ClearCLIP, NACLIP) differ only in the
dense-feature strategy (:mod:`reclip.features`); the head is the same for all of them:
raw cosine similarity between each patch feature and each L2-normalised query
embedding, and a class's score is the max over its synonyms (METHODS.md section 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reclip.clip.model import CLIP
from reclip.features import LastBlock, dense_features_with_grid, get_strategy
from reclip.text import QueryEmbeddings, max_over_synonyms

__all__ = ["ZeroShotSegmentor"]


class ZeroShotSegmentor(nn.Module):
    """Training-free segmentor: cosine similarity of dense CLIP features and text queries.

    Args:
        clip: a CLIP with a ViT image tower (not copied; frozen by the caller).
        queries: the query embeddings W_q (``reclip.text.query_embeddings``): (S, D)
            L2-normalised rows, one per name, and the class of each row (synonyms).
        strategy: last-block strategy, a preset name of ``reclip.features.STRATEGIES``
            or a ``LastBlock``.

    Output contract of ``forward(images)``, images (B, 3, H, W) normalised:
        logits (B, C, h', w') of raw cosine similarities (no temperature), a class's
        score being the max over its synonyms, aligned with the UNPADDED input:

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
        self.one_per_class = queries.is_one_per_class

    @property
    def patch_size(self) -> int:
        return self.clip.visual.patch_size

    def query_logits(self, images: Tensor) -> Tensor:
        """Per-query cosine similarities on the patch grid: (B, 3, H, W) -> (B, S, h, w).

        Not yet reduced over synonyms and not cropped; the official SCLIP-family code
        averages these over sliding windows and applies softmax before the synonym max.
        """
        feats = dense_features_with_grid(self.clip, images, self.strategy).features  # (B, D, h, w)
        return torch.einsum("bdhw,sd->bshw", feats, self.text_weights.to(feats.dtype))

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) normalised -> logits (B, C, h', w'); see the class docstring."""
        H, W = images.shape[-2:]
        logits = self.query_logits(images)  # (B, S, h, w)
        if not self.one_per_class:
            logits = max_over_synonyms(logits, self.class_index, self.num_classes, dim=1)  # (B, C, h, w)
        h, w = logits.shape[-2:]
        p = self.patch_size
        if (h * p, w * p) != (H, W):
            # Padding happened: resample to the padded pixel grid, where each patch covers
            # exactly its pixels, then drop the padded bottom/right border.
            logits = F.interpolate(logits, size=(h * p, w * p), mode="bilinear", align_corners=False)
            logits = logits[..., :H, :W]
        return logits
