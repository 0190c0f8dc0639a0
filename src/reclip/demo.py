"""``reclip demo``: the embedded default job, runnable anywhere without downloads.

No CLIP weights or datasets can be assumed, so the demo builds its own: the toy world
(``reclip.toy``) pre-trains a tiny CLIP on synthetic captioned images (or reuses the
cached one), writes segmentation scenes in the PASCAL VOC layout, and every
training-free method is evaluated on them through the same code paths as real data
(``voc21`` protocol + the toy class file), with both bias diagnostics. Then ReCLIP++'s
rectification stage runs as a user would run it on VOC: image-level hypotheses on
unlabelled train scenes, ``rectify``, and ``--method reclip++ --checkpoint`` evaluation
of the decoded and rectified outputs, for three configurations trained once per seed
(:data:`TOY_RECTIFICATION` says which settings the toy world needs and why). Outputs:
``report.html`` (table, bias scores, plots, example masks next to ground truth),
``results.json``, and the table on stdout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from reclip.cache import cache_folder
from reclip.api import ZERO_SHOT_KEYS, EvaluationResult, evaluate_segmentor, input_normalisation
from reclip.clip.load import load_clip
from reclip.data.datasets import SegmentationDataset
from reclip.distillation import MASKCLIP_PLUS, RECLIPPP_DISTILL, DistillConfig, distill
from reclip.features import get_strategy
from reclip.files import atomic_write_json
from reclip.heads.rectify import RECLIPPP, RectifierConfig
from reclip.hypotheses import HypothesisConfig, generate_hypotheses
from reclip.inference import InferenceConfig, image_context, segment
from reclip.families.maft import TEMPLATES as MAFT_TEMPLATES
from reclip.maft.proposals import write_proposal_files
from reclip.maft.train import finetune_maft
from reclip.families import zero_shot
from reclip.methods import build_segmentor
from reclip.rectification import rectify
from reclip.report import plot_confusion, plot_space_curves, write_html_report
from reclip.text import query_embeddings
from reclip.toy.dino import ToyDinoConfig, get_or_train_dino, toy_random_proxy
from reclip.toy.pretrain import ToyConfig, get_or_train
from reclip.toy.world import write_voc_layout
from reclip.train.checkpoint import CHECKPOINT_VERSION
from reclip.visualize import overlay, palette

# Every preset plus the variant that the tiny CLIP favours (see reclip.toy): on a tiny
# CLIP the residual stream dominates the last block, so MaskCLIP's readout needs it off.
# Methods with a proxy model (ProxyCLIP: a DINO) need one of the toy world's: their rows
# are made with it (_proxy_rows, ToyProxy), not here.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{method.name: (method.name, {}) for method in zero_shot.METHODS
       if not hasattr(get_strategy(method.strategy), "proxy")},
    "maskclip-nores": ("maskclip", {"residual": False, "ffn": False}),
}


@dataclass(frozen=True)
class ToyRectification:
    """ReCLIP++ (rec.) on the toy world: what differs from the paper, and why.

    Every configuration is trained once per seed (:attr:`seeds`) and reported as the mean
    and spread over them (one seed is an anecdote: two seeds of the same settings differ
    by up to ~3 mIoU). Three configurations (:meth:`configs`):

    - "toy": ReCLIP++ with the toy world's settings below;
    - "toy, no decoder": the same without the mask decoder (ablation entry
      ``table3_no_decoder``): M_o = M;
    - "as published": ReCLIP++'s published hyper-parameters (Reference length 73,
      Gumbel scale 100) on the same features.

    The rows read each model's outputs: M_o (decoded, the paper's prediction) and M =
    M_q - M_b (rectified); M_q (query) is the zero-shot row of the same features.

    Attributes:
        features: Z's strategy, a :data:`VARIANTS` name: the one the toy world favours
            (MaskCLIP's value path without the last block's residual and FFN).
        reference_length: L = 8 Reference words, not 73: the tiny CLIP was pre-trained on
            captions of at most ~16 tokens, so later text positions are untrained, and with
            L = 73 training drove every class's Reference embedding to the same vector
            (pairwise cosine 1.000): the bias logits became class-independent and changed
            no prediction.
        gumbel_scale: 30, not 100: on the 12 x 12 grid the decoder's BN outputs times 100
            make the Gumbel-softmax one-hot, so its straight-through gradient all but
            vanishes and the decoder learns little (13.95 mIoU at 100, 17.03 at 30, 16.90
            at 10; NACLIP features: 10.00 at 100, 15.54 at 10).
        r, t: hypothesis windows of 1/3 of a scene (1/6 of a 96 px scene is 16 px, two
            patches: too little for the tiny CLIP); t = 0.07 as for VOC.
        num_train, steps, batch_size, lr: unlabelled train scenes and SGD settings
            (base scale and crop: the scene size).
        seeds: one training run per seed and configuration.
    """

    features: str = "maskclip-nores"
    reference_length: int = 8
    gumbel_scale: float = 30.0
    r: float = 1 / 3
    t: float = 0.07
    num_train: int = 600
    steps: int = 2000
    batch_size: int = 8
    lr: float = 0.01
    seeds: tuple[int, ...] = (0, 1, 2)

    def rectifier_config(self) -> RectifierConfig:
        """ReCLIP++ as published, with the toy world's features, Reference length and Gumbel scale."""
        return dataclasses.replace(self.published_config(), reference_length=self.reference_length,
                                   gumbel_scale=self.gumbel_scale)

    def published_config(self) -> RectifierConfig:
        """ReCLIP++ as published, reading the toy world's features."""
        preset, overrides = VARIANTS[self.features]
        return dataclasses.replace(RECLIPPP, strategy=get_strategy(preset, **overrides))

    def configs(self) -> dict[str, RectifierConfig]:
        """The configurations the demo trains, by row label."""
        toy = self.rectifier_config()
        return {"toy": toy, "toy, no decoder": dataclasses.replace(toy, decoder=False),
                "as published": self.published_config()}

    def row_name(self, label: str, output: str) -> str:
        return f"reclip++ {label}: {OUTPUT_SYMBOLS[output]}"

    def rows(self) -> list[tuple[str, str, str]]:
        """(row name, configuration label, output) of every ReCLIP++ row."""
        rows = []
        for label, config in self.configs().items():
            outputs = ("decoded", "rectified") if config.decoder else ("rectified",)
            rows += [(self.row_name(label, output), label, output) for output in outputs]
        return rows


