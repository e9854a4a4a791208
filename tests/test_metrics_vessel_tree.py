"""vessel_tree_length: high on phantom eyes, low when their vessels are blurred, ~0 when painted over; its
connected-length rule against a hand-drawn case; bad input refused. vessel_arcade_length: most of the phantom's
tree, only the curves that reach the disc in a hand-drawn case, 0 without a disc. vessel_branch_length: a long line
whole, a fine mesh (a crackle) nothing. relative_noise: the known sigma of noise
added to a flat eye, quadrature on the phantom, blind to smooth shading, the vessels' small share."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from retina_fast.metrics import relative_noise, vessel_arcade_length, vessel_branch_length, vessel_tree_length
from retina_fast.phantom import render

scipy_ndimage = pytest.importorskip("scipy.ndimage")
pytest.importorskip("skimage")
BAND = 5  # 555 nm


def _painted_over(eye) -> torch.Tensor:
    """The eye with every vessel pixel (and a 1-px rim) replaced by the Gaussian-weighted mean of its
    surroundings: the same image without a vessel tree."""
    cube = eye.cube.numpy().astype(np.float64)
    vessels = (eye.masks["artery"] | eye.masks["vein"]).numpy()
    keep = (~scipy_ndimage.binary_dilation(vessels, iterations=1)).astype(np.float64)
    den = scipy_ndimage.gaussian_filter(keep, 3)
    for b in range(cube.shape[0]):
        fill = scipy_ndimage.gaussian_filter(cube[b] * keep, 3) / np.maximum(den, 1e-6)
        cube[b] = np.where(keep > 0, cube[b], fill)
    return torch.from_numpy(cube).float()


@pytest.fixture(scope="module")
def eyes():
    return [render(s, 128) for s in range(6000, 6006)]


def test_tree_length_sees_vessels_and_their_loss(eyes):
    real = torch.stack([e.cube for e in eyes])
    blurred = torch.from_numpy(scipy_ndimage.gaussian_filter(real.numpy(), (0, 0, 1, 1)))
    painted = torch.stack([_painted_over(e) for e in eyes])
    r, b, p = (float(vessel_tree_length(x, BAND).median()) for x in (real, blurred, painted))
    assert r > 200 and b < 0.4 * r and p < 20, (r, b, p)
    # the phantom's own field of view gives the same answer as the estimated one
    fov = torch.stack([e.masks["fov"] for e in eyes])
    np.testing.assert_allclose(vessel_tree_length(real, BAND, fov=fov).median(), r, rtol=0.25)


def test_tree_length_counts_long_connected_curves_only():
    """A flat 'eye' with one dark line 60 px long and six dark 8-px dashes 8 px apart: only the line counts."""
    cube = torch.full((1, 16, 128, 128), 0.3)
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    cube[:, :, ((yy - 64) ** 2 + (xx - 64) ** 2) > 58 ** 2] = 0.0
    cube[0, BAND, 40, 34:94] = 0.2
    for k in range(6):
        cube[0, BAND, 80, 20 + 16 * k: 28 + 16 * k] = 0.2
    length = float(vessel_tree_length(cube, BAND)[0])
    assert 45 <= length <= 65, length
    cube[0, BAND, 40, 34:94] = 0.3
    assert float(vessel_tree_length(cube, BAND)[0]) == 0.0


def test_arcade_length_keeps_the_curves_that_reach_the_disc(eyes):
    """A flat eye with a bright disc, one dark line leaving it and one elsewhere: the tree counts both, the arcade
    length only the first, and nothing once the disc is gone. On the phantom the tree is mostly arcade."""
    cube = torch.full((1, 16, 128, 128), 0.3)
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    cube[:, :, ((yy - 64) ** 2 + (xx - 64) ** 2) > 58 ** 2] = 0.0
    disc = ((yy - 64) ** 2 + (xx - 40) ** 2) <= 5 ** 2
    cube[0, BAND][disc] = 0.9
    cube[0, BAND, 64, 46:100] = 0.2  # leaves the disc's edge; the first ~6 px lie in the left-out margin
    cube[0, BAND, 96, 40:90] = 0.2
    tree, arcade = float(vessel_tree_length(cube, BAND)[0]), float(vessel_arcade_length(cube, BAND)[0])
    assert 85 <= tree <= 105 and 40 <= arcade <= 52, (tree, arcade)
    assert float(vessel_arcade_length(cube, BAND, reach=1)[0]) == arcade  # the line starts at the margin itself
    cube[0, BAND][disc] = 0.3
    assert float(vessel_arcade_length(cube, BAND)[0]) == 0.0 < float(vessel_tree_length(cube, BAND)[0])
    real = torch.stack([e.cube for e in eyes])
    frac = vessel_arcade_length(real, BAND) / vessel_tree_length(real, BAND)
    assert float(frac.median()) > 0.8, frac
    with pytest.raises(ValueError, match="reach"):
        vessel_arcade_length(real, BAND, reach=0)


def test_branch_length_keeps_long_runs_and_drops_a_mesh():
    """One 60-px line counts whole; a mesh of 10-px cells (a dark crackle) has a long tree and no long branch; a
    ladder of 40-px rungs keeps its rungs only."""
    def eye():
        cube = torch.full((1, 16, 128, 128), 0.3)
        yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
        cube[:, :, ((yy - 64) ** 2 + (xx - 64) ** 2) > 58 ** 2] = 0.0
        return cube

    line = eye()
    line[0, BAND, 40, 34:94] = 0.2
    assert float(vessel_branch_length(line, BAND)[0]) == float(vessel_tree_length(line, BAND)[0]) == 60.0
    mesh = eye()
    for k in range(6):
        mesh[0, BAND, 30:90, 30 + 10 * k] = 0.2
        mesh[0, BAND, 30 + 10 * k, 30:90] = 0.2
    assert float(vessel_tree_length(mesh, BAND)[0]) > 500 and float(vessel_branch_length(mesh, BAND)[0]) == 0.0
    ladder = eye()
    ladder[0, BAND, 40, 34:94] = ladder[0, BAND, 80, 34:94] = 0.2
    for k in range(6):
        ladder[0, BAND, 40:81, 34 + 10 * k] = 0.2
    rungs = float(vessel_branch_length(ladder, BAND)[0])  # 6 rungs of ~36 px between the junctions; rails cut short
    assert 6 * 30 <= rungs <= 6 * 40, rungs
    with pytest.raises(ValueError, match="min_branch"):
        vessel_branch_length(line, BAND, min_branch=0)


@pytest.mark.parametrize("cubes,band,fov,match", [
    (torch.rand(16, 32, 32), 5, None, "need \\(N, bands"),
    (torch.rand(2, 16, 32, 32), 16, None, "band index"),
    (torch.rand(2, 16, 32, 32), 5, torch.ones(2, 31, 32, dtype=torch.bool), "fov must be"),
])
def test_tree_length_rejects_bad_input(cubes, band, fov, match):
    for fn in (vessel_tree_length, vessel_arcade_length, vessel_branch_length, relative_noise):
        with pytest.raises(ValueError, match=match):
            fn(cubes, band, fov=fov)


def _flat_eye(n: int, side: int = 129) -> torch.Tensor:
    """(n, 16, side, side): 0.3 inside a disc of radius 0.45 side, 0 outside (an odd side on purpose)."""
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    inside = ((yy - side / 2) ** 2 + (xx - side / 2) ** 2) < (0.45 * side) ** 2
    return torch.where(inside, 0.3, 0.0).expand(n, 16, side, side).clone()


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.2])
def test_relative_noise_recovers_known_sigma(sigma):
    """Multiplicative Gaussian noise of sigma on a flat eye, with and without a smooth shading ramp."""
    g = torch.Generator().manual_seed(int(sigma * 1000))
    flat = _flat_eye(4)
    ramp = 1 + 0.8 * torch.linspace(0, 1, flat.shape[-1])  # slow shading across the field: no noise
    for clean in (flat, flat * ramp):
        noisy = clean * (1 + sigma * torch.randn(clean.shape, generator=g))
        est = relative_noise(noisy, BAND)  # ~2500 detail coefficients an image: a few % scatter each
        np.testing.assert_allclose(est.numpy(), sigma, rtol=0.1)
        np.testing.assert_allclose(float(est.median()), sigma, rtol=0.04)
    assert float(relative_noise(_flat_eye(1), BAND)[0]) < 1e-6


def test_relative_noise_adds_in_quadrature_and_ignores_vessels(eyes):
    real = torch.stack([e.cube for e in eyes])
    base = relative_noise(real, BAND)
    assert 0.05 < float(base.median()) < 0.2, base
    bare = torch.stack([render(s, 128, vessels=False).cube for s in range(6000, 6006)])  # same eyes and noise
    ratio = float((relative_noise(bare, BAND) / base).median())  # the thin vessels add ~10 %
    assert 0.8 < ratio < 0.97, ratio
    g = torch.Generator().manual_seed(0)
    more = relative_noise(real * (1 + 0.1 * torch.randn(real.shape, generator=g)), BAND)
    np.testing.assert_allclose(more.numpy(), (base ** 2 + 0.1 ** 2).sqrt().numpy(), rtol=0.08)
    assert (relative_noise(torch.zeros(2, 16, 32, 32), BAND) == 0).all()  # no field of view
