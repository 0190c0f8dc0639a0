"""``reclip demo``: the embedded default job, runnable anywhere without downloads.

Until the toy world (a tiny CLIP pre-trained on synthetic captioned images) lands, the
demo runs the whole public pipeline on an UNTRAINED tiny CLIP: it writes the CLIP as an
OpenAI checkpoint, writes generated scenes in the PASCAL VOC layout, evaluates every
training-free method through ``reclip.api.evaluate`` and segments the scenes with
``reclip.api.segment_files``. The numbers are those of random weights (chance level);
the demo says so in its output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reclip import api
from reclip.clip.load import load_clip, save_clip
from reclip.clip.model import CLIP
from reclip.methods import METHODS
from reclip.visualize import palette

CLASSES = ("background", "red square", "green disc", "blue bar")


def _scene(rng: np.random.Generator, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A (size, size, 3) uint8 image with a few coloured shapes and its (size, size) labels."""
    image = rng.integers(90, 140, (size, size, 3), dtype=np.uint8)
    labels = np.zeros((size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    colours = {1: (200, 40, 40), 2: (40, 180, 60), 3: (40, 60, 200)}
    for cls in rng.permutation([1, 2, 3]):
        cy, cx = rng.integers(16, size - 16, 2)
        r = int(rng.integers(8, 16))
        if cls == 1:
            mask = (abs(yy - cy) < r) & (abs(xx - cx) < r)
        elif cls == 2:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:
            mask = (abs(yy - cy) < r // 3) & (abs(xx - cx) < 2 * r)
        image[mask] = colours[cls]
        labels[mask] = cls
    return image, labels


def write_demo_scenes(root: Path, count: int = 8, seed: int = 0) -> Path:
    """Generated scenes in the PASCAL VOC 2012 layout under ``root``; returns the class file."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"scene_{i:03d}" for i in range(count)]
    colours = palette(256).reshape(-1).tolist()
    for image_id in ids:
        image, labels = _scene(rng)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        mask = Image.fromarray(labels, mode="P")
        mask.putpalette(colours)
        mask.save(root / "SegmentationClass" / f"{image_id}.png")
    for split in ("train", "val"):
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    classes = root / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    return classes


def run_demo(out: str | Path = "demo_out", progress: bool = True) -> dict[str, float]:
    """Run the demo into ``out``; returns {method: mIoU}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tiny = CLIP(embed_dim=64, image_resolution=96, vision_layers=2, vision_width=128, vision_patch_size=8,
                context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
                transformer_layers=2)
    checkpoint = save_clip(tiny, out / "tiny_clip_UNTRAINED.pt", format="openai")
    clip = load_clip(checkpoint)
    data_root = out / "VOC2012"
    classes = write_demo_scenes(data_root)
    print("NOTE: this demo runs an UNTRAINED tiny CLIP (random weights): the pipeline is real, "
          "the masks and mIoU are chance level.")
    inference = {"short_side": 96, "mode": "whole"}
    scores: dict[str, float] = {}
    for name in METHODS:
        result = api.evaluate(clip, name, "voc21", data_root, classes_file=classes, inference=inference,
                              progress=progress, text_cache=out / "text_cache")
        scores[name] = result.miou
    api.segment_files(clip, "maskclip", classes, [data_root / "JPEGImages"], out / "masks",
                      inference=inference, background=True, progress=progress, text_cache=out / "text_cache")
    print(f"\n{'method':<10} mIoU (%)  [untrained tiny CLIP]")
    for name, value in scores.items():
        print(f"{name:<10} {100 * value:7.2f}")
    print(f"\nmasks and overlays: {out / 'masks'}")
    return scores
