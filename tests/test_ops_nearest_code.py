"""nearest_code: C++ and Triton implementations against the plain PyTorch reference."""
from __future__ import annotations

import os

import pytest
import torch

from retina_fast import _ext
from retina_fast.ops import nearest_code, nearest_code_ref

SHAPES = [(1, 3, 1), (97, 8, 7), (1025, 8, 1024), (59, 13, 97), (300, 32, 256)]
IMPLS = [pytest.param("cpp", marks=pytest.mark.skipif(not _ext.available(), reason=f"{_ext.load_error}")),
         pytest.param("triton", marks=pytest.mark.skipif(
             os.environ.get("TRITON_INTERPRET") != "1", reason="CPU run needs the Triton interpreter"))]


def _check_against_ref(x, e, idx, dist):
    ref_idx, ref_dist = nearest_code_ref(x, e)
    # indices may differ only where two codes are (numerically) equally near
    full = torch.cdist(x.double(), e.double()) ** 2
    chosen = full.gather(1, idx.cpu()[:, None]).squeeze(1)
    best = full.min(1).values
    assert torch.all(chosen - best <= 1e-4 * (1 + best)), "a non-nearest code was chosen"
    mismatch = (idx.cpu() != ref_idx).float().mean().item()
    assert mismatch <= 0.002
    torch.testing.assert_close(dist.cpu(), ref_dist, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d,k", SHAPES)
def test_matches_reference(impl, n, d, k):
    g = torch.Generator().manual_seed(n * 1000 + d * 10 + k)
    x = torch.randn(n, d, generator=g)
    e = torch.randn(k, d, generator=g)
    idx, dist = nearest_code(x, e, impl=impl)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32 and idx.shape == (n,)
    _check_against_ref(x, e, idx, dist)


@pytest.mark.parametrize("impl", ["torch"] + IMPLS)
def test_ties_pick_lowest_index_and_exact_hits(impl):
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]] * 40)  # duplicates across tiles
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.4]])
    idx, dist = nearest_code(x, e, impl=impl)
    assert idx.tolist() == [0, 1, 0]
    assert dist[:2].tolist() == [0.0, 0.0]


def test_bad_inputs():
    with pytest.raises(ValueError, match="channels"):
        nearest_code(torch.randn(4, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="empty"):
        nearest_code(torch.randn(4, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        nearest_code(torch.randn(4, 3, 1), torch.randn(5, 3))
    with pytest.raises(ValueError, match="unknown"):
        nearest_code(torch.randn(4, 3), torch.randn(5, 3), impl="fortran")


@pytest.mark.gpu
@pytest.mark.parametrize("n,d,k", SHAPES)
def test_triton_on_gpu(n, d, k):
    x = torch.randn(n, d, device="cuda")
    e = torch.randn(k, d, device="cuda")
    idx, dist = nearest_code(x, e, impl="triton")
    _check_against_ref(x.cpu(), e.cpu(), idx, dist)
