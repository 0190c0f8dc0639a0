"""ResCLIP (Yang et al., CVPR 2025, arXiv:2411.15851): residual attention for the last block.

On top of a base last block (NACLIP's by default, :mod:`reclip.strategies.last_block`),
ResCLIP changes the last block's attention twice (yvhangyang/ResCLIP @ 0e085f7,
``clip/model.py`` ``VisionTransformer.forward`` and ``custom_attn``):

- **RCS**, Residual Cross-correlation Self-attention (paper section 3.2): the attention
  maps softmax(q k^T s) of intermediate blocks (6..9 of ViT-B/16's 12), averaged per
  head, are mixed into the last block's attention AFTER its softmax:
  ``A = rcs_tau ((1 - rcs_lambda) A + rcs_lambda RCS)`` (rows sum to rcs_tau);
- **SFR**, Semantic Feedback Refinement (section 3.3): a first pass with RCS only
  segments the image against the head's text queries; patches of the same (query) label
  attend to each other: a same-label mask, pairs whose straight path leaves the label
  decayed, smoothed by a 1-D Gaussian along each row, rows normalised, divided by its
  max; it is mixed into the attention logits BEFORE the softmax (before NACLIP's
  Gaussian is added): ``L = sfr_tau ((1 - sfr_lambda) L + sfr_lambda SFR)``.

The blocks before the last run as CLIP trained them (the official ``custom_attn`` with
``use_custom_attn=False`` is plain q-k attention). Output per patch as every strategy:
``ln_post(x) @ proj``, L2-normalised.

Differences from the official code, each deliberate:

- batched: the official code assumes one image (``create_logit_temp``'s softmax loop
  replaces the batch by its first image; ``create_patch_matrix`` squeezes it); here every
  step is per image, so a batch of 2 gives two single-image results;
- images that are not a multiple of the patch are padded (as every reclip strategy);
  the first pass's logits are upsampled to the padded size and PAMR reads the padded
  image (the official code floors the grid and drops the remainder);
- float32 throughout: the official casts the SFR matrix to float16 (a no-op in its fp16
  inference, a rounding in float32); ``use_rcs``/``use_sfr`` are always on there
  (``self.use_rcs = use_rcs,`` makes a one-element tuple, which is truthy);
- ``path_check``: the official check samples ``t = k / max_steps`` for ``k <= steps``, so
  for a pair closer than the grid's largest distance it walks only the first
  ``steps / max_steps`` of the segment (an adjacent pair checks only its start);
  "line" (the default) walks the whole segment, "official" reproduces the published
  numbers (the ``resclip:`` sections of the published protocols select it; every official
  config sets ``delete_same_entity=True``), "off" is the segmentor's argument default
  ``delete_same_entity=False``.

SFR's labels are QUERY indices, as the official ``create_patch_matrix`` takes them (two
synonyms of a class are two labels; "query 0" is the first name of class 0):
``FeatureContext.queries`` holds one row per query. Under ReCLIP++ the rectifier
gives its fixed W_q, one row per class (:class:`reclip.heads.rectify.Rectifier`).

Settings not given in a protocol (a user's folder) are the official configs' for
COCO-Stuff (configs/cfg_coco_stuff164k.py: temp_thd 0.11, RCS (2.0, 0.4), SFR (1.8, 0.7)):
the segmentor's own argument defaults for them are ``None``, which raises
(``raise NotImplemented``), so every published run sets them in its config.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reclip.clip.model import CLIP, pad_to_patch, scale_block_number
from reclip.postprocess import pamr
from reclip.strategies.base import DenseStrategy, FeatureContext, project_patches
from reclip.strategies.last_block import LAST_BLOCK_PRESETS, LastBlock, attention_bias

__all__ = ["PATH_CHECKS", "ResidualAttention", "default_rcs_layers", "first_pass_labels", "same_label_mask",
           "semantic_feedback"]

PATH_CHECKS = ("line", "official", "off")

# ResCLIP model.py forward: ``torch.stack([attn_map[i] for i in range(5, 9)])`` over the 11
# blocks before the last of ViT-B/16: blocks 6..9 (1-based) of 12, i.e. 5..8 (0-based).
_RCS_START, _RCS_STOP, _PUBLISHED_DEPTH = 5, 9, 12

# Which logits each base attention builds before its softmax (the official custom_attn
# mixes the SFR term into each of them; SCLIP's two softmaxes are summed).
_LOGITS = {"normal": (("q", "k"),), "qq": (("q", "q"),), "kk": (("k", "k"),),
           "qq+kk": (("q", "q"), ("k", "k")), "kk+gaussian": (("k", "k"),)}


def default_rcs_layers(depth: int) -> tuple[int, ...]:
    """RCS blocks of a ``depth``-block tower: ResCLIP's 6..9 of 12 (0-based 5..8), the range
    scaled as :func:`reclip.clip.model.scale_block_number` scales a block, kept before the last
    block and never empty (e.g. (2,) of 4 blocks, (0,) of 2, 10..17 of ViT-L's 24)."""
    if depth < 2:
        raise ValueError(f"ResCLIP's RCS averages the attention of blocks before the last; this tower has {depth} "
                         f"block(s): run it with rcs=False")
    start = min(scale_block_number(_RCS_START, depth, _PUBLISHED_DEPTH), depth - 2)
    stop = max(min(scale_block_number(_RCS_STOP, depth, _PUBLISHED_DEPTH), depth - 1), start + 1)
    return tuple(range(start, stop))


@dataclass(frozen=True)
class ResidualAttention(DenseStrategy):
    """ResCLIP's last block: a base attention with RCS and SFR mixed in (module docstring).

    Attributes (sources: yvhangyang/ResCLIP @ 0e085f7; ``resclip_segmentor.py``
    ``ResCLIPSegmentation.__init__`` defaults, ``configs/cfg_*.py``, ``clip/model.py``):
        base: the last block it modifies, a :data:`~reclip.strategies.last_block.LAST_BLOCK_PRESETS`
            name other than MaskCLIP's (whose attention is the identity). "naclip": the
            paper's ResCLIP (``arch='wo_resi', attn_strategy='resclip'``, README's
            ``bash test_all.sh wo_resi resclip 5``); "raw", "sclip", "clearclip" are the
            official ``attn_strategy`` values vanilla / sclip / clearclip with their arch.
        rcs: mix RCS into the attention (``use_rcs=True``, base_config.py).
        rcs_layers: RCS blocks, 0-based; None: :func:`default_rcs_layers`.
        rcs_tau, rcs_lambda: ``attn_rcs_weights`` (cfg files; default COCO-Stuff's 2.0, 0.4).
        sfr: semantic feedback (``use_sfr=True``, base_config.py); reads the head's queries.
        sfr_tau, sfr_lambda: ``attn_sfr_weights`` (cfg files; default COCO-Stuff's 1.8, 0.7).
        temp_thd: first-pass pixels whose best query probability is below it take query 0
            (``temp_thd``, cfg files; default COCO-Stuff's 0.11).
        sfr_logit_scale: softmax temperature of the first pass (``logit_scale=40``, the
            segmentor default, passed to ``create_logit_temp``).
        sfr_pamr_iter, sfr_pamr_dilations: the first pass's PAMR (``create_logit_temp``:
            ``PAMR(10, dilations=(8, 16))``, hard-coded); 0 iterations: none.
        sfr_sigma: the 1-D Gaussian's standard deviation along the SFR rows, kernel
            ``min(N, int(6 sigma + 1))`` made odd (31 at sigma 5); the official passes
            ``gaussian_std`` (5, test_all.sh), NACLIP's sigma, to both.
        path_check: "line", "official" or "off" (module docstring); pairs failing it are
            scaled by ``exp(-steps / max_steps)``, steps the Chebyshev distance and
            max_steps the grid's largest (``generate_attention_sfr``, "Del_DelDecay").
    """

    kind: ClassVar[str] = "resclip"

    base: str = "naclip"
    rcs: bool = True
    rcs_layers: tuple[int, ...] | None = None
    rcs_tau: float = 2.0
    rcs_lambda: float = 0.4
    sfr: bool = True
    sfr_tau: float = 1.8
    sfr_lambda: float = 0.7
    temp_thd: float = 0.11
    sfr_logit_scale: float = 40.0
    sfr_pamr_iter: int = 10
    sfr_pamr_dilations: tuple[int, ...] = (8, 16)
    sfr_sigma: float = 5.0
    path_check: str = "line"

    def __post_init__(self) -> None:
        choices = [n for n, b in LAST_BLOCK_PRESETS.items() if b.attention != "identity"]
        if self.base not in choices:
            raise ValueError(f"resclip base={self.base!r}: give the last block ResCLIP modifies, one of {choices} "
                             f"(MaskCLIP's identity attention has no attention to mix into)")
        for name in ("rcs_tau", "sfr_tau", "sfr_logit_scale", "sfr_sigma"):
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise ValueError(f"resclip {name}={getattr(self, name)!r} must be a number > 0")
        for name in ("rcs_lambda", "sfr_lambda", "temp_thd"):
            if not _is_number(getattr(self, name)) or not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"resclip {name}={getattr(self, name)!r} must be a number in [0, 1]")
        if self.path_check not in PATH_CHECKS:
            raise ValueError(f"resclip path_check={self.path_check!r}; available: {list(PATH_CHECKS)}")
        if not _is_int(self.sfr_pamr_iter) or self.sfr_pamr_iter < 0:
            raise ValueError(f"resclip sfr_pamr_iter={self.sfr_pamr_iter!r} must be an integer >= 0 (0: no PAMR)")
        dilations = self.sfr_pamr_dilations
        if not isinstance(dilations, (list, tuple)) or not dilations or not all(
                _is_int(d) and d > 0 for d in dilations):
            raise ValueError(f"resclip sfr_pamr_dilations={dilations!r} must be positive integers (official: (8, 16))")
        object.__setattr__(self, "sfr_pamr_dilations", tuple(dilations))  # JSON / YAML give lists
        if self.rcs_layers is not None:
            layers = self.rcs_layers
            if (not isinstance(layers, (list, tuple)) or not layers or len(set(layers)) != len(layers)
                    or not all(_is_int(i) and i >= 0 for i in layers)):
                raise ValueError(f"resclip rcs_layers={layers!r} must be distinct block numbers >= 0 (0-based), "
                                 f"or None for ResCLIP's 6..9 of 12 scaled to the tower")
            object.__setattr__(self, "rcs_layers", tuple(layers))

    @property
    def needs_queries(self) -> bool:  # type: ignore[override]
        """SFR's first pass segments against the head's queries; RCS alone reads none."""
        return self.sfr

    @property
    def base_block(self) -> LastBlock:
        return LAST_BLOCK_PRESETS[self.base]

    def layers_for(self, depth: int) -> tuple[int, ...]:
        """The RCS blocks of a ``depth``-block tower, checked (0-based, all before the last)."""
        if self.rcs_layers is None:
            return default_rcs_layers(depth)
        bad = [i for i in self.rcs_layers if i > depth - 2]
        if bad:
            fit = f"blocks 0..{depth - 2}" if depth > 1 else "no block"
            raise ValueError(f"resclip rcs_layers={list(self.rcs_layers)}: {bad} are not before the last block of "
                             f"this {depth}-block tower; RCS can read {fit} (None: ResCLIP's 6..9 of 12 scaled)")
        return self.rcs_layers

    def features(self, clip: CLIP, images: Tensor, context: FeatureContext | None = None) -> Tensor:
        """CLIP-normalised images (B, 3, H, W) -> Z (B, D, h, w), float32, unit norm per patch."""
        visual = clip.visual
        depth = len(visual.transformer.resblocks)
        if self.rcs:
            layers = self.layers_for(depth)
            inter = visual.forward_intermediates(images, sorted({*layers, depth - 2}), qkv=True)
            tokens, grid = inter.tokens[depth - 2], inter.grid  # (B, T, width), T = 1 + h*w
            rcs = sum(_softmax_attention(*inter.qkv[i][:2]) for i in layers) / len(layers)  # (B, heads, T, T)
        else:
            tokens, grid = visual.forward_blocks(images, end=-1)
            rcs = None
        block = visual.transformer.resblocks[-1]
        qkv = block.attn.qkv(block.ln_1(tokens))  # each (B, heads, T, hd), shared by both passes
        feedback = None
        if self.sfr:
            queries = _queries(context, tokens.device)
            first = project_patches(clip, self._last_block(clip, tokens, qkv, grid, rcs, None), grid)  # (B, D, h, w)
            labels = first_pass_labels(first, queries, pad_to_patch(images, visual.patch_size), self)  # (B, h, w)
            feedback = semantic_feedback(labels, self.sfr_sigma, self.path_check)  # (B, T, T)
        return project_patches(clip, self._last_block(clip, tokens, qkv, grid, rcs, feedback), grid)

    def _last_block(self, clip: CLIP, tokens: Tensor, qkv: tuple[Tensor, Tensor, Tensor], grid: tuple[int, int],
                    rcs: Tensor | None, feedback: Tensor | None) -> Tensor:
        """The base last block with RCS / SFR mixed into its attention: (B, T, width) -> same."""
        block, base = clip.visual.transformer.resblocks[-1], self.base_block
        q, k, v = qkv
        attn = self.attention(q, k, grid, rcs, feedback)  # (B, heads, T, T) float32
        with _float32(v):
            mixed = attn @ v.float()
        out = block.attn.merge_heads(mixed.to(v.dtype))  # out_proj included
        if base.residual:
            out = tokens + out
        if base.ffn:
            out = out + block.mlp(block.ln_2(out))
        return out

    def attention(self, q: Tensor, k: Tensor, grid: tuple[int, int], rcs: Tensor | None = None,
                  feedback: Tensor | None = None) -> Tensor:
        """The last block's attention: q, k (B, heads, T, hd) -> (B, heads, T, T), float32.

        ResCLIP ``custom_attn``: per logit matrix L of the base, ``sfr_tau ((1 - sfr_lambda)
        L + sfr_lambda SFR)`` when ``feedback`` (B, T, T) is given, then the base's bias
        (NACLIP's Gaussian), softmax (SCLIP: two, summed), then
        ``rcs_tau ((1 - rcs_lambda) A + rcs_lambda RCS)`` when ``rcs`` (B, heads, T, T) is given.
        """
        with _float32(q):
            return self._attention(q, k, grid, rcs, feedback)

    def _attention(self, q: Tensor, k: Tensor, grid: tuple[int, int], rcs: Tensor | None,
                   feedback: Tensor | None) -> Tensor:
        base = self.base_block
        scale = q.shape[-1] ** -0.5
        qk = {"q": q.float(), "k": k.float()}
        bias = attention_bias(base, grid, device=q.device)  # (T, T) or None
        attn: Tensor | None = None
        for a, b in _LOGITS[base.attention]:
            logits = qk[a] @ qk[b].transpose(-1, -2) * scale  # (B, heads, T, T)
            if feedback is not None:
                logits = self.sfr_tau * ((1 - self.sfr_lambda) * logits + self.sfr_lambda * feedback[:, None])
            if bias is not None:
                logits = logits + bias
            probs = torch.softmax(logits, dim=-1)
            attn = probs if attn is None else attn + probs  # SCLIP: rows sum to 2
        assert attn is not None
        if rcs is not None:
            attn = self.rcs_tau * ((1 - self.rcs_lambda) * attn + self.rcs_lambda * rcs.float())
        return attn


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _float32(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``x``'s device: the attention maps, their mixing and the first pass are
    float32 even under the caller's bf16 autocast (which would run ``float() @ float()`` in bf16)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _softmax_attention(q: Tensor, k: Tensor) -> Tensor:
    """CLIP's own attention map of a block: softmax(q k^T / sqrt(d_head)), (B, heads, T, T) float32."""
    with _float32(q):
        return torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)


