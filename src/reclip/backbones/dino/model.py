"""DINO and DINOv2 ViTs in plain torch, with the official parameter names.

The parameter names are exactly those of the official backbones, so their released
``*_pretrain.pth`` files load with ``load_state_dict(strict=True)``:

- DINO (facebookresearch/dino @ 7c446df, ``vision_transformer.py``: ``VisionTransformer``,
  ``vit_small`` / ``vit_base``): ``cls_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``;
- DINOv2 (facebookresearch/dinov2 @ b8931f7, ``dinov2/models/vision_transformer.py``:
  ``DinoVisionTransformer``; ``dinov2/layers/block.py``, ``layer_scale.py``): the same plus
  ``mask_token`` (1, D), ``register_tokens`` (1, R, D) in the ``_reg`` models and layer
  scale ``blocks.N.ls1.gamma`` / ``ls2.gamma``. The hub builds (``dinov2/hub/backbones.py``)
  use ``block_chunks=0`` (flat ``blocks.N``), ``init_values=1.0`` (layer scale on),
  ``ffn_layer="mlp"`` for S/B/L (ViT-g's SwiGLU is not built here) and ``img_size=518``
  (a 37 x 37 positional grid).

Both: LayerNorm eps 1e-6, exact GELU, qkv / proj / MLP biases, MLP ratio 4, head width 64.
``mask_token`` is only used in DINOv2's masked training; it is kept so the files load
strictly.

Any input whose sides are multiples of the patch runs (other sizes raise; pad first:
the official DINOv2 PatchEmbed asserts the same, DINO's conv silently drops the
remainder). The positional grid is interpolated as the official ``interpolate_pos_encoding``
does (see :func:`interpolate_pos_embed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Both families are trained on ImageNet-normalised RGB (dino main_dino.py DataAugmentationDINO;
# dinov2/data/transforms.py IMAGENET_DEFAULT_MEAN / STD).
from reclip.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["FEATURE_KINDS", "IMAGENET_MEAN", "IMAGENET_STD", "DinoConfig", "DinoViT", "interpolate_pos_embed"]

LAYER_NORM_EPS = 1e-6  # both repos: partial(nn.LayerNorm, eps=1e-6)

FEATURE_KINDS = ("tokens", "q", "k", "v")


@dataclass(frozen=True)
class DinoConfig:
    """One DINO / DINOv2 architecture.

    ``pos_grid``: side of the pre-training positional grid (224 / 16 = 14, 224 / 8 = 28,
    518 / 14 = 37). ``interpolate_offset`` / ``interpolate_antialias``: how the grid is
    resized to another input (official defaults: DINO and DINOv2 without registers
    0.1 / False; DINOv2 ``_reg`` models 0.0 / True, ``dinov2/hub/backbones.py``).
    """

    family: str  # "dino" | "dinov2"
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_hidden: int
    pos_grid: int
    registers: int = 0
    layer_scale: bool = False
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    def __post_init__(self) -> None:
        if self.family not in ("dino", "dinov2"):
            raise ValueError(f"family {self.family!r}: expected 'dino' or 'dinov2'")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")
        if self.family == "dino" and (self.registers or self.layer_scale):
            raise ValueError("DINO (v1) ViTs have neither registers nor layer scale; use family 'dinov2'")


def interpolate_pos_embed(
    pos_embed: Tensor, grid: tuple[int, int], *, offset: float, antialias: bool
) -> Tensor:
    """The positional embedding (1, 1 + M*M, D) resized to ``grid`` = (h, w) patches -> (1, 1 + h*w, D).

    As the official ``interpolate_pos_encoding`` (dino vision_transformer.py; dinov2
    vision_transformer.py): unchanged when the grid is the pre-training M x M; otherwise
    bicubic, the CLS position kept. With ``offset`` > 0 the resize is given as scale
    factors ((h + offset) / M, (w + offset) / M), which torch also uses to map output to
    input coordinates, so the samples differ slightly from a resize to size (h, w) (the
    "historical kludge" of dino issue #8, kept by DINOv2 for compatibility); offset 0
    resizes to the size (DINOv2 ``_reg`` models, and HF transformers' Dinov2 at every
    offset). Computed in float32 (as DINOv2; DINO v1 used the parameter's dtype) and
    returned in ``pos_embed``'s dtype.
    """
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    h, w = grid
    if (h, w) == (side, side):
        return pos_embed
    dim = pos_embed.shape[-1]
    patch_pos = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, M, M)
    if offset:
        resize = {"scale_factor": ((h + offset) / side, (w + offset) / side)}
    else:
        resize = {"size": (h, w)}
    patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=antialias, **resize)
    assert patch_pos.shape[-2:] == (h, w), (patch_pos.shape, grid)  # floor(M * (h + offset) / M) == h
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], patch_pos], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, 3, H, W) -> (B, h*w, D), row-major (h before w)."""

    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (official layout: q | k | v, then heads)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v each (B, heads, N, head_dim), split as the official reshape(B, N, 3, heads, head_dim)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv_heads(x)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()  # exact (erf) GELU in both repos
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale ``gamma`` (DINOv2 dinov2/layers/layer_scale.py)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); ls = identity in DINO v1."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, layer_scale: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = Attention(width, heads)
        self.ls1 = LayerScale(width) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(width, mlp_hidden)
        self.ls2 = LayerScale(width) if layer_scale else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoViT(nn.Module):
    """A DINO / DINOv2 ViT. Tokens are ordered [CLS, registers (R), patches (h*w, row-major)].

    Inputs are ImageNet-normalised RGB (``IMAGENET_MEAN`` / ``IMAGENET_STD``), (B, 3, H, W)
    with H and W multiples of ``patch_size``.
    """

    def __init__(self, config: DinoConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.patch_size = c.patch_size
        self.embed_dim = c.width
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.pos_grid**2, c.width))
        if c.family == "dinov2":
            self.mask_token = nn.Parameter(torch.zeros(1, c.width))
        if c.registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, c.registers, c.width))
        self.patch_embed = PatchEmbed(c.patch_size, c.width)
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_hidden, c.layer_scale) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width, eps=LAYER_NORM_EPS)

    def grid(self, images: Tensor) -> tuple[int, int]:
        """The patch grid (h, w) of ``images``; raises ValueError unless (B, 3, H, W) with H, W multiples of the patch."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        p = self.patch_size
        if height % p or width % p or not height or not width:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {p}: pad (or resize) the images to "
                f"multiples of {p} first (e.g. {math.ceil(height / p) * p}x{math.ceil(width / p) * p})"
            )
        return height // p, width // p

    def prepare_tokens(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1 + R + h*w, D): patches + positions, CLS first, registers after it.

        Registers are inserted after the positional embedding is added (they carry none),
        as ``prepare_tokens_with_masks`` does.
        """
        h, w = self.grid(images)
        x = self.patch_embed(images)  # (B, h*w, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        pos = interpolate_pos_embed(self.pos_embed, (h, w), offset=self.config.interpolate_offset,
                                    antialias=self.config.interpolate_antialias)
        x = x + pos.to(x.dtype)
        if self.config.registers:
            registers = self.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)
        return x

    def forward(self, images: Tensor) -> Tensor:
        """All output tokens after the final LayerNorm, (B, 1 + R + h*w, D).

        The official ``forward_features`` ``x_norm`` (DINOv2) / ``get_intermediate_layers(x, 1)[0]``
        (DINO), and HF transformers' Dinov2 ``last_hidden_state``.
        """
        x = self.prepare_tokens(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def patch_features(self, images: Tensor, kind: str = "tokens") -> Tensor:
        """Dense features of the patches, (B, C, h, w) on the patch grid, CLS and registers dropped.

        ``kind``:
        - ``"tokens"`` (C = D): the last block's output after the final LayerNorm. This is
          what ProxyCLIP uses as the proxy for both families (mc-lan/ProxyCLIP @ e7b767f,
          proxyclip_segmentor.py ``forward_feature``: DINO ``get_intermediate_layers(x)[0][:, 1:]``,
          DINOv2 ``get_intermediate_layers(x, reshape=True)[0]``, which drops the registers);
        - ``"q"`` / ``"k"`` / ``"v"`` (C = D, heads concatenated): the last block's query /
          key / value projections of its normalised input, the features ProxyCLIP hooks
          from DINO's last ``attn.qkv`` and leaves commented out (and which other dense
          methods use, e.g. DINO's keys for patch affinities).
        """
        if kind not in FEATURE_KINDS:
            raise ValueError(f"unknown feature kind {kind!r}; expected one of {', '.join(FEATURE_KINDS)}")
        h, w = self.grid(images)
        skip = 1 + self.config.registers
        if kind == "tokens":
            patches = self(images)[:, skip:]  # (B, h*w, D)
        else:
            x = self.prepare_tokens(images)
            for block in self.blocks[:-1]:
                x = block(x)
            q, k, v = self.blocks[-1].attn.qkv_heads(self.blocks[-1].norm1(x))  # each (B, heads, N, head_dim)
            chosen = {"q": q, "k": k, "v": v}[kind]
            patches = chosen.transpose(1, 2).flatten(2)[:, skip:]  # (B, h*w, D)
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w)
