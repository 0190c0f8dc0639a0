"""`reclip demo` end to end on the small toy world (the session's ci() tiny CLIP)."""

import json
import math

from reclip.demo import VARIANTS, run_demo
from reclip.toy.pretrain import ToyConfig


def test_demo_writes_a_complete_report(tmp_path, toy_ci_checkpoint):
    cache, _ = toy_ci_checkpoint
    rows = run_demo(tmp_path / "out", config=ToyConfig.ci(), cache_dir=cache, num_scenes=12, progress=False)
    assert [r.name for r in rows] == list(VARIANTS)
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
