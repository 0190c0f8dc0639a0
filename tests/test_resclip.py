"""ResCLIP (reclip.strategies.resclip) on a tiny random CLIP: its last block against a
step-by-step re-derivation of the official code (yvhangyang/ResCLIP @ 0e085f7,
clip/model.py + pamr.py) written in its own style (batch 1, (L, N, D) layout, bmm,
unfold + mode, the pair-wise path check), batching, the per-dataset weights of the
protocols, the queries it reads, its errors, and the command line."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from layouts import write_voc
from test_features import naclip_attention_addition
from tiny import tiny_clip
from reclip import api
from reclip.backbones import DenseCLIP
from reclip.cli import main
from reclip.clip.load import save_clip
from reclip.data.protocol import list_protocols, load_protocol
from reclip.features import (
    STRATEGIES,
    FeatureContext,
    ResidualAttention,
    dense_features,
    get_strategy,
    strategy_from_dict,
    strategy_to_dict,
)
from reclip.heads.rectify import Rectifier, RectifierConfig, class_query_weights
from reclip.heads.zero_shot import ZeroShotSegmentor
from reclip.methods import published_strategy_overrides
from reclip.strategies.resclip import default_rcs_layers, same_label_mask
from reclip.text import Vocabulary, query_embeddings

PATCH = 8  # tiny CLIP's patch


@pytest.fixture(scope="module")
def clip():
    # 4 blocks, 4 heads: RCS reads block 2 (6..9 of 12 scaled), the last block is 3
    return tiny_clip(0, perturb=0.1, vision_layers=4, vision_heads=4)


def images(*size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed))


def unit_queries(n: int = 6, seed: int = 2) -> torch.Tensor:
    return F.normalize(torch.randn(n, 32, generator=torch.Generator().manual_seed(seed)), dim=-1)


def spread_queries(clip, x: torch.Tensor, n: int = 5) -> torch.Tensor:
    """n queries that split a random CLIP's patches into several labels: the RCS-only
    features (SFR's first pass) of n patches spread over the grid, minus their mean."""
    z = dense_features(clip, x[:1], get_strategy("resclip", sfr=False)).flatten(2)[0].T  # (N, D)
    picked = torch.linspace(0, len(z) - 1, n).long()
    return F.normalize((z - z.mean(0))[picked], dim=-1)


def context(queries: torch.Tensor) -> FeatureContext:
    return FeatureContext(queries=queries)


# --- the official computation, step by step ----------------------------------------------

def official_custom_attn(attn_layer, x, n_patches, with_attn=False, attn_rcs=None, attn_sfr=None,
                         attn_sfr_weights=None, attn_rcs_weights=None, use_custom_attn=False, std=5.0):
    """ResCLIP VisionTransformer.custom_attn, attn_strategy 'resclip' (= 'naclip'), (L, N, E)."""
    num_heads = attn_layer.heads
    _num_tokens, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    scale = head_dim ** -0.5
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    if use_custom_attn:
        omega = naclip_attention_addition(*n_patches, std).unsqueeze(0)
        attn_weights = torch.bmm(k, k.transpose(1, 2)) * scale
        if attn_sfr is not None:
            attn_sfr = attn_sfr / torch.max(attn_sfr)  # (the official casts to fp16 here: its model is fp16)
            tau_attn_sfr, lambda_attn_sfr = attn_sfr_weights
            attn_weights = tau_attn_sfr * ((1 - lambda_attn_sfr) * attn_weights + lambda_attn_sfr * attn_sfr)
        attn_weights += omega
        attn_weights = F.softmax(attn_weights, dim=-1)
        if attn_rcs is not None:
            tau_attn_rcs, lambda_attn_rcs = attn_rcs_weights
            attn_weights = tau_attn_rcs * ((1 - lambda_attn_rcs) * attn_weights + lambda_attn_rcs * attn_rcs)
    else:
        attn_weights = F.softmax(torch.bmm(q * scale, k.transpose(1, 2)), dim=-1)
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    attn_output = attn_layer.out_proj(attn_output)
    if with_attn:
        return attn_output, attn_weights
    return attn_output


def _shift_kernel(positions, centre):
    weight = torch.zeros(len(positions), 1, 3, 3)
    for i, (r, c) in enumerate(positions):
        weight[i, 0, 1, 1] = centre
        weight[i, 0, r, c] += 1 if centre == 0 else -1
    return weight


NEIGHBOURS = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
AFF = _shift_kernel(NEIGHBOURS, 1)  # LocalAffinity: centre - neighbour
COPY = _shift_kernel(NEIGHBOURS, 0)  # LocalAffinityCopy: the neighbour
STDEV = _shift_kernel([(r, c) for r in range(3) for c in range(3)], 0)  # LocalStDev: all 9
STDEV[4, 0, 1, 1] = 1


def official_local(x, kernel, dilations):
    """pamr.py LocalAffinity.forward: (B, K, H, W) -> (B, K, P, H, W)."""
    B, K, H, W = x.size()
    x = x.view(B * K, 1, H, W)
    x_aff = torch.empty((K * B, len(dilations) * kernel.size(0), H, W))
    for i, d in enumerate(dilations):
        x_pad = F.pad(x, [d] * 4, mode="replicate")
        x_aff[:, kernel.size(0) * i:(i + 1) * kernel.size(0)] = F.conv2d(x_pad, kernel, dilation=d)
    return x_aff.view(B, K, -1, H, W)


def official_pamr(x, mask, num_iter, dilations):
    """pamr.py PAMR.forward."""
    mask = F.interpolate(mask, size=x.size()[-2:], mode="bilinear", align_corners=True)
    x_std = official_local(x, STDEV, dilations).std(2, keepdim=True)
    x = -torch.abs(official_local(x, AFF, dilations)) / (1e-8 + 0.1 * x_std)
    x = x.mean(1, keepdim=True)
    x = F.softmax(x, 2)
    for _ in range(num_iter):
        m = official_local(mask, COPY, dilations)
        mask = (m * x).sum(2)
    return mask


def official_check_path(start_coords, end_coords, patch_logit_temp):
    """VisionTransformer.check_path."""
    steps = torch.max(torch.abs(end_coords - start_coords), dim=1)[0]
    max_steps = steps.max().item()
    t = torch.linspace(0, 1, steps=max_steps + 1).unsqueeze(1).unsqueeze(0)
    current_coords = start_coords.unsqueeze(1) * (1 - t) + end_coords.unsqueeze(1) * t
    current_coords = current_coords.round().long()
    valid_steps = torch.arange(max_steps + 1).unsqueeze(0) <= steps.unsqueeze(1)
    start_values = patch_logit_temp[start_coords[:, 0], start_coords[:, 1]].unsqueeze(1)
    current_values = patch_logit_temp[current_coords[:, :, 0], current_coords[:, :, 1]]
    path_valid = (current_values == start_values) | ~valid_steps
    return path_valid.all(dim=1)


def official_attention_sfr(patch_logit_temp, n_patches, gaussian_std, delete_same_entity=True):
    """VisionTransformer.generate_attention_sfr."""
    h, w = n_patches
    total_patches = h * w
    attention_sfr = torch.zeros((total_patches + 1, total_patches + 1))
    patch_indices = torch.arange(total_patches)
    i, j = torch.meshgrid(patch_indices, patch_indices, indexing="ij")
    i_w, i_h = torch.div(i, w, rounding_mode="floor"), i % w
    j_w, j_h = torch.div(j, w, rounding_mode="floor"), j % w
    mask = patch_logit_temp[i_w, i_h] == patch_logit_temp[j_w, j_h]
    attention_sfr[1:, 1:] = mask.float()
    attention_sfr.diagonal().fill_(1)
    attention_sfr[0, :] = 0
    attention_sfr[:, 0] = 0
    non_cls_attention = attention_sfr[1:, 1:]
    if delete_same_entity:
        start_coords = torch.stack((i_w, i_h), dim=-1).view(-1, 2)
        end_coords = torch.stack((j_w, j_h), dim=-1).view(-1, 2)
        valid_paths = official_check_path(start_coords, end_coords, patch_logit_temp).view(total_patches, total_patches)
        steps = torch.max(torch.abs(end_coords - start_coords), dim=1)[0]
        max_steps = steps.max().item()
        decay_factor = torch.exp(-steps.view(total_patches, total_patches) / max_steps)
        non_cls_attention = torch.where(valid_paths, non_cls_attention, non_cls_attention * decay_factor)
    kernel_size = min(total_patches, int(6 * gaussian_std + 1))
    kernel_size = kernel_size if kernel_size % 2 == 1 else kernel_size + 1
    x = torch.arange(kernel_size) - kernel_size // 2
    gaussian_kernel_1d = torch.exp(-(x ** 2) / (2 * gaussian_std ** 2))
    kernel = gaussian_kernel_1d / gaussian_kernel_1d.sum()
    non_cls_attention_blurred = F.conv1d(non_cls_attention.unsqueeze(1), kernel.view(1, 1, -1),
                                         padding=kernel_size // 2).squeeze(1)
    non_cls_attention_blurred = F.relu(non_cls_attention_blurred)
    row_sums = non_cls_attention_blurred.sum(dim=1, keepdim=True)
    attention_sfr[1:, 1:] = non_cls_attention_blurred / (row_sums + 1e-8)
    return attention_sfr.unsqueeze(0)


def official_resclip(clip, img, query_features, *, use_sfr, temp_thd, attn_sfr_weights, attn_rcs_weights,
                     gaussian_std=5.0, logit_scale=40, delete_same_entity=True):
    """VisionTransformer.forward (arch 'wo_resi', attn_strategy 'resclip') + the segmentor's
    normalisation; batch 1. Returns the patch features (1, h*w, D) and the first pass's labels."""
    vis = clip.visual
    ps = vis.patch_size
    _B, _nc, w, h = img.shape  # (the official names: w is the height)
    n_patches = (w // ps, h // ps)
    x, _ = vis.embed(img)  # patchify + CLS + positions + ln_pre (reclip's embedding, as every strategy's)
    x = x.permute(1, 0, 2)  # NLD -> LND
    attn_map = []
    blocks = vis.transformer.resblocks
    for blk in blocks[:-1]:
        x_i, attn_i = official_custom_attn(blk.attn, blk.ln_1(x), n_patches, with_attn=True)
        x = x + x_i
        x = x + blk.mlp(blk.ln_2(x))
        attn_map.append(attn_i)
    layers = default_rcs_layers(len(blocks))  # range(5, 9) of 12 blocks
    attention_rcs = torch.stack([attn_map[i] for i in layers]).mean(dim=0)
    attention_sfr, patch_logit_temp = None, None
    blk = blocks[-1]
    if use_sfr:  # create_logit_temp
        y = official_custom_attn(blk.attn, blk.ln_1(x), n_patches, attn_rcs=attention_rcs,
                                 attn_rcs_weights=attn_rcs_weights, use_custom_attn=True, std=gaussian_std)
        y = vis.ln_post(y.permute(1, 0, 2)) @ vis.proj
        image_features = y[:, 1:]
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        logits = image_features @ query_features.T
        out_dim = logits.shape[-1]
        logits = logits.permute(0, 2, 1).reshape(-1, out_dim, *n_patches)
        logits = F.interpolate(logits, size=img.shape[-2:], mode="bilinear", align_corners=False)
        seg_logits_temp = official_pamr(img, logits, 10, (8, 16))
        for i in range(seg_logits_temp.shape[0]):
            seg_logits_temp = torch.softmax(seg_logits_temp[i] * logit_scale, dim=0).unsqueeze(0)
        # create_patch_matrix
        seg_logit_temp = seg_logits_temp.squeeze(0)
        seg_pred = seg_logit_temp.argmax(0, keepdim=True)
        seg_pred[seg_logit_temp.max(0, keepdim=True)[0] < temp_thd] = 0
        seg_pred = seg_pred.squeeze(0)
        patches = seg_pred.unfold(0, ps, ps).unfold(1, ps, ps).reshape(n_patches[0], n_patches[1], -1)
        patch_logit_temp = torch.mode(patches, dim=-1)[0]
        attention_sfr = official_attention_sfr(patch_logit_temp, n_patches, gaussian_std, delete_same_entity)
    x = official_custom_attn(blk.attn, blk.ln_1(x), n_patches, attn_rcs=attention_rcs, attn_sfr=attention_sfr,
                             attn_sfr_weights=attn_sfr_weights, attn_rcs_weights=attn_rcs_weights,
                             use_custom_attn=True, std=gaussian_std)
    x = vis.ln_post(x.permute(1, 0, 2)) @ vis.proj
    feats = x[:, 1:]
    return feats / feats.norm(dim=-1, keepdim=True), patch_logit_temp


def as_patches(z: torch.Tensor) -> torch.Tensor:
    """Z (B, D, h, w) -> (B, h*w, D), the official layout."""
    return z.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("size", [(40, 56), (32, 48)], ids=["5x7-kernel31", "4x6-kernel25"])
@pytest.mark.parametrize("use_sfr", [False, True], ids=["rcs", "rcs+sfr"])
def test_equals_the_official_computation_step_by_step(clip, size, use_sfr):
    """VOC21's weights (cfg_voc21.py) but temp_thd 0.3, with queries that give the random
    first pass several labels (so some pixels fall under temp_thd, some paths fail)."""
    strategy = get_strategy("resclip", rcs_tau=2.0, rcs_lambda=0.3, sfr=use_sfr, sfr_tau=2.2, sfr_lambda=0.7,
                            temp_thd=0.3, path_check="official")
    x = images(1, 3, *size)
    queries = spread_queries(clip, x)
    with torch.no_grad():
        expected, labels = official_resclip(clip, x, queries, use_sfr=use_sfr, temp_thd=0.3,
                                            attn_sfr_weights=(2.2, 0.7), attn_rcs_weights=(2.0, 0.3))
        got = dense_features(clip, x, strategy, context(queries))
    torch.testing.assert_close(as_patches(got), expected, atol=2e-5, rtol=1e-4)
    if use_sfr:  # the comparison exercised SFR: several labels, and the path check decays some same-label pairs
        assert len(labels.unique()) >= 3
        mask = same_label_mask(labels[None], "official")[0]
        assert ((mask > 0) & (mask < 1)).any()
        assert not torch.allclose(got, dense_features(clip, x, dataclasses.replace(strategy, sfr=False)), atol=1e-4)


def test_a_batch_equals_its_images_one_by_one(clip):
    x = images(2, 3, 30, 45)  # not a multiple of the patch: padded
    queries = spread_queries(clip, x)
    for strategy in (get_strategy("resclip", temp_thd=0.3), get_strategy("resclip", base="sclip", sfr_pamr_iter=0),
                     get_strategy("resclip", path_check="official", rcs_layers=(0, 2))):
        with torch.no_grad():
            both = dense_features(clip, x, strategy, context(queries))
            one_by_one = torch.cat([dense_features(clip, x[i:i + 1], strategy, context(queries)) for i in range(2)])
        assert both.shape == (2, 32, 4, 6)
        torch.testing.assert_close(both, one_by_one, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(both.norm(dim=1), torch.ones(2, 4, 6))


def test_without_rcs_and_sfr_it_is_its_base_last_block(clip):
    x = images(2, 3, 30, 45)
    for base in ("naclip", "raw", "sclip", "clearclip"):
        plain = get_strategy("resclip", base=base, rcs=False, sfr=False)
        assert not plain.needs_queries
        torch.testing.assert_close(dense_features(clip, x, plain), dense_features(clip, x, base), atol=1e-5, rtol=1e-5)


def test_the_path_check_official_walks_part_of_the_segment_and_line_all_of_it():
    labels = torch.tensor([[[1, 0, 1, 1, 1, 1, 1, 1, 1]]])  # one row of 9 patches, max_steps 8
    official = same_label_mask(labels, "official")[0]
    line = same_label_mask(labels, "line")[0]
    off = same_label_mask(labels, "off")[0]
    # patches 0 and 2 share label 1 with a 0 between them: "official" samples t = 0, 1/8, 2/8,
    # all rounding to patch 0, so the pair passes; the line meets patch 1 and decays it
    assert official[0, 2] == 1 and off[0, 2] == 1
    assert line[0, 2] == pytest.approx(math.exp(-2 / 8))
    assert official[0, 8] == pytest.approx(math.exp(-8 / 8))  # the longest pair meets patch 1 in both
    assert line[0, 8] == pytest.approx(math.exp(-1))
    assert (line[1] == off[1]).all() and line[1, 1] == 1 and line[1, 0] == 0  # other labels stay 0


def test_rcs_layers_scale_to_the_tower_and_misfits_are_refused(clip):
    assert default_rcs_layers(12) == (5, 6, 7, 8)  # ResCLIP's range(5, 9)
    assert default_rcs_layers(24) == tuple(range(10, 18))
    assert default_rcs_layers(4) == (2,) and default_rcs_layers(2) == (0,)
    x = images(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"rcs_layers=\[1, 3\]: \[3\] are not before the last block of this "
                                         r"4-block tower; RCS can read blocks 0..2"):
        dense_features(clip, x, get_strategy("resclip", rcs_layers=(1, 3), sfr=False))
    one_block = tiny_clip(0, vision_layers=1)
    with pytest.raises(ValueError, match="this tower has 1 block.*rcs=False"):
        dense_features(one_block, x, get_strategy("resclip", sfr=False))
    assert dense_features(one_block, x, get_strategy("resclip", rcs=False, sfr=False)).shape == (1, 32, 2, 2)


@pytest.mark.parametrize("overrides, message", [
    ({"base": "maskclip"}, "base='maskclip'.*identity attention"),
    ({"base": "nope"}, r"base='nope'.*\['raw', 'sclip', 'clearclip', 'naclip'\]"),
    ({"rcs_tau": 0}, r"rcs_tau=0 must be a number > 0"),
    ({"rcs_lambda": 1.5}, r"rcs_lambda=1.5 must be a number in \[0, 1\]"),
    ({"temp_thd": -0.1}, r"temp_thd=-0.1 must be a number in \[0, 1\]"),
    ({"sfr_tau": "2"}, r"sfr_tau='2' must be a number > 0"),
    ({"path_check": "both"}, r"path_check='both'; available: \['line', 'official', 'off'\]"),
    ({"sfr_pamr_iter": -1}, "sfr_pamr_iter=-1 must be an integer >= 0"),
    ({"sfr_pamr_dilations": (8, 0)}, r"sfr_pamr_dilations=\(8, 0\) must be positive integers"),
    ({"rcs_layers": ()}, r"rcs_layers=\(\) must be distinct block numbers"),
    ({"rcs_layers": (2, 2)}, r"rcs_layers=\(2, 2\) must be distinct"),
    ({"rcs_gamma": 1}, r"unknown ResidualAttention field\(s\) \['rcs_gamma'\]"),
])
def test_bad_settings_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_strategy("resclip", **overrides)


def test_semantic_feedback_reads_the_heads_queries(clip):
    x = images(2, 3, 32, 40)
    strategy = get_strategy("resclip", temp_thd=0.3)
    assert strategy.needs_queries and not get_strategy("resclip", sfr=False).needs_queries
    z = dense_features(clip, x, strategy, context(spread_queries(clip, x, 5)))
    assert not torch.allclose(z, dense_features(clip, x, get_strategy("resclip", sfr=False)), atol=1e-4)
    # other queries, other first-pass labels, other features
    assert not torch.allclose(z, dense_features(clip, x, strategy, context(spread_queries(clip, x, 2))), atol=1e-4)
    with pytest.raises(RuntimeError, match="resclip with sfr=True reads the head's text queries"):
        dense_features(clip, x, strategy)
    with pytest.raises(RuntimeError, match="reads the head's text queries, but none were set"):
        DenseCLIP(clip, strategy)(x)  # the backbone checks the instance's needs_queries
    DenseCLIP(clip, get_strategy("resclip", sfr=False))(x)  # RCS alone needs none
    # under the zero-shot head: the head's W_q (every synonym a query, as the official)
    queries = query_embeddings(clip, Vocabulary.from_names(["background", "cat", "dog, puppy"]), "single",
                               cache_dir=False)
    segmentor = ZeroShotSegmentor(clip, queries, strategy)
    torch.testing.assert_close(segmentor.features(x), dense_features(clip, x, strategy, FeatureContext(
        queries=queries.weights)))


def test_the_rectifier_gives_its_fixed_class_queries(clip):
    """ReCLIP++ on ResCLIP's features: SFR's first pass reads W_q, one fixed row per class."""
    vocabulary = Vocabulary.from_names(["background", "cat", "dog, puppy"])
    queries = query_embeddings(clip, vocabulary, "single", cache_dir=False)
    config = RectifierConfig(strategy=get_strategy("resclip", temp_thd=0.3, rcs_lambda=0.3), learnable_query=True)
    model = Rectifier(clip, queries, ["background", "cat", "dog"], config)
    x = images(2, 3, 32, 40)
    w_q = class_query_weights(queries)
    expected = dense_features(clip, x, config.strategy, FeatureContext(queries=w_q))
    torch.testing.assert_close(model.features(x), expected)
    with torch.no_grad():
        model.head.query.add_(1.0)  # training the query does not change Z
    torch.testing.assert_close(model.features(x), expected)
    assert model(x).shape == (2, 3, 4, 5)  # M_o on the patch grid
    assert RectifierConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_a_strategy_round_trips_through_config_json():
    strategy = get_strategy("resclip", base="sclip", rcs_layers=(1, 2), sfr_pamr_dilations=(4, 8))
    data = json.loads(json.dumps(strategy_to_dict(strategy)))
    assert data["kind"] == "resclip" and data["rcs_layers"] == [1, 2]
    assert strategy_from_dict(data) == strategy and STRATEGIES["resclip"] == ResidualAttention()


# --- the protocols' per-dataset settings ---------------------------------------------------

# yvhangyang/ResCLIP configs/cfg_*.py: (temp_thd, attn_rcs_weights, attn_sfr_weights).
OFFICIAL = {
    "voc21": (0.50, (2.0, 0.3), (2.2, 0.7)), "voc20": (0.10, (2.0, 0.6), (2.1, 0.6)),
    "context60": (0.30, (2.0, 0.3), (1.8, 0.7)), "context59": (0.25, (2.0, 0.4), (1.8, 0.7)),
    "cocoobject": (0.11, (2.0, 0.4), (1.8, 0.7)), "cocostuff171": (0.11, (2.0, 0.4), (1.8, 0.7)),
    "cityscapes19": (0.10, (2.0, 0.2), (2.1, 0.6)), "ade150": (0.25, (2.0, 0.3), (2.1, 0.7)),
}


def test_every_protocol_publishes_resclips_weights_and_test_settings():
    assert set(OFFICIAL) <= set(list_protocols())
    for name in list_protocols():
        protocol = load_protocol(name)
        section = protocol.resclip
        assert section is not None and section.logit_scale == 40 and not section.pamr
        strategy = get_strategy("resclip", **published_strategy_overrides("resclip", protocol))
        # a user's folder: the strategy's own defaults (COCO-Stuff's weights, the corrected path check)
        assert strategy.path_check == ("line" if name == "folder" else "official")
        if name in OFFICIAL:
            temp_thd, rcs, sfr = OFFICIAL[name]
            assert (strategy.temp_thd, (strategy.rcs_tau, strategy.rcs_lambda),
                    (strategy.sfr_tau, strategy.sfr_lambda)) == (temp_thd, rcs, sfr)
            assert section.short_side == (560 if name == "cityscapes19" else 336)
            assert section.mode == ("whole" if name in ("voc21", "voc20") else "slide")  # slide_crop=0
    assert load_protocol("voc21").resclip.classes_file == "voc21_sclip.txt"  # ResCLIP's = SCLIP's names


def test_a_protocols_weights_reach_the_strategy_in_evaluate(tmp_path):
    clip = tiny_clip(0, perturb=0.05, vision_layers=2)
    root = write_voc(tmp_path / "voc", n_val=1)
    fast = {"short_side": 24, "mode": "whole"}
    result = api.evaluate(clip, "resclip", "voc21", root, templates="single", inference=fast, progress=False)
    assert result.settings["test_settings"] == "zero_shot"  # the common protocol, ResCLIP's VOC21 weights
    published = {"temp_thd": 0.5, "rcs_tau": 2.0, "rcs_lambda": 0.3, "sfr_tau": 2.2, "sfr_lambda": 0.7,
                 "path_check": "official"}
    assert {k: result.settings["strategy"][k] for k in published} == published
    assert result.settings["strategy"]["kind"] == "resclip"
    result = api.evaluate(clip, "resclip", "voc21", root, templates="single", inference=fast, progress=False,
                          strategy_overrides={"rcs_lambda": 0.5})
    assert result.settings["strategy"]["rcs_lambda"] == 0.5 and result.settings["strategy"]["temp_thd"] == 0.5


# --- the command line ----------------------------------------------------------------------

def test_cli_evaluate_with_resclips_own_protocol(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    clip_file = save_clip(tiny_clip(0, vision_layers=2), tmp_path / "tiny.pt", format="openai")
    root = write_voc(tmp_path / "voc", n_val=2)
    out = tmp_path / "res.json"
    assert main(["evaluate", "--clip", str(clip_file), "--method", "resclip", "--dataset", "voc21", "--data-root",
                 str(root), "--quiet", "--templates", "single", "--short-side", "40", "--test-settings", "resclip",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    settings = result["settings"]
    assert result["num_images"] == 2 and settings["test_settings"] == "resclip"
    inference = settings["inference"]
    assert (inference["mode"], inference["logit_scale"], inference["prob_thd"], inference["pamr"]) == \
        ("whole", 40, 0.1, False)
    assert settings["classes"][0].startswith("background: sky, wall, tree")  # ResCLIP's (= SCLIP's) class file
    assert settings["strategy"]["kind"] == "resclip" and settings["strategy"]["sfr_tau"] == 2.2


def test_cli_rectify_on_resclip_features_and_its_run_loads_back(tmp_path, monkeypatch):
    """ReCLIP++ on ResCLIP's features (``reclip rectify --features resclip``): the strategy goes
    into config.json and comes back, and the loaded rectifier feeds its fixed W_q to SFR."""
    from reclip.clip.load import load_clip
    from reclip.rectification import load_rectifier

    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    clip_file = save_clip(tiny_clip(0, vision_layers=2), tmp_path / "tiny.pt", format="openai")
    root = write_voc(tmp_path / "voc", n_train=2, n_val=1)
    common = ["--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--quiet"]
    assert main(["hypotheses", *common, "--split", "train", "--out", str(tmp_path / "hyp.json"), "--t", "0"]) == 0
    run = tmp_path / "run"
    assert main(["rectify", *common, "--hypotheses", str(tmp_path / "hyp.json"), "--out", str(run), "--max-steps",
                 "1", "--batch-size", "2", "--crop", "32", "--base-short-side", "40", "--device", "cpu",
                 "--features", "resclip"]) == 0
    recorded = json.loads((run / "config.json").read_text())["rectifier"]["strategy"]
    assert recorded == "resclip"  # a preset is recorded by its name (RectifierConfig.to_dict)
    model = load_rectifier(run, load_clip(clip_file))
    assert model.backbone.strategy == STRATEGIES["resclip"]
    x = images(1, 3, 32, 40)
    w_q = model.head.fixed_query
    expected = dense_features(model.clip, x, STRATEGIES["resclip"],
                              FeatureContext(queries=w_q))
    torch.testing.assert_close(model.features(x), expected)


def test_the_attention_is_float32_under_autocast():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 2, 1 + 49, 8, generator=g), torch.randn(2, 2, 1 + 49, 8, generator=g)
    rcs = torch.softmax(torch.randn(2, 2, 50, 50, generator=g), dim=-1)
    strategy = ResidualAttention()
    exact = strategy.attention(q, k, (7, 7), rcs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = strategy.attention(q, k, (7, 7), rcs)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact)
