"""Hostile or broken weights files: every refusal is a CheckpointError at load time naming the file.

Three classes (issue "Reliability", items 3, 4, 5b), each over every format:

- A: NaN / Inf in any tensor (a CLIP, or a trained head's run weights);
- B: missing / misshapen tensors, forbidden pickle globals, nonsense config values;
- C: files that declare more than they hold (zip bombs, stride-0 views, lying headers):
  refused from what they declare, before anything is read or allocated. The files here
  are a few KB and CLAIM GiBs; nothing large is ever allocated.
"""

from __future__ import annotations

import collections
import json
import pickle
import re
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny import tiny_clip as shared_tiny_clip
from reclip.clip import checks
from reclip.clip.checks import check_finite, check_tensor_bounds, check_view
from reclip.clip.convert import CheckpointError, from_hf, to_hf
from reclip.clip.load import load_clip, read_checkpoint, save_clip
from reclip.clip.torchscript import UnsafeCheckpointError, read_torchscript

GiB = 1 << 30
# Small files: a short vocabulary and context (as test_clip_load).
TINY = dict(embed_dim=64, image_resolution=32, vision_layers=1, vision_width=128, vision_patch_size=16,
            context_length=8, vocab_size=100, transformer_width=64, transformer_heads=1, transformer_layers=1)
FORMATS = [("openai", "clip.pt"), ("openai-jit", "clip.pt"), ("open_clip", "clip.safetensors"), ("hf", "clip_hf")]


def tiny_clip(seed: int = 0, **overrides):
    return shared_tiny_clip(seed, perturb=0.02, **{**TINY, **overrides})


def weights_file(path: Path) -> Path:
    """The file a format's weights are in (a HF folder's model.safetensors)."""
    return path / "model.safetensors" if path.is_dir() else path


# ---------------------------------------------------------------------------------------
# Crafted files: pickles that declare storages and views, zips whose headers claim sizes
# ---------------------------------------------------------------------------------------


class Storage:
    """A storage a crafted pickle names by persistent id (its bytes are a zip record or follow the pickle)."""

    def __init__(self, key: str, numel: int, storage_type: type = torch.FloatStorage) -> None:
        self.key, self.numel, self.storage_type = key, numel, storage_type


class View:
    """A tensor a crafted pickle rebuilds as torch does: _rebuild_tensor_v2(storage, offset, size, stride)."""

    def __init__(self, storage: Storage, size: tuple, stride: tuple, offset: int = 0) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def crafted_pickle(obj: object, legacy: bool = False) -> bytes:
    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, Storage):
                pid = ("storage", o.storage_type, o.key, "cpu", o.numel)
                return (*pid, None) if legacy else pid
            return None

    out = __import__("io").BytesIO()
    Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def crafted_zip(path: Path, obj: object, records: dict[str, bytes], torchscript: bool = False,
                compress: int = zipfile.ZIP_STORED) -> Path:
    """A torch.save-shaped zip (a TorchScript archive with ``torchscript``) holding ``obj``'s pickle."""
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        zf.writestr("archive/data.pkl", crafted_pickle(obj), compress_type=zipfile.ZIP_STORED)
        for key, data in records.items():
            zf.writestr(f"archive/data/{key}", data)
        if torchscript:
            zf.writestr("archive/code/__torch__/model.py", "")
        zf.writestr("archive/version", "3\n")
    return path


