"""Cross-check our CLIP against an independent implementation: transformers' CLIPModel.

Same random weights (HF init, converted with ``from_hf``) -> same image and text
embeddings to 1e-5 relative. transformers is a test-only dependency.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import transformers  # a test dependency (pyproject [test]); never skipped

from reclip.clip.convert import from_hf, hf_options, infer_config  # noqa: E402
from reclip.clip.load import load_clip, save_clip  # noqa: E402
from reclip.clip.model import CLIP  # noqa: E402

EOT = 49407  # OpenAI tokenizer: <|endoftext|>, the largest id; HF pools at eos_token_id
SOT = 49406

# (text, vision, projection_dim) in HF terms.
VIT_B16 = (
    dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12,
         max_position_embeddings=77, vocab_size=49408),
    dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
         image_size=224, patch_size=16),
    512,
)
TINY = (
    dict(hidden_size=64, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2,
         max_position_embeddings=16, vocab_size=49408),
    dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=2,
         image_size=64, patch_size=16),
    32,
)


def hf_clip(spec: tuple[dict, dict, int], act: str = "quick_gelu", seed: int = 0):
    """A random transformers CLIPModel, every tensor non-trivial (biases, LayerNorms too)."""
    text, vision, proj = spec
    config = transformers.CLIPConfig(
        text_config={**text, "hidden_act": act, "eos_token_id": EOT, "bos_token_id": SOT, "pad_token_id": 1},
        vision_config={**vision, "hidden_act": act},
        projection_dim=proj,
    )
    # Built on the meta device and filled here in one pass: HF's own init of a ViT-B/16
    # plus a perturbation pass would cost most of this test's time.
    with torch.device("meta"):
        model = transformers.CLIPModel(config)
    model = model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    norms = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(2.6592)
            elif p.dim() == 1:  # biases, LayerNorm weights (around 1), class_embedding
                p.normal_(1.0 if name in norms else 0.0, 0.02, generator=gen)
            else:  # (out, in) matrices, conv (out, 3, p, p), embeddings
                p.normal_(0.0, 0.02 if "embedding" in name else p[0].numel() ** -0.5, generator=gen)
        for name, buf in model.named_buffers():  # non-persistent position_ids: to_empty left them uninitialised
            assert name.endswith("position_ids"), name
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    return model


def ours_from_hf(hf_model) -> CLIP:
    hf_config = hf_model.config.to_dict()
    sd = from_hf(hf_model.state_dict(), hf_config)
    with torch.device("meta"):
        model = CLIP.from_config(infer_config(sd, **hf_options(hf_config)))
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def tokens_for(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    tokens[:, 0] = SOT
    for i in range(batch):
        n = 3 + 2 * i
        tokens[i, 1:n] = torch.randint(0, SOT, (n - 1,), generator=gen)
        tokens[i, n] = EOT
    return tokens


def features(output) -> torch.Tensor:
    """transformers 5 returns an output object (pooler_output holds the projection); 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def assert_rel_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x max |ref| {scale:.3g}"


@torch.no_grad()
def compare(hf_model, ours: CLIP, size: int, batch: int = 2) -> None:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=gen)
    tokens = tokens_for(batch, ours.context_length)
    assert_rel_close(ours.encode_image(images), features(hf_model.get_image_features(pixel_values=images)))
    assert_rel_close(ours.encode_text(tokens), features(hf_model.get_text_features(input_ids=tokens)))


def test_vit_b16_matches_transformers() -> None:
    hf_model = hf_clip(VIT_B16)
    ours = ours_from_hf(hf_model)
    c = ours.config
    vision = (c.embed_dim, c.vision_width, c.vision_layers, c.vision_patch_size, c.image_resolution)
    assert vision == (512, 768, 12, 16, 224)
    assert (c.transformer_width, c.transformer_heads, c.transformer_layers, c.context_length, c.vocab_size) == (
        512, 8, 12, 77, 49408)
    assert c.quick_gelu and c.vision_heads is None  # 12 = 768 // 64
    compare(hf_model, ours, 224)

    # Another input size: ours interpolates positions (bicubic), as HF with interpolate_pos_encoding.
    images = torch.randn(1, 3, 288, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ours.encode_image(images)
        ref = features(hf_model.get_image_features(pixel_values=images, interpolate_pos_encoding=True))
    assert out.shape == (1, 512) and torch.isfinite(out).all()
    assert_rel_close(out, ref)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_tiny_matches_transformers(act: str) -> None:
    hf_model = hf_clip(TINY, act=act)
    ours = ours_from_hf(hf_model)
    assert ours.config.quick_gelu is (act == "quick_gelu")
    assert ours.visual.transformer.resblocks[0].attn.heads == 4 and ours.transformer.resblocks[0].attn.heads == 2
    compare(hf_model, ours, 64)


def test_hf_save_pretrained_folder_loads(tmp_path: Path) -> None:
    """A folder written by transformers itself (its config.json conventions) loads with load_clip."""
    hf_model = hf_clip(TINY, act="gelu")
    hf_model.save_pretrained(tmp_path / "hf")
    ours = load_clip(tmp_path / "hf")
    assert ours.checkpoint_format == "hf" and ours.config.quick_gelu is False
    compare(hf_model, ours, 64)


def test_our_hf_folder_loads_in_transformers(tmp_path: Path) -> None:
    """save_clip(format="hf") writes a folder transformers' CLIPModel.from_pretrained reads."""
    ours = ours_from_hf(hf_clip(TINY, seed=3))
    save_clip(ours, tmp_path / "hf", format="hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_model = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    compare(hf_model, ours, 64)
