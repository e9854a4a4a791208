"""Fundus degradation model (the Cofe-Net generator, Shen et al., TMI 2020), seeded and documented.

``degrade(image, seed=...)`` turns a clean colour fundus photograph into a low-quality one by, in order,
  1. illumination = colour (PIL-style brightness U[0.7, 1.2], contrast U[0.6, 1.4], saturation U[0.6, 1.4])
     -> halo (light leak: a ring outside a disk of diameter min(h, w)·U[0.75, 1] centred within
     ±w/8 of the centre, height = image mean, Gaussian-blurred with a k-px kernel, σ = 2k/3, added with
     RGB weight (141, 238, 238)/255 or (177, 195, 147)/255) -> hole (uneven exposure: a dark disk of
     diameter randint(0.4w, 0.7w), centre x ∈ [w/4, 3w/4], y ∈ [3h/8, 5h/8], depth
     U(−0.26, −0.262) − U(0.05, 0.06)·mean when the mean over the field of view exceeds 0.25, else 0,
     blurred with a kernel of 0.55–0.75·D px and σ = 0.8·max kernel),
  2. spots (dust artifacts): randint(5, 10) disks, radius r = randint(0.01h, 0.05h), brightening
     k(1 − exp(−βd)) with k = 14/25 + 1 − r/25, β = 0.5 + r/25, d = 0.3·r/25 (0.07–0.20), blurred with
     σ = 10 + 1.6r and a kernel of σ/5–σ/4 px,
  3. blur: Gaussian σ = U[5, 15] with a kernel of only σ/3–σ/2 px (1–7 px),
then multiplies by the field-of-view (FOV) mask. Every step clips to [0, 1].

Modes. ``mode="code"`` (default) reproduces the public generator's values above (FACTS §7).
``mode="paper"`` follows the papers' text instead: randint(10, 30) spots, and the blur step adds
Gaussian noise n ~ N(0, σn²) per pixel and channel with σn = U[0.005, 0.02] (the text names the noise
but its value is not recoverable; this σn is our choice). Everything else is shared.

Choices where the public code is specific to 512×512 inputs: radii in the spot formulas are measured
in 512-px units (r·512/h) and the spot σ, blur σ and blur kernel scale with min(h, w)/512, so results
at 512×512 match the code and other sizes get the same look. The halo's outer radius uses the distance
to the farthest corner (the code mixes h and w there; identical for square images). uint8 outputs are
rounded (the code truncates). Gaussian blurs are separable with cv2's kernel
exp(−(i − (k−1)/2)² / 2σ²) and reflect-101 borders.

Randomness: a ``numpy.random.Generator`` per image seeded by SeedSequence((*seed, i)) for image i of a
batch; the global RNGs are never touched, and ``degrade(x[None], seed=s)[0] == degrade(x, seed=s)``.
"""
from __future__ import annotations

import math
import sys
import types
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from retina_fast.fov import fov_mask, to_batch

__all__ = [
    "DEGRADATION_KINDS", "MODES", "degradation_combinations", "kinds_code", "parse_kinds",
    "degrade", "fov_mask", "gaussian_blur", "gaussian_kernel1d", "spot_disks",
    "adjust_brightness", "adjust_contrast", "adjust_saturation",
]

DEGRADATION_KINDS = ("illumination", "spot", "blur")
MODES = ("code", "paper")
HALO_WEIGHTS = ((141 / 255, 238 / 255, 238 / 255), (177 / 255, 195 / 255, 147 / 255))
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")


def degradation_combinations() -> list[tuple[str, ...]]:
    """The seven non-empty combinations, ordered as Cofe-Net's codes '001' … '111'
    (bits: blur, spot, illumination)."""
    combos = []
    for code in range(1, 8):
        combos.append(tuple(k for bit, k in zip((1, 2, 4), DEGRADATION_KINDS) if code & bit))
    return combos


def kinds_code(kinds: Sequence[str]) -> str:
    """Cofe-Net's 3-character code for a combination, e.g. ('illumination', 'blur') -> '101'."""
    kinds = parse_kinds(kinds)
    return "".join("1" if k in kinds else "0" for k in reversed(DEGRADATION_KINDS))


