"""The cpu backend's fused U-Net path: C++ channels-last ops against their PyTorch references on fresh random
inputs and odd shapes (vector fast paths and the generic fallback), and FusedCPUUNet against UNet2D."""
from __future__ import annotations

import pytest
import torch

from retina_fast import _ext
from retina_fast.backends import cpu_graph, cpu_unet
from retina_fast.backends.cpu_pack import mkldnn_usable
from retina_fast.models.config import UNetConfig
from retina_fast.models.unet import UNet2D
from retina_fast.ops import conv
from retina_fast.ops.attention import linear_attention_ref, multihead_attention, softmax_attention_ref
from retina_fast.ops.channel_norm import channel_norm
from retina_fast.ops.group_norm_silu import group_norm_silu, group_norm_silu_ref

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not loaded: {_ext.load_error}")

needs_mkldnn = pytest.mark.skipif(not mkldnn_usable(), reason="torch built without oneDNN")

# bf16 storage: inputs are rounded to bf16 before the reference sees them, so the only difference left is the
# rounding of the output (2^-9 relative) plus fp32 summation order.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def cl(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def relerr(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,c,g,h,w", [(3, 32, 8, 5, 7), (2, 64, 32, 4, 4), (1, 48, 4, 3, 9), (2, 12, 3, 6, 5),
                                       (4, 128, 8, 2, 3), (1, 16, 4, 1, 2)])
@pytest.mark.parametrize("film,residual,act", [(True, False, True), (False, True, True), (False, False, False),
                                                (True, True, False)])
def test_gn_silu_matches_reference(dtype, b, c, g, h, w, film, residual, act):
    x = cl(torch.randn(b, c, h, w) * 3 + 1, dtype)
    weight, bias = torch.randn(c), torch.randn(c)
    scale = torch.randn(b, c) if film else None
    shift = torch.randn(b, c) if film else None
    res = cl(torch.randn(b, c, h, w), dtype) if residual else None
    got = group_norm_silu(x, g, weight, bias, 1e-5, scale, shift, act, residual=res, impl="cpp")
    want = group_norm_silu_ref(x.float(), g, weight, bias, 1e-5, scale[:, :, None, None] if film else None,
                               shift[:, :, None, None] if film else None, act)
    if residual:
        want = want + res.float()
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), want.to(dtype).float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 32, 5, 3), (1, 7, 4, 4), (3, 128, 2, 2)])
def test_channel_norm_matches_reference(dtype, shape):
    x = cl(torch.randn(shape) * 2 - 1, dtype)
    var, mean = torch.var_mean(x.float(), dim=1, unbiased=False, keepdim=True)
    want = (x.float() - mean) * torch.rsqrt(var + 1e-5)
    torch.testing.assert_close(channel_norm(x, impl="cpp").float(), want.to(dtype).float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("linear", [True, False])
@pytest.mark.parametrize("b,heads,dim,h,w", [(2, 4, 32, 5, 7), (1, 2, 16, 3, 3), (3, 1, 64, 4, 2),
                                             (2, 3, 8, 2, 5), (1, 2, 40, 6, 1), (2, 4, 32, 16, 16)])
def test_attention_matches_reference(dtype, linear, b, heads, dim, h, w):
    qkv = cl(torch.randn(b, 3 * heads * dim, h, w) * 2, dtype)
    got = multihead_attention(qkv, heads, dim, "linear" if linear else "softmax", impl="cpp")
    # the module's own reshape: channels (3, heads, dim), tokens h * w
    q, k, v = qkv.float().reshape(b, 3, heads, dim, h * w).transpose(-2, -1).unbind(1)
    out = (linear_attention_ref if linear else softmax_attention_ref)(q, k, v)
    want = out.transpose(-2, -1).reshape(b, heads * dim, h, w)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), want.to(dtype).float(), **TOL[dtype])


