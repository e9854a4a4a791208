r"""Fréchet distance (FID-style) and kernel inception distance (KID) on feature vectors.

Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2), computed in float64:

    FD = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2}.

Σ1 Σ2 is not symmetric, and a general ``sqrtm`` of it can return imaginary parts or non-finite
values. The trace is taken through a similar symmetric PSD matrix instead:
(Σ1 Σ2)^{1/2} is similar to (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}, so

    tr (Σ1 Σ2)^{1/2} = Σ_i sqrt(λ_i),   λ = eigvalsh(Σ1^{1/2} Σ2 Σ1^{1/2}),

with Σ1^{1/2} = V diag(sqrt(max(d, 0))) Vᵀ from ``eigh`` and tiny negative eigenvalues (round-off)
clipped to 0. FD estimated from N samples is biased upward by roughly O(F/N) (Chong & Forsyth, "Effectively unbiased FID and
Inception Score and where to find them", CVPR 2020; Binkowski et al., ICLR 2018 for KID): compare
only values computed with the same N and the same feature extractor, and report KID and bootstrap
intervals alongside.

KID (Bińkowski et al. 2018): unbiased MMD² with the polynomial kernel k(x, y) = (xᵀy / F + 1)³,
averaged over random subsets drawn without replacement:

    MMD²_u = Σ_{i≠j} k(x_i, x_j) / m(m−1) + Σ_{i≠j} k(y_i, y_j) / m(m−1)
             − 2 Σ_{i,j} k(x_i, y_j) / m².
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch

from retina_fast.metrics._common import ImagesLike, as_features, extract_features, warn

__all__ = ["frechet_distance", "frechet_distance_from_features", "feature_statistics", "hs_fid",
           "default_extractor", "default_segmenter", "kid"]

ArrayLike = Union[torch.Tensor, np.ndarray]


def _f64(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    d, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(d, 0.0, None))) @ v.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between two Gaussians (μ: (F,), Σ: (F, F)), float64, symmetric eigh form.

    Accepts tensors or arrays. Returns a Python float ≥ 0 (round-off below zero is clipped).
    """
    m1, m2, s1, s2 = _f64(mu1).reshape(-1), _f64(mu2).reshape(-1), _f64(sigma1), _f64(sigma2)
    f = m1.size
    if m2.size != f or s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(f"shape mismatch: mu1 {m1.shape}, mu2 {m2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}")
    for name, t in (("mu1", m1), ("mu2", m2), ("sigma1", s1), ("sigma2", s2)):
        if not np.all(np.isfinite(t)):
            raise ValueError(f"{name} contains NaN or Inf")
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    r1 = _psd_sqrt(s1)
    inner = r1 @ s2 @ r1
    lam = np.clip(np.linalg.eigvalsh(0.5 * (inner + inner.T)), 0.0, None)
    fd = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(lam).sum()
    return max(float(fd), 0.0)