TOY_RECTIFICATION = ToyRectification()


@dataclass(frozen=True)
class ToyDistillation:
    """ReCLIP++'s distillation stage (III-E) and MaskCLIP+ on the toy world.

    The student of each seed is taught by that seed's "toy" rectified run; MaskCLIP+ by
    MaskCLIP reading the same features as the rectifier. Both students are the small
    ResNet-18 of :mod:`reclip.backbones.resnet` at a narrow width, trained from scratch
    (no ImageNet weights here), with the paper's losses and weights.

    Attributes:
        width, aspp_channels: the narrow student (base width 16, ASPP 64 channels): a
            full-width ResNet-18 at output stride 8 takes ~0.9 s per step of 16 scenes on
            one core, this one ~0.2 s.
        steps, batch_size, lr: SGD (momentum 0.9, weight decay 5e-4, poly over the run).
            2000 steps of 8 scenes: with 1000 the students taught with all three losses
            still underfit (14.0 / 18.0 / 17.7 mIoU over seeds 0-2 against their teachers'
            19.3 / 17.6 / 17.7, mostly through L_text; without it 19.7 / 18.8 / 18.4), while
            2000 gave 19.5 / 18.9 / 18.3; batches of 16 (19.2 / 17.3 / 17.9) and lr 0.02
            (17.5 / 13.7 / -) did not help. Those runs were scored with CLIP's input
            normalisation (some trained with it, before ImageNet's became the default):
            experiments/toy_student_settings.py reruns any of them with today's code; the
            demo's own figures are in the README.
        feat_at: L_feat on the student's grid, not the paper's image size: on 96 px scenes
            the teacher's and the student's grids are the same 12 x 12 cells, so Z and Z_hat
            are compared cell by cell instead of after upsampling 128-channel maps to
            96 x 96, which doubled the step time (0.29 s against 0.14 s for 8 scenes on one
            core). A change of ours, named in the report.
    """

    width: int = 16
    aspp_channels: int = 64
    steps: int = 2000
    batch_size: int = 8
    lr: float = 0.01
    feat_at: str = "student_grid"

    def configs(self, features: str) -> dict[str, DistillConfig]:
        """The two students by row label, for rectified runs reading ``features`` (a VARIANTS name)."""
        _, overrides = VARIANTS[features]
        small = {"backbone": "resnet18", "width": self.width, "aspp_channels": self.aspp_channels,
                 "feat_at": self.feat_at}
        return {"reclip++ student": dataclasses.replace(RECLIPPP_DISTILL, **small),
                "maskclip+ student": dataclasses.replace(MASKCLIP_PLUS, teacher_overrides=overrides or None, **small)}


TOY_DISTILLATION = ToyDistillation()


