"""Attention for the diffusion U-Net: linear attention at every level (softmax at the levels a config names),
softmax attention in the middle.

Each module projects with 1x1 convolutions around the op ``multihead_attention`` (the reference and the
kernels are in :mod:`retina_fast.ops.attention`; a backend's op table may run its own). Shapes: x (B, C, H, W),
N = H W tokens, ``heads`` heads of ``head_dim`` features each.
"""
from __future__ import annotations

import torch
from torch import nn

from retina_fast.models.layers import Conv2d
from retina_fast.ops.attention import multihead_attention_ref
from retina_fast.ops.channel_norm import channel_norm_ref
from retina_fast.ops.table import op

__all__ = ["LinearAttention", "Attention", "ChannelLayerNorm", "PreNormResidual"]


class _HeadAttention(nn.Module):
    """x (B, C, H, W) -> to_qkv (1x1, no bias) -> attention per head -> to_out (1x1) -> (B, C, H, W)."""

    kind = "linear"

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        hidden = heads * head_dim
        self.to_qkv = Conv2d(dim, 3 * hidden, 1, bias=False)
        self.to_out = Conv2d(hidden, dim, 1)

    @op("multihead_attention")
    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv (B, 3 heads head_dim, H, W) -> (B, heads head_dim, H, W)."""
        return multihead_attention_ref(qkv, self.heads, self.head_dim, self.kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out(self.attend(self.to_qkv(x)))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, kind={self.kind}"


class LinearAttention(_HeadAttention):
    """Linear attention over the H*W tokens of x (B, C, H, W) -> (B, C, H, W); see linear_attention_ref."""

    kind = "linear"

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 32) -> None:
        super().__init__(dim, heads, head_dim)


class Attention(_HeadAttention):
    """Full softmax attention over the H*W tokens of x (B, C, H, W) -> (B, C, H, W)."""

    kind = "softmax"

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 32) -> None:
        super().__init__(dim, heads, head_dim)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dim of (B, C, H, W): (x - mean_C) / sqrt(var_C + eps) * gamma (no bias),
    the source's PreNorm normalisation."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, dim, 1, 1))

    @op("channel_norm")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_norm_ref(x, self.eps, self.gamma)


class PreNormResidual(nn.Module):
    """x + fn(norm(x)) with a channel LayerNorm: the source's Residual(PreNorm(dim, attention))."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(self.norm(x))
