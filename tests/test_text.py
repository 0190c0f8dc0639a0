"""Templates (reclip.templates), class vocabularies and cached query embeddings (reclip.text)."""

import functools
import pytest
import torch
import torch.nn.functional as F

from tiny import tiny_clip as shared_tiny_clip
from reclip.clip.model import CLIP, weights_fingerprint
from reclip.clip.tokenizer import tokenize
from reclip.templates import IMAGENET_TEMPLATES, RECLIP_TEMPLATES, TEMPLATE_SETS, resolve_templates
from reclip.text import (
    SHARED_NAMES_LINE,
    QueryEmbeddings,
    Vocabulary,
    default_cache_dir,
    query_embeddings,
    read_class_file,
)


tiny_clip = functools.partial(shared_tiny_clip, transformer_heads=2, transformer_layers=2)


class CountingCLIP(torch.nn.Module):
    """Wraps a CLIP and counts encode_text calls / encoded prompts."""

    def __init__(self, clip: CLIP) -> None:
        super().__init__()
        self.clip = clip
        self.context_length = clip.context_length
        self.calls = 0
        self.prompts = 0

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.prompts += tokens.shape[0]
        return self.clip.encode_text(tokens)


@pytest.fixture(scope="module")
def clip() -> CLIP:
    return tiny_clip(0)


# -- templates --------------------------------------------------------------------------


def test_template_sets():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert len(RECLIP_TEMPLATES) == 85
    assert RECLIP_TEMPLATES[:80] == IMAGENET_TEMPLATES
    assert RECLIP_TEMPLATES[80:] == (
        "there is a {} in the scene.",
        "there is the {} in the scene.",
        "this is a {} in the scene.",
        "this is the {} in the scene.",
        "this is one {} in the scene.",
    )
    # first, CLIP's headline prompt, and last of the openai/CLIP notebook list
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert IMAGENET_TEMPLATES[39] == "a photo of a {}."
    assert IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert all(t.count("{}") == 1 for t in RECLIP_TEMPLATES)
    assert TEMPLATE_SETS["single"] == ("a photo of a {}.",)
    assert resolve_templates("reclip85") is RECLIP_TEMPLATES


def test_resolve_templates_errors():
    with pytest.raises(KeyError, match="available"):
        resolve_templates("imagenet81")
    with pytest.raises(ValueError, match="exactly one"):
        resolve_templates(["a photo of a cat."])
    assert resolve_templates(["a {} here."]) == ("a {} here.",)


# -- vocabularies -----------------------------------------------------------------------


def test_read_class_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text(
        "# background words, SCLIP style\n"
        "background, sky, wall ,\n"
        "\n"
        "aeroplane,airplane  # inline comment\n"
        "   \n"
        "person, person in shirt, person\n"
        "bed\n"
        "wood \n",
        encoding="utf-8",
    )
    vocab = read_class_file(path)
    assert vocab.names == ("background", "aeroplane", "person", "bed", "wood")
    assert vocab.num_classes == len(vocab) == 5
    assert vocab.classes[0] == ("background", "sky", "wall")
    assert vocab.classes[2] == ("person", "person in shirt")  # repeated synonym dropped
    assert vocab.all_synonyms == ("background", "sky", "wall", "aeroplane", "airplane", "person", "person in shirt", "bed", "wood")
    assert vocab.synonym_class == (0, 0, 0, 1, 1, 2, 2, 3, 4)
    assert vocab.has_synonyms
    assert Vocabulary.from_names(vocab.to_list()) == vocab


