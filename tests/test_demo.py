"""`reclip demo` end to end on the small toy world (the session's ci() tiny CLIP)."""

import dataclasses
import json

import numpy as np
import pytest

import reclip.rectification
from reclip.bias import class_preference
from reclip.metrics import ConfusionMatrix
from reclip.demo import TOY_RECTIFICATION, VARIANTS, run_demo
from reclip.toy.pretrain import ToyConfig

# ReCLIP++ on a few train scenes for a few steps: the pipeline, not its quality.
SMALL_RECTIFICATION = dataclasses.replace(TOY_RECTIFICATION, num_train=8, steps=3, batch_size=4)


def test_demo_writes_a_complete_report(tmp_path, toy_ci_checkpoint):
    cache, _ = toy_ci_checkpoint
    rows = run_demo(tmp_path / "out", config=ToyConfig.ci(), cache_dir=cache, num_scenes=12,
                    rectification=SMALL_RECTIFICATION, progress=False)
    assert [r.name for r in rows] == [*VARIANTS, "reclip++ (maskclip-nores)"]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    report = (tmp_path / "out" / "report.html").read_text()
    for row in rows:
        summary = row.summary()
        confusion = ConfusionMatrix(len(row.result.class_names))
        confusion.matrix[...] = np.array(results["methods"][row.name]["confusion"])
        # the table, the JSON and the report say what the confusion matrix counted
        assert summary["mIoU"] == pytest.approx(100 * confusion.compute()["mIoU"])
        assert results["methods"][row.name]["mIoU"] == round(summary["mIoU"], 4)
        assert summary["class-preference"] == pytest.approx(class_preference(confusion.matrix, exclude=(0,))["score"])
        curve = results["methods"][row.name]["bias"]["space_curve"]  # the mean slope of the plotted curve
        kept = [(d, m) for d, m in zip(curve["distance"], curve["mIoU"]) if m is not None]
        slopes = [(m1 - m0) / (d1 - d0) for (d0, m0), (d1, m1) in zip(kept, kept[1:])]
        assert summary["space-preference"] == pytest.approx(np.mean(slopes), abs=1e-3)
        assert f"<td>{row.name}</td>" in report
    # segmentation that means something: the best training-free row classifies object pixels
    # well above chance among the object classes (background is the tiny CLIP's weakest word)
    def object_accuracy(row) -> float:
        objects = np.array(results["methods"][row.name]["confusion"])[1:]  # rows: ground-truth objects
        return objects[:, 1:].trace() / objects.sum()

    chance = 1 / (len(rows[0].result.class_names) - 1)
    assert max(object_accuracy(r) for r in rows[:-1]) > chance + 0.2
    assert report.count("data:image/png;base64") >= 2 + 4 * (2 + len(rows))  # plots + example grid
    assert results["pretraining"]["zero_shot_accuracy"] > 0.25  # above chance for 4 classes


def test_demo_reuses_a_finished_rectification_run(tmp_path, toy_ci_checkpoint, monkeypatch):
    cache, _ = toy_ci_checkpoint
    kwargs = dict(config=ToyConfig.ci(), cache_dir=cache, num_scenes=4, rectification=SMALL_RECTIFICATION,
                  progress=False)
    first = run_demo(tmp_path / "out", **kwargs)

    def no_training_step(*args, **kwargs):
        raise AssertionError("the finished run was trained again")

    monkeypatch.setattr(reclip.rectification, "_loss", no_training_step)
    second = run_demo(tmp_path / "out", **kwargs)
    assert second[-1].result.miou == first[-1].result.miou
    runs = sorted((tmp_path / "out").glob("reclip++-*"))
    assert len(runs) == 1  # the second demo reused the first one's run
    config = json.loads((runs[0] / "config.json").read_text())
    assert config["rectifier"]["reference_length"] == SMALL_RECTIFICATION.reference_length
    assert config["rectifier"]["strategy"]["residual"] is False  # MaskCLIP without residual, as a LastBlock
    assert config["train_images"] == SMALL_RECTIFICATION.num_train
