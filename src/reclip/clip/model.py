"""CLIP in plain torch, with OpenAI's module names.

The parameter names are exactly those of OpenAI's ``clip/model.py`` (``visual.conv1``,
``visual.transformer.resblocks.N.attn.in_proj_weight``, ``ln_final``, ...), so OpenAI
and open_clip state dicts load with ``strict=True``. Differences from OpenAI's module,
all numerically neutral:

- tokens are batch-first (B, N, D) and attention runs through
  ``F.scaled_dot_product_attention`` (fast on CPU and GPU);
- the image positional embedding is interpolated (bicubic, CLS position kept) to the
  patch grid of each input, so any input size works; sizes that are not a multiple of
  the patch are padded at the bottom/right (``pad_to_patch``);
- the building blocks expose what dense-CLIP methods need (``Attention.qkv``,
  ``VisionTransformer.embed`` / ``forward_blocks`` / ``forward_intermediates``) instead
  of returning ad-hoc lists.

Read top to bottom in build order: LayerNorm, attention, MLP, block, transformer,
vision tower, CLIP.

Preprocessing belongs to the weights: ``CLIP.image_mean`` / ``image_std`` (OpenAI's by
default; ``load_clip`` sets a checkpoint's own) are plain attributes, outside
``CLIPConfig`` and the state dict, so they never change ``weights_fingerprint``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (OpenAI's subclass), whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP models were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names.

    ``in_proj_weight`` (3D, D) stacks the q, k, v projections; ``out_proj`` is (D, D).
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split heads: x (B, N, D) -> q, k, v each (B, heads, N, D // heads)."""
        B, N, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3D)
        qkv = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, hd) -> out_proj applied to (B, N, D)."""
        B, H, N, hd = x.shape
        return self.out_proj(x.transpose(1, 2).reshape(B, N, H * hd))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        q, k, v = self.qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, N, hd)
        return self.merge_heads(out)


class MLP(nn.Module):
    def __init__(self, width: int, quick_gelu: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU() if quick_gelu else nn.GELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, quick_gelu: bool) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, quick_gelu)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))

    def forward_with_qkv(
        self, x: torch.Tensor, causal: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``forward`` (same operations, same numbers), also returning the attention's inputs.

        x (B, N, D) -> (block output (B, N, D), (q, k, v) each (B, heads, N, D // heads)
        of ``attn.qkv(ln_1(x))``).
        """
        q, k, v = self.attn.qkv(self.ln_1(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, N, hd)
        x = x + self.attn.merge_heads(out)
        return x + self.mlp(self.ln_2(x)), (q, k, v)


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False, end: int | None = None) -> torch.Tensor:
        """Run blocks ``[0, end)`` (all by default) on x (B, N, D)."""
        for block in self.resblocks[:end]:
            x = block(x, causal=causal)
        return x