@dataclass(frozen=True)
class ToyMaft:
    """MAFT (Jiao et al. 2023) on the toy world, with proposals made by ReCLIP++.

    Each seed's proposals are the connected regions of that seed's "toy" ReCLIP++ run's
    prediction (M_o) on every train and val scene, written once as proposal files. On
    them, three rows per seed: "ipclip" (the frozen tiny CLIP classifying the proposals
    with IP-CLIP, MAFT's baseline), MAFT fine-tuned WITH labels on the seen classes only
    (as published; scored on seen and unseen classes and hIoU), and MAFT fine-tuned on
    the same ReCLIP++ run's pseudo labels (no label read; every class seen).

    Attributes:
        unseen: the world's last ``unseen`` object classes are the unseen ones.
        start_layer: IP-CLIP's first masked block. MAFT's 8 of 12 scales to 3 of the tiny
            CLIP's 4 blocks; with one masked block the CLS copies have already read the
            whole scene and every region got the scene's class (ipclip 9.4 mIoU against
            30.7 with all 4 blocks masked). A setting of this toy world, named in the report.
        whole_image: add the whole scene to each image's regions (off: with a handful of
            regions per scene its vote outweighs theirs, 19.2 against 30.7 mIoU).
        steps, batch_size, lr: AdamW fine-tuning (MAFT: 1000 steps of 16, lr 1e-5, for a
            full-size CLIP).

    The figures above are the ipclip row's seed 0: ``run_demo(maft=dataclasses.replace(
    TOY_MAFT, start_layer=3))`` or ``whole_image=True`` reproduces them (results.json, the
    row's "seeds").
    """

    unseen: int = 2
    start_layer: int = 0
    whole_image: bool = False
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-5

    def unseen_classes(self, names: list[str]) -> list[str]:
        return list(names[-self.unseen:]) if self.unseen else []


TOY_MAFT = ToyMaft()


@dataclass(frozen=True)
class ToyProxy:
    """ProxyCLIP on the toy world, with a tiny DINO pre-trained here (:mod:`reclip.toy.dino`).

    Two rows over :attr:`seeds` (one DINO per seed): ProxyCLIP with the toy DINO, and the
    control, the same ViT at its random initialisation. The DINO is DINO v1
    self-distillation of a patch-8, width-64, depth-4 ViT on the toy photos for
    :attr:`steps` steps (1.5 to 4 CPU minutes each the first time, then cached with the
    tiny CLIP). Measured (experiments/toy_proxyclip.py, seeds 0-2): 22.91 +/- 0.45 mIoU with
    the toy DINO and 22.82 +/- 0.19 with its random init. A few CPU minutes do not get DINO
    past its early phase (loss ~5.0 -> ~6.7 of log K = 6.93); the untrained ViT's patch
    features already group the toy world's flat colours, which is what ProxyCLIP's attention
    uses. 600 steps give 23.40 +/- 0.32, each seed above its random init.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 200

    def dino_config(self) -> ToyDinoConfig:
        return dataclasses.replace(ToyDinoConfig(), steps=self.steps)


TOY_PROXY = ToyProxy()
PROXY_ROWS = ("proxyclip, toy DINO", "proxyclip, untrained DINO (control)")
TEMPLATES = "reclip85"  # W_q of every method and of the hypotheses
OUTPUT_SYMBOLS = {"decoded": "M_o", "rectified": "M", "query": "M_q"}


@dataclass
class DemoRow:
    """One table row: a method's result, or (trained rows) one result per seed."""

    name: str
    results: list[EvaluationResult]
    seeds: tuple[int, ...] = ()

    @property
    def result(self) -> EvaluationResult:
        """The (first seed's) result: its confusion matrix and curves are plotted."""
        return self.results[0]

    def _scores(self) -> np.ndarray:
        """(runs, 3): mIoU (%), class-preference and space-preference scores per run."""
        return np.array([[100 * r.miou, r.bias["class_preference"]["score"], r.bias["space_preference"]["score"]]
                         for r in self.results])

    def summary(self) -> dict[str, Any]:
        """Means over the runs; for trained rows also the sample standard deviation of mIoU
        ("+/-") and the number of seeds (both blank for a training-free row)."""
        scores = self._scores()
        mean = scores.mean(axis=0)
        spread = float(scores[:, 0].std(ddof=1)) if len(self.results) > 1 else ""
        zero_shot = self.zero_shot()
        return {"method": self.name, "mIoU": float(mean[0]), "+/-": spread,
                "class-preference": float(mean[1]), "space-preference": float(mean[2]),
                "seeds": len(self.seeds) if self.seeds else "",
                **{f"{k} (unseen split)": zero_shot.get(k, "") for k in ZERO_SHOT_KEYS}}

    def zero_shot(self) -> dict[str, float]:
        """Means over the runs of mIoU_seen, mIoU_unseen and hIoU (%), for rows scored on a
        seen/unseen split; empty otherwise."""
        if not all(k in r.metrics for r in self.results for k in ZERO_SHOT_KEYS):
            return {}
        return {k: float(np.mean([100 * r.metrics[k] for r in self.results])) for k in ZERO_SHOT_KEYS}

    def to_dict(self) -> dict[str, Any]:
        """results.json entry: a training-free row's result; for a trained row the means
        over its seeds, each seed's scores and each run's full result (``runs``)."""
        if not self.seeds:
            return self.result.to_dict()
        scores = self._scores()
        names = ("mIoU", "class_preference", "space_preference")
        spread = scores.std(0, ddof=1) if len(scores) > 1 else [None] * 3
        return {
            "method": self.name,
            **{name: float(v) for name, v in zip(names, scores.mean(0))},
            "std": {name: None if v is None else float(v) for name, v in zip(names, spread)},
            "seeds": [{"seed": seed, **{name: float(v) for name, v in zip(names, row)}}
                      for seed, row in zip(self.seeds, scores)],
            "runs": [r.to_dict() for r in self.results],
        }


