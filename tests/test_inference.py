"""Tests for reclip.inference (whole / sliding-window inference) and reclip.postprocess."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reclip.inference as inference
from reclip.data.transforms import CLIP_MEAN, CLIP_STD, to_tensor_normalized
from reclip.inference import InferenceConfig, infer_logits, segment, slide_windows
from reclip.postprocess import (
    PostprocessConfig,
    background_threshold,
    class_logits,
    pamr,
    postprocess,
    predict_labels,
    probabilities,
    prompt_denoise,
    prompt_denoise_official,
)
from reclip.text import max_over_synonyms


class PatchSegmentor(nn.Module):
    """Fake segmentor: replicate-pad to a multiple of ``patch``, average-pool each patch,
    then a fixed 1x1 conv to ``num_classes`` logits. Grid (ceil(H/p), ceil(W/p)) < input.
    Records the input shape of every call."""

    def __init__(self, patch: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.patch = patch
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(num_classes, 3, 1, 1, generator=generator))
        self.calls: list[tuple[int, ...]] = []
        self.autocast_seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        self.autocast_seen.append(torch.is_autocast_enabled(x.device.type))
        pad_h, pad_w = -x.shape[-2] % self.patch, -x.shape[-1] % self.patch
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return F.conv2d(F.avg_pool2d(x, self.patch), self.weight)


class QuerySegmentor(PatchSegmentor):
    """PatchSegmentor with one channel per query and a ``class_index`` (synonyms), like the
    zero-shot head: query logits = ``base`` + a small image-dependent 1x1 conv."""

    def __init__(self, class_index, base, weight_scale, patch: int = 4) -> None:
        super().__init__(patch, len(class_index))
        self.register_buffer("class_index", torch.as_tensor(class_index, dtype=torch.long))
        self.num_classes = int(self.class_index.max()) + 1
        self.register_buffer("base", torch.as_tensor(base, dtype=torch.float32))
        with torch.no_grad():
            self.weight.mul_(torch.as_tensor(weight_scale, dtype=torch.float32)[:, None, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.base[:, None, None]


def naive_slide(segmentor, image, window, stride):
    """Reference: mmseg slide_inference written out, one window per call."""
    _, _, height, width = image.shape
    preds, count = None, torch.zeros(1, 1, height, width)
    for y1, y2, x1, x2 in slide_windows(height, width, window, stride):
        out = segmentor(image[:, :, y1:y2, x1:x2])
        out = F.interpolate(out, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
        preds = torch.zeros(image.shape[0], out.shape[1], height, width) if preds is None else preds
        preds[:, :, y1:y2, x1:x2] += out
        count[:, :, y1:y2, x1:x2] += 1
    return preds / count


def smooth_image(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Position-dependent normalised image (B, 3, H, W) with some texture."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(-1, 1, height)[:, None]
    xs = torch.linspace(-1, 1, width)[None, :]
    base = torch.stack([ys + xs, ys * xs, torch.sin(3 * xs) - ys])  # (3, H, W)
    return base.expand(batch, 3, height, width) + 0.3 * torch.randn(batch, 3, height, width, generator=g)


# --------------------------------------------------------------------------- windows


def test_slide_windows_follow_mmseg_grid_and_cover_every_pixel():
    windows = slide_windows(5, 7, 3, 2)
    # h_grids = (5 - 3 + 1) // 2 + 1 = 2, w_grids = (7 - 3 + 1) // 2 + 1 = 3; last flush
    assert windows == [(0, 3, 0, 3), (0, 3, 2, 5), (0, 3, 4, 7), (2, 5, 0, 3), (2, 5, 2, 5), (2, 5, 4, 7)]
    for height, width, window, stride in [(37, 50, 16, 8), (30, 21, (16, 12), (5, 7)), (10, 9, 16, 8)]:
        cover = np.zeros((height, width), int)
        wins = slide_windows(height, width, window, stride)
        (ch, cw), (sh, sw) = [(v, v) if isinstance(v, int) else v for v in (window, stride)]
        assert len(wins) == (max(height - ch + sh - 1, 0) // sh + 1) * (max(width - cw + sw - 1, 0) // sw + 1)
        for y1, y2, x1, x2 in wins:
            assert (y2 - y1, x2 - x1) == (min(ch, height), min(cw, width))
            cover[y1:y2, x1:x2] += 1
        assert cover.min() >= 1
        assert max(w[1] for w in wins) == height and max(w[3] for w in wins) == width


# --------------------------------------------------------------------------- inference


def test_whole_equals_direct_upsample():
    seg, image = PatchSegmentor(), smooth_image(2, 30, 22)
    out = infer_logits(seg, image, InferenceConfig(mode="whole"))
    expected = F.interpolate(seg(image), size=(30, 22), mode="bilinear", align_corners=False)
    assert out.shape == (2, 3, 30, 22) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_slide_with_window_equal_to_image_equals_whole():
    seg, image = PatchSegmentor(), smooth_image(1, 24, 32)
    slide = infer_logits(seg, image, InferenceConfig(mode="slide", window=(24, 32), stride=(24, 32)))
    whole = infer_logits(seg, image, InferenceConfig(mode="whole"))
    torch.testing.assert_close(slide, whole)


def test_slide_matches_reference_and_batches_all_windows():
    image = smooth_image(2, 37, 50)
    seg = PatchSegmentor()
    cfg = InferenceConfig(mode="slide", window=16, stride=8, batch_size=5)
    out = infer_logits(seg, image, cfg)
    n_windows = len(slide_windows(37, 50, 16, 8))
    assert n_windows > 5
    # windows of both images batched together, batch_size at a time
    assert len(seg.calls) == math.ceil(2 * n_windows / 5)
    assert all(call[0] == 5 for call in seg.calls[:-1])
    assert sum(call[0] for call in seg.calls) == 2 * n_windows
    torch.testing.assert_close(out, naive_slide(PatchSegmentor(), image, 16, 8))


def test_slide_counts_average_overlaps():
    """A segmentor with constant logits gives exactly that constant after averaging."""
    def constant(x):
        return torch.full((x.shape[0], 2, 3, 3), 7.0)

    out = infer_logits(constant, torch.zeros(1, 3, 29, 41), InferenceConfig(mode="slide", window=12, stride=5))
    torch.testing.assert_close(out, torch.full((1, 2, 29, 41), 7.0))


def test_slide_non_square_and_image_smaller_than_window():
    seg = PatchSegmentor()
    image = smooth_image(1, 20, 11)  # smaller than the window in width
    cfg = InferenceConfig(mode="slide", window=16, stride=6, batch_size=64)
    out = infer_logits(seg, image, cfg)
    assert out.shape == (1, 3, 20, 11)
    assert all(call[-2:] == (16, 11) for call in seg.calls)
    torch.testing.assert_close(out, naive_slide(seg, image, 16, 6))
    tiny = smooth_image(1, 9, 7)  # smaller in both: one window, equal to whole
    torch.testing.assert_close(infer_logits(seg, tiny, cfg), infer_logits(seg, tiny, InferenceConfig()))


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_short_side_resize_returns_original_size(mode):
    seg, image = PatchSegmentor(), smooth_image(1, 30, 45)
    cfg = InferenceConfig(mode=mode, short_side=16, window=12, stride=8)
    out = infer_logits(seg, image, cfg)
    assert out.shape == (1, 3, 30, 45)
    if mode == "whole":
        assert seg.calls == [(1, 3, 16, 24)]
        capped = InferenceConfig(short_side=16, max_long_side=20)  # scale min(16/30, 20/45)
        assert infer_logits(seg, image, capped).shape == (1, 3, 30, 45)
        assert seg.calls[-1] == (1, 3, 13, 20)
    else:
        assert all(call[-2:] == (12, 12) for call in seg.calls)
    assert infer_logits(seg, image, cfg, out_size=(7, 9)).shape == (1, 3, 7, 9)


def test_autocast_auto_is_off_on_cpu_and_modes_select_the_dtype():
    seg, image = PatchSegmentor(), smooth_image(1, 16, 16)
    dtypes = []
    seg.register_forward_pre_hook(lambda m, args: dtypes.append(torch.get_autocast_dtype("cpu")))
    infer_logits(seg, image, InferenceConfig(autocast="auto"))
    infer_logits(seg, image, InferenceConfig(autocast=False))
    assert seg.autocast_seen == [False, False]
    for mode, dtype in [(True, torch.bfloat16), ("bf16", torch.bfloat16), ("fp16", torch.float16)]:
        out = infer_logits(seg, image, InferenceConfig(autocast=mode))
        assert seg.autocast_seen[-1] is True and dtypes[-1] == dtype and out.dtype == torch.float32
    cfg = InferenceConfig(autocast="auto")
    assert cfg.autocast_dtype("cpu") is None and cfg.autocast_dtype("cuda") == torch.bfloat16
    assert InferenceConfig(autocast="fp16").autocast_dtype("cpu") == torch.float16
    for bad in ("float16", "on", 1, None):
        with pytest.raises(ValueError, match="autocast must be False.*'fp16'.*'auto'"):
            InferenceConfig(autocast=bad)


def test_bad_segmentor_output_and_config_errors_are_explicit():
    with pytest.raises(ValueError, match="segmentor must return"):
        infer_logits(lambda x: x[0], torch.zeros(1, 3, 8, 8), InferenceConfig())
    with pytest.raises(ValueError, match="stride"):
        InferenceConfig(mode="slide", window=8, stride=16)
    with pytest.raises(ValueError, match="unknown inference option"):
        InferenceConfig.from_dict({"mode": "slide", "windw": 224})
    cfg = InferenceConfig.from_dict({"mode": "slide", "window": [336, 448], "stride": [112, 224]})
    assert cfg.window == (336, 448)


# --------------------------------------------------------------------------- post-processing


def test_background_threshold_exactly_where_max_prob_is_low():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 10, 12, generator=g)
    cfg = InferenceConfig(logit_scale=2.0, prob_thd=0.5)
    labels = predict_labels(logits, cfg, background_index=0)
    probs = probabilities(logits, 2.0)
    low = probs.amax(1) < 0.5
    assert 0 < int(low.sum()) < low.numel()  # both cases occur
    expected = torch.where(low, torch.zeros_like(labels), probs.argmax(1))
    assert torch.equal(labels, expected)
    assert torch.equal(background_threshold(probs.argmax(1), probs, 0.5, 3)[low], torch.full_like(labels[low], 3))
    with pytest.raises(ValueError, match="background_index"):
        predict_labels(logits, cfg, background_index=None)


def test_prompt_denoising_removes_unconfident_class_but_never_all():
    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 0, :, :2] = 1.0  # class 0 confident on the left
    logits[0, 1, :, 2:] = 0.9  # class 1 a little less confident on the right
    logits[0, 2] = 0.55  # class 2 everywhere second best: max softmax(10 x) < 0.6
    logits[0, 0, 0, 0], logits[0, 2, 0, 0] = 0.95, 0.96  # and it wins one pixel narrowly
    assert probabilities(logits, 1.0).argmax(1)[0, 0, 0] == 2
    conf = torch.softmax(10 * logits, 1).flatten(2).amax(-1)[0]
    assert conf[2] < 0.6 < min(conf[0], conf[1])
    denoised = prompt_denoise(logits, 0.6, scale=10.0)
    assert torch.all(denoised[0, 2] == -100.0)
    assert torch.equal(denoised[0, :2], logits[0, :2])
    labels = predict_labels(logits, InferenceConfig(pd_threshold=0.6), background_index=None)
    assert not bool((labels == 2).any()) and labels[0, 0, 0] == 0

    # threshold above every class's confidence: only the most confident class survives
    everything = prompt_denoise(logits, 1.0, scale=10.0)
    kept = (everything != -100.0).flatten(2).any(-1)[0]
    assert kept.tolist() == [True, False, False]
    assert torch.equal(everything[0, kept], logits[0, kept])

    # removed classes lose the argmax even when real logits are below -100
    shifted = prompt_denoise(logits - 500.0, 0.6)
    assert not bool((shifted.argmax(1) == 2).any())


class FixedGrid(nn.Module):
    """Fake segmentor whose grid logits are ``grid`` (1, C, h, w) for every image."""

    def __init__(self, grid: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("grid", grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid.expand(x.shape[0], -1, -1, -1).clone()


def _blank(height: int, width: int) -> np.ndarray:
    return np.zeros((height, width, 3), dtype=np.uint8)


def test_official_prompt_denoising_can_remove_every_class():
    """VOC's threshold 1.0 with logits whose softmax(10 x) never rounds to 1.0: the official
    PD removes every class and the argmax then says class 0 everywhere; the project's
    variant keeps the most confident class."""
    grid = torch.zeros(1, 3, 2, 2)
    grid[0, 1, :, 0] = 1.0  # class 1 best on the left, margin 1
    grid[0, 2, :, 1] = 1.5  # class 2 best on the right, margin 1.5 (the most confident)
    grid[0, 0] = -0.5  # class 0 never best
    conf = torch.softmax(10 * grid, 1).flatten(2).amax(-1)[0]
    assert bool((conf < 1.0).all()) and conf[2] > conf[1] > conf[0]
    official = prompt_denoise_official(grid, 1.0, scale=10.0)
    assert bool((official == -100.0).all())  # every class removed, exactly the official fill
    safe = prompt_denoise(grid, 1.0, scale=10.0)
    assert torch.equal(safe[0, 2], grid[0, 2]) and bool((safe[0, :2] <= -100.0).all())

    seg, image = FixedGrid(grid), _blank(8, 8)
    plain = segment(seg, image, InferenceConfig(), background_index=None)
    assert set(np.unique(plain.labels).tolist()) == {1, 2}  # without PD class 0 is nowhere
    out = segment(seg, image, InferenceConfig(pd_threshold=1.0, pd_mode="official"), background_index=None,
                  return_probs=True)
    assert bool((out.labels == 0).all())  # all logits -100: argmax returns the first class
    np.testing.assert_array_equal(out.probs, np.full((3, 8, 8), 1 / 3, dtype=np.float32))
    kept = segment(seg, image, InferenceConfig(pd_threshold=1.0, pd_mode="safe"), background_index=None)
    assert bool((kept.labels == 2).all())  # only the most confident class survives
    # postprocess leaves the official PD to infer_logits (on the grid): it does not apply it again
    full = infer_logits(seg, to_tensor_normalized(image, CLIP_MEAN, CLIP_STD)[None], InferenceConfig())
    for cfg in (InferenceConfig(pd_threshold=1.0, pd_mode="official"),
                PostprocessConfig(pd_threshold=1.0, pd_mode="official")):
        torch.testing.assert_close(postprocess(full, cfg, background_index=None)[1],
                                   postprocess(full, InferenceConfig(), background_index=None)[1])

    # a class survives 1.0 only where its softmax rounds to exactly 1.0 (here margin 10 at scale 10)
    sharp = grid.clone()
    sharp[0, 2, :, 1] = 10.0
    denoised = prompt_denoise_official(sharp, 1.0, scale=10.0)
    assert torch.equal(denoised[0, 2], sharp[0, 2]) and bool((denoised[0, :2] == -100.0).all())
    # the official fill is -100 whatever the logits: removed classes beat kept logits below -100
    assert bool((prompt_denoise_official(sharp - 500.0, 1.0).argmax(1) == 0).all())


def test_official_prompt_denoising_runs_on_the_grid_before_upsampling():
    """A class that is second everywhere on the grid but wins between two grid cells once
    upsampled: the official PD (on the grid) removes it, PD on full-resolution logits keeps it."""
    grid = torch.zeros(1, 3, 1, 2)
    grid[0, 0, 0, 0] = 1.0  # class 0 on the left cell
    grid[0, 1, 0, 1] = 1.0  # class 1 on the right cell
    grid[0, 2] = 0.7  # class 2 second on both cells; first where they blend
    seg, image, threshold = FixedGrid(grid), _blank(8, 16), 0.5
    plain = infer_logits(seg, to_tensor_normalized(image, CLIP_MEAN, CLIP_STD)[None], InferenceConfig())
    grid_conf = torch.softmax(10 * grid, 1).flatten(2).amax(-1)[0]
    full_conf = torch.softmax(10 * plain, 1).flatten(2).amax(-1)[0]
    assert grid_conf[2] < threshold < full_conf[2] and bool((grid_conf[:2] > threshold).all())

    official = InferenceConfig(pd_threshold=threshold, pd_mode="official")
    denoised = infer_logits(seg, to_tensor_normalized(image, CLIP_MEAN, CLIP_STD)[None], official)
    assert bool((denoised[0, 2] == -100.0).all()) and torch.equal(denoised[0, :2], plain[0, :2])
    # the same function on the upsampled logits would keep class 2
    assert torch.equal(prompt_denoise_official(plain, threshold, 10.0), plain)
    labels = segment(seg, image, official, background_index=None).labels
    assert set(np.unique(labels).tolist()) == {0, 1}
    safe = segment(seg, image, InferenceConfig(pd_threshold=threshold, pd_mode="safe"), background_index=None)
    assert 2 in safe.labels  # the project's PD, on full-resolution logits, keeps it


def test_official_prompt_denoising_settings_are_checked():
    with pytest.raises(ValueError, match="pd_mode must be one of"):
        PostprocessConfig(pd_mode="exact")
    with pytest.raises(ValueError, match="official prompt denoising runs on each whole image's grid"):
        InferenceConfig(mode="slide", pd_threshold=0.5, pd_mode="official")
    InferenceConfig(mode="slide", pd_threshold=0.5, pd_mode="safe")  # the project's PD works in any mode
    InferenceConfig(mode="slide", pd_mode="official")  # no threshold: no PD, nothing to refuse


def test_prompt_denoising_with_synonyms_uses_class_logits():
    """PD scores a class by the max over its synonyms and removes all of its queries."""
    class_index = torch.tensor([0, 1, 1, 2])
    logits = torch.zeros(1, 4, 4, 4)
    logits[0, 0, :, :2] = 1.0  # class 0 left
    logits[0, 1:3, :, 2:] = 0.9  # class 1 right, both synonyms alike
    logits[0, 3] = 0.55  # class 2 never confident
    denoised = prompt_denoise(logits, 0.6, 10.0, class_index)
    assert denoised.shape == logits.shape
    assert torch.all(denoised[0, 3] == -100.0) and torch.equal(denoised[0, :3], logits[0, :3])
    # class confidences come from class logits = max over synonyms
    conf = torch.softmax(10 * class_logits(logits, class_index), 1).flatten(2).amax(-1)[0]
    assert conf[2] < 0.6 < min(conf[0], conf[1])
    # a softmax over queries would split class 1 between its two synonyms and remove it
    assert torch.softmax(10 * logits, 1).flatten(2).amax(-1)[0, 1:3].max() < 0.6
    labels = predict_labels(logits, InferenceConfig(pd_threshold=0.6), class_index, background_index=None)
    assert set(labels.unique().tolist()) == {0, 1}


def test_argmax_with_synonyms_equals_the_max_logit_rule():
    g = torch.Generator().manual_seed(3)
    class_index = torch.tensor([2, 0, 1, 0, 0, 2, 1, 0])  # synonyms, not contiguous
    logits = 0.3 * torch.randn(2, 8, 9, 11, generator=g)
    for scale in (1.0, 50.0):
        labels, probs = postprocess(logits, InferenceConfig(logit_scale=scale), class_index, background_index=None)
        assert probs.shape == (2, 3, 9, 11)
        assert torch.equal(labels, max_over_synonyms(logits, class_index, 3).argmax(1))
        assert torch.equal(labels, class_logits(logits, class_index).argmax(1))
    # one query per class: identity reduction, softmax over classes
    labels, probs = postprocess(logits, InferenceConfig(logit_scale=2.0), torch.arange(8), background_index=None)
    torch.testing.assert_close(probs, torch.softmax(2.0 * logits, 1))
    with pytest.raises(ValueError, match="class_index"):
        postprocess(logits, InferenceConfig(), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="each class at least once"):
        postprocess(logits, InferenceConfig(), torch.tensor([0, 0, 1, 1, 3, 3, 3, 3]), background_index=None)
    with pytest.raises(ValueError, match="outside the classes 0..2"):
        postprocess(logits, InferenceConfig(), class_index, background_index=5)


def test_synonym_heavy_background_follows_the_official_order():
    """SCLIP/ClearCLIP/NACLIP postprocess_result, written out: query logits averaged over
    windows, softmax(scale * logits) over ALL queries, class prob = max over synonyms
    (one-hot mask then max, as the official code), argmax, then prob_thd on class probs."""
    n_background = 26  # SCLIP's VOC21 background words
    class_index = [0] * n_background + [1, 2]  # background words, then "cat", "dog"
    base = [0.20] * n_background + [0.205, 0.19]
    weight_scale = [0.002] * n_background + [0.03, 0.01]  # cat's cosine follows the image most
    seg = QuerySegmentor(class_index, base, weight_scale)
    xs = np.linspace(0, 255, 40)
    image = np.stack([np.broadcast_to(xs, (30, 40)), np.broadcast_to(xs[::-1], (30, 40)),
                      np.full((30, 40), 128.0)], -1).astype(np.uint8)
    cfg = InferenceConfig(mode="slide", window=16, stride=8, logit_scale=50.0, prob_thd=0.1)
    result = segment(seg, image, cfg, background_index=0, return_probs=True)

    # the official pipeline by hand
    normalised = to_tensor_normalized(image, CLIP_MEAN, CLIP_STD)[None]
    with torch.no_grad():
        logits = naive_slide(seg, normalised, 16, 8)[0]  # (S, H, W) raw cosines averaged over windows
    query_probs = (logits * 50.0).softmax(0)  # (S, H, W)
    one_hot = F.one_hot(torch.tensor(class_index)).T.view(3, len(class_index), 1, 1)  # (C, S, 1, 1)
    official_probs = (query_probs[None] * one_hot).max(1)[0]  # (C, H, W)
    official = official_probs.argmax(0)
    official[official_probs.max(0)[0] < 0.1] = 0

    np.testing.assert_allclose(result.probs, official_probs.numpy(), atol=1e-6, rtol=1e-5)
    np.testing.assert_array_equal(result.labels, official.numpy())
    assert set(np.unique(result.labels)) == {0, 1}  # both background and cat occur

    # the old order (max over raw cosines, then softmax over the 3 classes) keeps cat
    # where the official order says background: the test discriminates
    old_probs = torch.softmax(50.0 * max_over_synonyms(logits[None], torch.tensor(class_index), 3), 1)[0]
    old = old_probs.argmax(0)
    old[old_probs.max(0)[0] < 0.1] = 0
    flipped = (old == 1) & (official == 0)
    assert int(flipped.sum()) > 0
    assert float(official_probs.amax(0)[flipped].max()) < 0.1 < float(old_probs.amax(0)[flipped].min())
    # background keeps its argmax: only the threshold decides, as officially
    assert torch.equal(official_probs.argmax(0), old_probs.argmax(0))


def two_region_problem(seed: int = 0):
    """32 x 32 image, dark left half / bright right half; ground truth class 0 / 1.
    Probabilities: the boundary misplaced 4 px to the left, softened, plus salt noise."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(1, 3, 32, 32)
    image[..., 16:] = 200.0
    image += 5.0 * torch.randn(image.shape, generator=g)
    truth = torch.zeros(32, 32, dtype=torch.long)
    truth[:, 16:] = 1
    xs = torch.arange(32).float()
    p1 = torch.sigmoid((xs - 12.0) / 2.0).expand(32, 32).clone()  # boundary at x = 12
    flip = torch.rand(32, 32, generator=g) < 0.1
    p1[flip] = 1 - p1[flip]
    probs = torch.stack([1 - p1, p1])[None]  # (1, 2, 32, 32)
    return image, probs, truth


