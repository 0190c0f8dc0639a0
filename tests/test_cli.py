"""End to end through the command line: a tiny random CLIP written as a checkpoint file,
synthetic datasets in the real folder layouts, bad inputs mixed in."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from layouts import write_voc
from tiny import tiny_clip
from reclip import api
from reclip.cli import main
from reclip.clip.convert import CheckpointError
from reclip.clip.load import CLIP_MEAN, CLIP_STD, load_clip
from reclip.data.datasets import SegmentationDataset
from reclip.data.io import read_label
from reclip.data.protocol import load_protocol
from reclip.inference import segment
from reclip.methods import build_segmentor, inference_config

pytestmark = pytest.mark.usefixtures("isolated_cache")


COMMON = ["--quiet", "--templates", "single", "--short-side", "48", "--mode", "slide", "--window", "32",
          "--stride", "16"]


def test_evaluate_writes_json_matching_an_independent_loop(tmp_path, clip_file, capsys):
    root = write_voc(tmp_path / "voc", n_val=3)
    out = tmp_path / "res.json"
    code = main(["evaluate", "--clip", str(clip_file), "--method", "clearclip", "--dataset", "voc21",
                 "--data-root", str(root), "--json", str(out), *COMMON])
    assert code == 0
    printed = capsys.readouterr().out
    assert "aeroplane" in printed and "mIoU" in printed
    result = json.loads(out.read_text())
    assert result["num_images"] == 3 and result["skipped"] == []
    assert result["settings"]["inference"]["window"] == 32

    # Independent: segment each image with the same segmentor, sum a numpy confusion matrix.
    clip = load_clip(clip_file)
    data = SegmentationDataset("voc21", root, "val")
    cfg = inference_config("clearclip", data.protocol, short_side=48, mode="slide", window=32, stride=16)
    seg = build_segmentor("clearclip", clip, data.vocabulary, templates="single")
    inter = np.zeros(21)
    union = np.zeros(21)
    for item in (data[i] for i in range(len(data))):
        pred = segment(seg, item["image"], cfg, background_index=0).labels
        valid = item["label"] != 255
        for c in range(21):
            p, g = (pred == c) & valid, (item["label"] == c) & valid
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    iou = inter[union > 0] / union[union > 0]
    assert result["mIoU"] == pytest.approx(100 * iou.mean(), abs=1e-3)


def test_evaluate_with_naclips_own_protocol(tmp_path, clip_file):
    """--test-settings naclip: NACLIP's section of the protocol, its class file and PAMR, end to end."""
    root = write_voc(tmp_path / "voc", n_val=2)
    out = tmp_path / "res.json"
    base = ["evaluate", "--clip", str(clip_file), "--method", "naclip", "--dataset", "voc21", "--data-root",
            str(root), "--quiet", "--templates", "single", "--short-side", "48", "--json", str(out)]
    argv = [*base, "--test-settings", "naclip", "--pamr-iter", "2"]
    assert main(argv) == 0
    settings = json.loads(out.read_text())["settings"]
    inference = settings["inference"]
    assert settings["test_settings"] == "naclip"
    assert (inference["mode"], inference["short_side"], inference["logit_scale"]) == ("whole", 48, 40)
    assert (inference["prob_thd"], inference["area_thd"]) == (0.1, None)
    assert (inference["pamr"], inference["pamr_iter"], list(inference["pamr_dilations"])) == (True, 2, [8, 16])
    assert settings["classes"][0].startswith("background: sky, wall, tree")  # NACLIP's (= SCLIP's) class file
    # a class file on the command line wins over the section's; the default section is ClearCLIP's
    assert main([*argv, "--classes-file", "voc21.txt", "--pamr-dilations", "1,2", "--no-pamr"]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["classes"][0] == "background" and settings["inference"]["pamr"] is False
    assert list(settings["inference"]["pamr_dilations"]) == [1, 2]
    assert main(base) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["test_settings"] == "zero_shot" and settings["inference"]["logit_scale"] == 50
    assert settings["classes"][0] == "background" and settings["inference"]["pamr"] is False


def test_inference_flags_reach_the_inference_config(monkeypatch):
    import reclip.cli

    seen = {}

    def evaluate(clip, method, dataset, data_root, split, **kwargs):
        seen.update(method=method, dataset=dataset, **kwargs)
        raise ValueError("spied")

    monkeypatch.setattr(reclip.cli, "_load", lambda args: None)
    monkeypatch.setattr(api, "evaluate", evaluate)
    argv = ["evaluate", "--clip", "m.pt", "--method", "sclip", "--dataset", "cityscapes19", "--data-root", "r"]
    assert main([*argv, "--test-settings", "naclip", "--pamr-iter", "3", "--pamr-dilations", "8, 16,32"]) == 2
    assert seen["inference"] == {"test_settings": "naclip", "pamr_iter": 3, "pamr_dilations": (8, 16, 32)}
    cfg = inference_config(seen["method"], load_protocol(seen["dataset"]), **seen["inference"])
    assert (cfg.short_side, cfg.window, cfg.stride, cfg.logit_scale) == (560, 224, 112, 40)
    assert (cfg.pamr, cfg.pamr_iter, cfg.pamr_dilations) == (True, 3, (8, 16, 32))
    assert main([*argv, "--pamr", "--pamr-dilations", "8,16"]) == 2
    cfg = inference_config(seen["method"], load_protocol(seen["dataset"]), **seen["inference"])
    assert (cfg.short_side, cfg.pamr, cfg.pamr_iter, cfg.pamr_dilations) == (448, True, 10, (8, 16))


def test_test_settings_of_another_family_are_refused_before_reading_data(monkeypatch, capsys):
    import reclip.cli

    monkeypatch.setattr(reclip.cli, "_load", lambda args: None)
    argv = ["evaluate", "--clip", "m.pt", "--dataset", "voc21", "--data-root", "nowhere"]
    assert main([*argv, "--method", "reclip++", "--test-settings", "naclip"]) == 2
    assert ("test settings 'naclip' are for the zero_shot family; 'reclip++' (rectified) reads 'reclip'"
            in capsys.readouterr().err)


def test_evaluate_and_segment_normalise_with_the_models_mean_and_std(tmp_path, clip_file):
    root = write_voc(tmp_path / "voc", n_val=1)
    (val_id,) = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    other_mean, other_std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.25)
    whole = {"mode": "whole", "short_side": 32}
    seen = {}
    for name in ("file", "other"):
        clip = load_clip(clip_file)
        if name == "other":  # the same weights with another preprocessing
            clip.image_mean, clip.image_std = other_mean, other_std
        inputs = seen[name] = []
        embed = clip.visual.embed
        clip.visual.embed = lambda images, embed=embed, inputs=inputs: inputs.append(images) or embed(images)
        api.evaluate(clip, "maskclip", "voc21", root, templates="single", inference=whole, progress=False)
        api.segment_files(clip, "maskclip", "a,b", [root / "JPEGImages" / f"{val_id}.jpg"], tmp_path / name,
                          templates="single", inference=whole, progress=False)
    assert len(seen["file"]) == len(seen["other"]) == 2  # the val image, evaluated then segmented
    from reclip.data.io import read_image
    from reclip.data.transforms import short_side_size

    h, w = short_side_size(*read_image(root / "JPEGImages" / f"{val_id}.jpg").shape[:2], 32)
    for a, b in zip(seen["file"], seen["other"]):
        a, b = a[..., :h, :w], b[..., :h, :w]  # the image, without the padding to the patch
        assert not torch.allclose(a, b, atol=1e-2)
        # the same pixels x, as (x - mean) / std with each model's own statistics
        x_file = a * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        x_other = b * torch.tensor(other_std).view(1, 3, 1, 1) + torch.tensor(other_mean).view(1, 3, 1, 1)
        torch.testing.assert_close(x_file, x_other, atol=1e-5, rtol=0)


