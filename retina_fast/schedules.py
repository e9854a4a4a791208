"""Noise schedules and timestep spacing, shared by every sampler and backend.

Cosine schedule (Nichol & Dhariwal 2021), computed in float64 as Medical Diffusion does::

    f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2),   s = 0.008
    beta_t = min(1 - f(t + 1) / f(t), 0.9999),        alpha_bar_t = prod_{i <= t} (1 - beta_i)

Shifted cosine (``logsnr_shift`` = d, default 0): alpha_bar'_t = sigmoid(logit(alpha_bar_t) + d), i.e. the
log signal-to-noise ratio log(alpha_bar / (1 - alpha_bar)) moved by d nats at every timestep, and
beta'_t = 1 - alpha_bar'_t / alpha_bar'_{t-1}. Scaling the data by b is the same as shifting the schedule by
2 log b (Chen 2023, "On the importance of noise scheduling for diffusion models", arXiv:2301.10972; the shifted
cosine of Hoogeboom et al. 2023, "simple diffusion", arXiv:2301.11093, uses it downwards for large images).
Latents scaled into [-1, 1] have a standard deviation well below 1 (~0.27 for the shipped ``tiny``); the shift
d = -log(var) gives them the signal-to-noise ratios of unit-variance data at every timestep while the samplers
keep clamping x0 to [-1, 1] (``retina-fast train ldm --logsnr-shift auto``).

Timestep spacing (identical in every backend; each sampler has a default, see retina_fast.samplers):

* ``linspace`` (no sampler's default since 2026-12-04; DDIM and DDPM used it before): t_i = round(linspace(T - 1,
  0, steps))_i, descending, t_{steps-1} = 0.
* ``trimmed`` (DDIM, DDPM): t_i = round(linspace(t_start, 0, steps))_i with t_start = max(round(0.99 (T - 1)),
  steps - 1) (989 for T = 1000): ``linspace`` without the last 1 % of timesteps. With ``steps == T`` it is every
  timestep T-1 .. 0, so respaced DDPM at T steps equals the full ancestral loop. At t = 999 the cosine schedule has
  alpha_bar = 2.4e-10, so the ε-prediction's x0 = (x - sqrt(1 - alpha_bar) ε) / sqrt(alpha_bar) multiplies
  any error of ε by 1 / sqrt(alpha_bar) = 64 166: x0 is the sign of the network's error, clamped to ±1, and
  the first DDIM step adds sqrt(alpha_bar_next) times that ±1 field, as large as the whole signal at the next
  timestep. That step decides ~99 % of the fp32 round-off in a 20-step run (a relative error of 1e-7 in ε
  there moves the result by 2.5e-5, at any later step by at most 1.2e-7). From t = 989 (1 / sqrt(alpha_bar)
  = 64) the estimate is well conditioned; Lin et al. 2024, "Common diffusion noise schedules and sample
  steps are flawed" (arXiv:2305.08891) discuss the ill-posed x0 of ε-prediction near zero terminal SNR.
  DDPM's first ancestral step adds the same field (c0 = sqrt(alpha_bar_next) there); on the shipped model its
  fp32 backends went from 5.8e-5 to 7.5e-6 of the reference, sample quality unchanged.
* ``logsnr`` (DPM-Solver++): t_i = the integer timestep whose lambda = log(alpha/sigma) is nearest to
  linspace(lambda(t_start), lambda(0), steps)_i, t_start = max(round(0.99 (T - 1)), steps - 1). Where
  lambda changes by more than the target spacing per timestep (near both ends), nearest timesteps
  repeat (T = 1000: from 39 steps on); those are made distinct with the fewest moves:
  t_i = min(t_i, t_start - i), then from the end t_i = max(t_i, t_{i+1} + 1). A run without repeats is
  unchanged, and every steps in 1..T gives distinct descending timesteps from t_start to 0. The cosine schedule's
  last 1 % of timesteps have alpha_bar down to 1e-10 (lambda -> -11); a single solver step across them
  dominates the error of a 10-20 step run (measured on a Gaussian with an exact denoiser: std error
  +36 % at 10 steps with ``linspace``, +3 % with ``logsnr``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Schedule", "cosine_schedule", "timesteps_for", "SPACINGS", "MAX_LOGSNR_SHIFT", "check_logsnr_shift"]

SPACINGS = ("linspace", "trimmed", "logsnr")
MAX_LOGSNR_SHIFT = 20.0


def check_logsnr_shift(value: float) -> float:
    """``value`` if it is a usable log-SNR shift (finite, |value| <= MAX_LOGSNR_SHIFT), else ValueError."""
    if not (math.isfinite(value) and abs(value) <= MAX_LOGSNR_SHIFT):
        raise ValueError(f"logsnr_shift must be a finite number in [-{MAX_LOGSNR_SHIFT:g}, {MAX_LOGSNR_SHIFT:g}], "
                         f"got {value}")
    return value


@dataclass(frozen=True)
class Schedule:
    """A discrete diffusion schedule. Arrays are float64 tensors of length T."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def alpha_bar(self, t: int) -> float:
        """alpha_bar at integer timestep t; t = -1 means "clean" (alpha_bar = 1)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])


def cosine_schedule(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.9999,
                    logsnr_shift: float = 0.0) -> Schedule:
    """The cosine schedule; ``logsnr_shift`` != 0 shifts its log signal-to-noise ratio by that many nats at
    every timestep (module docstring)."""
    if num_timesteps < 1:
        raise ValueError("num_timesteps must be >= 1")
    check_logsnr_shift(logsnr_shift)
    t = np.arange(num_timesteps + 1, dtype=np.float64)
    f = np.cos(((t / num_timesteps) + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.minimum(1.0 - f[1:] / f[:-1], max_beta)
    alphas_cumprod = np.cumprod(1.0 - betas)
    if logsnr_shift != 0.0:
        # alpha_bar' = sigmoid(logit(alpha_bar) + shift), in a form that stays exact where alpha_bar -> 0 or 1
        logit = np.log(alphas_cumprod) - np.log1p(-alphas_cumprod)
        alphas_cumprod = 1.0 / (1.0 + np.exp(-(logit + logsnr_shift)))
        betas = 1.0 - alphas_cumprod / np.concatenate(([1.0], alphas_cumprod[:-1]))
    return Schedule(torch.from_numpy(betas), torch.from_numpy(alphas_cumprod))


def _trimmed_start(steps: int, num_timesteps: int) -> int:
    """First timestep of the ``trimmed`` and ``logsnr`` spacings: the last 1 % of timesteps skipped."""
    return max(int(round(0.99 * (num_timesteps - 1))), steps - 1)


def timesteps_for(steps: int, num_timesteps: int, spacing: str = "linspace",
                  schedule: Schedule | None = None) -> list[int]:
    """The descending timesteps a ``steps``-step run visits (see the module docstring)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if spacing == "linspace":
        if steps == 1:
            return [num_timesteps - 1]
        ts = np.round(np.linspace(num_timesteps - 1, 0, steps)).astype(np.int64).tolist()
    elif spacing == "trimmed":
        t_start = _trimmed_start(steps, num_timesteps)
        ts = [t_start] if steps == 1 else np.round(np.linspace(t_start, 0, steps)).astype(np.int64).tolist()
    elif spacing == "logsnr":
        if schedule is None or schedule.num_timesteps != num_timesteps:
            raise ValueError("logsnr spacing needs the schedule")
        ab = schedule.alphas_cumprod.numpy()
        lam = 0.5 * np.log(ab / (1.0 - ab))
        t_start = _trimmed_start(steps, num_timesteps)
        targets = np.linspace(lam[t_start], lam[0], steps)
        ts = [int(np.argmin(np.abs(lam - v))) for v in targets]
        ts = [min(t, t_start - i) for i, t in enumerate(ts)]  # room for the steps still to come
        for i in range(steps - 2, -1, -1):  # distinct: each at least one above the next
            ts[i] = max(ts[i], ts[i + 1] + 1)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose from {SPACINGS}")
    if len(set(ts)) != steps:
        raise ValueError(f"{spacing} spacing gives repeated timesteps at steps={steps}; use fewer steps")
    return ts