def test_empty_class_file_names_the_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# nothing here\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt"):
        read_class_file(path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_class_file(tmp_path / "missing.txt")


def test_from_names():
    assert Vocabulary.from_names("cat, dog").classes == (("cat",), ("dog",))
    vocab = Vocabulary.from_names(["cat", "person, man", ("tv", "monitor")])
    assert vocab.classes == (("cat",), ("person", "man"), ("tv", "monitor"))
    assert not Vocabulary.from_names(["cat", "dog"]).has_synonyms
    # the same word in two classes only when asked (SCLIP's COCO-Object: "bed" class and background word)
    with pytest.raises(ValueError, match=r"class 1: 'bed' is also a name of class 0 'sky'.*shared_names=True"):
        Vocabulary.from_names(["sky, bed", "bed"])
    dup = Vocabulary.from_names(["sky, bed", "bed"], shared_names=True)
    assert dup.synonym_class == (0, 0, 1)
    assert dup.shared_names and dup == Vocabulary((("sky", "bed"), ("bed",)), shared_names=True)
    with pytest.raises(ValueError, match="at least one"):
        Vocabulary.from_names("")
    with pytest.raises(ValueError, match="at least one"):
        Vocabulary.from_names([])
    with pytest.raises(ValueError, match="class 1"):
        Vocabulary.from_names(["cat", " , "])


# -- bad class lists: one rule for files, lists and strings -----------------------------


def test_a_name_in_two_classes_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# mine\nbackground: sky, bed\ncat\n\nbed\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"classes.txt:5: 'bed' is also a name of class 0 'background' \(line 2\)"
                                         r".*argmax always picks class 0.*# reclip: shared-names"):
        read_class_file(path)
    # the same rule inline and in a list, compared as CLIP reads names (case, runs of spaces)
    for names in ("cat,dog,cat", "cat, Cat", ["teddy bear", "teddy  bear"], [("cat",), ("kitty", "CAT")]):
        with pytest.raises(ValueError, match="is also a name of class 0"):
            Vocabulary.from_names(names)
    with pytest.raises(ValueError, match="class 1: 'cat' is also"):
        Vocabulary((("cat",), ("cat",)))
    # within one class a repeat is the same query: merged, first spelling kept
    assert Vocabulary.from_names(["person, Person, person  in shirt, person in shirt"]).classes == (
        ("person", "person in shirt"),)
    # a file that means it says so (SCLIP's COCO-Object list, shipped)
    path.write_text(f"{SHARED_NAMES_LINE}\nbackground: sky, bed\nbed\n", encoding="utf-8")
    vocab = read_class_file(path)
    assert vocab.shared_names and vocab.synonym_class == (0, 0, 1)