def parse_kinds(kinds: str | Sequence[str]) -> tuple[str, ...]:
    """Normalise ``kinds``: names (any order), one name, ``"all"`` or a code like ``"101"``.
    Returns the names in canonical order. Raises ValueError on anything else."""
    if isinstance(kinds, str):
        if kinds == "all":
            return DEGRADATION_KINDS
        if len(kinds) == 3 and set(kinds) <= {"0", "1"} and kinds != "000":
            return tuple(k for k, b in zip(DEGRADATION_KINDS, reversed(kinds)) if b == "1")
        kinds = (kinds,)
    names = set(kinds)
    unknown = names - set(DEGRADATION_KINDS)
    if unknown or not names:
        raise ValueError(f"unknown degradation kinds {sorted(unknown) or '(none)'}; "
                         f"choose from {DEGRADATION_KINDS}, 'all', 'random' or a code like '101'")
    return tuple(k for k in DEGRADATION_KINDS if k in names)


# ----------------------------------------------------------------------------- filters


def gaussian_kernel1d(ksize: int, sigma: float, device=None) -> torch.Tensor:
    """cv2-style kernel: exp(−(i − (ksize−1)/2)² / 2σ²), normalised; (ksize,) float32."""
    i = torch.arange(ksize, dtype=torch.float64, device=device) - (ksize - 1) / 2
    k = torch.exp(-(i * i) / (2 * sigma * sigma)) if sigma > 0 else (i == 0).double()
    return (k / k.sum()).float()


def _pad_mode(pad: int, size: int) -> str:
    return "reflect" if pad < size else "replicate"


def gaussian_blur(x: torch.Tensor, ksize: tuple[int, int], sigma: float | tuple[float, float]) -> torch.Tensor:
    """Separable Gaussian blur of x (B, C, H, W); ksize = (kw, kh) odd, like cv2.GaussianBlur."""
    kw, kh = ksize
    sx, sy = (sigma, sigma) if not isinstance(sigma, tuple) else sigma
    c = x.shape[1]
    if kw > 1:
        k = gaussian_kernel1d(kw, sx, x.device).to(x.dtype).view(1, 1, 1, kw).repeat(c, 1, 1, 1)
        p = kw // 2
        x = F.conv2d(F.pad(x, (p, p, 0, 0), mode=_pad_mode(p, x.shape[-1])), k, groups=c)
    if kh > 1:
        k = gaussian_kernel1d(kh, sy, x.device).to(x.dtype).view(1, 1, kh, 1).repeat(c, 1, 1, 1)
        p = kh // 2
        x = F.conv2d(F.pad(x, (0, 0, p, p), mode=_pad_mode(p, x.shape[-2])), k, groups=c)
    return x


