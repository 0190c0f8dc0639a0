"""The zero-shot head on a tiny random CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tiny import tiny_clip
from reclip.clip.model import CLIP, pad_to_patch
from reclip.features import STRATEGIES, FeatureContext, dense_features
from reclip.heads.zero_shot import ZeroShotSegmentor
from reclip.inference import InferenceConfig, segment
from reclip.text import QueryEmbeddings, max_over_synonyms


def _head(clip, weights, class_index, num_classes, strategy="maskclip"):
    return ZeroShotSegmentor(clip, QueryEmbeddings(weights, torch.as_tensor(class_index), num_classes), strategy)


@pytest.fixture(scope="module")
def clip() -> CLIP:
    return tiny_clip(vision_layers=2)


def text_weights(rows: int, seed: int = 5) -> torch.Tensor:
    return F.normalize(torch.randn(rows, 32, generator=torch.Generator().manual_seed(seed)), dim=-1)


def images(*size: int) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_logits_are_cosines_of_dense_features(clip, strategy):
    W = text_weights(4)
    head = _head(clip, W, torch.arange(4), 4, strategy)
    x = images(2, 3, 32, 48)
    logits = head(x)
    assert logits.shape == (2, 4, 4, 6)
    # the head's W_q (ResCLIP reads it) and the backbone's auxiliary model (ProxyCLIP's proxy)
    context = FeatureContext(queries=W, aux=head.backbone.aux)
    expected = torch.einsum("bdhw,cd->bchw", dense_features(clip, x, strategy, context), W)
    torch.testing.assert_close(logits, expected)
    assert logits.abs().max() <= 1 + 1e-5  # raw cosines, no temperature


def test_synonyms_give_query_logits_and_a_class_index(clip):
    W = text_weights(5)
    class_index = torch.tensor([0, 0, 1, 2, 2])
    head = _head(clip, W, class_index, 3, "clearclip")
    assert head.num_classes == 3 and torch.equal(head.class_index, class_index)
    x = images(2, 3, 32, 40)
    q = head(x)  # one channel per query (synonym), not reduced
    assert q.shape == (2, 5, 4, 5)
    expected = torch.einsum("bdhw,sd->bshw", dense_features(clip, x, "clearclip"), W)
    torch.testing.assert_close(q, expected)
    torch.testing.assert_close(head.query_logits(x), q)
    # reduced to classes by class_index (post-processing does this after its softmax)
    logits = max_over_synonyms(q, head.class_index, head.num_classes)
    assert logits.shape == (2, 3, 4, 5)
    torch.testing.assert_close(logits[:, 0], torch.maximum(q[:, 0], q[:, 1]))
    torch.testing.assert_close(logits[:, 1], q[:, 2])
    torch.testing.assert_close(logits[:, 2], torch.maximum(q[:, 3], q[:, 4]))
    # both synonyms win somewhere, so the max really selects per pixel
    assert (q[:, 0] > q[:, 1]).any() and (q[:, 1] > q[:, 0]).any()
    # synonyms need not be contiguous
    perm = torch.tensor([3, 0, 2, 4, 1])
    head_perm = _head(clip, W[perm], class_index[perm], 3, "clearclip")
    torch.testing.assert_close(head_perm(x), q[:, perm])
    torch.testing.assert_close(max_over_synonyms(head_perm(x), head_perm.class_index, 3), logits)


def test_segment_with_synonym_head_gives_class_probabilities(clip):
    W = text_weights(5)
    head = _head(clip, W, torch.tensor([1, 0, 1, 2, 0]), 3, "sclip")
    image = torch.randint(0, 256, (24, 40, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    cfg = InferenceConfig(mode="slide", window=16, stride=8, logit_scale=50.0)
    result = segment(head, image.numpy(), cfg, background_index=None, return_probs=True)
    assert result.probs.shape == (3, 24, 40) and result.labels.shape == (24, 40)
    np.testing.assert_array_equal(result.labels, result.probs.argmax(0))


def test_cosines_are_float32_under_autocast(clip):
    W = text_weights(4)
    head = _head(clip, W, torch.arange(4), 4, "maskclip")
    x = images(1, 3, 27, 41)  # padded: the crop's interpolation runs too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
        feats = dense_features(clip, pad_to_patch(x, 8), "maskclip")  # the same bf16 features
        bf16_cosines = torch.einsum("bdhw,cd->bchw", feats, W)
    assert out.dtype == torch.float32 and bf16_cosines.dtype == torch.bfloat16
    grid = torch.einsum("bdhw,cd->bchw", feats.float(), W)  # float32 product of those features
    expected = F.interpolate(grid, size=(32, 48), mode="bilinear", align_corners=False)[..., :27, :41]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert (bf16_cosines.float() - grid).abs().max() > 1e-4  # what the fp32 product avoids


def test_reduce_synonyms_gradient():
    q = torch.randn(1, 3, 2, 2, requires_grad=True)
    out = max_over_synonyms(q, torch.tensor([1, 0, 1]), 2)
    out.sum().backward()
    # each pixel of class 1 sends its gradient to exactly one of its two synonyms
    torch.testing.assert_close(q.grad[0, [0, 2]].sum(0), torch.ones(2, 2))
    torch.testing.assert_close(q.grad[0, 1], torch.ones(2, 2))


def test_padding_is_cropped_in_alignment(clip):
    W = text_weights(3)
    head = _head(clip, W, torch.arange(3), 3, "maskclip")
    x = images(1, 3, 27, 41)  # patch 8: padded to 32 x 48, grid 4 x 6
    logits = head(x)
    assert logits.shape == (1, 3, 27, 41)
    # the contract: grid logits of the padded input, upsampled to the padded size, cropped
    grid_logits = head(pad_to_patch(x, 8))
    assert grid_logits.shape == (1, 3, 4, 6)
    expected = F.interpolate(grid_logits, size=(32, 48), mode="bilinear", align_corners=False)[..., :27, :41]
    torch.testing.assert_close(logits, expected)
    # resizing the grid straight to (27, 41) would stretch the padded border over the image
    stretched = F.interpolate(grid_logits, size=(27, 41), mode="bilinear", align_corners=False)
    assert not torch.allclose(logits, stretched, atol=1e-3)


def test_buffers_and_validation(clip):
    W = text_weights(3)
    head = _head(clip, W, torch.tensor([0, 1, 1]), 2)
    buffers = dict(head.named_buffers())
    assert set(buffers) == {"head.text_weights", "head.class_index"}  # CLIP itself has none
    assert buffers["head.class_index"].dtype == torch.long
    assert head.strategy == STRATEGIES["maskclip"]
    with pytest.raises(ValueError, match="L2-normalised"):
        _head(clip, 2 * W, torch.arange(3), 3)
    with pytest.raises(ValueError, match="cover every class"):
        _head(clip, W, torch.tensor([0, 1, 1]), 3)
    with pytest.raises(ValueError, match="cover every class"):
        _head(clip, W, torch.tensor([0, 1, 3]), 3)
    with pytest.raises(ValueError, match="D=16"):
        _head(clip, F.normalize(torch.randn(3, 16), dim=-1), torch.arange(3), 3)
    with pytest.raises(ValueError, match="available"):
        _head(clip, W, torch.arange(3), 3, "nope")
