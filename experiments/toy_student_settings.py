"""Train the demo's ReCLIP++ student under other settings, one run per seed, and score it.

    python experiments/toy_student_settings.py demo_out '{"no_text": {"text_loss": false}, "s1k": {"steps": 1000}}'

Each variant overrides the demo's student (``reclip.demo.TOY_DISTILLATION``: ResNet-18 of
width 16, ASPP 64, L_feat on the student's grid, 2000 steps of 8 scenes, lr 0.01) with
DistillConfig fields or ``steps`` / ``batch_size`` / ``lr``; seed s is taught by the
demo's seed-s "toy" rectifier run. Runs go to ``demo_out/experiments/<variant>-s<seed>``
(reused when finished), two at a time in spawn processes; one JSON line per run.

The demo's toy world (2026-11-29; teachers' M_o 19.25 / 17.63 / 17.65): 1000 steps
14.01 / 17.95 / 17.70; 1000 steps without L_text 19.66 / 18.81 / 18.44, without L_feat
18.52 / 16.80 / 17.93, L_mask alone 19.45 / 18.30 / 17.67; batch 16 19.18 / 17.34 / 17.91;
lr 0.02 17.47 / 13.69 / -; 2000 steps 19.46 / 18.87 / 18.26. Those runs trained with CLIP's
input normalisation (1000 steps, L_mask alone, batch 16, 2000 steps) or ImageNet's (the
others) and were all scored with CLIP's; this script trains with today's defaults and
scores each student with its own normalisation, so its figures differ from those.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from multiprocessing import get_context
from pathlib import Path


def _run(args: tuple[str, str, int, dict]) -> str:
    import torch

    from reclip.api import evaluate_segmentor
    from reclip.clip.load import load_clip
    from reclip.data.datasets import SegmentationDataset
    from reclip.demo import TOY_DISTILLATION
    from reclip.distillation import RECLIPPP_DISTILL, distill, load_student
    from reclip.inference import InferenceConfig

    demo_out, name, seed, overrides = args
    torch.set_num_threads(1)
    demo = Path(demo_out)
    results = json.loads((demo / "results.json").read_text())
    clip = load_clip(results["checkpoint"])
    voc = demo / "toy_data/VOCdevkit/VOC2012"
    classes = demo / "toy_data/toy_classes.txt"
    settings = dict(overrides)
    steps = settings.pop("steps", TOY_DISTILLATION.steps)
    train = {"batch_size": settings.pop("batch_size", TOY_DISTILLATION.batch_size),
             "lr": settings.pop("lr", TOY_DISTILLATION.lr), "device": "cpu", "seed": seed}
    config = dataclasses.replace(RECLIPPP_DISTILL, backbone="resnet18", width=TOY_DISTILLATION.width,
                                 aspp_channels=TOY_DISTILLATION.aspp_channels, feat_at=TOY_DISTILLATION.feat_at,
                                 **settings)
    out = demo / "experiments" / f"{name}-s{seed}"
    seeds = json.loads((demo / "results.json").read_text())["methods"]["reclip++ toy: M_o"]["seeds"]
    position = [entry["seed"] for entry in seeds].index(seed)  # runs are listed in the demo's seed order
    distill(clip, Path(results["runs"]["toy"][position]), "voc21", voc, results["hypotheses"], out, config=config,
            weights=None, classes_file=classes, max_steps=steps, train_overrides=train, base_short_side=96, crop=96,
            progress=False, resume=True, text_cache=demo / "text_cache")
    data = SegmentationDataset("voc21", voc, "val", classes_file=classes)
    student = load_student(out)
    result = evaluate_segmentor(student, data, InferenceConfig(mode="whole", short_side=None, logit_scale=50.0),
                                mean=student.image_mean, std=student.image_std, num_workers=0, progress=False)
    return json.dumps({"variant": name, "seed": seed, "mIoU": round(100 * result.miou, 2)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_out")
    parser.add_argument("variants", help="JSON: {name: {field: value}}")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(args.demo_out, name, seed, o) for name, o in json.loads(args.variants).items() for seed in seeds]
    with get_context("spawn").Pool(2) as pool:
        for line in pool.imap_unordered(_run, jobs):
            print(line, flush=True)


if __name__ == "__main__":
    main()
