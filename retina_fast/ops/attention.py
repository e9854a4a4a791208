"""Multi-head attention of the diffusion U-Net: linear attention at every level, softmax in the middle.

    linear  (Shen et al. 2021, "Efficient Attention"; the source's SpatialLinearAttention):
            q' = softmax_d(q) d^-1/2, k' = softmax_N(k), out = q' (k'^T v)     O(N d^2)
    softmax scaled dot-product attention: softmax(q k^T / sqrt(d)) v           O(N^2 d)

q, k, v: (B, heads, N, d), N = H W tokens -> (B, heads, N, d). ``multihead_attention`` takes the 1x1
``to_qkv`` projection (B, 3 heads d, H, W) whose channels are (3, heads, d), as the layer computes it.
Implementations: ``torch`` (the references), ``triton`` (retina_fast.kernels.attention, on (q, k, v)),
``cpp`` (channels-last C++ kernel on the projection, one pass per (image, head), vdpbf16ps contractions
for linear bf16 attention at d = 32; csrc/cpu/unet_ops_cpu.cpp, attn_bf16_cpu.cpp).
"""
from __future__ import annotations

from typing import Callable

import torch

from retina_fast import _ext
from retina_fast.ops._cl import check_cl, empty_cl, is_bf16, ptr

__all__ = ["linear_attention_ref", "softmax_attention_ref", "multihead_attention_ref", "linear_attention",
           "softmax_attention", "multihead_attention", "multihead_attention_cl", "KINDS"]

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
KINDS = ("linear", "softmax")


def linear_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Efficient (linear) attention; context (B, heads, d, d) instead of scores (B, heads, N, N)."""
    d = q.shape[-1]
    q = q.softmax(dim=-1) * d ** -0.5
    k = k.softmax(dim=-2)
    context = k.transpose(-2, -1) @ v
    return q @ context


def softmax_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention; materialises (B, heads, N, N) (fine for the U-Net's middle)."""
    d = q.shape[-1]
    scores = (q * d ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v


def multihead_attention_ref(qkv: torch.Tensor, heads: int, dim: int, kind: str = "linear",
                            attention: AttentionFn | None = None) -> torch.Tensor:
    """qkv (B, 3 heads dim, H, W) -> (B, heads dim, H, W): split into (q, k, v) per head, attend over the H W
    tokens with ``attention`` (default: the reference of ``kind``), merge the heads back."""
    b, _, h, w = qkv.shape
    if attention is None:
        attention = _reference(kind)
    if qkv.is_contiguous(memory_format=torch.channels_last) and not qkv.is_contiguous():
        # channels-last in, channels-last out (the cuda backend's NHWC layout): tokens are rows already
        qkv = qkv.permute(0, 2, 3, 1).reshape(b, h * w, 3, heads, dim).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2])                             # (B, heads, N, d)
        return out.permute(0, 2, 1, 3).reshape(b, h, w, heads * dim).permute(0, 3, 1, 2)
    qkv = qkv.reshape(b, 3, heads, dim, h * w).transpose(-2, -1)
    out = attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])                     # (B, heads, N, d)
    return out.transpose(-2, -1).reshape(b, heads * dim, h, w)


def _reference(kind: str) -> AttentionFn:
    if kind not in KINDS:
        raise ValueError(f"attention kind must be one of {KINDS}, got {kind!r}")
    return linear_attention_ref if kind == "linear" else softmax_attention_ref


def _qkv_impl(q: torch.Tensor, impl: str | None) -> str:
    impl = impl or ("triton" if q.device.type == "cuda" else "torch")
    if impl not in ("torch", "triton"):
        raise ValueError(f"unknown attention implementation {impl!r} for (q, k, v); choose torch or triton")
    return impl


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """``linear_attention_ref`` by ``impl`` (None: ``triton`` on CUDA, else ``torch``)."""
    if _qkv_impl(q, impl) == "torch":
        return linear_attention_ref(q, k, v)
    from retina_fast.kernels.attention import linear_attention as kernel

    return kernel(q, k, v)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, impl: str | None = None
                      ) -> torch.Tensor:
    """``softmax_attention_ref`` by ``impl`` (None: ``triton`` on CUDA, else ``torch``)."""
    if _qkv_impl(q, impl) == "torch":
        return softmax_attention_ref(q, k, v)
    from retina_fast.kernels.attention import softmax_attention as kernel

    return kernel(q, k, v)


def multihead_attention_cl(qkv: torch.Tensor, out: torch.Tensor, heads: int, dim: int, linear: bool,
                           graph=None) -> None:
    """The C++ kernel, unchecked: channels-last qkv (B, 3 heads dim, H, W) and out (B, heads dim, H, W) of
    one storage dtype. ``graph``: append to that OpGraph instead of running."""
    b, _, h, w = qkv.shape
    _ext.require().attention_cl(ptr(qkv), ptr(out), b, h * w, heads, dim, linear, is_bf16(qkv), graph=graph)


def multihead_attention(qkv: torch.Tensor, heads: int, dim: int, kind: str = "linear", *,
                        impl: str | None = None) -> torch.Tensor:
    """``multihead_attention_ref`` by ``impl``: ``torch``, ``triton`` (the (q, k, v) kernels inside the
    reference's reshape) or ``cpp`` (None: for a channels-last CPU qkv when the compiled core is there)."""
    if impl is None:
        if qkv.device.type == "cuda":
            impl = "triton"
        elif _ext.available() and qkv.dim() == 4 and qkv.is_contiguous(memory_format=torch.channels_last) \
                and qkv.dtype in (torch.float32, torch.bfloat16):
            impl = "cpp"
        else:
            impl = "torch"
    _reference(kind)
    if impl == "torch":
        return multihead_attention_ref(qkv, heads, dim, kind)
    if impl == "triton":
        fn = linear_attention if kind == "linear" else softmax_attention
        return multihead_attention_ref(qkv, heads, dim, kind, lambda q, k, v: fn(q, k, v, impl="triton"))
    if impl != "cpp":
        raise ValueError(f"unknown multihead_attention implementation {impl!r}; choose torch, triton or cpp")
    check_cl(qkv, "qkv")
    if heads <= 0 or dim <= 0 or qkv.shape[1] != 3 * heads * dim:
        raise ValueError(f"qkv has {qkv.shape[1]} channels, expected 3 * heads * dim = {3 * heads * dim}")
    b, _, h, w = qkv.shape
    out = empty_cl((b, heads * dim, h, w), qkv.dtype)
    multihead_attention_cl(qkv, out, heads, dim, kind == "linear")
    return out
