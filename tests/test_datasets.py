"""Dataset protocols, SegmentationDataset on synthetic real layouts, and the COCO-Stuff converter."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from layouts import write_cocostuff, write_folder, write_for_layout, write_voc
from reclip.data import cocostuff
from reclip.data.datasets import DatasetError, SegmentationDataset, collate_items
from reclip.text import read_class_file
from reclip.data.protocol import (
    HypothesisSettings,
    Protocol,
    ProtocolError,
    RectifySettings,
    list_protocols,
    load_protocol,
)

SHIPPED = ["ade150", "cityscapes19", "cocoobject", "cocostuff171", "cocostuff27", "context59", "context60",
           "folder", "voc20", "voc21"]


def _reduce_zero(raw: np.ndarray) -> np.ndarray:
    out = raw.astype(np.int64) - 1
    out[(raw == 0) | (raw == 255)] = 255
    return out


def _identity(raw: np.ndarray) -> np.ndarray:
    return raw.astype(np.int64)


# Expected raw -> train id conversion per protocol, written independently of the protocol files.
EXPECTED_CONVERSION = {
    "voc21": _identity, "voc20": _reduce_zero, "context60": _identity, "context59": _reduce_zero,
    "ade150": _reduce_zero, "cityscapes19": _identity, "cocostuff171": _identity, "cocoobject": _identity,
    "folder": _identity,
    # cocostuff27 reads the RAW stuffthingmaps; checked against known ids in its own test.
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One synthetic dataset per layout, shared by the module (read-only use)."""
    base = tmp_path_factory.mktemp("layouts")
    return {layout: write_for_layout(layout, base / layout)
            for layout in ("voc", "context", "ade", "cityscapes", "cocostuff", "folder")}


def _dataset(name: str, written: dict, split: str = "val") -> SegmentationDataset:
    p = load_protocol(name)
    if p.layout == "folder":
        root = written["folder"]
        p = p.with_overrides(label_dir=str(root / "labels"))
        return SegmentationDataset(p, root / "images", split, classes_file=root / "classes.txt")
    layout = "cocostuff" if p.layout == "cocoobject" else p.layout
    return SegmentationDataset(p, written[layout], split)


def test_every_shipped_protocol_is_listed():
    assert list_protocols() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_protocol_loads_and_is_consistent(name):
    p = load_protocol(name)
    assert isinstance(p, Protocol) and p.name == name
    assert "val" in p.splits and "train" in p.splits
    if p.classes_file is not None:
        assert len(p.classes()) == p.num_classes
    if p.background:  # background class first
        assert p.vocabulary().names[0] == "background"
    assert p.zero_shot.area_thd is None  # the shipped (ClearCLIP) protocol has no area filter
    assert p.zero_shot.mode == "slide" and p.reclip.mode == "whole"
    assert p.ignore_index == 255


def test_published_values():
    """Spot-check values read from the official configs (see the YAML comments)."""
    voc21, c60, obj, city = (load_protocol(n) for n in ("voc21", "context60", "cocoobject", "cityscapes19"))
    assert (voc21.zero_shot.short_side, voc21.zero_shot.window, voc21.zero_shot.stride) == (448, 448, 224)
    assert (voc21.zero_shot.prob_thd, c60.zero_shot.prob_thd, obj.zero_shot.prob_thd) == (0.5, 0.15, 0.4)
    assert (city.zero_shot.window, city.zero_shot.stride) == (224, 224)
    # one training-free protocol (ClearCLIP's) for every dataset: 448 short side, 2048 cap, scale 50
    for name in SHIPPED:
        zs = load_protocol(name).zero_shot
        assert (zs.short_side, zs.max_long_side, zs.logit_scale, zs.mode) == (448, 2048, 50, "slide"), name
    pd = {n: load_protocol(n).reclip.pd_threshold for n in ("voc20", "context59", "ade150", "cityscapes19", "cocostuff27")}
    assert pd == {"voc20": 1.0, "context59": 0.85, "ade150": 0.5, "cityscapes19": 0.5, "cocostuff27": 0.95}
    short = {n: load_protocol(n).reclip.short_side for n in ("voc20", "context59", "ade150", "cityscapes19", "cocostuff27")}
    assert short == {"voc20": 336, "context59": 448, "ade150": 512, "cityscapes19": 448, "cocostuff27": 512}
    # ReCLIP (conference) PD: TEST.ReCLIP_PD 0.5 everywhere (config/configs.py), Context 0.6
    v1 = {n: load_protocol(n).reclip.pd_threshold_v1 for n in ("voc20", "context59", "ade150", "cityscapes19", "cocostuff27")}
    assert v1 == {"voc20": 0.5, "context59": 0.6, "ade150": 0.5, "cityscapes19": 0.5, "cocostuff27": 0.5}


