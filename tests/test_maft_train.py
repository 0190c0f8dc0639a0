"""MAFT's fine-tuning: the two losses on hand-made inputs, the seen/unseen split and hIoU,
the training crops, what trains, and runs through the CLI (tiny random CLIP, synthetic
VOC layout): supervised on seen classes, unsupervised from a rectifier with no label
read, exact resume, and the run loading as ``--method maft``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layouts import write_voc
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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _text_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))


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
    import reclip.data.datasets as datasets_mod
    import reclip.data.io as io_mod
    from reclip.data.datasets import SegmentationDataset
    from reclip.maft.trainset import MaftTrainSet

    root = write_voc(tmp_path / "voc", n_train=2, n_val=1)
    data = SegmentationDataset("voc20", root, "train", check_sizes=False)

    def poisoned(*args, **kwargs):
        raise AssertionError("a ground-truth label was read")

    monkeypatch.setattr(io_mod, "read_label", poisoned)
    monkeypatch.setattr(datasets_mod, "read_label", poisoned)
    trainset = MaftTrainSet(data, lambda image, image_id: torch.ones(1, *image.shape[:2]), labels=False,
                            base_short_side=24, crop=16)
    item = trainset[1]
    assert "target" not in item and item["proposals"][0][item["valid"]].eq(255).all()


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
