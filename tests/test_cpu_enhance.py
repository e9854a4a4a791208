"""The cpu enhancer's fused C++ ops (retina_fast/ops/resize.py, ops/channel_attention.py,
csrc/cpu/enhance_ops_cpu.cpp) against their PyTorch references on odd shapes, both storage types, and MAGE-Net
run with the cpu enhancer's op table (retina_fast/backends/cpu_enhance.py) against the reference module."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from retina_fast import _ext
from retina_fast.backends.cpu_enhance import enhance_table
from retina_fast.models.magenet import MAGENet, MAGENetConfig
from retina_fast.ops.channel_attention import channel_attention, channel_attention_ref
from retina_fast.ops.resize import bilinear_resize
from retina_fast.ops.table import use_table

pytestmark = pytest.mark.skipif(not _ext.available(), reason="needs the compiled core retina_fast._C")


@pytest.fixture(params=["vector", "scalar"])
def kernels(request):
    """Both code paths: the AVX-512 kernels (where the CPU has them) and the scalar fallback."""
    _ext.require().enhance_ops_scalar_only(request.param == "scalar")
    yield request.param
    _ext.require().enhance_ops_scalar_only(False)


def cl(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def bf16_close(got: torch.Tensor, want_fp32: torch.Tensor) -> None:
    """got was rounded once from fp32 maths: within one bf16 step (2^-8 relative) of the exact result."""
    torch.testing.assert_close(got.float(), want_fp32, rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("shape,size", [((1, 16, 256, 256), (512, 512)), ((2, 3, 7, 5), (14, 10)),
                                        ((1, 5, 9, 13), (20, 31)), ((2, 24, 32, 32), (16, 16)),
                                        ((1, 4, 1, 1), (3, 4)), ((3, 1, 6, 6), (6, 6)), ((1, 17, 11, 7), (5, 3))])
def test_upsample_bilinear_matches_interpolate(shape, size, kernels):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen)
    add = torch.randn(shape[0], shape[1], *size, generator=gen)
    want = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(bilinear_resize(cl(x), size, impl="cpp"), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bilinear_resize(cl(x), size, add=cl(add), impl="cpp"), want + add,
                               rtol=1e-5, atol=1e-5)
    xb, addb = cl(x, torch.bfloat16), cl(add, torch.bfloat16)
    want_b = F.interpolate(xb.float(), size=size, mode="bilinear", align_corners=False)
    got = bilinear_resize(xb, size, add=addb, impl="cpp")
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    bf16_close(got, want_b + addb.float())


@pytest.mark.parametrize("shape,r", [((1, 16, 64, 64), 4), ((3, 12, 7, 5), 3), ((2, 5, 1, 9), 1),
                                     ((1, 32, 33, 17), 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ca_residual_matches_channel_attention_plus_input(shape, r, dtype, kernels):
    gen = torch.Generator().manual_seed(shape[1] + r)
    body, x = torch.randn(*shape, generator=gen).to(dtype), torch.randn(*shape, generator=gen).to(dtype)
    c = shape[1]
    w_down, w_up = torch.randn(r, c, 1, 1, generator=gen), torch.randn(c, r, 1, 1, generator=gen)
    want = channel_attention_ref(body.float(), w_down, w_up) + x.float()
    got = channel_attention(cl(body, dtype), w_down, w_up, cl(x, dtype), impl="cpp")
    assert got.dtype == dtype and got.shape == body.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        bf16_close(got, want)


def test_fused_enhance_ops_reject_bad_inputs():
    x = cl(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="channels-last"):
        bilinear_resize(torch.randn(1, 4, 8, 8), (16, 16), impl="cpp")
    with pytest.raises(ValueError, match="size must be positive"):
        bilinear_resize(x, (0, 16), impl="cpp")
    with pytest.raises(ValueError, match="add must be"):
        bilinear_resize(x, (16, 16), add=cl(torch.randn(1, 4, 8, 8)), impl="cpp")
    with pytest.raises(ValueError, match="float32/bfloat16"):
        bilinear_resize(x.half(), (16, 16), impl="cpp")
    with pytest.raises(ValueError, match="residual must match x"):
        channel_attention(x, torch.randn(1, 4), torch.randn(4, 1), cl(torch.randn(1, 4, 8, 9)), impl="cpp")
    with pytest.raises(ValueError, match="w_down must be"):
        channel_attention(x, torch.randn(2, 4), torch.randn(4, 3), x, impl="cpp")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("config", [MAGENetConfig(), MAGENetConfig(use_rsp=False), MAGENetConfig(stage1_only=True),
                                    MAGENetConfig(output_gate=True)])
def test_accelerated_magenet_matches_the_reference_in_fp32(config):
    torch.manual_seed(0)
    net = MAGENet(config).eval()
    if config.output_gate:  # a gate that varies over the image (it starts constant)
        torch.nn.init.normal_(net.gate.weight, std=0.3)
        torch.nn.init.normal_(net.gate.bias, std=1.0)
    fast = copy.deepcopy(net).to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 45, 37)
    with torch.no_grad():
        want = net.restore(x)
        with use_table(enhance_table()):
            got = fast.restore(cl(x))
            traced = torch.jit.freeze(torch.jit.trace(_Restore(fast).eval(), cl(x), check_trace=False))
        got_traced = traced(cl(x))  # the trace recorded the fused custom ops: no table needed to replay
    assert "retina_fast::ca_residual_cl" in str(traced.graph) and "retina_fast::upsample_bilinear_cl" in \
        str(traced.graph)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_traced, want, rtol=1e-4, atol=1e-5)


class _Restore(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.restore(x)
