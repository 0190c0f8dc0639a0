"""Prompt templates: the named template sets and the check that resolves a name or a list.

A template is a string with exactly one ``{}`` where the class name goes; the prompt
ensemble of :func:`reclip.text.query_embeddings` fills every template of a set with each
synonym. Sets are registered by name in :data:`TEMPLATE_SETS`.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "IMAGENET_TEMPLATES",
    "RECLIP_TEMPLATES",
    "TEMPLATE_SETS",
    "VILD_TEMPLATES",
    "resolve_templates",
]

# CLIP's 80 ImageNet prompt templates, in the order of openai/CLIP
# notebooks/Prompt_Engineering_for_ImageNet.ipynb (used by SCLIP and ClearCLIP as
# `openai_imagenet_template`).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# MaskCLIP / ReCLIP: the 80 above followed by five scene prompts, in this order
# (chongzhou96/MaskCLIP tools/maskclip_utils/prompt_engineering.py,
# dogehhh/ReCLIP utils/prompt_engineering.py `prompt_templates`).
RECLIP_TEMPLATES: tuple[str, ...] = IMAGENET_TEMPLATES + (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

# ViLD's 14 prompts (Gu et al. 2022), the text classifier of MAFT's official code
# (jiaosiyu1999/MAFT, `VILD_PROMPT`) and of the FreeSeg / OVSeg line it builds on; in this order.
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

# Registry of named template sets; `resolve_templates` looks names up here.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet80": IMAGENET_TEMPLATES,
    "reclip85": RECLIP_TEMPLATES,
    "vild14": VILD_TEMPLATES,
    "single": ("a photo of a {}.",),
}


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """Template strings from a registry name or an explicit list.

    Every template must contain exactly one ``{}`` where the class name goes.
    """
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise KeyError(
                f"unknown template set {templates!r}; available: {sorted(TEMPLATE_SETS)} "
                "(or pass a list of strings with one '{}' each)"
            )
        return TEMPLATE_SETS[templates]
    out = tuple(templates)
    if not out:
        raise ValueError("empty template list; pass at least one template such as 'a photo of a {}.'")
    for t in out:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"template {t!r} must be a str with exactly one '{{}}' for the class name")
    return out
