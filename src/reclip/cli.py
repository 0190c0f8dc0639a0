"""The ``reclip`` command line; every command is a thin layer over ``reclip.api``.

    reclip segment  --clip SPEC --method maskclip --classes "cat,dog" --out DIR IMAGES...
    reclip evaluate --clip SPEC --method clearclip --dataset voc20 --data-root DIR --json OUT.json
    reclip evaluate --clip SPEC --method naclip --test-settings naclip --dataset voc21 --data-root DIR
    reclip hypotheses --clip SPEC --dataset voc20 --data-root DIR --split train --out hyp.json
    reclip hypotheses --clip SPEC --dataset voc20 --data-root DIR --split train --out hyp.json
    reclip rectify  --clip SPEC --dataset voc20 --data-root DIR --hypotheses hyp.json --out RUN_DIR
    reclip evaluate --clip SPEC --method reclip++ --checkpoint RUN_DIR --dataset voc20 --data-root DIR
    reclip evaluate --clip SPEC --method ipclip --proposals from:naclip --dataset voc20 --data-root DIR
    reclip maft     --clip SPEC --dataset cocostuff171 --data-root DIR --proposals SRC --out RUN_DIR
                    --unseen-classes cocostuff171_unseen.txt              (SUPERVISED on the seen classes)
    reclip maft     --clip SPEC --dataset voc20 --data-root DIR --proposals from:RUN_DIR --out RUN_DIR
                    --supervision pseudo --teacher RUN_DIR                (no label read)
    reclip evaluate --clip SPEC --method maft --checkpoint RUN_DIR --proposals SRC --unseen-classes FILE ...
    reclip probe    --clip SPEC --method student --checkpoint RUN_DIR --dataset voc20 --data-root DIR  (SUPERVISED)
    reclip demo     [--out DIR]
    reclip bench
    reclip methods | datasets

    torchrun --nproc-per-node N -m reclip.cli evaluate | hypotheses | segment ...
                    (the images split over N processes; rank 0 prints and writes the one result)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from reclip import api
from reclip.clip.convert import CheckpointError
from reclip.data.io import DECODE_FACTOR, MAX_PIXELS
from reclip.data.protocol import list_protocols, load_protocol
from reclip.features import ATTENTIONS, get_strategy
from reclip.heads.reference import NAME_TOKENS
from reclip.families.rectified import PD_CHOICES, PD_HELP
from reclip.heads.rectify import ABLATIONS, OUTPUTS
from reclip.methods import METHODS, TEST_SETTINGS
from reclip.templates import TEMPLATE_SETS
from reclip.toy.world import CLASS_SETS
from reclip.train.distributed import Processes, is_rank0, setup_processes

STUDENT_BACKBONE_NAMES = ("resnet101", "resnet50-v1c", "resnet50", "resnet18")  # reclip.backbones.resnet


CLIP_CONFIG_HELP = (
    "open_clip config of the --clip weights: open_clip's model_configs/<name>.json or a hub open_clip_config.json. "
    "open_clip checkpoints do not record their attention heads; without it they are guessed (width // 64). "
    "Wins over an open_clip_config.json beside the weights"
)


def _ranged(kind: type, low: float, high: float | None = None, *, above: bool = False):
    """An argparse ``type``: ``kind(text)`` checked to be >= ``low`` (> with ``above``) and <= ``high``.

    One helper for every numeric option, so that 0, negative, NaN and infinite values are
    refused with the option's name before anything is loaded.
    """
    if low == -math.inf and high is None:
        what = "a finite number"
    else:
        interval = f"> {low:g}" if above else f">= {low:g}"
        if high is not None:
            interval = f"in {'(' if above else '['}{low:g}, {high:g}]"
        what = f"{'an integer' if kind is int else 'a number'} {interval}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if above else value >= low)
                and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what
    return parse


POSITIVE_INT = _ranged(int, 1)  # sizes, counts of images / steps / windows
COUNT = _ranged(int, 0)  # may be 0 (worker processes: 0 = none)
POSITIVE = _ranged(float, 0, above=True)  # scales, learning rates
FRACTION = _ranged(float, 0, 1)  # probabilities and area / vote fractions
FINITE = _ranged(float, -math.inf)  # any real number, not NaN or infinite


def _dilations(text: str) -> tuple[int, ...]:
    """--pamr-dilations value: comma-separated positive integers, e.g. 8,16."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers (e.g. 8,16 for NACLIP; PAMR's own 1,2,4,8,12,24), got {text!r}")
    return values


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--clip", required=True, metavar="SPEC",
                   help="CLIP weights: a name (ViT-B/16, ViT-L/14, ...), an OpenAI/open_clip checkpoint "
                        "file or a Hugging Face CLIP folder")
    g.add_argument("--method", default="maskclip", choices=sorted(METHODS), help="segmentation method")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--templates", choices=sorted(TEMPLATE_SETS), help="prompt templates (default: the method's)")
    g.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="activation of open_clip checkpoints without a config (default: inferred)")
    g.add_argument("--clip-config", metavar="FILE", help=CLIP_CONFIG_HELP)
    g.add_argument("--checkpoint", metavar="RUN_DIR", help="trained head of reclip++ / reclip (from `reclip rectify`)")
    g.add_argument("--output", choices=tuple(OUTPUTS),
                   help="which logits of a trained reclip++/reclip head to segment with: decoded (M_o, default, "
                        "the paper's), rectified (M = M_q - M_b) or query (M_q, CLIP's own)")
    s = p.add_argument_group("dense-feature strategy overrides (last-block ones: ClearCLIP's decomposition)")
    s.add_argument("--attention", choices=ATTENTIONS, help="last-block attention")
    s.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the last block's residual")
    s.add_argument("--ffn", action=argparse.BooleanOptionalAction, default=None, help="keep the last block's FFN")
    _add_strategy_option_args(s)


