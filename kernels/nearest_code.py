"""Nearest-code lookup in Triton: score tiles by ``tl.dot`` with a running argmin over code tiles.

One program owns BLOCK_N rows of x and walks the codebook in BLOCK_K tiles, keeping the best score and
index per row in registers: the (N, K) distance matrix is never formed. Score = ||e||^2 - 2 x.e (the
row's ||x||^2 is added at the end). The dot runs in IEEE fp32 (no TF32) so indices match the fp32
reference. FLOPs 2·N·K·D; bytes 4·(N·D + ceil(N/BLOCK_N)·K·D) read, 12·N written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _nearest_code_kernel(x_ptr, e_ptr, sq_ptr, idx_ptr, dist_ptr, N, K, D,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * D + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    arg = tl.zeros((BLOCK_N,), tl.int64)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < K
        e = tl.load(e_ptr + codes[:, None].to(tl.int64) * D + dims[None, :],
                    mask=code_ok[:, None] & (dims[None, :] < D), other=0.0)
        sq = tl.load(sq_ptr + codes, mask=code_ok, other=float("inf"))
        score = sq[None, :] - 2.0 * tl.dot(x, tl.trans(e), input_precision="ieee")
        tile_best, tile_arg = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best < best  # strict: earlier tiles win ties, as torch.argmin
        best = tl.where(better, tile_best, best)
        arg = tl.where(better, tile_arg.to(tl.int64) + k0, arg)
    xx = tl.sum(x * x, axis=1)
    tl.store(idx_ptr + rows, arg, mask=row_ok)
    tl.store(dist_ptr + rows, tl.maximum(best + xx, 0.0), mask=row_ok)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, block_n: int = 64, block_k: int = 64
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D) float32 contiguous, codebook (K, D) float32 -> idx (N,) int64, squared dist (N,) float32."""
    if x.dtype != torch.float32 or codebook.dtype != torch.float32:
        raise TypeError("nearest_code (triton) expects float32 inputs")
    n, d = x.shape
    k = codebook.shape[0]
    x = x.contiguous()
    codebook = codebook.contiguous()
    sq = (codebook * codebook).sum(1).contiguous()
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return idx, dist
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs inner dims >= 16
    grid = (triton.cdiv(n, block_n),)
    _nearest_code_kernel[grid](x, codebook, sq, idx, dist, n, k, d,
                               BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d)
    return idx, dist
