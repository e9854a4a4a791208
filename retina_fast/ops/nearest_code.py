"""Nearest-code lookup: VQ quantisation and the K-Means assignment step (one op serves both).

    idx[i]  = argmin_j ||x_i - e_j||^2        (lowest j on exact ties, as torch.argmin)
    dist[i] = ||x_i - e_{idx[i]}||^2          computed as ||x||^2 - 2 x.e + ||e||^2, clamped at 0

x: (N, D) float32, codebook: (K, D) float32 -> idx (N,) int64, dist (N,) float32.
Implementations: ``torch`` (reference, materialises (N, K) in blocks of rows), ``cpp`` (retina_fast._C,
row blocks x code tiles with a running argmin), ``triton`` (retina_fast.kernels.nearest_code).
FLOPs: 2·N·K·D; bytes: 4·(N·D + K·D) read, 12·N written — compute-bound for D >= 8.
"""
from __future__ import annotations

import torch

from retina_fast import _ext

IMPLS = ("torch", "cpp", "triton")
_REF_BLOCK = 4096


def _check(x: torch.Tensor, codebook: torch.Tensor) -> None:
    if x.dim() != 2 or codebook.dim() != 2:
        raise ValueError(f"nearest_code expects x (N, D) and codebook (K, D), got {tuple(x.shape)} and "
                         f"{tuple(codebook.shape)}")
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but the codebook has {codebook.shape[1]}")
    if codebook.shape[0] == 0:
        raise ValueError("empty codebook")
    if x.device != codebook.device:
        raise ValueError(f"x on {x.device} but codebook on {codebook.device}")


def nearest_code_ref(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch (float32): the definition every other implementation is tested against."""
    _check(x, codebook)
    x = x.float()
    codebook = codebook.float()
    sq = (codebook * codebook).sum(1)
    idx = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    dist = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], _REF_BLOCK):
        xb = x[s:s + _REF_BLOCK]
        score = sq[None, :] - 2.0 * (xb @ codebook.t())
        best, arg = score.min(dim=1)
        idx[s:s + _REF_BLOCK] = arg
        dist[s:s + _REF_BLOCK] = (best + (xb * xb).sum(1)).clamp_min(0.0)
    return idx, dist


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, *, impl: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook row for each row of ``x``. ``impl=None``: ``cpp`` on CPU, ``triton`` on CUDA."""
    _check(x, codebook)
    if impl is None:
        impl = "triton" if x.device.type == "cuda" else ("cpp" if _ext.available() else "torch")
    if impl not in IMPLS:
        raise ValueError(f"unknown nearest_code implementation {impl!r}; choose from {IMPLS}")
    if impl == "torch":
        return nearest_code_ref(x, codebook)
    x = x.detach().float().contiguous()
    codebook = codebook.detach().float().contiguous()
    if impl == "cpp":
        if x.device.type != "cpu":
            raise ValueError("impl='cpp' needs CPU tensors")
        idx = torch.empty(x.shape[0], dtype=torch.int64)
        dist = torch.empty(x.shape[0], dtype=torch.float32)
        if x.shape[0]:
            sq = (codebook * codebook).sum(1).contiguous()
            _ext.require().nearest_code(x.numpy(), codebook.numpy(), sq.numpy(), idx.numpy(), dist.numpy())
        return idx, dist
    from retina_fast.kernels import nearest_code as tk

    return tk.nearest_code(x, codebook)
