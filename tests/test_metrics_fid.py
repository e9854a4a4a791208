"""Fréchet distance, HS-FID plumbing, KID and bootstrap intervals: scipy references and closed forms."""
import importlib.util
import sys
import types
import warnings

import numpy as np
import pytest
import torch

import retina_fast.metrics as M

scipy_linalg = pytest.importorskip("scipy.linalg")


def _spd(f, rng, cond=10.0):
    q, _ = np.linalg.qr(rng.standard_normal((f, f)))
    return (q * np.geomspace(1.0, 1.0 / cond, f)) @ q.T


def _fd_scipy(mu1, s1, mu2, s2):
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for f in (3, 24):
        mu1, mu2 = rng.standard_normal(f), rng.standard_normal(f)
        s1, s2 = _spd(f, rng), _spd(f, rng, cond=100.0)
        assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fd_scipy(mu1, s1, mu2, s2), rel=1e-9)
        got_t = M.frechet_distance(torch.tensor(mu1), torch.tensor(s1), torch.tensor(mu2), torch.tensor(s2))
        assert got_t == pytest.approx(_fd_scipy(mu1, s1, mu2, s2), rel=1e-9)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    f = 16
    mu, s = rng.standard_normal(f), _spd(f, rng)
    assert M.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    shift = rng.standard_normal(f)
    assert M.frechet_distance(mu, s, mu + shift, s) == pytest.approx(float(shift @ shift), rel=1e-9)
    a = rng.uniform(0.0, 2.0, f)
    b = rng.uniform(0.0, 2.0, f)
    a[:4] = 0.0  # singular covariance: the symmetric form must stay finite and exact
    want = float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert M.frechet_distance(np.zeros(f), np.diag(a), np.zeros(f), np.diag(b)) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="shape"):
        M.frechet_distance(mu, s, mu[:3], s)


