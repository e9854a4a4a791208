"""Engine benchmarks: each op against its torch reference, one U-Net step, decode, and a full sample.

Random weights (speed does not depend on training). Every benchmark checks its result against the
reference once before timing. Groups put each contender beside its reference in the table.
Run: pytest benchmarks/test_bench_engine.py --benchmark-json=benchmarks/results/<machine>.json
(paper-224 rows are marked slow; the GPU path has its own prepared command, benchmarks/gpu/run.sh).
"""
from __future__ import annotations

import pytest
import torch

from retina_fast import _ext, noise
from retina_fast.bench import random_pipeline
from retina_fast.ops import nearest_code, nearest_code_ref, sampler_step, sampler_step_ref
from retina_fast.samplers import plan
from retina_fast.schedules import cosine_schedule

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"extension not loaded: {_ext.load_error}")


@pytest.fixture(scope="module")
def tiny():
    return random_pipeline("tiny")


# --- ops ---------------------------------------------------------------------------------------------

@needs_ext
@pytest.mark.benchmark(group="nearest_code N=8192 K=1024 D=8")
@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_nearest_code(benchmark, impl):
    x, e = torch.randn(8192, 8), torch.randn(1024, 8)
    assert torch.equal(nearest_code(x, e, impl=impl)[0], nearest_code_ref(x, e)[0])
    benchmark(lambda: nearest_code(x, e, impl=impl))


@needs_ext
@pytest.mark.benchmark(group="sampler_step DDPM (16, 8, 16, 16)")
@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_sampler_step(benchmark, impl):
    c = plan("ddpm", cosine_schedule(1000), 50)[10]
    x, eps = torch.randn(16, 8, 16, 16), torch.randn(16, 8, 16, 16)
    keys = noise.derive_keys(0, range(16), 10, noise.STREAM_STEP)
    ref, _ = sampler_step_ref(x, eps, c, keys=keys)
    torch.testing.assert_close(sampler_step(x, eps, c, keys=keys, impl=impl)[0], ref, rtol=1e-5, atol=2e-6)
    benchmark(lambda: sampler_step(x, eps, c, keys=keys, impl=impl))


def _cl_bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


needs_bf16_conv = pytest.mark.skipif(not (_ext.available() and _ext.require().conv_bf16_supported()),
                                     reason="needs the extension on an AVX512-BF16 CPU")


@needs_ext
@pytest.mark.benchmark(group="GroupNorm+FiLM+SiLU bf16 channels-last (8, 32, 16, 16)")
@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_gn_silu(benchmark, impl):
    from retina_fast.ops.group_norm_silu import group_norm_silu, group_norm_silu_ref

    x, w, b = _cl_bf16(8, 32, 16, 16), torch.randn(32), torch.randn(32)
    sc, sh = torch.randn(8, 32), torch.randn(8, 32)
    wb, bb, scb, shb = w.bfloat16(), b.bfloat16(), sc.bfloat16()[:, :, None, None], sh.bfloat16()[:, :, None, None]
    ref = lambda: group_norm_silu_ref(x, 8, wb, bb, 1e-5, scb, shb)  # noqa: E731  (plain PyTorch at bf16)
    fn = ref if impl == "torch" else (lambda: group_norm_silu(x, 8, w, b, 1e-5, sc, sh, impl="cpp"))
    torch.testing.assert_close(fn().float(), ref().float(), rtol=3e-2, atol=3e-2)
    benchmark(fn)


@needs_ext
@pytest.mark.benchmark(group="linear attention bf16 B=8 heads=4 N=256 d=32")
@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_linear_attention(benchmark, impl):
    from retina_fast.ops.attention import linear_attention_ref, multihead_attention

    qkv = _cl_bf16(8, 384, 16, 16)

    def ref():
        q, k, v = qkv.reshape(8, 3, 4, 32, 256).transpose(-2, -1).unbind(1)
        return linear_attention_ref(q, k, v).transpose(-2, -1).reshape(8, 128, 16, 16)

    fn = ref if impl == "torch" else (lambda: multihead_attention(qkv, 4, 32, "linear", impl="cpp"))
    torch.testing.assert_close(fn().float(), ref().float(), rtol=3e-2, atol=3e-2)
    benchmark(fn)


