"""What a dense-feature strategy is: a frozen settings record that reads CLIP densely.

A strategy maps CLIP-normalised images (B, 3, H, W) to dense features Z (B, D, h, w),
float32, unit L2 norm per patch, on the patch grid (h, w) = ceil((H, W) / patch). The
training-free methods differ only here; the heads (zero-shot, ReCLIP++'s rectifier, a
student's teacher) take Z from whichever strategy they are given.

A strategy is a frozen dataclass (its fields are its published settings, each with its
source), so it can be compared, overridden (``dataclasses.replace``), written into a
run's config.json (:func:`reclip.features.strategy_to_dict`) and read back. What a
strategy needs beyond CLIP and the images comes through a :class:`FeatureContext`, filled
by its backbone (:class:`reclip.backbones.DenseCLIP`):

- ``aux``: a module the strategy builds once (:meth:`DenseStrategy.build_aux`), e.g.
  ProxyCLIP's vision foundation model; it lives in the backbone, so it moves with
  ``.to(device)`` and is never part of a trained head's state;
- ``queries``: the text query embeddings of the head that reads Z (class-aware
  strategies, e.g. ResCLIP's semantic feedback, which segments once before the final pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from reclip.clip.model import CLIP

__all__ = ["DenseStrategy", "FeatureContext", "project_patches"]


@dataclass(frozen=True)
class FeatureContext:
    """What a strategy may read besides CLIP and the images.

    Attributes:
        aux: the module :meth:`DenseStrategy.build_aux` built (None if it builds none).
        queries: (S, D) L2-normalised text query embeddings of the head reading Z, or None.
    """

    aux: nn.Module | None = None
    queries: Tensor | None = None


class DenseStrategy:
    """Base of every dense-feature strategy (subclasses are frozen dataclasses).

    Class attributes:
        kind: the name written into config.json (``reclip.features.STRATEGY_KINDS``).
        needs_queries: :meth:`features` reads ``context.queries`` (the head's W_q); a
            subclass whose need depends on its settings makes it a property (ResCLIP:
            only with semantic feedback). Read it on the instance.
    """

    kind: ClassVar[str] = ""
    needs_queries: ClassVar[bool] = False

    def features(self, clip: CLIP, images: Tensor, context: FeatureContext | None = None) -> Tensor:
        """CLIP-normalised images (B, 3, H, W) -> Z (B, D, h, w), float32, unit norm per patch."""
        raise NotImplementedError

    def build_aux(self, clip: CLIP) -> nn.Module | None:
        """The module the strategy needs besides CLIP (e.g. a proxy model), or None.

        Called once by the backbone; the module is put on CLIP's device and in eval mode."""
        return None

    def stride(self, clip: CLIP, aux: nn.Module | None) -> int:
        """Input pixels per cell of Z: CLIP's patch, unless Z lives on another model's grid."""
        return clip.visual.patch_size

    def describe(self) -> str:
        """One line for listings and reports."""
        fields: dict[str, Any] = {k: v for k, v in vars(self).items()}
        return f"{self.kind}({', '.join(f'{k}={v}' for k, v in fields.items())})"


def project_patches(clip: CLIP, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Final ViT tokens [CLS; patches] (B, 1 + h*w, width) -> Z (B, D, h, w).

    ``ln_post(x) @ visual.proj`` per patch (MaskCLIP/ReCLIP apply ``proj`` as a bias-free
    1x1 conv, the same linear map), cast to float32 before the L2 normalisation so bf16 /
    fp16 towers give float32 unit vectors. ln_post and proj act per token, so dropping CLS
    first is exact.
    """
    patches = clip.visual.project(tokens[:, 1:])  # (B, h*w, D)
    patches = F.normalize(patches.float(), dim=-1)
    B, _, D = patches.shape
    return patches.transpose(1, 2).reshape(B, D, *grid)  # (B, D, h, w)
