"""The DeepLab V2 student's network: dilated ResNet backbones (torchvision / mmseg ResNetV1c
parameter names), their weights files, and the ASPP-V2 classifier.

Expected key lists are written here from the published networks' construction rules
(blocks per layer, which blocks have a downsample, BN buffers), not read from
reclip.backbones.resnet, so a renamed or missing parameter shows."""

from __future__ import annotations

import functools
import math
import re
import urllib.error
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from reclip.backbones import (
    STUDENT_BACKBONES,
    BackboneWeightsError,
    ResNet,
    build_student_backbone,
    load_backbone_weights,
)
from reclip.backbones import resnet as resnet_module
from reclip.clip.convert import CheckpointError
from reclip.heads import ASPPV2

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def expected_keys(blocks: tuple[int, ...], bottleneck: bool, deep_stem: bool = False) -> list[str]:
    """torchvision's ResNet state-dict keys without fc (or mmseg ResNetV1c's with ``deep_stem``), in order."""
    if deep_stem:  # stem.0/3/6 convs, stem.1/4/7 BNs (stem.2/5/8 ReLUs)
        keys = [k for c in (0, 3, 6) for k in [f"stem.{c}.weight"] + [f"stem.{c + 1}.{b}" for b in BN]]
    else:
        keys = ["conv1.weight"] + [f"bn1.{b}" for b in BN]
    convs = 3 if bottleneck else 2
    for layer, n in enumerate(blocks, start=1):
        for j in range(n):
            p = f"layer{layer}.{j}"
            for c in range(1, convs + 1):
                keys += [f"{p}.conv{c}.weight"] + [f"{p}.bn{c}.{b}" for b in BN]
            # a downsample where the shape changes: every layer's first block, except
            # BasicBlock's layer1 (64 -> 64 channels at stride 1)
            if j == 0 and (bottleneck or layer > 1):
                keys += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{b}" for b in BN]
    return keys


@functools.cache
def keys_and_shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_student_backbone(name).state_dict().items()}


# ---------------------------------------------------------------------------------------
# Parameter names
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, blocks, bottleneck, params_with_fc, fc_params",
    [
        # torchvision's published num_params (fc included) and fc = Linear(C, 1000)
        ("resnet18", (2, 2, 2, 2), False, 11_689_512, 512 * 1000 + 1000),
        ("resnet50", (3, 4, 6, 3), True, 25_557_032, 2048 * 1000 + 1000),
        ("resnet101", (3, 4, 23, 3), True, 44_549_160, 2048 * 1000 + 1000),
    ],
)
def test_torchvision_key_list(name, blocks, bottleneck, params_with_fc, fc_params):
    backbone = build_student_backbone(name)
    assert list(backbone.state_dict()) == expected_keys(blocks, bottleneck)
    assert sum(p.numel() for p in backbone.parameters()) == params_with_fc - fc_params
    assert not any(k.startswith("fc.") for k in backbone.state_dict())


