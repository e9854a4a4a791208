"""Schedules and samplers: cosine schedule, spacing, DDIM determinism, respaced DDPM == full loop,
and all samplers recovering a known Gaussian with an exact denoiser."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retina_fast import samplers
from retina_fast.schedules import cosine_schedule, timesteps_for

SCHED = cosine_schedule(1000)


def test_cosine_schedule_values():
    b = SCHED.betas
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert float(b.max()) <= 0.9999 and float(b.min()) > 0
    f = lambda t: math.cos(((t / 1000) + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abs(float(SCHED.alphas_cumprod[499]) - f(500) / f(0)) < 1e-12
    assert torch.all(SCHED.alphas_cumprod[1:] < SCHED.alphas_cumprod[:-1])


@pytest.mark.parametrize("shift", [2.6, -1.5, 8.0])
def test_shifted_cosine_schedule(shift):
    """logsnr_shift d: log(abar / (1 - abar)) moves by exactly d at every timestep, the betas reproduce the
    shifted abar, and d = 0 leaves the plain schedule bit for bit."""
    sh = cosine_schedule(1000, logsnr_shift=shift)
    a0, a1 = SCHED.alphas_cumprod.numpy(), sh.alphas_cumprod.numpy()
    logit = lambda a: np.log(a) - np.log1p(-a)  # noqa: E731
    np.testing.assert_allclose(logit(a1) - logit(a0), shift, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.cumprod(1.0 - sh.betas.numpy()), a1, rtol=1e-10, atol=0)
    assert np.all(np.diff(a1) < 0) and float(sh.betas.min()) > 0 and float(sh.betas.max()) < 1
    assert torch.equal(cosine_schedule(1000, logsnr_shift=0.0).alphas_cumprod, SCHED.alphas_cumprod)
    assert float(cosine_schedule(1000, logsnr_shift=20.0).alphas_cumprod[-1]) > 0  # the largest accepted shift
    for bad in (float("nan"), 20.5, -float("inf")):
        with pytest.raises(ValueError, match="logsnr_shift"):
            cosine_schedule(1000, logsnr_shift=bad)


def test_shift_equals_scaling_the_data():
    """Chen (2023): x0 scaled by b under the plain schedule has the signal-to-noise ratio of x0 under the
    schedule shifted by 2 log b; the exact Gaussian denoiser then takes DDIM to the same std either way."""
    b = 0.25
    sh = cosine_schedule(1000, logsnr_shift=-2 * math.log(b))
    snr = lambda s: s.alphas_cumprod / (1 - s.alphas_cumprod)  # noqa: E731
    torch.testing.assert_close(snr(sh) * b**2, snr(SCHED), rtol=1e-9, atol=0)


def test_timestep_spacing():
    assert timesteps_for(1000, 1000) == list(range(999, -1, -1))
    ts = timesteps_for(50, 1000)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 50 and ts == sorted(ts, reverse=True)
    assert timesteps_for(1, 1000) == [999]
    with pytest.raises(ValueError):
        timesteps_for(0, 1000)
    with pytest.raises(ValueError):
        timesteps_for(1001, 1000)
    tr = timesteps_for(20, 1000, "trimmed")     # the DDIM default: the last 1 % of timesteps skipped
    assert tr[0] == 989 and tr[-1] == 0 and tr[1] == 937 and tr == sorted(tr, reverse=True)
    assert timesteps_for(1, 1000, "trimmed") == [989]
    for steps in (2, 50, 989, 990, 991, 1000):    # distinct at every count; all T steps visit every timestep
        tr = timesteps_for(steps, 1000, "trimmed")
        assert len(set(tr)) == steps and tr[-1] == 0 and tr[0] == max(989, steps - 1)
    assert [c.t for c in samplers.plan("ddim", SCHED, 20)] == timesteps_for(20, 1000, "trimmed")
    ls = timesteps_for(15, 1000, "logsnr", SCHED)
    assert ls[0] == 989 and ls[-1] == 0 and ls == sorted(ls, reverse=True)
    with pytest.raises(ValueError, match="needs the schedule"):
        timesteps_for(15, 1000, "logsnr")
    with pytest.raises(ValueError, match="unknown spacing"):
        timesteps_for(15, 1000, "karras", SCHED)


def gaussian_denoiser(scale: float):
    """Exact E[eps | x_t] when x0 ~ N(0, scale^2 I)."""
    ab = SCHED.alphas_cumprod

    def model(x, t):
        a2 = ab[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return x * torch.sqrt(1 - a2) / (a2 * scale**2 + 1 - a2)

    return model


@pytest.mark.parametrize("sampler,steps,eta", [("ddim", 50, 0.0), ("ddpm", 250, 0.0),
                                               ("dpmpp_2m", 15, 0.0),
                                               ("dpmpp_2m", 10, 0.0)])
def test_samplers_recover_a_known_gaussian(sampler, steps, eta):
    scale = 0.3
    shape = (4, 8, 8)
    images = range(64)
    x = samplers.initial_latents(7, images, shape)
    coefs = samplers.plan(sampler, SCHED, steps, eta=eta)
    out = samplers.sample(gaussian_denoiser(scale), x, coefs, noise_fn=samplers.step_noise_fn(7, images, shape),
                          clip_x0=False)
    assert abs(out.std().item() - scale) < 0.03 * scale + 0.01, out.std().item()
    assert abs(out.mean().item()) < 0.02


def test_ddim_with_eta_one_is_respaced_ddpm():
    ts = timesteps_for(30, 1000)
    shape = (2, 4, 4)
    x = samplers.initial_latents(5, range(3), shape)
    nf = samplers.step_noise_fn(5, range(3), shape)
    model = gaussian_denoiser(0.7)
    a = samplers.sample(model, x, samplers.step_coefficients("ddim", SCHED, ts, eta=1.0), noise_fn=nf)
    b = samplers.sample(model, x, samplers.step_coefficients("ddpm", SCHED, ts), noise_fn=nf)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_ddim_eta0_is_deterministic_and_draws_no_noise():
    x = samplers.initial_latents(3, range(2), (4, 5, 5))
    coefs = samplers.step_coefficients("ddim", SCHED, timesteps_for(20, 1000))
    assert all(c.std == 0.0 for c in coefs)
    model = gaussian_denoiser(0.5)
    a = samplers.sample(model, x.clone(), coefs, noise_fn=None)
    b = samplers.sample(model, x.clone(), coefs, noise_fn=None)
    assert torch.equal(a, b)


def full_ancestral_loop(model, x, noise_fn):
    """The source's full DDPM loop from the original betas (Medical Diffusion's formulation)."""
    betas, ab = SCHED.betas, SCHED.alphas_cumprod
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    coef1 = betas * torch.sqrt(ab_prev) / (1 - ab)
    coef2 = (1 - ab_prev) * torch.sqrt(1 - betas) / (1 - ab)
    logvar = torch.log(torch.clamp(betas * (1 - ab_prev) / (1 - ab), min=1e-20))
    for i, t in enumerate(range(999, -1, -1)):
        eps = model(x, torch.full((x.shape[0],), t))
        x0 = (torch.sqrt(1 / ab[t]) * x - torch.sqrt(1 / ab[t] - 1) * eps).float().clamp(-1, 1)
        mean = float(coef1[t]) * x0 + float(coef2[t]) * x
        x = mean + (math.exp(0.5 * float(logvar[t])) * noise_fn(i) if t > 0 else 0)
    return x


def test_respaced_ddpm_with_all_steps_equals_full_loop():
    shape = (2, 6, 6)
    images = [0, 5]
    x = samplers.initial_latents(11, images, shape)
    model = gaussian_denoiser(0.6)
    nf = samplers.step_noise_fn(11, images, shape)
    coefs = samplers.step_coefficients("ddpm", SCHED, timesteps_for(1000, 1000))
    ours = samplers.sample(model, x, coefs, noise_fn=nf)
    ref = full_ancestral_loop(model, x, nf)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_batch_composition_does_not_change_an_image():
    shape = (3, 7, 5)
    model = gaussian_denoiser(0.4)
    coefs = samplers.step_coefficients("ddpm", SCHED, timesteps_for(25, 1000))

    def run(images):
        x = samplers.initial_latents(99, images, shape)
        return samplers.sample(model, x, coefs, noise_fn=samplers.step_noise_fn(99, images, shape))

    whole = run(range(6))
    torch.testing.assert_close(run([4, 5]), whole[4:], rtol=0, atol=1e-6)
    torch.testing.assert_close(run([0]), whole[:1], rtol=0, atol=1e-6)


def test_generic_step_math_by_hand():
    c = samplers.StepCoef(t=10, inv_a1=2.0, s1=0.5, cx=0.25, c0=3.0, cp=-1.0, std=0.1)
    x, eps, xp, z = (torch.tensor([1.0]), torch.tensor([0.4]), torch.tensor([0.2]), torch.tensor([2.0]))
    out, x0 = samplers.generic_step(x, eps, c, x0_prev=xp, noise=z, clip_x0=True)
    assert x0.item() == pytest.approx(1.0)  # (1 - 0.2) * 2 = 1.6 -> clamped to 1
    assert out.item() == pytest.approx(0.25 * 1 + 3.0 * 1.0 - 1.0 * 0.2 + 0.1 * 2.0)
    with pytest.raises(ValueError, match="previous x0"):
        samplers.generic_step(x, eps, c, noise=z)
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.step_coefficients("euler", SCHED, [999, 0])


def test_dpmpp_2m_coefficients_reduce_to_ddim_for_first_order():
    ts = timesteps_for(10, 1000)
    dpm = samplers.step_coefficients("dpmpp_2m", SCHED, ts)
    ddim = samplers.step_coefficients("ddim", SCHED, ts)
    # first step is first order: DPM-Solver++(1) == DDIM (eta=0); both in x/x0 form
    assert dpm[0].cx == pytest.approx(ddim[0].cx) and dpm[0].c0 == pytest.approx(ddim[0].c0)
    assert dpm[-1].c0 == 1.0 and dpm[-1].cx == 0.0
    assert all(c.std == 0 for c in dpm) and dpm[1].cp != 0
    np.testing.assert_allclose([c.t for c in dpm], ts)
