"""Dense-feature strategies on a tiny random CLIP: a battery over every preset, plus
independent re-implementations of the official codes' last blocks, written in their own
style ((L, N, D) layout, bmm, 1x1 conv), so a mismatch in reclip.features shows."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from tiny import tiny_clip, tiny_dino
from reclip.strategies.proxyclip import ProxyFeatures
from reclip.clip.model import CLIP, QuickGELU
from reclip.features import (
    ATTENTIONS,
    STRATEGIES,
    FeatureContext,
    LastBlock,
    apply_last_block,
    attention_bias,
    attention_weights,
    dense_features,
    gaussian_window,
    get_strategy,
    reclip_official_numerics,
)

CUSTOM = {
    "maskclip-no-residual": LastBlock("identity", residual=False, ffn=True),
    "identity-bare": LastBlock("identity", residual=False, ffn=False),
    "kk-residual": LastBlock("kk", residual=True, ffn=False),
    "naclip-sigma1-ffn": LastBlock("kk+gaussian", residual=False, ffn=True, gaussian_sigma=1.0),
    "clearclip-normal-attn": LastBlock("normal", residual=False, ffn=False),
}
ALL = {**STRATEGIES, **CUSTOM}


def noisy_clip(vision_heads: int | None = None, seed: int = 0) -> CLIP:
    """Two vision blocks; non-trivial LayerNorm affines and biases, so a skipped/duplicated ln or
    bias shows up in the comparisons."""
    return tiny_clip(seed, perturb=0.1, vision_layers=2, vision_heads=vision_heads)


@pytest.fixture(scope="module", params=[None, 4], ids=["1head", "4heads"])
def clip(request) -> CLIP:
    return noisy_clip(request.param)


def images(*size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed))


# A head's text queries, for the strategies that read them (ResCLIP's semantic feedback);
# the others ignore them.
# a head's queries (ResCLIP's feedback reads them) and a proxy model (ProxyCLIP's); the others ignore both
CONTEXT = FeatureContext(queries=F.normalize(images(5, 32, seed=4), dim=-1),
                         aux=ProxyFeatures(tiny_dino(), ((0.5,) * 3, (0.25,) * 3)))


# --- presets and registry ---------------------------------------------------------------

def test_presets_follow_methods_table():
    assert {k: v for k, v in STRATEGIES.items() if isinstance(v, LastBlock)} == {
        "raw": LastBlock("normal", True, True),
        "maskclip": LastBlock("identity", True, True),
        "sclip": LastBlock("qq+kk", True, True),
        "clearclip": LastBlock("qq", False, False),
        "naclip": LastBlock("kk+gaussian", False, False, 5.0),
    }


def test_overrides_and_errors():
    assert get_strategy("maskclip", residual=False) == LastBlock("identity", residual=False, ffn=True)
    assert get_strategy(LastBlock("qq", False, False), attention="kk") == LastBlock("kk", False, False)
    assert get_strategy("naclip") is STRATEGIES["naclip"]
    with pytest.raises(ValueError, match="available.*clearclip"):
        get_strategy("maskclp")
    with pytest.raises(ValueError, match="unknown LastBlock field"):
        get_strategy("maskclip", residuals=False)
    with pytest.raises(ValueError, match="available"):
        LastBlock("q-q", True, True)
    with pytest.raises(ValueError, match="gaussian_sigma"):
        LastBlock("kk+gaussian", False, False, gaussian_sigma=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        STRATEGIES["raw"].residual = False  # type: ignore[misc]


def test_maskclip_without_residual_is_identity_no_residual_with_ffn(clip):
    x = images(2, 3, 24, 40)
    a = dense_features(clip, x, get_strategy("maskclip", residual=False))
    b = dense_features(clip, x, LastBlock("identity", residual=False, ffn=True))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ... and it really differs from MaskCLIP (the override is not ignored)
    assert not torch.allclose(a, dense_features(clip, x, "maskclip"), atol=1e-4)


# --- battery over every strategy --------------------------------------------------------

@pytest.mark.parametrize("name", list(ALL))
def test_battery(clip, name):
    strategy = ALL[name]
    x = images(2, 3, 27, 41)  # not square, not multiples of the patch (8)
    out = dense_features(clip, x, strategy, CONTEXT)
    assert out.shape == (2, 32, 4, 6)  # the grid of the input padded to (32, 48)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 4, 6))
    # batch elements are independent
    torch.testing.assert_close(dense_features(clip, x[1:], strategy, CONTEXT), out[1:], atol=1e-5, rtol=1e-5)
    # multiple of the patch: no padding
    assert dense_features(clip, images(1, 3, 16, 32), strategy, CONTEXT).shape == (1, 32, 2, 4)


@pytest.mark.parametrize("name", list(ALL))
def test_gradient_reaches_input_and_no_grad_respected(clip, name):
    x = images(1, 3, 20, 28).requires_grad_(True)
    feats = dense_features(clip, x, ALL[name], CONTEXT)
    (feats * torch.randn_like(feats)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert not dense_features(clip, x, ALL[name], CONTEXT).requires_grad


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_bf16_autocast(clip, name):
    x = images(1, 3, 24, 32)
    ref = dense_features(clip, x, name, CONTEXT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dense_features(clip, x, name, CONTEXT)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out * ref).sum(dim=1).min() > 0.95  # cosine to the float32 result


# --- (1) raw == the vision tower run token-wise ----------------------------------------

def test_raw_equals_full_vision_tower(clip):
    x = images(2, 3, 27, 41)
    vis = clip.visual
    tokens, (h, w) = vis.embed(x)
    tokens = vis.transformer(tokens)  # all blocks, unmodified
    ref = vis.ln_post(tokens[:, 1:]) @ vis.proj  # (B, h*w, D)
    ref = F.normalize(ref, dim=-1).transpose(1, 2).reshape(2, -1, h, w)
    torch.testing.assert_close(dense_features(clip, x, "raw"), ref, atol=1e-5, rtol=1e-5)
    # and the CLS path of the same tower is CLIP's image embedding
    torch.testing.assert_close(vis.ln_post(tokens[:, 0]) @ vis.proj, clip.encode_image(x), atol=1e-5, rtol=1e-5)


# --- (2) maskclip == dogehhh/ReCLIP's feature path -------------------------------------

def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def reclip_official_features(clip, image, block_eps=1e-5, act=quick_gelu):
    """dogehhh/ReCLIP model/model.py VisionTransformer.forward + ReCLIP.forward (feat),
    re-written step by step: batch-first (N, L, C) tokens, mmseg-style padding, bicubic
    position interpolation, nn.MultiheadAttention maths for blocks 1..L-1, then
    LastResidualAttentionBlock: in_proj -> split q/k/v -> out_proj on each -> v += x ->
    v + mlp(ln_2(v)); ln_post(v); proj as a bias-free 1x1 conv; feat / feat.norm(dim=1)."""
    vis = clip.visual
    p, C = vis.patch_size, vis.width
    B = image.shape[0]
    input_h, input_w = image.size()[-2:]
    output_h, output_w = math.ceil(input_h / p), math.ceil(input_w / p)
    pad_h = max((output_h - 1) * p + (p - 1) + 1 - input_h, 0)
    pad_w = max((output_w - 1) * p + (p - 1) + 1 - input_w, 0)
    x = F.pad(image, [0, pad_w, 0, pad_h])
    x = F.conv2d(x, vis.conv1.weight, stride=p)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((vis.class_embedding.reshape(1, 1, C).expand(B, -1, -1), x), dim=1)
    pos = vis.positional_embedding.unsqueeze(0)
    g = vis.grid_size
    cls_w = pos[:, 0].unsqueeze(1)
    pos_w = pos[:, -g * g:].reshape(1, g, g, C).permute(0, 3, 1, 2)
    pos_w = F.interpolate(pos_w, size=(output_h, output_w), mode="bicubic", align_corners=False)
    x = x + torch.cat((cls_w, pos_w.flatten(2).transpose(1, 2)), dim=1)
    x = F.layer_norm(x, (C,), vis.ln_pre.weight, vis.ln_pre.bias, 1e-5)

    def mlp(blk, y):
        return F.linear(act(F.linear(y, blk.mlp.c_fc.weight, blk.mlp.c_fc.bias)), blk.mlp.c_proj.weight, blk.mlp.c_proj.bias)

    blocks = vis.transformer.resblocks
    for blk in blocks[:-1]:
        y = F.layer_norm(x, (C,), blk.ln_1.weight, blk.ln_1.bias, block_eps).transpose(0, 1)  # (L, N, C)
        attn, _ = F.multi_head_attention_forward(
            y, y, y, C, blk.attn.heads, blk.attn.in_proj_weight, blk.attn.in_proj_bias, None, None, False,
            0.0, blk.attn.out_proj.weight, blk.attn.out_proj.bias, training=False, need_weights=False,
        )
        x = x + attn.transpose(0, 1)
        x = x + mlp(blk, F.layer_norm(x, (C,), blk.ln_2.weight, blk.ln_2.bias, block_eps))

    blk = blocks[-1]
    y = F.layer_norm(x, (C,), blk.ln_1.weight, blk.ln_1.bias, block_eps)
    y = F.linear(y, blk.attn.in_proj_weight, blk.attn.in_proj_bias)
    N, L, C3 = y.shape
    y = y.view(N, L, 3, C3 // 3).permute(2, 0, 1, 3).reshape(3 * N, L, C3 // 3)
    y = F.linear(y, blk.attn.out_proj.weight, blk.attn.out_proj.bias)
    q, k, v = y.tensor_split(3, dim=0)
    v = v + x
    v = v + mlp(blk, F.layer_norm(v, (C,), blk.ln_2.weight, blk.ln_2.bias, block_eps))
    v = F.layer_norm(v, (C,), vis.ln_post.weight, vis.ln_post.bias, 1e-5)
    v = v[:, 1:].reshape(B, output_h, output_w, -1).permute(0, 3, 1, 2).contiguous()
    proj_conv = vis.proj[:, :, None, None].permute(1, 0, 2, 3)  # (D, C, 1, 1)
    feat = F.conv2d(v, proj_conv)
    return feat / feat.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("size", [(32, 32), (27, 41)])
def test_maskclip_equals_official_reclip(clip, size):
    x = images(2, 3, *size)
    torch.testing.assert_close(dense_features(clip, x, "maskclip"), reclip_official_features(clip, x),
                               atol=1e-5, rtol=1e-5)


def test_reclip_official_numerics(clip):
    """Only the blocks' LayerNorm eps changes: at dogehhh/ReCLIP HEAD (d2bf59c) the blocks
    keep OpenAI's QuickGELU (``self.mlp[1] = nn.GELU()`` is commented out)."""
    x = images(2, 3, 27, 41)
    vis = clip.visual
    blocks = vis.transformer.resblocks
    before = dense_features(clip, x, "maskclip")
    with reclip_official_numerics(clip):
        quirky = dense_features(clip, x, "maskclip")
        assert all(b.ln_1.eps == b.ln_2.eps == 1e-6 for b in blocks)
        assert vis.ln_pre.eps == vis.ln_post.eps == 1e-5
        assert all(isinstance(b.mlp.gelu, QuickGELU) for b in blocks)
    # A reference with exact GELU differs by ~1e-3 here, far outside the tolerance.
    ref = reclip_official_features(clip, x, block_eps=1e-6, act=quick_gelu)
    torch.testing.assert_close(quirky, ref, atol=1e-5, rtol=1e-5)
    # eps 1e-6 vs 1e-5 moves features by ~1e-6 on unit-variance tokens: small but not nothing.
    assert not torch.equal(quirky, before)
    assert all(b.ln_1.eps == b.ln_2.eps == 1e-5 for b in blocks)
    torch.testing.assert_close(dense_features(clip, x, "maskclip"), before, rtol=0, atol=0)  # restored


