"""CLIP's byte-level BPE tokenizer.

A re-implementation of the tokenizer of Radford et al., "Learning Transferable Visual
Models From Natural Language Supervision" (2021), behaviour read from openai/CLIP
``clip/simple_tokenizer.py`` and ``clip/clip.py``: same cleaning (ftfy, HTML unescape,
whitespace collapse, lowercase), same pre-tokenisation pattern, same 49,408-token
vocabulary built from ``bpe_simple_vocab_16e6.txt.gz`` (shipped next to this file), so
ids match OpenAI's and open_clip's exactly.

Importing this module is cheap: the vocabulary is read, and ftfy / regex are imported,
only when the first text is tokenised (:func:`get_tokenizer` builds one shared
instance lazily).
"""

from __future__ import annotations

import functools
import gzip
import html
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

__all__ = [
    "CONTEXT_LENGTH",
    "EOT",
    "SOT",
    "VOCAB_SIZE",
    "SimpleTokenizer",
    "default_bpe_path",
    "get_tokenizer",
    "tokenize",
]

SOT = 49406  # id of "<|startoftext|>"
EOT = 49407  # id of "<|endoftext|>"; CLIP's text embedding is read at this position
VOCAB_SIZE = 49408  # 256 bytes + 256 bytes</w> + 48,894 merges + SOT + EOT
CONTEXT_LENGTH = 77  # every released CLIP uses 77 positions

_SOT_TEXT = "<|startoftext|>"
_EOT_TEXT = "<|endoftext|>"
# openai/CLIP reads merges[1 : 49152 - 256 - 2 + 1]: line 0 is a version header, and
# only the first 48,894 merges are used so that the vocabulary has 49,408 entries.
_NUM_MERGES = 49152 - 256 - 2
# CLIP's pre-tokenisation pattern (openai/CLIP simple_tokenizer.py): special tokens,
# English contractions, runs of letters, single digits, runs of other non-space chars.
_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def default_bpe_path() -> Path:
    """Path of the BPE merges file shipped with reclip (from openai/CLIP, MIT licence)."""
    return Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """Reversible map from the 256 byte values to printable unicode characters.

    GPT-2 / CLIP trick: printable Latin-1 bytes map to themselves, the other bytes
    (control characters, space, ...) to code points 256.. so that BPE never sees
    whitespace or control characters.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    """Adjacent symbol pairs of ``word``."""
    return set(zip(word[:-1], word[1:]))


class SimpleTokenizer:
    """CLIP's BPE tokenizer: text <-> list of token ids (no SOT/EOT, no padding).

    Args:
        bpe_path: gzip'd merges file; defaults to the one shipped with reclip.
        cache_size: number of pre-tokens whose BPE split is memoised (lru_cache).

    ``encode`` applies CLIP's cleaning: ``ftfy.fix_text``, HTML unescape (twice),
    collapse whitespace, strip, lowercase. As in CLIP, the literal strings
    ``<|startoftext|>`` / ``<|endoftext|>`` inside a text become the special ids.
    """

    def __init__(self, bpe_path: str | Path | None = None, cache_size: int = 2**16) -> None:
        import regex  # imported here so that `import reclip.clip` stays cheap

        path = Path(bpe_path) if bpe_path is not None else default_bpe_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"BPE vocabulary {str(path)!r} not found; reinstall reclip (the file ships "
                "as package data) or pass bpe_path= pointing to bpe_simple_vocab_16e6.txt.gz"
            )
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(
                f"{str(path)!r} is not CLIP's BPE merges file: expected {_NUM_MERGES} merge "
                f"pairs after a header line, found {len(merges)}; use bpe_simple_vocab_16e6.txt.gz"
            )

        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += [_SOT_TEXT, _EOT_TEXT]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        assert len(self.encoder) == VOCAB_SIZE and self.encoder[_EOT_TEXT] == EOT

        self._regex = regex
        self._pattern = regex.compile(_PATTERN, regex.IGNORECASE)
        self._whitespace = regex.compile(r"\s+")
        # Memoise the BPE split of each pre-token; bound per instance (not on the class)
        # so that the cache dies with the tokenizer.
        self._bpe_cached = functools.lru_cache(maxsize=cache_size)(self._bpe)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (49,408)."""
        return len(self.encoder)

    # -- cleaning (openai/CLIP basic_clean + whitespace_clean) --------------------------

    def clean(self, text: str) -> str:
        """CLIP's text normalisation: ftfy, HTML unescape x2, collapse whitespace, lowercase."""
        import ftfy  # ~75 ms to import; only needed once text is actually tokenised

        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
        text = self._whitespace.sub(" ", text.strip()).strip()
        return text.lower()

    # -- BPE ------------------------------------------------------------------------

    def _bpe(self, token: str) -> tuple[str, ...]:
        """Split one byte-encoded pre-token into BPE symbols (last one ends in </w>)."""
        if token in (_SOT_TEXT, _EOT_TEXT):
            return (token,)
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        while pairs:
            # Apply the highest-priority (lowest-rank) merge present in the word.
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        return word

    def bpe(self, token: str) -> tuple[str, ...]:
        """Memoised BPE split of a byte-encoded pre-token."""
        return self._bpe_cached(token)

    # -- public API -----------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` after CLIP's cleaning, without SOT/EOT.

        >>> get_tokenizer().encode("a photo of a cat.")
        [320, 1125, 539, 320, 2368, 269]
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}: {text!r}")
        ids: list[int] = []
        for piece in self._pattern.findall(self.clean(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[sym] for sym in self.bpe(mapped))
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Text of a sequence of token ids.

        Args:
            ids: token ids, e.g. a row of :func:`tokenize`'s output (1-D tensor or list).
            skip_special: drop SOT and stop at the first EOT, so that the zero padding
                after EOT (id 0 is the real token "!") is ignored.

        Returns:
            The cleaned, lowercased text with words separated by single spaces. Like
            CLIP, punctuation comes back as its own word ("a cat." -> "a cat ."); unlike
            CLIP's decode, there is no trailing space.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(
                    f"decode expects a 1-D sequence of ids, got a tensor of shape "
                    f"{tuple(ids.shape)}; decode each row separately"
                )
            ids = ids.tolist()
        symbols: list[str] = []
        for i in ids:
            i = int(i)
            if skip_special and i == SOT:
                continue
            if skip_special and i == EOT:
                break
            if i not in self.decoder:
                raise ValueError(f"token id {i} is outside CLIP's vocabulary [0, {VOCAB_SIZE})")
            symbols.append(self.decoder[i])
        text = "".join(symbols)  # special strings are printable ASCII: the byte map keeps them
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(
        self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, truncate: bool = False
    ) -> torch.Tensor:
        """Same as :func:`tokenize` with this tokenizer."""
        return _tokenize(self, texts, context_length, truncate)


