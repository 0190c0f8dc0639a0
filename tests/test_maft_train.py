"""MAFT's fine-tuning: the two losses on hand-made inputs, the seen/unseen split and hIoU,
the training crops, what trains, and runs through the CLI (tiny random CLIP, synthetic
VOC layout): supervised on seen classes, unsupervised from a rectifier with no label
read, exact resume, and the run loading as ``--method maft``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from layouts import labels_unreadable, write_voc
from tiny import tiny_clip
from reclip.class_split import class_split, read_class_names
from reclip.data.protocol import load_protocol
from reclip.maft.losses import (
    maft_loss,
    mask_aware_loss,
    minmax_normalize,
    proposal_class_iou,
    self_distillation_loss,
)
from reclip.metrics import ConfusionMatrix, seen_unseen_miou

pytestmark = pytest.mark.usefixtures("isolated_cache", "one_thread")


# -- losses -----------------------------------------------------------------------------------

# A 2 x 3 image: class 0 on pixels (0,0), (0,1); class 1 on (0,2), (1,0), (1,2); (1,1) void.
TARGETS = torch.tensor([[[0, 0, 1], [1, 255, 1]]])
PROPOSALS = torch.tensor([[
    [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]],  # A: exactly class 0          IoU (1, 0)
    [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]],  # B: class 1 + the void pixel IoU (0, 3/4)
    [[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]],  # C: half of one class-0 px   IoU (0.5/2, 0)
]])
PROBS = torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]]])  # (B=1, N=3, C=3)


def test_the_proposal_iou_is_the_soft_iou_by_hand():
    iou = proposal_class_iou(PROPOSALS[0], TARGETS[0], torch.tensor([0, 1]))
    torch.testing.assert_close(iou, torch.tensor([[1.0, 0.0], [0.0, 0.75], [0.25, 0.0]]), atol=1e-6, rtol=0)


def test_the_mask_aware_loss_by_hand():
    # targets after min-max over the proposals: class 0 (1, 0, 0.25), class 1 (0, 1, 0);
    # scores: class 0 (0.6, 0.2, 0.3), class 1 (0.3, 0.5, 0.3); class 2 is in no mask: not in the loss
    diffs = torch.tensor([0.4, 0.2, 0.05, 0.3, 0.5, 0.3])
    expected = (0.5 * diffs ** 2).mean()  # SmoothL1, beta 1: every |diff| < 1
    loss = mask_aware_loss(PROBS, PROPOSALS, TARGETS)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # a padding proposal left out by `keep` changes nothing; kept, it joins the loss and the min-max
    padded = torch.cat([PROPOSALS, torch.ones(1, 1, 2, 3)], dim=1)
    probs = torch.cat([PROBS, torch.tensor([[[0.9, 0.05, 0.05]]])], dim=1)
    keep = torch.tensor([[True, True, True, False]])
    assert mask_aware_loss(probs, padded, TARGETS, keep=keep).item() == pytest.approx(loss.item(), rel=1e-6)
    assert mask_aware_loss(probs, padded, TARGETS).item() != pytest.approx(loss.item(), rel=1e-3)


def test_the_mask_aware_loss_counts_no_padding_in_a_proposal_area():
    valid = torch.ones(1, 2, 3, dtype=torch.bool)
    valid[0, 1, 1] = False  # the void pixel is the crop's padding now: proposal B's area is 3, its IoU 1
    iou = proposal_class_iou(PROPOSALS[0], TARGETS[0], torch.tensor([1]), valid=valid[0])
    assert iou[1, 0].item() == pytest.approx(1.0, abs=1e-6)
    # with a third proposal D of one class-1 pixel (IoU 1/3), B's IoU sets D's normalised target:
    # (1/3) / (3/4) with the padding counted, (1/3) / 1 without
    proposals = PROPOSALS.clone()
    proposals[0, 2] = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    probs = torch.zeros(1, 3, 2)
    losses = [mask_aware_loss(probs, proposals, TARGETS, valid=v).item() for v in (valid, None)]
    # targets: class 0 (1, 0, 0) both times; class 1 (0, 1, 1/3) vs (0, 1, 4/9); scores all 0
    assert losses[0] == pytest.approx(0.5 * (1 + 1 + (1 / 3) ** 2) / 6, rel=1e-5)
    assert losses[1] == pytest.approx(0.5 * (1 + 1 + (4 / 9) ** 2) / 6, rel=1e-5)


def test_a_constant_iou_column_gives_zero_targets_not_nan():
    same = PROPOSALS[:, :1].expand(1, 3, 2, 3)  # three identical proposals: every IoU column is constant
    torch.testing.assert_close(minmax_normalize(torch.full((3, 2), 0.4)), torch.zeros(3, 2))
    loss = mask_aware_loss(PROBS, same, TARGETS)
    expected = (0.5 * PROBS[0, :, :2] ** 2).mean()  # targets 0 for both present classes
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_batch_without_class_masks_gives_a_connected_zero():
    probs = PROBS.clone().requires_grad_(True)
    loss = mask_aware_loss(probs, PROPOSALS, torch.full_like(TARGETS, 255))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph (the engine needs every rank to step)
    assert probs.grad is not None


def test_self_distillation_is_smooth_l1_on_whole_image_scores_and_total_weights_it():
    student = torch.tensor([[0.7, 0.3], [0.1, 0.9]], requires_grad=True)
    teacher = torch.tensor([[0.5, 0.5], [0.1, 0.9]], requires_grad=True)
    sd = self_distillation_loss(student, teacher)
    assert sd.item() == pytest.approx(2 * 0.5 * 0.2 ** 2 / 4, rel=1e-6)  # mean over the 4 entries
    sd.backward()
    assert teacher.grad is None and student.grad is not None  # the frozen side gets no gradient
    total, terms = maft_loss(PROBS, PROPOSALS, TARGETS, student.detach(), teacher.detach())
    ma = mask_aware_loss(PROBS, PROPOSALS, TARGETS)
    assert total.item() == pytest.approx(ma.item() + 0.1 * sd.item(), rel=1e-6)
    assert terms["self_distillation"].item() == pytest.approx(0.1 * sd.item(), rel=1e-6)


# -- the zero-shot split --------------------------------------------------------------------------

def test_seen_unseen_miou_and_hiou_from_a_hand_made_confusion_matrix():
    cm = ConfusionMatrix(5)
    cm.matrix[:] = np.array([[5, 1, 0, 0, 0],
                             [2, 6, 0, 2, 0],
                             [0, 0, 3, 1, 0],
                             [0, 0, 0, 0, 0],   # class 3: never in the labels, predicted 3 times: IoU 0
                             [0, 0, 0, 0, 0]])  # class 4: never anywhere: IoU NaN
    iou = cm.compute()["IoU"]
    np.testing.assert_allclose(iou[:4], [5 / 8, 6 / 11, 3 / 4, 0.0])
    unseen = np.array([False, False, True, True, True])
    out = seen_unseen_miou(iou, unseen)
    s, u = (5 / 8 + 6 / 11) / 2, (3 / 4 + 0) / 2
    assert out["mIoU_seen"] == pytest.approx(s) and out["mIoU_unseen"] == pytest.approx(u)
    assert out["hIoU"] == pytest.approx(2 * s * u / (s + u))
    zero = seen_unseen_miou(iou, unseen, absent_as_zero=True)  # the NaN class counts 0 among 3
    assert zero["mIoU_unseen"] == pytest.approx(0.75 / 3)
    assert seen_unseen_miou(np.array([0.0, 0.0]), np.array([False, True]))["hIoU"] == 0.0
    assert math.isnan(seen_unseen_miou(np.array([0.5, np.nan]), np.array([False, True]))["hIoU"])


def test_the_shipped_cocostuff_split_is_156_seen_and_15_unseen_of_our_class_list():
    vocabulary = load_protocol("cocostuff171").vocabulary()
    split = class_split(vocabulary, unseen="cocostuff171_unseen.txt")
    assert len(split.seen) == 156 and len(split.unseen) == 15
    assert set(split.unseen_names) == {"frisbee", "skateboard", "cardboard", "carrot", "scissors", "suitcase",
                                       "giraffe", "cow", "road", "wall-concrete", "tree", "grass", "river", "clouds",
                                       "playingfield"}
    assert read_class_names("cocostuff171_unseen.txt")[0] == "frisbee"


def test_a_split_by_seen_classes_is_the_complement_and_bad_names_are_refused(tmp_path):
    vocabulary = load_protocol("voc20").vocabulary()
    seen_file = tmp_path / "seen.txt"
    seen_file.write_text("# seen\n" + "\n".join(n for n in vocabulary.names if n not in ("cat", "dog")) + "\n")
    split = class_split(vocabulary, seen=seen_file)
    assert split.unseen_names == ["cat", "dog"]
    assert class_split(vocabulary, unseen=["CAT", " dog "]).unseen == split.unseen  # as CLIP reads names
    with pytest.raises(ValueError, match=r"not classes of this vocabulary: \['kitten'\]"):
        class_split(vocabulary, unseen=["cat", "kitten"])
    with pytest.raises(ValueError, match="one list"):
        class_split(vocabulary, seen=["cat"], unseen=["dog"])
    with pytest.raises(ValueError, match="no seen class"):
        class_split(vocabulary, unseen=list(vocabulary.names))
    with pytest.raises(FileNotFoundError, match="not found"):
        class_split(vocabulary, unseen=tmp_path / "missing.txt")


# -- training crops and what trains ------------------------------------------------------------

def _label_masks(data, classes):
    """A proposal source (test only) whose masks are the ground truth's class masks: proposals and
    labels must then come out of the crop's geometry as the same masks."""
    ids = {image_id: i for i, image_id in enumerate(data.image_ids)}

    def source(image, image_id):
        label = data[ids[image_id]]["label"]
        return torch.from_numpy(np.stack([label == c for c in classes])).float()

    return source


