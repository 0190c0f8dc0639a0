"""The text side: class vocabularies and cached query embeddings W_q.

A class is a tuple of synonyms (the first is its display name). The query embedding of a
synonym is CLIP's prompt ensemble (Radford et al. 2021, section 3.1.4; METHODS.md
section 1): encode every template filled with the name, L2-normalise each, average,
re-normalise. A class scores the max over its synonyms (SCLIP / ClearCLIP class files).
The templates themselves are in :mod:`reclip.templates`.

    vocab = read_class_file("my_classes.txt")
    queries = query_embeddings(clip, vocab, templates="reclip85")  # cached on disk
    logits = queries.classify(features, dim=1)  # (B, D, h, w) -> (B, C, h, w)
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from reclip.cache import cache_folder
from reclip.clip.tokenizer import tokenize
from reclip.files import atomic_write, read_text_file
from reclip.templates import resolve_templates

if TYPE_CHECKING:
    from reclip.clip.model import CLIP

__all__ = [
    "SHARED_NAMES_LINE",
    "QueryEmbeddings",
    "Vocabulary",
    "default_cache_dir",
    "query_embeddings",
    "read_class_file",
]

# -- vocabularies -----------------------------------------------------------------------

# A class file line that allows a name in two classes (see Vocabulary): SCLIP's COCO-Object
# list has "bed" both as a background word and as a class, and reproducing it needs it so.
SHARED_NAMES_LINE = "# reclip: shared-names"
_GIVE_EACH_NAME = "Give each name to one class (the synonyms of a class go on its line, separated by commas)"
_SHARED_NAMES_FIX = f"{_GIVE_EACH_NAME}, or pass shared_names=True to keep a published list as it is"

# Letters (Unicode category Lo) that draw nothing; every other invisible character is a
# control or format character (Cc, Cf).
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")  # Hangul fillers
# Zero-width (non-)joiners are part of the spelling of words in some scripts (Persian, Indic).
_JOINERS = frozenset("\u200c\u200d")


def _clean_name(name: str) -> str:
    """Strip and collapse runs of any Unicode whitespace (tab, no-break space ...) to one space."""
    return " ".join(name.split())


def _query_key(name: str) -> str:
    """Names with the same key are the same CLIP query (its tokenizer lowercases and collapses spaces)."""
    return _clean_name(name).lower()


def _name_problem(name: str) -> str | None:
    """Why the (cleaned, non-empty) ``name`` cannot name a class, or None."""
    for ch in name:
        if ch in _BLANK_LETTERS or (unicodedata.category(ch) in ("Cc", "Cf") and ch not in _JOINERS):
            what = unicodedata.name(ch, "a control character")
            return (f"{name!r} contains the invisible character U+{ord(ch):04X} ({what}); delete it "
                    "(such characters come with text pasted from web pages or word processors)")
    if not any(unicodedata.category(ch)[0] in "LN" for ch in name):
        return f"{name!r} is not a class name: a name needs at least one letter or digit"
    return None


def _clean_class(names: Sequence[str]) -> tuple[str, ...]:
    """One class's names: whitespace collapsed, empties dropped, repeats (same query) merged."""
    seen: dict[str, str] = {}
    for name in map(_clean_name, names):
        if name:
            seen.setdefault(_query_key(name), name)
    return tuple(seen.values())


