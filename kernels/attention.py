"""Attention kernels for the diffusion U-Net (q, k, v: (B, heads, N, d), contiguous).

* ``softmax_attention``: flash-style — one program per (batch·head, query block), running max and sum
  over key blocks, the (N, N) score matrix never leaves registers. FLOPs 4·N²·d per head.
* ``linear_attention``: the efficient attention of retina_fast.ops.attention.linear_attention_ref
  fused into one program per (batch·head): column max of k, exp-sums and the (d, d) context k'^T v in
  one sweep over tokens, then per-token softmax of q and q'·context. FLOPs ~4·N·d² per head.
Accumulation in fp32 whatever the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _flash_kernel(q_ptr, k_ptr, v_ptr, o_ptr, N, D, sm_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    base = bh.to(tl.int64) * N * D
    qmask = (rows[:, None] < N) & (dims[None, :] < D)
    q = tl.load(q_ptr + base + rows[:, None] * D + dims[None, :], mask=qmask, other=0.0).to(tl.float32)
    q = q * sm_scale
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kvmask = (cols[:, None] < N) & (dims[None, :] < D)
        k = tl.load(k_ptr + base + cols[:, None] * D + dims[None, :], mask=kvmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + cols[:, None] * D + dims[None, :], mask=kvmask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        s = tl.where(cols[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + base + rows[:, None] * D + dims[None, :], out.to(o_ptr.dtype.element_ty), mask=qmask)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int = 64,
                      block_n: int = 64) -> torch.Tensor:
    b, h, n, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(d))
    _flash_kernel[(b * h, triton.cdiv(n, block_m))](q, k, v, o, n, d, d ** -0.5,
                                                    BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    return o


@triton.jit
def _linear_attn_kernel(q_ptr, k_ptr, v_ptr, o_ptr, N, D, q_scale,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    base = bh.to(tl.int64) * N * D
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < D
    # pass 1: per-feature max of k over tokens (softmax over N, numerically safe)
    kmax = tl.full((BLOCK_D,), float("-inf"), tl.float32)
    for start in range(0, N, BLOCK_N):
        toks = start + tl.arange(0, BLOCK_N)
        m = (toks[:, None] < N) & dmask[None, :]
        k = tl.load(k_ptr + base + toks[:, None] * D + dims[None, :], mask=m, other=float("-inf")).to(tl.float32)
        kmax = tl.maximum(kmax, tl.max(k, 0))
    kmax = tl.where(dmask, kmax, 0.0)
    # pass 2: exp-sums and context = exp(k - max)^T v, normalised by the sums
    ksum = tl.zeros((BLOCK_D,), tl.float32)
    ctx = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
    for start in range(0, N, BLOCK_N):
        toks = start + tl.arange(0, BLOCK_N)
        m = (toks[:, None] < N) & dmask[None, :]
        k = tl.load(k_ptr + base + toks[:, None] * D + dims[None, :], mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + toks[:, None] * D + dims[None, :], mask=m, other=0.0).to(tl.float32)
        e = tl.where(m, tl.exp(k - kmax[None, :]), 0.0)
        ksum += tl.sum(e, 0)
        ctx += tl.dot(tl.trans(e), v, input_precision="ieee")
    ctx = ctx / tl.where(dmask, ksum, 1.0)[:, None]
    # pass 3: per-token softmax of q over the head dim, scaled, times the context
    for start in range(0, N, BLOCK_N):
        toks = start + tl.arange(0, BLOCK_N)
        m = (toks[:, None] < N) & dmask[None, :]
        q = tl.load(q_ptr + base + toks[:, None] * D + dims[None, :], mask=m, other=float("-inf")).to(tl.float32)
        q = q - tl.max(q, 1)[:, None]
        eq = tl.where(m, tl.exp(q), 0.0)
        qs = eq / tl.maximum(tl.sum(eq, 1), 1e-30)[:, None] * q_scale
        out = tl.dot(qs, ctx, input_precision="ieee")
        tl.store(o_ptr + base + toks[:, None] * D + dims[None, :], out.to(o_ptr.dtype.element_ty), mask=m)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int = 64) -> torch.Tensor:
    b, h, n, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(d))
    _linear_attn_kernel[(b * h,)](q, k, v, o, n, d, d ** -0.5, BLOCK_N=block_n, BLOCK_D=block_d)
    return o