def claim_size(path: Path, name: str, size: int) -> None:
    """Patch the zip's headers so that record ``name`` declares ``size`` uncompressed bytes."""
    data = bytearray(path.read_bytes())
    encoded = name.encode()
    for signature, size_at, name_at in ((b"PK\x01\x02", 24, 46), (b"PK\x03\x04", 22, 30)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            if data[start + name_at:start + name_at + len(encoded)] == encoded:
                struct.pack_into("<I", data, start + size_at, size)
            start += 4
    path.write_bytes(bytes(data))


def crafted_legacy(path: Path, obj: object, storages: dict[str, bytes]) -> Path:
    """torch's legacy (non-zip) format: magic, protocol, system info, the object, its keys, the storages."""
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(crafted_pickle(obj, legacy=True))
        pickle.dump(list(storages), f, protocol=2)
        for data in storages.values():
            f.write(struct.pack("<q", len(data) // 4) + data)
    return path


def safetensors_file(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.fixture
def no_record_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fails a test that opens a zip record other than metadata (data.pkl, byteorder, version) before refusing."""
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def guarded(self, name, mode="r", *args, **kwargs):
        filename = name.filename if isinstance(name, zipfile.ZipInfo) else name
        if mode == "r":
            opened.append(filename)
            assert "/data/" not in filename, f"read {filename} before refusing the archive"
        return real_open(self, name, mode, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", guarded)
    return opened


# ---------------------------------------------------------------------------------------
# A: weights that are not finite
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,name", FORMATS)
def test_nan_or_inf_weights_are_refused_in_every_format(tmp_path: Path, fmt: str, name: str) -> None:
    model = tiny_clip()
    with torch.no_grad():
        model.visual.proj[0, :3] = float("nan")
        model.ln_final.weight[5] = float("inf")
        model.transformer.resblocks[0].attn.in_proj_bias[0] = -float("inf")
    path = save_clip(model, tmp_path / name, format=fmt)
    with pytest.raises(CheckpointError) as info:
        load_clip(path)
    msg = str(info.value)
    assert str(weights_file(path)) in msg
    assert "3 of " in msg and "NaN or infinite" in msg
    assert "visual.proj (128, 64): 3 NaN" in msg and "ln_final.weight (64,): 1 Inf" in msg
    assert "transformer.resblocks.0.attn.in_proj_bias" in msg


def test_fp16_overflow_is_refused(tmp_path: Path) -> None:
    model = tiny_clip()
    with torch.no_grad():
        model.logit_scale.fill_(1e6)  # inf once cast to float16
    path = save_clip(model.half(), tmp_path / "clip.pt", format="openai")
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: 1 of ")):
        load_clip(path)


def test_check_finite_names_a_few_tensors_and_counts_them() -> None:
    tensors = {f"t{i}": torch.full((2,), float("nan")) for i in range(7)}
    tensors["ids"] = torch.arange(3)  # integers: skipped
    tensors["ok"] = torch.ones(2)
    with pytest.raises(CheckpointError) as info:
        check_finite(tensors, "weights.bin")
    msg = str(info.value)
    assert msg.startswith("weights.bin: 7 of 9 tensors") and "t0 (2,): 2 NaN" in msg and "and 2 more" in msg
    check_finite({"ok": torch.ones(3), "empty": torch.empty(0)}, "x")


def test_a_run_with_nan_weights_is_refused_naming_its_file(tmp_path: Path) -> None:
    from reclip.train.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_run, save_weights

    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_NAME).write_text(json.dumps({"method": "x"}))
    save_weights({"head.weight": torch.tensor([[1.0, float("nan")]]), "head.bias": torch.zeros(1)}, run / WEIGHTS_NAME)
    with pytest.raises(CheckpointError) as info:
        load_run(run)
    msg = str(info.value)
    assert str(run / WEIGHTS_NAME) in msg and "head.weight (1, 2): 1 NaN" in msg and "diverged" in msg
    (run / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")  # header longer than the file
    with pytest.raises(CheckpointError, match=re.escape(str(run / WEIGHTS_NAME))):
        load_run(run)


# ---------------------------------------------------------------------------------------
# B: every refusal names the file
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,name", FORMATS)
def test_missing_and_misshapen_tensors_name_the_file_in_every_format(tmp_path: Path, fmt: str, name: str) -> None:
    model = tiny_clip()
    path = save_clip(model, tmp_path / name, format=fmt)
    target = weights_file(path)
    if fmt == "openai-jit":  # an archive cannot be edited tensor by tensor: write the same tensors as a state dict
        target = tmp_path / "edited.pt"
    sd = load_file(target) if target.suffix == ".safetensors" else dict(model.state_dict())
    drop = "vision_model.post_layernorm.bias" if fmt == "hf" else "visual.ln_post.bias"
    grow = "text_model.final_layer_norm.bias" if fmt == "hf" else "ln_final.bias"
    del sd[drop]
    sd[grow] = torch.zeros(65)
    if target.suffix == ".safetensors":
        save_file(sd, str(target))
    else:
        torch.save(sd, target)
    load_from = path if fmt == "hf" else target
    with pytest.raises(CheckpointError) as info:
        load_clip(load_from)
    msg = str(info.value)
    assert str(load_from) in msg and "visual.ln_post.bias" in msg and "(65,)" in msg


@pytest.mark.parametrize("key, value, expected", [
    ("visual.proj", 3, "checkpoint entry 'visual.proj' is int, expected a tensor"),
    (7, torch.zeros(1), "checkpoint key 7 is int, expected a tensor name (str)"),
    ("token_embedding.weight", torch.zeros(100, 64, dtype=torch.long), "token_embedding.weight torch.int64 (expected "
     "floating point)"),
    ("visual.proj", torch.zeros(128, 64, dtype=torch.complex64), "visual.proj torch.complex64 (expected floating"),
])
def test_entries_that_are_not_float_tensors_name_the_file(tmp_path: Path, key, value, expected) -> None:
    sd = dict(tiny_clip().state_dict())
    sd[key] = value
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'm.pt'}: ") + ".*" + re.escape(expected)):
        load_clip(tmp_path / "m.pt")


@pytest.mark.parametrize("key, value, expected", [
    ("text_projection", torch.zeros(()), "text_projection has shape (), expected (width, embed_dim)"),
    ("visual.conv1.weight", torch.zeros(0, 3, 16, 16), "visual.conv1.weight has shape (0, 3, 16, 16)"),
    ("visual.positional_embedding", torch.zeros(1, 128), "visual.positional_embedding has 1 rows"),
])
def test_tensors_that_cannot_give_an_architecture_name_file_and_tensor(tmp_path: Path, key, value, expected) -> None:
    sd = dict(tiny_clip().state_dict())
    sd[key] = value
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(CheckpointError) as info:
        load_clip(tmp_path / "m.pt")
    assert str(tmp_path / "m.pt") in str(info.value) and expected in str(info.value)


def test_a_tower_without_blocks_is_refused(tmp_path: Path) -> None:
    sd = {k: v for k, v in tiny_clip().state_dict().items() if not k.startswith("transformer.resblocks.")}
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="no transformer.resblocks.N"):
        load_clip(tmp_path / "m.pt")


def test_a_forbidden_global_names_the_archive(tmp_path: Path) -> None:
    import os

    class Evil:
        def __reduce__(self):
            return os.system, ("true",)

    path = crafted_zip(tmp_path / "evil.pt", {"w": Evil()}, {}, torchscript=True)
    for read in (read_torchscript, load_clip):
        with pytest.raises(UnsafeCheckpointError, match=re.escape(str(path)) + ".*system"):
            read(path)


def test_an_archive_config_that_is_not_an_object_names_the_archive(tmp_path: Path) -> None:
    path = tmp_path / "clip.pt"
    save_clip(tiny_clip(), path, format="openai-jit")
    edited = tmp_path / "edited.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(edited, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, b"[1, 2]" if item.filename.endswith("open_clip_config.json") else src.read(item))
    with pytest.raises(CheckpointError, match=re.escape(str(edited)) + ".*holds list, expected a JSON object"):
        load_clip(edited)


def _edit(cfg: dict, where: str, value) -> dict:
    """``cfg`` with the dotted field ``where`` set to ``value`` (``...`` deletes it)."""
    out = json.loads(json.dumps(cfg))
    *parents, last = where.split(".")
    node = out
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return out


HF_NONSENSE = [
    ("vision_config.num_attention_heads", -2, "vision_config.num_attention_heads = -2, expected a positive integer"),
    ("vision_config.num_attention_heads", 2.5, "vision_config.num_attention_heads = 2.5, expected a positive integer"),
    ("text_config.num_attention_heads", "1", "text_config.num_attention_heads = '1', expected a positive integer"),
    ("text_config.num_attention_heads", 3, "text_config.num_attention_heads = 3 does not divide the width 64"),
    ("vision_config.hidden_size", 100, "vision_config.hidden_size = 100 but the weights have 128"),
    ("vision_config.hidden_size", -128, "vision_config.hidden_size = -128, expected a positive integer"),
    ("vision_config.num_hidden_layers", 0, "vision_config.num_hidden_layers = 0, expected a positive integer"),
    ("text_config.num_hidden_layers", 1.0, "text_config.num_hidden_layers = 1.0, expected a positive integer"),
    ("vision_config.image_size", [32, 32], "vision_config.image_size = [32, 32], expected a positive integer"),
    ("vision_config.patch_size", 8, "vision_config.patch_size = 8 but the weights have 16"),
    ("text_config.max_position_embeddings", 77, "text_config.max_position_embeddings = 77 but the weights have 8"),
    ("text_config.vocab_size", "100", "text_config.vocab_size = '100', expected a positive integer"),
    ("text_config.intermediate_size", 100, "text_config.intermediate_size = 100 but the weights have 256"),
    ("projection_dim", 1.5, "projection_dim = 1.5, expected a positive integer"),
    ("projection_dim", 32, "projection_dim = 32 but the weights have 64"),
    ("vision_config", "big", "vision_config = 'big' is str, expected a JSON object"),
    ("text_config", [1, 2], "text_config = [1, 2] is list, expected a JSON object"),
    ("text_config", ..., "has no text_config section"),
    ("vision_config", ..., "has no vision_config section"),
    ("vision_config.hidden_act", ["gelu"], "vision_config.hidden_act = ['gelu']; supported"),
    ("vision_config.hidden_act", "relu", "vision_config.hidden_act = 'relu'; supported"),
    ("text_config.layer_norm_eps", "1e-5", "text_config.layer_norm_eps = '1e-5', expected 1e-05"),
    ("model_type", ["clip"], "model_type = ['clip'], expected 'clip'"),
]


@pytest.mark.parametrize("field, value, expected", HF_NONSENSE, ids=[f"{f}={v!r}" for f, v, _ in HF_NONSENSE])
def test_hf_config_nonsense_is_refused_naming_file_field_and_value(tmp_path: Path, field, value, expected) -> None:
    folder = save_clip(tiny_clip(), tmp_path / "hf", format="hf")
    config = folder / "config.json"
    config.write_text(json.dumps(_edit(json.loads(config.read_text()), field, value)))
    with pytest.raises(CheckpointError) as info:
        load_clip(folder)
    assert str(config) in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize("field, value, expected", [
    ("image_mean", [0.5, 0.5], "image_mean = [0.5, 0.5], expected 3 finite numbers"),
    ("image_mean", "0.5", "image_mean = '0.5', expected 3 finite numbers"),
    ("image_std", [0.5, 0.0, 0.5], "image_std = [0.5, 0.0, 0.5], expected 3 positive numbers"),
    ("image_std", [0.5, float("nan"), 0.5], "image_std = [0.5, nan, 0.5], expected 3 positive numbers"),
])
def test_hf_preprocessor_nonsense_is_refused_at_load(tmp_path: Path, field, value, expected) -> None:
    folder = save_clip(tiny_clip(), tmp_path / "hf", format="hf")
    pre = folder / "preprocessor_config.json"
    pre.write_text(json.dumps({**json.loads(pre.read_text()), field: value}))
    with pytest.raises(CheckpointError) as info:
        load_clip(folder)
    assert f"{pre}: " in str(info.value) and expected in str(info.value)


def test_hf_qkv_of_different_shapes_are_named_not_concatenated(tmp_path: Path) -> None:
    folder = save_clip(tiny_clip(), tmp_path / "hf", format="hf")
    sd = load_file(folder / "model.safetensors")
    sd["vision_model.encoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 128)
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_clip(folder)
    msg = str(info.value)
    assert str(folder) in msg and "self_attn.k_proj.weight (64, 128)" in msg and "differ in shape" in msg


def test_hf_projection_of_the_wrong_rank_is_named() -> None:
    model = tiny_clip()
    sd, cfg = to_hf(model.state_dict(), model.config)
    sd["visual_projection.weight"] = torch.zeros(2, 2, 2)
    with pytest.raises(CheckpointError, match=r"visual_projection.weight has shape \(2, 2, 2\)"):
        from_hf(sd, cfg)


def test_hf_shard_index_is_checked(tmp_path: Path) -> None:
    folder = save_clip(tiny_clip(), tmp_path / "hf", format="hf")
    (folder / "model.safetensors").rename(folder / "shard-1.safetensors")
    index = folder / "model.safetensors.index.json"
    keys = list(load_file(folder / "shard-1.safetensors"))
    for weight_map, expected in [
        (["shard-1.safetensors"], "weight_map = ['shard-1.safetensors'], expected a JSON object"),
        ({k: "../../etc/passwd" for k in keys}, "shard '../../etc/passwd' is not a file name"),
        ({k: "shard-2.safetensors" for k in keys}, "shard shard-2.safetensors does not exist"),
    ]:
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=re.escape(f"{index}: {expected}")):
            load_clip(folder)
    index.write_text(json.dumps({"weight_map": {k: "shard-1.safetensors" for k in keys}}))
    load_clip(folder)


def test_a_config_file_claiming_a_huge_size_is_not_read(tmp_path: Path) -> None:
    folder = save_clip(tiny_clip(), tmp_path / "hf", format="hf")
    with open(folder / "config.json", "r+b") as f:
        f.truncate(checks.MAX_JSON_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(CheckpointError, match="more than the 16.0 MiB a config ever needs"):
        load_clip(folder)


# ---------------------------------------------------------------------------------------
# C: resource bounds, checked before anything is read or allocated
# ---------------------------------------------------------------------------------------


def test_check_view_accepts_what_state_dicts_hold() -> None:
    base = torch.zeros(6, 8)
    for t in (base, base.t(), base[2:4], base[:, 1:3], *base.chunk(3), base.unsqueeze(0).expand(1, 6, 8),
              torch.arange(77).expand(1, -1)):  # HF's old position_ids buffer: (1, 77) with stride (0, 1)
        check_view(t.storage_offset(), t.shape, t.stride(), base.numel() if t.dtype == base.dtype else 77, "t")


@pytest.mark.parametrize("size, stride, offset, storage, expected", [
    ((1 << 32,), (0,), 0, 1, "reads stored elements more than once"),  # expand: 16 GiB from 4 bytes
    ((3, 3), (1, 1), 0, 9, "reads stored elements more than once"),  # overlapping rows
    ((4, 4), (4, 1), 1, 16, "ends at element 17 but its storage holds 16"),
    ((2,), (1, 1), 0, 4, "is not a tensor view"),
    ((-1,), (1,), 0, 4, "is not a tensor view"),
    ((2,), (1,), "0", 4, "is not a tensor view"),
])
def test_check_view_refuses_expanded_overlapping_and_overrunning_views(size, stride, offset, storage, expected):
    with pytest.raises(CheckpointError, match=expected):
        check_view(offset, size, stride, storage, "t")


def test_check_tensor_bounds_refuses_an_expanded_tensor_without_copying_it() -> None:
    huge = torch.zeros(1).expand(1 << 34)  # 64 GiB if copied; a view costs nothing
    with pytest.raises(CheckpointError, match=re.escape("m.pt: tensor x: size (17179869184,), stride (0,)")):
        check_tensor_bounds({"x": huge}, "m.pt")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_stride0_tensor_in_a_state_dict_is_refused_before_torch_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, legacy: bool
) -> None:
    """The tester's case: a small file whose token embedding expands to 16 GiB of float32."""
    sd = dict(tiny_clip().state_dict())
    sd["token_embedding.weight"] = torch.zeros(1, 64).expand(1 << 26, 64)
    path = tmp_path / "m.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    assert path.stat().st_size < 4 << 20
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran before the scan refused"))
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*size \\(67108864, 64\\), stride \\(0, 1\\)"):
        load_clip(path)


@pytest.mark.parametrize("tensor, expected", [
    (torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), (1 << 20, 1 << 20), check_invariants=True),
     "torch.sparse_coo tensor on cpu"),  # 4 TiB once dense
    (torch.empty(1 << 20, 1 << 20, device="meta"), "torch.strided tensor on meta"),  # no data at all
])
def test_sparse_and_meta_tensors_are_refused(tmp_path: Path, tensor: torch.Tensor, expected: str) -> None:
    sd = dict(tiny_clip().state_dict())
    sd["visual.proj"] = tensor
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'm.pt'}: tensor visual.proj is a {expected}")):
        load_clip(tmp_path / "m.pt")


def test_an_expanded_hf_projection_is_refused_before_transposing_it(tmp_path: Path) -> None:
    folder = save_clip(tiny_clip(), tmp_path / "hf", format="hf")
    sd = load_file(folder / "model.safetensors")
    sd["visual_projection.weight"] = torch.zeros(1, 1).expand(1 << 17, 1 << 17)  # 64 GiB if made contiguous
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="reads stored elements more than once"):
        load_clip(folder)


