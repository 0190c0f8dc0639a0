"""Load CLIP from any checkpoint format (or a model name) and write every format.

``load_clip(spec)`` accepts (first match wins):

1. a model NAME from ``OPENAI_MODELS`` (``ViT-B/32``, ``ViT-B/16``, ``ViT-L/14``,
   ``ViT-L/14@336px``): downloaded once from OpenAI's URL into the cache
   (``cache_dir``, else ``$RECLIP_CACHE/clip``, else ``~/.cache/reclip/clip``; an
   intact copy in OpenAI's own ``~/.cache/clip`` is used as is), sha256-verified;
2. a FOLDER: Hugging Face (``config.json`` + ``model.safetensors`` /
   ``model.safetensors.index.json`` / ``pytorch_model.bin``, optional
   ``preprocessor_config.json``), else open_clip hub layout (``open_clip_config.json``
   + ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``);
3. a FILE:
   - a zip with ``*/data.pkl`` and ``*/code/`` or ``*/constants.pkl``: a TorchScript
     archive (OpenAI's releases), read by the restricted reader in ``torchscript.py``;
   - ``*.safetensors``: open_clip / OpenAI names, or HF names with ``config.json`` beside;
   - anything else (``.pt``, ``.pth``, ``.bin``): ``torch.load(weights_only=True)``; a
     state dict with OpenAI names, a training checkpoint ``{"state_dict": ...}``
     (open_clip), or HF names with ``config.json`` beside.

The activation (QuickGELU or GELU) and the attention heads cannot be read from tensor
shapes. The activation is decided by, in order: the ``quick_gelu`` argument; HF
``hidden_act``; an open_clip config: the ``config`` argument (``--clip-config``), else
``open_clip_config.json`` beside the file (or inside a TorchScript archive written by
``save_clip``): ``quick_gelu``, default False as in open_clip; then the format: OpenAI's
(TorchScript archive, flat ``.pt`` state dict, a model name) -> True, open_clip's
(``.safetensors``, training checkpoint) -> False. Most open_clip models (LAION,
DataComp) use GELU; their ``-quickgelu`` variants and all OpenAI models use QuickGELU.
The same files give the heads and the normalisation mean / std (default CLIP's).
Without them, heads are width // 64: OpenAI's fixed convention for its formats, a guess
for an open_clip checkpoint (``load_clip`` warns, naming the guess), right for most
open_clip models but not all: pass the model's config (open_clip's
``model_configs/<name>.json`` or a hub ``open_clip_config.json``).

Bad input is refused at load time with a ``CheckpointError`` naming the file (every
format goes through ``read_checkpoint``): sizes a file declares are checked before
anything is read or allocated (``checks.py``: zip bombs, lying headers, stride-0 views
that would expand when copied, more than ``MAX_CHECKPOINT_BYTES``, raised with
``$RECLIP_MAX_CHECKPOINT_BYTES``); every config field read is checked for its type and
against the tensors; NaN or infinite weights are refused.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checks import (
    MAX_JSON_BYTES,
    check_finite,
    check_safetensors,
    check_tensor_bounds,
    format_bytes,
    load_safetensors,
    take_bytes,
)
from .convert import (
    CheckpointError,
    check_fields,
    check_hf_config,
    check_state_dict,
    count_blocks,
    dim,
    from_hf,
    from_open_clip,
    from_openai,
    hf_options,
    infer_config,
    patch_grid,
    positive_int,
    short,
    to_hf,
    unwrap_state_dict,
)
from .model import CLIP, CLIP_MEAN, CLIP_STD, CLIPConfig, weights_fingerprint
from .torchsave import load_torch_file
from .torchscript import UnsafeCheckpointError, is_torchscript_archive, read_extra_json, read_torchscript

from reclip.cache import cache_folder
from reclip.download import DOWNLOAD_ERRORS, download_file, sha256_of
from reclip.files import atomic_write, atomic_write_json

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "OPENAI_MODELS", "CheckpointError", "LoadedCheckpoint", "PretrainedWeights",
    "UnsafeCheckpointError", "available_models", "default_cache_dir", "download_weights", "load_clip",
    "open_clip_config", "read_checkpoint", "resolve_spec", "save_clip",
]

OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's hub config name (constants.HF_CONFIG_NAME)
SAVE_FORMATS = ("openai", "openai-jit", "open_clip", "hf")


@dataclass(frozen=True)
class PretrainedWeights:
    """A released checkpoint: where it lives, its sha256 and the preprocessing it was trained with."""

    url: str
    sha256: str
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _openai(sha256: str, filename: str) -> PretrainedWeights:
    # openai/CLIP clip.py _MODELS: the sha256 is the URL's second-to-last component.
    return PretrainedWeights(f"https://openaipublic.azureedge.net/clip/models/{sha256}/{filename}", sha256)


OPENAI_MODELS: dict[str, PretrainedWeights] = {
    "ViT-B/32": _openai("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": _openai("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": _openai("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": _openai("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt"),
}


def available_models() -> list[str]:
    """Names ``load_clip`` downloads."""
    return list(OPENAI_MODELS)


# ---------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$RECLIP_CACHE/clip`` or ``~/.cache/reclip/clip``."""
    return cache_folder("clip")


