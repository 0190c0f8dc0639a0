"""The Reference prompt of ReCLIP++ (paper section III-B, eq. 1): W_r from learnable context.

Each class's Reference text is ``R_i = [v_1] ... [v_L] [CLS_i]``: L word embeddings
shared by all classes (CoOp style) followed by the class name, passed through CLIP's
frozen text encoder and read at the end token -> W_r (C, D).

Token layout (dogehhh/ReCLIP ``TextEncoder.forward`` + ``prepare_dataset_cls_tokens``)::

    [SOT] [v_1 ... v_L] [name_1 ... name_m] [EOT]      1 + L + m + 1 <= context_length

The official code keeps the first 3 BPE tokens after SOT of ``clip.tokenize(name)``
(``[0][1:4]``, dogehhh/ReCLIP ``prepare_dataset_cls_tokens``) and reads the embedding at
``74 + argmax`` of those 3 ids (``TextEncoder.forward``): a name of 3 or more tokens loses
its EOT and is read at its name token with the largest id (for "pottedplant", the middle
one). By default (``name_tokens="keep_eot"``) the name is cut to the slots left
(``context_length - 2 - L``, 2 for the default L = 73) and EOT is always kept;
``name_tokens="official"`` reproduces the official layout exactly, for reproducing the
published numbers. Either way the names that lose tokens are named in one warning.

Efficient encoding. The text transformer is causal, so the (1 + L)-token prefix
``[SOT; context]`` is the same for every class and no prefix token ever sees a name.
:meth:`ReferencePrompt.forward` runs the prefix once through every block (keeping its
keys/values per layer) and runs only the short per-class suffixes ``[name; EOT]``,
each suffix token attending to ``[prefix keys/values ; its own suffix keys/values up to
itself]``. This is exactly the full computation (same operations, same positions): the
cost falls from C * 77 tokens to 74 + C * 3 tokens per layer.
:meth:`ReferencePrompt.forward_full` encodes every class's full sequence (the official
way) for tests and benchmarks.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reclip.clip.model import CLIP, ResidualAttentionBlock
from reclip.clip.tokenizer import EOT, SOT, get_tokenizer

__all__ = ["NAME_TOKENS", "REFERENCE_INITS", "REFERENCE_NORMS", "ReferencePrompt", "default_reference_length"]

REFERENCE_INITS = ("token0", "normal")
REFERENCE_NORMS = ("frobenius", "row")
NAME_TOKENS = ("keep_eot", "official")

# Token id 0 ("!"): dogehhh/ReCLIP TextEncoder initialises every context vector to its
# embedding (``token_embedding(torch.zeros((1, 73)))``).
_INIT_TOKEN_ID = 0
# CoOp's random initialisation (Zhou et al., IJCV 2022: N(0, 0.02^2)).
_NORMAL_INIT_STD = 0.02


def default_reference_length(context_length: int) -> int:
    """L = context_length - 4: SOT + L context + 2 name tokens + EOT (paper III-B: 73 for 77)."""
    return context_length - 4


def _block_suffix(
    block: ResidualAttentionBlock, x: Tensor, k_prefix: Tensor, v_prefix: Tensor, causal: Tensor
) -> Tensor:
    """One causal block on the per-class suffixes, attending to the prefix's keys/values too.

    x (C, S, width); k_prefix, v_prefix (1, heads, P, hd) from the same block; causal
    (S, S) bool, True where suffix token i may see suffix token j (j <= i) -> (C, S, width).

    Attention of suffix token i of class c over [prefix ; suffix_c[: i + 1]], one softmax
    over both parts. The prefix part is one matmul of all C * S queries against the single
    prefix copy (no per-class copy of the prefix keys/values).
    """
    C, S, _ = x.shape
    q, k, v = block.attn.qkv(block.ln_1(x))  # each (C, heads, S, hd)
    heads, hd = q.shape[1], q.shape[3]
    P = k_prefix.shape[2]
    scale = hd**-0.5  # F.scaled_dot_product_attention's default, as in Attention.forward
    q_all = q.transpose(0, 1).reshape(heads, C * S, hd)  # (heads, C*S, hd)
    to_prefix = (q_all @ k_prefix[0].transpose(1, 2)).view(heads, C, S, P).transpose(0, 1)  # (C, heads, S, P)
    to_suffix = (q @ k.transpose(2, 3)).masked_fill(~causal, float("-inf"))  # (C, heads, S, S)
    scores = torch.cat([to_prefix, to_suffix], dim=-1).float() * scale  # (C, heads, S, P + S)
    attn = scores.softmax(dim=-1).to(q.dtype)
    from_prefix = attn[..., :P].transpose(0, 1).reshape(heads, C * S, P) @ v_prefix[0]  # (heads, C*S, hd)
    out = from_prefix.view(heads, C, S, hd).transpose(0, 1) + attn[..., P:] @ v  # (C, heads, S, hd)
    x = x + block.attn.merge_heads(out)
    return x + block.mlp(block.ln_2(x))


class ReferencePrompt(nn.Module):
    """Learnable Reference prompt: ``forward() -> W_r (C, embed_dim)``.

    Args:
        clip: the CLIP whose frozen text tower encodes the prompt. It is NOT registered as
            a submodule (the owner, e.g. :class:`reclip.heads.rectify.Rectifier`, registers
            it once, so state dicts hold it once and ``state_dict()`` here is the context
            alone); keep it on the same device as this module.
        class_names: one name per class, (C,).
        length: L, the number of shared context vectors; default
            :func:`default_reference_length` (73 for a 77-token CLIP). At least one name
            token and EOT must fit: ``1 + L + 2 <= context_length``.
        init: "token0" (official: every vector = the embedding of token id 0) or "normal"
            (CoOp: N(0, 0.02^2)).
        norm: "frobenius" (official ``prompt / prompt.norm()``: W_r divided by the
            Frobenius norm of the whole (C, D) matrix) or "row" (each row unit length;
            METHODS.md reports it collapses VOC mIoU).
        name_tokens: how a name longer than its slots is cut: "keep_eot" (the first
            tokens that fit, then EOT, read at EOT) or "official" (the first
            ``context_length - 1 - L`` tokens of ``[name, EOT, 0 ...]``, read at the
            largest id among them, as dogehhh/ReCLIP; see the module docstring).

    Attributes:
        context: (L, width) learnable word embeddings, float32.
        suffix_tokens: (C, S) int64 buffer, ``[name ids; EOT; 0 padding]`` per class.
        eot_index: (C,) int64 buffer, the position read inside each suffix (EOT's; with
            ``name_tokens="official"`` the largest id's, which is EOT's unless it was cut).
        truncated: the class names whose tokens were cut to fit (empty if none).
    """

    def __init__(
        self,
        clip: CLIP,
        class_names: Sequence[str],
        length: int | None = None,
        init: Literal["token0", "normal"] = "token0",
        norm: Literal["frobenius", "row"] = "frobenius",
        name_tokens: Literal["keep_eot", "official"] = "keep_eot",
    ) -> None:
        super().__init__()
        if isinstance(class_names, str) or not class_names:
            raise ValueError(f"class_names must be a non-empty sequence of names, got {class_names!r}")
        if init not in REFERENCE_INITS:
            raise ValueError(f"unknown reference init {init!r}; available: {list(REFERENCE_INITS)}")
        if norm not in REFERENCE_NORMS:
            raise ValueError(f"unknown reference norm {norm!r}; available: {list(REFERENCE_NORMS)}")
        if name_tokens not in NAME_TOKENS:
            raise ValueError(f"unknown name_tokens {name_tokens!r}; available: {list(NAME_TOKENS)}")
        context_length = clip.context_length
        length = default_reference_length(context_length) if length is None else int(length)
        slots = context_length - 1 - length - 1  # name tokens that fit between context and EOT
        if length < 1 or slots < 1:
            raise ValueError(
                f"reference length {length} leaves {max(slots, 0)} name slots in a {context_length}-token "
                f"context (SOT + L + name + EOT); use 1 <= L <= {context_length - 3}"
            )
        self.__dict__["clip"] = clip  # unregistered on purpose, see the docstring
        self.length = length
        self.norm = norm
        self.name_tokens = name_tokens
        self.class_names = tuple(class_names)

        tokenizer = get_tokenizer()
        suffixes: list[list[int]] = []  # each ends at the token that is read
        truncated: list[str] = []
        for name in self.class_names:
            ids = tokenizer.encode(name)
            if not ids:
                raise ValueError(f"class name {name!r} has no tokens; give it a word")
            if len(ids) > slots:
                truncated.append(name)
            if name_tokens == "keep_eot":
                suffixes.append([*ids[:slots], EOT])
            else:  # official: the first slots + 1 ids of [name, EOT, 0, ...], read at their largest id
                window = [*ids, EOT][: slots + 1]
                suffixes.append(window[: window.index(max(window)) + 1])
        self.truncated = tuple(truncated)
        if truncated:
            cut = "EOT kept" if name_tokens == "keep_eot" else "EOT lost, read at the largest-id token, as official"
            kept = {n: tokenizer.decode(s[:-1] if s[-1] == EOT else s) for n, s in zip(self.class_names, suffixes)
                    if n in truncated}
            warnings.warn(
                f"{len(truncated)} class name(s) longer than the {slots} token slot(s) left by a reference "
                f"length of {length} were cut ({cut}): {kept}; shorten them or lower the reference length",
                stacklevel=2,
            )
        S = max(len(s) for s in suffixes)
        suffix_tokens = torch.zeros(len(suffixes), S, dtype=torch.long)  # 0 padding after the read token (unseen)
        for row, ids in enumerate(suffixes):
            suffix_tokens[row, : len(ids)] = torch.tensor(ids)
        self.register_buffer("suffix_tokens", suffix_tokens, persistent=False)
        self.register_buffer("eot_index", torch.tensor([len(s) - 1 for s in suffixes]), persistent=False)

        embedding = clip.token_embedding.weight
        if init == "token0":
            context = embedding[_INIT_TOKEN_ID].detach().float().expand(length, -1).clone()
        else:
            context = torch.randn(length, embedding.shape[1], device=embedding.device) * _NORMAL_INIT_STD
        self.context = nn.Parameter(context)  # (L, width)

    @property
    def num_classes(self) -> int:
        return self.suffix_tokens.shape[0]

    def _prefix_embeddings(self) -> Tensor:
        """[SOT; context] + positions: (1, 1 + L, width) in the text tower's dtype."""
        clip = self.clip
        dtype = clip.token_embedding.weight.dtype
        sot = clip.token_embedding(torch.tensor([SOT], device=self.context.device))  # (1, width)
        x = torch.cat([sot.to(dtype), self.context.to(dtype)])  # (1 + L, width)
        return (x + clip.positional_embedding[: x.shape[0]].to(dtype))[None]

    def _suffix_embeddings(self) -> Tensor:
        """[name; EOT; pad] + positions after the prefix: (C, S, width)."""
        clip = self.clip
        x = clip.token_embedding(self.suffix_tokens)  # (C, S, width)
        start = 1 + self.length
        return x + clip.positional_embedding[start : start + x.shape[1]].to(x.dtype)

    def _normalise(self, w: Tensor) -> Tensor:
        """(C, D) -> W_r: divided by its Frobenius norm (official) or per row."""
        if self.norm == "frobenius":
            return w / w.norm()
        return F.normalize(w, dim=-1)

    def _project(self, eot_tokens: Tensor) -> Tensor:
        """ln_final then text_projection: (C, width) -> (C, embed_dim), float32."""
        clip = self.clip
        return (clip.ln_final(eot_tokens) @ clip.text_projection).float()

    def forward(self) -> Tensor:
        """W_r (C, embed_dim), float32, prefix computed once (see the module docstring).

        Without gradients (inference, a frozen teacher) the result is kept and reused
        until the context vectors change (their in-place version counter) or move, so
        evaluating a trained rectifier encodes its Reference prompt once, not per image.
        """
        if torch.is_grad_enabled():
            self.__dict__.pop("_frozen_w_r", None)
            return self._encode()
        key = self._cache_key()
        cached = self.__dict__.get("_frozen_w_r")
        stale_mode = cached is not None and cached[1].is_inference() and not torch.is_inference_mode_enabled()
        if cached is None or cached[0] != key or stale_mode:
            cached = (key, self._encode())
            self.__dict__["_frozen_w_r"] = cached  # not a buffer: never saved
        return cached[1]

    def _cache_key(self) -> tuple:
        """What W_r depends on: the context and the text tower's tensors (identity, in-place version)."""
        tensors = [self.context, *self.clip.transformer.parameters(), *self.clip.ln_final.parameters(),
                   self.clip.text_projection, self.clip.token_embedding.weight, self.clip.positional_embedding]
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    def _encode(self) -> Tensor:
        blocks = self.clip.transformer.resblocks
        prefix = self._prefix_embeddings()  # (1, P, width)
        suffix = self._suffix_embeddings()  # (C, S, width)
        S = suffix.shape[1]
        # Suffix token i sees every prefix token and suffix tokens 0..i.
        causal = torch.ones(S, S, dtype=torch.bool, device=suffix.device).tril()
        for block in blocks:
            # The suffixes attend to this block's prefix keys/values (computed from its input).
            prefix_out, (_, k, v) = block.forward_with_qkv(prefix, causal=True)
            suffix = _block_suffix(block, suffix, k, v, causal)
            prefix = prefix_out
        eot = suffix[torch.arange(suffix.shape[0], device=suffix.device), self.eot_index]  # (C, width)
        return self._normalise(self._project(eot))

    def full_sequences(self) -> tuple[Tensor, Tensor]:
        """Every class's whole sequence as word embeddings, (C, context_length, width), and eot index (C,).

        Padded with token id 0 after EOT to the context length, as the official code's
        77-token input (the padding is causally invisible to EOT).
        """
        clip = self.clip
        C = self.num_classes
        dtype = clip.token_embedding.weight.dtype
        sot = clip.token_embedding(torch.full((C, 1), SOT, device=self.context.device))  # (C, 1, width)
        tail = F.pad(self.suffix_tokens, (0, clip.context_length - 1 - self.length - self.suffix_tokens.shape[1]))
        names = clip.token_embedding(tail)  # (C, context_length - 1 - L, width)
        x = torch.cat([sot, self.context.to(dtype).expand(C, -1, -1), names.to(dtype)], dim=1)
        return x, 1 + self.length + self.eot_index

    def forward_full(self) -> Tensor:
        """W_r (C, embed_dim) with every class encoding its full sequence (the official way)."""
        x, eot_index = self.full_sequences()
        return self._normalise(self.clip.encode_token_embeddings(x, eot_index).float())

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, length={self.length}, norm={self.norm!r}, name_tokens={self.name_tokens!r}"