def test_evaluate_reports_and_skips_a_corrupt_image(tmp_path, clip_file, capsys):
    root = write_voc(tmp_path / "voc", n_val=3)
    ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    bad = root / "JPEGImages" / f"{ids[1]}.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG, header intact
    out = tmp_path / "res.json"
    code = main(["evaluate", "--clip", str(clip_file), "--method", "maskclip", "--dataset", "voc21",
                 "--data-root", str(root), "--json", str(out), *COMMON])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 2
    assert [s["path"] for s in result["skipped"]] == [str(bad)]
    assert str(bad) in capsys.readouterr().out


def test_evaluate_with_another_class_list_on_the_same_layout(tmp_path, clip_file):
    root = write_voc(tmp_path / "voc", n_val=2)
    # Relabel the tree with 3 classes (0, 1, 2; 255 kept) and evaluate it with a 3-line class file.
    for path in (root / "SegmentationClass").glob("*.png"):
        label = read_label(path)
        label = np.where(label == 255, 255, label % 3).astype(np.uint8)
        Image.fromarray(label).save(path)
    classes = tmp_path / "mine.txt"
    classes.write_text("background: sky, wall\nteapot\nbicycle, bike\n")
    result = api.evaluate(load_clip(clip_file), "naclip", "voc21", root, classes_file=classes,
                          templates="single", inference={"short_side": 48, "mode": "whole"}, progress=False)
    assert result.class_names == ["background", "teapot", "bicycle"]
    assert result.confusion.shape == (3, 3)


