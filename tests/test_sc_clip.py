"""SC-CLIP (reclip.strategies.sc_clip) on tiny random CLIPs.

The reference is a step-by-step re-derivation of the official code (SuleBai/SC-CLIP @ 0417ba9,
clip/model.py ``VisionTransformer.forward``, ``lof_pytorch``, ``mean_interpolation``,
``custom_attn``, ``adaptively_aggregate``) written in its own style: batch 1, (L, N, D)
layout, the per-point LOF written out from the official definition with loops, bmm. Its
one change: the outlier (row, col) is row-major with the grid's width (the official line
divides by the number of rows), so it runs on non-square grids too.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from layouts import write_voc
from tiny import tiny_clip
from reclip.cli import main
from reclip.clip.load import load_clip, save_clip
from reclip.clip.model import scale_block_number
from reclip.data.protocol import list_protocols, load_protocol
from reclip.features import STRATEGIES, dense_features, get_strategy, strategy_from_dict, strategy_to_dict
from reclip.heads.rectify import RectifierConfig
from reclip.maft.ipclip import default_start_layer
from reclip.methods import METHODS, inference_config
from reclip.strategies.sc_clip import (
    SelfCalibrated,
    local_outlier_factor,
    lof_outliers,
    norm_outliers,
    replace_outliers,
)


def images(*size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def deep_clip():
    """12 blocks, as ViT-B/16, so the published layer numbers are used as they are."""
    return tiny_clip(0, perturb=0.1, vision_layers=12, vision_width=32, vision_heads=2)


@pytest.fixture(scope="module")
def shallow_clip():
    return tiny_clip(1, perturb=0.1, vision_layers=4, vision_width=32, vision_heads=2)


# --- the official computation, re-derived -------------------------------------------------

def official_lof(x, n_neighbors, contamination):
    """lof_pytorch, point by point: x (N, D) -> outlier indices, LOF scores.

    Squared Euclidean distances; p's neighbours are its k nearest others; the official
    reach distance of p to o is max(d(p, o), kdist(p)); LRD(p) = k / (mean reach distance);
    LOF(p) = mean over p's neighbours o of LRD(o) / LRD(p); outliers: LOF above the
    (1 - contamination) quantile.
    """
    n = x.shape[0]
    d = torch.stack([((x - x[i]) ** 2).sum(-1) for i in range(n)])  # (N, N)
    neighbours, kdist = [], []
    for p in range(n):
        order = [o for o in torch.argsort(d[p]).tolist() if o != p][:n_neighbors]
        neighbours.append(order)
        kdist.append(d[p, order[-1]])
    lrd = []
    for p in range(n):
        reach = [torch.maximum(d[p, o], kdist[p]) for o in neighbours[p]]
        lrd.append(n_neighbors / (sum(reach) / n_neighbors))
    scores = torch.stack([sum(lrd[o] / lrd[p] for o in neighbours[p]) / n_neighbors for p in range(n)])
    threshold = torch.quantile(scores.float(), 1 - contamination)
    return torch.where(scores > threshold)[0], scores


def official_mean_interpolation(feature_map, top_indices):
    B, C, H, W = feature_map.shape
    kernel = torch.ones(C, 1, 3, 3)
    kernel[:, 0, 1, 1] = 0
    mask = torch.ones(H, W)
    indices = torch.tensor(top_indices, dtype=torch.long)
    mask[indices[:, 0], indices[:, 1]] = 0
    mask = mask[None, None]
    neighbor_sum = F.conv2d(F.pad(feature_map * mask, (1, 1, 1, 1)), kernel, groups=C)
    valid = F.conv2d(F.pad(mask, (1, 1, 1, 1)), kernel[:, :1], groups=1)
    safe = valid.clone()
    safe[safe == 0] = 1
    top = torch.zeros(H, W)
    top[indices[:, 0], indices[:, 1]] = 1
    update = top[None, None] * (valid > 0).float()
    return feature_map * (1 - update) + neighbor_sum / safe * update


def official_custom_attn(attn_layer, x, mid_simi):
    num_heads = attn_layer.heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    scale = head_dim ** -0.5
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    mid_simi = (mid_simi - torch.mean(mid_simi)) * 3.0
    mid_simi[mid_simi < 0.0] = float("-inf")
    mid_simi = mid_simi.repeat(num_heads, 1, 1)
    attn_weights = F.softmax(mid_simi, dim=-1)
    attn_weights += F.softmax(torch.bmm(k, k.transpose(1, 2)) * scale, dim=-1)
    attn_weights /= 2
    out = torch.bmm(attn_weights, v).transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(out)


def official_aggregate(feats, corrs):
    corrs_normalized = corrs / (corrs.sum(dim=-1, keepdim=True) + 1e-6)
    return torch.matmul(corrs_normalized, feats.permute(1, 0, 2)).permute(1, 0, 2)


def official_sc_clip(clip, image, pre_adjust_idx=8, post_adjust_idx=3, multi_start_idx=3, multi_end_idx=10,
                     res_cls=0.3, beta=0.4, n_neighbors=30, contamination=0.05, detector="lof"):
    """VisionTransformer.forward(return_all=True) of SC-CLIP on one image -> ((D, h, w), outliers).

    ``detector="norm"``: the first version's (74471da) anomaly tokens, the 10 largest norms."""
    visual = clip.visual
    blocks = visual.transformer.resblocks
    tokens, (h, w) = visual.embed(image)
    width = tokens.shape[-1]
    x = tokens.permute(1, 0, 2)  # (L, 1, D)
    feats_list = []
    for idx, blk in enumerate(blocks[:-1], start=1):
        x = blk(x.permute(1, 0, 2)).permute(1, 0, 2)
        feats_list.append(x)
        if idx == len(blocks) - 1:
            cls_token = x[:1, ...]
            if detector == "lof":
                outlier_indices, _ = official_lof(x[1:, ...].squeeze(1), n_neighbors, contamination)
            else:
                norms = torch.norm(x[1:, ...].squeeze(1), dim=1)
                outlier_indices = torch.sort(norms, descending=True)[1][:10]
            top_indices = [(int(i) // w, int(i) % w) for i in outlier_indices]  # official: // rows
            feature_map = x[1:, :, :].permute(1, 2, 0).reshape(1, width, h, w)
            feature_map = official_mean_interpolation(feature_map, top_indices)
            x = feature_map.reshape(1, width, h * w).permute(2, 0, 1)

    feats = feats_list[pre_adjust_idx][1:, ...].clone()
    feats = feats.permute(1, 2, 0).reshape(1, width, h, w)
    feats = official_mean_interpolation(feats, top_indices)
    feats = feats.reshape(1, width, h * w).permute(2, 0, 1)
    feats = feats / feats.norm(dim=2, keepdim=True)
    before_simi = torch.matmul(feats.permute(1, 0, 2), feats.permute(1, 2, 0))
    mid_simi = before_simi.clone()
    before_simi[before_simi < beta] = 0.0
    x = official_aggregate(x, before_simi)

    blk = blocks[-1]
    x = official_custom_attn(blk.attn, blk.ln_1(x), mid_simi) + res_cls * cls_token

    feats = feats_list[post_adjust_idx][1:, ...].clone()
    feats = feats / feats.norm(dim=2, keepdim=True)
    after_simi = torch.matmul(feats.permute(1, 0, 2), feats.permute(1, 2, 0))
    after_simi[after_simi < beta] = 0.0
    x = official_aggregate(x, after_simi)

    re_feats = torch.zeros_like(feats_list[0])
    for i in range(multi_start_idx, multi_end_idx):
        re_feats += feats_list[i]
    cls_token = re_feats[:1, ...]
    re_feats = official_custom_attn(blk.attn, blk.ln_1(re_feats[1:, ...]), mid_simi) + res_cls * cls_token
    re_feats = official_aggregate(re_feats, after_simi)
    x += re_feats

    out = visual.ln_post(x.permute(1, 0, 2)) @ visual.proj  # (1, N, D)
    out = out / out.norm(dim=-1, keepdim=True)
    return out[0].T.reshape(-1, h, w), sorted(int(i) for i in outlier_indices)


def strategy_outliers(clip, image, strategy=SelfCalibrated()):
    """The outliers the strategy finds after L-1 blocks of one image (sorted flat indices)."""
    tokens, _ = clip.visual.forward_blocks(image, end=-1)
    mask = lof_outliers(tokens[:, 1:], strategy.lof_neighbors, strategy.lof_quantile)[0]
    return torch.where(mask)[0].tolist()


@pytest.mark.parametrize("size", [(48, 48), (40, 64)], ids=["6x6", "5x8-not-square"])
def test_equals_the_official_computation_on_12_blocks(deep_clip, size):
    image = images(1, 3, *size)
    with torch.no_grad():
        ref, ref_outliers = official_sc_clip(deep_clip, image)
        out = dense_features(deep_clip, image, "sc_clip")
        assert ref_outliers and strategy_outliers(deep_clip, image) == ref_outliers
        torch.testing.assert_close(out[0], ref, atol=2e-5, rtol=1e-4)
        # the outliers matter: without them (quantile 1: none above the max) the features change
        untouched = dense_features(deep_clip, image, get_strategy("sc_clip", lof_quantile=1.0))
    assert not torch.allclose(out, untouched, atol=1e-4)


def test_equals_the_official_computation_with_layers_scaled_to_4_blocks(shallow_clip):
    # round(4 * n / 12): attention 9 -> 3, aggregation 4 -> 1, fusion 4..10 -> 1..3 (tokens after n blocks),
    # i.e. the official feats_list[2], feats_list[0], feats_list[0:3]
    assert SelfCalibrated().layers(4) == (3, 1, range(1, 4))
    image = images(1, 3, 48, 48, seed=2)
    with torch.no_grad():
        ref, ref_outliers = official_sc_clip(shallow_clip, image, pre_adjust_idx=2, post_adjust_idx=0,
                                             multi_start_idx=0, multi_end_idx=3)
        out = dense_features(shallow_clip, image, "sc_clip")
    assert ref_outliers and strategy_outliers(shallow_clip, image) == ref_outliers
    torch.testing.assert_close(out[0], ref, atol=2e-5, rtol=1e-4)


def test_the_first_versions_norm_detector_equals_its_official_computation(deep_clip):
    image = images(1, 3, 40, 64, seed=8)
    strategy = get_strategy("sc_clip", outlier_detector="norm")
    with torch.no_grad():
        ref, ref_outliers = official_sc_clip(deep_clip, image, detector="norm")
        out = dense_features(deep_clip, image, strategy)
        tokens, _ = deep_clip.visual.forward_blocks(image, end=-1)
    assert len(ref_outliers) == 10 and torch.where(norm_outliers(tokens[:, 1:], 10)[0])[0].tolist() == ref_outliers
    torch.testing.assert_close(out[0], ref, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(out, dense_features(deep_clip, image, "sc_clip"), atol=1e-4)  # another detector
    assert norm_outliers(images(2, 6, 4), 10).all()  # clamped to the 6 tokens


def test_local_outlier_factor_equals_the_official_definition():
    x = images(2, 40, 8, seed=3)
    scores = local_outlier_factor(x, 7)  # both images at once
    for b in range(2):
        _, ref = official_lof(x[b], 7, 0.05)
        torch.testing.assert_close(scores[b], ref.float(), rtol=1e-5, atol=1e-6)


# --- batching ------------------------------------------------------------------------------

def test_a_batch_equals_its_images_run_alone(deep_clip):
    x = torch.cat([images(1, 3, 40, 64, seed=4), images(1, 3, 40, 64, seed=5) * 2.0])
    with torch.no_grad():
        batch = dense_features(deep_clip, x, "sc_clip")
        alone = [dense_features(deep_clip, x[i:i + 1], "sc_clip") for i in range(2)]
    torch.testing.assert_close(batch, torch.cat(alone), atol=1e-5, rtol=1e-5)
    # per-image outliers and quantiles: the two images have their own
    tokens, _ = deep_clip.visual.forward_blocks(x, end=-1)
    mask = lof_outliers(tokens[:, 1:], 30, 0.95)
    assert mask.sum(1).tolist() == [2, 2]  # 0.95 quantile of 40 scores: the top 2 of each image
    assert not torch.equal(mask[0], mask[1])


# --- the outlier step on its own -------------------------------------------------------------

def test_a_planted_outlier_is_found_and_replaced_by_its_valid_neighbours_mean():
    h, w = 4, 7  # not square: (row, col) must be (p // w, p % w)
    tokens = 0.1 * images(1, h * w, 8, seed=6)
    r, c = 2, 5
    p = r * w + c  # 19: the official (p // h, p % h) = (4, 3) is outside the 4 rows
    tokens[0, p] += 10.0
    scores = local_outlier_factor(tokens, 10)
    assert scores[0].argmax() == p and scores[0, p] > 5 * scores[0].median()
    outliers = lof_outliers(tokens, 30, 0.95)  # k clamped to h*w - 1 = 27
    assert outliers[0, p] and outliers.sum() == 2  # 0.95 quantile of 28 scores: the top 2
    out = replace_outliers(tokens, outliers, (h, w))
    valid = [(rr, cc) for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
             if (rr, cc) != (r, c) and 0 <= rr < h and 0 <= cc < w and not outliers[0, rr * w + cc]]
    expected = torch.stack([tokens[0, rr * w + cc] for rr, cc in valid]).mean(0)
    torch.testing.assert_close(out[0, p], expected)
    others = ~outliers[0]
    torch.testing.assert_close(out[0, others], tokens[0, others], rtol=0, atol=0)


def test_replacement_at_the_border_and_without_valid_neighbours():
    h, w = 3, 4
    tokens = images(2, h * w, 5, seed=7)
    outliers = torch.zeros(2, h * w, dtype=torch.bool)
    outliers[0, 0] = True  # corner: 3 in-grid neighbours (1, 4, 5)
    outliers[1, [0, 1, 4, 5]] = True  # corner 0's neighbours are all outliers: kept
    out = replace_outliers(tokens, outliers, (h, w))
    torch.testing.assert_close(out[0, 0], tokens[0, [1, 4, 5]].mean(0))
    torch.testing.assert_close(out[1, 0], tokens[1, 0], rtol=0, atol=0)
    torch.testing.assert_close(out[1, 5], tokens[1, [2, 6, 8, 9, 10]].mean(0))  # 0, 1, 4 are outliers
    torch.testing.assert_close(out[0, 1:], tokens[0, 1:], rtol=0, atol=0)


def test_tiny_grids_clamp_k_and_a_single_patch_has_no_outlier(shallow_clip):
    assert not lof_outliers(images(3, 1, 8), 30, 0.95).any()
    assert lof_outliers(images(1, 4, 8), 30, 0.5).sum() == 2  # k = 3: runs, the top half
    z = dense_features(shallow_clip, images(1, 3, 8, 8), "sc_clip")  # a 1 x 1 grid
    assert z.shape == (1, 32, 1, 1) and torch.isfinite(z).all()


# --- settings, layers and errors ---------------------------------------------------------------

def test_published_settings_and_layer_scaling():
    s = STRATEGIES["sc_clip"]
    assert isinstance(s, SelfCalibrated)
    assert (s.outlier_detector, s.norm_outliers) == ("lof", 10)
    assert (s.lof_neighbors, s.lof_quantile, s.attention_layer, s.aggregation_layer, s.similarity_threshold,
            s.attention_scale, s.cls_weight, s.fusion_layers, s.layer_depth) == (30, 0.95, 9, 4, 0.4, 3.0, 0.3,
                                                                                   (4, 10), 12)
    assert s.layers(12) == (9, 4, range(4, 11))
    assert s.layers(2) == (1, 1, range(1, 2)) and s.layers(1) == (0, 0, range(0, 1))
    assert SelfCalibrated(attention_layer=2, aggregation_layer=1, fusion_layers=(1, 3), layer_depth=None).layers(4) \
        == (2, 1, range(1, 4))
    assert [scale_block_number(n, 24) for n in (4, 9, 10)] == [8, 18, 20]  # ViT-L/14's 24 blocks
    assert [default_start_layer(d) for d in (12, 24, 4, 1)] == [8, 16, 3, 0]  # MAFT's, through the same helper


def test_written_into_a_run_config_and_read_back():
    s = get_strategy("sc_clip", fusion_layers=[3, 9], cls_weight=0.5)  # a YAML list becomes the tuple
    assert s.fusion_layers == (3, 9)
    data = strategy_to_dict(s)
    assert data["kind"] == "sc_clip" and data["fusion_layers"] == [3, 9]
    assert strategy_from_dict(json.loads(json.dumps(data))) == s
    config = RectifierConfig(strategy=s)
    assert RectifierConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("change, match", [
    ({"outlier_detector": "sklearn"}, r"outlier_detector='sklearn': give one of \['lof', 'norm'\]"),
    ({"norm_outliers": -1}, r"norm_outliers=-1"),
    ({"lof_neighbors": 0}, r"SelfCalibrated\.lof_neighbors=0: give LOF's k"),
    ({"lof_neighbors": 2.5}, r"lof_neighbors=2\.5"),
    ({"lof_quantile": 0.0}, r"lof_quantile=0\.0: .* in \(0, 1\]"),
    ({"lof_quantile": 1.5}, r"lof_quantile=1\.5"),
    ({"similarity_threshold": 1.5}, r"similarity_threshold=1\.5: give a cosine similarity in \[-1, 1\]"),
    ({"attention_scale": 0}, r"attention_scale=0: give a scale > 0"),
    ({"cls_weight": "0.3"}, r"cls_weight='0\.3': give a number"),
    ({"fusion_layers": (10, 4)}, r"fusion_layers=\(10, 4\): give \(first, last\)"),
    ({"fusion_layers": (4,)}, r"fusion_layers=\(4,\)"),
    ({"attention_layer": 12}, r"attention_layer=12: give layer numbers >= 0 <= 11 \(tokens after at most 11"),
    ({"aggregation_layer": -1}, r"aggregation_layer=-1"),
    ({"layer_depth": 1}, r"layer_depth=1: give the depth"),
])
def test_bad_settings_raise_clear_errors(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(SelfCalibrated(), **change)


def test_layers_that_do_not_fit_the_tower_raise(shallow_clip):
    unscaled = get_strategy("sc_clip", layer_depth=None)  # 9 and 4..10 as given
    with pytest.raises(ValueError, match=r"SelfCalibrated\(attention_layer=9, "
                       r"aggregation_layer=4, fusion_layers=\(4, 10\)\) does not fit this 4-block vision tower: "
                       r"give layers 0\.\.3"):
        dense_features(shallow_clip, images(1, 3, 32, 32), unscaled)
    fits = get_strategy("sc_clip", layer_depth=None, attention_layer=3, aggregation_layer=1, fusion_layers=(1, 3))
    assert dense_features(shallow_clip, images(1, 3, 32, 32), fits).shape == (1, 32, 4, 4)
    with pytest.raises(ValueError, match=r"SelfCalibrated\(attention_layer=4\) does not fit"):
        dense_features(shallow_clip, images(1, 3, 32, 32), dataclasses.replace(fits, attention_layer=4))


# --- protocol sections, method, command line ---------------------------------------------------

EXPECTED = {  # short side, logit scale, prob_thd, area_thd, class file (SuleBai/SC-CLIP configs/cfg_*.py)
    "voc21": (336, 50, 0.15, 0.1, "voc21_sclip.txt"),
    "voc20": (336, 40, None, None, "voc20_sclip.txt"),
    "context60": (336, 40, 0.15, None, None),
    "context59": (336, 40, None, None, None),
    "cocoobject": (336, 55, 0.35, None, "cocoobject_sclip.txt"),
    "cocostuff171": (336, 40, None, None, None),
    "cityscapes19": (560, 40, None, None, None),
    "ade150": (336, 40, None, None, None),
    "cocostuff27": (336, 40, None, None, None),
    "folder": (336, 40, None, None, None),
}


def test_every_shipped_protocol_has_a_section():
    assert sorted(EXPECTED) == sorted(list_protocols())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_protocol_sections_hold_sc_clips_published_values(name):
    p = load_protocol(name)
    s = p.sc_clip
    assert (s.short_side, s.logit_scale, s.prob_thd, s.area_thd, s.classes_file) == EXPECTED[name]
    assert (s.mode, s.window, s.stride, s.max_long_side, s.pamr, s.strategy) == ("slide", 224, 112, 2048, False, None)
    assert "sc_clip" in yaml.safe_load(open(p.source))
    cfg = inference_config("sc_clip", p, test_settings="sc_clip")
    assert (cfg.short_side, cfg.window, cfg.stride, cfg.logit_scale) == (s.short_side, 224, 112, s.logit_scale)
    assert inference_config("sc_clip", p).short_side == p.zero_shot.short_side  # the common protocol by default


def test_the_method_is_registered_in_the_zero_shot_family(capsys):
    m = METHODS["sc_clip"]
    assert (m.family, m.strategy, m.templates, m.own_section) == ("zero_shot", "sc_clip", "imagenet80", "sc_clip")
    assert main(["methods"]) == 0
    assert "sc_clip" in capsys.readouterr().out


def test_evaluate_and_rectify_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    clip_file = save_clip(tiny_clip(0, vision_layers=2), tmp_path / "tiny.pt", format="openai")
    root = write_voc(tmp_path / "voc", n_train=2, n_val=2)
    out = tmp_path / "res.json"
    assert main(["evaluate", "--clip", str(clip_file), "--method", "sc_clip", "--dataset", "voc21", "--data-root",
                 str(root), "--test-settings", "sc_clip", "--short-side", "48", "--window", "32", "--stride", "16",
                 "--templates", "single", "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    settings, inference = result["settings"], result["settings"]["inference"]
    assert result["num_images"] == 2 and 0 <= result["mIoU"] <= 100
    assert settings["test_settings"] == "sc_clip" and settings["strategy"]["kind"] == "sc_clip"
    assert (inference["mode"], inference["window"], inference["logit_scale"]) == ("slide", 32, 50)
    assert (inference["prob_thd"], inference["area_thd"], inference["pamr"]) == (0.15, 0.1, False)
    assert settings["classes"][0].startswith("background: sky, wall, tree")  # SC-CLIP's (= SCLIP's) class file
    # ReCLIP++'s rectifier on SC-CLIP's features: one step, then the run loads back with them
    hyp, run = tmp_path / "hyp.json", tmp_path / "run"
    common = ["--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--quiet"]
    assert main(["hypotheses", *common, "--split", "train", "--out", str(hyp), "--t", "0"]) == 0
    assert main(["rectify", *common, "--hypotheses", str(hyp), "--out", str(run), "--features", "sc_clip",
                 "--max-steps", "1", "--batch-size", "2", "--crop", "32", "--base-short-side", "40",
                 "--device", "cpu"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["rectifier"]["strategy"] == "sc_clip"  # the preset, by name
    from reclip.rectification import load_rectifier

    assert load_rectifier(run, load_clip(clip_file)).strategy == SelfCalibrated()
