r"""Spectral KL divergence inside retinal structures (vein, artery, optic nerve head).

The source document reports a "spectral KL divergence" per structure without defining it; this is
this package's reading of it (histogram KL, as for the spectra of segmented regions). For a structure s
and band b:

1. pool the reflectance of every pixel inside the structure mask over all real images → values R,
   and likewise over all synthetic images → values S;
2. histogram both on the same ``bins`` equal-width bins over [lo, hi] — the pooled range of R ∪ S,
   or a fixed ``value_range`` (values outside it are clamped into the end bins);
3. turn counts into probabilities, add ε to every bin and renormalise:
   p = (h_R / Σh_R + ε) / Σ(·),  q = (h_S / Σh_S + ε) / Σ(·);
4. KL_{s,b} = Σ_k p_k log(p_k / q_k)   (nats; real ‖ synthetic).

The structure's score is the mean of KL_{s,b} over bands. Histograms are computed in float64.
Synthetic images have no masks: pass ``synthetic_masks`` or a ``segmenter`` that predicts them.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence, Tuple

import torch

from retina_fast.metrics._common import ImagesLike, as_images, warn

__all__ = ["spectral_kl", "kl_divergence_hist"]

Masks = Mapping[str, torch.Tensor]


def _check_masks(masks: Masks, images: torch.Tensor, structures: Sequence[str], which: str) -> dict:
    out = {}
    n, _, h, w = images.shape
    for s in structures:
        if s not in masks:
            raise KeyError(f"{which} masks have no entry {s!r} (available: {sorted(masks)})")
        m = torch.as_tensor(masks[s])
        if m.ndim == 4 and m.shape[1] == 1:
            m = m[:, 0]
        if tuple(m.shape) != (n, h, w):
            raise ValueError(f"{which} mask {s!r} must have shape {(n, h, w)}, got {tuple(m.shape)}")
        out[s] = m.to(device=images.device, dtype=torch.bool)
    return out


def kl_divergence_hist(p_counts: torch.Tensor, q_counts: torch.Tensor, eps: float = 1e-10) -> float:
    """KL(p ‖ q) in nats between two histograms (bins,) after normalising, adding ε and renormalising."""
    p = p_counts.double() / p_counts.sum()
    q = q_counts.double() / q_counts.sum()
    p = (p + eps) / (p + eps).sum()
    q = (q + eps) / (q + eps).sum()
    return float((p * (p / q).log()).sum())


def _band_edges(r: torch.Tensor, s: torch.Tensor,
                value_range: Optional[Tuple[float, float]]) -> Tuple[float, float]:
    if value_range is not None:
        lo, hi = float(value_range[0]), float(value_range[1])
        if not hi > lo:
            raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")
        return lo, hi
    lo = min(float(r.min()), float(s.min()))
    hi = max(float(r.max()), float(s.max()))
    if not hi > lo:
        hi = lo + max(abs(lo), 1.0) * 1e-6
    return lo, hi


def spectral_kl(real: ImagesLike, real_masks: Masks, synthetic: ImagesLike,
                synthetic_masks: Optional[Masks] = None,
                structures: Sequence[str] = ("vein", "artery", "onh"), bins: int = 64, eps: float = 1e-10,
                segmenter: Optional[Callable[[torch.Tensor], Masks]] = None,
                value_range: Optional[Tuple[float, float]] = None) -> dict:
    """Per-structure spectral KL(real ‖ synthetic) (see the module docstring).

    real: (N, C, H, W); real_masks: {structure: bool (N, H, W)}; synthetic: (M, C, H', W');
    synthetic_masks: {structure: bool (M, H', W')}, or None together with ``segmenter``, a callable
    mapping synthetic images (M, C, H', W') to such a dict.
    Returns {structure: {"mean": float, "per_band": [C floats], "n_real_pixels": int,
    "n_synthetic_pixels": int}}. A structure with no pixels in either set gets NaN and a warning.
    """
    real, synthetic = as_images(real, "real"), as_images(synthetic, "synthetic")
    if real.shape[1] != synthetic.shape[1]:
        raise ValueError(f"band counts differ: real {real.shape[1]}, synthetic {synthetic.shape[1]}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if synthetic_masks is None:
        if segmenter is None:
            raise ValueError("synthetic images have no masks: pass synthetic_masks={structure: bool (M, H, W)} "
                             "or segmenter=<callable mapping (M, C, H, W) images to such a dict>")
        with torch.no_grad():
            synthetic_masks = segmenter(synthetic)
    rm = _check_masks(real_masks, real, structures, "real")
    sm = _check_masks(synthetic_masks, synthetic, structures, "synthetic")
    bands = real.shape[1]
    table = {}
    for name in structures:
        r = real.permute(1, 0, 2, 3)[:, rm[name]].double()
        s = synthetic.permute(1, 0, 2, 3)[:, sm[name]].double()
        entry = {"n_real_pixels": int(r.shape[1]), "n_synthetic_pixels": int(s.shape[1])}
        if r.shape[1] == 0 or s.shape[1] == 0:
            warn(f"spectral_kl: structure {name!r} has no pixels in the "
                 f"{'real' if r.shape[1] == 0 else 'synthetic'} masks; its KL is NaN")
            entry.update(mean=float("nan"), per_band=[float("nan")] * bands)
        else:
            per_band = []
            for b in range(bands):
                lo, hi = _band_edges(r[b], s[b], value_range)
                hr = torch.histc(r[b].clamp(lo, hi), bins=bins, min=lo, max=hi)
                hs = torch.histc(s[b].clamp(lo, hi), bins=bins, min=lo, max=hi)
                per_band.append(kl_divergence_hist(hr, hs, eps))
            entry.update(mean=float(sum(per_band) / bands), per_band=per_band)
        table[name] = {"mean": entry.pop("mean"), "per_band": entry.pop("per_band"), **entry}
    return table