def default_cache_dir() -> Path:
    """``$RECLIP_CACHE/toy`` or ``~/.cache/reclip/toy``."""
    return cache_folder("toy")


def run_demo(
    out: str | Path = "demo_out",
    *,
    config: ToyConfig | None = None,
    cache_dir: str | Path | None = None,
    num_scenes: int = 300,
    seed: int = 0,
    rectification: ToyRectification | None = TOY_RECTIFICATION,
    distillation: ToyDistillation | None = TOY_DISTILLATION,
    maft: ToyMaft | None = TOY_MAFT,
    proxy: ToyProxy | None = TOY_PROXY,
    progress: bool = True,
) -> list[DemoRow]:
    """Run the demo into ``out``; returns one row per method (mIoU and bias scores).

    ``rectification`` None leaves ReCLIP++ out; otherwise its configurations are trained
    once per seed, each run in ``out/reclip++-<key>`` (a key of its settings), where a
    finished run is reused and an interrupted one resumed; its rows average the seeds.
    ``distillation`` (with ``rectification``) adds the ReCLIP++ student of each seed's
    "toy" run and MaskCLIP+, trained and reused the same way; ``maft`` (with
    ``rectification``) the MAFT rows of :class:`ToyMaft`.
    """
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config or ToyConfig.default()
    checkpoint = get_or_train(cache_dir or default_cache_dir(), config, seed=seed, progress=progress)
    clip = load_clip(checkpoint)
    pretrain = json.loads(Path(f"{checkpoint}.json").read_text())["metrics"]

    num_train = rectification.num_train if rectification else 0
    voc = write_voc_layout(out / "toy_data", num_train=num_train, num_val=num_scenes, seed=seed + 1,
                           config=config.world)
    classes = out / "toy_data" / "toy_classes.txt"
    data = SegmentationDataset("voc21", voc, "val", classes_file=classes)
    # Whole image at the scene size; the class file's "background" word is the background
    # class (a probability threshold did worse on the toy world).
    cfg = InferenceConfig(mode="whole", short_side=None, logit_scale=50.0)
    queries = query_embeddings(clip, data.vocabulary, TEMPLATES, cache_dir=out / "text_cache")

    # One 96 px image at a time is too little work to share between threads: one thread
    # is several times faster here, and far faster when another process holds a core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows, segmentors = _evaluate_all(clip, data, cfg, queries, progress)
        if proxy is not None:
            for row, segmentor in _proxy_rows(cache_dir or default_cache_dir(), config, proxy, clip, data, cfg,
                                              queries, progress):
                rows.append(row)
                segmentors[row.name] = segmentor
        runs: dict[str, list[Path]] = {}
        hypotheses = None
        if rectification is not None:
            world = f"{config.key()}-s{seed}"  # the tiny CLIP and the scenes
            runs, hypotheses = _rectify(out, checkpoint, clip, voc, classes, queries, rectification, world,
                            config.world.scene_size, progress)
            for name, label, output in rectification.rows():
                models = [build_segmentor("reclip++", clip, data.vocabulary, checkpoint=run, output=output)
                          for run in runs[label]]
                rows.append(_seeded_row(name, models, rectification.seeds, data, cfg, clip, progress))
                segmentors[name] = models[0]
            if distillation is not None:
                students = _distill(out, checkpoint, clip, voc, classes, hypotheses, runs["toy"], rectification,
                                    distillation, world, config.world.scene_size, progress)
                for name, dirs in students.items():
                    models = [build_segmentor("student", clip, data.vocabulary, checkpoint=run) for run in dirs]
                    rows.append(_seeded_row(name, models, rectification.seeds, data, cfg, clip, progress))
                    segmentors[name] = models[0]
                runs.update(students)
            if maft is not None:
                maft_rows, maft_runs = _maft(out, checkpoint, clip, voc, classes, runs["toy"], rectification, maft,
                                             world, config.world.scene_size, cfg, data, progress)
                for row, segmentor in maft_rows:
                    rows.append(row)
                    segmentors[row.name] = segmentor
                runs.update(maft_runs)
        _write_outputs(out, rows, segmentors, data, cfg, clip, pretrain, checkpoint, rectification, runs,
                       hypotheses, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    _print_table(rows, pretrain)
    print(f"\nreport: {out / 'report.html'}")
    return rows


def _evaluate_all(clip: Any, data: SegmentationDataset, cfg: InferenceConfig, queries: Any,
                  progress: bool) -> tuple[list[DemoRow], dict[str, Any]]:
    """Every variant on the scenes, bias diagnostics included; the segmentors for examples."""
    rows, segmentors = [], {}
    for name, (method, overrides) in VARIANTS.items():
        segmentor = build_segmentor(method, clip, data.vocabulary, strategy_overrides=overrides, queries=queries)
        rows.append(DemoRow(name, [_evaluate(segmentor, data, cfg, clip, progress, name)]))
        segmentors[name] = segmentor
    return rows, segmentors


def _proxy_rows(cache_dir: str | Path, config: ToyConfig, proxy: ToyProxy, clip: Any, data: SegmentationDataset,
                cfg: InferenceConfig, queries: Any, progress: bool) -> list[tuple[DemoRow, Any]]:
    """ProxyCLIP with each seed's toy DINO, and with the same ViT untrained (the control)."""
    proxies = {
        PROXY_ROWS[0]: [get_or_train_dino(cache_dir, config.world, proxy.dino_config(), seed, progress)
                        for seed in proxy.seeds],
        PROXY_ROWS[1]: [toy_random_proxy(cache_dir, config.world, seed) for seed in proxy.seeds],
    }
    out = []
    for name, paths in proxies.items():
        models = [build_segmentor("proxyclip", clip, data.vocabulary, queries=queries,
                                  strategy_overrides={"proxy": str(path)}) for path in paths]
        out.append((_seeded_row(name, models, proxy.seeds, data, cfg, clip, progress), models[0]))
    return out


def _seeded_row(name: str, models: list[Any], seeds: tuple[int, ...], data: SegmentationDataset,
                cfg: InferenceConfig, clip: Any, progress: bool, unseen: list[str] | None = None) -> DemoRow:
    """A trained row: one model per seed, each evaluated; the row averages the seeds."""
    results = [_evaluate(m, data, cfg, clip, progress, f"{name} (seed {s})", unseen) for m, s in zip(models, seeds)]
    for result in results:
        result.method = name
    return DemoRow(name, results, tuple(seeds))


def _evaluate(segmentor: Any, data: SegmentationDataset, cfg: InferenceConfig, clip: Any, progress: bool,
              name: str, unseen: list[str] | None = None) -> EvaluationResult:
    mean, std = input_normalisation(segmentor, clip)
    result = evaluate_segmentor(segmentor, data, cfg, mean=mean, std=std, bias=True,
                                num_workers=0, progress=progress, description=name, unseen_classes=unseen or None)
    result.method = name
    return result


def _rectify(out: Path, checkpoint: Path, clip: Any, voc: Path, classes: Path, queries: Any,
             settings: ToyRectification, world: str, scene_size: int,
             progress: bool) -> tuple[dict[str, list[Path]], Path]:
    """Hypotheses on the unlabelled train scenes, then one rectifier per configuration and
    seed; returns their run directories by configuration label (in seed order) and the
    hypotheses file.

    Every step resumes: a finished run is reused, an interrupted one continued. Files are
    named by a key of everything they depend on (the toy world ``world``, the settings,
    the configuration and seed, the training engine's version), so a run made with other
    settings or by another reclip is never resumed: it stays beside the new one. Runs
    train in parallel processes, one thread each (as many as there are cores): each run
    gives the same weights as it would alone.
    """
    common = {"world": world, "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "seeds"},
              "engine": CHECKPOINT_VERSION}
    key = _key(common)
    train_scenes = SegmentationDataset("voc21", voc, "train", classes_file=classes)
    hypotheses = out / f"hypotheses-{key}.json"
    generate_hypotheses(clip, train_scenes, queries, config=HypothesisConfig(r=settings.r, t=settings.t),
                        out_path=hypotheses, progress=progress, templates=TEMPLATES)
    jobs, runs = [], {}
    for label, config in settings.configs().items():
        runs[label] = []
        for seed in settings.seeds:
            run_dir = out / f"reclip++-{_key({**common, 'config': config.to_dict(), 'seed': seed})}"
            runs[label].append(run_dir)
            jobs.append(_TrainJob(str(checkpoint), str(voc), str(classes), str(hypotheses), str(run_dir),
                                  config.to_dict(), seed, settings.steps, settings.batch_size, settings.lr,
                                  scene_size, str(out / "text_cache")))
    _run_jobs(jobs, clip, progress, "reclip++ runs")
    return runs, hypotheses


def _distill(out: Path, checkpoint: Path, clip: Any, voc: Path, classes: Path, hypotheses: Path,
             teachers: list[Path], rectification: ToyRectification, settings: ToyDistillation, world: str,
             scene_size: int, progress: bool) -> dict[str, list[Path]]:
    """One student per configuration and seed (ReCLIP++'s taught by that seed's teacher run);
    their run directories by row label, keyed and reused like the rectifier runs."""
    common = {"world": world, "settings": dataclasses.asdict(settings), "engine": CHECKPOINT_VERSION,
              "hypotheses": hypotheses.name}
    jobs, runs = [], {}
    for label, config in settings.configs(rectification.features).items():
        runs[label] = []
        for seed, teacher in zip(rectification.seeds, teachers):
            teacher_run = str(teacher) if config.teacher == "rectified" else None
            teacher_key = teacher.name if teacher_run else None
            run_dir = out / f"student-{_key({**common, 'config': config.to_dict(), 'seed': seed, 'teacher': teacher_key})}"
            runs[label].append(run_dir)
            jobs.append(_DistillJob(str(checkpoint), str(voc), str(classes), str(hypotheses), str(run_dir),
                                    config.to_dict(), seed, settings.steps, settings.batch_size, settings.lr,
                                    scene_size, str(out / "text_cache"), teacher_run=teacher_run))
    _run_jobs(jobs, clip, progress, "students")
    return runs


def _run_jobs(jobs: list[Any], clip: Any, progress: bool, description: str) -> None:
    """Run the jobs whose run has no weights yet: in parallel processes (one thread each,
    as many as there are cores), or here when one core or one job."""
    pending = [job for job in jobs if not (Path(job.run_dir) / "model.safetensors").is_file()]
    workers = min(len(pending), _usable_cores())
    with tqdm(total=len(pending), desc=description, unit="run", disable=not progress or not pending) as bar:
        if workers <= 1:
            for job in pending:
                job.run(clip)
                bar.update()
            return
        context = multiprocessing.get_context("spawn")  # no forked copies of this process's threads
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(job.run): job for job in pending}
            for done in as_completed(futures):
                if done.exception() is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
                    job = futures[done]
                    raise RuntimeError(f"the demo's run {job.run_dir} (seed {job.seed}) failed: "
                                       f"{done.exception()}") from done.exception()
                bar.update()


