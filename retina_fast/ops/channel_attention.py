"""Channel attention (MAGE-Net's CAB; squeeze-excite without bias), optionally + residual.

    y = x * sigmoid(w2 . ReLU(w1 . mean_HW(x))) (+ residual)

x: (N, C, H, W); w1 (C/r, C[, 1, 1]); w2 (C, C/r[, 1, 1]). Implementations: ``torch`` (the reference),
``cpp`` (channels-last C++: the mean, the tiny MLP and the sigmoid in fp32, then ``x * gate + residual``
rounded once, AVX-512 with masked channel tails and a scalar fallback; csrc/cpu/enhance_ops_cpu.cpp),
``triton`` (retina_fast.kernels.channel_attention, NCHW or channels-last). The ``cpp`` kernel is a torch
custom op (``torch.ops.retina_fast.ca_residual_cl``) so traced TorchScript graphs can record it.
Why fused (one 512^2 x 16 bf16 CAB tail): 0.68 ms against ~1.5 ms for ATen's mean, GEMV, gate and add.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from retina_fast import _ext
from retina_fast.ops._cl import check_cl, is_bf16, ptr

__all__ = ["channel_attention_ref", "channel_attention", "IMPLS"]

IMPLS = ("torch", "cpp", "triton")


def channel_attention_ref(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                          residual: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch: the definition every implementation is tested against."""
    y = x.mean(dim=(2, 3))
    y = F.relu(y @ w1.reshape(w1.shape[0], -1).t())
    y = torch.sigmoid(y @ w2.reshape(w2.shape[0], -1).t())
    out = x * y[:, :, None, None]
    return out if residual is None else out + residual


@torch.library.custom_op("retina_fast::ca_residual_cl", mutates_args=())
def _ca_op(body: torch.Tensor, x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    b, c, h, w = body.shape
    out = torch.empty_like(body, memory_format=torch.channels_last)
    _ext.require().ca_residual_cl(ptr(body), ptr(x), b, h * w, c, ptr(w_down), ptr(w_up), w_down.shape[0], ptr(out),
                                  is_bf16(body))
    return out


@_ca_op.register_fake
def _(body, x, w_down, w_up):
    return torch.empty_like(body, memory_format=torch.channels_last)


def mlp_weights(w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C/r, C) and (C, C/r) float32 contiguous copies of the two 1x1 weights (what the C++ kernel reads)."""
    return (w1.detach().float().reshape(w1.shape[0], -1).contiguous(),
            w2.detach().float().reshape(w2.shape[0], -1).contiguous())


def channel_attention_cl(body: torch.Tensor, residual: torch.Tensor, w_down: torch.Tensor,
                         w_up: torch.Tensor) -> torch.Tensor:
    """The custom op, unchecked: channels-last body and residual of one dtype, ``mlp_weights`` -> new tensor."""
    return torch.ops.retina_fast.ca_residual_cl(body, residual, w_down, w_up)


def channel_attention(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, residual: torch.Tensor | None = None,
                      *, impl: str | None = None) -> torch.Tensor:
    """``channel_attention_ref`` by ``impl`` (None: ``triton`` on CUDA, ``cpp`` for a channels-last CPU x with
    a residual, else ``torch``)."""
    if impl is None:
        if x.device.type == "cuda":
            impl = "triton"
        elif _ext.available() and residual is not None and x.is_contiguous(memory_format=torch.channels_last):
            impl = "cpp"
        else:
            impl = "torch"
    if impl not in IMPLS:
        raise ValueError(f"unknown channel_attention implementation {impl!r}; choose from {IMPLS}")
    if impl == "torch":
        return channel_attention_ref(x, w1, w2, residual)
    if impl == "triton":
        from retina_fast.kernels.channel_attention import channel_attention as kernel

        y = kernel(x, w1, w2)
        return y if residual is None else y + residual
    check_cl(x, "x")
    if residual is None:
        raise ValueError("the cpp channel attention adds a residual: pass one (zeros for none)")
    check_cl(residual, "residual")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual must match x: {residual.dtype} {tuple(residual.shape)} vs {x.dtype} "
                         f"{tuple(x.shape)}")
    c = x.shape[1]
    w_down, w_up = mlp_weights(w1, w2)
    r = w_down.shape[0]
    if w_down.shape != (r, c) or w_up.shape != (c, r):
        raise ValueError(f"w_down must be ({r}, {c}) and w_up ({c}, {r}), got {tuple(w_down.shape)} / "
                         f"{tuple(w_up.shape)}")
    return channel_attention_cl(x, residual, w_down, w_up)