@needs_bf16_conv
@pytest.mark.benchmark(group="conv3x3 bf16 channels-last (8, 32, 16, 16) -> 32")
@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_conv3x3_bf16(benchmark, impl):
    from retina_fast.ops.conv import conv2d_cl, pack_conv_weight

    x, w, b = _cl_bf16(8, 32, 16, 16), torch.randn(32, 32, 3, 3) * 0.05, torch.randn(32)
    wb = w.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ref = lambda: torch.nn.functional.conv2d(x, wb, b.bfloat16(), padding=1)  # noqa: E731
    packed = pack_conv_weight(w, torch.bfloat16)
    fn = ref if impl == "torch" else (lambda: conv2d_cl(x, packed, 32, (3, 3), 1, 1, b))
    torch.testing.assert_close(fn().float(), ref().float(), rtol=3e-2, atol=3e-2)
    benchmark(fn)


# --- one U-Net step and decode ----------------------------------------------------------------------

@pytest.mark.benchmark(group="tiny U-Net step B=8")
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext),
                                     pytest.param("cpu:bf16", marks=needs_bf16_conv)])
def test_unet_step(benchmark, tiny, backend):
    name, _, dt = backend.partition(":")
    runner = tiny.runner(name, "cpu", torch.bfloat16 if dt == "bf16" else None)
    x, t = torch.randn(8, *tiny.config.latent_shape), torch.full((8,), 500)
    ref = tiny.runner("torch", "cpu").denoise(x, t)
    err = ((runner.denoise(x, t) - ref).norm() / ref.norm()).item()
    assert err < (0.05 if runner.dtype == torch.bfloat16 else 1e-5)
    benchmark.extra_info["dtype"] = str(runner.dtype)
    benchmark(lambda: runner.denoise(x, t))


@pytest.mark.benchmark(group="tiny decode B=8")
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext)])
def test_decode(benchmark, tiny, backend):
    runner = tiny.runner(backend, "cpu")
    x0 = torch.rand(8, *tiny.config.latent_shape) * 2 - 1
    ref = tiny.runner("torch", "cpu").decode(x0)
    assert ((runner.decode(x0) - ref).norm() / ref.norm()).item() < 1e-4
    benchmark(lambda: runner.decode(x0))


# --- full sampling ----------------------------------------------------------------------------------

@pytest.mark.benchmark(group="tiny sample n=8 DDIM-50", min_rounds=2)
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext),
                                     pytest.param("cpu:bf16", marks=needs_bf16_conv)])
def test_sample_tiny(benchmark, tiny, backend):
    name, _, dt = backend.partition(":")
    dtype = torch.bfloat16 if dt == "bf16" else None
    tiny.sample(2, 2, backend=name, dtype=dtype)
    benchmark.pedantic(lambda: tiny.sample(8, 50, seed=0, backend=name, dtype=dtype), rounds=2, iterations=1)


@pytest.fixture(scope="module")
def paper224():
    return random_pipeline("paper-224")


@pytest.mark.slow
@pytest.mark.benchmark(group="paper-224 U-Net call (random weights)")
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("contender", ["torch", "plain:bf16", pytest.param("cpu", marks=needs_ext),
                                       pytest.param("cpu:bf16", marks=needs_bf16_conv), "compile", "compile:bf16"])
def test_unet_call_paper224(benchmark, paper224, batch, contender, compile_backend):
    """One paper-224 U-Net call (110.8 GFLOP per image) per contender; ``compile`` is torch.compile (inductor;
    ``--compile-backend`` to change), what a PyTorch user tries first (its compile is the untimed first call).
    Ratios measured side by side: benchmarks/bench_presets.py; on a GPU: benchmarks/gpu/run.sh."""
    from retina_fast import flops
    from retina_fast.bench import make_contender

    con = make_contender(paper224, contender, "cpu", compile_backend=compile_backend)
    x = torch.randn(batch, *paper224.config.latent_shape, generator=torch.Generator().manual_seed(batch))
    t = torch.full((batch,), 500)
    ref = paper224.runner("torch", "cpu").denoise(x, t)
    err = ((con.runner.denoise(x, t) - ref).norm() / ref.norm()).item()
    assert err < (1e-4 if con.dtype == torch.float32 else 0.05)
    benchmark.pedantic(lambda: con.runner.denoise(x, t), rounds=3, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the body ran once, nothing was timed
        return
    benchmark.extra_info.update(dtype=str(con.dtype), relative_l2_error=err, note=con.note,
                                gflop_per_s=flops.unet_flops(paper224.config.unet, 28, 28) * batch
                                / benchmark.stats["median"] / 1e9)
