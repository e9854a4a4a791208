"""A physically grounded hyperspectral retina phantom: ``render(seed, size) -> Phantom``.

The phantom stands in for real hyperspectral fundus data (none can be had here). Reflectance is
computed from absorber concentrations, not painted.

Layer model (modified Beer-Lambert, double pass; per wavelength l and pixel x)
------------------------------------------------------------------------------
::

    R(l, x) = r_s(l) s(x)                                  inner-retina / ILM back-scatter
            + V(l, x) T_ret(l, x) [ r_rpe (1 - w(x))       photoreceptor / RPE interface reflection
                                  + rho(x) T_deep(l, x)^2 ] light returned by choroid, sclera or disc
    T_ret   = exp(-2 [mu_b(l, S_c) c_cap(x) + ln(10) MP(x) m(l)])      capillaries, macular pigment
    T_deep  = exp(-[mu_mel(l)/mu_mel(500) tau(x) + mu_b(l, S_ch) b_ch(x) + mu_b(l, S_c) b_onh(x)])
    V       = f + (1 - f) exp(-2 [mu_b(l, S_a) p_a(x) + mu_b(l, S_v) p_v(x)])   retinal vessels

``mu_b(l, S)`` is whole-blood absorption (``retina_fast.spectra``: Prahl's haemoglobin table, 150 g/L)
at saturation S; ``p_a``/``p_v`` the blood path through arteries / veins (cylinders,
``retina_fast.phantom_vessels``); ``f`` (0.28-0.42) the fraction of light returning over a vessel
that bypasses it (scattered around it), so vessel contrast saturates near 1 - f where blood absorbs
strongly (green) and follows the absorption where it is weak (red), as in retinal oximetry. ``tau``
is the melanin optical depth at 500 nm (RPE, denser under the fovea, plus choroidal stroma);
``MP`` the macular pigment (decadic OD at its 457 nm peak, 0.3-0.7 at the fovea) with the CIE
template ``m``; ``w`` the optic-nerve-head weight: the disc has no RPE or choroid, only
capillary-perfused neural tissue over the bright lamina (``rho`` high, higher in the cup, where there
is less blood). Large choroidal vessels (more blood, less stromal melanin than the spaces between
them) show where melanin and blood absorb little: in the red and near infrared.
``r_s`` (~1 % at 500 nm, ~l^-2) scales with the nerve fibre layer (thick around the disc and along
the arcades, absent in the foveal pit: with the denser foveal RPE melanin and the macular pigment this
makes the fovea dark, most of all in the blue); ``r_rpe`` = 0.7 %; ``rho`` 0.18 outside the disc.

Camera: illumination fall-off (quadratic vignetting plus a tilt), a circular field stop, an exposure
gain (the cube is the flat-field-calibrated camera signal, reflectance x ``params["gain"]`` (2.7-3.2),
so the bands use the sensor range; divide by the gain for absolute reflectance: ~1 % in the blue-green
to ~6-10 % in the near infrared), shot noise with a band-dependent photon budget (silicon QE x lamp)
plus read noise, clipped to [0, 1]. ``rgb`` is the same eye seen by a colour fundus camera (Gaussian
R/G/B sensitivities over the bands, no white balance, gamma 1/2.2).

Per-eye variation (all from the seed): eye side (the disc is right of the fovea in a right eye, OD),
field magnification, disc and fovea position, disc size / shape and cup ratio, saturations (arteries
92-98 %, veins 55-65 %), RPE and choroidal pigmentation, macular pigment density and width, vessel
calibres, tortuosity and trees, illumination, exposure and noise level.

Speed: everything is vectorised; the exponents are linear in six absorber maps, so each exponential
term is one (bands x 6) @ (6 x HW) product and one ``exp``. 224 x 224 x 16 takes ~15 ms of one core.

Outputs are **torch tensors**: ``cube`` float32 (bands, H, W), ``rgb`` float32 (3, H, W), ``masks``
bool (H, W) for ``artery``, ``vein``, ``onh``, ``fovea`` (0.5 mm radius) and ``fov``; ``wavelengths``
is a tuple (nm). Geometry lives in millimetres on the retina, so one seed gives the same eye at every
size; only the camera noise depends on the size.
"""
from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from retina_fast import DEFAULT_WAVELENGTHS, spectra
from retina_fast.phantom_vessels import choroid_pattern, grow_trees, rasterize, smooth_noise