# --- SCLIP / ClearCLIP / NACLIP == their official custom_attn -------------------------

def naclip_attention_addition(h, w, std):
    """sinahmr/NACLIP clip/model.py gaussian_window + get_attention_addition (conv build)."""
    dims = (2 * h - 1, 2 * w - 1)
    constant = 1 / (std * math.sqrt(2))
    ks = []
    for dim in dims:
        start = -(dim - 1) / 2.0
        ks.append(torch.linspace(start * constant, (start + dim - 1) * constant, steps=dim))
    window = torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))
    m = torch.einsum("ij,kl->ijkl", torch.eye(h), torch.eye(w)).permute(0, 3, 1, 2).contiguous()
    out = F.conv2d(m.view(-1, h, w).unsqueeze(1), window[None, None], padding="same").squeeze(1)
    out = out.view(h * w, h * w)
    out = torch.vstack([torch.zeros(1, h * w), out])
    return torch.hstack([torch.zeros(h * w + 1, 1), out])


def official_custom_attn(attn_layer, x, kind, n_patches=None, std=5.0):
    """The shared custom_attn of SCLIP / ClearCLIP / NACLIP, (L, N, E) layout."""
    num_heads = attn_layer.heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    scale = head_dim ** -0.5
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    if kind == "csa":
        attn_weights = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1) \
            + F.softmax(torch.bmm(k, k.transpose(1, 2)) * scale, dim=-1)
    elif kind == "ClearCLIP":
        attn_weights = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1)
    elif kind == "naclip":
        attn_weights = torch.bmm(k, k.transpose(1, 2)) * scale
        attn_weights += naclip_attention_addition(*n_patches, std).unsqueeze(0)
        attn_weights = F.softmax(attn_weights, dim=-1)
    else:
        raise ValueError(kind)
    out = torch.bmm(attn_weights, v).transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(out)


