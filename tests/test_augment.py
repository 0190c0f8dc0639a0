"""Training augmentations (reclip.data.augment): determinism, geometry, colour, the unlabelled set."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pytest
import torch

from reclip.data import SegmentationDataset
from reclip.data.augment import (
    UnlabeledTrainSet,
    augment,
    hsv_to_rgb,
    photometric_distortion,
    random_crop,
    random_flip,
    random_rescale,
    rgb_to_hsv,
    sample_rng,
)

from layouts import labels_unreadable, write_voc


def _image(h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_augment_is_a_function_of_the_seed():
    img = _image()
    outs = [augment(img, np.random.default_rng(s), base_short_side=32, crop=24)[0] for s in (3, 3, 4, 5, 6)]
    assert np.array_equal(outs[0], outs[1])
    assert not all(np.array_equal(outs[0], o) for o in outs[2:])
    assert all(o.dtype == np.uint8 and o.shape == (24, 24, 3) for o in outs)
    # the per-sample generator: a pure function of (seed, epoch, index)
    assert sample_rng(1, 2, 3).random() == sample_rng(1, 2, 3).random()
    assert len({sample_rng(*k).random() for k in [(1, 2, 3), (1, 3, 3), (1, 2, 4), (2, 2, 3)]}) == 4


def test_rescale_range_and_long_side_cap():
    img = _image(40, 60)
    shorts = []
    for s in range(60):
        out, _ = random_rescale(img, np.random.default_rng(s), base_short_side=20, max_long_side=None)
        assert out.shape[1] / out.shape[0] == pytest.approx(1.5, abs=0.05)
        shorts.append(out.shape[0])
    assert 10 <= min(shorts) < 14 and 36 < max(shorts) <= 40  # ratio in [0.5, 2.0)
    # the long-side cap scales with the ratio (mmseg img_scale=(long, short))
    for s in range(20):
        out, _ = random_rescale(img, np.random.default_rng(s), base_short_side=20, max_long_side=15)
        assert out.shape[1] <= 30
    lab = np.random.default_rng(0).integers(0, 3, (40, 60))
    out, lab2 = random_rescale(img, np.random.default_rng(0), base_short_side=20, label=lab)
    assert lab2.shape == out.shape[:2] and set(np.unique(lab2)) <= {0, 1, 2}


def test_crop_flip_pad_keep_image_and_label_aligned():
    h, w = 30, 50
    label = np.random.default_rng(1).integers(0, 20, (h, w))
    img = np.repeat((label * 10).astype(np.uint8)[..., None], 3, axis=2)
    for s in range(20):
        # no rescale (ratio 1, base = short side), no colour: pure geometry
        out, lab = augment(img, np.random.default_rng(s), base_short_side=h, crop=(40, 32), ratio_range=(1.0, 1.0),
                           photometric=False, label=label)
        assert out.shape == (40, 32, 3) and lab.shape == (40, 32)
        valid = lab != 255
        assert valid[:30].all() and not valid[30:].any()  # padded at the bottom with ignore
        assert np.array_equal(out[..., 0][valid], (lab[valid] * 10).astype(np.uint8))
        assert (out[30:] == 0).all()
    # a crop is a window of the input
    out, _ = random_crop(img, np.random.default_rng(0), crop=10)
    found = any(np.array_equal(out, img[y:y + 10, x:x + 10]) for y in range(h - 9) for x in range(w - 9))
    assert found
    # flip: always / never
    out, lab = random_flip(img, np.random.default_rng(0), prob=1.0, label=label)
    assert np.array_equal(out, img[:, ::-1]) and np.array_equal(lab, label[:, ::-1])
    out, _ = random_flip(img, np.random.default_rng(0), prob=0.0)
    assert np.array_equal(out, img)


def test_hsv_matches_the_textbook_formula():
    px = _image(16, 16, seed=3)
    hsv = rgb_to_hsv(px).reshape(-1, 3).astype(int)
    for (r, g, b), (h, s, v) in zip(px.reshape(-1, 3), hsv):
        eh, es, ev = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        dh = abs(h - round(eh * 180) % 180)
        assert min(dh, 180 - dh) <= 1 and abs(s - round(es * 255)) <= 1 and v == round(ev * 255)
    back = hsv_to_rgb(rgb_to_hsv(px))
    assert np.abs(back.astype(int) - px).max() <= 4  # 8-bit HSV quantisation (2-degree hue steps)


def test_photometric_distortion_changes_colour_not_geometry():
    img = _image()
    outs = [photometric_distortion(img, np.random.default_rng(s)) for s in range(64)]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    assert any(np.array_equal(o, img) for o in outs)  # every coin tails: 1/16 per seed
    assert sum(not np.array_equal(o, img) for o in outs) > 40
    # grey stays grey: saturation and hue cannot colour it, brightness / contrast act on all channels alike
    grey = np.repeat(np.linspace(0, 255, 40 * 56).reshape(40, 56, 1).astype(np.uint8), 3, axis=2)
    for s in range(32):
        o = photometric_distortion(grey, np.random.default_rng(s)).astype(int)
        assert np.abs(o[..., 0] - o[..., 1]).max() <= 1 and np.abs(o[..., 1] - o[..., 2]).max() <= 1
    # hue rotates a saturated colour; value (max channel) kept
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 200
    hues = {int(rgb_to_hsv(photometric_distortion(red, np.random.default_rng(s)))[0, 0, 0]) for s in range(64)}
    assert len(hues) > 3


# -- UnlabeledTrainSet -------------------------------------------------------------------------
@pytest.fixture()
def voc_train(tmp_path: Path):
    root = write_voc(tmp_path / "VOC2012", n_train=4, n_val=1)
    return SegmentationDataset("voc21", root, split="train")


def test_unlabeled_set_never_reads_labels(voc_train):
    # labels gone from disk AND the label reader poisoned: the dataset's own items now fail...
    for p in voc_train.label_paths:
        Path(p).unlink()

    with labels_unreadable("UnlabeledTrainSet"):
        with pytest.raises(AssertionError):
            voc_train[0]
        # ... but the unlabelled set works and returns no label
        hyp = {i: [k % 21, 5] for k, i in enumerate(voc_train.image_ids)}
        ds = UnlabeledTrainSet(voc_train, hyp, num_classes=21, base_short_side=24, crop=(16, 20), seed=0)
        assert len(ds) == 4
        for k in range(len(ds)):
            item = ds[k]
            assert set(item) == {"image", "valid", "hypotheses", "index", "image_id"}
            assert item["image"].shape == (3, 16, 20) and item["image"].dtype == torch.float32
            # valid marks the image's pixels; the padding (zeros after normalisation) is not
            valid = item["valid"]
            assert valid.shape == (16, 20) and valid.dtype == torch.bool and valid[0, 0]
            assert (item["image"][:, ~valid] == 0).all()
            rows, cols = valid.any(1), valid.any(0)
            assert valid.sum() == rows.sum() * cols.sum() and rows[: int(rows.sum())].all() and cols[: int(cols.sum())].all()
            assert item["hypotheses"].dtype == torch.bool and item["hypotheses"].shape == (21,)
            assert sorted(item["hypotheses"].nonzero().flatten().tolist()) == sorted({item["index"] % 21, 5})


def test_unlabeled_set_determinism_per_epoch(voc_train):
    hyp = {i: [1] for i in voc_train.image_ids}
    a = UnlabeledTrainSet(voc_train, hyp, num_classes=21, base_short_side=24, crop=16, seed=7)
    b = UnlabeledTrainSet(voc_train, hyp, num_classes=21, base_short_side=24, crop=16, seed=7)
    assert torch.equal(a[2]["image"], b[2]["image"])
    a.set_epoch(1)
    assert not torch.equal(a[2]["image"], b[2]["image"])
    b.set_epoch(1)
    assert torch.equal(a[2]["image"], b[2]["image"])
    c = UnlabeledTrainSet(voc_train, hyp, num_classes=21, base_short_side=24, crop=16, seed=8)
    assert not torch.equal(c[2]["image"], b[0]["image"])


def test_unlabeled_set_padding_is_the_mean_colour(voc_train):
    hyp = {i: [1] for i in voc_train.image_ids}
    # images are ~20 x 28; a 64 x 64 crop at ratio <= 1 of base 20 is always padded
    ds = UnlabeledTrainSet(voc_train, hyp, num_classes=21, base_short_side=20, crop=64, ratio_range=(0.5, 1.0))
    x = ds[0]["image"]
    assert (x[:, -1, :] == 0).all() and (x[:, :, -1] == 0).all()  # normalised 0 = mean colour
    assert (x[:, 0, 0] != 0).any()


def test_unlabeled_set_skips_and_reports(voc_train, tmp_path):
    ids = voc_train.image_ids
    with pytest.raises(ValueError, match="no hypotheses"):
        UnlabeledTrainSet(voc_train, {ids[0]: [1]}, num_classes=21, base_short_side=24, crop=16)
    with pytest.raises(ValueError, match="outside 0..20"):
        UnlabeledTrainSet(voc_train, {i: [21] for i in ids}, num_classes=21, base_short_side=24, crop=16)
    hyp = {ids[0]: [], ids[1]: [2], ids[2]: [3], ids[3]: [4]}
    Path(voc_train.image_paths[2]).write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped 2 of 4"):
        ds = UnlabeledTrainSet(voc_train, hyp, num_classes=21, base_short_side=24, crop=16)
    assert sorted(ds.skipped) == sorted([ids[0], ids[2]]) and ds.indices == [1, 3]
    # a file that breaks after construction: reported, replaced by the next image
    data = Path(voc_train.image_paths[1]).read_bytes()
    Path(voc_train.image_paths[1]).write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="next image"):
        item = ds[0]
    assert item["index"] == 3
