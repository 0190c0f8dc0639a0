"""A synthetic world in which a tiny CLIP can be pre-trained on a CPU in minutes.

Two kinds of data come out of one :class:`ToyWorld`:

- **captioned images** that imitate web photos (:meth:`ToyWorld.captioned`): one large
  dominant object named by the caption (a CLIP prompt template filled with its name),
  0-2 smaller unnamed distractors, uneven class frequencies, some caption noise between
  look-alike classes, a few empty images captioned as "background", and - the important
  part - class-position correlation: birds, moons and stars sit high in the frame, fish
  and balls low, apples, tomatoes and flowers near the centre (as sky is up and road is
  down in real photos); and a global space correlation: photographers centre what the
  caption names (``photo_spread``), unnamed distractors sit towards the edges
  (``distractor_min_offset``), and the camera darkens the corners (``vignette``), so the
  named thing is almost never peripheral and dark-peripheral things are "not the named
  thing" (empty photos with only peripheral distractors are captioned "background");
- **segmentation scenes** (:meth:`ToyWorld.scenes`): 2-4 objects of similar size placed
  uniformly anywhere (fully inside the frame, little overlap), every class equally often,
  with exact per-pixel labels (0 = background, 1..K) and instance ids; no caption noise,
  no position prior (the same camera, so the same vignette): a prediction that depends on
  where an object is, or that prefers one class of a pair, shows the model's bias - the
  space-preference bias of ReCLIP++ (central objects segmented better than peripheral ones)
  and the class-preference bias.

Classes come in look-alike pairs (same shape, close colours, told apart by a texture):
apple/tomato, moon/ball, bird/fish, flower/star. Inside a pair the classes differ in
frequency (class-preference bias) and, for three pairs, in where pre-training photos show
them (class x position bias, which the bias logit map of ReCLIP++ models). Scenes place
every class anywhere, so a CLIP that learnt "a round pale thing high up is a moon" calls a
ball at the top of a scene "moon".

Rendering is vectorised numpy over the whole batch (each object is drawn in a window
around it; about 1,000 96 px images per second on one free core, 400-500 on a busy one)
and deterministic: every function takes a ``numpy.random.Generator``.
:func:`write_voc_layout` writes scenes as a PASCAL VOC 2012 folder so every dataset and
evaluation path of reclip runs on them unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from reclip.templates import RECLIP_TEMPLATES
from reclip.visualize import palette as voc_palette

__all__ = [
    "BACKGROUND_NAME",
    "CLASSES",
    "CLASS_SETS",
    "CAPTION_TEMPLATES",
    "ClassSpec",
    "CaptionedBatch",
    "SceneBatch",
    "ToyWorld",
    "WorldConfig",
    "write_voc_layout",
]

BACKGROUND_NAME = "background"

# Texture ids (see _texture): how the two members of a look-alike pair are told apart.
PLAIN, STRIPES, DOTS, CHECKER, RINGS = range(5)
# Position priors of the dominant object in pre-training photos.
POSITIONS = ("center", "high", "low", "anywhere")


@dataclass(frozen=True)
class ClassSpec:
    """One object class: its name, look, frequency and where photos show it.

    Shape: the superellipse ``(|u|^power + |v|^power)^(1/power) < 1 + lobe_amp cos(lobes t)``
    in the object's rotated frame, stretched by ``aspect`` (u) and ``1/aspect`` (v).
    """

    name: str
    partner: str  # its look-alike, for caption noise
    color: tuple[int, int, int]  # RGB of the body
    texture: int  # PLAIN, STRIPES, DOTS, CHECKER or RINGS
    position: str  # one of POSITIONS
    weight: float  # relative frequency as the named object of a photo
    power: float = 2.0
    lobes: int = 0
    lobe_amp: float = 0.0
    aspect: float = 1.0


# Look-alike pairs share the shape and nearly the colour. Frequencies are uneven inside
# each pair; positions differ inside three pairs (moon/ball, bird/fish, flower/star).
CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec("apple", "tomato", (200, 36, 36), PLAIN, "center", 1.7),
    ClassSpec("tomato", "apple", (218, 52, 30), DOTS, "center", 0.6),
    ClassSpec("moon", "ball", (222, 220, 196), DOTS, "high", 1.0),
    ClassSpec("ball", "moon", (230, 226, 210), STRIPES, "low", 1.0),
    ClassSpec("bird", "fish", (66, 104, 190), PLAIN, "high", 1.3, aspect=1.7, lobes=1, lobe_amp=0.25),
    ClassSpec("fish", "bird", (56, 116, 178), CHECKER, "low", 0.8, aspect=1.7, lobes=1, lobe_amp=0.25),
    ClassSpec("flower", "star", (236, 150, 40), RINGS, "center", 1.2, lobes=5, lobe_amp=0.32),
    ClassSpec("star", "flower", (240, 184, 44), PLAIN, "high", 0.8, lobes=5, lobe_amp=0.32),
)

# A second world with other classes, shapes and colours (square boxes, long leaves, many-
# lobed suns and gears, eggs): settings tuned on one world are checked on the other.
GARDEN_CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec("leaf", "feather", (70, 150, 60), PLAIN, "anywhere", 1.5, aspect=2.2),
    ClassSpec("feather", "leaf", (96, 164, 84), STRIPES, "high", 0.7, aspect=2.2),
    ClassSpec("box", "crate", (150, 104, 60), PLAIN, "low", 1.0, power=4.0),
    ClassSpec("crate", "box", (164, 116, 66), CHECKER, "center", 1.0, power=4.0),
    ClassSpec("sun", "gear", (246, 200, 64), RINGS, "high", 1.4, lobes=8, lobe_amp=0.15),
    ClassSpec("gear", "sun", (232, 190, 76), DOTS, "low", 0.7, lobes=8, lobe_amp=0.15),
    ClassSpec("egg", "lemon", (238, 232, 205), PLAIN, "center", 1.6, aspect=1.3),
    ClassSpec("lemon", "egg", (236, 226, 176), STRIPES, "anywhere", 0.6, aspect=1.3),
)

# The class sets a world can use (WorldConfig.classes).
CLASS_SETS: dict[str, tuple[ClassSpec, ...]] = {"objects": CLASSES, "garden": GARDEN_CLASSES}

# Caption templates: the 85 prompt templates reclip's zero-shot classifier averages
# (CLIP's 80 ImageNet ones + MaskCLIP's 5 scene ones), so that the query ensemble used at
# test time is in distribution for the tiny CLIP's text tower.
CAPTION_TEMPLATES = RECLIP_TEMPLATES


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and probabilities of the world (hashable: it keys pre-training caches)."""

    image_size: int = 96  # captioned (pre-training) images, px
    scene_size: int = 96  # segmentation scenes, px
    num_classes: int = 8  # the first N of the class set (keep it even: pairs)
    dominant_radius: tuple[float, float] = (14.0, 22.0)  # named object, px at image_size
    distractor_radius: tuple[float, float] = (8.0, 12.0)
    max_distractors: int = 2
    position_strength: float = 0.9  # share of photos that follow the class position prior
    caption_noise: float = 0.08  # share of captions naming the look-alike instead
    empty_prob: float = 0.15  # share of photos with no object, captioned "background"
    scene_objects: tuple[int, int] = (2, 4)  # objects per scene, inclusive
    scene_radius: tuple[float, float] = (13.0, 18.0)  # px at scene_size
    texture_period: tuple[float, float] = (4.5, 6.5)  # px
    texture_contrast: float = 0.35  # darkening of the texture's dark phase
    noise_std: float = 6.0  # per-pixel Gaussian noise, grey levels
    # Space bias (photographers centre what they name): named objects' centres are pulled
    # towards the image centre by this factor (1 = the priors' full ranges) ...
    photo_spread: float = 0.5
    # ... and distractors sit at least this far out (Chebyshev distance of the centre from
    # the image centre, as a fraction of its largest possible value; 0 = anywhere).
    distractor_min_offset: float = 0.6
    # The camera: brightness falls to (1 - vignette) at the corners (quadratic in the
    # distance from the centre), in photos and scenes alike.
    vignette: float = 0.5
    classes: str = "objects"  # a CLASS_SETS name


