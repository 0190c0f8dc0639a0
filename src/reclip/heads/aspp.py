"""DeepLab V2's ASPP classifier: parallel dilated 3x3 convs on the same features, outputs summed.

DeepLab V2 (Chen et al., TPAMI 2018, "ASPP-L"): four 3x3 convs with dilations 6, 12, 18, 24
read the backbone's features (output stride 8) and their outputs are summed; no BN, no
image pooling, no 1x1 projection after the sum (those are DeepLab V3's). Each branch is
padded by its dilation, so the grid keeps its size.

The student of ReCLIP++ (paper III-E) maps ResNet features to CLIP's embedding width with
it: the official code's ``ASPPHeadV2(in_channels=2048, channels=512)``. That official head
differs from DeepLab V2 in one respect: each of its branches is mmcv-style
conv (no bias) + BN + ReLU before the sum (``ConvModule`` with ``norm_cfg=SyncBN``); pass
``norm=True`` for it. Parameter names follow the official code's
(``aspp_modules.{i}.conv`` / ``aspp_modules.{i}.norm``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["ASPPV2"]


class _Branch(nn.Module):
    """One dilated conv (+ BN + ReLU when ``norm``): parameters ``conv`` [, ``norm``]."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int, norm: bool) -> None:
        super().__init__()
        kernel = 1 if dilation == 1 else 3  # a dilation-1 branch is a 1x1 conv (mmseg's ASPP rule)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, padding=0 if dilation == 1 else dilation,
                              dilation=dilation, bias=not norm)
        self.norm = nn.BatchNorm2d(out_channels) if norm else None
        self.relu = nn.ReLU(inplace=True) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.relu(self.norm(x))
        return x


class ASPPV2(nn.Module):
    """DeepLab V2 ASPP: features (B, in_channels, h, w) -> sum of dilated 3x3 convs (B, out_channels, h, w).

    Args:
        in_channels: the backbone's channels (2048 for ResNet-50/101).
        out_channels: the output channels (the official ReCLIP student: 512, CLIP's D).
        dilations: one branch per dilation; DeepLab V2's (6, 12, 18, 24).
        norm: False (DeepLab V2): each branch a conv with bias, initialised N(0, 0.01)
            with zero bias as DeepLab V2's classifier; True (the official ReCLIP code's
            ``ASPPHeadV2``): each branch conv without bias (Kaiming normal, fan_out) + BN
            (weight 1, bias 0) + ReLU.
    """

    def __init__(
        self, in_channels: int, out_channels: int, dilations: Sequence[int] = (6, 12, 18, 24), *, norm: bool = False
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"ASPPV2 {name}={value!r}: expected a positive int")
        dilations = tuple(dilations)
        if not dilations or not all(isinstance(d, int) and d >= 1 for d in dilations):
            raise ValueError(f"ASPPV2 dilations={dilations!r}: expected one or more positive ints")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dilations = dilations
        self.norm = norm
        self.aspp_modules = nn.ModuleList(_Branch(in_channels, out_channels, d, norm) for d in dilations)
        for branch in self.aspp_modules:
            if norm:
                nn.init.kaiming_normal_(branch.conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.ones_(branch.norm.weight)
                nn.init.zeros_(branch.norm.bias)
            else:
                nn.init.normal_(branch.conv.weight, mean=0.0, std=0.01)
                nn.init.zeros_(branch.conv.bias)

    def branches(self, features: Tensor) -> list[Tensor]:
        """Each branch's output (B, out_channels, h, w), in the order of ``dilations``."""
        return [branch(features) for branch in self.aspp_modules]

    def forward(self, features: Tensor) -> Tensor:
        """features (B, in_channels, h, w) -> the branches' sum (B, out_channels, h, w)."""
        if features.ndim != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"ASPPV2: expected features (B, {self.in_channels}, h, w), got {tuple(features.shape)}")
        out = self.aspp_modules[0](features)
        for branch in self.aspp_modules[1:]:
            out = out + branch(features)
        return out
