"""Samplers as pure functions over a denoiser ``model(x, t) -> eps`` (ε-prediction).

Every sampler here is one loop over the same generic update, so one fused kernel serves all of them::

    x0    = clamp((x - s1 * eps) * inv_a1, -1, 1)          (clamp only when clip_x0)
    x_out = cx * x + c0 * x0 + cp * x0_prev + std * z

with per-step scalars from :func:`step_coefficients` (float64 math, applied in float32):

* DDIM (Song et al. 2021, eq. 12): eps is re-derived from the clamped x0, so
  cx = d / s1, c0 = a_prev - d * a1 / s1 with d = sqrt(1 - abar_prev - sigma^2),
  sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev).
* DDPM ancestral (Ho et al. 2020) respaced to the visited timesteps: beta' = 1 - abar_t / abar_prev,
  c0 = sqrt(abar_prev) beta' / (1 - abar_t), cx = sqrt(1 - beta') (1 - abar_prev) / (1 - abar_t),
  std = exp(0.5 * log(max(beta' (1 - abar_prev) / (1 - abar_t), 1e-20))), no noise on the last step.
* DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) with lambda = log(alpha / sigma), first order on the first
  and last step: cx = sigma_next / sigma_t, c0 = -alpha_next (e^{-h} - 1) (1 + 1/(2r)),
  cp = alpha_next (e^{-h} - 1) / (2r), r = h_prev / h.

``x0_prev`` is the previous step's x0 (DPM-Solver++ only). The final step goes to abar = 1 (clean).
Noise ``z`` for loop index i comes from ``noise_fn(i)`` (see retina_fast.noise: per-image, per-step
keys), so results never depend on batch composition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from retina_fast.schedules import Schedule

__all__ = ["StepCoef", "plan", "resolve_spacing", "DEFAULT_SPACING", "step_coefficients", "generic_step", "sample",
           "initial_latents", "step_noise_fn", "SAMPLERS"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]
SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")
DEFAULT_SPACING = {"ddim": "trimmed", "ddpm": "trimmed", "dpmpp_2m": "logsnr"}


def plan(sampler: str, schedule: Schedule, steps: int, eta: float = 0.0, spacing: str | None = None
         ) -> list["StepCoef"]:
    """Timesteps and per-step coefficients for a ``steps``-step run; ``spacing`` None = the sampler's
    default (``DEFAULT_SPACING``), else one of ``retina_fast.schedules.SPACINGS``."""
    from retina_fast.schedules import timesteps_for

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    ts = timesteps_for(steps, schedule.num_timesteps, resolve_spacing(sampler, spacing), schedule)
    return step_coefficients(sampler, schedule, ts, eta=eta)


def resolve_spacing(sampler: str, spacing: str | None) -> str:
    """``spacing``, checked, or the sampler's default when None. DDIM and DDPM used ``linspace`` (from
    t = T - 1) before 2026-12-04; ``spacing="linspace"`` draws the images of those versions again."""
    from retina_fast.schedules import SPACINGS

    if spacing is None:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
        return DEFAULT_SPACING[sampler]
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose from {', '.join(SPACINGS)} (or None: the sampler's "
                         "default)")
    return spacing


@dataclass(frozen=True)
class StepCoef:
    t: int          # model timestep of this step
    inv_a1: float   # 1 / sqrt(abar_t)
    s1: float       # sqrt(1 - abar_t)
    cx: float
    c0: float
    cp: float
    std: float      # noise scale; 0 means no noise is drawn for this step


def step_coefficients(sampler: str, schedule: Schedule, timesteps: list[int], eta: float = 0.0
                      ) -> list[StepCoef]:
    """Per-step scalars for ``sampler`` over descending ``timesteps`` (see the module docstring)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    if eta < 0:
        raise ValueError("eta must be >= 0")
    coefs: list[StepCoef] = []
    n = len(timesteps)
    h_prev = None
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < n else -1
        ab_t, ab_p = schedule.alpha_bar(t), schedule.alpha_bar(prev)
        a1, s1 = math.sqrt(ab_t), math.sqrt(1.0 - ab_t)
        a_p, s_p = math.sqrt(ab_p), math.sqrt(1.0 - ab_p)
        cx = c0 = cp = std = 0.0
        if sampler == "ddim":
            sigma = eta * math.sqrt((1.0 - ab_p) / (1.0 - ab_t)) * math.sqrt(1.0 - ab_t / ab_p)
            d = math.sqrt(max(1.0 - ab_p - sigma * sigma, 0.0))
            cx, c0, std = d / s1, a_p - d * a1 / s1, sigma
        elif sampler == "ddpm":
            beta = 1.0 - ab_t / ab_p
            c0 = a_p * beta / (1.0 - ab_t)
            cx = math.sqrt(1.0 - beta) * (1.0 - ab_p) / (1.0 - ab_t)
            var = beta * (1.0 - ab_p) / (1.0 - ab_t)
            std = math.exp(0.5 * math.log(max(var, 1e-20))) if prev >= 0 else 0.0
        else:  # dpmpp_2m
            if prev < 0:  # to the clean image: the data prediction itself
                c0 = 1.0
            else:
                h = (math.log(a_p / s_p)) - (math.log(a1 / s1))
                phi = math.expm1(-h)  # e^{-h} - 1
                cx = s_p / s1
                if h_prev is None:
                    c0 = -a_p * phi
                else:
                    r = h_prev / h
                    c0 = -a_p * phi * (1.0 + 1.0 / (2.0 * r))
                    cp = a_p * phi / (2.0 * r)
                h_prev = h
        coefs.append(StepCoef(t=t, inv_a1=1.0 / a1, s1=s1, cx=cx, c0=c0, cp=cp, std=std))
    return coefs


