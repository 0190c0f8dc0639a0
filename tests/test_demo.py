"""`reclip demo` end to end on the small toy world (the session's ci() tiny CLIP)."""

import json
import math

import dataclasses

import reclip.rectification
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
        assert 0.0 <= summary["mIoU"] <= 100.0
        assert -1.0 <= summary["class-preference"] <= 1.0
        assert results["methods"][row.name]["mIoU"] == round(summary["mIoU"], 4)
        assert f"<td>{row.name}</td>" in report
    assert report.count("data:image/png;base64") >= 2 + 4 * (2 + len(rows))  # plots + example grid
    assert results["pretraining"]["zero_shot_accuracy"] > 0.25  # above chance for 4 classes
    assert not math.isnan(rows[0].result.miou)


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
