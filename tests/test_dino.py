"""DINO / DINOv2 backbones (reclip.backbones.dino): official key layouts, strict loading, downloads, outputs.

The state dicts are written here from the official construction rules (facebookresearch/dino
vision_transformer.py, facebookresearch/dinov2 dinov2/models/vision_transformer.py with
the hub's block_chunks=0), not from reclip.backbones.dino, so a renamed or missing parameter shows.
Outputs are checked against a step-by-step functional re-derivation of the official
forward (DINO has no other reference here) and against HF transformers' Dinov2Model /
Dinov2WithRegistersModel on the same random weights. Nothing downloads: urlopen is
monkeypatched.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from reclip.backbones.dino import (
    DINO_MODELS,
    DinoConfig,
    DinoViT,
    DinoWeights,
    DinoWeightsError,
    load_dino,
    random_dino,
)
from reclip.backbones.dino import load as dino_load

WIDTH, DEPTH, HEADS = 128, 2, 2  # width / 64 = 2 heads: the official head width, so heads are inferred
# family, patch, pre-training grid, registers
LAYOUTS = {
    "dino_p8": ("dino", 8, 4, 0),
    "dino_p16": ("dino", 16, 3, 0),
    "dinov2": ("dinov2", 14, 5, 0),
    "dinov2_reg": ("dinov2", 14, 5, 4),
}


def official_state(family: str, patch: int, grid: int, registers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official parameter names and shapes (biases and norms perturbed, gammas ~ 1)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, around: float = 0.0, scale: float = 0.1) -> torch.Tensor:
        return around + scale * torch.randn(*shape, generator=g)

    d = WIDTH
    sd = {
        "cls_token": rand(1, 1, d, scale=0.5),
        "pos_embed": rand(1, 1 + grid * grid, d, scale=0.5),
        "patch_embed.proj.weight": rand(d, 3, patch, patch, scale=0.05),
        "patch_embed.proj.bias": rand(d),
    }
    if family == "dinov2":
        sd["mask_token"] = rand(1, d)
        if registers:
            sd["register_tokens"] = rand(1, registers, d, scale=0.5)
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": rand(d, around=1.0), b + "norm1.bias": rand(d),
            b + "attn.qkv.weight": rand(3 * d, d), b + "attn.qkv.bias": rand(3 * d),
            b + "attn.proj.weight": rand(d, d), b + "attn.proj.bias": rand(d),
            b + "norm2.weight": rand(d, around=1.0), b + "norm2.bias": rand(d),
            b + "mlp.fc1.weight": rand(4 * d, d), b + "mlp.fc1.bias": rand(4 * d),
            b + "mlp.fc2.weight": rand(d, 4 * d), b + "mlp.fc2.bias": rand(d),
        }
        if family == "dinov2":
            sd |= {b + "ls1.gamma": rand(d, around=1.0, scale=0.3), b + "ls2.gamma": rand(d, around=1.0, scale=0.3)}
    sd |= {"norm.weight": rand(d, around=1.0), "norm.bias": rand(d)}
    return sd


def reference_tokens(sd: dict[str, torch.Tensor], images: torch.Tensor, *, offset: float, antialias: bool,
                     heads: int = HEADS) -> torch.Tensor:
    """The official forward, step by step: all tokens after the final norm, (B, 1 + R + h*w, D)."""
    patch = sd["patch_embed.proj.weight"].shape[-1]
    b, _, height, width = images.shape
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1)
    # interpolate_pos_encoding(x, w, h) with (w, h) = the image's (H, W)
    n = sd["pos_embed"].shape[1] - 1
    m = int(math.sqrt(n))
    h0, w0 = height // patch, width // patch
    if x.shape[1] - 1 == n and height == width:
        pos = sd["pos_embed"]
    else:
        grid = sd["pos_embed"][:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if offset:
            grid = F.interpolate(grid, scale_factor=((h0 + offset) / m, (w0 + offset) / m), mode="bicubic",
                                 antialias=antialias)
        else:
            grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=antialias)
        pos = torch.cat([sd["pos_embed"][:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)
    x = x + pos
    if "register_tokens" in sd:
        x = torch.cat([x[:, :1], sd["register_tokens"].expand(b, -1, -1), x[:, 1:]], dim=1)
    d = x.shape[-1]
    for i in range(sum(1 for k in sd if k.endswith(".norm1.weight"))):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, x.shape[1], 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(dim=-1)
        y = F.linear((attn @ v).transpose(1, 2).reshape(b, x.shape[1], d), sd[p + "attn.proj.weight"],
                     sd[p + "attn.proj.bias"])
        x = x + y * sd.get(p + "ls1.gamma", 1.0)
        y = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + y * sd.get(p + "ls2.gamma", 1.0)
    return F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


def hub_interpolation(registers: int) -> dict:
    # dinov2/hub/backbones.py: only the _reg models use offset 0.0 + antialias; DINO v1 and plain DINOv2: 0.1, none
    return {"offset": 0.0, "antialias": True} if registers else {"offset": 0.1, "antialias": False}


def images(height: int, width: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def save(sd: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


# ---------------------------------------------------------------------------------------
# Official layouts load strictly and run the official forward
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_official_layout_loads_strictly_and_matches_the_official_forward(layout: str, tmp_path: Path) -> None:
    family, patch, grid, registers = LAYOUTS[layout]
    sd = official_state(family, patch, grid, registers)
    model = load_dino(save(sd, tmp_path / f"{layout}.pth"))
    c = model.config
    assert (c.family, c.patch_size, c.width, c.depth, c.heads, c.pos_grid, c.registers) == (
        family, patch, WIDTH, DEPTH, HEADS, grid, registers)
    assert c.layer_scale == (family == "dinov2") and not model.training
    assert set(model.state_dict()) == set(sd)
    interp = hub_interpolation(registers)
    # the pre-training grid (no interpolation), and a larger non-square grid (bicubic interpolation)
    for h, w in ((grid, grid), (grid + 2, grid + 3)):
        x = images(h * patch, w * patch)
        with torch.no_grad():
            tokens = model(x)
            ref = reference_tokens(sd, x, **interp)
            assert tokens.shape == (2, 1 + registers + h * w, WIDTH)
            torch.testing.assert_close(tokens, ref, atol=1e-5, rtol=1e-5)
            feats = model.patch_features(x)
        assert feats.shape == (2, WIDTH, h, w)
        # patch (i, j) is token 1 + R + i*w + j: CLS and registers dropped, row-major
        torch.testing.assert_close(feats[:, :, 1, 2], ref[:, 1 + registers + w + 2])


def test_patch_features_qkv_are_the_last_block_projections(tmp_path: Path) -> None:
    family, patch, grid, registers = LAYOUTS["dinov2_reg"]
    sd = official_state(family, patch, grid, registers)
    model = load_dino(save(sd, tmp_path / "m.pth"))
    x = images(3 * patch, 4 * patch)
    # the last block's input = the output of a model with the first DEPTH - 1 blocks, before its final norm
    captured = {}
    model.blocks[-1].attn.qkv.register_forward_hook(lambda mod, inp, out: captured.update(qkv=out))
    with torch.no_grad():
        model(x)
        qkv = captured["qkv"][:, 1 + registers:]  # (B, h*w, 3D), official layout q | k | v
        for i, kind in enumerate("qkv"):
            got = model.patch_features(x, kind)
            assert got.shape == (2, WIDTH, 3, 4)
            want = qkv[..., i * WIDTH:(i + 1) * WIDTH].transpose(1, 2).reshape(2, WIDTH, 3, 4)
            torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="feature kind"):
        model.patch_features(x, "attn")


def test_input_size_must_be_a_multiple_of_the_patch(tmp_path: Path) -> None:
    model = load_dino(save(official_state("dinov2", 14, 5, 0), tmp_path / "m.pth"))
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model(images(70, 75))


def test_dino_full_checkpoint_reads_the_teacher_backbone(tmp_path: Path) -> None:
    teacher, student = official_state("dino", 8, 4, 0, seed=1), official_state("dino", 8, 4, 0, seed=2)
    head = {"head.mlp.0.weight": torch.randn(16, WIDTH), "head.last_layer.weight_g": torch.ones(32, 1)}
    # main_dino.py save_dict: the student is DDP-wrapped (module.), both are MultiCropWrapper(backbone, head)
    full = {
        "student": {f"module.backbone.{k}": v for k, v in student.items()} | {f"module.{k}": v for k, v in head.items()},
        "teacher": {f"backbone.{k}": v for k, v in teacher.items()} | head,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 800, "args": argparse.Namespace(arch="vit_small", patch_size=8), "dino_loss": {"center": torch.zeros(1, 32)},
    }
    model = load_dino(save(full, tmp_path / "dino_deitsmall8_pretrain_full_checkpoint.pth"))
    x = images(32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_tokens(teacher, x, offset=0.1, antialias=False))
    # the student alone (a checkpoint without a teacher) is read too
    only_student = load_dino(save({"student": full["student"]}, tmp_path / "student.pth"))
    with torch.no_grad():
        torch.testing.assert_close(only_student(x), reference_tokens(student, x, offset=0.1, antialias=False))


def test_dinov2_training_checkpoint_with_chunked_blocks(tmp_path: Path) -> None:
    sd = official_state("dinov2", 14, 5, 4)
    # block_chunks=2 (the training configs use 4): chunk c holds identities then its blocks, so block i of
    # DEPTH 2 is blocks.<i // 1>.<i>.* (dinov2 vision_transformer.py BlockChunk)
    def chunked_name(key: str) -> str:
        if not key.startswith("blocks."):
            return key
        i = int(key.split(".")[1])
        return key.replace(f"blocks.{i}.", f"blocks.{i // (DEPTH // 2)}.{i}.", 1)

    chunked = {chunked_name(k): v for k, v in sd.items()}
    assert "blocks.1.1.ls1.gamma" in chunked
    ckpt = {"teacher": {f"backbone.{k}": v for k, v in chunked.items()} | {"dino_head.mlp.0.weight": torch.ones(4, 4)}}
    model = load_dino(save(ckpt, tmp_path / "teacher_checkpoint.pth"))
    x = images(70, 84)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_tokens(sd, x, **hub_interpolation(4)), atol=1e-5, rtol=1e-5)


def test_safetensors_file(tmp_path: Path) -> None:
    sd = official_state("dinov2", 14, 5, 0)
    save_file(sd, str(tmp_path / "m.safetensors"))
    model = load_dino(tmp_path / "m.safetensors")
    x = images(70, 70)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_tokens(sd, x, **hub_interpolation(0)), atol=1e-5, rtol=1e-5)


def test_heads_for_a_non_official_width(tmp_path: Path) -> None:
    sd = official_state("dino", 8, 4, 0)
    one_head = load_dino(save(sd, tmp_path / "m.pth"), heads=1)
    assert one_head.config.heads == 1
    x = images(32, 32)
    with torch.no_grad():
        torch.testing.assert_close(one_head(x), reference_tokens(sd, x, offset=0.1, antialias=False, heads=1))
        assert not torch.allclose(one_head(x), reference_tokens(sd, x, offset=0.1, antialias=False, heads=2))


# ---------------------------------------------------------------------------------------
# Bad files fail clearly
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, words", [
    ("drop", ["missing keys", "blocks.1.ls2.gamma"]),
    ("extra", ["unexpected keys", "blocks.1.attn.rel_pos"]),
    ("shape", ["misshapen keys", "blocks.1.mlp.fc2.weight"]),
])
def test_key_mismatch_names_the_file_and_keys(change: str, words: list[str], tmp_path: Path) -> None:
    sd = official_state("dinov2", 14, 5, 0)
    if change == "drop":
        del sd["blocks.1.ls2.gamma"]
    elif change == "extra":
        sd["blocks.1.attn.rel_pos"] = torch.zeros(3)
    else:
        sd["blocks.1.mlp.fc2.weight"] = torch.zeros(WIDTH, 3 * WIDTH)
    path = save(sd, tmp_path / "odd.pth")
    with pytest.raises(DinoWeightsError) as info:
        load_dino(path)
    for word in [str(path), *words]:
        assert word in str(info.value)


def test_not_a_dino_file(tmp_path: Path) -> None:
    path = save({"visual.conv1.weight": torch.zeros(8, 3, 4, 4)}, tmp_path / "clip.pth")
    with pytest.raises(DinoWeightsError, match="not a DINO / DINOv2 ViT backbone"):
        load_dino(path)


@pytest.mark.parametrize("content", [b"this is not a checkpoint", b"PK\x03\x04 truncated zip"])
def test_corrupt_file(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(DinoWeightsError) as info:
        load_dino(path)
    assert str(path) in str(info.value)


def test_truncated_real_file(tmp_path: Path) -> None:
    data = save(official_state("dino", 8, 4, 0), tmp_path / "whole.pth").read_bytes()
    path = tmp_path / "half.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DinoWeightsError) as info:
        load_dino(path)
    assert str(path) in str(info.value)


def test_nan_weights_refused(tmp_path: Path) -> None:
    sd = official_state("dino", 8, 4, 0)
    sd["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    with pytest.raises(DinoWeightsError, match="NaN"):
        load_dino(save(sd, tmp_path / "nan.pth"))


def test_unknown_spec_lists_the_names(tmp_path: Path) -> None:
    with pytest.raises(DinoWeightsError) as info:
        load_dino(tmp_path / "dinov3_vitb16.pth")
    assert "dinov2_vitb14_reg" in str(info.value) and "dino_vitb8" in str(info.value)


# ---------------------------------------------------------------------------------------
# Names and downloads (no network)
# ---------------------------------------------------------------------------------------


def test_official_names_and_urls() -> None:
    # dino hubconf.py and dinov2 hub/backbones.py + hub/utils.py _make_dinov2_model_name
    assert DINO_MODELS["dino_vitb8"].url == "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"
    assert DINO_MODELS["dino_vits16"].filename == "dino_deitsmall16_pretrain.pth"
    assert DINO_MODELS["dinov2_vitl14_reg"].url == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth")
    vitl = DINO_MODELS["dinov2_vitl14"].config
    assert (vitl.width, vitl.depth, vitl.heads, vitl.mlp_hidden, vitl.pos_grid) == (1024, 24, 16, 4096, 37)
    assert DINO_MODELS["dino_vitb8"].config.pos_grid == 28 and DINO_MODELS["dinov2_vits14_reg"].config.registers == 4


def test_random_dino_is_the_named_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    config = DinoConfig("dinov2", 14, WIDTH, DEPTH, HEADS, 4 * WIDTH, 5, registers=4, layer_scale=True)
    monkeypatch.setitem(DINO_MODELS, "tiny_reg", DinoWeights(config, "https://example.invalid/tiny.pth"))
    model = random_dino("tiny_reg", seed=1)
    assert model.config == config and not model.training
    x = images(28, 42, batch=1)
    with torch.no_grad():
        feats = model.patch_features(x)
        assert feats.shape == (1, WIDTH, 2, 3) and torch.isfinite(feats).all()
        torch.testing.assert_close(random_dino("tiny_reg", seed=1).patch_features(x), feats)
        assert not torch.allclose(random_dino("tiny_reg", seed=2).patch_features(x), feats)
    with pytest.raises(DinoWeightsError, match="dinov2_vitb14_reg"):
        random_dino("dinov3_vitb16")


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable")


class _Response(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_offline_error_names_the_file_and_the_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    cache = tmp_path / "cache"
    weights = DINO_MODELS["dinov2_vitb14_reg"]
    for download in (True, False):
        with pytest.raises(DinoWeightsError) as info:
            load_dino("dinov2_vitb14_reg", cache_dir=cache, download=download)
        msg = str(info.value)
        assert weights.url in msg and "dinov2_vitb14_reg4_pretrain.pth" in msg and "--proxy" in msg
        assert ("could not download" in msg) == download
    assert not cache.exists() or list(cache.iterdir()) == []  # no partial file left


def _tiny_entry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sha256: str | None = None) -> tuple[bytes, dict]:
    sd = official_state("dinov2", 14, 5, 4)
    data = save(sd, tmp_path / "src" / "tiny_reg4_pretrain.pth").read_bytes()
    config = DinoConfig("dinov2", 14, WIDTH, DEPTH, HEADS, 4 * WIDTH, 5, registers=4, layer_scale=True,
                        interpolate_offset=0.0, interpolate_antialias=True)
    monkeypatch.setitem(DINO_MODELS, "tiny_reg", DinoWeights(config, "https://example.invalid/tiny_reg4_pretrain.pth",
                                                             sha256))
    return data, sd


def test_download_records_sha256_then_verifies_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, sd = _tiny_entry(monkeypatch, tmp_path)
    requested = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: requested.append(url) or _Response(data))
    cache = tmp_path / "cache"
    model = load_dino("tiny_reg", cache_dir=cache)
    assert requested == ["https://example.invalid/tiny_reg4_pretrain.pth"]
    x = images(70, 84)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_tokens(sd, x, **hub_interpolation(4)), atol=1e-5, rtol=1e-5)
    record = cache / "tiny_reg4_pretrain.pth.sha256"
    assert record.read_text().strip() == hashlib.sha256(data).hexdigest()

    monkeypatch.setattr(urllib.request, "urlopen", _no_network)  # cached: no second download
    assert load_dino("tiny_reg", cache_dir=cache, download=False).config == model.config

    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    (cache / "tiny_reg4_pretrain.pth").write_bytes(bytes(damaged))
    with pytest.raises(DinoWeightsError, match="damaged or was replaced"):
        load_dino("tiny_reg", cache_dir=cache, download=False)
    # downloaded again, the file must match the first download's hash: a changed file is refused
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(bytes(damaged)))
    with pytest.warns(UserWarning, match="downloading it again"), pytest.raises(dino_load.CheckpointError,
                                                                               match="sha256"):
        load_dino("tiny_reg", cache_dir=cache)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(data))
    with pytest.warns(UserWarning, match="downloading it again"):
        load_dino("tiny_reg", cache_dir=cache)
    assert (cache / "tiny_reg4_pretrain.pth").read_bytes() == data


def test_published_sha256_mismatch_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, _ = _tiny_entry(monkeypatch, tmp_path, sha256="0" * 64)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(data))
    cache = tmp_path / "cache"
    with pytest.raises(dino_load.CheckpointError, match="sha256"):
        load_dino("tiny_reg", cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_named_file_must_be_that_architecture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_entry(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    save(official_state("dinov2", 14, 5, 0), cache / "tiny_reg4_pretrain.pth")  # no registers
    with pytest.raises(DinoWeightsError, match="is not tiny_reg"):
        load_dino("tiny_reg", cache_dir=cache, download=False)


# ---------------------------------------------------------------------------------------
# Against HF transformers' DINOv2 on the same weights
# ---------------------------------------------------------------------------------------


def to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv2 names -> transformers 5.x Dinov2Model names (q_proj / k_proj / v_proj / o_proj)."""
    out = {
        "embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": sd["mask_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"],
    }
    if "register_tokens" in sd:
        out["embeddings.register_tokens"] = sd["register_tokens"]
    for i in range(DEPTH):
        o, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for name in ("weight", "bias"):
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{h}attention.{proj}.{name}"] = sd[f"{o}attn.qkv.{name}"][j * WIDTH:(j + 1) * WIDTH]
            out[f"{h}attention.o_proj.{name}"] = sd[f"{o}attn.proj.{name}"]
            for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{h}{part}.{name}"] = sd[f"{o}{part}.{name}"]
        out[f"{h}layer_scale1.lambda1"] = sd[f"{o}ls1.gamma"]
        out[f"{h}layer_scale2.lambda1"] = sd[f"{o}ls2.gamma"]
    return out


