"""The linear probe (Table I "LP"), a SUPERVISED diagnostic: a fake segmentor whose features
separate the classes by construction, a random-label control, the probed segmentor left
untouched, determinism, and the CLI on a tiny CLIP (training-free and a student run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from layouts import write_voc
from reclip.cli import main
from reclip.data.datasets import SegmentationDataset
from reclip.data.protocol import load_protocol
from reclip.methods import METHODS, get_family
from reclip.probe import ProbeResult, linear_probe
from reclip.segmentor import DenseSegmentor

pytestmark = pytest.mark.usefixtures("isolated_cache")

# Four well separated colours: the class of a block is its colour.
PALETTE = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]], dtype=np.float64)
BLOCK = 8  # label blocks of 8 x 8 pixels, aligned with the fake's stride-4 grid
SIZE = (32, 40)  # (H, W); short side 32 = the probe's short side in these tests (no resize)
UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # the fake reads x / 255


class ColourBackbone(nn.Module):
    """Z = one-hot of the palette colour nearest each 4 x 4 cell's mean colour, times a
    parameter, through a BatchNorm (eval: identity with these statistics)."""

    stride = 4
    embed_dim = len(PALETTE)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("palette", torch.tensor(PALETTE / 255.0, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(()))
        self.norm = nn.BatchNorm2d(len(PALETTE))

    def forward(self, images):
        mean = F.avg_pool2d(images, self.stride)  # (B, 3, h, w)
        dist = ((mean[:, None] - self.palette[None, :, :, None, None]) ** 2).sum(2)  # (B, K, h, w)
        onehot = F.one_hot(dist.argmin(1), len(PALETTE)).permute(0, 3, 1, 2).float()
        return self.norm(self.scale * onehot)


class Unused(nn.Module):
    num_classes = 2

    def forward(self, z):
        return z[:, :2]


def fake_segmentor() -> DenseSegmentor:
    return DenseSegmentor(ColourBackbone(), Unused()).eval()


def write_blocks(root, n: int, seed: int, random_labels: bool = False):
    """A `folder`-protocol dataset: PNG images of coloured 8 x 8 blocks (colour = class, with
    noise) and their labels (row 0 ignored); ``random_labels``: labels drawn independently
    of the colours (the control). Returns (images root, labels root, classes file)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        blocks = rng.integers(0, len(PALETTE), (SIZE[0] // BLOCK, SIZE[1] // BLOCK))
        label = np.kron(blocks, np.ones((BLOCK, BLOCK), dtype=np.int64))
        image = np.clip(PALETTE[label] + rng.normal(0, 12, (*SIZE, 3)), 0, 255).astype(np.uint8)
        if random_labels:
            label = np.kron(rng.integers(0, len(PALETTE), blocks.shape), np.ones((BLOCK, BLOCK), dtype=np.int64))
        label[0, :] = 255
        Image.fromarray(image).save(root / "images" / f"img{i}.png")
        Image.fromarray(label.astype(np.uint8)).save(root / "labels" / f"img{i}.png")
    classes = root / "classes.txt"
    classes.write_text("red\ngreen\nblue\nyellow\n")
    return root / "images", root / "labels", classes


def folder_split(images, labels, classes, split):
    protocol = load_protocol("folder").with_overrides(label_dir=str(labels))
    return SegmentationDataset(protocol, images, split, classes_file=classes)


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    train = folder_split(*write_blocks(root / "train", 8, seed=1), "train")
    control = folder_split(*write_blocks(root / "control", 8, seed=1, random_labels=True), "train")
    val = folder_split(*write_blocks(root / "val", 4, seed=2), "val")
    return train, control, val


PROBE = dict(**UNIT, epochs=15, lr=0.05, batch_size=4, short_side=32, crop=32, progress=False)


def test_separable_features_give_a_near_perfect_probe_and_random_labels_do_not(blocks):
    train, control, val = blocks
    result = linear_probe(fake_segmentor(), train, val, **PROBE)
    assert isinstance(result, ProbeResult) and result.supervised
    assert result.miou > 0.9, result.table()
    assert result.num_images == 4 and result.probe["train_images"] == 8
    assert result.probe["losses"][-1] < result.probe["losses"][0]
    # the confusion matrix is the one scored: mIoU recomputed from it
    m = result.confusion.astype(float)
    iou = np.diag(m) / (m.sum(0) + m.sum(1) - np.diag(m))
    assert result.miou == pytest.approx(np.nanmean(iou))
    # control: the same images with labels unrelated to the colours teach nothing
    chance = linear_probe(fake_segmentor(), control, val, **PROBE)
    assert chance.miou < 0.5, chance.table()


def test_the_probed_segmentor_is_left_untouched(blocks):
    train, _, val = blocks
    seg = fake_segmentor()
    seg.train()  # in train mode the BatchNorm would use batch statistics and update its running ones
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    result = linear_probe(seg, train, val, **{**PROBE, "epochs": 2})
    assert seg.training  # its flag restored
    after = seg.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert seg.backbone.scale.requires_grad and seg.backbone.scale.grad is None
    # the probe's own parameters are the classifier's only
    names = [n for n, _ in result.model.named_parameters()]
    assert names == ["head.classifier.weight", "head.classifier.bias"]
    assert result.model.head.classifier.weight.shape == (4, len(PALETTE), 1, 1)


def test_same_seed_same_probe_another_seed_another_order(blocks):
    train, _, val = blocks
    options = {**PROBE, "epochs": 2}
    a = linear_probe(fake_segmentor(), train, val, seed=3, **options)
    b = linear_probe(fake_segmentor(), train, val, seed=3, **options)
    c = linear_probe(fake_segmentor(), train, val, seed=4, **options)
    wa, wb, wc = (r.model.head.classifier.weight for r in (a, b, c))
    assert torch.equal(wa, wb) and np.array_equal(a.confusion, b.confusion) and a.probe["losses"] == b.probe["losses"]
    assert not torch.equal(wa, wc)


def test_mixed_precision_features_train_a_float32_classifier(blocks):
    """The autocast path (bf16: CUDA's default, here forced on the CPU) runs end to end; the
    classifier stays float32 and still separates the classes. (The fake's ops are not
    autocast ones, so this checks the code path, not bf16 features.)"""
    train, _, val = blocks
    result = linear_probe(fake_segmentor(), train, val, **{**PROBE, "autocast": "bf16"})
    assert result.model.head.classifier.weight.dtype == torch.float32
    assert result.miou > 0.9, result.table()


def test_bad_settings_and_non_dense_segmentors_are_refused(blocks):
    train, _, val = blocks
    with pytest.raises(ValueError, match="epochs"):
        linear_probe(fake_segmentor(), train, val, **{**PROBE, "epochs": 0})
    with pytest.raises(TypeError, match="DenseSegmentor"):
        linear_probe(nn.Conv2d(3, 4, 1), train, val, **PROBE)


# --------------------------------------------------------------------------- CLI


CLI = ["--quiet", "--dataset", "voc21", "--epochs", "2", "--batch-size", "2", "--short-side", "32", "--workers", "0"]


def test_cli_probe_of_clip_features_says_supervised_and_writes_json(tmp_path, clip_file, capsys):
    root = write_voc(tmp_path / "voc", n_train=3, n_val=2)
    out = tmp_path / "probe.json"
    assert main(["probe", "--clip", str(clip_file), "--method", "clearclip", "--data-root", str(root),
                 "--json", str(out), *CLI]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("SUPERVISED diagnostic: linear probe on frozen clearclip (CLIP dense features, "
                              "clearclip last block) features, trained WITH labels")
    assert "aeroplane" in printed and "mIoU" in printed
    result = json.loads(out.read_text())
    assert result["supervised"] is True and "WITH labels" in result["diagnostic"]
    assert result["method"] == "clearclip" and result["num_images"] == 2 and result["split"] == "val"
    probe = result["probe"]
    assert (probe["train_split"], probe["train_images"], probe["epochs"], probe["short_side"]) == ("train", 3, 2, 32)
    assert probe["feature_dim"] == 32 and probe["stride"] == 8 and len(probe["losses"]) == 2
    m = np.array(result["confusion"], dtype=float)
    iou = np.diag(m) / (m.sum(0) + m.sum(1) - np.diag(m))
    with np.errstate(invalid="ignore"):
        assert result["mIoU"] == pytest.approx(100 * np.nanmean(iou), abs=1e-3)


def test_cli_probe_of_a_student_run(tmp_path, clip_file, capsys):
    from reclip.clip.load import load_clip

    root = write_voc(tmp_path / "voc", n_train=2, n_val=1)
    clip = load_clip(clip_file)
    vocabulary = SegmentationDataset("voc21", root, "val").vocabulary
    family = get_family("student")
    model = family.new_model(METHODS["student"], clip, vocabulary, text_cache=False).eval()
    run = tmp_path / "student"
    family.write_run(run, model, METHODS["student"], clip, vocabulary)
    out = tmp_path / "probe.json"
    assert main(["probe", "--clip", str(clip_file), "--method", "student", "--checkpoint", str(run),
                 "--data-root", str(root), "--json", str(out), *CLI]) == 0
    assert capsys.readouterr().out.startswith(
        "SUPERVISED diagnostic: linear probe on frozen student (the student's Z_hat) features, trained WITH labels")
    result = json.loads(out.read_text())
    assert result["supervised"] is True and result["probe"]["stride"] == 8 and result["settings"]["checkpoint"]


def test_cli_probe_needs_labels_and_says_so(tmp_path, clip_file, capsys):
    root = write_voc(tmp_path / "voc", n_train=1, n_val=1)
    assert main(["probe", "--clip", str(clip_file), "--method", "maskclip", "--data-root", str(root),
                 "--train-split", "nope", *CLI]) == 2
    assert "no split 'nope'" in capsys.readouterr().err