def test_bad_inputs_are_rejected_with_a_reason():
    x = torch.randn(2, 32, 4, 4)  # contiguous NCHW, not channels-last
    with pytest.raises(ValueError, match="channels-last"):
        group_norm_silu(x, 8, torch.ones(32), torch.zeros(32), 1e-5, impl="cpp")
    with pytest.raises(ValueError, match="divide"):
        group_norm_silu(cl(x, torch.float32), 5, torch.ones(32), torch.zeros(32), 1e-5, impl="cpp")
    with pytest.raises(ValueError, match=r"weight/bias must be \(32,\)"):
        group_norm_silu(cl(x, torch.float32), 8, torch.ones(16), torch.zeros(32), 1e-5, impl="cpp")
    with pytest.raises(ValueError, match="float32/bfloat16"):
        channel_norm(cl(x, torch.float16), impl="cpp")
    with pytest.raises(ValueError, match="3 \\* heads \\* dim"):
        multihead_attention(cl(torch.randn(1, 30, 2, 2), torch.float32), 2, 8, "linear", impl="cpp")
    with pytest.raises(ValueError, match="residual must match"):
        group_norm_silu(cl(x, torch.float32), 8, torch.ones(32), torch.zeros(32), 1e-5,
                        residual=cl(x, torch.bfloat16), impl="cpp")


