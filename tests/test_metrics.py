"""PSNR / SSIM / MS-SSIM against scikit-image and pytorch-msssim, plus known answers."""
import warnings

import numpy as np
import pytest
import torch

import retina_fast.metrics as M

skm = pytest.importorskip("skimage.metrics")
pytorch_msssim = pytest.importorskip("pytorch_msssim")


def _pair(n, c, h, w, noise=0.1, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g, dtype=torch.float64)
    y = (x + noise * torch.randn(n, c, h, w, generator=g, dtype=torch.float64)).clamp(0, 1)
    return x.to(dtype), y.to(dtype)


def _sk_ssim(x, y, data_range=1.0):
    return np.array([skm.structural_similarity(a.double().numpy(), b.double().numpy(), gaussian_weights=True,
                                               sigma=1.5, use_sample_covariance=False, data_range=data_range,
                                               channel_axis=0) for a, b in zip(x, y)])


@pytest.mark.parametrize("shape", [(2, 3, 37, 45), (2, 16, 29, 23)])
def test_ssim_matches_skimage(shape):
    x, y = _pair(*shape)
    got = M.ssim(x, y, data_range=1.0)
    assert got.shape == (shape[0],)
    np.testing.assert_allclose(got.numpy(), _sk_ssim(x, y), rtol=0, atol=1e-10)


def test_ssim_float32_and_data_range():
    x, y = _pair(3, 3, 33, 33, noise=0.05)
    ref = _sk_ssim(x, y)
    np.testing.assert_allclose(M.ssim(x.float(), y.float()).numpy(), ref, atol=2e-5)
    np.testing.assert_allclose(M.ssim(255 * x, 255 * y, data_range=255.0).numpy(), ref, atol=1e-10)
    assert M.ssim(x, y, reduction="mean").ndim == 0
    assert float(M.ssim(x, y, reduction="sum")) == pytest.approx(ref.sum(), abs=1e-9)


def test_ssim_known_answers_and_errors():
    x, _ = _pair(2, 3, 24, 24)
    torch.testing.assert_close(M.ssim(x, x), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        M.ssim(x, x[:, :2])
    with pytest.raises(ValueError, match="window"):
        M.ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(ValueError, match="reduction"):
        M.ssim(x, x, reduction="median")


def test_psnr_matches_skimage():
    x, y = _pair(3, 16, 20, 17)
    ref = [skm.peak_signal_noise_ratio(a.numpy(), b.numpy(), data_range=1.0) for a, b in zip(x, y)]
    np.testing.assert_allclose(M.psnr(x, y).numpy(), ref, rtol=1e-12)
    assert torch.isinf(M.psnr(x, x)).all()
    assert float(M.psnr(2 * x, 2 * y, data_range=2.0, reduction="mean")) == pytest.approx(np.mean(ref))


@pytest.mark.parametrize("c", [3, 16])
def test_ms_ssim_full_scales_matches_pytorch_msssim(c):
    x, y = _pair(2 if c == 3 else 1, c, 176, 176, noise=0.15)
    with warnings.catch_warnings():
        warnings.simplefilter("error", M.MetricWarning)
        got = M.ms_ssim(x, y, data_range=1.0)
    ref = pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False)
    # pytorch-msssim builds its Gaussian window in float32, hence ~1e-7 differences in float64.
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)


def test_ms_ssim_scale_count():
    sides = (11, 20, 21, 40, 41, 80, 81, 160, 161, 672)
    assert [M.ms_ssim_scales(s) for s in sides] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    with pytest.raises(ValueError):
        M.ms_ssim_scales(10)


def test_ms_ssim_one_scale_is_ssim():
    x, y = _pair(2, 3, 20, 20, noise=0.05)
    with pytest.warns(M.MetricWarning, match="1 of 5 scales"):
        got = M.ms_ssim(x, y)
    per_channel = [[skm.structural_similarity(a[k].numpy(), b[k].numpy(), gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False, data_range=1.0) for k in range(3)]
                   for a, b in zip(x, y)]
    np.testing.assert_allclose(got.numpy(), np.maximum(per_channel, 0).mean(1), atol=1e-10)


def test_ms_ssim_reduced_scales_matches_reference_terms():
    # Three scales at 64 px, built from pytorch-msssim's own per-scale SSIM / CS terms.
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

    x, y = _pair(2, 3, 64, 64, noise=0.1)
    with pytest.warns(M.MetricWarning, match="3 of 5 scales"):
        got = M.ms_ssim(x, y)
    w = torch.tensor(M.MS_SSIM_WEIGHTS[:3], dtype=torch.float64)
    w = w / w.sum()
    win = _fspecial_gauss_1d(11, 1.5).repeat(3, 1, 1, 1)
    terms, a, b = [], x, y
    for j in range(3):
        s, cs = _ssim(a, b, data_range=1.0, win=win, size_average=False)
        terms.append(torch.relu(cs) if j < 2 else torch.relu(s))
        a, b = torch.nn.functional.avg_pool2d(a, 2), torch.nn.functional.avg_pool2d(b, 2)
    ref = torch.prod(torch.stack(terms) ** w.view(-1, 1, 1), 0).mean(1)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)  # float32 window in pytorch-msssim


def test_ms_ssim_odd_sizes_and_identity():
    x, y = _pair(1, 3, 61, 47, noise=0.1)
    with pytest.warns(M.MetricWarning):
        assert torch.allclose(M.ms_ssim(x, x), torch.ones(1, dtype=torch.float64))
        v = M.ms_ssim(x, y)
    assert 0.0 < float(v) < 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.ms_ssim(x, y, warn_reduced=False)
