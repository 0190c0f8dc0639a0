"""The IP-CLIP encoder of MAFT (Jiao et al. 2023): one embedding per mask proposal, in one pass.

Blocks ``[0, start_layer)`` of CLIP's vision tower run normally on [CLS; patches]. Then
the CLS token is replicated once per proposal, tokens [CLS_1 .. CLS_N; patches], and in
blocks ``start_layer .. L-1`` an attention mask lets CLS copy n attend to itself and to
the patches inside proposal n, while patches attend only to patches (never to a CLS
copy; CLS copies never see each other). Output: ``ln_post(CLS copy n) @ proj``.

Because no patch ever attends to a CLS copy, the patch stream of the masked blocks is
the same for every proposal set: it runs once (patches alone through each block), and
the CLS copies run as queries against [their own key; the patches' keys] with
``F.scaled_dot_product_attention`` and a boolean mask. This is exactly the attention of
the full [CLS_1..N; patches] sequence (see ``tests/test_maft_core.py``), costs
N x (N + hw) instead of (N + hw)^2 per block, and lets proposals be chunked without
recomputing the patches.

Which patches a proposal covers (:func:`proposal_attention_mask`): the mask, in the
image's frame, is zero-padded like the image (``pad_to_patch``), averaged over each
patch's pixels that lie in the image (area resize to the patch grid, divided by the
in-image fraction of each patch: a border patch is judged by its image part, so a
whole-image proposal covers every patch whatever the image size), and a patch is inside
when its coverage is ``>= threshold`` (0.5; the official code also lets exactly 0.5
through). The official code instead samples the mask bilinearly at the patch grid, i.e.
reads the few pixels around each patch centre; the area average is the fraction of the
patch the proposal covers, which is what "inside" means for binary masks. A proposal
covering no patch that well (smaller than half a patch) falls back to its most-covered
patch; a proposal with zero coverage everywhere sees no patch and its CLS copy attends
only to itself (as in the official code): finite, never NaN.

Facts from the official code (jiaosiyu1999/MAFT, see METHODS.md s.5): blocks 0-7 of 12
run normally and 8-11 are masked; N is fixed to 100 there and the grid must be square;
here any N, any image size and any mask size work.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from reclip.clip.model import CLIP, VisionTransformer, pad_to_patch, scaled_block

__all__ = ["default_start_layer", "ip_attention_mask", "ip_clip_embeddings", "ip_clip_tokens",
           "proposal_attention_mask"]

# The published configuration: blocks 0..7 of a 12-block ViT run normally, 8..11 are masked.
_PUBLISHED_START, _PUBLISHED_DEPTH = 8, 12


def default_start_layer(depth: int) -> int:
    """The first masked block for a tower of ``depth`` blocks: 8 of 12 (MAFT's), scaled as
    ``round(depth * 8 / 12)`` for other depths, clamped to ``0 .. depth - 1``."""
    return scaled_block(_PUBLISHED_START, depth, _PUBLISHED_DEPTH)


def _check_start_layer(start_layer: int | None, depth: int) -> int:
    if start_layer is None:
        return default_start_layer(depth)
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < depth:
        raise ValueError(f"start_layer={start_layer!r}: give the first masked block, 0..{depth - 1} for this "
                         f"{depth}-block tower (None: {default_start_layer(depth)}, MAFT's 8 of 12 scaled)")
    return start_layer


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold!r}: give the patch coverage at which a patch is inside a proposal, "
                         f"in (0, 1] (MAFT: 0.5)")
    return float(threshold)


def proposal_attention_mask(masks: torch.Tensor, grid: tuple[int, int], threshold: float = 0.5, *,
                            image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Which patches each proposal covers.

    masks (B, N, H, W), soft or binary in [0, 1], in the frame the grid tiles (for an
    image padded to the patch, the padded frame: see :func:`ip_clip_embeddings`) ->
    bool (B, N, h * w), row-major over the (h, w) grid. ``image_size`` (H0, W0): the
    image's part of that frame (top-left; the rest is padding, outside every proposal),
    None: all of it.

    A patch is inside proposal n when the mean of mask n over the patch's in-image pixels
    (area resize to the grid, divided by the patch's in-image fraction) is
    ``>= threshold``, in (0, 1]. Empty proposals (no patch reaching the threshold)
    keep their single most-covered patch if any patch has coverage > 0; a proposal that
    is zero everywhere gets an all-False row (its CLS copy will attend only to itself).
    """
    threshold = _check_threshold(threshold)
    if masks.ndim != 4:
        raise ValueError(f"masks of shape {tuple(masks.shape)}: expected (B, N, H, W)")
    h, w = grid
    B, N = masks.shape[:2]
    if N == 0:
        return torch.zeros(B, 0, h * w, dtype=torch.bool, device=masks.device)
    coverage = F.interpolate(masks.float(), size=(h, w), mode="area").flatten(2)  # (B, N, h * w)
    if image_size is not None:
        H, W = masks.shape[-2:]
        if not (0 < image_size[0] <= H and 0 < image_size[1] <= W):
            raise ValueError(f"image_size={tuple(image_size)}: the image must lie in the masks' {H} x {W} frame")
        image = F.pad(masks.new_ones(1, 1, *image_size, dtype=torch.float32),
                      (0, W - image_size[1], 0, H - image_size[0]))  # 1 on the image, 0 on the padding
        in_image = F.interpolate(image, size=(h, w), mode="area").flatten(2)  # (1, 1, h * w)
        coverage = coverage / in_image.clamp_min(1e-12)  # a patch wholly in the padding has coverage 0 anyway
    inside = coverage >= threshold
    empty = ~inside.any(dim=-1) & (coverage.amax(dim=-1) > 0)  # (B, N)
    if empty.any():
        most = F.one_hot(coverage.argmax(dim=-1), h * w).bool()  # (B, N, h * w)
        inside = inside | (most & empty[..., None])
    return inside


def ip_attention_mask(inside: torch.Tensor) -> torch.Tensor:
    """The boolean attention mask of the CLS copies (True = may attend), keys [CLS copies; patches].

    inside (B, N, P) from :func:`proposal_attention_mask` -> (B, 1, N, N + P): copy n sees
    itself (never another copy) and the patches of proposal n. Shared by all heads.
    """
    B, N, _ = inside.shape
    itself = torch.eye(N, dtype=torch.bool, device=inside.device).expand(B, N, N)
    return torch.cat([itself, inside], dim=-1)[:, None]  # (B, 1, N, N + P)


def _masked_patch_keys(
    visual: VisionTransformer, patches: torch.Tensor, start_layer: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The patch stream through blocks ``start_layer .. L-1`` (patches attend only to patches).

    patches (B, P, width) after block start_layer - 1 -> per masked block, the (k, v)
    (each (B, heads, P, hd)) of its input patches, which the CLS copies attend to.
    """
    blocks = visual.transformer.resblocks
    keys = []
    for i in range(start_layer, len(blocks)):
        block = blocks[i]
        _, k, v = block.attn.qkv(block.ln_1(patches))
        keys.append((k, v))
        if i < len(blocks) - 1:  # the last block's patch output is never read
            patches = block(patches)
    return keys


def _cls_copies(
    visual: VisionTransformer,
    cls: torch.Tensor,
    patch_keys: list[tuple[torch.Tensor, torch.Tensor]],
    inside: torch.Tensor,
    start_layer: int,
) -> torch.Tensor:
    """CLS copies (B, N, width), all equal to ``cls`` (B, 1, width), through the masked blocks."""
    B, N = inside.shape[:2]
    allowed = ip_attention_mask(inside)  # (B, 1, N, N + P)
    x = cls.expand(B, N, cls.shape[-1])
    for block, (k_p, v_p) in zip(visual.transformer.resblocks[start_layer:], patch_keys):
        q, k, v = block.attn.qkv(block.ln_1(x))  # each (B, heads, N, hd)
        k = torch.cat([k, k_p], dim=2)  # (B, heads, N + P, hd)
        v = torch.cat([v, v_p], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, heads, N, hd)
        x = x + block.attn.merge_heads(out)
        x = x + block.mlp(block.ln_2(x))
    return x


def _check_chunk(chunk: int | None) -> None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk={chunk!r}: give the most proposals per pass (an int >= 1), or None for one pass")


def ip_clip_tokens(
    visual: VisionTransformer,
    tokens: torch.Tensor,
    inside: torch.Tensor,
    *,
    start_layer: int,
    chunk: int | None = None,
) -> torch.Tensor:
    """The masked part of IP-CLIP from the tokens it starts from.

    tokens (B, 1 + P, width): [CLS; patches] after blocks ``[0, start_layer)``
    (``visual.forward_blocks(images, end=start_layer)``); inside (B, N, P) bool from
    :func:`proposal_attention_mask` -> the CLS copies after the last block, (B, N, width),
    before ``ln_post``. ``chunk``: at most this many copies per pass (same result).
    """
    _check_chunk(chunk)
    start_layer = _check_start_layer(start_layer, len(visual.transformer.resblocks))
    B, N, P = inside.shape
    if tokens.shape[0] != B or tokens.shape[1] != 1 + P:
        raise ValueError(f"tokens {tuple(tokens.shape)} and proposal mask {tuple(inside.shape)} disagree: "
                         f"expected tokens (B={B}, 1 + P={1 + P}, width)")
    cls, patches = tokens[:, :1], tokens[:, 1:]
    patch_keys = _masked_patch_keys(visual, patches, start_layer)
    step = chunk or max(N, 1)
    outs = [_cls_copies(visual, cls, patch_keys, inside[:, i:i + step], start_layer) for i in range(0, N, step)]
    return torch.cat(outs, dim=1)  # (B, N, width)


def ip_clip_embeddings(
    clip: CLIP,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    start_layer: int | None = None,
    threshold: float = 0.5,
    chunk: int | None = None,
) -> torch.Tensor:
    """One CLIP embedding per mask proposal (MAFT's IP-CLIP encoder).

    Args:
        clip: our CLIP (its ViT vision tower).
        images: (B, 3, H, W) normalised as ``clip`` expects; any size (padded to the patch
            at the bottom/right, as ``VisionTransformer.embed`` does).
        masks: (B, N, H', W') proposals, soft or binary in [0, 1], covering the image;
            a size other than (H, W) is resized (bilinear) to it first, then zero-padded
            like the image.
        start_layer: the first masked block (None: :func:`default_start_layer`).
        threshold: patch coverage at which a patch is inside a proposal, in (0, 1]
            (:func:`proposal_attention_mask`; coverage of the patch's in-image part).
        chunk: at most this many proposals per pass (memory); the result equals one pass.

    Returns:
        (B, N, output_dim): ``ln_post(CLS copy n) @ proj``, not L2-normalised. Gradients
        flow to CLIP's parameters (not to the masks, which are thresholded).
    """
    visual = clip.visual
    start_layer = _check_start_layer(start_layer, len(visual.transformer.resblocks))
    threshold = _check_threshold(threshold)
    _check_chunk(chunk)
    if images.ndim != 4 or masks.ndim != 4:
        raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)}: expected (B, 3, H, W) "
                         f"and (B, N, H', W')")
    if masks.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but masks for {masks.shape[0]}: give masks (B, N, H', W') "
                         f"with the images' B")
    if masks.shape[1] == 0:
        raise ValueError("masks has no proposals (N = 0); give at least one (e.g. the whole image)")
    H, W = images.shape[-2:]
    masks = masks.to(images.device, torch.float32)
    if masks.shape[-2:] != (H, W):
        masks = F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=False)
    masks = pad_to_patch(masks, visual.patch_size)  # the image's padded frame, padding outside every proposal
    tokens, grid = visual.forward_blocks(images.to(clip.dtype), end=start_layer)  # (B, 1 + hw, width)
    inside = proposal_attention_mask(masks, grid, threshold, image_size=(H, W))  # (B, N, hw)
    cls = ip_clip_tokens(visual, tokens, inside, start_layer=start_layer, chunk=chunk)  # (B, N, width)
    return visual.project(cls)  # (B, N, output_dim)
