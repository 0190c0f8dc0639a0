"""ReCLIP++ rectification head (paper section III-B..III-D) and the ReCLIP conference variant.

Per image, on CLIP's dense feature grid (h, w) with n = h * w patches:

- Z (B, D, h, w): dense CLIP features, L2-normalised per patch (MaskCLIP value path by
  default, any :mod:`reclip.features` strategy by choice), computed under ``no_grad``
  while CLIP is frozen;
- query logits M_q = Z W_q^T (raw cosines; W_q the fixed template-ensemble queries);
- bias logits M_b (eq. 2) = W_p W_r^T: W_r (C, D) from the learnable Reference prompt
  (:class:`reclip.heads.reference.ReferencePrompt`), W_p (n, D) = Conv1x1(width -> D,
  bias) on the interpolated, CLS-free positional embedding ("independent", ReCLIP++);
  or M_b = Z W_r^T + ProjNet(PE) ("dependent", the ReCLIP conference version);
- rectified logits M = M_q - M_b (eq. 3; Table V: "add" as an ablation);
- decoded logits M_o = BN(Conv5x5(concat(Z, M))) (eq. 4), or M_o = M without decoder;
- training: hard Gumbel-softmax masks on M_o (eq. 5, :func:`gumbel_masks`) and the
  contrastive loss of eq. 7 (:func:`contrastive_loss`) over each image's hypotheses.

Official code facts (dogehhh/ReCLIP ``model/model.py``, classes ``RECLIPPP`` and
``ReCLIP``): ``pe_proj = nn.Conv2d(768, 512, 1)`` (default init); ``decoder_conv2 =
nn.Conv2d(512 + C, C, 5, padding=2)`` kaiming-normal fan_out, ``decoder_norm2`` BN weight 1
bias 0; ``gumbel_softmax(100 * M_o, tau=1, hard=True)`` (ReCLIP: ``1000 * M``); masked
features pooled with ``AdaptiveAvgPool2d(1)`` (sum / n, no re-normalisation) and scored
with ``exp(logit_scale) * pooled @ W_q^T`` (100 for released CLIPs); cross-entropy over
the hypothesis classes of each image, summed over images and divided by the batch size.
ReCLIP's ProjNet: three Conv3x3 + BN + ReLU layers 768 -> 512 -> 256 -> C (read here as
width -> D -> D / 2 -> C so that nothing assumes ViT-B/16), applied to the positional
embedding and added to Z W_r^T.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reclip.clip.model import CLIP
from reclip.features import LastBlock, dense_features_with_grid, get_strategy
from reclip.heads.reference import REFERENCE_INITS, REFERENCE_NORMS, ReferencePrompt
from reclip.text import QueryEmbeddings

__all__ = [
    "ABLATIONS",
    "BIAS_MODES",
    "BIAS_OPS",
    "POOLS",
    "PRESETS",
    "RECLIP",
    "RECLIPPP",
    "Rectifier",
    "RectifierConfig",
    "RectifierOutputs",
    "class_query_weights",
    "contrastive_loss",
    "gumbel_masks",
    "rectification_loss",
]

BIAS_OPS = ("subtract", "add")
BIAS_MODES = ("independent", "dependent")
POOLS = ("official", "mask_area", "cosine")
HYPOTHESIS_RULES = ("windows", "any_vote", "whole_image")  # reclip.hypotheses.HypothesisConfig.rule


# -- configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class RectifierConfig:
    """Every switch of the rectification stage; the defaults are ReCLIP++ as published.

    Attributes:
        strategy: dense-feature strategy for Z: a ``reclip.features.STRATEGIES`` name
            ("maskclip" is the paper's) or a :class:`reclip.features.LastBlock` (e.g.
            ``get_strategy("maskclip", residual=False, ffn=False)``).
        learnable_query: Table IV ablation: W_q becomes a parameter initialised from the
            fixed template ensemble (rows re-normalised at use), used in M_q and the loss.
        bias_op: "subtract" (eq. 3) or "add" (Table V ablation).
        decoder: the mask decoder of eq. 4; False is Table III's "no decoder" (M_o = M:
            argmax and Gumbel masks on M directly, as ReCLIP).
        bias_mode: "independent" (ReCLIP++ eq. 2, M_b = W_p W_r^T) or "dependent"
            (ReCLIP / Table III: M_b = Z W_r^T + ProjNet(PE)).
        finetune_image_encoder: Table VI ablation: CLIP's image tower is trained too (Z
            with gradients; its weights are then part of ``trainable_state_dict``).
        gumbel_tau: Gumbel-softmax temperature tau_1 (official 1).
        gumbel_scale: logits are multiplied by this before the Gumbel-softmax (official
            ReCLIP++ 100, ReCLIP 1000).
        contrastive_scale: 1 / tau of eq. 7 (official ``exp(logit_scale)`` = 100).
        pool: masked pooling in the loss: "official" (sum / n, raw dot product with W_q),
            "mask_area" (sum / mask area, raw dot product) or "cosine" (paper eq. 7
            literally: cosine of the masked mean and W_q).
        reference_length: L context vectors; None = context_length - 4 (73 for 77).
        reference_norm: "frobenius" (official) or "row".
        reference_init: "token0" (official) or "normal" (CoOp).
        hypothesis_rule: the hypothesis rule this configuration was published with
            (read by the pipeline, not by the head): "windows" (paper eq. 6),
            "any_vote" (official code), "whole_image" (ReCLIP).
        features_autocast: on CUDA, compute the frozen Z under bf16 autocast (the head
            itself always runs in float32).
    """

    strategy: str | LastBlock = "maskclip"
    learnable_query: bool = False
    bias_op: str = "subtract"
    decoder: bool = True
    bias_mode: str = "independent"
    finetune_image_encoder: bool = False
    gumbel_tau: float = 1.0
    gumbel_scale: float = 100.0
    contrastive_scale: float = 100.0
    pool: str = "official"
    reference_length: int | None = None
    reference_norm: str = "frobenius"
    reference_init: str = "token0"
    hypothesis_rule: str = "windows"
    features_autocast: bool = True

    def __post_init__(self) -> None:
        get_strategy(self.strategy)  # raises listing the strategies
        choices = {
            "bias_op": BIAS_OPS, "bias_mode": BIAS_MODES, "pool": POOLS, "reference_norm": REFERENCE_NORMS,
            "reference_init": REFERENCE_INITS, "hypothesis_rule": HYPOTHESIS_RULES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"RectifierConfig.{name}={getattr(self, name)!r}; allowed: {list(allowed)}")
        for name in ("gumbel_tau", "gumbel_scale", "contrastive_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RectifierConfig.{name} must be > 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> RectifierConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise, listing the fields."""
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown RectifierConfig field(s) {unknown}; available: {fields}")
        values = dict(values)
        if isinstance(values.get("strategy"), dict):  # a LastBlock, as to_dict wrote it
            values["strategy"] = LastBlock(**values["strategy"])
        return cls(**values)


