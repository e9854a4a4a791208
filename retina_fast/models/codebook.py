"""Vector-quantisation codebook with EMA updates, dead-code restart and per-epoch K-Means initialisation.

Forward, for continuous encoder outputs z (B, D, h, w) with codebook E (K, D):

    a      = argmin_j ||z_p - e_j||^2 per position p     (retina_fast.ops.nearest_code, no gradient)
    zq     = z + sg(e_a - z)                              straight-through: dzq/dz = I
    commit = beta * mean((z - sg(e_a))^2),  beta = 0.25
    perplexity = exp(-sum_j p_j log p_j), p_j = share of positions using code j in this batch

Training mode also updates the codebook (no gradient reaches it):

    N_j <- gamma N_j + (1 - gamma) n_j          n_j = #positions assigned to j     (gamma = 0.99)
    S_j <- gamma S_j + (1 - gamma) sum z_p      over positions assigned to j
    e_j  = S_j / w_j,   w_j = (N_j + eps) / (sum N + K eps) * sum N                 (Laplace smoothing)
    dead codes (N_j < threshold) <- random rows of the batch, and N_j <- threshold, S_j <- threshold * e_j
    so that the next EMA step keeps the restarted code (the source kept the stale N_j, S_j and the
    next step pulled the code back).

``kmeans_init(z, epoch=...)`` re-fits the codebook by K-Means (retina_fast.models.kmeans) once per
epoch, warm-started from the current codebook (from K random samples the very first time), and resets
(N, S) to the new clusters. The epoch is stored in the ``kmeans_epoch`` buffer, part of the state
dict, so a resumed run does not re-initialise. Under torch.distributed, EMA
statistics are summed over ranks, and restart rows and K-Means samples are gathered from all ranks and
chosen / clustered on rank 0 then broadcast, so every rank holds the same codebook.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from retina_fast.models.kmeans import kmeans
from retina_fast.ops import nearest_code

__all__ = ["Codebook", "QuantizeOutput", "all_gather_rows"]


class QuantizeOutput(NamedTuple):
    """zq_st (B, D, h, w) straight-through codes; indices (B, h, w) int64; commit_loss, perplexity: scalars."""

    zq_st: torch.Tensor
    indices: torch.Tensor
    commit_loss: torch.Tensor
    perplexity: torch.Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate (N_r, D) tensors of every rank in rank order (N_r may differ); identity when not
    distributed."""
    if not _distributed():
        return x
    x = x.contiguous()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes_i = [int(s) for s in sizes]
    top = max(sizes_i)
    padded = torch.zeros((top,) + tuple(x.shape[1:]), device=x.device, dtype=x.dtype)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes_i]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_i)], dim=0)


def _is_rank0() -> bool:
    return not _distributed() or dist.get_rank() == 0


