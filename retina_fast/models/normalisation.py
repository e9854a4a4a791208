"""Per-band normalisation of reflectance cubes: the affine map between reflectance and the VQ-GAN's units.

For band b, ``x_b = s_b r_b + t_b`` (``reflectance_to_model``) and ``r_b = (x_b - t_b) / s_b``
(``model_to_reflectance``, clamped to [0, 1]), with (s, t) from ``VQGANConfig.reflectance_scale`` /
``reflectance_shift``: one number for all bands (the source's ``2 r - 1``) or one per band.

Why per band: a retinal fundus reflects ~3-4 % in the visible bands and ~17-23 % in the near infrared
(Delori & Pflibsen 1989, Appl. Opt. 28:1061; the phantom follows that layer model). Under ``2 r - 1`` a
retinal vessel at 555 nm is a ~0.01 dent on a background of -0.94, a signal the network must both see
and emit as a tiny offset. Standardising each band with its mean and standard deviation inside the
field of view (``band_statistics``; as for any per-channel input standardisation) puts every band's
structure on the same scale. The field of view is found per image (``cube_fov``) because the black
surround outside the camera's field stop would otherwise dominate both statistics.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch

__all__ = ["band_affine", "reflectance_to_model", "model_to_reflectance", "cube_fov", "band_statistics",
           "standardised"]


def band_affine(config, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(scale, shift) of ``config`` ready to broadcast against ``like`` ((..., bands, H, W)): Python floats
    for a global map, else (bands, 1, 1) tensors on ``like``'s device in float32 (or ``like``'s dtype
    when that is float64)."""
    scale, shift = config.reflectance_scale, config.reflectance_shift
    if not isinstance(scale, tuple) and not isinstance(shift, tuple):
        return float(scale), float(shift)
    if like.dim() < 3 or like.shape[-3] != config.bands:
        raise ValueError(f"per-band normalisation needs (..., {config.bands}, H, W), got {tuple(like.shape)}")
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32

    def col(v) -> torch.Tensor:
        v = v if isinstance(v, tuple) else (v,) * config.bands
        return torch.tensor(v, dtype=dtype, device=like.device).view(-1, 1, 1)

    return col(scale), col(shift)


def reflectance_to_model(r: torch.Tensor, config) -> torch.Tensor:
    """Reflectance (..., bands, H, W) -> VQ-GAN units: ``s_b r_b + t_b`` (default 2 r - 1)."""
    scale, shift = band_affine(config, r)
    return r * scale + shift


def model_to_reflectance(x: torch.Tensor, config, clamp: bool = True) -> torch.Tensor:
    """VQ-GAN units -> reflectance ``(x_b - t_b) / s_b``, clamped to [0, 1] unless ``clamp=False``."""
    scale, shift = band_affine(config, x)
    r = (x - shift) / scale
    return r.clamp(0.0, 1.0) if clamp else r


def cube_fov(cubes: torch.Tensor, fraction: float = 0.25) -> torch.Tensor:
    """Field of view of reflectance cubes (B, bands, H, W) -> bool (B, H, W): pixels whose mean over the
    bands exceeds ``fraction`` of that image's 90th percentile of it. The surround outside a fundus
    camera's field stop is black up to sensor noise, the fundus inside is 3-25 % bright, so the split is
    wide and insensitive to ``fraction``."""
    if cubes.dim() != 4:
        raise ValueError(f"cube_fov expects (B, bands, H, W), got {tuple(cubes.shape)}")
    mean = cubes.float().mean(1)
    ref = torch.quantile(mean.flatten(1), 0.9, dim=1).view(-1, 1, 1)
    return mean > fraction * ref


@torch.no_grad()
def band_statistics(batches: Iterable[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation of each band inside the field of view (``cube_fov``) over reflectance
    batches (B, bands, H, W), accumulated in float64 -> (mean, std), one number per band."""
    total = sq = count = None
    for x in batches:
        x = x.double()
        fov = cube_fov(x).unsqueeze(1).double()
        s = (x * fov).sum((0, 2, 3))
        s2 = (x * x * fov).sum((0, 2, 3))
        n = fov.sum()
        total, sq, count = (s, s2, n) if total is None else (total + s, sq + s2, count + n)
    if total is None or float(count) < 2:
        raise ValueError("band_statistics: no field-of-view pixels in the data")
    mean = total / count
    var = (sq / count - mean * mean).clamp_min(0.0)
    std = var.sqrt()
    if not bool(torch.all(std > 1e-6)):
        flat = torch.nonzero(std <= 1e-6).flatten().tolist()
        raise ValueError(f"band_statistics: band(s) {flat} are constant inside the field of view")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def standardised(config, mean: Iterable[float], std: Iterable[float]):
    """``config`` with x_b = (r_b - mean_b) / std_b (scale 1/std, shift -mean/std), rounded to 7 digits."""
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != config.bands or len(std) != config.bands:
        raise ValueError(f"need {config.bands} means and standard deviations, got {len(mean)} and {len(std)}")
    if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError(f"band statistics must be finite with positive std, got mean {mean}, std {std}")
    scale = tuple(float(f"{1.0 / s:.7g}") for s in std)
    shift = tuple(float(f"{-m / s:.7g}") for m, s in zip(mean, std))
    return dataclasses.replace(config, reflectance_scale=scale, reflectance_shift=shift)