def test_segment_writes_masks_and_skips_bad_files(tmp_path, clip_file, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / "rgb.jpg")
    Image.fromarray(rng.integers(0, 256, (33, 47), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "masks"
    code = main(["segment", "--clip", str(clip_file), "--method", "sclip", "--classes", "cat,dog,grass",
                 "--out", str(out), str(folder), *COMMON])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote 3 masks" in printed and "empty.jpg" in printed
    for stem, size in (("rgb", (56, 40)), ("gray", (47, 33)), ("rgba", (30, 30))):
        mask = Image.open(out / f"{stem}.png")
        assert mask.mode == "P" and mask.size == size
        assert np.asarray(mask).max() < 3
        assert (out / f"{stem}_overlay.jpg").is_file()
    assert (out / "legend.png").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["segment", "--classes", " , ", "--out", "x", "img.jpg"], "no class names"),
        (["evaluate", "--dataset", "voc21", "--data-root", "/nonexistent/voc"], "JPEGImages"),
        (["evaluate", "--dataset", "pascal", "--data-root", "."], "available"),
    ],
)
def test_bad_input_gives_a_clear_error(tmp_path, clip_file, capsys, argv, message):
    if argv[0] == "segment":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img.jpg")
        argv = [a if a != "img.jpg" else str(tmp_path / "img.jpg") for a in argv]
    code = main([argv[0], "--clip", str(clip_file), *argv[1:], "--quiet"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_unknown_method_is_refused_with_the_choices(clip_file, capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--clip", str(clip_file), "--method", "segclip", "--classes", "a", "--out", "x", "y"])
    err = capsys.readouterr().err
    assert "segclip" in err and "maskclip" in err


def test_listings(capsys):
    assert main(["methods"]) == 0 and "naclip" in capsys.readouterr().out
    assert main(["datasets"]) == 0 and "cocostuff27" in capsys.readouterr().out


def test_a_checkpoint_with_missing_tensors_is_refused_by_name(tmp_path, capsys):
    sd = tiny_clip().state_dict()
    del sd["visual.ln_post.weight"]
    sd["ln_final.bias"] = torch.zeros(3)
    torch.save(sd, tmp_path / "broken.pt")
    code = main(["segment", "--clip", str(tmp_path / "broken.pt"), "--classes", "a,b", "--out",
                 str(tmp_path / "o"), str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "visual.ln_post.weight" in err and "ln_final.bias" in err


# The rest of each command's required arguments ({root}: a VOC-layout tree).
CLIP_COMMANDS = {
    "segment": ["--classes", "a,b", "--out", "o", "{root}"],
    "evaluate": ["--dataset", "voc20", "--data-root", "{root}"],
    "hypotheses": ["--dataset", "voc20", "--data-root", "{root}", "--out", "h.json"],
    "rectify": ["--dataset", "voc20", "--data-root", "{root}", "--hypotheses", "h.json", "--out", "o"],
}


@pytest.mark.parametrize("command", sorted(CLIP_COMMANDS))
def test_every_command_taking_clip_passes_clip_config_to_load_clip(tmp_path, monkeypatch, capsys, command):
    import reclip.clip

    root = write_voc(tmp_path / "voc", n_train=1, n_val=1)
    seen = {}

    def load_clip_stub(spec, **kwargs):
        seen.update(kwargs, spec=spec)
        raise CheckpointError("stub: stop after load_clip")

    monkeypatch.setattr(reclip.clip, "load_clip", load_clip_stub)
    argv = [a.format(root=root) for a in CLIP_COMMANDS[command]]
    code = main([command, "--clip", "m.safetensors", "--clip-config", "ViT-tiny.json", "--quiet", *argv])
    assert code == 2 and "stub: stop after load_clip" in capsys.readouterr().err
    assert seen["spec"] == "m.safetensors" and seen["config"] == "ViT-tiny.json"


def test_segment_with_clip_config_loads_the_heads_it_gives(tmp_path, capsys):
    from safetensors.torch import save_file

    model = tiny_clip(vision_heads=4, transformer_heads=2, quick_gelu=False)  # head widths 16 and 32
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))  # no config beside it
    config = tmp_path / "ViT-tiny.json"  # open_clip's model_configs/<name>.json form
    config.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }))
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(photos / "a.png")
    argv = ["segment", "--clip", str(weights), "--method", "maskclip", "--classes", "cat,dog,grass"]
    with pytest.warns(UserWarning, match="heads"):  # guessed without the config
        assert main([*argv, "--out", str(tmp_path / "guessed"), str(photos), *COMMON]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = main([*argv, "--clip-config", str(config), "--out", str(tmp_path / "given"), str(photos), *COMMON])
    assert code == 0, capsys.readouterr().err
    api.segment_files(model, "maskclip", "cat,dog,grass", [photos], tmp_path / "original", templates="single",
                      inference={"short_side": 48, "mode": "slide", "window": 32, "stride": 16}, progress=False)
    given, guessed, original = (np.asarray(Image.open(tmp_path / d / "a.png")) for d in ("given", "guessed",
                                                                                          "original"))
    assert np.array_equal(given, original)
    assert not np.array_equal(guessed, original)  # the guessed heads are another model


def test_folder_protocol_scores_a_user_folder_with_labels(tmp_path, clip_file):
    rng = np.random.default_rng(1)
    images, labels = tmp_path / "imgs", tmp_path / "masks"
    for sub in ("", "deeper/"):
        (images / sub).mkdir(parents=True, exist_ok=True)
        (labels / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"{sub}a.jpg")
        Image.fromarray(rng.integers(0, 2, (40, 48), dtype=np.uint8)).save(labels / f"{sub}a.png")
    classes = tmp_path / "c.txt"
    classes.write_text("road\nsky\n")
    out = tmp_path / "r.json"
    assert main(["evaluate", "--clip", str(clip_file), "--dataset", "folder", "--data-root", str(images),
                 "--label-dir", str(labels), "--classes-file", str(classes), "--json", str(out), *COMMON]) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 2 and set(result["IoU"]) == {"road", "sky"}
    assert result["settings"]["classes"] == ["road", "sky"]


def test_segment_keeps_equal_names_apart_and_ignores_its_own_outputs(tmp_path, clip_file):
    photos = tmp_path / "photos"
    rng = np.random.default_rng(2)
    for rel in ("x/img.jpg", "y/img.jpg", "img.jpg", "img.png"):
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(photos / rel)
    out = photos / "masks"  # inside the input folder
    for _ in range(2):  # the second run must not pick up the first run's masks
        summary = api.segment_files(load_clip(clip_file), "maskclip", "a,b", [photos], out, templates="single",
                                    inference={"short_side": 24, "mode": "whole"}, progress=False)
        assert len(summary.written) == 4
    masks = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png") if p.name != "legend.png")
    assert masks == ["img.png", "img_png.png", "x/img.png", "y/img.png"]


def test_evaluate_bias_uses_instance_masks_and_writes_plots(tmp_path, clip_file, capsys):
    root = write_voc(tmp_path / "voc", n_val=2)
    ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    # VOC SegmentationObject: one instance per labelled region here (ids 1.., 255 kept).
    (root / "SegmentationObject").mkdir()
    for image_id in ids:
        label = read_label(root / "SegmentationClass" / f"{image_id}.png")
        Image.fromarray(np.where(label == 255, 255, (label > 0) * 1).astype(np.uint8)).save(
            root / "SegmentationObject" / f"{image_id}.png")
    data = SegmentationDataset("voc21", root, "val")
    assert data[0]["instances"] is not None and data[0]["instances"].shape == data[0]["label"].shape
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    assert main(["evaluate", "--clip", str(clip_file), "--method", "maskclip", "--dataset", "voc21",
                 "--data-root", str(root), "--json", str(out), "--bias", "--plots", str(plots), *COMMON]) == 0
    assert "class-preference score" in capsys.readouterr().out
    bias = json.loads(out.read_text())["bias"]
    assert -1.0 <= bias["class_preference"] <= 1.0
    assert len(bias["space_curve"]["mIoU"]) == 5
    assert (plots / "confusion.png").is_file() and (plots / "space_preference.png").is_file()


# -- bad input: class lists, numbers, runs that measure nothing ----------------------------


@pytest.fixture
def segment_spy(monkeypatch):
    """cmd_segment without a model: records the classes api.segment_files receives."""
    import reclip.cli

    seen = {}

    def segment_files(clip, method, classes, inputs, out, **kwargs):
        seen["classes"] = classes
        return api.SegmentSummary(written=[out])

    monkeypatch.setattr(reclip.cli, "_load", lambda args: None)
    monkeypatch.setattr(api, "segment_files", segment_files)
    return seen


def test_classes_are_names_and_classes_file_is_a_file_whatever_is_on_disk(tmp_path, monkeypatch, capsys,
                                                                          segment_spy):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dog").write_text("cat\nbird\n")
    argv = ["segment", "--clip", "m.pt", "--out", "o", "img.jpg", "--quiet"]
    assert main([*argv, "--classes", "dog"]) == 0
    assert segment_spy.pop("classes").classes == (("dog",),)  # not the file ./dog
    assert main([*argv, "--classes-file", "dog"]) == 0
    assert segment_spy.pop("classes").classes == (("cat",), ("bird",))
    # a missing class file is an error naming it, never the class "missing.txt"
    assert main([*argv, "--classes-file", "missing.txt"]) == 2
    assert "class file 'missing.txt' does not exist" in capsys.readouterr().err
    assert main([*argv, "--classes", "cat,dog,Cat"]) == 2
    assert "'Cat' is also a name of class 0 'cat'" in capsys.readouterr().err
    assert "classes" not in segment_spy
    for extra, message in ((["--classes", "cat", "--classes-file", "dog"], "not allowed with"),
                           ([], "one of the arguments --classes --classes-file is required")):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, *extra])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command, flag, value", [
    ("segment", "--window", "0"), ("segment", "--stride", "-16"), ("segment", "--short-side", "0"),
    ("segment", "--batch-size", "0"), ("segment", "--max-long-side", "-1"), ("segment", "--logit-scale", "0"),
    ("segment", "--prob-thd", "1.5"), ("segment", "--area-thd", "nan"),
    ("evaluate", "--limit", "-1"), ("evaluate", "--limit", "0"), ("evaluate", "--workers", "-1"),
    ("evaluate", "--window", "x"), ("evaluate", "--pamr-iter", "0"), ("evaluate", "--pamr-dilations", "8,0"),
    ("evaluate", "--pamr-dilations", "8,x"), ("evaluate", "--pamr-dilations", "-8"), ("segment", "--pamr-dilations", "8,"),
    ("segment", "--pamr-iter", "1.5"),
    ("hypotheses", "--batch-size", "0"), ("hypotheses", "--save-every", "0"), ("hypotheses", "--top-k", "0"),
    ("hypotheses", "--r", "0"), ("hypotheses", "--threshold", "inf"),
    ("rectify", "--max-steps", "0"), ("rectify", "--batch-size", "-2"), ("rectify", "--workers", "-1"),
    ("rectify", "--crop", "0"), ("rectify", "--lr", "-0.1"), ("rectify", "--checkpoint-every", "0"),
    ("rectify", "--seed", "-1"), ("rectify", "--reference-length", "0"),
])
def test_meaningless_numbers_are_refused_by_argparse(capsys, command, flag, value):
    argv = [command, "--clip", "m.pt", *(a.format(root="r") for a in CLIP_COMMANDS[command]), flag, value]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {flag}: " in err and value in err


