"""The distillation stage (ReCLIP++ III-E): the inherited head, the three losses, and a
student trained end to end through the CLI (tiny random CLIP, synthetic VOC layout,
the small ResNet-18-class student, random backbone)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from layouts import labels_unreadable, write_voc
from tiny import tiny_clip
from reclip.cli import main
from reclip.clip.load import load_clip, save_clip
from reclip.distillation import (
    MASKCLIP_PLUS,
    RECLIPPP_DISTILL,
    DistillConfig,
    Student,
    StudentBackbone,
    distillation_loss,
    load_student,
)
from reclip.distillation import _Teacher
from reclip.heads.inherited import InheritedHead, inherit
from reclip.heads.rectify import RECLIPPP, Rectifier
from reclip.rectification import load_rectifier
from reclip.text import QueryEmbeddings

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(backbone="resnet18", aspp_channels=16)


def _teacher(clip, num_classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.functional.normalize(torch.randn(num_classes, clip.visual.output_dim, generator=g), dim=-1)
    queries = QueryEmbeddings(w, torch.arange(num_classes), num_classes)
    model = Rectifier(clip, queries, ["cat", "dog", "sky", "grass"], dataclasses.replace(RECLIPPP, reference_length=8))
    with torch.no_grad():  # a decoder whose BN statistics are not the initial ones
        model.head.decoder.norm.running_mean.normal_()
        model.head.decoder.norm.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_the_inherited_head_on_the_teachers_features_is_the_teachers_head():
    clip = tiny_clip(perturb=0.02)
    teacher = _teacher(clip)
    x = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = teacher.forward_train(x)
        head = inherit(teacher, (4, 5)).eval()
        got = head.outputs(expected.features)
    for name in ("query_logits", "bias_logits", "rectified", "decoded"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in head.parameters())  # frozen
    head.train()
    assert not head.decoder.training  # the teacher's BN statistics stay in use


def test_the_bias_map_follows_the_students_grid():
    clip = tiny_clip(perturb=0.02)
    head = inherit(_teacher(clip), (4, 4)).eval()
    z = torch.nn.functional.normalize(torch.randn(1, clip.visual.output_dim, 8, 8), dim=1)
    out = head.outputs(z)
    resized = torch.nn.functional.interpolate(head.bias_map, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.bias_logits, resized)
    assert out.decoded.shape == (1, 4, 8, 8)


def _student(clip, head, config=RECLIPPP_DISTILL):
    config = dataclasses.replace(config, **SMALL)
    backbone = StudentBackbone(config.backbone, clip.visual.output_dim, config.aspp_channels)
    return Student(backbone, head, clip.image_mean, clip.image_std, config)


@pytest.mark.parametrize("term", ["mask", "feat", "text"])
def test_every_loss_term_trains_the_student(term):
    clip = tiny_clip(perturb=0.02)
    teacher = _teacher(clip)
    config = dataclasses.replace(RECLIPPP_DISTILL, mask_loss=term == "mask", feat_loss=term == "feat",
                                 text_loss=term == "text", **SMALL)
    student = _student(clip, inherit(teacher, (4, 4)), config).train()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[:, 24:] = False  # padding
    batch = {"image": images, "valid": valid, "hypotheses": torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]]).bool()}
    gumbel = {"tau": 1.0, "scale": 30.0, "contrastive_scale": 100.0, "pool": "official"}
    loss, logged = distillation_loss(student, _Teacher(teacher), config, gumbel, batch)
    assert set(logged) == {"loss", term} and torch.isfinite(loss)
    loss.backward()
    grad = student.backbone.resnet.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the term reaches the student's first layer
    assert all(p.grad is None for p in teacher.parameters())


def test_mask_loss_is_the_cross_entropy_to_the_teachers_argmax_over_the_image_pixels():
    clip = tiny_clip(perturb=0.02)
    teacher = _teacher(clip)
    config = dataclasses.replace(RECLIPPP_DISTILL, feat_loss=False, text_loss=False, **SMALL)
    student = _student(clip, inherit(teacher, (5, 5)), config).eval()
    images = torch.randn(1, 3, 36, 36, generator=torch.Generator().manual_seed(5))  # not a multiple of 8 or 16
    valid = torch.ones(1, 36, 36, dtype=torch.bool)
    valid[:, :, 30:] = False
    gumbel = {"tau": 1.0, "scale": 30.0, "contrastive_scale": 100.0, "pool": "official"}
    loss, _ = distillation_loss(student, _Teacher(teacher), config, gumbel,
                                {"image": images, "valid": valid, "hypotheses": torch.ones(1, 4).bool()})
    with torch.no_grad():
        pseudo = teacher(images).argmax(1)  # the teacher's M_o aligned to the image, argmax
        logits = student(images)  # the student's M_o aligned to the image
    expected = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[valid], pseudo[valid])
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_mask_loss_ignores_the_padding():
    clip = tiny_clip(perturb=0.02)
    teacher = _teacher(clip)
    config = dataclasses.replace(RECLIPPP_DISTILL, feat_loss=False, text_loss=False, **SMALL)
    student = _student(clip, inherit(teacher, (4, 4)), config)
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    gumbel = {"tau": 1.0, "scale": 30.0, "contrastive_scale": 100.0, "pool": "official"}
    full = torch.ones(1, 32, 32, dtype=torch.bool)
    half = full.clone()
    half[:, 16:] = False
    losses = [distillation_loss(student, _Teacher(teacher), config, gumbel,
                                {"image": images, "valid": v, "hypotheses": torch.ones(1, 4).bool()})[0]
              for v in (full, half)]
    assert not torch.isclose(losses[0], losses[1])  # the padded half is left out of the mean


def test_config_validation():
    with pytest.raises(ValueError, match="every loss term is off"):
        DistillConfig(mask_loss=False, feat_loss=False, text_loss=False)
    with pytest.raises(ValueError, match="backbone"):
        DistillConfig(backbone="vgg16")
    with pytest.raises(ValueError, match="only its Query head"):
        DistillConfig(teacher="maskclip", head="fresh")
    assert (MASKCLIP_PLUS.teacher, MASKCLIP_PLUS.feat_loss, MASKCLIP_PLUS.text_loss) == ("maskclip", False, False)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """(clip file, VOC root, teacher run, student run) through the CLI, no label ever read."""
    base = tmp_path_factory.mktemp("distil")
    clip_file = save_clip(tiny_clip(perturb=0.02), base / "tiny.pt", format="openai")
    root = write_voc(base / "voc", n_train=4, n_val=2)
    common = ["--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--quiet"]
    assert main(["hypotheses", *common, "--split", "train", "--out", str(base / "hyp.json"), "--t", "0"]) == 0
    assert main(["rectify", *common, "--hypotheses", str(base / "hyp.json"), "--out", str(base / "teacher"),
                 "--max-steps", "2", "--batch-size", "2", "--crop", "32", "--base-short-side", "40",
                 "--reference-length", "8", "--device", "cpu"]) == 0

    with labels_unreadable("distillation"):
        assert main(["distill", *common, "--teacher", str(base / "teacher"), "--hypotheses", str(base / "hyp.json"),
                     "--out", str(base / "student"), "--backbone", "resnet18", "--weights", "none",
                     "--max-steps", "2", "--batch-size", "2", "--crop", "32", "--base-short-side", "40",
                     "--device", "cpu"]) == 0
    return clip_file, root, base / "teacher", base / "student"


def test_a_student_run_holds_what_it_needs_and_runs_without_clip(distilled):
    clip_file, _, teacher_run, run = distilled
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "student" and config["distill"]["backbone"] == "resnet18"
    assert config["classes"][0] == "airplane"  # the ReCLIP class names, as its teacher
    assert config["decoder"] and config["bias"] and config["train"]["steps"] == 2
    assert config["image_mean"] == [0.485, 0.456, 0.406]  # the student's own (ImageNet) normalisation
    assert "min_factor" not in config["optimizer"]["schedule"]  # the paper's schedule: no floor
    student = load_student(run)  # no CLIP
    teacher = load_rectifier(teacher_run, load_clip(clip_file))
    torch.testing.assert_close(student.head.query, teacher.head.query_weights)
    for name, p in student.head.decoder.state_dict().items():  # the teacher's decoder, unchanged by training
        torch.testing.assert_close(p, teacher.head.decoder.state_dict()[name])
    x = torch.randn(1, 3, 36, 44)
    with torch.no_grad():
        assert student(x).shape == (1, 20, 36, 44)


def test_evaluate_and_segment_with_the_student(distilled, tmp_path):
    clip_file, root, _, run = distilled
    out = tmp_path / "s.json"
    assert main(["evaluate", "--clip", str(clip_file), "--method", "student", "--checkpoint", str(run),
                 "--dataset", "voc20", "--data-root", str(root), "--short-side", "40", "--json", str(out),
                 "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == "student" and result["num_images"] == 2
    assert main(["evaluate", "--clip", str(clip_file), "--method", "student", "--checkpoint", str(run),
                 "--dataset", "voc20", "--data-root", str(root), "--short-side", "40", "--output", "query",
                 "--quiet"]) == 0


def test_maskclip_plus_needs_no_teacher_and_refuses_one(distilled, tmp_path, capsys):
    clip_file, root, teacher_run, _ = distilled
    common = ["--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--quiet",
              "--hypotheses", str(teacher_run.parent / "hyp.json"), "--backbone", "resnet18", "--weights", "none",
              "--max-steps", "1", "--batch-size", "2", "--crop", "32", "--base-short-side", "40", "--device", "cpu"]
    assert main(["distill", *common, "--preset", "maskclip+", "--out", str(tmp_path / "mcp")]) == 0
    student = load_student(tmp_path / "mcp")
    assert student.head.decoder is None and student.head.bias_map is None  # the query head alone
    assert main(["distill", *common, "--preset", "maskclip+", "--teacher", str(teacher_run),
                 "--out", str(tmp_path / "x")]) == 2
    assert "takes no --teacher" in capsys.readouterr().err
    assert main(["distill", *common, "--out", str(tmp_path / "y")]) == 2
    assert "needs --teacher" in capsys.readouterr().err


def test_a_fresh_head_is_trained_and_starts_new(distilled, tmp_path):
    clip_file, root, teacher_run, _ = distilled
    assert main(["distill", "--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--quiet",
                 "--teacher", str(teacher_run), "--hypotheses", str(teacher_run.parent / "hyp.json"),
                 "--out", str(tmp_path / "fresh"), "--head", "fresh", "--backbone", "resnet18", "--weights", "none",
                 "--max-steps", "1", "--batch-size", "2", "--crop", "32", "--base-short-side", "40",
                 "--device", "cpu"]) == 0
    student = load_student(tmp_path / "fresh")
    teacher = load_rectifier(teacher_run, load_clip(clip_file))
    assert isinstance(student.head, InheritedHead) and student.head.trainable
    assert not torch.allclose(student.head.decoder.conv.weight, teacher.head.decoder.conv.weight)
    assert student.head.bias_map.requires_grad and student.head.decoder.conv.weight.requires_grad
    assert student.head.bias_map.abs().sum() > 0  # started at zero, moved by the step


def test_a_fresh_head_is_drawn_after_seeding():
    clip = tiny_clip(perturb=0.02)
    teacher = _teacher(clip)
    torch.manual_seed(0)
    a = inherit(teacher, (4, 4), fresh=True)
    torch.manual_seed(0)
    b = inherit(teacher, (4, 4), fresh=True)
    torch.testing.assert_close(a.decoder.conv.weight, b.decoder.conv.weight)
    assert (a.bias_map == 0).all() and a.bias_map.requires_grad
    with pytest.raises(ValueError, match="fresh head is trained only by"):
        DistillConfig(head="fresh", mask_loss=False, text_loss=False)


def test_a_narrow_toy_student_has_no_pretrained_weights():
    from reclip.backbones.resnet import build_student_backbone

    narrow = StudentBackbone("resnet18", 32, 16, width=16)
    assert narrow.resnet.out_channels == 128 and narrow(torch.randn(1, 3, 24, 24)).shape == (1, 32, 3, 3)
    with pytest.raises(ValueError, match="published width"):
        build_student_backbone("resnet18", "imagenet", base_channels=16)


def test_feat_loss_on_the_students_grid_equals_the_image_one_when_the_grids_coincide():
    clip = tiny_clip(perturb=0.02)  # 8 px patches: at 32 px the teacher's grid is the student's (4 x 4)
    teacher = _teacher(clip)
    gumbel = {"tau": 1.0, "scale": 30.0, "contrastive_scale": 100.0, "pool": "official"}
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[:, 16:, :] = False  # the lower half is padding: out of both means
    with torch.no_grad():
        z = teacher.features(images)
    losses = {}
    for where in ("image", "student_grid"):
        config = dataclasses.replace(RECLIPPP_DISTILL, mask_loss=False, text_loss=False, feat_at=where, **SMALL)
        student = _student(clip, inherit(teacher, (4, 4)), config).eval()
        offset = torch.zeros_like(z)
        offset[:, :, :2] = 0.1  # Z_hat = Z + 0.1 on the image's cells, + 0 on the padding's
        student.backbone.forward = lambda x, z=z, offset=offset: z + offset
        batch = {"image": images, "valid": valid, "hypotheses": torch.ones(2, 4).bool()}
        with torch.no_grad():
            losses[where] = float(distillation_loss(student, _Teacher(teacher), config, gumbel, batch)[0])
    assert losses["student_grid"] == pytest.approx(0.5 * 0.1, rel=1e-3)  # alpha * |0.1|
    assert losses["image"] == pytest.approx(losses["student_grid"], rel=0.15)  # bilinear blur at the boundary
    with pytest.raises(ValueError, match="feat_at"):
        DistillConfig(feat_at="grid")


@pytest.mark.parametrize("parts", ["query", "query_bias", "deeplab"])
def test_the_table_ix_heads_inherit_what_their_row_says(parts):
    clip = tiny_clip(perturb=0.02)
    teacher = _teacher(clip)
    head = inherit(teacher, (4, 4), parts=parts)
    assert (head.bias_map is not None) == (parts == "query_bias")
    assert head.decoder is None
    assert (head.classifier is not None) == (parts == "deeplab")
    torch.testing.assert_close(head.query, teacher.head.query_weights)  # W_q kept (L_text) in every row
    z = torch.nn.functional.normalize(torch.randn(1, clip.visual.output_dim, 4, 4), dim=1)
    out = head.outputs(z)
    if parts == "deeplab":  # its own classifier, trained
        assert head.classifier.weight.requires_grad
        torch.testing.assert_close(out.query_logits, head.classifier(z))
    else:
        torch.testing.assert_close(out.query_logits, torch.einsum("bdhw,cd->bchw", z, head.query))
    torch.testing.assert_close(out.decoded, out.rectified)  # no decoder: M_o = M
    with pytest.raises(ValueError, match="parts"):
        inherit(teacher, (4, 4), parts="decoder")


def test_a_deeplab_head_student_round_trips(tmp_path):
    from reclip.distillation import save_student_run
    from reclip.text import Vocabulary

    clip = tiny_clip(perturb=0.02)
    config = dataclasses.replace(RECLIPPP_DISTILL, head="deeplab", **SMALL)
    student = _student(clip, inherit(_teacher(clip), (4, 4), parts="deeplab"), config).eval()
    save_student_run(tmp_path / "run", student, Vocabulary.from_names(["cat", "dog", "sky", "grass"]))
    loaded = load_student(tmp_path / "run")
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x))


def _reclip_teacher(clip, num_classes=4, seed=1):
    from reclip.heads.rectify import RECLIP

    g = torch.Generator().manual_seed(seed)
    w = torch.nn.functional.normalize(torch.randn(num_classes, clip.visual.output_dim, generator=g), dim=-1)
    queries = QueryEmbeddings(w, torch.arange(num_classes), num_classes)
    return Rectifier(clip, queries, ["cat", "dog", "sky", "grass"], dataclasses.replace(RECLIP, reference_length=8)).eval()


def test_the_official_reclip_student_head_is_query_minus_reference_without_position(tmp_path):
    from reclip.distillation import RECLIP_DISTILL, save_student_run
    from reclip.text import Vocabulary

    clip = tiny_clip(perturb=0.02)
    teacher = _reclip_teacher(clip)
    head = inherit(teacher, (4, 4), parts="query_reference")
    assert head.bias_map is None and head.decoder is None and head.dependent
    z = torch.nn.functional.normalize(torch.randn(2, clip.visual.output_dim, 3, 5), dim=1)
    w_r = teacher.head.reference().detach()
    expected = torch.einsum("bdhw,cd->bchw", z, teacher.head.query_weights) - torch.einsum("bdhw,cd->bchw", z, w_r)
    torch.testing.assert_close(head(z), expected)
    full = inherit(teacher, (4, 4))  # ReCLIP's own head keeps ProjNet(PE): not the same map
    assert full.bias_map is not None and not torch.allclose(full(z), expected)
    with pytest.raises(ValueError, match="ReCLIP teacher"):
        inherit(_teacher(clip), (4, 4), parts="query_reference")
    with pytest.raises(ValueError, match="query_reference"):
        DistillConfig(head="query_reference", teacher_method="reclip++")
    config = dataclasses.replace(RECLIP_DISTILL, head="query_reference")
    student = _student(clip, head, config).eval()
    save_student_run(tmp_path / "run", student, Vocabulary.from_names(["cat", "dog", "sky", "grass"]))
    loaded = load_student(tmp_path / "run")  # W_r stored although there is no bias map
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x))


def test_a_preset_refuses_a_teacher_of_the_other_method(distilled, tmp_path, capsys):
    clip_file, root, teacher_run, _ = distilled  # a reclip++ teacher
    common = ["--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--quiet",
              "--hypotheses", str(teacher_run.parent / "hyp.json"), "--backbone", "resnet18", "--weights", "none",
              "--max-steps", "1", "--batch-size", "2", "--crop", "32", "--device", "cpu"]
    assert main(["distill", *common, "--teacher", str(teacher_run), "--preset", "reclip",
                 "--out", str(tmp_path / "s")]) != 0
    assert "a 'reclip++' run; this distillation preset needs a 'reclip' teacher" in capsys.readouterr().err
    assert not (tmp_path / "s" / "model.safetensors").exists()


def test_the_student_reads_its_own_normalisation_and_the_teacher_clips():
    from reclip.distillation import INPUT_NORMS

    clip = tiny_clip(perturb=0.02)
    teacher = _teacher(clip)
    seen = {}
    for norm in ("imagenet", "clip"):
        config = dataclasses.replace(RECLIPPP_DISTILL, input_norm=norm, feat_loss=False, text_loss=False)
        student = _student(clip, inherit(teacher, (2, 2)), config)
        student.image_mean, student.image_std = INPUT_NORMS[norm]
        forward = student.forward_train
        student.forward_train = lambda x, forward=forward, norm=norm: (seen.__setitem__(norm, x), forward(x))[1]
        pixels = torch.rand(2, 3, 32, 32)  # 0..1
        clip_input = (pixels - torch.tensor(clip.image_mean).view(1, 3, 1, 1)) / torch.tensor(clip.image_std).view(1, 3, 1, 1)
        batch = {"image": clip_input, "valid": torch.ones(2, 32, 32, dtype=torch.bool),
                 "hypotheses": torch.ones(2, 4)}
        distillation_loss(student, _Teacher(teacher, norm=(clip.image_mean, clip.image_std)), config, {}, batch)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in INPUT_NORMS[norm])
        torch.testing.assert_close(seen[norm], (pixels - mean) / std)
    with pytest.raises(ValueError, match="input_norm"):
        DistillConfig(input_norm="bgr")


def test_the_official_schedule_is_per_epoch_and_floored():
    from reclip.distillation import OFFICIAL_DISTILL_SCHEDULE
    from reclip.train import PolySchedule, SGDConfig, describe

    s = OFFICIAL_DISTILL_SCHEDULE
    horizon = s.resolve_horizon(steps=100, steps_per_epoch=10)  # 10 epochs
    assert horizon == 10
    assert s.factor(0, 10, horizon) == s.factor(9, 10, horizon) == 1.0  # constant within an epoch
    assert s.factor(10, 10, horizon) == pytest.approx(0.9 ** 0.9)
    assert s.factor(99, 10, horizon) == pytest.approx(0.1 ** 0.9)  # last epoch: 0.126, above the floor
    assert s.factor(1999, 10, 200) == 0.01  # (1/200)^0.9 = 0.0085 is clamped at the floor
    assert PolySchedule().factor(99, 10, 100) == pytest.approx((1 / 100) ** 0.9)  # the paper's: no floor
    assert PolySchedule(min_factor=0.2).factor(99, 10, 100) == 0.2
    with pytest.raises(ValueError, match="min_factor"):
        PolySchedule(min_factor=1.5)
    # a floor of 0 is not recorded, so runs written before the floor existed still resume
    assert "min_factor" not in describe(SGDConfig())["schedule"]
    assert describe(SGDConfig(schedule=s))["schedule"]["min_factor"] == 0.01


def test_a_run_from_before_input_norm_resumes_with_clip_normalisation(distilled, tmp_path, capsys):
    """A checkpoint written before DistillConfig had teacher_method and input_norm (its
    identity holds neither) resumes with --input-norm clip, what it was trained with, and
    is refused with the ImageNet default."""
    clip_file, root, teacher_run, _ = distilled
    run = tmp_path / "old"
    common = ["distill", "--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--quiet",
              "--teacher", str(teacher_run), "--hypotheses", str(teacher_run.parent / "hyp.json"), "--out", str(run),
              "--backbone", "resnet18", "--weights", "none", "--batch-size", "2", "--crop", "32",
              "--base-short-side", "40", "--device", "cpu"]
    assert main([*common, "--input-norm", "clip", "--max-steps", "1"]) == 0
    for name in ("checkpoint.pt", "checkpoint.previous.pt"):  # as the old code wrote it
        if (run / name).exists():
            ckpt = torch.load(run / name, map_location="cpu", weights_only=True)
            for key in ("teacher_method", "input_norm"):
                ckpt["trajectory"]["distill"].pop(key, None)
            torch.save(ckpt, run / name)
    capsys.readouterr()
    assert main([*common, "--max-steps", "1", "--resume"]) != 0  # the ImageNet default: not what it was trained with
    assert "distill.input_norm: '(absent)' -> 'imagenet'" in capsys.readouterr().err
    assert main([*common, "--input-norm", "clip", "--max-steps", "1", "--resume"]) == 0
    assert "distilled a resnet18 student for 1 steps" in capsys.readouterr().out


def test_an_old_student_run_reports_the_clip_normalisation_it_was_trained_with(distilled, tmp_path):
    import shutil

    from reclip.clip.model import CLIP_MEAN, CLIP_STD

    _, _, _, run = distilled
    old = tmp_path / "old"
    shutil.copytree(run, old)
    config = json.loads((old / "config.json").read_text())
    for key in ("teacher_method", "input_norm"):  # what a run written before these fields holds
        del config["distill"][key]
    config["image_mean"], config["image_std"] = list(CLIP_MEAN), list(CLIP_STD)
    (old / "config.json").write_text(json.dumps(config))
    student = load_student(old)
    assert student.config.input_norm == "clip" and student.image_mean == tuple(CLIP_MEAN)
