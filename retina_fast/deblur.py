"""Blur read off the field-of-view edge, and undone: the enhancer's deblurring step (not in MAGE-Net).

A fundus photograph carries a known sharp edge: the camera's field stop, a black surround around a bright
disc. Blur spreads that edge, and the spread is the blur's edge-spread function (the principle of
edge-based MTF measurement, e.g. ISO 12233's slanted edge). This module

1. takes intensity profiles across the field-of-view (FOV) edge where it runs across a row (the left and
   right ends of the FOV's widest row, ``PROFILES`` rows around it) and across a column (top and bottom),
2. fits each with the edge of a box blur of odd width k ∈ {1, 3, 5, ...} on a step that is itself
   ``native_width`` px soft (a sharp photograph's own edge, after resizing and pixel integration), pixel
   integrated, at a sub-pixel position searched on a 0.1-px grid, over the profile's pixels inside the FOV
   (the surround is zeroed, so only the inner half of the spread is seen),
3. takes the most common width per axis; if fewer than ``min_agreement`` of an axis's profiles agree on
   it, the edge is not a blurred step (a light leak or a dark corner changes it, as do the uneven halos
   of Cofe-Net's illumination model), and nothing is done. An axis without a usable edge (the FOV touches
   the image border there) takes the other axis's width; with neither, nothing is done,
4. undoes the separable box blur of the chosen widths (kw, kh) by Tikhonov-regularised deconvolution with a
   Laplacian penalty (no DC bias: flat regions keep their level) whose data are the pixels inside the FOV
   only (the surround cut off what the blur spread outwards; taking the cut as data rings along the rim):
   a few preconditioned conjugate-gradient steps from the Fourier-domain closed form
   X = conj(K)·Y / (|K|² + λ·|L|²); clamped to [0, 1] and masked by the FOV.

Width 1 on both axes (no blur seen) returns the image unchanged, bit for bit.

Scope, measured (docs/enhance_eval/no_harm_study.md): the box family is Cofe-Net's blur model (a Gaussian
with σ = 5-15 truncated to a kernel of σ/3-σ/2 px, nearly flat), the degradation the enhancer is trained and
judged on. On the real photograph at 512 px the estimate finds the drawn width on every blurred validation
image that is not also badly lit (a light-leak halo makes the profiles disagree: the step then does nothing)
and width 1 on the clean one; a real photograph whose aperture edge is softer than ``native_width`` plus
two pixels (at 512 px) is read as blurred and sharpened, and defocus blur (a disc, not a box) is only approximated.
Larger images are read on a copy scaled to 512 px (``estimate_blur``): the clean photograph reads as sharp at
256-1411 px; at 768 and 1024 px, 5 of 8 blurred validation images are read (widths within 2 px after scaling)
and the rest are left.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from retina_fast.fov import fov_mask

__all__ = ["BlurEstimate", "estimate_blur", "deconvolve_box", "deblur", "DEFAULTS", "check_deblur_config"]

DEFAULTS = {"lambda": 0.02, "native_width": 1.5, "min_agreement": 0.85}
PROFILES = 7  # profiles per side, PROFILE_STEP rows / columns apart around the FOV's widest row / column
PROFILE_STEP = 2
OUTSIDE = 3  # pixels of each profile outside the FOV (zero after masking; they locate the edge)
SHIFTS = np.arange(-1.0, 8.0, 0.1)  # candidate edge positions, px from the profile's first pixel
_FINE = 10  # sub-samples per pixel of the edge model
REFERENCE_SIDE = 512  # larger images are read at this size (native_width is given here; so is Cofe-Net's blur)
ITERATIONS = 5  # conjugate-gradient steps of the masked deconvolution (measured: 5, 15 and 40 within 0.3 dB)


@dataclass
class BlurEstimate:
    """Box widths per axis (1 = no blur seen), and the evidence: per-profile widths and the agreement."""
    width: int = 1  # kw: horizontal extent (across the left / right edges)
    height: int = 1  # kh: vertical extent (across the top / bottom edges)
    agreement: tuple[float, float] = (0.0, 0.0)
    profiles: dict[str, list[int]] = field(default_factory=dict)
    reason: str = ""

    @property
    def blurred(self) -> bool:
        return self.width > 1 or self.height > 1


def check_deblur_config(doc, what: str = "deblur") -> dict:
    """A config.json ``deblur`` entry (dict of DEFAULTS' keys) -> the full settings; ValueError naming a bad one."""
    if not isinstance(doc, dict):
        raise ValueError(f"{what} must be an object with keys {sorted(DEFAULTS)}, got {doc!r}")
    unknown = sorted(set(doc) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown} (known: {sorted(DEFAULTS)})")
    out = {**DEFAULTS, **doc}
    for key, lo, hi in (("lambda", 0.0, math.inf), ("native_width", 0.0, 16.0), ("min_agreement", 0.0, 1.0)):
        v = out[key]
        bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi
        if bad or (key == "lambda" and v <= 0):
            want = "a finite number > 0" if key == "lambda" else f"a number in [{lo}, {hi}]"
            raise ValueError(f"{what}.{key} must be {want}, got {v!r}")
        out[key] = float(v)
    return out


def _odd(v: float) -> int:
    """The odd integer nearest to v (at least 1)."""
    return max(1, 2 * round((v - 1) / 2) + 1)


def _box(width: float) -> np.ndarray:
    m = max(1, int(round(width * _FINE)))
    return np.full(m, 1.0 / m)


@functools.lru_cache(maxsize=8)
def _edge_models(widths: tuple[int, ...], native: float, length: int) -> np.ndarray:
    """(len(widths), len(SHIFTS), length): a unit step at each shift, spread by box(native) * box(k) and
    integrated over each pixel, sampled at pixel centres. Cached: the same for every image of a run (read-only)."""
    kern = np.convolve(_box(native), _box(1.0)) if native > 0 else _box(1.0)
    out = np.empty((len(widths), len(SHIFTS), length))
    centres = np.arange(length) + 0.5
    for i, k in enumerate(widths):
        kk = np.convolve(kern, _box(k))
        esf = np.cumsum(kk)  # step response on the fine grid, centred on the kernel's middle
        grid = (np.arange(len(kk)) - (len(kk) - 1) / 2) / _FINE
        out[i] = np.interp(centres[None, :] - SHIFTS[:, None], grid, esf, left=0.0, right=1.0)
    out.setflags(write=False)
    return out


def _fit(profile: np.ndarray, inside: np.ndarray, models: np.ndarray, widths: tuple[int, ...]) -> int | None:
    """The width whose edge (best shift; its level fitted by least squares) fits the inside pixels best."""
    if inside.sum() < 6 or float(np.median(profile[inside][-5:])) <= 0.02:
        return None
    mi = models * inside
    level = (mi * profile).sum(-1) / np.maximum((mi * models).sum(-1), 1e-12)  # (widths, shifts)
    err = (((level[..., None] * models - profile) ** 2) * inside).sum(-1)
    return widths[int(np.unravel_index(np.argmin(err), err.shape)[0])]


def _profiles(g: np.ndarray, m: np.ndarray, length: int, axis: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Profiles (values, inside) running from outside the FOV inwards, across the edges met along ``axis``
    (1: along rows, the left and right edges; 0: along columns, top and bottom)."""
    if axis == 0:
        g, m = g.T, m.T
    g, m = np.pad(g, ((0, 0), (OUTSIDE, OUTSIDE))), np.pad(m, ((0, 0), (OUTSIDE, OUTSIDE)))  # beyond the frame: 0
    n_lines, size = m.shape
    lines = np.flatnonzero(m.any(1))
    if len(lines) == 0:
        return []
    centre = (lines[0] + lines[-1]) // 2
    out = []
    for r in range(centre - (PROFILES // 2) * PROFILE_STEP, centre + (PROFILES // 2) * PROFILE_STEP + 1, PROFILE_STEP):
        if not 0 <= r < n_lines or not m[r].any():
            continue
        cols = np.flatnonzero(m[r])
        lo, hi = cols[0], cols[-1]
        if lo > OUTSIDE and lo - OUTSIDE + length <= size:  # an edge inside the frame, not the frame itself
            s = slice(lo - OUTSIDE, lo - OUTSIDE + length)
            out.append((g[r, s], m[r, s]))
        if hi < size - OUTSIDE - 1 and hi + OUTSIDE + 1 - length >= 0:
            s = slice(hi + OUTSIDE + 1 - length, hi + OUTSIDE + 1)
            out.append((g[r, s][::-1], m[r, s][::-1]))
    return out


def estimate_blur(image: torch.Tensor, fov: torch.Tensor, *, native_width: float = DEFAULTS["native_width"],
                  min_agreement: float = DEFAULTS["min_agreement"], max_width: int = 11) -> BlurEstimate:
    """Box-blur widths of one image (3, H, W) in [0, 1] from its FOV edge; ``fov`` bool (H, W). An image whose
    shorter side exceeds REFERENCE_SIDE is read on a copy scaled down to it (antialiased bilinear, its own FOV
    mask), and the widths are scaled back (odd): a photograph's own edge softness is an optical feature that
    grows with the image (the clean real photograph's edge is ~1.5 px soft at 512 px and ~4 px at its full
    1411 px, where it read as a 3-px blur), and Cofe-Net's blur is defined at 512 px and scaled the same way.
    ``max_width``: the largest width tried, at REFERENCE_SIDE or below."""
    h, w = fov.shape[-2:]
    scale = min(h, w) / REFERENCE_SIDE
    if scale > 1:
        size = (max(16, round(h / scale)), max(16, round(w / scale)))
        small = F.interpolate(image[None].float().cpu(), size=size, mode="bilinear", antialias=True,
                              align_corners=False)[0].clamp(0, 1)
        est = estimate_blur(small, fov_mask(small), native_width=native_width, min_agreement=min_agreement,
                            max_width=max_width)
        if est.blurred:
            est.width, est.height = _odd(est.width * scale), _odd(est.height * scale)
        est.reason += f" (read at {size[1]}×{size[0]} px; widths scaled by {scale:.2f})"
        return est
    widths = tuple(range(1, max_width + 1, 2))
    length = OUTSIDE + max_width // 2 + 13  # the spread's inner half, then a plateau
    models = _edge_models(widths, native_width, length)
    g = image.float().mean(0).cpu().numpy()
    m = fov.bool().cpu().numpy()
    est = BlurEstimate()
    picks, agree = [], []
    for axis, name in ((1, "width"), (0, "height")):
        ks = [k for k in (_fit(p, i, models, widths) for p, i in _profiles(g, m, length, axis)) if k is not None]
        est.profiles[name] = ks
        if not ks:
            picks.append(None)
            agree.append(0.0)
            continue
        mode = max(set(ks), key=lambda k: (ks.count(k), -k))
        picks.append(mode)
        agree.append(ks.count(mode) / len(ks))
    est.agreement = (agree[0], agree[1])
    if picks[0] is None and picks[1] is None:
        est.reason = "no field-of-view edge inside the image"
        return est
    if picks[0] is None or picks[1] is None:  # assume an isotropic blur
        known = 0 if picks[0] is not None else 1
        picks = [picks[known]] * 2
        agree = [agree[known]] * 2
    if min(agree) < min_agreement:
        est.reason = (f"the edge profiles disagree (agreement {agree[0]:.2f} / {agree[1]:.2f} < {min_agreement}): "
                      "not a blurred sharp edge")
        return est
    est.width, est.height = picks
    est.reason = "blur seen at the field-of-view edge" if est.blurred else "the field-of-view edge is sharp"
    return est


def deconvolve_box(image: torch.Tensor, width: int, height: int, lam: float = DEFAULTS["lambda"],
                   fov: torch.Tensor | None = None, iterations: int = ITERATIONS) -> torch.Tensor:
    """Undo a separable box blur width × height (odd, px) of image(s) (..., H, W), Tikhonov-regularised with a
    Laplacian penalty λ: u minimising ||M·(k * u) − M·y||² + λ·||Δu||². Without ``fov`` (M = 1, the image
    reflect-padded) the closed form in the Fourier domain. With ``fov`` (H, W) bool, only the pixels inside the
    field of view are data: the blur spread light outside it, which the photograph's black surround (and the
    frame) cut off, and a deconvolution that took the cut as data would ring along the rim; ``iterations`` of
    conjugate gradients, preconditioned by the closed form and started from it, solve the masked problem.
    float32 FFTs; not clamped, not masked."""
    if width % 2 == 0 or height % 2 == 0 or width < 1 or height < 1:
        raise ValueError(f"box widths must be odd and >= 1, got {width} x {height}")
    *lead, h, w = image.shape
    x = image.reshape(-1, h, w).float()
    pad_h, pad_w = max(8, 2 * height), max(8, 2 * width)
    if fov is None:
        pad_h, pad_w = min(h - 1, pad_h), min(w - 1, pad_w)
        x = F.pad(x[:, None], (pad_w, pad_w, pad_h, pad_h), mode="reflect")[:, 0]
        mask = None
    else:
        x = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
        mask = F.pad(fov.float().to(x.device), (pad_w, pad_w, pad_h, pad_h))
    ph, pw = x.shape[-2:]
    kernel = torch.zeros(ph, pw, device=x.device)
    kernel[:height, :width] = 1.0 / (width * height)
    k = torch.fft.rfft2(torch.roll(kernel, (-(height // 2), -(width // 2)), (0, 1)))
    fy = torch.fft.fftfreq(ph, device=x.device)[:, None]
    fx = torch.fft.rfftfreq(pw, device=x.device)[None, :]
    penalty = lam * ((2 - 2 * torch.cos(2 * math.pi * fx)) + (2 - 2 * torch.cos(2 * math.pi * fy))) ** 2
    inverse = 1.0 / (k.abs() ** 2 + penalty)

    def filt(u: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft2(torch.fft.rfft2(u) * response, s=(ph, pw))

    if mask is None:
        u = filt(x, k.conj() * inverse)
    else:
        def normal(u):  # (KᵀMK + λΔᵀΔ) u, two FFT pairs
            f = torch.fft.rfft2(u)
            masked = torch.fft.rfft2(mask * torch.fft.irfft2(f * k, s=(ph, pw)))
            return torch.fft.irfft2(masked * k.conj() + f * penalty, s=(ph, pw))

        b = filt(mask * x, k.conj())
        u = filt(b, inverse)
        r = b - normal(u)
        z = filt(r, inverse)
        d, rz = z, (r * z).sum((-2, -1), keepdim=True)
        for _ in range(iterations):
            nd = normal(d)
            alpha = rz / (d * nd).sum((-2, -1), keepdim=True).clamp_min(1e-30)
            u, r = u + alpha * d, r - alpha * nd
            z = filt(r, inverse)
            rz_new = (r * z).sum((-2, -1), keepdim=True)
            d, rz = z + rz_new / rz.clamp_min(1e-30) * d, rz_new
    u = u[:, pad_h:pad_h + h, pad_w:pad_w + w]
    return u.reshape(*lead, h, w).to(image.dtype)


def deblur(images: torch.Tensor, fov: torch.Tensor, settings: dict | None = None
           ) -> tuple[torch.Tensor, list[BlurEstimate]]:
    """images (N, 3, H, W) float in [0, 1], fov (N, H, W) bool -> (deblurred images, one estimate each). Images
    with no blur seen are returned unchanged."""
    s = check_deblur_config(settings or {})
    out, ests = images.clone(), []
    for i in range(images.shape[0]):
        est = estimate_blur(images[i], fov[i], native_width=s["native_width"], min_agreement=s["min_agreement"])
        ests.append(est)
        if est.blurred:
            y = deconvolve_box(images[i], est.width, est.height, s["lambda"], fov=fov[i]).clamp(0, 1)
            out[i] = y * fov[i].to(y.dtype)
    return out, ests