def feature_statistics(features: ArrayLike, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and unbiased covariance (F, F) of (N, F) features, float64.

    Warns (:class:`MetricWarning`) when N ≤ F: the covariance is then rank-deficient and FD is
    dominated by its small-sample bias.
    """
    a = as_features(features, name)
    n, f = a.shape
    if n < 2:
        raise ValueError(f"{name}: need at least 2 samples for a covariance, got {n}")
    if n <= f:
        warn(f"{name}: {n} samples for {f}-dimensional features; the covariance is rank-deficient and "
             f"the Fréchet distance is strongly biased. Use N > F (ideally N ≫ F) and equal N across runs.")
    return a.mean(axis=0), np.cov(a, rowvar=False).reshape(f, f)


def frechet_distance_from_features(f1: ArrayLike, f2: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to feature sets f1 (N1, F) and f2 (N2, F)."""
    mu1, s1 = feature_statistics(f1, "f1")
    mu2, s2 = feature_statistics(f2, "f2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} and {mu2.shape[0]}")
    return frechet_distance(mu1, s1, mu2, s2)


def default_extractor() -> torch.nn.Module:
    """The default HS-FID feature extractor: the encoder of the shipped 16-band retinal structure
    network (``retina_fast/weights/structure-net``, trained on the phantom's artery / vein / ONH /
    fovea masks; see :mod:`retina_fast.models.structure_net`).

    Returns a fresh ``nn.Module`` (eval mode, CPU) mapping (N, 16, H, W) reflectance in [0, 1] to
    (N, F) features, F = 128 for the shipped network (global average of the U-Net bottleneck).
    Any image size works (inputs are padded internally); compare HS-FID only at equal size and N.
    Raises ``retina_fast.checkpoint.CheckpointError`` naming the file if the shipped weights are
    missing or fail their sha256 check.
    """
    from retina_fast.models.structure_net import StructureFeatures, load_structure_net

    return StructureFeatures(load_structure_net())


def default_segmenter(batch_size: int = 16) -> Callable[[torch.Tensor], dict]:
    """Masks for synthetic images from the shipped structure network (same weights as
    :func:`default_extractor`): a callable ``nn.Module`` mapping (N, 16, H, W) reflectance to
    {"artery", "vein", "onh", "fovea": bool (N, H, W) CPU tensors} (sigmoid > 0.5), run without
    gradients in chunks of ``batch_size``. Pass it as ``spectral_kl(..., segmenter=...)``.
    """
    from retina_fast.models.structure_net import StructureSegmenter, load_structure_net

    return StructureSegmenter(load_structure_net(), batch_size=batch_size)


def hs_fid(real: Union[ImagesLike, Iterable[torch.Tensor]], synthetic: Union[ImagesLike, Iterable[torch.Tensor]],
           extractor: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, batch_size: int = 32,
           device: Union[str, torch.device, None] = None) -> float:
    """Hyperspectral FID: Fréchet distance between extractor features of real and synthetic images.

    real, synthetic: (N, C, H, W) tensors (reflectance, C = 16 for the diffusion model) or iterables
    of such batches. extractor: any callable / ``nn.Module`` mapping (B, C, H, W) → (B, F); ``None``
    means :func:`default_extractor` (the shipped structure network's encoder, 16 bands).
    Returns FD as a float. For intervals use :func:`extract_features` once and
    :func:`bootstrap_ci` with :func:`frechet_distance_from_features`.
    """
    if extractor is None:
        extractor = default_extractor()
    f1 = extract_features(real, extractor, batch_size, device)
    f2 = extract_features(synthetic, extractor, batch_size, device)
    return frechet_distance_from_features(f1, f2)


def _poly_kernel(a: np.ndarray, b: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (gamma * (a @ b.T) + coef0) ** degree


def kid(f1: ArrayLike, f2: ArrayLike, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        degree: int = 3, gamma: Optional[float] = None, coef0: float = 1.0) -> dict:
    """Kernel inception distance between feature sets f1 (N1, F) and f2 (N2, F).

    Each of ``subsets`` rounds draws m = min(subset_size, N1, N2) rows of each set without replacement
    (NumPy ``default_rng(seed)``) and computes the unbiased MMD² above with
    k(x, y) = (γ xᵀy + coef0)^degree, γ = 1/F by default.
    Returns {"mean", "std" (population std over subsets), "subsets", "subset_size"}.
    """
    a, b = as_features(f1, "f1"), as_features(f2, "f2")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    if m < subset_size:
        warn(f"KID subset size reduced from {subset_size} to {m} (the smaller set's size)")
    g = 1.0 / a.shape[1] if gamma is None else gamma
    rng = np.random.default_rng(seed)
    scores = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        kxx = _poly_kernel(x, x, degree, g, coef0)
        kyy = _poly_kernel(y, y, degree, g, coef0)
        kxy = _poly_kernel(x, y, degree, g, coef0)
        off = m * (m - 1)
        scores[i] = ((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off
                     - 2.0 * kxy.sum() / (m * m))
    return {"mean": float(scores.mean()), "std": float(scores.std()), "subsets": subsets, "subset_size": m}
