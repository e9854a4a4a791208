"""Channel concatenation of channels-last tensors (the U-Net's skip connections).

    concat_channels(a, b) == torch.cat([a, b], dim=1)       a (B, Ca, H, W), b (B, Cb, H, W), one dtype

Implementations: ``torch`` (the reference), ``cpp`` (one row copy per pixel; channels-last rows are
contiguous, so it is two memcpy per pixel; csrc/layout.cpp).
"""
from __future__ import annotations

import torch

from retina_fast import _ext
from retina_fast.ops._cl import check_cl, empty_cl, ptr

__all__ = ["concat_channels_ref", "concat_channels", "concat_channels_cl"]


def concat_channels_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, b], dim=1)


def concat_channels_cl(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, graph=None) -> None:
    """The C++ row copy, unchecked; ``graph``: append to that OpGraph instead of running."""
    n, ca, h, w = a.shape
    _ext.require().concat_channels_cl(ptr(a), ptr(b), ptr(out), n * h * w, ca * a.element_size(),
                                      b.shape[1] * b.element_size(), graph=graph)


def concat_channels(a: torch.Tensor, b: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """``torch.cat([a, b], 1)`` by ``impl`` (None: ``cpp`` for channels-last CPU tensors)."""
    if impl is None:
        impl = "cpp" if _ext.available() and a.device.type == "cpu" and a.dim() == 4 \
            and a.is_contiguous(memory_format=torch.channels_last) else "torch"
    if impl == "torch":
        return concat_channels_ref(a, b)
    if impl != "cpp":
        raise ValueError(f"unknown concat_channels implementation {impl!r}; choose torch or cpp")
    check_cl(a, "a")
    check_cl(b, "b")
    if a.dtype != b.dtype or a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"a {a.dtype} {tuple(a.shape)} and b {b.dtype} {tuple(b.shape)} differ in dtype, batch "
                         f"or size")
    out = empty_cl((a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:]), a.dtype)
    concat_channels_cl(a, b, out)
    return out