# The official ReCLIP / ReCLIP++ prompt names (dogehhh/ReCLIP utils/prompt_engineering.py), as data.
RECLIP_NAMES = {
    "voc20": [
        "airplane",
        "bicycle",
        "bird",
        "boat",
        "bottle",
        "bus",
        "car",
        "cat",
        "chair",
        "cow",
        "dining table",
        "dog",
        "horse",
        "motorbike",
        "person",
        "potted plant",
        "sheep",
        "sofa",
        "train",
        "tv monitor"
    ],
    "context59": [
        "airplane",
        "bag",
        "bed",
        "bedclothes",
        "bench",
        "bicycle",
        "bird",
        "boat",
        "book",
        "bottle",
        "building",
        "bus",
        "cabinet",
        "car",
        "cat",
        "ceiling",
        "chair",
        "cloth",
        "computer",
        "cow",
        "cup",
        "curtain",
        "dog",
        "door",
        "fence",
        "floor",
        "flower",
        "food",
        "grass",
        "ground",
        "horse",
        "keyboard",
        "light",
        "motorbike",
        "mountain",
        "mouse",
        "person",
        "plate",
        "platform",
        "potted plant",
        "road",
        "rock",
        "sheep",
        "shelves",
        "sidewalk",
        "sign",
        "sky",
        "snow",
        "sofa",
        "table",
        "track",
        "train",
        "tree",
        "truck",
        "tv monitor",
        "wall",
        "water",
        "window",
        "wood"
    ],
    "ade150": [
        "wall",
        "building",
        "sky",
        "floor",
        "tree",
        "ceiling",
        "road",
        "bed",
        "windowpane",
        "grass",
        "cabinet",
        "sidewalk",
        "person",
        "earth",
        "door",
        "table",
        "mountain",
        "plant",
        "curtain",
        "chair",
        "car",
        "water",
        "painting",
        "sofa",
        "shelf",
        "house",
        "sea",
        "mirror",
        "rug",
        "field",
        "armchair",
        "seat",
        "fence",
        "desk",
        "rock",
        "wardrobe",
        "lamp",
        "bathtub",
        "railing",
        "cushion",
        "base",
        "box",
        "column",
        "signboard",
        "chest of drawers",
        "counter",
        "sand",
        "sink",
        "skyscraper",
        "fireplace",
        "refrigerator",
        "grandstand",
        "path",
        "stairs",
        "runway",
        "case",
        "pool table",
        "pillow",
        "screen door",
        "stairway",
        "river",
        "bridge",
        "bookcase",
        "blind",
        "coffee table",
        "toilet",
        "flower",
        "book",
        "hill",
        "bench",
        "countertop",
        "stove",
        "palm",
        "kitchen island",
        "computer",
        "swivel chair",
        "boat",
        "bar",
        "arcade machine",
        "hovel",
        "bus",
        "towel",
        "light",
        "truck",
        "tower",
        "chandelier",
        "awning",
        "streetlight",
        "booth",
        "television receiver",
        "airplane",
        "dirt track",
        "apparel",
        "pole",
        "land",
        "bannister",
        "escalator",
        "ottoman",
        "bottle",
        "buffet",
        "poster",
        "stage",
        "van",
        "ship",
        "fountain",
        "conveyer belt",
        "canopy",
        "washer",
        "plaything",
        "swimming pool",
        "stool",
        "barrel",
        "basket",
        "waterfall",
        "tent",
        "bag",
        "minibike",
        "cradle",
        "oven",
        "ball",
        "food",
        "step",
        "tank",
        "trade name",
        "microwave",
        "pot",
        "animal",
        "bicycle",
        "lake",
        "dishwasher",
        "screen",
        "blanket",
        "sculpture",
        "hood",
        "sconce",
        "vase",
        "traffic light",
        "tray",
        "ashcan",
        "fan",
        "pier",
        "crt screen",
        "plate",
        "monitor",
        "bulletin board",
        "shower",
        "radiator",
        "glass",
        "clock",
        "flag"
    ],
    "cityscapes19": [
        "road",
        "sidewalk",
        "building",
        "wall",
        "fence",
        "pole",
        "traffic light",
        "traffic sign",
        "vegetation",
        "terrain",
        "sky",
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "train",
        "motorcycle",
        "bicycle"
    ]
}


@pytest.mark.parametrize("name", sorted(RECLIP_NAMES))
def test_the_reclip_family_reads_the_official_reclip_class_names(name):
    protocol = load_protocol(name)
    assert protocol.reclip.classes_file == f"reclip_{name}.txt"
    names = read_class_file(protocol.classes_path(protocol.reclip.classes_file)).names
    assert list(names) == RECLIP_NAMES[name]
    assert names != protocol.vocabulary().names  # the training-free (ClearCLIP) list differs
    # a user's class list replaces the section's own too
    mine = protocol.with_overrides(classes_file="cocostuff27.txt", num_classes=None)
    assert mine.reclip.classes_file is None and mine.section_classes_path("reclip") is None


def test_cocostuff27_needs_no_reclip_file_its_list_is_the_official_one():
    official = ["electronic", "appliance", "food things", "furniture things", "indoor", "kitchen", "accessory",
                "animal", "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food stuff",
                "furniture stuff", "raw material", "textile", "wall", "window", "building", "ground", "plant",
                "sky", "solid", "structural", "water"]  # dogehhh/ReCLIP coco_stuff_classes_27
    protocol = load_protocol("cocostuff27")
    assert protocol.reclip.classes_file is None and list(protocol.vocabulary().names) == official


