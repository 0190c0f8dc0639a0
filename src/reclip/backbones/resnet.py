"""ResNet backbones for the DeepLab V2 student (paper III-E), in plain torch: output stride 8.

Variants (:data:`STUDENT_BACKBONES`):

- ``"resnet101"``: the paper's student (DeepLab V2 on ResNet-101);
- ``"resnet50-v1c"``: the official ReCLIP code's student (mmseg's ``ResNetV1c``, depth 50:
  deep stem of three 3x3 convs, strides (1, 2, 1, 1), dilations (1, 1, 2, 4));
- ``"resnet50"``;
- ``"resnet18"``: BasicBlocks, small enough for the toy world and CPU tests.

Parameter names are those of the published ImageNet weights, so their state dicts load
with strict key checks (the classifier ``fc.*`` aside):

- torchvision's ``ResNet``: ``conv1``, ``bn1``, ``layer1`` .. ``layer4``, each block
  ``conv1/bn1/conv2/bn2[/conv3/bn3]`` and, on the first block of a layer,
  ``downsample.0`` (1x1 conv) / ``downsample.1`` (BN);
- mmcv/mmseg's ``ResNetV1c``: the same layers, and instead of ``conv1``/``bn1`` the deep
  stem ``stem.0`` / ``stem.3`` / ``stem.6`` (3x3 convs to 32, 32, 64 channels, the first
  with stride 2) with BNs ``stem.1`` / ``stem.4`` / ``stem.7`` (``stem.2/5/8`` are ReLUs).

Output stride 8 (DeepLab V2): layer3 and layer4 keep their input's resolution and dilate
their 3x3 convs by 2 and 4 instead of striding, as torchvision's
``replace_stride_with_dilation=[False, True, True]`` and mmseg's ``strides=(1, 2, 1, 1),
dilations=(1, 1, 2, 4), contract_dilation=True`` (the official ReCLIP student's setting):
the first block of a dilated layer keeps the previous layer's dilation (layer3.0: 1,
layer4.0: 2), every later block uses the layer's. No multi-grid. BasicBlocks dilate both
of their 3x3 convs.

Grid size: every stride-2 op here (7x7 pad 3, 3x3 pad 1, 3x3 max-pool pad 1, 1x1 pad 0)
maps n to ceil(n / 2), and ceil(ceil(n / 2) / 2) = ceil(n / 4), so an input (H, W) gives
features on exactly (ceil(H / 8), ceil(W / 8)) with no explicit padding; dilated 3x3
convs are padded by their dilation and keep the size. (:class:`reclip.segmentor.DenseSegmentor`
pads inputs to a multiple of 8 anyway; the result is the same grid.)

Weights: :func:`load_backbone_weights` reads a user's file; :func:`build_student_backbone`
with ``weights="imagenet"`` downloads the published ImageNet weights (torchvision's for
resnet18/50/101, open-mmlab's ``resnet50_v1c`` for resnet50-v1c) and, offline, warns and
keeps the random initialisation.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from reclip.clip.checks import check_finite, check_tensor_bounds, load_safetensors
from reclip.clip.convert import CheckpointError, unwrap_state_dict
from reclip.clip.torchsave import load_torch_file

__all__ = [
    "STUDENT_BACKBONES", "BackboneSpec", "BackboneWeightsError", "BasicBlock", "Bottleneck", "ResNet",
    "build_student_backbone", "load_backbone_weights",
]


class BackboneWeightsError(CheckpointError):
    """A backbone weights file cannot be read or does not fit the backbone; the message names the file and keys."""


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """The shortcut's 1x1 conv + BN (``downsample.0`` / ``downsample.1``) where shape or resolution changes."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convs (the first strided, both dilated) + shortcut: ResNet-18/34's block."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided and dilated: torchvision's / mmseg's "pytorch" style) -> 1x1 (x4) + shortcut."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


