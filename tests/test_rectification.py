"""The rectification stage end to end through the CLI: hypotheses -> rectify -> evaluate /
segment with the trained head, on a tiny random CLIP and a synthetic VOC layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from layouts import write_voc
from tiny import tiny_clip
from reclip.cli import main
from reclip.clip.load import load_clip, save_clip
from reclip.data.protocol import load_protocol
from reclip.rectification import load_rectifier
from reclip.text import Vocabulary


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(clip file, VOC root, run dir) after hypotheses + a few rectification steps."""
    base = tmp_path_factory.mktemp("rect")
    clip_file = save_clip(tiny_clip(), base / "tiny.pt", format="openai")
    root = write_voc(base / "voc", n_train=4, n_val=2)
    common = ["--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--quiet"]
    assert main(["hypotheses", *common, "--split", "train", "--out", str(base / "hyp.json"), "--t", "0"]) == 0
    assert main(["rectify", *common, "--hypotheses", str(base / "hyp.json"), "--out", str(base / "run"),
                 "--max-steps", "3", "--batch-size", "2", "--crop", "32", "--base-short-side", "40",
                 "--device", "cpu"]) == 0
    return clip_file, root, base / "run"


def test_run_directory_holds_config_and_trained_parameters_only(trained):
    clip_file, _, run = trained
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "reclip++" and config["protocol"] == "voc20"
    assert config["clip_fingerprint"] == load_clip(clip_file)._reclip_fingerprint
    assert len(config["classes"]) == 20 and config["train"]["steps"] == 3
    # trained on the official ReCLIP class names (voc20's reclip.classes_file), not ClearCLIP's
    assert config["classes"][0] == "airplane" and "dining table" in config["classes"]
    # the protocol's preset is recorded as read; the CLI's options replaced parts of it
    assert config["preset"] == {"base_short_side": 336, "crop": 336, "batch_size": 1, "lr": 0.01, "epochs": 50,
                                "poly_epochs": 200}
    assert config["augment"] == {"base_short_side": 40, "crop": 32} and config["train"]["batch_size"] == 2
    from safetensors.torch import load_file

    keys = load_file(str(run / "model.safetensors")).keys()
    assert keys and not any(k.startswith("clip.") for k in keys)
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 1


