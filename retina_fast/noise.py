"""Deterministic noise: Philox4x32-10, bit-compatible with ``triton.language.randn``.

The noise contract::

    randn(seed, shape, offset=k) == tl.randn(seed, k + arange(numel)).reshape(shape)

* key = (seed mod 2^32, seed >> 32) for a 64-bit seed; counter = (offset mod 2^32, offset >> 32, 0, 0)
  for a 64-bit element offset — Triton's own layout for 64-bit offsets.
* uniform: int32(x) -> (x < 0 ? ~x : x) * 4.6566127342e-10 (float32);
  normal: sqrt(-2 log(max(u0, 1e-7))) * cos(2*pi*u1) from the first two words (Box-Muller, float32).
* Integers are bit-exact on every implementation; normals agree to ~1e-6 (libm differences only).

Per-image, per-step keys (what makes image i independent of batch size, split, rank and backend)::

    key(seed, image, step, stream) = lo64(Philox4x32-10(counter=(image, step, stream, 0x52465354),
                                                        key=(seed mod 2^32, seed >> 32)))

``stream`` separates uses: ``STREAM_INIT`` (x_T, step = 0) and ``STREAM_STEP`` (the noise added at
sampler loop index ``step``, 0-based in the order the loop runs). The noise for image ``i`` is then
``randn(key, per_image_shape)``, drawn per image and stacked. Samplers call :func:`randn_images`.

Implementations: ``cpp`` (OpenMP, retina_fast._C), ``cuda`` (retina_fast._C), ``triton``
(retina_fast.kernels.philox) and ``torch`` (pure PyTorch, the readable reference). ``impl=None`` picks
``cpp`` for CPU tensors and ``cuda`` for CUDA tensors.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

from retina_fast import _env, _ext

__all__ = [
    "randn",
    "randn_rows",
    "randn_images",
    "derive_keys",
    "derive_keys_ref",
    "randint4x",
    "randn_ref",
    "randint4x_ref",
    "STREAM_INIT",
    "STREAM_STEP",
    "IMPLS",
]

STREAM_INIT = 0
STREAM_STEP = 1
KEY_TAG = 0x52465354
IMPLS = ("cpp", "cuda", "triton", "torch")

_M32 = 0xFFFFFFFF
_A, _B = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_SCALE = 4.6566127342e-10


def _as_u64(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed {seed} does not fit in 64 bits")
    return seed & 0xFFFFFFFFFFFFFFFF


def _keys_array(keys) -> np.ndarray:
    if isinstance(keys, torch.Tensor):
        if keys.dtype != torch.int64:
            raise TypeError(f"keys must be an int64 tensor, got {keys.dtype}")
        return keys.detach().cpu().numpy().view(np.uint64).reshape(-1)
    return np.array([_as_u64(k) for k in keys], dtype=np.uint64)


def _keys_tensor(keys: np.ndarray) -> torch.Tensor:
    """uint64 keys as an int64 tensor (same bits; torch has no general uint64 arithmetic)."""
    return torch.from_numpy(np.ascontiguousarray(keys).view(np.int64).copy())


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    return shape


def _check_offset(offset: int, n: int) -> int:
    offset = int(offset)
    if offset < 0 or offset + n > 2**64:
        raise ValueError(f"offset {offset} (+{n} elements) outside [0, 2^64)")
    return offset


def _resolve_impl(impl: str | None, device: torch.device) -> str:
    if impl is None:
        if device.type == "cuda":
            impl = "cuda"
        elif device.type == "cpu":
            impl = "cpp"
        else:
            raise ValueError(f"no noise implementation for device {device}")
        if impl == "cpp" and not _ext.available():
            msg = f"retina_fast._C is not available ({_ext.load_error}); drawing noise with the pure-torch Philox"
            if _env.strict():
                raise RuntimeError(msg + " (RETINA_FAST_STRICT=1)")
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            impl = "torch"
    if impl not in IMPLS:
        raise ValueError(f"unknown noise implementation {impl!r}; choose from {IMPLS}")
    if impl == "cpp" and device.type != "cpu":
        raise ValueError(f"impl='cpp' produces CPU tensors, not {device}")
    if impl == "cuda" and device.type != "cuda":
        raise ValueError(f"impl='cuda' produces CUDA tensors, not {device}")
    return impl


def randn_rows(keys, n: int, *, offset: int = 0, device="cpu", impl: str | None = None) -> torch.Tensor:
    """``out[r, j] = normal(keys[r], offset + j)``: (len(keys), n) float32, one Philox key per row."""
    device = torch.device(device)
    keys_np = _keys_array(keys)
    n = int(n)
    offset = _check_offset(offset, n)
    impl = _resolve_impl(impl, device)
    rows = keys_np.shape[0]
    if impl == "torch":
        return randn_ref(keys_np, n, offset=offset).to(device)
    if impl == "cpp":
        out = torch.empty((rows, n), dtype=torch.float32)
        if rows and n:
            _ext.require().randn_cpu(np.ascontiguousarray(keys_np), offset, out.numpy())
        return out
    out = torch.empty((rows, n), dtype=torch.float32, device=device)
    if rows == 0 or n == 0:
        return out
    keys_t = _keys_tensor(keys_np).to(device)
    if impl == "triton":
        from retina_fast.kernels import philox as tk

        tk.randn_rows(keys_t, offset, out)
        return out
    C = _ext.require()
    if not _ext.has_cuda():
        raise RuntimeError("retina_fast._C was built without CUDA; rebuild on a machine with nvcc")
    stream = torch.cuda.current_stream(device).cuda_stream
    C.randn_cuda(keys_t.data_ptr(), rows, n, offset, out.data_ptr(), stream)
    return out


def randn(seed: int, shape, *, offset: int = 0, device="cpu", impl: str | None = None) -> torch.Tensor:
    """Standard normals, float32, ``== tl.randn(seed, offset + arange(numel)).reshape(shape)``."""
    shape = _check_shape(shape)
    numel = math.prod(shape)
    return randn_rows([seed], numel, offset=offset, device=device, impl=impl).reshape(shape)


def derive_keys(seed: int, images: Sequence[int] | torch.Tensor, step: int, stream: int) -> torch.Tensor:
    """Per-image keys for (seed, step, stream) as an int64 tensor holding the uint64 bits."""
    seed = _as_u64(seed)
    idx = torch.as_tensor(images, dtype=torch.int64).reshape(-1)
    if not (0 <= int(step) < 2**32 and 0 <= int(stream) < 2**32):
        raise ValueError("step and stream must be in [0, 2^32)")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= 2**32):
        raise ValueError("image indices must be in [0, 2^32)")
    if _ext.available():
        return _keys_tensor(_ext.require().derive_keys(seed, idx.numpy(), int(step), int(stream)))
    return derive_keys_ref(seed, idx, step, stream)


def derive_keys_ref(seed: int, images, step: int, stream: int) -> torch.Tensor:
    """Pure-torch :func:`derive_keys` (used when the extension is missing, and to test it)."""
    seed = _as_u64(seed)
    idx = torch.as_tensor(images, dtype=torch.int64).reshape(-1).numpy().astype(np.uint64)
    n = idx.shape[0]
    counters = np.stack([idx, np.full(n, step, np.uint64), np.full(n, stream, np.uint64),
                         np.full(n, KEY_TAG, np.uint64)], axis=1)
    words = randint4x_ref(counters, np.tile(np.array([[seed & _M32, seed >> 32]], np.uint64), (n, 1)))
    return _keys_tensor((words[:, 1].astype(np.uint64) << np.uint64(32)) | words[:, 0].astype(np.uint64))


def randn_images(seed: int, images, shape, *, step: int = 0, stream: int = STREAM_INIT, device="cpu",
                 impl: str | None = None) -> torch.Tensor:
    """Noise for images ``images`` of a run: (len(images), *shape), image i from its own derived key."""
    shape = _check_shape(shape)
    keys = derive_keys(seed, images, step, stream)
    return randn_rows(keys, math.prod(shape), device=device, impl=impl).reshape(len(keys), *shape)


def randint4x(counters: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Raw Philox4x32-10 blocks: counters (n, 4) and keys (n, 2) uint32 -> (n, 4) uint32 (C++)."""
    return _ext.require().randint4x(np.ascontiguousarray(counters, dtype=np.uint32),
                                    np.ascontiguousarray(keys, dtype=np.uint32))


