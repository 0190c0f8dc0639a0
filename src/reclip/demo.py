"""``reclip demo``: the embedded default job, runnable anywhere without downloads.

No CLIP weights or datasets can be assumed, so the demo builds its own: the toy world
(``reclip.toy``) pre-trains a tiny CLIP on synthetic captioned images (or reuses the
cached one), writes segmentation scenes in the PASCAL VOC layout, and every
training-free method is evaluated on them through the same code paths as real data
(``voc21`` protocol + the toy class file), with both bias diagnostics. Then ReCLIP++'s
rectification stage runs as a user would run it on VOC: image-level hypotheses on
unlabelled train scenes, ``rectify``, and ``--method reclip++ --checkpoint`` evaluation
(:data:`TOY_RECTIFICATION` says which settings the toy world needs and why). Outputs:
``report.html`` (table, bias scores, plots, example masks next to ground truth),
``results.json``, and the table on stdout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reclip.cache import cache_folder
from reclip.api import EvaluationResult, evaluate_segmentor
from reclip.clip.load import load_clip
from reclip.data.datasets import SegmentationDataset
from reclip.features import get_strategy
from reclip.files import atomic_write_json
from reclip.heads.rectify import RECLIPPP, RectifierConfig
from reclip.hypotheses import HypothesisConfig, generate_hypotheses
from reclip.inference import InferenceConfig, segment
from reclip.families import zero_shot
from reclip.methods import build_segmentor
from reclip.rectification import rectify
from reclip.report import plot_confusion, plot_space_curves, write_html_report
from reclip.text import query_embeddings
from reclip.toy.pretrain import ToyConfig, get_or_train
from reclip.toy.world import write_voc_layout
from reclip.train.checkpoint import CHECKPOINT_VERSION
from reclip.visualize import overlay, palette

# Every preset plus the variant that the tiny CLIP favours (see reclip.toy): on a tiny
# CLIP the residual stream dominates the last block, so MaskCLIP's readout needs it off.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{method.name: (method.name, {}) for method in zero_shot.METHODS},
    "maskclip-nores": ("maskclip", {"residual": False, "ffn": False}),
}


@dataclass(frozen=True)
class ToyRectification:
    """ReCLIP++ (rec.) on the toy world: what differs from the paper, and why.

    Attributes:
        features: Z's strategy, a :data:`VARIANTS` name: the one the toy world favours
            (MaskCLIP's value path without the last block's residual and FFN).
        reference_length: L = 8 Reference words, not 73: the tiny CLIP was pre-trained on
            captions of at most ~16 tokens, so later text positions are untrained, and with
            L = 73 training drove every class's Reference embedding to the same vector
            (pairwise cosine 1.000): the bias logits became class-independent and changed
            no prediction.
        gumbel_scale: 30, not 100: on the 12 x 12 grid the decoder's BN outputs times 100
            make the Gumbel-softmax one-hot, so its straight-through gradient all but
            vanishes and the decoder learns little (13.95 mIoU at 100, 17.03 at 30, 16.90
            at 10; NACLIP features: 10.00 at 100, 15.54 at 10).
        r, t: hypothesis windows of 1/3 of a scene (1/6 of a 96 px scene is 16 px, two
            patches: too little for the tiny CLIP); t = 0.07 as for VOC.
        num_train, steps, batch_size, lr: unlabelled train scenes and SGD settings
            (base scale and crop: the scene size).
    """

    features: str = "maskclip-nores"
    reference_length: int = 8
    gumbel_scale: float = 30.0
    r: float = 1 / 3
    t: float = 0.07
    num_train: int = 600
    steps: int = 2000
    batch_size: int = 8
    lr: float = 0.01

    def rectifier_config(self) -> RectifierConfig:
        """ReCLIP++ as published, with the toy world's features, Reference length and Gumbel scale."""
        preset, overrides = VARIANTS[self.features]
        return dataclasses.replace(RECLIPPP, strategy=get_strategy(preset, **overrides),
                                   reference_length=self.reference_length, gumbel_scale=self.gumbel_scale)

    @property
    def row_name(self) -> str:
        return f"reclip++ ({self.features})"


TOY_RECTIFICATION = ToyRectification()
TEMPLATES = "reclip85"  # W_q of every method and of the hypotheses


@dataclass
class DemoRow:
    name: str
    result: EvaluationResult

    def summary(self) -> dict[str, Any]:
        bias = self.result.bias or {}
        return {
            "method": self.name,
            "mIoU": 100 * self.result.miou,
            "class-preference": bias["class_preference"]["score"],
            "space-preference": bias["space_preference"]["score"],
        }