def hf_model(registers: int, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    kwargs = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, mlp_ratio=4, patch_size=14,
                  image_size=14 * 5, layer_norm_eps=1e-6, hidden_act="gelu", layerscale_value=1.0)
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kwargs))
    missing, unexpected = model.load_state_dict(to_hf(sd), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


@pytest.mark.parametrize("registers", [0, 4])
def test_matches_hf_dinov2(registers: int, tmp_path: Path) -> None:
    sd = official_state("dinov2", 14, 5, registers)
    hf = hf_model(registers, sd)
    ours = load_dino(save(sd, tmp_path / "m.pth"))
    with torch.no_grad():
        # the pre-training grid: no interpolation anywhere
        x = images(70, 70)
        torch.testing.assert_close(ours(x), hf(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-5)
        # another grid: HF resizes to the size (Dinov2WithRegisters with antialias), which is the
        # official _reg interpolation; the official plain DINOv2 uses scale factors (h + 0.1) / M
        x = images(98, 126)
        got, want = ours(x), hf(pixel_values=x).last_hidden_state
        if registers:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        else:
            assert (got - want).abs().max() > 1e-3  # the 0.1 offset moves the bicubic samples
            offset_free = DinoViT(DinoConfig(**{**ours.config.__dict__, "interpolate_offset": 0.0}))
            offset_free.load_state_dict(ours.state_dict())
            torch.testing.assert_close(offset_free.eval()(x), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# As ProxyCLIP's proxy (reclip.strategies.proxyclip)
# ---------------------------------------------------------------------------------------


def test_proxyclip_reads_the_official_proxy_features(tmp_path: Path) -> None:
    from tiny import tiny_clip

    from reclip.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from reclip.features import FeatureContext, dense_features
    from reclip.strategies.proxyclip import ProxyAttention

    sd = official_state("dino", 8, 4, 0)
    strategy = ProxyAttention(proxy=str(save(sd, tmp_path / "dino_vitb8_tiny.pth")))
    clip = tiny_clip(0, perturb=0.1)  # patch 8
    aux = strategy.build_aux(clip).eval()
    assert strategy.stride(clip, aux) == 8
    x = torch.randn(1, 3, 40, 48, generator=torch.Generator().manual_seed(3))  # CLIP-normalised
    # proxyclip_segmentor.forward_feature: un-normalise (CLIP), normalise (ImageNet), DINO's normed patches
    mean, std = torch.tensor(clip.image_mean).view(3, 1, 1), torch.tensor(clip.image_std).view(3, 1, 1)
    imagenet = (x * std + mean - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        want = reference_tokens(sd, imagenet, offset=0.1, antialias=False)[:, 1:]
        got = aux(x)
        assert got.shape == (1, WIDTH, 5, 6)
        torch.testing.assert_close(got.flatten(2).transpose(1, 2), want, atol=1e-5, rtol=1e-5)
        z = dense_features(clip, x, strategy, FeatureContext(aux=aux))
    assert z.shape == (1, clip.visual.output_dim, 5, 6) and torch.isfinite(z).all()


def hf_4x_names(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 names -> the 4.x names that the hub's facebook/dinov2-* files carry."""
    renames = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
               "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense"}
    out = {}
    for key, value in hf_state.items():
        for new, old in renames.items():
            key = key.replace(f".{new}.", f".{old}.")
        out[key] = value
    return out


@pytest.mark.parametrize("naming", ["transformers5", "hub_4x", "classifier_4x"])
@pytest.mark.parametrize("registers", [0, 4])
def test_hf_weights_files_load_and_run_the_official_forward(naming: str, registers: int, tmp_path: Path) -> None:
    sd = official_state("dinov2", 14, 5, registers)
    hf_state = {k: v.contiguous() for k, v in hf_model(registers, sd).state_dict().items()}  # HF's own names
    if naming != "transformers5":
        hf_state = hf_4x_names(hf_state)
        assert "encoder.layer.1.attention.attention.value.bias" in hf_state
    if naming == "classifier_4x":  # Dinov2ForImageClassification
        hf_state = {f"dinov2.{k}": v for k, v in hf_state.items()} | {"classifier.weight": torch.zeros(3, 2 * WIDTH)}
    save_file(hf_state, str(tmp_path / "model.safetensors"))
    model = load_dino(tmp_path / "model.safetensors")
    assert model.config.registers == registers and model.config.layer_scale
    x = images(98, 126)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_tokens(sd, x, **hub_interpolation(registers)),
                                   atol=1e-5, rtol=1e-5)


def test_hf_file_missing_a_projection(tmp_path: Path) -> None:
    sd = official_state("dinov2", 14, 5, 0)
    hf_state = hf_4x_names(dict(hf_model(0, sd).state_dict()))
    del hf_state["encoder.layer.1.attention.attention.key.weight"]
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(DinoWeightsError, match="block 1 has no attention key weight"):
        load_dino(tmp_path / "model.safetensors")
