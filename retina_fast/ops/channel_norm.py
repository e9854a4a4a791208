"""Channel LayerNorm (the U-Net's pre-attention norm): over the C channels of each pixel, no bias.

    y = (x - mean_C) / sqrt(var_C + eps) * gamma           (biased variance; gamma (C,) or None)

x: (B, C, H, W). Implementations: ``torch`` (the reference), ``cpp`` (channels-last C++ kernel, one row per
pixel, without gamma: the ``cpu`` backend folds gamma into the following 1x1 convolution's weights).
"""
from __future__ import annotations

import torch

from retina_fast import _ext
from retina_fast.ops._cl import check_cl, empty_cl, is_bf16, ptr

__all__ = ["channel_norm_ref", "channel_norm", "channel_norm_cl"]


def channel_norm_ref(x: torch.Tensor, eps: float = 1e-5, gamma: torch.Tensor | None = None) -> torch.Tensor:
    var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    return y if gamma is None else y * gamma.reshape(1, -1, 1, 1)


def channel_norm_cl(x: torch.Tensor, out: torch.Tensor, eps: float, graph=None) -> None:
    """The C++ kernel, unchecked (channels-last x and out of one storage dtype); ``graph``: append instead."""
    b, c, h, w = x.shape
    _ext.require().channel_norm_cl(ptr(x), ptr(out), b * h * w, c, eps, is_bf16(x), graph=graph)


def channel_norm(x: torch.Tensor, eps: float = 1e-5, *, impl: str | None = None) -> torch.Tensor:
    """``channel_norm_ref(x, eps)`` by ``impl`` (None: ``cpp`` for channels-last CPU tensors)."""
    if impl is None:
        impl = "cpp" if _ext.available() and x.device.type == "cpu" and x.dim() == 4 \
            and x.is_contiguous(memory_format=torch.channels_last) else "torch"
    if impl == "torch":
        return channel_norm_ref(x, eps)
    if impl != "cpp":
        raise ValueError(f"unknown channel_norm implementation {impl!r}; choose torch or cpp")
    check_cl(x)
    out = empty_cl(x.shape, x.dtype)
    channel_norm_cl(x, out, float(eps))
    return out
