"""DINO / DINOv2 weights: the official names, a verified download, strict loading from any file.

``load_dino(spec)``: ``spec`` is a name of :data:`DINO_MODELS` (the torch.hub entry names
of facebookresearch/dino ``hubconf.py`` and facebookresearch/dinov2 ``hubconf.py``) or a
path to a ``.pth`` / ``.pt`` / ``.safetensors`` file.

Names download once from the official URL into ``cache_dir`` (default
``$RECLIP_CACHE/dino`` or ``~/.cache/reclip/dino``). No public source lists sha256
values for these files (their URLs carry no hash, and torch.hub loads them with
``check_hash=False``), so none is invented here: the first download's sha256 (or that of
a file copied into the cache by hand) is recorded beside the file (``<file>.sha256``);
every later load, and any download again after a damaged file, is checked against it
(trust on first use). An entry of :data:`DINO_MODELS` with a ``sha256`` is checked
against that instead. Offline (``download=False``, no network, URL unreachable) the error
names the file, its URL and the option to pass it (``--proxy PATH``).

Files: read with ``torch.load(weights_only=True)`` after ``scan_torch_file`` (nothing in a
pickle is executed; DINO's full training checkpoints hold an ``argparse.Namespace`` under
``"args"``, which is allowed as a plain attribute bag and nothing else), or as safetensors.
Layouts: a flat backbone state dict (the released ``*_pretrain.pth``); DINO's full
checkpoint ``{"student": {"module.backbone.*", "module.head.*"}, "teacher": {"backbone.*",
"head.*"}, "args", ...}`` (main_dino.py ``save_dict``): the teacher's backbone is read,
as DINO's own evaluation does by default (eval_linear.py ``--checkpoint_key teacher``);
DINOv2 training checkpoints (``{"model": {"teacher.backbone.*", ...}}`` or a
``teacher_checkpoint.pth`` ``{"teacher": {"backbone.*", "dino_head.*", ...}}``) with
chunked ``blocks.C.N.*`` keys; DDP ``module.`` prefixes; HF transformers' DINOv2 weights
(``model.safetensors`` of facebook/dinov2-*, either naming, see :func:`from_hf_dinov2`),
which then run with the official interpolation (HF's own resizes plain DINOv2's grid
without the 0.1 offset). The architecture is read from the
tensor shapes (heads: width / 64, the official head width; ``heads=`` for other models)
and checked against the name's when a name was given; then every key is checked strictly.
"""

from __future__ import annotations

import argparse
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reclip.cache import cache_folder
from reclip.clip.checks import check_finite, check_tensor_bounds, load_safetensors
from reclip.clip.convert import CheckpointError, count_blocks, unwrap_state_dict
from reclip.clip.torchsave import load_torch_file
from reclip.download import DOWNLOAD_ERRORS, download_file, sha256_of
from reclip.files import atomic_write_text

from .model import IMAGENET_MEAN, IMAGENET_STD, DinoConfig, DinoViT

__all__ = [
    "DINO_MODELS", "DinoWeights", "DinoWeightsError", "available_dino_models", "default_cache_dir",
    "download_dino", "from_hf_dinov2", "infer_dino_config", "load_dino", "random_dino", "read_dino_state_dict",
]

PROXY_OPTION = "--proxy"  # the CLI option that takes a DINO spec (issue 14)
HEAD_WIDTH = 64  # every official DINO / DINOv2 ViT: 384/6, 768/12, 1024/16, 1536/24


