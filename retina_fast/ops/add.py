"""Elementwise sum of two tensors of one shape and storage dtype (a residual the ``cpu`` backend could not
fold into the producing convolution or GroupNorm).

    add(a, b) == a + b          fp32 arithmetic, bf16 storage rounded once

Implementations: ``torch`` (the reference), ``cpp`` (csrc/layout.cpp, channels-last or any contiguous
layout the two share).
"""
from __future__ import annotations

import torch

from retina_fast import _ext
from retina_fast.ops._cl import check_cl, empty_cl, is_bf16, ptr

__all__ = ["add_ref", "add", "add_cl"]


def add_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b


def add_cl(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, graph=None) -> None:
    """The C++ kernel, unchecked (same shape, dtype and layout); ``graph``: append instead of running."""
    _ext.require().add_cl(ptr(a), ptr(b), ptr(out), a.numel(), is_bf16(a), graph=graph)


def add(a: torch.Tensor, b: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """``a + b`` by ``impl`` (None: ``cpp`` for channels-last CPU tensors)."""
    if impl is None:
        impl = "cpp" if _ext.available() and a.device.type == "cpu" and a.dim() == 4 \
            and a.is_contiguous(memory_format=torch.channels_last) else "torch"
    if impl == "torch":
        return add_ref(a, b)
    if impl != "cpp":
        raise ValueError(f"unknown add implementation {impl!r}; choose torch or cpp")
    check_cl(a, "a")
    check_cl(b, "b")
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"a {a.dtype} {tuple(a.shape)} and b {b.dtype} {tuple(b.shape)} differ")
    out = empty_cl(a.shape, a.dtype)
    add_cl(a, b, out)
    return out