# ---------------------------------------------------------------------------------------------------
# Pure-PyTorch reference. int64 tensors hold uint32 words; 32x32 -> 64-bit products are split into
# 16-bit limbs so that nothing overflows int64.


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a_lo, a_hi = a & 0xFFFF, a >> 16
    p_lo = b * a_lo  # < 2^48
    p_hi = b * a_hi  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def _philox_torch(c: list[torch.Tensor], k0: torch.Tensor, k1: torch.Tensor) -> list[torch.Tensor]:
    c0, c1, c2, c3 = c
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_B, c2)
        hi_a, lo_a = _mulhilo(_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _W0) & _M32
        k1 = (k1 + _W1) & _M32
    return [c0, c1, c2, c3]


def randint4x_ref(counters: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Pure-torch Philox4x32-10 (reference for the C++/CUDA/Triton versions)."""
    c = torch.from_numpy(np.asarray(counters, dtype=np.uint64).astype(np.int64))
    k = torch.from_numpy(np.asarray(keys, dtype=np.uint64).astype(np.int64))
    out = _philox_torch([c[:, i] for i in range(4)], k[:, 0], k[:, 1])
    return torch.stack(out, 1).numpy().astype(np.uint32)


def _uniform_torch(x: torch.Tensor) -> torch.Tensor:
    s = torch.where(x >= 2**31, x - 2**32, x)  # int32 view of the word
    s = torch.where(s < 0, -s - 1, s)
    return s.to(torch.float32) * torch.tensor(_SCALE, dtype=torch.float32)


def randn_ref(keys, n: int, *, offset: int = 0) -> torch.Tensor:
    """Pure-torch normals, (len(keys), n) float32: the readable definition of the contract."""
    keys_np = _keys_array(keys)
    ctr = torch.arange(n, dtype=torch.int64)
    # offsets up to 2^64: add in two 32-bit halves with an explicit carry
    lo = ctr + (offset & _M32)
    c0 = lo & _M32
    c1 = ((offset >> 32) + (lo >> 32)) & _M32
    zeros = torch.zeros_like(c0)
    rows = []
    for key in keys_np.tolist():
        k0 = torch.full_like(c0, key & _M32)
        k1 = torch.full_like(c0, key >> 32)
        w = _philox_torch([c0, c1, zeros, zeros], k0, k1)
        u0 = torch.clamp(_uniform_torch(w[0]), min=1.0e-7)
        u1 = _uniform_torch(w[1])
        th = torch.tensor(6.283185307179586, dtype=torch.float32) * u1
        rows.append(torch.sqrt(-2.0 * torch.log(u0)) * torch.cos(th))
    return torch.stack(rows) if rows else torch.empty((0, n), dtype=torch.float32)