def default_cache_dir() -> Path:
    """``$RECLIP_CACHE/toy`` or ``~/.cache/reclip/toy``."""
    return cache_folder("toy")


def run_demo(
    out: str | Path = "demo_out",
    *,
    config: ToyConfig | None = None,
    cache_dir: str | Path | None = None,
    num_scenes: int = 300,
    seed: int = 0,
    rectification: ToyRectification | None = TOY_RECTIFICATION,
    progress: bool = True,
) -> list[DemoRow]:
    """Run the demo into ``out``; returns one row per method (mIoU and bias scores).

    ``rectification`` None leaves ReCLIP++ out; its training run lives in
    ``out/reclip++-<key>`` (a key of its settings) and a finished one is reused (an interrupted one is resumed).
    """
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config or ToyConfig.default()
    checkpoint = get_or_train(cache_dir or default_cache_dir(), config, seed=seed, progress=progress)
    clip = load_clip(checkpoint)
    pretrain = json.loads(Path(f"{checkpoint}.json").read_text())["metrics"]

    num_train = rectification.num_train if rectification else 0
    voc = write_voc_layout(out / "toy_data", num_train=num_train, num_val=num_scenes, seed=seed + 1,
                           config=config.world)
    classes = out / "toy_data" / "toy_classes.txt"
    data = SegmentationDataset("voc21", voc, "val", classes_file=classes)
    # Whole image at the scene size; the class file's "background" word is the background
    # class (a probability threshold did worse on the toy world).
    cfg = InferenceConfig(mode="whole", short_side=None, logit_scale=50.0)
    queries = query_embeddings(clip, data.vocabulary, TEMPLATES, cache_dir=out / "text_cache")

    # One 96 px image at a time is too little work to share between threads: one thread
    # is several times faster here, and far faster when another process holds a core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows, segmentors = _evaluate_all(clip, data, cfg, queries, progress)
        run_dir = None
        if rectification is not None:
            world = f"{config.key()}-s{seed}"  # the tiny CLIP and the scenes
            run_dir = _rectify(out, clip, voc, classes, queries, rectification, world, config.world.scene_size,
                               progress)
            segmentor = build_segmentor("reclip++", clip, data.vocabulary, checkpoint=run_dir)
            name = rectification.row_name
            rows.append(DemoRow(name, _evaluate(segmentor, data, cfg, clip, progress, name)))
            segmentors[name] = segmentor
        _write_outputs(out, rows, segmentors, data, cfg, clip, pretrain, checkpoint, run_dir,
                       time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    _print_table(rows, pretrain)
    print(f"\nreport: {out / 'report.html'}")
    return rows


def _evaluate_all(clip: Any, data: SegmentationDataset, cfg: InferenceConfig, queries: Any,
                  progress: bool) -> tuple[list[DemoRow], dict[str, Any]]:
    """Every variant on the scenes, bias diagnostics included; the segmentors for examples."""
    rows, segmentors = [], {}
    for name, (method, overrides) in VARIANTS.items():
        segmentor = build_segmentor(method, clip, data.vocabulary, strategy_overrides=overrides, queries=queries)
        rows.append(DemoRow(name, _evaluate(segmentor, data, cfg, clip, progress, name)))
        segmentors[name] = segmentor
    return rows, segmentors


def _evaluate(segmentor: Any, data: SegmentationDataset, cfg: InferenceConfig, clip: Any, progress: bool,
              name: str) -> EvaluationResult:
    result = evaluate_segmentor(segmentor, data, cfg, mean=clip.image_mean, std=clip.image_std, bias=True,
                                num_workers=0, progress=progress, description=name)
    result.method = name
    return result


def _rectify(out: Path, clip: Any, voc: Path, classes: Path, queries: Any, settings: ToyRectification,
             world: str, scene_size: int, progress: bool) -> Path:
    """Hypotheses on the unlabelled train scenes, then the rectifier; returns its run directory.

    Both steps resume: a finished run is reused, an interrupted one continued. Their files
    are named by a key of everything they depend on (the toy world ``world``, the
    rectification settings, the training engine's version), so a run made with other
    settings or by another reclip is never resumed: it stays beside the new one.
    """
    key = hashlib.sha256(json.dumps({"world": world, "settings": dataclasses.asdict(settings),
                                     "engine": CHECKPOINT_VERSION}, sort_keys=True).encode()).hexdigest()[:10]
    train_scenes = SegmentationDataset("voc21", voc, "train", classes_file=classes)
    hypotheses = out / f"hypotheses-{key}.json"
    generate_hypotheses(clip, train_scenes, queries, config=HypothesisConfig(r=settings.r, t=settings.t),
                        out_path=hypotheses, progress=progress, templates=TEMPLATES)
    run_dir = out / f"reclip++-{key}"
    rectify(clip, "voc21", voc, hypotheses, run_dir, config=settings.rectifier_config(), classes_file=classes,
            max_steps=settings.steps, base_short_side=scene_size, crop=scene_size, resume=True,
            train_overrides={"batch_size": settings.batch_size, "lr": settings.lr, "device": "cpu",
                             "checkpoint_every": 500},
            progress=progress, text_cache=out / "text_cache")
    return run_dir


def _print_table(rows: list[DemoRow], pretrain: dict[str, Any]) -> None:
    print(f"\ntiny CLIP: zero-shot image accuracy {100 * pretrain['zero_shot_accuracy']:.1f}% "
          f"(pre-trained in {pretrain['train_seconds']:.0f} s)")
    print(f"{'method':<26} {'mIoU':>6}  {'class-pref':>10}  {'space-pref':>10}   (bias scores: higher = less bias)")
    for row in rows:
        s = row.summary()
        print(f"{s['method']:<26} {s['mIoU']:6.2f}  {s['class-preference']:10.3f}  {s['space-preference']:+10.3f}")


def _write_outputs(out: Path, rows: list[DemoRow], segmentors: dict[str, Any], data: SegmentationDataset,
                   cfg: InferenceConfig, clip: Any, pretrain: dict[str, Any], checkpoint: Path,
                   run_dir: Path | None, seconds: float) -> None:
    best = max(rows, key=lambda r: r.result.miou)
    figures = [
        ("space preference: mIoU against object distance from the centre",
         plot_space_curves({r.name: r.result.bias["space_preference"] for r in rows}, out / "space_preference.png",
                           "toy world")),
        (f"class preference of {best.name} (row-normalised confusion)",
         plot_confusion(best.result.confusion, best.result.class_names, out / "confusion.png", best.name)),
    ]
    colours = palette(256)
    examples = []
    for index in range(4):
        item = data[index]
        image, label = item["image"], item["label"]
        columns = [("image", image), ("ground truth", overlay(image, label, colours, alpha=0.7))]
        for name in (r.name for r in rows):
            with torch.inference_mode():
                pred = segment(segmentors[name], image, cfg, clip.image_mean, clip.image_std,
                               background_index=0).labels
            columns.append((name, overlay(image, pred, colours, alpha=0.7)))
        examples.append((item["image_id"], columns))
    table = [row.summary() for row in rows]
    notes = [
        f"Tiny CLIP pre-trained from scratch on the toy world ({checkpoint.name}): zero-shot image "
        f"accuracy {100 * pretrain['zero_shot_accuracy']:.1f}%, {pretrain['train_seconds']:.0f} s of pre-training.",
        f"{len(data)} segmentation scenes, classes: {', '.join(data.class_names)}.",
        "Bias scores (ReCLIP++ Table VII): class preference = mean over classes of the "
        "row-normalised confusion diagonal minus the largest off-diagonal entry; space preference = mean "
        "slope of mIoU against object distance from the centre. Higher = less bias; background excluded.",
        f"Demo run time {seconds:.0f} s.",
    ]
    if run_dir is not None:
        run = json.loads((run_dir / "config.json").read_text())
        rect, train = run["rectifier"], run["train"]
        notes.insert(2, (
            f"{rows[-1].name}: ReCLIP++'s rectification stage trained on {run['train_images']} unlabelled train scenes "
            f"(image-level hypotheses only, no masks) for {train['steps']} steps, batch {train['batch_size']}, "
            f"lr {run['optimizer']['lr']}; Reference length {rect['reference_length']}, Gumbel scale {rect['gumbel_scale']} "
            f"(reclip.demo.ToyRectification says why these differ from the paper); no prompt denoising. Run: {run_dir}."))
    write_html_report(out / "report.html", "reclip demo: the toy world", table, notes, figures, examples)
    results = {
        "pretraining": pretrain,
        "checkpoint": str(checkpoint),
        "inference": {k: v for k, v in vars(cfg).items()},
        "methods": {row.name: row.result.to_dict() for row in rows},
        "seconds": seconds,
    }
    atomic_write_json(out / "results.json", results, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