_BLOCKS: dict[str, type[BasicBlock | Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


# ---------------------------------------------------------------------------------------
# ResNet
# ---------------------------------------------------------------------------------------


class ResNet(nn.Module):
    """A dilated ResNet trunk: images (B, 3, H, W) -> features (B, out_channels, ceil(H/s), ceil(W/s)), s = ``stride``.

    Args:
        block: ``"basic"`` (BasicBlock) or ``"bottleneck"`` (Bottleneck).
        layers: blocks per layer, e.g. (3, 4, 23, 3) for ResNet-101.
        deep_stem: mmseg's ResNetV1c stem (``stem.*``: three 3x3 convs) instead of
            torchvision's 7x7 ``conv1`` / ``bn1``.
        output_stride: 8 (DeepLab V2: layer3, layer4 dilated 2, 4), 16 (layer4 dilated 2)
            or 32 (no dilation, the classifier's network).
        base_channels: layer1's width (64 for the published networks; smaller for toys).
        name: the variant's name, used in messages.

    No classifier (``fc``), no pooling after layer4. Initialisation as torchvision's
    (Kaiming normal, fan_out, for convs; BN weight 1, bias 0).
    """

    def __init__(
        self,
        block: str,
        layers: Sequence[int],
        *,
        deep_stem: bool = False,
        output_stride: int = 8,
        base_channels: int = 64,
        name: str = "resnet",
    ) -> None:
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"block={block!r}: expected one of {sorted(_BLOCKS)}")
        if len(layers) != 4 or not all(isinstance(n, int) and n >= 1 for n in layers):
            raise ValueError(f"layers={tuple(layers)!r}: expected 4 positive block counts, e.g. (3, 4, 23, 3)")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride={output_stride!r}: expected 8, 16 or 32")
        if not (isinstance(base_channels, int) and base_channels >= 2 and base_channels % 2 == 0):
            raise ValueError(f"base_channels={base_channels!r}: expected an even int >= 2")
        self.name = name
        self.block = block
        self.layers = tuple(layers)
        self.deep_stem = deep_stem
        self.output_stride = output_stride
        unit = _BLOCKS[block]
        stem = base_channels
        if deep_stem:
            self.stem = nn.Sequential(
                _conv3x3(3, stem // 2, stride=2), nn.BatchNorm2d(stem // 2), nn.ReLU(inplace=True),
                _conv3x3(stem // 2, stem // 2), nn.BatchNorm2d(stem // 2), nn.ReLU(inplace=True),
                _conv3x3(stem // 2, stem), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
            )
        else:
            self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        # layer1 stride 1, layer2 stride 2; layer3/layer4 stride 2 unless dilated
        dilate = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}[output_stride]
        cin, dilation = stem, 1
        for i, n in enumerate(self.layers):
            planes = base_channels * 2**i
            stride = 1 if i == 0 else 2
            first_dilation = dilation
            if i > 0 and dilate[i - 1]:
                dilation *= stride
                stride = 1
            blocks = [unit(cin, planes, stride=stride, dilation=first_dilation)]
            cin = planes * unit.expansion
            blocks += [unit(cin, planes, dilation=dilation) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self._out_channels = cin

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stride(self) -> int:
        """Input pixels per feature cell (the output stride)."""
        return self.output_stride

    @property
    def out_channels(self) -> int:
        """Feature channels: 2048 for Bottleneck ResNets, 512 for ResNet-18 (at base_channels 64)."""
        return self._out_channels

    @property
    def embed_dim(self) -> int:
        """D of the backbone contract (:mod:`reclip.backbones`): ``out_channels``."""
        return self._out_channels

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) normalised -> features (B, out_channels, ceil(H / stride), ceil(W / stride))."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images (B, 3, H, W), got shape {tuple(images.shape)}")
        if self.deep_stem:
            x = self.stem(images)
        else:
            x = self.relu(self.bn1(self.conv1(images)))
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


# ---------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneSpec:
    """A student backbone variant: its architecture and where its ImageNet weights are published.

    ``check_hash``: the file name's hex suffix is a prefix of the file's sha256 (torch.hub's
    convention, used by torchvision); not asserted for open-mmlab's third-party file.
    """

    block: str
    layers: tuple[int, int, int, int]
    deep_stem: bool
    imagenet_url: str
    check_hash: bool = True


STUDENT_BACKBONES: dict[str, BackboneSpec] = {
    # torchvision's IMAGENET1K_V1 weights (torchvision.models.resnet model_urls)
    "resnet101": BackboneSpec("bottleneck", (3, 4, 23, 3), False,
                              "https://download.pytorch.org/models/resnet101-63fe2227.pth"),
    "resnet50": BackboneSpec("bottleneck", (3, 4, 6, 3), False,
                             "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
    "resnet18": BackboneSpec("basic", (2, 2, 2, 2), False,
                             "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
    # mmcv's open-mmlab://resnet50_v1c (mmcv/model_zoo/open_mmlab.json); the official ReCLIP
    # code loads this file's ['state_dict'] (stem.*, layerN.*) into its student
    "resnet50-v1c": BackboneSpec("bottleneck", (3, 4, 6, 3), True,
                                 "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
                                 check_hash=False),
}


def _variant(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    if key not in STUDENT_BACKBONES:
        raise ValueError(f"unknown student backbone {name!r}; expected one of {sorted(STUDENT_BACKBONES)}")
    return key


def build_student_backbone(
    name: str, weights: str | os.PathLike | None = None, *, output_stride: int = 8, base_channels: int = 64
) -> ResNet:
    """A student backbone by name (:data:`STUDENT_BACKBONES`), output stride 8 by default.

    Args:
        name: ``"resnet101"``, ``"resnet50-v1c"``, ``"resnet50"`` or ``"resnet18"``
            (case and ``_``/``-`` are not significant).
        weights: ``None``: random initialisation, silently; ``"imagenet"``: the published
            ImageNet weights, downloaded to torch.hub's cache
            (``$TORCH_HOME/hub/checkpoints``); if they cannot be had (offline, any download
            or read error) a ``UserWarning`` says so and the backbone stays random; a path:
            :func:`load_backbone_weights` (a file that cannot be read or does not fit raises).
        output_stride: 8 (DeepLab V2), 16 or 32.
        base_channels: layer1's width: 64 for the published networks (and their weights);
            smaller for a toy student (random initialisation only).
    """
    key = _variant(name)
    spec = STUDENT_BACKBONES[key]
    if base_channels != 64 and weights is not None:
        raise ValueError(f"pretrained weights exist for the published width (base_channels 64), not {base_channels}")
    backbone = ResNet(spec.block, spec.layers, deep_stem=spec.deep_stem, output_stride=output_stride, name=key,
                      base_channels=base_channels)
    if weights is None:
        return backbone
    if isinstance(weights, str) and weights.strip().lower() == "imagenet":
        try:
            obj = _download(spec.imagenet_url, spec.check_hash)
            state = unwrap_state_dict(obj)
        except Exception as e:  # noqa: BLE001 -- offline, HTTP errors, hash mismatch, a damaged cached file
            warnings.warn(
                f"could not get the ImageNet weights of {key} from {spec.imagenet_url} ({type(e).__name__}: "
                f"{str(e)[:300]}); the backbone starts from random initialisation. On a machine with internet "
                f"the file lands in {Path(torch.hub.get_dir()) / 'checkpoints'} (delete a damaged one there); or "
                "download it yourself and pass its path as the weights",
                stacklevel=2,
            )
            return backbone
        _load_state(backbone, state, spec.imagenet_url)
        return backbone
    load_backbone_weights(backbone, weights)
    return backbone


def _download(url: str, check_hash: bool) -> object:
    """torch.hub's cached download + ``torch.load(weights_only=True)``; tests replace this to go offline."""
    return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=check_hash,
                                              weights_only=True)


# ---------------------------------------------------------------------------------------
# Weights files
# ---------------------------------------------------------------------------------------


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A file's flat state dict: safetensors, or torch.save checked first and read with weights_only=True."""
    if not path.is_file():
        raise BackboneWeightsError(f"backbone weights file {path} does not exist (or is not a file)")
    if path.suffix.lower() == ".safetensors":
        try:
            return load_safetensors(path)
        except CheckpointError as e:
            raise BackboneWeightsError(str(e)) from e
    obj = load_torch_file(path, error=BackboneWeightsError,
                          hint="Expected a state dict of tensors (or {'state_dict': ...}); full pickles are never "
                               "executed. Re-save it with torch.save(model.state_dict(), path) or as safetensors")
    try:
        state = unwrap_state_dict(obj)
        check_tensor_bounds(state, path)
    except CheckpointError as e:
        raise BackboneWeightsError(f"{path}: {e}") from e
    return state


def _listing(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _load_state(backbone: ResNet, state: Mapping[str, Tensor], source: str | os.PathLike) -> None:
    """Check ``state`` against ``backbone`` strictly (``fc.*`` ignored) and load it; errors name the keys."""
    state = dict(state)
    if any(k.startswith("backbone.") for k in state):
        # an mmseg checkpoint: the backbone's keys carry "backbone."; a segmentor's decode_head.* /
        # auxiliary_head.* are not the backbone's and are left out
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    # BN's num_batches_tracked is absent from files saved before torch 0.4.1 (torchvision's
    # older ResNet weights); it only counts training steps, so a missing one is set to 0.
    missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} in the file vs {tuple(own[k].shape)} in the model"
        for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    wrong += [
        f"{k} is {state[k].dtype} in the file vs {own[k].dtype} in the model"
        for k in own if k in state and state[k].is_floating_point() != own[k].is_floating_point()
    ]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listing(unexpected)}")
        if wrong:
            problems.append(f"misshapen keys: {_listing(wrong, 4)}")
        hint = ""
        if any(k.startswith("stem.") for k in unexpected) and not backbone.deep_stem:
            hint = " The file has a deep stem (stem.*): it is a ResNetV1c checkpoint; use 'resnet50-v1c'."
        elif any(k in unexpected for k in ("conv1.weight", "bn1.weight")) and backbone.deep_stem:
            hint = " The file has a 7x7 stem (conv1/bn1): it is a torchvision-style ResNet; use 'resnet50'/'resnet101'."
        raise BackboneWeightsError(
            f"{source} does not fit the {backbone.name} backbone (strict key check; fc.* ignored): "
            + "; ".join(problems) + "." + hint
        )
    try:
        check_finite(state, source)
    except CheckpointError as e:
        raise BackboneWeightsError(str(e)) from e
    for k, v in own.items():
        if k not in state:  # a missing num_batches_tracked
            state[k] = torch.zeros_like(v)
    backbone.load_state_dict(state, strict=True)


def load_backbone_weights(backbone: ResNet, path: str | os.PathLike) -> ResNet:
    """Load a weights file into ``backbone`` with strict key checks; returns ``backbone``.

    The file: a ``.safetensors`` file, or anything else read with
    ``torch.load(weights_only=True)`` (``.pth`` / ``.pt``) after a scan of what it declares.
    Accepted layouts: a flat state dict; a training checkpoint wrapping it
    (``{"state_dict": ...}``, ``{"model": ...}``, also DDP's ``module.`` prefix); an mmseg
    checkpoint whose keys start with ``backbone.`` (only those keys are read, without the
    prefix). The classifier's ``fc.*`` keys are ignored. Any other missing or extra key, a
    shape that differs, NaN/Inf values or an unreadable file raise
    :class:`BackboneWeightsError` naming the file and the keys.
    """
    path = Path(path)
    _load_state(backbone, _read_state_dict(path), path)
    return backbone