def test_a_reclip_class_file_of_the_wrong_length_is_refused(tmp_path):
    (tmp_path / "short.txt").write_text("cat\ndog\n")
    with pytest.raises(ProtocolError, match="reclip.classes_file .*short.txt has 2 classes.* have 20"):
        load_protocol(_user_yaml(tmp_path, reclip={"short_side": 336, "pd_threshold": 1.0,
                                                   "classes_file": "short.txt"}))


# NACLIP's own protocol, written independently of the YAML files (sinahmr/NACLIP configs/cfg_*.py
# and naclip.py defaults): (short_side, mode, window, stride, prob_thd, classes_file). Every
# dataset: max_long_side 2048, logit scale 40, no area filter, PAMR on with 10 iterations and
# dilations (8, 16). cocostuff27 / folder: not published, NACLIP's COCO-Stuff-164k / default values.
NACLIP_SLIDE = (224, 112)
EXPECTED_NACLIP = {
    "voc21": (336, "whole", None, None, 0.1, "voc21_sclip.txt"),
    "voc20": (336, "whole", None, None, None, "voc20_sclip.txt"),
    "context60": (336, "slide", *NACLIP_SLIDE, 0.1, None),
    "context59": (336, "slide", *NACLIP_SLIDE, None, None),
    "cocoobject": (336, "slide", *NACLIP_SLIDE, 0.1, "cocoobject_sclip.txt"),
    "ade150": (336, "slide", *NACLIP_SLIDE, None, None),
    "cityscapes19": (560, "slide", *NACLIP_SLIDE, None, None),
    "cocostuff171": (336, "slide", *NACLIP_SLIDE, None, None),
    "cocostuff27": (336, "slide", *NACLIP_SLIDE, None, None),
    "folder": (336, "slide", *NACLIP_SLIDE, None, None),
}


@pytest.mark.parametrize("name", SHIPPED)
def test_naclip_sections_hold_naclips_published_values(name):
    p = load_protocol(name)
    nc = p.naclip
    assert (nc.short_side, nc.mode, nc.window, nc.stride, nc.prob_thd, nc.classes_file) == EXPECTED_NACLIP[name]
    assert (nc.max_long_side, nc.logit_scale, nc.area_thd) == (2048, 40, None)
    assert (nc.pamr, nc.pamr_iter, nc.pamr_dilations) == (True, 10, (8, 16))
    assert "naclip" in yaml.safe_load(open(p.source))  # written out in every shipped YAML
    # the default training-free section is still ClearCLIP's, without PAMR
    assert (p.zero_shot.short_side, p.zero_shot.pamr, p.zero_shot.classes_file) == (448, False, None)
    if nc.classes_file is not None:  # NACLIP's class files are SCLIP's (26 background words on VOC21)
        vocabulary = p.with_overrides(classes_file=nc.classes_file).vocabulary()
        assert len(vocabulary.to_list()) == p.num_classes
        if p.background:
            assert vocabulary.names[0] == "background" and len(vocabulary.to_list()[0]) == 26


def test_naclip_section_is_optional_and_checked(tmp_path):
    assert load_protocol(_user_yaml(tmp_path)).naclip is not None  # voc20's, copied
    data = yaml.safe_load(open(_user_yaml(tmp_path)))
    data.pop("naclip")
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_protocol(path).naclip is None
    assert load_protocol(path).with_overrides(ignore_index=0).naclip is None  # stays out through copies
    path.write_text(yaml.safe_dump({**data, "naclip": None}))
    assert load_protocol(path).naclip is None
    naclip = load_protocol("voc20").naclip
    base = dataclasses.asdict(naclip)
    for change, match in (
        ({"pamr_dilations": [8, 0]}, r"naclip\.pamr_dilations must be a non-empty list of positive integers"),
        ({"pamr_dilations": []}, r"naclip\.pamr_dilations must be a non-empty list"),
        ({"pamr_dilations": [8.5]}, r"pamr_dilations = \[8\.5\] has type list"),
        ({"pamr_dilations": 8}, r"pamr_dilations = 8 has type int"),
        ({"pamr_iter": 0}, r"naclip\.pamr_iter must be a positive integer"),
        ({"pamr": "yes"}, r"pamr = 'yes' has type str"),
        ({"logit_scale": 0}, r"naclip\.logit_scale must be > 0"),  # named as the section read
        ({"prob_thd": 0.1}, r"naclip\.prob_thd .*need a background class"),  # voc20 has none
        ({"classes_file": "voc21.txt"}, r"naclip\.classes_file .*voc21\.txt has 21 classes .* have 20"),
        ({"classes_file": "nowhere.txt"}, r"class file 'nowhere\.txt' not found"),
        ({"pamr_steps": 10}, r"naclip: unknown key\(s\) \['pamr_steps'\]"),
    ):
        path.write_text(yaml.safe_dump({**data, "naclip": {**base, "pamr_dilations": [8, 16], **change}}))
        with pytest.raises(ProtocolError, match=match):
            load_protocol(path)


