"""Bilinear resize (align_corners=False), optionally + a tensor of the output size (MAGE-Net, RSP module).

    y = interpolate(x, size, bilinear) (+ add)          (no resize when x already has that size)

x: (N, C, H, W) -> (N, C, *size). Implementations: ``torch`` (the reference), ``cpp`` (channels-last C++,
one pass, 16-wide over channels, fp32 arithmetic rounded once; csrc/cpu/enhance_ops_cpu.cpp), registered
as the torch custom op ``torch.ops.retina_fast.upsample_bilinear_cl`` so traced graphs record it.
Why fused: one 16-channel 256^2 -> 512^2 bf16 resize took 3.6 ms in ATen on channels-last tensors; a FAB's
``h + up(enc) + up(dec)`` becomes two calls and no separate adds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from retina_fast import _ext
from retina_fast.ops._cl import check_cl, is_bf16, ptr

__all__ = ["bilinear_resize_ref", "bilinear_resize", "bilinear_resize_cl"]


def bilinear_resize_ref(x: torch.Tensor, size, add: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch: the definition every implementation is tested against."""
    y = x if x.shape[-2:] == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return y if add is None else add + y


@torch.library.custom_op("retina_fast::upsample_bilinear_cl", mutates_args=())
def _upsample_op(x: torch.Tensor, height: int, width: int, add: torch.Tensor | None) -> torch.Tensor:
    b, c, h, w = x.shape
    out = torch.empty((b, c, height, width), dtype=x.dtype, memory_format=torch.channels_last)
    _ext.require().upsample_bilinear_cl(ptr(x), b, h, w, c, height, width, ptr(add), ptr(out), is_bf16(x))
    return out


@_upsample_op.register_fake
def _(x, height, width, add):
    return x.new_empty((x.shape[0], x.shape[1], height, width)).contiguous(memory_format=torch.channels_last)


def bilinear_resize_cl(x: torch.Tensor, size, add: torch.Tensor | None = None) -> torch.Tensor:
    """The custom op on channels-last tensors (made so here), with the reference's no-resize case."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x if add is None else add + x
    x = x.contiguous(memory_format=torch.channels_last)
    add = add.contiguous(memory_format=torch.channels_last) if add is not None else None
    return torch.ops.retina_fast.upsample_bilinear_cl(x, int(size[0]), int(size[1]), add)


def bilinear_resize(x: torch.Tensor, size, add: torch.Tensor | None = None, *, impl: str | None = None
                    ) -> torch.Tensor:
    """``bilinear_resize_ref`` by ``impl`` (None: ``cpp`` for a channels-last float32/bf16 CPU x)."""
    if impl is None:
        impl = "cpp" if _ext.available() and x.device.type == "cpu" and x.dim() == 4 \
            and x.is_contiguous(memory_format=torch.channels_last) and x.dtype in (torch.float32, torch.bfloat16) \
            else "torch"
    if impl == "torch":
        return bilinear_resize_ref(x, size, add)
    if impl != "cpp":
        raise ValueError(f"unknown bilinear_resize implementation {impl!r}; choose torch or cpp")
    check_cl(x, "x")
    height, width = (int(s) for s in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {tuple(size)}")
    if add is not None:
        check_cl(add, "add")
        if add.dtype != x.dtype or tuple(add.shape) != (x.shape[0], x.shape[1], height, width):
            raise ValueError(f"add must be {x.dtype} {(x.shape[0], x.shape[1], height, width)}, got {add.dtype} "
                             f"{tuple(add.shape)}")
    return torch.ops.retina_fast.upsample_bilinear_cl(x, height, width, add)
