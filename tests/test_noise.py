"""The noise contract: Philox4x32-10, bit-compatible with triton.language.randn, on every implementation."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from retina_fast import _ext, noise

# Random123 known-answer vectors (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011;
# kat_vectors of the Random123 distribution): counter, key -> output
KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"extension not loaded: {_ext.load_error}")


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_known_answer_vectors(impl):
    counters = np.array([c for c, _, _ in KAT], dtype=np.uint32)
    keys = np.array([k for _, k, _ in KAT], dtype=np.uint32)
    expected = np.array([o for _, _, o in KAT], dtype=np.uint32)
    if impl == "cpp" and not _ext.available():
        pytest.skip(_ext.load_error)
    fn = noise.randint4x if impl == "cpp" else noise.randint4x_ref
    np.testing.assert_array_equal(fn(counters, keys), expected)


@needs_ext
def test_integer_stream_cpp_equals_torch_reference_bit_for_bit():
    rng = np.random.default_rng(7)
    counters = rng.integers(0, 2**32, size=(997, 4), dtype=np.uint64).astype(np.uint32)
    keys = rng.integers(0, 2**32, size=(997, 2), dtype=np.uint64).astype(np.uint32)
    np.testing.assert_array_equal(noise.randint4x(counters, keys), noise.randint4x_ref(counters, keys))


def _tl_randn(seed: int, offset: int, n: int) -> torch.Tensor:
    """triton.language.randn(seed, offset + arange(n)) run in the interpreter (int64 offsets)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(out_ptr, seed, base, n, BLOCK: tl.constexpr):
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        off = base.to(tl.int64) + j.to(tl.int64)
        tl.store(out_ptr + j, tl.randn(seed, off), mask=j < n)

    out = torch.empty(n, dtype=torch.float32)
    kernel[(triton.cdiv(n, 256),)](out, seed, offset, n, BLOCK=256)
    return out


# odd sizes; offsets around the int32 and uint32 boundaries and far beyond 2^32
CASES = [
    (0, 0, 1),
    (1, 0, 97),
    (12345, 7, 1025),
    (2**31 + 11, 2**31 - 50, 131),
    (2**40 + 3, 2**32 - 60, 257),      # crosses the 2^32 counter boundary (carry into the high word)
    (2**64 - 1, 2**33 + 5, 77),
    (987654321, 3 * 2**40 + 123, 513),
]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter (CPU run)")
@pytest.mark.parametrize("seed,offset,n", CASES)
def test_cpu_normals_match_triton_randn(seed, offset, n):
    expected = _tl_randn(seed, offset, n)
    for impl in (["cpp"] if _ext.available() else []) + ["torch", "triton"]:
        got = noise.randn(seed, (n,), offset=offset, impl=impl)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6, msg=lambda m: f"{impl}: {m}")


@needs_ext
def test_cpp_matches_torch_reference_on_a_large_draw():
    a = noise.randn(2024, (3, 50_001), offset=2**32 - 20_000)
    b = noise.randn(2024, (3, 50_001), offset=2**32 - 20_000, impl="torch")
    assert (a - b).abs().max().item() < 2e-6
    assert abs(a.mean().item()) < 0.02 and abs(a.std().item() - 1) < 0.02


def test_offset_windows_are_slices_of_one_stream():
    full = noise.randn(99, (10_000,))
    for off, n in [(0, 1), (4095, 3), (4096, 4097), (9_000, 1000)]:  # 4096 = the C++ chunk size
        torch.testing.assert_close(noise.randn(99, (n,), offset=off), full[off:off + n], rtol=0, atol=0)


def test_shape_and_reshape():
    x = noise.randn(5, (2, 3, 7))
    assert x.shape == (2, 3, 7) and x.dtype == torch.float32
    torch.testing.assert_close(x.reshape(-1), noise.randn(5, 42), rtol=0, atol=0)
    assert noise.randn(5, (0, 4)).shape == (0, 4)


