"""Phantom render speed: 224 x 224 x 16 on one CPU core must take under 50 ms (median).

Run: ``taskset -c 0 python -m pytest benchmarks/test_bench_phantom.py`` (pin to one core: NumPy's BLAS
ignores ``torch.set_num_threads``; the render only uses a few tiny matrix products anyway).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from retina_fast import phantom

BUDGET_S = 0.050


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_bench_render_224(benchmark, one_thread):
    seeds = itertools.count()
    phantom.render(10_000)  # warm the band tables and the workspace
    result = benchmark.pedantic(lambda: phantom.render(next(seeds), 224), rounds=40, iterations=1,
                                warmup_rounds=2)
    assert result.cube.shape == (16, 224, 224)
    if benchmark.stats is None:  # --benchmark-disable: the body ran once, nothing was timed
        return
    median = benchmark.stats.stats.median
    assert median < BUDGET_S, f"median render {median * 1e3:.1f} ms > {BUDGET_S * 1e3:.0f} ms"


@pytest.mark.parametrize("size", [64, 672])
def test_bench_render_sizes(benchmark, one_thread, size):
    seeds = itertools.count()
    benchmark.pedantic(lambda: phantom.render(next(seeds), size), rounds=8, iterations=1,
                       warmup_rounds=1)