def test_numbers_at_the_edge_of_their_range_are_accepted():
    from reclip.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--clip", "m", "--dataset", "voc20", "--data-root", "r",
                                      "--workers", "0", "--limit", "1", "--prob-thd", "0", "--area-thd", "1"])
    assert (args.workers, args.limit, args.prob_thd, args.area_thd) == (0, 1, 0.0, 1.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--images", "0"])


def test_api_refuses_a_non_positive_limit(tmp_path, clip_file):
    root = write_voc(tmp_path / "voc", n_val=1)
    for limit in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="limit must be a positive number of images"):
            api.evaluate(load_clip(clip_file), "maskclip", "voc21", root, limit=limit, progress=False)


def test_an_evaluation_that_scores_nothing_fails(tmp_path, clip_file, capsys):
    root = write_voc(tmp_path / "voc", n_val=2)
    ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    argv = ["evaluate", "--clip", str(clip_file), "--method", "maskclip", "--dataset", "voc21",
            "--data-root", str(root), "--json", str(tmp_path / "r.json"), *COMMON]
    # every label pixel ignore (255): nothing can be scored
    for image_id in ids:
        label = root / "SegmentationClass" / f"{image_id}.png"
        Image.fromarray(np.full(read_label(label).shape, 255, np.uint8)).save(label)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "nothing was evaluated" in err and "the 2 image(s) read have no labelled pixel" in err
    assert not (tmp_path / "r.json").exists()
    # every image unreadable
    for image_id in ids:
        image = root / "JPEGImages" / f"{image_id}.jpg"
        image.write_bytes(image.read_bytes()[:200])  # truncated JPEG, header intact
    with pytest.raises(api.NothingEvaluatedError, match="all 2 image") as err:
        api.evaluate(load_clip(clip_file), "maskclip", "voc21", root, progress=False, num_workers=0)
    assert len(err.value.skipped) == 2 and err.value.num_images == 0
    assert main(argv) == 2
    assert "all 2 image(s) were skipped" in capsys.readouterr().err