def _add_strategy_option_args(s: Any) -> None:
    s.add_argument("--proxy", metavar="SPEC",
                   help="proxyclip's proxy model: a name (dino_vitb8, the default; dino_vits16, dinov2_vitb14_reg, "
                        "...: downloaded and sha256-checked) or the path of its official .pth checkpoint")
    s.add_argument("--strategy-option", metavar="FIELD=VALUE", action="append", type=_field_value, default=[],
                   help="set any field of the method's dense-feature strategy (repeatable; VALUE read as JSON, "
                        "else as a string), e.g. --strategy-option rcs_lambda=0.3; the fields are the strategy's "
                        "(reclip.features.STRATEGIES)")


def _add_proposals_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--proposals", metavar="SRC",
                   help=f"mask proposals for maft / ipclip (required there): {api.PROPOSALS_HELP}")


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference (default: the protocol's published settings)")
    g.add_argument("--test-settings", choices=TEST_SETTINGS,
                   help="which published test settings of the protocol to start from (flags below override them): "
                        "zero_shot (training-free default: ClearCLIP's protocol, one for every method), naclip "
                        "(NACLIP's own: short side 336, Cityscapes 560, 224/112 windows, whole image on VOC, logit "
                        "scale 40, its thresholds and class files, PAMR 10 x (8, 16)), reclip (rectified default)")
    g.add_argument("--mode", choices=("whole", "slide"))
    g.add_argument("--short-side", type=POSITIVE_INT, help="resize the short side to this before inference")
    g.add_argument("--window", type=POSITIVE_INT, help="sliding-window size")
    g.add_argument("--stride", type=POSITIVE_INT, help="sliding-window stride")
    g.add_argument("--batch-size", type=POSITIVE_INT,
                   help="windows per forward pass in slide mode (default 16); windows of consecutive images share "
                        "these batches")
    g.add_argument("--whole-batch-size", type=POSITIVE_INT,
                   help="images per forward pass in whole mode (default 1: one image at a time, the memory of the "
                        "largest image); N > 1 batches up to N images of one size (same results), so one forward "
                        "holds N images: raise it only when they fit")
    g.add_argument("--logit-scale", type=POSITIVE, help="scale of cosine logits before the softmax")
    g.add_argument("--prob-thd", type=FRACTION, help="background probability threshold (SCLIP family)")
    g.add_argument("--pd-threshold", type=FRACTION,
                   help="prompt-denoising threshold (ReCLIP); replaces the protocol's with --prompt-denoising "
                        "official or official-safe, alone it runs the project's PD (official-safe)")
    g.add_argument("--prompt-denoising", choices=PD_CHOICES,
                   help="reclip++/reclip: " + "; ".join(f"{name} = {PD_HELP[name]}" for name in PD_CHOICES))
    g.add_argument("--pamr", action=argparse.BooleanOptionalAction, default=None, help="PAMR refinement")
    g.add_argument("--pamr-iter", type=POSITIVE_INT,
                   help="PAMR iterations (default: the test settings', else 10)")
    g.add_argument("--pamr-dilations", type=_dilations, metavar="D,D,...",
                   help="PAMR dilations, comma-separated (default: the test settings', else 1,2,4,8,12,24; "
                        "NACLIP: 8,16)")
    g.add_argument("--max-long-side", type=POSITIVE_INT, help="cap on the long side of the short-side resize")
    g.add_argument("--area-thd", type=FRACTION,
                   help="SCLIP's area filter: drop classes below this fraction of the predicted foreground")
    g.add_argument("--autocast", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision on a GPU (default auto: bf16 on CUDA, off on CPU)")
    g.add_argument("--compile", action="store_true", default=None,
                   help="run the segmentor through torch.compile (off by default): the first forward of each new "
                        "input shape compiles, which takes seconds to minutes, so it pays only on long runs of few "
                        "shapes (slide mode's fixed windows); evaluate compiles before its timer (the first image's "
                        "shapes) and reports that warm-up apart")


def _add_workers_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=COUNT, default=1,
                   help="processes reading, resizing and normalising images ahead of the model (0: none)")
    p.add_argument("--prefetch", type=POSITIVE_INT, default=api.PREFETCH,
                   help=f"images each worker keeps ready ahead of the model (default {api.PREFETCH})")


def _max_pixels(text: str) -> int | None:
    """--max-pixels value: a positive pixel count, WxH (e.g. 4096x4096), or none."""
    if text.strip().lower() == "none":
        return None
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) in (1, 2) and all(v > 0 for v in parts):
        return parts[0] * (parts[1] if len(parts) == 2 else 1)
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a pixel count; give a positive number (16777216), WxH (4096x4096) or none (no limit)")


def _add_max_pixels_arg(p: argparse.ArgumentParser, labels: bool) -> None:
    label_text = (f"; labels are never resized and those over {DECODE_FACTOR} x this many pixels are skipped"
                  if labels else "")
    p.add_argument("--max-pixels", type=_max_pixels, default=MAX_PIXELS, metavar="N",
                   help=f"images with more pixels are read downscaled to N (aspect kept), or skipped when that would "
                        f"decode over {DECODE_FACTOR} x N pixels; a number, WxH or none (default 4096x4096 = "
                        f"{MAX_PIXELS}){label_text}")