def _usable_cores() -> int:
    """The cores this process may run on (its affinity, e.g. a container's limit)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _key(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class _TrainJob:
    """One rectifier training run of the demo, picklable for a worker process."""

    clip_path: str
    voc: str
    classes: str
    hypotheses: str
    run_dir: str
    config: dict[str, Any]
    seed: int
    steps: int
    batch_size: int
    lr: float
    scene_size: int
    text_cache: str

    def run(self, clip: Any = None) -> str:
        """Train (or resume) the run; ``clip`` None loads it (in a worker process, on one thread)."""
        if clip is None:
            torch.set_num_threads(1)
            clip = load_clip(self.clip_path)
        self._train(clip, base_short_side=self.scene_size, crop=self.scene_size, classes_file=self.classes,
                    max_steps=self.steps, resume=True, progress=False, text_cache=self.text_cache,
                    train_overrides={"batch_size": self.batch_size, "lr": self.lr, "device": "cpu",
                                     "seed": self.seed, "checkpoint_every": 500})
        return self.run_dir

    def _train(self, clip: Any, **common: Any) -> None:
        rectify(clip, "voc21", self.voc, self.hypotheses, self.run_dir,
                config=RectifierConfig.from_dict(self.config), **common)


@dataclass(frozen=True)
class _DistillJob(_TrainJob):
    """One student of the demo (a random-start backbone), taught by ``teacher_run`` (None: MaskCLIP+)."""

    teacher_run: str | None = None

    def _train(self, clip: Any, **common: Any) -> None:
        distill(clip, self.teacher_run, "voc21", self.voc, self.hypotheses, self.run_dir,
                config=DistillConfig.from_dict(self.config), weights=None, **common)


@dataclass(frozen=True)
class _MaftJob(_TrainJob):
    """One MAFT fine-tuning of the demo: labels of the seen classes, or ``teacher_run``'s pseudo labels."""

    teacher_run: str | None = None

    def _train(self, clip: Any, **common: Any) -> None:
        c = self.config
        finetune_maft(clip, "voc21", self.voc, self.run_dir, proposals=c["proposals"], supervision=c["supervision"],
                      teacher_run=self.teacher_run, unseen_classes=c["unseen"] or None,
                      start_layer=c["start_layer"], **common)