def download_weights(name: str, cache_dir: str | Path | None = None) -> Path:
    """Path of the verified weights file of a named model, downloading it if needed.

    The download goes to a temporary file in the cache folder, is checked against the
    registry's sha256 and only then renamed into place, so an interrupted or corrupt
    download never leaves a file that looks complete.
    """
    if name not in OPENAI_MODELS:
        raise CheckpointError(f"unknown CLIP model name {name!r}; available: {', '.join(OPENAI_MODELS)}")
    weights = OPENAI_MODELS[name]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / weights.filename
    for candidate in (target, Path.home() / ".cache" / "clip" / weights.filename):  # ours, then OpenAI's cache
        if candidate.is_file():
            if sha256_of(candidate) == weights.sha256:
                return candidate
            if candidate == target:
                warnings.warn(f"{target} does not match sha256 {weights.sha256}; downloading it again", stacklevel=2)

    how_to = (
        f"Download it on a machine with network access (e.g. `curl -L -o {weights.filename} {weights.url}`), "
        f"check `sha256sum {weights.filename}` is {weights.sha256}, then pass the file with "
        f"--clip PATH/{weights.filename} (load_clip('PATH/{weights.filename}')) or copy it to {target}"
    )

    try:  # interrupted, failed or corrupt: download_file never leaves a partial file
        download_file(weights.url, target, sha256=weights.sha256, desc=f"CLIP {name}", how_to=how_to)
    except DOWNLOAD_ERRORS as e:
        raise CheckpointError(f"could not download CLIP {name} from {weights.url} ({e}). {how_to}") from e
    return target


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    """A checkpoint read into OpenAI names, with what shapes cannot tell.

    ``quick_gelu`` / heads are None when the files do not say (``load_clip`` then uses
    the format's default, ``default_quick_gelu``, and width // 64). ``config_source``
    names the config that said them (None: no config was read).
    """

    state_dict: dict[str, torch.Tensor]
    format: str  # "openai-jit" | "openai" | "open_clip" | "hf"
    path: Path
    default_quick_gelu: bool
    quick_gelu: bool | None = None
    vision_heads: int | None = None
    transformer_heads: int | None = None
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    config_source: str | None = None


def _read_json(path: Path) -> dict:
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(
                f"{path} is {format_bytes(size)}, more than the {format_bytes(MAX_JSON_BYTES)} a config ever needs; "
                "it is not a config file"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"cannot read {path} as JSON ({type(e).__name__}: {e}); fix or delete the file") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds {type(data).__name__}, expected a JSON object")
    return data


def _given_config(config: str | os.PathLike | Mapping[str, Any]) -> tuple[dict, str]:
    """(config dict, its name in messages) from ``load_clip``'s ``config`` argument."""
    if isinstance(config, Mapping):
        return dict(config), "load_clip(config=...)"
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config is {type(config).__name__}; give an open_clip config file path or its dict")
    path = Path(config).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"open_clip config {path} does not exist; give open_clip's model_configs/<name>.json of the model "
            f"or its hub {OPEN_CLIP_CONFIG}"
        )
    return _read_json(path), str(path)