def test_pamr_keeps_simplex_and_snaps_to_image_edges():
    image, probs, truth = two_region_problem()
    refined = pamr(image, probs)  # official defaults: 10 iterations, dilations 1..24
    assert refined.shape == probs.shape
    torch.testing.assert_close(refined.sum(1), torch.ones(1, 32, 32))
    assert bool((refined >= 0).all())
    errors_before = int((probs.argmax(1)[0] != truth).sum())
    errors_after = int((refined.argmax(1)[0] != truth).sum())
    assert errors_before > 150  # misplaced boundary (128 px) + noise
    assert errors_after < 0.2 * errors_before
    # affinities are normalised by the local std: per-channel affine normalisation is irrelevant
    mean, std = torch.tensor([120.0, 110.0, 100.0]), torch.tensor([60.0, 70.0, 65.0])
    normalised = (image - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(pamr(normalised, probs), refined, atol=1e-4, rtol=1e-4)


def test_postprocess_pamr_needs_image_and_returns_labels_and_probs():
    image, probs, truth = two_region_problem()
    logits = probs.clamp_min(1e-6).log()
    with pytest.raises(ValueError, match="pamr"):
        postprocess(logits, InferenceConfig(pamr=True))
    labels, out_probs = postprocess(logits, InferenceConfig(pamr=True), background_index=None, image=image)
    assert labels.shape == (1, 32, 32) and labels.dtype == torch.int64
    assert out_probs.shape == (1, 2, 32, 32)
    assert int((labels[0] != truth).sum()) < int((probs.argmax(1)[0] != truth).sum())


# --------------------------------------------------------------------------- predictor


def test_segment_returns_original_size_labels():
    seg = PatchSegmentor(num_classes=5)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(27, 40, 3), dtype=np.uint8)
    cfg = InferenceConfig(mode="slide", short_side=16, window=12, stride=8)
    result = segment(seg, image, cfg, return_probs=True)
    assert result.labels.shape == (27, 40) and result.labels.dtype == np.int64
    assert result.probs is not None and result.probs.shape == (5, 27, 40)
    np.testing.assert_array_equal(result.labels, result.probs.argmax(0))
    assert segment(seg, image, cfg).probs is None
    with pytest.raises(ValueError, match="0-255 units"):
        segment(seg, image, cfg, mean=(122.8, 116.7, 104.1), std=(68.5, 66.6, 70.3))
    with pytest.raises(ValueError, match="uint8"):
        segment(seg, image.astype(np.float32), cfg)


