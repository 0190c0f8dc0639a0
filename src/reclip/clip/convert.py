"""Pure state-dict conversions between checkpoint formats and our CLIP (OpenAI names).

- OpenAI (TorchScript or state dict) and open_clip ViTs already use OpenAI's names;
  they only need unwrapping (``{"state_dict": ...}``, DDP's ``module.``) and dropping
  non-weights (OpenAI's JIT scalars, open_clip's old persistent ``attn_mask``).
- Hugging Face ``CLIPModel`` keys are renamed, q/k/v are stacked into ``in_proj_*`` and
  the two projections are transposed (``nn.Linear`` (out, in) vs OpenAI's (in, out)).
  Key map from transformers' ``convert_clip_original_pytorch_to_hf.py``.
- ``infer_config`` reads the architecture from tensor shapes as OpenAI's
  ``clip/model.py: build_model`` does.

Nothing here reads files; ``load.py`` does.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .model import CLIPConfig

if TYPE_CHECKING:
    from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message says why and what to do."""


# Module attributes OpenAI's JIT archives carry as tensors (dropped by build_model too).
OPENAI_JIT_SCALARS = ("input_resolution", "context_length", "vocab_size")
# Wrappers of training checkpoints (open_clip saves {"epoch", "name", "state_dict", "optimizer"}).
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes added by DDP (module.) and torch.compile (_orig_mod.).
_PREFIXES = ("module.", "_orig_mod.")
# HF defaults for keys that HF omits from config.json when they equal the default
# (transformers CLIPTextConfig / CLIPVisionConfig).
HF_TEXT_DEFAULTS = {"num_attention_heads": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
HF_VISION_DEFAULTS = {"num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
LAYER_NORM_EPS = 1e-5  # our LayerNorm's (OpenAI's) eps


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 60, 60


def short(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters and 3 levels, for error messages.

    Safe on anything a file can make (a deeply nested or huge pickle / JSON value),
    where ``repr`` would recurse or build a huge string before it could be cut.
    """
    return _SHORT.repr(value)


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def _list(names: list[str], limit: int = 20) -> str:
    more = f", ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def positive_int(
    section: Mapping[str, Any], key: str, field: str, source: str, default: int | None = None
) -> int | None:
    """``section[key]`` (else ``default``) checked to be a positive integer (None passes when absent)."""
    value = section.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise CheckpointError(f"{source}: {field} = {short(value)}, expected a positive integer")
    return value


def dim(sd: Mapping[str, torch.Tensor], key: str, index: int) -> int | None:
    """``sd[key].shape[index]``, or None when the tensor is absent or has too few dimensions."""
    t = sd.get(key)
    if not isinstance(t, torch.Tensor) or not -t.dim() <= index < t.dim():
        return None
    return t.shape[index]


def patch_grid(n_positions: int | None) -> int | None:
    """Side of the square patch grid for ``grid ** 2 + 1`` positions (CLS first); None if not square."""
    if not n_positions or n_positions < 2:
        return None
    grid = math.isqrt(n_positions - 1)
    return grid if grid * grid + 1 == n_positions else None


def check_fields(
    checks: list[tuple[Mapping[str, Any], str, str, int | None, str]], source: str, fix: str
) -> None:
    """Each ``(section, field prefix, key, what the weights say, where)``: a positive integer equal to the weights'.

    Absent fields pass; a field that is not a positive integer, or that the tensors
    contradict, raises ``CheckpointError`` naming ``source``, the field, both values
    and the tensor; ``fix`` ends the contradiction's message.
    """
    for section, prefix, key, actual, where in checks:
        value = positive_int(section, key, prefix + key, source)
        if value is not None and actual is not None and value != actual:
            raise CheckpointError(
                f"{source}: {prefix}{key} = {value} but the weights have {actual} ({where}); the config describes "
                f"another model. {fix}"
            )


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a loaded checkpoint object.

    Unwraps training checkpoints ({"state_dict": ...}, {"model": ...}) and strips DDP's
    ``module.`` and torch.compile's ``_orig_mod.`` prefixes. Non-tensor entries raise.
    """
    for _ in range(3):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds {type(obj).__name__}, expected a state dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise CheckpointError(
                f"checkpoint key {short(name)} is {type(name).__name__}, expected a tensor name (str)"
            )
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint entry {short(name)} is {type(value).__name__}, expected a tensor; top-level keys are "
                f"{_list(sorted(map(str, obj)))}. Pass a state dict or a training checkpoint with 'state_dict'"
            )
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = value
    return out


def from_openai(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI state dict (JIT or not) -> ours: drop the JIT scalars and any ``attn_mask``."""
    return {
        k: v for k, v in sd.items()
        if k not in OPENAI_JIT_SCALARS and k != "attn_mask" and not k.endswith(".attn_mask")
    }


def from_open_clip(sd: Any) -> dict[str, torch.Tensor]:
    """open_clip checkpoint (flat or {"state_dict": ...}, maybe ``module.``-prefixed) -> ours.

    open_clip's ViT CLIP uses OpenAI's names; only non-persistent buffers saved by old
    versions (``attn_mask``) are dropped. Towers open_clip builds from timm or HF
    (``visual.trunk.*``, ``text.*``) are not this architecture and are refused.
    """
    sd = from_openai(unwrap_state_dict(sd))
    foreign = [k for k in sd if k.startswith(("visual.trunk.", "text.", "visual.attn_pool"))]
    if foreign:
        raise CheckpointError(
            f"this open_clip checkpoint uses a tower our CLIP does not implement ({_list(foreign, 5)}); "
            "supported: OpenAI-style ViT CLIPs (ViT-B/32, B/16, L/14, H/14, ... with the default text tower)"
        )
    return sd


def count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of transformer blocks ``prefix``N``.*`` in a state dict (``visual.transformer.resblocks.``)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd if (m := pattern.match(k))})


# open_clip towers whose head width is not 64 (model_configs/ViT-{H,g,bigG}-14.json:
# head_width 80 / 88 / 104); shapes alone cannot tell, and width // 64 would be wrong.
_VISION_HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16}


def infer_config(
    sd: Mapping[str, torch.Tensor],
    vision_heads: int | None = None,
    transformer_heads: int | None = None,
    quick_gelu: bool = True,
) -> CLIPConfig:
    """Architecture from tensor shapes, as OpenAI's ``build_model``.

    Heads default to width // 64 (every OpenAI ViT and most open_clip ones), except the
    open_clip ViT-H/g/bigG-14 vision widths (1280/1408/1664: 16 heads); pass them when a
    checkpoint uses another head width (``vision_heads`` equal to width // 64 is stored as
    None). ``quick_gelu`` cannot be read from shapes.
    """
    if any(k.startswith("visual.layer1.") for k in sd):
        raise CheckpointError("this is a ResNet CLIP (visual.layer1.*); only ViT CLIPs are supported")
    required = ["visual.conv1.weight", "visual.positional_embedding", "text_projection",
                "positional_embedding", "token_embedding.weight", "ln_final.weight"]
    missing = [k for k in required if k not in sd]
    if missing:
        raise CheckpointError(
            f"cannot infer the CLIP architecture: missing {_list(missing)}; the checkpoint has "
            f"{_list(sorted(sd))}. Expected an OpenAI / open_clip ViT CLIP state dict"
        )
    layouts = {  # key -> (dimensions, layout); every dimension must be > 0
        "visual.conv1.weight": (4, "(width, 3, patch, patch)"),
        "visual.positional_embedding": (2, "(grid ** 2 + 1, width)"),
        "text_projection": (2, "(width, embed_dim)"),
        "positional_embedding": (2, "(context_length, width)"),
        "token_embedding.weight": (2, "(vocab_size, width)"),
        "ln_final.weight": (1, "(width,)"),
    }
    for key, (ndim, layout) in layouts.items():
        shape = _shape(sd[key])
        if len(shape) != ndim or 0 in shape:
            raise CheckpointError(
                f"cannot infer the CLIP architecture: {key} has shape {shape}, expected {layout} with every "
                "dimension > 0. The file is not a ViT CLIP checkpoint or is corrupt"
            )
    conv1 = sd["visual.conv1.weight"]  # (width, 3, patch, patch)
    vision_width, patch = conv1.shape[0], conv1.shape[-1]
    n_pos = sd["visual.positional_embedding"].shape[0]  # grid ** 2 + 1
    grid = patch_grid(n_pos)
    if grid is None:
        raise CheckpointError(
            f"visual.positional_embedding has {n_pos} rows, expected grid ** 2 + 1 for a square patch grid"
        )
    for prefix in ("visual.transformer.resblocks.", "transformer.resblocks."):
        if not count_blocks(sd, prefix):
            raise CheckpointError(
                f"cannot infer the CLIP architecture: no {prefix}N.* tensors; each tower has at least one block"
            )

    text_width = sd["ln_final.weight"].shape[0]
    if vision_heads is None:
        vision_heads = _VISION_HEADS_BY_WIDTH.get(vision_width)
    if vision_heads == max(vision_width // 64, 1):
        vision_heads = None  # canonical: None means OpenAI's width // 64, so configs compare equal
    return CLIPConfig(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=patch * grid,
        vision_layers=count_blocks(sd, "visual.transformer.resblocks."),
        vision_width=vision_width,
        vision_patch_size=patch,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=text_width,
        transformer_heads=transformer_heads or max(text_width // 64, 1),
        transformer_layers=count_blocks(sd, "transformer.resblocks."),
        vision_heads=vision_heads,
        quick_gelu=quick_gelu,
    )


def check_state_dict(sd: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Raise ``CheckpointError`` listing missing, unexpected, misshapen and non-float tensors, if any."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected)
    misshapen = sorted(
        f"{k} {_shape(sd[k])} (expected {_shape(expected[k])})"
        for k in expected if k in sd and _shape(sd[k]) != _shape(expected[k])
    )
    mistyped = sorted(  # an integer, bool or complex tensor would be cast silently
        f"{k} {sd[k].dtype} (expected floating point)"
        for k in expected if k in sd and expected[k].is_floating_point() and not sd[k].is_floating_point()
    )
    if not (missing or unexpected or misshapen or mistyped):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {_list([f'{k} {_shape(expected[k])}' for k in missing])}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {_list([f'{k} {_shape(sd[k])}' for k in unexpected])}")
    if misshapen:
        parts.append(f"misshapen {len(misshapen)}: {_list(misshapen)}")
    if mistyped:
        parts.append(f"not floating point {len(mistyped)}: {_list(mistyped)}")
    raise CheckpointError(
        "checkpoint does not fit the CLIP architecture — " + "; ".join(parts)
        + ". Check that the file is a complete ViT CLIP checkpoint in the format its name suggests"
    )


# ---------------------------------------------------------------------------------------
# Hugging Face transformers CLIPModel <-> OpenAI names
# ---------------------------------------------------------------------------------------

# Whole-key renames (HF -> OpenAI); projections are transposed separately.
_HF_GLOBAL = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: HF's spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_HF_PROJECTIONS = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
# Within a layer (HF -> OpenAI); q/k/v handled separately.
_HF_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_TOWERS = {"vision_model.encoder.layers.": "visual.transformer.resblocks.",
              "text_model.encoder.layers.": "transformer.resblocks."}
_HF_LAYER_KEY = re.compile(
    r"^(vision_model\.encoder\.layers\.|text_model\.encoder\.layers\.)(\d+)\.(.+)\.(weight|bias)$"
)


def _hf_subconfigs(hf_config: Mapping[str, Any], source: str = "config.json") -> tuple[dict, dict]:
    """(text_config, vision_config) with HF defaults filled; old configs use *_config_dict.

    A section that is missing or not a JSON object raises ``CheckpointError`` naming ``source``.
    """
    sections = []
    for tower, defaults in (("text", HF_TEXT_DEFAULTS), ("vision", HF_VISION_DEFAULTS)):
        key = next((k for k in (f"{tower}_config", f"{tower}_config_dict") if hf_config.get(k) is not None), None)
        if key is None:
            raise CheckpointError(
                f"{source} has no {tower}_config section; a transformers CLIPModel config.json has text_config and "
                "vision_config (written by save_pretrained). Use the model's own config.json"
            )
        value = hf_config[key]
        if not isinstance(value, Mapping):
            raise CheckpointError(
                f"{source}: {key} = {short(value)} is {type(value).__name__}, expected a JSON object"
            )
        sections.append({**defaults, **value})
    return sections[0], sections[1]


def hf_options(hf_config: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """What a HF config.json says that shapes do not: heads and the activation.

    Returns kwargs for ``infer_config``: vision_heads, transformer_heads, quick_gelu.
    Raises ``CheckpointError`` naming ``source`` and the field for a missing section, a
    value of the wrong type and settings our CLIP does not implement.
    """
    if not isinstance(hf_config, Mapping):
        raise CheckpointError(f"{source} holds {type(hf_config).__name__}, expected a JSON object")
    model_type = hf_config.get("model_type", "clip")
    if model_type != "clip":
        raise CheckpointError(
            f"{source}: model_type = {short(model_type)}, expected 'clip' (a transformers CLIPModel)"
        )
    text, vision = _hf_subconfigs(hf_config, source)
    for tower, cfg in (("text", text), ("vision", vision)):
        act = cfg["hidden_act"]
        if not isinstance(act, str) or act not in ("quick_gelu", "gelu"):
            raise CheckpointError(
                f"{source}: {tower}_config.hidden_act = {short(act)}; supported: 'quick_gelu' or 'gelu'"
            )
        eps = cfg["layer_norm_eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not abs(eps - LAYER_NORM_EPS) <= 1e-12:
            raise CheckpointError(
                f"{source}: {tower}_config.layer_norm_eps = {short(eps)}, expected {LAYER_NORM_EPS} "
                "(the only value our CLIP implements)"
            )
    if text["hidden_act"] != vision["hidden_act"]:
        raise CheckpointError(
            f"{source}: hidden_act text={short(text['hidden_act'])} vision={short(vision['hidden_act'])}; "
            "supported: both 'quick_gelu' or both 'gelu'"
        )
    return {
        "vision_heads": positive_int(vision, "num_attention_heads", "vision_config.num_attention_heads", source),
        "transformer_heads": positive_int(text, "num_attention_heads", "text_config.num_attention_heads", source),
        "quick_gelu": text["hidden_act"] == "quick_gelu",
    }


def check_hf_config(hf_config: Mapping[str, Any], sd: Mapping[str, torch.Tensor], source: str = "config.json") -> None:
    """Check a HF config.json's sizes against the converted weights (OpenAI names), as open_clip configs are.

    Every size the config gives must be a positive integer equal to the tensors' (absent
    ones pass: HF omits defaults); the heads must divide their tower's width. The
    sections' own ``projection_dim`` is not checked: a CLIPModel uses the top-level one
    and leaves theirs at the default.
    """
    text, vision = _hf_subconfigs(hf_config, source)
    patch, grid = dim(sd, "visual.conv1.weight", -1), patch_grid(dim(sd, "visual.positional_embedding", 0))
    v, t = "vision_config.", "text_config."
    fc = "{}resblocks.0.mlp.c_fc.weight"
    check_fields([
        (vision, v, "hidden_size", dim(sd, "visual.conv1.weight", 0), "visual.conv1.weight"),
        (vision, v, "intermediate_size", dim(sd, fc.format("visual.transformer."), 0), fc.format("visual.transformer.")),
        (vision, v, "num_hidden_layers", count_blocks(sd, "visual.transformer.resblocks."),
         "visual.transformer.resblocks.N"),
        (vision, v, "patch_size", patch, "visual.conv1.weight"),
        (vision, v, "image_size", patch * grid if patch and grid else None, "visual.positional_embedding"),
        (vision, v, "num_channels", dim(sd, "visual.conv1.weight", 1), "visual.conv1.weight"),
        (text, t, "hidden_size", dim(sd, "ln_final.weight", 0), "ln_final.weight"),
        (text, t, "intermediate_size", dim(sd, fc.format("transformer."), 0), fc.format("transformer.")),
        (text, t, "num_hidden_layers", count_blocks(sd, "transformer.resblocks."), "transformer.resblocks.N"),
        (text, t, "max_position_embeddings", dim(sd, "positional_embedding", 0), "positional_embedding"),
        (text, t, "vocab_size", dim(sd, "token_embedding.weight", 0), "token_embedding.weight"),
        (hf_config, "", "projection_dim", dim(sd, "text_projection", 1), "text_projection"),
    ], source, "Use the config.json saved with these weights")
    for prefix, cfg, width, where in ((v, vision, dim(sd, "visual.conv1.weight", 0), "visual.conv1.weight"),
                                      (t, text, dim(sd, "ln_final.weight", 0), "ln_final.weight")):
        heads = positive_int(cfg, "num_attention_heads", f"{prefix}num_attention_heads", source)
        if width and heads and width % heads:
            raise CheckpointError(
                f"{source}: {prefix}num_attention_heads = {heads} does not divide the width {width} ({where}); "
                "use the config.json saved with these weights"
            )


def from_hf(
    sd: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any], source: str = "config.json"
) -> dict[str, torch.Tensor]:
    """HF ``CLIPModel`` state dict -> OpenAI names.

    q/k/v projections are concatenated into ``in_proj_weight`` / ``in_proj_bias``
    (nn.MultiheadAttention's layout), fc1/fc2 -> c_fc/c_proj, layer_norm1/2 -> ln_1/2,
    pre_layrnorm / post_layernorm -> ln_pre / ln_post, and the projections are
    transposed: ``visual_projection.weight.T -> visual.proj``,
    ``text_projection.weight.T -> text_projection``. ``position_ids`` buffers are
    dropped. Unknown keys are kept unchanged so ``check_state_dict`` names them.
    ``hf_config`` (config.json as a dict, ``source`` its name in messages) is validated
    with ``hf_options``; ``check_hf_config`` checks its sizes against the result.
    """
    hf_options(hf_config, source)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}  # (prefix, kind) -> {q,k,v: (key, t)}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key in _HF_GLOBAL:
            out[_HF_GLOBAL[key]] = value
        elif key in _HF_PROJECTIONS:
            if value.dim() != 2:
                raise CheckpointError(f"{key} has shape {_shape(value)}, expected (embed_dim, width)")
            out[_HF_PROJECTIONS[key]] = value.t().contiguous()  # (embed, width) -> (width, embed)
        elif m := _HF_LAYER_KEY.match(key):
            tower, layer, module, kind = m.groups()
            prefix = f"{_HF_TOWERS[tower]}{layer}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((prefix, kind), {})[module[len("self_attn.")]] = (key, value)
            elif module in _HF_LAYER:
                out[f"{prefix}{_HF_LAYER[module]}.{kind}"] = value
            else:
                out[key] = value
        else:
            out[key] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            missing = [f"self_attn.{p}_proj.{kind}" for p in "qkv" if p not in parts]
            raise CheckpointError(f"HF checkpoint lacks {', '.join(missing)} for {prefix}; the file is incomplete")
        shapes = {_shape(t) for _, t in parts.values()}
        if len(shapes) != 1 or not next(iter(shapes)):
            raise CheckpointError(
                "q, k and v projections differ in shape or are scalars: "
                + ", ".join(f"{k} {_shape(t)}" for k, t in parts.values())
                + "; they must be equal (width, width) weights or (width,) biases. The file is corrupt"
            )
        q, k, v = (parts[p][1] for p in "qkv")
        out[f"{prefix}attn.in_proj_{kind}"] = torch.cat([q, k, v], dim=0)  # (3D, ...)
    return out


def to_hf(sd: Mapping[str, torch.Tensor], config: CLIPConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our state dict -> (HF ``CLIPModel`` state dict, HF config.json dict); inverse of ``from_hf``.

    Every tensor is a separate contiguous copy (safetensors refuses shared memory).
    Token ids follow OpenAI's tokenizer: end-of-text is the largest id (vocab_size - 1),
    so HF's pooling at ``eos_token_id`` reads where ours (argmax) does.
    """
    inv_global = {v: k for k, v in _HF_GLOBAL.items()}
    inv_proj = {v: k for k, v in _HF_PROJECTIONS.items()}
    inv_layer = {v: k for k, v in _HF_LAYER.items()}
    inv_towers = {v: k for k, v in _HF_TOWERS.items()}
    layer_key = re.compile(r"^(visual\.transformer\.resblocks\.|transformer\.resblocks\.)(\d+)\.(.+)\.(weight|bias)$")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in inv_global:
            out[inv_global[key]] = value.detach().clone().contiguous()
        elif key in inv_proj:
            out[inv_proj[key]] = value.detach().t().contiguous()  # (width, embed) -> (embed, width)
        elif m := layer_key.match(key.replace("attn.in_proj_", "attn.in_proj.")):  # in_proj_weight -> .weight
            tower, layer, module, kind = m.groups()
            prefix = f"{inv_towers[tower]}{layer}."
            if module == "attn.in_proj":
                for name, part in zip("qkv", value.detach().chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.clone().contiguous()
            elif module in inv_layer:
                out[f"{prefix}{inv_layer[module]}.{kind}"] = value.detach().clone().contiguous()
            else:
                raise CheckpointError(f"no HF name for {key!r}")
        else:
            raise CheckpointError(f"no HF name for {key!r}")
    act = "quick_gelu" if config.quick_gelu else "gelu"
    vision_heads = config.vision_heads or max(config.vision_width // 64, 1)
    eos = config.vocab_size - 1
    hf_config = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "model_type": "clip_text_model",
            "hidden_size": config.transformer_width,
            "intermediate_size": 4 * config.transformer_width,
            "projection_dim": config.embed_dim,
            "num_hidden_layers": config.transformer_layers,
            "num_attention_heads": config.transformer_heads,
            "max_position_embeddings": config.context_length,
            "vocab_size": config.vocab_size,
            "hidden_act": act,
            "layer_norm_eps": LAYER_NORM_EPS,
            "bos_token_id": max(eos - 1, 0),
            "eos_token_id": eos,
            "pad_token_id": 1 if config.vocab_size > 2 else 0,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": config.vision_width,
            "intermediate_size": 4 * config.vision_width,
            "projection_dim": config.embed_dim,
            "num_hidden_layers": config.vision_layers,
            "num_attention_heads": vision_heads,
            "num_channels": 3,
            "image_size": config.image_resolution,
            "patch_size": config.vision_patch_size,
            "hidden_act": act,
            "layer_norm_eps": LAYER_NORM_EPS,
        },
    }
    return out, hf_config
