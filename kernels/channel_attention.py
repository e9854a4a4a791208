"""Fused channel attention (MAGE-Net's CAB): y = x · σ(W2 · ReLU(W1 · mean_hw(x))).

Reference: ``retina_fast.ops.channel_attention.channel_attention_ref``. Two launches, no (N, C) round trip
through PyTorch ops:

1. ``_pool_kernel``: grid (N, S). Program (n, s) sums x[n, :, rows of split s] over its share of the
   H·W positions in fp32 and writes a partial sum (N, S, C) — deterministic (no atomics), and S splits
   keep the GPU busy when N is 1 and H·W is large.
2. ``_excite_scale_kernel``: grid (N, ⌈H·W / BLOCK_HW⌉). Every program reduces the S partials of its
   image to the mean (C,), evaluates the tiny MLP (C → C/r → C, ReLU, sigmoid) in registers (2·C·C/r
   MACs, recomputed per program: cheaper than a third launch) and scales its (BLOCK_HW, C) tile of x.

Layouts: x is addressed through its strides, so NCHW-contiguous and channels-last (NHWC) tensors both
work without a copy (other strided inputs are made contiguous first). Channels-last tiles are
contiguous along C. Accumulation in fp32; the output has x's dtype and memory format.
Bytes: 2 reads + 1 write of x (eager PyTorch: mean read, then a broadcast multiply read + write, plus
the small ops as separate launches).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["channel_attention"]


@triton.jit
def _pool_kernel(x_ptr, part_ptr, C, HW, stride_n, stride_c, stride_hw, chunk, S,
                 BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    s = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    base = x_ptr + n.to(tl.int64) * stride_n
    acc = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
    start = s * chunk
    for off in range(0, chunk, BLOCK_HW):
        rows = start + off + tl.arange(0, BLOCK_HW)
        m = (rows[:, None] < HW) & (rows[:, None] < start + chunk) & cmask[None, :]
        ptrs = base + rows[:, None].to(tl.int64) * stride_hw + cols[None, :] * stride_c
        acc += tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
    tl.store(part_ptr + (n * S + s) * C + cols, tl.sum(acc, 0), mask=cmask)


@triton.jit
def _excite_scale_kernel(x_ptr, y_ptr, part_ptr, w1_ptr, w2_ptr, C, R, HW, S,
                         stride_n, stride_c, stride_hw, inv_hw,
                         BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_S: tl.constexpr):
    n = tl.program_id(0)
    t = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.zeros((BLOCK_C,), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        srow = s0 + tl.arange(0, BLOCK_S)
        pm = (srow[:, None] < S) & cmask[None, :]
        part = tl.load(part_ptr + (n * S + srow[:, None]) * C + cols[None, :], mask=pm, other=0.0)
        mean += tl.sum(part, 0)
    mean = mean * inv_hw
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    w1 = tl.load(w1_ptr + rr[:, None] * C + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    hidden = tl.maximum(tl.sum(w1.to(tl.float32) * mean[None, :], 1), 0.0)          # (BLOCK_R,)
    w2 = tl.load(w2_ptr + cols[:, None] * R + rr[None, :], mask=cmask[:, None] & rmask[None, :], other=0.0)
    gate = tl.sigmoid(tl.sum(w2.to(tl.float32) * hidden[None, :], 1))                 # (BLOCK_C,)
    rows = t * BLOCK_HW + tl.arange(0, BLOCK_HW)
    m = (rows[:, None] < HW) & cmask[None, :]
    off = n.to(tl.int64) * stride_n + rows[:, None].to(tl.int64) * stride_hw + cols[None, :] * stride_c
    v = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + off, (v * gate[None, :]).to(y_ptr.dtype.element_ty), mask=m)


def channel_attention(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *, block_hw: int = 64,
                      max_splits: int = 256) -> torch.Tensor:
    """x (N, C, H, W) NCHW or channels-last; w1 (C/r, C) or (C/r, C, 1, 1); w2 (C, C/r) or (C, C/r, 1, 1).
    Returns x · σ(w2 · ReLU(w1 · mean_hw(x))) with x's shape, dtype and memory format."""
    if x.dim() != 4:
        raise ValueError(f"channel_attention expects (N, C, H, W), got {tuple(x.shape)}")
    n, c, h, w = x.shape
    w1 = w1.reshape(w1.shape[0], -1).contiguous()
    w2 = w2.reshape(w2.shape[0], -1).contiguous()
    r = w1.shape[0]
    if w1.shape[1] != c or tuple(w2.shape) != (c, r):
        raise ValueError(f"weights {tuple(w1.shape)} / {tuple(w2.shape)} do not match {c} channels")
    if not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous()
    stride_hw = x.stride(3)  # 1 (NCHW) or C (channels-last): the flattened h·W + w index has one stride
    y = torch.empty_like(x)  # same strides as x (dense input), so one offset addresses both
    hw = h * w
    block_c = max(2, triton.next_power_of_2(c))
    block_r = max(2, triton.next_power_of_2(r))
    splits = max(1, min(max_splits, triton.cdiv(hw, 4 * block_hw)))
    chunk = triton.cdiv(hw, splits)
    splits = triton.cdiv(hw, chunk)
    part = torch.empty((n, splits, c), device=x.device, dtype=torch.float32)
    _pool_kernel[(n, splits)](x, part, c, hw, x.stride(0), x.stride(1), stride_hw, chunk, splits,
                              BLOCK_HW=block_hw, BLOCK_C=block_c)
    _excite_scale_kernel[(n, triton.cdiv(hw, block_hw))](
        x, y, part, w1, w2, c, r, hw, splits, x.stride(0), x.stride(1), stride_hw, 1.0 / hw,
        BLOCK_HW=block_hw, BLOCK_C=block_c, BLOCK_R=block_r, BLOCK_S=32)
    return y