def test_fd_from_features_known_answers_and_warning():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((300, 8))
    shift = np.arange(8) / 4.0
    assert M.frechet_distance_from_features(feats, feats) == pytest.approx(0.0, abs=1e-9)
    assert M.frechet_distance_from_features(feats, feats + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    mu, cov = M.feature_statistics(feats)
    np.testing.assert_allclose(cov, np.cov(feats.T), rtol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", M.MetricWarning)
        M.frechet_distance_from_features(feats, feats)
    with pytest.warns(M.MetricWarning, match="rank-deficient"):
        M.frechet_distance_from_features(feats[:6], feats[6:12])


class _BandMeanProjection(torch.nn.Module):
    """(B, C, H, W) -> (B, 4): a fixed linear map of per-band means and standard deviations."""

    def __init__(self, bands):
        super().__init__()
        self.proj = torch.nn.Linear(2 * bands, 4)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.proj(torch.cat([x.mean((2, 3)), x.std((2, 3))], 1))


def test_hs_fid_plumbing():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(40, 16, 12, 12, generator=g)
    syn = (real[:30] + 0.05).clamp(0, 1)
    ex = _BandMeanProjection(16).train()
    direct = M.frechet_distance_from_features(ex(real).detach(), ex(syn).detach())
    assert M.hs_fid(real, syn, extractor=ex, batch_size=7) == pytest.approx(direct, rel=1e-5)
    assert M.hs_fid(list(real.split(9)), syn, extractor=ex, batch_size=64) == pytest.approx(direct, rel=1e-5)
    assert M.hs_fid(real, real, extractor=ex) == pytest.approx(0.0, abs=1e-9)
    assert ex.training, "extract_features must restore the module's mode"
    with pytest.raises(ValueError, match=r"\(B, F\)"):
        M.hs_fid(real, syn, extractor=lambda x: x.mean(3))


def test_hs_fid_defaults_to_the_shipped_structure_network():
    from retina_fast.phantom import render

    x = torch.stack([render(s, 64).cube for s in range(6)])
    ext = M.default_extractor()
    assert ext.feature_dim == 128 and ext(x).shape == (6, 128)
    with pytest.warns(M.MetricWarning):  # N = 6 < 128 features
        assert M.hs_fid(x, x) == pytest.approx(0.0, abs=1e-6)
        assert M.hs_fid(x, x.flip(-1)) > 0


def _kid_naive(x, y, f):
    k = lambda a, b: (a @ b / f + 1.0) ** 3  # noqa: E731
    m = len(x)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2 * kxy


def test_kid_matches_naive_unbiased_mmd():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((15, 5)), rng.standard_normal((15, 5)) + 0.3
    got = M.kid(x, y, subsets=3, subset_size=15, seed=0)
    assert got["mean"] == pytest.approx(_kid_naive(x, y, 5), rel=1e-10)
    assert got["std"] == pytest.approx(0.0, abs=1e-12)  # whole sets in every subset


def test_kid_same_vs_shifted_distribution():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    same = M.kid(a, b, subsets=20, subset_size=100, seed=1)
    shifted = M.kid(a, b + 0.5, subsets=20, subset_size=100, seed=1)
    assert abs(same["mean"]) < 3 * same["std"] + 1e-3
    assert shifted["mean"] > 10 * max(same["std"], abs(same["mean"]))
    assert M.kid(a, b, subsets=20, subset_size=100, seed=1) == same
    with pytest.warns(M.MetricWarning, match="subset size"):
        M.kid(a[:50], b, subsets=2, subset_size=100)


def test_bootstrap_ci_matches_normal_theory():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.0, 1.0, 2000), rng.normal(0.3, 2.0, 1000)
    diff = lambda u, v: float(np.mean(v) - np.mean(u))  # noqa: E731
    ci = M.bootstrap_ci(diff, a, b, n_boot=2000, seed=0)
    se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert ci["low"] <= ci["value"] <= ci["high"]
    assert ci["std"] == pytest.approx(se, rel=0.08)
    assert (ci["high"] - ci["low"]) == pytest.approx(2 * 1.96 * se, rel=0.08)
    ci90 = M.bootstrap_ci(diff, a, b, n_boot=2000, seed=0, alpha=0.1)
    assert (ci90["high"] - ci90["low"]) == pytest.approx(2 * 1.645 * se, rel=0.08)
    assert M.bootstrap_ci(diff, a, b, n_boot=2000, seed=0) == ci
    assert M.bootstrap_ci(diff, a, b, n_boot=2000, seed=1) != ci
    basic = M.bootstrap_ci(diff, a, b, n_boot=2000, seed=0, method="basic")
    assert basic["low"] == pytest.approx(2 * ci["value"] - ci["high"]) and basic["bias"] == ci["bias"]
    assert abs(ci["bias"]) < 0.1 * se  # the mean difference is unbiased
    one = M.bootstrap_ci(lambda u: float(u.mean()), torch.tensor(a), n_boot=50)
    assert one["low"] < 0.1 and one["high"] > -0.1


def test_bootstrap_reports_fd_small_sample_bias():
    rng = np.random.default_rng(6)
    f1, f2 = rng.standard_normal((60, 6)), rng.standard_normal((60, 6))  # same distribution: true FD = 0
    ci = M.bootstrap_ci(M.frechet_distance_from_features, f1, f2, n_boot=100, seed=0)
    assert ci["bias"] > 0 and ci["low"] > ci["value"]  # the documented effect of duplicated rows
    basic = M.bootstrap_ci(M.frechet_distance_from_features, f1, f2, n_boot=100, seed=0, method="basic")
    assert basic["high"] < ci["low"]


def test_band_triplets_mechanics():
    x = torch.rand(2, 16, 8, 8)
    assert M.default_triplets(16)[-1] == (15, 15, 15) and len(M.default_triplets(16)) == 6
    backbone = lambda rgb: rgb.mean((2, 3))  # noqa: E731
    concat = M.BandTriplets(backbone, bands=16, combine="concat")(x)
    assert concat.shape == (2, 18)
    torch.testing.assert_close(concat[:, :3], x[:, :3].mean((2, 3)))
    torch.testing.assert_close(concat[:, 15:], x[:, [15, 15, 15]].mean((2, 3)))
    mean = M.BandTriplets(backbone, bands=16, triplets=[(0, 5, 10), (1, 2, 3)])(x)
    torch.testing.assert_close(mean, 0.5 * (x[:, [0, 5, 10]] + x[:, [1, 2, 3]]).mean((2, 3)))
    with pytest.raises(ValueError):
        M.BandTriplets(backbone, bands=16, triplets=[(0, 1, 16)])
    with pytest.raises(ValueError, match="expected"):
        M.BandTriplets(backbone, bands=16)(torch.rand(1, 3, 8, 8))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_inception_without_torchvision_is_a_clear_error(tmp_path):
    with pytest.raises(ImportError, match="torchvision"):
        M.InceptionBandTriplets(tmp_path / "inception_v3.safetensors")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_inception_loads_local_weights(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "inception_v3.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    ex = M.InceptionBandTriplets(str(path), resize=75)
    assert ex(torch.rand(2, 16, 40, 40)).shape == (2, 2048)
    with pytest.raises(FileNotFoundError):
        M.InceptionBandTriplets(str(tmp_path / "missing.safetensors"))


class _TinyInception(torch.nn.Module):
    """Stand-in with Inception-v3's head layout (AuxLogits, fc) to test the loader without torchvision."""

    def __init__(self, weights=None, aux_logits=True, init_weights=False, transform_input=False, num_classes=1000):
        super().__init__()
        assert weights is None and not transform_input
        self.stem = torch.nn.Conv2d(3, 8, 3)
        self.AuxLogits = torch.nn.Linear(8, num_classes) if aux_logits else None
        self.fc = torch.nn.Linear(8, num_classes)
        self.seen = []

    def forward(self, x):
        self.seen.append((tuple(x.shape), float(x.min()), float(x.max())))
        return self.fc(self.stem(x).mean((2, 3)))


def test_inception_loader_with_stub_architecture(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    models = types.ModuleType("torchvision.models")
    models.inception_v3 = _TinyInception
    tv = types.ModuleType("torchvision")
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    src = _TinyInception(num_classes=10)
    st, prefixed = tmp_path / "w.safetensors", tmp_path / "module.safetensors"
    save_file(src.state_dict(), str(st))
    save_file({"module." + k: v.contiguous() for k, v in src.state_dict().items()}, str(prefixed))  # DataParallel
    x = torch.rand(2, 16, 20, 20)
    want = torch.stack([src.stem(2 * x[:, list(t)] - 1).mean((2, 3)) for t in M.default_triplets(16)]).mean(0)
    for path in (st, prefixed):
        ex = M.InceptionBandTriplets(str(path), resize=20)
        torch.testing.assert_close(ex(x), want)
        assert ex.backbone.seen[0][0] == (2, 3, 20, 20) and ex.backbone.seen[0][1] >= -1.0
    assert M.InceptionBandTriplets(str(st), resize=31, combine="concat")(x).shape == (2, 48)
    save_file({"stem.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="bad.safetensors"):
        M.InceptionBandTriplets(str(tmp_path / "bad.safetensors"))
    save_file({"fc.weight": torch.zeros(10, 8), "fc.bias": torch.zeros(10)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="does not match"):
        M.InceptionBandTriplets(str(tmp_path / "partial.safetensors"))
    pth = tmp_path / "w.pth"  # pickle-based files are refused before anything is read
    torch.save(src.state_dict(), pth)
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        M.InceptionBandTriplets(str(pth))
    with pytest.raises(FileNotFoundError):
        M.InceptionBandTriplets(str(tmp_path / "missing.safetensors"))
