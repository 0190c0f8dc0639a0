"""Dataset protocols (data, in YAML): the schema, its strict validation and the registry.

A protocol is one YAML file in ``reclip/configs/datasets/`` (or any path): the folder
layout, the class file, the label conventions and the published test settings of each
method family. ``load_protocol`` validates it strictly (unknown keys are errors);
``reclip.data.datasets.SegmentationDataset`` turns a protocol + a data root into items.

YAML schema (``?`` = optional, defaults in brackets)::

    name: str                       # registry name (file stem for shipped protocols)
    description?: str
    layout: voc | context | ade | cityscapes | cocostuff | cocoobject | folder
    classes_file: str | null        # class list; null only for `folder` (given at run time)
    num_classes?: int | null        # expected number of classes; checked against the file
    background: bool                # class 0 is a background class
    reduce_zero_label?: bool [false]  # 0 -> ignore, others - 1 (mmseg)
    ignore_index?: int [255]
    label_map?: str | {raw: train} | null  # raw id -> train id before reduce_zero_label;
                                    # str = a table of reclip.data.cocostuff.LABEL_MAPS;
                                    # ids missing from a dict map to ignore_index
    prepare?: str                   # how to obtain the layout; shown with missing paths
    splits:                         # at least `val`
      <split>:
        img_dir: str                # relative to the data root
        img_suffix?: str | null     # e.g. ".jpg"; null = any image extension
        label_dir?: str | null      # null = no labels
        label_suffix?: str [".png"]
        split_file?: str | null     # list of image ids; null = every image in img_dir
    zero_shot:                      # MaskCLIP / SCLIP / ClearCLIP / NACLIP test settings
      short_side: int
      max_long_side?: int [2048]
      mode: slide | whole
      window: int | null            # slide window (px), required for slide
      stride: int | null
      logit_scale: float
      prob_thd: float | null        # background probability threshold; needs background
      area_thd?: float | null [null]  # SCLIP area filter (fraction of the foreground area);
                                    # needs background; null = off
      pamr?: bool [false]           # PAMR refinement of the class probabilities
      pamr_iter?: int | null [null]   # PAMR iterations; null = reclip.postprocess's (10)
      pamr_dilations?: [int] | null [null]  # PAMR dilations; null = reclip.postprocess's
                                    # (1, 2, 4, 8, 12, 24)
      classes_file?: str | null [null]  # the class file these settings were published with,
                                    # same classes in the same order (checked against
                                    # num_classes); null = the protocol's classes_file
      strategy?: {field: value} | null [null]  # a method's own section only: per-dataset
                                    # settings of its dense-feature strategy (ResCLIP's
                                    # weights), applied whichever section is tested with
    naclip?:                        # NACLIP's own test settings (sinahmr/NACLIP configs/cfg_*.py,
                                    # naclip.py), same schema as zero_shot; read instead of
                                    # zero_shot with test_settings="naclip" (--test-settings naclip)
    sc_clip?, resclip?, proxyclip?: # each method's own published test settings, same schema
                                    # (--test-settings sc_clip, ...)
    reclip:                         # ReCLIP / ReCLIP++ test settings
      short_side: int
      max_long_side?: int [2048]
      mode?: slide | whole [whole]
      window?: int | null
      stride?: int | null
      pd_threshold: float | null    # prompt denoising, softmax(10 * logits) (ReCLIP++)
      pd_threshold_v1?: float | null  # ReCLIP (conference) PD, softmax(100 * logits)
      classes_file?: str | null     # the family's own class names (official prompt list);
                                    # null = the protocol's classes_file
    maft?:                          # MAFT / IP-CLIP proposal classification test settings
                                    # (absent = the defaults, one for every dataset)
      short_side?: int [480]        # official: CLIP input resized to 480 x 480 (MAFT.py);
                                    # here the short side, aspect kept
      max_long_side?: int [2048]
      mode?: whole [whole]          # proposals cover the whole image: slide is refused
    rectify?:                       # ReCLIP / ReCLIP++ rectification training preset
                                    # (dogehhh/ReCLIP config/*_train_ori_cfg.yaml); absent = VOC's
      base_short_side?: int [336]   # random scale 0.5-2.0 of this short side
      crop?: int [336]              # random crop (px)
      batch_size?: int [1]
      lr?: float [0.01]             # SGD, poly power 0.9
      epochs?: int [50]             # length of the run
      poly_epochs?: int [200]       # poly horizon (>= epochs; the official lr never reaches 0)
    distill?:                       # ReCLIP++ distillation training preset (the student)
                                    # (dogehhh/ReCLIP config/*_distill_ori_cfg.yaml); absent = VOC's
      base_short_side?: int [512]   # random scale 0.5-2.0 of this short side, unless the
      max_long_side?: int [2048]    # long side would pass this (official SCALE [long, short])
      crop?: int [512]
      batch_size?: int [16]
      lr?: float [0.01]             # SGD, momentum 0.9, weight decay 5e-4, poly 0.9 over the run
      epochs?: int [100]
    hypotheses?:                    # image-level hypotheses of the rectification stage
      r?: float [1/6]               # window / image side (paper IV-A)
      t?: float [0]                 # vote-frequency threshold in [0, 1) (paper IV-A: 0.07 for
                                    # VOC and Cityscapes, 0 for the rest)
      threshold?: float [23]        # ReCLIP's whole-image rule: logit_scale x cosine threshold
                                    # (official DATASET.THRESHOLD; default VOC's)
      top_k?: int [2]               # ReCLIP's whole-image rule: classes kept when none passes
                                    # (official DATASET.K; default VOC's)

A YAML without ``rectify`` / ``distill`` / ``hypotheses`` (e.g. a user's own dataset) gets
the defaults in brackets: VOC's training presets and t = 0, the paper's value for every
dataset but VOC and Cityscapes.

Class files: one class per line; synonyms on the same line separated by commas (the
class's score is the max over its synonyms); ``label: word, word`` gives a display label
that is not itself a prompt (SCLIP's background words: ``background: sky, wall, ...``);
``#`` starts a comment; blank lines ignored. They are parsed by
``reclip.text.read_class_file`` (one parser for the whole package).

The shipped protocols use ONE training-free protocol for every zero-shot method (MaskCLIP,
SCLIP, ClearCLIP, NACLIP, raw CLIP): ClearCLIP's official configs and class files
(mc-lan/ClearCLIP configs/cfg_*.py, cls_*.txt), so that all methods are measured the same
way. SCLIP's own settings are documented in each YAML and its differing class files ship
as ``<name>_sclip.txt``; reproduce SCLIP by overriding the inference settings and the class
file (see voc21.yaml).

NACLIP's own protocol is a second training-free section, ``naclip:`` (sinahmr/NACLIP
configs/cfg_*.py and naclip.py defaults: short side 336, Cityscapes 560; 224 / 112
windows, whole image on VOC20 / VOC21; logit scale 40; probability threshold 0.1 on VOC21,
Context60 and COCO-Object; no area filter; PAMR with 10 iterations and dilations (8, 16),
on for its main results; its class files are SCLIP's). A family reads its default section
(``Family.section``) unless another section of the same kind is chosen
(``reclip.methods.inference_config(..., test_settings="naclip")``, ``--test-settings
naclip``). Two differences from NACLIP's code remain: reclip's PAMR refines the class
probabilities after the softmax, NACLIP's the query logits before it; and reclip's PAMR
reads the original image, NACLIP's the network input resized back to the original size.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import numpy as np
import yaml

from reclip.data.cocostuff import LABEL_MAPS, label_lut
from reclip.files import read_text_file
from reclip.text import Vocabulary, read_class_file

__all__ = [
    "LAYOUTS", "ProtocolError", "SplitSpec", "ZeroShotSettings", "ReclipSettings", "RectifySettings",
    "HypothesisSettings", "MaftSettings", "Protocol", "SECTIONS", "list_protocols", "load_protocol",
]

LAYOUTS = ("voc", "context", "ade", "cityscapes", "cocostuff", "cocoobject", "folder")
MODES = ("slide", "whole")


class ProtocolError(ValueError):
    """A protocol YAML or class file is invalid, or a protocol name is unknown."""


def _package_dir(sub: str) -> Path:
    return Path(str(resources.files("reclip") / "configs" / sub))


# ---------------------------------------------------------------------------- schema

def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if origin in (list, tuple):  # list[X] / tuple[X, ...]: a YAML list of X
        return isinstance(value, (list, tuple)) and all(_type_ok(v, typing.get_args(hint)[0]) for v in value)
    return isinstance(value, hint)


def _build(cls: type, data: Any, where: str, skip: tuple[str, ...] = (), nested: tuple[str, ...] = ()) -> Any:
    """Check a YAML mapping for dataclass ``cls``: unknown/missing keys and bad types are errors.

    ``nested`` keys hold mappings built by the caller; their types are not checked here.
    """
    if not isinstance(data, dict):
        raise ProtocolError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip and f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ProtocolError(f"{where}: unknown key(s) {unknown}; allowed keys: {sorted(fields)}")
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ProtocolError(f"{where}: missing required key(s) {missing}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key in nested:
            continue
        if not _type_ok(value, hints[key]):
            raise ProtocolError(f"{where}: {key} = {value!r} has type {type(value).__name__}, expected {hints[key]}")
    return data


@dataclass(frozen=True)
class SplitSpec:
    """Where one split's images and labels live, relative to the data root."""

    img_dir: str
    img_suffix: str | None = None
    label_dir: str | None = None
    label_suffix: str = ".png"
    split_file: str | None = None
    instance_dir: str | None = None  # per-object id PNGs (VOC SegmentationObject), optional

    def __post_init__(self) -> None:
        if self.split_file is not None and self.img_suffix is None:
            raise ProtocolError(f"split with split_file {self.split_file!r} needs an img_suffix (e.g. '.jpg')")


