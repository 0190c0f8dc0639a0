"""CLIP's ViT read densely: the last-block strategies of :mod:`reclip.features` as a backbone."""

from __future__ import annotations

from torch import Tensor, nn

from reclip.clip.model import CLIP
from reclip.features import LastBlock, dense_features, get_strategy

__all__ = ["DenseCLIP"]


class DenseCLIP(nn.Module):
    """Frozen CLIP + a last-block strategy -> Z (B, D, h, w), float32, unit L2 norm per patch.

    Args:
        clip: a CLIP with a ViT image tower (registered as ``self.clip``, not copied).
        strategy: a preset name of :data:`reclip.features.STRATEGIES` or a
            :class:`~reclip.features.LastBlock`.

    ``forward`` runs under the caller's grad mode and autocast (see
    :func:`reclip.features.dense_features`); inputs that are not a multiple of the patch
    are padded at the bottom/right, so (h, w) = ceil((H, W) / patch).
    """

    def __init__(self, clip: CLIP, strategy: str | LastBlock = "maskclip") -> None:
        super().__init__()
        self.clip = clip
        self.strategy = get_strategy(strategy)

    @property
    def stride(self) -> int:
        """Input pixels per feature cell: the ViT patch size."""
        return self.clip.visual.patch_size

    @property
    def embed_dim(self) -> int:
        """D, CLIP's joint embedding width."""
        return self.clip.visual.output_dim

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) normalised -> Z (B, D, h, w)."""
        return dense_features(self.clip, images, self.strategy)
