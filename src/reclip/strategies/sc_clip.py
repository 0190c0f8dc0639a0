"""SC-CLIP, Self-Calibrated CLIP (Bai et al., arXiv:2411.15869): a dense-feature strategy.

Read from the official code, SuleBai/SC-CLIP @ 0417ba9 (``clip/model.py``
``VisionTransformer.forward`` / ``custom_attn`` / ``adaptively_aggregate`` /
``mean_interpolation`` / ``lof_pytorch``; ``configs/base_config.py``). Layers are
counted as "tokens after n blocks" (n = 0: the embedding after ln_pre), so the official
``feats_list[i]`` is n = i + 1. On a 12-block ViT-B/16:

1. blocks 1..11 run as usual; the outputs after 4..10 blocks are kept;
2. anomaly tokens: the local outlier factor (LOF, k = 30 neighbours) of every patch token
   after 11 blocks; tokens whose LOF is strictly above the 0.95 quantile of the image's
   LOFs are outliers, each replaced by the mean of its non-outlier 8-neighbours in the
   patch grid (kept if it has none). The same replacement is made in the tokens after
   9 blocks;
3. S9 = cosine similarity of the (replaced) patch tokens after 9 blocks; the patch
   tokens are aggregated with S9 (entries < 0.4 set to 0, rows divided by their sum + 1e-6);
4. the last block on the patches only, attention only: the weights are
   [softmax(M) + softmax(k k^T d_head^-0.5)] / 2, M = 3 (S9 - mean(S9)) with negative
   entries set to -inf (one M for every head; q is unused), then out_proj; no residual,
   no FFN; + 0.3 x the CLS token after 11 blocks (before any replacement) on every patch;
5. multi-level fusion: R = the sum of the tokens after 4..10 blocks (none replaced);
   r = the same attention on ln_1(R's patches) + 0.3 x R's CLS;
6. both x and r are aggregated with S4 (the cosine similarity after 4 blocks, entries
   < 0.4 set to 0, not replaced), summed; output ln_post(.) @ proj, L2-normalised.

The official code's first version (74471da, Nov 2024, the month of the paper) found the
anomaly tokens differently: the 10 patch tokens of largest L2 norm after 11 blocks, with a
comment that this and sklearn's LOF (n_neighbors=30, contamination=0.05) give the same
results; 0417ba9 (Mar 2025) replaced it by the torch LOF below. ``outlier_detector="norm"``
is that first version.

The LOF is the official one, which differs from the textbook LOF (Breunig et al. 2000):
distances are SQUARED Euclidean, and the reach distance of p to a neighbour o is
max(d(p, o), kdist(p)) = kdist(p) (the textbook uses kdist(o)), so the local reachability
density is 1 / kdist(p) and LOF(p) = mean over p's k neighbours o of kdist(p) / kdist(o).

Differences from the official code, none of which changes its published numbers:

- batched: the official code squeezes the batch to 1 (its S9 is repeated over heads in an
  order that mixes images when B > 1); here LOF, quantile, similarities and attention are
  per image, for all images at once, equal to running each image alone;
- the outlier's (row, col) is (index // w, index % w) for a row-major (h, w) grid; the
  official line divides by the number of rows (``index // feat_w`` where ``feat_w`` is the
  height), which is the same on the square 14 x 14 windows of its protocol (224 px crops)
  and indexes outside the grid on non-square ones;
- k is clamped to the number of other patches (h*w - 1) for small grids (the official
  ``topk`` fails there); a one-patch grid has no outliers;
- a token's own distance is excluded from its neighbours explicitly (the official code drops
  the nearest one, which is itself unless a duplicate ties it: same distances either way),
  and a k-distance of 0 (k + 1 identical tokens) is clamped to the smallest float, so LOF
  stays finite where the official one gives NaN scores (then no outlier, and its
  ``mean_interpolation`` fails on the empty index list);
- the diagonal of M is never masked (it is >= 0 exactly; only rounding could make it
  negative and a row all -inf);
- both S4 aggregations are one product on x + r (the map is linear);
- the official numbers come from fp16 weights on CUDA (``clip.load``); here the tower's
  own dtype, with LOF in float32;
- towers of another depth: the layer numbers are scaled, ``round(L * n / 12)`` clamped to
  ``0 .. L - 1`` (:func:`reclip.clip.model.scale_block_number`); ``layer_depth=None``
  takes them as given and a number that does not fit the tower raises.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from reclip.clip.model import CLIP, ResidualAttentionBlock, scale_block_number
from reclip.strategies.base import DenseStrategy, FeatureContext, project_patches
from reclip.strategies.last_block import LastBlock, _attend

__all__ = ["OUTLIER_DETECTORS", "SelfCalibrated", "local_outlier_factor", "lof_outliers", "norm_outliers",
           "replace_outliers", "thresholded_rows"]

# "lof": SuleBai/SC-CLIP @ 0417ba9 (HEAD); "norm": the largest L2 norms, @ 74471da (first version).
OUTLIER_DETECTORS = ("lof", "norm")

# The k-k half of the last block's attention, through the last-block machinery.
_KK = LastBlock("kk", residual=False, ffn=False)
# adaptively_aggregate: rows / (sum + 1e-6) (SuleBai/SC-CLIP clip/model.py).
_ROW_EPS = 1e-6


@dataclass(frozen=True)
class SelfCalibrated(DenseStrategy):
    """SC-CLIP's self-calibrated last block (see the module docstring for the steps).

    Layer numbers count blocks run ("tokens after n blocks"); they are written for a
    ``layer_depth``-block tower and scaled to others (None: used as given).

    Attributes:
        outlier_detector: how anomaly tokens are found, one of :data:`OUTLIER_DETECTORS`:
            "lof" (the official code at 0417ba9) or "norm" (the largest L2 norms, at 74471da).
        norm_outliers: how many tokens "norm" marks per image (clamped to h*w). 74471da
            clip/model.py ``sorted_indices[:10]``.
        lof_neighbors: LOF's k. SuleBai/SC-CLIP clip/model.py ``lof_pytorch(n_neighbors=30)``.
        lof_quantile: outliers have LOF strictly above this quantile of the image's LOFs
            (linear interpolation, ``torch.quantile``). ``lof_pytorch(contamination=0.05)``:
            ``LOF > quantile(1 - 0.05)``.
        attention_layer: S9's layer, whose similarity aggregates the tokens before the last
            block and builds its attention. configs/base_config.py ``pre_adjust_idx=8``
            (``feats_list[8]``: after 9 blocks).
        aggregation_layer: S4's layer, whose similarity aggregates the last block's output.
            ``post_adjust_idx=3`` (after 4 blocks).
        similarity_threshold: similarities below it are set to 0 before aggregating.
            clip/model.py ``self.beta = 0.4``.
        attention_scale: M = attention_scale (S9 - mean S9). ``custom_attn``: ``* 3.0``.
        cls_weight: the CLS token added to every patch after the last block's attention.
            ``res_cls=0.3``.
        fusion_layers: (first, last) layers summed for the multi-level fusion, inclusive.
            ``multi_start_idx=3, multi_end_idx=10``: ``feats_list[3:10]``, after 4..10 blocks.
        layer_depth: the tower depth the layer numbers are written for (ViT-B/16: 12), or
            None to use them as given on any tower.
    """

    kind = "sc_clip"

    outlier_detector: str = "lof"
    norm_outliers: int = 10
    lof_neighbors: int = 30
    lof_quantile: float = 0.95
    attention_layer: int = 9
    aggregation_layer: int = 4
    similarity_threshold: float = 0.4
    attention_scale: float = 3.0
    cls_weight: float = 0.3
    fusion_layers: tuple[int, int] = (4, 10)
    layer_depth: int | None = 12

    def __post_init__(self) -> None:
        def integer(value: object) -> bool:
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        def real(value: object) -> bool:
            return isinstance(value, numbers.Real) and not isinstance(value, bool)

        name = type(self).__name__
        if self.outlier_detector not in OUTLIER_DETECTORS:
            raise ValueError(f"{name}.outlier_detector={self.outlier_detector!r}: give one of "
                             f"{list(OUTLIER_DETECTORS)} (SC-CLIP: 'lof')")
        if not (integer(self.norm_outliers) and self.norm_outliers >= 0):
            raise ValueError(f"{name}.norm_outliers={self.norm_outliers!r}: give how many tokens the 'norm' "
                             f"detector marks per image, an integer >= 0 (SC-CLIP 74471da: 10)")
        if not (integer(self.lof_neighbors) and self.lof_neighbors >= 1):
            raise ValueError(f"{name}.lof_neighbors={self.lof_neighbors!r}: give LOF's k, an integer >= 1 "
                             f"(SC-CLIP: 30)")
        if not (real(self.lof_quantile) and 0 < self.lof_quantile <= 1):
            raise ValueError(f"{name}.lof_quantile={self.lof_quantile!r}: give the LOF quantile above which a "
                             f"token is an outlier, in (0, 1] (SC-CLIP: 0.95 = 1 - contamination 0.05)")
        if not (real(self.similarity_threshold) and -1 <= self.similarity_threshold <= 1):
            raise ValueError(f"{name}.similarity_threshold={self.similarity_threshold!r}: give a cosine "
                             f"similarity in [-1, 1] (SC-CLIP: 0.4)")
        if not (real(self.attention_scale) and self.attention_scale > 0):
            raise ValueError(f"{name}.attention_scale={self.attention_scale!r}: give a scale > 0 (SC-CLIP: 3)")
        if not real(self.cls_weight):
            raise ValueError(f"{name}.cls_weight={self.cls_weight!r}: give a number (SC-CLIP: 0.3)")
        if self.layer_depth is not None and not (integer(self.layer_depth) and self.layer_depth >= 2):
            raise ValueError(f"{name}.layer_depth={self.layer_depth!r}: give the depth the layer numbers are "
                             f"written for (>= 2; ViT-B/16: 12), or None to use them as given")
        if isinstance(self.fusion_layers, list):  # YAML / JSON give lists
            object.__setattr__(self, "fusion_layers", tuple(self.fusion_layers))
        fusion = self.fusion_layers
        if not (isinstance(fusion, tuple) and len(fusion) == 2 and all(integer(n) for n in fusion)
                and 0 <= fusion[0] <= fusion[1]):
            raise ValueError(f"{name}.fusion_layers={fusion!r}: give (first, last), the layers summed for the "
                             f"fusion, 0 <= first <= last (SC-CLIP: (4, 10))")
        top = None if self.layer_depth is None else self.layer_depth - 1
        for field, n in (("attention_layer", self.attention_layer), ("aggregation_layer", self.aggregation_layer),
                         ("fusion_layers", fusion[1])):
            if not (integer(n) and n >= 0 and (top is None or n <= top)):
                where = "" if top is None else f" <= {top} (tokens after at most {top} blocks of {top + 1})"
                raise ValueError(f"{name}.{field}={getattr(self, field)!r}: give layer numbers >= 0{where}")

    def layers(self, depth: int) -> tuple[int, int, range]:
        """(attention layer, aggregation layer, fusion layers) on a ``depth``-block tower.

        Each is "tokens after n blocks", 0 <= n <= depth - 1 (the last block is SC-CLIP's own).
        """
        chosen = (self.attention_layer, self.aggregation_layer, *self.fusion_layers)
        if self.layer_depth is not None:
            chosen = tuple(scale_block_number(n, depth, self.layer_depth) for n in chosen)
        elif max(chosen) > depth - 1:
            given = {"attention_layer": self.attention_layer, "aggregation_layer": self.aggregation_layer,
                     "fusion_layers": self.fusion_layers}
            bad = ", ".join(f"{k}={v}" for k, v in given.items() if max(v if isinstance(v, tuple) else (v,)) >= depth)
            raise ValueError(
                f"{type(self).__name__}({bad}) does not fit this {depth}-block vision tower: give layers "
                f"0..{depth - 1} (tokens after n blocks), or layer_depth=12 to scale SC-CLIP's published ones")
        attention, aggregation, first, last = chosen
        return attention, aggregation, range(first, last + 1)

    def features(self, clip: CLIP, images: Tensor, context: FeatureContext | None = None) -> Tensor:
        """CLIP-normalised images (B, 3, H, W) -> Z (B, D, h, w), float32, unit norm per patch."""
        visual = clip.visual
        blocks = visual.transformer.resblocks
        attention_n, aggregation_n, fusion = self.layers(len(blocks))
        x, grid = visual.embed(images)  # tokens after 0 blocks, (B, 1 + h*w, width)
        kept: dict[int, Tensor] = {}
        fused: Tensor | None = None
        for n in range(len(blocks)):  # x: tokens after n blocks
            if n > 0:
                x = blocks[n - 1](x)
            if n in (attention_n, aggregation_n):
                kept[n] = x
            if n in fusion:  # summed in the official order (feats_list[3] + ... + feats_list[9])
                fused = x if fused is None else fused + x
        assert fused is not None  # layers() keeps the fusion range inside 0..L-1

        cls, patches = x[:, :1], x[:, 1:]  # after L-1 blocks: (B, 1, width), (B, N, width)
        if self.outlier_detector == "lof":
            outliers = lof_outliers(patches, self.lof_neighbors, self.lof_quantile)  # (B, N)
        else:
            outliers = norm_outliers(patches, self.norm_outliers)
        patches = replace_outliers(patches, outliers, grid)
        s_attention = cosine_similarity(replace_outliers(kept[attention_n][:, 1:], outliers, grid))  # (B, N, N)
        s_aggregation = cosine_similarity(kept[aggregation_n][:, 1:])  # not replaced (official)
        weights = similarity_attention(s_attention, self.attention_scale)  # (B, N, N), rows sum to 1

        last = blocks[-1]
        x = thresholded_rows(s_attention, self.similarity_threshold) @ patches
        x = calibrated_attention(last, last.ln_1(x), weights) + self.cls_weight * cls
        r = calibrated_attention(last, last.ln_1(fused[:, 1:]), weights) + self.cls_weight * fused[:, :1]
        x = thresholded_rows(s_aggregation, self.similarity_threshold) @ (x + r)  # (B, N, width)
        # project_patches drops the first token: put the CLS row back in front of the patches
        return project_patches(clip, torch.cat([cls, x], dim=1), grid)


# --- the steps, each on a batch ----------------------------------------------------------

def local_outlier_factor(tokens: Tensor, k: int) -> Tensor:
    """SC-CLIP's LOF of each token among the others of its image: (B, N, C) -> (B, N) float32.

    Squared Euclidean distances; kdist(p) = the distance to p's k-th nearest other token;
    LOF(p) = mean over p's k nearest o of kdist(p) / kdist(o) (the official ``lof_pytorch``:
    reach distance max(d, kdist(p)) = kdist(p), so LRD(p) = k / kdist(p)). Needs 1 <= k < N.
    """
    x = tokens.detach().float()
    distances = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") ** 2  # (B, N, N), exact differences
    distances.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))  # a token is not its own neighbour
    knn_distances, knn_index = distances.topk(k, dim=-1, largest=False)  # (B, N, k), ascending
    kdist = knn_distances[..., -1].clamp_min(torch.finfo(torch.float32).tiny)  # (B, N)
    density = 1.0 / kdist  # LRD up to the factor k, which cancels
    neighbour_density = torch.gather(density.unsqueeze(1).expand(-1, x.shape[1], -1), 2, knn_index)  # (B, N, k)
    return (neighbour_density / density.unsqueeze(-1)).mean(dim=-1)


def lof_outliers(tokens: Tensor, k: int, quantile: float) -> Tensor:
    """Tokens (B, N, C) -> (B, N) bool: LOF strictly above the image's ``quantile`` of LOFs.

    k is clamped to N - 1 (small grids); with a single token there is no outlier.
    """
    B, N, _ = tokens.shape
    k = min(k, N - 1)
    if k < 1:
        return torch.zeros(B, N, dtype=torch.bool, device=tokens.device)
    with torch.no_grad():
        scores = local_outlier_factor(tokens, k)  # (B, N)
        threshold = torch.quantile(scores, quantile, dim=-1, keepdim=True)  # (B, 1)
        return scores > threshold


def norm_outliers(tokens: Tensor, count: int) -> Tensor:
    """Tokens (B, N, C) -> (B, N) bool: the ``count`` tokens of largest L2 norm per image
    (clamped to N), SC-CLIP's first detector (74471da clip/model.py)."""
    B, N, _ = tokens.shape
    with torch.no_grad():
        top = tokens.detach().float().norm(dim=-1).topk(min(count, N), dim=-1).indices  # (B, count)
        mask = torch.zeros(B, N, dtype=torch.bool, device=tokens.device)
        return mask.scatter_(1, top, True)