__all__ = ["Phantom", "render", "disc_masks", "MIN_SIZE"]

MIN_SIZE = 32
FOVEA_RADIUS_MM = 0.5      # the ``fovea`` mask
R_RPE = 0.007              # reflectance of the photoreceptor / RPE interface (grey)
_RGB_CHANNELS = ((600.0, 30.0), (540.0, 28.0), (465.0, 25.0))  # (centre, sigma) nm: R, G, B
# Colour camera exposure x channel balance. No white balance: fundus cameras render the fundus
# orange-red (calibrated on skimage.data.retina(): mean R/G/B ~0.8/0.33/0.23 inside the field).
_RGB_BALANCE = np.array([[7.0], [2.6], [1.2]], dtype=np.float32)


@dataclass
class Phantom:
    """One rendered eye. ``cube``: (bands, H, W) float32 tensor in [0, 1]; ``rgb``: (3, H, W) float32
    tensor in [0, 1] (gamma-encoded colour fundus image); ``masks``: name -> (H, W) bool tensor;
    ``wavelengths``: nm per band; ``params``: the per-eye parameters (JSON-serialisable)."""

    cube: torch.Tensor
    rgb: torch.Tensor
    masks: dict[str, torch.Tensor]
    wavelengths: tuple[float, ...]
    params: dict = field(default_factory=dict)


def _eye_parameters(rng: np.random.Generator) -> dict:
    """Draw one eye's anatomy and physiology (see the module docstring for ranges)."""
    u = rng.uniform
    eye = "OD" if rng.random() < 0.5 else "OS"
    nasal = 1 if eye == "OD" else -1
    fovea = (-nasal * u(1.0, 1.8), u(-0.2, 0.5))
    dist = u(4.0, 4.7)
    return {
        "eye": eye,
        "nasal_sign": nasal,
        "field_mm": u(10.5, 12.0),              # retina spanned by the image width
        "fov_radius_frac": u(0.44, 0.49),       # field stop radius / image width
        "fov_center_frac": (u(-0.01, 0.01), u(-0.01, 0.01)),
        "fovea_mm": fovea,
        "disc_mm": (fovea[0] + nasal * dist, fovea[1] - u(0.2, 0.6)),
        "disc_radius_mm": u(0.78, 0.95),
        "disc_aspect": u(1.04, 1.15),            # vertical / horizontal
        "cup_ratio": u(0.25, 0.55),
        "sat_artery": u(0.92, 0.98),
        "sat_vein": u(0.55, 0.65),
        "sat_choroid": u(0.85, 0.95),
        "artery_um": u(95.0, 120.0),
        "vein_um": u(130.0, 155.0),
        "tortuosity": u(0.025, 0.05),
        "arcade_q": u(1.4, 1.8),                 # arcade ellipse: horizontal / vertical axis
        "tau_rpe": float(math.exp(rng.normal(math.log(0.5), 0.3))),   # melanin OD at 500 nm
        "tau_choroid": float(math.exp(u(math.log(0.8), math.log(2.0)))),   # stroma melanin
        "choroid_blood_um": u(120.0, 200.0),
        "choroid_contrast": u(0.35, 0.8),        # large choroidal vessels vs stroma (tigroid)
        "capillary_um": u(1.5, 3.0),
        "mp_peak": u(0.3, 0.7),                  # decadic OD at 457 nm
        "mp_width_mm": u(0.45, 0.75),
        "vessel_bypass": u(0.28, 0.42),
        "gain": u(2.7, 3.2),
        "vignetting": u(0.25, 0.5),
        "tilt": (u(0.0, 0.12), u(0.0, 2.0 * math.pi)),
        "photons": u(2500.0, 8000.0),            # photo-electrons at full scale, best band
        "read_noise": u(0.001, 0.003),
    }