# Training presets and hypothesis settings of the ReCLIP family, written independently of the
# YAML files (METHODS.md section 2; dogehhh/ReCLIP config/*_train_ori_cfg.yaml; paper IV-A):
# (base_short_side, crop, batch_size, lr, epochs, poly_epochs) and (r, t, threshold, top_k).
VOC_PRESET = (336, 336, 1, 0.01, 50, 200)
CONTEXT_PRESET = (448, 480, 1, 0.01, 50, 400)
COCO_PRESET = (512, 512, 1, 0.01, 100, 800)
EXPECTED_TRAINING = {
    "voc20": (VOC_PRESET, (1 / 6, 0.07, 23.0, 2)),
    "voc21": (VOC_PRESET, (1 / 6, 0.07, 23.0, 2)),
    "context59": (CONTEXT_PRESET, (1 / 6, 0.0, 20.0, 6)),
    "context60": (CONTEXT_PRESET, (1 / 6, 0.0, 20.0, 6)),
    "ade150": ((512, 512, 1, 0.01, 100, 600), (1 / 6, 0.0, 21.0, 5)),
    "cityscapes19": ((448, 512, 16, 0.16, 50, 300), (1 / 6, 0.07, 21.5, 2)),
    "cocostuff27": (COCO_PRESET, (1 / 6, 0.0, 20.0, 8)),
    "cocostuff171": (COCO_PRESET, (1 / 6, 0.0, 23.0, 2)),
    "cocoobject": (COCO_PRESET, (1 / 6, 0.0, 23.0, 2)),
    "folder": (VOC_PRESET, (1 / 6, 0.0, 23.0, 2)),
}


@pytest.mark.parametrize("name", SHIPPED)
def test_training_sections_hold_the_official_values(name):
    p = load_protocol(name)
    preset, hyp = EXPECTED_TRAINING[name]
    assert dataclasses.astuple(p.rectify) == preset
    assert dataclasses.astuple(p.hypotheses) == hyp
    data = yaml.safe_load(open(p.source))
    assert "rectify" in data and "hypotheses" in data  # written out, not left to the defaults


def _user_yaml(tmp_path, name="mine", **sections) -> Path:
    """voc20's YAML as a user's own file, without the training sections unless given."""
    data = yaml.safe_load(open(load_protocol("voc20").source))
    data.pop("rectify")
    data.pop("hypotheses")
    data.update(name=name, **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_training_sections_are_optional_with_documented_defaults(tmp_path):
    p = load_protocol(_user_yaml(tmp_path))
    assert dataclasses.astuple(p.rectify) == VOC_PRESET  # VOC's preset, as before the sections existed
    assert dataclasses.astuple(p.hypotheses) == (1 / 6, 0.0, 23.0, 2)  # t = 0: paper's "the rest datasets"
    assert p.rectify == RectifySettings() and p.hypotheses == HypothesisSettings()
    q = load_protocol(_user_yaml(tmp_path, "given", rectify={"crop": 224, "epochs": 5, "poly_epochs": 20},
                                 hypotheses={"t": 0.2}))
    assert dataclasses.astuple(q.rectify) == (336, 224, 1, 0.01, 5, 20)  # missing keys take the defaults
    assert dataclasses.astuple(q.hypotheses) == (1 / 6, 0.2, 23.0, 2)


@pytest.mark.parametrize("section, key, value, match", [
    ("rectify", "crops", 3, r"rectify: unknown key\(s\) \['crops'\]; allowed keys: .*'crop'"),
    ("rectify", "crop", 0, r"rectify\.crop must be a positive integer, got 0"),
    ("rectify", "batch_size", -2, r"rectify\.batch_size must be a positive integer"),
    ("rectify", "base_short_side", 336.5, r"base_short_side = 336\.5 has type float"),
    ("rectify", "lr", 0, r"rectify\.lr must be a finite number > 0, got 0"),
    ("rectify", "lr", "0.01", r"lr = '0\.01' has type str"),
    ("rectify", "poly_epochs", 0, r"rectify\.poly_epochs must be a positive integer"),
    ("rectify", "epochs", 300, r"rectify\.poly_epochs 200 < epochs 300"),
    ("hypotheses", "tt", 0.1, r"hypotheses: unknown key\(s\) \['tt'\]; allowed keys: .*'t'"),
    ("hypotheses", "t", 1.0, r"hypotheses\.t .*must be in \[0, 1\), got 1\.0"),
    ("hypotheses", "t", -0.1, r"hypotheses\.t .*must be in \[0, 1\)"),
    ("hypotheses", "r", 0, r"hypotheses\.r .*must be in \(0, 1\], got 0"),
    ("hypotheses", "r", 1.5, r"hypotheses\.r .*must be in \(0, 1\]"),
    ("hypotheses", "top_k", 0, r"hypotheses\.top_k must be a positive integer, got 0"),
    ("hypotheses", "top_k", 2.0, r"top_k = 2\.0 has type float"),
    ("hypotheses", "threshold", float("nan"), r"hypotheses\.threshold must be a finite number"),
])
def test_training_sections_reject_unknown_keys_and_bad_values(tmp_path, section, key, value, match):
    path = _user_yaml(tmp_path, **{section: {key: value}})
    with pytest.raises(ProtocolError, match=match) as err:
        load_protocol(path)
    assert str(path) in str(err.value)  # names the YAML


def test_training_sections_must_be_mappings(tmp_path):
    with pytest.raises(ProtocolError, match=r"hypotheses: expected a mapping, got float"):
        load_protocol(_user_yaml(tmp_path, hypotheses=0.07))


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "cocostuff27"])
def test_dataset_on_synthetic_layout(name, written):
    ds = _dataset(name, written)
    assert len(ds) >= 3 and ds.has_labels
    convert = EXPECTED_CONVERSION[name]
    for i in range(len(ds)):
        item = ds[i]
        assert item["error"] is None, item["error"]
        assert set(item) == {"image_id", "path", "image", "label", "instances", "error"}
        img, lab = item["image"], item["label"]
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert lab.dtype == np.int64 and lab.shape == img.shape[:2]
        raw = np.array(Image.open(ds.label_paths[i]))  # palette PNGs give indices with plain PIL too
        np.testing.assert_array_equal(lab, convert(raw))
        valid = lab[lab != 255]
        assert valid.min() >= 0 and valid.max() < ds.num_classes
    # ignore pixels (raw 255 or reduced 0) survive every conversion; Context-60 labels have
    # none and COCO-Object turns unlabeled pixels into background
    assert (lab == 255).any() == (name not in ("context60", "cocoobject"))