def test_training_crops_follow_the_augmentation_and_hide_unseen_classes(tmp_path):
    from reclip.data.augment import augment, sample_rng
    from reclip.data.datasets import SegmentationDataset
    from reclip.data.transforms import to_tensor_normalized
    from reclip.maft.trainset import MaftTrainSet

    root = write_voc(tmp_path / "voc", n_train=2, n_val=1)
    data = SegmentationDataset("voc20", root, "train", check_sizes=False)
    seen = [c for c in range(20) if c not in (7, 11)]  # cat and dog unseen
    trainset = MaftTrainSet(data, _label_masks(data, range(6)), labels=True, base_short_side=24, crop=16, seen=seen,
                            seed=3, max_proposals=8)
    for epoch in range(3):
        trainset.set_epoch(epoch)
        for index in range(2):
            item = trainset[index]
            raw = data[index]
            # the same augmentation applied directly to the image and the raw label
            image, label = augment(raw["image"], sample_rng(3, epoch, index), base_short_side=24, crop=16, pad=False,
                                   label=raw["label"])
            h, w = label.shape
            torch.testing.assert_close(item["image"][:, :h, :w], to_tensor_normalized(image, trainset.mean,
                                                                                       trainset.std))
            assert item["valid"][:h, :w].all() and item["valid"].sum() == h * w
            expected = np.where(np.isin(label, seen), np.searchsorted(seen, label), 255)  # seen index, or ignore
            assert np.array_equal(item["target"][:h, :w].numpy(), expected)
            assert (item["target"][h:] == 255).all() and (item["target"][:, w:] == 255).all()
            masks = item["proposals"][:6, :h, :w].numpy() / 255
            assert np.array_equal(masks, np.stack([label == c for c in range(6)]).astype(float))
            assert item["proposal_keep"].tolist() == [True] * 6 + [False] * 2
            assert item["proposals"][:, h:].sum() == 0 and item["proposals"][6:].sum() == 0


