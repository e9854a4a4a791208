"""Fused sampler step (C++ and Triton, noise generated inside) against generic_step + noise.randn_rows."""
from __future__ import annotations

import os

import pytest
import torch

from retina_fast import _ext, noise
from retina_fast.ops import sampler_step, sampler_step_ref
from retina_fast.samplers import StepCoef, plan
from retina_fast.schedules import cosine_schedule

IMPLS = [pytest.param("cpp", marks=pytest.mark.skipif(not _ext.available(), reason=f"{_ext.load_error}")),
         pytest.param("triton", marks=pytest.mark.skipif(
             os.environ.get("TRITON_INTERPRET") != "1", reason="CPU run needs the Triton interpreter"))]
COEFS = [
    StepCoef(t=500, inv_a1=1.7, s1=0.8, cx=0.3, c0=0.9, cp=0.0, std=0.0),       # DDIM eta=0 shape
    StepCoef(t=500, inv_a1=1.3, s1=0.6, cx=0.7, c0=0.4, cp=0.0, std=0.35),      # DDPM / DDIM eta>0
    StepCoef(t=300, inv_a1=1.1, s1=0.4, cx=0.9, c0=-0.5, cp=0.2, std=0.0),      # DPM-Solver++(2M)
    StepCoef(t=100, inv_a1=1.02, s1=0.2, cx=0.95, c0=0.5, cp=-0.1, std=0.05),   # everything at once
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 8, 13, 11), (2, 5, 97, 9)])
@pytest.mark.parametrize("ci", range(len(COEFS)))
@pytest.mark.parametrize("clip", [True, False])
def test_matches_reference(impl, shape, ci, clip):
    c = COEFS[ci]
    g = torch.Generator().manual_seed(ci * 7 + shape[0])
    x = torch.randn(shape, generator=g) * 2
    eps = torch.randn(shape, generator=g)
    prev = torch.randn(shape, generator=g).clamp(-1, 1)
    keys = noise.derive_keys(123, range(shape[0]), step=4, stream=noise.STREAM_STEP)
    ref_out, ref_x0 = sampler_step_ref(x, eps, c, x0_prev=prev, keys=keys, clip_x0=clip)
    out, x0 = sampler_step(x, eps, c, x0_prev=prev, keys=keys, clip_x0=clip, impl=impl)
    torch.testing.assert_close(x0, ref_x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_real_plans_and_batch_split(impl):
    sched = cosine_schedule(1000)
    for sampler, eta in [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0), ("dpmpp_2m", 0.0)]:
        coefs = plan(sampler, sched, 8, eta=eta)
        x = torch.randn(4, 3, 6, 6)
        prev = torch.randn(4, 3, 6, 6).clamp(-1, 1)
        for c in coefs:
            keys = noise.derive_keys(9, range(4), step=0, stream=1)
            eps = torch.randn_like(x)
            whole, _ = sampler_step(x, eps, c, x0_prev=prev, keys=keys, impl=impl)
            part, _ = sampler_step(x[2:], eps[2:], c, x0_prev=prev[2:], keys=keys[2:], impl=impl)
            torch.testing.assert_close(part, whole[2:], rtol=0, atol=0)
            ref, _ = sampler_step_ref(x, eps, c, x0_prev=prev, keys=keys)
            torch.testing.assert_close(whole, ref, rtol=1e-5, atol=2e-6)


def test_missing_inputs_raise():
    c = COEFS[3]
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="previous x0"):
        sampler_step(x, x, c, keys=noise.derive_keys(0, [0, 1], 0, 1))
    with pytest.raises(ValueError, match="keys"):
        sampler_step(x, x, c, x0_prev=x)
    with pytest.raises(ValueError, match="differ"):
        sampler_step(x, torch.zeros(2, 4), COEFS[0])


@pytest.mark.gpu
@pytest.mark.parametrize("ci", range(len(COEFS)))
def test_triton_on_gpu(ci):
    c = COEFS[ci]
    x = torch.randn(3, 8, 13, 11)
    eps, prev = torch.randn_like(x), torch.randn_like(x).clamp(-1, 1)
    keys = noise.derive_keys(5, range(3), 1, 1)
    ref_out, _ = sampler_step_ref(x, eps, c, x0_prev=prev, keys=keys)
    out, _ = sampler_step(x.cuda(), eps.cuda(), c, x0_prev=prev.cuda(), keys=keys.cuda(), impl="triton")
    torch.testing.assert_close(out.cpu(), ref_out, rtol=1e-5, atol=5e-6)
