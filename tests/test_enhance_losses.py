"""Enhancement and segmentation losses against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retina_fast.models.magenet import MAGENetOutput
from retina_fast.models.rsp import RSPOutput
from retina_fast.training.enhance_losses import (EDGE_WEIGHT, L2_WEIGHT, SEG_LAMBDA, charbonnier, conv_gauss,
                                                 dice_loss, edge_loss, gauss_kernel, laplacian_residual,
                                                 magenet_loss, pixel_loss, rsp_loss, segmentation_loss)


def test_charbonnier_by_hand():
    x = torch.tensor([0.0, 1.0, 0.5, -2.0])
    y = torch.zeros(4)
    expected = (math.sqrt(1e-6) + math.sqrt(1 + 1e-6) + math.sqrt(0.25 + 1e-6) + math.sqrt(4 + 1e-6)) / 4
    assert float(charbonnier(x, y)) == pytest.approx(expected, rel=1e-6)
    assert float(charbonnier(y, y)) == pytest.approx(1e-3)


def _np_gauss(img: np.ndarray) -> np.ndarray:
    """5×5 filter with replicate borders, written out with loops."""
    g = np.array([0.05, 0.25, 0.4, 0.25, 0.05])
    k = np.outer(g, g)
    h, w = img.shape
    p = np.pad(img, 2, mode="edge")
    return np.array([[np.sum(p[i:i + 5, j:j + 5] * k) for j in range(w)] for i in range(h)])


def _np_laplacian(img: np.ndarray) -> np.ndarray:
    up = np.zeros_like(img)
    up[::2, ::2] = 4 * _np_gauss(img)[::2, ::2]
    return img - _np_gauss(up)


def test_laplacian_residual_by_hand():
    rng = np.random.default_rng(0)
    img = rng.random((7, 6))
    got = laplacian_residual(torch.from_numpy(img)[None, None].float())[0, 0].double().numpy()
    np.testing.assert_allclose(got, _np_laplacian(img), atol=1e-5)
    assert float(gauss_kernel(3).sum()) == pytest.approx(3.0)
    const = torch.full((1, 3, 8, 8), 0.3)
    torch.testing.assert_close(conv_gauss(const), const)
    # MPRNet's zero-insertion upsampling with replicate borders: a constant leaves residuals only
    # on the border rows/columns, none inside.
    res = laplacian_residual(const)[0, 0]
    assert float(res[2:-2, 2:-2].abs().max()) < 1e-6 and float(res.abs().max()) > 0.01


def _edge_of_constant_shift(shape, shift: float, eps: float = 1e-3) -> float:
    r = _np_laplacian(np.full(shape, shift))
    return float(np.mean(np.sqrt(r * r + eps * eps)))


def test_edge_loss_values():
    x = torch.rand(2, 3, 10, 12)
    assert float(edge_loss(x, x)) == pytest.approx(1e-3)  # identical -> ε
    assert float(edge_loss(x + 0.2, x)) == pytest.approx(_edge_of_constant_shift((10, 12), 0.2), rel=1e-4)
    y = torch.rand(2, 3, 10, 12)
    expected = charbonnier(laplacian_residual(x), laplacian_residual(y))
    torch.testing.assert_close(edge_loss(x, y), expected)
    assert float(edge_loss(x, y, levels=2)) > float(expected)


def test_segmentation_losses_by_hand():
    zeros = torch.zeros(2, 1, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1
    assert float(segmentation_loss(zeros, mask)) == pytest.approx(math.log(2), rel=1e-6)
    assert float(segmentation_loss([zeros] * 4, mask[:, 0])) == pytest.approx(4 * math.log(2), rel=1e-6)
    # Dice with p = 0.5 everywhere: 1 − (2·0.5·8 + 1) / (8 + 8 + 1)
    assert float(dice_loss(zeros, mask)) == pytest.approx(1 - 9 / 17, rel=1e-6)
    both = segmentation_loss(zeros, mask, kind="bce+dice")
    assert float(both) == pytest.approx(math.log(2) + 1 - 9 / 17, rel=1e-6)
    with pytest.raises(ValueError):
        segmentation_loss(zeros, mask, kind="focal")
    with pytest.raises(ValueError):
        segmentation_loss(zeros, torch.zeros(2, 1, 3, 3))


def test_magenet_total_loss_by_hand():
    target = torch.rand(2, 3, 8, 8)
    sides = [torch.zeros(2, 1, 8, 8)] * 4
    rsp = RSPOutput(sides=sides, mean=torch.zeros(2, 1, 8, 8), features=[])
    out = MAGENetOutput(stage1=target + 1.0, stage2=target.clone(), rsp=rsp)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    total, parts = magenet_loss(out, target, mask)
    eps = 1e-3
    stage1 = math.sqrt(1 + eps * eps) + EDGE_WEIGHT * _edge_of_constant_shift((8, 8), 1.0)
    stage2 = eps + EDGE_WEIGHT * eps
    expected = stage1 + stage2 + SEG_LAMBDA * 4 * math.log(2)
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert set(parts) == {"char_s1", "edge_s1", "char_s2", "edge_s2", "seg", "total"}
    assert SEG_LAMBDA == 0.5 and EDGE_WEIGHT == 0.05
    no_seg, parts = magenet_loss(out, target)  # no mask -> no segmentation term
    assert float(no_seg) == pytest.approx(stage1 + stage2, rel=1e-5) and "seg" not in parts
    s1_only = MAGENetOutput(stage1=target + 1.0, stage2=None, rsp=None)
    assert float(magenet_loss(s1_only, target, mask)[0]) == pytest.approx(stage1, rel=1e-5)
    assert float(rsp_loss(rsp, mask)) == pytest.approx(5 * math.log(2), rel=1e-6)


def test_l2_pixel_loss_by_hand_and_in_the_total():
    """pixel="l2": L2_WEIGHT * mean squared error in both image terms (its gradient equals Charbonnier's at
    |d| = 0.05); per_row gives each row's mean; the segmentation term is unchanged; unknown kinds refused."""
    x = torch.tensor([[0.0, 1.0], [0.5, -2.0]])
    y = torch.zeros(2, 2)
    assert L2_WEIGHT == 10.0
    assert float(pixel_loss(x, y, "l2")) == pytest.approx(10 * (1 + 0.25 + 4) / 4, rel=1e-6)
    assert pixel_loss(x, y, "l2", per_row=True).tolist() == pytest.approx([5.0, 10 * 4.25 / 2], rel=1e-6)
    assert float(pixel_loss(x, y)) == pytest.approx(float(charbonnier(x, y)), rel=1e-7)
    d = torch.tensor([0.05], requires_grad=True)
    pixel_loss(d, torch.zeros(1), "l2").backward()
    g_l2 = float(d.grad)
    d.grad = None
    charbonnier(d, torch.zeros(1)).backward()
    assert g_l2 == pytest.approx(float(d.grad), rel=1e-3)  # 1 vs 0.05/sqrt(0.05^2 + 1e-6)
    target = torch.rand(2, 3, 8, 8)
    sides = [torch.zeros(2, 1, 8, 8)] * 4
    rsp = RSPOutput(sides=sides, mean=torch.zeros(2, 1, 8, 8), features=[])
    out = MAGENetOutput(stage1=target + 0.5, stage2=target.clone(), rsp=rsp)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    total, parts = magenet_loss(out, target, mask, pixel="l2")
    edge = float(edge_loss(target + 0.5, target, pixel="l2"))
    expected = 10 * 0.25 + EDGE_WEIGHT * edge + 0.0 + SEG_LAMBDA * 4 * math.log(2)  # stage 2 is exact: 0
    assert float(total) == pytest.approx(expected, rel=1e-5) and float(parts["char_s2"]) == 0.0
    lap = laplacian_residual(target + 0.5) - laplacian_residual(target)
    assert edge == pytest.approx(float(10 * (lap ** 2).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="pixel loss"):
        magenet_loss(out, target, mask, pixel="l1")


def test_hybrid_pixel_loss_is_l2_where_the_degradation_changed_the_pixel():
    """pixel="hybrid": L2_WEIGHT * d^2 where any channel of |target - degraded| > HYBRID_DELTA, Charbonnier
    elsewhere, in both image terms; an identity pair (degraded == target) is pure Charbonnier; the degraded
    input is required."""
    from retina_fast.training.enhance_losses import HYBRID_DELTA, changed_pixels

    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 8, 8, generator=g)
    degraded = target.clone()
    degraded[0, 1, 2:5, 3:6] += 0.1           # a spot in one channel of row 0
    degraded[1, :, 0, 0] += HYBRID_DELTA / 2  # below the threshold: untouched
    changed = changed_pixels(degraded, target)
    assert changed.shape == (2, 1, 8, 8) and changed.dtype == torch.bool
    assert int(changed.sum()) == 9 and bool(changed[0, 0, 2:5, 3:6].all())
    x = target + torch.randn(2, 3, 8, 8, generator=g) * 0.1
    d = x - target
    by_hand = torch.where(changed, 10 * d * d, torch.sqrt(d * d + 1e-6))
    got = pixel_loss(x, target, "hybrid", changed=changed, per_row=True)
    assert got.tolist() == pytest.approx(by_hand.flatten(1).mean(1).tolist(), rel=1e-6)
    out = MAGENetOutput(stage1=x, stage2=None, rsp=None)
    hybrid, parts = magenet_loss(out, target, pixel="hybrid", degraded=degraded)
    lap = laplacian_residual(x) - laplacian_residual(target)
    edge = torch.where(changed, 10 * lap * lap, torch.sqrt(lap * lap + 1e-6)).mean()
    assert float(hybrid) == pytest.approx(float(by_hand.mean() + EDGE_WEIGHT * edge), rel=1e-5)
    same = magenet_loss(out, target, pixel="hybrid", degraded=target)[0]  # identity pairs: Charbonnier only
    assert float(same) == pytest.approx(float(magenet_loss(out, target)[0]), rel=1e-6)
    with pytest.raises(ValueError, match="degraded"):
        magenet_loss(out, target, pixel="hybrid")
    with pytest.raises(ValueError, match="changed"):
        pixel_loss(x, target, "hybrid")


