"""MAFT's core on a tiny random CLIP: the IP-CLIP encoder, proposal sources, the proposal segmentor."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from layouts import write_voc
from tiny import tiny_clip
from reclip import api
from reclip.cli import main
from reclip.clip.load import load_clip
from reclip.clip.model import CLIP
from reclip.data.protocol import load_protocol
from reclip.inference import InferenceConfig, image_context, infer_logits, segment
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
from reclip.maft.segmentor import MAFTSegmentor, is_maft_trainable
from reclip.methods import FAMILIES, METHODS, build_segmentor, inference_config, load_trained
from reclip.text import QueryEmbeddings, Vocabulary

pytestmark = pytest.mark.usefixtures("isolated_cache")

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


@pytest.mark.parametrize("size", [(34, 50), (33, 41), (36, 48)])
def test_a_whole_image_proposal_covers_every_patch_at_any_image_size(clip, size):
    # 34 = 4 x 8 + 2: the border patches hold 2 image rows of 8; judged on their image part they are inside
    images = _images(1, *size)
    emb = ip_clip_embeddings(clip, images, torch.ones(1, 1, *size), start_layer=DEPTH - 1)
    torch.testing.assert_close(emb[:, 0], clip.encode_image(images), rtol=1e-5, atol=1e-5)
    # a proposal of the image rows of the bottom patch row covers that row (its image part), and nothing else
    masks = torch.zeros(1, 1, *size)
    masks[..., (size[0] - 1) // 8 * 8:, :] = 1
    frame = (-(-size[0] // 8) * 8, -(-size[1] // 8) * 8)
    padded = F.pad(masks, (0, frame[1] - size[1], 0, frame[0] - size[0]))
    inside = proposal_attention_mask(padded, (frame[0] // 8, frame[1] // 8), image_size=size)
    assert inside[0, 0].view(frame[0] // 8, -1)[-1].all() and inside[0, 0].sum() == frame[1] // 8


def test_the_coverage_threshold_is_a_fraction_in_0_1(clip):
    images, masks = _images(1), torch.ones(1, 1, 32, 48)
    for bad in (0, -0.5, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="threshold="):
            ip_clip_embeddings(clip, images, masks, threshold=bad)
        with pytest.raises(ValueError, match="threshold="):
            proposal_attention_mask(masks, (4, 6), threshold=bad)
        with pytest.raises(ValueError, match="threshold="):
            MAFTSegmentor(clip, _queries(), threshold=bad)
    assert proposal_attention_mask(masks, (4, 6), threshold=1).all()  # 1: wholly covered patches only
    with pytest.raises(ValueError, match=r"start_layer=3: give the first masked block, 0\.\.2"):
        MAFTSegmentor(clip, _queries(), start_layer=3)


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
    regions = PredictionProposals(lambda image: labels, "from:test", min_area=0, whole_image=False)
    assert torch.equal(regions(np.zeros((6, 6, 3), np.uint8), "a"), masks[1:])  # the same regions, no whole image
    from reclip.maft.proposals import describe_source

    assert describe_source(regions) != describe_source(source)  # a run records which of the two it used


def test_written_proposal_files_read_back_as_the_source_gave_them(tmp_path):
    from layouts import labels_unreadable, write_voc
    from reclip.data.datasets import SegmentationDataset
    from reclip.data.io import load_image
    from reclip.maft.proposals import write_proposal_files

    root = write_voc(tmp_path / "voc", n_train=0, n_val=3)
    data = SegmentationDataset("voc21", root, "val")
    (root / "JPEGImages" / f"{data.image_ids[2]}.jpg").write_bytes(b"not a jpeg")

    def source(image, image_id):  # binary regions that depend on the image
        return torch.from_numpy(np.stack([image[..., 0] > 127, image[..., 0] <= 127])).float()

    soft = lambda image, image_id: torch.full((2, *image.shape[:2]), 0.25)  # noqa: E731
    with labels_unreadable("write_proposal_files"), pytest.warns(UserWarning, match="no proposals for"):
        skipped = write_proposal_files(source, data, tmp_path / "hard")
    assert [path for path, _ in skipped] == [str(data.image_paths[2])]
    with pytest.warns(UserWarning, match="2008_000002"):
        write_proposal_files(soft, data, tmp_path / "soft")
    files, soft_files = ProposalFiles(tmp_path / "hard"), ProposalFiles(tmp_path / "soft")
    for image_id, path in list(zip(data.image_ids, data.image_paths))[:2]:
        image = load_image(path).image
        assert torch.equal(files(image, image_id), source(image, image_id))
        assert torch.equal(soft_files(image, image_id), torch.full((2, *image.shape[:2]), 0.25))
    # files already written are kept: a killed run continues where it stopped
    stamp = (tmp_path / "hard" / f"{data.image_ids[0]}.npz").stat().st_mtime_ns
    with pytest.warns(UserWarning):
        write_proposal_files(lambda image, image_id: 1 / 0, data, tmp_path / "hard")
    assert (tmp_path / "hard" / f"{data.image_ids[0]}.npz").stat().st_mtime_ns == stamp
    with pytest.raises(ProposalError, match=data.image_ids[0]):
        write_proposal_files(lambda image, image_id: torch.full((1, *image.shape[:2]), 2.0), data, tmp_path / "bad")


# --- the segmentor ------------------------------------------------------------------------

def _queries(class_index=(0, 1, 2), seed=8):
    weights = F.normalize(torch.randn(len(class_index), 32, generator=torch.Generator().manual_seed(seed)), dim=-1)
    index = torch.tensor(class_index)
    return QueryEmbeddings(weights, index, int(index.max()) + 1)


def _halves(size=(32, 48)):
    """Two binary proposals, left and right half, plus a soft one over everything: (3, H, W)."""
    masks = torch.zeros(3, *size)
    masks[0, :, : size[1] // 2] = 1
    masks[1, :, size[1] // 2:] = 1
    masks[2] = 0.3
    return masks


def test_semseg_is_the_sum_of_proposal_class_probabilities_times_masks(clip):
    seg = MAFTSegmentor(clip, _queries(), logit_scale=30.0).eval()
    images, masks = _images(1), _halves()[None]
    emb = F.normalize(ip_clip_embeddings(clip, images, masks, start_layer=seg.start_layer), dim=-1)
    probs = (30.0 * emb @ seg.text_weights.t()).softmax(-1)  # (1, N, C)
    torch.testing.assert_close(seg.proposal_probabilities(images, masks), probs)
    expected = torch.einsum("bnc,bnhw->bchw", probs, masks)
    torch.testing.assert_close(seg.semantic_scores(images, masks), expected)
    # the left half is painted by proposals 0 and 2 only, the right by 1 and 2
    torch.testing.assert_close(expected[0, :, 5, 3], probs[0, 0] + 0.3 * probs[0, 2])
    torch.testing.assert_close(expected[0, :, 5, 40], probs[0, 1] + 0.3 * probs[0, 2])
    assert (probs[0, 0] - probs[0, 1]).abs().max() > 1e-3  # the halves are told apart


def test_synonyms_reduce_after_the_softmax(clip):
    seg = MAFTSegmentor(clip, _queries((0, 1, 1, 2)))
    images, masks = _images(1), _halves()[None]
    q = seg.proposal_logits(images, masks).softmax(-1)  # (1, N, S = 4)
    p = seg.proposal_probabilities(images, masks)
    assert p.shape == (1, 3, 3)
    torch.testing.assert_close(p[..., 1], torch.maximum(q[..., 1], q[..., 2]))
    torch.testing.assert_close(p[..., 2], q[..., 3])


def test_for_image_holds_that_images_proposals_and_forward_paints_them(clip):
    seg = MAFTSegmentor(clip, _queries(), proposals=lambda image, image_id: _halves(image.shape[:2])).eval()
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    images = _images(1)
    with torch.no_grad():
        with image_context(seg, image, "a") as held:
            assert torch.equal(held, _halves())
            logits = seg(images)
        grid = seg(images)  # outside: the whole image and a 3 x 3 grid
    assert logits.shape == (1, 3, 32, 48) and torch.isfinite(logits).all()
    # log(semseg): the inference layer's softmax gives semseg normalised per pixel
    torch.testing.assert_close(logits.softmax(1), F.normalize(seg.semantic_scores(images, _halves()[None]), p=1, dim=1))
    # constant over each half: the proposals, not the grid, painted it
    assert (logits[..., :24] == logits[..., :1, :1]).all() and (logits[..., 24:] == logits[..., :1, 24:25]).all()
    assert not torch.allclose(grid, logits)
    # the inference layer resizes the input (short side) but the logits stay at the proposals' size
    with image_context(seg, image, "a"):
        full = infer_logits(seg, images, InferenceConfig(short_side=64))
    assert full.shape == (1, 3, 32, 48)


def test_a_window_or_a_batch_inside_for_image_is_refused(clip):
    seg = MAFTSegmentor(clip, _queries(), proposals=lambda image, image_id: _halves(image.shape[:2]))
    image = np.zeros((32, 48, 3), np.uint8)
    with image_context(seg, image, "a"), pytest.raises(ValueError, match="whole image.*--mode whole"):
        seg(_images(1, 32, 32))  # a square window of a 2:3 image
    with image_context(seg, image, "a"), pytest.raises(ValueError, match="batch of 2"):
        seg(_images(2))
    wrong = MAFTSegmentor(clip, _queries(), proposals=lambda image, image_id: _halves((16, 48)))
    with pytest.raises(ProposalError, match="have size"), image_context(wrong, image, "a"):
        pass
    # a segmentor without for_image gets a null context
    with image_context(torch.nn.Identity(), image, "a") as nothing:
        assert nothing is None


# --- the registry: a MAFT run and the training-free baseline ------------------------------


def test_a_maft_run_round_trips_through_the_registry(clip, tmp_path):
    vocabulary = Vocabulary.from_names(["cat", "dog"])
    family, method = FAMILIES["maft"], METHODS["maft"]
    model = family.new_model(method, clip, vocabulary, text_cache=False).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"clip.visual.ln_post.weight", "clip.visual.transformer.resblocks.0.attn.in_proj_weight",
            "clip.visual.transformer.resblocks.2.ln_2.bias"} <= trainable
    assert not trainable & {"clip.visual.proj", "clip.visual.conv1.weight", "clip.visual.ln_pre.weight",
                            "clip.visual.transformer.resblocks.0.mlp.c_fc.weight", "clip.ln_final.weight"}
    assert all(n.startswith("clip.visual.") and is_maft_trainable(n[len("clip.visual."):]) for n in trainable)
    with torch.no_grad():  # "fine-tune" it
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    model.threshold = 0.7  # not IP-CLIP's default: the run must carry it
    family.write_run(tmp_path, model, method, clip, vocabulary)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["method"], config["start_layer"], config["classes"]) == ("maft", 2, ["cat", "dog"])
    x = _images(1)
    loaded = build_segmentor("maft", clip, vocabulary, checkpoint=tmp_path, text_cache=False)
    assert loaded.threshold == 0.7
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        model.threshold = 0.5
        assert (model(x) - loaded(x)).abs().max() > 1e-4  # the threshold matters for these (grid) proposals
        frozen = build_segmentor("ipclip", clip, vocabulary, text_cache=False)(x)
    assert (frozen - loaded(x)).abs().max() > 1e-3  # the fine-tuned weights count ...
    assert loaded.clip is not clip and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():  # ... and the given CLIP is left as it was
        torch.testing.assert_close(build_segmentor("ipclip", clip, vocabulary, text_cache=False)(x), frozen)
    # open vocabulary: another class list than the training one
    assert load_trained(tmp_path, clip, Vocabulary.from_names(["sky", "road", "tree"]), text_cache=False)(x).shape[1] == 3
    # written as `reclip maft` writes runs: names relative to clip.visual
    state = load_file(tmp_path / "model.safetensors")
    assert "ln_post.weight" in state and not any(k.startswith(("clip.", "visual.")) for k in state)
    # a run written with the model's own names (clip.visual.*, as write_run wrote them before) loads the same
    prefixed = tmp_path / "prefixed"
    prefixed.mkdir()
    (prefixed / "config.json").write_text(json.dumps(config))
    save_file({f"clip.visual.{k}": v for k, v in state.items()}, prefixed / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(load_trained(prefixed, clip, vocabulary, text_cache=False)(x), loaded(x))
    # a run that records no threshold (written before it was recorded) gets IP-CLIP's 0.5
    del config["threshold"]
    (prefixed / "config.json").write_text(json.dumps(config))
    assert load_trained(prefixed, clip, vocabulary, text_cache=False).threshold == 0.5


def test_a_maft_run_that_does_not_fit_is_refused(clip, tmp_path):
    vocabulary = Vocabulary.from_names(["cat", "dog"])
    model = FAMILIES["maft"].new_model(METHODS["maft"], clip, vocabulary, text_cache=False)
    FAMILIES["maft"].write_run(tmp_path, model, METHODS["maft"], clip, vocabulary)
    with pytest.raises(ValueError, match="fingerprint"):
        load_trained(tmp_path, tiny_clip(4, vision_layers=DEPTH, vision_heads=2), vocabulary, text_cache=False)
    state = load_file(tmp_path / "model.safetensors")
    save_file({**state, "clip.transformer.resblocks.0.ln_1.weight": torch.ones(64)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not parameters of this CLIP's vision tower"):
        load_trained(tmp_path, clip, vocabulary, text_cache=False)
    save_file({"clip.visual.ln_post.weight": torch.ones(65)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="shapes do not fit"):
        load_trained(tmp_path, clip, vocabulary, text_cache=False)


def test_ipclip_refuses_strategy_overrides_and_slide(clip):
    vocabulary = Vocabulary.from_names(["cat", "dog"])
    with pytest.raises(ValueError, match="do not apply"):
        build_segmentor("ipclip", clip, vocabulary, strategy_overrides={"residual": False}, text_cache=False)
    with pytest.raises(ValueError, match="mode 'whole'"):
        inference_config("ipclip", load_protocol("voc20"), mode="slide")


# --- API and CLI: proposals reach the segmentor per image ---------------------------------


def _photos(folder):
    """Two images and their proposals: a split into left / right and one into top / bottom."""
    rng = np.random.default_rng(3)
    shapes = {"a": (24, 40), "sub/b": (36, 28)}
    for name, (h, w) in shapes.items():
        (folder / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / "images" / f"{name}.png")
    left = np.zeros((2, 24, 40), bool)
    left[0, :, :20], left[1, :, 20:] = True, True
    _save_npz(folder / "proposals" / "a.npz", left)
    ids = np.ones((36, 28), np.uint8)
    ids[18:] = 2
    (folder / "proposals" / "sub").mkdir()
    Image.fromarray(ids).save(folder / "proposals" / "sub" / "b.png")
    return shapes


def test_segment_with_proposal_files_matches_an_independent_loop(tmp_path, clip_file, capsys):
    _photos(tmp_path)
    out = tmp_path / "masks"
    code = main(["segment", "--clip", str(clip_file), "--method", "ipclip", "--classes", "cat,dog,grass",
                 "--proposals", str(tmp_path / "proposals"), "--templates", "single", "--quiet", "--out", str(out),
                 str(tmp_path / "images")])
    assert code == 0, capsys.readouterr().err
    clip = load_clip(clip_file)
    seg = build_segmentor("ipclip", clip, Vocabulary.from_names(["cat", "dog", "grass"]), templates="single")
    seg.proposals = ProposalFiles(tmp_path / "proposals")
    cfg = inference_config("ipclip", load_protocol("folder"))
    for name in ("a", "sub/b"):
        image = np.asarray(Image.open(tmp_path / "images" / f"{name}.png"))
        with torch.inference_mode(), image_context(seg, image, name):
            expected = segment(seg, image, cfg, background_index=None).labels
        written = np.asarray(Image.open(out / f"{name}.png"))
        np.testing.assert_array_equal(written, expected)
        halves = (written[:, :20], written[:, 20:]) if name == "a" else (written[:18], written[18:])
        assert all((h == h.flat[0]).all() for h in halves)  # one class per proposal


def test_evaluate_hands_each_image_its_id_and_records_the_source(tmp_path, clip_file):
    root = write_voc(tmp_path / "voc", n_val=2)
    seen = []

    def source(image, image_id):
        seen.append((image_id, image.shape[:2]))
        return grid_proposals(image.shape[:2], (2, 2))

    clip = load_clip(clip_file)
    result = api.evaluate(clip, "ipclip", "voc21", root, templates="single", proposals=source, progress=False,
                          num_workers=0)
    assert [i for i, _ in seen] == ["2008_000000", "2008_000001"] and seen[0][1] == (20, 28)
    assert result.num_images == 2 and result.settings["proposals"].startswith("<function")
    assert result.settings["inference"]["mode"] == "whole" and result.settings["inference"]["short_side"] == 480
    # from another method's prediction, by name
    made = api.evaluate(clip, "ipclip", "voc21", root, templates="single", proposals="from:maskclip",
                        progress=False, num_workers=0)
    assert made.settings["proposals"] == "from:maskclip" and 0 <= made.miou <= 1


def test_proposals_from_a_trained_run(tmp_path, clip_file):
    clip = load_clip(clip_file)
    vocabulary = Vocabulary.from_names(["cat", "dog"])
    method = METHODS["reclip++"]
    family = FAMILIES[method.family]
    family.write_run(tmp_path / "run", family.new_model(method, clip, vocabulary, text_cache=False), method, clip,
                     vocabulary)
    source = api.proposal_source(f"from:{tmp_path / 'run'}", clip, vocabulary, load_protocol("folder"))
    image = np.random.default_rng(0).integers(0, 256, (30, 44, 3), dtype=np.uint8)
    masks = source(image, "x")
    assert masks.shape[1:] == (30, 44) and torch.equal(masks[0], torch.ones(30, 44))
    # the regions of the run's prediction at its own test settings
    run = load_trained(tmp_path / "run", clip)
    labels = segment(run, image, inference_config("reclip++", load_protocol("folder")), background_index=None).labels
    assert torch.equal(masks, regions_from_labels(labels)) and masks.shape[0] > 1


def test_proposals_from_a_maft_run_are_refused(tmp_path, clip_file):
    clip = load_clip(clip_file)
    vocabulary = Vocabulary.from_names(["cat", "dog"])
    family, method = FAMILIES["maft"], METHODS["maft"]
    family.write_run(tmp_path / "maft", family.new_model(method, clip, vocabulary, text_cache=False), method, clip,
                     vocabulary)
    with pytest.raises(ValueError, match="a maft run, which classifies proposals itself"):
        api.proposal_source(f"from:{tmp_path / 'maft'}", clip, vocabulary, load_protocol("folder"))


@pytest.mark.parametrize("argv, message", [
    (["--method", "ipclip"], "classifies mask proposals: give them"),
    (["--method", "maskclip", "--proposals", "grid"], "takes no mask proposals; they are for maft, ipclip"),
    (["--method", "ipclip", "--proposals", "/nonexistent/props"], "no such folder"),
    (["--method", "ipclip", "--proposals", "from:segclip"], "neither a training-free method"),
    (["--method", "ipclip", "--proposals", "from:reclip++"], "from:RUN_DIR"),
    (["--method", "ipclip", "--proposals", "from:ipclip"], "classifies proposals itself"),
    (["--method", "ipclip", "--proposals", "grid:3"], "RxC"),
    (["--method", "ipclip", "--proposals", "grid", "--mode", "slide"], "mode 'whole'"),
])
def test_proposal_options_give_clear_errors(tmp_path, clip_file, capsys, argv, message):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img.jpg")
    code = main(["segment", "--clip", str(clip_file), "--classes", "a,b", "--out", str(tmp_path / "out"),
                 "--templates", "single", "--quiet", *argv, str(tmp_path / "img.jpg")])
    assert code == 2
    assert message in capsys.readouterr().err
