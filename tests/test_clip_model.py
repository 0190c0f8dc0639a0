"""VisionTransformer.forward_intermediates and ResidualAttentionBlock.forward_with_qkv on a
tiny random ViT: the same numbers as the ordinary forward, q/k/v as Attention.qkv splits
them, timm's index rules."""

from __future__ import annotations

import pytest
import torch

from tiny import tiny_clip
from reclip.clip.model import CLIP, Intermediates, block_indices

LAYERS = 3


@pytest.fixture(scope="module")
def clip() -> CLIP:
    # non-zero biases and LayerNorm affines, so a skipped one shows
    return tiny_clip(vision_layers=LAYERS, vision_heads=4, perturb=0.05)


def images(*size: int) -> torch.Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_block_with_qkv_is_the_ordinary_block(clip):
    x, _ = clip.visual.embed(images(32, 32))
    block = clip.visual.transformer.resblocks[0]
    out, (q, k, v) = block.forward_with_qkv(x)
    torch.testing.assert_close(out, block(x), rtol=0, atol=0)
    for got, ref in zip((q, k, v), block.attn.qkv(block.ln_1(x))):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("size", [(32, 32), (27, 41)], ids=["square", "odd"])
def test_tokens_equal_the_ordinary_forward(clip, size):
    vis = clip.visual
    x = images(*size)
    out = vis.forward_intermediates(x, [-1, -2])
    assert isinstance(out, Intermediates) and sorted(out.tokens) == [LAYERS - 2, LAYERS - 1] and out.qkv == {}
    full, grid = vis.forward_blocks(x)
    before_last, _ = vis.forward_blocks(x, end=-1)
    assert out.grid == grid == (-(-size[0] // 8), -(-size[1] // 8))  # padded to the patch
    torch.testing.assert_close(out.tokens[LAYERS - 1], full, rtol=0, atol=0)
    torch.testing.assert_close(out.tokens[LAYERS - 2], before_last, rtol=0, atol=0)
    h, w = grid
    assert out.tokens[LAYERS - 1].shape == (2, 1 + h * w, vis.width)


@torch.no_grad()
def test_qkv_is_attn_qkv_of_ln_1_of_the_block_input(clip):
    vis = clip.visual
    x = images(27, 41)
    out = vis.forward_intermediates(x, range(LAYERS), qkv=True)
    assert sorted(out.qkv) == list(range(LAYERS))
    h, w = out.grid
    inputs = [vis.embed(x)[0]] + [out.tokens[i] for i in range(LAYERS - 1)]
    for i, (block, block_input) in enumerate(zip(vis.transformer.resblocks, inputs)):
        ref = block.attn.qkv(block.ln_1(block_input))
        for got, want in zip(out.qkv[i], ref):
            assert got.shape == (2, 4, 1 + h * w, vis.width // 4)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # asking for q/k/v does not change the tokens
    plain = vis.forward_intermediates(x, range(LAYERS))
    for i in range(LAYERS):
        torch.testing.assert_close(out.tokens[i], plain.tokens[i], rtol=0, atol=0)


@torch.no_grad()
def test_stop_early_skips_later_blocks_without_changing_values(clip):
    vis = clip.visual
    x = images(32, 32)
    ran: list[int] = []
    hooks = [block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
             for i, block in enumerate(vis.transformer.resblocks)]
    try:
        early = vis.forward_intermediates(x, [0], qkv=True)
        assert ran == []  # block 0 ran through forward_with_qkv, later blocks not at all
        late = vis.forward_intermediates(x, [0], qkv=True, stop_early=False)
        assert ran == list(range(1, LAYERS))
    finally:
        for hook in hooks:
            hook.remove()
    assert early.tokens.keys() == late.tokens.keys() == {0}
    torch.testing.assert_close(early.tokens[0], late.tokens[0], rtol=0, atol=0)
    for a, b in zip(early.qkv[0], late.qkv[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_int_means_the_last_n_blocks():
    assert block_indices(1, 12) == [11]
    assert block_indices(4, 12) == [8, 9, 10, 11]
    assert block_indices(12, 12) == list(range(12))
    assert block_indices([8, -1, 8, -4], 12) == [8, 11]  # unique, sorted, negatives resolved


@pytest.mark.parametrize("indices", [[LAYERS], [-LAYERS - 1], 0, LAYERS + 1, [], [1.0], [True]])
def test_bad_indices_name_the_valid_range(clip, indices):
    with pytest.raises(ValueError, match=rf"0\.\.{LAYERS - 1}"):
        clip.visual.forward_intermediates(images(32, 32), indices)


def test_indices_of_another_type_are_refused():
    with pytest.raises(TypeError, match=rf"0\.\.{LAYERS - 1}"):
        block_indices(torch.tensor([0]), LAYERS)
