"""ProxyCLIP (reclip.strategies.proxyclip) against a step-by-step re-derivation of the
official code (mc-lan/ProxyCLIP ``proxyclip_segmentor.forward_feature`` and
``open_clip/transformer.py`` ``custom_attn``), written in its style: batch of one,
(L, N, D) tokens, bmm over batch x heads, ``torch.mean`` over the whole similarity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tiny import tiny_clip
from reclip.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from reclip.features import FeatureContext, dense_features
from reclip.strategies.proxyclip import ProxyAttention, ProxyFeatures, proxy_attention


class PatchProxy(nn.Module):
    """A stand-in proxy model: a patchifying conv and a LayerNorm (a one-layer 'ViT' without
    attention), with the interface ProxyCLIP reads (``patch_size``, ``patch_features``)."""

    def __init__(self, patch: int = 4, dim: int = 12, seed: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.patch_size = patch
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)

    def patch_features(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(0, perturb=0.1, vision_layers=2, vision_heads=4)  # patch 8


@pytest.fixture(scope="module")
def proxy(clip):
    return ProxyFeatures(PatchProxy(), (clip.image_mean, clip.image_std)).eval()


def images(*size, seed=1):
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed))


def official_forward(clip, img, vfm, beta=1.2, gamma=3.0):
    """One image (1, 3, H, W), CLIP-normalised -> (1, D, I, J) features, as the official code
    computes them before ``@ query_features.T`` (then normalised here, as the official does)."""
    visual = clip.visual
    mean, std = torch.tensor(clip.image_mean).view(3, 1, 1), torch.tensor(clip.image_std).view(3, 1, 1)
    # UnNormalize then transforms.Normalize (ImageNet)
    raw = img[0] * std + mean
    imgs_norm = ((raw - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1))[None]
    ex_feats = vfm.patch_features(imgs_norm)  # (1, C, I, J), DINO's normed last-block patches
    # open_clip VisionTransformer.forward
    x = visual.conv1(img).reshape(1, visual.width, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.view(1, 1, -1), x], dim=1)
    h, w = img.shape[-2] // visual.patch_size, img.shape[-1] // visual.patch_size
    x = x + visual.positional_embedding_for(h, w)[None]
    x = visual.ln_pre(x).permute(1, 0, 2)  # NLD -> LND
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x.permute(1, 0, 2)).permute(1, 0, 2)
    blk = visual.transformer.resblocks[-1]
    # custom_attn(blk.attn, blk.ln_1(x), ex_feats, beta, gamma, token_size=(h, w))
    xin = blk.ln_1(x)
    num_heads = blk.attn.heads
    _, bsz, embed_dim = xin.size()
    head_dim = embed_dim // num_heads
    q, k, v = F.linear(xin, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    B, C, H, W = ex_feats.shape
    q_k = F.normalize(ex_feats.flatten(2, 3), dim=1)
    similarity = torch.einsum("b c m, b c n -> b m n", q_k, q_k)
    similarity = (similarity - torch.mean(similarity) * beta) * gamma
    similarity[similarity < 0.0] = float("-inf")
    mask = similarity.unsqueeze(1).repeat(1, num_heads, 1, 1)
    mask = mask.reshape(bsz * num_heads, mask.shape[2], mask.shape[3])
    attn_weights = F.softmax(mask, dim=-1)
    v = v[:, 1:, :].reshape(bsz * num_heads, h, w, head_dim).permute(0, 3, 1, 2)
    v = F.interpolate(v, size=(H, W), mode="bilinear", align_corners=False)
    v = v.permute(0, 2, 3, 1).reshape(bsz * num_heads, H * W, head_dim)
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    x = blk.attn.out_proj(attn_output).permute(1, 0, 2)  # LND -> NLD
    x = visual.ln_post(x) @ visual.proj
    x = x / x.norm(dim=-1, keepdim=True)
    return x.permute(0, 2, 1).reshape(1, -1, H, W)


def test_equals_the_official_computation(clip, proxy):
    for size in ((32, 32), (32, 48)):  # square, and a grid the official (square-only) code gets right too
        x = images(1, 3, *size)
        ours = dense_features(clip, x, ProxyAttention(proxy="unused"), FeatureContext(aux=proxy))
        expected = official_forward(clip, x, proxy.model)
        assert ours.shape == (1, clip.visual.output_dim, size[0] // 4, size[1] // 4)  # the proxy's grid
        torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    x = images(1, 3, 32, 32, seed=5)
    tuned = ProxyAttention(proxy="unused", beta=0.8, gamma=2.0)
    torch.testing.assert_close(dense_features(clip, x, tuned, FeatureContext(aux=proxy)),
                               official_forward(clip, x, proxy.model, beta=0.8, gamma=2.0), atol=2e-5, rtol=1e-4)


def test_batched_images_do_not_see_each_other_unless_asked(clip, proxy):
    x = images(3, 3, 32, 40, seed=2)
    context = FeatureContext(aux=proxy)
    batched = dense_features(clip, x, ProxyAttention(proxy="unused"), context)
    alone = torch.cat([dense_features(clip, x[i:i + 1], ProxyAttention(proxy="unused"), context) for i in range(3)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    # the official reduction: one mean over the batch's similarities
    official = ProxyAttention(proxy="unused", mean_over="batch")
    assert not torch.allclose(dense_features(clip, x, official, context), alone, atol=1e-4)
    torch.testing.assert_close(dense_features(clip, x[:1], official, context), alone[:1], atol=1e-5, rtol=1e-5)


def test_attention_rows_with_nothing_left_attend_to_themselves():
    same = torch.ones(1, 5, 2, 3)  # every patch alike: cosine 1 everywhere, mean * 1.2 > 1
    attn = proxy_attention(same, beta=1.2, gamma=3.0)
    torch.testing.assert_close(attn[0], torch.eye(6))  # the official code gives NaN here
    f = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(0))
    attn = proxy_attention(f, beta=1.2, gamma=3.0)
    assert torch.isfinite(attn).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 9))
    # negatives are cut: a key less similar than mean * beta gets no weight
    g = F.normalize(f.flatten(2), dim=1)
    sim = g.transpose(1, 2) @ g
    cut = sim < sim.mean(dim=(1, 2), keepdim=True) * 1.2
    assert (attn[cut] == 0).all() and (attn[~cut] > 0).all()


def test_the_segmentor_covers_the_input_on_the_proxys_grid(clip):
    from reclip.heads.zero_shot import ZeroShotSegmentor
    from reclip.text import Vocabulary, query_embeddings

    queries = query_embeddings(clip, Vocabulary.from_names(["cat", "dog"]), "single", cache_dir=False)
    proxy = ProxyFeatures(PatchProxy(), (clip.image_mean, clip.image_std))
    segmentor = ZeroShotSegmentor(clip, queries, ProxyAttention(proxy="unused"), aux=proxy).eval()
    assert segmentor.backbone.stride == 4  # the proxy's patch, not CLIP's 8
    with torch.no_grad():
        logits = segmentor(images(2, 3, 30, 45))
    assert logits.shape == (2, 2, 30, 45) and torch.isfinite(logits).all()
    assert not any(p.requires_grad for p in segmentor.backbone.aux.parameters())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="mean_over"):
        ProxyAttention(mean_over="dataset")
    with pytest.raises(ValueError, match="gamma must be > 0"):
        ProxyAttention(gamma=0.0)
    with pytest.raises(RuntimeError, match="needs its proxy model"):
        dense_features(tiny_clip(), images(1, 3, 32, 32), ProxyAttention(proxy="unused"))


# --- registered: method, protocol sections, command line ------------------------------

def test_the_method_and_its_published_sections():
    from reclip.data.protocol import load_protocol
    from reclip.features import STRATEGIES
    from reclip.methods import METHODS

    m = METHODS["proxyclip"]
    assert (m.family, m.strategy, m.templates, m.own_section) == ("zero_shot", "proxyclip", "imagenet80", "proxyclip")
    assert STRATEGIES["proxyclip"] == ProxyAttention(proxy="dino_vitb8", beta=1.2, gamma=3.0)
    voc21, city, ade = (load_protocol(n).proxyclip for n in ("voc21", "cityscapes19", "ade150"))
    assert (voc21.short_side, voc21.window, voc21.stride, voc21.logit_scale, voc21.prob_thd) == (336, 336, 112, 40, 0.2)
    assert voc21.classes_file == "voc21_proxyclip.txt"
    assert (city.short_side, city.window, city.prob_thd) == (448, 224, None)
    assert (ade.short_side, ade.window) == (448, 336)


def test_evaluate_and_rectify_with_a_proxy_file_from_the_command_line(tmp_path, monkeypatch):
    import json

    from layouts import write_voc
    from tiny import tiny_dino_file
    from reclip.cli import main
    from reclip.clip.load import load_clip, save_clip
    from reclip.rectification import load_rectifier

    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    clip_file = save_clip(tiny_clip(0, vision_layers=2), tmp_path / "tiny.pt", format="openai")
    proxy = tiny_dino_file(tmp_path / "dino.pth", patch=4)
    root = write_voc(tmp_path / "voc", n_train=2, n_val=2)
    out = tmp_path / "res.json"
    assert main(["evaluate", "--clip", str(clip_file), "--method", "proxyclip", "--proxy", str(proxy), "--dataset",
                 "voc21", "--data-root", str(root), "--test-settings", "proxyclip", "--short-side", "48", "--window",
                 "32", "--stride", "16", "--templates", "single", "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 2 and 0 <= result["mIoU"] <= 100
    assert result["settings"]["strategy"] == {"kind": "proxyclip", "proxy": str(proxy), "beta": 1.2, "gamma": 3.0,
                                              "mean_over": "image"}
    assert result["settings"]["inference"]["prob_thd"] == 0.2
    assert result["settings"]["classes"][0].startswith("background: sky, wall")  # ProxyCLIP's class file
    # ReCLIP++'s rectifier on ProxyCLIP's features (Z on the proxy's 4-px grid): one step, then it loads back
    hyp, run = tmp_path / "hyp.json", tmp_path / "run"
    common = ["--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--quiet"]
    assert main(["hypotheses", *common, "--split", "train", "--out", str(hyp), "--t", "0"]) == 0
    assert main(["rectify", *common, "--hypotheses", str(hyp), "--out", str(run), "--features", "proxyclip",
                 "--proxy", str(proxy), "--max-steps", "1", "--batch-size", "2", "--crop", "32",
                 "--base-short-side", "40", "--device", "cpu"]) == 0
    assert load_rectifier(run, load_clip(clip_file)).strategy == ProxyAttention(proxy=str(proxy))


@pytest.mark.real_proxy_loading
def test_without_the_proxy_file_offline_the_error_says_what_to_pass(tmp_path, monkeypatch):
    import urllib.request

    from reclip.backbones.dino.load import DinoWeightsError

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DinoWeightsError, match=r"dino_vitbase8_pretrain\.pth[\s\S]*--proxy"):
        ProxyAttention().build_aux(tiny_clip())


def test_clip_and_a_proxy_of_another_patch_read_the_same_pixels(clip):
    """CLIP's patch 8 and a proxy's 12: the input is padded to a multiple of both (24), as the
    official pads to 56, so CLIP's values land on the proxy cells of the same pixels; Z is
    cropped back to the proxy cells of the input."""
    proxy = ProxyFeatures(PatchProxy(patch=12), (clip.image_mean, clip.image_std)).eval()
    x = images(1, 3, 40, 52, seed=6)
    ours = dense_features(clip, x, ProxyAttention(proxy="unused"), FeatureContext(aux=proxy))
    assert ours.shape[-2:] == (4, 5)  # ceil(40 / 12), ceil(52 / 12)
    padded = F.pad(x, (0, 72 - 52, 0, 48 - 40))
    torch.testing.assert_close(ours, official_forward(clip, padded, proxy.model)[:, :, :4, :5], atol=2e-5, rtol=1e-4)


def test_the_attention_is_float32_under_autocast_and_settings_are_checked():
    f = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = proxy_attention(f, 1.2, 3.0)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, proxy_attention(f, 1.2, 3.0))
    for bad in ("abc", float("nan"), True):
        with pytest.raises(ValueError, match="beta must be a finite number"):
            ProxyAttention(beta=bad)
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        ProxyAttention(gamma="3")
