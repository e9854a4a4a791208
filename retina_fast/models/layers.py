"""Small building blocks shared by the VQ-GAN and the U-Net, kept as separate modules so the engine can
swap them for fused kernels (GroupNorm + scale/shift + SiLU is one op on the ``cuda``/``cpu`` backends).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["group_count", "groupnorm_silu_ref", "GroupNormSiLU", "sinusoidal_embedding"]


def group_count(channels: int, preferred: int = 32) -> int:
    """The largest divisor of ``channels`` that is <= ``preferred`` (32 -> 16 groups for 16 channels).

    The source uses GroupNorm(32) everywhere; with fewer than 32 channels (or a channel count that 32
    does not divide) we use fewer groups rather than fail.
    """
    for g in range(min(preferred, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def groupnorm_silu_ref(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, eps: float, scale: torch.Tensor | None = None,
                       shift: torch.Tensor | None = None, act: bool = True) -> torch.Tensor:
    """y = SiLU(GN(x) * (1 + scale) + shift).

    x: (B, C, H, W); weight, bias: (C,) affine of the GroupNorm; scale, shift: (B, C, 1, 1) or None.
    GN normalises each of ``num_groups`` channel groups over (C/G, H, W) with biased variance.
    """
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        y = y * (scale + 1)
    if shift is not None:
        y = y + shift
    return F.silu(y) if act else y


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

    def forward(self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        scale, shift = scale_shift if scale_shift is not None else (None, None)
        return groupnorm_silu_ref(x, self.num_groups, self.weight, self.bias, self.eps, scale, shift,
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
