"""ConfusionMatrix: mIoU (mmseg semantics), accuracies, ignore index, ReCLIP's absent-as-zero mean."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from reclip.metrics import ConfusionMatrix


def _reference(preds, labels, num_classes, ignore=255):
    """Per-class intersections / unions by explicit per-image, per-class pixel sets."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    gt = np.zeros(num_classes)
    for p, g in zip(preds, labels):
        valid = {(y, x) for y in range(g.shape[0]) for x in range(g.shape[1]) if g[y, x] != ignore}
        for c in range(num_classes):
            in_pred = {(y, x) for (y, x) in valid if p[y, x] == c}
            in_gt = {(y, x) for (y, x) in valid if g[y, x] == c}
            inter[c] += len(in_pred & in_gt)
            union[c] += len(in_pred | in_gt)
            gt[c] += len(in_gt)
    return inter, union, gt


def _random_images(rng, n=4, num_classes=5, absent=(3,)):
    preds, labels = [], []
    for i in range(n):
        h, w = 6 + i, 7
        g = rng.integers(0, num_classes, (h, w))
        for a in absent:
            g[g == a] = 0  # class never in the ground truth
        g[rng.random((h, w)) < 0.15] = 255
        p = rng.integers(0, num_classes, (h, w))
        preds.append(p)
        labels.append(g)
    return preds, labels


def test_miou_matches_independent_computation():
    rng = np.random.default_rng(0)
    preds, labels = _random_images(rng)
    cm = ConfusionMatrix(5)
    for p, g in zip(preds, labels):
        cm.update(p, g)
    out = cm.compute()
    inter, union, gt = _reference(preds, labels, 5)
    iou = inter / union
    np.testing.assert_allclose(out["IoU"], iou)
    assert out["IoU"][3] == 0.0  # absent from GT but predicted: IoU 0, counted (mmseg)
    assert math.isclose(out["mIoU"], iou.mean())
    assert math.isclose(out["aAcc"], inter.sum() / gt.sum())
    acc = np.where(gt > 0, inter / np.maximum(gt, 1), np.nan)
    np.testing.assert_allclose(out["Acc"], acc)
    assert math.isclose(out["mAcc"], np.nanmean(acc))
    assert out["num_pixels"] == gt.sum()


def test_batched_and_torch_inputs_agree():
    rng = np.random.default_rng(1)
    p = rng.integers(0, 4, (3, 5, 6))
    g = rng.integers(0, 4, (3, 5, 6))
    g[:, 0, 0] = 255
    a, b, c = ConfusionMatrix(4), ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(p, g)
    for i in range(3):
        b.update(p[i], g[i])
    c.update(torch.from_numpy(p), torch.from_numpy(g).to(torch.uint8))
    np.testing.assert_array_equal(a.matrix, b.matrix)
    np.testing.assert_array_equal(a.matrix, c.matrix)
    assert a.matrix.sum() == 3 * 5 * 6 - 3


def test_hand_example_skipped_class_and_ignore():
    # classes 0..3; class 3 never in GT nor predicted -> NaN and skipped;
    # class 2 predicted once but absent from GT -> IoU 0; pixel with label 255 ignored
    # although its prediction (1) would otherwise count.
    label = np.array([[0, 0, 1, 1, 255]])
    pred = np.array([[0, 1, 1, 2, 1]])
    cm = ConfusionMatrix(4)
    cm.update(pred, label)
    out = cm.compute()
    # class 0: I=1, U=2; class 1: I=1, U=3 (gt {2,3}, pred {1,2}); class 2: I=0, U=1
    np.testing.assert_allclose(out["IoU"][:3], [0.5, 1 / 3, 0.0])
    assert math.isnan(out["IoU"][3]) and not out["present"][3]
    assert math.isclose(out["mIoU"], (0.5 + 1 / 3 + 0.0) / 3)
    assert math.isclose(out["aAcc"], 2 / 4)
    assert math.isclose(out["mAcc"], (0.5 + 0.5) / 2)  # classes 2, 3 have no GT pixels
    # ReCLIP: skipped classes count as 0 and the mean divides by C = 4
    z = cm.compute(absent_as_zero=True)
    assert math.isclose(z["mIoU"], (0.5 + 1 / 3) / 4)
    assert math.isclose(z["mAcc"], (0.5 + 0.5) / 4)
    assert math.isnan(z["IoU"][3])  # the per-class array still says "not scored"


def test_row_normalized_and_empty():
    cm = ConfusionMatrix(3)
    assert math.isnan(cm.compute()["mIoU"]) and cm.compute()["num_pixels"] == 0
    cm.update(np.array([[0, 1, 1, 0]]), np.array([[0, 0, 1, 1]]))
    r = cm.row_normalized()
    np.testing.assert_allclose(r[:2], [[0.5, 0.5, 0], [0.5, 0.5, 0]])
    assert np.isnan(r[2]).all()


def test_invalid_inputs_raise():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="label values"):
        cm.update(np.zeros((1, 2), int), np.array([[0, 7]]))
    with pytest.raises(ValueError, match="pred values"):
        cm.update(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="integer"):
        cm.update(np.zeros((1, 2)), np.zeros((1, 2), int))
    cm.update(np.array([[9, 0]]), np.array([[255, 0]]))  # prediction under an ignored pixel is fine
    assert cm.matrix.sum() == 1


def test_merge_and_state_dict():
    rng = np.random.default_rng(2)
    p, g = rng.integers(0, 3, (2, 4, 4)), rng.integers(0, 3, (2, 4, 4))
    whole, a, b = ConfusionMatrix(3), ConfusionMatrix(3), ConfusionMatrix(3)
    whole.update(p, g)
    a.update(p[0], g[0])
    b.update(p[1], g[1])
    np.testing.assert_array_equal(a.merge(b).matrix, whole.matrix)
    c = ConfusionMatrix(3)
    c.load_state_dict(whole.state_dict())
    np.testing.assert_array_equal(c.matrix, whole.matrix)
    with pytest.raises(ValueError, match="incompatible"):
        a.merge(ConfusionMatrix(4))


def test_all_reduce_single_process(tmp_path):
    cm = ConfusionMatrix(2)
    cm.update(np.array([[0, 1]]), np.array([[0, 0]]))
    before = cm.matrix.copy()
    cm.all_reduce()  # not initialised: no-op
    np.testing.assert_array_equal(cm.matrix, before)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cm.all_reduce()
        np.testing.assert_array_equal(cm.matrix, before)
    finally:
        dist.destroy_process_group()