def _maft(out: Path, checkpoint: Path, clip: Any, voc: Path, classes: Path, teachers: list[Path],
          rectification: ToyRectification, settings: ToyMaft, world: str, scene_size: int, cfg: InferenceConfig,
          data: SegmentationDataset, progress: bool) -> tuple[list[tuple[DemoRow, Any]], dict[str, list[Path]]]:
    """Proposal files per seed, the MAFT runs (trained and reused like the others), and the
    three MAFT rows with their first seed's segmentor."""
    from reclip.api import proposal_source
    from reclip.data.protocol import load_protocol

    protocol = load_protocol("voc21")
    unseen = settings.unseen_classes(list(data.class_names))
    train_images = SegmentationDataset("voc21", voc, "train", classes_file=classes, check_sizes=False)
    folders = []
    for teacher in teachers:  # the regions of each seed's ReCLIP++ prediction, made once
        folder = out / f"proposals-{_key({'world': world, 'teacher': teacher.name, 'whole': settings.whole_image})}"
        source = proposal_source(f"from:{teacher}", clip, data.vocabulary, protocol, background=True,
                                 text_cache=out / "text_cache", whole_image=settings.whole_image)
        for images in (train_images, data):
            write_proposal_files(source, images, folder, progress=progress)
        folders.append(folder)
    common = {"world": world, "settings": dataclasses.asdict(settings), "engine": CHECKPOINT_VERSION,
              "templates": MAFT_TEMPLATES}
    variants = {"maft, labels of seen classes": ("labels", unseen), "maft, reclip++ pseudo labels": ("pseudo", [])}
    jobs, runs = [], {}
    for label, (supervision, held_out) in variants.items():
        runs[label] = []
        for seed, teacher, folder in zip(rectification.seeds, teachers, folders):
            config = {"supervision": supervision, "unseen": held_out, "start_layer": settings.start_layer,
                      "proposals": str(folder)}
            run_dir = out / f"maft-{_key({**common, **config, 'proposals': folder.name, 'seed': seed})}"
            runs[label].append(run_dir)
            jobs.append(_MaftJob(str(checkpoint), str(voc), str(classes), "", str(run_dir), config, seed,
                                 settings.steps, settings.batch_size, settings.lr, scene_size,
                                 str(out / "text_cache"),
                                 teacher_run=str(teacher) if supervision == "pseudo" else None))
    _run_jobs(jobs, clip, progress, "maft runs")

    def scored(name: str, models: list[Any]) -> tuple[DemoRow, Any]:
        for model, folder in zip(models, folders):  # each seed's model reads that seed's proposals
            model.proposals = proposal_source(str(folder), clip, data.vocabulary, protocol)
        return _seeded_row(name, models, rectification.seeds, data, cfg, clip, progress, unseen), models[0]

    free = []
    for _ in folders:
        model = build_segmentor("ipclip", clip, data.vocabulary, text_cache=out / "text_cache")
        model.start_layer = settings.start_layer
        free.append(model)
    rows = [scored("ipclip (frozen CLIP), reclip++ regions", free)]
    for label, dirs in runs.items():
        rows.append(scored(label, [build_segmentor("maft", clip, data.vocabulary, checkpoint=run,
                                                   text_cache=out / "text_cache") for run in dirs]))
    return rows, runs