def test_segment_passes_the_raw_image_only_for_pamr(monkeypatch):
    seen = []
    real = inference.postprocess

    def spy(logits, cfg, class_index=None, **kwargs):
        seen.append(kwargs["image"])
        return real(logits, cfg, class_index, **kwargs)

    monkeypatch.setattr(inference, "postprocess", spy)
    seg = PatchSegmentor(num_classes=2)
    image = np.random.default_rng(1).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    segment(seg, image, InferenceConfig(), background_index=None)
    segment(seg, image, InferenceConfig(pamr=True, pamr_iter=1, pamr_dilations=(1,)), background_index=None)
    assert seen[0] is None
    assert seen[1].dtype == torch.uint8 and seen[1].shape == (1, 3, 12, 16)
    assert torch.equal(seen[1][0].permute(1, 2, 0), torch.from_numpy(image))


def test_segment_reduces_synonyms_with_the_segmentors_class_index():
    class_index = [1, 0, 1, 2, 0]
    seg = QuerySegmentor(class_index, [0.1, 0.2, 0.0, 0.1, 0.15], [1.0] * 5)
    image = np.random.default_rng(2).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    cfg = InferenceConfig(logit_scale=10.0)
    result = segment(seg, image, cfg, background_index=None, return_probs=True)
    assert result.probs.shape == (3, 20, 24)
    logits = infer_logits(seg, to_tensor_normalized(image, CLIP_MEAN, CLIP_STD)[None], cfg)
    expected = probabilities(logits, 10.0, torch.tensor(class_index))[0]
    np.testing.assert_allclose(result.probs, expected.numpy(), atol=1e-6)
    np.testing.assert_array_equal(result.labels, class_logits(logits, torch.tensor(class_index))[0].argmax(0).numpy())