def _grey(img: torch.Tensor) -> torch.Tensor:
    """(…, 3, H, W) -> (…, 1, H, W) luma."""
    w = torch.tensor(GREY_WEIGHTS, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return (img * w).sum(-3, keepdim=True)


def adjust_brightness(img: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ImageEnhance.Brightness: blend with black, clip. img (…, 3, H, W) in [0, 1]."""
    return (img * factor).clamp(0, 1)


def adjust_contrast(img: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ImageEnhance.Contrast: blend with the (scalar) mean of the grey image, clip."""
    mean = _grey(img).mean(dim=(-3, -2, -1), keepdim=True)
    return (mean + factor * (img - mean)).clamp(0, 1)


def adjust_saturation(img: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ImageEnhance.Color: blend with the per-pixel grey image, clip."""
    grey = _grey(img)
    return (grey + factor * (img - grey)).clamp(0, 1)


# ----------------------------------------------------------------------------- degradation steps


def _randint(rng: np.random.Generator, lo: float, hi: float) -> int:
    """Python's random.randint(int(lo), int(hi)), inclusive, robust to hi < lo."""
    lo, hi = int(lo), int(hi)
    return int(rng.integers(lo, max(lo, hi) + 1))


def _odd(k: int) -> int:
    return max(1, k + 1 if k % 2 == 0 else k)


def _disk(h: int, w: int, cx: float, cy: float, radius: float, device) -> torch.Tensor:
    y = torch.arange(h, device=device, dtype=torch.float32).view(h, 1)
    x = torch.arange(w, device=device, dtype=torch.float32).view(1, w)
    return (((x - cx) ** 2 + (y - cy) ** 2).sqrt() <= radius).float()


def spot_disks(params: dict[str, Any], h: int, w: int) -> torch.Tensor:
    """(H, W) bool: the union of the disks a ``degrade(..., return_params=True)`` call's spots were drawn
    in (radius r/2, before their blur); all False when it drew none."""
    m = torch.zeros(h, w, dtype=torch.bool)
    for sp in params.get("spots", []):
        m |= _disk(h, w, sp["center"][0], sp["center"][1], int(sp["radius"] / 2), "cpu").bool()
    return m


def _colour(img, rng, p):
    b, c, s = rng.uniform(0.7, 1.2), rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4)
    p["color"] = {"brightness_factor": b, "contrast_factor": c, "saturation_factor": s}
    return adjust_saturation(adjust_contrast(adjust_brightness(img, b), c), s)


def _halo(img, rng, p):
    _, h, w = img.shape
    num = int(rng.integers(1, 3))  # colour brightness >= 0.7 > 0.2, so the code's 0 never occurs
    cx, cy = _randint(rng, w // 2 - w // 8, w // 2 + w // 8), _randint(rng, h // 2 - h // 8, h // 2 + h // 8)
    dia_a = min(h, w) * rng.uniform(0.75, 1.0)
    far = math.hypot(max(cx, w - cx), max(cy, h - cy))
    dia_b = min(h, w) * (1 + (2 * far / min(h, w) - 1) * rng.random()) + abs(max(cx - w / 2, cy - h / 2) + max(w, h) / 2)
    ring = _disk(h, w, cx, cy, int(dia_b / 2), img.device) - _disk(h, w, cx, cy, int(dia_a / 2), img.device)
    k = int(abs(2 * max(cx, w - cx, cy, h - cy) - dia_a))
    sigma = 2 * k / 3
    delta = gaussian_blur((ring * img.mean())[None, None], (_odd(k), _odd(k)), sigma)[0]
    weight = torch.tensor(HALO_WEIGHTS[num - 1], device=img.device).view(3, 1, 1)
    p["halo"] = {"num": num, "center": [cx, cy], "dia_a": dia_a, "dia_b": dia_b, "ksize": _odd(k), "sigma": sigma}
    return (img + weight * delta).clamp(0, 1)


def _hole(img, fov, rng, p):
    _, h, w = img.shape
    dia = _randint(rng, 0.4 * w, 0.7 * w)
    cx, cy = _randint(rng, w / 4, w * 3 / 4), _randint(rng, h * 3 / 8, h * 5 / 8)
    mean = float(img.sum() / (3 * fov.sum().clamp_min(1)))
    if mean > 0.25:
        base = -0.26 - 0.002 * rng.random()  # the code's uniform(-0.26, -0.262)
        depth = rng.uniform(base - 0.06 * mean, base - 0.05 * mean)
    else:
        base = depth = 0.0
    kw, kh = _randint(rng, dia * 0.55, dia * 0.75), _randint(rng, dia * 0.55, dia * 0.75)
    sigma = 2 / 3 * max(kw, kh) * 1.2
    mask = gaussian_blur((_disk(h, w, cx, cy, int(dia / 2), img.device) * depth)[None, None], (_odd(kw), _odd(kh)), sigma)[0]
    p["hole"] = {"center": [cx, cy], "diameter": dia, "fov_mean": mean, "depth": depth,
                 "ksize": [_odd(kw), _odd(kh)], "sigma": sigma}
    return (img + mask).clamp(0, 1)


def spot_brightness(r512: float) -> float:
    """Brightening of one spot of radius r (in 512-px units): k(1 − exp(−βd))."""
    k, beta, d = 14 / 25 + 1 - r512 / 25, 0.5 + r512 / 25, 0.3 * r512 / 25
    return k * (1 - math.exp(-beta * d))


def _spots(img, rng, p, mode):
    _, h, w = img.shape
    n = _randint(rng, 10, 30) if mode == "paper" else _randint(rng, 5, 10)
    spots = []
    for _ in range(n):
        r = _randint(rng, math.ceil(0.01 * h), 0.05 * h)
        cx, cy = _randint(rng, r + 1, w - r - 1), _randint(rng, r + 1, h - r - 1)
        r512 = r * 512 / h
        value = spot_brightness(r512)
        sigma = (10 + 1.6 * r512) * h / 512
        kw, kh = _randint(rng, sigma / 5, sigma / 4), _randint(rng, sigma / 5, sigma / 4)
        mask = gaussian_blur((_disk(h, w, cx, cy, int(r / 2), img.device) * value)[None, None], (_odd(kw), _odd(kh)), sigma)[0]
        img = (img + mask).clamp(0, 1)
        spots.append({"radius": r, "center": [cx, cy], "value": value, "ksize": [_odd(kw), _odd(kh)], "sigma": sigma})
    p["spots"] = spots
    return img


def _blur(img, rng, p, mode):
    scale = min(img.shape[-2:]) / 512
    sigma = rng.uniform(5, 15) * scale
    kw, kh = _randint(rng, sigma / 3, sigma / 2), _randint(rng, sigma / 3, sigma / 2)
    img = gaussian_blur(img[None], (_odd(kw), _odd(kh)), sigma)[0]
    p["blur"] = {"sigma": sigma, "ksize": [_odd(kw), _odd(kh)]}
    if mode == "paper":
        std = rng.uniform(0.005, 0.02)
        noise = torch.from_numpy(rng.standard_normal(img.shape, dtype=np.float32)).to(img.device)
        img = img + std * noise
        p["blur"]["noise_std"] = std
    return img.clamp(0, 1)


def _degrade_one(img, fov, rng, kinds, mode):
    """img (3, H, W) float32 in [0, 1], fov (1, H, W) float -> (degraded, params)."""
    if kinds == "random":
        combos = degradation_combinations()
        kinds = combos[int(rng.integers(len(combos)))]
    p: dict[str, Any] = {"kinds": list(kinds), "code": kinds_code(kinds), "mode": mode}
    if "illumination" in kinds:
        img = _hole(_halo(_colour(img, rng, p), rng, p), fov, rng, p)
    if "spot" in kinds:
        img = _spots(img, rng, p, mode)
    if "blur" in kinds:
        img = _blur(img, rng, p, mode)
    return img * fov, p


# ----------------------------------------------------------------------------- FOV and containers


def _fov_batch(mask, x: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    if mask is None:
        m = fov_mask(x)
    else:
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    m = m.to(device=x.device, dtype=torch.float32)
    if m.shape[-2:] != (h, w):
        raise ValueError(f"fov_mask of shape {tuple(m.shape)} does not match the image size {(h, w)}")
    if m.numel() == h * w:
        return m.reshape(1, 1, h, w).expand(n, 1, h, w)
    if m.numel() == n * h * w:
        return m.reshape(n, 1, h, w)
    raise ValueError(f"fov_mask must be (H, W), (N, H, W) or (N, 1, H, W); got {tuple(m.shape)}")


def _seed_entropy(seed) -> list[int]:
    seq = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
    if not seq or any(not isinstance(s, (int, np.integer)) or s < 0 for s in seq):
        raise ValueError(f"seed must be a non-negative int or a sequence of them, got {seed!r}")
    return [int(s) for s in seq]


def degrade(image, *, seed, kinds: str | Sequence[str] = DEGRADATION_KINDS, mode: str = "code",
            fov_mask=None, return_params: bool = False):
    """Degrade clean fundus image(s) with the Cofe-Net model (see the module docstring).

    image: float tensor (3, H, W) / (N, 3, H, W) in [0, 1] (any device), or numpy (H, W, 3) /
        (N, H, W, 3) uint8 or float; the result has the same type, dtype, device and shape.
    seed: int or sequence of ints (image i of a batch uses SeedSequence((*seed, i))).
    kinds: names from DEGRADATION_KINDS (one of the seven combinations), ``"all"``, a Cofe-Net code
        such as ``"101"`` (bits blur, spot, illumination), or ``"random"`` (one of the seven per image).
    mode: ``"code"`` (the public generator's values) or ``"paper"`` (10–30 spots, blur noise).
    fov_mask: bool/float (H, W), (N, H, W) or (N, 1, H, W); None estimates it with ``fov_mask()``.
    return_params: also return the sampled parameters (a dict, or a list of dicts for a batch).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    kinds = "random" if kinds == "random" else parse_kinds(kinds)
    entropy = _seed_entropy(seed)
    x, restore = to_batch(image)
    fov = _fov_batch(fov_mask, x)
    outs, params = [], []
    for i in range(x.shape[0]):
        rng = np.random.default_rng(np.random.SeedSequence(entropy + [i]))
        y, p = _degrade_one(x[i], fov[i], rng, kinds, mode)
        outs.append(y)
        params.append(p)
    out = restore(torch.stack(outs))
    if not return_params:
        return out
    single = (isinstance(image, torch.Tensor) and image.dim() == 3) or (isinstance(image, np.ndarray) and image.ndim == 3)
    return out, (params[0] if single else params)


class _CallableModule(types.ModuleType):
    """The documented API names the function ``retina_fast.training.degrade(image, ...)`` while this module is
    ``retina_fast.training.degrade``: calling the module calls ``degrade``, so both spellings work
    without the package shadowing its own submodule."""

    def __call__(self, image, **kwargs):
        return degrade(image, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
