"""MS-SSIM diversity (|Δ| between validation and synthetic sets) and pair sampling."""
import warnings

import numpy as np
import pytest
import torch

import retina_fast.metrics as M


def _images(n, seed, collapse=0.0, size=32):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, size, size, generator=g)
    fresh = torch.rand(n, 3, size, size, generator=g)
    return (collapse * base + (1 - collapse) * fresh).clamp(0, 1)


def test_sample_pairs():
    p = M.sample_pairs(10, 20, seed=3)
    assert p.shape == (20, 2) and (p[:, 0] < p[:, 1]).all() and p.max() < 10
    assert len({tuple(r) for r in p.tolist()}) == 20
    np.testing.assert_array_equal(p, M.sample_pairs(10, 20, seed=3))
    assert not np.array_equal(p, M.sample_pairs(10, 20, seed=4))
    with pytest.warns(M.MetricWarning, match="with replacement"):
        assert M.sample_pairs(4, 10).shape == (10, 2)
    with pytest.raises(ValueError):
        M.sample_pairs(1, 3)


def test_diversity_identical_sets_zero_delta():
    val = _images(10, 0)
    with pytest.warns(M.MetricWarning, match="2 of 5 scales"):
        out = M.ms_ssim_diversity(val, val.clone(), pairs=15, seed=0, n_boot=100)
    assert out["abs_delta"] == 0.0 and out["val_mean"] == out["syn_mean"]
    assert 0.0 <= out["ci_low"] <= out["ci_high"] < 0.05
    assert out["scales"] == 2 and len(out["val_scores"]) == 15


def test_diversity_scores_are_pairwise_ms_ssim():
    val, syn = _images(8, 1), _images(8, 2, collapse=0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.MetricWarning)
        out = M.ms_ssim_diversity(val, syn, pairs=10, seed=5, n_boot=200)
        pairs = M.sample_pairs(8, 10, seed=5)
        ref = M.ms_ssim(syn[pairs[:, 0]], syn[pairs[:, 1]])
    np.testing.assert_allclose(out["syn_scores"], ref.double().numpy(), rtol=1e-6)
    # A collapsed synthetic set (80 % one shared image) is far less diverse than independent images.
    assert out["syn_mean"] > out["val_mean"] + 0.3
    assert out["abs_delta"] == pytest.approx(out["syn_mean"] - out["val_mean"])
    assert out["ci_low"] > 0.2 and out["ci_low"] <= out["abs_delta"] <= out["ci_high"]


def test_diversity_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        M.ms_ssim_diversity(_images(4, 0), _images(4, 0, size=33), pairs=2)
