"""load_clip / save_clip on tiny random CLIPs written in every checkpoint format.

Nothing downloads: named models are tested with a monkeypatched ``urlopen``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from tiny import tiny_clip as shared_tiny_clip
from reclip.clip.convert import (
    CheckpointError,
    check_state_dict,
    from_hf,
    from_open_clip,
    infer_config,
    to_hf,
)
from reclip.clip.load import (
    CLIP_MEAN,
    CLIP_STD,
    OPENAI_MODELS,
    PretrainedWeights,
    available_models,
    default_cache_dir,
    load_clip,
    read_checkpoint,
    save_clip,
)
from reclip.clip.model import CLIP, weights_fingerprint
from reclip.clip.torchscript import UnsafeCheckpointError, is_torchscript_archive, read_torchscript

# Widths are multiples of 64 so heads infer as width // 64 (OpenAI's rule).
TINY = dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=16,
            context_length=8, vocab_size=100, transformer_width=64, transformer_heads=1, transformer_layers=2)


def tiny_clip(seed: int = 0, **overrides) -> CLIP:
    """This file's shape (a short vocabulary and context: small checkpoint files), noisy everywhere."""
    return shared_tiny_clip(seed, perturb=0.02, **{**TINY, **overrides})


def inputs(model: CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    c = model.config
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, c.image_resolution, c.image_resolution, generator=gen)
    tokens = torch.zeros(2, c.context_length, dtype=torch.long)
    tokens[:, 0] = c.vocab_size - 2  # start of text
    tokens[0, 1:4] = torch.randint(0, c.vocab_size - 2, (3,), generator=gen)
    tokens[0, 4] = tokens[1, 2] = c.vocab_size - 1  # end of text: the largest id
    return images, tokens


