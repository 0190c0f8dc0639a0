"""reclip: semantic segmentation without pixel labels, built on CLIP.

The Python API matches the command line::

    import reclip
    clip = reclip.load_clip("ViT-B/16")             # or a checkpoint file / HF folder
    result = reclip.evaluate(clip, "clearclip", "voc20", "data/VOCdevkit/VOC2012")
    reclip.segment_files(clip, "maskclip", "cat,dog", ["photos/"], "masks/")
    # classes: names ("cat,dog", a list) or a class file as a Path / reclip.read_class_file(...)
"""

__version__ = "0.1.0"

from reclip.api import EvaluationResult, NothingEvaluatedError, evaluate, segment_files
from reclip.clip import CLIP, load_clip, tokenize
from reclip.features import dense_features, get_strategy
from reclip.inference import InferenceConfig, segment
from reclip.methods import METHODS, build_segmentor
from reclip.text import Vocabulary, query_embeddings, read_class_file

__all__ = [
    "CLIP",
    "METHODS",
    "EvaluationResult",
    "InferenceConfig",
    "NothingEvaluatedError",
    "Vocabulary",
    "build_segmentor",
    "dense_features",
    "evaluate",
    "get_strategy",
    "load_clip",
    "query_embeddings",
    "read_class_file",
    "segment",
    "segment_files",
    "tokenize",
]