def _inference_overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("test_settings", "mode", "short_side", "max_long_side", "window", "stride", "batch_size", "whole_batch_size",
            "logit_scale",
            "prob_thd", "area_thd", "pd_threshold", "prompt_denoising", "pamr", "pamr_iter", "pamr_dilations", "compile")
    values = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.autocast is not None:
        values["autocast"] = False if args.autocast == "off" else args.autocast
    return values


def _field_value(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` -> (FIELD, VALUE read as JSON, else the string)."""
    field, sep, value = text.partition("=")
    if not sep or not field.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return field.strip(), tuple(parsed) if isinstance(parsed, list) else parsed


def _strategy_overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = {k: getattr(args, k) for k in ("attention", "residual", "ffn", "proxy")
              if getattr(args, k, None) is not None}
    for field, value in getattr(args, "strategy_option", None) or []:
        if field in values and values[field] != value:
            raise SystemExit(f"reclip: error: --strategy-option {field}={value!r} contradicts --{field}")
        values[field] = value
    return values


def _load(args: argparse.Namespace):
    from reclip.clip import load_clip

    return load_clip(args.clip, device=_device(args.device), quick_gelu=args.quick_gelu, config=args.clip_config)


def _join_processes(args: argparse.Namespace) -> Processes | None:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA);
    ``args.device`` becomes this rank's device (cuda:LOCAL_RANK) and ``args.quiet`` is set
    on every rank but 0, which alone prints and writes. None in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if args.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {args.device!r} under torchrun: give auto, cpu or cuda; each process takes the "
                         "GPU of its LOCAL_RANK")
    procs = setup_processes(args.device)
    args.device = str(procs.device)
    if procs.rank != 0:
        args.quiet = True
    return procs


def _distributed(command):
    """A command that splits its images over torchrun's processes (``torchrun
    --nproc-per-node N -m reclip.cli COMMAND ...``); the command reports and writes its
    results on rank 0 only (``is_rank0``)."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        procs = _join_processes(args)
        try:
            code = command(args)
            if procs is not None:
                dist.barrier()  # no rank leaves the group while another still works in it
            return code
        finally:
            if procs is not None:
                procs.close()
    return run


@_distributed
def cmd_segment(args: argparse.Namespace) -> int:
    # --classes is names and --classes-file a file, whatever exists on disk (argparse
    # makes them exclusive and one of them required)
    classes = api.as_vocabulary(Path(args.classes_file) if args.classes_file is not None else args.classes)
    clip = _load(args)
    summary = api.segment_files(
        clip, args.method, classes, args.inputs, args.out,
        inference=_inference_overrides(args), background=args.background,
        strategy_overrides=_strategy_overrides(args), templates=args.templates,
        checkpoint=args.checkpoint, output=args.output, progress=not args.quiet, max_pixels=args.max_pixels,
        proposals=args.proposals, num_workers=args.workers, prefetch=args.prefetch,
    )
    if not is_rank0():  # under torchrun: rank 0 reports for all
        return 0 if summary.written else 1
    print(f"wrote {len(summary.written)} masks to {args.out} in {summary.seconds:.1f} s "
          f"({len(summary.skipped)} skipped)")
    for path, reason in summary.skipped:
        print(f"  skipped {path}: {reason}")
    for path, (height, width), (h, w) in summary.downscaled:
        print(f"  downscaled {path}: {width} x {height} read as {w} x {h} (--max-pixels); its mask has that size")
    if not summary.written:
        print(f"reclip segment: error: no image could be read ({len(summary.skipped)} skipped, listed above)",
              file=sys.stderr)
        return 1
    return 0


@_distributed
def cmd_evaluate(args: argparse.Namespace) -> int:
    clip = _load(args)
    result = api.evaluate(
        clip, args.method, args.dataset, args.data_root, args.split,
        classes_file=args.classes_file, inference=_inference_overrides(args),
        strategy_overrides=_strategy_overrides(args), templates=args.templates,
        absent_as_zero=args.absent_as_zero, bias=args.bias, limit=args.limit, label_dir=args.label_dir,
        num_workers=args.workers, prefetch=args.prefetch, checkpoint=args.checkpoint, output=args.output,
        progress=not args.quiet, max_pixels=args.max_pixels, proposals=args.proposals,
        unseen_classes=args.unseen_classes,
        seen_classes=args.seen_classes,
    )
    if not is_rank0():  # under torchrun: rank 0 reports and writes for all
        return 0
    print(result.table())
    print(f"{result.method} on {result.protocol}/{result.split}: mIoU {100 * result.miou:.2f} over "
          f"{result.num_images} images in {result.seconds:.1f} s ({len(result.skipped)} skipped)"
          + (f", after a {result.warmup_seconds:.1f} s torch.compile warm-up" if result.warmup_seconds else ""))
    if "hIoU" in result.metrics:
        m = result.metrics
        print(f"zero-shot split ({len(result.settings['zero_shot']['unseen'])} unseen classes): mIoU seen "
              f"{100 * m['mIoU_seen']:.2f}, unseen {100 * m['mIoU_unseen']:.2f}, hIoU {100 * m['hIoU']:.2f}")
    for path, reason in result.skipped:
        print(f"  skipped {path}: {reason}")
    if result.downscaled:
        print(f"  {len(result.downscaled)} image(s) over --max-pixels were segmented downscaled and scored at "
              f"their label's size, e.g. {result.downscaled[0]}")
    if result.bias is not None:
        print(result.bias_summary())
        if args.plots:
            from reclip.report import plot_confusion, plot_space_curves

            title = f"{result.method} on {result.protocol}"
            for path in (plot_confusion(result.confusion, result.class_names, Path(args.plots) / "confusion.png", title),
                         plot_space_curves({result.method: result.bias["space_preference"]},
                                           Path(args.plots) / "space_preference.png", title)):
                print(f"wrote {path}")
    if args.json:
        print(f"wrote {result.save_json(args.json)}")
    return 0


@_distributed
def cmd_hypotheses(args: argparse.Namespace) -> int:
    from reclip.data.datasets import SegmentationDataset
    from reclip.hypotheses import config_for_protocol, generate_hypotheses
    from reclip.text import query_embeddings

    protocol = load_protocol(args.dataset)
    # hypotheses serve the ReCLIP family's training: its own class names unless a file is given
    classes_file = args.classes_file if args.classes_file is not None else protocol.section_classes_path("reclip")
    data = SegmentationDataset(protocol, args.data_root, args.split, classes_file=classes_file,
                               check_sizes=False, max_pixels=args.max_pixels)
    config = config_for_protocol(data.protocol, rule=args.rule, r=args.r, t=args.t, threshold=args.threshold,
                                 top_k=args.top_k, batch_size=args.batch_size, resize=args.resize)
    clip = _load(args)
    queries = query_embeddings(clip, data.vocabulary, templates=args.templates, progress=not args.quiet)
    summary = generate_hypotheses(clip, data, queries, config=config, out_path=args.out, progress=not args.quiet,
                                  resume=args.resume, templates=args.templates, save_every=args.save_every)
    if not is_rank0():  # under torchrun: rank 0 reports for all
        return 0 if summary.num_images else 1
    print(f"wrote hypotheses of {summary.num_images} images ({summary.computed} computed now; rule {config.rule}, "
          f"r {config.r:.4g}, t {config.t:.4g}) to {summary.path} in {summary.seconds:.1f} s "
          f"({len(summary.skipped)} skipped)")
    for image_id, reason in summary.skipped:
        print(f"  skipped {image_id}: {reason}")
    if not summary.num_images:
        print(f"reclip hypotheses: error: no image could be read ({len(summary.skipped)} skipped, listed above)",
              file=sys.stderr)
        return 1
    return 0


def cmd_rectify(args: argparse.Namespace) -> int:
    import dataclasses

    from reclip.heads.rectify import ABLATIONS, PRESETS
    from reclip.rectification import rectify

    config = ABLATIONS[args.ablation] if args.ablation else PRESETS[args.method]
    strategy = args.features or config.strategy
    overrides = _strategy_overrides(args)
    if overrides:  # e.g. --features maskclip --no-residual --no-ffn
        strategy = get_strategy(strategy, **overrides)
    switches = {"strategy": strategy, "reference_length": args.reference_length, "gumbel_scale": args.gumbel_scale,
                "reference_name_tokens": args.reference_name_tokens}
    config = dataclasses.replace(config, **{k: v for k, v in switches.items() if v is not None})
    train = _training_overrides(args)
    result = rectify(
        _load(args), args.dataset, args.data_root, args.hypotheses, args.out, method=args.method, config=config,
        classes_file=args.classes_file, split=args.split, max_steps=args.max_steps, train_overrides=train,
        base_short_side=args.base_short_side, crop=args.crop, resume=args.resume, progress=not args.quiet,
        max_pixels=args.max_pixels,
    )
    print(f"trained {args.method} for {result.step} steps: {args.out}/model.safetensors + config.json")
    clip_config = f" --clip-config {args.clip_config}" if args.clip_config else ""
    print(f"use it with: reclip evaluate --method {args.method} --checkpoint {args.out} --clip {args.clip}"
          f"{clip_config} ...")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    import dataclasses

    from reclip.distillation import DISTILL_PRESETS, distill

    config = DISTILL_PRESETS[args.preset]
    switches = {"backbone": args.backbone, "mask_loss": args.mask_loss, "feat_loss": args.feat_loss,
                "text_loss": args.text_loss, "head": args.head, "feat_at": args.feat_at,
                "input_norm": args.input_norm}
    config = dataclasses.replace(config, **{k: v for k, v in switches.items() if v is not None})
    if (config.teacher == "rectified") == (args.teacher is None):
        print(f"reclip distill: error: --preset {args.preset} "
              + ("needs --teacher RUN_DIR (a `reclip rectify` run)" if args.teacher is None
                 else "distils MaskCLIP itself and takes no --teacher"), file=sys.stderr)
        return 2
    train = _training_overrides(args)
    weights = None if args.weights.lower() == "none" else args.weights
    result = distill(
        _load(args), args.teacher, args.dataset, args.data_root, args.hypotheses, args.out, config=config,
        weights=weights, classes_file=args.classes_file, split=args.split, max_steps=args.max_steps,
        epochs=args.epochs, train_overrides=train, base_short_side=args.base_short_side, crop=args.crop,
        resume=args.resume, progress=not args.quiet, max_pixels=args.max_pixels, schedule=args.schedule,
    )
    print(f"distilled a {config.backbone} student for {result.step} steps: {args.out}/model.safetensors + config.json")
    print(f"use it with: reclip evaluate --method student --checkpoint {args.out} --clip {args.clip} ...")
    return 0


def cmd_maft(args: argparse.Namespace) -> int:
    from reclip.maft.train import MAFT_BASE_SHORT_SIDE, MAFT_CROP, MAFT_STEPS, finetune_maft

    if (args.supervision == "pseudo") != (args.teacher is not None):
        print("reclip maft: error: " + ("--supervision pseudo needs --teacher RUN_DIR (a `reclip rectify` run)"
                                        if args.teacher is None else
                                        "--teacher is the pseudo labels' rectifier: give it with --supervision pseudo"),
              file=sys.stderr)
        return 2
    train = _training_overrides(args)
    result = finetune_maft(
        _load(args), args.dataset, args.data_root, args.out, proposals=args.proposals, supervision=args.supervision,
        teacher_run=args.teacher, seen_classes=args.seen_classes, unseen_classes=args.unseen_classes,
        classes_file=args.classes_file, split=args.split, start_layer=args.start_layer, templates=args.templates,
        max_proposals=args.max_proposals, max_steps=args.max_steps or MAFT_STEPS, train_overrides=train,
        base_short_side=args.base_short_side or MAFT_BASE_SHORT_SIDE, crop=args.crop or MAFT_CROP, resume=args.resume,
        progress=not args.quiet, max_pixels=args.max_pixels,
    )
    print(f"fine-tuned CLIP with MAFT ({args.supervision}) for {result.step} steps: {args.out}/model.safetensors + "
          "config.json")
    clip_config = f" --clip-config {args.clip_config}" if args.clip_config else ""
    print(f"use it with: reclip evaluate --method maft --checkpoint {args.out} --proposals SRC --clip {args.clip}"
          f"{clip_config} ...")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from reclip.probe import probe, supervised_banner

    result = probe(
        _load(args), args.method, args.dataset, args.data_root, train_split=args.train_split, split=args.split,
        checkpoint=args.checkpoint, classes_file=args.classes_file, label_dir=args.label_dir,
        strategy_overrides=_strategy_overrides(args), max_pixels=args.max_pixels, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, short_side=args.short_side, max_long_side=args.max_long_side, crop=args.crop,
        seed=args.seed, limit_train=args.limit_train, limit=args.limit, num_workers=args.workers,
        autocast=False if args.autocast == "off" else args.autocast, progress=not args.quiet,
    )
    info = result.probe
    print(supervised_banner(result.settings["features"]))
    print(f"(not an unsupervised result: a 1x1 classifier trained on {info['train_images']} labelled "
          f"{info['train_split']} images, {info['epochs']} epochs, short side {info['short_side']}, "
          f"crop {info['crop']}, seed {info['seed']})")
    print(result.table())
    print(f"linear probe of {result.method} on {result.protocol}/{result.split}: mIoU {100 * result.miou:.2f} over "
          f"{result.num_images} images in {result.seconds:.1f} s ({len(result.skipped)} skipped; "
          f"{len(info['train_skipped'])} training images skipped)")
    for path, reason in result.skipped:
        print(f"  skipped {path}: {reason}")
    for entry in info["train_skipped"]:
        print(f"  skipped (training) {entry['path']}: {entry['error']}")
    if args.json:
        print(f"wrote {result.save_json(args.json)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from reclip.demo import run_demo
    from reclip.toy.pretrain import ToyConfig
    from reclip.toy.world import WorldConfig

    run_demo(args.out, config=ToyConfig(world=WorldConfig(classes=args.world)), progress=not args.quiet)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from reclip.bench import main as bench_main

    return bench_main(device=args.device, images=args.images)


def cmd_methods(args: argparse.Namespace) -> int:
    for m in METHODS.values():
        print(f"{m.name:<10} {m.family:<10} {m.summary}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    for name in list_protocols():
        print(f"{name:<14} {load_protocol(name).description}")
    return 0


def _add_training_args(p: argparse.ArgumentParser, preset: str, *, hypotheses: bool = True,
                       defaults: dict[str, str] | None = None, classes_help: str | None = None) -> None:
    """The data, run and optimiser options every training command takes; ``preset`` names the
    protocol YAML section their defaults come from (``rectify`` or ``distill``), unless
    ``defaults`` gives an option's default as text (``maft``: fixed values). ``hypotheses``:
    the command reads image-level hypotheses (``--hypotheses``, required)."""
    fixed = defaults or {}
    preset_value = f"the dataset's {preset} preset"

    def default(option: str, otherwise: str = preset_value) -> str:
        return fixed.get(option, otherwise)

    p.add_argument("--dataset", required=True, help="protocol name or a protocol .yaml file (its train split is used)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--classes-file", help=classes_help or "class list replacing the ReCLIP family's (the protocol's "
                                                          "reclip.classes_file, else its own list)")
    if hypotheses:
        p.add_argument("--hypotheses", required=True, help="the file of `reclip hypotheses` for this CLIP and classes")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    steps = default("max-steps", f"the {preset} preset's epochs")
    p.add_argument("--max-steps", type=POSITIVE_INT, help=f"stop after N steps (default: {steps})")
    p.add_argument("--batch-size", type=POSITIVE_INT, help=f"global batch (default: {default('batch-size')})")
    p.add_argument("--lr", type=POSITIVE, help=f"learning rate (default: {default('lr', 'SGD, ' + preset_value)})")
    p.add_argument("--seed", type=COUNT)
    p.add_argument("--crop", type=POSITIVE_INT, help=f"training crop (default: {default('crop')})")
    p.add_argument("--base-short-side", type=POSITIVE_INT,
                   help=f"augmentation base scale (default: {default('base-short-side')})")
    p.add_argument("--checkpoint-every", type=POSITIVE_INT, help="steps between checkpoints")
    p.add_argument("--workers", type=COUNT, help="data-loading processes (0: none)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in RUN_DIR exactly")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--clip-config", metavar="FILE", help=CLIP_CONFIG_HELP)
    _add_max_pixels_arg(p, labels=False)


def _training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig fields and lr given on the command line."""
    return {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr), ("seed", args.seed),
                              ("checkpoint_every", args.checkpoint_every), ("workers", args.workers))
            if v is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reclip", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("segment", parents=[common], help="segment images into class masks")
    _add_model_args(p)
    classes = p.add_mutually_exclusive_group(required=True)
    classes.add_argument("--classes", metavar="NAMES",
                         help="comma-separated class names, one name per class (never read as a file)")
    classes.add_argument("--classes-file", metavar="FILE",
                         help="class file: one class per line, synonyms separated by commas")
    p.add_argument("--background", action="store_true",
                   help="the first class is background (used by --prob-thd)")
    p.add_argument("--out", required=True, help="output folder for masks, overlays and legend")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    _add_workers_args(p)
    _add_proposals_arg(p)
    _add_max_pixels_arg(p, labels=False)
    _add_inference_args(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("evaluate", parents=[common], help="mIoU of a method on a dataset protocol")
    _add_model_args(p)
    p.add_argument("--dataset", required=True,
                   help=f"protocol name ({', '.join(list_protocols())}) or a protocol .yaml file")
    p.add_argument("--data-root", required=True, help="dataset root (e.g. VOCdevkit/VOC2012)")
    p.add_argument("--split", default="val")
    p.add_argument("--classes-file", help="class list replacing the protocol's (and the method's own: ReCLIP's "
                                          "names for reclip++/reclip, NACLIP's for --test-settings naclip), "
                                          "in label-id order")
    p.add_argument("--absent-as-zero", action="store_true",
                   help="official ReCLIP mean: classes that never occur count as 0")
    p.add_argument("--bias", action="store_true",
                   help="also the class- and space-preference bias scores (ReCLIP++ Table VII)")
    p.add_argument("--plots", help="with --bias: write the confusion-matrix and space-preference plots here")
    p.add_argument("--label-dir", help="label folder replacing the protocol's (required to score `folder`)")
    p.add_argument("--limit", type=POSITIVE_INT, help="only the first N images (a quick look, not a result)")
    _add_workers_args(p)
    p.add_argument("--json", help="write the metrics, per-class IoU and settings here")
    _add_proposals_arg(p)
    split = p.add_mutually_exclusive_group()
    split.add_argument("--unseen-classes", metavar="FILE",
                       help="zero-shot split: a file of the unseen classes' names, one per line (as given, else in "
                            "the package's configs/classes/, e.g. cocostuff171_unseen.txt); also reports mIoU of the "
                            "seen and the unseen classes and their harmonic mean hIoU")
    split.add_argument("--seen-classes", metavar="FILE",
                       help="zero-shot split by its seen classes, one name per line (the rest are unseen), as for "
                            "`reclip maft`; reports the same scores")
    _add_max_pixels_arg(p, labels=True)
    _add_inference_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("hypotheses", parents=[common],
                       help="image-level class hypotheses of a training split (ReCLIP++ eq. 6)")
    p.add_argument("--clip", required=True, metavar="SPEC", help="CLIP weights (as for segment / evaluate)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="activation of open_clip checkpoints without a config (default: inferred)")
    p.add_argument("--clip-config", metavar="FILE", help=CLIP_CONFIG_HELP)
    p.add_argument("--dataset", required=True,
                   help=f"protocol name ({', '.join(list_protocols())}) or a protocol .yaml file")
    p.add_argument("--data-root", required=True, help="dataset root (e.g. VOCdevkit/VOC2012)")
    p.add_argument("--split", default="train")
    p.add_argument("--classes-file", help="class list replacing the ReCLIP family's (the protocol's "
                                          "reclip.classes_file, else its own list)")
    p.add_argument("--templates", default="reclip85", choices=sorted(TEMPLATE_SETS),
                   help="query prompt templates (default: ReCLIP's 85)")
    p.add_argument("--out", required=True, help="hypotheses JSON file (resumed if it exists)")
    p.add_argument("--rule", default="windows", choices=("windows", "any_vote", "whole_image"),
                   help="windows: paper eq. 6 (f > t); any_vote: official code (>= 1 vote); "
                        "whole_image: ReCLIP conference rule")
    p.add_argument("--r", type=_ranged(float, 0, 1, above=True),
                   help="window / image side (default: the protocol's hypotheses.r, 1/6)")
    p.add_argument("--window-ratio", dest="r", type=_ranged(float, 0, 1, above=True),
                   help="--r under torchrun, whose own parser reads --r as an abbreviation of its options")
    p.add_argument("--t", type=FRACTION,
                   help="vote-frequency threshold (default: the protocol's hypotheses.t; paper IV-A: 0.07 for "
                        "VOC / Cityscapes, 0 otherwise)")
    p.add_argument("--threshold", type=FINITE,
                   help="whole_image: threshold on logit_scale x cosine (100 x cosine for OpenAI weights; "
                        "default: the protocol's hypotheses.threshold)")
    p.add_argument("--top-k", type=POSITIVE_INT,
                   help="whole_image: classes kept when none passes (default: the protocol's hypotheses.top_k)")
    p.add_argument("--resize", choices=("clip", "squash"),
                   help="crop -> CLIP input: clip = short side + centre crop (default), squash = to a square")
    p.add_argument("--batch-size", type=POSITIVE_INT, help="crops per CLIP forward pass (default 64)")
    p.add_argument("--save-every", type=POSITIVE_INT, default=16, help="images between atomic rewrites of --out")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue an existing --out (default) or overwrite it (--no-resume)")
    _add_max_pixels_arg(p, labels=False)
    p.set_defaults(func=cmd_hypotheses)

    p = sub.add_parser("rectify", parents=[common], help="train the ReCLIP++ rectifier on unlabelled images")
    p.add_argument("--clip", required=True, metavar="SPEC", help="CLIP weights (as for segment)")
    p.add_argument("--method", default="reclip++", choices=("reclip++", "reclip"))
    p.add_argument("--ablation", choices=sorted(ABLATIONS), help="a row of the paper's ablation tables")
    p.add_argument("--features", help="dense strategy of Z (default maskclip, the paper)")
    p.add_argument("--attention", choices=ATTENTIONS, help="override the last-block attention of --features")
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None,
                   help="keep (or drop) the last block's residual in --features")
    p.add_argument("--ffn", action=argparse.BooleanOptionalAction, default=None,
                   help="keep (or drop) the last block's FFN in --features")
    _add_strategy_option_args(p)
    p.add_argument("--reference-length", type=POSITIVE_INT,
                   help="L learnable Reference words (default context length - 4 = 73, the paper)")
    p.add_argument("--gumbel-scale", type=POSITIVE,
                   help="logit factor before the Gumbel-softmax (default 100, official)")
    p.add_argument("--reference-name-tokens", choices=NAME_TOKENS,
                   help="class names longer than the Reference's slots: keep_eot (default) or official (the "
                        "official code's layout: EOT lost, read at the largest-id token; to reproduce its numbers)")
    _add_training_args(p, "rectify")
    p.set_defaults(func=cmd_rectify)

    p = sub.add_parser("distill", parents=[common],
                       help="distil a rectified CLIP into a DeepLab V2 student (ReCLIP++ III-E) or MaskCLIP+")
    p.add_argument("--clip", required=True, metavar="SPEC", help="CLIP weights (the teacher's)")
    p.add_argument("--teacher", metavar="RUN_DIR", help="the `reclip rectify` run to distil (not for maskclip+)")
    p.add_argument("--preset", default="reclip++", choices=("reclip++", "reclip", "maskclip+"),
                   help="reclip++ (the paper; a reclip++ teacher), reclip (the conference version; a reclip "
                        "teacher) or maskclip+ (MaskCLIP's argmax as pseudo labels, query head only)")
    p.add_argument("--backbone", choices=sorted(STUDENT_BACKBONE_NAMES),
                   help="student ResNet (default resnet101, the paper; resnet50-v1c: the official code; "
                        "resnet18: small)")
    p.add_argument("--weights", default="imagenet",
                   help="backbone initialisation: imagenet (downloaded; offline: a warning, random start), "
                        "a weights file, or none")
    p.add_argument("--mask-loss", action=argparse.BooleanOptionalAction, default=None, help="L_mask (Table VIII)")
    p.add_argument("--feat-loss", action=argparse.BooleanOptionalAction, default=None, help="L_feat (Table VIII)")
    p.add_argument("--text-loss", action=argparse.BooleanOptionalAction, default=None, help="L_text (Table VIII)")
    p.add_argument("--feat-at", choices=("image", "student_grid"),
                   help="where L_feat compares Z and Z_hat: image (the paper, default) or student_grid (cell by "
                        "cell on the student's grid; cheaper)")
    p.add_argument("--head", choices=("inherited", "query", "query_bias", "query_reference", "deeplab", "fresh"),
                   help="Table IX: inherited (W_q, bias and decoder, frozen; default), query, query_bias, deeplab "
                        "(DeepLab's own classifier, 'Ori. Head'); fresh: inherited's structure re-initialised and "
                        "trained (not a paper row); query_reference: the official ReCLIP student head (W_q - W_r, "
                        "no positional term; reclip teachers)")
    p.add_argument("--input-norm", choices=("imagenet", "clip"),
                   help="the student's input normalisation: imagenet (default; what ImageNet ResNets and the "
                        "official student use) or clip (the teacher's; what runs from before this option used: "
                        "resume those with --input-norm clip)")
    p.add_argument("--schedule", default="paper", choices=("paper", "official"),
                   help="lr schedule: paper (poly 0.9 per step over the run; default) or official (poly 0.9 per "
                        "epoch, clamped at 0.01 x lr: the official code's min lr 1e-4)")
    p.add_argument("--epochs", type=POSITIVE_INT,
                   help="epochs (default: the dataset's distill preset, official VOC 100, ADE 150)")
    _add_training_args(p, "distill")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("maft", parents=[common],
                       help="MAFT: mask-aware fine-tuning of CLIP's image tower (IP-CLIP; supervised on seen classes, "
                            "or from a rectifier's pseudo labels)")
    p.add_argument("--clip", required=True, metavar="SPEC", help="CLIP weights to fine-tune (a ViT)")
    p.add_argument("--proposals", required=True, metavar="SRC",
                   help=f"mask proposals of the training images: {api.PROPOSALS_HELP}")
    p.add_argument("--supervision", default="labels", choices=("labels", "pseudo"),
                   help="class masks from the ground truth of the seen classes (labels, as published; SUPERVISED) or "
                        "from the argmax of a frozen `reclip rectify` run (pseudo, needs --teacher; no label read)")
    p.add_argument("--teacher", metavar="RUN_DIR", help="the rectifier run whose pseudo labels give the class masks")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--seen-classes", metavar="FILE",
                       help="zero-shot split: the classes trained on, one name per line (the rest are unseen)")
    split.add_argument("--unseen-classes", metavar="FILE",
                       help="zero-shot split: the classes left out of training, one name per line (as given, else in "
                            "the package's configs/classes/, e.g. cocostuff171_unseen.txt)")
    p.add_argument("--start-layer", type=COUNT, help="IP-CLIP's first masked block (default 8 of 12, scaled)")
    p.add_argument("--templates", choices=sorted(TEMPLATE_SETS), help="prompt templates (default: the maft method's)")
    p.add_argument("--max-proposals", type=POSITIVE_INT, default=100, help="proposals per crop (default 100, MAFT's)")
    _add_training_args(p, "maft", hypotheses=False,
                       defaults={"max-steps": "1000", "batch-size": "16", "lr": "AdamW 1e-5", "crop": "480",
                                 "base-short-side": "480"},
                       classes_help="class list replacing the protocol's (in label-id order)")
    p.set_defaults(func=cmd_maft)

    p = sub.add_parser("probe", parents=[common],
                       help="SUPERVISED diagnostic: linear probe (Table I 'LP') on a method's frozen features, "
                            "trained WITH labels")
    p.add_argument("--clip", required=True, metavar="SPEC",
                   help="CLIP weights (the features of CLIP-based methods; a student's normalisation)")
    p.add_argument("--method", default="maskclip", choices=sorted(METHODS),
                   help="whose features: a training-free method's CLIP dense features (its last-block strategy), "
                        "reclip++/reclip (their strategy's CLIP features) or student (Z_hat; needs --checkpoint)")
    p.add_argument("--checkpoint", metavar="RUN_DIR", help="run of a trained method (`reclip rectify` / `distill`)")
    p.add_argument("--attention", choices=ATTENTIONS, help="last-block attention (training-free methods)")
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the last block's residual (training-free methods)")
    p.add_argument("--ffn", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the last block's FFN (training-free methods)")
    p.add_argument("--dataset", required=True,
                   help=f"protocol name ({', '.join(list_protocols())}) or a protocol .yaml file")
    p.add_argument("--data-root", required=True, help="dataset root (e.g. VOCdevkit/VOC2012)")
    p.add_argument("--train-split", default="train", help="labelled split the classifier is trained on")
    p.add_argument("--split", default="val", help="split the probe is scored on")
    p.add_argument("--classes-file", help="class list replacing the protocol's (names only; in label-id order)")
    p.add_argument("--label-dir", help="label folder replacing the protocol's (the `folder` protocol)")
    p.add_argument("--epochs", type=POSITIVE_INT, default=10, help="passes over the training split (default 10)")
    p.add_argument("--lr", type=POSITIVE, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="training crops per step (default 8)")
    p.add_argument("--short-side", type=POSITIVE_INT,
                   help="training and scoring short side (default: the protocol's reclip short side)")
    p.add_argument("--max-long-side", type=POSITIVE_INT,
                   help="cap on the long side (default: the protocol's reclip max_long_side)")
    p.add_argument("--crop", type=POSITIVE_INT, help="training centre crop (default: the short side)")
    p.add_argument("--seed", type=COUNT, default=0, help="training order (default 0)")
    p.add_argument("--limit-train", type=POSITIVE_INT, help="train on the first N images only")
    p.add_argument("--limit", type=POSITIVE_INT, help="score the first N images only (a quick look, not a result)")
    p.add_argument("--workers", type=COUNT, default=1, help="processes reading images ahead (0: none)")
    p.add_argument("--autocast", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision of the feature extraction (default auto: bf16 on CUDA, off on CPU); "
                        "the classifier runs in float32")
    p.add_argument("--json", help="write the metrics, per-class IoU, confusion and probe settings here")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--clip-config", metavar="FILE", help=CLIP_CONFIG_HELP)
    _add_max_pixels_arg(p, labels=True)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("demo", parents=[common], help="the embedded demo (runs anywhere, no downloads)")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--world", default="objects", choices=sorted(CLASS_SETS),
                   help="the toy world's classes (objects: apple, moon, bird, ...; garden: leaf, box, sun, ...)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", parents=[common], help="print speed and memory figures (random ViT-B/16)")
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=POSITIVE_INT, default=4, help="images in the zero-shot throughput run")
    p.set_defaults(func=cmd_bench)

    sub.add_parser("methods", parents=[common], help="list methods").set_defaults(func=cmd_methods)
    sub.add_parser("datasets", parents=[common], help="list dataset protocols").set_defaults(func=cmd_datasets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, CheckpointError) as err:
        # Clear one-line errors for bad input; tracebacks stay for real bugs.
        print(f"reclip {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
