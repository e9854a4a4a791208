"""Spectral KL inside structure masks: scipy reference, known answers, mask handling."""
import numpy as np
import pytest
import torch

import retina_fast.metrics as M

stats = pytest.importorskip("scipy.stats")

STRUCTS = ("vein", "artery", "onh")


def _set(n, seed, offset=0.0, bands=4, size=24):
    g = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.05 * torch.randn(n, bands, size, size, generator=g, dtype=torch.float64)
    masks = {}
    for k, s in enumerate(STRUCTS):
        m = torch.zeros(n, size, size, dtype=torch.bool)
        m[:, 4 * k: 4 * k + 6, 2:-2] = True
        masks[s] = m
        x[:, :, m[0]] += 0.1 * k + offset * (k + 1)
    return x, masks


def _reference(real, rm, syn, sm, bins, eps=1e-10):
    out = {}
    for s in STRUCTS:
        per = []
        for b in range(real.shape[1]):
            r = real[:, b][rm[s]].numpy()
            q = syn[:, b][sm[s]].numpy()
            edges = np.linspace(min(r.min(), q.min()), max(r.max(), q.max()), bins + 1)
            p_ = np.histogram(r, edges)[0] / len(r) + eps
            q_ = np.histogram(q, edges)[0] / len(q) + eps
            per.append(stats.entropy(p_, q_))
        out[s] = per
    return out


def test_spectral_kl_matches_scipy_entropy():
    real, rm = _set(6, 0)
    syn, sm = _set(5, 1, offset=0.02)
    got = M.spectral_kl(real, rm, syn, sm, bins=32)
    ref = _reference(real, rm, syn, sm, bins=32)
    for s in STRUCTS:
        np.testing.assert_allclose(got[s]["per_band"], ref[s], rtol=1e-9, atol=1e-12)
        assert got[s]["mean"] == pytest.approx(np.mean(ref[s]), rel=1e-9)
        assert len(got[s]["per_band"]) == 4
        assert got[s]["n_real_pixels"] == int(rm[s].sum()) and got[s]["n_synthetic_pixels"] == int(sm[s].sum())


def test_spectral_kl_known_answers():
    real, rm = _set(6, 0)
    same = M.spectral_kl(real, rm, real.clone(), rm)
    assert all(v == pytest.approx(0.0, abs=1e-12) for s in STRUCTS for v in same[s]["per_band"])
    near = M.spectral_kl(real, rm, *_set(6, 2, offset=0.01))
    far = M.spectral_kl(real, rm, *_set(6, 2, offset=0.1))
    for s in STRUCTS:
        assert 0.0 < near[s]["mean"] < far[s]["mean"]


def test_spectral_kl_fixed_range_clamps():
    real, rm = _set(4, 0)
    syn, sm = _set(4, 1)
    got = M.spectral_kl(real, rm, syn, sm, bins=16, value_range=(0.0, 0.3))
    assert all(np.isfinite(got[s]["mean"]) and got[s]["mean"] >= 0 for s in STRUCTS)
    with pytest.raises(ValueError, match="value_range"):
        M.spectral_kl(real, rm, syn, sm, value_range=(0.3, 0.3))


def test_spectral_kl_segmenter_and_errors():
    real, rm = _set(4, 0)
    syn, sm = _set(3, 1)
    calls = []

    def segmenter(images):
        calls.append(images.shape)
        return sm

    assert M.spectral_kl(real, rm, syn, segmenter=segmenter) == M.spectral_kl(real, rm, syn, sm)
    assert calls == [syn.shape]
    with pytest.raises(ValueError, match="segmenter"):
        M.spectral_kl(real, rm, syn)
    with pytest.raises(KeyError, match="onh"):
        M.spectral_kl(real, {"vein": rm["vein"], "artery": rm["artery"]}, syn, sm)
    with pytest.raises(ValueError, match="shape"):
        M.spectral_kl(real, rm, syn, {k: v[:2] for k, v in sm.items()})
    empty = dict(sm, onh=torch.zeros_like(sm["onh"]))
    with pytest.warns(M.MetricWarning, match="onh"):
        got = M.spectral_kl(real, rm, syn, empty)
    assert np.isnan(got["onh"]["mean"]) and np.isfinite(got["vein"]["mean"])