def test_exact_names_and_shapes():
    r101 = keys_and_shapes("resnet101")
    assert r101["conv1.weight"] == (64, 3, 7, 7)
    assert r101["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert r101["layer3.22.conv2.weight"] == (256, 256, 3, 3)
    assert r101["layer3.22.bn3.running_var"] == (1024,)
    assert r101["layer4.0.downsample.0.weight"] == (2048, 1024, 1, 1)
    assert r101["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert "layer3.23.conv1.weight" not in r101 and "layer4.3.conv1.weight" not in r101
    r18 = keys_and_shapes("resnet18")
    assert r18["layer4.1.conv2.weight"] == (512, 512, 3, 3)
    assert r18["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert "layer1.0.downsample.0.weight" not in r18 and "layer1.0.conv3.weight" not in r18


def test_v1c_deep_stem_names_and_shapes():
    v1c = keys_and_shapes("resnet50-v1c")
    assert list(v1c) == expected_keys((3, 4, 6, 3), True, deep_stem=True)
    stem = {k: s for k, s in v1c.items() if k.startswith("stem.")}
    assert stem["stem.0.weight"] == (32, 3, 3, 3)
    assert stem["stem.3.weight"] == (32, 32, 3, 3)
    assert stem["stem.6.weight"] == (64, 32, 3, 3)
    assert stem["stem.1.weight"] == stem["stem.4.running_mean"] == (32,)
    assert stem["stem.7.bias"] == (64,)
    assert not any(k.startswith(("stem.2", "stem.5", "stem.8")) for k in v1c)  # ReLUs: no parameters
    assert "conv1.weight" not in v1c and "bn1.weight" not in v1c
    # past the stem, ResNetV1c-50's keys and shapes are torchvision ResNet-50's
    r50 = keys_and_shapes("resnet50")
    assert {k: s for k, s in v1c.items() if k.startswith("layer")} == {
        k: s for k, s in r50.items() if k.startswith("layer")}
    backbone = build_student_backbone("resnet50-v1c")
    assert backbone.stem[0].stride == (2, 2) and backbone.stem[3].stride == (1, 1)
    assert isinstance(backbone.stem[2], torch.nn.ReLU) and isinstance(backbone.stem[8], torch.nn.ReLU)


def test_names_are_case_and_separator_insensitive_and_unknown_names_refused():
    assert build_student_backbone("ResNet50_V1c").deep_stem
    with pytest.raises(ValueError, match="resnet50-v1c"):
        build_student_backbone("resnet34")


# ---------------------------------------------------------------------------------------
# Geometry: stride 8, dilation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (7, 9), (8, 8), (17, 40), (33, 65), (64, 48)])
def test_resnet18_grid_is_ceil_input_over_8(size):
    backbone = build_student_backbone("resnet18").eval()
    assert (backbone.stride, backbone.out_channels, backbone.embed_dim) == (8, 512, 512)
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, *size))
    assert out.shape == (2, 512, math.ceil(size[0] / 8), math.ceil(size[1] / 8))


@pytest.mark.parametrize("name, size", [("resnet50-v1c", (19, 23)), ("resnet101", (9, 17)), ("resnet50", (16, 8))])
def test_bottleneck_grids(name, size):
    backbone = build_student_backbone(name).eval()
    assert (backbone.stride, backbone.out_channels) == (8, 2048)
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, *size))
    assert out.shape == (1, 2048, math.ceil(size[0] / 8), math.ceil(size[1] / 8))


def test_other_output_strides():
    for os_, size in ((16, (33, 31)), (32, (65, 64))):
        backbone = build_student_backbone("resnet18", output_stride=os_).eval()
        with torch.no_grad():
            out = backbone(torch.randn(1, 3, *size))
        assert backbone.stride == os_
        assert out.shape[-2:] == (math.ceil(size[0] / os_), math.ceil(size[1] / os_))


def test_dilation_replaces_stride_in_layer3_and_layer4():
    b = build_student_backbone("resnet50")
    conv = dict(b.named_modules())
    assert conv["layer2.0.conv2"].stride == (2, 2) and conv["layer2.0.downsample.0"].stride == (2, 2)
    for layer, first, rest, n in (("layer3", 1, 2, 6), ("layer4", 2, 4, 3)):
        assert conv[f"{layer}.0.downsample.0"].stride == (1, 1)
        # the first block keeps the previous dilation (torchvision, mmseg contract_dilation=True)
        assert conv[f"{layer}.0.conv2"].dilation == (first, first)
        for j in range(n):
            c = conv[f"{layer}.{j}.conv2"]
            d = first if j == 0 else rest
            assert (c.stride, c.dilation, c.padding) == ((1, 1), (d, d), (d, d))
    assert conv["layer4.2.conv2"].dilation == (4, 4)
    assert all(conv[f"layer{i}.{j}.conv2"].dilation == (1, 1) for i, n in ((1, 3), (2, 4)) for j in range(n))
    r18 = dict(build_student_backbone("resnet18").named_modules())
    assert r18["layer4.1.conv1"].dilation == r18["layer4.1.conv2"].dilation == (4, 4)
    assert r18["layer3.1.conv2"].dilation == (2, 2) and r18["layer3.0.conv1"].stride == (1, 1)


def test_dilation_is_applied_in_the_forward():
    """layer4 of ResNet-18 alone: a dilation-4 3x3 conv moves an impulse 4 cells, not 1."""
    b = build_student_backbone("resnet18").eval()
    block = b.layer4[1]
    with torch.no_grad():
        x = torch.zeros(1, 512, 21, 21)
        x[0, :, 10, 10] = 1.0
        y = block.conv1(x).abs().sum(1)[0]
    reached = {(i, j) for i, j in (y > 0).nonzero().tolist()}
    assert reached == {(10 + di, 10 + dj) for di in (-4, 0, 4) for dj in (-4, 0, 4)}


def test_bad_image_shape_refused():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        build_student_backbone("resnet18")(torch.randn(1, 4, 16, 16))


# ---------------------------------------------------------------------------------------
# Weights files
# ---------------------------------------------------------------------------------------