def test_a_torchscript_zip_bomb_is_refused_before_any_record_is_read(tmp_path: Path, no_record_reads) -> None:
    """~KB archive whose record declares 1 GiB (the tester's was 14 MB deflating to 1 GiB)."""
    storage = Storage("0", GiB // 4)
    path = crafted_zip(tmp_path / "bomb.pt", {"w": View(storage, (GiB // 4,), (1,))}, {"0": b"\0" * 4096},
                       torchscript=True, compress=zipfile.ZIP_DEFLATED)
    claim_size(path, "archive/data/0", GiB)
    assert zipfile.ZipFile(path).getinfo("archive/data/0").file_size == GiB and path.stat().st_size < 4096
    for read in (read_torchscript, load_clip):
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*declare 1.0 GiB uncompressed.*zip bomb"):
            read(path)


def test_a_torch_zip_bomb_is_refused_before_any_record_is_read(tmp_path: Path, no_record_reads) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(1024)}, path)
    with zipfile.ZipFile(path) as zf:
        record = next(n for n in zf.namelist() if "/data/" in n)
    claim_size(path, record, GiB)
    with pytest.raises(CheckpointError, match="zip bomb"):
        load_clip(path)


@pytest.mark.parametrize("torchscript", [True, False], ids=["torchscript", "torch.save"])
def test_a_record_must_declare_what_its_tensor_needs(tmp_path: Path, no_record_reads, torchscript: bool) -> None:
    storage = Storage("0", 1 << 20)  # 4 MiB of float32 declared by the pickle; the record holds 16 bytes
    path = crafted_zip(tmp_path / "m.pt", {"w": View(storage, (1 << 20,), (1,))}, {"0": b"\0" * 16},
                       torchscript=torchscript)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*declares 16 bytes but its tensor metadata "
                       "needs 4194304"):
        read_checkpoint(path)


@pytest.mark.parametrize("torchscript", [True, False], ids=["torchscript", "torch.save"])
def test_a_stride0_view_in_a_zip_is_refused_before_it_is_built(tmp_path: Path, torchscript: bool) -> None:
    storage = Storage("0", 4)
    path = crafted_zip(tmp_path / "m.pt", {"w": View(storage, (1 << 32,), (0,))}, {"0": b"\0" * 16},
                       torchscript=torchscript)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*reads stored elements more than once"):
        read_checkpoint(path)
    path = crafted_zip(tmp_path / "n.pt", {"w": View(storage, (8,), (1,))}, {"0": b"\0" * 16}, torchscript=torchscript)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*ends at element 8 but its storage holds 4"):
        read_checkpoint(path)


def test_a_legacy_file_declaring_more_than_it_holds_is_refused(tmp_path: Path, monkeypatch) -> None:
    storage = Storage("1", GiB // 4)
    path = crafted_legacy(tmp_path / "m.pt", {"w": View(storage, (GiB // 4,), (1,))}, {"1": b"\0" * 16})
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran before the scan refused"))
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": its pickle declares 1 storages of "
                       f"{GiB} bytes in all but only 24 bytes follow it"):
        load_clip(path)


def test_a_repacked_torch_file_with_compressed_records_is_refused(tmp_path: Path) -> None:
    torch.save(dict(tiny_clip().state_dict()), tmp_path / "m.pt")
    with zipfile.ZipFile(tmp_path / "m.pt") as src, \
            zipfile.ZipFile(tmp_path / "zipped.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item))
    with pytest.raises(CheckpointError, match="is compressed .*zip -0"):
        load_clip(tmp_path / "zipped.pt")


def test_a_deflated_torchscript_archive_still_loads(tmp_path: Path) -> None:
    """Weights barely compress: an archive re-zipped with deflate is far from the bomb ratio."""
    model = tiny_clip()
    save_clip(model, tmp_path / "jit.pt", format="openai-jit")
    with zipfile.ZipFile(tmp_path / "jit.pt") as src, \
            zipfile.ZipFile(tmp_path / "zipped.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item))
    loaded = load_clip(tmp_path / "zipped.pt")
    torch.testing.assert_close(loaded.visual.proj, model.visual.proj, rtol=0, atol=0)


def test_legacy_and_training_checkpoints_still_load(tmp_path: Path) -> None:
    model = tiny_clip()
    torch.save(dict(model.state_dict()), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.testing.assert_close(load_clip(tmp_path / "legacy.pt").visual.proj, model.visual.proj, rtol=0, atol=0)
    opt = torch.optim.AdamW(model.parameters())
    model.encode_image(torch.randn(1, 3, 32, 32)).sum().backward()
    opt.step()
    torch.save({"epoch": 1, "state_dict": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "epoch_1.pt")
    with pytest.warns(UserWarning, match="heads"):
        loaded = load_clip(tmp_path / "epoch_1.pt", quick_gelu=True)
    torch.testing.assert_close(loaded.visual.proj, model.visual.proj.detach(), rtol=0, atol=0)


def test_the_limit_counts_what_is_copied_not_an_optimizer_state_left_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_clip()
    opt = torch.optim.AdamW(model.parameters())
    model.encode_image(torch.randn(1, 3, 32, 32)).sum().backward()
    opt.step()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    sd_bytes = sum(v.numel() * v.element_size() for v in state.values())
    ckpt = {"epoch": 1, "state_dict": state, "optimizer": opt.state_dict()}  # ~3x the weights
    torch.save(ckpt, tmp_path / "epoch_1.pt")
    torch.save(ckpt, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    monkeypatch.setattr(checks, "MAX_CHECKPOINT_BYTES", int(1.5 * sd_bytes))
    with pytest.warns(UserWarning, match="heads"):
        load_clip(tmp_path / "epoch_1.pt")  # memory-mapped: only the state dict is copied
    with pytest.raises(CheckpointError, match="its storages would take .* over the limit"):
        load_clip(tmp_path / "legacy.pt")  # the legacy format reads every storage


@pytest.mark.parametrize("header, data, expected", [
    ({"w": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 16]}}, 16,
     "tensor w (F32 (1073741824,)) needs 4294967296 bytes but its offsets [0, 16] span 16"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 30]}}, 16,
     "tensor w declares shape [4] at bytes [0, 1073741824]; expected non-negative integer dims and 0 <= begin <= end <= 16"),
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, 16, "tensor w declares shape [-4]"),
    ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, 16, "tensor w has dtype 'Q4'"),
    ({"w": [1, 2]}, 16, "tensor w has dtype None"),
])
def test_safetensors_headers_are_checked_against_the_file(tmp_path: Path, header, data, expected) -> None:
    path = safetensors_file(tmp_path / "m.safetensors", header, b"\0" * data)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: {expected}")):
        load_clip(path)


def test_a_safetensors_header_longer_than_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="declares a header of 1099511627776 bytes"):
        load_clip(path)
    path.write_bytes(b"\x02\x00")
    with pytest.raises(CheckpointError, match="it is 2 bytes, too short"):
        load_clip(path)


@pytest.mark.parametrize("fmt,name", FORMATS)
def test_the_size_limit_applies_to_every_format_and_can_be_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, name: str
) -> None:
    path = save_clip(tiny_clip(), tmp_path / name, format=fmt)
    monkeypatch.setattr(checks, "MAX_CHECKPOINT_BYTES", 100_000)  # the tiny CLIP is ~4 MB
    with pytest.raises(CheckpointError, match=r"over the limit of 97.7 KiB.*RECLIP_MAX_CHECKPOINT_BYTES") as info:
        load_clip(path)
    assert str(path) in str(info.value)
    monkeypatch.setenv("RECLIP_MAX_CHECKPOINT_BYTES", "1e9")
    load_clip(path)
    monkeypatch.setenv("RECLIP_MAX_CHECKPOINT_BYTES", "lots")
    with pytest.raises(ValueError, match="RECLIP_MAX_CHECKPOINT_BYTES='lots'"):
        load_clip(path)


def test_a_legacy_pickle_declaring_a_huge_length_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {}):
            pickle.dump(header, f, protocol=2)
        f.write(b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"x")  # BINBYTES8 of 1 TiB, 1 byte present
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read {path}") + ".*damaged"):
        load_clip(path)


