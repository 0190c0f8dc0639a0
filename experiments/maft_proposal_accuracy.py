"""Does MAFT's fine-tuning classify the demo's proposals better or worse than the frozen CLIP?

    python experiments/maft_proposal_accuracy.py demo_out      # after `reclip demo --out demo_out`

For seed 0's proposal files (the regions of ReCLIP++'s prediction on each val scene),
each proposal's ground-truth class is the majority label of its pixels; a proposal is
right when IP-CLIP's argmax class is that class. Printed per model (frozen CLIP with the
demo's start layer, MAFT with labels of the seen classes, MAFT with pseudo labels):
the pixel-weighted accuracy and the mean top probability.

The demo's toy world (2026-11-29): frozen 55.3% (mean top probability 0.981), MAFT with
labels 37.2% (0.908), MAFT with ReCLIP++ pseudo labels 47.8% (0.884): fine-tuning makes
the proposals' classes both less confident and more often wrong.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from reclip.clip.load import load_clip
from reclip.data.datasets import SegmentationDataset
from reclip.demo import TOY_MAFT
from reclip.maft.proposals import ProposalFiles
from reclip.methods import build_segmentor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_out", type=Path)
    args = parser.parse_args()
    results = json.loads((args.demo_out / "results.json").read_text())
    runs = results["runs"]
    clip = load_clip(results["checkpoint"])
    data = SegmentationDataset("voc21", args.demo_out / "toy_data/VOCdevkit/VOC2012", "val",
                               classes_file=args.demo_out / "toy_data/toy_classes.txt")
    text_cache = args.demo_out / "text_cache"
    labelled, pseudo = runs["maft, labels of seen classes"][0], runs["maft, reclip++ pseudo labels"][0]
    proposals = ProposalFiles(json.loads((Path(labelled) / "config.json").read_text())["proposals"])
    frozen = build_segmentor("ipclip", clip, data.vocabulary, text_cache=text_cache)
    frozen.start_layer = TOY_MAFT.start_layer
    models = {"frozen CLIP (ipclip)": frozen,
              "MAFT, labels of seen classes": build_segmentor("maft", clip, data.vocabulary, checkpoint=labelled,
                                                              text_cache=text_cache),
              "MAFT, ReCLIP++ pseudo labels": build_segmentor("maft", clip, data.vocabulary, checkpoint=pseudo,
                                                              text_cache=text_cache)}
    mean = torch.tensor(clip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.image_std).view(1, 3, 1, 1)
    right = dict.fromkeys(models, 0)
    top = dict.fromkeys(models, 0.0)
    pixels, count = 0, 0
    for index in range(len(data)):
        item = data[index]
        label = np.asarray(item["label"])
        masks = proposals(item["image"], item["image_id"])  # (N, H, W)
        image = (torch.from_numpy(np.ascontiguousarray(item["image"])).permute(2, 0, 1)[None].float() / 255 - mean) / std
        truth = []
        for mask in masks.numpy() > 0.5:
            values = label[mask]
            values = values[values != 255]
            truth.append(int(np.bincount(values).argmax()) if values.size else -1)
        weights = masks.flatten(1).sum(1).numpy()
        kept = [n for n, t in enumerate(truth) if t >= 0]
        pixels += int(sum(weights[n] for n in kept))
        count += len(kept)
        with torch.no_grad():
            for name, model in models.items():
                probs = model.proposal_probabilities(image, masks[None])[0]
                predicted = probs.argmax(-1).numpy()
                right[name] += int(sum(weights[n] for n in kept if predicted[n] == truth[n]))
                top[name] += float(probs[kept].max(-1).values.sum())
    for name in models:
        print(f"{name:<32} proposal accuracy {100 * right[name] / pixels:5.1f}%  "
              f"mean top probability {top[name] / count:.3f}")


if __name__ == "__main__":
    main()
