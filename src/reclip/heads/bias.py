"""Bias logits M_b of the rectification stage: what CLIP prefers regardless of the image content.

- :class:`PositionalBias` (ReCLIP++, paper eq. 2, "independent"): M_b = W_p W_r^T, with
  W_p = Conv1x1(width -> D, bias) on CLIP's interpolated, CLS-free positional embedding:
  one (C, h, w) map per grid, the same for every image (space- and class-preference).
- :class:`DependentBias` (ReCLIP, the conference version; Table III): M_b = Z W_r^T +
  ProjNet(PE), a class bias read from the image features plus a positional term.

Both take the features Z (B, D, h, w) and the Reference embeddings W_r (C, D) and return
(B, C, h, w). They hold CLIP's vision tower to read its positional embedding but do not
register it (the owner, e.g. :class:`reclip.heads.rectify.Rectifier`, registers CLIP once),
so a student can inherit a trained bias frozen and evaluate it on its own grid.

Official code (dogehhh/ReCLIP ``model/model.py``): ``RECLIPPP.pe_proj = nn.Conv2d(768, 512,
1)`` (default init); ReCLIP's ProjNet = three Conv3x3 + BN + ReLU, 768 -> 512 -> 256 -> C
(read here as width -> D -> D / 2 -> C so that nothing assumes ViT-B/16), kaiming-normal
fan_out convolutions, BN weight 1 bias 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reclip.clip.model import VisionTransformer

__all__ = ["DependentBias", "PositionalBias", "positional_grid"]


def positional_grid(visual: VisionTransformer, h: int, w: int) -> Tensor:
    """CLIP's CLS-free positional embedding resized (bicubic) to (h, w): (1, width, h, w) float32."""
    pe = visual.grid_positional_embedding(h, w).float()  # (h * w, width)
    return pe.t().reshape(1, -1, h, w)


class PositionalBias(nn.Module):
    """M_b = W_p W_r^T (paper eq. 2): W_p (D, h, w) from the positional embedding, W_r (C, D).

    Args:
        visual: CLIP's vision tower (held, not registered).
        embed_dim: D.

    Parameters: ``pe_proj`` Conv1x1(width -> D) with bias (official default init).
    """

    def __init__(self, visual: VisionTransformer, embed_dim: int) -> None:
        super().__init__()
        self.__dict__["visual"] = visual  # unregistered on purpose, see the module docstring
        self.pe_proj = nn.Conv2d(visual.width, embed_dim, kernel_size=1)

    def forward(self, features: Tensor, reference: Tensor) -> Tensor:
        """features (B, D, h, w) (only their shape is used), reference W_r (C, D) -> M_b (B, C, h, w)."""
        B, _, h, w = features.shape
        w_p = self.pe_proj(positional_grid(self.visual, h, w))  # (1, D, h, w)
        return torch.einsum("odhw,cd->ochw", w_p, reference).expand(B, -1, -1, -1)


class DependentBias(nn.Module):
    """ReCLIP's M_b = Z W_r^T + ProjNet(PE).

    Args:
        visual: CLIP's vision tower (held, not registered).
        embed_dim: D.
        num_classes: C.

    Parameters: ``proj_net``, three Conv3x3 + BN + ReLU (width -> D -> D/2 -> C). Its BN
    normalises over the h * w positions of the one positional embedding.
    """

    def __init__(self, visual: VisionTransformer, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.__dict__["visual"] = visual
        widths = (visual.width, embed_dim, embed_dim // 2, num_classes)
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_out", nonlinearity="relu")
            layers += [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]  # BN weight 1, bias 0 by default
        self.proj_net = nn.Sequential(*layers)

    def forward(self, features: Tensor, reference: Tensor) -> Tensor:
        """features Z (B, D, h, w), reference W_r (C, D) -> M_b (B, C, h, w)."""
        h, w = features.shape[-2:]
        return torch.einsum("bdhw,cd->bchw", features, reference) + self.proj_net(positional_grid(self.visual, h, w))