_LOCK = threading.Lock()
_TOKENIZER: SimpleTokenizer | None = None


def get_tokenizer() -> SimpleTokenizer:
    """The shared :class:`SimpleTokenizer`, built on first use (reads the vocabulary once)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        with _LOCK:
            if _TOKENIZER is None:
                _TOKENIZER = SimpleTokenizer()
    return _TOKENIZER


def _tokenize(
    tokenizer: SimpleTokenizer, texts: str | Sequence[str], context_length: int, truncate: bool
) -> torch.Tensor:
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 to hold SOT and EOT, got {context_length}")
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [SOT, *tokenizer.encode(text), EOT]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(
                    f"text {text!r} is {len(ids)} tokens with SOT/EOT, longer than the context "
                    f"length {context_length}; shorten it or pass truncate=True"
                )
            # Keep the end token: CLIP reads the text embedding at EOT (openai/CLIP does the same).
            ids = ids[:context_length]
            ids[-1] = EOT
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def tokenize(
    texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, truncate: bool = False
) -> torch.Tensor:
    """Tokenise texts for CLIP's text encoder, as ``clip.tokenize`` does.

    Args:
        texts: one text or a list of N texts.
        context_length: sequence length L of the output (77 for every released CLIP).
        truncate: cut texts longer than L tokens (the last kept token is replaced by
            EOT); otherwise such a text raises ValueError naming it.

    Returns:
        LongTensor (N, L): ``[SOT, ids..., EOT, 0, 0, ...]`` per row.
    """
    return _tokenize(get_tokenizer(), texts, context_length, truncate)