def test_evaluate_and_segment_with_the_trained_head(trained, tmp_path, capsys):
    clip_file, root, run = trained
    out = tmp_path / "r.json"
    assert main(["evaluate", "--clip", str(clip_file), "--method", "reclip++", "--checkpoint", str(run),
                 "--dataset", "voc20", "--data-root", str(root), "--short-side", "40", "--json", str(out),
                 "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == "reclip++" and result["num_images"] == 2
    assert result["settings"]["inference"]["pd_threshold"] is None  # the paper: argmax of M_o
    assert result["settings"]["output"] == "decoded"
    assert main(["evaluate", "--clip", str(clip_file), "--method", "reclip++", "--checkpoint", str(run),
                 "--dataset", "voc20", "--data-root", str(root), "--short-side", "40", "--json", str(out),
                 "--prompt-denoising", "official", "--output", "rectified", "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["inference"]["pd_threshold"] == 1.0  # the official evaluator's VOC PD
    assert result["settings"]["inference"]["pd_mode"] == "official"  # exactly: on the head's grid
    assert result["settings"]["output"] == "rectified"
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 44, 3), dtype=np.uint8)).save(photos / "a.png")
    classes = [line for line in json.loads((run / "config.json").read_text())["classes"]]
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    assert main(["segment", "--clip", str(clip_file), "--method", "reclip++", "--checkpoint", str(run),
                 "--classes-file", str(tmp_path / "classes.txt"), "--out", str(tmp_path / "m"), str(photos),
                 "--quiet"]) == 0
    assert Image.open(tmp_path / "m" / "a.png").size == (44, 30)


def test_a_run_refuses_another_clip_or_class_list(trained, tmp_path, capsys):
    clip_file, root, run = trained
    other = save_clip(tiny_clip(1), tmp_path / "other.pt", format="openai")
    with pytest.raises(ValueError, match="fingerprint"):
        load_rectifier(run, load_clip(other))
    with pytest.raises(ValueError, match="trained for the classes"):
        load_rectifier(run, load_clip(clip_file), Vocabulary.from_names("cat,dog"))
    code = main(["evaluate", "--clip", str(clip_file), "--method", "reclip++", "--dataset", "voc20",
                 "--data-root", str(root), "--quiet"])
    assert code == 2 and "--checkpoint" in capsys.readouterr().err
    code = main(["evaluate", "--clip", str(clip_file), "--method", "reclip", "--checkpoint", str(run),
                 "--dataset", "voc20", "--data-root", str(root), "--quiet"])
    assert code == 2 and "use --method reclip++" in capsys.readouterr().err
    code = main(["evaluate", "--clip", str(clip_file), "--method", "maskclip", "--output", "rectified",
                 "--dataset", "voc20", "--data-root", str(root), "--quiet"])
    assert code == 2 and "has one output" in capsys.readouterr().err


def test_rectify_switches_reach_the_run_and_load_back(trained, tmp_path):
    clip_file, root, _ = trained
    run = tmp_path / "nores"
    assert main(["rectify", "--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--quiet",
                 "--hypotheses", str(trained[2].parent / "hyp.json"), "--out", str(run), "--max-steps", "1",
                 "--batch-size", "2", "--crop", "32", "--base-short-side", "40", "--device", "cpu",
                 "--features", "maskclip", "--no-residual", "--no-ffn", "--reference-length", "5",
                 "--gumbel-scale", "10", "--reference-name-tokens", "official"]) == 0
    rect = json.loads((run / "config.json").read_text())["rectifier"]
    assert rect["strategy"] == {"attention": "identity", "residual": False, "ffn": False, "gaussian_sigma": 5.0}
    assert rect["reference_length"] == 5 and rect["gumbel_scale"] == 10.0 and rect["reference_name_tokens"] == "official"
    model = load_rectifier(run, load_clip(clip_file))
    assert model.strategy.residual is False and model.head.reference.length == 5
    assert model.head.reference.name_tokens == "official"


def test_the_rectify_section_of_a_user_yaml_drives_training(trained, tmp_path):
    """No training option on the command line: steps, batch, lr, horizon and scale come from the YAML."""
    clip_file, root, run = trained
    data = yaml.safe_load(open(load_protocol("voc20").source))
    preset = {"base_short_side": 40, "crop": 32, "batch_size": 2, "lr": 0.05, "epochs": 1, "poly_epochs": 3}
    data.update(name="mine", rectify=preset)
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "mine"
    assert main(["rectify", "--clip", str(clip_file), "--dataset", str(tmp_path / "mine.yaml"), "--data-root",
                 str(root), "--hypotheses", str(run.parent / "hyp.json"), "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == preset and config["protocol"] == "mine"
    assert config["augment"] == {"base_short_side": 40, "crop": 32}
    train = config["train"]  # 4 train images / batch 2 = 2 steps per epoch
    optimizer = config["optimizer"]
    assert (train["steps"], train["batch_size"]) == (2, 2)
    assert (optimizer["type"], optimizer["lr"], optimizer["schedule"]["horizon"]) == ("SGDConfig", 0.05, 6)


def test_a_resume_with_other_rectifier_settings_is_refused(trained, tmp_path, capsys):
    """--resume continues only the same run: another Gumbel scale (or feature strategy) is refused."""
    clip_file, root, run = trained
    common = ["rectify", "--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--hypotheses",
              str(run.parent / "hyp.json"), "--out", str(run), "--max-steps", "3", "--batch-size", "2", "--crop", "32",
              "--base-short-side", "40", "--device", "cpu", "--quiet", "--resume"]
    before = (run / "model.safetensors").read_bytes()
    assert main([*common, "--gumbel-scale", "30"]) == 2
    assert "rectifier" in capsys.readouterr().err
    assert main([*common, "--no-residual"]) == 2
    assert main(common) == 0  # the same settings: the finished run, untouched
    assert (run / "model.safetensors").read_bytes() == before


def test_a_resume_with_other_hypotheses_is_refused(trained, tmp_path, capsys):
    clip_file, root, run = trained
    hyp = json.loads((run.parent / "hyp.json").read_text())
    first = next(iter(hyp["images"]))
    hyp["images"][first] = [0] if hyp["images"][first] != [0] else [1]  # one image's classes differ
    (tmp_path / "other.json").write_text(json.dumps(hyp))
    assert main(["rectify", "--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--hypotheses",
                 str(tmp_path / "other.json"), "--out", str(run), "--max-steps", "3", "--batch-size", "2", "--crop",
                 "32", "--base-short-side", "40", "--device", "cpu", "--quiet", "--resume"]) == 2
    assert "hypotheses" in capsys.readouterr().err


def test_misshapen_run_weights_are_refused_naming_the_file(trained, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    clip_file, root, run = trained
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    state = load_file(str(broken / "model.safetensors"))
    state["head.bias.pe_proj.weight"] = state["head.bias.pe_proj.weight"][:3].contiguous()  # one tensor cut
    save_file(state, str(broken / "model.safetensors"))
    assert main(["evaluate", "--clip", str(clip_file), "--method", "reclip++", "--checkpoint", str(broken),
                 "--dataset", "voc20", "--data-root", str(root), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(broken / "model.safetensors") in err and "head.bias.pe_proj.weight" in err