def test_log_image_weighting_counts_each_row_by_its_ratio():
    """image_weighting="log": each stage's image term is mean_i LOG_SCALE * log(c_i + 0.05 e_i); a row's gradient
    is LOG_SCALE / (its error) times its gradient under "mean", so a row 20x closer to its target pulls 20x harder
    per unit of its own loss; "mean" is the plain batch mean; an unknown weighting is refused."""
    from retina_fast.training.enhance_losses import LOG_SCALE, SQRT_SCALE

    torch.manual_seed(0)
    target = torch.rand(2, 3, 16, 16)
    delta = torch.randn(2, 3, 16, 16) * torch.tensor([0.2, 0.01]).view(2, 1, 1, 1)  # a dark row, a near-clean row
    stage2 = (target + delta).requires_grad_(True)
    out = MAGENetOutput(stage1=stage2, stage2=None, rsp=None)
    mean_total, _ = magenet_loss(out, target, image_weighting="mean")
    rows = charbonnier(stage2, target, per_row=True) + EDGE_WEIGHT * edge_loss(stage2, target, per_row=True)
    whole = charbonnier(stage2, target) + EDGE_WEIGHT * edge_loss(stage2, target)
    assert float(mean_total.detach()) == pytest.approx(float(rows.detach().mean()), rel=1e-6)
    assert float(mean_total.detach()) == pytest.approx(float(whole.detach()), rel=1e-6)
    log_total, parts = magenet_loss(out, target, image_weighting="log")
    assert float(log_total.detach()) == pytest.approx(float(LOG_SCALE * rows.detach().log().mean()), rel=1e-6)
    assert float(parts["char_s1"]) == pytest.approx(float(charbonnier(stage2, target).detach()), rel=1e-6)
    g_mean, = torch.autograd.grad(mean_total, stage2)
    g_log, = torch.autograd.grad(log_total, stage2)
    ratio = [float(g_log[i].norm() / g_mean[i].norm()) for i in range(2)]
    for i in range(2):
        assert ratio[i] == pytest.approx(LOG_SCALE / float(rows[i].detach()), rel=1e-4)
    assert ratio[1] / ratio[0] > 10  # the near-clean row now weighs more than the dark one
    sqrt_total, _ = magenet_loss(out, target, image_weighting="sqrt")
    assert float(sqrt_total.detach()) == pytest.approx(float(SQRT_SCALE * rows.detach().sqrt().mean()), rel=1e-6)
    g_sqrt, = torch.autograd.grad(sqrt_total, stage2)
    ratio_sqrt = [float(g_sqrt[i].norm() / g_mean[i].norm()) for i in range(2)]
    for i in range(2):  # between the two: SQRT_SCALE / (2 sqrt(row)), so the square root of log's ratio
        assert ratio_sqrt[i] == pytest.approx(SQRT_SCALE / (2 * float(rows[i].detach()) ** 0.5), rel=1e-4)
    assert ratio_sqrt[1] / ratio_sqrt[0] == pytest.approx((ratio[1] / ratio[0]) ** 0.5, rel=1e-4)
    with pytest.raises(ValueError, match="image_weighting"):
        magenet_loss(out, target, image_weighting="psnr")


