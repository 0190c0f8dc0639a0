"""DINO's multi-crop augmentation, vectorised over a batch of toy-world images (torch only).

Caron et al. 2021 (DINO), facebookresearch/dino @ 7c446df ``main_dino.py``
``DataAugmentationDINO``: two global crops and ``local_crops_number`` local crops of every
image, each a random resized crop, a horizontal flip (p 0.5), colour jitter
(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1; p 0.8), greyscale (p 0.2), then
Gaussian blur (first global crop p 1.0, second 0.1, locals 0.5) and solarisation (second
global crop only, p 0.2), then ImageNet normalisation.

torchvision is not a dependency of reclip, so the transforms are re-derived from their
torchvision definitions and run on a whole batch at once. Differences, all stated here:

- crops are resampled bilinearly with ``grid_sample`` (torchvision: bicubic on PIL images);
- the four jitters are applied in a fixed order (brightness, contrast, saturation, hue),
  not torchvision's random permutation;
- hue is shifted by rotating the chroma plane of YIQ (a linear approximation of the HSV
  hue shift) - and the toy default is no hue jitter (see :class:`MultiCropConfig`);
- blur radii (PIL ``GaussianBlur`` sigma 0.1..2.0 on 224 px crops) are scaled to the toy
  crop size, so that a blur hides the same share of the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from reclip.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["MultiCropConfig", "multi_crop", "random_resized_crop"]

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what torchvision's rgb_to_grayscale uses
OFFICIAL_CROP = 224  # DINO's global crop size, the reference for the blur radii


@dataclass(frozen=True)
class MultiCropConfig:
    """Crop sizes and augmentation strengths (DINO's defaults unless said otherwise).

    Attributes:
        global_size, local_size: crop sides in px. DINO: 224 and 96 on ImageNet; the toy
            world's images are 96 px, so global crops keep 96 and local crops take 48 (6 x 6
            patches of 8, DINO's 96/224 ratio rounded to whole patches).
        global_scale, local_scale: area ranges of the random resized crops (DINO's
            ``global_crops_scale`` (0.4, 1.0), ``local_crops_scale`` (0.05, 0.4)).
        local_crops: local crops per image (DINO default 8; fewer here for CPU minutes).
        hue: hue jitter. DINO: 0.1 (36 degrees); the toy world's look-alike classes share a
            hue and its other classes differ by as little as ~15 degrees (red apple, orange
            flower), so a hue-invariant proxy would merge them: 0 here.
    """

    global_size: int = 96
    local_size: int = 48
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    local_crops: int = 4
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.0
    grey_prob: float = 0.2
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, locals
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # px at 224 px
    solarize_prob: float = 0.2  # second global crop only
    solarize_threshold: float = 128 / 255  # PIL ImageOps.solarize default


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def random_resized_crop(images: Tensor, size: int, scale: tuple[float, float], flip_prob: float,
                        g: torch.Generator) -> Tensor:
    """(N, 3, H, W) in 0..1 -> (N, 3, size, size): torchvision ``RandomResizedCrop.get_params``
    (area share in ``scale``, log-uniform aspect 3/4..4/3, 10 tries, else the whole image),
    then a horizontal flip with probability ``flip_prob``."""
    n, _, height, width = images.shape
    tries = 10
    area = _uniform(n * tries, *scale, g).view(n, tries) * height * width
    log_ratio = _uniform(n * tries, math.log(3 / 4), math.log(4 / 3), g).view(n, tries)
    w = torch.sqrt(area * log_ratio.exp()).round()
    h = torch.sqrt(area / log_ratio.exp()).round()
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.int().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    w = torch.where(first >= 0, w[rows, first.clamp(min=0)], torch.full((n,), float(width)))
    h = torch.where(first >= 0, h[rows, first.clamp(min=0)], torch.full((n,), float(height)))
    top = torch.floor(torch.rand(n, generator=g) * (height - h + 1))
    left = torch.floor(torch.rand(n, generator=g) * (width - w + 1))
    flip = torch.where(torch.rand(n, generator=g) < flip_prob, -1.0, 1.0)
    # Affine grid (align_corners=False): output [-1, 1] -> the crop's box in the input's [-1, 1].
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w / width * flip
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grey(x: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    return torch.einsum("nchw,c->nhw", x, torch.tensor(LUMA)).unsqueeze(1)


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """torchvision ``_blend``: factor * a + (1 - factor) * b, clamped to 0..1; factor (N,)."""
    return (factor.view(-1, 1, 1, 1) * a + (1 - factor.view(-1, 1, 1, 1)) * b).clamp(0, 1)


def _shift_hue(x: Tensor, turns: Tensor) -> Tensor:
    """Rotate the chroma (I, Q) of YIQ by ``turns`` (N,) of a full turn (approximates HSV hue)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    yiq = torch.einsum("ij,njhw->nihw", to_yiq, x)
    angle = 2 * math.pi * turns.view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], i * angle.cos() - q * angle.sin(), i * angle.sin() + q * angle.cos()], 1)
    return torch.einsum("ij,njhw->nihw", torch.linalg.inv(to_yiq), yiq).clamp(0, 1)