def randomized(backbone: ResNet, seed: int = 0) -> ResNet:
    """Non-trivial BN statistics and affines, so a buffer that fails to load changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return backbone.eval()


def outputs(backbone: ResNet, seed: int = 1) -> torch.Tensor:
    x = torch.randn(1, 3, 24, 20, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return backbone.eval()(x)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_saved_state_dict_loads_strictly_and_gives_identical_outputs(tmp_path, fmt):
    src = randomized(build_student_backbone("resnet18"))
    sd = src.state_dict()
    path = tmp_path / f"r18.{fmt}"
    if fmt == "pth":
        torch.save({**sd, "fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)}, path)  # fc ignored
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    fresh = build_student_backbone("resnet18")
    assert not torch.equal(outputs(fresh), outputs(src))
    assert load_backbone_weights(fresh, path) is fresh
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert torch.equal(outputs(fresh), outputs(src))
    assert torch.equal(outputs(build_student_backbone("resnet18", weights=path)), outputs(src))


def test_file_without_num_batches_tracked_loads(tmp_path):
    """Files saved before torch 0.4.1 (torchvision's older ResNet weights) lack num_batches_tracked."""
    src = randomized(build_student_backbone("resnet18"))
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    fresh = load_backbone_weights(build_student_backbone("resnet18"), path)
    assert torch.equal(outputs(fresh), outputs(src))


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda sd: sd.pop("layer3.1.bn2.running_var"), r"missing keys: layer3\.1\.bn2\.running_var"),
        (lambda sd: sd.__setitem__("layer4.0.conv1.weight", torch.zeros(512, 256, 1, 1)),
         r"misshapen keys: layer4\.0\.conv1\.weight \(512, 256, 1, 1\) in the file vs \(512, 256, 3, 3\)"),
        (lambda sd: sd.__setitem__("layer5.0.conv1.weight", torch.zeros(1)),
         r"unexpected keys: layer5\.0\.conv1\.weight"),
        (lambda sd: sd.__setitem__("layer1.0.conv1.weight", torch.full((64, 64, 3, 3), float("nan"))), r"NaN"),
    ],
    ids=["missing", "wrong-shape", "extra", "nan"],
)
def test_unfitting_file_is_refused_naming_file_and_key(tmp_path, edit, pattern):
    sd = dict(randomized(build_student_backbone("resnet18")).state_dict())
    edit(sd)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    target = build_student_backbone("resnet18")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(BackboneWeightsError, match=pattern) as info:
        load_backbone_weights(target, path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, CheckpointError)  # what the CLI reports
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())  # nothing half-loaded


def test_mmseg_checkpoint_with_backbone_prefix_loads(tmp_path):
    """{"meta", "state_dict": {"backbone.*", "decode_head.*"}, "optimizer"}: the backbone's keys are read."""
    src = randomized(ResNet("basic", (1, 1, 1, 1), deep_stem=True, base_channels=16, name="tiny-v1c"))
    ckpt = {
        "meta": {"mmseg_version": "0.30.0", "CLASSES": ("a", "b")},
        "state_dict": {**{f"backbone.{k}": v for k, v in src.state_dict().items()},
                       "decode_head.conv_seg.weight": torch.zeros(2, 16, 1, 1)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]},
    }
    path = tmp_path / "iter_40000.pth"
    torch.save(ckpt, path)
    fresh = load_backbone_weights(ResNet("basic", (1, 1, 1, 1), deep_stem=True, base_channels=16), path)
    assert torch.equal(outputs(fresh), outputs(src))
    assert "stem.3.weight" in fresh.state_dict()


def test_stem_mismatch_hints_at_the_other_variant(tmp_path):
    src = ResNet("basic", (1, 1, 1, 1), deep_stem=True, base_channels=16)
    path = tmp_path / "v1c.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    pattern = r"missing keys: conv1\.weight.*unexpected keys: stem\.0.*resnet50-v1c"
    with pytest.raises(BackboneWeightsError, match=pattern):
        load_backbone_weights(ResNet("basic", (1, 1, 1, 1), base_channels=16), path)