def test_a_segment_run_that_reads_no_image_fails(tmp_path, clip_file, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "empty.jpg").write_bytes(b"")
    code = main(["segment", "--clip", str(clip_file), "--classes", "cat,dog", "--out", str(tmp_path / "o"),
                 str(photos), *COMMON])
    assert code == 1
    assert "no image could be read" in capsys.readouterr().err


def test_compile_flag_is_opt_in_and_evaluates_like_eager(tmp_path, clip_file, monkeypatch):
    from reclip import inference
    from reclip.cli import _inference_overrides, build_parser

    base = ["evaluate", "--clip", "m", "--dataset", "voc21", "--data-root", "r"]
    assert "compile" not in _inference_overrides(build_parser().parse_args(base))
    assert _inference_overrides(build_parser().parse_args(base + ["--compile"]))["compile"] is True
    seg = build_parser().parse_args(["segment", "--clip", "m", "--classes", "a,b", "--out", "o", "x.jpg",
                                     "--compile"])
    assert _inference_overrides(seg)["compile"] is True
    root = write_voc(tmp_path / "voc", n_val=2)
    clip = load_clip(clip_file)
    real, calls = inference.compiled, []
    monkeypatch.setattr(inference, "compiled", lambda segmentor: calls.append(segmentor) or real(segmentor))
    runs = []
    for flag in (False, True):
        runs.append(api.evaluate(clip, "maskclip", "voc21", root, progress=False, num_workers=0,
                                 inference={"compile": flag, "short_side": 32, "mode": "slide", "window": 24,
                                            "stride": 16}))
        assert bool(calls) == flag  # the eager run compiled nothing, the other ran compiled
    np.testing.assert_array_equal(runs[1].confusion, runs[0].confusion)
    assert runs[1].settings["inference"]["compile"] is True


def test_any_strategy_field_is_set_from_the_command_line(tmp_path, clip_file, capsys):
    root = write_voc(tmp_path / "voc", n_val=1)
    out = tmp_path / "res.json"
    base = ["evaluate", "--clip", str(clip_file), "--method", "naclip", "--dataset", "voc21", "--data-root", str(root),
            *COMMON]
    assert main([*base, "--json", str(out), "--strategy-option", "gaussian_sigma=2.5", "--residual"]) == 0
    strategy = json.loads(out.read_text())["settings"]["strategy"]
    assert strategy["gaussian_sigma"] == 2.5 and strategy["residual"] is True and strategy["attention"] == "kk+gaussian"
    with pytest.raises(SystemExit):
        main([*base, "--strategy-option", "gaussian_sigma"])  # not FIELD=VALUE
    capsys.readouterr()
    assert main([*base, "--strategy-option", "sigma=2"]) != 0
    assert "unknown LastBlock field(s) ['sigma']" in capsys.readouterr().err
