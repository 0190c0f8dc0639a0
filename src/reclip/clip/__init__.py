"""CLIP in plain torch: tokenizer, model (OpenAI module names) and checkpoint loading."""

from .load import load_clip, save_clip
from .model import CLIP, weights_fingerprint
from .tokenizer import SimpleTokenizer, tokenize

__all__ = ["CLIP", "SimpleTokenizer", "load_clip", "save_clip", "tokenize", "weights_fingerprint"]
