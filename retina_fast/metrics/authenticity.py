r"""Memorisation check: are synthetic images copies of training images?

For every synthetic image s, in pixel space (flattened, L2) and optionally in a feature space:

    d1(s) = min_t ‖s − t‖,  d2(s) = second smallest distance over training images t,
    ratio(s) = d1 / d2  (0 when d2 = 0, i.e. s equals duplicated training images).

Rules (the ratio test of Yoon et al., "Diffusion probabilistic models generalize when they fail to
memorize", ICML 2023 workshop; the percentile rule is the distance-to-closest-record check of synthetic-data
privacy evaluations):
- ratio test: flag s when ratio(s) < ``ratio`` (1/3): s is far closer to one training image than to
  any other, the signature of a copy;
- percentile rule (needs ``val``): flag s when d1(s) < the ``percentile``-th (5th) percentile of the
  validation-to-train nearest distances, i.e. closer to the training set than held-out real images
  usually are.

By construction about ``percentile`` % of genuinely novel images (distributed like the validation
set) fall below that threshold, so percentile flags are candidates to inspect, not proof of copying.

Distances are computed in chunks, d² = ‖s‖² + ‖t‖² − 2 sᵀt in float64 with a running top-2, so
memory stays within about ``memory_budget_mb`` whatever the set sizes; the two nearest distances
are then recomputed directly as ‖s − t‖ for accuracy (an exact copy gives exactly 0).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch

from retina_fast.metrics._common import extract_features

__all__ = ["nn_authenticity", "nearest_two"]

ArrayLike = Union[torch.Tensor, np.ndarray]


def nearest_two(queries: ArrayLike, refs: ArrayLike,
                memory_budget_mb: float = 256.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest and second-nearest reference of each query (rows flattened, L2 distance).

    queries: (Q, ...), refs: (R, ...) with R ≥ 2 and the same per-row size D.
    Returns (d1 (Q,), d2 (Q,) float64, i1 (Q,), i2 (Q,) int64 indices into refs).
    """
    q, r = torch.as_tensor(queries), torch.as_tensor(refs)
    if r.shape[0] < 2:
        raise ValueError(f"need at least 2 reference (training) samples, got {r.shape[0]}")
    if q[0].numel() != r[0].numel():
        raise ValueError(f"query and reference rows differ in size: {tuple(q.shape[1:])} vs {tuple(r.shape[1:])}")
    d = r[0].numel()
    budget = memory_budget_mb * 2 ** 20
    chunk = max(1, int(min(budget // (2 * 8 * d), (budget / 48) ** 0.5)))
    n_q = q.shape[0]
    best_d = torch.full((n_q, 2), float("inf"), dtype=torch.float64)
    best_i = torch.zeros((n_q, 2), dtype=torch.int64)
    for qs in range(0, n_q, chunk):
        qc = q[qs:qs + chunk].reshape(-1, d).double()
        qn = (qc * qc).sum(1, keepdim=True)
        bd, bi = best_d[qs:qs + chunk], best_i[qs:qs + chunk]
        for rs in range(0, r.shape[0], chunk):
            rc = r[rs:rs + chunk].reshape(-1, d).double().to(qc.device)
            d2 = (qn + (rc * rc).sum(1) - 2.0 * qc @ rc.T).clamp_min(0.0).cpu()
            idx = torch.arange(rs, rs + rc.shape[0]).expand_as(d2)
            cand_d = torch.cat([bd, d2], 1)
            cand_i = torch.cat([bi, idx], 1)
            top, pos = cand_d.topk(2, dim=1, largest=False)
            bd, bi = top, cand_i.gather(1, pos)
        best_d[qs:qs + chunk], best_i[qs:qs + chunk] = bd, bi
    exact = torch.empty_like(best_d)
    for k in range(2):
        for qs in range(0, n_q, chunk):
            qc = q[qs:qs + chunk].reshape(-1, d).double()
            rc = r[best_i[qs:qs + chunk, k].to(r.device)].reshape(-1, d).double().to(qc.device)
            exact[qs:qs + chunk, k] = (qc - rc).norm(dim=1).cpu()
    swap = exact[:, 0] > exact[:, 1]
    exact[swap] = exact[swap].flip(1)
    best_i[swap] = best_i[swap].flip(1)
    return exact[:, 0], exact[:, 1], best_i[:, 0], best_i[:, 1]


def _space_report(train: torch.Tensor, synthetic: torch.Tensor, val: Optional[torch.Tensor], ratio: float,
                  percentile: float, memory_budget_mb: float) -> dict:
    d1, d2, i1, _ = nearest_two(synthetic, train, memory_budget_mb)
    r = torch.where(d2 > 0, d1 / d2.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(d1))
    ratio_flagged = torch.nonzero(r < ratio).flatten().tolist()
    threshold, pct_flagged, val_d1 = None, [], None
    if val is not None:
        val_d1 = nearest_two(val, train, memory_budget_mb)[0]
        threshold = float(np.percentile(val_d1.numpy(), percentile))
        pct_flagged = torch.nonzero(d1 < threshold).flatten().tolist()
    return {"nearest_index": i1, "nearest_distance": d1, "second_distance": d2, "ratio": r,
            "ratio_flagged": ratio_flagged, "threshold": threshold, "percentile_flagged": pct_flagged,
            "flagged": sorted(set(ratio_flagged) | set(pct_flagged)), "val_nearest_distance": val_d1}


def nn_authenticity(train: ArrayLike, synthetic: ArrayLike, val: Optional[ArrayLike] = None,
                    features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, ratio: float = 1.0 / 3.0,
                    percentile: float = 5.0, batch_size: int = 32, memory_budget_mb: float = 256.0) -> dict:
    """Nearest-neighbour memorisation check of synthetic images against the training set.

    train: (T, C, H, W) with T ≥ 2, synthetic: (M, C, H, W), val: optional (V, C, H, W) held-out real
    images; features: optional callable / ``nn.Module`` (B, C, H, W) → (B, F) for the feature space.
    Returns {"pixel": report, "feature": report (only with ``features``), "flagged": sorted union of
    every space's flags, "ratio": ratio, "percentile": percentile}; each report holds
    "nearest_index" (M,), "nearest_distance" (M,), "second_distance" (M,), "ratio" (M,) tensors,
    "ratio_flagged", "percentile_flagged", "flagged" (lists of synthetic indices), "threshold"
    (float or None) and "val_nearest_distance" ((V,) or None).
    """
    train_t, syn_t = torch.as_tensor(train), torch.as_tensor(synthetic)
    val_t = None if val is None else torch.as_tensor(val)
    for name, t in (("synthetic", syn_t), ("val", val_t)):
        if t is not None and t.shape[1:] != train_t.shape[1:]:
            raise ValueError(f"{name} images have shape {tuple(t.shape[1:])}, train {tuple(train_t.shape[1:])}")
    if not 0.0 < percentile < 100.0:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    out = {"pixel": _space_report(train_t, syn_t, val_t, ratio, percentile, memory_budget_mb)}
    if features is not None:
        def feats(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if x is None else extract_features(x, features, batch_size)

        out["feature"] = _space_report(feats(train_t), feats(syn_t), feats(val_t), ratio, percentile,
                                       memory_budget_mb)
    out["flagged"] = sorted(set().union(*(out[k]["flagged"] for k in ("pixel", "feature") if k in out)))
    out["ratio"], out["percentile"] = ratio, percentile
    return out