def test_voc_ids_follow_split_file_and_train_split(written):
    ds = _dataset("voc21", written, "train")
    assert ds.image_ids == ["2007_000000", "2007_000001"]
    assert ds.class_names[0] == "background" and ds.classes[0] == ["background"] and ds.classes[15] == ["person"]


def test_default_class_files_are_clearclips():
    """The shipped training-free protocol uses ClearCLIP's class files (one name per class)."""
    voc21, voc20, obj = (load_protocol(n).classes() for n in ("voc21", "voc20", "cocoobject"))
    assert voc21[0] == ["background"] and voc21[15] == ["person"] and voc21[20] == ["tvmonitor"]
    assert voc21[1:] == voc20 and all(len(c) == 1 for c in voc21)
    assert obj[:3] == [["background"], ["person"], ["bicycle"]] and all(len(c) == 1 for c in obj)


@pytest.mark.parametrize("protocol, sclip_file", [("voc21", "voc21_sclip.txt"), ("cocoobject", "cocoobject_sclip.txt")])
def test_sclip_class_files_keep_background_label(protocol, sclip_file, written):
    """SCLIP's files: line 1 = 26 background words shown as 'background'; person synonyms."""
    p = load_protocol(protocol).with_overrides(classes_file=sclip_file)  # same class count: num_classes kept
    vocab = p.vocabulary()
    assert len(vocab) == p.num_classes and vocab.names[0] == "background"
    assert vocab.classes[0][:3] == ("sky", "wall", "tree") and len(vocab.classes[0]) == 26
    person = vocab.classes[vocab.names.index("person")]
    assert person[0] == "person" and "person in shirt" in person
    default = load_protocol(protocol).vocabulary().names
    differ = [i for i, (a, b) in enumerate(zip(vocab.names, default)) if a != b]
    assert differ == ([20] if protocol == "voc21" else [])  # only SCLIP's 'television monitor'
    layout = "cocostuff" if p.layout == "cocoobject" else p.layout
    ds = SegmentationDataset(protocol, written[layout], classes_file=sclip_file)  # resolved in the package
    assert ds.class_names[0] == "background" and ds.num_classes == p.num_classes


def test_voc20_sclip_class_file():
    vocab = load_protocol("voc20").with_overrides(classes_file="voc20_sclip.txt").vocabulary()
    assert len(vocab) == 20 and vocab.classes[14][0] == "person" and len(vocab.classes[14]) == 7
    assert vocab.classes[19][0] == "television monitor"


def test_cityscapes_ids_keep_city_folders(written):
    ds = _dataset("cityscapes19", written)
    assert ds.image_ids[0] == "frankfurt/frankfurt_000000_000019"
    assert str(ds.label_paths[0]).endswith("gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelTrainIds.png")


def test_cocostuff27_maps_known_raw_ids(written):
    ds = _dataset("cocostuff27", written)
    # PiCIE/STEGO super-categories: person->person(9), car->vehicle(11), bird->animal(7),
    # banner->textile(17), sky-other->sky(23), wood->solid(24), unlabeled->ignore.
    known = {0: 9, 2: 11, 15: 7, 91: 17, 156: 23, 181: 24, 255: 255}
    item = ds[0]
    raw = np.array(Image.open(ds.label_paths[0]))
    for r, t in known.items():
        assert (raw == r).any(), f"synthetic label lacks raw id {r}"
        assert (item["label"][raw == r] == t).all()
    assert item["label"].max() <= 255 and item["label"][item["label"] != 255].max() <= 26


def test_cocostuff_converted_tables(written):
    root = written["cocostuff"] / "annotations" / "val2017"
    stem = "000000000139"
    raw = np.array(Image.open(root / f"{stem}.png"))
    c171 = np.array(Image.open(root / f"{stem}_labelTrainIds.png"))
    obj = np.array(Image.open(root / f"{stem}_instanceTrainIds.png"))
    c27 = np.array(Image.open(root / f"{stem}_27labelTrainIds.png"))
    # mmseg 171: skips the 11 unused thing ids; COCO-Object: things 1..80, everything else 0.
    for r, t171, tobj in [(0, 0, 1), (2, 2, 3), (12, 11, 12), (89, 79, 80), (91, 80, 0), (181, 170, 0), (255, 255, 0)]:
        assert (c171[raw == r] == t171).all() and (obj[raw == r] == tobj).all()
    assert set(np.unique(c171)) == set(range(171)) | {255}
    assert set(np.unique(obj)) == set(range(81))
    assert (c27[raw == 156] == 23).all() and (c27[raw == 255] == 255).all()