def test_unlabelled_training_crops_open_no_label(tmp_path, monkeypatch):
    from reclip.data.datasets import SegmentationDataset
    from reclip.maft.trainset import MaftTrainSet

    root = write_voc(tmp_path / "voc", n_train=2, n_val=1)
    data = SegmentationDataset("voc20", root, "train", check_sizes=False)

    trainset = MaftTrainSet(data, lambda image, image_id: torch.ones(1, *image.shape[:2]), labels=False,
                            base_short_side=24, crop=16)
    with labels_unreadable("MaftTrainSet(labels=False)"):
        item = trainset[1]
    assert "target" not in item and item["proposals"][0][item["valid"]].eq(255).all()


@pytest.mark.parametrize("value", [1.5, -0.2, float("nan")])
def test_proposals_outside_0_1_are_refused_naming_the_image(tmp_path, value):
    from reclip.data.datasets import SegmentationDataset
    from reclip.maft.proposals import ProposalError
    from reclip.maft.trainset import MaftTrainSet

    root = write_voc(tmp_path / "voc", n_train=2, n_val=1)
    data = SegmentationDataset("voc20", root, "train", check_sizes=False)
    trainset = MaftTrainSet(data, lambda image, image_id: torch.full((2, *image.shape[:2]), value), labels=False,
                            base_short_side=24, crop=16)
    with pytest.raises(ProposalError, match=f"image '{data.image_ids[1]}'"):
        trainset[1]