def _unet(seed: int, **kw) -> UNet2D:
    torch.manual_seed(seed)
    net = UNet2D(UNetConfig(**kw)).eval()
    with torch.no_grad():  # non-trivial norm gains and biases (fresh modules have ones / zeros)
        for name, p in net.named_parameters():
            if name.endswith(("norm_act.weight", "norm.gamma")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("norm_act.bias"):
                p.copy_(0.3 * torch.randn_like(p))
    return net


UNETS = {
    "tiny-like": dict(in_channels=8, base_channels=32, channel_mults=(1, 2, 4), attn_heads=4, attn_head_dim=32),
    "odd": dict(in_channels=3, base_channels=12, channel_mults=(1, 2), attn_heads=3, attn_head_dim=8, groups=4,
                init_kernel=3),
    "two-level-64": dict(in_channels=4, base_channels=16, channel_mults=(1, 4), attn_heads=2, attn_head_dim=64,
                         groups=8, num_res_blocks=1),
    "softmax-levels": dict(in_channels=3, base_channels=12, channel_mults=(1, 2, 2), attn_heads=3, attn_head_dim=8,
                           groups=4, init_kernel=3, softmax_attn_levels=(0, 1)),
}


@needs_mkldnn
@pytest.mark.parametrize("library", ["direct", "onednn"])
@pytest.mark.parametrize("name", list(UNETS))
@pytest.mark.parametrize("side", [(8, 8), (7, 5)])  # (7, 5): not divisible by 2**(levels-1): pad and crop
def test_fused_unet_fp32_matches_the_module(name, side, library):
    net = _unet(3, **UNETS[name])
    fused = cpu_unet.FusedCPUUNet(net, torch.float32, library)
    assert fused.library == library and fused.graphs == (library == "direct" and conv.direct_conv_usable(
        torch.float32))
    x = torch.randn(3, net.config.in_channels, *side)
    t = torch.tensor([0, 417, 999])
    with torch.no_grad():
        want = net(x, t)
        got = fused(x, t)
        again = fused(x, t)  # second call: cached FiLM and packed weights
    assert got.shape == want.shape and got.dtype == torch.float32
    assert relerr(got, want) < 2e-6
    assert torch.equal(got, again)


@needs_mkldnn
@pytest.mark.parametrize("library", ["direct", "onednn"])
@pytest.mark.parametrize("name", list(UNETS))
def test_fused_unet_bf16_error_is_that_of_the_module_at_bf16(name, library):
    """Also for a U-Net with fewer than 16 channels inside ("odd": the row form is for the graph's input only)."""
    net = _unet(4, **UNETS[name])
    x, t = torch.randn(4, net.config.in_channels, 16, 16), torch.tensor([3, 250, 600, 990])
    with torch.no_grad():
        ref = net(x, t)
        plain = net.to(torch.bfloat16)(x.bfloat16(), t).float()
        net.float()
        got = cpu_unet.FusedCPUUNet(net, torch.bfloat16, library)(x, t)
    assert relerr(got, ref) <= 1.5 * relerr(plain, ref) + 1e-3


@needs_mkldnn
@pytest.mark.parametrize("library", ["direct", "onednn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_unet_image_does_not_depend_on_batch(dtype, library):
    """Bit-identical when every op is a per-image C++ kernel (``batch_invariant``), whatever the batch size
    (odd ones too) and split, also with a different timestep per image; otherwise (oneDNN convolutions)
    within fp32 rounding."""
    net = _unet(5, **UNETS["tiny-like"])
    fused = cpu_unet.FusedCPUUNet(net, dtype, library)
    x, t = torch.randn(7, 8, 16, 16), torch.tensor([321, 321, 5, 321, 999, 5, 321])
    whole = fused(x, t)
    for cuts in ((0, 1, 4, 7), (0, 3, 5, 7), (0, 2, 3, 6, 7)):
        parts = torch.cat([fused(x[a:b], t[a:b]) for a, b in zip(cuts, cuts[1:])])
        if fused.batch_invariant:
            assert torch.equal(parts, whole)
        else:
            # fp32 rounding; bf16 through oneDNN: a bf16 step of the output (the runner pads such batches)
            torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5 if dtype == torch.float32 else 0.1)
    assert fused.batch_invariant == (library == "direct" and conv.direct_conv_usable(dtype))


def test_fused_unet_rejects_wrong_input():
    net = _unet(6, **UNETS["odd"])
    fused = cpu_unet.FusedCPUUNet(net, torch.float32)
    with pytest.raises(ValueError, match="expects"):
        fused(torch.randn(1, 4, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="dtype"):
        cpu_unet.FusedCPUUNet(net, torch.float16)


needs_bf16_conv = pytest.mark.skipif(not conv.direct_bf16_conv_usable(), reason="CPU lacks AVX512-BF16")
DIRECT_DTYPES = [pytest.param(torch.float32, marks=pytest.mark.skipif(
                     not conv.direct_conv_usable(torch.float32), reason="CPU lacks AVX-512")),
                 pytest.param(torch.bfloat16, marks=needs_bf16_conv)]


def _close_to(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32: the reference up to summation order; bf16: fp32 accumulation in a different order, then one bf16
    rounding: within one bf16 step of the reference rounded to bf16."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), rtol=8e-3, atol=8e-3)


@pytest.mark.parametrize("dtype", DIRECT_DTYPES)
@pytest.mark.parametrize("b,c,n,h,w,k,stride,pad", [
    (2, 32, 32, 16, 16, 3, 1, 1), (3, 8, 32, 9, 7, 7, 1, 3), (1, 64, 384, 5, 3, 1, 1, 0),
    (2, 32, 32, 8, 6, 4, 2, 1), (1, 2, 8, 4, 4, 3, 1, 1), (2, 130, 40, 3, 5, 3, 1, 1),
    (1, 16, 48, 1, 1, 1, 1, 0), (5, 128, 64, 4, 4, 3, 1, 1), (1, 6, 17, 11, 13, 3, 2, 0),
])
@pytest.mark.parametrize("with_bias,with_res", [(True, False), (False, True), (True, True)])
def test_direct_conv_matches_fp32_conv_of_the_same_values(dtype, b, c, n, h, w, k, stride, pad, with_bias,
                                                          with_res):
    x = cl(torch.randn(b, c, h, w), dtype)
    weight = (torch.randn(n, c, k, k) / (c * k * k) ** 0.5).to(dtype)
    bias = torch.randn(n) if with_bias else None
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    res = cl(torch.randn(b, n, ho, wo), dtype) if with_res else None
    got = conv.conv2d_cl(x, conv.pack_conv_weight(weight, dtype), n, (k, k), stride, pad, bias, res)
    want = torch.nn.functional.conv2d(x.float(), weight.float(), bias, stride=stride, padding=pad)
    if with_res:
        want = want + res.float()
    assert got.shape == (b, n, ho, wo) and got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    _close_to(got, want)


@pytest.mark.parametrize("dtype", DIRECT_DTYPES)
@pytest.mark.parametrize("c", [5, 17, 3])
def test_fp32_direct_conv_takes_odd_channel_counts(dtype, c):
    """bf16 packs channel pairs (even counts only); fp32 takes any count."""
    weight = torch.randn(11, c, 3, 3) / (3 * c) ** 0.5
    if dtype == torch.bfloat16:
        with pytest.raises(ValueError, match="even input channel"):
            conv.pack_conv_weight(weight, dtype)
        return
    x = cl(torch.randn(3, c, 7, 5), dtype)
    got = conv.conv2d_cl(x, conv.pack_conv_weight(weight, dtype), 11, (3, 3), 1, 1)
    _close_to(got, torch.nn.functional.conv2d(x, weight, padding=1))


@needs_bf16_conv
def test_direct_conv_rejects_bad_arguments():
    x = cl(torch.randn(1, 4, 5, 5), torch.bfloat16)
    packed = conv.pack_conv_weight(torch.randn(8, 4, 3, 3), torch.bfloat16)
    with pytest.raises(ValueError, match="does not fit"):
        conv.conv2d_cl(x, packed, 8, (1, 1), 1, 0)
    with pytest.raises(ValueError, match="even input channel"):
        conv.pack_conv_weight(torch.randn(8, 3, 3, 3), torch.bfloat16)
    with pytest.raises(ValueError, match="does not fit"):  # fp32 input, bf16 weights
        conv.conv2d_cl(cl(torch.randn(1, 4, 5, 5), torch.float32), packed, 8, (3, 3), 1, 1)
    with pytest.raises(ValueError, match="residual"):
        conv.conv2d_cl(x, packed, 8, (3, 3), 1, 1, residual=cl(torch.randn(1, 8, 4, 4), torch.bfloat16))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        conv.pack_conv_weight(torch.randn(8, 4, 3, 3), torch.float16)


@pytest.mark.parametrize("dtype", DIRECT_DTYPES)
def test_direct_conv_output_does_not_depend_on_batch(dtype):
    x = cl(torch.randn(7, 32, 6, 6), dtype)
    packed = conv.pack_conv_weight(torch.randn(64, 32, 3, 3) * 0.05, dtype)
    whole = conv.conv2d_cl(x, packed, 64, (3, 3), 1, 1)
    for lo, hi in ((0, 1), (1, 4), (4, 7), (2, 5)):
        assert torch.equal(conv.conv2d_cl(x[lo:hi].contiguous(memory_format=torch.channels_last),
                                              packed, 64, (3, 3), 1, 1), whole[lo:hi])


@pytest.mark.parametrize("dtype", DIRECT_DTYPES)
@pytest.mark.parametrize("b,c,n,h,w", [(2, 32, 32, 8, 8), (1, 64, 64, 4, 4), (3, 16, 40, 5, 3), (1, 128, 8, 1, 2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_direct_transposed_conv_matches_conv_transpose2d(dtype, b, c, n, h, w, with_bias):
    x = cl(torch.randn(b, c, h, w), dtype)
    weight = (torch.randn(c, n, 4, 4) / (c * 4) ** 0.5).to(dtype)
    bias = torch.randn(n) if with_bias else None
    got = conv.conv_transpose2d_k4s2p1_cl(x, conv.pack_conv_transpose_k4s2p1(weight, dtype), n, bias)
    want = torch.nn.functional.conv_transpose2d(x.float(), weight.float(), bias, stride=2, padding=1)
    assert got.shape == want.shape == (b, n, 2 * h, 2 * w)
    _close_to(got, want)


@pytest.mark.parametrize("dtype", DIRECT_DTYPES)
@pytest.mark.parametrize("b,c,n,h,w,k,pad", [(2, 8, 32, 16, 16, 7, 3), (1, 3, 40, 5, 9, 6, 2), (3, 4, 8, 7, 6, 5, 0),
                                             (1, 2, 64, 3, 3, 3, 1)])
def test_row_form_conv_matches_conv2d(dtype, b, c, n, h, w, k, pad):
    x = cl(torch.randn(b, c, h, w), dtype)
    weight = (torch.randn(n, c, k, k) / (c * k * k) ** 0.5).to(dtype)
    bias = torch.randn(n)
    got = conv.conv2d_rows_cl(x, conv.pack_conv_rows(weight, dtype), n, (k, k), pad, bias)
    want = torch.nn.functional.conv2d(x.float(), weight.float(), bias, padding=pad)
    assert got.shape == want.shape
    _close_to(got, want)


@pytest.mark.parametrize("dtype", DIRECT_DTYPES)
@pytest.mark.parametrize("name", ["tiny-like", "two-level-64"])
@pytest.mark.parametrize("side", [(16, 16), (7, 5)])
def test_graph_replay_equals_the_eager_fused_forward(dtype, name, side):
    """With the direct convolutions every op is a C++ op, so the forward is recorded once per input shape as an
    OpGraph and replayed; it must give exactly what running the same ops one by one from Python gives."""
    net = _unet(7, **UNETS[name])
    fused = cpu_unet.FusedCPUUNet(net, dtype)
    assert fused.graphs
    c = net.config.in_channels
    for seed in (0, 1):  # the second input goes through the already captured graph (buffers refilled)
        gen = torch.Generator().manual_seed(seed)
        x, t = torch.randn(3, c, *side, generator=gen), torch.tensor([5, 400, 870])
        replayed = fused(x, t)
        fused.graphs = False
        eager = fused(x, t)
        fused.graphs = True
        assert torch.equal(replayed, eager)
    graphs = [k for k in fused.programs.parts if k[-2]]  # keys (batch, h, w, graphs, cores)
    assert len(graphs) == 1
    parts = fused.programs.parts[graphs[0]]  # one graph per core
    assert [p.size for p in parts] == cpu_graph.split_batch(3, fused.cores)
    ex = parts[0].executor
    assert isinstance(ex, cpu_graph.GraphExecutor)
    # activations share one arena: smaller than one buffer per op output, at least the largest buffer
    assert max(b[0] for b in ex.buffers) <= ex.arena.numel() < sum(b[0] for b in ex.buffers)
    fused(torch.randn(2, c, *side), torch.tensor([1, 2]))  # a new batch size records a second graph
    assert len([k for k in fused.programs.parts if k[-2]]) == 2
    profile = ex.graph.profile(3)
    assert len(profile) == len(ex.graph) and all(s >= 0 for _, s in profile)
    assert {name.split()[0] for name, _ in profile} >= {"conv", "gn_silu", "channel_norm", "concat"}
    # the residual adds were folded into their producers: no separate add op
    assert "add" not in {name.split()[0] for name, _ in profile}


def test_split_batch_sizes():
    assert cpu_graph.split_batch(8, 2) == [4, 4]
    assert cpu_graph.split_batch(5, 2) == [3, 2]
    assert cpu_graph.split_batch(1, 2) == [1]
    assert cpu_graph.split_batch(7, 1) == [7]
    assert cpu_graph.split_batch(3, 8) == [1, 1, 1]


@needs_bf16_conv
def test_graphs_replayed_one_per_core_equal_one_graph():
    net = _unet(5, **UNETS["tiny-like"])
    fused = cpu_unet.FusedCPUUNet(net, torch.bfloat16)
    x, t = torch.randn(5, net.config.in_channels, 16, 16), torch.tensor([3, 50, 400, 700, 999])
    fused.cores = 1
    one = fused(x, t)
    fused.cores = 2
    two = fused(x, t)
    assert len(fused.programs.get(5, (16, 16))) == 2
    assert torch.equal(one, two)


def test_plan_arena_never_overlaps_buffers_live_at_the_same_time():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        buffers = []
        for _ in range(int(torch.randint(1, 40, (1,), generator=gen))):
            first = int(torch.randint(0, 30, (1,), generator=gen))
            last = first + int(torch.randint(0, 10, (1,), generator=gen))
            buffers.append([int(torch.randint(1, 5000, (1,), generator=gen)), first, last])
        offsets, size = cpu_graph.plan_arena(buffers)
        assert all(o % 64 == 0 for o in offsets)
        for i, (ni, fi, li) in enumerate(buffers):
            assert offsets[i] + ni <= size
            for j, (nj, fj, lj) in enumerate(buffers[:i]):
                if fi <= lj and fj <= li:  # live together: disjoint bytes
                    assert offsets[i] + ni <= offsets[j] or offsets[j] + nj <= offsets[i]
        assert size <= sum(-(-n // 64) * 64 for n, _, _ in buffers)
    # disjoint lifetimes share memory
    assert cpu_graph.plan_arena([[100, 0, 1], [100, 2, 3]]) == ([0, 0], 128)
    with pytest.raises(ValueError, match="repeats"):
        _ext.require().OpGraph().profile(0)


def test_fused_unet_without_the_direct_conv_runs_op_by_op(monkeypatch):
    """fp32 on a CPU without AVX-512: oneDNN convolutions, which cannot be recorded into an OpGraph and are
    chosen per batch size, so the U-Net says it is not batch invariant."""
    net = _unet(8, **UNETS["tiny-like"])
    from retina_fast.backends import cpu_pack

    monkeypatch.setattr(cpu_pack, "direct_conv_usable", lambda dtype: False)
    fused = cpu_unet.FusedCPUUNet(net, torch.float32)
    assert not fused.graphs and not fused.batch_invariant
    x, t = torch.randn(2, 8, 16, 16), torch.tensor([3, 500])
    with torch.no_grad():
        assert relerr(fused(x, t), net(x, t)) < 2e-6
