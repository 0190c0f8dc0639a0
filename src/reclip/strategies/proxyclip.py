"""ProxyCLIP (Lan et al., ECCV 2024, arXiv:2408.04883): CLIP's last-block attention
replaced by a proxy attention built from a vision foundation model's patch similarities.

Facts from the official code (mc-lan/ProxyCLIP @ e7b767f):

- ``proxyclip_segmentor.py`` ``forward_feature``: the crop, CLIP-normalised, is
  un-normalised and normalised with ImageNet's mean / std for the proxy model (no resize
  for DINO / DINOv2). The proxy features are its last block's output tokens after its final
  norm, patches only: DINO ``get_intermediate_layers(x)[0][:, 1:]`` (the qkv hook there is
  computed and unused), DINOv2 ``get_intermediate_layers(x, reshape=True)[0]`` (class and
  register tokens dropped). Default proxy: DINO ViT-B/8 (``torch.hub.load(
  'facebookresearch/dino:main', 'dino_vitb8')``; configs/base_config.py ``vfm_model='dino'``).
- ``open_clip/transformer.py`` ``VisionTransformer.forward`` / ``custom_attn``: blocks
  1..L-1 run as usual; the last block is ``custom_attn(blk.attn, blk.ln_1(x))`` alone (no
  residual, no FFN):

  * F = the proxy features L2-normalised over channels, S = F^T F (patch cosines);
  * S = (S - mean(S) * beta) * gamma, beta 1.2, gamma 3.0 (``ProxyCLIPSegmentation``
    defaults, no config changes them); entries < 0 set to -inf; softmax over keys; the same
    attention for every head;
  * CLIP's values: v of the last block (``in_proj`` on ``ln_1(x)``), patch tokens only,
    per head reshaped to CLIP's patch grid and resized bilinearly (align_corners=False) to
    the PROXY's grid; out = out_proj(A v);
  * then ln_post and proj; the logits live on the proxy's grid.

Differences, each a named setting or stated here:

- ``mean_over``: the official ``torch.mean(similarity)`` averages over the whole batch,
  so an image's attention depends on the other images in its batch; "image" (default)
  takes each image's own mean, which is the official value: the official code runs one
  crop per forward. "batch" keeps the official reduction over whatever one forward holds
  (reclip's slide mode batches windows of several images, so it is not the official value
  there; it is for reproducing the official code's behaviour on a batch).
- A row whose every entry falls below 0 (an image whose patches are all alike, so
  mean * beta > 1) is all -inf in the official code and gives NaN; here such a row keeps
  its diagonal (each patch attends to itself), which changes nothing else.
- The official code takes both proxy grid sides from the crop's HEIGHT (``I, J =
  imgs_norm.shape[-2] // p, imgs_norm.shape[-2] // p``), i.e. it assumes square crops; here
  the grid is the proxy model's own, any shape. The official code pads each crop, centred,
  to a multiple of 56 so that both models' grids cover the same pixels; here the input is
  padded at the bottom/right (reclip's rule for every model) to a multiple of both patches
  (lcm(16, 8) = 16 for ViT-B/16 with DINO ViT-B/8, lcm(16, 14) = 112 with DINOv2), and Z is
  cropped back to the proxy cells of the input.
- The similarities, their threshold and the softmax run in float32 even under autocast.
- fp16 in the official code; reclip runs the proxy under the caller's autocast (bf16 on CUDA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reclip.clip.model import CLIP
from reclip.data.transforms import IMAGENET_MEAN, IMAGENET_STD, renormalise
from reclip.strategies.base import DenseStrategy, FeatureContext

__all__ = ["MEAN_OVER", "ProxyAttention", "ProxyFeatures", "proxy_attention"]

MEAN_OVER = ("image", "batch")


class ProxyFeatures(nn.Module):
    """A proxy model read the way ProxyCLIP reads it: CLIP-normalised images ->
    (B, C, h, w) patch features of its last block after its final norm, on its own grid.

    Args:
        model: a DINO / DINOv2 ViT (:mod:`reclip.backbones.dino`) or any module with
            ``patch_size`` and ``patch_features(images) -> (B, C, h, w)`` on images
            normalised with ``mean`` / ``std``.
        clip_norm: (mean, std) of the images it is given (CLIP's, 0..1 scale).
        mean, std: the proxy's own input normalisation (ImageNet's for DINO / DINOv2).
    """

    def __init__(self, model: nn.Module, clip_norm: tuple, mean: tuple = IMAGENET_MEAN,
                 std: tuple = IMAGENET_STD) -> None:
        super().__init__()
        self.model = model
        self.clip_norm = (tuple(clip_norm[0]), tuple(clip_norm[1]))
        self.norm = (tuple(mean), tuple(std))

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_size)

    def forward(self, images: Tensor) -> Tensor:
        """CLIP-normalised (B, 3, H, W) -> (B, C, ceil(H / p), ceil(W / p))."""
        x = renormalise(images, self.clip_norm, self.norm)  # ProxyCLIP: self.norm(self.unnorm(img))
        p = self.patch_size
        x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))
        return self.model.patch_features(x)


def proxy_attention(proxy: Tensor, beta: float, gamma: float, mean_over: str = "image") -> Tensor:
    """ProxyCLIP's attention from proxy features: (B, C, h, w) -> (B, h*w, h*w), rows sum to 1.

    ``custom_attn``: cosine of the channel-normalised features, ``(S - mean(S) * beta) *
    gamma``, negatives -> -inf, softmax over keys. A row with nothing left keeps its diagonal.
    """
    with torch.autocast(device_type=proxy.device.type, enabled=False):  # thresholds on bf16 cosines would flip
        f = F.normalize(proxy.flatten(2).float(), dim=1)  # (B, C, N)
        sim = torch.einsum("bcm,bcn->bmn", f, f)  # (B, N, N)
        mean = sim.mean() if mean_over == "batch" else sim.mean(dim=(1, 2), keepdim=True)
        logits = (sim - mean * beta) * gamma
        keep = logits >= 0.0
        keep = keep | (~keep.any(-1, keepdim=True) & torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device))
        return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)


@dataclass(frozen=True)
class ProxyAttention(DenseStrategy):
    """ProxyCLIP's strategy (see the module docstring for the sources).

    Attributes:
        proxy: the proxy model: a name of :data:`reclip.backbones.dino.DINO_MODELS` (downloaded
            and sha256-checked on first use) or the path of its official checkpoint
            (``--proxy SPEC``); default DINO ViT-B/8, the official default.
        beta: the similarity offset, ``S - mean(S) * beta`` (official 1.2).
        gamma: the similarity scale (official 3.0).
        mean_over: "image" (each image's mean; the official value at its batch of 1) or
            "batch" (the official reduction over the whole batch).
    """

    kind = "proxyclip"

    proxy: str = "dino_vitb8"
    beta: float = 1.2
    gamma: float = 3.0
    mean_over: str = "image"

    def __post_init__(self) -> None:
        if self.mean_over not in MEAN_OVER:
            raise ValueError(f"ProxyAttention.mean_over={self.mean_over!r}; allowed: {list(MEAN_OVER)}")
        for name in ("beta", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ProxyAttention.{name} must be a finite number, got {value!r}")
        if not self.gamma > 0:
            raise ValueError(f"ProxyAttention.gamma must be > 0, got {self.gamma!r}")
        if not isinstance(self.proxy, str) or not self.proxy:
            raise ValueError(f"ProxyAttention.proxy must be a proxy model name or a checkpoint path, got {self.proxy!r}")

    def build_aux(self, clip: CLIP) -> nn.Module:
        from reclip.backbones.dino import load_dino  # the proxy model is only loaded when used

        return ProxyFeatures(load_dino(self.proxy), (clip.image_mean, clip.image_std))

    def stride(self, clip: CLIP, aux: nn.Module | None) -> int:
        """Z lives on the proxy's patch grid."""
        return aux.patch_size if aux is not None else clip.visual.patch_size

    def features(self, clip: CLIP, images: Tensor, context: FeatureContext | None = None) -> Tensor:
        if context is None or context.aux is None:
            raise RuntimeError("ProxyCLIP needs its proxy model: build it with DenseCLIP(clip, strategy) or pass "
                               "FeatureContext(aux=strategy.build_aux(clip))")
        visual = clip.visual
        p = context.aux.patch_size
        rows, cols = -(-images.shape[-2] // p), -(-images.shape[-1] // p)  # the proxy cells of the input
        # both models read the same pixels: pad to a multiple of both patches (the official: of 56)
        common = math.lcm(visual.patch_size, p)
        images = F.pad(images, (0, (-images.shape[-1]) % common, 0, (-images.shape[-2]) % common))
        tokens, (h, w) = visual.forward_blocks(images, end=-1)  # (B, 1 + h*w, width)
        block = visual.transformer.resblocks[-1]
        _, _, v = block.attn.qkv(block.ln_1(tokens))  # (B, heads, 1 + h*w, hd); q and k unused
        proxy = context.aux(images)  # (B, C, H', W'), the same extent as CLIP's (h, w)
        B, heads, _, hd = v.shape
        H, W = proxy.shape[-2:]
        v = v[:, :, 1:].reshape(B * heads, h, w, hd).permute(0, 3, 1, 2)  # CLIP's grid
        v = F.interpolate(v, size=(H, W), mode="bilinear", align_corners=False)  # -> the proxy's grid
        v = v.reshape(B, heads, hd, H * W).transpose(-1, -2)  # (B, heads, H'W', hd)
        attn = proxy_attention(proxy, self.beta, self.gamma, self.mean_over).to(v.dtype)  # (B, N, N)
        out = block.attn.merge_heads(attn[:, None] @ v)  # same attention for every head; out_proj
        z = F.normalize(visual.project(out).float(), dim=-1)  # no residual, no FFN; ln_post, proj
        return z.transpose(1, 2).reshape(B, -1, H, W)[:, :, :rows, :cols]
