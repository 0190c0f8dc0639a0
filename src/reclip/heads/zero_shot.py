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

__all__ = ["ZeroShotSegmentor", "reduce_synonyms"]


def reduce_synonyms(query_logits: Tensor, class_index: Tensor, num_classes: int) -> Tensor:
    """Class scores as the max over each class's synonyms.

    query_logits (B, S, h, w), class_index (S,) long in [0, num_classes) ->
    (B, num_classes, h, w). Every class must own at least one row of ``class_index``.
    """
    B, S, h, w = query_logits.shape
    if S == num_classes and torch.equal(class_index, torch.arange(S, device=class_index.device)):
        return query_logits  # one query per class, already in class order
    index = class_index.view(1, S, 1, 1).expand(B, S, h, w)
    out = query_logits.new_full((B, num_classes, h, w), float("-inf"))
    return out.scatter_reduce(1, index, query_logits, reduce="amax", include_self=True)


class ZeroShotSegmentor(nn.Module):
    """Training-free segmentor: cosine similarity of dense CLIP features and text queries.

    Args:
        clip: a CLIP with a ViT image tower (not copied; frozen by the caller).
        text_weights: (S, D) L2-normalised query embeddings, one row per query name
            (a class may own several rows: synonyms).
        class_index: (S,) long, the class of each row, in [0, num_classes).
        num_classes: C; every class must own at least one row.
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

    def __init__(
        self,
        clip: CLIP,
        text_weights: Tensor,
        class_index: Tensor,
        num_classes: int,
        strategy: str | LastBlock = "maskclip",
    ) -> None:
        super().__init__()
        if text_weights.ndim != 2:
            raise ValueError(f"text_weights must be (S, D), got shape {tuple(text_weights.shape)}")
        S, D = text_weights.shape
        if D != clip.visual.output_dim:
            raise ValueError(f"text_weights have D={D} but the CLIP embeds to {clip.visual.output_dim}")
        norms = text_weights.detach().float().norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-2):
            raise ValueError(
                f"text_weights rows must be L2-normalised (norms {norms.min().item():.4g}.."
                f"{norms.max().item():.4g}); pass F.normalize(text_weights, dim=-1)"
            )
        class_index = torch.as_tensor(class_index)
        if class_index.shape != (S,) or class_index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"class_index must be an integer tensor of shape ({S},), got "
                             f"{class_index.dtype} {tuple(class_index.shape)}")
        if S and (class_index.min() < 0 or class_index.max() >= num_classes):
            raise ValueError(f"class_index values must lie in [0, {num_classes}), got "
                             f"{class_index.min().item()}..{class_index.max().item()}")
        missing = sorted(set(range(num_classes)) - set(class_index.tolist()))
        if missing:
            raise ValueError(f"classes {missing} have no query row in class_index; every class needs >= 1 name")
        self.clip = clip
        self.num_classes = num_classes
        self.strategy = get_strategy(strategy)
        self.register_buffer("text_weights", text_weights.detach().clone())
        self.register_buffer("class_index", class_index.detach().to(torch.long).clone())

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
        logits = reduce_synonyms(self.query_logits(images), self.class_index, self.num_classes)
        h, w = logits.shape[-2:]
        p = self.patch_size
        if (h * p, w * p) != (H, W):
            # Padding happened: resample to the padded pixel grid, where each patch covers
            # exactly its pixels, then drop the padded bottom/right border.
            logits = F.interpolate(logits, size=(h * p, w * p), mode="bilinear", align_corners=False)
            logits = logits[..., :H, :W]
        return logits
