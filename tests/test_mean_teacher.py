"""Mean teacher: EMA schedule and update, Gaussian warm-up, noise augment, consistency loss."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from retina_fast.models.magenet import MAGENet, MAGENetConfig, MAGENetOutput
from retina_fast.models.rsp import RSPOutput
from retina_fast.training.mean_teacher import (ALPHA, MeanTeacher, consistency_loss, consistency_weight,
                                               ema_alpha, ema_update, gaussian_noise, make_teacher)


def test_ema_alpha_schedule():
    assert ALPHA == 0.999
    assert ema_alpha(0) == 0.0 and ema_alpha(1) == 0.5 and ema_alpha(9) == pytest.approx(0.9)
    assert ema_alpha(998) < 0.999 and ema_alpha(999) == pytest.approx(0.999) and ema_alpha(10**6) == 0.999
    assert ema_alpha(3, alpha=0.5) == 0.5
    with pytest.raises(ValueError):
        ema_alpha(-1)


def test_ema_update_math():
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    a = ema_update(teacher, student, step=3, alpha=0.9)
    assert a == 0.75
    for t, t_old, s in zip(teacher.parameters(), t0, student.parameters()):
        torch.testing.assert_close(t, 0.75 * t_old + 0.25 * s)
    ema_update(teacher, student, step=0)  # α_0 = 0: copy the student
    for t, s in zip(teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)
    with pytest.raises(ValueError):
        ema_update(nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)), 1)


def test_consistency_weight_gaussian_rampup():
    assert consistency_weight(0, 100, 2.0) == pytest.approx(2.0 * math.exp(-5))
    assert consistency_weight(50, 100, 2.0) == pytest.approx(2.0 * math.exp(-5 * 0.25))
    assert consistency_weight(100, 100, 2.0) == 2.0 and consistency_weight(500, 100, 2.0) == 2.0
    assert consistency_weight(-5, 100, 1.0) == pytest.approx(math.exp(-5))
    assert consistency_weight(7, 0, 3.0) == 3.0
    ws = [consistency_weight(t, 10) for t in range(12)]
    assert ws == sorted(ws)


def test_gaussian_noise_augment():
    x = torch.full((2, 3, 64, 64), 0.5)
    a = gaussian_noise(x, 0.1, generator=torch.Generator().manual_seed(1))
    b = gaussian_noise(x, 0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and float((a - x).std()) == pytest.approx(0.1, rel=0.05)
    mask = torch.zeros(1, 1, 64, 64)
    torch.testing.assert_close(gaussian_noise(x, 0.1, mask=mask), x)
    assert float(gaussian_noise(x, 5.0).max()) <= 1 and float(gaussian_noise(x, 5.0).min()) >= 0


def _out(stage1, stage2, logits):
    rsp = None if logits is None else RSPOutput(sides=logits, mean=torch.stack(logits).mean(0), features=[])
    return MAGENetOutput(stage1=stage1, stage2=stage2, rsp=rsp)


def test_consistency_loss_by_hand():
    img = torch.rand(1, 3, 4, 4)
    zeros = [torch.zeros(1, 1, 4, 4)] * 4
    same, _ = consistency_loss(_out(img, img, zeros), _out(img, img, zeros))
    assert float(same) == 0.0
    student_logits = [torch.full((1, 1, 4, 4), math.log(3.0), requires_grad=True) for _ in range(4)]  # σ = 0.75
    s1 = (img + 0.1).requires_grad_()
    total, parts = consistency_loss(_out(s1, img - 0.2, student_logits), _out(img, img, zeros))
    expected = 0.01 + 0.04 + 4 * 0.0625
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(parts["seg"]) == pytest.approx(0.25, rel=1e-5)
    total.backward()
    assert s1.grad is not None and student_logits[0].grad is not None
    no_rsp, parts = consistency_loss(_out(img, img + 0.1, None), _out(img, img, None))
    assert float(no_rsp) == pytest.approx(0.01, rel=1e-5) and "seg" not in parts


def test_mean_teacher_end_to_end_small():
    torch.manual_seed(0)
    cfg = MAGENetConfig(channels=4, scale_channels=4, cabs_per_fab=1, cabs_per_level=1, rsp_base=2, rsp_channels=1)
    student = MAGENet(cfg)
    mt = MeanTeacher(student, ramp_steps=10, w_max=2.0, noise_std=0.02)
    assert all(not p.requires_grad for p in mt.teacher.parameters())
    assert mt.weight() == pytest.approx(2.0 * math.exp(-5))
    real = torch.rand(1, 3, 16, 16)
    loss, parts = mt.consistency(student, real, generator=torch.Generator().manual_seed(0))
    assert set(parts) == {"stage1", "stage2", "seg"} and float(loss.detach()) > 0
    loss.backward()
    assert all(p.grad is None for p in mt.teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    before = [p.clone() for p in mt.teacher.parameters()]
    assert mt.update(student) == 0.0 and mt.step == 1  # step 0 copies the student
    for t, s in zip(mt.teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)
    assert any(not torch.equal(a, b) for a, b in zip(before, mt.teacher.parameters()))
    state = mt.state_dict()
    other = MeanTeacher(make_teacher(student))
    other.load_state_dict(state)
    assert other.step == 1 and other.ramp_steps == 10 and other.w_max == 2.0
