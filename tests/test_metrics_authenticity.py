"""Nearest-neighbour authenticity: brute-force reference, exact copies flagged, both rules."""
import numpy as np
import pytest
import torch

import retina_fast.metrics as M

EXACT = "donot_use_mm_for_euclid_dist"  # cdist's matmul mode loses exact zeros to cancellation


def _data(seed=0, n_train=30, n_syn=12, n_val=20, c=4, size=10):
    g = torch.Generator().manual_seed(seed)
    train = torch.rand(n_train, c, size, size, generator=g)
    syn = torch.rand(n_syn, c, size, size, generator=g)
    val = torch.rand(n_val, c, size, size, generator=g)
    syn[2] = train[7]                                                   # exact copy
    syn[5] = train[11] + 1e-3 * torch.randn(c, size, size, generator=g)  # near copy
    return train, syn, val


@pytest.mark.parametrize("budget", [256.0, 0.02])
def test_nearest_two_matches_cdist(budget):
    train, syn, _ = _data()
    d1, d2, i1, i2 = M.nearest_two(syn, train, memory_budget_mb=budget)
    full = torch.cdist(syn.flatten(1).double(), train.flatten(1).double(), compute_mode=EXACT)
    top, idx = full.topk(2, dim=1, largest=False)
    torch.testing.assert_close(d1, top[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d2, top[:, 1], rtol=1e-12, atol=1e-12)
    assert torch.equal(i1, idx[:, 0]) and torch.equal(i2, idx[:, 1])
    assert d1[2] == 0.0


def test_copies_flagged_in_pixel_space():
    train, syn, val = _data()
    out = M.nn_authenticity(train, syn)
    px = out["pixel"]
    assert px["ratio_flagged"] == [2, 5] and out["flagged"] == [2, 5]
    assert int(px["nearest_index"][2]) == 7 and int(px["nearest_index"][5]) == 11
    assert float(px["ratio"][2]) == 0.0 and px["threshold"] is None and "feature" not in out
    assert (px["ratio"][[0, 1, 3, 4]] > 1 / 3).all()


def test_ratio_threshold_geometry():
    # 1-pixel "images" on a line: training images at 0 and 10.
    train = torch.tensor([0.0, 10.0]).view(2, 1, 1, 1)
    syn = torch.tensor([3.0, 2.4, 5.0, 10.0]).view(4, 1, 1, 1)  # ratios 3/7, 2.4/7.6, 1, 0
    px = M.nn_authenticity(train, syn)["pixel"]
    torch.testing.assert_close(px["ratio"], torch.tensor([3 / 7, 2.4 / 7.6, 1.0, 0.0], dtype=torch.float64))
    assert px["ratio_flagged"] == [1, 3]
    assert M.nn_authenticity(train, syn, ratio=0.5)["pixel"]["ratio_flagged"] == [0, 1, 3]


def test_percentile_rule():
    train, syn, val = _data()
    out = M.nn_authenticity(train, syn, val=val, percentile=5)
    px = out["pixel"]
    vd = torch.cdist(val.flatten(1).double(), train.flatten(1).double(), compute_mode=EXACT).min(1).values
    assert px["threshold"] == pytest.approx(float(np.percentile(vd.numpy(), 5)), rel=1e-12)
    torch.testing.assert_close(px["val_nearest_distance"], vd, rtol=1e-12, atol=1e-12)
    assert {2, 5} <= set(px["percentile_flagged"])
    assert px["percentile_flagged"] == torch.nonzero(px["nearest_distance"] < px["threshold"]).flatten().tolist()
    # Validation images pulled towards the training set raise the threshold until fresh images are flagged.
    close_val = 0.02 * val + 0.98 * train[:20]
    strict = M.nn_authenticity(train, syn, val=close_val)["pixel"]
    assert strict["percentile_flagged"] == [2, 5]
    loose = M.nn_authenticity(train, syn, val=val, percentile=99)["pixel"]
    assert len(loose["percentile_flagged"]) > 2


def test_feature_space_and_errors():
    train, syn, val = _data()
    band_means = lambda x: x.mean((2, 3))  # noqa: E731
    out = M.nn_authenticity(train, syn, val=val, features=band_means, batch_size=5)
    ft = out["feature"]
    ref = M.nearest_two(band_means(syn), band_means(train))
    torch.testing.assert_close(ft["nearest_distance"], ref[0].double(), rtol=1e-6, atol=1e-9)
    assert 2 in ft["flagged"] and set(out["flagged"]) == set(out["pixel"]["flagged"]) | set(ft["flagged"])
    with pytest.raises(ValueError, match="at least 2"):
        M.nn_authenticity(train[:1], syn)
    with pytest.raises(ValueError, match="shape"):
        M.nn_authenticity(train, syn[:, :3])