def _seen_segmentor(clip, names, start_layer=1):
    from reclip.maft.segmentor import MAFTSegmentor, tuned_copy
    from reclip.text import Vocabulary, query_embeddings

    queries = query_embeddings(clip, Vocabulary.from_names(names), "single", cache_dir=False)
    return MAFTSegmentor(tuned_copy(clip), queries, start_layer=start_layer)


def test_one_step_moves_only_attention_and_layernorms_and_starts_without_distillation_loss(tmp_path):
    from torch.utils.data import default_collate

    from reclip.data.datasets import SegmentationDataset
    from reclip.maft.proposals import GridProposals
    from reclip.maft.train import _FrozenSide, maft_step_loss
    from reclip.maft.trainset import MaftTrainSet

    clip = tiny_clip(perturb=0.02, vision_layers=3)
    root = write_voc(tmp_path / "voc", n_train=2, n_val=1)
    data = SegmentationDataset("voc20", root, "train", check_sizes=False)
    trainset = MaftTrainSet(data, GridProposals((2, 2)), labels=True, base_short_side=40, crop=32)
    batch = default_collate([trainset[0], trainset[1]])
    model = _seen_segmentor(clip, data.class_names)
    loss, logged = maft_step_loss(model, _FrozenSide(clip), batch)
    assert logged["mask_aware"] > 0
    assert logged["self_distillation"] < 1e-8  # the copy starts as the frozen CLIP: same whole-image scores
    loss.backward()
    moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    tuned = {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_1.weight",
             "ln_1.bias", "ln_2.weight", "ln_2.bias"}
    expected = {f"clip.visual.transformer.resblocks.{i}.{name}" for i in range(3) for name in tuned}
    assert moved == expected | {"clip.visual.ln_post.weight", "clip.visual.ln_post.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == moved
    assert all(p.grad is None for p in clip.parameters())  # the frozen CLIP is not the trained copy


def test_whole_image_scores_follow_the_segmentors_rule_synonyms_included():
    from reclip.maft.train import whole_image_probabilities

    clip = tiny_clip(perturb=0.02, vision_layers=2)
    model = _seen_segmentor(clip, ["cat, kitten", "dog", "sky, heaven, air"], start_layer=1).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = whole_image_probabilities(model, model.clip, images)  # (B, C)
        # IP-CLIP with one whole-image proposal masked only in the last block is CLIP's CLS path
        model.start_layer = 1
        via_proposals = model.proposal_probabilities(images, torch.ones(2, 1, 32, 32))[:, 0]
    assert whole.shape == (2, 3) and not torch.allclose(whole.sum(-1), torch.ones(2))  # max over synonyms
    torch.testing.assert_close(whole, via_proposals, rtol=1e-4, atol=1e-5)


# -- through the command line ------------------------------------------------------------------

def _train(steps: int = 2) -> list[str]:
    return ["--max-steps", str(steps), "--batch-size", "2", "--crop", "32", "--base-short-side", "40", "--device",
            "cpu", "--templates", "single", "--quiet"]


TRAIN = _train()


@pytest.fixture(scope="module")
def maft_runs(tmp_path_factory):
    """(clip file, VOC root, unseen file, supervised run) trained through the CLI, recording
    the class names its text classifier was given."""
    import reclip.maft.train as train_mod
    from reclip.cli import main
    from reclip.clip.load import save_clip

    base = tmp_path_factory.mktemp("maft")
    clip_file = save_clip(tiny_clip(perturb=0.02, vision_layers=3), base / "tiny.pt", format="openai")
    root = write_voc(base / "voc", n_train=4, n_val=2)
    unseen = base / "unseen.txt"
    unseen.write_text("cat\ndog\n")
    classified: list[list[str]] = []
    original = train_mod.query_embeddings

    def recording(clip, vocabulary, *args, **kwargs):
        classified.append(list(vocabulary.names))
        return original(clip, vocabulary, *args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(train_mod, "query_embeddings", recording)
    patch.setenv("RECLIP_CACHE", str(base / "cache"))
    try:
        assert main(["maft", "--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root),
                     "--proposals", "grid:2x2", "--unseen-classes", str(unseen), "--out", str(base / "run"),
                     *TRAIN]) == 0
    finally:
        patch.undo()
    return clip_file, root, unseen, base / "run", classified


def test_a_supervised_run_trains_on_seen_classes_and_records_its_split(maft_runs):
    from safetensors.torch import load_file

    clip_file, _, _, run, classified = maft_runs
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "maft" and config["start_layer"] == 2 and config["supervision"] == "labels"
    assert len(config["classes"]) == 20 and config["unseen_classes"] == ["cat", "dog"]
    assert len(config["seen_classes"]) == 18 and config["proposals"] == "grid:2x2"
    assert config["train"]["steps"] == 2 and config["optimizer"]["type"] == "AdamWConfig"
    assert config["optimizer"]["lr"] == 1e-5 and config["optimizer"]["schedule"]["power"] == 0.0
    assert classified == [config["seen_classes"]]  # the text classifier never saw an unseen name
    weights = load_file(run / "model.safetensors")
    assert sorted(weights) == config["trainable"]
    assert "transformer.resblocks.2.attn.in_proj_weight" in weights and "ln_post.weight" in weights
    assert not any(k.startswith(("clip.", "visual.")) or "mlp" in k or "conv1" in k for k in weights)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2 and metrics[-1]["mask_aware"] > 0


def test_resume_reaches_the_weights_of_an_uninterrupted_run(maft_runs, tmp_path):
    from safetensors.torch import load_file

    from reclip.cli import main

    clip_file, root, unseen, run, _ = maft_runs
    args = ["maft", "--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--proposals", "grid:2x2",
            "--unseen-classes", str(unseen), "--out", str(tmp_path / "split")]
    assert main([*args, *_train(steps=1)]) == 0  # one step, then stop
    assert main([*args, *TRAIN]) == 2  # the run exists: no silent overwrite
    assert main([*args, *TRAIN, "--resume"]) == 0
    whole, resumed = load_file(run / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert sorted(whole) == sorted(resumed)
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_the_run_loads_as_method_maft_and_evaluates_with_hiou(maft_runs, tmp_path):
    from safetensors.torch import load_file

    from reclip.cli import main
    from reclip.clip.load import load_clip
    from reclip.methods import build_segmentor
    from reclip.text import Vocabulary

    clip_file, root, unseen, run, _ = maft_runs
    clip = load_clip(clip_file)
    segmentor = build_segmentor("maft", clip, Vocabulary.from_names("cat,dog"), checkpoint=run, templates="single")
    weights = load_file(run / "model.safetensors")
    tuned = dict(segmentor.clip.visual.named_parameters())
    for name, value in weights.items():
        torch.testing.assert_close(tuned[name], value)
    assert not torch.equal(tuned["ln_post.weight"], clip.visual.ln_post.weight)  # trained, the given CLIP unchanged
    torch.testing.assert_close(tuned["conv1.weight"], clip.visual.conv1.weight)  # frozen parts as CLIP's
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--clip", str(clip_file), "--method", "maft", "--checkpoint", str(run), "--proposals",
                 "grid:2x2", "--dataset", "voc20", "--data-root", str(root), "--templates", "single",
                 "--short-side", "32", "--unseen-classes", str(unseen), "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    iou = np.array([np.nan if v is None else v / 100 for v in result["IoU"].values()])
    expected = seen_unseen_miou(iou, np.isin(list(result["IoU"]), ["cat", "dog"]))
    for key in ("mIoU_seen", "mIoU_unseen", "hIoU"):
        assert (result[key] is None and math.isnan(expected[key])) or result[key] == pytest.approx(
            100 * expected[key], abs=1e-3)
    assert result["settings"]["zero_shot"]["unseen"] == ["cat", "dog"]


def test_cli_errors_name_the_problem(maft_runs, tmp_path, capsys):
    from reclip.cli import main

    clip_file, root, _, run, _ = maft_runs
    common = ["--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--proposals", "grid",
              "--out", str(tmp_path / "x"), *TRAIN]
    assert main(["maft", *common, "--supervision", "pseudo"]) == 2
    assert "needs --teacher" in capsys.readouterr().err
    assert main(["maft", *common, "--teacher", str(run)]) == 2
    assert "with --supervision pseudo" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("cat\nkitten\n")
    assert main(["maft", *common, "--unseen-classes", str(bad)]) == 2
    assert "['kitten']" in capsys.readouterr().err
    assert main(["evaluate", "--clip", str(clip_file), "--method", "maskclip", "--dataset", "voc20", "--data-root",
                 str(root), "--unseen-classes", str(bad), "--quiet"]) == 2
    assert "['kitten']" in capsys.readouterr().err


def test_unsupervised_maft_from_a_rectifier_reads_no_label(maft_runs, tmp_path):
    from reclip.cli import main

    clip_file, root, _, _, _ = maft_runs
    common = ["--clip", str(clip_file), "--dataset", "voc20", "--data-root", str(root), "--quiet"]
    assert main(["hypotheses", *common, "--split", "train", "--out", str(tmp_path / "hyp.json"), "--t", "0"]) == 0
    assert main(["rectify", *common, "--hypotheses", str(tmp_path / "hyp.json"), "--out", str(tmp_path / "teacher"),
                 "--max-steps", "1", "--batch-size", "2", "--crop", "32", "--base-short-side", "40",
                 "--reference-length", "8", "--device", "cpu"]) == 0

    with labels_unreadable("unsupervised MAFT"):  # proposals from the same rectifier's prediction: nothing labelled
        assert main(["maft", *common, "--proposals", f"from:{tmp_path / 'teacher'}", "--supervision", "pseudo",
                     "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "run"), *TRAIN]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["supervision"] == "pseudo" and config["teacher"]["method"] == "reclip++"
    assert config["unseen_classes"] == [] and len(config["seen_classes"]) == 20
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["mask_aware"] > 0  # the pseudo labels gave class masks


def _grid_source():
    """A new function object at each call, as each process defining its proposal source makes."""
    def source(image, image_id):
        from reclip.maft.proposals import grid_proposals

        return grid_proposals(image.shape[:2], (2, 2))

    return source


def test_a_run_with_a_function_as_proposal_source_resumes(maft_runs, tmp_path):
    from safetensors.torch import load_file

    from reclip.clip.load import load_clip
    from reclip.maft.train import finetune_maft

    clip_file, root, _, _, _ = maft_runs
    clip = load_clip(clip_file)
    common = dict(templates="single", train_overrides={"batch_size": 2, "device": "cpu"}, base_short_side=40,
                  crop=32, progress=False)
    finetune_maft(clip, "voc20", root, tmp_path / "split", proposals=_grid_source(), max_steps=1, **common)
    finetune_maft(clip, "voc20", root, tmp_path / "split", proposals=_grid_source(), max_steps=2, resume=True,
                  **common)
    finetune_maft(clip, "voc20", root, tmp_path / "whole", proposals=_grid_source(), max_steps=2, **common)
    config = json.loads((tmp_path / "split" / "config.json").read_text())
    assert config["proposals"] == "test_maft_train._grid_source.<locals>.source"  # no memory address
    whole, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "split"))
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_finetune_maft_checks_start_layer_and_threshold_before_reading_data(tmp_path):
    from reclip.maft.train import finetune_maft

    clip = tiny_clip(perturb=0.02, vision_layers=3)
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(ValueError, match=r"start_layer=3: give the first masked block, 0\.\.2"):
        finetune_maft(clip, "voc20", missing, tmp_path / "run", proposals="grid", start_layer=3)
    with pytest.raises(ValueError, match="threshold=0: .* in \\(0, 1\\]"):
        finetune_maft(clip, "voc20", missing, tmp_path / "run", proposals="grid", threshold=0)
    assert not (tmp_path / "run").exists()


def test_evaluate_takes_the_split_by_its_seen_classes(maft_runs, tmp_path, capsys):
    from reclip.cli import main

    clip_file, root, unseen, _, _ = maft_runs
    seen = tmp_path / "seen.txt"
    seen.write_text("\n".join(n for n in load_protocol("voc20").vocabulary().names if n not in ("cat", "dog")))
    common = ["evaluate", "--clip", str(clip_file), "--method", "maskclip", "--dataset", "voc20", "--data-root",
              str(root), "--templates", "single", "--short-side", "32", "--quiet"]
    assert main([*common, "--seen-classes", str(seen), "--json", str(tmp_path / "seen.json")]) == 0
    assert main([*common, "--unseen-classes", str(unseen), "--json", str(tmp_path / "unseen.json")]) == 0
    by_seen, by_unseen = (json.loads((tmp_path / f).read_text()) for f in ("seen.json", "unseen.json"))
    assert by_seen["settings"]["zero_shot"]["unseen"] == ["cat", "dog"]
    assert by_seen["settings"]["zero_shot"] == by_unseen["settings"]["zero_shot"]
    assert by_seen["hIoU"] == by_unseen["hIoU"] and by_seen["mIoU_seen"] == by_unseen["mIoU_seen"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*common, "--seen-classes", str(seen), "--unseen-classes", str(unseen)])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    from reclip import api
    from reclip.clip.load import load_clip

    with pytest.raises(ValueError, match="not both"):
        api.evaluate(load_clip(clip_file), "maskclip", "voc20", root, seen_classes=["cat"], unseen_classes=["dog"])