@pytest.mark.parametrize("name", ["sclip", "clearclip", "naclip"])
def test_training_free_presets_equal_official(clip, name):
    x = images(2, 3, 27, 41)
    vis = clip.visual
    tokens, grid = vis.forward_blocks(x, end=-1)
    x_lnd = tokens.permute(1, 0, 2)  # NLD -> LND
    blk = vis.transformer.resblocks[-1]
    if name == "sclip":  # SCLIP VisionTransformer.forward, csa=True
        x_lnd = x_lnd + official_custom_attn(blk.attn, blk.ln_1(x_lnd), "csa")
        x_lnd = x_lnd + blk.mlp(blk.ln_2(x_lnd))
    elif name == "clearclip":  # ClearCLIP, ignore_residual=True
        x_lnd = official_custom_attn(blk.attn, blk.ln_1(x_lnd), "ClearCLIP")
    else:  # NACLIP arch='reduced', gaussian_std=5
        x_lnd = official_custom_attn(blk.attn, blk.ln_1(x_lnd), "naclip", n_patches=grid, std=5.0)
    out = vis.ln_post(x_lnd.permute(1, 0, 2)) @ vis.proj
    ref = F.normalize(out[:, 1:], dim=-1).transpose(1, 2).reshape(2, -1, *grid)
    torch.testing.assert_close(dense_features(clip, x, name), ref, atol=1e-5, rtol=1e-5)


