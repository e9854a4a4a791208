"""Fused channels-last C++ ops for the ``cpu`` enhancer (retina_fast.enhance.CPURunner).

Why (torch profiler, eager bf16 channels-last copy of the shipped MAGE-Net, one 512x512 image, 2-core
AVX-512 CPU): convolutions were 43 % of the time and ran at ~400 GFLOP/s; most of the rest was memory-bound
glue that ATen runs slowly on channels-last tensors -- bilinear resizes 15 % (3.6 ms for one 16-channel
256² -> 512² bf16 resize), the channel attention's mean (a batched GEMV), gate multiply and residual add
~15 %, concatenations 7 %. Here:

* ``upsample_bilinear_cl``: one pass, 16-wide over channels, with an optional tensor added to the output
  (a FAB's ``h + up(enc) + up(dec)`` is two calls and no separate adds).
* ``ca_residual_cl``: a CAB's ``channel_attention(body) + x`` -- mean over the pixels, the tiny MLP and
  sigmoid in fp32, then ``body * gate + x`` rounded once.

Both are registered as torch custom ops (``torch.ops.retina_fast.*``) so that the runner's traced, frozen
TorchScript graph records them; :func:`accelerate` swaps them into a model copy.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from retina_fast import _ext
from retina_fast.models.magenet import CAB, FAB, MAGENet, Resample
from retina_fast.models.rsp import AttentionGuidedUpsample

__all__ = ["upsample_bilinear_cl", "ca_residual_cl", "accelerate"]


def _check(x: torch.Tensor, name: str) -> None:
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D float32/bfloat16 CPU tensor, got {x.dtype} {tuple(x.shape)} "
                         f"on {x.device}")
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{name}: must be channels-last contiguous")


@torch.library.custom_op("retina_fast::upsample_bilinear_cl", mutates_args=())
def _upsample_op(x: torch.Tensor, height: int, width: int, add: torch.Tensor | None) -> torch.Tensor:
    b, c, h, w = x.shape
    out = torch.empty((b, c, height, width), dtype=x.dtype, memory_format=torch.channels_last)
    _ext.require().upsample_bilinear_cl(x.data_ptr(), b, h, w, c, height, width,
                                        add.data_ptr() if add is not None else 0, out.data_ptr(),
                                        x.dtype == torch.bfloat16)
    return out


@_upsample_op.register_fake
def _(x, height, width, add):
    return x.new_empty((x.shape[0], x.shape[1], height, width)).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("retina_fast::ca_residual_cl", mutates_args=())
def _ca_op(body: torch.Tensor, x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    b, c, h, w = body.shape
    out = torch.empty_like(body, memory_format=torch.channels_last)
    _ext.require().ca_residual_cl(body.data_ptr(), x.data_ptr(), b, h * w, c, w_down.data_ptr(), w_up.data_ptr(),
                                  w_down.shape[0], out.data_ptr(), body.dtype == torch.bfloat16)
    return out


@_ca_op.register_fake
def _(body, x, w_down, w_up):
    return torch.empty_like(body, memory_format=torch.channels_last)


def upsample_bilinear_cl(x: torch.Tensor, size, add: torch.Tensor | None = None) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False) (+ add)`` for a channels-last CPU x
    (float32 or bf16, fp32 arithmetic, rounded once); ``add`` must be channels-last (N, C, *size), x's dtype."""
    _check(x, "x")
    height, width = (int(s) for s in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {tuple(size)}")
    if add is not None:
        _check(add, "add")
        if add.dtype != x.dtype or tuple(add.shape) != (x.shape[0], x.shape[1], height, width):
            raise ValueError(f"add must be {x.dtype} {(x.shape[0], x.shape[1], height, width)}, got {add.dtype} "
                             f"{tuple(add.shape)}")
    return torch.ops.retina_fast.upsample_bilinear_cl(x, height, width, add)


def ca_residual_cl(body: torch.Tensor, x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """``channel_attention_ref(body, w_down, w_up) + x`` for channels-last CPU tensors of one dtype;
    w_down (R, C[, 1, 1]), w_up (C, R[, 1, 1])."""
    _check(body, "body")
    _check(x, "x")
    if x.shape != body.shape or x.dtype != body.dtype:
        raise ValueError(f"x must match body: {x.dtype} {tuple(x.shape)} vs {body.dtype} {tuple(body.shape)}")
    c = body.shape[1]
    w_down = w_down.detach().float().reshape(w_down.shape[0], -1).contiguous()
    w_up = w_up.detach().float().reshape(w_up.shape[0], -1).contiguous()
    r = w_down.shape[0]
    if w_down.shape != (r, c) or w_up.shape != (c, r):
        raise ValueError(f"w_down must be ({r}, {c}) and w_up ({c}, {r}), got {tuple(w_down.shape)} / "
                         f"{tuple(w_up.shape)}")
    return torch.ops.retina_fast.ca_residual_cl(body, x, w_down, w_up)


def _resize_cl(x: torch.Tensor, size, add: torch.Tensor | None = None) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):  # the reference resizes nothing then
        return x if add is None else add + x
    x = x.contiguous(memory_format=torch.channels_last)
    add = add.contiguous(memory_format=torch.channels_last) if add is not None else None
    return torch.ops.retina_fast.upsample_bilinear_cl(x, int(size[0]), int(size[1]), add)


def _cab_forward(self: CAB, x: torch.Tensor) -> torch.Tensor:
    body = self.body(x).contiguous(memory_format=torch.channels_last)
    return torch.ops.retina_fast.ca_residual_cl(body, x.contiguous(memory_format=torch.channels_last),
                                                self._w_down, self._w_up)


def accelerate(model: nn.Module) -> nn.Module:
    """Swap the fused ops into ``model`` (a channels-last CPU copy, changed in place): every CAB's channel
    attention + residual, and the bilinear resizes of MAGE-Net, its FABs and Resamples and the RSP module's
    attention-guided upsampling. Returns ``model``."""
    if not _ext.available():
        raise RuntimeError(f"the cpu enhancer needs the compiled core retina_fast._C ({_ext.load_error})")
    for m in model.modules():
        if isinstance(m, CAB):
            m._w_down = m.ca.down.weight.detach().float().flatten(1).contiguous()
            m._w_up = m.ca.up.weight.detach().float().flatten(1).contiguous()
            m.forward = types.MethodType(_cab_forward, m)
        elif isinstance(m, (MAGENet, FAB, Resample, AttentionGuidedUpsample)):
            m.resize = _resize_cl
    return model