def test_postprocess_has_its_own_settings_and_no_import_cycle():
    """post-processing needs only PostprocessConfig; reclip.postprocess does not import reclip.inference."""
    import ast

    import reclip.postprocess

    tree = ast.parse(open(reclip.postprocess.__file__, encoding="utf-8").read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "reclip.inference" not in imported
    logits = torch.randn(1, 3, 5, 6)
    post = PostprocessConfig(logit_scale=20.0, pd_threshold=0.5)
    labels, probs = postprocess(logits, post, None, background_index=None)
    full = InferenceConfig(mode="slide", logit_scale=20.0, pd_threshold=0.5)  # the same fields, inherited
    torch.testing.assert_close(postprocess(logits, full, None, background_index=None)[1], probs)
    with pytest.raises(ValueError, match="pd_threshold"):
        PostprocessConfig(pd_threshold=1.5)


def test_compile_is_opt_in_checked_and_gives_the_uncompiled_labels():
    """``compile=True`` runs the segmentor through torch.compile (cached per segmentor);
    on a tiny random CLIP its labels and logits are the eager ones."""
    from reclip.heads.zero_shot import ZeroShotSegmentor
    from reclip.text import QueryEmbeddings
    from tiny import tiny_clip

    assert InferenceConfig().compile is False
    with pytest.raises(ValueError, match="compile"):
        InferenceConfig(compile="yes")
    clip = tiny_clip().requires_grad_(False)
    torch.manual_seed(0)
    queries = QueryEmbeddings(F.normalize(torch.randn(4, 32), dim=-1), torch.arange(4), 4)
    seg = ZeroShotSegmentor(clip, queries, "maskclip").eval()
    image = np.random.default_rng(0).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    eager_cfg = InferenceConfig(mode="slide", window=32, stride=16, batch_size=4, logit_scale=50.0)
    compiled_cfg = dataclasses.replace(eager_cfg, compile=True)
    eager = segment(seg, image, eager_cfg, return_probs=True)
    assert inference._COMPILED_ATTR not in seg.__dict__  # the eager run compiled nothing
    fast = segment(seg, image, compiled_cfg, return_probs=True)
    assert inference._COMPILED_ATTR in seg.__dict__
    np.testing.assert_array_equal(fast.labels, eager.labels)
    np.testing.assert_allclose(fast.probs, eager.probs, atol=1e-5)
    assert inference.compiled(seg) is inference.compiled(seg)  # built once, reused
    assert set(seg.state_dict()) == set(ZeroShotSegmentor(clip, queries, "maskclip").state_dict())
    import gc
    import weakref

    gone = weakref.ref(seg)
    del seg
    gc.collect()
    assert gone() is None  # the compiled wrapper does not keep its segmentor (and CLIP) alive
