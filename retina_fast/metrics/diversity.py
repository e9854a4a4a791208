r"""Diversity as the gap in mean pairwise MS-SSIM between a validation set and a synthetic set.

Within a set of N images, draw P unordered pairs (i, j), i ≠ j (without replacement when
P ≤ N(N−1)/2, otherwise with replacement and a warning), from ``default_rng(seed)``; the set's score
is the mean MS-SSIM over those pairs (lower = more diverse). Both sets use the same P and seed.

    Δ = mean_val − mean_syn,   reported |Δ|,

with a percentile bootstrap interval for |Δ| from resampling each set's per-pair scores
(:func:`retina_fast.metrics.bootstrap_ci`). The interval reflects the spread of the pair sample; since
|·| folds at 0 it should be read as "how large |Δ| plausibly is", not as a test of Δ = 0.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from retina_fast.metrics._common import ImagesLike, MetricWarning, as_images, warn
from retina_fast.metrics.bootstrap import bootstrap_ci
from retina_fast.metrics.ssim import MS_SSIM_WEIGHTS, _scale_weights, ms_ssim

__all__ = ["ms_ssim_diversity", "sample_pairs", "pairwise_ms_ssim"]

_ENUMERATE_LIMIT = 2_000_000


def sample_pairs(n: int, pairs: int, seed: int = 0) -> np.ndarray:
    """(pairs, 2) int64 array of unordered index pairs (i < j) of a set of n images."""
    if n < 2:
        raise ValueError(f"need at least 2 images to form pairs, got {n}")
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    total = n * (n - 1) // 2
    rng = np.random.default_rng(seed)
    if pairs > total:
        warn(f"{pairs} pairs requested from {n} images ({total} distinct pairs): drawing with replacement")
    if total <= _ENUMERATE_LIMIT:
        i, j = np.triu_indices(n, k=1)
        pick = rng.choice(total, size=pairs, replace=pairs > total)
        return np.stack([i[pick], j[pick]], axis=1).astype(np.int64)
    chosen: dict = {}
    while len(chosen) < pairs:
        a, b = rng.integers(0, n, size=2)
        if a != b:
            chosen.setdefault((min(a, b), max(a, b)), None)
    return np.array(list(chosen), dtype=np.int64)


def pairwise_ms_ssim(images: ImagesLike, pairs: np.ndarray, data_range: float = 1.0, batch_size: int = 16,
                     **ms_ssim_kwargs) -> torch.Tensor:
    """MS-SSIM of images[i] vs images[j] for each row (i, j) of ``pairs``, in batches → (P,) float64."""
    x = as_images(images)
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            p = torch.as_tensor(pairs[start:start + batch_size], device=x.device)
            out.append(ms_ssim(x[p[:, 0]], x[p[:, 1]], data_range, reduction="none",
                               warn_reduced=False, **ms_ssim_kwargs).double().cpu())
    return torch.cat(out)


def ms_ssim_diversity(val: ImagesLike, synthetic: ImagesLike, pairs: int = 1000, seed: int = 0,
                      data_range: float = 1.0, n_boot: int = 1000, alpha: float = 0.05, batch_size: int = 16,
                      weights: Sequence[float] = MS_SSIM_WEIGHTS, **ms_ssim_kwargs) -> dict:
    """|mean MS-SSIM(validation pairs) − mean MS-SSIM(synthetic pairs)| with a bootstrap interval.

    val: (N, C, H, W), synthetic: (M, C, H, W), same C, H, W. Returns {"val_mean", "syn_mean",
    "abs_delta", "ci_low", "ci_high", "alpha", "pairs", "seed", "scales", "val_scores",
    "syn_scores"} where the score lists hold the per-pair MS-SSIM values (for plots).
    """
    val, synthetic = as_images(val, "val"), as_images(synthetic, "synthetic")
    if val.shape[1:] != synthetic.shape[1:]:
        raise ValueError(f"val and synthetic image shapes differ: {tuple(val.shape[1:])} vs "
                         f"{tuple(synthetic.shape[1:])}")
    win = ms_ssim_kwargs.get("win", 11)
    scales = _scale_weights(min(val.shape[-2:]), weights, win, warn_reduced=True).numel()
    v = pairwise_ms_ssim(val, sample_pairs(val.shape[0], pairs, seed), data_range, batch_size,
                         weights=weights, **ms_ssim_kwargs)
    s = pairwise_ms_ssim(synthetic, sample_pairs(synthetic.shape[0], pairs, seed), data_range, batch_size,
                         weights=weights, **ms_ssim_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        ci = bootstrap_ci(lambda a, b: abs(float(a.mean()) - float(b.mean())), v.numpy(), s.numpy(),
                          n_boot=n_boot, seed=seed, alpha=alpha)
    return {"val_mean": float(v.mean()), "syn_mean": float(s.mean()), "abs_delta": ci["value"],
            "ci_low": ci["low"], "ci_high": ci["high"], "alpha": alpha, "pairs": pairs, "seed": seed,
            "scales": scales, "val_scores": v.tolist(), "syn_scores": s.tolist()}
