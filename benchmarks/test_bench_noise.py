"""16 M standard normals: retina_fast.noise (C++ Philox, OpenMP) against torch.randn, same machine, one run."""
from __future__ import annotations

import pytest
import torch

from retina_fast import _ext, noise

N = 16 * 1024 * 1024


@pytest.mark.benchmark(group="randn-16M")
def test_torch_randn(benchmark):
    gen = torch.Generator().manual_seed(0)
    out = benchmark(lambda: torch.randn(N, generator=gen))
    assert out.shape == (N,)


@pytest.mark.skipif(not _ext.available(), reason=f"extension not loaded: {_ext.load_error}")
@pytest.mark.benchmark(group="randn-16M")
def test_retina_fast_randn_cpp(benchmark):
    check = noise.randn(0, (4096,))
    torch.testing.assert_close(check, noise.randn(0, (4096,), impl="torch"), rtol=0, atol=2e-6)
    out = benchmark(lambda: noise.randn(0, (N,)))
    assert out.shape == (N,)


@pytest.mark.skipif(not (torch.backends.cuda.is_built() and torch.cuda.is_available()), reason="no CUDA GPU")
@pytest.mark.benchmark(group="randn-16M-cuda")
@pytest.mark.parametrize("impl", ["cuda", "triton", "torch.randn"])
def test_randn_cuda(benchmark, impl):
    def run():
        if impl == "torch.randn":
            x = torch.randn(N, device="cuda")
        else:
            x = noise.randn(0, (N,), device="cuda", impl=impl)
        torch.cuda.synchronize()
        return x

    benchmark(run)
