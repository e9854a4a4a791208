"""Direct convolutions on channels-last tensors (C++, csrc/cpu/conv_cpu.cpp), against ``F.conv2d``.

    conv2d_cl(x, pack_conv_weight(w, x.dtype), n, (kh, kw), stride, pad, bias, residual, replicate)
        == conv2d_ref(x, w, bias, stride, pad, residual, replicate)
    conv_transpose2d_k4s2p1_cl(x, pack_conv_transpose_k4s2p1(w, x.dtype), n, bias)
        == F.conv_transpose2d(x, w, bias, stride=2, padding=1)                  (as four 2x2 phase convs)
    conv2d_rows_cl(x, pack_conv_rows(w, x.dtype), n, (kh, kw), pad, bias)      (few input channels)

Storage float32 (AVX-512 FMA) or bfloat16 (AVX512-BF16 vdpbf16ps), fp32 accumulation, bf16 output rounded
once. Every output element is summed from its own pixel's taps in a fixed order, so results do not depend on
the batch size or split (oneDNN picks kernels per problem size). Implicit GEMM tiles of 12 pixels x 32 output
channels; FLOPs 2 B Ho Wo N C kh kw. Why not oneDNN for the U-Net's small convolutions: it costs ~30 us per
call whatever the size (a 1x1 conv on (1, 8, 4, 4) took 30 us on the 2-core AVX-512 CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from retina_fast import _ext
from retina_fast.ops._cl import check_cl, empty_cl, is_bf16, ptr

__all__ = ["conv2d_ref", "conv2d_cl", "conv2d_rows_cl", "conv_transpose2d_k4s2p1_cl", "pack_conv_weight",
           "pack_conv_rows", "pack_conv_transpose_k4s2p1", "direct_conv_usable", "direct_bf16_conv_usable",
           "conv2d_cl_raw", "conv2d_rows_cl_raw", "conv_transpose2d_k4s2p1_cl_raw"]


def conv2d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
               pad: int = 0, residual: torch.Tensor | None = None, replicate: bool = False) -> torch.Tensor:
    """Plain PyTorch: ``F.conv2d`` (of the replicate-padded input with ``replicate``) (+ residual)."""
    if replicate and pad:
        y = F.conv2d(F.pad(x, (pad,) * 4, mode="replicate"), weight, bias, stride)
    else:
        y = F.conv2d(x, weight, bias, stride, pad)
    return y if residual is None else y + residual


def direct_conv_usable(dtype: torch.dtype) -> bool:
    """Whether the C++ direct convolution (csrc/cpu/conv_cpu.cpp) runs on this CPU in ``dtype``: bfloat16 needs
    AVX512-BF16, float32 AVX-512."""
    if not _ext.available():
        return False
    if dtype == torch.bfloat16:
        return bool(_ext.require().conv_bf16_supported())
    if dtype == torch.float32:
        return bool(_ext.require().conv_f32_supported())
    return False


def direct_bf16_conv_usable() -> bool:
    """Whether the C++ AVX512-BF16 direct convolution runs on this CPU."""
    return direct_conv_usable(torch.bfloat16)


def _check_storage(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the direct convolution stores float32 or bfloat16, got {dtype}")


def _np(n: int) -> int:
    return -(-n // 32) * 32


def _packed_shape(taps: int, c: int, n: int, dtype: torch.dtype) -> tuple[int, ...]:
    return (taps, c // 2, _np(n), 2) if dtype == torch.bfloat16 else (taps, c, _np(n))


def pack_conv_weight(weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(N, C, KH, KW) -> the direct convolution's layout, Np = N rounded up to 32 (zeros beyond N):
    bf16 (KH*KW, C/2, Np, 2) (channel pairs side by side, for vdpbf16ps), fp32 (KH*KW, C, Np)."""
    _check_storage(dtype)
    n, c, kh, kw = weight.shape
    if dtype == torch.bfloat16 and c % 2:
        raise ValueError(f"the direct bf16 convolution needs an even input channel count, got {c}")
    packed = torch.zeros(_packed_shape(kh * kw, c, n, dtype), dtype=dtype)
    taps = weight.detach().float().permute(2, 3, 1, 0).reshape(kh * kw, c, n)   # [t, c, n]
    if dtype == torch.bfloat16:
        packed[:, :, :n, :] = taps.reshape(kh * kw, c // 2, 2, n).permute(0, 1, 3, 2).to(dtype)
    else:
        packed[:, :, :n] = taps
    return packed.contiguous()


def pack_conv_rows(weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(N, C, KH, KW) -> the row form's packed kernel: (N, KW*C, KH, 1) with w'[n, j C + c, i] = w[n, c, i, j]."""
    n, c, kh, kw = weight.shape
    return pack_conv_weight(weight.detach().float().permute(0, 3, 1, 2).reshape(n, kw * c, kh, 1), dtype)


def _check_bias(bias: torch.Tensor | None, n: int) -> None:
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be float32 ({n},)")


def conv2d_rows_cl(x: torch.Tensor, packed: torch.Tensor, n: int, kernel: tuple[int, int], pad: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, w, bias, padding=pad)`` (stride 1) for channels-last x with few channels, with
    ``packed = pack_conv_rows(w, x.dtype)``: the KW taps of a kernel row are read as KW*C contiguous values of
    the zero-padded input, so the inner reduction is KW times longer than with C alone."""
    check_cl(x)
    b, c, h, w = x.shape
    kh, kw = kernel
    if packed.dtype != x.dtype or packed.shape != _packed_shape(kh, kw * c, n, x.dtype) or \
            (x.dtype == torch.bfloat16 and (kw * c) % 2):
        raise ValueError(f"packed weight {packed.dtype} {tuple(packed.shape)} does not fit {x.dtype} input with {c} "
                         f"channels, kernel {kernel}, {n} outputs")
    _check_bias(bias, n)
    return _rows_raw(x, packed.contiguous(), n, kh, kw, pad, bias)


def conv2d_rows_cl_raw(xpad: torch.Tensor, out: torch.Tensor, packed: torch.Tensor, n: int, kh: int, kw: int,
                       bias: torch.Tensor | None, graph=None) -> None:
    """The row-form C++ kernel, unchecked, on an input the caller has zero-padded (channels-last)."""
    b, c, hp, wp = xpad.shape
    _ext.require().conv2d_rows_cl(ptr(xpad), b, hp, wp, c, ptr(packed), kh, kw, n, ptr(bias), 0, ptr(out),
                                  is_bf16(xpad), graph=graph)


def _rows_raw(x, packed, n, kh, kw, pad, bias) -> torch.Tensor:
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    xp = xp.contiguous(memory_format=torch.channels_last)
    b, c, hp, wp = xp.shape
    out = empty_cl((b, n, hp - kh + 1, wp - kw + 1), x.dtype)
    conv2d_rows_cl_raw(xp, out, packed, n, kh, kw, bias)
    return out


def pack_conv_transpose_k4s2p1(weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """ConvTranspose2d(4, stride 2, padding 1) weight (C, N, 4, 4) -> four packed 2x2 kernels, one per output
    phase (py, px): kernel[n, c, dy, dx] = weight[c, n, 3 - py - 2 dy, 3 - px - 2 dx] (see conv_cpu.h)."""
    c, n, kh, kw = weight.shape
    if (kh, kw) != (4, 4):
        raise ValueError(f"expected a 4x4 transposed-conv weight, got {kh}x{kw}")
    w = weight.detach().float()
    phases = []
    for py in (0, 1):
        for px in (0, 1):
            rows = [3 - py - 2 * dy for dy in (0, 1)]
            cols = [3 - px - 2 * dx for dx in (0, 1)]
            sub = w[:, :, rows][:, :, :, cols].permute(1, 0, 2, 3)          # (N, C, 2, 2)
            phases.append(pack_conv_weight(sub, dtype))
    return torch.stack(phases).contiguous()


def conv_transpose2d_k4s2p1_cl(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None,
                               replicate: bool = False) -> torch.Tensor:
    """``F.conv_transpose2d(x, w, bias, stride=2, padding=1)`` (4x4 kernel) for channels-last x with
    ``packed = pack_conv_transpose_k4s2p1(w, x.dtype)``; ``replicate``: instead
    ``F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), w, bias, stride=2, padding=3)``."""
    check_cl(x)
    b, c, h, w = x.shape
    if packed.dtype != x.dtype or packed.shape != (4, *_packed_shape(4, c, n, x.dtype)) or \
            (x.dtype == torch.bfloat16 and c % 2):
        raise ValueError(f"packed weight {packed.dtype} {tuple(packed.shape)} does not fit {x.dtype} input with {c} "
                         f"channels, {n} outputs")
    _check_bias(bias, n)
    return _convt_raw(x, packed.contiguous(), n, bias, replicate)


def conv_transpose2d_k4s2p1_cl_raw(x: torch.Tensor, out: torch.Tensor, packed: torch.Tensor, n: int,
                                   bias: torch.Tensor | None, replicate: bool = False, graph=None) -> None:
    """The C++ kernel, unchecked (channels-last x, out (B, n, 2H, 2W) of x's dtype)."""
    b, c, h, w = x.shape
    _ext.require().conv_transpose2d_k4s2p1_cl(ptr(x), b, h, w, c, ptr(packed), n, ptr(bias), ptr(out), is_bf16(x),
                                              replicate=replicate, graph=graph)


def _convt_raw(x, packed, n, bias, replicate=False) -> torch.Tensor:
    b, c, h, w = x.shape
    out = empty_cl((b, n, 2 * h, 2 * w), x.dtype)
    conv_transpose2d_k4s2p1_cl_raw(x, out, packed, n, bias, replicate)
    return out


def conv2d_cl(x: torch.Tensor, packed: torch.Tensor, n: int, kernel: tuple[int, int], stride: int, pad: int,
              bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
              replicate: bool = False) -> torch.Tensor:
    """``F.conv2d(x, w, bias, stride, pad) (+ residual)`` for channels-last x (B, C, H, W) in float32 or bfloat16
    with ``packed = pack_conv_weight(w, x.dtype)``; fp32 accumulation (bf16: output rounded once).
    ``replicate``: ``padding_mode="replicate"`` instead of zeros."""
    check_cl(x)
    b, c, h, w = x.shape
    kh, kw = kernel
    if packed.dtype != x.dtype or packed.shape != _packed_shape(kh * kw, c, n, x.dtype) or \
            (x.dtype == torch.bfloat16 and c % 2):
        raise ValueError(f"packed weight {packed.dtype} {tuple(packed.shape)} does not fit {x.dtype} input with {c} "
                         f"channels, kernel {kernel}, {n} outputs")
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    _check_bias(bias, n)
    if residual is not None:
        check_cl(residual, "residual")
        if residual.dtype != x.dtype or residual.shape != (b, n, ho, wo):
            raise ValueError(f"residual must be {x.dtype} {(b, n, ho, wo)}, got {residual.dtype} "
                             f"{tuple(residual.shape)}")
    return _conv_raw(x, packed.contiguous(), n, kh, kw, stride, pad, bias, residual, replicate)


def conv2d_cl_raw(x: torch.Tensor, out: torch.Tensor, packed: torch.Tensor, n: int, kh: int, kw: int, stride: int,
                  pad: int, bias: torch.Tensor | None, residual: torch.Tensor | None, replicate: bool = False,
                  graph=None) -> None:
    """The C++ kernel, unchecked (channels-last x, residual and out of one storage dtype)."""
    b, c, h, w = x.shape
    ho, wo = out.shape[2], out.shape[3]
    _ext.require().conv2d_cl(ptr(x), b, h, w, c, ptr(packed), kh, kw, n, stride, pad, ho, wo, ptr(bias),
                             ptr(residual), ptr(out), is_bf16(x), replicate=replicate, graph=graph)


def _conv_raw(x, packed, n, kh, kw, stride, pad, bias, residual, replicate=False) -> torch.Tensor:
    b, c, h, w = x.shape
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    out = empty_cl((b, n, ho, wo), x.dtype)
    conv2d_cl_raw(x, out, packed, n, kh, kw, stride, pad, bias, residual, replicate)
    return out