# ReCLIP++ as published (paper section III, official RECLIPPP).
RECLIPPP = RectifierConfig()
# ReCLIP, the conference version (official ``ReCLIP`` class): no decoder, class bias from
# image features plus ProjNet(PE), Gumbel on 1000 * M, whole-image hypotheses.
RECLIP = RectifierConfig(decoder=False, bias_mode="dependent", gumbel_scale=1000.0, hypothesis_rule="whole_image")

PRESETS: dict[str, RectifierConfig] = {"reclip++": RECLIPPP, "reclip": RECLIP}

# Rows of the paper's ablation tables (IV-C, IV-D), named after their table. Table III
# adds ReCLIP++'s changes to ReCLIP one at a time; rows with the decoder use ReCLIP++'s
# Gumbel scale (the paper does not say; the decoder's BN output is on ReCLIP++'s scale).
ABLATIONS: dict[str, RectifierConfig] = {
    "table3_reclip": RECLIP,
    "table3_decoder": dataclasses.replace(RECLIP, decoder=True, gumbel_scale=100.0),
    "table3_decoder_hypothesis": dataclasses.replace(
        RECLIP, decoder=True, gumbel_scale=100.0, hypothesis_rule="windows"
    ),
    "table3_reclippp": RECLIPPP,
    "table4_learnable_query": dataclasses.replace(RECLIPPP, learnable_query=True),
    "table5_add": dataclasses.replace(RECLIPPP, bias_op="add"),
    "table6_finetune_clip": dataclasses.replace(RECLIPPP, finetune_image_encoder=True),
}


# -- pure functions ---------------------------------------------------------------------