@torch.no_grad()
def embeddings(model: CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    images, tokens = inputs(model)
    return model.encode_image(images.to(model.dtype)).float(), model.encode_text(tokens).float()


def assert_same_model(loaded: CLIP, original: CLIP) -> None:
    assert loaded.config == original.config
    ref, got = original.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k].float(), rtol=0, atol=0, msg=k)
    for a, b in zip(embeddings(loaded), embeddings(original)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


FORMATS = [("openai", "clip.pt"), ("openai-jit", "clip.pt"), ("open_clip", "clip.safetensors"), ("hf", "clip_hf")]


@pytest.mark.parametrize("fmt,name", FORMATS)
def test_roundtrip_every_format(tmp_path: Path, fmt: str, name: str) -> None:
    model = tiny_clip()
    save_clip(model, tmp_path / name, format=fmt)
    loaded = load_clip(tmp_path / name)
    assert_same_model(loaded, model)
    assert loaded.checkpoint_format == fmt
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.spec == str(tmp_path / name)
    assert loaded.image_mean == CLIP_MEAN and len(loaded.image_std) == 3
    assert loaded._reclip_fingerprint == weights_fingerprint(model, refresh=True)


@pytest.mark.parametrize("fmt,name", FORMATS)
def test_roundtrip_keeps_gelu_heads_and_preprocessing(tmp_path: Path, fmt: str, name: str) -> None:
    """What shapes cannot tell (activation, heads, mean / std) survives every format."""
    model = tiny_clip(quick_gelu=False, vision_heads=4, transformer_heads=2,
                      image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    save_clip(model, tmp_path / name, format=fmt)
    loaded = load_clip(tmp_path / name)
    assert loaded.config.quick_gelu is False
    assert loaded.visual.transformer.resblocks[0].attn.heads == 4
    assert loaded.transformer.resblocks[0].attn.heads == 2
    assert loaded.image_mean == (0.5, 0.5, 0.5) and loaded.image_std == (0.25, 0.25, 0.25)
    for a, b in zip(embeddings(loaded), embeddings(model)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_preprocessing_belongs_to_the_model() -> None:
    import reclip.clip.model
    import reclip.data.transforms

    # one home, the old import paths still work
    assert reclip.data.transforms.CLIP_MEAN is CLIP_MEAN is reclip.clip.model.CLIP_MEAN
    assert reclip.data.transforms.CLIP_STD is CLIP_STD is reclip.clip.model.CLIP_STD
    model = tiny_clip()
    assert model.image_mean == CLIP_MEAN and model.image_std == CLIP_STD
    other = tiny_clip(image_mean=[0.5, 0.5, 0.5], image_std=(0.25, 0.25, 0.25))
    assert other.image_mean == (0.5, 0.5, 0.5) and other.image_std == (0.25, 0.25, 0.25)
    assert "image_mean" not in other.config.to_dict()
    # caches are keyed by the fingerprint: the same weights with other preprocessing keep it
    assert weights_fingerprint(other) == weights_fingerprint(model)
    with pytest.raises(ValueError, match="divide by 255"):
        tiny_clip(image_mean=(122.771, 116.746, 104.094))  # ReCLIP's configs give them in 0..255
    with pytest.raises(ValueError, match="image_std"):
        tiny_clip(image_std=(0.5, 0.0, 0.5))


def test_loaded_model_keeps_the_files_mean_and_std(tmp_path: Path) -> None:
    save_clip(tiny_clip(), tmp_path / "m.safetensors", format="open_clip")
    sidecar = tmp_path / "open_clip_config.json"
    cfg = json.loads(sidecar.read_text())
    cfg["preprocess_cfg"] = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # e.g. SigLIP-style
    sidecar.write_text(json.dumps(cfg))
    loaded = load_clip(tmp_path / "m.safetensors")
    assert loaded.image_mean == (0.5, 0.5, 0.5) and loaded.image_std == (0.5, 0.5, 0.5)


def test_openai_format_is_bare_for_openai_convention(tmp_path: Path) -> None:
    save_clip(tiny_clip(), tmp_path / "clip.pt", format="openai")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.pt"]  # exactly OpenAI's format: no sidecar
    sd = torch.load(tmp_path / "clip.pt", weights_only=True)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in sd


def test_torchscript_archive_is_real_and_read_without_running_it(tmp_path: Path) -> None:
    model = tiny_clip()
    path = save_clip(model, tmp_path / "ViT-tiny.pt", format="openai-jit")
    assert is_torchscript_archive(path)
    names = zipfile.ZipFile(path).namelist()
    assert any("/code/" in n for n in names) and any(n.endswith("/data.pkl") for n in names)
    sd, extra = read_torchscript(path)
    assert sd.keys() == model.state_dict().keys()
    assert "open_clip_config.json" in extra
    with warnings.catch_warnings():  # our own file: torch.jit.load is safe here, and proves it is real TorchScript
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(path))
    images, tokens = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted.encode_image(images), model.encode_image(images))
        torch.testing.assert_close(scripted.encode_text(tokens), model.encode_text(tokens))


class OpenAIStyle(CLIP):
    """Like OpenAI's released archives: the JIT module carries scalar tensors besides the weights."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        del self.context_length  # a plain int on CLIP; a tensor in OpenAI's archives
        self.register_buffer("input_resolution", torch.tensor(kw["image_resolution"]))
        self.register_buffer("context_length", torch.tensor(kw["context_length"]))
        self.register_buffer("vocab_size", torch.tensor(kw["vocab_size"]))


def test_openai_style_fp16_archive_loads_as_fp32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = OpenAIStyle(**TINY).eval().half()
    path = save_clip(model, tmp_path / "ViT-tiny.pt", format="openai-jit")
    sd, _ = read_torchscript(path)
    assert sd["visual.conv1.weight"].dtype == torch.float16 and "input_resolution" in sd
    loaded = load_clip(path)
    assert loaded.dtype == torch.float32
    assert sd.keys() - loaded.state_dict().keys() == {"input_resolution", "context_length", "vocab_size"}
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, model.state_dict()[k].float(), rtol=0, atol=0)
    assert load_clip(path, dtype=torch.float16).dtype == torch.float16


def test_fp16_state_dict_loads_as_fp32(tmp_path: Path) -> None:
    model = tiny_clip().half()
    save_clip(model, tmp_path / "clip.pt", format="openai")
    loaded = load_clip(tmp_path / "clip.pt")
    assert all(v.dtype == torch.float32 for v in loaded.state_dict().values())
    torch.testing.assert_close(loaded.visual.proj, model.visual.proj.float(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Refusing unsafe pickles
# ---------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, fn, arg) -> None:
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _evil_archive(path: Path, payload: object) -> Path:
    """A zip shaped like a TorchScript archive whose data.pkl holds ``payload``."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"weight": payload}, protocol=2))
        zf.writestr("archive/code/__torch__/model.py", "")
        zf.writestr("archive/version", "3\n")
    return path


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_restricted_reader_refuses_forbidden_globals(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload = _Evil(os.system, f"touch {marker}")
        expected = "system"
    else:
        payload = _Evil(eval, f"open({str(marker)!r}, 'w').close()")
        expected = "eval"  # protocol 2 names it __builtin__.eval
    path = _evil_archive(tmp_path / "evil.pt", payload)
    assert is_torchscript_archive(path)
    with pytest.raises(UnsafeCheckpointError, match=expected):
        read_torchscript(path)
    with pytest.raises(UnsafeCheckpointError):
        load_clip(path)
    assert not marker.exists()


def test_restricted_reader_refuses_global_inside_module_state(tmp_path: Path) -> None:
    """A forbidden global nested in a placeholder module's state is refused too."""
    marker = tmp_path / "pwned"
    good = tmp_path / "good.pt"
    save_clip(tiny_clip(), good, format="openai-jit")
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/data.pkl"):
                # Replace the 'training' flag of the top module by a call to os.system.
                bad = pickle.dumps(_Evil(os.system, f"touch {marker}"), protocol=2)[2:-1]  # no PROTO / STOP
                data = data.replace(b"X\x08\x00\x00\x00training", b"X\x08\x00\x00\x00training" + bad + b"0", 1)
            dst.writestr(item, data)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_torchscript(evil)
    assert not marker.exists()


def test_pickled_state_dict_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": _Evil(os.system, f"touch {marker}")}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_clip(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------
# Refusing checkpoints that do not fit
# ---------------------------------------------------------------------------------------


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    sd = tiny_clip().state_dict()
    del sd["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    sd["visual.ln_pre.bias"] = torch.zeros(65)
    sd["visual.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        load_clip(tmp_path / "bad.pt")
    msg = str(info.value)
    assert "visual.transformer.resblocks.1.mlp.c_fc.bias (512,)" in msg
    assert "visual.ln_pre.bias (65,) (expected (128,))" in msg
    assert "visual.extra.weight (3,)" in msg


def test_check_state_dict_accepts_exact_fit() -> None:
    model = tiny_clip()
    check_state_dict(model.state_dict(), model)


def test_infer_config_reads_shapes() -> None:
    model = tiny_clip(vision_layers=3, transformer_layers=1)
    cfg = infer_config(model.state_dict())
    assert cfg == model.config


def test_not_a_clip_checkpoint(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="cannot infer the CLIP architecture"):
        load_clip(tmp_path / "x.pt")


# ---------------------------------------------------------------------------------------
# open_clip and HF specifics
# ---------------------------------------------------------------------------------------


def test_open_clip_training_checkpoint(tmp_path: Path) -> None:
    model = tiny_clip(quick_gelu=False)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    sd["module.attn_mask"] = torch.zeros(8, 8)  # old open_clip saved the causal mask
    torch.save({"epoch": 3, "name": "run", "state_dict": sd}, tmp_path / "epoch_3.pt")
    with pytest.warns(UserWarning, match="heads"):  # no config beside it: the heads are guessed
        loaded = load_clip(tmp_path / "epoch_3.pt")
    assert loaded.config.quick_gelu is False  # open_clip's default activation
    assert loaded.checkpoint_format == "open_clip"
    for a, b in zip(embeddings(loaded), embeddings(model)):
        torch.testing.assert_close(a, b)
    with pytest.warns(UserWarning, match="heads"):
        assert load_clip(tmp_path / "epoch_3.pt", quick_gelu=True).config.quick_gelu is True


def test_open_clip_config_beside_file_sets_quick_gelu(tmp_path: Path) -> None:
    model = tiny_clip()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ckpt.pt")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    assert load_clip(tmp_path / "ckpt.pt").config.quick_gelu is True


def test_stale_open_clip_config_is_refused(tmp_path: Path) -> None:
    save_clip(tiny_clip(), tmp_path / "a.safetensors", format="open_clip")
    with pytest.raises(CheckpointError, match="another model"):  # writer refuses to clobber
        save_clip(tiny_clip(embed_dim=128), tmp_path / "b.safetensors", format="open_clip")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 999}}))
    with pytest.raises(CheckpointError, match="embed_dim = 999"):  # reader refuses a config that does not fit
        load_clip(tmp_path / "a.safetensors")


