"""Attention for the diffusion U-Net: linear attention at every level, softmax attention in the middle.

Each module projects with 1x1 convolutions and calls a pure function of (q, k, v) held in
``self.attention_fn``; the engine may replace that attribute (or the whole module) with a fused kernel
of the same signature, and kernels are tested against the ``*_ref`` functions here.

Shapes: q, k, v are (B, heads, N, d) with N = H*W tokens and d the head dim; outputs (B, heads, N, d).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["linear_attention_ref", "softmax_attention_ref", "LinearAttention", "Attention",
           "ChannelLayerNorm", "PreNormResidual"]

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def linear_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Efficient (linear) attention (Shen et al. 2021), as in the source's SpatialLinearAttention.

        q' = softmax_d(q) * d^-1/2      (softmax over the head dim, per token)
        k' = softmax_N(k)               (softmax over tokens, per feature)
        out = q' (k'^T v)               context (B, heads, d, d): O(N d^2) instead of O(N^2 d)

    q, k, v: (B, heads, N, d) raw projections -> (B, heads, N, d).
    """
    d = q.shape[-1]
    q = q.softmax(dim=-1) * d ** -0.5
    k = k.softmax(dim=-2)
    context = k.transpose(-2, -1) @ v
    return q @ context


def softmax_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention: softmax(q k^T / sqrt(d)) v.

    q, k, v: (B, heads, N, d) -> (B, heads, N, d). Materialises (B, heads, N, N); fine for the
    U-Net's middle (N = latent side / 4, squared).
    """
    d = q.shape[-1]
    scores = (q * d ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v


class _HeadAttention(nn.Module):
    """x (B, C, H, W) -> to_qkv (1x1, no bias) -> attention_fn per head -> to_out (1x1) -> (B, C, H, W)."""

    def __init__(self, dim: int, heads: int, head_dim: int, attention_fn: AttentionFn) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        hidden = heads * head_dim
        self.to_qkv = nn.Conv2d(dim, 3 * hidden, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)
        self.attention_fn: AttentionFn = attention_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.to_qkv(x).reshape(b, 3, self.heads, self.head_dim, h * w).transpose(-2, -1)
        out = self.attention_fn(qkv[:, 0], qkv[:, 1], qkv[:, 2])          # (B, heads, N, d)
        out = out.transpose(-2, -1).reshape(b, self.heads * self.head_dim, h, w)
        return self.to_out(out)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, fn={getattr(self.attention_fn, '__name__', '?')}"


class LinearAttention(_HeadAttention):
    """Linear attention over the H*W tokens of x (B, C, H, W) -> (B, C, H, W); see linear_attention_ref."""

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 32) -> None:
        super().__init__(dim, heads, head_dim, linear_attention_ref)


class Attention(_HeadAttention):
    """Full softmax attention over the H*W tokens of x (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 32) -> None:
        super().__init__(dim, heads, head_dim, softmax_attention_ref)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dim of (B, C, H, W): (x - mean_C) / sqrt(var_C + eps) * gamma (no bias),
    the source's PreNorm normalisation."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.gamma


class PreNormResidual(nn.Module):
    """x + fn(norm(x)) with a channel LayerNorm: the source's Residual(PreNorm(dim, attention))."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(self.norm(x))