def _queries(context: FeatureContext | None, device: torch.device) -> Tensor:
    if context is None or context.queries is None:
        raise RuntimeError("resclip with sfr=True reads the head's text queries (FeatureContext.queries), but none "
                           "were given: build it under a head (ZeroShotSegmentor / Rectifier set them), pass "
                           "a FeatureContext, or use sfr=False")
    return context.queries.to(device=device, dtype=torch.float32)  # (S, D) float32, on the tokens' device


def first_pass_labels(features: Tensor, queries: Tensor, images: Tensor, strategy: ResidualAttention) -> Tensor:
    """SFR's first segmentation: Z (B, D, h, w), queries (S, D), padded images (B, 3, h p, w p)
    -> the query index of each patch (B, h, w), int64.

    ResCLIP ``create_logit_temp`` + ``create_patch_matrix``: cosines with every query
    (synonyms are separate labels, as the official), bilinear to the image, PAMR,
    softmax(logit_scale x) over queries, argmax; pixels whose best probability is below
    ``temp_thd`` take query 0; each patch takes the most frequent query of its pixels
    (``torch.mode``).
    """
    with _float32(features):
        return _first_pass_labels(features, queries, images, strategy)


def _first_pass_labels(features: Tensor, queries: Tensor, images: Tensor, strategy: ResidualAttention) -> Tensor:
    B, _, h, w = features.shape
    p = images.shape[-1] // w
    logits = torch.einsum("bdhw,sd->bshw", features.float(), queries)  # (B, S, h, w)
    logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    if strategy.sfr_pamr_iter:
        # reclip.postprocess.pamr is the official PAMR (visinf/1-stage-wseg, which ResCLIP's
        # pamr.py copies): the same affinities over the same neighbours, the masks already at
        # the image size (the official's align_corners=True resize is then the identity)
        logits = pamr(images, logits, strategy.sfr_pamr_iter, strategy.sfr_pamr_dilations)
    probs = torch.softmax(logits * strategy.sfr_logit_scale, dim=1)
    best, pixel_labels = probs.max(dim=1)  # (B, H, W)
    pixel_labels = pixel_labels.masked_fill(best < strategy.temp_thd, 0)
    tiles = pixel_labels.view(B, h, p, w, p).permute(0, 1, 3, 2, 4).reshape(B, h, w, p * p)
    return torch.mode(tiles, dim=-1).values  # (B, h, w)


