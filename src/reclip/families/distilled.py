"""The distilled family: ReCLIP++'s DeepLab V2 student (paper III-E), trained by ``reclip distill``.

A segmentor comes from a finished run (config.json + model.safetensors,
:mod:`reclip.distillation`) and needs no CLIP at inference. It is tested with the
protocol's ``reclip`` section (whole image at the ReCLIP test short side, the ReCLIP class
names), without prompt denoising (paper III-D: argmax).
"""

from __future__ import annotations

import os
from typing import Any

from reclip.clip.model import CLIP
from reclip.data.protocol import ReclipSettings
from reclip.families.spec import Family, Method, common_test_settings
from reclip.heads.inherited import inherit
from reclip.heads.rectify import OUTPUTS, RECLIPPP, Rectifier
from reclip.rectification import QUERY_TEMPLATES
from reclip.text import Vocabulary, query_embeddings

__all__ = ["FAMILY"]

NAME = "distilled"

METHODS = (
    Method("student", NAME, "maskclip", "reclip85",
           "ReCLIP++ / MaskCLIP+ distilled DeepLab V2 student (needs --checkpoint)"),
)


def test_settings(method: Method, settings: ReclipSettings, protocol: Any) -> dict[str, Any]:
    """The ``reclip`` section's image size and mode; argmax, no prompt denoising."""
    return common_test_settings(settings)


def new_model(method: Method, clip: CLIP, vocabulary: Vocabulary, text_cache: Any = None):
    """An untrained student: the small ResNet-18 backbone (random) with the head of an
    untrained ReCLIP++ rectifier (bias and decoder included), for contracts and tests."""
    from reclip.distillation import INPUT_NORMS, RECLIPPP_DISTILL, Student, StudentBackbone
    import dataclasses

    queries = query_embeddings(clip, vocabulary, QUERY_TEMPLATES, cache_dir=text_cache)
    teacher = Rectifier(clip, queries, vocabulary.names, dataclasses.replace(RECLIPPP, reference_length=8)).eval()
    config = dataclasses.replace(RECLIPPP_DISTILL, backbone="resnet18", aspp_channels=64)
    backbone = StudentBackbone(config.backbone, clip.visual.output_dim, config.aspp_channels)
    return Student(backbone, inherit(teacher, (4, 4)), *INPUT_NORMS[config.input_norm], config)


def write_run(run_dir: str | os.PathLike, model: Any, method: Method, clip: CLIP, vocabulary: Vocabulary) -> None:
    from reclip.distillation import save_student_run

    save_student_run(run_dir, model, vocabulary)


def from_run(run: Any, clip: CLIP | None, vocabulary: Vocabulary | None = None, text_cache: Any = None):
    from reclip.distillation import student_from_run

    return student_from_run(run, clip, vocabulary).to(next(clip.parameters()).device if clip is not None else "cpu")


FAMILY = Family(name=NAME, section="reclip", methods=METHODS, test_settings=test_settings, from_run=from_run,
                new_model=new_model, write_run=write_run, outputs=tuple(OUTPUTS))
