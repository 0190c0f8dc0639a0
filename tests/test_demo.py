"""`reclip demo` end to end on the small toy world (the session's ci() tiny CLIP)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import reclip.demo
import reclip.toy.dino
import reclip.rectification
from reclip.bias import class_preference
from reclip.metrics import ConfusionMatrix
from reclip.demo import PROXY_ROWS, TOY_DISTILLATION, TOY_MAFT, TOY_PROXY, TOY_RECTIFICATION, VARIANTS, run_demo
from reclip.toy.pretrain import ToyConfig

# ReCLIP++ on a few train scenes for a few steps, two seeds: the pipeline, not its quality.
SMALL_RECTIFICATION = dataclasses.replace(TOY_RECTIFICATION, num_train=8, steps=3, batch_size=4, seeds=(0, 1))
SMALL_DISTILLATION = dataclasses.replace(TOY_DISTILLATION, width=8, aspp_channels=8, steps=2, batch_size=4)
RECLIP_ROWS = [name for name, _, _ in SMALL_RECTIFICATION.rows()]
STUDENT_ROWS = ["reclip++ student", "maskclip+ student"]
SMALL_MAFT = dataclasses.replace(TOY_MAFT, steps=2, batch_size=4)
MAFT_ROWS = ["ipclip (frozen CLIP), reclip++ regions", "maft, labels of seen classes", "maft, reclip++ pseudo labels"]
SMALL_PROXY = dataclasses.replace(TOY_PROXY, steps=2, seeds=(0, 1))


def test_demo_writes_a_complete_report(tmp_path, toy_ci_checkpoint):
    cache, _ = toy_ci_checkpoint
    rows = run_demo(tmp_path / "out", config=ToyConfig.ci(), cache_dir=cache, num_scenes=12,
                    rectification=SMALL_RECTIFICATION, distillation=SMALL_DISTILLATION, maft=SMALL_MAFT,
                    proxy=SMALL_PROXY, progress=False)
    assert [r.name for r in rows] == [*VARIANTS, *PROXY_ROWS, *RECLIP_ROWS, *STUDENT_ROWS, *MAFT_ROWS]
    assert "proxyclip" not in VARIANTS and {"sc_clip", "resclip"} <= set(VARIANTS)
    assert RECLIP_ROWS == ["reclip++ toy: M_o", "reclip++ toy: M", "reclip++ toy, no decoder: M",
                           "reclip++ as published: M_o", "reclip++ as published: M"]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    report = (tmp_path / "out" / "report.html").read_text()
    for row in rows:
        summary = row.summary()
        entry = results["methods"][row.name]
        full = entry["runs"][0] if row.seeds else entry  # the (first) run's full result
        confusion = ConfusionMatrix(len(row.result.class_names))
        confusion.matrix[...] = np.array(full["confusion"])
        # the JSON says what the confusion matrix counted
        assert full["mIoU"] == pytest.approx(100 * confusion.compute()["mIoU"], abs=1e-3)
        if row.seeds:  # trained rows: one run per seed, the mean and spread over them
            assert row.seeds == (0, 1) and len(row.results) == len(entry["runs"]) == 2 and summary["seeds"] == 2
            per_seed = [s["mIoU"] for s in entry["seeds"]]
            assert per_seed == pytest.approx([r["mIoU"] for r in entry["runs"]], abs=1e-3)
            assert summary["mIoU"] == pytest.approx(np.mean(per_seed)) == pytest.approx(entry["mIoU"])
            assert summary["+/-"] == pytest.approx(np.std(per_seed, ddof=1)) == pytest.approx(entry["std"]["mIoU"])
        else:
            assert summary["mIoU"] == pytest.approx(entry["mIoU"], abs=1e-3)
            assert summary["seeds"] == summary["+/-"] == "" and "std" not in entry
        assert summary["class-preference"] == pytest.approx(
            np.mean([class_preference(r.confusion, exclude=(0,))["score"] for r in row.results]))
        curve = full["bias"]["space_curve"]  # the mean slope of the plotted curve (first run)
        kept = [(d, m) for d, m in zip(curve["distance"], curve["mIoU"]) if m is not None]
        slopes = [(m1 - m0) / (d1 - d0) for (d0, m0), (d1, m1) in zip(kept, kept[1:])]
        assert row.result.bias["space_preference"]["score"] == pytest.approx(np.mean(slopes), abs=1e-3)
        assert f"<td>{row.name}</td>" in report
    # each configuration and seed is its own run; the rows of one configuration read one set of runs
    assert {label: len(dirs) for label, dirs in results["runs"].items()} == {
        "toy": 2, "toy, no decoder": 2, "as published": 2, "reclip++ student": 2, "maskclip+ student": 2,
        "maft, labels of seen classes": 2, "maft, reclip++ pseudo labels": 2}
    assert len({d for dirs in results["runs"].values() for d in dirs}) == 14
    # MAFT: the seen-class run never saw the unseen names; the pseudo-label run learnt from that seed's ReCLIP++ run
    names = rows[0].result.class_names
    unseen = SMALL_MAFT.unseen_classes(list(names))
    for row in rows[-3:]:
        assert set(row.zero_shot()) == {"mIoU_seen", "mIoU_unseen", "hIoU"}
        assert row.result.settings["zero_shot"]["unseen"] == unseen
    for seed, (teacher, labelled, pseudo) in enumerate(zip(results["runs"]["toy"], results["runs"][MAFT_ROWS[1]],
                                                           results["runs"][MAFT_ROWS[2]])):
        labelled, pseudo = (json.loads((Path(d) / "config.json").read_text()) for d in (labelled, pseudo))
        assert labelled["supervision"] == "labels" and labelled["unseen_classes"] == unseen
        assert pseudo["supervision"] == "pseudo" and pseudo["unseen_classes"] == []
        assert pseudo["teacher"]["run"] == teacher and labelled["train"]["seed"] == pseudo["train"]["seed"] == seed
    assert "mIoU_unseen (unseen split)" in report
    # each seed's ReCLIP++ student learnt from that seed's 'toy' run; MaskCLIP+ from MaskCLIP on the same features
    for teacher, student in zip(results["runs"]["toy"], results["runs"]["reclip++ student"]):
        saved = json.loads((Path(student) / "config.json").read_text())
        assert saved["teacher"]["method"] == "reclip++" and saved["distill"]["width"] == 8
        assert saved["train"]["seed"] == json.loads((Path(teacher) / "config.json").read_text())["train"]["seed"]
    mcp = json.loads((Path(results["runs"]["maskclip+ student"][0]) / "config.json").read_text())["distill"]
    assert mcp["teacher"] == "maskclip" and mcp["teacher_overrides"] == {"residual": False, "ffn": False}
    assert "differ from the paper: gumbel_scale 30.0 (paper 100.0); reference_length 8 (paper 73" in report
    # a student reads its own input normalisation (ImageNet's), not CLIP's, in the demo's scores
    from reclip.api import evaluate_segmentor
    from reclip.data.datasets import SegmentationDataset
    from reclip.distillation import load_student
    from reclip.inference import InferenceConfig

    student = load_student(results["runs"]["reclip++ student"][0])
    assert student.image_mean[0] == 0.485
    data = SegmentationDataset("voc21", tmp_path / "out" / "toy_data" / "VOCdevkit" / "VOC2012", "val",
                               classes_file=tmp_path / "out" / "toy_data" / "toy_classes.txt")
    own = evaluate_segmentor(student, data, InferenceConfig(mode="whole", short_side=None, logit_scale=50.0),
                             mean=student.image_mean, std=student.image_std, num_workers=0, progress=False)
    row = next(r for r in rows if r.name == "reclip++ student")
    assert np.array_equal(own.confusion, row.result.confusion)
    assert Path(results["hypotheses"]).is_file()
    # segmentation that means something: the best training-free row classifies object pixels
    # well above chance among the object classes (background is the tiny CLIP's weakest word)
    def object_accuracy(row) -> float:
        objects = row.result.confusion[1:]  # rows: ground-truth objects
        return objects[:, 1:].trace() / objects.sum()

    chance = 1 / (len(rows[0].result.class_names) - 1)
    assert max(object_accuracy(r) for r in rows[:len(VARIANTS)]) > chance + 0.2
    assert report.count("data:image/png;base64") >= 2 + 4 * (2 + len(rows))  # plots + example grid
    assert results["pretraining"]["zero_shot_accuracy"] > 0.25  # above chance for 4 classes


def test_demo_reuses_a_finished_rectification_run(tmp_path, toy_ci_checkpoint, monkeypatch):
    cache, _ = toy_ci_checkpoint
    kwargs = dict(config=ToyConfig.ci(), cache_dir=cache, num_scenes=4, rectification=SMALL_RECTIFICATION,
                  distillation=SMALL_DISTILLATION, maft=SMALL_MAFT, proxy=SMALL_PROXY, progress=False)
    first = run_demo(tmp_path / "out", **kwargs)
    runs = sorted(p for pattern in ("reclip++-*", "student-*", "maft-*") for p in (tmp_path / "out").glob(pattern))
    written = {run: (run / "model.safetensors").stat().st_mtime_ns for run in runs}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    # runs train in worker processes (which a monkeypatch here does not reach) or in this one
    monkeypatch.setattr(reclip.rectification, "_loss", no_training)
    monkeypatch.setattr(reclip.demo, "ProcessPoolExecutor", no_training)
    monkeypatch.setattr(reclip.toy.dino, "train_dino", no_training)  # the toy DINOs are cached too
    second = run_demo(tmp_path / "out", **kwargs)
    assert [r.summary() for r in second] == [r.summary() for r in first]
    assert sorted(p for pattern in ("reclip++-*", "student-*", "maft-*") for p in (tmp_path / "out").glob(pattern)) == runs
    assert len(runs) == 14  # reused: 3 rectifier configurations, 2 students and 2 MAFT runs, x 2 seeds
    assert {run: (run / "model.safetensors").stat().st_mtime_ns for run in runs} == written
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    toy = [json.loads((Path(d) / "config.json").read_text()) for d in results["runs"]["toy"]]
    assert [c["train"]["seed"] for c in toy] == [0, 1]
    for config in toy:
        assert config["rectifier"]["reference_length"] == SMALL_RECTIFICATION.reference_length
        assert config["rectifier"]["strategy"]["residual"] is False  # MaskCLIP without residual, as a LastBlock
        assert config["train_images"] == SMALL_RECTIFICATION.num_train
    published = json.loads((Path(results["runs"]["as published"][0]) / "config.json").read_text())["rectifier"]
    assert (published["reference_length"], published["gumbel_scale"], published["decoder"]) == (None, 100.0, True)
    no_decoder = json.loads((Path(results["runs"]["toy, no decoder"][0]) / "config.json").read_text())["rectifier"]
    assert no_decoder["decoder"] is False and no_decoder["gumbel_scale"] == 30.0


def test_a_run_trained_in_a_worker_process_equals_one_trained_in_this_process(tmp_path, toy_ci_checkpoint):
    """The demo trains its runs in parallel processes: that must not change their weights."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch
    from reclip.clip.load import load_clip
    from reclip.demo import _TrainJob
    from reclip.toy.world import write_voc_layout

    cache, checkpoint = toy_ci_checkpoint
    voc = write_voc_layout(tmp_path / "toy_data", num_train=6, num_val=0, seed=3, config=ToyConfig.ci().world)
    classes = tmp_path / "toy_data" / "toy_classes.txt"
    clip = load_clip(checkpoint)
    from reclip.data.datasets import SegmentationDataset
    from reclip.hypotheses import HypothesisConfig, generate_hypotheses
    from reclip.text import query_embeddings

    train = SegmentationDataset("voc21", voc, "train", classes_file=classes)
    queries = query_embeddings(clip, train.vocabulary, "reclip85")
    generate_hypotheses(clip, train, queries, config=HypothesisConfig(r=1 / 3, t=0.07), out_path=tmp_path / "h.json",
                        progress=False, templates="reclip85")
    config = SMALL_RECTIFICATION.rectifier_config().to_dict()
    jobs = [_TrainJob(str(checkpoint), str(voc), str(classes), str(tmp_path / "h.json"), str(tmp_path / name),
                      config, 1, 3, 2, 0.01, 64, str(tmp_path / "text_cache")) for name in ("here", "there")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        jobs[0].run(clip)
    finally:
        torch.set_num_threads(threads)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(jobs[1].run).result()
    here = (tmp_path / "here" / "model.safetensors").read_bytes()
    assert here == (tmp_path / "there" / "model.safetensors").read_bytes()