@dataclass(frozen=True)
class ZeroShotSettings:
    """Published test settings of the training-free family (MaskCLIP/SCLIP/ClearCLIP/NACLIP).

    The schema of the ``zero_shot:`` section (ClearCLIP's protocol, every method's default)
    and of ``naclip:`` (NACLIP's own). ``pamr_iter`` / ``pamr_dilations`` None leave
    reclip.postprocess's defaults (the official PAMR: 10 iterations, dilations 1..24);
    ``classes_file`` None keeps the protocol's class file.
    """

    short_side: int
    mode: str
    window: int | None
    stride: int | None
    logit_scale: float
    prob_thd: float | None
    max_long_side: int = 2048  # mmseg Resize(scale=(2048, short_side), keep_ratio=True)
    area_thd: float | None = None  # SCLIP area filter (wangf3014/SCLIP clip_segmentor.py); None = off
    pamr: bool = False
    pamr_iter: int | None = None
    pamr_dilations: tuple[int, ...] | None = None
    classes_file: str | None = None
    # A method's own section may publish per-dataset settings of its dense-feature strategy
    # (ResCLIP's mixing weights): strategy field -> value, applied to that method whichever
    # section its test settings come from (reclip.methods.published_strategy_overrides).
    strategy: dict | None = None

    def __post_init__(self) -> None:
        _check_inference(self, "zero_shot")
        if self.strategy is not None and not (isinstance(self.strategy, dict)
                                              and all(isinstance(k, str) for k in self.strategy)):
            raise ProtocolError(f"zero_shot.strategy must be a mapping of strategy field names to values "
                                f"(e.g. {{rcs_lambda: 0.3}}) or null, got {self.strategy!r}")
        if self.logit_scale <= 0:
            raise ProtocolError(f"zero_shot.logit_scale must be > 0, got {self.logit_scale}")
        for name in ("prob_thd", "area_thd"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ProtocolError(f"zero_shot.{name} must be in [0, 1] or null, got {v}")
        if self.pamr_iter is not None and not (_type_ok(self.pamr_iter, int) and self.pamr_iter > 0):
            raise ProtocolError(f"zero_shot.pamr_iter must be a positive integer or null, got {self.pamr_iter!r}")
        if self.pamr_dilations is not None:
            dilations = self.pamr_dilations
            if (not isinstance(dilations, (list, tuple)) or not dilations
                    or not all(_type_ok(d, int) and d > 0 for d in dilations)):
                raise ProtocolError(f"zero_shot.pamr_dilations must be a non-empty list of positive integers "
                                    f"(NACLIP: [8, 16]) or null, got {dilations!r}")
            object.__setattr__(self, "pamr_dilations", tuple(dilations))  # YAML gives a list


@dataclass(frozen=True)
class ReclipSettings:
    """Published test settings of ReCLIP / ReCLIP++ (official dogehhh/ReCLIP configs)."""

    short_side: int
    pd_threshold: float | None
    mode: str = "whole"
    window: int | None = None
    stride: int | None = None
    pd_threshold_v1: float | None = None
    max_long_side: int = 2048  # ReCLIP configs: SCALE [2048, short_side]
    # The family's own class names (the official prompt list), resolved like the protocol's
    # classes_file; None = the protocol's file.
    classes_file: str | None = None

    def __post_init__(self) -> None:
        _check_inference(self, "reclip")
        for name in ("pd_threshold", "pd_threshold_v1"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ProtocolError(f"reclip.{name} must be in [0, 1] or null, got {v}")


@dataclass(frozen=True)
class MaftSettings:
    """Test settings of the MAFT family (MAFT and the frozen-CLIP baseline ``ipclip``).

    The official code (jiaosiyu1999/MAFT freeseg/MAFT.py) resizes every test image to
    480 x 480 for CLIP whatever the dataset, so one default serves every protocol; here
    the short side goes to 480 with the aspect kept (any image size works). Whole image
    only: a proposal covers the whole image, so a sliding window would cut it.
    """

    short_side: int = 480
    max_long_side: int = 2048
    mode: str = "whole"

    def __post_init__(self) -> None:
        if self.mode != "whole":
            raise ProtocolError(f"maft.mode must be 'whole' (mask proposals cover the whole image), got {self.mode!r}")
        for name in ("short_side", "max_long_side"):
            v = getattr(self, name)
            if not (_type_ok(v, int) and v > 0):
                raise ProtocolError(f"maft.{name} must be a positive integer, got {v!r}")


def _check_inference(s: ZeroShotSettings | ReclipSettings, family: str) -> None:
    if s.mode not in MODES:
        raise ProtocolError(f"{family}.mode must be one of {list(MODES)}, got {s.mode!r}")
    for name in ("short_side", "max_long_side", "window", "stride"):
        v = getattr(s, name)
        if v is not None and v <= 0:
            raise ProtocolError(f"{family}.{name} must be a positive integer, got {v}")
    if s.mode == "slide":
        if s.window is None or s.stride is None:
            raise ProtocolError(f"{family}: mode 'slide' needs window and stride (got {s.window}, {s.stride})")
        if s.stride > s.window:
            raise ProtocolError(f"{family}: stride {s.stride} > window {s.window} would skip pixels")


@dataclass(frozen=True)
class RectifySettings:
    """Training preset of the ReCLIP / ReCLIP++ rectification stage (METHODS.md section 2).

    Official values: dogehhh/ReCLIP config/*_train_ori_cfg.yaml. The schedule is counted
    in epochs with a poly horizon longer than the run (the lr never reaches 0):
    ``epochs`` of training on a ``poly_epochs`` horizon. The defaults are VOC's (the
    smallest scale), what a dataset without a ``rectify:`` section gets.
    """

    base_short_side: int = 336  # random scale 0.5-2.0 of this short side
    crop: int = 336
    batch_size: int = 1
    lr: float = 0.01
    epochs: int = 50
    poly_epochs: int = 200

    def __post_init__(self) -> None:
        for name in ("base_short_side", "crop", "batch_size", "epochs", "poly_epochs"):
            v = getattr(self, name)
            if v < 1:
                raise ProtocolError(f"rectify.{name} must be a positive integer, got {v}")
        if not 0.0 < self.lr < math.inf:
            raise ProtocolError(f"rectify.lr must be a finite number > 0, got {self.lr} (official: 0.01 at batch 1)")
        if self.poly_epochs < self.epochs:
            raise ProtocolError(
                f"rectify.poly_epochs {self.poly_epochs} < epochs {self.epochs}: the lr would be 0 for the last "
                f"{self.epochs - self.poly_epochs} epochs; set poly_epochs >= epochs (official: 4 to 8 x epochs)"
            )


@dataclass(frozen=True)
class DistillSettings:
    """Training preset of ReCLIP++'s distillation stage (the student; paper III-E).

    Official values: dogehhh/ReCLIP config/*_distill_ori_cfg.yaml (SCALE, CROP_SIZE,
    TRAIN.BATCH_SIZE, MAX_EPOCH, LR). The defaults are VOC's, what a dataset without a
    ``distill:`` section gets.
    """

    base_short_side: int = 512  # random scale 0.5-2.0 of this short side ...
    max_long_side: int = 2048  # ... unless the long side would pass this (mmseg's SCALE [long, short])
    crop: int = 512
    batch_size: int = 16
    lr: float = 0.01
    epochs: int = 100

    def __post_init__(self) -> None:
        for name in ("base_short_side", "max_long_side", "crop", "batch_size", "epochs"):
            v = getattr(self, name)
            if not (_type_ok(v, int) and v >= 1):
                raise ProtocolError(f"distill.{name} must be a positive integer, got {v!r}")
        if not 0.0 < self.lr < math.inf:
            raise ProtocolError(f"distill.lr must be a finite number > 0, got {self.lr}")


@dataclass(frozen=True)
class HypothesisSettings:
    """Image-level hypothesis settings of the rectification stage (``reclip.hypotheses``).

    ``r`` and ``t`` are the paper's eq. 6 (section IV-A: r = 1/6; t = 0.07 for VOC and
    Cityscapes, 0 for the rest); ``threshold`` and ``top_k`` are ReCLIP's whole-image
    rule (official DATASET.THRESHOLD / DATASET.K, threshold on logit_scale x cosine). The
    defaults are what a dataset without a ``hypotheses:`` section gets: t = 0 and VOC's
    whole-image numbers.
    """

    r: float = 1 / 6
    t: float = 0.0
    threshold: float = 23.0
    top_k: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.r <= 1.0:
            raise ProtocolError(f"hypotheses.r (window / image side) must be in (0, 1], got {self.r}; paper: 1/6")
        if not 0.0 <= self.t < 1.0:
            raise ProtocolError(
                f"hypotheses.t (vote-frequency threshold) must be in [0, 1), got {self.t}; the paper uses 0.07 or 0"
            )
        if not math.isfinite(self.threshold):
            raise ProtocolError(f"hypotheses.threshold must be a finite number, got {self.threshold} (official: 20-23)")
        if self.top_k < 1:
            raise ProtocolError(f"hypotheses.top_k must be a positive integer, got {self.top_k}")


# The nested sections of a protocol: YAML key (= Protocol field) -> settings dataclass. A
# section is optional in the YAML when Protocol gives its field a default. A method family
# reads its test settings from one of them (reclip.families.spec.Family.section).
# Several sections may share a dataclass: a family can read any section of its kind instead
# of its default (Family.sections; inference_config(..., test_settings=...)).
SECTIONS: dict[str, type] = {
    "zero_shot": ZeroShotSettings,
    "naclip": ZeroShotSettings,
    "sc_clip": ZeroShotSettings,
    "resclip": ZeroShotSettings,
    "proxyclip": ZeroShotSettings,
    "reclip": ReclipSettings,
    "rectify": RectifySettings,
    "hypotheses": HypothesisSettings,
    "distill": DistillSettings,
    "maft": MaftSettings,
}


# The section whose name a settings class's own messages use (another section of the same
# class is named in its place).
_CANONICAL = {cls: key for key, cls in reversed(SECTIONS.items())}


def _section(cls: type, data: Any, where: str, key: str) -> Any:
    """Build one section; its own checks (``__post_init__``) are prefixed with ``where``."""
    kw = _build(cls, data, f"{where}: {key}")
    try:
        return cls(**kw)
    except ProtocolError as err:
        message = str(err)
        canonical = _CANONICAL[cls]
        if key != canonical and message.startswith(canonical):
            message = key + message[len(canonical):]
        raise ProtocolError(f"{where}: {message}") from None


# Flat override keys applied to every split (Protocol.with_overrides).
_SPLIT_KEYS = ("img_dir", "img_suffix", "label_dir", "label_suffix", "split_file", "instance_dir")


@dataclass(frozen=True)
class Protocol:
    """A validated dataset protocol. Build with load_protocol(); change with with_overrides()."""

    name: str
    layout: str
    classes_file: str | None
    background: bool
    splits: dict[str, SplitSpec]
    zero_shot: ZeroShotSettings
    reclip: ReclipSettings
    rectify: RectifySettings = field(default_factory=RectifySettings)
    hypotheses: HypothesisSettings = field(default_factory=HypothesisSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    maft: MaftSettings = field(default_factory=MaftSettings)
    naclip: ZeroShotSettings | None = None  # NACLIP's own test settings; None: not written down
    sc_clip: ZeroShotSettings | None = None  # SC-CLIP's own (SuleBai/SC-CLIP configs)
    resclip: ZeroShotSettings | None = None  # ResCLIP's own (yvhangyang/ResCLIP configs), with its weights
    proxyclip: ZeroShotSettings | None = None  # ProxyCLIP's own (mc-lan/ProxyCLIP configs)
    description: str = ""
    num_classes: int | None = None
    reduce_zero_label: bool = False
    ignore_index: int = 255
    label_map: str | dict | None = None
    prepare: str = ""
    source: str | None = field(default=None, compare=False)  # YAML file it came from

    def __post_init__(self) -> None:
        where = f"protocol {self.name!r}" + (f" ({self.source})" if self.source else "")
        if self.layout not in LAYOUTS:
            raise ProtocolError(f"{where}: layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        if "val" not in self.splits:
            raise ProtocolError(f"{where}: splits must define 'val' (got {sorted(self.splits)})")
        if self.classes_file is None and self.layout != "folder":
            raise ProtocolError(f"{where}: classes_file is required for layout {self.layout!r}")
        needs_bg = self.background_settings_without_background()
        if needs_bg:
            raise ProtocolError(
                f"{where}: {', '.join(needs_bg)} assign pixels to class 0 and need "
                "a background class (background: true); set them to null"
            )
        if isinstance(self.label_map, str) and self.label_map not in LABEL_MAPS:
            raise ProtocolError(f"{where}: label_map {self.label_map!r} unknown; available: {sorted(LABEL_MAPS)}")
        if isinstance(self.label_map, dict):
            for k, v in self.label_map.items():
                if not (_type_ok(k, int) and _type_ok(v, int)) or k < 0 or v < 0:
                    raise ProtocolError(f"{where}: label_map entries must be non-negative int: int, got {k!r}: {v!r}")
        if self.num_classes is not None and self.num_classes <= 0:
            raise ProtocolError(f"{where}: num_classes must be positive, got {self.num_classes}")
        if self.classes_file is not None:
            self._check_class_count(self.classes_file, "class file", where)

    def _check_class_count(self, classes_file: str, what: str, where: str) -> None:
        n = len(read_class_file(self.classes_path(classes_file)).to_list())
        if self.num_classes is not None and n != self.num_classes:
            raise ProtocolError(
                f"{where}: {what} {self.classes_path(classes_file)} has {n} classes but the protocol's labels "
                f"have {self.num_classes}; give a class file with {self.num_classes} lines in train-id order"
            )

    def _zero_shot_sections(self) -> list[tuple[str, ZeroShotSettings]]:
        """(key, settings) of the training-free sections present (zero_shot, naclip, ...)."""
        return [(key, getattr(self, key)) for key, cls in SECTIONS.items()
                if cls is ZeroShotSettings and getattr(self, key) is not None]

    def background_settings_without_background(self) -> list[str]:
        """Training-free settings (``section.name``) that are on although the protocol has no
        background class."""
        if self.background:
            return []
        return [f"{key}.{n}" for key, s in self._zero_shot_sections() for n in ("prob_thd", "area_thd")
                if getattr(s, n) is not None]

    # -- classes ---------------------------------------------------------------------
    def section_classes_path(self, section: str) -> Path | None:
        """The class file a test-settings section names (e.g. ``reclip``: the official ReCLIP
        prompt names), resolved; None when it names none (the protocol's list applies)."""
        name = getattr(getattr(self, section, None), "classes_file", None)
        return None if name is None else self.classes_path(name)

    def classes_path(self, classes_file: str | None = None) -> Path:
        """Resolve classes_file (or another class file of this protocol, e.g. a section's):
        as given (absolute or from the cwd), next to the YAML, then in the package's
        configs/classes/."""
        classes_file = self.classes_file if classes_file is None else classes_file
        if classes_file is None:
            raise ProtocolError(
                f"protocol {self.name!r} has no class list; pass one (classes_file=... / --classes-file)"
            )
        given = Path(classes_file).expanduser()
        candidates = [given]
        if not given.is_absolute():
            if self.source:
                candidates.append(Path(self.source).parent / given)
            candidates.append(_package_dir("classes") / given)
        for c in candidates:
            if c.is_file():
                return c
        raise ProtocolError(
            f"protocol {self.name!r}: class file {classes_file!r} not found; looked in: "
            + ", ".join(str(c) for c in candidates)
        )

    def vocabulary(self) -> Vocabulary:
        """The class list in train-id order (reclip.text.read_class_file of classes_file)."""
        return read_class_file(self.classes_path())

    def classes(self) -> list[list[str]]:
        """Class list in train-id order: one list of synonyms per class (first = display name)."""
        return self.vocabulary().to_list()

    # -- labels ----------------------------------------------------------------------
    def convert_label(self, raw: np.ndarray) -> np.ndarray:
        """Raw label ids (H, W) -> train ids (H, W) int64 (label_map, then reduce_zero_label)."""
        lab = raw.astype(np.int64)
        ign = self.ignore_index
        if self.label_map is not None:
            if isinstance(self.label_map, str):
                lut = label_lut(self.label_map)
            else:
                lut = np.full(max(256, max(self.label_map, default=0) + 1), ign, dtype=np.int64)
                for k, v in self.label_map.items():
                    lut[k] = v
            inside = (lab >= 0) & (lab < len(lut))  # ids beyond the table -> ignore
            lab = np.where(inside, lut[np.clip(lab, 0, len(lut) - 1)], ign)
        if self.reduce_zero_label:
            out = lab - 1
            out[(lab == 0) | (lab == ign)] = ign
            lab = out
        return lab

    # -- copies ----------------------------------------------------------------------
    def with_overrides(self, **kw: Any) -> Protocol:
        """A validated copy with some values replaced (e.g. from command-line options).

        Keys: any top-level field (``classes_file``, ``num_classes``, ``background``,
        ``ignore_index``, ...; the sections ``zero_shot`` / ``naclip`` / ``reclip`` /
        ``rectify`` / ``hypotheses`` and ``splits`` as dicts that are merged into the
        current values (an absent optional section is built from the dict alone),
        e.g. ``zero_shot={"prob_thd": None}``, ``hypotheses={"t": 0.1}``); and the
        flat split keys ``img_dir``, ``img_suffix``, ``label_dir``, ``label_suffix``,
        ``split_file``, applied to every split. None is a value (e.g.
        ``zero_shot={"prob_thd": None}`` turns the threshold off): pass only what the user
        set. Changing classes_file on a protocol with a fixed num_classes is checked against
        it; set num_classes too when evaluating a different label set. A new classes_file
        also clears the class files of the test-settings sections (unless given with them).

        Per-run inference settings (short side, window, logit scale, thresholds, ...) are
        not overridden here: ``reclip.methods.inference_config(method, protocol, **overrides)``
        is the one place that turns a protocol plus user options into an InferenceConfig.
        """
        top = {f.name for f in dataclasses.fields(self) if f.name != "source"}
        unknown = sorted(set(kw) - top - set(_SPLIT_KEYS))
        if unknown:
            hint = ""
            fam = {f.name for c in (ZeroShotSettings, ReclipSettings) for f in dataclasses.fields(c)}
            if set(unknown) & fam:
                hint = ("; test settings go in zero_shot={...} / naclip={...} / reclip={...}, or per run through "
                        "reclip.methods.inference_config(..., **overrides)")
            for sec in ("rectify", "hypotheses", "distill"):
                if set(unknown) & {f.name for f in dataclasses.fields(SECTIONS[sec])}:
                    hint += f"; {sec} settings go in {sec}={{...}}"
            raise ProtocolError(
                f"with_overrides: unknown key(s) {unknown}; allowed: {sorted(top | set(_SPLIT_KEYS))}{hint}"
            )
        data = _to_dict(self)
        for key, value in kw.items():
            if (key in SECTIONS or key == "splits") and not isinstance(value, dict):
                raise ProtocolError(f"with_overrides: {key} must be a dict of fields to replace, got {value!r}")
            if key in SECTIONS:
                data.setdefault(key, {}).update(copy.deepcopy(value))  # an absent optional section: new
            elif key == "splits":
                for split, spec in value.items():
                    if not isinstance(spec, dict):
                        raise ProtocolError(f"with_overrides: splits.{split} must be a dict, got {spec!r}")
                    data["splits"].setdefault(split, {}).update(copy.deepcopy(spec))
            elif key in top:
                data[key] = copy.deepcopy(value)
                if key == "classes_file":  # a user's class list replaces every section's own too
                    for section in SECTIONS:
                        if isinstance(data.get(section), dict) and "classes_file" in data[section] \
                                and section not in kw:
                            data[section]["classes_file"] = None
            else:
                for spec in data["splits"].values():
                    spec[key] = value
        return _protocol_from_dict(data, source=self.source, where=f"protocol {self.name!r} (overrides {sorted(kw)})")


def _to_dict(p: Protocol) -> dict[str, Any]:
    d = {f.name: copy.deepcopy(getattr(p, f.name)) for f in dataclasses.fields(p) if f.name != "source"}
    d["splits"] = {k: dataclasses.asdict(v) for k, v in p.splits.items()}
    for key in SECTIONS:
        section = d.pop(key)
        if section is not None:  # an optional section left out stays out
            d[key] = dataclasses.asdict(section)
    return d


def _protocol_from_dict(data: Any, source: str | None, where: str) -> Protocol:
    _build(Protocol, data, where, skip=("source",), nested=("splits", *SECTIONS))
    splits_raw = data["splits"]
    if not isinstance(splits_raw, dict) or not splits_raw:
        raise ProtocolError(f"{where}: splits must be a non-empty mapping of split name -> folders")
    splits = {str(name): SplitSpec(**_build(SplitSpec, spec, f"{where}: splits.{name}"))
              for name, spec in splits_raw.items()}
    # `naclip: null` is the same as no naclip section (a section whose Protocol default is None)
    optional = {f.name for f in dataclasses.fields(Protocol) if f.name in SECTIONS and f.default is None}
    sections = {key: _section(cls, data[key], where, key) for key, cls in SECTIONS.items()
                if key in data and not (key in optional and data[key] is None)}
    rest = {k: v for k, v in data.items() if k != "splits" and k not in SECTIONS}
    return Protocol(splits=splits, source=source, **sections, **rest)


# -------------------------------------------------------------------------- registry

def list_protocols() -> list[str]:
    """Names of the shipped protocols (YAML files in reclip/configs/datasets/)."""
    return sorted(p.stem for p in _package_dir("datasets").glob("*.yaml"))


def load_protocol(name_or_path: str | os.PathLike) -> Protocol:
    """Load and validate a protocol by shipped name ("voc21") or YAML path.

    What the argument is never depends on the files present: a path object
    (``os.PathLike``) or a string ending in ``.yaml`` / ``.yml`` is a YAML file; any other
    string is a shipped protocol's name (a file ``./voc21`` does not shadow ``voc21``).

    Raises:
        ProtocolError: unknown name (lists the available ones) or an invalid file.
    """
    s = str(name_or_path)
    path = Path(s).expanduser()
    if not (isinstance(name_or_path, os.PathLike) or s.endswith((".yaml", ".yml"))):
        path = _package_dir("datasets") / f"{s}.yaml"
        if not path.is_file():
            raise ProtocolError(f"unknown dataset protocol {s!r}; available: {list_protocols()} "
                                "(or pass the path of a protocol YAML file, ending in .yaml)")
    if not path.is_file():
        raise ProtocolError(f"protocol file {path} does not exist")
    try:
        data = yaml.safe_load(read_text_file(path, "protocol file"))
    except yaml.YAMLError as e:
        raise ProtocolError(f"{path}: invalid YAML: {e}") from e
    protocol = _protocol_from_dict(data, source=str(path), where=str(path))
    # A section's class file is checked as the YAML gives it; a copy with another label set
    # (with_overrides(classes_file=..., num_classes=...)) is not held to it.
    for key in SECTIONS:
        settings = getattr(protocol, key, None)
        if getattr(settings, "classes_file", None) is not None:
            protocol._check_class_count(settings.classes_file, f"{key}.classes_file", str(path))
    return protocol