def test_unreadable_files_refused(tmp_path):
    backbone = build_student_backbone("resnet18")
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        load_backbone_weights(backbone, tmp_path / "nowhere.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(BackboneWeightsError, match="junk.pth"):
        load_backbone_weights(backbone, junk)
    not_tensors = tmp_path / "lists.pth"
    torch.save({"conv1.weight": [1, 2, 3]}, not_tensors)
    with pytest.raises(BackboneWeightsError, match="lists.pth.*expected a tensor"):
        load_backbone_weights(backbone, not_tensors)


# ---------------------------------------------------------------------------------------
# "imagenet": download by name
# ---------------------------------------------------------------------------------------


def test_imagenet_offline_warns_and_returns_a_random_backbone(monkeypatch):
    def offline(url, check_hash):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(resnet_module, "_download", offline)
    with pytest.warns(UserWarning, match=r"resnet18.*download\.pytorch\.org.*random initialisation"):
        backbone = build_student_backbone("resnet18", weights="imagenet")
    assert isinstance(backbone, ResNet) and backbone.stride == 8
    # a fresh initialisation: BN statistics untouched
    assert torch.equal(backbone.bn1.running_mean, torch.zeros(64))
    assert torch.equal(backbone.bn1.running_var, torch.ones(64))


def test_no_weights_is_random_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_student_backbone("resnet18", weights=None)


def test_imagenet_downloaded_weights_are_loaded(monkeypatch):
    """The downloaded torchvision file has fc.* and (older files) no num_batches_tracked."""
    src = randomized(build_student_backbone("resnet18"))
    seen = []

    def fake_download(url, check_hash):
        seen.append((url, check_hash))
        sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
        return {**sd, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}

    monkeypatch.setattr(resnet_module, "_download", fake_download)
    backbone = build_student_backbone("resnet18", weights="imagenet")
    assert seen == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", True)]
    assert torch.equal(outputs(backbone), outputs(src))


def test_imagenet_urls():
    for spec in STUDENT_BACKBONES.values():
        assert spec.imagenet_url.startswith("https://")
        # torch.hub's file-name convention (hub.HASH_REGEX): NAME-HASH.pth, HASH a sha256 prefix
        assert re.search(r"/[a-z0-9_]+-[0-9a-f]{8}\.pth$", spec.imagenet_url), spec.imagenet_url
    assert STUDENT_BACKBONES["resnet50-v1c"].imagenet_url.endswith("/pretrain/third_party/resnet50_v1c-2cccc1ad.pth")


# ---------------------------------------------------------------------------------------
# ASPP-V2
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (13, 8)])
def test_aspp_is_the_sum_of_dilated_branches_and_keeps_the_grid(size):
    torch.manual_seed(0)
    aspp = ASPPV2(24, 10)
    assert aspp.dilations == (6, 12, 18, 24)
    for branch in aspp.aspp_modules:
        torch.nn.init.normal_(branch.conv.bias)  # non-zero biases: each branch's must count once
    x = torch.randn(2, 24, *size)
    expected = sum(
        F.conv2d(x, branch.conv.weight, branch.conv.bias, padding=d, dilation=d)
        for branch, d in zip(aspp.aspp_modules, (6, 12, 18, 24))
    )
    with torch.no_grad():
        out = aspp(x)
        assert out.shape == (2, 10, *size)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(out, sum(aspp.branches(x)))
    state = aspp.state_dict()
    assert list(state) == [f"aspp_modules.{i}.conv.{p}" for i in range(4) for p in ("weight", "bias")]
    assert state["aspp_modules.3.conv.weight"].shape == (10, 24, 3, 3)


def test_aspp_official_reclip_branches_have_bn_relu():
    torch.manual_seed(0)
    aspp = ASPPV2(16, 8, dilations=(6, 12), norm=True).eval()
    for branch in aspp.aspp_modules:
        torch.nn.init.normal_(branch.norm.running_mean)
        torch.nn.init.normal_(branch.norm.bias)
    assert "aspp_modules.0.conv.bias" not in aspp.state_dict()
    assert "aspp_modules.1.norm.running_var" in aspp.state_dict()
    x = torch.randn(1, 16, 6, 9)
    expected = sum(
        F.relu(F.batch_norm(F.conv2d(x, b.conv.weight, padding=d, dilation=d), b.norm.running_mean,
                            b.norm.running_var, b.norm.weight, b.norm.bias, eps=b.norm.eps))
        for b, d in zip(aspp.aspp_modules, (6, 12))
    )
    with torch.no_grad():
        torch.testing.assert_close(aspp(x), expected)


def test_aspp_on_the_backbone_grid():
    backbone = build_student_backbone("resnet18").eval()
    aspp = ASPPV2(backbone.out_channels, 32)
    with torch.no_grad():
        out = aspp(backbone(torch.randn(1, 3, 41, 30)))
    assert out.shape == (1, 32, 6, 4)
    with pytest.raises(ValueError, match=r"\(B, 512, h, w\)"):
        aspp(torch.randn(1, 256, 4, 4))
