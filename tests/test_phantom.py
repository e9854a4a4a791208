"""Phantom: determinism, ranges, sizes, and the spectral / anatomical properties a retinal imager sees.

Spectral checks measure what oximetry software measures: the vessel optical density
OD = -ln(I_vessel / I_background), with the background interpolated from a thin ring around the
vessels (so the choroidal texture and the illumination cancel).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

import retina_fast
from retina_fast import phantom, spectra
from retina_fast.phantom_vessels import ARTERY, VEIN, grow_trees, rasterize

WL = list(retina_fast.DEFAULT_WAVELENGTHS)
SEEDS = (0, 1, 2, 3)
B = {nm: WL.index(nm) for nm in WL}


def _np(ph: phantom.Phantom):
    return ph.cube.numpy(), {k: v.numpy() for k, v in ph.masks.items()}


@pytest.fixture(scope="module")
def eyes():
    return [phantom.render(s) for s in SEEDS]


def vessel_od(cube: np.ndarray, masks: dict) -> dict[str, np.ndarray]:
    """Mean OD per band of arteries and veins (outside the disc), ring background."""
    ves = masks["artery"] | masks["vein"]
    disc = ndi.binary_dilation(masks["onh"], iterations=3)
    ring = ndi.binary_dilation(ves, iterations=3) & ~ndi.binary_dilation(ves, iterations=1)
    w = (ring & masks["fov"] & ~disc).astype(np.float32)
    den = ndi.gaussian_filter(w, 2.0)
    bg = ndi.gaussian_filter(cube * w[None], (0, 2.0, 2.0)) / np.maximum(den, 1e-6)
    out = {}
    for name in ("artery", "vein"):
        sel = masks[name] & (den > 0.05) & ~disc
        assert sel.sum() > 200, f"too few {name} pixels to measure"
        out[name] = -np.log(cube[:, sel].mean(axis=1) / bg[:, sel].mean(axis=1))
    return out


def background(masks: dict, erode: int = 0) -> np.ndarray:
    ves = ndi.binary_dilation(masks["artery"] | masks["vein"], iterations=2)
    fov = ndi.binary_erosion(masks["fov"], iterations=erode) if erode else masks["fov"]
    return fov & ~ves & ~ndi.binary_dilation(masks["onh"], iterations=4)


# ------------------------------------------------------------------------------------ basics
def test_types_shapes_and_keys():
    ph = phantom.render(5)
    assert isinstance(ph.cube, torch.Tensor) and ph.cube.dtype == torch.float32
    assert ph.cube.shape == (16, 224, 224)
    assert ph.rgb.dtype == torch.float32 and ph.rgb.shape == (3, 224, 224)
    assert set(ph.masks) == {"artery", "vein", "onh", "fovea", "fov"}
    assert all(m.dtype == torch.bool and m.shape == (224, 224) for m in ph.masks.values())
    assert ph.wavelengths == tuple(float(w) for w in retina_fast.DEFAULT_WAVELENGTHS)
    assert ph.params["eye"] in ("OD", "OS")


def test_value_ranges(eyes):
    for ph in eyes:
        for t in (ph.cube, ph.rgb):
            assert torch.isfinite(t).all()
            assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
        cube, m = _np(ph)
        inside = cube[:, m["fov"]].mean()
        outside = cube[:, ~ndi.binary_dilation(m["fov"], iterations=2)].mean()
        assert outside < 0.01 < 0.05 < inside       # dark outside the field stop
        # Calibrated reflectance x gain: ~1 % (blue-green) to ~10 % (NIR) of the fundus.
        bg = background(m)
        refl = cube[:, bg].mean(axis=1) / ph.params["gain"]
        assert 0.003 < refl[B[465]] < 0.03 and 0.03 < refl[B[900]] < 0.2
        assert refl[B[900]] > 3 * refl[B[555]]     # the red rise of fundus spectra


def test_deterministic_and_seed_dependent():
    a, b, c = phantom.render(11, 96), phantom.render(11, 96), phantom.render(12, 96)
    assert torch.equal(a.cube, b.cube) and torch.equal(a.rgb, b.rgb)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert a.params == b.params
    assert not torch.equal(a.cube, c.cube)
    assert not torch.equal(a.masks["vein"], c.masks["vein"])


def test_no_global_random_state():
    np.random.seed(1)
    torch.manual_seed(1)
    x = phantom.render(4, 64)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    np.random.seed(99)
    torch.manual_seed(99)
    np.random.rand(10)
    y = phantom.render(4, 64)
    assert torch.equal(x.cube, y.cube)
    np.random.seed(1)
    torch.manual_seed(1)
    phantom.render(4, 64)
    assert np.array_equal(np.random.get_state()[1], np_state)       # render did not draw from it
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_noise_free_option_and_camera_noise():
    noisy, clean = phantom.render(6), phantom.render(6, noise=False)
    assert torch.equal(noisy.masks["vein"], clean.masks["vein"])  # same eye
    resid = (noisy.cube - clean.cube).numpy()
    _, m = _np(clean)
    bg = background(m, erode=4)
    disc = ndi.binary_erosion(m["onh"], iterations=2)
    sd_bg, sd_disc = resid[:, bg].std(axis=1), resid[:, disc].std(axis=1)
    assert (sd_bg > 0.001).all()
    # Shot noise: brighter pixels (the disc) are noisier than the darker fundus, band by band.
    assert (sd_disc > sd_bg).mean() >= 0.9


def test_vessel_free_option_changes_only_the_vessels():
    full, bare = phantom.render(6, 128, noise=False), phantom.render(6, 128, noise=False, vessels=False)
    assert all(torch.equal(full.masks[k], bare.masks[k]) for k in full.masks)  # same eye, same masks
    vessel = full.masks["artery"] | full.masks["vein"]
    diff = (bare.cube - full.cube)[5]  # 555 nm: vessels absorb, so the vessel-free eye is brighter there
    assert float(diff[vessel].mean()) > 0.005 and float(diff[vessel].min()) >= 0.0
    far = ~torch.nn.functional.max_pool2d(vessel[None, None].float(), 9, 1, 4)[0, 0].bool()
    assert torch.equal(bare.cube[:, far & full.masks["fov"]], full.cube[:, far & full.masks["fov"]])


@pytest.mark.parametrize("size", [64, 97, 224])
def test_sizes_same_eye(size):
    ph = phantom.render(21, size)
    assert ph.cube.shape == (16, size, size) and ph.rgb.shape == (3, size, size)
    m = {k: v.numpy() for k, v in ph.masks.items()}
    for k in m:
        assert m[k].any(), k
    # The same eye at every size: disc and fovea at the same relative position.
    ref = phantom.render(21, 224)
    for key in ("onh", "fovea"):
        yx = np.argwhere(m[key]).mean(axis=0) / size
        yx_ref = np.argwhere(ref.masks[key].numpy()).mean(axis=0) / 224
        assert np.abs(yx - yx_ref).max() < 0.02
    frac = m["onh"].mean() / ref.masks["onh"].numpy().mean()
    assert 0.8 < frac < 1.25


def test_large_size():
    ph = phantom.render(2, 672)
    assert ph.cube.shape == (16, 672, 672)
    m = {k: v.numpy() for k, v in ph.masks.items()}
    vessels = (m["artery"] | m["vein"]).sum() / m["fov"].sum()
    assert 0.05 < vessels < 0.3


def test_invalid_arguments():
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError):
            phantom.render(bad, 64)
    for bad in (8, 0, 64.0):
        with pytest.raises(ValueError):
            phantom.render(0, bad)
    with pytest.raises(ValueError, match="450"):
        phantom.render(0, 64, wavelengths=[400, 500])


def test_custom_wavelengths():
    ph = phantom.render(3, 64, wavelengths=(500, 600, 700))
    assert ph.cube.shape == (3, 64, 64) and ph.wavelengths == (500.0, 600.0, 700.0)
    full = phantom.render(3, 64, noise=False)
    part = phantom.render(3, 64, wavelengths=(555, 640), noise=False)
    assert torch.allclose(part.cube[0], full.cube[B[555]], atol=1e-5)
    assert torch.allclose(part.cube[1], full.cube[B[640]], atol=1e-5)


# ---------------------------------------------------------------------------- spectral physics
def test_spectra_tables_match_facts():
    mu_a = spectra.blood_absorption([560, 600, 630, 660, 800, 900], 0.97)
    mu_v = spectra.blood_absorption([560, 600, 630, 660, 800, 900], 0.60)
    np.testing.assert_allclose(mu_a, [178, 19, 4, 2.2, 4.4, 6.3], rtol=0.03)
    np.testing.assert_allclose(mu_v, [220, 42, 13, 7.9, 4.3, 5.5], rtol=0.03)
    oxy, deoxy = spectra.hb_extinction([545, 570, 797])
    np.testing.assert_allclose(oxy, deoxy, rtol=0.03)                   # isosbestic
    np.testing.assert_allclose(spectra.melanin_absorption([450, 905]), [965, 94], rtol=0.01)
    mp = spectra.macular_pigment_density([460, 490, 530, 600])
    assert mp[0] > 0.9 and mp[1] > 0.5 and mp[2] < 0.1 and mp[3] == 0.0
    with pytest.raises(ValueError):
        spectra.hb_extinction([300])


def test_vessels_dark_in_green(eyes):
    for ph in eyes:
        od = vessel_od(*_np(ph))
        for name in ("artery", "vein"):
            for nm in (545, 555, 570, 585):
                assert od[name][B[nm]] > 0.15, (name, nm, od[name])
                assert od[name][B[nm]] > 3 * od[name][B[900]]


def test_arteries_brighter_than_veins_in_red(eyes):
    ods = [vessel_od(*_np(ph)) for ph in eyes]
    for od in ods:
        for nm in (600, 615, 640):
            assert od["artery"][B[nm]] < 0.75 * od["vein"][B[nm]], (nm, od)
    mean = {k: np.mean([od[k] for od in ods], axis=0) for k in ("artery", "vein")}
    assert mean["artery"][B[680]] < 0.75 * mean["vein"][B[680]]
    # Oximetry ratio OD600 / OD570 (saturation-sensitive over isosbestic) is lower in arteries.
    for od in ods:
        odr = {k: od[k][B[600]] / od[k][B[570]] for k in od}
        assert odr["artery"] < 0.7 * odr["vein"]


def test_arteries_and_veins_near_equal_at_isosbestic_bands(eyes):
    for ph in eyes:
        od = vessel_od(*_np(ph))
        ratio = od["artery"] / od["vein"]
        iso = ratio[[B[545], B[570], B[585]]]
        assert np.all(np.abs(iso - 1.0) < 0.3), iso
        assert iso.min() - ratio[[B[600], B[615], B[640]]].max() > 0.25


def test_optic_nerve_head_brightest_and_cup_brighter_than_rim(eyes):
    for ph in eyes:
        cube, m = _np(ph)
        disc, cup = (x.numpy() for x in phantom.disc_masks(ph.params))
        ves = ndi.binary_dilation(m["artery"] | m["vein"], iterations=1)
        onh = cube[:, m["onh"] & ~ves].mean(axis=1)
        for name, region in (("background", background(m)), ("fovea", m["fovea"]),
                             ("artery", m["artery"]), ("vein", m["vein"])):
            assert np.all(onh > 1.25 * cube[:, region].mean(axis=1)), name
        rim = disc & ~ndi.binary_dilation(cup, iterations=1) & ~ves
        assert cup.sum() > 5 and rim.sum() > 5
        assert np.all(cube[:, cup & ~ves].mean(axis=1) > cube[:, rim].mean(axis=1))


def test_macular_pigment_dip_in_blue(eyes):
    for ph in eyes:
        cube, m = _np(ph)
        p = ph.params
        size = cube.shape[-1]
        xs = ((np.arange(size) + 0.5) / size - 0.5) * p["field_mm"]
        r = np.hypot(xs[None, :] - p["fovea_mm"][0], xs[:, None] - p["fovea_mm"][1])
        ves = ndi.binary_dilation(m["artery"] | m["vein"], iterations=1)
        ring = (r > 1.0) & (r < 1.6) & ~ves & m["fov"] & ~m["onh"]
        centre = m["fovea"] & ~ves
        ratio = cube[:, centre].mean(axis=1) / cube[:, ring].mean(axis=1)
        assert ratio[B[465]] < 0.75 and ratio[B[490]] < 0.8
        assert ratio[B[465]] < ratio[B[570]] - 0.2       # the dip is a blue absorber
        assert ratio[B[465]] < ratio[B[900]] - 0.2


def _texture(img: np.ndarray, keep: np.ndarray) -> float:
    """Std of the band-passed (1-8 px) relative image over ``keep`` (normalised convolution)."""
    w = keep.astype(np.float32)
    def smooth(x, s):  # noqa: E306
        return ndi.gaussian_filter(x * w, s) / np.maximum(ndi.gaussian_filter(w, s), 1e-6)
    return float((smooth(img, 1.0) / np.maximum(smooth(img, 8.0), 1e-6) - 1.0)[keep].std())


def test_choroidal_vessels_visible_in_near_infrared():
    ratios = []
    for seed in SEEDS:
        ph = phantom.render(seed, noise=False)
        cube, m = _np(ph)
        keep = background(m, erode=12) & ~ndi.binary_dilation(m["fovea"], iterations=8)
        ratios.append(_texture(cube[B[730]], keep) / _texture(cube[B[555]], keep))
    assert min(ratios) > 1.15 and np.mean(ratios) > 1.4, ratios


def test_colour_fundus_is_red_orange(eyes):
    for ph in eyes:
        rgb = ph.rgb.numpy()
        bg = background({k: v.numpy() for k, v in ph.masks.items()})
        r, g, b = (rgb[k][bg].mean() for k in range(3))
        assert r > 1.5 * g and g > b > 0.05


# ------------------------------------------------------------------------------------ anatomy
def test_vessel_trees_leave_the_disc(eyes):
    for ph in eyes:
        _, m = _np(ph)
        ves = m["artery"] | m["vein"]
        lab, _ = ndi.label(ves | m["onh"], structure=np.ones((3, 3)))
        roots = np.unique(lab[m["onh"]])
        roots = roots[roots > 0]
        assert np.isin(lab[ves], roots).mean() > 0.95       # one network rooted at the disc
        assert (m["artery"] & m["onh"]).any() and (m["vein"] & m["onh"]).any()
        assert 0.06 < ves.sum() / m["fov"].sum() < 0.3


def _trees(seed: int):
    ph = phantom.render(seed, 64)
    p = ph.params
    rng = np.random.Generator(np.random.PCG64(seed))
    return p, grow_trees(
        rng, fovea=p["fovea_mm"], disc=p["disc_mm"], disc_radius=p["disc_radius_mm"],
        nasal_sign=p["nasal_sign"], fov_center=p["fov_center_mm"], fov_radius=p["fov_radius_mm"],
        artery_um=p["artery_um"], vein_um=p["vein_um"], tortuosity=p["tortuosity"])


@pytest.mark.parametrize("seed", [0, 7])
def test_vessel_geometry(seed):
    p, seg = _trees(seed)
    assert np.all(seg.d1 <= seg.d0)                                   # tapering
    assert seg.generation.max() >= 2                                  # branching
    for kind in (ARTERY, VEIN):
        gens = seg.generation[seg.kind == kind]
        d = seg.d0[seg.kind == kind]
        assert d[gens == 1].max() < d[gens == 0].max()                # daughters thinner
    main_a = seg.d0[(seg.kind == ARTERY) & (seg.generation == 0)].max()
    main_v = seg.d0[(seg.kind == VEIN) & (seg.generation == 0)].max()
    assert main_a < main_v                                            # arteries thinner
    # Tortuosity: long vessels are longer than their chord.
    ratios = []
    for v in np.unique(seg.vessel):
        sel = seg.vessel == v
        if sel.sum() >= 20:
            length = np.hypot(seg.x1[sel] - seg.x0[sel], seg.y1[sel] - seg.y0[sel]).sum()
            xs, ys = seg.x0[sel], seg.y0[sel]
            ratios.append(length / math.hypot(seg.x1[sel][-1] - xs[0], seg.y1[sel][-1] - ys[0]))
    assert min(ratios) > 1.0 and np.median(ratios) > 1.01
    # Crossings: arteries and veins overlap somewhere.
    pa, pv, _, _ = rasterize(seg, 224, p["field_mm"])
    assert ((pa > 0) & (pv > 0)).sum() > 10


def test_eye_side_disc_position_and_variation():
    params = [phantom.render(s, 48).params for s in range(12)]
    assert {p["eye"] for p in params} == {"OD", "OS"}
    for p in params:
        # The disc is nasal to the fovea: right of it in a right eye (OD), left in a left eye.
        side = np.sign(p["disc_mm"][0] - p["fovea_mm"][0])
        assert side == (1 if p["eye"] == "OD" else -1)
        assert 0.92 <= p["sat_artery"] <= 0.98 and 0.55 <= p["sat_vein"] <= 0.65
    for key in ("sat_artery", "sat_vein", "tau_rpe", "disc_radius_mm", "mp_peak"):
        assert np.std([p[key] for p in params]) > 0, key
    assert len({round(p["disc_mm"][1], 3) for p in params}) == len(params)


def test_field_of_view_and_illumination_falloff():
    for seed in SEEDS[:2]:
        ph = phantom.render(seed, noise=False)
        cube, m = _np(ph)
        p = ph.params
        size = cube.shape[-1]
        assert not m["fov"][0, 0] and not m["fov"][-1, -1] and m["fov"][size // 2, size // 2]
        expected = math.pi * (p["fov_radius_frac"] * size) ** 2 / size**2
        assert abs(m["fov"].mean() - expected) < 0.01
        xs = ((np.arange(size) + 0.5) / size - 0.5) * p["field_mm"]
        cx, cy = p["fov_center_mm"]
        rr = np.hypot(xs[None, :] - cx, xs[:, None] - cy) / p["fov_radius_mm"]
        keep = background(m) & ~ndi.binary_dilation(m["fovea"], iterations=12)
        nir = cube[B[900]]
        assert nir[keep & (rr < 0.45)].mean() > 1.05 * nir[keep & (rr > 0.75) & (rr < 0.95)].mean()
