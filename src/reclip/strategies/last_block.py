"""The last-block strategies: MaskCLIP, SCLIP, ClearCLIP, NACLIP (and raw CLIP).

Every method here changes only the LAST block of CLIP's ViT (METHODS.md section 1);
blocks 1..L-1 run as usual (``VisionTransformer.forward_blocks(images, end=-1)``).
Following ClearCLIP's decomposition (Lan et al., ECCV 2024, arXiv:2407.12442) the last
block ``x + attn(ln_1(x))`` then ``+ mlp(ln_2(.))`` is described by three switches, a
:class:`LastBlock`:

- ``attention``: how each token mixes the values ``v`` (per head, scale d_head^-0.5),
  always followed by the block's ``out_proj``:

  ============== =====================================================================
  "normal"       softmax(q k^T s)                      CLIP as trained
  "identity"     each token keeps its own value         MaskCLIP: out = out_proj(v)
  "qq"           softmax(q q^T s)                      ClearCLIP
  "kk"           softmax(k k^T s)
  "qq+kk"        softmax(q q^T s) + softmax(k k^T s)   SCLIP (rows sum to 2)
  "kk+gaussian"  softmax(k k^T s + G)                  NACLIP, G Gaussian of patch distance
  ============== =====================================================================

- ``residual``: keep the attention's skip connection (``x + attn``);
- ``ffn``: keep the feed-forward sub-block, with its own skip connection
  (``y + mlp(ln_2(y))``, as every official implementation writes it).

Presets (:data:`LAST_BLOCK_PRESETS`) follow METHODS.md's table; the official codes agree with it
(dogehhh/ReCLIP ``LastResidualAttentionBlock``, chongzhou96/MaskCLIP ``vit.py
return_qkv``, wangf3014/SCLIP ``custom_attn(csa=True)``, mc-lan/ClearCLIP
``custom_attn(model_type='ClearCLIP')`` with ``ignore_residual=True``, sinahmr/NACLIP
``arch='reduced', attn_strategy='naclip'``). Variants are overrides:
``get_strategy("maskclip", residual=False)`` (:mod:`reclip.features`, the registry of
every strategy, this family and the later ones of :mod:`reclip.strategies`).

The CLS token: the last block runs on ``[CLS; patches]`` exactly like the official
codes, i.e. CLS is a query and a key/value for every attention kind (it cannot matter
for "identity"); for NACLIP the Gaussian term of every pair involving CLS is 0 (NACLIP's
``get_attention_addition(adjust_for_cls=True)``). Only patch tokens are returned.

Output per patch: ``ln_post(x) @ visual.proj``, L2-normalised (MaskCLIP/ReCLIP apply
``proj`` as a bias-free 1x1 conv, which is the same linear map).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from reclip.clip.model import CLIP, ResidualAttentionBlock
from reclip.strategies.base import DenseStrategy, FeatureContext, project_patches

__all__ = [
    "ATTENTIONS",
    "LAST_BLOCK_PRESETS",
    "LastBlock",
    "gaussian_window",
    "attention_bias",
    "attention_weights",
    "apply_last_block",
    "dense_features",
    "reclip_official_numerics",
]

ATTENTIONS = ("normal", "identity", "qq", "kk", "qq+kk", "kk+gaussian")

# dogehhh/ReCLIP (model/model.py ``_initialize_weights``) and MaskCLIP's mmseg config set
# the blocks' LayerNorm eps to 1e-6; OpenAI CLIP trained with torch's default 1e-5.
MMSEG_LAYERNORM_EPS = 1e-6


@dataclass(frozen=True)
class LastBlock(DenseStrategy):
    """How the last ViT block is run (ClearCLIP's decomposition).

    Attributes:
        attention: one of :data:`ATTENTIONS` (see the module docstring).
        residual: keep the attention skip connection ``x + attn(ln_1(x))``.
        ffn: keep the feed-forward sub-block ``y + mlp(ln_2(y))``.
        gaussian_sigma: NACLIP's Gaussian standard deviation in patches; used only by
            ``attention="kk+gaussian"``.
    """

    kind = "last_block"

    attention: str
    residual: bool
    ffn: bool
    gaussian_sigma: float = 5.0

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown last-block attention {self.attention!r}; available: {list(ATTENTIONS)}")
        if not self.gaussian_sigma > 0:
            raise ValueError(f"gaussian_sigma must be > 0 (patches), got {self.gaussian_sigma!r}")

    def features(self, clip: CLIP, images: Tensor, context: FeatureContext | None = None) -> Tensor:
        """Blocks 1..L-1 as usual, the last one as this strategy says -> Z (B, D, h, w)."""
        visual = clip.visual
        tokens, grid = visual.forward_blocks(images, end=-1)  # (B, 1 + h*w, width)
        tokens = apply_last_block(visual.transformer.resblocks[-1], tokens, grid, self)
        return project_patches(clip, tokens, grid)


LAST_BLOCK_PRESETS: dict[str, LastBlock] = {
    # CLIP as trained, run token-wise.
    "raw": LastBlock("normal", residual=True, ffn=True),
    # MaskCLIP (Zhou et al., ECCV 2022) / ReCLIP++'s Z: the value path, out_proj(v),
    # residual and FFN kept (MaskCLIP vit.py: ``v += x; v = ffn(norm2(v), identity=v)``).
    "maskclip": LastBlock("identity", residual=True, ffn=True),
    # SCLIP (Wang et al., ECCV 2024): correlative self-attention, residual and FFN kept
    # (SCLIP clip/model.py: ``x = x + custom_attn(..., csa=True); x = x + mlp(ln_2(x))``).
    "sclip": LastBlock("qq+kk", residual=True, ffn=True),
    # ClearCLIP: q-q attention, residual and FFN removed.
    "clearclip": LastBlock("qq", residual=False, ffn=False),
    # NACLIP (Hajimiri et al., WACV 2025): k-k attention + Gaussian neighbourhood (sigma 5
    # patches) added to the logits, residual and FFN removed (arch='reduced').
    "naclip": LastBlock("kk+gaussian", residual=False, ffn=False, gaussian_sigma=5.0),
}


def gaussian_window(
    h: int, w: int, sigma: float, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """NACLIP's neighbourhood term between the patches of an (h, w) grid: (h*w, h*w).

    ``G[p, p'] = exp(-||p - p'||^2 / (2 sigma^2))`` with p = (row, col) in patch units,
    patches in row-major order; peak 1 on the diagonal, not normalised. NACLIP
    (sinahmr/NACLIP clip/model.py ``gaussian_window`` + ``get_attention_addition``) builds
    the same matrix by convolving one-hot maps with a (2h-1, 2w-1) window.
    """
    rows = torch.arange(h, device=device, dtype=torch.float64).repeat_interleave(w)  # (h*w,)
    cols = torch.arange(w, device=device, dtype=torch.float64).repeat(h)  # (h*w,)
    d2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2  # (h*w, h*w)
    return torch.exp(-d2 / (2.0 * sigma**2)).to(dtype)


def attention_bias(
    strategy: LastBlock, grid: tuple[int, int], device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor | None:
    """Additive attention-logit term over [CLS; patches]: (1 + h*w, 1 + h*w), or None.

    Only "kk+gaussian" has one: the Gaussian window on patch pairs, 0 on every pair that
    involves CLS (NACLIP ``get_attention_addition(adjust_for_cls=True)``). It is added to
    the logits before the softmax (NACLIP: ``attn_weights += omega``), not multiplied.
    """
    if strategy.attention != "kk+gaussian":
        return None
    h, w = grid
    bias = torch.zeros(1 + h * w, 1 + h * w, device=device, dtype=dtype)
    bias[1:, 1:] = gaussian_window(h, w, strategy.gaussian_sigma, device=device, dtype=dtype)
    return bias


def attention_weights(q: Tensor, k: Tensor, strategy: LastBlock, grid: tuple[int, int]) -> Tensor:
    """The last block's explicit attention matrix: q, k (B, heads, T, hd) -> (B, heads, T, T).

    T = 1 + h*w (CLS first). For inspection and tests; :func:`apply_last_block` computes
    the same product with fused attention kernels instead of materialising it.
    """
    scale = q.shape[-1] ** -0.5  # d_head^-0.5, as in every official custom_attn
    kind = strategy.attention
    if kind == "identity":
        return torch.eye(q.shape[-2], device=q.device, dtype=q.dtype).expand(*q.shape[:-1], q.shape[-2])
    if kind == "normal":
        return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    if kind == "qq":
        return torch.softmax(q @ q.transpose(-1, -2) * scale, dim=-1)
    if kind == "kk":
        return torch.softmax(k @ k.transpose(-1, -2) * scale, dim=-1)
    if kind == "qq+kk":
        # SCLIP: the two softmaxes are summed, not renormalised, so rows sum to 2.
        return (torch.softmax(q @ q.transpose(-1, -2) * scale, dim=-1)
                + torch.softmax(k @ k.transpose(-1, -2) * scale, dim=-1))
    if kind == "kk+gaussian":
        bias = attention_bias(strategy, grid, device=k.device, dtype=k.dtype)
        return torch.softmax(k @ k.transpose(-1, -2) * scale + bias, dim=-1)
    raise AssertionError(kind)  # LastBlock validates attention


def _attend(q: Tensor, k: Tensor, v: Tensor, strategy: LastBlock, grid: tuple[int, int]) -> Tensor:
    """attention_weights(q, k) @ v without materialising the matrix: (B, heads, T, hd)."""
    scale = q.shape[-1] ** -0.5
    sdpa = F.scaled_dot_product_attention
    kind = strategy.attention
    if kind == "normal":
        return sdpa(q, k, v, scale=scale)
    if kind == "qq":
        return sdpa(q, q, v, scale=scale)
    if kind == "kk":
        return sdpa(k, k, v, scale=scale)
    if kind == "qq+kk":
        # (A_qq + A_kk) v = A_qq v + A_kk v
        return sdpa(q, q, v, scale=scale) + sdpa(k, k, v, scale=scale)
    if kind == "kk+gaussian":
        # A float attn_mask is added to the scaled logits before the softmax.
        bias = attention_bias(strategy, grid, device=k.device, dtype=k.dtype)
        return sdpa(k, k, v, attn_mask=bias, scale=scale)
    raise AssertionError(kind)  # "identity" is handled by the caller


def apply_last_block(
    block: ResidualAttentionBlock, tokens: Tensor, grid: tuple[int, int], strategy: LastBlock
) -> Tensor:
    """Run the last ViT block the way ``strategy`` says: (B, 1 + h*w, width) -> same shape.

    ``tokens`` are [CLS; patches] after blocks 1..L-1. Only what the strategy uses is
    computed (no q/k for "identity", no MLP without ``ffn``), so the autograd graph, when
    the caller enables grad, holds nothing unused.
    """
    y = block.ln_1(tokens)  # (B, T, width)
    if strategy.attention == "identity":
        # MaskCLIP / ReCLIP: out_proj applied to the value projection of each token
        # (official: in_proj on ln_1(x), split, out_proj on the v third).
        width = tokens.shape[-1]
        bias = block.attn.in_proj_bias[2 * width:] if block.attn.in_proj_bias is not None else None
        v = F.linear(y, block.attn.in_proj_weight[2 * width:], bias)  # (B, T, width)
        out = block.attn.out_proj(v)
    else:
        q, k, v = block.attn.qkv(y)  # each (B, heads, T, hd)
        out = block.attn.merge_heads(_attend(q, k, v, strategy, grid))  # (B, T, width), out_proj included
    if strategy.residual:
        out = tokens + out
    if strategy.ffn:
        out = out + block.mlp(block.ln_2(out))
    return out


@contextlib.contextmanager
def reclip_official_numerics(clip: CLIP) -> Iterator[CLIP]:
    """Temporarily run the vision blocks with the official ReCLIP code's LayerNorm eps.

    dogehhh/ReCLIP at its HEAD (model/model.py, commit d2bf59c, ``_initialize_weights``
    of both block classes), a MaskCLIP-mmseg inheritance, sets ``ln_1``/``ln_2`` eps
    1e-5 -> 1e-6 in all vision blocks of the CLIP it loads; ln_pre and ln_post keep
    1e-5. The blocks reuse OpenAI's MLP, so the activation stays QuickGELU: the line
    ``self.mlp[1] = nn.GELU()`` is commented out there (it was active in the earlier
    commit 04c806c). OpenAI's weights were trained with 1e-5, so this is off by default;
    use it only to reproduce the official numbers. The model is modified in place inside
    the ``with`` and restored after. (Not reproduced: ReCLIP also replaces the class
    embedding by a tensor read from ``utils/cls_token.pt``.)
    """
    blocks = clip.visual.transformer.resblocks
    saved = [(b.ln_1.eps, b.ln_2.eps) for b in blocks]
    try:
        for b in blocks:
            b.ln_1.eps = b.ln_2.eps = MMSEG_LAYERNORM_EPS
        yield clip
    finally:
        for b, (eps_1, eps_2) in zip(blocks, saved):
            b.ln_1.eps, b.ln_2.eps = eps_1, eps_2
