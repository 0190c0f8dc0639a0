"""reclip.diagnostics: eq. 7 measured on labelled images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tiny import tiny_clip
from reclip.diagnostics import contrastive_signal, grid_masks
from reclip.heads.losses import contrastive_loss
from reclip.heads.rectify import RECLIPPP, Rectifier
from reclip.text import QueryEmbeddings


def test_grid_masks_take_each_cells_majority_and_ignore_255():
    labels = torch.tensor([[[1, 1, 2, 2],
                            [1, 2, 2, 2],
                            [255, 255, 0, 255],
                            [255, 255, 255, 255]]])
    masks = grid_masks(labels, 3, (2, 2))
    assert masks.shape == (1, 3, 2, 2)
    assert masks[0, :, 0, 0].tolist() == [0, 1, 0]  # three 1s against one 2
    assert masks[0, :, 0, 1].tolist() == [0, 0, 1]
    assert masks[0, :, 1, 1].tolist() == [1, 0, 0]  # the one valid pixel decides, 255 never votes
    assert masks[0, :, 1, 0].tolist() == [0, 0, 0]  # no valid pixel: no class


class _Scenes:
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def _model(num_classes=4):
    clip = tiny_clip()
    g = torch.Generator().manual_seed(1)
    w = F.normalize(torch.randn(num_classes, clip.visual.output_dim, generator=g), dim=-1)
    queries = QueryEmbeddings(w, torch.arange(num_classes), num_classes)
    config = dataclasses.replace(RECLIPPP, reference_length=8)
    return clip, Rectifier(clip, queries, ["cat", "dog", "sky", "grass"], config).eval()


def test_labels_equal_to_clips_own_argmax_score_what_clips_argmax_scores():
    clip, model = _model()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    mean = torch.tensor(clip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
        out = model.forward_train(x)
    argmax = out.query_logits.argmax(1)  # (5, 4, 4) on the 8 px grid
    labels = argmax.repeat_interleave(8, 1).repeat_interleave(8, 2).numpy().astype(np.uint8)
    signal = contrastive_signal(model, _Scenes(images, labels), clip.image_mean, clip.image_std, batch_size=2)
    assert signal.images == 5 and signal.class_names == ["cat", "dog", "sky", "grass"]
    assert signal.loss["ground truth"] == pytest.approx(signal.loss["clip argmax"], abs=1e-5)
    # the model's own prediction is scored by the same loss, on M_o's argmax
    masks = F.one_hot(out.decoded.argmax(1), 4).permute(0, 3, 1, 2).float()
    present = F.one_hot(argmax, 4).sum((1, 2)) > 0
    expected = contrastive_loss(out.features, masks, model.query_weights, present)
    assert signal.loss["model argmax"] == pytest.approx(float(expected), abs=1e-5)
    # a region of CLIP's argmax is classified as its class (pooling is linear, the argmax is per cell)
    for cls, accuracy in enumerate(signal.region_accuracy):
        assert accuracy == (1.0 if present[:, cls].any() else None)
    assert "ground-truth masks" in signal.summary()
