"""Philox normals in Triton: one program per (row, block); each row has its own 64-bit key.

Counter words are built explicitly as (offset + j) split into (lo, hi) uint32 and passed to
``tl.philox``; the uint -> float -> normal steps are Triton's own ``uint_to_uniform_float`` and
``pair_uniform_to_normal``. The result is exactly ``tl.randn(key, offset + arange(n))``.
Bytes: 4 per output element written; compute: 10 Philox rounds + log/sqrt/cos per element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def philox_normal(key, ctr_lo, ctr_hi):
    """Normal for 64-bit counters (ctr_lo, ctr_hi) under a 64-bit key, as tl.randn."""
    zero = ctr_lo * 0
    w0, w1, _, _ = tl.philox(key, ctr_lo, ctr_hi, zero, zero)
    u0 = tl.uint_to_uniform_float(w0)
    u1 = tl.uint_to_uniform_float(w1)
    n0, _ = tl.pair_uniform_to_normal(u0, u1)
    return n0


@triton.jit
def _randn_rows_kernel(keys_ptr, out_ptr, n, off_lo, off_hi, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    key = tl.load(keys_ptr + row).to(tl.uint64, bitcast=True)
    j = blk * BLOCK + tl.arange(0, BLOCK)
    lo = off_lo.to(tl.uint32) + j.to(tl.uint32)
    carry = (lo < off_lo.to(tl.uint32)).to(tl.uint32)
    hi = off_hi.to(tl.uint32) + carry
    val = philox_normal(key, lo, hi)
    tl.store(out_ptr + row.to(tl.int64) * n + j, val, mask=j < n)


def randn_rows(keys: torch.Tensor, offset: int, out: torch.Tensor, block: int = 1024) -> None:
    """Fill ``out`` (rows, n) float32 with normal(keys[r], offset + j); keys is int64 holding uint64 bits."""
    if keys.dtype != torch.int64 or keys.dim() != 1:
        raise TypeError("keys must be a 1-D int64 tensor")
    if out.dtype != torch.float32 or out.dim() != 2 or not out.is_contiguous():
        raise TypeError("out must be a contiguous (rows, n) float32 tensor")
    if out.shape[0] != keys.shape[0] or out.device != keys.device:
        raise ValueError("out rows / device must match keys")
    rows, n = out.shape
    grid = (rows, triton.cdiv(n, block))
    off_lo = offset & 0xFFFFFFFF
    off_hi = (offset >> 32) & 0xFFFFFFFF
    # Triton types an int argument by its value (i32 or i64); the kernel truncates both to uint32
    _randn_rows_kernel[grid](keys, out, n, off_lo, off_hi, BLOCK=block)
