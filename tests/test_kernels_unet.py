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
def test_group_norm_silu(b, c, h, w, g, cond, act):
    from retina_fast.kernels.group_norm_silu import group_norm_silu

    gen = torch.Generator().manual_seed(b * c + h)
    x = (torch.randn(b, c, h, w, generator=gen) * 3 + 1).to(_dev())
    wt, bs = torch.randn(c, generator=gen).to(_dev()), torch.randn(c, generator=gen).to(_dev())
    sc = sh = None
    if cond == "scale_shift":
        sc, sh = (torch.randn(b, c, 1, 1, generator=gen).to(_dev()) for _ in range(2))
    ref = group_norm_silu_ref(x, g, wt, bs, 1e-5, sc, sh, act)
    out = group_norm_silu(x, g, wt, bs, 1e-5, sc, sh, act, block=64)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("b,h,n,d", [(1, 1, 1, 32), (2, 3, 59, 32), (1, 2, 97, 16), (2, 8, 64, 32)])
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