class DinoWeightsError(CheckpointError):
    """A DINO weights file or name that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class DinoWeights:
    """A released backbone: its architecture, official URL and (when published) sha256."""

    config: DinoConfig
    url: str
    sha256: str | None = None  # none published for these files: recorded on first download
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _dino(folder: str, patch: int, width: int) -> DinoWeights:
    # dino hubconf.py; ViT-S: 384 wide, 6 heads; ViT-B: 768, 12; depth 12; 224 px pre-training
    config = DinoConfig("dino", patch, width, 12, width // HEAD_WIDTH, 4 * width, 224 // patch)
    return DinoWeights(config, f"https://dl.fbaipublicfiles.com/dino/{folder}/{folder}.pth")


_DINOV2_DEPTH = {384: 12, 768: 12, 1024: 24}  # dinov2 vision_transformer.py vit_small / vit_base / vit_large


def _dinov2(name: str, width: int, registers: int = 0) -> DinoWeights:
    # dinov2/hub/backbones.py _make_dinov2_model: img_size 518 (37 x 37), patch 14, init_values 1.0,
    # block_chunks 0; the _reg models: 4 registers, interpolate_antialias True, interpolate_offset 0.0
    config = DinoConfig(
        "dinov2", 14, width, _DINOV2_DEPTH[width], width // HEAD_WIDTH, 4 * width, 37, registers=registers,
        layer_scale=True, interpolate_offset=0.0 if registers else 0.1, interpolate_antialias=bool(registers),
    )
    file = f"{name}_reg{registers}" if registers else name  # hub/utils.py _make_dinov2_model_name
    return DinoWeights(config, f"https://dl.fbaipublicfiles.com/dinov2/{name}/{file}_pretrain.pth")


DINO_MODELS: dict[str, DinoWeights] = {
    "dino_vits16": _dino("dino_deitsmall16_pretrain", 16, 384),
    "dino_vits8": _dino("dino_deitsmall8_pretrain", 8, 384),
    "dino_vitb16": _dino("dino_vitbase16_pretrain", 16, 768),
    "dino_vitb8": _dino("dino_vitbase8_pretrain", 8, 768),
    "dinov2_vits14": _dinov2("dinov2_vits14", 384),
    "dinov2_vitb14": _dinov2("dinov2_vitb14", 768),
    "dinov2_vitl14": _dinov2("dinov2_vitl14", 1024),
    "dinov2_vits14_reg": _dinov2("dinov2_vits14", 384, registers=4),
    "dinov2_vitb14_reg": _dinov2("dinov2_vitb14", 768, registers=4),
    "dinov2_vitl14_reg": _dinov2("dinov2_vitl14", 1024, registers=4),
}


def available_dino_models() -> list[str]:
    """Names ``load_dino`` downloads."""
    return list(DINO_MODELS)


def default_cache_dir() -> Path:
    """``$RECLIP_CACHE/dino`` or ``~/.cache/reclip/dino``."""
    return cache_folder("dino")


# ---------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------


def _recorded_sha256(path: Path) -> str | None:
    record = path.with_name(path.name + ".sha256")
    if not record.is_file():
        return None
    text = record.read_text(encoding="utf-8").strip()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise DinoWeightsError(f"{record} does not hold a sha256 (64 hex digits); delete it and {path} to download again")
    return text


def _record_sha256(path: Path, digest: str) -> None:
    atomic_write_text(path.with_name(path.name + ".sha256"), digest + "\n")


def download_dino(name: str, cache_dir: str | Path | None = None, download: bool = True) -> Path:
    """Path of the weights file of a named model, checked, downloading it if needed (see the module doc)."""
    if name not in DINO_MODELS:
        raise DinoWeightsError(f"unknown DINO model name {name!r}; available: {', '.join(DINO_MODELS)}")
    weights = DINO_MODELS[name]
    target = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / weights.filename
    how_to = (
        f"Download {weights.url} on a machine with network access (e.g. `curl -L -o {weights.filename} "
        f"{weights.url}`), then pass the file with {PROXY_OPTION} PATH/{weights.filename} "
        f"(load_dino('PATH/{weights.filename}')) or copy it to {target}"
    )
    expected = weights.sha256 or (_recorded_sha256(target) if target.is_file() else None)
    if target.is_file():
        digest = sha256_of(target)
        if expected is None:  # copied there by hand: trust it from now on
            _record_sha256(target, digest)
            return target
        if digest == expected:
            return target
        source = "the published" if weights.sha256 else f"the recorded ({target.name}.sha256, first download)"
        if not download:
            raise DinoWeightsError(
                f"{target} has sha256 {digest}, not {source} {expected}: the file is damaged or was replaced. "
                f"Delete it (and {target.name}.sha256) to download it again. {how_to}"
            )
        warnings.warn(f"{target} has sha256 {digest}, not {source} {expected}; downloading it again", stacklevel=2)
    if not download:
        raise DinoWeightsError(f"DINO weights {name!r} are not in the cache ({target}) and downloading is off. {how_to}")
    # a download again (the file was damaged) must match the first one's recorded hash
    try:  # interrupted, failed or corrupt: download_file never leaves a partial file
        digest = download_file(weights.url, target, sha256=expected, desc=f"DINO {name}", how_to=how_to)
    except DOWNLOAD_ERRORS as e:
        raise DinoWeightsError(f"could not download DINO weights {name!r} from {weights.url} ({e}). {how_to}") from e
    if weights.sha256 is None:
        _record_sha256(target, digest)
    return target


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # DINOv2 block_chunks > 0: blocks.<chunk>.<index>.

# HF transformers Dinov2Model / Dinov2WithRegistersModel names -> the official ones. Files on the
# hub (facebook/dinov2-*) use the 4.x names (attention.attention.query, attention.output.dense);
# transformers 5 renames them on load (conversion_mapping.py "Dinov2Model") to q_proj / o_proj.
HF_MARKER = "embeddings.patch_embeddings.projection.weight"
_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
    HF_MARKER: "patch_embed.proj.weight", "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}
_HF_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_HF_BLOCK_PARTS = {
    "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "layer_scale1": "ls1", "layer_scale2": "ls2",
}
_HF_QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
           "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}


def from_hf_dinov2(state: Mapping[str, Tensor], source: str | os.PathLike) -> dict[str, Tensor]:
    """An HF transformers DINOv2 state dict (either naming; ``dinov2.`` prefix and classifier
    of Dinov2ForImageClassification dropped) -> official names. q, k, v are fused into ``qkv``
    in the official order; keys it does not know (e.g. ViT-g's SwiGLU) are passed through for
    the strict check to name."""
    if any(k.startswith("dinov2.") for k in state):
        state = {k[len("dinov2."):]: v for k, v in state.items() if k.startswith("dinov2.")}
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], list[Tensor | None]] = {}
    for key, value in state.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        m = _HF_BLOCK.match(key)
        if m and m.group(2) in _HF_QKV:
            qkv.setdefault((m.group(1), m.group(3)), [None] * 3)[_HF_QKV[m.group(2)]] = value
        elif m and m.group(2) in _HF_BLOCK_PARTS:
            leaf = "gamma" if m.group(3) == "lambda1" else m.group(3)
            out[f"blocks.{m.group(1)}.{_HF_BLOCK_PARTS[m.group(2)]}.{leaf}"] = value
        else:
            out[key] = value
    for (block, leaf), parts in qkv.items():
        if any(t is None for t in parts):
            absent = [name for name, t in zip(("query", "key", "value"), parts) if t is None]
            raise DinoWeightsError(f"{source}: block {block} has no attention {', '.join(absent)} {leaf} (HF layout)")
        out[f"blocks.{block}.attn.qkv.{leaf}"] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    return out


def _torch_load(path: Path) -> Any:
    # argparse.Namespace: the "args" of DINO's full checkpoints (main_dino.py save_dict), a plain attribute bag
    return load_torch_file(path, error=DinoWeightsError, safe_globals=(argparse.Namespace,),
                           hint="Expected a DINO / DINOv2 state dict (the official *_pretrain.pth) or a DINO training "
                                "checkpoint; pickles are never executed. Get the file again, or re-save it as "
                                "safetensors")


def _backbone_state(obj: Any, path: Path) -> dict[str, Tensor]:
    """The backbone's flat state dict from any of the layouts of the module doc."""
    if isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        for key in ("teacher", "student"):  # DINO full checkpoint / DINOv2 teacher_checkpoint.pth
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    try:
        state = unwrap_state_dict(obj)  # {"model": ...} / {"state_dict": ...}, module. prefixes
    except CheckpointError as e:
        raise DinoWeightsError(f"{path}: {e}") from e
    if HF_MARKER in state or f"dinov2.{HF_MARKER}" in state:
        return from_hf_dinov2(state, path)
    for prefix in ("teacher.backbone.", "backbone."):  # DINOv2 SSLMetaArch ("model"), DINO MultiCropWrapper
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # heads left out
            break
    return {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in state.items()}


def read_dino_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A DINO / DINOv2 file's backbone state dict with the official flat names, checked (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise DinoWeightsError(f"DINO weights file {path} does not exist (or is not a file)")
    if path.suffix.lower() == ".safetensors":
        try:
            obj: Any = load_safetensors(path)
        except CheckpointError as e:
            raise DinoWeightsError(str(e)) from e
    else:
        obj = _torch_load(path)
    state = _backbone_state(obj, path)
    try:
        check_tensor_bounds(state, path)
        check_finite(state, path)
    except CheckpointError as e:
        raise DinoWeightsError(str(e)) from e
    return state


def infer_dino_config(state: Mapping[str, Tensor], source: str | os.PathLike, heads: int | None = None) -> DinoConfig:
    """The architecture a state dict describes; ``heads`` defaults to width / 64 (shapes cannot tell it)."""
    required = ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.mlp.fc1.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise DinoWeightsError(
            f"{source} is not a DINO / DINOv2 ViT backbone: no {', '.join(missing)} (first keys: "
            f"{', '.join(list(state)[:6])}). Expected the official *_pretrain.pth or a DINO training checkpoint"
        )
    patch = state["patch_embed.proj.weight"]
    if patch.ndim != 4 or patch.shape[1] != 3 or patch.shape[2] != patch.shape[3]:
        raise DinoWeightsError(f"{source}: patch_embed.proj.weight {tuple(patch.shape)} is not (D, 3, p, p)")
    width, patch_size = patch.shape[0], patch.shape[-1]
    positions = state["pos_embed"].shape[1] - 1
    grid = int(round(positions ** 0.5))
    if grid * grid != positions:
        raise DinoWeightsError(f"{source}: pos_embed {tuple(state['pos_embed'].shape)} is not 1 + a square grid")
    heads = heads if heads is not None else width // HEAD_WIDTH
    if heads < 1 or width % heads:
        raise DinoWeightsError(f"{source}: width {width} cannot be split into {heads} heads; pass heads=")
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    layer_scale = "blocks.0.ls1.gamma" in state
    family = "dinov2" if "mask_token" in state or layer_scale or registers else "dino"
    return DinoConfig(
        family, patch_size, width, count_blocks(state, "blocks."), heads, state["blocks.0.mlp.fc1.weight"].shape[0],
        grid, registers=registers, layer_scale=layer_scale,
        # as the hub builds them: only the _reg models resize the grid to its size with antialiasing
        interpolate_offset=0.0 if registers else 0.1, interpolate_antialias=bool(registers),
    )


def _listing(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _load_strict(model: DinoViT, state: Mapping[str, Tensor], source: str | os.PathLike) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshapen = [f"{k} {tuple(state[k].shape)} in the file vs {tuple(own[k].shape)} in the model"
                 for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or misshapen:
        problems = [f"{what}: {_listing(keys)}" for what, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("misshapen keys", misshapen)) if keys]
        raise DinoWeightsError(
            f"{source} does not fit the {model.config.family} ViT read from its shapes (patch {model.patch_size}, "
            f"width {model.embed_dim}, depth {model.config.depth}); strict key check: " + "; ".join(problems)
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def load_dino(
    spec: str | os.PathLike,
    *,
    cache_dir: str | Path | None = None,
    download: bool = True,
    heads: int | None = None,
) -> DinoViT:
    """A DINO / DINOv2 ViT (eval mode, float32, on the CPU) from a name or a weights file.

    Args:
        spec: a name of :data:`DINO_MODELS` (``dino_vitb8``, ``dinov2_vitb14_reg``, ...) or
            a ``.pth`` / ``.pt`` / ``.safetensors`` path (see the module doc for the layouts).
        cache_dir: where named weights are kept (default ``$RECLIP_CACHE/dino``).
        download: False: never touch the network; a named model must be in the cache.
        heads: attention heads, for a file of a non-official width (default width / 64).

    Raises:
        DinoWeightsError: an unknown name, an unreadable file, a file whose keys or shapes
            do not fit (naming the file and the keys), weights unavailable offline.
    """
    text = os.fspath(spec)
    if text in DINO_MODELS:
        path = download_dino(text, cache_dir, download)
        expected: DinoConfig | None = DINO_MODELS[text].config
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise DinoWeightsError(
                f"DINO spec {text!r} is neither a known name ({', '.join(DINO_MODELS)}) nor an existing file"
            )
        expected = None
    state = read_dino_state_dict(path)
    config = infer_dino_config(state, path, heads=heads if heads is not None else (expected.heads if expected else None))
    if expected is not None and replace(config, heads=expected.heads) != expected:
        raise DinoWeightsError(f"{path} is not {text}: its tensors describe {config}, expected {expected}")
    model = DinoViT(config)
    _load_strict(model, state, path)
    return model.eval()


def random_dino(name: str, seed: int = 0) -> DinoViT:
    """A randomly initialised ViT of a named architecture (eval mode), for benchmarks and tests without weights.

    Initialised as the official models are before training (dino ``VisionTransformer`` /
    dinov2 ``init_weights``: ``trunc_normal_(std=0.02)`` with timm's absolute bounds of +-2,
    i.e. in effect a normal of std 0.02, for the linear weights, ``pos_embed`` and
    DINO's ``cls_token``; biases 0; the patch conv at torch's default; layer scale 1.0, the
    hub's ``init_values``; DINOv2's cls and register tokens N(0, 1e-6)); the same ``seed``
    gives the same model,
    and the global random state is left as it was.
    """
    if name not in DINO_MODELS:
        raise DinoWeightsError(f"unknown DINO model name {name!r}; available: {', '.join(DINO_MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DinoViT(DINO_MODELS[name].config)  # the patch conv: torch's default init, seeded here
        with torch.no_grad():
            for key, tensor in model.state_dict(keep_vars=True).items():
                if key == "cls_token" and model.config.family == "dinov2":
                    torch.nn.init.normal_(tensor, std=1e-6)  # dinov2 init_weights; DINO v1: trunc normal
                elif key in ("pos_embed", "cls_token") or (key.endswith(".weight") and tensor.ndim == 2):
                    torch.nn.init.trunc_normal_(tensor, std=0.02, a=-2.0, b=2.0)
                elif key == "register_tokens":
                    torch.nn.init.normal_(tensor, std=1e-6)
                elif key.endswith(".bias") and not key.startswith("patch_embed"):
                    tensor.zero_()
    return model.eval()