def generic_step(x: torch.Tensor, eps: torch.Tensor, c: StepCoef, *, x0_prev: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, clip_x0: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One update (plain PyTorch; the fused kernels implement exactly this). Returns (x_out, x0)."""
    x0 = (x - c.s1 * eps) * c.inv_a1
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    out = c.cx * x + c.c0 * x0
    if c.cp != 0.0:
        if x0_prev is None:
            raise ValueError("this step needs the previous x0")
        out = out + c.cp * x0_prev
    if c.std != 0.0:
        if noise is None:
            raise ValueError("this step needs noise")
        out = out + c.std * noise
    return out, x0


StepFn = Callable[[int, torch.Tensor, torch.Tensor, StepCoef, "torch.Tensor | None"],
                  tuple[torch.Tensor, torch.Tensor]]


def sample(model: Denoiser, x: torch.Tensor, coefs: list[StepCoef], *, noise_fn: NoiseFn | None = None,
           clip_x0: bool = True, callback: Callable[[int], None] | None = None,
           step: StepFn | None = None) -> torch.Tensor:
    """Run the loop: x (B, C, h, w) at the first timestep -> clean latent (B, C, h, w).

    The one sampling loop of the package: the reference (``retina_fast.training.reference_sample``) and the
    engine (``retina_fast.engine``) both run it. ``step(i, x, eps, coef, x0_prev) -> (x_out, x0)`` replaces the
    update of loop index i (default: :func:`generic_step` with ``noise_fn(i)`` when the step draws noise); the
    engine passes its backend's fused step, which generates the same noise inside the kernel."""
    x0_prev = None
    t_buf = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for i, c in enumerate(coefs):
        eps = model(x, t_buf.fill_(c.t))
        if step is not None:
            x, x0_prev = step(i, x, eps, c, x0_prev if c.cp != 0.0 else None)
        else:
            noise = None
            if c.std != 0.0:
                if noise_fn is None:
                    raise ValueError("this sampler configuration draws noise: pass noise_fn")
                noise = noise_fn(i)
            x, x0_prev = generic_step(x, eps, c, x0_prev=x0_prev, noise=noise, clip_x0=clip_x0)
        if callback is not None:
            callback(i)
    return x


def initial_latents(seed: int, images, shape, *, device="cpu", impl: str | None = None) -> torch.Tensor:
    """x_T for the given image indices: (len(images), *shape), one derived key per image."""
    from retina_fast import noise

    return noise.randn_images(seed, images, shape, step=0, stream=noise.STREAM_INIT, device=device, impl=impl)


def step_noise_fn(seed: int, images, shape, *, device="cpu", impl: str | None = None) -> NoiseFn:
    """noise_fn(i): the noise added at loop index i for the given image indices."""
    from retina_fast import noise

    images = list(images)

    def noise_fn(i: int) -> torch.Tensor:
        return noise.randn_images(seed, images, shape, step=i, stream=noise.STREAM_STEP, device=device, impl=impl)

    return noise_fn
