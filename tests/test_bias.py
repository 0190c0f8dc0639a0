"""The bias diagnostics against hand computations and predictors whose bias is known."""

import numpy as np
import pytest

from reclip.bias import SpacePreference, class_preference


def test_class_preference_by_hand():
    confusion = np.array([[8, 2, 0, 0], [6, 4, 0, 0], [0, 1, 9, 0], [0, 0, 0, 0]])
    result = class_preference(confusion)
    # rows: 0.8 - 0.2, 0.4 - 0.6, 0.9 - 0.1; class 3 never occurs.
    np.testing.assert_allclose(result["per_class"][:3], [0.6, -0.2, 0.8])
    assert np.isnan(result["per_class"][3])
    assert result["score"] == pytest.approx((0.6 - 0.2 + 0.8) / 3)
    assert result["preferred"].tolist() == [1, 0, 1, -1]
    assert class_preference(confusion, exclude=(0,))["score"] == pytest.approx(0.3)
    assert class_preference(np.eye(3) * 5)["score"] == 1.0


def _scene(rng, size=64):
    """Two or three non-touching squares of random classes 1..3 at random places."""
    label = np.zeros((size, size), np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, size - 8, 2)
        if (label[max(0, y - 1):y + 9, max(0, x - 1):x + 9] == 0).all():
            label[y:y + 8, x:x + 8] = rng.integers(1, 4)
    return label


def _peripheral_miss(label):
    """A predictor that erases every object whose centroid is far from the centre."""
    pred = label.copy()
    size = label.shape[0]
    yy, xx = np.mgrid[:size, :size]
    far = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2) > 0.45 * size
    pred[far & (label > 0)] = 0
    return pred


def test_space_preference_sign_follows_the_predictor():
    rng = np.random.default_rng(0)
    perfect = SpacePreference(4, background_index=0)
    biased = SpacePreference(4, background_index=0)
    for _ in range(60):
        label = _scene(rng)
        perfect.update(label, label)
        biased.update(_peripheral_miss(label), label)
    assert perfect.compute()["score"] == 0.0
    curve = biased.compute()
    assert curve["score"] < -0.5
    kept = ~np.isnan(curve["miou"])
    assert curve["miou"][kept][0] > curve["miou"][kept][-1]


def test_object_iou_ignores_other_objects_of_the_same_class():
    label = np.zeros((40, 40), np.uint8)
    label[2:10, 2:10] = 1
    label[2:10, 12:20] = 1  # a second object of class 1 inside the first one's grown box
    pred = label.copy()
    pred[10:12, 2:10] = 1  # a real false positive just below the first object
    sp = SpacePreference(2, background_index=0, min_objects=1)
    sp.update(pred, label)
    ious = sorted(i / u for _, _, i, u in sp.objects)
    assert ious == pytest.approx([64 / (64 + 16), 1.0])


def test_instance_masks_are_used_when_given():
    label = np.zeros((20, 20), np.uint8)
    label[2:8, 2:16] = 1  # one connected region, two instances
    instances = np.zeros_like(label)
    instances[2:8, 2:9] = 1
    instances[2:8, 9:16] = 2
    sp = SpacePreference(2, background_index=0, min_objects=1)
    sp.update(label, label, instances)
    assert len(sp.objects) == 2
    sp_cc = SpacePreference(2, background_index=0, min_objects=1)
    sp_cc.update(label, label)
    assert len(sp_cc.objects) == 1
