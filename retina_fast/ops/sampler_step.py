"""Fused sampler step: :func:`retina_fast.samplers.generic_step` with the step noise generated inside.

    sampler_step(x, eps, coef, x0_prev=None, keys=None) == generic_step(x, eps, coef, x0_prev=x0_prev,
        noise=noise.randn_rows(keys, numel_per_image).view_as(x))

x, eps, x0_prev: (B, ...) float32; keys: (B,) int64 per-image step keys (retina_fast.noise.derive_keys)
or None when coef.std == 0. Implementations: ``torch`` (the reference: generic_step + noise.randn_rows),
``cpp`` (retina_fast._C, one pass, OpenMP + SIMD), ``triton`` (retina_fast.kernels.sampler_step).
"""
from __future__ import annotations

import numpy as np
import torch

from retina_fast import _ext, noise
from retina_fast.samplers import StepCoef, generic_step

IMPLS = ("torch", "cpp", "triton")


def sampler_step_ref(x, eps, coef: StepCoef, *, x0_prev=None, keys=None, clip_x0=True):
    z = None
    if coef.std != 0.0:
        if keys is None:
            raise ValueError("this step draws noise: pass keys")
        z = noise.randn_rows(keys, x[0].numel(), device=x.device).view_as(x)
    return generic_step(x, eps, coef, x0_prev=x0_prev if coef.cp != 0.0 else None, noise=z, clip_x0=clip_x0)


def sampler_step(x: torch.Tensor, eps: torch.Tensor, coef: StepCoef, *, x0_prev: torch.Tensor | None = None,
                 keys: torch.Tensor | None = None, clip_x0: bool = True, impl: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x_out, x0) like generic_step. ``impl=None``: cpp on CPU, triton on CUDA."""
    if x.shape != eps.shape:
        raise ValueError(f"x {tuple(x.shape)} and eps {tuple(eps.shape)} differ")
    if coef.cp != 0.0 and x0_prev is None:
        raise ValueError("this step needs the previous x0")
    if coef.std != 0.0 and keys is None:
        raise ValueError("this step draws noise: pass keys")
    if impl is None:
        impl = "triton" if x.device.type == "cuda" else ("cpp" if _ext.available() else "torch")
    if impl not in IMPLS:
        raise ValueError(f"unknown sampler_step implementation {impl!r}; choose from {IMPLS}")
    if impl == "torch":
        return sampler_step_ref(x, eps, coef, x0_prev=x0_prev, keys=keys, clip_x0=clip_x0)
    b = x.shape[0]
    x2 = x.detach().float().contiguous().view(b, -1)
    e2 = eps.detach().float().contiguous().view(b, -1)
    p2 = x0_prev.detach().float().contiguous().view(b, -1) if coef.cp != 0.0 else None
    k = keys if coef.std != 0.0 else None
    if impl == "triton":
        from retina_fast.kernels import sampler_step as tk

        out, x0 = tk.sampler_step(x2, e2, coef, p2, k.to(x.device) if k is not None else None, clip_x0)
        return out.view_as(x), x0.view_as(x)
    if x.device.type != "cpu":
        raise ValueError("impl='cpp' needs CPU tensors")
    out = torch.empty_like(x2)
    x0 = torch.empty_like(x2)
    keys_np = k.numpy().view(np.uint64) if k is not None else None
    c = (coef.inv_a1, coef.s1, coef.cx, coef.c0, coef.cp, coef.std)
    _ext.require().sampler_step(x2.numpy(), e2.numpy(), p2.numpy() if p2 is not None else None, keys_np, c,
                                bool(clip_x0), out.numpy(), x0.numpy())
    return out.view_as(x), x0.view_as(x)