def _section(parent: Mapping[str, Any], key: str, field: str, source: str) -> dict:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{source}: {field} = {value!r} is {type(value).__name__}, expected a JSON object")
    return dict(value)


def _channel_values(
    section: Mapping[str, Any], key: str, field: str, source: str, positive: bool = False
) -> tuple[float, ...] | None:
    """preprocess_cfg mean / std: 3 finite numbers (> 0 when ``positive``: a std), or one for all channels."""
    value = section.get(key)
    if value is None:
        return None
    values = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not (isinstance(values, list) and len(values) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                    and (x > 0 or not positive) for x in values)):
        raise CheckpointError(
            f"{source}: {field} = {short(value)}, expected 3 {'positive' if positive else 'finite'} numbers "
            "(RGB on the 0..1 scale)"
        )
    return tuple(float(x) for x in values)


def _apply_open_clip_config(ckpt: LoadedCheckpoint, cfg: Mapping[str, Any], source: str) -> None:
    """Fill activation, heads and mean / std from an open_clip config, checking it fits the tensors.

    Either of open_clip's forms: its hub ``open_clip_config.json`` (``{"model_cfg": {...},
    "preprocess_cfg": {"mean", "std"}}``) or a model config ``model_configs/<name>.json``
    (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu`` at the top). As open_clip
    builds the model: vision heads = ``vision_cfg.width // head_width`` (default 64), text
    heads ``text_cfg.heads`` (default 8), ``quick_gelu`` default False (nn.GELU). A field
    of the wrong type, or one the tensors contradict (widths, layers, patch and image
    size, context length, vocabulary), raises ``CheckpointError`` naming ``source`` and
    the field.
    """
    if "model_cfg" in cfg:
        top = "model_cfg."
        model_cfg = _section(cfg, "model_cfg", "model_cfg", source)
        pre = _section(cfg, "preprocess_cfg", "preprocess_cfg", source)
    elif cfg.keys() & {"embed_dim", "vision_cfg", "text_cfg"}:
        top, model_cfg, pre = "", dict(cfg), {}
    else:
        raise CheckpointError(
            f"{source} is not an open_clip config (keys: {sorted(cfg)[:10]}); expected open_clip's model config "
            f"(model_configs/<name>.json: embed_dim, vision_cfg, text_cfg) or its hub config ({OPEN_CLIP_CONFIG}: "
            "model_cfg, preprocess_cfg)"
        )
    vision_cfg = _section(model_cfg, "vision_cfg", f"{top}vision_cfg", source)
    text_cfg = _section(model_cfg, "text_cfg", f"{top}text_cfg", source)
    sd = ckpt.state_dict

    def weights(key: str, index: int) -> int | None:
        return dim(sd, key, index)

    patch, grid = weights("visual.conv1.weight", -1), patch_grid(weights("visual.positional_embedding", 0))
    resolution = patch * grid if patch and grid else None
    image_size = vision_cfg.get("image_size")
    if isinstance(image_size, list) and len(image_size) == 2 and image_size[0] == image_size[1]:
        vision_cfg["image_size"] = image_size[0]  # open_clip also takes [H, W]; our grid is square
    # (section, its field prefix, key, what the weights say, where they say it)
    check_fields([
        (model_cfg, top, "embed_dim", weights("text_projection", 1), "text_projection"),
        (vision_cfg, f"{top}vision_cfg.", "width", weights("visual.conv1.weight", 0), "visual.conv1.weight"),
        (vision_cfg, f"{top}vision_cfg.", "patch_size", patch, "visual.conv1.weight"),
        (vision_cfg, f"{top}vision_cfg.", "image_size", resolution, "visual.positional_embedding"),
        (vision_cfg, f"{top}vision_cfg.", "layers", count_blocks(sd, "visual.transformer.resblocks."),
         "visual.transformer.resblocks.N"),
        (text_cfg, f"{top}text_cfg.", "width", weights("ln_final.weight", 0), "ln_final.weight"),
        (text_cfg, f"{top}text_cfg.", "layers", count_blocks(sd, "transformer.resblocks."), "transformer.resblocks.N"),
        (text_cfg, f"{top}text_cfg.", "context_length", weights("positional_embedding", 0), "positional_embedding"),
        (text_cfg, f"{top}text_cfg.", "vocab_size", weights("token_embedding.weight", 0), "token_embedding.weight"),
    ], source, "Give the config of these weights (open_clip's model_configs/<name>.json of the model they were "
               f"trained as), or keep each open_clip model in its own folder with its own {OPEN_CLIP_CONFIG}")

    quick_gelu = model_cfg.get("quick_gelu", False)  # open_clip's default is nn.GELU
    if not isinstance(quick_gelu, bool):
        raise CheckpointError(f"{source}: {top}quick_gelu = {short(quick_gelu)}, expected true or false")
    ckpt.quick_gelu = quick_gelu
    width = vision_cfg.get("width") or weights("visual.conv1.weight", 0)
    head_width = positive_int(vision_cfg, "head_width", f"{top}vision_cfg.head_width", source, default=64)
    if width:
        if width % head_width:
            raise CheckpointError(
                f"{source}: {top}vision_cfg.head_width = {head_width} does not divide the vision width {width}; "
                "open_clip builds width // head_width heads"
            )
        ckpt.vision_heads = width // head_width
    if text_cfg:
        heads = positive_int(text_cfg, "heads", f"{top}text_cfg.heads", source, default=8)  # CLIPTextCfg default
        text_width = text_cfg.get("width") or weights("ln_final.weight", 0)
        if text_width and text_width % heads:
            raise CheckpointError(
                f"{source}: {top}text_cfg.heads = {heads} does not divide the text width {text_width}"
            )
        ckpt.transformer_heads = heads
    ckpt.mean = _channel_values(pre, "mean", "preprocess_cfg.mean", source) or ckpt.mean
    ckpt.std = _channel_values(pre, "std", "preprocess_cfg.std", source, positive=True) or ckpt.std
    ckpt.config_source = source


