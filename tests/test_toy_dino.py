"""DINO self-distillation in the toy world (reclip.toy.dino, reclip.toy.multicrop).

A tiny run (``ToyDinoConfig.tiny()``: depth 1, 64 px, 3 steps of 4 images) checks the
pieces against DINO's definitions by hand (the EMA teacher, the centre, the loss), the
written checkpoint (the teacher, official DINO layout, read strictly by ``load_dino``)
and the cache.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reclip.backbones.dino import load_dino
from reclip.toy.dino import (
    DinoLoss,
    DinoTrainer,
    ToyDinoConfig,
    cosine_schedule,
    get_or_train_dino,
    pretrain_tiny_dino,
    train_dino,
)
from reclip.toy.multicrop import multi_crop
from reclip.toy.world import ToyWorld, WorldConfig

WORLD = WorldConfig(image_size=64, scene_size=64, num_classes=4)
TINY = ToyDinoConfig.tiny()


def crops_of(config: ToyDinoConfig, seed: int = 0) -> list[torch.Tensor]:
    images = torch.from_numpy(ToyWorld(WORLD).captioned(config.batch_size, np.random.default_rng(seed)).images)
    return multi_crop(images, config.crops, torch.Generator().manual_seed(seed))


def test_multi_crop_shapes_and_determinism() -> None:
    a, b, c = crops_of(TINY, 0), crops_of(TINY, 0), crops_of(TINY, 1)
    sizes = [TINY.crops.global_size] * 2 + [TINY.crops.local_size] * TINY.crops.local_crops
    assert [x.shape for x in a] == [(TINY.batch_size, 3, s, s) for s in sizes]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # two different views of the same images
    assert all(torch.isfinite(x).all() for x in a)


def test_one_step_teacher_is_the_ema_of_the_student_and_the_centre_moves() -> None:
    torch.manual_seed(0)
    trainer = DinoTrainer(TINY, WORLD.image_size)
    # The teacher starts as the student's copy.
    for p_t, p_s in zip(trainer.teacher.parameters(), trainer.student.parameters()):
        assert torch.equal(p_t, p_s)
    crops = crops_of(TINY)
    # Make the teacher differ from the student first, so the EMA is visible.
    trainer.step(crops, 0)
    teacher_before = copy.deepcopy(trainer.teacher)
    center_before = trainer.loss.center.clone()
    with torch.no_grad():
        teacher_out = teacher_before(crops[:2])
    it = 1
    loss = trainer.step(crops, it)
    assert np.isfinite(loss)
    m = float(trainer.momentum[it])
    assert 0.99 <= m < 1.0
    for p_t, p_before, p_s in zip(trainer.teacher.parameters(), teacher_before.parameters(),
                                  trainer.student.parameters()):
        torch.testing.assert_close(p_t, m * p_before + (1 - m) * p_s, rtol=0, atol=1e-7)
    assert not all(torch.equal(a, b) for a, b in zip(trainer.teacher.parameters(), teacher_before.parameters()))
    # centre <- 0.9 centre + 0.1 mean of the teacher's outputs of the step (DINOLoss.update_center)
    expected = 0.9 * center_before + 0.1 * teacher_out.mean(0, keepdim=True)
    torch.testing.assert_close(trainer.loss.center, expected, rtol=0, atol=1e-7)
    assert not torch.equal(trainer.loss.center, center_before)


def test_loss_matches_the_dino_definition() -> None:
    torch.manual_seed(1)
    batch, k, n_crops = 3, 8, 4
    student, teacher = torch.randn(n_crops * batch, k), torch.randn(2 * batch, k)
    loss = DinoLoss(k)
    loss.center.copy_(torch.randn(1, k))
    center = loss.center.clone()
    value = loss(student, teacher, n_crops, teacher_temp=0.05)
    total, terms = 0.0, 0
    for iq in range(2):
        q = F.softmax((teacher[iq * batch:(iq + 1) * batch] - center) / 0.05, dim=-1)
        for v in range(n_crops):
            if v != iq:
                s = F.log_softmax(student[v * batch:(v + 1) * batch] / 0.1, dim=-1)
                total += (-(q * s).sum(-1)).mean()
                terms += 1
    torch.testing.assert_close(value, total / terms)
    assert terms == 2 * (n_crops - 1)


def test_schedules_follow_the_official_shapes() -> None:
    lr = cosine_schedule(1.0, 0.0, 100, warmup_steps=10)
    assert len(lr) == 100 and lr[0] == 0.0 and lr[9] == 1.0 and lr[10] == 1.0
    assert np.all(np.diff(lr[10:]) <= 0) and lr[-1] < 0.01
    trainer = DinoTrainer(TINY, WORLD.image_size)
    assert trainer.momentum[0] == TINY.momentum_teacher and trainer.momentum[-1] < 1.0
    assert np.all(np.diff(trainer.momentum) >= 0)


def test_checkpoint_is_the_teacher_and_loads_strictly(tmp_path) -> None:
    teacher, record = train_dino(WORLD, TINY, seed=3, progress=False)
    assert len(record["losses"]) == TINY.steps and all(np.isfinite(record["losses"]))
    path = tmp_path / "dino.pth"
    pretrain_tiny_dino(path, WORLD, TINY, seed=3, progress=False)
    loaded = load_dino(path)  # strict key and shape check inside
    assert loaded.config.family == "dino" and loaded.config.heads == TINY.width // 64
    assert loaded.config.pos_grid == WORLD.image_size // TINY.patch_size
    saved = loaded.state_dict()
    assert set(saved) == set(teacher.state_dict())
    for name, value in teacher.state_dict().items():
        assert torch.equal(saved[name], value), name  # same seed -> the same weights
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.patch_features(x), teacher.patch_features(x))
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert ToyDinoConfig.from_dict(meta["config"]) == TINY and meta["record"]["seed"] == 3
    other, _ = train_dino(WORLD, TINY, seed=4, progress=False)
    assert not torch.equal(other.pos_embed, teacher.pos_embed)


def test_cache_is_reused_and_a_config_change_retrains(tmp_path) -> None:
    first = get_or_train_dino(tmp_path, WORLD, TINY, seed=0, progress=False)
    stamp = first.stat().st_mtime_ns
    again = get_or_train_dino(tmp_path, WORLD, TINY, seed=0, progress=False)
    assert again == first and again.stat().st_mtime_ns == stamp  # not retrained
    changed = get_or_train_dino(tmp_path, WORLD, dataclasses.replace(TINY, lr=2e-3), seed=0, progress=False)
    assert changed != first and changed.is_file()
    assert not torch.equal(load_dino(changed).pos_embed, load_dino(first).pos_embed)
    other_world = get_or_train_dino(tmp_path, dataclasses.replace(WORLD, noise_std=3.0), TINY, seed=0, progress=False)
    assert other_world not in (first, changed)


def test_bad_configs_name_the_option() -> None:
    with pytest.raises(ValueError, match="width=96"):
        ToyDinoConfig(width=96)
    with pytest.raises(ValueError, match="images="):
        ToyDinoConfig(images="captions")