def test_cocostuff_converter_cli_and_errors(tmp_path):
    root = write_cocostuff(tmp_path / "coco", n_train=0, n_val=2, converted=())
    out = tmp_path / "out"
    assert cocostuff.main([str(root / "annotations"), str(out), "--protocol", "27", "--no-progress"]) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == ["val2017/000000000139_27labelTrainIds.png", "val2017/000000001139_27labelTrainIds.png"]
    assert cocostuff.convert_stuffthingmaps(root / "annotations", out, "27", progress=False) == 0  # resumes
    Image.fromarray(np.full((4, 4), 200, dtype=np.uint8)).save(root / "annotations" / "val2017" / "bad.png")
    with pytest.raises(ValueError, match=r"bad.png.*\[200\]"):
        cocostuff.convert_stuffthingmaps(root / "annotations", out, "171", progress=False)
    assert cocostuff.main([str(tmp_path / "nowhere"), str(out)]) == 1
    with pytest.raises(ValueError, match="protocol"):
        cocostuff.convert_stuffthingmaps(root / "annotations", out, "99")


def test_folder_protocol(written):
    root = written["folder"]
    ds = SegmentationDataset("folder", root / "images", classes_file=root / "classes.txt")
    assert ds.image_ids == ["img0", "img1", "sub/img2"] and not ds.has_labels
    assert ds.classes[1] == ["thing1", "other name"] and ds.num_classes == 3
    assert ds[2]["label"] is None and ds[2]["image"].shape[2] == 3
    with pytest.raises(ProtocolError, match="classes_file"):
        SegmentationDataset("folder", root / "images")


def test_folder_labels_inside_image_folder_are_not_images(tmp_path):
    root = write_folder(tmp_path / "f", n=2)
    shutil.move(str(root / "labels"), str(root / "images" / "masks"))
    p = load_protocol("folder").with_overrides(label_dir="masks")
    ds = SegmentationDataset(p, root / "images", classes_file=root / "classes.txt")
    assert ds.image_ids == ["img0", "sub/img1"]
    assert ds[1]["label"].shape == ds[1]["image"].shape[:2]


def test_missing_folders_all_listed(tmp_path):
    root = write_voc(tmp_path / "VOC2012")
    shutil.rmtree(root / "SegmentationClass")
    (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DatasetError) as err:
        SegmentationDataset("voc21", root)
    msg = str(err.value)
    assert str(root / "SegmentationClass") in msg and str(root / "ImageSets/Segmentation/val.txt") in msg
    assert "JPEGImages" in msg  # the expected-layout hint


def test_missing_files_listed(tmp_path):
    root = write_voc(tmp_path / "VOC2012")
    (root / "SegmentationClass" / "2008_000001.png").unlink()
    (root / "JPEGImages" / "2008_000002.jpg").unlink()
    with pytest.raises(DatasetError, match="2 listed file") as err:
        SegmentationDataset("voc21", root)
    assert "2008_000001.png" in str(err.value) and "2008_000002.jpg" in str(err.value)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_an_empty_split_file_is_named(tmp_path, content):
    root = write_voc(tmp_path / "VOC2012")
    split_file = root / "ImageSets" / "Segmentation" / "val.txt"
    split_file.write_text(content)
    with pytest.raises(DatasetError, match=rf"the split file {split_file} lists no image"):
        SegmentationDataset("voc21", root)


def test_split_file_encoding_bom_and_repeats(tmp_path):
    root = write_voc(tmp_path / "VOC2012", n_val=2)
    split_file = root / "ImageSets" / "Segmentation" / "val.txt"
    ids = split_file.read_text().split()
    split_file.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(ids).encode() + b"\r\n")  # BOM, CRLF: fine
    assert SegmentationDataset("voc21", root).image_ids == ids
    split_file.write_bytes(ids[0].encode() + b"\n\xe9t\xe9\n")  # Latin-1
    with pytest.raises(ValueError, match=rf"split file '{split_file}' is not UTF-8: byte 12 \(line 2\)"):
        SegmentationDataset("voc21", root)
    split_file.write_text(f"{ids[0]}\n{ids[1]}\n\n{ids[0]}\n")
    with pytest.raises(DatasetError, match=rf"more than once.*\n  {ids[0]} \(lines 1, 4\)"):
        SegmentationDataset("voc21", root)


def test_a_file_named_like_a_protocol_does_not_shadow_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("voc21").write_text("not: a protocol\n")
    assert load_protocol("voc21").name == "voc21"
    with pytest.raises(ProtocolError, match="unknown dataset protocol 'mine'.*ending in .yaml"):
        Path("mine").write_text(Path(load_protocol("voc21").source).read_text())
        load_protocol("mine")
    assert load_protocol(Path("mine")).name == "voc21"  # a path object is a file