def replace_outliers(tokens: Tensor, outliers: Tensor, grid: tuple[int, int]) -> Tensor:
    """Each outlier token -> the mean of its non-outlier 8-neighbours in the (h, w) grid.

    tokens (B, h*w, C) row-major, outliers (B, h*w) bool -> (B, h*w, C). Neighbours outside
    the grid do not count; an outlier without a valid neighbour is kept (official
    ``mean_interpolation``: zero padding, a 3 x 3 ones kernel with a 0 centre).
    """
    B, N, C = tokens.shape
    h, w = grid
    keep = (~outliers).to(tokens.dtype).view(B, 1, h, w)
    kernel = torch.ones(1, 1, 3, 3, dtype=tokens.dtype, device=tokens.device)
    kernel[..., 1, 1] = 0
    fmap = tokens.transpose(1, 2).reshape(B, C, h, w)
    sums = F.conv2d((fmap * keep).reshape(B * C, 1, h, w), kernel, padding=1).view(B, C, h, w)
    counts = F.conv2d(keep, kernel, padding=1)  # (B, 1, h, w) valid neighbours
    update = outliers.view(B, 1, h, w) & (counts > 0)
    fmap = torch.where(update, sums / counts.clamp_min(1), fmap)
    return fmap.reshape(B, C, N).transpose(1, 2)


