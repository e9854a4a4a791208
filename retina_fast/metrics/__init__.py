"""Quality metrics for synthetic hyperspectral retinal images and enhanced fundus photographs.

Images are (N, C, H, W) float tensors in a stated ``data_range`` (default 1.0: reflectance in
[0, 1]); C is 16 for hyperspectral cubes and 3 for RGB. Per-image metrics return (N,) tensors unless a
``reduction`` is asked for. Each function's docstring (and its module's) gives the formula.

- Enhancement: :func:`psnr`, :func:`ssim`, :func:`ms_ssim`.
- Fidelity: :func:`hs_fid` (Fréchet distance of extractor features), :func:`frechet_distance`,
  :func:`frechet_distance_from_features`, :func:`kid`, :func:`bootstrap_ci`;
  :func:`default_extractor` / :func:`default_segmenter` (the shipped 16-band structure network).
- Spectra: :func:`spectral_kl` inside vein / artery / ONH masks.
- Diversity: :func:`ms_ssim_diversity` (|Δ mean pairwise MS-SSIM|, validation vs synthetic).
- Authenticity: :func:`nn_authenticity` (nearest neighbours, ratio test, percentile rule).
- Structure: :func:`vessel_contrast` (local retinal-vessel contrast, with phantom or segmenter masks),
  :func:`vessel_tree_length` (length of connected dark ridges: a vessel tree, without masks),
  :func:`vessel_arcade_length` (the part of that length whose curves reach the optic disc),
  :func:`vessel_branch_length` (the part of it in long unbranched runs, which a dark crackle lacks),
  :func:`relative_noise` (pixel noise relative to the local background, to read beside it).

Cautions are raised as :class:`MetricWarning` (filter them by that class).
"""
from retina_fast.metrics._common import MetricWarning, extract_features
from retina_fast.metrics.authenticity import nearest_two, nn_authenticity
from retina_fast.metrics.bootstrap import bootstrap_ci, bootstrap_indices
from retina_fast.metrics.diversity import ms_ssim_diversity, pairwise_ms_ssim, sample_pairs
from retina_fast.metrics.fid import (default_extractor, default_segmenter, feature_statistics,
                                     frechet_distance, frechet_distance_from_features, hs_fid, kid)
from retina_fast.metrics.inception import BandTriplets, InceptionBandTriplets, default_triplets
from retina_fast.metrics.spectral import kl_divergence_hist, spectral_kl
from retina_fast.metrics.vessel import (relative_noise, vessel_arcade_length, vessel_branch_length, vessel_contrast,
                                        vessel_tree_length)
from retina_fast.metrics.ssim import MS_SSIM_WEIGHTS, gaussian_window, ms_ssim, ms_ssim_scales, psnr, ssim

__all__ = [
    "psnr", "ssim", "ms_ssim", "ms_ssim_scales", "gaussian_window", "MS_SSIM_WEIGHTS",
    "frechet_distance", "frechet_distance_from_features", "feature_statistics", "hs_fid", "kid",
    "default_extractor", "default_segmenter", "extract_features",
    "BandTriplets", "InceptionBandTriplets", "default_triplets",
    "bootstrap_ci", "bootstrap_indices",
    "spectral_kl", "kl_divergence_hist",
    "ms_ssim_diversity", "pairwise_ms_ssim", "sample_pairs",
    "nn_authenticity", "nearest_two", "vessel_contrast", "vessel_tree_length", "vessel_arcade_length",
    "vessel_branch_length", "relative_noise",
    "MetricWarning",
]
