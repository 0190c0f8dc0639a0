"""CLIP BPE tokenizer: reference ids from openai/CLIP and the tokenize() contract."""

import subprocess
import sys

import pytest
import torch

from reclip.clip.tokenizer import EOT, SOT, VOCAB_SIZE, SimpleTokenizer, get_tokenizer, tokenize


@pytest.fixture(scope="module")
def tok() -> SimpleTokenizer:
    return get_tokenizer()


def test_reference_ids():
    # clip.tokenize(["a photo of a cat."]) with openai/CLIP.
    out = tokenize(["a photo of a cat."])
    assert out.dtype == torch.long and out.shape == (1, 77)
    assert out[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert out[0, 8:].eq(0).all()
    # a bare string is one row
    assert torch.equal(tokenize("a photo of a cat."), out)


def test_vocabulary_layout(tok):
    assert tok.vocab_size == VOCAB_SIZE == 49408
    assert tok.decoder[SOT] == "<|startoftext|>" and tok.decoder[EOT] == "<|endoftext|>"
    # the 256 single bytes come first, printable ASCII in order: id 0 is "!"
    assert tok.decoder[0] == "!" and tok.decoder[256] == "!</w>"


def test_cleaning_matches_clip(tok):
    # lowercase + whitespace collapse: same ids as the plain text
    assert tok.encode("  A   PHOTO\tof\na Cat. ") == tok.encode("a photo of a cat.")
    # HTML entities are unescaped (twice, as CLIP does)
    assert tok.encode("dogs &amp;amp; cats") == tok.encode("dogs & cats")
    # ftfy repairs mojibake: UTF-8 read as Latin-1
    assert tok.encode("caf\u00c3\u00a9") == tok.encode("café")


def test_pretokenisation(tok):
    # digits are split one by one; contractions are their own pieces; punctuation runs
    assert tok.decode(tok.encode("1234")) == "1 2 3 4"
    assert tok.decode(tok.encode("it's the dog's")) == "it 's the dog 's"
    assert tok.decode(tok.encode("tv-monitor")) == "tv - monitor"
    assert tok.decode(tok.encode("hello, world!")) == "hello , world !"


@pytest.mark.parametrize("text", ["a photo of a cat", "potted plant", "naïve café 🐱", "日本語のテキスト"])
def test_roundtrip_words(tok, text):
    # byte-level BPE is lossless on cleaned text made of words and spaces
    assert tok.decode(tok.encode(text)) == text


def test_decode_row_skips_special_and_padding(tok):
    row = tokenize("a photo of a cat.")[0]
    assert tok.decode(row) == "a photo of a cat ."
    full = tok.decode(row, skip_special=False)
    assert full.startswith("<|startoftext|>a photo") and "<|endoftext|>" in full
    with pytest.raises(ValueError, match="outside CLIP's vocabulary"):
        tok.decode([VOCAB_SIZE])


def test_batch_and_context_length():
    out = tokenize(["a cat", "a photo of a dog"], context_length=10)
    assert out.shape == (2, 10)
    assert (out == EOT).sum(dim=1).tolist() == [1, 1]
    assert tokenize([]).shape == (0, 77)


def test_too_long_raises_naming_text():
    text = "cat " * 100
    with pytest.raises(ValueError, match="cat cat.*truncate=True"):
        tokenize(text)


def test_truncate_keeps_eot():
    out = tokenize(["cat " * 100, "a dog"], context_length=16, truncate=True)
    assert out[0, 0] == SOT and out[0, -1] == EOT
    assert (out[0] == EOT).sum() == 1
    assert out[0, 1:-1].eq(2368).all()  # "cat" repeated, cut before the end token
    assert out[1, :4].tolist() == [SOT, 320, 1929, EOT]  # short rows untouched


def test_bpe_is_memoised(tok):
    tok.encode("zebra crossing")
    hits = tok._bpe_cached.cache_info().hits
    tok.encode("zebra crossing")
    assert tok._bpe_cached.cache_info().hits >= hits + 2


def test_import_is_lazy():
    # importing the module must not read the vocabulary nor import ftfy
    code = (
        "import sys, reclip.clip.tokenizer as t; "
        "assert t._TOKENIZER is None; assert 'ftfy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bpe_matches_an_independent_implementation(tmp_path):
    """HF transformers' CLIP tokenizer, given our vocabulary, must split text as we do."""
    import json

    import transformers  # a test dependency (pyproject [test])
    ours = SimpleTokenizer()
    merges = sorted(ours.bpe_ranks, key=ours.bpe_ranks.get)
    (tmp_path / "vocab.json").write_text(json.dumps(ours.encoder))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    hf = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    texts = [
        "a photo of a cat.",
        "there is the motorbike in the scene.",
        "a bad photo of the pottedplant, tvmonitor and diningtable!",
        "itap of my 2 lowercase-hyphenated things; 3.14 rocks...",
        "segmentation without pixel labels by rectifying clip's biases",
        "a photo of the largest antidisestablishmentarianism",
    ]
    for text in texts:
        assert tokenize(text)[0][: len(hf(text)["input_ids"])].tolist() == hf(text)["input_ids"], text