def test_size_mismatch_names_both_files(tmp_path):
    root = write_voc(tmp_path / "VOC2012")
    lab = root / "SegmentationClass" / "2008_000001.png"
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(lab)
    with pytest.raises(DatasetError) as err:
        SegmentationDataset("voc21", root)
    assert str(lab) in str(err.value) and str(root / "JPEGImages" / "2008_000001.jpg") in str(err.value)
    ds = SegmentationDataset("voc21", root, check_sizes=False)  # then the item reports it instead
    assert "differs" in ds[1]["error"] and ds[1]["image"] is None and ds[0]["error"] is None


def test_corrupt_image_is_reported_not_raised(tmp_path):
    root = write_voc(tmp_path / "VOC2012", n_val=4)
    bad = root / "JPEGImages" / "2008_000002.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    ds = SegmentationDataset("voc21", root)
    batches = list(DataLoader(ds, batch_size=2, collate_fn=collate_items))
    items = [dict(zip(b, vals)) for b in batches for vals in zip(*b.values())]
    errors = [it for it in items if it["error"] is not None]
    assert len(items) == 4 and len(errors) == 1
    assert str(bad) in errors[0]["error"] and errors[0]["image"] is None and errors[0]["label"] is None
    ok = [it for it in items if it["error"] is None]
    assert [it["image"].shape for it in ok] != [ok[0]["image"].shape] * 3  # variable sizes kept as lists


def test_wrong_label_values_raise_with_hint(written):
    p = load_protocol("cocostuff171").with_overrides(label_suffix=".png")  # raw ids, not train ids
    ds = SegmentationDataset(p, written["cocostuff"])
    with pytest.raises(DatasetError, match="outside 0..170"):
        ds[0]


def test_overrides_return_validated_copies():
    p = load_protocol("voc21")
    sclip = {"short_side": 336, "window": 224, "stride": 112, "logit_scale": 65, "prob_thd": 0.1, "area_thd": 0.1}
    q = p.with_overrides(zero_shot=sclip)
    assert (q.zero_shot.short_side, q.zero_shot.window, q.zero_shot.stride) == (336, 224, 112)
    assert (q.zero_shot.logit_scale, q.zero_shot.prob_thd, q.zero_shot.area_thd) == (65, 0.1, 0.1)
    assert q.reclip == p.reclip  # one family's settings only
    assert p.zero_shot.short_side == 448 and p.zero_shot.prob_thd == 0.5  # original untouched
    r = p.with_overrides(zero_shot={"logit_scale": 40}, reclip={"pd_threshold": None},
                         splits={"val": {"label_dir": "Other"}})
    assert r.zero_shot.logit_scale == 40 and r.zero_shot.window == 448 and r.reclip.pd_threshold is None
    assert r.splits["val"].label_dir == "Other" and r.splits["train"].label_dir == "SegmentationClass"
    assert p.with_overrides(zero_shot={"prob_thd": None}).zero_shot.prob_thd is None  # None is a value
    with pytest.raises(ProtocolError, match="allowed"):
        p.with_overrides(shortside=3)
    with pytest.raises(ProtocolError, match=r"windw.*allowed keys.*window"):
        p.with_overrides(zero_shot={"windw": 3})
    with pytest.raises(ProtocolError, match="stride"):
        p.with_overrides(zero_shot={"stride": 500})
    with pytest.raises(ProtocolError, match="background"):
        load_protocol("voc20").with_overrides(zero_shot={"prob_thd": 0.3})
    with pytest.raises(ProtocolError, match="dict"):
        p.with_overrides(zero_shot=336)


def test_overrides_of_the_training_sections():
    p = load_protocol("voc20")
    q = p.with_overrides(hypotheses={"t": 0.1}, rectify={"batch_size": 4, "lr": 0.04})
    assert dataclasses.astuple(q.hypotheses) == (1 / 6, 0.1, 23.0, 2)
    assert dataclasses.astuple(q.rectify) == (336, 336, 4, 0.04, 50, 200)
    assert p.hypotheses.t == 0.07 and p.rectify.batch_size == 1  # original untouched
    assert q.zero_shot == p.zero_shot and q.reclip == p.reclip
    with pytest.raises(ProtocolError, match=r"hypotheses\.t .*\[0, 1\), got 1\.5"):
        p.with_overrides(hypotheses={"t": 1.5})
    with pytest.raises(ProtocolError, match=r"rectify: unknown key\(s\) \['epoch'\]"):
        p.with_overrides(rectify={"epoch": 3})
    with pytest.raises(ProtocolError, match=r"unknown key\(s\) \['t'\].*hypotheses=\{\.\.\.\}"):
        p.with_overrides(t=0.1)
    with pytest.raises(ProtocolError, match="dict"):
        p.with_overrides(hypotheses=0.1)


@pytest.mark.parametrize("key", ["short_side", "max_long_side", "mode", "window", "stride", "logit_scale",
                                 "prob_thd", "area_thd", "pd_threshold", "pd_threshold_v1"])
def test_flat_inference_keys_are_not_protocol_overrides(key):
    """Per-run test settings have one path, methods.inference_config; with_overrides points there."""
    with pytest.raises(ProtocolError, match="inference_config") as err:
        load_protocol("voc21").with_overrides(**{key: 1})
    assert "zero_shot={...}" in str(err.value)


