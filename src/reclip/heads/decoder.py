"""The mask decoder of ReCLIP++ (paper eq. 4, "Rectified Mask Generation")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MaskDecoder"]


class MaskDecoder(nn.Module):
    """M_o = BN(Conv5x5(concat(Z, M))): features and rectified logits -> decoded logits.

    Args:
        embed_dim: D, the channels of Z.
        num_classes: C, the channels of M and of the output.

    Parameters: ``conv`` Conv2d(D + C -> C, 5x5, padding 2), kaiming-normal fan_out;
    ``norm`` BatchNorm2d(C), weight 1, bias 0 (official ``decoder_conv2`` / ``decoder_norm2``).
    No activation.
    """

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(embed_dim + num_classes, num_classes, kernel_size=5, padding=2)
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        self.norm = nn.BatchNorm2d(num_classes)  # weight 1, bias 0 (official constant_ init)

    def forward(self, features: Tensor, rectified: Tensor) -> Tensor:
        """Z (B, D, h, w), M (B, C, h, w) -> M_o (B, C, h, w)."""
        return self.norm(self.conv(torch.cat([features, rectified], dim=1)))