@functools.lru_cache(maxsize=8)
def _band_tables(wavelengths: tuple[float, ...]) -> dict:
    """Per-band spectral constants (float64), cached per wavelength set."""
    wl = np.asarray(wavelengths, dtype=np.float64)
    oxy = spectra.blood_absorption(wl, 1.0)      # cm^-1, 150 g/L
    deoxy = spectra.blood_absorption(wl, 0.0)
    mel = spectra.melanin_absorption(wl) / spectra.melanin_absorption([500.0])[0]
    mp = spectra.macular_pigment_density(wl) * math.log(10.0)
    # Silicon QE x halogen lamp: the photon budget peaks in the red and falls in the blue and NIR.
    budget = np.exp(-(((wl - 660.0) / 230.0) ** 2))
    # Inner-retina back-scatter rises towards the blue (Rayleigh-like, ~l^-2).
    r_s = 0.010 * (500.0 / wl) ** 2
    # Colour camera weights: Gaussian sensitivities sampled at the bands, trapezoid band widths.
    widths = np.abs(np.gradient(wl)) if len(wl) > 1 else np.ones(1)
    rgb = np.stack([np.exp(-0.5 * ((wl - c) / s) ** 2) * widths for c, s in _RGB_CHANNELS])
    rgb /= np.maximum(rgb.sum(axis=1, keepdims=True), 1e-12)
    return {"oxy": oxy, "deoxy": deoxy, "mel": mel, "mp": mp, "budget": budget, "r_s": r_s,
            "rgb": rgb}


_LOCAL = threading.local()


def _workspace(n_bands: int, hw: int) -> dict[str, np.ndarray]:
    """Scratch buffers reused between calls (per thread, most recent shape only). Fresh multi-MB
    arrays are costly (page faults on first touch), so only the returned arrays are allocated anew."""
    ws = getattr(_LOCAL, "ws", None)
    if ws is None or ws["key"] != (n_bands, hw):
        ws = {"key": (n_bands, hw), "conc": np.empty((6, hw), np.float32),
              "deep": np.empty((n_bands, hw), np.float32)}
        n_z = max(n_bands, 3) * hw + 1                  # + 1: Box-Muller fills pairs
        ws["z"] = np.empty(n_z, np.float32)
        ws["tmp"] = np.empty(n_z // 2 + 1, np.float32)
        _LOCAL.ws = ws
    return ws


def _normals(rng: np.random.Generator, n: int, ws: dict) -> np.ndarray:
    """``n`` standard normals (float32 view into the workspace) by Box-Muller from uniforms:
    z = sqrt(-2 ln u1) (cos 2 pi u2, sin 2 pi u2). ~5x faster than ``Generator.standard_normal``."""
    half = (n + 1) // 2
    out, tmp = ws["z"][: 2 * half], ws["tmp"]
    rng.random(dtype=np.float32, out=out)
    r, a = out[:half], out[half:]
    np.subtract(np.float32(1.0), r, out=r)       # (0, 1]: log is finite
    np.log(r, out=r)
    r *= np.float32(-2.0)
    np.sqrt(r, out=r)
    a *= np.float32(2.0 * math.pi)
    c = np.cos(a, out=tmp[:half])
    np.sin(a, out=a)
    a *= r
    r *= c
    return out[:n]


def _disc_weights(xx, yy, p: dict) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) optic-disc weight (1 inside an ellipse, 0 outside, edge ~10 % of the radius) and cup
    weight (smooth, sloping walls; the cup sits slightly temporal)."""
    dx, dy = p["disc_mm"]
    rd = p["disc_radius_mm"]
    ex = (xx - dx) / rd
    ey = (yy - dy) / (rd * p["disc_aspect"])
    rho = np.sqrt(ex * ex + ey * ey)
    w = np.clip((1.0 - rho) / 0.1 + 0.5, 0.0, 1.0)
    cx = -p["nasal_sign"] * 0.12                  # the cup sits slightly temporal
    rc = np.sqrt((ex - cx) ** 2 + ey * ey) / p["cup_ratio"]
    cup = np.clip((1.0 - rc) / 0.8 + 0.5, 0.0, 1.0)
    return w, cup * cup * (3.0 - 2.0 * cup)


def _grid_mm(size: int, field_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in mm: x (1, W) to the right, y (H, 1) downwards, 0 at the centre."""
    coords = ((np.arange(size, dtype=np.float32) + 0.5) / size - 0.5) * field_mm
    return coords[None, :], coords[:, None]