def _short(value: object, width: int = 80) -> str:
    """repr(value), cut to ``width`` characters."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 4] + " ..."


def _check_classes(classes: Sequence[tuple[str, ...]], labels: Sequence[str | None], where: Sequence[str],
                   refs: Sequence[str], shared_names: bool, fix: str = _GIVE_EACH_NAME) -> None:
    """Refuse classes that could not be told apart.

    ``where[i]`` starts an error about class i (``"path:7"``, ``"class 3"``); ``refs[j]``
    points back at an earlier class j in it (``" (line 2)"``, or ``""`` where the class
    index says it all).

    Every name must be visible (a letter or digit, no control or zero-width character);
    display names must differ; and, unless ``shared_names``, no name may belong to two
    classes; ``fix`` ends that error (how to mend or allow it where the classes came from).
    """
    first_name: dict[str, int] = {}
    first_label: dict[str, int] = {}
    shown = [label or syns[0] for label, syns in zip(labels, classes)]
    for i, syns in enumerate(classes):
        for name in (*syns, *([labels[i]] if labels[i] else [])):
            problem = _name_problem(name)
            if problem:
                raise ValueError(f"{where[i]}: {problem}")
        for name in syns:
            j = first_name.setdefault(_query_key(name), i)
            if j != i and not shared_names:
                raise ValueError(
                    f"{where[i]}: {name!r} is also a name of class {j} {shown[j]!r}{refs[j]}. Both classes "
                    "would score the same query, so wherever it matches best they tie and the argmax always "
                    f"picks class {j}. {fix}."
                )
        j = first_label.setdefault(_query_key(shown[i]), i)
        if j != i:
            raise ValueError(
                f"{where[i]}: {shown[i]!r} is already the display name of class {j}{refs[j]}; outputs could not "
                "tell the two apart: merge them into one class or rename one ('label: words' sets a display name)"
            )


def _parse_line(line: str) -> tuple[str | None, tuple[str, ...]]:
    """'background: sky, wall' -> ('background', ('sky', 'wall')); 'cat, kitty' -> (None, ('cat', 'kitty')).

    A label before a colon is the display name only; the prompts are the words after it
    (SCLIP's background line is a list of background words, shown as "background").
    """
    label, sep, rest = line.partition(":")
    if sep and _clean_name(label) and "," not in label:
        return _clean_name(label), _clean_class(rest.split(","))
    return None, _clean_class(line.split(","))


def _parse_item(line: str, where: str) -> tuple[str | None, tuple[str, ...]]:
    """One class written as a class-file line; refuses a line with no name."""
    label, syns = _parse_line(line)
    if syns:
        return label, syns
    if label is not None:
        raise ValueError(
            f"{where}: {line.strip()!r} gives the display name {label!r} but no name after the colon; "
            f"write '{label}: word, word' (the words are the prompts) or drop the colon"
        )
    raise ValueError(f"{where}: {line.strip()!r} has no class name; remove it or write a name")


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of C classes, each a tuple of synonyms (first = display name).

    Class files (``read_class_file``) and lists use the same syntax: one class per
    line / item, synonyms separated by commas; ``label: word, word`` gives a display label
    that is not itself a prompt (e.g. ``background: sky, wall, tree``).

    What is refused, wherever the classes come from (the error names the class, line or
    item):

    - a name that is invisible or has no letter or digit (``:``, a zero-width space, a
      control character);
    - two classes with the same display name;
    - a name in two classes. Both classes would score the same query, so wherever it is
      the best match they tie and the argmax goes to the first: the second could never
      win there. Names are compared as CLIP reads them (case and runs of whitespace
      ignored), so ``--classes cat,Cat`` is refused like two ``cat`` lines. A name
      repeated within one class is the same query of the same class and is merged.
      ``shared_names=True`` (in a class file, the line ``# reclip: shared-names``) allows
      it, to reproduce published lists that do it (SCLIP's COCO-Object list has "bed" as
      a background word and as a class).
    """

    classes: tuple[tuple[str, ...], ...]
    labels: tuple[str, ...] | None = None  # display names; None: the first synonym of each class
    # Permission, not content: vocabularies with the same classes are equal either way.
    shared_names: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        # accept lists for convenience; store tuples so the vocabulary is hashable
        if isinstance(self.classes, str):
            raise TypeError(f"classes must be a sequence of tuples of names, got the string {self.classes!r}; "
                            "use Vocabulary.from_names('cat,dog') or read_class_file(path)")
        classes = tuple(tuple(c) if isinstance(c, (list, tuple)) else c for c in self.classes)
        if not classes:
            raise ValueError("a Vocabulary needs at least one class; got an empty list")
        for i, syns in enumerate(classes):
            if not isinstance(syns, tuple) or not all(isinstance(s, str) for s in syns) or not _clean_class(syns):
                raise ValueError(
                    f"class {i} must be a non-empty tuple of non-empty names, got {syns!r}; "
                    "build vocabularies with Vocabulary.from_names or read_class_file"
                )
        classes = tuple(_clean_class(syns) for syns in classes)
        object.__setattr__(self, "classes", classes)
        labels: tuple[str | None, ...] = (None,) * len(classes)
        if self.labels is not None:
            if len(self.labels) != len(classes):
                raise ValueError(f"{len(self.labels)} labels for {len(classes)} classes")
            labels = tuple(_clean_name(label) if label else None for label in self.labels)
            object.__setattr__(self, "labels", tuple(label or syns[0] for label, syns in zip(labels, classes)))
        n = len(classes)
        _check_classes(classes, labels, [f"class {i}" for i in range(n)], [""] * n, self.shared_names,
                       _SHARED_NAMES_FIX)

    @classmethod
    def from_names(cls, names: str | Sequence[str | Sequence[str]], *, shared_names: bool = False) -> Vocabulary:
        """Vocabulary from class names (never from a file: see :func:`read_class_file`).

        Args:
            names: either one string of comma-separated class names (the CLI's
                ``--classes cat,dog``: one name per class, no synonyms), or a sequence
                with one item per class: a string whose commas separate synonyms (like a
                class-file line) or a sequence of synonyms.
            shared_names: allow a name in two classes (see :class:`Vocabulary`).
        """
        fix = _SHARED_NAMES_FIX
        if isinstance(names, str):
            fix = "Remove the repeat (here every name is a class of its own; a class file gives a class synonyms)"
            items = [syns for syns in (_clean_class([n]) for n in names.split(",")) if syns]
            if not items:
                raise ValueError(f"no class names in {names!r}; give at least one, e.g. 'cat,dog'")
            labels: list[str | None] = [None] * len(items)
        else:
            if isinstance(names, os.PathLike):
                raise TypeError(f"{names!r} is a path; read a class file with read_class_file(path)")
            names = list(names)
            items, labels = [], []
            for i, item in enumerate(names):
                at = f"classes {_short(names)}: class {i}"
                if isinstance(item, str):
                    label, syns = _parse_item(item, at)
                else:
                    label, syns = None, _clean_class([str(s) for s in item])
                    if not syns:
                        raise ValueError(f"{at}: {item!r} has no class name; remove it or name it")
                items.append(syns)
                labels.append(label)
            if not items:
                raise ValueError(f"no class names in {names!r}; give at least one, e.g. ['cat', 'dog']")
        where = [f"classes {_short(names)}: class {i}" for i in range(len(items))]
        _check_classes(items, labels, where, [""] * len(items), shared_names, fix)
        return cls(tuple(items), tuple(labels) if any(labels) else None, shared_names=shared_names)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Vocabulary:
        """Same as :func:`read_class_file`."""
        return read_class_file(path)

    @property
    def names(self) -> tuple[str, ...]:
        """Display names, (C,): the label, else the first synonym of each class."""
        return self.labels if self.labels is not None else tuple(syns[0] for syns in self.classes)

    @property
    def num_classes(self) -> int:
        """C."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.classes)

    @cached_property
    def all_synonyms(self) -> tuple[str, ...]:
        """Every synonym of every class in class order, (S,)."""
        return tuple(s for syns in self.classes for s in syns)

    @cached_property
    def synonym_class(self) -> tuple[int, ...]:
        """Class index of each entry of :attr:`all_synonyms`, (S,)."""
        return tuple(c for c, syns in enumerate(self.classes) for _ in syns)

    @property
    def has_synonyms(self) -> bool:
        """True when some class has more than one name (S > C)."""
        return len(self.all_synonyms) > self.num_classes

    def to_list(self) -> list[list[str]]:
        """The synonyms of each class, JSON-friendly."""
        return [list(syns) for syns in self.classes]

    def to_lines(self) -> list[str]:
        """Class-file lines (labels kept); ``from_names(v.to_lines(), shared_names=v.shared_names) == v``."""
        lines = [", ".join(syns) for syns in self.classes]
        if self.labels is None:
            return lines
        return [line if label == syns[0] else f"{label}: {line}"
                for label, syns, line in zip(self.labels, self.classes, lines)]


def read_class_file(path: str | os.PathLike) -> Vocabulary:
    """Read a class file: one class per line, synonyms separated by commas.

    Text after ``#`` is a comment; blank lines (whitespace of any kind) are skipped; a
    leading byte-order mark is dropped; ``label: words`` names a class whose prompts are
    the words (SCLIP's background words). The rules of :class:`Vocabulary` apply and
    errors name the file and line (``path:line: ...``); the line
    ``# reclip: shared-names`` allows a name in two classes. Example::

        # VOC background as a list of words (SCLIP style), shown as "background"
        background: sky, wall, tree
        aeroplane, airplane
        person, person in shirt
    """
    path = Path(path)
    text = read_text_file(path, "class file")
    shared_names = False
    items: list[tuple[str, ...]] = []
    labels: list[str | None] = []
    numbers: list[int] = []
    # split on "\n" only, so that line numbers are an editor's (str.splitlines also breaks
    # at form feeds, U+2028 ...)
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip() == SHARED_NAMES_LINE:
            shared_names = True
        content = line.split("#", 1)[0]
        if not _clean_name(content):
            continue
        label, syns = _parse_item(content, f"{path}:{number}")
        items.append(syns)
        labels.append(label)
        numbers.append(number)
    if not items:
        raise ValueError(
            f"class file {str(path)!r} lists no classes; write one class per line "
            "(synonyms separated by commas, '#' starts a comment)"
        )
    _check_classes(items, labels, [f"{path}:{n}" for n in numbers], [f" (line {n})" for n in numbers], shared_names,
                   f"{_GIVE_EACH_NAME}, or, to keep a published list as it is, add the line "
                   f"{SHARED_NAMES_LINE!r} to the file")
    return Vocabulary(tuple(items), tuple(labels) if any(labels) else None, shared_names=shared_names)


# -- query embeddings -------------------------------------------------------------------


def max_over_synonyms(similarity: torch.Tensor, class_index: torch.Tensor, num_classes: int,
                      dim: int = 1) -> torch.Tensor:
    """(..., S, ...) per-synonym scores -> (..., C, ...) per-class scores, max over each class's rows.

    ``class_index`` (S,) gives the class of each synonym; every class must own one. The
    gradient flows to the argmax synonym.
    """
    x = similarity.movedim(dim, -1)  # (..., S)
    index = class_index.to(x.device).expand_as(x)
    out = x.new_full((*x.shape[:-1], num_classes), float("-inf"))
    out = out.scatter_reduce(-1, index, x, reduce="amax", include_self=False)  # (..., C)
    return out.movedim(-1, dim)


@dataclass(frozen=True, eq=False)
class QueryEmbeddings:
    """Per-synonym text embeddings W_q and how synonyms map to classes.

    Attributes:
        weights: (S, D) float32, unit rows: one prompt-ensemble embedding per synonym,
            in ``Vocabulary.all_synonyms`` order.
        class_index: (S,) long, the class of each row, in [0, num_classes).
        num_classes: C.

    Scores are computed per synonym and reduced to classes by a max
    (:meth:`class_logits`); with no synonyms (S == C) that is the identity and
    :attr:`per_class` gives W_q as a (C, D) matrix.
    """

    weights: torch.Tensor
    class_index: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        s = self.weights.shape[0]
        if self.weights.dim() != 2 or self.class_index.shape != (s,):
            raise ValueError(
                f"weights must be (S, D) and class_index (S,); got {tuple(self.weights.shape)} "
                f"and {tuple(self.class_index.shape)}"
            )
        if self.class_index.dtype != torch.long or (s > 0 and int(self.class_index.min()) < 0):
            raise ValueError(
                f"class_index must be non-negative int64 class ids, got dtype {self.class_index.dtype} "
                f"and values {self.class_index.tolist()}"
            )
        counts = torch.bincount(self.class_index.cpu(), minlength=self.num_classes)
        if counts.numel() != self.num_classes or (counts == 0).any():
            raise ValueError(
                f"class_index must cover every class 0..{self.num_classes - 1} at least once; "
                f"got counts {counts.tolist()}"
            )

    @property
    def num_synonyms(self) -> int:
        """S."""
        return self.weights.shape[0]

    @property
    def embed_dim(self) -> int:
        """D."""
        return self.weights.shape[1]

    @cached_property
    def is_one_per_class(self) -> bool:
        """True when row c is class c (no synonyms)."""
        return self.num_synonyms == self.num_classes and bool(
            (self.class_index.cpu() == torch.arange(self.num_classes)).all()
        )

    @property
    def per_class(self) -> torch.Tensor:
        """W_q as (C, D); only defined when every class has a single name."""
        if not self.is_one_per_class:
            raise ValueError(
                f"{self.num_synonyms} synonyms for {self.num_classes} classes: there is no single "
                "(C, D) W_q; score synonyms with `weights` and reduce with class_logits()"
            )
        return self.weights

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> QueryEmbeddings:
        """Copy with weights (and class_index) moved; dtype applies to weights only."""
        return QueryEmbeddings(self.weights.to(device, dtype), self.class_index.to(device), self.num_classes)

    def class_logits(self, similarity: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Reduce per-synonym scores to per-class scores by a max over each class's synonyms.

        Args:
            similarity: (..., S, ...) scores against ``weights``, S along ``dim``.
            dim: the synonym dimension.

        Returns:
            (..., C, ...) with C along ``dim``; differentiable (gradient to the argmax).
        """
        if similarity.shape[dim] != self.num_synonyms:
            raise ValueError(
                f"similarity has {similarity.shape[dim]} entries along dim {dim}, expected "
                f"{self.num_synonyms} (one per synonym, the rows of weights)"
            )
        if self.is_one_per_class:
            return similarity
        return max_over_synonyms(similarity, self.class_index, self.num_classes, dim)

    def classify(self, features: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Class scores of features: dot product with every synonym, then max per class.

        Args:
            features: (..., D, ...) with D along ``dim`` (e.g. dense features (B, D, h, w),
                L2-normalised for cosine similarity).
            dim: the feature dimension.

        Returns:
            (..., C, ...) with C along ``dim``, e.g. (B, C, h, w).
        """
        x = features.movedim(dim, -1)  # (..., D)
        sim = x @ self.weights.to(x.device, x.dtype).t()  # (..., S)
        return self.class_logits(sim, dim=-1).movedim(-1, dim)


def default_cache_dir() -> Path:
    """``$RECLIP_CACHE/text`` or ``~/.cache/reclip/text``."""
    return cache_folder("text")


_CACHE_VERSION = 1  # bump when the embedding recipe changes


def _cache_key(fingerprint: str, context_length: int, templates: Sequence[str], names: Sequence[str]) -> str:
    payload = {
        "version": _CACHE_VERSION,
        "weights": fingerprint,
        "context_length": context_length,
        "templates": list(templates),
        "names": list(names),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


def _read_cache(path: Path, key: str, rows: int) -> torch.Tensor | None:
    """Cached (U, D) embeddings if ``path`` holds ``key``; None on a miss or a bad file."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            weights = f.get_tensor("weights")
    except Exception as err:  # a truncated / foreign file is recomputed, not fatal
        warnings.warn(f"ignoring unreadable text-embedding cache {str(path)!r}: {err}", stacklevel=3)
        return None
    if weights.dim() != 2 or weights.shape[0] != rows:
        return None
    return weights


def _write_cache(path: Path, key: str, weights: torch.Tensor, names: Sequence[str]) -> None:
    """Written atomically (:func:`reclip.files.atomic_write`)."""
    from safetensors.torch import save_file

    tensors = {"weights": weights.detach().to("cpu", torch.float32).contiguous()}
    metadata = {"key": key, "names": json.dumps(list(names), ensure_ascii=False)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


@torch.no_grad()
def _encode_names(
    clip: CLIP,
    names: Sequence[str],
    templates: Sequence[str],
    batch_size: int,
    device: torch.device,
    progress: bool,
) -> torch.Tensor:
    """Prompt-ensemble embedding per name, (U, D) float32 unit rows (METHODS.md section 1)."""
    texts = [t.format(name) for name in names for t in templates]  # (U * T,), name-major
    tokens = tokenize(texts, context_length=clip.context_length)  # (U * T, L)
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="text embeddings", unit="batch")
    # fp32 even on a GPU: encoded once per vocabulary and cached, so precision costs nothing
    # later, and a cached W_q must not depend on the device that happened to write it.
    chunks = []
    with torch.autocast(device.type, enabled=False):
        for start in starts:
            emb = clip.encode_text(tokens[start : start + batch_size].to(device))  # (b, D)
            chunks.append(F.normalize(emb.float(), dim=-1))
    per_prompt = torch.cat(chunks).view(len(names), len(templates), -1)  # (U, T, D)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)  # (U, D)


def query_embeddings(
    clip: CLIP,
    vocabulary: Vocabulary | str | Sequence[str | Sequence[str]],
    templates: str | Sequence[str] = "reclip85",
    cache_dir: str | os.PathLike | Literal[False] | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> QueryEmbeddings:
    """Query embeddings W_q of a vocabulary: one prompt ensemble per synonym.

    For each synonym: encode every template filled with it (``clip.encode_text``),
    L2-normalise each, average, re-normalise (CLIP's prompt ensembling, as in MaskCLIP /
    ReCLIP / SCLIP). Each distinct name is encoded once, even if it appears in several
    classes.

    Results are cached as safetensors under ``cache_dir`` (default
    :func:`default_cache_dir`; ``False`` disables), keyed by sha256 of the CLIP weights
    fingerprint, context length, template strings and names. A file whose stored key
    differs, or that cannot be read, is recomputed. Note ``weights_fingerprint`` is
    memoised on the model: after changing its weights in place call
    ``weights_fingerprint(clip, refresh=True)``.

    Args:
        clip: a CLIP with ``encode_text((N, L) long) -> (N, D)`` and ``context_length``.
        vocabulary: a :class:`Vocabulary` or anything ``Vocabulary.from_names`` accepts.
        templates: a name in :data:`reclip.templates.TEMPLATE_SETS` or a list of templates
            with one ``{}``.
        cache_dir: cache folder, None for the default, False for no cache.
        batch_size: prompts per ``encode_text`` call.
        device: where to encode and return; default the model's device.
        progress: show a tqdm bar while encoding.

    Returns:
        :class:`QueryEmbeddings` with weights (S, D) float32 on ``device`` and
        class_index (S,); S = number of synonyms in ``vocabulary.all_synonyms`` order.
    """
    vocab = vocabulary if isinstance(vocabulary, Vocabulary) else Vocabulary.from_names(vocabulary)
    temps = resolve_templates(templates)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        param = next(clip.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)

    names = list(dict.fromkeys(vocab.all_synonyms))  # distinct names, first-seen order (U,)
    weights: torch.Tensor | None = None
    path: Path | None = None
    key = ""
    if cache_dir is not False:
        from reclip.clip.model import weights_fingerprint

        key = _cache_key(weights_fingerprint(clip), clip.context_length, temps, names)
        folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        path = folder / f"{key[:32]}.safetensors"
        weights = _read_cache(path, key, len(names))
    if weights is None:
        weights = _encode_names(clip, names, temps, batch_size, device, progress)
        if path is not None:
            _write_cache(path, key, weights, names)

    row = {name: i for i, name in enumerate(names)}
    gather = torch.tensor([row[s] for s in vocab.all_synonyms], dtype=torch.long)
    return QueryEmbeddings(
        weights=weights.to(device, torch.float32)[gather.to(device)],
        class_index=torch.tensor(vocab.synonym_class, dtype=torch.long, device=device),
        num_classes=vocab.num_classes,
    )