def test_derive_keys_extension_matches_reference():
    images = [0, 1, 2, 7, 2**32 - 1]
    for step, stream in [(0, noise.STREAM_INIT), (49, noise.STREAM_STEP), (2**32 - 1, 5)]:
        ref = noise.derive_keys_ref(2**63 + 17, images, step, stream)
        torch.testing.assert_close(noise.derive_keys(2**63 + 17, images, step, stream), ref, rtol=0, atol=0)
    keys = noise.derive_keys(3, range(64), 0, 0)
    assert len(set(keys.tolist())) == 64  # distinct per image
    assert not torch.equal(noise.derive_keys(3, [0], 0, 0), noise.derive_keys(3, [0], 1, 0))
    assert not torch.equal(noise.derive_keys(3, [0], 0, 0), noise.derive_keys(3, [0], 0, 1))


def test_batch_split_invariance():
    shape = (8, 13, 11)
    whole = noise.randn_images(42, range(8), shape, step=3, stream=noise.STREAM_STEP)
    first = noise.randn_images(42, range(4), shape, step=3, stream=noise.STREAM_STEP)
    middle = noise.randn_images(42, [5, 6], shape, step=3, stream=noise.STREAM_STEP)
    torch.testing.assert_close(whole[:4], first, rtol=0, atol=0)
    torch.testing.assert_close(whole[5:7], middle, rtol=0, atol=0)
    single = noise.randn_images(42, [7], shape, step=3, stream=noise.STREAM_STEP, impl="torch")
    torch.testing.assert_close(whole[7:], single, rtol=0, atol=2e-6)


@pytest.mark.parametrize("bad,exc", [
    (dict(seed=1.5, shape=(3,)), TypeError),
    (dict(seed=2**64, shape=(3,)), ValueError),
    (dict(seed=1, shape=(3, -1)), ValueError),
    (dict(seed=1, shape=(3,), offset=-1), ValueError),
    (dict(seed=1, shape=(3,), offset=2**64 - 2), ValueError),
    (dict(seed=1, shape=(3,), impl="nope"), ValueError),
    (dict(seed=1, shape=(3,), impl="cuda"), ValueError),
])
def test_bad_arguments_raise(bad, exc):
    with pytest.raises(exc):
        noise.randn(**bad)


def test_import_without_extension_records_reason_and_warns(tmp_path):
    """With retina_fast._C unloadable, import works, info says why, and noise warns (or raises if strict)."""
    code = r"""
import sys, warnings
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "retina_fast._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import retina_fast
from retina_fast import _ext, noise, backends
assert not _ext.available() and "blocked for the test" in _ext.load_error
info = retina_fast.info()
assert "blocked" in info["extension"]
cpu = [b for b in info["backends"] if b["name"] == "cpu"][0]
assert not cpu["usable"] and "blocked" in cpu["reasons"][0]
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    x = noise.randn(1, 5)
    assert any("pure-torch" in str(m.message) for m in w)
    assert backends.resolve("auto", device="cpu").name == "torch"
    assert any("faster backends skipped" in str(m.message) for m in w)
print("OK")
"""
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr
    env["RETINA_FAST_STRICT"] = "1"
    code_strict = code.split("with warnings")[0] + "noise.randn(1, 5)\n"
    out = subprocess.run([sys.executable, "-c", code_strict], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "RETINA_FAST_STRICT" in out.stderr


@pytest.mark.gpu
def test_cuda_and_triton_streams_match_cpu():
    for seed, offset, n in CASES:
        cpu = noise.randn(seed, (n,), offset=offset)
        for impl in ("cuda", "triton"):
            got = noise.randn(seed, (n,), offset=offset, device="cuda", impl=impl).cpu()
            torch.testing.assert_close(got, cpu, rtol=0, atol=2e-6, msg=lambda m: f"{impl}: {m}")
    keys = noise.derive_keys(5, range(6), 2, 1)
    torch.testing.assert_close(noise.randn_rows(keys, 1001, device="cuda").cpu(), noise.randn_rows(keys, 1001),
                               rtol=0, atol=2e-6)