class Codebook(nn.Module):
    """K codes of dimension D. Buffers (all saved): ``embedding`` (K, D), ``ema_count`` (K,),
    ``ema_sum`` (K, D), ``kmeans_epoch`` (int64 scalar, -1 before the first K-Means)."""

    def __init__(self, num_codes: int, dim: int, *, commitment: float = 0.25, decay: float = 0.99,
                 eps: float = 1e-5, restart_threshold: float = 1.0, kmeans_iters: int = 20,
                 kmeans_tol: float = 1e-4, samples_per_code: int = 256) -> None:
        super().__init__()
        self.num_codes, self.dim = num_codes, dim
        self.commitment, self.decay, self.eps = commitment, decay, eps
        self.restart_threshold = restart_threshold
        self.kmeans_iters, self.kmeans_tol, self.samples_per_code = kmeans_iters, kmeans_tol, samples_per_code
        embedding = torch.randn(num_codes, dim)
        self.register_buffer("embedding", embedding)
        # Pseudo-count 1 per initial code keeps e_j = S_j / N_j consistent from the first step.
        self.register_buffer("ema_count", torch.ones(num_codes))
        self.register_buffer("ema_sum", embedding.clone())
        self.register_buffer("kmeans_epoch", torch.tensor(-1, dtype=torch.int64))
        self.restarted_last_step = 0

    @property
    def initialized(self) -> bool:
        """True once K-Means has fitted the codebook to data (the flag lives in the state dict)."""
        return int(self.kmeans_epoch) >= 0

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, decay={self.decay}, commitment={self.commitment}"

    @staticmethod
    def flatten(z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B*h*w, D); (N, D) passes through."""
        if z.dim() == 2:
            return z
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w) int64 -> codes (B, D, h, w)."""
        return F.embedding(indices, self.embedding).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizeOutput:
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"Codebook expects (B, {self.dim}, h, w), got {tuple(z.shape)}")
        b, d, h, w = z.shape
        flat = self.flatten(z)
        idx, _ = nearest_code(flat.detach().float(), self.embedding.float())
        codes = F.embedding(idx, self.embedding).to(z.dtype).view(b, h, w, d).permute(0, 3, 1, 2)
        commit = self.commitment * F.mse_loss(z, codes.detach())
        zq = z + (codes - z).detach()
        counts = torch.bincount(idx, minlength=self.num_codes)
        p = counts.float() / max(idx.numel(), 1)
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        if self.training:
            with torch.no_grad():
                self._ema_update(flat.detach().float(), idx, counts)
                self.restarted_last_step = self._restart_dead(flat.detach().float())
        return QuantizeOutput(zq, idx.view(b, h, w), commit, perplexity)

    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        counts = counts.to(self.ema_count.dtype)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, flat.to(self.ema_sum.dtype))
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        weights = (self.ema_count + self.eps) / (total + self.num_codes * self.eps) * total
        self.embedding.copy_(self.ema_sum / weights.unsqueeze(1))

    def _restart_dead(self, flat: torch.Tensor) -> int:
        """Replace codes whose EMA count fell below the threshold by random batch rows; returns how many."""
        dead = (self.ema_count < self.restart_threshold).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        rows = all_gather_rows(flat)
        n = rows.shape[0]
        if n == 0:
            return 0
        if _is_rank0():
            if dead.numel() <= n:
                pick = torch.randperm(n)[: dead.numel()]
            else:
                pick = torch.randint(n, (dead.numel(),))
            new = rows[pick.to(rows.device)]
        else:
            new = torch.empty(dead.numel(), self.dim, device=rows.device, dtype=rows.dtype)
        if _distributed():
            dist.broadcast(new, 0)
        self.reset_codes(dead, new, self.restart_threshold)
        return int(dead.numel())

    @torch.no_grad()
    def reset_codes(self, which: torch.Tensor, values: torch.Tensor, count: float | torch.Tensor) -> None:
        """Set codes ``which`` to ``values`` (M, D) with fresh EMA statistics N = count, S = count * value."""
        count_t = torch.as_tensor(count, dtype=self.ema_count.dtype, device=self.ema_count.device)
        count_t = count_t.expand(which.shape[0]) if count_t.dim() == 0 else count_t
        values = values.to(self.embedding.dtype)
        self.embedding[which] = values
        self.ema_count[which] = count_t
        self.ema_sum[which] = values * count_t.unsqueeze(1)

    def needs_kmeans(self, epoch: int) -> bool:
        return int(self.kmeans_epoch) < epoch

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, *, epoch: int, rows_per_step: float | None = None,
                    generator: torch.Generator | None = None) -> dict[str, Any] | None:
        """K-Means on encoder outputs at the start of ``epoch`` (skipped, returning None, if this
        epoch's K-Means already ran, e.g. after resuming). Warm-started from the current codebook, or
        from K distinct random samples when the codebook was never fitted (``initialized`` False).

        z: (B, D, h, w) or (N, D) continuous encoder outputs of this rank (every rank calls this; the
        samples are gathered). At most ``K * samples_per_code`` rows are used; ``generator`` draws that
        subset and the first-ever initial centroids. Needs at least K rows in total.

        The EMA statistics are reset to the clusters, scaled so that their total mass is
        ``rows_per_step`` (quantised positions per training step, summed over ranks: batch * h * w);
        None keeps the current EMA mass (K before the first step). Codes whose share of that mass is
        below ``restart_threshold`` are restarted on the next training step. Returns the K-Means info
        (see ``kmeans``) plus ``samples`` and ``warm_start``.
        """
        if not self.needs_kmeans(epoch):
            return None
        rows = all_gather_rows(self.flatten(z.detach()).float().contiguous())
        emb = self.embedding
        info: dict[str, Any] = {}
        if _is_rank0():
            limit = self.num_codes * self.samples_per_code
            if rows.shape[0] > limit:
                pick = torch.randperm(rows.shape[0], generator=generator)[:limit].to(rows.device)
                rows = rows[pick]
            mass = float(rows_per_step) if rows_per_step is not None else float(self.ema_count.sum())
            # Warm start keeps code indices meaningful; before the first fit they mean nothing yet, so
            # the first K-Means starts from K distinct random samples instead of the random codebook.
            init = emb.float() if self.initialized else self.num_codes
            centroids, assign, info = kmeans(rows, init, self.kmeans_iters, self.kmeans_tol, generator)
            info["warm_start"] = self.initialized
            counts = torch.bincount(assign, minlength=self.num_codes).to(self.ema_count.dtype)
            info["samples"] = int(rows.shape[0])
            count = counts * (mass / rows.shape[0])
        else:
            centroids = torch.empty_like(emb, dtype=torch.float32)
            count = torch.empty_like(self.ema_count)
        if _distributed():
            dist.broadcast(centroids, 0)
            dist.broadcast(count, 0)
            info.setdefault("source", "rank 0")
        self.reset_codes(torch.arange(self.num_codes, device=emb.device), centroids.to(emb.device), count)
        self.kmeans_epoch.fill_(epoch)
        return info
