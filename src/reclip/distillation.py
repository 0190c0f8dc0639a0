"""ReCLIP++'s distillation stage (paper III-E): a DeepLab V2 student taught by the rectified CLIP.

    distill(clip, "runs/voc", "voc20", "data/VOCdevkit/VOC2012", "hyp.json", "runs/voc-student")
    student = load_student("runs/voc-student")       # a segmentor; runs without CLIP

The student is a ResNet (output stride 8) + ASPP-V2 + a 1x1 projection to CLIP's embedding
width, L2-normalised per cell: Z_hat. It inherits the teacher's head frozen
(:mod:`reclip.heads.inherited`: W_q, the bias logits, the mask decoder; Table IX), so its
prediction is M_o computed from Z_hat as the teacher's from Z. Losses (eq. 8-10), all with
gradients to the student:

- L_mask: cross-entropy of the student's M_o against the teacher's argmax pseudo labels,
  computed online on the same augmented crop (padding ignored);
- L_feat: L1 between the teacher's Z and Z_hat, both resized to the crop;
- L_text: the rectification loss (Gumbel masks of the student's M_o, eq. 7 on Z_hat) over
  the image's hypotheses;

L = L_mask + alpha L_feat + beta L_text (alpha = beta = 0.5). No ground truth is read.

MaskCLIP+ (the baseline of Tables I/II) is the same student taught by the unrectified
MaskCLIP: its pseudo labels are MaskCLIP's argmax and its head is W_q alone (no bias, no
decoder), trained with L_mask only (:data:`MASKCLIP_PLUS`).

Official code facts and the defects not reproduced are in METHODS.md section 3: there the
student's feature is detached before L_feat and L_text (so only the cross-entropy trains
it) and the pseudo labels are kept only where the training ground truth is not void.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reclip.backbones.resnet import STUDENT_BACKBONES, build_student_backbone
from reclip.clip.model import CLIP, CLIP_MEAN, CLIP_STD, pad_to_patch, weights_fingerprint
from reclip.data.augment import UnlabeledTrainSet
from reclip.data.datasets import SegmentationDataset
from reclip.data.io import MAX_PIXELS
from reclip.data.protocol import Protocol, load_protocol
from reclip.data.transforms import IMAGENET_MEAN, IMAGENET_STD, renormalise
from reclip.heads.aspp import ASPPV2
from reclip.heads.decoder import MaskDecoder
from reclip.heads.inherited import InheritedHead, inherit
from reclip.heads.losses import contrastive_loss, gumbel_masks
from reclip.heads.rectify import class_query_weights
from reclip.hypotheses import load_hypotheses
from reclip.rectification import QUERY_TEMPLATES, rectifier_from_run
from reclip.train.checkpoint import WEIGHTS_NAME
from reclip.segmentor import DenseSegmentor, align_to_input
from reclip.text import Vocabulary, query_embeddings
from reclip.train import (
    PolySchedule,
    RunFiles,
    SGDConfig,
    TrainConfig,
    TrainResult,
    describe,
    load_run,
    save_run,
    steps_per_epoch,
    train,
)

__all__ = ["DISTILL_PRESETS", "MASKCLIP_PLUS", "OFFICIAL_DISTILL_SCHEDULE", "RECLIPPP_DISTILL", "RECLIP_DISTILL",
           "DistillConfig", "Student", "StudentBackbone", "distill", "load_student", "student_from_run"]

TEACHERS = ("rectified", "maskclip")
HEADS = ("inherited", "query", "query_bias", "query_reference", "deeplab", "fresh")
FEAT_AT = ("image", "student_grid")
TEACHER_METHODS = ("reclip++", "reclip")
# the student's own input normalisation (0..1 scale): what its backbone's weights expect
INPUT_NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),  # torchvision / mmseg ResNets
               "clip": (CLIP_MEAN, CLIP_STD)}
# The official ReCLIP distillation's lr schedule (tools/distill.py): poly 0.9 updated once per
# epoch and clamped at min lr 1e-4 (0.01 of its lr 0.01). The paper states poly 0.9 only.
OFFICIAL_DISTILL_SCHEDULE = PolySchedule(unit="epoch", min_factor=0.01)
SCHEDULES = {"paper": PolySchedule(), "official": OFFICIAL_DISTILL_SCHEDULE}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"steps"}


@dataclass(frozen=True)
class DistillConfig:
    """Every switch of the distillation stage; the defaults are ReCLIP++ as published.

    Attributes:
        backbone: the student's ResNet (``reclip.backbones.resnet.STUDENT_BACKBONES``):
            "resnet101" (the paper's DeepLab V2), "resnet50-v1c" (the official code),
            "resnet18" (small, for the toy world and CPUs).
        width: the ResNet's base width (64: the published networks, whose ImageNet weights
            load; smaller for a toy student trained from scratch).
        aspp_channels: ASPP-V2's output channels (official 512), then a 1x1 projection to D.
        teacher: "rectified" (a trained ReCLIP++ / ReCLIP run) or "maskclip" (MaskCLIP+).
        teacher_method: the method a rectified teacher run must be ("reclip++", "reclip"),
            None: either.
        head: Table IX's rows: "inherited" (the teacher's frozen W_q, bias and decoder:
            the paper's), "query" (W_q alone), "query_bias" (W_q and the bias, no decoder),
            "deeplab" (DeepLab's own trained 1x1 classifier, "Ori. Head"); "fresh" (not a
            paper row: the structure of "inherited" with the bias and decoder re-initialised
            and trained); or "query_reference" (the official ReCLIP distillation head:
            Z_hat W_q - Z_hat W_r, without ReCLIP's positional term; a ReCLIP teacher only).
        mask_loss, feat_loss, text_loss: the terms of eq. 10 (Table VIII switches).
        alpha, beta: weights of L_feat and L_text (paper 0.5 / 0.5).
        ce_scale: the student's logits are multiplied by this in L_mask; None: 100 where they
            are cosines (no decoder, no classifier: CLIP's scale), else 1 (the decoder's BN
            outputs and DeepLab's classifier give logits already).
        feat_at: where L_feat compares Z and Z_hat: "image" (the paper: both resized
            bilinearly to the crop) or "student_grid" (cell by cell on the student's grid:
            the teacher's Z as it is where the two grids are the same cells, as on the toy
            world's 96 px scenes, else its area average; no D-channel maps at the crop's
            size, about half the step time of a small student). Not the same number as
            "image": bilinear upsampling blends neighbouring cells before the L1.
        teacher_overrides: LastBlock fields replacing MaskCLIP's for a MaskCLIP teacher
            (e.g. ``{"residual": False, "ffn": False}``, what a rectified teacher of the toy
            world reads), None: MaskCLIP as published.
        input_norm: the student's input normalisation: "imagenet" (what ImageNet-trained
            ResNets expect, and the official student's IMG_NORM_CFG; the paper says nothing)
            or "clip" (CLIP's, the teacher's). The teacher always reads CLIP's. Students
            distilled before this field existed used "clip" (:func:`student_from_run` reads
            them so; :func:`distill` resumes their runs with ``input_norm="clip"``).
    """

    backbone: str = "resnet101"
    width: int = 64
    aspp_channels: int = 512
    teacher: str = "rectified"
    teacher_method: str | None = None
    head: str = "inherited"
    mask_loss: bool = True
    feat_loss: bool = True
    text_loss: bool = True
    alpha: float = 0.5
    beta: float = 0.5
    ce_scale: float | None = None
    feat_at: str = "image"
    teacher_overrides: dict[str, Any] | None = None
    input_norm: str = "imagenet"

    def __post_init__(self) -> None:
        if self.backbone not in STUDENT_BACKBONES:
            raise ValueError(f"DistillConfig.backbone={self.backbone!r}; available: {sorted(STUDENT_BACKBONES)}")
        for name, allowed in (("teacher", TEACHERS), ("head", HEADS), ("feat_at", FEAT_AT),
                              ("input_norm", tuple(INPUT_NORMS))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DistillConfig.{name}={getattr(self, name)!r}; allowed: {list(allowed)}")
        if not (self.mask_loss or self.feat_loss or self.text_loss):
            raise ValueError("DistillConfig: every loss term is off; nothing would train the student")
        if self.head in ("fresh", "deeplab") and not (self.mask_loss or self.text_loss):
            raise ValueError(f"a {self.head} head is trained only by L_mask or L_text; with L_feat alone it stays "
                             "random")
        if self.teacher_method is not None and (self.teacher != "rectified"
                                                or self.teacher_method not in TEACHER_METHODS):
            raise ValueError(f"DistillConfig.teacher_method={self.teacher_method!r} needs teacher='rectified' and "
                             f"one of {list(TEACHER_METHODS)}")
        if self.head == "query_reference" and self.teacher_method == "reclip++":
            raise ValueError("head='query_reference' is ReCLIP's (dependent bias); a ReCLIP++ teacher has none")
        if self.teacher == "maskclip" and self.head not in ("inherited", "deeplab"):
            raise ValueError("a MaskCLIP teacher has only its Query head to inherit; use head='inherited' (the "
                             "query head, MaskCLIP+) or 'deeplab'")
        for name in ("alpha", "beta"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"DistillConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.ce_scale is not None and not self.ce_scale > 0:
            raise ValueError(f"DistillConfig.ce_scale must be > 0 or None, got {self.ce_scale!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_identity(self) -> dict[str, Any]:
        """What of this config a resumed run must repeat (:func:`distill`'s ``run_settings``).

        :meth:`to_dict` without ``teacher_method`` (a check of the teacher run, which never
        changes the training) and without ``input_norm`` when it is "clip", the only
        normalisation before the field existed: a run of that time resumes with
        ``input_norm="clip"``, and with "imagenet" it is refused (``input_norm: '(absent)'
        -> 'imagenet'``: it was trained with "clip").
        """
        identity = self.to_dict()
        del identity["teacher_method"]
        if identity["input_norm"] == "clip":
            del identity["input_norm"]
        return identity

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DistillConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown DistillConfig field(s) {unknown}; available: {sorted(fields)}")
        return cls(**values)


RECLIPPP_DISTILL = DistillConfig(teacher_method="reclip++")
# ReCLIP (the conference version): the same student and losses (its abstract: mask-, feature-
# and text-guided terms) taught by a ReCLIP rectifier, whose head (W_q, the dependent bias
# Z_hat W_r + ProjNet(PE), no decoder) the student inherits. The official code's student
# drops the positional term: head="query_reference".
RECLIP_DISTILL = DistillConfig(teacher_method="reclip")
# MaskCLIP+ (Zhou et al., the baseline of ReCLIP++ Tables I/II): MaskCLIP's argmax as
# pseudo labels, the query head alone, cross-entropy only.
MASKCLIP_PLUS = DistillConfig(teacher="maskclip", feat_loss=False, text_loss=False)
DISTILL_PRESETS = {"reclip++": RECLIPPP_DISTILL, "reclip": RECLIP_DISTILL, "maskclip+": MASKCLIP_PLUS}


class StudentBackbone(nn.Module):
    """ResNet (output stride 8) -> ASPP-V2 -> Conv1x1 to D -> L2 norm per cell: Z_hat (B, D, h, w)."""

    def __init__(self, name: str, embed_dim: int, aspp_channels: int = 512, weights: Any = None,
                 width: int = 64) -> None:
        super().__init__()
        self.resnet = build_student_backbone(name, weights, base_channels=width)
        self.aspp = ASPPV2(self.resnet.out_channels, aspp_channels)
        self.proj = nn.Conv2d(aspp_channels, embed_dim, kernel_size=1)
        self.embed_dim = embed_dim

    @property
    def stride(self) -> int:
        return self.resnet.stride

    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.proj(self.aspp(self.resnet(images))), dim=1)


class Student(DenseSegmentor):
    """The distilled student: :class:`StudentBackbone` + :class:`~reclip.heads.inherited.InheritedHead`.

    ``forward(images)`` is the segmentor interface (M_o unless ``select_output`` chose M or
    M_q); ``forward_train`` returns every intermediate on the student's grid. ``mean`` /
    ``std`` are the normalisation it was trained with (CLIP's), stored with it.
    """

    def __init__(self, backbone: StudentBackbone, head: InheritedHead, mean: tuple, std: tuple,
                 config: DistillConfig = RECLIPPP_DISTILL) -> None:
        super().__init__(backbone, head)
        self.image_mean, self.image_std = tuple(mean), tuple(std)
        self.config = config

    def select_output(self, name: str) -> Student:
        self.head.select_output(name)
        return self

    @property
    def query_weights(self) -> Tensor:
        return self.head.query_weights

    def forward_train(self, images: Tensor):
        """images (B, 3, H, W) -> RectifierOutputs on the grid of the input padded to the stride (as ``forward``)."""
        return self.head.outputs(self.features(pad_to_patch(images, self.backbone.stride)))


def _to_image(x: Tensor, size: tuple[int, int], stride: int) -> Tensor:
    """Grid maps (B, K, h, w) of an input of ``size`` -> (B, K, H, W), aligned (see align_to_input)."""
    x = align_to_input(x.float(), size, stride)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


class _Teacher:
    """The frozen teacher: Z and pseudo-label logits of a batch (CLIP-normalised), on the crop."""

    def __init__(self, segmentor: nn.Module, class_index: Tensor | None = None,
                 norm: tuple = (CLIP_MEAN, CLIP_STD)) -> None:
        self.segmentor = segmentor.eval()
        self.class_index = class_index
        self.norm = norm  # the normalisation of the batches it reads: CLIP's

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if next(self.segmentor.parameters()).device != images.device:  # each process's own device (DDP)
            self.segmentor.to(images.device)
            if self.class_index is not None:
                self.class_index = self.class_index.to(images.device)
        size = tuple(images.shape[-2:])
        stride = self.segmentor.backbone.stride
        padded = F.pad(images, (0, -size[1] % stride, 0, -size[0] % stride))
        z = self.segmentor.features(padded)
        logits = self.segmentor.head(z)  # (B, S, h, w): M_o of a rectifier, query logits of MaskCLIP
        if self.class_index is not None:  # synonyms -> one score per class (max)
            from reclip.postprocess import class_logits

            logits = class_logits(logits, self.class_index)
        return z, _to_image(logits, size, stride)  # Z on the teacher's grid, pseudo-label logits on the image

    @property
    def stride(self) -> int:
        return self.segmentor.backbone.stride


def distillation_loss(student: Student, teacher: _Teacher, config: DistillConfig, gumbel: dict[str, Any],
                      batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Eq. 10 on one batch: (loss, logged terms)."""
    images, valid = batch["image"], batch["valid"].to(batch["image"].device)
    size = tuple(images.shape[-2:])
    z_t, logits_t = teacher(images)
    out = student.forward_train(renormalise(images, teacher.norm, (student.image_mean, student.image_std)))
    stride = student.backbone.stride
    terms: dict[str, Tensor] = {}
    if config.mask_loss:
        pseudo = logits_t.argmax(1).masked_fill(~valid, 255)  # no label where the crop is padding
        cosines = student.head.decoder is None and student.head.classifier is None
        scale = config.ce_scale or (100.0 if cosines else 1.0)
        terms["mask"] = F.cross_entropy(scale * _to_image(out.decoded, size, stride), pseudo, ignore_index=255)
    if config.feat_loss:
        if config.feat_at == "image":  # paper: both resized to the image
            z_image = _to_image(z_t, size, teacher.stride)
            l1 = (_to_image(out.features, size, stride) - z_image).abs().mean(1)  # (B, H, W)
            terms["feat"] = config.alpha * l1[valid].mean()
        else:  # Z on the student's grid; a cell counts where its pixels are mostly the image's
            grid = tuple(out.features.shape[-2:])
            pad = (0, grid[1] * stride - size[1], 0, grid[0] * stride - size[0])  # the student's padded input
            if tuple(z_t.shape[-2:]) == grid and teacher.stride == stride:
                z_grid = z_t  # the same cells: the teacher's Z as it is
            else:
                z_grid = F.interpolate(F.pad(_to_image(z_t, size, teacher.stride), pad), size=grid, mode="area")
            cell_valid = F.interpolate(F.pad(valid[:, None].float(), pad), size=grid, mode="area")[:, 0] > 0.5
            l1 = (out.features - z_grid).abs().mean(1)  # (B, h, w)
            terms["feat"] = config.alpha * l1[cell_valid].mean()
    if config.text_loss:
        masks = gumbel_masks(out.decoded, tau=gumbel["tau"], scale=gumbel["scale"])
        terms["text"] = config.beta * contrastive_loss(out.features, masks, student.query_weights,
                                                       batch["hypotheses"].to(masks.device),
                                                       scale=gumbel["contrastive_scale"], pool=gumbel["pool"])
    loss = sum(terms.values())
    return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}


def _teacher_and_head(clip: CLIP, teacher_run: Any, config: DistillConfig, vocabulary: Vocabulary, crop: int,
                      text_cache: Any) -> tuple[_Teacher, Any, dict[str, Any], dict[str, Any]]:
    """The frozen teacher, a function making the head the student starts with, the Gumbel
    settings of L_text, and what identifies the teacher (its settings and weights' digest)."""
    if config.teacher == "rectified":
        run = load_run(teacher_run)
        if config.teacher_method is not None and run.config.get("method") != config.teacher_method:
            raise ValueError(f"{run.run_dir} is a {run.config.get('method')!r} run; this distillation preset needs a "
                             f"{config.teacher_method!r} teacher (--preset {run.config.get('method')} distils it)")
        rectifier = rectifier_from_run(run, clip, vocabulary, text_cache)
        rectifier.requires_grad_(False)
        rc = rectifier.config
        gumbel = {"tau": rc.gumbel_tau, "scale": rc.gumbel_scale, "contrastive_scale": rc.contrastive_scale,
                  "pool": rc.pool}
        digest = hashlib.sha256((run.run_dir / WEIGHTS_NAME).read_bytes()).hexdigest()[:16]
        identity = {"method": run.config["method"], "rectifier": run.config["rectifier"], "weights": digest}
        # a fresh head's new parts are drawn in build(), after the engine has seeded the generators
        parts = "all" if config.head == "inherited" else config.head
        # the teacher's grid at the training crop: its features' stride, CLIP's patch unless its
        # strategy reads Z on another grid (ProxyCLIP: the proxy's patch)
        grid = (-(-crop // rectifier.backbone.stride),) * 2
        return (_Teacher(rectifier, norm=(clip.image_mean, clip.image_std)),
                lambda: inherit(rectifier, grid, parts=parts), gumbel, identity)
    from reclip.methods import build_segmentor

    if teacher_run is not None:
        raise ValueError("a MaskCLIP teacher is CLIP itself: give no teacher run (MaskCLIP+)")
    maskclip = build_segmentor("maskclip", clip, vocabulary, templates=QUERY_TEMPLATES, text_cache=text_cache,
                               strategy_overrides=config.teacher_overrides)
    maskclip.requires_grad_(False)
    queries = query_embeddings(clip, vocabulary, QUERY_TEMPLATES, cache_dir=text_cache)
    w_q = class_query_weights(queries)
    index = None if queries.is_one_per_class else queries.class_index
    gumbel = {"tau": 1.0, "scale": 100.0, "contrastive_scale": 100.0, "pool": "official"}
    classifier = config.head == "deeplab"
    return (_Teacher(maskclip, index, norm=(clip.image_mean, clip.image_std)),
            lambda: InheritedHead(w_q, classifier=classifier), gumbel, {"method": "maskclip"})


def distill(
    clip: CLIP,
    teacher_run: str | os.PathLike | None,
    dataset: str | os.PathLike | Protocol,
    data_root: str | os.PathLike,
    hypotheses: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    config: DistillConfig = RECLIPPP_DISTILL,
    weights: Any = "imagenet",
    classes_file: str | os.PathLike | None = None,
    split: str = "train",
    max_steps: int | None = None,
    epochs: int | None = None,
    train_overrides: dict[str, Any] | None = None,
    base_short_side: int | None = None,
    crop: int | None = None,
    resume: bool = False,
    progress: bool = True,
    text_cache: Any = None,
    max_pixels: int | None = MAX_PIXELS,
    schedule: str | PolySchedule = "paper",
) -> TrainResult:
    """Train a student from a rectified teacher run (or MaskCLIP, ``config.teacher="maskclip"``).

    Args:
        teacher_run: the run directory of ``reclip rectify`` (None for MaskCLIP+).
        hypotheses: the image-level hypotheses of the train split (L_text).
        weights: the student backbone's initialisation: "imagenet" (downloaded by name;
            offline, a warning and a random start), a file, or None (random).
        epochs: the run's length when ``max_steps`` is None (default: the protocol's
            ``distill:`` preset, official VOC 100, Context and ADE 150, COCO 50).
        train_overrides: TrainConfig fields and ``lr`` (default: the ``distill:`` preset's
            batch 16 and lr 0.01; SGD momentum 0.9, weight decay 5e-4).
        schedule: "paper" (poly 0.9 over the run, per step: paper IV-A), "official" (the
            official code's: per epoch, clamped at 0.01 x lr, :data:`OFFICIAL_DISTILL_SCHEDULE`)
            or a :class:`~reclip.train.PolySchedule`.
        base_short_side, crop: augmentation (default: the protocol's ``distill:`` preset).
        classes_file, split, resume, progress, text_cache, max_pixels: as for
            :func:`reclip.rectification.rectify`.

    The logged "feat" and "text" terms include their weights alpha and beta. L_feat
    compares D-channel maps at the crop's size: at batch 16 and crop 512 each is ~8.6 GB
    in float32, so large crops need a smaller batch (or more devices).
    """
    protocol = dataset if isinstance(dataset, Protocol) else load_protocol(dataset)
    overrides = dict(train_overrides or {})
    unknown = sorted(set(overrides) - _TRAIN_FIELDS - {"lr"})
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; allowed: {sorted(_TRAIN_FIELDS | {'lr'})}")
    if classes_file is None:  # the ReCLIP family's own class names where the protocol names them
        classes_file = protocol.section_classes_path("reclip")
    images = SegmentationDataset(protocol, data_root, split, classes_file=classes_file, check_sizes=False,
                                 max_pixels=max_pixels)
    vocabulary = images.vocabulary
    preset = protocol.distill  # the protocol YAML's `distill:` section
    augment = {"base_short_side": base_short_side or preset.base_short_side, "crop": crop or preset.crop,
               "max_long_side": preset.max_long_side}
    hyp = load_hypotheses(hypotheses, vocabulary=vocabulary, clip=clip)
    trainset = UnlabeledTrainSet(images, hyp, vocabulary.num_classes, **augment, seed=overrides.get("seed", 0),
                                 mean=clip.image_mean, std=clip.image_std)
    teacher, make_head, gumbel, teacher_id = _teacher_and_head(clip, teacher_run, config, vocabulary,
                                                               augment["crop"], text_cache)
    batch_size = overrides.pop("batch_size", preset.batch_size)
    spe = steps_per_epoch(len(trainset), batch_size)
    if isinstance(schedule, str) and schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; available: {list(SCHEDULES)} or a PolySchedule")
    optimizer = SGDConfig(lr=overrides.pop("lr", preset.lr),
                          schedule=SCHEDULES[schedule] if isinstance(schedule, str) else schedule)
    steps = max_steps if max_steps is not None else (epochs or preset.epochs) * spe
    train_config = TrainConfig(steps=steps, batch_size=batch_size, **overrides)
    embed_dim = clip.visual.output_dim
    identity = {"method": "student", "distill": config.run_identity(), "teacher": teacher_id,
                "classes": vocabulary.to_lines(), "clip_fingerprint": weights_fingerprint(clip),
                "protocol": protocol.name, "split": split, "augment": augment, "weights": str(weights)}

    def build() -> Student:
        backbone = StudentBackbone(config.backbone, embed_dim, config.aspp_channels, weights, config.width)
        return Student(backbone, make_head(), *INPUT_NORMS[config.input_norm], config)

    def loss(model: Student, batch: dict[str, Any]):
        return distillation_loss(model, teacher, config, gumbel, batch)

    result = train(build, loss, trainset, train_config, run_dir, optimizer=optimizer, run_settings=identity,
                   resume=resume, progress=progress)
    save_student_run(run_dir, result.model, vocabulary, teacher=teacher_id, clip=getattr(clip, "spec", None),
                     clip_fingerprint=weights_fingerprint(clip), train=dataclasses.asdict(train_config),
                     optimizer=describe(optimizer), augment=augment, protocol=protocol.name, split=split,
                     hypotheses=str(hypotheses), train_images=len(trainset))
    return result


def save_student_run(run_dir: str | os.PathLike, model: Student, vocabulary: Vocabulary, **extra: Any) -> None:
    """RUN_DIR/config.json + model.safetensors: everything the student needs, CLIP not included."""
    head = model.head
    save_run(run_dir, {
        "method": "student",
        "distill": model.config.to_dict(),
        "classes": vocabulary.to_lines(),
        "embed_dim": model.backbone.embed_dim,
        "decoder": head.decoder is not None,
        "bias": head.bias_map is not None,
        "reference": head.reference is not None,
        "classifier": head.classifier is not None,
        "grid": list(head.bias_map.shape[-2:]) if head.bias_map is not None else None,
        "dependent": head.dependent,
        "bias_op": head.bias_op,
        "image_mean": list(model.image_mean),
        "image_std": list(model.image_std),
        **extra,
    }, model)


def student_from_run(run: RunFiles, clip: CLIP | None = None, vocabulary: Vocabulary | None = None,
                     text_cache: Any = None) -> Student:
    """The student of a finished run, in eval mode. CLIP is not needed (its W_q, W_r and
    positional bias are stored); ``vocabulary`` must be the run's if given."""
    saved = run.config
    trained = Vocabulary.from_names(saved["classes"], shared_names=True)
    if vocabulary is not None and vocabulary != trained:
        raise ValueError(f"{run.run_dir} was distilled for the classes {list(trained.names)}, not "
                         f"{list(vocabulary.names)}: pass --classes-file with the run's list")
    # a student distilled before input_norm existed was fed CLIP's normalisation (its saved image_mean is CLIP's)
    config = DistillConfig.from_dict({"input_norm": "clip", **saved["distill"]})
    C, D = trained.num_classes, int(saved["embed_dim"])
    grid = tuple(saved.get("grid") or (1, 1))
    has_reference = saved.get("reference", saved.get("bias"))  # runs before "reference" was saved
    head = InheritedHead(torch.zeros(C, D), torch.zeros(C, D) if has_reference else None,
                         torch.zeros(1, C, *grid) if saved.get("bias") else None,
                         MaskDecoder(D, C) if saved.get("decoder") else None,
                         dependent=bool(saved.get("dependent")), bias_op=saved.get("bias_op", "subtract"),
                         trainable=config.head == "fresh", classifier=bool(saved.get("classifier")))
    backbone = StudentBackbone(config.backbone, D, config.aspp_channels, weights=None, width=config.width)
    model = Student(backbone, head, saved["image_mean"], saved["image_std"], config)
    state = dict(run.state_dict)
    missing = sorted(set(model.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{run.run_dir}: the student's weights do not fit its config.json "
                         f"(missing {missing[:6]}, unexpected {unexpected[:6]})")
    model.load_state_dict(state)
    return model.eval()


def load_student(run_dir: str | os.PathLike, vocabulary: Vocabulary | None = None) -> Student:
    """The student of ``run_dir`` (see :func:`student_from_run`)."""
    return student_from_run(load_run(run_dir), None, vocabulary)
