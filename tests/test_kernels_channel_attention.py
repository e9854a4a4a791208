"""Triton fused channel attention against ``retina_fast.ops.channel_attention.channel_attention_ref`` on odd shapes, NCHW and channels-last
(interpreter on CPU, real kernels on a GPU). Reduced precision: err(kernel) <= 2·err(torch same dtype) + atol,
both measured against the fp32 reference."""
from __future__ import annotations

import os

import pytest
import torch

from retina_fast.ops.channel_attention import channel_attention_ref

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or the Triton interpreter")


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n, c, h, w, r, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=gen) + 0.5).to(_dev())
    w1 = torch.randn(r, c, 1, 1, generator=gen).to(_dev()) * 0.5
    w2 = torch.randn(c, r, 1, 1, generator=gen).to(_dev()) * 0.5
    return x, w1, w2


@pytest.mark.parametrize("n,c,h,w,r", [(1, 4, 1, 1, 1), (2, 16, 7, 9, 4), (3, 24, 13, 5, 6), (1, 40, 17, 23, 10),
                                       (2, 96, 8, 8, 24)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_channel_attention_fp32(n, c, h, w, r, layout):
    from retina_fast.kernels.channel_attention import channel_attention

    x, w1, w2 = _inputs(n, c, h, w, r, c * h + w)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out = channel_attention(x, w1, w2, block_hw=16)
    torch.testing.assert_close(out, channel_attention_ref(x, w1, w2), rtol=1e-5, atol=1e-5)
    assert out.stride() == x.stride()  # same memory format as the input


def test_channel_attention_many_splits():
    """More H·W than one split covers: partial sums of several programs are reduced exactly once."""
    from retina_fast.kernels.channel_attention import channel_attention

    x, w1, w2 = _inputs(1, 8, 37, 41, 2, 7)
    out = channel_attention(x, w1, w2, block_hw=8, max_splits=9)
    torch.testing.assert_close(out, channel_attention_ref(x, w1, w2), rtol=1e-5, atol=1e-5)


def test_channel_attention_strided_input_is_copied():
    from retina_fast.kernels.channel_attention import channel_attention

    x, w1, w2 = _inputs(2, 8, 12, 20, 2, 3)
    view = x[..., ::2]  # stride_h != W * stride_w after slicing: the launcher must make it contiguous
    torch.testing.assert_close(channel_attention(view, w1, w2, block_hw=16), channel_attention_ref(view, w1, w2),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_channel_attention_reduced_precision_within_twice_torch(dtype):
    from retina_fast.kernels.channel_attention import channel_attention

    x, w1, w2 = _inputs(2, 24, 19, 11, 6, 11)
    ref = channel_attention_ref(x, w1, w2)
    xl, w1l, w2l = x.to(dtype), w1.to(dtype), w2.to(dtype)
    err_torch = (channel_attention_ref(xl, w1l, w2l).float() - ref).abs().max()
    err_kernel = (channel_attention(xl, w1l, w2l, block_hw=16).float() - ref).abs().max()
    assert err_kernel <= 2 * err_torch + 1e-3


def test_channel_attention_rejects_mismatched_weights():
    from retina_fast.kernels.channel_attention import channel_attention

    x, w1, w2 = _inputs(1, 8, 4, 4, 2, 0)
    with pytest.raises(ValueError, match="do not match"):
        channel_attention(x, w1[:, :4], w2)