class CaptionedBatch(NamedTuple):
    """Pre-training pairs.

    images: (N, H, W, 3) uint8 RGB; labels: (N,) int64, the class of the dominant object
    (1..K) or 0 for an empty photo (the true class, before caption noise); captions: N strings.
    """

    images: np.ndarray
    labels: np.ndarray
    captions: list[str]


class SceneBatch(NamedTuple):
    """Segmentation scenes.

    images: (N, H, W, 3) uint8; labels: (N, H, W) uint8, 0 = background, 1..K classes;
    instances: (N, H, W) uint8, 0 = none, i = i-th object (painting order, 1-based);
    instance_classes: (N, M) int64, the class of object i+1 (0 where a scene has fewer
    than M objects).
    """

    images: np.ndarray
    labels: np.ndarray
    instances: np.ndarray
    instance_classes: np.ndarray


# -- rendering (vectorised over the batch) ------------------------------------------------


def _background(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Muted two-colour waves: (n, size, size, 3) float32 in 0..255.

    Low-saturation colours keep backgrounds apart from the saturated objects while
    giving them structure (not a flat colour a CLIP could key on).
    """
    grey = rng.uniform(60, 170, size=(n, 1, 1, 1)).astype(np.float32)
    c1 = grey + rng.uniform(-25, 25, size=(n, 1, 1, 3)).astype(np.float32)
    c2 = grey + rng.uniform(-30, 30, size=(n, 1, 1, 3)).astype(np.float32)
    t = np.arange(size, dtype=np.float32) / size
    freq = rng.uniform(0.5, 2.5, size=(n, 2, 1))
    theta = rng.uniform(0, 2 * np.pi, size=(n, 2, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 2, 1))
    ax = (2 * np.pi * freq * np.cos(theta) * t).astype(np.float32)  # (n, 2, W)
    ay = (2 * np.pi * freq * np.sin(theta) * t + phase).astype(np.float32)  # (n, 2, H)
    # sin(ax + ay) = sin(ay) cos(ax) + cos(ay) sin(ax): separable, so no (H, W) trig.
    wave = np.einsum("nkh,nkw->nhw", np.sin(ay), np.cos(ax)) + np.einsum("nkh,nkw->nhw", np.cos(ay), np.sin(ax))
    mix = (0.5 + 0.25 * wave)[..., None]  # (n, H, W, 1) in [0, 1]
    return c1 + (c2 - c1) * mix


def _texture(kind: np.ndarray, u: np.ndarray, v: np.ndarray, rho: np.ndarray, period: np.ndarray) -> np.ndarray:
    """Dark-phase mask (0/1 float) of each object's texture.

    kind (n,) int; u, v (n, H, W) pixel offsets in the object's rotated frame; rho (n, H, W)
    radial distance in px; period (n,) px.
    """
    w = (2 * np.pi / period)[:, None, None]
    out = np.zeros_like(u)
    for k, fn in (
        (STRIPES, lambda s: np.sin(w[s] * u[s]) > 0.3),
        (DOTS, lambda s: (np.sin(w[s] * u[s]) > 0.45) & (np.sin(w[s] * v[s]) > 0.45)),
        (CHECKER, lambda s: np.sin(w[s] * u[s]) * np.sin(w[s] * v[s]) > 0),
        (RINGS, lambda s: np.sin(w[s] * rho[s]) > 0.3),
    ):
        sel = kind == k
        if sel.any():
            out[sel] = fn(sel)
    return out


def _paint(
    canvas: np.ndarray,
    labels: np.ndarray,
    instances: np.ndarray,
    rng: np.random.Generator,
    cls: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    radius: np.ndarray,
    instance_id: int,
    specs: tuple[ClassSpec, ...],
    config: WorldConfig,
) -> None:
    """Paint one object per image (images with ``cls == 0`` get nothing), in place.

    canvas (n, H, W, 3) float32; labels / instances (n, H, W) uint8; cls (n,) in 0..K;
    cx, cy, radius (n,) px. Work happens in a square window around each object (the
    same window size for the batch), about 5x fewer pixels than the whole image.
    """
    idx = np.flatnonzero(cls > 0)
    if idx.size == 0:
        return
    n, size = idx.size, canvas.shape[1]
    spec = [specs[c - 1] for c in cls[idx]]
    power = np.array([s.power for s in spec], dtype=np.float32)[:, None, None]
    lobes = np.array([s.lobes for s in spec], dtype=np.float32)[:, None, None]
    amp = np.array([s.lobe_amp for s in spec], dtype=np.float32)[:, None, None]
    aspect = np.array([s.aspect for s in spec], dtype=np.float32)[:, None, None]
    color = np.array([s.color for s in spec], dtype=np.float32)
    kind = np.array([s.texture for s in spec])

    angle = rng.uniform(0, 2 * np.pi, size=n).astype(np.float32)[:, None, None]
    jitter = rng.uniform(-12, 12, size=(n, 3)).astype(np.float32)  # colour jitter keeps pairs close
    period = rng.uniform(*config.texture_period, size=n).astype(np.float32)
    shade = rng.uniform(0.85, 1.1, size=(n, 1)).astype(np.float32)
    r = radius[idx].astype(np.float32)
    ocx, ocy = cx[idx].astype(np.float32), cy[idx].astype(np.float32)

    # Window: covers the object's farthest extent (stretch x lobe bulge) for every object.
    extent = r * np.maximum(aspect[:, 0, 0], 1 / aspect[:, 0, 0]) * (1 + amp[:, 0, 0])
    win = int(np.ceil(2 * extent.max())) + 2
    steps = np.arange(win, dtype=np.int64)
    ys = np.floor(ocy - win / 2).astype(np.int64)[:, None] + steps  # (n, win)
    xs = np.floor(ocx - win / 2).astype(np.int64)[:, None] + steps
    dy = (ys - ocy[:, None]).astype(np.float32)[:, :, None]  # (n, win, 1) px
    dx = (xs - ocx[:, None]).astype(np.float32)[:, None, :]  # (n, 1, win)
    cos, sin = np.cos(angle), np.sin(angle)
    u = cos * dx + sin * dy  # (n, win, win) px, rotated frame
    v = -sin * dx + cos * dy
    rr = r[:, None, None]
    un, vn = u / (rr * aspect), v * aspect / rr
    if np.all(power == 2):
        rho_n = np.sqrt(un * un + vn * vn)
    else:
        rho_n = (np.abs(un) ** power + np.abs(vn) ** power) ** (1 / power)
    outline = np.ones_like(rho_n)
    lobed = amp[:, 0, 0] > 0
    if lobed.any():
        theta = np.arctan2(vn[lobed], un[lobed])
        outline[lobed] = 1 + amp[lobed] * np.cos(lobes[lobed] * theta)
    valid = ((ys >= 0) & (ys < size))[:, :, None] & ((xs >= 0) & (xs < size))[:, None, :]
    inside = (rho_n < outline) & valid  # (n, win, win)

    dark = _texture(kind, u, v, rho_n * rr, period)  # (n, win, win)
    body = np.clip(color * shade + jitter, 0, 255)  # (n, 3)
    # Soft shading towards the rim so objects look like objects, not flat stickers.
    rim = 1 - 0.18 * np.minimum(rho_n / outline, 1) ** 2
    tone = (1 - config.texture_contrast * dark) * rim  # (n, win, win)

    b, i, j = np.nonzero(inside)
    img, py, px = idx[b], ys[b, i], xs[b, j]
    canvas[img, py, px] = body[b] * tone[b, i, j][:, None]
    labels[img, py, px] = cls[img]
    instances[img, py, px] = instance_id


def _vignette(canvas: np.ndarray, strength: float) -> None:
    """Darken (n, H, W, 3) float32 in place: factor 1 - strength * (r / half diagonal)^2."""
    if strength <= 0:
        return
    size = canvas.shape[1]
    t = (np.arange(size, dtype=np.float32) - (size - 1) / 2) / (size / 2)
    r2 = (t[:, None] ** 2 + t[None, :] ** 2) / 2  # (H, W), 1 at the corners
    canvas *= (1 - np.float32(strength) * r2)[None, :, :, None]


def _finish(canvas: np.ndarray, rng: np.random.Generator, noise_std: float, vignette: float = 0.0) -> np.ndarray:
    """Vignette, add sensor noise and quantise: float32 (n, H, W, 3) -> uint8 (canvas is consumed)."""
    _vignette(canvas, vignette)
    noise = rng.standard_normal(size=canvas.shape, dtype=np.float32)  # float32: 2x faster
    canvas += noise * np.float32(noise_std) + np.float32(0.5)  # + 0.5: round on the cast
    np.clip(canvas, 0, 255, out=canvas)
    return canvas.astype(np.uint8)


# -- the world ----------------------------------------------------------------------------


@dataclass
class ToyWorld:
    """Generator of captioned photos and segmentation scenes; see the module docstring."""

    config: WorldConfig = field(default_factory=WorldConfig)

    def __post_init__(self) -> None:
        if self.config.classes not in CLASS_SETS:
            raise ValueError(f"unknown class set {self.config.classes!r}; available: {', '.join(CLASS_SETS)}")
        classes = CLASS_SETS[self.config.classes]
        k = self.config.num_classes
        if not 2 <= k <= len(classes) or k % 2:
            raise ValueError(f"num_classes must be an even number in [2, {len(classes)}], got {k}")
        self.specs: tuple[ClassSpec, ...] = classes[:k]
        names = [s.name for s in self.specs]
        self.partner = np.array([0] + [names.index(s.partner) + 1 for s in self.specs])  # (K+1,)
        weights = np.array([s.weight for s in self.specs])
        self.class_prob = weights / weights.sum()  # (K,)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The K object class names, label i+1 = class_names[i]."""
        return tuple(s.name for s in self.specs)

    @property
    def num_classes(self) -> int:
        return len(self.specs)

    def class_lines(self) -> list[str]:
        """Lines of the class file: background first, then the K classes."""
        return [BACKGROUND_NAME, *self.class_names]

    def _prior_positions(self, rng: np.random.Generator, cls: np.ndarray, radius: np.ndarray, size: int):
        """Centres (cx, cy) in px of named objects following each class's position prior."""
        n = cls.size
        pos = np.array(["anywhere"] + [s.position for s in self.specs])[cls]
        follow = rng.random(n) < self.config.position_strength
        # Normalised centre ranges per prior: (x lo, x hi, y lo, y hi).
        ranges = {
            "center": (0.38, 0.62, 0.38, 0.62),
            "high": (0.15, 0.85, 0.1, 0.32),
            "low": (0.15, 0.85, 0.68, 0.9),
            "anywhere": (0.0, 1.0, 0.0, 1.0),
        }
        box = np.array([ranges[p if f else "anywhere"] for p, f in zip(pos, follow)])  # (n, 4)
        spread = self.config.photo_spread
        fx = 0.5 + spread * (rng.uniform(box[:, 0], box[:, 1]) - 0.5)
        fy = 0.5 + spread * (rng.uniform(box[:, 2], box[:, 3]) - 0.5)
        # Keep the object (mostly) inside the frame, as a photographer would.
        lo, hi = 0.8 * radius, size - 0.8 * radius
        return np.clip(fx * size, lo, hi), np.clip(fy * size, lo, hi)

    def _peripheral_positions(self, rng: np.random.Generator, radius: np.ndarray, size: int):
        """Distractor centres (cx, cy) in px: inside the frame, at Chebyshev offset
        >= ``distractor_min_offset`` (as a fraction of the largest) from the centre."""
        n, m = radius.size, self.config.distractor_min_offset
        ux, uy = rng.uniform(-1, 1, size=n), rng.uniform(-1, 1, size=n)
        if m > 0:  # push one coordinate (chosen at random) out to [m, 1] in absolute value
            outer = rng.uniform(m, 1, size=n) * rng.choice((-1.0, 1.0), size=n)
            which = rng.random(n) < 0.5
            ux, uy = np.where(which, outer, ux), np.where(which, uy, outer)
        half = size / 2 - radius
        return size / 2 + ux * half, size / 2 + uy * half

    def captioned(self, n: int, rng: np.random.Generator) -> CaptionedBatch:
        """n pre-training pairs (web-photo imitation); see :class:`CaptionedBatch`."""
        cfg, size = self.config, self.config.image_size
        scale = size / 96.0
        k = self.num_classes
        cls = rng.choice(k, size=n, p=self.class_prob) + 1
        cls[rng.random(n) < cfg.empty_prob] = 0
        canvas = _background(rng, n, size)
        labels = np.zeros((n, size, size), np.uint8)
        inst = np.zeros_like(labels)
        # Distractors first (behind the named object): unnamed, any class, anywhere.
        n_distract = rng.integers(0, cfg.max_distractors + 1, size=n)
        for j in range(cfg.max_distractors):
            dcls = np.where(n_distract > j, rng.integers(1, k + 1, size=n), 0)
            dr = rng.uniform(*cfg.distractor_radius, size=n) * scale
            dcx, dcy = self._peripheral_positions(rng, dr, size)
            _paint(canvas, labels, inst, rng, dcls, dcx, dcy, dr, j + 2, self.specs, cfg)
        radius = rng.uniform(*cfg.dominant_radius, size=n) * scale
        cx, cy = self._prior_positions(rng, cls, radius, size)
        _paint(canvas, labels, inst, rng, cls, cx, cy, radius, 1, self.specs, cfg)
        images = _finish(canvas, rng, cfg.noise_std, cfg.vignette)

        named = np.where(rng.random(n) < cfg.caption_noise, self.partner[cls], cls)
        templates = rng.integers(0, len(CAPTION_TEMPLATES), size=n)
        words = [BACKGROUND_NAME, *self.class_names]
        captions = [CAPTION_TEMPLATES[t].format(words[c]) for t, c in zip(templates, named)]
        return CaptionedBatch(images, cls.astype(np.int64), captions)

    def scenes(self, n: int, rng: np.random.Generator, size: int | None = None) -> SceneBatch:
        """n segmentation scenes: objects of similar size, uniformly placed, balanced classes."""
        cfg = self.config
        size = size or cfg.scene_size
        scale = size / 96.0
        lo, hi = cfg.scene_objects
        m = hi
        count = rng.integers(lo, hi + 1, size=n)
        canvas = _background(rng, n, size)
        labels = np.zeros((n, size, size), np.uint8)
        inst = np.zeros_like(labels)
        inst_cls = np.zeros((n, m), np.int64)
        placed: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for j in range(m):
            cls = np.where(count > j, rng.integers(1, self.num_classes + 1, size=n), 0)
            r = rng.uniform(*cfg.scene_radius, size=n) * scale
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            # Rejection sampling (vectorised): redraw centres that overlap earlier objects
            # too much; after 30 tries an overlap is kept (labels stay exact anyway).
            for _ in range(30):
                bad = np.zeros(n, bool)
                for pcx, pcy, pr in placed:
                    bad |= np.hypot(cx - pcx, cy - pcy) < 0.85 * (r + pr)
                bad &= cls > 0
                if not bad.any():
                    break
                cx[bad] = rng.uniform(r[bad], size - r[bad])
                cy[bad] = rng.uniform(r[bad], size - r[bad])
            placed.append((cx, cy, np.where(cls > 0, r, -1e3)))
            _paint(canvas, labels, inst, rng, cls, cx, cy, r, j + 1, self.specs, cfg)
            inst_cls[:, j] = cls
        images = _finish(canvas, rng, cfg.noise_std, cfg.vignette)
        return SceneBatch(images, labels, inst, inst_cls)


# -- PASCAL VOC 2012 layout -----------------------------------------------------------


def write_voc_layout(
    root: str | os.PathLike,
    num_train: int,
    num_val: int,
    seed: int = 0,
    config: WorldConfig | None = None,
    image_format: str = "jpg",
    chunk: int = 256,
) -> Path:
    """Write scenes as a PASCAL VOC 2012 folder and a class file; return the VOC2012 folder.

    Layout under ``root``::

        VOCdevkit/VOC2012/JPEGImages/toy_{split}_{i:06d}.jpg   (quality 95, 4:4:4; or .png)
        VOCdevkit/VOC2012/SegmentationClass/<id>.png     palette PNG, 0 = background, 1..K
        VOCdevkit/VOC2012/SegmentationObject/<id>.png    palette PNG, instance ids 1..M
        VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt
        toy_classes.txt                                  background first, one class per line

    Train and val scenes come from independent streams of ``seed``. JPEG at quality 95
    without chroma subsampling keeps the 5 px textures (``image_format="png"`` is lossless).
    """
    from PIL import Image

    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    world = ToyWorld(config or WorldConfig())
    root = Path(root)
    voc = root / "VOCdevkit" / "VOC2012"
    dirs = {k: voc / k for k in ("JPEGImages", "SegmentationClass", "SegmentationObject")}
    for d in (*dirs.values(), voc / "ImageSets" / "Segmentation"):
        d.mkdir(parents=True, exist_ok=True)
    palette = voc_palette().reshape(-1).tolist()
    streams = np.random.SeedSequence(seed).spawn(2)
    for split, total, stream in (("train", num_train, streams[0]), ("val", num_val, streams[1])):
        rng = np.random.default_rng(stream)
        ids: list[str] = []
        for start in range(0, total, chunk):
            batch = world.scenes(min(chunk, total - start), rng)
            for i in range(batch.images.shape[0]):
                name = f"toy_{split}_{start + i:06d}"
                ids.append(name)
                img = Image.fromarray(batch.images[i])
                if image_format == "jpg":
                    img.save(dirs["JPEGImages"] / f"{name}.jpg", quality=95, subsampling=0)
                else:
                    img.save(dirs["JPEGImages"] / f"{name}.png")
                for key, arr in (("SegmentationClass", batch.labels[i]), ("SegmentationObject", batch.instances[i])):
                    lab = Image.fromarray(arr, mode="P")
                    lab.putpalette(palette)
                    lab.save(dirs[key] / f"{name}.png")
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (root / "toy_classes.txt").write_text("".join(f"{line}\n" for line in world.class_lines()))
    return voc
