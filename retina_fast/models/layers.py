"""Small building blocks shared by the VQ-GAN and the U-Net. Their forwards are named ops
(:mod:`retina_fast.ops.table`), so a backend runs these same modules with its own kernels (GroupNorm +
scale/shift + SiLU is one op on the ``cuda``/``cpu`` backends, a convolution a direct C++ one on ``cpu``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from retina_fast.ops.group_norm_silu import group_norm_silu_ref
from retina_fast.ops.table import op

__all__ = ["group_count", "Conv2d", "ConvTranspose2d", "GroupNormSiLU", "sinusoidal_embedding"]


def group_count(channels: int, preferred: int = 32) -> int:
    """The largest divisor of ``channels`` that is <= ``preferred`` (32 -> 16 groups for 16 channels).

    The source uses GroupNorm(32) everywhere; with fewer than 32 channels (or a channel count that 32
    does not divide) we use fewer groups rather than fail.
    """
    for g in range(min(preferred, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward is the op ``conv2d`` (:mod:`retina_fast.ops.table`), so a backend's op table
    can run it (the ``cpu`` backend records it as a direct convolution). Same parameters and state dict."""

    @op("conv2d")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose forward is the op ``conv_transpose2d``. Same parameters and state dict."""

    @op("conv_transpose2d")
    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return super().forward(x, output_size)


class GroupNormSiLU(nn.Module):
    """GroupNorm -> optional time scale/shift -> SiLU as one swappable module.

    forward(x (B, C, H, W), scale_shift=None | (scale, shift) each (B, C, 1, 1)) -> (B, C, H, W).
    Parameters are named like ``nn.GroupNorm``'s (``weight``, ``bias``).
    """

    def __init__(self, channels: int, num_groups: int, eps: float = 1e-5, act: bool = True) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.act = act
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    @op("group_norm_silu")
    def forward(self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        scale, shift = scale_shift if scale_shift is not None else (None, None)
        return group_norm_silu_ref(x, self.num_groups, self.weight, self.bias, self.eps, scale, shift,
                                   self.act)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, groups={self.num_groups}, eps={self.eps}, act={self.act}"


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style timestep embedding: t (B,) -> (B, dim) = [sin(t w_i), cos(t w_i)],
    w_i = exp(-ln(10000) i / (dim/2 - 1)), i = 0 .. dim/2 - 1 (the source's SinusoidalPosEmb)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32)
                      * (-math.log(10000.0) / max(half - 1, 1)))
    arg = t.float()[:, None] * freqs[None, :]
    return torch.cat([arg.sin(), arg.cos()], dim=-1)