def _print_table(rows: list[DemoRow], pretrain: dict[str, Any]) -> None:
    print(f"\ntiny CLIP: zero-shot image accuracy {100 * pretrain['zero_shot_accuracy']:.1f}% "
          f"(pre-trained in {pretrain['train_seconds']:.0f} s)")
    print(f"{'method':<40} {'mIoU':>6} {'+/-':>5}  {'class-pref':>10}  {'space-pref':>10}  seeds"
          "   (bias scores: higher = less bias)")
    for row in rows:
        s = row.summary()
        spread = f"{s['+/-']:5.2f}" if s["+/-"] != "" else " " * 5
        print(f"{s['method']:<40} {s['mIoU']:6.2f} {spread}  {s['class-preference']:10.3f}  "
              f"{s['space-preference']:+10.3f}  {s['seeds']}")
    split = [row for row in rows if row.zero_shot()]
    if split:
        unseen = split[0].result.settings["zero_shot"]["unseen"]
        print(f"\nseen / unseen split (unseen: {', '.join(unseen)}; 'maft, labels' trains on the seen classes only)")
        print(f"{'method':<40} {'mIoU seen':>9} {'unseen':>7} {'hIoU':>6}")
        for row in split:
            z = row.zero_shot()
            print(f"{row.name:<40} {z['mIoU_seen']:9.2f} {z['mIoU_unseen']:7.2f} {z['hIoU']:6.2f}")