def disc_masks(params: dict, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(disc, cup) bool (H, W) masks of a rendered eye from its ``Phantom.params`` (the ``onh``
    mask is the disc; the cup is where the cup weight exceeds 1/2)."""
    size = int(params["size"] if size is None else size)
    xx, yy = _grid_mm(size, params["field_mm"])
    w, cup = _disc_weights(xx, yy, params)
    return torch.from_numpy(w > 0.5), torch.from_numpy((cup > 0.5) & (w > 0.5))


def _nerve_fibre_sheen(xx, yy, rf2, p: dict) -> np.ndarray:
    """(H, W) relative inner-retina back-scatter ~ nerve fibre layer thickness: thick around the
    disc and along the arcades above and below the fovea, absent in the foveal pit."""
    dx, dy = p["disc_mm"]
    fx, fy = p["fovea_mm"]
    near_disc = np.exp(-np.sqrt((xx - dx) ** 2 + (yy - dy) ** 2) / 2.5)
    arcades = np.exp(-(((yy - fy) ** 2 - 6.0) / 4.0) ** 2) * np.exp(-rf2 / 40.0)
    pit = 1.0 - 0.85 * np.exp(-rf2 / 0.45)
    return (0.55 + 0.6 * near_disc + 0.35 * arcades) * pit


def _absorbers(p, rng_tex, size, rf2, foveal, w_onh, cup, out: np.ndarray) -> None:
    """Fill ``out`` (6, HW) with the absorber maps of the layer model (module docstring):
    0/1 oxy/deoxy-Hb path of the retinal capillaries (cm), 2 macular pigment (decadic OD at peak),
    3 melanin optical depth at 500 nm (RPE + choroid), 4/5 oxy/deoxy-Hb path in choroid and disc."""
    outside = 1.0 - w_onh
    # Textures: large-scale pigment variation, RPE mottling and the choroidal vessel network.
    low = smooth_noise(rng_tex, size, 6)
    mottle = smooth_noise(rng_tex, size, 40)
    chor = choroid_pattern(rng_tex, size)
    mp = p["mp_peak"] * np.exp(-rf2 / p["mp_width_mm"] ** 2)
    # Choroid: vessels (chor ~ 1) carry more blood and less stromal melanin than the spaces between.
    contrast = p["choroid_contrast"] * (chor - 0.3)
    tau = (p["tau_rpe"] * (1.0 + 1.0 * foveal) * (1.0 + 0.12 * low + 0.05 * mottle)
           + p["tau_choroid"] * (1.0 - contrast) * (1.0 + 0.15 * low)) * outside
    b_ch = p["choroid_blood_um"] * (1.0 + contrast) * outside        # µm
    b_onh = w_onh * (30.0 * (1.0 - cup) + 6.0 * cup)                 # disc capillaries (µm)
    sa, sv, sch = p["sat_artery"], p["sat_vein"], p["sat_choroid"]
    sc = 0.5 * (sa + sv)
    cap = p["capillary_um"] * (1.0 - np.exp(-rf2 / 0.12))           # none in the avascular zone
    out[0] = (sc * cap * 1e-4).ravel()                                # µm -> cm
    out[1] = ((1 - sc) * cap * 1e-4).ravel()
    out[2] = mp.ravel()
    out[3] = tau.ravel()
    out[4] = ((sch * b_ch + sc * b_onh) * 1e-4).ravel()
    out[5] = (((1 - sch) * b_ch + (1 - sc) * b_onh) * 1e-4).ravel()


def _vessel_transmission(sig, tab, p, path_a, path_v) -> None:
    """Multiply ``sig`` (bands, HW) in place by the retinal vessels' double-pass transmission,

        V = f + (1 - f) exp(-2 (mu_b(l, S_a) p_a + mu_b(l, S_v) p_v)),

    where ``f`` is the fraction of the returning light that bypasses the vessel (scattered around
    it): apparent contrast saturates near 1 - f where blood absorbs strongly (green) and still
    follows the absorption where it is weak (red), as in retinal oximetry. Only vessel pixels are
    computed."""
    both = (path_a + path_v).ravel()
    idx = np.flatnonzero(both > 0.0)
    if idx.size == 0:
        return
    f = np.float32(p["vessel_bypass"])
    # -2e-4: two passes, path in µm -> cm.
    mu_a = (tab["oxy"] * p["sat_artery"] + tab["deoxy"] * (1 - p["sat_artery"])) * -2e-4
    mu_v = (tab["oxy"] * p["sat_vein"] + tab["deoxy"] * (1 - p["sat_vein"])) * -2e-4
    att = mu_a.astype(np.float32)[:, None] * path_a.ravel()[idx][None, :]
    att += mu_v.astype(np.float32)[:, None] * path_v.ravel()[idx][None, :]
    np.exp(att, out=att)
    att *= 1.0 - f
    att += f
    sig[:, idx] *= att


def _camera(p: dict, xx, yy, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) camera factor (exposure gain x illumination fall-off x field stop) and the field stop
    (1 inside, 0 outside, one-pixel soft edge). Fall-off: quadratic vignetting plus a linear tilt."""
    fcx, fcy = p["fov_center_mm"]
    fov_r = p["fov_radius_mm"]
    rr = np.sqrt((xx - fcx) ** 2 + (yy - fcy) ** 2) / fov_r
    tilt_a, tilt_phi = p["tilt"]
    illum = (1.0 - p["vignetting"] * rr * rr) * (
        1.0 + tilt_a * ((xx - fcx) * math.cos(tilt_phi) + (yy - fcy) * math.sin(tilt_phi)) / fov_r)
    stop = np.clip(p["fov_radius_frac"] * size * (1.0 - rr) + 0.5, 0.0, 1.0)
    return (p["gain"] * illum * stop).astype(np.float32), stop


def _add_noise(sig, rgb_lin, p: dict, tab: dict, ws: dict, seq: np.random.SeedSequence) -> None:
    """Camera noise in place: shot noise (variance = signal / photo-electrons at full scale, fewer
    photons in the blue and NIR) plus read noise on the cube; small Gaussian noise on the colour image."""
    rng = np.random.Generator(np.random.PCG64(seq))
    n_b, hw = sig.shape
    z = _normals(rng, n_b * hw, ws).reshape(n_b, hw)
    sd = ws["deep"]                                                      # scratch (bands, HW)
    np.multiply(sig, (1.0 / (p["photons"] * tab["budget"])).astype(np.float32)[:, None], out=sd)
    sd += np.float32(p["read_noise"] ** 2)
    np.sqrt(sd, out=sd)
    z *= sd
    sig += z
    zc = _normals(rng, 3 * hw, ws)
    zc *= np.float32(0.003)
    rgb_lin += zc.reshape(3, hw)


def render(
    seed: int, size: int = 224, *, wavelengths: Sequence[float] | None = None, noise: bool = True,
    vessels: bool = True,
) -> Phantom:
    """Render eye number ``seed`` at ``size`` x ``size`` pixels.

    ``wavelengths`` (nm, 450-920) default to ``retina_fast.DEFAULT_WAVELENGTHS``; ``noise=False``
    gives the noise-free camera signal (same eye, same illumination); ``vessels=False`` the same eye
    without the retinal vessels' absorption (their masks are still returned), for diagnostics that ask
    what the vessels alone contribute. Deterministic: only
    ``numpy.random.Generator(PCG64)`` streams spawned from ``seed`` are used, never global state.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")
    size = int(size)
    wl = tuple(float(v) for v in (DEFAULT_WAVELENGTHS if wavelengths is None else wavelengths))
    if not wl:
        raise ValueError("wavelengths must not be empty")
    tab = _band_tables(wl)
    # Independent streams: anatomy, textures (size-independent) and camera noise (size-dependent).
    ss_geo, ss_tex = np.random.SeedSequence([int(seed), 0x52455449]).spawn(2)
    rng_geo = np.random.Generator(np.random.PCG64(ss_geo))
    rng_tex = np.random.Generator(np.random.PCG64(ss_tex))
    p = _eye_parameters(rng_geo)
    field_mm = p["field_mm"]
    fov_c = (p["fov_center_frac"][0] * field_mm, p["fov_center_frac"][1] * field_mm)
    fov_r = p["fov_radius_frac"] * field_mm
    p.update(fov_center_mm=fov_c, fov_radius_mm=fov_r)
    seg = grow_trees(
        rng_geo, fovea=p["fovea_mm"], disc=p["disc_mm"], disc_radius=p["disc_radius_mm"],
        nasal_sign=p["nasal_sign"], fov_center=fov_c, fov_radius=fov_r,
        artery_um=p["artery_um"], vein_um=p["vein_um"], tortuosity=p["tortuosity"], arcade_q=p["arcade_q"],
    )
    path_a, path_v, mask_a, mask_v = rasterize(seg, size, field_mm)

    xx, yy = _grid_mm(size, field_mm)
    fxm, fym = p["fovea_mm"]
    rf2 = (xx - fxm) ** 2 + (yy - fym) ** 2                           # (H, W) mm^2 from the fovea
    w_onh, cup = _disc_weights(xx, yy, p)
    outside = 1.0 - w_onh
    hw = size * size
    n_b = len(wl)
    ws = _workspace(n_b, hw)
    foveal = np.exp(-rf2 / 1.0)                                       # ~1 mm around the fovea
    _absorbers(p, rng_tex, size, rf2, foveal, w_onh, cup, out=ws["conc"])

    # Exponents are linear in the absorber maps: one (bands x 6) @ (6 x HW) product per term.
    m_ret = np.zeros((n_b, 6), dtype=np.float32)
    m_ret[:, :3] = -2.0 * np.stack([tab["oxy"], tab["deoxy"], tab["mp"]], axis=1)
    m_tot = m_ret.copy()
    m_tot[:, 3:] = -2.0 * np.stack([tab["mel"], tab["oxy"], tab["deoxy"]], axis=1)
    sig = m_ret @ ws["conc"]                                             # becomes the cube
    np.exp(sig, out=sig)                                                 # T_ret
    deep = np.matmul(m_tot, ws["conc"], out=ws["deep"])
    np.exp(deep, out=deep)                                               # T_ret * T_deep^2

    cam, stop = _camera(p, xx, yy, size)                                # gain x fall-off x stop
    sig *= (R_RPE * outside * cam).reshape(1, hw)
    deep *= ((0.18 * outside + w_onh * (0.20 * (1.0 - cup) + 0.30 * cup)) * cam).reshape(1, hw)
    sig += deep
    if vessels:
        _vessel_transmission(sig, tab, p, path_a, path_v)
    a_s = (_nerve_fibre_sheen(xx, yy, rf2, p) * (1.0 + 0.1 * smooth_noise(rng_tex, size, 10)) * cam)
    a_s = a_s.reshape(hw)
    for b, r_s in enumerate(tab["r_s"].astype(np.float32)):              # no (bands, HW) temporary
        sig[b] += r_s * a_s
    rgb_lin = tab["rgb"].astype(np.float32) @ sig                       # noise-free colour camera
    rgb_lin *= _RGB_BALANCE
    if noise:
        _add_noise(sig, rgb_lin, p, tab, ws, np.random.SeedSequence([int(seed), 0x52455449, 2, size]))
    np.clip(sig, 0.0, 1.0, out=sig)
    np.clip(rgb_lin, 0.0, 1.0, out=rgb_lin)
    rgb = np.power(rgb_lin, np.float32(1.0 / 2.2), out=rgb_lin)       # display gamma
    rgb *= stop.reshape(1, -1).astype(np.float32)

    masks = {"artery": mask_a & (stop > 0.5), "vein": mask_v & (stop > 0.5), "onh": w_onh > 0.5,
             "fovea": rf2 < FOVEA_RADIUS_MM ** 2, "fov": stop > 0.5}
    p.update(n_segments=len(seg), seed=int(seed), size=size)
    return Phantom(
        cube=torch.from_numpy(sig.reshape(n_b, size, size)),
        rgb=torch.from_numpy(rgb.reshape(3, size, size).astype(np.float32, copy=False)),
        masks={name: torch.from_numpy(np.ascontiguousarray(m)) for name, m in masks.items()},
        wavelengths=wl,
        params=p,
    )
