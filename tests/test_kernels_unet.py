"""Triton U-Net kernels (GroupNorm+SiLU, flash softmax attention, fused linear attention) against the
plain PyTorch references in retina_fast.models, on odd shapes (interpreter on CPU, real on GPU)."""
from __future__ import annotations

import os

import pytest
import torch

from retina_fast.ops.attention import linear_attention_ref, softmax_attention_ref
from retina_fast.ops.group_norm_silu import group_norm_silu_ref

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or the Triton interpreter")


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("b,c,h,w,g", [(1, 8, 1, 1, 4), (2, 16, 7, 9, 8), (3, 24, 13, 5, 4), (2, 64, 16, 16, 8)])
@pytest.mark.parametrize("cond", ["none", "scale_shift"])
@pytest.mark.parametrize("act", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_group_norm_silu(b, c, h, w, g, cond, act, layout):
    from retina_fast.kernels.group_norm_silu import group_norm_silu

    gen = torch.Generator().manual_seed(b * c + h)
    x = _layout((torch.randn(b, c, h, w, generator=gen) * 3 + 1).to(_dev()), layout)
    wt, bs = torch.randn(c, generator=gen).to(_dev()), torch.randn(c, generator=gen).to(_dev())
    sc = sh = None
    if cond == "scale_shift":
        sc, sh = (torch.randn(b, c, 1, 1, generator=gen).to(_dev()) for _ in range(2))
    ref = group_norm_silu_ref(x, g, wt, bs, 1e-5, sc, sh, act)
    out = group_norm_silu(x, g, wt, bs, 1e-5, sc, sh, act, block=64)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert out.stride() == x.stride()  # the result keeps the input's layout


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x.contiguous()


@pytest.mark.parametrize("b,c,h,w,g", [(2, 24, 13, 7, 4), (1, 48, 5, 3, 8), (2, 40, 9, 11, 5)])
@pytest.mark.parametrize("block", [16, 64, 1024])
def test_group_norm_silu_nhwc_equals_nchw(b, c, h, w, g, block):
    """The channels-last kernel (tiles of pixels x a group's channels; C/G not a power of two, tiles smaller
    than a group's channels at block 16) gives what the NCHW kernel gives on the same values, to rounding."""
    from retina_fast.kernels.group_norm_silu import group_norm_silu, is_nhwc

    gen = torch.Generator().manual_seed(c + h * w)
    x = (torch.randn(b, c, h, w, generator=gen) * 2 - 0.5).to(_dev())
    wt, bs = torch.randn(c, generator=gen).to(_dev()), torch.randn(c, generator=gen).to(_dev())
    sc, sh = (torch.randn(b, c, 1, 1, generator=gen).to(_dev()) for _ in range(2))
    xl = x.contiguous(memory_format=torch.channels_last)
    assert is_nhwc(xl) and not is_nhwc(x)
    a = group_norm_silu(x, g, wt, bs, 1e-5, sc, sh, block=block)
    b_ = group_norm_silu(xl, g, wt, bs, 1e-5, sc, sh, block=block)
    assert b_.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(b_, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_, group_norm_silu_ref(x, g, wt, bs, 1e-5, sc, sh), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("b,c,h,w,g", [(2, 24, 13, 7, 4), (1, 40, 9, 11, 8), (3, 16, 29, 31, 2)])
@pytest.mark.parametrize("mean_over_std", [100.0, 1000.0])
@pytest.mark.parametrize("block", [64, 1024])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_group_norm_silu_large_mean(b, c, h, w, g, mean_over_std, block, layout):
    """Groups far from zero mean (activations after a large bias): the variance must not come from
    E[x^2] - E[x]^2, which at mean/std = 1000 leaves ~1 significant digit in fp32. Errors against float64
    on the same fp32 input: err(kernel) <= 2 * err(torch fp32) + atol."""
    from retina_fast.kernels.group_norm_silu import group_norm_silu

    gen = torch.Generator().manual_seed(c * h + w)
    std = 0.37
    offset = mean_over_std * std * (1 + torch.rand(b, g, 1, generator=gen, dtype=torch.float64))
    x = (torch.randn(b, g, c // g * h * w, generator=gen, dtype=torch.float64) * std + offset).reshape(b, c, h, w).float()
    wt, bs = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    sc, sh = (torch.randn(b, c, 1, 1, generator=gen) for _ in range(2))
    exact = group_norm_silu_ref(x.double(), g, wt.double(), bs.double(), 1e-5, sc.double(), sh.double())
    torch_err = (group_norm_silu_ref(x, g, wt, bs, 1e-5, sc, sh).double() - exact).abs().max().item()
    dev = _dev()
    out = group_norm_silu(_layout(x.to(dev), layout), g, wt.to(dev), bs.to(dev), 1e-5, sc.to(dev), sh.to(dev),
                          block=block)
    err = (out.cpu().double() - exact).abs().max().item()
    assert err <= 2 * torch_err + 1e-5, (err, torch_err)


@pytest.mark.parametrize("b,h,n,d", [(1, 1, 1, 32), (2, 3, 59, 32), (1, 2, 97, 16), (2, 8, 64, 32), (1, 4, 256, 32)])
def test_flash_softmax_attention(b, h, n, d):
    from retina_fast.kernels.attention import softmax_attention

    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(_dev()) * 2 for _ in range(3))
    torch.testing.assert_close(softmax_attention(q, k, v, 32, 32), softmax_attention_ref(q, k, v),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("b,h,n,d", [(1, 1, 1, 32), (2, 3, 59, 32), (1, 2, 97, 16), (2, 8, 256, 32)])
def test_fused_linear_attention(b, h, n, d):
    from retina_fast.kernels.attention import linear_attention

    gen = torch.Generator().manual_seed(n + 1)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(_dev()) * 3 for _ in range(3))
    torch.testing.assert_close(linear_attention(q, k, v, 32), linear_attention_ref(q, k, v),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "softmax"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_multihead_attention_keeps_channels_last(kind, impl):
    """A channels-last qkv (the cuda backend's NHWC layout) gives a channels-last result equal to the NCHW
    route's; odd token counts (7 x 5)."""
    from retina_fast.ops.attention import linear_attention, multihead_attention_ref, softmax_attention

    gen = torch.Generator().manual_seed(3)
    heads, dim = 3, 8
    qkv = torch.randn(2, 3 * heads * dim, 7, 5, generator=gen).to(_dev())
    fn = linear_attention if kind == "linear" else softmax_attention
    attend = lambda q, k, v: fn(q, k, v, impl=impl)  # noqa: E731
    want = multihead_attention_ref(qkv, heads, dim, kind, attend)
    got = multihead_attention_ref(qkv.contiguous(memory_format=torch.channels_last), heads, dim, kind, attend)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cuda_layout_setting(monkeypatch):
    from retina_fast.backends.runners import cuda_layout

    monkeypatch.delenv("RETINA_FAST_CUDA_LAYOUT", raising=False)
    assert cuda_layout() == "nchw" and cuda_layout("nhwc") == "nhwc"
    monkeypatch.setenv("RETINA_FAST_CUDA_LAYOUT", "nhwc")
    assert cuda_layout() == "nhwc" and cuda_layout("nchw") == "nchw"
    monkeypatch.setenv("RETINA_FAST_CUDA_LAYOUT", "NHWC")
    with pytest.raises(ValueError, match="RETINA_FAST_CUDA_LAYOUT='NHWC': use one of nchw, nhwc"):
        cuda_layout()
    with pytest.raises(ValueError, match="layout='cl'"):
        cuda_layout("cl")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_error_is_within_twice_torch(dtype):
    """err(kernel, ref_fp32) <= 2 * err(torch at dtype, ref_fp32) + atol (flash-attention's rule)."""
    from retina_fast.kernels.attention import linear_attention, softmax_attention

    q, k, v = (torch.randn(2, 8, 256, 32, device="cuda") for _ in range(3))
    for kern, ref in [(softmax_attention, softmax_attention_ref), (linear_attention, linear_attention_ref)]:
        exact = ref(q, k, v)
        torch_err = (ref(q.to(dtype), k.to(dtype), v.to(dtype)).float() - exact).abs().max()
        kern_err = (kern(q.to(dtype), k.to(dtype), v.to(dtype)).float() - exact).abs().max()
        assert kern_err <= 2 * torch_err + 1e-3