def semantic_feedback(labels: Tensor, sigma: float, path_check: str = "line") -> Tensor:
    """The SFR matrix of patch labels (B, h, w) -> (B, T, T) float32, T = 1 + h*w, CLS row/column 0.

    ResCLIP ``generate_attention_sfr`` then ``custom_attn``'s ``attn_sfr / max``: 1 where two
    patches share a label (the diagonal always), pairs failing the path check scaled by
    ``exp(-steps / max_steps)``, a 1-D Gaussian (zero-padded) along each row of the
    flattened (N, N) matrix, ReLU, rows normalised (+1e-8), divided by its maximum.
    """
    B, h, w = labels.shape
    n = h * w
    same = same_label_mask(labels, path_check)  # (B, N, N)
    size = min(n, int(6 * sigma + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size, device=labels.device, dtype=torch.float32) - size // 2
    kernel = torch.exp(-x**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    blurred = F.relu(F.conv1d(same.reshape(B * n, 1, n), kernel.view(1, 1, -1), padding=size // 2))
    blurred = blurred.reshape(B, n, n)
    blurred = blurred / (blurred.sum(-1, keepdim=True) + 1e-8)
    feedback = torch.zeros(B, 1 + n, 1 + n, device=labels.device)
    feedback[:, 1:, 1:] = blurred
    return feedback / feedback.amax(dim=(1, 2), keepdim=True)


def same_label_mask(labels: Tensor, path_check: str = "line") -> Tensor:
    """Patch labels (B, h, w) -> (B, N, N) float32: 1 where two patches share a label, pairs
    failing ``path_check`` scaled by ``exp(-steps / max_steps)`` (ResCLIP
    ``generate_attention_sfr`` before its Gaussian; :func:`_path_geometry`)."""
    B, h, w = labels.shape
    flat = labels.reshape(B, h * w)
    same = (flat[:, :, None] == flat[:, None, :]).float()  # (B, N, N), diagonal 1
    if path_check == "off":
        return same
    points, valid, decay = _path_geometry(h, w, path_check, str(labels.device))
    on_path = (flat[:, points] == flat[:, :, None, None]) | ~valid  # (B, N, N, K): step k keeps the start's label
    return torch.where(on_path.all(-1), same, same * decay)


# A few grids: slide windows repeat one, whole images of a dataset come in a few shapes
# (VOC at 336: 21 x 28, 28 x 21, 21 x 32); ~90 MB each at 21 x 28, ~0.5 GB at 28 x 42.
@functools.lru_cache(maxsize=4)
def _path_geometry(h: int, w: int, path_check: str, device: str) -> tuple[Tensor, Tensor, Tensor]:
    """The straight path of every patch pair on an (h, w) grid, the same for every image.

    Returns points (N, N, K) int64, the flat patch index of each step; valid (N, N, K) bool,
    the steps that belong to the pair; decay (N, N) float32, ``exp(-steps / max_steps)``.
    "official": ResCLIP ``check_path``: point k at ``t = k / max_steps``, kept for
    ``k <= steps``; "line": point k at ``t = k / steps``, so the whole segment is walked.
    """
    n = h * w
    idx = torch.arange(n, device=device)
    coords = torch.stack([idx // w, idx % w], dim=-1)  # (N, 2) (row, col)
    start, end = coords[:, None, :], coords[None, :, :]  # (N, 1, 2), (1, N, 2)
    steps = (end - start).abs().amax(-1)  # (N, N) Chebyshev distance
    max_steps = max(int(steps.max()), 1)
    k = torch.arange(max_steps + 1, device=device)  # (K,)
    if path_check == "official":
        t = torch.linspace(0, 1, steps=max_steps + 1, device=device)  # (K,), as check_path builds it
    else:
        t = k / steps.clamp(min=1)[..., None]  # (N, N, K)
    t = t.expand(n, n, -1)[..., None]  # (N, N, K, 1)
    along = (start[:, :, None] * (1 - t) + end[:, :, None] * t).round().long()  # (N, N, K, 2)
    # "line" runs past the end (t > 1) on steps beyond a pair's own, which are not valid:
    # clamp them onto the grid so the gather stays in range
    along = torch.minimum(along.clamp(min=0), torch.tensor([h - 1, w - 1], device=device))
    points = along[..., 0] * w + along[..., 1]
    valid = k <= steps[..., None]
    decay = torch.exp(-steps.float() / max_steps)
    return points, valid, decay