def _write_outputs(out: Path, rows: list[DemoRow], segmentors: dict[str, Any], data: SegmentationDataset,
                   cfg: InferenceConfig, clip: Any, pretrain: dict[str, Any], checkpoint: Path,
                   rectification: ToyRectification | None, runs: dict[str, list[Path]], hypotheses: Path | None,
                   seconds: float) -> None:
    best = max(rows, key=lambda r: r.summary()["mIoU"])
    figures = [
        ("space preference: mIoU against object distance from the centre (trained rows: first seed)",
         plot_space_curves({r.name: r.result.bias["space_preference"] for r in rows}, out / "space_preference.png",
                           "toy world")),
        (f"class preference of {best.name} (row-normalised confusion{', first seed' if best.seeds else ''})",
         plot_confusion(best.result.confusion, best.result.class_names, out / "confusion.png", best.name)),
    ]
    colours = palette(256)
    seeded = {r.name: r.seeds[0] for r in rows if r.seeds}
    examples = []
    for index in range(4):
        item = data[index]
        image, label = item["image"], item["label"]
        columns = [("image", image), ("ground truth", overlay(image, label, colours, alpha=0.7))]
        for name in (r.name for r in rows):
            with torch.inference_mode(), image_context(segmentors[name], image, item["image_id"]):
                pred = segment(segmentors[name], image, cfg, *input_normalisation(segmentors[name], clip),
                               background_index=0).labels
            caption = f"{name} (seed {seeded[name]})" if name in seeded else name
            columns.append((caption, overlay(image, pred, colours, alpha=0.7)))
        examples.append((item["image_id"], columns))
    table = [row.summary() for row in rows]
    notes = [
        f"Tiny CLIP pre-trained from scratch on the toy world ({checkpoint.name}): zero-shot image "
        f"accuracy {100 * pretrain['zero_shot_accuracy']:.1f}%, {pretrain['train_seconds']:.0f} s of pre-training.",
        f"{len(data)} segmentation scenes, classes: {', '.join(data.class_names)}.",
        "Bias scores (ReCLIP++ Table VII): class preference = mean over classes of the "
        "row-normalised confusion diagonal minus the largest off-diagonal entry; space preference = mean "
        "slope of mIoU against object distance from the centre. Higher = less bias; background excluded.",
        f"Demo run time {seconds:.0f} s.",
    ]
    if rectification is not None:
        notes[2:2] = _rectification_notes(rectification, runs)
    write_html_report(out / "report.html", "reclip demo: the toy world", table, notes, figures, examples)
    results = {
        "pretraining": pretrain,
        "checkpoint": str(checkpoint),
        "inference": {k: v for k, v in vars(cfg).items()},
        "methods": {row.name: row.to_dict() for row in rows},
        "runs": {label: [str(run) for run in dirs] for label, dirs in runs.items()},
        "hypotheses": str(hypotheses) if hypotheses else None,
        "seconds": seconds,
    }
    atomic_write_json(out / "results.json", results, default=_json_default)


def _rectification_notes(settings: ToyRectification, runs: dict[str, list[Path]]) -> list[str]:
    """What the ReCLIP++ rows are, read back from their runs' config.json."""
    run = json.loads((runs["toy"][0] / "config.json").read_text())
    train = run["train"]
    toy, published = settings.rectifier_config(), settings.published_config()
    def shown(name: str, value: Any) -> str:
        return "73 (context length - 4)" if name == "reference_length" and value is None else repr(value)

    differ = [f"{f.name} {shown(f.name, getattr(toy, f.name))} (paper {shown(f.name, getattr(published, f.name))})"
              for f in dataclasses.fields(RectifierConfig) if getattr(toy, f.name) != getattr(published, f.name)]
    notes = []
    if "reclip++ student" in runs:
        student = json.loads((runs["reclip++ student"][0] / "config.json").read_text())
        distill, st = student["distill"], student["train"]
        notes.append(
            f"Student rows (ReCLIP++ III-E, MaskCLIP+): a {distill['backbone']} of base width {distill['width']} "
            f"(ASPP {distill['aspp_channels']} channels), trained from scratch for {st['steps']} steps of "
            f"{st['batch_size']} scenes; the ReCLIP++ student of each seed learns from that seed's 'toy' run (its "
            f"frozen head inherited; L_mask + 0.5 L_feat + 0.5 L_text, L_feat compared at {distill['feat_at']}), "
            "MaskCLIP+ from MaskCLIP's argmax on the same features (L_mask only, query head). No labels are read.")
    return [
        f"reclip++ rows: ReCLIP++'s rectification stage trained on {run['train_images']} unlabelled train scenes "
        f"(image-level hypotheses only, no masks) for {train['steps']} steps, batch {train['batch_size']}, "
        f"lr {run['optimizer']['lr']}, once per seed {list(settings.seeds)}: mIoU and bias scores are means over the "
        "seeds, +/- the standard deviation of mIoU. M_o is the decoder's output (the paper's prediction, argmax, "
        "no prompt denoising), M = M_q - M_b the rectified logits; M_q alone is the zero-shot row of the same "
        f"features ({settings.features}).",
        f"Settings of the 'toy' rows that differ from the paper: {'; '.join(differ)} "
        "(reclip.demo.ToyRectification says why). 'toy, no decoder' is the ablation table3_no_decoder with "
        "the same settings; 'as published' uses the paper's Reference length and Gumbel scale.",
        *notes,
    ]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
