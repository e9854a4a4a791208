"""The reference sampler: plain fp32 eager PyTorch, the definition of correct output for every backend.

For images i = 0 .. n-1 (processed in batches of ``batch_size``; image indices are global, so batching
never changes an image)::

    x_T  = samplers.initial_latents(seed, [i0 .. i1), (C, h, w))          per-image Philox keys
    x_0  = samplers.sample(unet, x_T, samplers.plan(sampler, schedule, steps, eta),
                           noise_fn=samplers.step_noise_fn(seed, [i0 .. i1), (C, h, w)),
                           clip_x0=latent_clip)                          config.json, default true
    cube = Runner(ldm).decode(x_0)                                         the torch backend's decode:
           latent_whiten.invert (when config.json has one), unscale_latent (latent_range (lo, hi) and
           latent_asinh of config.json), nearest_code(impl="torch") per latent pixel,
           vqgan.decode_indices, model_to_reflectance (the model's normalisation inverted, clamped to [0, 1])

Returns cubes (n, bands, H, W) float32 (and x_0 (n, C, h, w) when ``return_latents``).
"""
from __future__ import annotations

import os

import torch

from retina_fast import samplers
from retina_fast.backends.runners import Runner
from retina_fast.modelzoo import LoadedLDM, load_ldm

__all__ = ["reference_sample", "sample_loaded", "decode_latents"]


def _check_args(n, steps, sampler, eta, batch_size, seed, num_timesteps: int | None = None) -> None:
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(n) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if num_timesteps is not None and steps > num_timesteps:
        raise ValueError(f"steps must be at most the model's {num_timesteps} diffusion timesteps, got {steps}")
    if sampler not in samplers.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(samplers.SAMPLERS)}")
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0:
        raise ValueError(f"eta must be a number >= 0, got {eta!r}")
    if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size must be None or a positive int, got {batch_size!r}")
    if not is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")


@torch.no_grad()
def decode_latents(ldm: LoadedLDM, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, C, h, w) in [-1, 1] -> reflectance cubes (B, bands, H, W) in [0, 1] (float32): the
    ``torch`` backend's decode (``retina_fast.backends.runners.Runner.decode``), the one decode path."""
    return _runner(ldm).decode(latents.float())


def _runner(ldm: LoadedLDM) -> Runner:
    runner = _RUNNERS.get(id(ldm))
    if runner is None or runner.loaded is not ldm:
        runner = _RUNNERS[id(ldm)] = Runner(ldm, ldm.device, torch.float32)
    return runner


_RUNNERS: dict[int, Runner] = {}


@torch.no_grad()
def sample_loaded(ldm: LoadedLDM, n: int, steps: int = 50, *, seed: int = 0, sampler: str = "ddim",
                  eta: float = 0.0, batch_size: int | None = None, return_latents: bool = False,
                  progress=None, spacing: str | None = None):
    """``reference_sample`` for an already loaded model (its modules stay on their device).

    ``progress``: optional callable(images_done) called after each batch."""
    _check_args(n, steps, sampler, eta, batch_size, seed, ldm.schedule.num_timesteps)
    device = ldm.device
    shape = ldm.config.latent_shape
    coefs = samplers.plan(sampler, ldm.schedule, steps, float(eta), spacing=spacing)
    bs = n if batch_size is None else batch_size
    cubes, lats = [], []
    for i0 in range(0, n, bs):
        images = range(i0, min(i0 + bs, n))
        x = samplers.initial_latents(seed, images, shape, device=device)
        noise_fn = samplers.step_noise_fn(seed, images, shape, device=device)
        x0 = samplers.sample(ldm.unet, x, coefs, noise_fn=noise_fn, clip_x0=ldm.clip_x0)
        cubes.append(decode_latents(ldm, x0))
        if return_latents:
            lats.append(x0.float())
        if progress is not None:
            progress(images.stop)
    out = torch.cat(cubes)
    return (out, torch.cat(lats)) if return_latents else out


def reference_sample(n: int, steps: int = 50, *, seed: int = 0, sampler: str = "ddim",
                     model: str | os.PathLike | LoadedLDM = "default", device: str | torch.device | None = None,
                     return_latents: bool = False, eta: float = 0.0, batch_size: int | None = None,
                     spacing: str | None = None):
    """Sample ``n`` hyperspectral cubes with the reference (fp32 eager PyTorch) pipeline.

    Args:
        n: number of images; image i is a pure function of (model, seed, i, sampler, steps, eta, spacing).
        steps: sampler steps (1 .. T), timesteps spaced as ``retina_fast.samplers.plan`` documents.
        seed: 64-bit seed of the Philox noise (``retina_fast.noise``).
        sampler: ``ddim``, ``ddpm`` or ``dpmpp_2m``; ``eta`` > 0 makes DDIM stochastic.
        model: ``"default"``, a packaged name, a checkpoint directory or a ``LoadedLDM``.
        device: where to run (None: CPU, the reference device).
        batch_size: images per U-Net batch; None runs all ``n`` in one batch. Never changes the result
            beyond floating-point reassociation inside batched kernels.
        return_latents: also return x_0 (n, C, h, w), the scaled latents before unscaling.
        spacing: timestep spacing (``retina_fast.schedules.SPACINGS``); None = the sampler's default.
    Returns:
        float32 (n, bands, H, W) reflectance in [0, 1]; with ``return_latents`` a tuple (cubes, latents).
    """
    _check_args(n, steps, sampler, eta, batch_size, seed)
    samplers.resolve_spacing(sampler, spacing)  # a bad spacing fails before the model is loaded
    if isinstance(model, LoadedLDM):
        ldm = model
        if device is not None and torch.device(device) != ldm.device:
            raise ValueError(f"model is loaded on {ldm.device}, but device={device!r} was asked for")
    else:
        ldm = load_ldm(model, device="cpu" if device is None else device)
    return sample_loaded(ldm, n, steps, seed=seed, sampler=sampler, eta=eta, batch_size=batch_size,
                         return_latents=return_latents, spacing=spacing)
