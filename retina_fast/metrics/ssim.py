r"""PSNR, SSIM and MS-SSIM for (N, C, H, W) images, one value per image.

SSIM (Wang et al. 2004) with a Gaussian window ``w`` (size 11, σ = 1.5, normalised to sum 1),
applied separably and only where it fits inside the image ("valid" filtering, which is what
scikit-image computes when it crops the (win − 1)/2 border):

    μx = w * x,  σx² = w * x² − μx²,  σxy = w * (x y) − μx μy        (population moments)
    l  = (2 μx μy + C1) / (μx² + μy² + C1),    cs = (2 σxy + C2) / (σx² + σy² + C2)
    C1 = (K1 L)²,  C2 = (K2 L)²,  L = data_range,  K = (0.01, 0.03)
    SSIM_c = mean over pixels of l·cs,  CS_c = mean over pixels of cs,  SSIM = mean over channels.

MS-SSIM (Wang, Simoncelli & Bovik 2003) over M scales with weights β_j, 2× average pooling between
scales (odd sides are pooled with a partial last window, i.e. ceil(side / 2)):

    MS-SSIM_c = Π_{j<M} relu(CS_c,j)^β_j · relu(SSIM_c,M)^β_M,   MS-SSIM = mean over channels.

The ``relu`` keeps the fractional powers real (as in pytorch-msssim). Five scales with window 11
need the smaller side > (11 − 1)·2⁴ = 160 px; smaller images use the largest M with side >
10·2^(M−1), the first M weights renormalised to sum 1, and a :class:`MetricWarning` says so.

Images in float64 are computed in float64, everything else in float32.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from retina_fast.metrics._common import ImagesLike, as_images, compute_dtype, reduce, warn

__all__ = ["psnr", "ssim", "ms_ssim", "ms_ssim_scales", "gaussian_window", "MS_SSIM_WEIGHTS"]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def gaussian_window(win: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """1-D Gaussian window (win,), centred, normalised to sum 1: g_i ∝ exp(−(i − win//2)² / 2σ²)."""
    if win < 1 or win % 2 == 0:
        raise ValueError(f"window size must be odd and positive, got {win}")
    coords = torch.arange(win, dtype=torch.float64) - win // 2
    g = torch.exp(-(coords ** 2) / (2.0 * sigma ** 2))
    return (g / g.sum()).to(dtype)


def _pair(x: ImagesLike, y: ImagesLike, win: int) -> Tuple[torch.Tensor, torch.Tensor]:
    x, y = as_images(x, "x"), as_images(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    if min(x.shape[-2:]) < win:
        raise ValueError(f"images of size {tuple(x.shape[-2:])} are smaller than the {win}-px SSIM window")
    return x.to(dtype), y.to(dtype)


def _filter_valid(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable valid filtering of every (H, W) plane of ``t`` (..., C, H, W) → (..., H−win+1, W−win+1)."""
    lead, (c, h, w) = t.shape[:-3], t.shape[-3:]
    planes = t.reshape(-1, c, h, w)
    k = g.numel()
    planes = F.conv2d(planes, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    planes = F.conv2d(planes, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return planes.reshape(*lead, c, h - k + 1, w - k + 1)


def _ssim_cs(x: torch.Tensor, y: torch.Tensor, data_range: float, g: torch.Tensor,
             K: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel SSIM and contrast-structure term, both (N, C)."""
    c1 = (K[0] * data_range) ** 2
    c2 = (K[1] * data_range) ** 2
    mx, my, xx, yy, xy = _filter_valid(torch.stack([x, y, x * x, y * y, x * y]), g).unbind(0)
    sxx, syy, sxy = xx - mx * mx, yy - my * my, xy - mx * my
    cs_map = (2.0 * sxy + c2) / (sxx + syy + c2)
    l_map = (2.0 * mx * my + c1) / (mx * mx + my * my + c1)
    return (l_map * cs_map).mean(dim=(-2, -1)), cs_map.mean(dim=(-2, -1))


def psnr(x: ImagesLike, y: ImagesLike, data_range: float = 1.0, reduction: str = "none") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image: 10·log10(L² / mean((x − y)²)) over C, H, W.

    x, y: (N, C, H, W). Returns (N,) (``reduction="none"``) or a 0-d tensor; identical images give +inf.
    """
    x, y = as_images(x, "x"), as_images(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else compute_dtype(x)
    mse = ((x.to(dtype) - y.to(dtype)) ** 2).mean(dim=(1, 2, 3))
    return reduce(10.0 * torch.log10(data_range ** 2 / mse), reduction)


def ssim(x: ImagesLike, y: ImagesLike, data_range: float = 1.0, win: int = 11, sigma: float = 1.5,
         K: Sequence[float] = (0.01, 0.03), reduction: str = "none") -> torch.Tensor:
    """Structural similarity per image (see the module docstring), averaged over channels.

    x, y: (N, C, H, W) with H, W ≥ win. Returns (N,) or a 0-d tensor. Matches
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=L, channel_axis=0)`` image by image.
    """
    x, y = _pair(x, y, win)
    s, _ = _ssim_cs(x, y, data_range, gaussian_window(win, sigma, x.dtype).to(x.device), K)
    return reduce(s.mean(dim=1), reduction)


def ms_ssim_scales(side: int, n_weights: int = len(MS_SSIM_WEIGHTS), win: int = 11) -> int:
    """Number of MS-SSIM scales usable for a smaller image side: the largest M ≤ n_weights with
    side > (win − 1)·2^(M−1) (so the coarsest scale, ceil(side / 2^(M−1)) px, still holds the window)."""
    if side < win:
        raise ValueError(f"an image side of {side} px is smaller than the {win}-px SSIM window")
    m = 1
    while m < n_weights and side > (win - 1) * 2 ** m:
        m += 1
    return m


def _scale_weights(side: int, weights: Sequence[float], win: int, warn_reduced: bool) -> torch.Tensor:
    m = ms_ssim_scales(side, len(weights), win)
    w = torch.tensor(list(weights)[:m], dtype=torch.float64)
    if m < len(weights):
        w = w / w.sum()
        if warn_reduced:
            warn(f"MS-SSIM on {side}-px images uses {m} of {len(weights)} scales (needs a side > "
                 f"{(win - 1) * 2 ** (len(weights) - 1)} px for all); weights renormalised to "
                 f"{[round(v, 4) for v in w.tolist()]}. Compare only results computed at the same size.",
                 depth=2)
    return w


def ms_ssim(x: ImagesLike, y: ImagesLike, data_range: float = 1.0,
            weights: Sequence[float] = MS_SSIM_WEIGHTS, win: int = 11, sigma: float = 1.5,
            K: Sequence[float] = (0.01, 0.03), reduction: str = "none", *,
            warn_reduced: bool = True) -> torch.Tensor:
    """Multi-scale SSIM per image (see the module docstring), averaged over channels.

    x, y: (N, C, H, W). Returns (N,) or a 0-d tensor. With the full five scales it matches
    ``pytorch_msssim.ms_ssim(..., size_average=False)`` on even-sized images. Images with a smaller
    side ≤ 160 px use fewer scales (warning unless ``warn_reduced=False``).
    """
    x, y = _pair(x, y, win)
    w = _scale_weights(min(x.shape[-2:]), weights, win, warn_reduced).to(x.device, x.dtype)
    g = gaussian_window(win, sigma, x.dtype).to(x.device)
    terms = []
    for j in range(w.numel()):
        s, cs = _ssim_cs(x, y, data_range, g, K)
        if j < w.numel() - 1:
            terms.append(torch.relu(cs))
            x = F.avg_pool2d(x, kernel_size=2, ceil_mode=True)
            y = F.avg_pool2d(y, kernel_size=2, ceil_mode=True)
    terms.append(torch.relu(s))
    per_channel = torch.prod(torch.stack(terms) ** w.view(-1, 1, 1), dim=0)
    return reduce(per_channel.mean(dim=1), reduction)
