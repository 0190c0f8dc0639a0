"""How much could a bias correction gain in a demo's toy world, and does eq. 7 find it?

    python experiments/eq7_free_bias.py demo_out            # after `reclip demo --out demo_out`

On the demo's features Z (its ReCLIP++ strategy) and queries W_q, with M_q = Z W_q^T:

1. zero-shot: argmax of M_q;
2. oracle: a bias (per class, then per class and grid cell) fitted to the *labels* of
   the val scenes (cross-entropy, Adam) and subtracted: what a perfect bias model of the
   kind ReCLIP++ learns (M_b = W_p W_r^T spans both) could reach;
3. eq. 7: the same free bias (no Reference prompt, no positional projection: nothing
   limits it) trained by ReCLIP++'s loss alone (Gumbel masks of M_q - b, official
   pooling, the demo's hypotheses of the unlabelled train scenes), SGD with momentum.

If (3) stays at (1) while (2) is far above, eq. 7 does not point towards the better bias
on this data: no bias model, schedule or learning rate trained by it can close the gap.
The demo's toy world (seed 0, 2026-11-29): zero-shot 19.75, oracle class 25.71, oracle
class + position 30.81, free bias trained by eq. 7: 20.18 / 19.72 / 19.35 at steps
300 / 1000 / 3000 (Gumbel scale 30), 20.01 / 19.49 / 19.37 (scale 100); at lr 0.1 it
diverges.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from reclip.clip.load import load_clip
from reclip.data.datasets import SegmentationDataset
from reclip.demo import TOY_RECTIFICATION, VARIANTS
from reclip.heads.losses import contrastive_loss, gumbel_masks
from reclip.heads.rectify import class_query_weights
from reclip.hypotheses import load_hypotheses
from reclip.methods import build_segmentor
from reclip.metrics import ConfusionMatrix
from reclip.text import query_embeddings


def features(segmentor, data: SegmentationDataset, clip) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    mean = torch.tensor(clip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.image_std).view(1, 3, 1, 1)
    zs, labels, ids = [], [], []
    with torch.no_grad():
        for i in range(len(data)):
            item = data[i]
            image = torch.from_numpy(np.array(item["image"])).permute(2, 0, 1)[None].float() / 255
            zs.append(segmentor.features((image - mean) / std))
            labels.append(torch.from_numpy(np.array(item["label"])).long()[None])
            ids.append(item["image_id"])
    return torch.cat(zs), torch.cat(labels), ids


def miou(logits: torch.Tensor, labels: torch.Tensor) -> float:
    confusion = ConfusionMatrix(logits.shape[1])
    confusion.update(F.interpolate(logits, size=labels.shape[-2:], mode="bilinear").argmax(1), labels)
    return 100 * confusion.compute()["mIoU"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("demo_out", type=Path)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = json.loads((args.demo_out / "results.json").read_text())
    clip = load_clip(results["checkpoint"])
    root = args.demo_out / "toy_data" / "VOCdevkit" / "VOC2012"
    classes = args.demo_out / "toy_data" / "toy_classes.txt"
    val = SegmentationDataset("voc21", root, "val", classes_file=classes)
    train = SegmentationDataset("voc21", root, "train", classes_file=classes)
    method, overrides = VARIANTS[TOY_RECTIFICATION.features]
    segmentor = build_segmentor(method, clip, val.vocabulary, strategy_overrides=overrides)
    w_q = class_query_weights(query_embeddings(clip, val.vocabulary, "reclip85"))
    z_val, labels, _ = features(segmentor, val, clip)
    z_train, _, train_ids = features(segmentor, train, clip)
    m_val = torch.einsum("bdhw,cd->bchw", z_val, w_q)
    C, (h, w) = w_q.shape[0], z_val.shape[-2:]
    print(f"zero-shot (argmax M_q): {miou(m_val, labels):.2f}")

    full = F.interpolate(m_val, size=labels.shape[-2:], mode="bilinear")
    for name, per_cell in (("class", False), ("class + position", True)):
        bias = torch.zeros(1, C, h if per_cell else 1, w if per_cell else 1, requires_grad=True)
        opt = torch.optim.Adam([bias], lr=0.01)
        for _ in range(300):
            b = F.interpolate(bias, size=labels.shape[-2:], mode="bilinear") if per_cell else bias
            loss = F.cross_entropy(50 * (full - b), labels, ignore_index=255)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"oracle {name} bias (fitted to the val labels): {miou(m_val - bias.detach(), labels):.2f}")

    # the demo's own hypotheses file (results.json names it), checked against this CLIP and class list
    listed = load_hypotheses(results["hypotheses"], vocabulary=train.vocabulary, clip=clip)
    hyp = torch.zeros(len(train_ids), C, dtype=torch.bool)
    for i, image_id in enumerate(train_ids):
        hyp[i, listed.get(image_id, [])] = True  # an image the hypotheses skipped trains on nothing
    for scale in (30.0, 100.0):
        bias = torch.zeros(1, C, h, w, requires_grad=True)  # class + position, unconstrained
        opt = torch.optim.SGD([bias], lr=0.01, momentum=0.9)
        trace = []
        for step in range(1, args.steps + 1):
            idx = torch.randint(0, len(train_ids), (8,))
            z = z_train[idx]
            masks = gumbel_masks(torch.einsum("bdhw,cd->bchw", z, w_q) - bias, scale=scale)
            loss = contrastive_loss(z, masks, w_q, hyp[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in (300, 1000, args.steps):
                trace.append(f"step {step}: {miou(m_val - bias.detach(), labels):.2f}")
        print(f"free bias trained by eq. 7 (Gumbel scale {scale:g}): {', '.join(trace)}")


if __name__ == "__main__":
    main()