# --- (3) identity attention has no token mixing ----------------------------------------

@pytest.mark.parametrize("strategy", [STRATEGIES["maskclip"], CUSTOM["identity-bare"], CUSTOM["maskclip-no-residual"]])
def test_identity_attention_has_no_token_mixing(clip, strategy):
    block = clip.visual.transformer.resblocks[-1]
    grid = (3, 4)
    tokens = images(2, 1 + 12, 64, seed=3)
    changed = tokens.clone()
    changed[:, 1 + 5] += torch.randn(64)  # perturb patch 5 only
    a = apply_last_block(block, tokens, grid, strategy)
    b = apply_last_block(block, changed, grid, strategy)
    diff = (a - b).abs().amax(dim=-1)  # (B, T)
    assert (diff[:, 1 + 5] > 1e-3).all()
    others = torch.ones(13, dtype=torch.bool)
    others[1 + 5] = False
    assert diff[:, others].max() == 0
    # the same check detects mixing with a mixing attention
    mixed = apply_last_block(block, changed, grid, STRATEGIES["raw"]) - apply_last_block(block, tokens, grid, STRATEGIES["raw"])
    assert mixed.abs().amax(dim=-1)[:, others].max() > 1e-4


# --- (4) attention matrices and the Gaussian -------------------------------------------

@pytest.mark.parametrize("attention", ATTENTIONS)
def test_attention_rows_and_fused_path(clip, attention):
    block = clip.visual.transformer.resblocks[-1]
    grid = (3, 5)
    tokens = images(2, 1 + 15, 64, seed=4)
    q, k, v = block.attn.qkv(block.ln_1(tokens))
    strategy = LastBlock(attention, residual=False, ffn=False, gaussian_sigma=1.5)
    weights = attention_weights(q, k, strategy, grid)  # (B, heads, T, T)
    assert weights.shape == (2, block.attn.heads, 16, 16)
    assert (weights >= 0).all()
    expected_sum = 2.0 if attention == "qq+kk" else 1.0
    torch.testing.assert_close(weights.sum(-1), torch.full(weights.shape[:-1], expected_sum))
    if attention == "identity":
        torch.testing.assert_close(weights, torch.eye(16).expand_as(weights))
    # the fused path of apply_last_block computes exactly weights @ v
    expected = block.attn.merge_heads(weights @ v)
    torch.testing.assert_close(apply_last_block(block, tokens, grid, strategy), expected, atol=1e-5, rtol=1e-5)


def test_gaussian_window_centred_symmetric():
    h, w, sigma = 5, 7, 1.3
    g = gaussian_window(h, w, sigma)
    assert g.shape == (35, 35)
    torch.testing.assert_close(g, g.T)
    torch.testing.assert_close(torch.diagonal(g), torch.ones(35))
    for p in range(35):
        row = g[p].view(h, w)
        assert row.argmax().item() == p  # peak at the patch itself
    centre = g[(h // 2) * w + w // 2].view(h, w)
    torch.testing.assert_close(centre, centre.flip(0))
    torch.testing.assert_close(centre, centre.flip(1))
    # value check: one patch right and one down is distance^2 = 2
    torch.testing.assert_close(g[0, w + 1], torch.tensor(math.exp(-2 / (2 * sigma**2))))


@pytest.mark.parametrize("grid", [(4, 6), (3, 3), (1, 5)])
def test_gaussian_matches_naclip_construction(grid):
    bias = attention_bias(STRATEGIES["naclip"], grid)
    torch.testing.assert_close(bias, naclip_attention_addition(*grid, 5.0), atol=1e-6, rtol=1e-5)
    assert bias[0].abs().max() == 0 and bias[:, 0].abs().max() == 0  # CLS gets no neighbourhood term
    assert attention_bias(STRATEGIES["clearclip"], grid) is None