def _colour(x: Tensor, c: MultiCropConfig, g: torch.Generator) -> Tensor:
    """RandomApply(ColorJitter, p) then RandomGrayscale(p), per image."""
    n = x.shape[0]
    on = torch.rand(n, generator=g) < c.jitter_prob

    def factor(strength: float) -> Tensor:  # torchvision: uniform(1 - s, 1 + s), 1 when off
        return torch.where(on, _uniform(n, max(0.0, 1 - strength), 1 + strength, g), torch.ones(n))

    x = _blend(x, torch.zeros_like(x), factor(c.brightness))
    x = _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True), factor(c.contrast))
    x = _blend(x, _grey(x), factor(c.saturation))
    if c.hue:
        x = _shift_hue(x, torch.where(on, _uniform(n, -c.hue, c.hue, g), torch.zeros(n)))
    grey = (torch.rand(n, generator=g) < c.grey_prob).view(-1, 1, 1, 1)
    return torch.where(grey, _grey(x).expand_as(x), x)


def _blur(x: Tensor, prob: float, c: MultiCropConfig, g: torch.Generator) -> Tensor:
    """DINO's GaussianBlur(p): a per-image sigma uniform in ``blur_sigma`` (scaled to the crop)."""
    n, channels, height, width = x.shape
    scale = height / OFFICIAL_CROP
    sigma = _uniform(n, *c.blur_sigma, g) * scale  # (N,)
    on = torch.rand(n, generator=g) < prob
    radius = max(1, math.ceil(3 * c.blur_sigma[1] * scale))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (N, 2r + 1)
    kernel = kernel.repeat_interleave(channels, 0)  # one kernel per image and channel
    flat = x.reshape(1, n * channels, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, 2 * radius + 1), groups=n * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, 2 * radius + 1, 1), groups=n * channels)
    return torch.where(on.view(-1, 1, 1, 1), flat.view_as(x), x)


def _normalise(x: Tensor) -> Tensor:
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def multi_crop(images: Tensor, config: MultiCropConfig, g: torch.Generator) -> list[Tensor]:
    """uint8-range (N, H, W, 3) or 0..1 (N, 3, H, W) images -> [global 1, global 2, local 1, ...],
    each (N, 3, size, size), ImageNet-normalised (DINO's input)."""
    if images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2).float().div(255.0)
    c = config
    crops = []
    for index in range(2 + c.local_crops):
        local = index >= 2
        x = random_resized_crop(images, c.local_size if local else c.global_size,
                                c.local_scale if local else c.global_scale, c.flip_prob, g)
        x = _colour(x, c, g)
        x = _blur(x, c.blur_probs[min(index, 2)], c, g)
        if index == 1 and c.solarize_prob:
            on = (torch.rand(x.shape[0], generator=g) < c.solarize_prob).view(-1, 1, 1, 1)
            x = torch.where(on & (x >= c.solarize_threshold), 1 - x, x)
        crops.append(_normalise(x))
    return crops