def test_deeply_nested_files_are_refused_without_recursing(tmp_path: Path) -> None:
    folder = save_clip(tiny_clip(), tmp_path / "hf", format="hf")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read {folder / 'config.json'} as JSON")):
        load_clip(folder)
    path = tmp_path / "deep.pt"
    with zipfile.ZipFile(path, "w") as zf:  # a persistent id nested 100,000 deep: () then TUPLE1 100,000 times
        zf.writestr("archive/data.pkl", b"\x80\x02)" + b"\x85" * 100_000 + b"Q.")
        zf.writestr("archive/code/__torch__/model.py", "")
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*unexpected persistent id"):
        load_clip(path)


def test_a_stride_0_view_with_python_attributes_is_caught_by_the_scan(tmp_path: Path) -> None:
    """Such a tensor is pickled through _rebuild_from_type_v2; its view is checked all the same."""
    from reclip.clip.torchsave import scan_torch_file

    expanded = torch.zeros(4).expand(1000, 4)
    expanded.note = "a Python attribute"
    torch.save({"visual.proj": expanded}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="more than once"):
        scan_torch_file(tmp_path / "m.pt")


def test_a_damaged_zip_is_reported_by_every_checkpoint_reader(tmp_path):
    """A file that passes zipfile.is_zipfile but whose central directory is bogus: each reader
    raises its own error class (a CheckpointError) naming the file, never a bare BadZipFile."""
    import struct

    from reclip.backbones.dino.load import DinoWeightsError, load_dino
    from reclip.backbones.resnet import BackboneWeightsError
    from reclip.clip.convert import CheckpointError
    from reclip.clip.torchsave import load_torch_file

    bad = tmp_path / "damaged.pt"
    # an end-of-central-directory record claiming one entry at offset 0 of a 46-byte directory
    bad.write_bytes(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, 46, 0, 0))
    for error in (CheckpointError, BackboneWeightsError, DinoWeightsError):
        with pytest.raises(error, match="damaged.pt"):
            load_torch_file(bad, hint="expected a state dict", error=error)
    with pytest.raises(DinoWeightsError, match="damaged.pt"):
        load_dino(bad)
