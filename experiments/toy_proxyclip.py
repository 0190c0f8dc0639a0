"""ProxyCLIP in the toy world: does a DINO pre-trained there (reclip.toy.dino) make a useful proxy?

    python experiments/toy_proxyclip.py out_dir [--seeds 0 1 2] [--dino '{"steps": 200}']

On the demo's val scenes, tiny CLIP and inference settings (``reclip.demo``: the cached
``ToyConfig.default()`` CLIP of seed 0, 300 val scenes of seed 1, whole 96 px scenes,
logit scale 50, the 85-template queries), it scores:

- ProxyCLIP with the toy DINO of each seed (``ToyDinoConfig()`` with the ``--dino``
  overrides; trained once and cached in the demo's cache folder);
- ProxyCLIP with a DINO of the same architecture at its official random initialisation
  (same seeds): what pre-training adds;
- the demo's training-free rows (``reclip.demo.VARIANTS``) on the same scenes.

ProxyCLIP is built as the demo would build it: ``build_segmentor("proxyclip", ...,
strategy_overrides={"proxy": path}, queries=...)`` with the demo's queries.

As a check that the DINO learnt anything at all (whatever ProxyCLIP makes of it), each
proxy's CLS token is also probed: 20-nearest-neighbour (cosine) accuracy of the named
object's class on 500 held-out captioned photos, with 1500 others as the bank (labels
read for this probe only; chance ~ the largest class share).

One JSON line per row (mIoU in %, per seed), then the table; everything also goes to
``out_dir/toy_proxyclip.json``.

Measured 2026-11-29 (seeds 0-2, mean +/- SD; pre-training on one thread of a shared 2-core
CPU): default ToyDinoConfig (200 steps, 93-220 s at load 2-4.7): ProxyCLIP 22.91 +/- 0.45
with the toy DINO, 22.82 +/- 0.19 with its random initialisation; CLS 20-NN 22.7 +/- 2.1%
against 31.9 +/- 3.4%. ``--dino '{"steps": 600}'`` (289-369 s): 23.40 +/- 0.32 mIoU
(23.76 / 23.15 / 23.29, each above its seed's random init), CLS 20-NN 19.6 / 21.8 / 17.4%.
Seed 0, 200 steps: teacher temperature warm-up to 0.07 23.38; lr 5e-4 23.32; scenes
instead of photos 23.42; momentum 0.996 23.21; momentum 0.95 with lr 2e-3 22.72, and with
K = 256 22.43. The demo's other training-free rows: raw 4.43, maskclip 8.91, sclip 9.24,
clearclip 14.43, naclip 18.35, sc_clip 15.27, resclip 12.37, maskclip-nores 19.75.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any


def cls_knn_accuracy(model: Any, world_config: Any, k: int = 20) -> float:
    """20-NN accuracy (%) of the photo's class from the ViT's CLS token (see the module doc)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from reclip.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from reclip.toy.world import ToyWorld

    world = ToyWorld(world_config)
    batch = world.captioned(2000, np.random.default_rng(2024))  # a stream no training run uses
    x = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float().div(255.0)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        cls = F.normalize(torch.cat([model(chunk)[:, 0] for chunk in x.split(250)]), dim=-1)
    labels = torch.from_numpy(batch.labels)
    bank, query = slice(0, 1500), slice(1500, 2000)
    nearest = (cls[query] @ cls[bank].t()).topk(k, dim=1).indices  # (500, k)
    votes = F.one_hot(labels[bank][nearest], int(labels.max()) + 1).sum(1)
    return 100 * float((votes.argmax(1) == labels[query]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dino", default="{}", help="ToyDinoConfig field overrides, JSON")
    parser.add_argument("--num-scenes", type=int, default=300)
    parser.add_argument("--cache-dir", type=Path, default=None, help="the tiny CLIP's and the toy DINOs' cache "
                        "(default: the demo's, reclip.demo.default_cache_dir())")
    parser.add_argument("--dino-cache-dir", type=Path, default=None, help="the toy DINOs' cache (default: --cache-dir)")
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    import dataclasses

    import numpy as np
    import torch

    from reclip.backbones.dino import load_dino
    from reclip.clip.load import load_clip
    from reclip.data.datasets import SegmentationDataset
    from reclip.demo import TEMPLATES, VARIANTS, _evaluate, default_cache_dir
    from reclip.files import atomic_write, atomic_write_json
    from reclip.inference import InferenceConfig
    from reclip.methods import build_segmentor
    from reclip.text import query_embeddings
    from reclip.toy.dino import ToyDinoConfig, build_backbone, get_or_train_dino
    from reclip.toy.pretrain import ToyConfig, get_or_train
    from reclip.toy.world import write_voc_layout

    cache = args.cache_dir or default_cache_dir()
    config = ToyConfig.default()
    overrides = json.loads(args.dino)
    dino_config = ToyDinoConfig(**overrides)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    # The demo's setup (reclip.demo.run_demo, seed 0): its CLIP, val scenes, settings and queries.
    clip = load_clip(get_or_train(cache, config, seed=0))
    voc = write_voc_layout(out / "toy_data", num_train=0, num_val=args.num_scenes, seed=1, config=config.world)
    data = SegmentationDataset("voc21", voc, "val", classes_file=out / "toy_data" / "toy_classes.txt")
    cfg = InferenceConfig(mode="whole", short_side=None, logit_scale=50.0)
    queries = query_embeddings(clip, data.vocabulary, TEMPLATES, cache_dir=out / "text_cache")

    rows: dict[str, list[float]] = {}
    records: dict[str, Any] = {}
    probes: dict[str, list[float]] = {}

    def score(name: str, segmentor: Any) -> float:
        torch.set_num_threads(1)  # as the demo: one 96 px scene at a time
        result = _evaluate(segmentor, data, cfg, clip, False, name)
        rows.setdefault(name, []).append(100 * result.miou)
        print(json.dumps({"row": name, "mIoU": 100 * result.miou,
                          "space_preference": result.bias["space_preference"]["score"]}), flush=True)
        return result.miou

    def proxyclip(proxy: Path) -> Any:
        return build_segmentor("proxyclip", clip, data.vocabulary, strategy_overrides={"proxy": str(proxy)},
                               queries=queries)

    if args.baselines:
        for name, (method, strategy_overrides) in VARIANTS.items():
            score(name, build_segmentor(method, clip, data.vocabulary, strategy_overrides=strategy_overrides,
                                        queries=queries))
    for seed in args.seeds:
        start = time.perf_counter()
        path = get_or_train_dino(args.dino_cache_dir or cache, config.world, dino_config, seed=seed, progress=False)
        record = json.loads(Path(f"{path}.json").read_text())["record"]
        records[str(seed)] = {k: record[k] for k in ("train_seconds", "first_loss", "final_loss", "teacher_entropy",
                                                 "teacher_mean_entropy", "load_average")}
        records[str(seed)]["wall_seconds"] = time.perf_counter() - start
        print(json.dumps({"dino": str(path), **records[str(seed)]}), flush=True)
        score("proxyclip, toy DINO", proxyclip(path))
        probes.setdefault("toy DINO", []).append(cls_knn_accuracy(load_dino(path), config.world))
        torch.manual_seed(seed)
        random = build_backbone(dino_config, config.world.image_size)
        random_path = out / f"random-dino-s{seed}.pth"
        state = {k: v.detach().clone() for k, v in random.state_dict().items()}
        atomic_write(random_path, lambda tmp, state=state: torch.save(state, tmp))
        score("proxyclip, random-init DINO", proxyclip(random_path))
        probes.setdefault("random-init DINO", []).append(cls_knn_accuracy(random.eval(), config.world))
        print(json.dumps({"seed": seed, "cls_20nn_accuracy": {k: v[-1] for k, v in probes.items()}}), flush=True)

    summary = {name: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None,
                      "runs": v} for name, v in rows.items()}
    atomic_write_json(out / "toy_proxyclip.json", {"dino": dataclasses.asdict(dino_config), "seeds": args.seeds,
                                                  "pretraining": records, "mIoU": summary,
                                                  "cls_20nn_accuracy": probes,
                                                  "cpu_count": os.cpu_count()})
    print(f"\n{'row':<32} {'mIoU':>6} {'SD':>5}  seeds")
    for name, s in summary.items():
        sd = f"{s['sd']:5.2f}" if s["sd"] is not None else " " * 5
        print(f"{name:<32} {s['mean']:6.2f} {sd}  {len(s['runs'])}")
    for name, values in probes.items():
        print(f"CLS 20-NN photo-class accuracy, {name}: {np.mean(values):.1f}% "
              f"(+/- {np.std(values, ddof=1) if len(values) > 1 else 0:.1f})")


if __name__ == "__main__":
    main()