def test_two_classes_shown_alike_are_refused(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("background: sky\ncat\nBackground: wall\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"classes.txt:3: 'Background' is already the display name of class 0 "
                                         r"\(line 1\)"):
        read_class_file(path)


def test_shipped_class_files_load_and_only_the_published_coco_object_lists_share_a_name():
    from reclip.data.protocol import _package_dir

    files = sorted(_package_dir("classes").glob("*.txt"))
    assert len(files) >= 12
    shared = [f.name for f in files if read_class_file(f).shared_names]
    assert shared == ["cocoobject_proxyclip.txt", "cocoobject_sclip.txt"]  # "bed": background word and class


@pytest.mark.parametrize("line, problem", [
    (":", "needs at least one letter or digit"),
    ("-, ?", "needs at least one letter or digit"),
    ("\u200b", "U\\+200B \\(ZERO WIDTH SPACE\\)"),
    ("\ufeff", "U\\+FEFF"),  # a byte-order mark that is not the file's first character
    ("\x07", "U\\+0007"),
    ("cat\u00ad", "U\\+00AD \\(SOFT HYPHEN\\)"),
    ("\u3164", "U\\+3164"),  # Hangul filler: a "letter" that draws nothing
    ("background:", "no name after the colon"),
    (" , ", "has no class name"),
])
def test_invisible_or_empty_names_are_refused_naming_the_line(tmp_path, line, problem):
    path = tmp_path / "classes.txt"
    path.write_text(f"cat\n{line}\ndog\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"classes.txt:2: .*{problem}"):
        read_class_file(path)
    with pytest.raises(ValueError, match=f"class 1: .*{problem}"):
        Vocabulary.from_names(["cat", line, "dog"])


def test_whitespace_is_whitespace_and_a_leading_bom_is_dropped(tmp_path):
    path = tmp_path / "classes.txt"
    # Windows editor: BOM, CRLF; a no-break-space-only line is blank; a tab inside a name is a space
    path.write_bytes("\ufeffcat\r\n\u00a0\r\nteddy\tbear\r\n\u00a0dog\u00a0\r\n".encode("utf-8"))
    assert read_class_file(path).classes == (("cat",), ("teddy bear",), ("dog",))
    # zero-width joiners spell words in some scripts: kept
    assert Vocabulary.from_names(["\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"]).num_classes == 1


def test_a_class_file_that_is_not_utf8_is_named_with_the_byte_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("cat\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"class file '.*latin1.txt' is not UTF-8: byte 7 \(line 2\).*iconv"):
        read_class_file(path)


def test_names_and_files_are_told_apart_by_type_not_by_the_disk(tmp_path, monkeypatch):
    from pathlib import Path

    from reclip.api import as_vocabulary

    monkeypatch.chdir(tmp_path)
    Path("dog").write_text("cat\nbird\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"Path\('dog'\)"):  # a string is names, even with ./dog present
        assert as_vocabulary("dog").classes == (("dog",),)
    assert as_vocabulary(Path("dog")).classes == (("cat",), ("bird",))  # a path is a file
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        as_vocabulary(Path("missing.txt"))  # never taken as the class name "missing.txt"
    with pytest.raises(TypeError, match="read_class_file"):
        Vocabulary.from_names(Path("dog"))


# -- query embeddings -------------------------------------------------------------------


def slow_embedding(clip: CLIP, name: str, templates) -> torch.Tensor:
    """The recipe spelled out for one name, one prompt at a time."""
    rows = []
    for t in templates:
        e = clip.encode_text(tokenize(t.format(name)))[0]
        rows.append(e / e.norm())
    mean = torch.stack(rows).mean(0)
    return mean / mean.norm()


@torch.no_grad()
def test_matches_direct_computation(clip):
    templates = IMAGENET_TEMPLATES[:7]
    vocab = Vocabulary.from_names(["cat", "person, man"])
    q = query_embeddings(clip, vocab, templates=templates, cache_dir=False, batch_size=5)
    assert q.weights.shape == (3, 32) and q.weights.dtype == torch.float32
    assert q.class_index.tolist() == [0, 1, 1] and q.num_classes == 2
    torch.testing.assert_close(q.weights.norm(dim=-1), torch.ones(3))
    for row, name in enumerate(vocab.all_synonyms):
        torch.testing.assert_close(q.weights[row], slow_embedding(clip, name, templates), atol=1e-5, rtol=1e-5)


def test_cache_hit_and_invalidation(clip, tmp_path):
    counting = CountingCLIP(clip)
    vocab = Vocabulary.from_names(["cat", "dog, puppy"])
    templates = ["a photo of a {}.", "a {} in the scene."]
    first = query_embeddings(counting, vocab, templates=templates, cache_dir=tmp_path, batch_size=4)
    assert counting.calls == 2 and counting.prompts == 3 * 2  # 3 names x 2 templates, batches of 4
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temporary file

    second = query_embeddings(counting, vocab, templates=templates, cache_dir=tmp_path)
    assert counting.calls == 2  # served from disk
    torch.testing.assert_close(second.weights, first.weights, rtol=0, atol=0)

    # changed templates, changed names, changed weights: each recomputes
    query_embeddings(counting, vocab, templates=templates[:1], cache_dir=tmp_path)
    assert counting.calls == 3
    query_embeddings(counting, Vocabulary.from_names(["cat", "dog, pup"]), templates=templates, cache_dir=tmp_path)
    assert counting.calls == 4
    other = CountingCLIP(tiny_clip(1))
    changed = query_embeddings(other, vocab, templates=templates, cache_dir=tmp_path)
    assert other.calls == 1
    assert not torch.allclose(changed.weights, first.weights)
    # in-place weight change: the memoised fingerprint must be refreshed (documented)
    with torch.no_grad():
        other.clip.text_projection.mul_(2.0)
    weights_fingerprint(other, refresh=True)
    query_embeddings(other, vocab, templates=templates, cache_dir=tmp_path)
    assert other.calls == 2


def test_cache_key_mismatch_and_corrupt_file_recompute(clip, tmp_path):
    vocab = Vocabulary.from_names("cat,dog")
    counting = CountingCLIP(clip)
    query_embeddings(counting, vocab, templates="single", cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    # a file under the right name whose stored key differs (e.g. a stale format) is ignored
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(2, 32)}, str(path), metadata={"key": "something else"})
    fresh = query_embeddings(counting, vocab, templates="single", cache_dir=tmp_path)
    assert counting.calls == 2 and torch.allclose(fresh.weights.norm(dim=-1), torch.ones(2))
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        query_embeddings(counting, vocab, templates="single", cache_dir=tmp_path)
    assert counting.calls == 3
    query_embeddings(counting, vocab, templates="single", cache_dir=tmp_path)
    assert counting.calls == 3  # the rewritten file is good again


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "text"
    monkeypatch.delenv("RECLIP_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "reclip", "text")


def test_duplicate_names_encoded_once(clip):
    counting = CountingCLIP(clip)
    vocab = Vocabulary.from_names(["sky, bed", "bed"], shared_names=True)
    q = query_embeddings(counting, vocab, templates="single", cache_dir=False)
    assert counting.prompts == 2  # "sky", "bed"
    torch.testing.assert_close(q.weights[1], q.weights[2], rtol=0, atol=0)


def test_class_logits_max_over_synonyms():
    q = QueryEmbeddings(
        weights=F.normalize(torch.randn(5, 8), dim=-1),
        class_index=torch.tensor([0, 1, 1, 2, 1]),
        num_classes=3,
    )
    sim = torch.randn(2, 5, 4, 3, requires_grad=True)  # (B, S, h, w)
    out = q.class_logits(sim, dim=1)
    assert out.shape == (2, 3, 4, 3)
    torch.testing.assert_close(out[:, 0], sim[:, 0])
    torch.testing.assert_close(out[:, 1], sim[:, [1, 2, 4]].amax(dim=1))
    torch.testing.assert_close(out[:, 2], sim[:, 3])
    out.sum().backward()  # gradient reaches the winning synonym only
    assert sim.grad.sum().item() == pytest.approx(2 * 3 * 4 * 3)
    # last-dim layout and classify() agree with an explicit dot product + max
    feats = torch.randn(2, 8, 4, 3)
    expected = q.class_logits(torch.einsum("bdhw,sd->bshw", feats, q.weights), dim=1)
    torch.testing.assert_close(q.classify(feats, dim=1), expected)
    torch.testing.assert_close(q.class_logits(sim.detach().movedim(1, -1), dim=-1), out.detach().movedim(1, -1))
    with pytest.raises(ValueError, match="expected 5"):
        q.class_logits(torch.randn(2, 4), dim=1)
    with pytest.raises(ValueError, match="no single"):
        q.per_class


def test_one_name_per_class_is_identity(clip):
    q = query_embeddings(clip, "cat,dog,bird", templates="single", cache_dir=False)
    assert q.is_one_per_class and q.per_class.shape == (3, 32)
    sim = torch.randn(4, 3)
    assert q.class_logits(sim, dim=1) is sim
    with pytest.raises(ValueError, match="cover every class"):
        QueryEmbeddings(torch.randn(2, 4), torch.tensor([0, 0]), num_classes=2)


def test_label_prefix_names_a_class_without_becoming_a_prompt(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("background: sky, wall\ncat, kitty\n")
    vocab = read_class_file(path)
    assert vocab.names == ("background", "cat")
    assert vocab.all_synonyms == ("sky", "wall", "cat", "kitty")
    assert vocab.synonym_class == (0, 0, 1, 1)
    assert Vocabulary.from_names(vocab.to_lines()) == vocab