def pad_to_patch(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at the bottom/right so H and W are multiples of ``patch``."""
    H, W = images.shape[-2:]
    pad_h, pad_w = (-H) % patch, (-W) % patch
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    return images


def block_indices(indices: int | Sequence[int], depth: int) -> list[int]:
    """Block numbers 0..depth-1, sorted and unique, from timm-style ``indices``.

    An int n means the last n blocks; a sequence holds block numbers, negative ones
    counted from the end (-1 is the last block). Anything out of range raises.
    """
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 1 <= indices <= depth:
            raise ValueError(
                f"indices={indices} asks for the last {indices} of {depth} blocks; give a count 1..{depth}, "
                f"or a list of block numbers 0..{depth - 1} (negative from the end)"
            )
        return list(range(depth - indices, depth))
    valid = f"block numbers 0..{depth - 1} or -{depth}..-1 (-1 = the last block), or a count 1..{depth}"
    if not isinstance(indices, Sequence):
        raise TypeError(f"indices={indices!r}; give a list of {valid}")
    chosen = list(indices)
    if not chosen:
        raise ValueError(f"indices is empty; give {valid}")
    bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not -depth <= i < depth]
    if bad:
        raise ValueError(f"block indices {bad} are not blocks of this {depth}-block tower; give {valid}")
    return sorted({i % depth for i in chosen})


def scaled_block(index: int, depth: int, published_depth: int = 12) -> int:
    """Block ``index`` (0-based) of a published ``published_depth``-block tower, at the same
    relative depth in a ``depth``-block tower: ``round(depth * index / published_depth)``,
    clamped to ``0 .. depth - 1`` (e.g. MAFT's block 8 of 12 is block 3 of 4). For methods
    whose published layer choices are for ViT-B (12 blocks) run on other towers."""
    if depth < 1:
        raise ValueError(f"depth={depth}: a vision tower has at least one block")
    return min(max(round(depth * index / published_depth), 0), depth - 1)


class Intermediates(NamedTuple):
    """What ``VisionTransformer.forward_intermediates`` returns; keys are block numbers 0..L-1.

    tokens: block -> its output (B, 1 + h * w, width), CLS first.
    qkv: block -> (q, k, v) each (B, heads, 1 + h * w, width // heads), from ``ln_1`` of
        the block's input as ``Attention.qkv`` splits them; empty unless asked for.
    grid: the patch grid (h, w).
    """

    tokens: dict[int, torch.Tensor]
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    grid: tuple[int, int]


class VisionTransformer(nn.Module):
    def __init__(
        self,
        input_resolution: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        quick_gelu: bool = True,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.grid_size = input_resolution // patch_size
        self.width = width
        self.output_dim = output_dim
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size**2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def grid_positional_embedding(self, h: int, w: int) -> torch.Tensor:
        """Patch positional embeddings resized (bicubic) to an (h, w) grid: (h * w, width).

        The CLS position is excluded; see ``positional_embedding_for``.
        """
        g = self.grid_size
        patch_pos = self.positional_embedding[1:]
        if (h, w) == (g, g):
            return patch_pos
        grid = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)
        return grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(h * w, -1)

    def positional_embedding_for(self, h: int, w: int) -> torch.Tensor:
        """[CLS position; patch positions on an (h, w) grid]: (1 + h * w, width)."""
        return torch.cat([self.positional_embedding[:1], self.grid_positional_embedding(h, w)])

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify, prepend CLS, add positions, ln_pre.

        images (B, 3, H, W), padded to the patch -> tokens (B, 1 + h * w, width), grid (h, w).
        """
        images = pad_to_patch(images, self.patch_size)
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, width, h, w)
        B, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h * w, width)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding_for(h, w).to(x.dtype)
        return self.ln_pre(x), (h, w)

    def forward_blocks(self, images: torch.Tensor, end: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens after blocks ``[0, end)``: (B, 1 + h * w, width), grid (h, w).

        ``end=-1`` stops before the last block, where every dense-CLIP strategy starts.
        """
        x, grid = self.embed(images)
        return self.transformer(x, end=end), grid

    def forward_intermediates(
        self,
        images: torch.Tensor,
        indices: int | Sequence[int],
        *,
        qkv: bool = False,
        stop_early: bool = True,
    ) -> Intermediates:
        """Tokens after chosen blocks, and their q/k/v if asked (timm's name; DINOv2's
        ``get_intermediate_layers``), so a method reading e.g. block 8's attention does
        not rewrite the forward.

        images (B, 3, H, W) normalised, padded to the patch as in ``embed``. ``indices``:
        block numbers 0..L-1 (negative from the end, -1 = last), or an int n = the last n
        blocks. ``stop_early`` runs no block after the highest chosen one (False runs the
        whole tower, e.g. to time it); the values are the same either way.
        """
        blocks = self.transformer.resblocks
        chosen = block_indices(indices, len(blocks))
        x, grid = self.embed(images)
        tokens: dict[int, torch.Tensor] = {}
        qkvs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for i, block in enumerate(blocks[: chosen[-1] + 1] if stop_early else blocks):
            if qkv and i in chosen:
                x, qkvs[i] = block.forward_with_qkv(x)
            else:
                x = block(x)
            if i in chosen:
                tokens[i] = x  # (B, 1 + h * w, width)
        return Intermediates(tokens, qkvs, grid)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post then the projection: (..., width) -> (..., output_dim)."""
        return self.ln_post(tokens) @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Global image embedding from the CLS token: (B, output_dim), not normalised."""
        x, _ = self.forward_blocks(images)
        return self.project(x[:, 0])


@dataclass(frozen=True)
class CLIPConfig:
    """Architecture hyper-parameters, with OpenAI's ``CLIP.__init__`` argument names."""

    embed_dim: int
    image_resolution: int
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int
    vision_heads: int | None = None  # OpenAI: vision_width // 64
    quick_gelu: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


# OpenAI CLIP's normalisation (openai/CLIP clip.py _transform), RGB on the 0..1 scale.
# ReCLIP's configs give the same numbers times 255: mean (122.771, 116.746, 104.094),
# std (68.501, 66.632, 70.323).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def _channel_stats(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    """3 per-channel floats on the 0..1 scale (std > 0), or a ValueError naming the value."""
    out = tuple(float(v) for v in values)
    if len(out) != 3 or max(out) > 1 or (name == "image_std" and min(out) <= 0):
        raise ValueError(
            f"{name} {values!r}: expected 3 RGB values on the 0..1 scale"
            f"{' (> 0)' if name == 'image_std' else ''}; from 0..255 statistics, divide by 255"
        )
    return out


class CLIP(nn.Module):
    """CLIP: a ViT image tower and a causal text transformer mapped to one embedding space.

    ``image_mean`` / ``image_std``: the normalisation these weights expect, RGB on the
    0..1 scale ((x / 255 - mean) / std); not part of ``config`` (see the module docstring).
    """

    def __init__(
        self,
        embed_dim: int,
        image_resolution: int,
        vision_layers: int,
        vision_width: int,
        vision_patch_size: int,
        context_length: int,
        vocab_size: int,
        transformer_width: int,
        transformer_heads: int,
        transformer_layers: int,
        vision_heads: int | None = None,
        quick_gelu: bool = True,
        *,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
    ) -> None:
        super().__init__()
        self.image_mean = _channel_stats("image_mean", image_mean)
        self.image_std = _channel_stats("image_std", image_std)
        self.config = CLIPConfig(
            embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, context_length,
            vocab_size, transformer_width, transformer_heads, transformer_layers, vision_heads, quick_gelu,
        )
        self.context_length = context_length
        self.visual = VisionTransformer(
            input_resolution=image_resolution,
            patch_size=vision_patch_size,
            width=vision_width,
            layers=vision_layers,
            heads=vision_heads or max(vision_width // 64, 1),
            output_dim=embed_dim,
            quick_gelu=quick_gelu,
        )
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, quick_gelu)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._init_text()

    @classmethod
    def from_config(
        cls, config: CLIPConfig, *, image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD
    ) -> "CLIP":
        return cls(**config.to_dict(), image_mean=image_mean, image_std=image_std)

    def _init_text(self) -> None:
        # OpenAI's initialize_parameters for the text side (the vision side inits itself).
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, embed_dim), not normalised."""
        return self.visual(images.to(self.dtype))

    def encode_token_embeddings(self, x: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Text tower from word embeddings, for learnable prompts (CoOp / ReCLIP++ Reference).

        x (N, L, width) word embeddings (L <= context_length), eot_index (N,) position of
        each sequence's end token -> (N, embed_dim), not normalised.
        """
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        x = self.transformer(x, causal=True)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index]  # (N, width)
        return x @ self.text_projection

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, embed_dim), not normalised; read at the EOT (largest id)."""
        x = self.token_embedding(tokens).to(self.dtype)
        return self.encode_token_embeddings(x, tokens.argmax(dim=-1))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-text logits as OpenAI's: (logits_per_image (B, N), logits_per_text (N, B))."""
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(tokens), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()


def weights_fingerprint(model: nn.Module, refresh: bool = False) -> str:
    """sha256 (hex, 16 chars) of a model's architecture config, parameter names, shapes and float32 values.

    The config counts because some of it cannot be read from the weights (QuickGELU vs
    GELU, heads): the same tensors with another activation are another model.

    Caches key derived data (text embeddings, hypotheses, trained heads) to the exact
    weights. Computed once and cached on the module; pass ``refresh=True`` after the
    weights change (e.g. toy pre-training).
    """
    cached = getattr(model, "_reclip_fingerprint", None)
    if cached is not None and not refresh:
        return cached
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(repr(config).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    fingerprint = digest.hexdigest()[:16]
    model._reclip_fingerprint = fingerprint
    return fingerprint