@pytest.mark.parametrize("weighting", ["log", "sqrt"])
@pytest.mark.parametrize("pixel", ["l2", "hybrid"])
def test_row_weighting_of_an_exact_row_stays_finite(pixel, weighting):
    """An identity pair at the identity start is reproduced exactly: with an L2 term its row loss is 0, and
    log(0) made every gradient NaN from the first step (sqrt's gradient at 0 is infinite too). LOG_FLOOR keeps
    both finite, and such a row pulls no more than a row one uint8 level off would."""
    from retina_fast.training.enhance_losses import LOG_FLOOR, LOG_SCALE, SQRT_SCALE

    torch.manual_seed(1)
    target = torch.rand(2, 3, 16, 16)
    x = target.clone()
    x[1] += 0.1 * torch.randn(3, 16, 16)  # row 0 exact, row 1 degraded
    stage = x.clone().requires_grad_(True)
    out = MAGENetOutput(stage1=stage, stage2=None, rsp=None)
    total, _ = magenet_loss(out, target, image_weighting=weighting, pixel=pixel, degraded=x)
    g, = torch.autograd.grad(total, stage)
    assert torch.isfinite(total) and torch.isfinite(g).all()
    assert float(g[0].abs().max()) == 0.0 and float(g[1].abs().max()) > 0
    exact = magenet_loss(MAGENetOutput(stage1=target, stage2=None, rsp=None), target, image_weighting=weighting,
                         pixel=pixel, degraded=target)[0]
    expected = LOG_FLOOR if pixel == "l2" else (1 + EDGE_WEIGHT) * 1e-3 + LOG_FLOOR  # hybrid: all unchanged
    want = LOG_SCALE * math.log(expected) if weighting == "log" else SQRT_SCALE * math.sqrt(expected)
    assert float(exact) == pytest.approx(want, rel=1e-5)
