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

import re
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


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def _list(names: list[str], limit: int = 20) -> str:
    more = f", ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


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
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint entry {name!r} is {type(value).__name__}, expected a tensor; top-level keys are "
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
    conv1 = sd["visual.conv1.weight"]  # (width, 3, patch, patch)
    vision_width, patch = conv1.shape[0], conv1.shape[-1]
    n_pos = sd["visual.positional_embedding"].shape[0]  # grid ** 2 + 1
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid + 1 != n_pos:
        raise CheckpointError(
            f"visual.positional_embedding has {n_pos} rows, expected grid ** 2 + 1 for a square patch grid"
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
    """Raise ``CheckpointError`` listing missing, unexpected and misshapen tensors, if any."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected)
    misshapen = sorted(
        f"{k} {_shape(sd[k])} (expected {_shape(expected[k])})"
        for k in expected if k in sd and _shape(sd[k]) != _shape(expected[k])
    )
    if not (missing or unexpected or misshapen):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {_list([f'{k} {_shape(expected[k])}' for k in missing])}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {_list([f'{k} {_shape(sd[k])}' for k in unexpected])}")
    if misshapen:
        parts.append(f"misshapen {len(misshapen)}: {_list(misshapen)}")
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


def _hf_subconfigs(hf_config: Mapping[str, Any]) -> tuple[dict, dict]:
    """(text_config, vision_config) with HF defaults filled; old configs use *_config_dict."""
    text = dict(hf_config.get("text_config") or hf_config.get("text_config_dict") or {})
    vision = dict(hf_config.get("vision_config") or hf_config.get("vision_config_dict") or {})
    return {**HF_TEXT_DEFAULTS, **text}, {**HF_VISION_DEFAULTS, **vision}


def hf_options(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """What a HF config.json says that shapes do not: heads and the activation.

    Returns kwargs for ``infer_config``: vision_heads, transformer_heads, quick_gelu.
    Raises ``CheckpointError`` for settings our CLIP does not implement.
    """
    if hf_config.get("model_type", "clip") != "clip":
        raise CheckpointError(
            f"config.json has model_type {hf_config.get('model_type')!r}, expected 'clip' (a transformers CLIPModel)"
        )
    text, vision = _hf_subconfigs(hf_config)
    acts = {text["hidden_act"], vision["hidden_act"]}
    if not acts <= {"quick_gelu", "gelu"} or len(acts) != 1:
        raise CheckpointError(
            f"hidden_act text={text['hidden_act']!r} vision={vision['hidden_act']!r}; "
            "supported: both 'quick_gelu' or both 'gelu'"
        )
    for tower, cfg in (("text", text), ("vision", vision)):
        if abs(float(cfg["layer_norm_eps"]) - LAYER_NORM_EPS) > 1e-12:
            raise CheckpointError(
                f"{tower}_config.layer_norm_eps is {cfg['layer_norm_eps']}, expected {LAYER_NORM_EPS} "
                "(the only value our CLIP implements)"
            )
    return {
        "vision_heads": int(vision["num_attention_heads"]),
        "transformer_heads": int(text["num_attention_heads"]),
        "quick_gelu": acts == {"quick_gelu"},
    }


def from_hf(sd: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """HF ``CLIPModel`` state dict -> OpenAI names.

    q/k/v projections are concatenated into ``in_proj_weight`` / ``in_proj_bias``
    (nn.MultiheadAttention's layout), fc1/fc2 -> c_fc/c_proj, layer_norm1/2 -> ln_1/2,
    pre_layrnorm / post_layernorm -> ln_pre / ln_post, and the projections are
    transposed: ``visual_projection.weight.T -> visual.proj``,
    ``text_projection.weight.T -> text_projection``. ``position_ids`` buffers are
    dropped. Unknown keys are kept unchanged so ``check_state_dict`` names them.
    ``hf_config`` (config.json as a dict) is validated with ``hf_options``.
    """
    hf_options(hf_config)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}  # (tower, layer, weight|bias) -> {q,k,v}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key in _HF_GLOBAL:
            out[_HF_GLOBAL[key]] = value
        elif key in _HF_PROJECTIONS:
            out[_HF_PROJECTIONS[key]] = value.t().contiguous()  # (embed, width) -> (width, embed)
        elif m := _HF_LAYER_KEY.match(key):
            tower, layer, module, kind = m.groups()
            prefix = f"{_HF_TOWERS[tower]}{layer}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((prefix, kind), {})[module[len("self_attn.")]] = value
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
        out[f"{prefix}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3D, ...)
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