def class_query_weights(queries: QueryEmbeddings) -> Tensor:
    """One W_q row per class, (C, D) float32 unit rows.

    A class with synonyms gets the mean of its synonyms' (unit) rows, re-normalised: one
    query per class is what eq. 7 and M_q = Z W_q^T need (the zero-shot head instead
    takes the max over synonyms of the logits).
    """
    weights = F.normalize(queries.weights.detach().float(), dim=-1)  # (S, D)
    if queries.is_one_per_class:
        return weights.clone()
    sums = torch.zeros(queries.num_classes, weights.shape[1], dtype=weights.dtype, device=weights.device)
    sums.index_add_(0, queries.class_index.to(weights.device), weights)
    return F.normalize(sums, dim=-1)


def gumbel_masks(
    logits: Tensor, tau: float = 1.0, scale: float = 100.0, generator: torch.Generator | None = None
) -> Tensor:
    """Hard Gumbel-softmax over classes with a straight-through gradient (eq. 5).

    Official: ``F.gumbel_softmax(100 * M_o, tau=1, hard=True)`` over the class axis; with
    ``generator=None`` this draws the same noise as ``F.gumbel_softmax`` would from the
    global RNG (same sampling call), so the two agree for the same seed.

    Args:
        logits: (B, C, h, w).
        tau: temperature tau_1.
        scale: factor applied to the logits first.
        generator: optional RNG for reproducible noise.

    Returns:
        (B, C, h, w) one-hot over C in the forward pass; gradients of the soft sample.
    """
    scaled = logits * scale
    # Gumbel(0, 1) noise exactly as F.gumbel_softmax draws it
    noise = torch.empty_like(scaled, memory_format=torch.legacy_contiguous_format).exponential_(generator=generator)
    noise = -noise.log()
    soft = ((scaled + noise) / tau).softmax(dim=1)
    hard = torch.zeros_like(soft).scatter_(1, soft.argmax(dim=1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


def contrastive_loss(
    features: Tensor,
    masks: Tensor,
    query_weights: Tensor,
    hypotheses: Tensor,
    scale: float = 100.0,
    pool: str = "official",
) -> Tensor:
    """The contrastive loss of eq. 7 on masked, pooled features.

    For image b and class k in its hypotheses H_b: Z_g[b, k] = pool(Z_b * mask_b[k]),
    S[b, k, j] = scale * <Z_g[b, k], W_q[j]>, loss_b = mean over k in H_b of
    CE(S[b, k, :], k). Loss = sum_b loss_b / B: an image without hypotheses adds 0 but
    still counts in B (official ``loss / batch_size``).

    Args:
        features: Z (B, D, h, w).
        masks: (B, C, h, w), one-hot over C (e.g. :func:`gumbel_masks`).
        query_weights: W_q (C, D).
        hypotheses: (B, C) bool, the classes each image may contain.
        scale: 1 / tau (official ``exp(logit_scale)`` = 100).
        pool: "official" (sum / n, the official AdaptiveAvgPool2d), "mask_area"
            (sum / mask area) or "cosine" (cosine of the masked mean with W_q).

    Returns:
        Scalar loss.
    """
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; available: {list(POOLS)}")
    B, C = masks.shape[:2]
    if hypotheses.shape != (B, C):
        raise ValueError(f"hypotheses must be (B, C) = {(B, C)}, got {tuple(hypotheses.shape)}")
    n = features.shape[-2] * features.shape[-1]
    pooled = torch.einsum("bdhw,bchw->bcd", features, masks)  # (B, C, D) masked sums
    if pool == "official":
        pooled = pooled / n
    elif pool == "mask_area":
        pooled = pooled / masks.sum(dim=(2, 3)).clamp(min=1.0)[..., None]
    else:
        pooled = F.normalize(pooled, dim=-1)
    logits = scale * pooled @ query_weights.t()  # (B, C, C): row k scores class k's region
    ce = -logits.log_softmax(dim=-1).diagonal(dim1=1, dim2=2)  # (B, C): -log p(k | region k)
    weights = hypotheses.to(ce.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)  # mean over H_b
    return (ce * weights).sum() / B


# -- the head ---------------------------------------------------------------------------


class RectifierOutputs(NamedTuple):
    """Everything :meth:`Rectifier.forward_train` computes, on the feature grid (h, w).

    features: Z (B, D, h, w); query_logits: M_q (B, C, h, w); bias_logits: M_b
    (B, C, h, w); rectified: M (B, C, h, w); decoded: M_o (B, C, h, w) (= M without
    decoder).
    """

    features: Tensor
    query_logits: Tensor
    bias_logits: Tensor
    rectified: Tensor
    decoded: Tensor


def _proj_net(in_channels: int, embed_dim: int, num_classes: int) -> nn.Sequential:
    """ReCLIP's ProjNet: three Conv3x3 + BN + ReLU, width -> D -> D/2 -> C (official 768 -> 512 -> 256 -> C)."""
    widths = (in_channels, embed_dim, embed_dim // 2, num_classes)
    layers: list[nn.Module] = []
    for cin, cout in zip(widths[:-1], widths[1:]):
        conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        layers += [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]  # BN weight 1, bias 0 by default
    return nn.Sequential(*layers)


class Rectifier(nn.Module):
    """ReCLIP++ rectification head over a frozen CLIP.

    Args:
        clip: a CLIP with a ViT image tower; registered as ``self.clip`` and frozen
            (``requires_grad`` False, kept in eval mode) unless
            ``config.finetune_image_encoder`` trains its image tower.
        queries: W_q, :func:`reclip.text.query_embeddings` of the vocabulary; classes with
            synonyms use the re-normalised mean of their rows (:func:`class_query_weights`).
        class_names: one name per class (C,), the Reference prompt's [CLS] words.
        config: switches and hyper-parameters (:data:`RECLIPPP` by default).

    Trainable parameters: ``reference.context`` (L, text width); ``pe_proj``
    Conv1x1(visual width -> D) ("independent") or ``proj_net`` ("dependent");
    ``decoder_conv`` Conv5x5(D + C -> C) and ``decoder_norm`` BN(C) (with decoder);
    ``query`` (C, D) (learnable query).

    ``forward(images)`` is the segmentor interface: images (B, 3, H, W) normalised ->
    logits M_o (B, C, h', w'), one channel per class (no ``class_index``). Like the
    zero-shot head, the logits cover exactly the input: the patch grid when H and W are
    multiples of the patch, else upsampled (bilinear) to the padded size and cropped to
    (H, W). ``forward_train`` returns every intermediate on the grid.
    """

    def __init__(
        self,
        clip: CLIP,
        queries: QueryEmbeddings,
        class_names: Sequence[str],
        config: RectifierConfig = RECLIPPP,
    ) -> None:
        super().__init__()
        visual = clip.visual
        embed_dim = visual.output_dim
        if queries.embed_dim != embed_dim:
            raise ValueError(f"queries have D={queries.embed_dim} but the CLIP embeds to {embed_dim}")
        if len(class_names) != queries.num_classes:
            raise ValueError(
                f"{len(class_names)} class names for {queries.num_classes} query classes; give one name per class"
            )
        self.config = config
        self.num_classes = queries.num_classes
        self.strategy = get_strategy(config.strategy)

        self.clip = clip
        for p in clip.parameters():
            p.requires_grad_(False)
        if config.finetune_image_encoder:
            for p in visual.parameters():
                p.requires_grad_(True)
        clip.eval()

        C = self.num_classes
        w_q = class_query_weights(queries).to(clip.token_embedding.weight.device)  # (C, D)
        # Derived from CLIP + templates, recomputed at load time: not saved.
        self.register_buffer("fixed_query", w_q, persistent=False)
        self.query = nn.Parameter(w_q.clone()) if config.learnable_query else None
        self.reference = ReferencePrompt(
            clip, class_names, length=config.reference_length, init=config.reference_init, norm=config.reference_norm,
        )
        if config.bias_mode == "independent":
            # official RECLIPPP.pe_proj = nn.Conv2d(768, 512, kernel_size=1): default init, bias.
            self.pe_proj = nn.Conv2d(visual.width, embed_dim, kernel_size=1)
            self.proj_net = None
        else:
            self.pe_proj = None
            self.proj_net = _proj_net(visual.width, embed_dim, C)
        if config.decoder:
            self.decoder_conv = nn.Conv2d(embed_dim + C, C, kernel_size=5, padding=2)
            nn.init.kaiming_normal_(self.decoder_conv.weight, a=0, mode="fan_out", nonlinearity="relu")
            self.decoder_norm = nn.BatchNorm2d(C)  # weight 1, bias 0 (official constant_ init)
        else:
            self.decoder_conv = self.decoder_norm = None
        self.to(clip.token_embedding.weight.device)

    # -- state ------------------------------------------------------------------------

    def train(self, mode: bool = True) -> Rectifier:
        """Train/eval the head; CLIP stays in eval mode (the engine's contract)."""
        super().train(mode)
        self.clip.eval()
        return self

    def _is_trainable_key(self, key: str) -> bool:
        if not key.startswith("clip."):
            return True
        return self.config.finetune_image_encoder and key.startswith("clip.visual.")

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The rectifier's own parameters and BN buffers, never CLIP's (except its image
        tower under ``finetune_image_encoder``). Detached tensors, as ``state_dict``."""
        return {k: v for k, v in self.state_dict().items() if self._is_trainable_key(k)}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load what :meth:`trainable_state_dict` saved; missing or extra keys raise."""
        expected = set(self.trainable_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"rectifier state does not match this configuration: missing {missing}, unexpected {unexpected}; "
                "was it trained with another RectifierConfig or class list?"
            )
        self.load_state_dict(state, strict=False)

    # -- building blocks ----------------------------------------------------------------

    @property
    def query_weights(self) -> Tensor:
        """W_q (C, D) unit rows: fixed, or the learnable query re-normalised."""
        if self.query is None:
            return self.fixed_query
        return F.normalize(self.query, dim=-1)

    def features(self, images: Tensor) -> Tensor:
        """Z: images (B, 3, H, W) normalised -> (B, D, h, w) float32 unit rows.

        No graph through a frozen CLIP; bf16 autocast on CUDA if ``features_autocast``.
        """
        grad = contextlib.nullcontext() if self.config.finetune_image_encoder else torch.no_grad()
        use_bf16 = images.is_cuda and self.config.features_autocast
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16)
        with grad, autocast:
            z = dense_features_with_grid(self.clip, images, self.strategy).features
        return z.float()

    def positional_embedding(self, h: int, w: int) -> Tensor:
        """CLIP's CLS-free positional embedding resized to (h, w): (1, width, h, w) float32."""
        grad = contextlib.nullcontext() if self.config.finetune_image_encoder else torch.no_grad()
        with grad:
            pe = self.clip.visual.grid_positional_embedding(h, w).float()  # (h * w, width)
        return pe.t().reshape(1, -1, h, w)

    def bias_logits(self, features: Tensor, reference: Tensor) -> Tensor:
        """M_b (B, C, h, w) from Z (B, D, h, w) and W_r (C, D) (eq. 2, or ReCLIP's dependent bias)."""
        B, _, h, w = features.shape
        pe = self.positional_embedding(h, w)  # (1, width, h, w)
        if self.pe_proj is not None:
            w_p = self.pe_proj(pe)  # (1, D, h, w)
            return torch.einsum("odhw,cd->ochw", w_p, reference).expand(B, -1, -1, -1)
        # ReCLIP: class bias from image features + ProjNet(PE) (BN over the h*w positions of one PE).
        return torch.einsum("bdhw,cd->bchw", features, reference) + self.proj_net(pe)

    def forward_train(self, images: Tensor) -> RectifierOutputs:
        """images (B, 3, H, W) normalised -> :class:`RectifierOutputs` on the feature grid."""
        z = self.features(images)  # (B, D, h, w)
        with torch.autocast(z.device.type, enabled=False):  # the head in float32 (cosines, BN)
            m_q = torch.einsum("bdhw,cd->bchw", z, self.query_weights)  # (B, C, h, w)
            m_b = self.bias_logits(z, self.reference())  # (B, C, h, w)
            m = m_q - m_b if self.config.bias_op == "subtract" else m_q + m_b
            if self.decoder_conv is not None:
                m_o = self.decoder_norm(self.decoder_conv(torch.cat([z, m], dim=1)))
            else:
                m_o = m
        return RectifierOutputs(z, m_q, m_b, m, m_o)

    def forward(self, images: Tensor) -> Tensor:
        """Segmentor interface: images (B, 3, H, W) -> logits M_o (B, C, h', w') float32 (class docstring)."""
        H, W = images.shape[-2:]
        logits = self.forward_train(images).decoded  # (B, C, h, w)
        h, w = logits.shape[-2:]
        p = self.clip.visual.patch_size
        if (h * p, w * p) != (H, W):
            logits = F.interpolate(logits, size=(h * p, w * p), mode="bilinear", align_corners=False)[..., :H, :W]
        return logits


def rectification_loss(
    model: Rectifier, outputs: RectifierOutputs, hypotheses: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Gumbel masks on M_o then eq. 7, with the model's configuration: a scalar.

    ``hypotheses`` (B, C) bool; ``generator`` drives the Gumbel noise (None: global RNG).
    """
    cfg = model.config
    masks = gumbel_masks(outputs.decoded, tau=cfg.gumbel_tau, scale=cfg.gumbel_scale, generator=generator)
    return contrastive_loss(
        outputs.features, masks, model.query_weights, hypotheses.to(masks.device),
        scale=cfg.contrastive_scale, pool=cfg.pool,
    )
