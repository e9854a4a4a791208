"""K-Means (Lloyd) for codebook initialisation; the assignment step is the VQ nearest-code op.

    repeat up to ``iters`` times:
        a_i   = argmin_j ||x_i - c_j||^2                      (retina_fast.ops.nearest_code)
        J     = mean_i ||x_i - c_{a_i}||^2                    (inertia of the current centroids)
        c_j   = mean{x_i : a_i = j}                           for non-empty clusters
        c_j   = x_{i*} with the largest ||x_i - c_{a_i}||^2   for empty clusters (distinct points)
        stop when no cluster was empty and (J_prev - J) <= tol * J_prev

Warm start: ``init`` is the current codebook, so code indices keep their meaning between epochs.
Deterministic given (x, init); ``generator`` only draws the random initial centroids when ``init`` is
an int (plain K-Means from K distinct random rows).
"""
from __future__ import annotations

from typing import Any

import torch

from retina_fast.ops import nearest_code

__all__ = ["kmeans", "quantisation_stats"]


def quantisation_stats(x: torch.Tensor, codebook: torch.Tensor) -> dict[str, float]:
    """Mean squared quantisation error, perplexity exp(H(p)) of code usage, and used-code count.

    x: (N, D), codebook: (K, D). Perplexity ranges from 1 (one code) to K (uniform usage)."""
    idx, dist = nearest_code(x.detach().float(), codebook.detach().float())
    counts = torch.bincount(idx, minlength=codebook.shape[0]).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"mse": float(dist.double().mean()), "perplexity": float(entropy.exp()),
            "used": int((counts > 0).sum())}


def kmeans(x: torch.Tensor, init: torch.Tensor | int, iters: int = 20, tol: float = 1e-4,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Lloyd's K-Means with warm start and empty-cluster reseeding.

    x: (N, D) samples; init: (K, D) initial centroids or K (random distinct rows of x, via ``generator``).
    Returns centroids (K, D) float32, assignments (N,) int64 (nearest final centroid) and info:
    ``iterations``, ``inertia`` (final mean squared distance), ``initial_inertia``, ``history``
    (inertia per iteration), ``reseeded`` (empty clusters reseeded in total), ``converged``.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans expects x of shape (N, D), got {tuple(x.shape)}")
    x = x.detach().float().contiguous()
    n = x.shape[0]
    if isinstance(init, int):
        if init > n:
            raise ValueError(f"kmeans: {init} clusters need at least {init} samples, got {n}")
        perm = torch.randperm(n, generator=generator, device="cpu")[:init].to(x.device)
        centroids = x[perm].clone()
    else:
        if init.dim() != 2 or init.shape[1] != x.shape[1]:
            raise ValueError(f"kmeans init {tuple(init.shape)} does not match x {tuple(x.shape)}")
        centroids = init.detach().float().to(x.device).clone()
    k = centroids.shape[0]
    if n < k:
        raise ValueError(f"kmeans: {k} clusters need at least {k} samples, got {n}")

    history: list[float] = []
    reseeded = 0
    converged = False
    it = 0
    for it in range(1, iters + 1):
        idx, dist = nearest_code(x, centroids)
        inertia = float(dist.double().mean())
        history.append(inertia)
        counts = torch.bincount(idx, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, idx, x)
        new = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            far = torch.topk(dist, empty.numel()).indices
            new[empty] = x[far]
            reseeded += empty.numel()
        centroids = new
        if empty.numel() == 0 and len(history) > 1 and history[-2] - inertia <= tol * history[-2]:
            converged = True
            break
    idx, dist = nearest_code(x, centroids)
    info = {"iterations": it, "inertia": float(dist.double().mean()),
            "initial_inertia": history[0] if history else float("nan"), "history": history,
            "reseeded": reseeded, "converged": converged}
    return centroids, idx, info
