"""MAFT's core on a tiny random CLIP: the IP-CLIP encoder, proposal sources, the proposal segmentor."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tiny import tiny_clip
from reclip.clip.model import CLIP
from reclip.maft.ipclip import (
    default_start_layer,
    ip_attention_mask,
    ip_clip_embeddings,
    ip_clip_tokens,
    proposal_attention_mask,
)
from reclip.maft.proposals import (
    GridProposals,
    PredictionProposals,
    ProposalError,
    ProposalFiles,
    grid_proposals,
    read_proposal_file,
    regions_from_labels,
)

DEPTH = 3


@pytest.fixture(scope="module")
def clip() -> CLIP:
    # 3 blocks, 2 heads, noisy biases and LayerNorms: a skipped piece changes the numbers
    return tiny_clip(3, vision_layers=DEPTH, vision_heads=2, perturb=0.05)


def _images(B: int = 2, H: int = 32, W: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _patch_masks(B: int, N: int, grid: tuple[int, int], patch: int = 8, seed: int = 2) -> torch.Tensor:
    """Random binary proposals made of whole patches, at the image size: (B, N, h * patch, w * patch)."""
    h, w = grid
    cells = torch.rand(B, N, h, w, generator=torch.Generator().manual_seed(seed)) > 0.5
    cells[..., 0, 0] = True  # none empty
    return cells.float().repeat_interleave(patch, dim=-2).repeat_interleave(patch, dim=-1)


def _reference(clip: CLIP, images: torch.Tensor, inside: torch.Tensor, start: int):
    """IP-CLIP as METHODS.md s.5 states it: one sequence [CLS_1..CLS_N; patches] through
    the masked blocks with a full (N + P)^2 attention mask -> (CLS copies, patches) after the last block."""
    visual = clip.visual
    x, _ = visual.forward_blocks(images, end=start)
    B, N, P = inside.shape
    t = torch.cat([x[:, :1].expand(B, N, -1), x[:, 1:]], dim=1)  # (B, N + P, D)
    allowed = torch.zeros(B, N + P, N + P, dtype=torch.bool)
    allowed[:, :N, :N] = torch.eye(N, dtype=torch.bool)
    allowed[:, :N, N:] = inside
    allowed[:, N:, N:] = True  # patches see patches, never a CLS copy
    for block in visual.transformer.resblocks[start:]:
        q, k, v = block.attn.qkv(block.ln_1(t))
        t = t + block.attn.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None]))
        t = t + block.mlp(block.ln_2(t))
    return t[:, :N], t[:, N:]


# --- IP-CLIP ------------------------------------------------------------------------------


def test_default_start_layer_is_8_of_12_scaled_and_clamped():
    assert default_start_layer(12) == 8
    assert default_start_layer(24) == 16
    assert default_start_layer(6) == 4
    assert default_start_layer(3) == 2
    assert default_start_layer(1) == 0  # round(8/12) = 1 would leave no masked block
    with pytest.raises(ValueError, match="depth"):
        default_start_layer(0)


def test_whole_image_proposal_at_the_last_block_is_clips_image_embedding(clip):
    images = _images()
    masks = torch.ones(2, 3, 32, 48)
    emb = ip_clip_embeddings(clip, images, masks, start_layer=DEPTH - 1)
    assert emb.shape == (2, 3, 32)
    expected = clip.encode_image(images)
    for n in range(3):
        torch.testing.assert_close(emb[:, n], expected, rtol=1e-5, atol=1e-5)
    # from an earlier block, patches no longer see the CLS token: not CLIP's embedding any more
    earlier = ip_clip_embeddings(clip, images, masks, start_layer=0)
    assert (earlier[:, 0] - expected).abs().max() > 1e-3


def test_equals_the_full_sequence_with_the_published_attention_mask(clip):
    images = _images()
    inside = proposal_attention_mask(_patch_masks(2, 5, (4, 6)), (4, 6))
    for start in (0, 1, DEPTH - 1):
        x, _ = clip.visual.forward_blocks(images, end=start)
        cls_ref, _ = _reference(clip, images, inside, start)
        torch.testing.assert_close(ip_clip_tokens(clip.visual, x, inside, start_layer=start), cls_ref,
                                   rtol=1e-5, atol=1e-5)


def test_patch_tokens_do_not_depend_on_the_proposals(clip):
    images = _images()
    a = proposal_attention_mask(_patch_masks(2, 4, (4, 6), seed=3), (4, 6))
    b = proposal_attention_mask(_patch_masks(2, 7, (4, 6), seed=4), (4, 6))
    cls_a, patches_a = _reference(clip, images, a, 0)
    cls_b, patches_b = _reference(clip, images, b, 0)
    torch.testing.assert_close(patches_a, patches_b, rtol=1e-5, atol=1e-5)  # summation order aside
    # they are the patches alone through the masked blocks (what ip_clip_tokens runs once)
    x, _ = clip.visual.forward_blocks(images, end=0)
    torch.testing.assert_close(patches_a, clip.visual.transformer(x[:, 1:]), rtol=1e-5, atol=1e-5)
    # while the CLS copies do depend on them
    assert (cls_a[:, 0] - cls_b[:, 0]).abs().max() > 1e-4


def test_cls_copy_never_sees_a_patch_outside_its_proposal(clip):
    inside = proposal_attention_mask(_patch_masks(1, 3, (4, 6), seed=5), (4, 6))
    allowed = ip_attention_mask(inside)
    assert allowed.shape == (1, 1, 3, 3 + 24)
    assert torch.equal(allowed[0, 0, :, :3], torch.eye(3, dtype=torch.bool))  # itself, no other copy
    assert torch.equal(allowed[0, 0, :, 3:], inside[0])
    # in the last masked block, a patch token outside proposal n cannot change copy n: zero gradient
    x, _ = clip.visual.forward_blocks(_images(1), end=DEPTH - 1)
    x = x.detach().requires_grad_()
    n = 1
    ip_clip_tokens(clip.visual, x, inside, start_layer=DEPTH - 1)[0, n].sum().backward()
    grad = x.grad[0, 1:].abs().sum(-1)  # per patch
    assert (grad[~inside[0, n]] == 0).all() and (grad[inside[0, n]] > 0).all()
    # with two masked blocks patches mix first, so outside patches do reach copy n (the test can fail)
    x, _ = clip.visual.forward_blocks(_images(1), end=DEPTH - 2)
    x = x.detach().requires_grad_()
    ip_clip_tokens(clip.visual, x, inside, start_layer=DEPTH - 2)[0, n].sum().backward()
    assert (x.grad[0, 1:].abs().sum(-1)[~inside[0, n]] > 0).all()


def test_one_pass_equals_separate_passes_and_chunks(clip):
    images = _images(2, 40, 36)  # not a multiple of the patch: padded
    masks = torch.rand(2, 5, 40, 36, generator=torch.Generator().manual_seed(6))
    one = ip_clip_embeddings(clip, images, masks)
    assert one.shape == (2, 5, 32)
    separate = torch.stack([ip_clip_embeddings(clip, images, masks[:, n:n + 1])[:, 0] for n in range(5)], dim=1)
    torch.testing.assert_close(one, separate, rtol=1e-5, atol=1e-5)
    for chunk in (1, 2, 5, 9):
        torch.testing.assert_close(ip_clip_embeddings(clip, images, masks, chunk=chunk), one, rtol=1e-5, atol=1e-5)
    # proposals differ, so do their embeddings
    assert (one[:, 0] - one[:, 1]).abs().max() > 1e-4


def test_half_covered_patch_is_inside_and_small_or_empty_proposals_are_finite(clip):
    masks = torch.zeros(1, 4, 32, 32)
    masks[0, 0, :, :4] = 1  # half of each patch of column 0: coverage exactly 0.5, inside
    masks[0, 1, 9:11, 17:20] = 1  # 6 pixels of patch (1, 2): below 0.5, falls back to that patch
    masks[0, 1, 0, 0] = 0.5  # 1 pixel of patch (0, 0), less covered
    # masks[0, 2] stays zero: sees no patch
    masks[0, 3] = 0.4  # soft, never reaching 0.5: falls back to one patch
    inside = proposal_attention_mask(masks, (4, 4))
    assert inside.shape == (1, 4, 16) and inside.dtype == torch.bool
    assert inside[0, 0].nonzero().flatten().tolist() == [0, 4, 8, 12]
    assert inside[0, 1].nonzero().flatten().tolist() == [1 * 4 + 2]
    assert not inside[0, 2].any()
    assert inside[0, 3].sum() == 1
    assert proposal_attention_mask(masks, (4, 4), threshold=0.6)[0, 0].sum() == 0 + 1  # fallback only
    emb = ip_clip_embeddings(clip, _images(1, 32, 32), masks)
    assert torch.isfinite(emb).all()
    # a proposal that sees no patch is the CLS token alone through the masked blocks: any image content
    # after the start layer is invisible to it, so two all-zero proposals agree
    two = ip_clip_embeddings(clip, _images(1, 32, 32), torch.zeros(1, 2, 32, 32))
    torch.testing.assert_close(two[0, 0], two[0, 1])
    torch.testing.assert_close(two[0, 0], emb[0, 2])


def test_masks_of_another_size_are_resized_to_the_image(clip):
    images = _images(1, 32, 48)
    full = _patch_masks(1, 3, (4, 6), seed=7)
    half = full[..., ::2, ::2]  # (16, 24): the same proposals at half resolution
    torch.testing.assert_close(ip_clip_embeddings(clip, images, half), ip_clip_embeddings(clip, images, full))
    # an image whose size is not a multiple of the patch: the padding lies outside every proposal
    images = _images(1, 36, 48)
    masks = torch.ones(1, 1, 18, 24)
    inside_all = ip_clip_embeddings(clip, images, masks, start_layer=DEPTH - 1)
    torch.testing.assert_close(inside_all[:, 0], clip.encode_image(images), rtol=1e-5, atol=1e-5)  # 4 px of 8: inside


def test_gradients_reach_the_attention_and_layernorms(clip):
    model = tiny_clip(3, vision_layers=DEPTH, vision_heads=2)
    emb = ip_clip_embeddings(model, _images(1), _patch_masks(1, 2, (4, 6)))
    emb.square().sum().backward()
    blocks = model.visual.transformer.resblocks
    for p in (blocks[0].attn.in_proj_weight, blocks[-1].attn.in_proj_weight, blocks[-1].ln_1.weight,
              model.visual.ln_post.weight, model.visual.proj):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_ipclip_refuses_bad_arguments(clip):
    images, masks = _images(2), torch.ones(2, 1, 32, 48)
    with pytest.raises(ValueError, match="start_layer=3"):
        ip_clip_embeddings(clip, images, masks, start_layer=3)
    with pytest.raises(ValueError, match="chunk=0"):
        ip_clip_embeddings(clip, images, masks, chunk=0)
    with pytest.raises(ValueError, match="2 images but masks for 1"):
        ip_clip_embeddings(clip, images, masks[:1])
    with pytest.raises(ValueError, match="N = 0"):
        ip_clip_embeddings(clip, images, masks[:, :0])
    with pytest.raises(ValueError, match=r"\(B, N, H', W'\)"):
        ip_clip_embeddings(clip, images, masks[0])


# --- proposals ----------------------------------------------------------------------------

def _save_npz(path, masks):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, masks=masks)
    return path


def test_npz_proposals_of_every_dtype_are_read_as_float_masks(tmp_path):
    rng = np.random.default_rng(0)
    soft = rng.random((3, 6, 8)).astype(np.float32)
    torch.testing.assert_close(read_proposal_file(_save_npz(tmp_path / "a.npz", soft)), torch.from_numpy(soft))
    binary = soft > 0.5
    for array in (binary, binary.astype(np.uint8)):
        masks = read_proposal_file(_save_npz(tmp_path / "b.npz", array))
        assert masks.dtype == torch.float32 and torch.equal(masks, torch.from_numpy(binary).float())


@pytest.mark.parametrize("array, message", [
    (np.ones((6, 8), np.float32), r"shape \(6, 8\).*\(N, H, W\)"),
    (np.zeros((0, 6, 8), bool), "N = 0"),
    (np.full((1, 6, 8), 1.5, np.float32), r"outside \[0, 1\]"),
    (np.full((1, 6, 8), 255, np.uint8), "0/1"),
    (np.full((1, 6, 8), np.nan, np.float32), "NaN"),
])
def test_bad_npz_proposals_are_refused_naming_the_file(tmp_path, array, message):
    path = _save_npz(tmp_path / "img.npz", array)
    with pytest.raises(ProposalError, match=message) as err:
        read_proposal_file(path)
    assert str(path) in str(err.value)


def test_an_npz_without_masks_is_refused(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, other=np.ones((1, 2, 2)))
    with pytest.raises(ProposalError, match="no array 'masks'"):
        read_proposal_file(path)


def test_png_proposals_are_an_id_map(tmp_path):
    ids = np.zeros((6, 8), np.uint16)
    ids[:3, :4] = 7
    ids[3:, :] = 300  # 16-bit ids
    Image.fromarray(ids).save(tmp_path / "a.png")
    masks = read_proposal_file(tmp_path / "a.png")
    assert masks.shape == (2, 6, 8)  # 0 is no proposal; ids ordered by value
    assert torch.equal(masks[0], torch.from_numpy(ids == 7).float())
    assert torch.equal(masks[1], torch.from_numpy(ids == 300).float())
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ProposalError, match="RGB PNG"):
        read_proposal_file(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(ProposalError, match="no proposal"):
        read_proposal_file(tmp_path / "empty.png")


def test_proposal_files_are_found_by_image_id_and_resized_with_a_warning(tmp_path):
    masks = np.zeros((2, 10, 12), bool)
    masks[0, :, :6] = True
    masks[1, :, 6:] = True
    _save_npz(tmp_path / "sub" / "img1.npz", masks)
    source = ProposalFiles(tmp_path)
    image = np.zeros((10, 12, 3), np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(source(image, "sub/img1"), torch.from_numpy(masks).float())
    with pytest.warns(UserWarning, match=r"img1\.npz.*resized"):
        resized = source(np.zeros((20, 24, 3), np.uint8), "sub/img1")
    assert resized.shape == (2, 20, 24) and resized[0, :, :11].min() == 1 and resized[0, :, 13:].max() == 0
    with pytest.raises(ProposalError, match=r"image 'img2'.*img2\.npz or \.png"):
        source(image, "img2")
    Image.fromarray(np.ones((10, 12), np.uint8)).save(tmp_path / "sub" / "img1.png")
    with pytest.raises(ProposalError, match="two proposal files"):
        source(image, "sub/img1")
    with pytest.raises(FileNotFoundError, match="proposal folder"):
        ProposalFiles(tmp_path / "missing")


def test_regions_are_connected_components_per_class_plus_the_whole_image():
    labels = np.zeros((8, 10), np.int64)
    labels[1:3, 1:3] = 1  # class 1, blob A (4 px)
    labels[5:8, 6:10] = 1  # class 1, blob B (12 px): another proposal
    labels[0, 9] = 2  # 1 px of class 2: noise
    labels[:, 0] = 255
    masks = regions_from_labels(labels, min_area=0.02, ignore_index=255)
    assert torch.equal(masks[0], torch.ones(8, 10))  # the whole image first
    regions = [frozenset(map(tuple, m.nonzero().tolist())) for m in masks[1:]]
    assert regions[0] == frozenset(map(tuple, np.argwhere(labels == 0)))  # the largest first
    assert frozenset(map(tuple, np.argwhere(labels[5:8, 6:10] == 1) + [5, 6])) in regions
    assert frozenset(map(tuple, np.argwhere(labels[1:3, 1:3] == 1) + [1, 1])) in regions
    assert len(regions) == 3  # class 0, two blobs of class 1; class 2's pixel < 2 % and 255 ignored
    assert [int(m.sum()) for m in masks[1:]] == sorted((int(m.sum()) for m in masks[1:]), reverse=True)
    assert regions_from_labels(labels, min_area=0, ignore_index=255).shape[0] == 1 + 4
    assert regions_from_labels(labels, min_area=0, max_regions=2, whole_image=False).shape[0] == 2


def test_grid_proposals_tile_the_image():
    masks = grid_proposals((7, 10), (2, 3))
    assert masks.shape == (7, 7, 10)
    assert torch.equal(masks[0], torch.ones(7, 10)) and torch.equal(masks[1:].sum(0), torch.ones(7, 10))
    assert GridProposals((2, 2))(np.zeros((4, 4, 3), np.uint8), "x").shape == (5, 4, 4)


def test_prediction_proposals_are_the_regions_of_the_prediction():
    labels = np.zeros((6, 6), np.int64)
    labels[:, 3:] = 4
    source = PredictionProposals(lambda image: labels, "from:test", min_area=0)
    masks = source(np.zeros((6, 6, 3), np.uint8), "a")
    assert masks.shape == (3, 6, 6) and torch.equal(masks[1] + masks[2], torch.ones(6, 6))
    bad = PredictionProposals(lambda image: labels[:3], "from:test")
    with pytest.raises(ProposalError, match="from:test"):
        bad(np.zeros((6, 6, 3), np.uint8), "a")