def test_area_thd_schema(tmp_path):
    data = yaml.safe_load(open(load_protocol("voc21").source))
    data["zero_shot"].pop("area_thd", None)
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(data))
    assert load_protocol(tmp_path / "a.yaml").zero_shot.area_thd is None  # optional, default off
    p = load_protocol("voc21")
    assert p.with_overrides(zero_shot={"area_thd": 0.1}).zero_shot.area_thd == 0.1
    for bad in (1.5, -0.1):
        with pytest.raises(ProtocolError, match=r"area_thd must be in \[0, 1\]"):
            p.with_overrides(zero_shot={"area_thd": bad})
    with pytest.raises(ProtocolError, match="area_thd"):
        p.with_overrides(zero_shot={"area_thd": "0.1"})
    with pytest.raises(ProtocolError, match=r"zero_shot\.area_thd.*background"):
        load_protocol("voc20").with_overrides(zero_shot={"area_thd": 0.1})
    data["zero_shot"]["area_thd"], data["background"] = 0.1, False
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ProtocolError, match="background"):
        load_protocol(tmp_path / "b.yaml")


def test_classes_file_override_checked_against_num_classes(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("cat\ndog, puppy\n")
    with pytest.raises(ProtocolError, match="21"):
        load_protocol("voc21").with_overrides(classes_file=str(f))
    p = load_protocol("voc21").with_overrides(classes_file=str(f), num_classes=2)
    assert p.classes() == [["cat"], ["dog", "puppy"]]


def test_unknown_protocol_lists_names():
    with pytest.raises(ProtocolError) as err:
        load_protocol("pascal")
    for name in SHIPPED:
        assert name in str(err.value)


def test_custom_yaml_and_strict_keys(tmp_path):
    data = yaml.safe_load(open(load_protocol("voc20").source))
    (tmp_path / "mine.txt").write_text("\n".join(f"c{i}" for i in range(20)) + "\n")
    data.update(name="mine", classes_file="mine.txt")  # resolved next to the YAML
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(data))
    p = load_protocol(tmp_path / "mine.yaml")
    assert p.name == "mine" and p.classes()[3] == ["c3"] and p.reduce_zero_label
    data["zero_shot"]["windw"] = 3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ProtocolError, match=r"windw.*allowed keys.*window"):
        load_protocol(tmp_path / "bad.yaml")
    del data["zero_shot"]["windw"]
    data["layout"] = "pascal"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ProtocolError, match="layout"):
        load_protocol(tmp_path / "bad.yaml")
    data["layout"], data["background"] = "voc", "yes"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ProtocolError, match="background"):
        load_protocol(tmp_path / "bad.yaml")


def test_label_map_dict_then_reduce_zero_label():
    p = load_protocol("voc20").with_overrides(label_map={7: 1, 3: 2}, reduce_zero_label=True)
    raw = np.array([[7, 3, 0, 255, 9]], dtype=np.uint8)
    # 7 -> 1 -> 0; 3 -> 2 -> 1; unmapped 0 / 9 and 255 -> ignore
    np.testing.assert_array_equal(p.convert_label(raw), [[0, 1, 255, 255, 255]])


def test_unknown_split(written):
    with pytest.raises(DatasetError, match="splits"):
        SegmentationDataset("voc21", written["voc"], split="test")


def test_suffix_protocols_list_linked_folders_and_each_real_file_once(tmp_path):
    """Cityscapes keeps a city elsewhere behind a folder link; a file linked twice is one image."""
    import shutil

    from layouts import write_cityscapes

    root = write_cityscapes(tmp_path / "cityscapes", n_val=2)
    elsewhere = tmp_path / "mnt" / "lindau"
    shutil.move(root / "leftImg8bit" / "val" / "lindau", elsewhere)
    (root / "leftImg8bit" / "val" / "lindau").symlink_to(elsewhere, target_is_directory=True)
    frankfurt = root / "leftImg8bit" / "val" / "frankfurt"
    first = sorted(frankfurt.iterdir())[0]
    (frankfurt / "copy_000000_000000_leftImg8bit.png").symlink_to(first)  # the same real file again
    with pytest.warns(UserWarning, match="same file"):
        data = SegmentationDataset("cityscapes19", root, "val", check_sizes=False)
    assert len(data) == 4 and sum(i.startswith("lindau/") for i in data.image_ids) == 2


def test_distillation_presets_follow_the_official_configs():
    # dogehhh/ReCLIP config/*_distill_ori_cfg.yaml: SCALE, CROP_SIZE, BATCH_SIZE, LR, MAX_EPOCH
    got = {n: dataclasses.astuple(load_protocol(n).distill) for n in ("voc20", "context59", "ade150", "cityscapes19",
                                                                         "cocostuff27")}
    # (short side, long-side cap, crop, batch, lr, epochs); SCALE [520, 520] caps both sides at 520
    assert got == {"voc20": (512, 2048, 512, 16, 0.01, 100), "context59": (520, 520, 480, 16, 0.01, 150),
                   "ade150": (512, 2048, 512, 16, 0.01, 150), "cityscapes19": (512, 1024, 512, 16, 0.01, 100),
                   "cocostuff27": (512, 2048, 512, 16, 0.01, 50)}
    assert dataclasses.astuple(load_protocol("folder").distill) == (512, 2048, 512, 16, 0.01, 100)  # VOC's
