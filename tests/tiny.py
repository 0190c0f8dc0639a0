"""The tiny random CLIP that tests build: one definition instead of a copy per test file.

    from tiny import tiny_clip
    clip = tiny_clip()                                   # TINY, seed 0, eval mode
    clip = tiny_clip(1, vision_layers=2, perturb=0.05)   # another seed and shape, noisy biases
"""

from __future__ import annotations

import torch

from reclip.clip.model import CLIP

# 32-d embeddings; 32 px images in 8 px patches (a 4 x 4 grid); the real 77-token context
# and 49408-token vocabulary, so the BPE tokenizer's ids fit; widths of 64 with one head,
# OpenAI's width // 64 convention, so every checkpoint format reloads it without a config.
TINY = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)


def tiny_clip(seed: int = 0, *, perturb: float = 0.0, **overrides) -> CLIP:
    """A random CLIP of shape ``TINY | overrides`` drawn with ``seed``, in eval mode.

    ``perturb`` adds N(0, perturb^2) noise to every tensor, so that biases (0) and
    LayerNorm affines (1) are not at their initial values and a skipped bias or LayerNorm
    changes the output. Keyword arguments of ``CLIP`` not in TINY (``vision_heads``,
    ``quick_gelu``, ``image_mean``, ...) are passed on.
    """
    torch.manual_seed(seed)
    model = CLIP(**{**TINY, **overrides})
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
    return model.eval()


def tiny_dino(seed: int = 0, patch: int = 8, width: int = 64, depth: int = 2):
    """A random DINO (v1 layout) ViT, eval mode: a ProxyCLIP proxy for tests. Patch 8 by
    default, TINY CLIP's, so Z keeps CLIP's grid."""
    from reclip.backbones.dino.model import DinoConfig, DinoViT

    torch.manual_seed(seed)
    config = DinoConfig("dino", patch_size=patch, width=width, depth=depth, heads=width // 64,  # as official: 64 a head
                        mlp_hidden=2 * width, pos_grid=8)
    model = DinoViT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def tiny_dino_file(path, **kwargs):
    """:func:`tiny_dino` written as an official-layout .pth at ``path`` (``ProxyAttention(proxy=str(path))``,
    ``--proxy PATH``); returns ``path``."""
    torch.save(tiny_dino(**kwargs).state_dict(), path)
    return path