def test_open_clip_hub_folder(tmp_path: Path) -> None:
    model = tiny_clip(quick_gelu=False)
    save_clip(model, tmp_path / "open_clip_model.safetensors", format="open_clip")
    loaded = load_clip(tmp_path)
    assert loaded.config == model.config


# A model whose head widths are not 64 (vision 128 / 4 heads = 32, text 64 / 2 heads = 32):
# width // 64 guesses 2 and 1 heads, which load the same tensors as another model.
HEAD_WIDTH_32 = dict(vision_heads=4, transformer_heads=2, quick_gelu=False)
# Its open_clip model config, as open_clip's model_configs/<name>.json writes one.
OPEN_CLIP_MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2},
}
# The same as open_clip's hub open_clip_config.json.
OPEN_CLIP_HUB_CFG = {"model_cfg": OPEN_CLIP_MODEL_CFG,
                     "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}


def save_bare_open_clip(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """safetensors with OpenAI names and no open_clip_config.json: what a user may download alone."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_open_clip_without_config_warns_once_and_guesses_heads(tmp_path: Path) -> None:
    model = tiny_clip(**HEAD_WIDTH_32)
    path = save_bare_open_clip(model.state_dict(), tmp_path / "m.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_clip(path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(path) in message and "--clip-config" in message
    assert "2 vision heads for width 128, 1 text heads for width 64" in message
    assert loaded.visual.transformer.resblocks[0].attn.heads == 2 and loaded.transformer.resblocks[0].attn.heads == 1
    for a, b in zip(embeddings(loaded), embeddings(model)):  # same tensors, another model
        assert not torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("form", ["model_configs", "hub"])
@pytest.mark.parametrize("as_file", [True, False], ids=["file", "dict"])
def test_open_clip_config_gives_the_heads(tmp_path: Path, form: str, as_file: bool) -> None:
    model = tiny_clip(**HEAD_WIDTH_32)
    path = save_bare_open_clip(model.state_dict(), tmp_path / "m.safetensors")
    cfg = OPEN_CLIP_MODEL_CFG if form == "model_configs" else OPEN_CLIP_HUB_CFG
    if as_file:
        (tmp_path / "ViT-tiny.json").write_text(json.dumps(cfg))
        cfg = tmp_path / "ViT-tiny.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # heads given: no warning
        loaded = load_clip(path, config=cfg)
    assert_same_model(loaded, model)


def test_given_config_wins_over_the_one_beside_the_file(tmp_path: Path) -> None:
    model = tiny_clip(**HEAD_WIDTH_32)
    path = save_bare_open_clip(model.state_dict(), tmp_path / "m.safetensors")
    stale = {"model_cfg": {**OPEN_CLIP_MODEL_CFG, "vision_cfg": {"width": 128, "head_width": 64}}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(stale))
    assert load_clip(path).visual.transformer.resblocks[0].attn.heads == 2  # the sidecar's
    assert_same_model(load_clip(path, config=OPEN_CLIP_MODEL_CFG), model)


def test_openai_formats_keep_their_convention_without_a_warning(tmp_path: Path) -> None:
    model = tiny_clip()
    save_clip(model, tmp_path / "flat.pt", format="openai")
    save_clip(model, tmp_path / "jit.pt", format="openai-jit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("flat.pt", "jit.pt"):
            assert_same_model(load_clip(tmp_path / name), model)


def test_build_errors_say_the_heads_were_guessed(tmp_path: Path) -> None:
    sd = tiny_clip().state_dict()
    del sd["visual.ln_post.bias"]
    path = save_bare_open_clip(sd, tmp_path / "m.safetensors")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as info:
        load_clip(path)
    assert "visual.ln_post.bias" in str(info.value) and "heads were guessed" in str(info.value)


def _with(cfg: dict, section: str | None, key: str, value) -> dict:
    out = json.loads(json.dumps(cfg))
    (out if section is None else out[section])[key] = value
    return out


@pytest.mark.parametrize("cfg, field", [
    (_with(OPEN_CLIP_MODEL_CFG, "vision_cfg", "layers", 3), "vision_cfg.layers = 3 but the weights have 2"),
    (_with(OPEN_CLIP_MODEL_CFG, "vision_cfg", "patch_size", 14), "vision_cfg.patch_size = 14"),
    (_with(OPEN_CLIP_MODEL_CFG, "vision_cfg", "image_size", 224), "vision_cfg.image_size = 224"),
    (_with(OPEN_CLIP_MODEL_CFG, "vision_cfg", "width", 768), "vision_cfg.width = 768"),
    (_with(OPEN_CLIP_MODEL_CFG, "text_cfg", "width", 512), "text_cfg.width = 512"),
    (_with(OPEN_CLIP_MODEL_CFG, "text_cfg", "layers", 12), "text_cfg.layers = 12"),
    (_with(OPEN_CLIP_MODEL_CFG, "text_cfg", "context_length", 77), "text_cfg.context_length = 77"),
    (_with(OPEN_CLIP_MODEL_CFG, None, "embed_dim", 512), "embed_dim = 512"),
    (_with(OPEN_CLIP_MODEL_CFG, "vision_cfg", "head_width", "32"), "vision_cfg.head_width = '32'"),
    (_with(OPEN_CLIP_MODEL_CFG, "vision_cfg", "head_width", 48), "vision_cfg.head_width = 48 does not divide"),
    (_with(OPEN_CLIP_MODEL_CFG, "text_cfg", "heads", 0), "text_cfg.heads = 0"),
    (_with(OPEN_CLIP_MODEL_CFG, None, "quick_gelu", "yes"), "quick_gelu = 'yes'"),
    (_with(OPEN_CLIP_MODEL_CFG, None, "vision_cfg", [128]), "vision_cfg = [128]"),
    ({"model_cfg": _with(OPEN_CLIP_MODEL_CFG, "vision_cfg", "layers", 3)}, "model_cfg.vision_cfg.layers = 3"),
    ({**OPEN_CLIP_HUB_CFG, "preprocess_cfg": {"mean": [0.5, 0.5]}}, "preprocess_cfg.mean = [0.5, 0.5]"),
    ({"architecture": "ViT-B-16"}, "not an open_clip config"),
])
def test_a_config_that_does_not_fit_is_refused_naming_file_and_field(tmp_path: Path, cfg: dict, field: str) -> None:
    path = save_bare_open_clip(tiny_clip(**HEAD_WIDTH_32).state_dict(), tmp_path / "m.safetensors")
    (tmp_path / "ViT-tiny.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=re.escape(field)) as info:
        load_clip(path, config=tmp_path / "ViT-tiny.json")
    assert str(tmp_path / "ViT-tiny.json") in str(info.value)


def test_a_config_file_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = save_bare_open_clip(tiny_clip().state_dict(), tmp_path / "m.safetensors")
    (tmp_path / "bad.json").write_text("embed_dim: 64\n")  # YAML, not JSON
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read {tmp_path / 'bad.json'} as JSON")):
        load_clip(path, config=tmp_path / "bad.json")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_clip(path, config=tmp_path / "missing.json")


def test_an_open_clip_config_is_refused_for_a_hf_folder(tmp_path: Path) -> None:
    folder = save_clip(tiny_clip(), tmp_path / "hf", format="hf")
    with pytest.raises(CheckpointError, match="Hugging Face"):
        load_clip(folder, config=OPEN_CLIP_MODEL_CFG)


def test_hf_roundtrip_pure() -> None:
    model = tiny_clip(vision_heads=4)
    hf_sd, hf_config = to_hf(model.state_dict(), model.config)
    assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in hf_sd
    assert hf_config["text_config"]["eos_token_id"] == TINY["vocab_size"] - 1
    back = from_hf(hf_sd, hf_config)
    assert back.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k


def test_hf_weights_file_needs_config(tmp_path: Path) -> None:
    save_clip(tiny_clip(), tmp_path / "hf", format="hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "lonely.safetensors")
    with pytest.raises(CheckpointError, match="config.json"):
        load_clip(tmp_path / "lonely.safetensors")


def test_hf_unsupported_settings_refused(tmp_path: Path) -> None:
    path = save_clip(tiny_clip(), tmp_path / "hf", format="hf")
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_config"]["layer_norm_eps"] = 1e-6
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="layer_norm_eps"):
        load_clip(path)


def test_from_open_clip_unwraps() -> None:
    sd = tiny_clip().state_dict()
    out = from_open_clip({"state_dict": {f"module.{k}": v for k, v in sd.items()}})
    assert out.keys() == sd.keys()


# ---------------------------------------------------------------------------------------
# Names and downloads (no network: urlopen is monkeypatched)
# ---------------------------------------------------------------------------------------


def test_available_models() -> None:
    assert available_models() == ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
    for weights in OPENAI_MODELS.values():
        assert weights.url.split("/")[-2] == weights.sha256 and len(weights.sha256) == 64


def test_unknown_name_lists_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_clip("ViT-X/99")
    for name in available_models():
        assert name in str(info.value)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "clip"
    monkeypatch.delenv("RECLIP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "reclip" / "clip"


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable")


def test_named_model_offline_gives_instructions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.cache/clip copy either
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    with pytest.raises(CheckpointError) as info:
        load_clip("ViT-B/16")
    msg = str(info.value)
    assert OPENAI_MODELS["ViT-B/16"].url in msg and "--clip" in msg and "ViT-B-16.pt" in msg
    assert OPENAI_MODELS["ViT-B/16"].sha256 in msg
    assert list((tmp_path / "cache" / "clip").iterdir()) == []  # no partial file left


class _FakeResponse(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_download_verifies_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_clip()
    archive = save_clip(model, tmp_path / "src" / "ViT-B-16.pt", format="openai-jit").read_bytes()
    sha = hashlib.sha256(archive).hexdigest()
    url = f"https://example.invalid/clip/models/{sha}/ViT-B-16.pt"
    monkeypatch.setitem(OPENAI_MODELS, "ViT-B/16", PretrainedWeights(url, sha))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    requested = []

    def serve(request_url, timeout=None):
        requested.append(request_url)
        return _FakeResponse(archive)

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    cache = tmp_path / "cache"
    loaded = load_clip("ViT-B/16", cache_dir=cache)
    assert requested == [url]
    assert loaded.spec == "ViT-B/16" and loaded.config.quick_gelu is True
    assert_same_model(loaded, model)
    assert sorted(p.name for p in cache.iterdir()) == ["ViT-B-16.pt"]

    monkeypatch.setattr(urllib.request, "urlopen", _no_network)  # cached: no second download
    assert load_clip("ViT-B/16", cache_dir=cache).config == model.config


def test_download_sha256_mismatch_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(OPENAI_MODELS, "ViT-B/16", PretrainedWeights("https://example.invalid/a/ViT-B-16.pt", "0" * 64))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(b"not the weights"))
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="sha256"):
        load_clip("ViT-B/16", cache_dir=cache)
    assert list(cache.iterdir()) == []  # the bad download was removed, nothing looks complete


def test_read_checkpoint_reports_format(tmp_path: Path) -> None:
    save_clip(tiny_clip(), tmp_path / "m.safetensors", format="open_clip")
    ckpt = read_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.format == "open_clip" and ckpt.quick_gelu is True  # from the config written beside it


def test_save_clip_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="openai-jit"):
        save_clip(tiny_clip(), tmp_path / "x", format="onnx")


def test_hf_folder_with_pytorch_model_bin(tmp_path: Path) -> None:
    model = tiny_clip()
    folder = save_clip(model, tmp_path / "hf", format="hf")
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert_same_model(load_clip(folder), model)


def test_unreadable_files_raise_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_clip(tmp_path / "bad.safetensors")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_clip(tmp_path / "bad.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_clip(tmp_path / "empty")


def test_fingerprint_tells_apart_the_activation_of_identical_weights(tmp_path):
    quick = shared_tiny_clip(quick_gelu=True)
    gelu = shared_tiny_clip(quick_gelu=False)
    gelu.load_state_dict(quick.state_dict())
    assert weights_fingerprint(quick) != weights_fingerprint(gelu)
    path = save_clip(quick, tmp_path / "w.pt", format="openai")
    assert weights_fingerprint(load_clip(path)) != weights_fingerprint(load_clip(path, quick_gelu=False))


def test_open_clip_big_towers_get_their_16_heads_not_width_over_64():
    from reclip.clip.convert import infer_config

    sd = CLIP(32, 28, 1, 1280, 14, 77, 49408, 64, 1, 1).to("meta").state_dict()
    assert infer_config(sd).vision_heads == 16  # ViT-H/14: head width 80
    sd = CLIP(32, 28, 1, 768, 14, 77, 49408, 64, 1, 1).to("meta").state_dict()
    assert infer_config(sd).vision_heads is None  # 768 // 64 = 12, the canonical default