def cosine_similarity(tokens: Tensor) -> Tensor:
    """(B, N, C) -> (B, N, N) cosine similarities."""
    unit = F.normalize(tokens, dim=-1)
    return unit @ unit.transpose(1, 2)


def thresholded_rows(similarity: Tensor, threshold: float) -> Tensor:
    """SC-CLIP's aggregation matrix: entries < threshold set to 0, rows / (sum + 1e-6).

    (B, N, N) -> (B, N, N); ``A @ tokens`` is the official ``adaptively_aggregate``.
    """
    kept = similarity.masked_fill(similarity < threshold, 0.0)
    return kept / (kept.sum(dim=-1, keepdim=True) + _ROW_EPS)


def similarity_attention(similarity: Tensor, scale: float) -> Tensor:
    """softmax(M), M = scale (S - mean S) per image, entries < 0 -> -inf: (B, N, N) -> (B, N, N).

    The mean is over the image's whole N x N matrix (official ``custom_attn``). The diagonal
    (S_ii = 1 >= mean) is never masked, so no row is all -inf.
    """
    logits = scale * (similarity - similarity.mean(dim=(-2, -1), keepdim=True))
    eye = torch.eye(similarity.shape[-1], dtype=torch.bool, device=similarity.device)
    return torch.softmax(logits.masked_fill((logits < 0) & ~eye, float("-inf")), dim=-1)


def calibrated_attention(block: ResidualAttentionBlock, y: Tensor, weights: Tensor) -> Tensor:
    """SC-CLIP's last-block attention on patch tokens: out_proj([softmax(M) + softmax(k k^T s)] v / 2).

    y: ln_1 of the patch tokens (B, N, width); weights: softmax(M) (B, N, N), one for every
    head. No residual, no FFN (the caller adds the CLS term). -> (B, N, width).
    """
    q, k, v = block.attn.qkv(y)  # each (B, heads, N, hd)
    kk = _attend(q, k, v, _KK, grid=(0, 0))  # softmax(k k^T s) v; the k-k kind reads no grid
    mixed = weights.unsqueeze(1).to(v.dtype) @ v + kk  # (B, heads, N, hd)
    return block.attn.merge_heads(mixed / 2)
