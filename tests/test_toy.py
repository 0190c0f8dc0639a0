"""The toy world and tiny-CLIP pre-training (reclip.toy).

Quick tests check the world (determinism, labels vs pixels, captions, VOC layout). One
slower test pre-trains the ``ToyConfig.ci()`` tiny CLIP (about a minute on 2 cores; seeded,
deterministic algorithms, fixed thread count) and checks that it learnt: image zero-shot
accuracy well above chance and dense segmentation above trivial baselines.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reclip.toy.pretrain import ToyConfig, get_or_train, images_to_tensor, load_checkpoint, zero_shot_accuracy
from reclip.toy.world import BACKGROUND_NAME, CLASS_SETS, CLASSES, ToyWorld, WorldConfig, write_voc_layout

SMALL = WorldConfig(image_size=64, scene_size=64, num_classes=4)


# -- the world ---------------------------------------------------------------------------


def test_world_is_deterministic_per_seed() -> None:
    world = ToyWorld()
    a = world.captioned(16, np.random.default_rng(3))
    b = world.captioned(16, np.random.default_rng(3))
    c = world.captioned(16, np.random.default_rng(4))
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    s1, s2 = world.scenes(8, np.random.default_rng(5)), world.scenes(8, np.random.default_rng(5))
    for x, y in zip(s1, s2):
        assert np.array_equal(x, y)


def test_shapes_and_dtypes() -> None:
    world = ToyWorld(SMALL)
    cap = world.captioned(10, np.random.default_rng(0))
    assert cap.images.shape == (10, 64, 64, 3) and cap.images.dtype == np.uint8
    assert cap.labels.shape == (10,) and len(cap.captions) == 10
    sc = world.scenes(6, np.random.default_rng(0))
    assert sc.images.shape == (6, 64, 64, 3) and sc.labels.shape == (6, 64, 64)
    assert sc.labels.dtype == np.uint8 and sc.instances.dtype == np.uint8
    assert sc.labels.max() <= 4 and sc.instance_classes.shape == (6, SMALL.scene_objects[1])


def test_scene_labels_match_rendered_objects() -> None:
    world = ToyWorld(WorldConfig(noise_std=0.0, vignette=0.0))  # colours checked without the camera's darkening
    sc = world.scenes(64, np.random.default_rng(1))
    # labels and instances agree: an instance pixel carries its object's class, and only there.
    assert np.array_equal(sc.labels > 0, sc.instances > 0)
    for n in range(8):
        for i in range(1, sc.instance_classes.shape[1] + 1):
            pix = sc.instances[n] == i
            if pix.any():
                assert np.all(sc.labels[n][pix] == sc.instance_classes[n, i - 1])
    # pixels of a class look like that class: their median colour is nearest to its own
    # body colour or its look-alike's (the pair shares colours by design).
    colors = np.array([s.color for s in world.specs], dtype=float)
    for c in range(1, world.num_classes + 1):
        med = np.median(sc.images[sc.labels == c].astype(float), axis=0)
        nearest = int(np.argmin(np.linalg.norm(colors - med, axis=1))) + 1
        assert nearest in (c, world.partner[c]), (world.class_names[c - 1], med)
    # background pixels are low-saturation (objects are saturated or pale with texture)
    bg = sc.images[sc.labels == 0].astype(float)
    assert np.median(bg.max(1) - bg.min(1)) < 70


def test_scenes_place_objects_uniformly() -> None:
    sc = ToyWorld().scenes(400, np.random.default_rng(2))
    ys = [np.nonzero(sc.instances[n] == i)[0].mean() for n in range(400) for i in (1, 2) if (sc.instances[n] == i).any()]
    top = np.mean(np.array(ys) < 48)
    assert 0.4 < top < 0.6  # no vertical preference in scenes (it exists only in pre-training)


def test_captions_name_the_dominant_object_and_follow_position_priors() -> None:
    world = ToyWorld()
    cap = world.captioned(2000, np.random.default_rng(0))
    words = [BACKGROUND_NAME, *world.class_names]
    named = np.array([max(range(len(words)), key=lambda k: words[k] in c.split(" ") or words[k] + "." in c) for c in cap.captions])
    exact = np.mean([words[l] in c for l, c in zip(cap.labels, cap.captions)])
    assert 0.85 < exact < 0.97  # caption noise names the look-alike sometimes
    assert np.all(np.isin(named, np.arange(len(words))))
    counts = np.bincount(cap.labels, minlength=world.num_classes + 1)
    assert counts[1] > 2 * counts[2]  # apple is much more frequent than tomato


def test_photos_centre_the_named_object_and_push_distractors_out() -> None:
    # The space correlation of pre-training (default world): named objects near the
    # centre, unnamed distractors towards the edges, corners darkened by the camera.
    world = ToyWorld()
    rng, size, n = np.random.default_rng(0), 96, 2000
    cls = rng.integers(1, world.num_classes + 1, size=n)
    cx, cy = world._prior_positions(rng, cls, np.full(n, 18.0), size)
    named = np.maximum(np.abs(cx - size / 2), np.abs(cy - size / 2)) / (size / 2)
    dx, dy = world._peripheral_positions(rng, np.full(n, 10.0), size)
    distract = np.maximum(np.abs(dx - size / 2), np.abs(dy - size / 2)) / (size / 2 - 10.0)
    assert np.mean(named < 0.5) > 0.9
    assert distract.min() >= world.config.distractor_min_offset - 1e-9 and distract.max() <= 1 + 1e-9
    # the vignette is the camera's: scenes get it too (it draws no random numbers, so the
    # same stream gives the same layout without it)
    flat = ToyWorld(WorldConfig(vignette=0.0, noise_std=0.0)).scenes(32, np.random.default_rng(1))
    dark = ToyWorld(WorldConfig(noise_std=0.0)).scenes(32, np.random.default_rng(1))
    assert np.array_equal(flat.labels, dark.labels)
    ratio = dark.images[:, :6, :6].astype(float).mean() / flat.images[:, :6, :6].astype(float).mean()
    assert abs(ratio - (1 - 0.9 * world.config.vignette)) < 0.08, ratio
    centre = dark.images[:, 44:52, 44:52].astype(float).mean() / flat.images[:, 44:52, 44:52].astype(float).mean()
    assert centre > 0.98


def test_voc_layout_writes_and_reads_back(tmp_path) -> None:
    from PIL import Image

    voc = write_voc_layout(tmp_path, num_train=5, num_val=3, seed=11, config=SMALL)
    assert voc == tmp_path / "VOCdevkit" / "VOC2012"
    train = (voc / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == 5 and len(val) == 3 and not set(train) & set(val)
    lines = (tmp_path / "toy_classes.txt").read_text().splitlines()
    assert lines == [BACKGROUND_NAME, *[s.name for s in CLASSES[:4]]]
    for i in train + val:
        assert (voc / "JPEGImages" / f"{i}.jpg").is_file()
        for sub in ("SegmentationClass", "SegmentationObject"):
            png = Image.open(voc / sub / f"{i}.png")
            assert png.mode == "P" and png.size == (64, 64)
    # Labels read back equal the generated ones (val = second stream of the seed).
    expect = ToyWorld(SMALL).scenes(3, np.random.default_rng(np.random.SeedSequence(11).spawn(2)[1]))
    got = np.stack([np.array(Image.open(voc / "SegmentationClass" / f"{i}.png")) for i in val])
    assert np.array_equal(got, expect.labels)
    inst = np.stack([np.array(Image.open(voc / "SegmentationObject" / f"{i}.png")) for i in val])
    assert np.array_equal(inst, expect.instances)
    img = np.stack([np.array(Image.open(voc / "JPEGImages" / f"{i}.jpg").convert("RGB")) for i in val])
    assert np.abs(img.astype(int) - expect.images.astype(int)).mean() < 4  # JPEG q95, 4:4:4


def test_voc_layout_reads_through_the_dataset_protocol(tmp_path) -> None:
    datasets = pytest.importorskip("reclip.data.datasets")
    voc = write_voc_layout(tmp_path, num_train=2, num_val=3, seed=0, config=SMALL)
    ds = datasets.SegmentationDataset("voc21", voc, split="val", classes_file=tmp_path / "toy_classes.txt")
    assert len(ds) == 3 and ds.class_names[0] == BACKGROUND_NAME and ds.num_classes == 5
    item = ds[0]
    assert item["error"] is None and item["image"].shape == (64, 64, 3) and item["label"].max() <= 4


def test_config_key_and_round_trip() -> None:
    a, b = ToyConfig.ci(), ToyConfig.ci()
    assert a.key() == b.key() and a.key() != ToyConfig.default().key()
    assert ToyConfig.from_dict(a.to_dict()) == a
    garden = ToyConfig(world=WorldConfig(classes="garden"))
    assert garden.key() != ToyConfig.default().key() and ToyConfig.from_dict(garden.to_dict()) == garden


def test_the_default_class_set_keeps_the_checkpoint_keys_of_before_class_sets() -> None:
    import hashlib
    import json

    from reclip.toy.pretrain import RECIPE

    values = ToyConfig.default().to_dict()
    del values["world"]["classes"]  # a config as written before the field existed
    text = json.dumps({**values, "recipe": RECIPE}, sort_keys=True)
    assert ToyConfig.default().key() == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_a_second_class_set_makes_another_world() -> None:
    world = ToyWorld(WorldConfig(image_size=64, scene_size=64, classes="garden"))
    assert world.class_names == tuple(spec.name for spec in CLASS_SETS["garden"])
    assert not set(world.class_names) & set(ToyWorld().class_names)
    partners = dict(zip(world.class_names, (spec.partner for spec in world.specs)))
    assert all(partners[partners[name]] == name for name in partners)  # look-alike pairs
    scenes = world.scenes(4, np.random.default_rng(0))
    assert scenes.labels.max() <= world.num_classes
    with pytest.raises(ValueError, match="unknown class set 'fruit'.*objects, garden"):
        ToyWorld(WorldConfig(classes="fruit"))


# -- pre-training (the slow one) -----------------------------------------------------------


@pytest.fixture(scope="module")
def ci_clip(toy_ci_checkpoint):
    """The ci() tiny CLIP checkpoint (pre-trained once per test session, see conftest)."""
    return toy_ci_checkpoint[1]


def _dense_scores(clip, world: ToyWorld, scenes, strategy) -> dict[str, float]:
    """Dense zero-shot scores of the scenes with one strategy.

    "miou_objects": mIoU over the K object classes on object pixels (background ignored,
    the VOC20 protocol); "miou_thd": mIoU with background, a pixel being background when
    its max softmax(50 cos) over the objects is below 0.7 (the tiny CLIP's "background"
    word is unreliable); "object_acc": accuracy among the K classes on object pixels.
    """
    from reclip.features import dense_features
    from reclip.metrics import ConfusionMatrix
    from reclip.text import query_embeddings

    k = world.num_classes
    weights = query_embeddings(clip, list(world.class_names), cache_dir=False).weights  # (K, D)
    with torch.no_grad():
        feats = dense_features(clip, images_to_tensor(scenes.images), strategy)  # (N, D, h, w)
        logits = torch.einsum("ndhw,cd->nchw", feats, weights)
        logits = F.interpolate(logits, size=scenes.labels.shape[1:], mode="bilinear", align_corners=False)
    conf, arg = torch.softmax(50 * logits, dim=1).max(dim=1)
    objects = scenes.labels > 0
    pred = arg.numpy() + 1  # (N, H, W) in 1..K
    cm = ConfusionMatrix(k)
    cm.update(pred - 1, np.where(objects, scenes.labels.astype(np.int64) - 1, 255))
    cm_thd = ConfusionMatrix(k + 1)
    cm_thd.update(np.where(conf.numpy() < 0.7, 0, pred), scenes.labels)
    return {
        "miou_objects": cm.compute()["mIoU"],
        "miou_thd": cm_thd.compute()["mIoU"],
        "object_acc": float((pred[objects] == scenes.labels[objects]).mean()),
    }


def test_pretraining_learns_and_segments(ci_clip) -> None:
    from reclip.features import get_strategy
    from reclip.metrics import ConfusionMatrix
    from reclip.toy.pretrain import build_clip

    config = ToyConfig.ci()
    world = ToyWorld(config.world)
    clip = load_checkpoint(ci_clip)
    chance = 1 / world.num_classes
    acc = zero_shot_accuracy(clip, world, num_images=300, seed=99)
    assert acc >= chance + 0.3, f"zero-shot accuracy {acc:.2f}; chance is {chance:.2f}"

    scenes = world.scenes(120, np.random.default_rng(2024))
    strategy = get_strategy("maskclip", residual=False, ffn=False)
    got = _dense_scores(clip, world, scenes, strategy)
    assert got["object_acc"] > chance + 0.15, got
    # baselines: the same pipeline on an untrained CLIP, and predicting all background
    torch.manual_seed(0)
    untrained = _dense_scores(build_clip(config).eval(), world, scenes, strategy)
    cm = ConfusionMatrix(world.num_classes + 1)
    cm.update(np.zeros_like(scenes.labels), scenes.labels)
    all_background = cm.compute()["mIoU"]
    assert got["miou_objects"] > untrained["miou_objects"] + 0.05, (got, untrained)
    assert got["miou_thd"] > max(all_background, untrained["miou_thd"]) + 0.03, (got, untrained, all_background)


def test_get_or_train_reuses_the_cached_checkpoint(ci_clip) -> None:
    before = ci_clip.stat().st_mtime_ns
    again = get_or_train(ci_clip.parent, ToyConfig.ci(), seed=0, progress=False)
    assert again == ci_clip and again.stat().st_mtime_ns == before
    assert (ci_clip.parent / f"{ci_clip.name}.json").is_file()


def test_pretraining_gives_the_same_clip_whatever_the_callers_thread_count(tmp_path) -> None:
    """CPU kernels split sums by thread; pre-training pins its own thread count, so the caller's does not matter."""
    import dataclasses

    from reclip.toy.pretrain import pretrain_tiny_clip

    config = dataclasses.replace(ToyConfig.ci(), steps=3, eval_images=20)
    threads = torch.get_num_threads()
    fingerprints = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            fingerprints.append(pretrain_tiny_clip(tmp_path / f"t{n}.pt", config, seed=0, progress=False)["fingerprint"])
            assert torch.get_num_threads() == n  # the caller's setting is restored
    finally:
        torch.set_num_threads(threads)
    assert fingerprints[0] == fingerprints[1]
