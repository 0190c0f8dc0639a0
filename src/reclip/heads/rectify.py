"""ReCLIP++ rectification head (paper section III-B..III-D) and the ReCLIP conference variant.

Per image, on the dense feature grid (h, w) with n = h * w cells:

- Z (B, D, h, w): dense features, L2-normalised per cell: CLIP's with a last-block
  strategy (:class:`reclip.backbones.DenseCLIP`; MaskCLIP's value path by default),
  computed under ``no_grad`` while CLIP is frozen;
- query logits M_q = Z W_q^T (raw cosines; W_q the fixed template-ensemble queries);
- bias logits M_b (eq. 2) = W_p W_r^T (:class:`reclip.heads.bias.PositionalBias`; W_r
  from the learnable Reference prompt, :class:`reclip.heads.reference.ReferencePrompt`),
  or ReCLIP's M_b = Z W_r^T + ProjNet(PE) (:class:`reclip.heads.bias.DependentBias`);
- rectified logits M = M_q - M_b (eq. 3; Table V: "add" as an ablation);
- decoded logits M_o = BN(Conv5x5(concat(Z, M))) (eq. 4, :class:`reclip.heads.decoder.MaskDecoder`),
  or M_o = M without decoder;
- training: hard Gumbel-softmax masks on M_o (eq. 5) and the contrastive loss of eq. 7
  over each image's hypotheses (:mod:`reclip.heads.losses`, :func:`rectification_loss`).

The parts are separate modules held by one :class:`RectifierHead` (Z -> the logits above),
so a student (paper III-E) can inherit the query, bias and decoder frozen and run them on
its own features; :class:`Rectifier` is CLIP's dense backbone + that head
(:class:`reclip.segmentor.DenseSegmentor`). :func:`build_rectifier_head` turns a
:class:`RectifierConfig` into the parts.

Official code facts (dogehhh/ReCLIP ``model/model.py``, classes ``RECLIPPP`` and
``ReCLIP``) are cited in the part that implements them.
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

from reclip.backbones.clip import DenseCLIP
from reclip.clip.model import CLIP
from reclip.features import DenseStrategy, get_strategy, strategy_from_dict, strategy_to_dict
from reclip.heads.bias import DependentBias, PositionalBias
from reclip.heads.decoder import MaskDecoder
from reclip.heads.losses import POOLS, contrastive_loss, gumbel_masks
from reclip.heads.reference import NAME_TOKENS, REFERENCE_INITS, REFERENCE_NORMS, ReferencePrompt
from reclip.segmentor import CLIPSegmentor
from reclip.text import QueryEmbeddings

__all__ = [
    "ABLATIONS",
    "BIAS_MODES",
    "BIAS_OPS",
    "OUTPUTS",
    "PRESETS",
    "RECLIP",
    "RECLIPPP",
    "Rectifier",
    "RectifierConfig",
    "RectifierHead",
    "RectifierOutputs",
    "build_rectifier_head",
    "class_query_weights",
    "rectification_loss",
]

BIAS_OPS = ("subtract", "add")
# What a rectifier's forward returns (``--output``): the name -> the RectifierOutputs field.
# "decoded" is the paper's prediction (section III-D, argmax of M_o); the others show what
# each part contributes: "rectified" M = M_q - M_b (no decoder), "query" M_q (CLIP alone).
OUTPUTS = {"decoded": "decoded", "rectified": "rectified", "query": "query_logits"}
BIAS_MODES = ("independent", "dependent")
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
        reference_name_tokens: how a class name longer than the Reference's slots is
            cut: "keep_eot" (default: EOT kept) or "official" (dogehhh/ReCLIP's exact
            layout, EOT lost, read at the largest-id token; for reproducing published
            numbers), see :mod:`reclip.heads.reference`.
        hypothesis_rule: the hypothesis rule this configuration was published with
            (read by the pipeline, not by the head): "windows" (paper eq. 6),
            "any_vote" (official code), "whole_image" (ReCLIP).
        features_autocast: on CUDA, compute the frozen Z under bf16 autocast (the head
            itself always runs in float32).
    """

    strategy: str | DenseStrategy = "maskclip"
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
    reference_name_tokens: str = "keep_eot"
    hypothesis_rule: str = "windows"
    features_autocast: bool = True

    def __post_init__(self) -> None:
        get_strategy(self.strategy)  # raises listing the strategies
        choices = {
            "bias_op": BIAS_OPS, "bias_mode": BIAS_MODES, "pool": POOLS, "reference_norm": REFERENCE_NORMS,
            "reference_init": REFERENCE_INITS, "reference_name_tokens": NAME_TOKENS,
            "hypothesis_rule": HYPOTHESIS_RULES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"RectifierConfig.{name}={getattr(self, name)!r}; allowed: {list(allowed)}")
        for name in ("gumbel_tau", "gumbel_scale", "contrastive_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RectifierConfig.{name} must be > 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(self.strategy, DenseStrategy):
            values["strategy"] = strategy_to_dict(self.strategy)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> RectifierConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise, listing the fields."""
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown RectifierConfig field(s) {unknown}; available: {fields}")
        values = dict(values)
        if isinstance(values.get("strategy"), dict):  # a strategy, as to_dict wrote it
            values["strategy"] = strategy_from_dict(values["strategy"])
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
    # Not a printed row: ReCLIP++ (independent bias, window hypotheses) without its
    # decoder, the "Decoder" step of Table III taken away from the full method, so the
    # decoder's own contribution can be measured (M_o = M; Gumbel on 100 * M).
    "table3_no_decoder": dataclasses.replace(RECLIPPP, decoder=False),
    "table4_learnable_query": dataclasses.replace(RECLIPPP, learnable_query=True),
    "table5_add": dataclasses.replace(RECLIPPP, bias_op="add"),
    "table6_finetune_clip": dataclasses.replace(RECLIPPP, finetune_image_encoder=True),
}


# -- the head ---------------------------------------------------------------------------


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


class RectifierOutputs(NamedTuple):
    """Everything :meth:`RectifierHead.outputs` computes, on the feature grid (h, w).

    features: Z (B, D, h, w); query_logits: M_q (B, C, h, w); bias_logits: M_b
    (B, C, h, w); rectified: M (B, C, h, w); decoded: M_o (B, C, h, w) (= M without
    decoder).
    """

    features: Tensor
    query_logits: Tensor
    bias_logits: Tensor
    rectified: Tensor
    decoded: Tensor


class RectifierHead(nn.Module):
    """Z (B, D, h, w) -> M_o (B, C, h, w) through M_q, M_b and M (module docstring).

    Args:
        query_weights: W_q (C, D), unit rows (:func:`class_query_weights`).
        reference: the Reference prompt (W_r = ``reference()``).
        bias: :class:`~reclip.heads.bias.PositionalBias` or :class:`~reclip.heads.bias.DependentBias`.
        decoder: the mask decoder, or None (M_o = M).
        learnable_query: W_q becomes a parameter ``query`` initialised from ``query_weights``
            (Table IV; rows re-normalised at use).
        bias_op: "subtract" (eq. 3) or "add" (Table V).

    The head always runs in float32, whatever the autocast state (cosines, BN).
    """

    def __init__(
        self,
        query_weights: Tensor,
        reference: ReferencePrompt,
        bias: nn.Module,
        decoder: MaskDecoder | None = None,
        *,
        learnable_query: bool = False,
        bias_op: str = "subtract",
    ) -> None:
        super().__init__()
        if bias_op not in BIAS_OPS:
            raise ValueError(f"bias_op={bias_op!r}; allowed: {list(BIAS_OPS)}")
        w_q = query_weights.detach().float()
        # Derived from CLIP + templates, recomputed at load time: not saved.
        self.register_buffer("fixed_query", w_q.clone(), persistent=False)
        self.query = nn.Parameter(w_q.clone()) if learnable_query else None
        self.reference = reference
        self.bias = bias
        self.decoder = decoder
        self.bias_op = bias_op
        self.output = "decoded"  # what forward returns, an OUTPUTS name (select_output)

    @property
    def num_classes(self) -> int:
        return self.fixed_query.shape[0]

    @property
    def query_weights(self) -> Tensor:
        """W_q (C, D) unit rows: fixed, or the learnable query re-normalised."""
        if self.query is None:
            return self.fixed_query
        return F.normalize(self.query, dim=-1)

    def fixed_queries(self) -> Tensor:
        """The fixed W_q (C, D), for class-aware strategies: the segmentation they feed back is
        CLIP's own, never the trained head's."""
        return self.fixed_query

    def outputs(self, features: Tensor) -> RectifierOutputs:
        """Z (B, D, h, w) -> :class:`RectifierOutputs` (float32)."""
        z = features.float()
        with torch.autocast(z.device.type, enabled=False):
            m_q = torch.einsum("bdhw,cd->bchw", z, self.query_weights)  # (B, C, h, w)
            m_b = self.bias(z, self.reference())  # (B, C, h, w)
            m = m_q - m_b if self.bias_op == "subtract" else m_q + m_b
            m_o = self.decoder(z, m) if self.decoder is not None else m
        return RectifierOutputs(z, m_q, m_b, m, m_o)

    def select_output(self, name: str) -> RectifierHead:
        """Make :meth:`forward` return the logits ``name`` (an :data:`OUTPUTS` key); returns self."""
        if name not in OUTPUTS:
            raise ValueError(f"unknown rectifier output {name!r}; available: {', '.join(OUTPUTS)} "
                             "(decoded = M_o, the paper's prediction; rectified = M = M_q - M_b; query = M_q)")
        self.output = name
        return self

    def forward(self, features: Tensor) -> Tensor:
        """Z (B, D, h, w) -> the selected logits (B, C, h, w), float32: M_o unless
        :meth:`select_output` chose M or M_q."""
        return getattr(self.outputs(features), OUTPUTS[self.output])


def build_rectifier_head(
    clip: CLIP, queries: QueryEmbeddings, class_names: Sequence[str], config: RectifierConfig
) -> RectifierHead:
    """The parts of ``config`` for ``clip`` and the classes of ``queries`` / ``class_names``.

    W_q: one row per class (:func:`class_query_weights`); W_r: a Reference prompt on
    CLIP's text tower; the bias on CLIP's positional embedding. CLIP is held by the
    parts, not registered (the caller registers it once).
    """
    visual = clip.visual
    embed_dim = visual.output_dim
    if queries.embed_dim != embed_dim:
        raise ValueError(f"queries have D={queries.embed_dim} but the CLIP embeds to {embed_dim}")
    C = queries.num_classes
    if len(class_names) != C:
        raise ValueError(f"{len(class_names)} class names for {C} query classes; give one name per class")
    reference = ReferencePrompt(
        clip, class_names, length=config.reference_length, init=config.reference_init, norm=config.reference_norm,
        name_tokens=config.reference_name_tokens,
    )
    if config.bias_mode == "independent":
        bias: nn.Module = PositionalBias(visual, embed_dim)
    else:
        bias = DependentBias(visual, embed_dim, C)
    decoder = MaskDecoder(embed_dim, C) if config.decoder else None
    return RectifierHead(class_query_weights(queries), reference, bias, decoder,
                         learnable_query=config.learnable_query, bias_op=config.bias_op)


# -- the segmentor ----------------------------------------------------------------------

# Parameter names of runs saved before the rectifier was split into parts (flat names).
_LEGACY_PREFIXES = (
    ("reference.", "head.reference."),
    ("pe_proj.", "head.bias.pe_proj."),
    ("proj_net.", "head.bias.proj_net."),
    ("decoder_conv.", "head.decoder.conv."),
    ("decoder_norm.", "head.decoder.norm."),
    ("clip.visual.", "backbone.clip.visual."),
)


def _upgrade_legacy_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state saved with the flat names (``pe_proj.weight``, ...) under today's names."""
    if any(k.startswith(("head.", "backbone.")) for k in state):
        return state
    upgraded = {}
    for key, value in state.items():
        key = "head.query" if key == "query" else key
        for old, new in _LEGACY_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        upgraded[key] = value
    return upgraded


class Rectifier(CLIPSegmentor):
    """ReCLIP++ rectification over a frozen CLIP: :class:`~reclip.backbones.DenseCLIP` -> :class:`RectifierHead`.

    Args:
        clip: a CLIP with a ViT image tower; registered once (``backbone.clip``) and frozen
            (``requires_grad`` False, kept in eval mode) unless
            ``config.finetune_image_encoder`` trains its image tower.
        queries: W_q, :func:`reclip.text.query_embeddings` of the vocabulary; classes with
            synonyms use the re-normalised mean of their rows (:func:`class_query_weights`).
        class_names: one name per class (C,), the Reference prompt's [CLS] words.
        config: switches and hyper-parameters (:data:`RECLIPPP` by default).

    Trainable parameters (``trainable_state_dict``): ``head.reference.context`` (L, text
    width); ``head.bias.pe_proj`` Conv1x1(visual width -> D) ("independent") or
    ``head.bias.proj_net`` ("dependent"); ``head.decoder.conv`` Conv5x5(D + C -> C) and
    ``head.decoder.norm`` BN(C) (with decoder); ``head.query`` (C, D) (learnable query).

    ``forward(images)`` is the segmentor interface: images (B, 3, H, W) normalised ->
    logits M_o (B, C, h', w') covering the input, one channel per class (no
    ``class_index``). ``forward_train`` returns every intermediate on the grid.
    """

    def __init__(
        self,
        clip: CLIP,
        queries: QueryEmbeddings,
        class_names: Sequence[str],
        config: RectifierConfig = RECLIPPP,
    ) -> None:
        head = build_rectifier_head(clip, queries, class_names, config)
        super().__init__(DenseCLIP(clip, get_strategy(config.strategy)), head)
        self.config = config
        for p in clip.parameters():
            p.requires_grad_(False)
        if config.finetune_image_encoder:
            clip.visual.requires_grad_(True)
        clip.eval()
        self.to(clip.token_embedding.weight.device)
        # Class-aware strategies (ResCLIP's semantic feedback, a zero-shot first pass) read the
        # FIXED text queries W_q, one per class: the segmentation they feed back is CLIP's own,
        # never the trained head's (a learnable query would make Z depend on training).
        self.backbone.set_queries(self.head.fixed_queries)

    @property
    def query_weights(self) -> Tensor:
        """W_q (C, D) as the head uses it."""
        return self.head.query_weights

    def select_output(self, name: str) -> Rectifier:
        """Make ``forward`` return M_o ("decoded", default), M ("rectified") or M_q ("query"); returns self."""
        self.head.select_output(name)
        return self

    # -- state ------------------------------------------------------------------------

    def train(self, mode: bool = True) -> Rectifier:
        """Train/eval the head; CLIP stays in eval mode (the engine's contract)."""
        super().train(mode)
        self.clip.eval()
        return self

    def _is_trainable_key(self, key: str) -> bool:
        if not key.startswith("backbone."):
            return True
        return self.config.finetune_image_encoder and key.startswith("backbone.clip.visual.")

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The head's parameters and BN buffers, never CLIP's (except its image tower under
        ``finetune_image_encoder``). Detached tensors, as ``state_dict``."""
        return {k: v for k, v in self.state_dict().items() if self._is_trainable_key(k)}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load what :meth:`trainable_state_dict` saved (also under the names of older runs);
        missing or extra keys raise."""
        state = _upgrade_legacy_keys(dict(state))
        own = self.trainable_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"rectifier state does not match this configuration: missing {missing}, unexpected {unexpected}; "
                "was it trained with another RectifierConfig or class list?"
            )
        misfit = [f"{k} {tuple(state[k].shape)} {state[k].dtype} (expected {tuple(v.shape)} {v.dtype})"
                  for k, v in own.items()
                  if state[k].shape != v.shape or state[k].is_floating_point() != v.is_floating_point()]
        if misfit:
            raise ValueError(f"rectifier state has tensors of the wrong shape or type: {misfit[:6]}")
        self.load_state_dict(state, strict=False)

    # -- forward ----------------------------------------------------------------------

    def features(self, images: Tensor) -> Tensor:
        """Z: images (B, 3, H, W) normalised -> (B, D, h, w) float32 unit rows.

        No graph through a frozen CLIP; bf16 autocast on CUDA if ``features_autocast``.
        """
        grad = contextlib.nullcontext() if self.config.finetune_image_encoder else torch.no_grad()
        use_bf16 = images.is_cuda and self.config.features_autocast
        with grad, torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            z = self.backbone(images)
        return z.float()

    def forward_train(self, images: Tensor) -> RectifierOutputs:
        """images (B, 3, H, W) normalised -> :class:`RectifierOutputs` on the feature grid."""
        return self.head.outputs(self.features(images))


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