def _is_hf_state_dict(sd: dict) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) for k in sd)


def _torch_load(path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(the loaded object, its state dict) of a ``torch.save`` file, checked before and after loading.

    ``torchsave.scan_torch_file`` checks what the file declares before ``torch.load`` reads
    it; a zip-format file is memory-mapped, so only the state dict is ever copied into
    memory (an optimizer's state in a training checkpoint is not read). The state dict's
    tensors are checked (``check_tensor_bounds``) and then copied, so the model never
    depends on the file staying unchanged.
    """
    obj = load_torch_file(path, hint="Expected a state dict of tensors; full pickles are never executed. Re-save "
                          "it as a state dict (torch.save(model.state_dict(), path)) or as safetensors")
    sd = unwrap_state_dict(obj)
    check_tensor_bounds(sd, path)
    return obj, {k: v.clone() for k, v in sd.items()}


def _hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """(state dict, the file it came from) of a HF folder: model.safetensors, its shards, or pytorch_model.bin."""
    if (folder / "model.safetensors").is_file():
        return load_safetensors(folder / "model.safetensors"), folder / "model.safetensors"
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
            raise CheckpointError(
                f"{index_path}: weight_map = {short(weight_map)}, expected a JSON object mapping tensor names to "
                "shard file names"
            )
        shards = sorted(set(weight_map.values()))
        for shard in shards:  # every shard a file in this folder (no paths out of it), all within the limit
            if Path(shard).name != shard or shard in (".", ".."):
                raise CheckpointError(f"{index_path}: shard {shard!r} is not a file name in {folder}")
            if not (folder / shard).is_file():
                raise CheckpointError(f"{index_path}: shard {shard} does not exist in {folder}; the download "
                                      "is incomplete")
        total = 0
        for shard in shards:
            total = take_bytes(total, check_safetensors(folder / shard), "its shards", index_path)
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(load_safetensors(folder / shard))
        return sd, index_path
    if (folder / "pytorch_model.bin").is_file():
        return _torch_load(folder / "pytorch_model.bin")[1], folder / "pytorch_model.bin"
    raise CheckpointError(
        f"HF folder {folder} has config.json but no model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


def _read_hf(folder: Path, sd: dict[str, torch.Tensor], source: Path) -> LoadedCheckpoint:
    """HF CLIPModel weights + the folder's config.json (and preprocessor_config.json if present).

    Every field read from the configs is checked (type, value, agreement with the
    tensors) and a refusal names the config file and the field.
    """
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{source} has Hugging Face CLIPModel names (vision_model.*, text_model.*) but no config.json beside "
            "it; pass the HF model folder (config.json + weights) instead"
        )
    hf_config = _read_json(config_path)
    options = hf_options(hf_config, str(config_path))
    converted = from_hf(sd, hf_config, str(config_path))
    check_hf_config(hf_config, converted, str(config_path))
    ckpt = LoadedCheckpoint(converted, "hf", source, default_quick_gelu=options["quick_gelu"],
                            quick_gelu=options["quick_gelu"], vision_heads=options["vision_heads"],
                            transformer_heads=options["transformer_heads"], config_source=str(config_path))
    pre_path = folder / "preprocessor_config.json"
    if pre_path.is_file():
        pre = _read_json(pre_path)
        ckpt.mean = _channel_values(pre, "image_mean", "image_mean", str(pre_path)) or ckpt.mean
        ckpt.std = _channel_values(pre, "image_std", "image_std", str(pre_path), positive=True) or ckpt.std
    return ckpt


def _read_open_clip_file(
    path: Path, obj: Any, default_quick_gelu: bool, fmt: str, given: tuple[dict, str] | None
) -> LoadedCheckpoint:
    sd = from_open_clip(obj)
    ckpt = LoadedCheckpoint(sd, fmt, path, default_quick_gelu=default_quick_gelu)
    sidecar = path.parent / OPEN_CLIP_CONFIG
    if given is not None:  # a given config wins over the one beside the file (which may be stale)
        _apply_open_clip_config(ckpt, *given)
    elif sidecar.is_file():
        _apply_open_clip_config(ckpt, _read_json(sidecar), str(sidecar))
    return ckpt


def _refuse_config_for_hf(path: Path, given: tuple[dict, str] | None) -> None:
    if given is not None:
        raise CheckpointError(
            f"{path} is a Hugging Face CLIP, whose config.json gives heads and activation; the open_clip config "
            f"{given[1]} does not apply to it. Drop --clip-config (config=)"
        )


def read_checkpoint(path: str | Path, config: str | os.PathLike | Mapping[str, Any] | None = None) -> LoadedCheckpoint:
    """Read a checkpoint file or folder into OpenAI names (see the module docstring for the rules).

    ``config``: an open_clip config (either form, file or dict; see
    ``_apply_open_clip_config``) for an open_clip or OpenAI checkpoint; it replaces any
    ``open_clip_config.json`` beside the file or inside the archive.

    Every format passes the same checks (``checks.py``): what the file declares is
    bounded before anything is read or allocated, every tensor is a view of its own
    storage that copying cannot grow, and every value is finite. Any refusal raises
    ``CheckpointError`` (``UnsafeCheckpointError`` for a pickle that could run code)
    whose message names the file.
    """
    path = Path(path).expanduser()
    given = _given_config(config) if config is not None else None
    try:
        ckpt = _read_any(path, given)
        check_tensor_bounds(ckpt.state_dict, ckpt.path)  # what load_clip will copy and cast
        check_finite(ckpt.state_dict, ckpt.path)
    except CheckpointError as e:  # conversions do not know the file: name it (same class)
        if str(path) in str(e):
            raise
        raise type(e)(f"{path}: {e}") from e
    return ckpt


def _read_any(path: Path, given: tuple[dict, str] | None) -> LoadedCheckpoint:
    if path.is_dir():
        if (path / "config.json").is_file() and any(
            (path / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
        ):
            _refuse_config_for_hf(path, given)
            sd, weights_file = _hf_weights(path)
            return _read_hf(path, sd, weights_file)
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if ((path / OPEN_CLIP_CONFIG).is_file() or given is not None) and (path / name).is_file():
                return _read_any(path / name, given)
        raise CheckpointError(
            f"folder {path} is not a CLIP checkpoint: expected config.json + model.safetensors (Hugging Face) or "
            f"{OPEN_CLIP_CONFIG} + open_clip_model.safetensors (open_clip); it has "
            f"{sorted(p.name for p in path.iterdir())[:20]}. Or pass the weights file itself"
        )
    if not path.is_file():
        raise CheckpointError(f"CLIP checkpoint {path} does not exist")

    if is_torchscript_archive(path):
        sd, extra = read_torchscript(path, extra_names=(OPEN_CLIP_CONFIG,))
        ckpt = LoadedCheckpoint(from_openai(sd), "openai-jit", path, default_quick_gelu=True)
        cfg = read_extra_json(extra, OPEN_CLIP_CONFIG)  # written by save_clip, absent in OpenAI's archives
        if given is not None:
            _apply_open_clip_config(ckpt, *given)
        elif cfg is not None:
            _apply_open_clip_config(ckpt, cfg, f"{path}:extra/{OPEN_CLIP_CONFIG}")
        return ckpt

    if path.suffix == ".safetensors":
        sd = load_safetensors(path)
        if _is_hf_state_dict(sd):
            _refuse_config_for_hf(path, given)
            return _read_hf(path.parent, sd, path)
        return _read_open_clip_file(path, sd, default_quick_gelu=False, fmt="open_clip", given=given)

    obj, sd = _torch_load(path)
    if _is_hf_state_dict(sd):
        _refuse_config_for_hf(path, given)
        return _read_hf(path.parent, sd, path)
    # A training checkpoint ({"state_dict": ...} or DDP names) comes from open_clip's trainer;
    # a flat state dict with OpenAI names is OpenAI's convention (clip.load(jit=False)).
    wrapped = not (isinstance(obj, dict) and len(obj) == len(sd) and all(k in obj for k in sd))
    fmt = "open_clip" if wrapped or path.name.startswith("open_clip") else "openai"
    return _read_open_clip_file(path, sd, default_quick_gelu=fmt == "openai", fmt=fmt, given=given)


def resolve_spec(spec: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A model name (downloaded / cached) or an existing path -> the path to read."""
    if isinstance(spec, str) and spec in OPENAI_MODELS:
        return download_weights(spec, cache_dir)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    raise CheckpointError(
        f"CLIP spec {str(spec)!r} is neither an existing file or folder nor a known model name. "
        f"Available names: {', '.join(OPENAI_MODELS)}; or pass a path to a TorchScript .pt, a state dict "
        "(.pt/.pth/.bin), a .safetensors file or a Hugging Face model folder"
    )


def _warn_guessed_heads(path: Path, arch: CLIPConfig) -> str:
    """Warn (once per load) that an open_clip checkpoint's heads were guessed; returns the note
    that errors building the model carry."""
    vision_heads = arch.vision_heads or max(arch.vision_width // 64, 1)
    guess = (f"{vision_heads} vision heads for width {arch.vision_width}, {arch.transformer_heads} text heads "
             f"for width {arch.transformer_width}")
    fix = (f"pass the model's open_clip config with --clip-config FILE (load_clip(..., config=FILE)): "
           f"open_clip's model_configs/<name>.json or its {OPEN_CLIP_CONFIG}")
    warnings.warn(
        f"{path}: an open_clip checkpoint does not record its attention heads and no config was given (no "
        f"{OPEN_CLIP_CONFIG} beside it, no --clip-config); guessed {guess}. A model with another head width "
        f"loads with wrong embeddings: {fix}",
        stacklevel=3,  # the caller of load_clip
    )
    return f"; note: the attention heads were guessed ({guess}), no open_clip config was given: {fix}"


def load_clip(
    spec: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    quick_gelu: bool | None = None,
    cache_dir: str | Path | None = None,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
) -> CLIP:
    """Load a frozen CLIP from a model name, file or folder (formats: module docstring).

    Returns the model in eval mode with ``requires_grad`` False, weights cast to
    ``dtype`` (OpenAI's fp16 releases become float32 by default) on ``device``, and
    ``image_mean`` / ``image_std`` from the checkpoint (its preprocessing config, else
    CLIP's), attributes ``spec`` (str) and ``checkpoint_format``, and the weights
    fingerprint precomputed.
    ``quick_gelu`` overrides the activation the files imply. ``config``: the model's
    open_clip config, a file or its dict, either open_clip's ``model_configs/<name>.json``
    or a hub ``open_clip_config.json``; it gives the heads (and activation, mean / std)
    and wins over an ``open_clip_config.json`` beside the file. An open_clip checkpoint
    with no config at all loads with guessed heads (width // 64) and a warning. Any
    failure raises ``CheckpointError`` (``UnsafeCheckpointError`` for a pickle that
    could run code).
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype {dtype!r} is not a floating point torch.dtype; use torch.float32, float16 or bfloat16")
    path = resolve_spec(spec, cache_dir)
    ckpt = read_checkpoint(path, config)
    if isinstance(spec, str) and spec in OPENAI_MODELS:
        ckpt.mean, ckpt.std = OPENAI_MODELS[spec].mean, OPENAI_MODELS[spec].std
    gelu = quick_gelu if quick_gelu is not None else (
        ckpt.quick_gelu if ckpt.quick_gelu is not None else ckpt.default_quick_gelu
    )
    try:
        arch = infer_config(ckpt.state_dict, ckpt.vision_heads, ckpt.transformer_heads, gelu)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    # open_clip state dicts do not record heads; OpenAI's formats have a fixed convention instead.
    guessed = _warn_guessed_heads(path, arch) if ckpt.format == "open_clip" and ckpt.config_source is None else ""
    try:
        with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
            model = CLIP.from_config(arch, image_mean=ckpt.mean, image_std=ckpt.std)
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot build CLIP {arch} ({e}){guessed}") from e
    try:
        check_state_dict(ckpt.state_dict, model)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}{guessed}") from e
    # Every shape now fits the architecture and read_checkpoint checked that no tensor is
    # an expanded (stride-0) or overlapping view: the copies below are as large as the
    # file's tensors (float16 doubles to float32), never more.
    state = {k: v.to(dtype).contiguous() for k, v in ckpt.state_dict.items()}  # fp16 releases -> float32
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"tensors not in the state dict stayed on the meta device: {left}"  # a non-persistent buffer
    model = model.to(device).eval().requires_grad_(False)
    model.spec = str(spec)
    model.checkpoint_format = ckpt.format
    weights_fingerprint(model)
    return model


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def open_clip_config(clip: CLIP) -> dict[str, Any]:
    """open_clip's hub config for this model: ``{"model_cfg": ..., "preprocess_cfg": ...}``."""
    c = clip.config
    vision_heads = c.vision_heads or max(c.vision_width // 64, 1)
    return {
        "model_cfg": {
            "embed_dim": c.embed_dim,
            "quick_gelu": c.quick_gelu,
            "vision_cfg": {"image_size": c.image_resolution, "layers": c.vision_layers, "width": c.vision_width,
                           "patch_size": c.vision_patch_size, "head_width": c.vision_width // vision_heads},
            "text_cfg": {"context_length": c.context_length, "vocab_size": c.vocab_size,
                         "width": c.transformer_width, "heads": c.transformer_heads, "layers": c.transformer_layers},
        },
        "preprocess_cfg": {"mean": list(clip.image_mean), "std": list(clip.image_std)},
    }


def _is_openai_convention(clip: CLIP) -> bool:
    """True when a bare OpenAI file reloads exactly: QuickGELU, width // 64 heads, CLIP's mean / std."""
    c = clip.config
    return (
        c.quick_gelu
        and (c.vision_heads or max(c.vision_width // 64, 1)) == max(c.vision_width // 64, 1)
        and c.transformer_heads == max(c.transformer_width // 64, 1)
        and tuple(clip.image_mean) == CLIP_MEAN and tuple(clip.image_std) == CLIP_STD
    )


def _write_sidecar(folder: Path, cfg: dict | None) -> None:
    """Write (or require absent) ``open_clip_config.json``; refuse to overwrite another model's."""
    sidecar = folder / OPEN_CLIP_CONFIG
    if sidecar.is_file():
        existing = _read_json(sidecar)
        if existing == cfg:
            return
        raise CheckpointError(
            f"{sidecar} exists and describes another model; it would be applied to the file being saved. "
            "Save into an empty folder or delete that file"
        )
    if cfg is not None:
        atomic_write_json(sidecar, cfg)


def _state_dict(clip: CLIP) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()}


def _trace(clip: CLIP) -> torch.jit.ScriptModule:
    """TorchScript trace of forward / encode_image / encode_text, as OpenAI's released archives."""
    c = clip.config
    device = clip.visual.conv1.weight.device
    images = torch.zeros(1, 3, c.image_resolution, c.image_resolution, dtype=clip.dtype, device=device)
    tokens = torch.zeros(1, c.context_length, dtype=torch.long, device=device)
    tokens[0, 0], tokens[0, 1] = max(c.vocab_size - 2, 0), c.vocab_size - 1  # start, end of text (largest id)
    was_training = clip.training
    clip.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript deprecation and TracerWarnings
            return torch.jit.trace_module(
                clip, {"forward": (images, tokens), "encode_image": (images,), "encode_text": (tokens,)},
                check_trace=False, _store_inputs=False,
            )
    finally:
        clip.train(was_training)


def save_clip(clip: CLIP, path: str | Path, format: str = "openai") -> Path:
    """Write ``clip`` in a checkpoint format ``load_clip`` (and the original libraries) read.

    - ``"openai"``: ``torch.save`` of the state dict (OpenAI names), e.g. ``clip.pt``;
      ``open_clip_config.json`` is written beside it only when the model departs from
      OpenAI's conventions (GELU, other heads, other mean / std).
    - ``"openai-jit"``: a real TorchScript archive (``torch.jit.trace`` + ``torch.jit.save``)
      like OpenAI's releases, with ``extra/open_clip_config.json`` inside.
    - ``"open_clip"``: safetensors with OpenAI names + ``open_clip_config.json`` beside.
    - ``"hf"``: a folder with ``config.json``, ``model.safetensors`` (transformers
      ``CLIPModel`` names) and ``preprocessor_config.json``.

    Returns the written path. Files are written atomically.
    """
    path = Path(path).expanduser()
    if format not in SAVE_FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; expected one of {', '.join(SAVE_FORMATS)}")
    if not hasattr(clip, "config"):
        raise TypeError(f"save_clip needs a reclip CLIP (with .config), got {type(clip).__name__}")
    cfg = open_clip_config(clip)
    if format == "openai":
        _write_sidecar(path.parent, None if _is_openai_convention(clip) else cfg)
        sd = _state_dict(clip)
        atomic_write(path, lambda p: torch.save(sd, p))
    elif format == "openai-jit":
        traced = _trace(clip)
        extra = {OPEN_CLIP_CONFIG: json.dumps(cfg, indent=2)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            atomic_write(path, lambda p: torch.jit.save(traced, str(p), _extra_files=extra))
    elif format == "open_clip":
        _write_sidecar(path.parent, cfg)
        sd = _state_dict(clip)
        atomic_write(path, lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    else:  # hf
        hf_sd, hf_config = to_hf(_state_dict(clip), clip.config)
        res = clip.config.image_resolution
        preprocessor = {  # transformers CLIPImageProcessor fields (resample 3 = bicubic)
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": res},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": res, "width": res},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(clip.image_mean), "image_std": list(clip.image_std), "do_convert_rgb": True,
        }
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / "model.safetensors", lambda p: save_file(hf_sd, str(p), metadata={"format": "pt"}))
        for name, data in (("config.json", hf_config), ("preprocessor_config.json", preprocessor)):
            atomic_write_json(path / name, data)
    return path
