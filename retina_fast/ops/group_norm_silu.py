"""GroupNorm -> (1 + scale) x + shift -> SiLU (the U-Net's Block, the VQ-GAN's norms), optionally + residual.

    y = SiLU(GN(x) * (1 + scale) + shift) (+ residual)

x: (B, C, H, W); weight, bias: (C,) GroupNorm affine; scale, shift: (B, C, 1, 1) or None (the time FiLM);
GN normalises each of ``num_groups`` channel groups over (C/G, H, W) with the biased variance.
Implementations: ``torch`` (the reference), ``cpp`` (channels-last C++ kernel, one pass per image for the
statistics and one for the output, float32 or bf16 storage, fp32 arithmetic; csrc/cpu/unet_ops_cpu.cpp),
``triton`` (retina_fast.kernels.group_norm_silu, NCHW). Bytes: 2 reads + 1 write per element (eager: ~8).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from retina_fast import _ext
from retina_fast.ops._cl import check_cl, empty_cl, is_bf16, ptr

__all__ = ["group_norm_silu_ref", "group_norm_silu", "group_norm_silu_cl", "IMPLS"]

IMPLS = ("torch", "cpp", "triton")


def group_norm_silu_ref(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        eps: float, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                        act: bool = True, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch: the definition every implementation is tested against."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        y = y * (scale + 1)
    if shift is not None:
        y = y + shift
    y = F.silu(y) if act else y
    return y if residual is None else y + residual


def group_norm_silu_cl(x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None, groups: int,
                       weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None,
                       shift: torch.Tensor | None, film_stride: int, act: bool, eps: float, graph=None) -> None:
    """The C++ kernel, unchecked: channels-last x / out / residual of one storage dtype (out may be x), float32
    weight / bias (C,), scale / shift rows ``film_stride`` floats apart (views into one (B, F) buffer) or None.
    ``graph``: append to that OpGraph instead of running."""
    b, c, h, w = x.shape
    _ext.require().gn_silu_cl(ptr(x), ptr(out), ptr(residual), b, h * w, c, groups, ptr(weight), ptr(bias),
                              ptr(scale), ptr(shift), film_stride, act, eps, is_bf16(x), graph=graph)


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, act: bool = True,
                    residual: torch.Tensor | None = None, *, impl: str | None = None) -> torch.Tensor:
    """``group_norm_silu_ref`` by ``impl`` (None: ``cpp`` for channels-last CPU tensors, ``triton`` on CUDA,
    else ``torch``). ``cpp`` returns a new channels-last tensor of x's dtype."""
    if impl is None:
        if x.device.type == "cuda":
            impl = "triton"
        elif _ext.available() and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
                and x.dtype in (torch.float32, torch.bfloat16):
            impl = "cpp"
        else:
            impl = "torch"
    if impl not in IMPLS:
        raise ValueError(f"unknown group_norm_silu implementation {impl!r}; choose from {IMPLS}")
    if impl == "torch":
        return group_norm_silu_ref(x, num_groups, weight, bias, eps, scale, shift, act, residual)
    if impl == "triton":
        from retina_fast.kernels.group_norm_silu import group_norm_silu as kernel

        y = kernel(x, num_groups, weight, bias, eps, scale, shift, act)
        return y if residual is None else y + residual
    check_cl(x)
    b, c = x.shape[:2]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"groups={num_groups} must divide the {c} channels")
    weight, bias = weight.detach().float().contiguous(), bias.detach().float().contiguous()
    if weight.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"weight/bias must be ({c},), got {tuple(weight.shape)} / {tuple(bias.shape)}")
    scale = scale.detach().float().reshape(b, c).contiguous() if scale is not None else None
    shift = shift.detach().float().reshape(b, c).contiguous() if shift is not None else None
    if residual is not None:
        check_cl(residual, "residual")
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x: {residual.dtype} {tuple(residual.shape)}")
    out = empty_cl(x.shape, x.dtype)
    group_norm_silu_cl(x, out, residual, num_groups, weight, bias, scale, shift, c, act, float(eps))
    return out
