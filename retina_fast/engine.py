"""``retina_fast.sample`` / ``retina_fast.load``: the fast drop-in replacement for the reference sampler.

Same seed -> same images as ``retina_fast.training.reference_sample``: the initial latents, every step's
noise, the timesteps and the update formulas are shared (retina_fast.noise, .samplers); only the
execution differs by backend (retina_fast.backends.runners). Image i depends only on (seed, i), never
on batch size, split or rank; ``first_index`` lets a caller (a torchrun rank, a resumed run) draw images
first_index .. first_index + n - 1 of a run.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from retina_fast import backends, noise, samplers
from retina_fast.backends.runners import Runner, default_dtype, make_runner

__all__ = ["Pipeline", "load", "sample"]


class Pipeline:
    """A loaded model plus resolved backend runners (resolved once per (backend, device, dtype))."""

    def __init__(self, loaded, source: str) -> None:
        self.loaded = loaded
        self.source = source
        self._runners: dict[tuple, Runner] = {}

    @property
    def config(self):
        return self.loaded.config

    @property
    def wavelengths(self) -> tuple[float, ...]:
        return tuple(self.loaded.wavelengths)

    def runner(self, backend: str = "auto", device=None, dtype: torch.dtype | None = None) -> Runner:
        chosen = backends.resolve(backend, device=device, dtype=dtype)
        dev = torch.device(device) if device is not None else torch.device(chosen.devices[0])
        dtype = dtype or default_dtype(chosen.name, dev)
        chosen_reasons = chosen.not_supported_reasons(dev, dtype)
        if chosen_reasons:
            raise backends.BackendUnavailable(f"backend {chosen.name!r}: " + "; ".join(chosen_reasons))
        key = (chosen.name, str(dev), dtype)
        if key not in self._runners:
            self._runners[key] = make_runner(chosen.name, self.loaded, dev, dtype)
        return self._runners[key]

    def sample(self, n: int, steps: int = 50, *, seed: int = 0, sampler: str = "ddim", backend: str = "auto",
               device=None, dtype: torch.dtype | None = None, batch_size: int | None = None,
               return_latents: bool = False, eta: float = 0.0, first_index: int = 0,
               progress: Callable[[int], None] | None = None):
        """n images (n, bands, H, W) float32 reflectance in [0, 1] (and latents (n, C, h, w) if asked)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if first_index < 0:
            raise ValueError("first_index must be >= 0")
        coefs = samplers.plan(sampler, self.loaded.schedule, steps, eta=eta)
        runner = self.runner(backend, device, dtype)
        batch = batch_size or auto_batch_size(runner, n)
        cubes, latents = [], []
        start = 0
        while start < n:
            size = min(batch, n - start)
            images = range(first_index + start, first_index + start + size)
            try:
                cube, lat = _sample_batch(runner, coefs, seed, images, self.loaded.config.latent_shape)
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                batch = max(1, size // 2)  # split and retry: images do not depend on the batch
                torch.cuda.empty_cache()
                continue
            cubes.append(cube.cpu())
            latents.append(lat.cpu())
            start += size
            if progress is not None:
                progress(size)
        cube = torch.cat(cubes)
        return (cube, torch.cat(latents)) if return_latents else cube


    @torch.no_grad()
    def reconstruct(self, cubes: torch.Tensor, *, quantize: bool = True, batch_size: int = 16) -> torch.Tensor:
        """Encode -> nearest code -> decode, reflectance in and out: (N, bands, H, W) float in [0, 1] ->
        (N, bands, H, W) float32 in [0, 1] (H, W divisible by the VQ-GAN's f), with the reference modules
        (eager fp32, on the model's device). ``quantize=False`` decodes the encoder's continuous output,
        which shows what the codebook costs. The way to judge the autoencoder on one's own data: every
        sample is drawn through the same decoder."""
        vq = self.loaded.vqgan
        cfg = vq.config
        if not isinstance(cubes, torch.Tensor) or cubes.dim() != 4 or cubes.shape[1] != cfg.bands:
            got = tuple(cubes.shape) if isinstance(cubes, torch.Tensor) else type(cubes).__name__
            raise ValueError(f"reconstruct expects a tensor (N, {cfg.bands}, H, W) of reflectance, got {got}")
        if not cubes.is_floating_point():
            raise ValueError(f"reconstruct expects floating-point reflectance in [0, 1], got {cubes.dtype}")
        if cubes.shape[-1] % cfg.f or cubes.shape[-2] % cfg.f or cubes.shape[0] == 0:
            raise ValueError(f"reconstruct needs N >= 1 and H, W divisible by f={cfg.f}, got {tuple(cubes.shape)}")
        if not bool(torch.isfinite(cubes).all()):
            raise ValueError("reconstruct: the cubes contain NaN or infinite values")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        dev = next(vq.parameters()).device
        out = [vq.eval().reconstruct(chunk.to(dev), quantize=quantize).cpu() for chunk in cubes.split(batch_size)]
        return torch.cat(out)


def auto_batch_size(runner: Runner, n: int) -> int:
    """CPU: 16 (bf16 GEMMs saturate around there); CUDA: from free memory, a generous estimate per image."""
    if runner.device.type != "cuda":
        return min(n, 16)
    free, _ = torch.cuda.mem_get_info(runner.device)
    cfg = runner.loaded.config
    per_image = 4 * cfg.vqgan.bands * cfg.vqgan.image_size ** 2 * max(cfg.vqgan.stage_channels) // 4 + (64 << 20)
    return max(1, min(n, int(0.5 * free) // per_image))


def _sample_batch(runner: Runner, coefs, seed: int, images: range, shape) -> tuple[torch.Tensor, torch.Tensor]:
    dev = runner.device
    x = samplers.initial_latents(seed, images, shape, device=dev)
    t = torch.empty(len(images), dtype=torch.int64, device=dev)
    x0_prev = None
    for i, c in enumerate(coefs):
        eps = runner.denoise(x, t.fill_(c.t))
        keys = noise.derive_keys(seed, images, step=i, stream=noise.STREAM_STEP).to(dev) if c.std else None
        x, x0_prev = runner.step(x, eps, c, x0_prev if c.cp else None, keys, runner.loaded.clip_x0)
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"non-finite latents for images {images.start}..{images.stop - 1} "
                                 f"(dtype {runner.dtype}); try dtype=torch.float32")
    return runner.decode(x), x


_PIPELINES: dict[str, Pipeline] = {}


def load(model: str = "default") -> Pipeline:
    """A Pipeline for a packaged model name (``default`` = ``tiny``), a checkpoint directory or path."""
    from retina_fast.modelzoo import load_ldm, resolve_model

    path = str(resolve_model(model))
    if path not in _PIPELINES:
        _PIPELINES[path] = Pipeline(load_ldm(path), path)
    return _PIPELINES[path]


def sample(n: int, steps: int = 50, *, seed: int = 0, sampler: str = "ddim", model: str = "default",
           backend: str = "auto", device=None, dtype: torch.dtype | None = None, batch_size: int | None = None,
           return_latents: bool = False, **kwargs):
    """Draw n synthetic 16-band cubes: ``load(model).sample(...)`` (see Pipeline.sample)."""
    return load(model).sample(n, steps, seed=seed, sampler=sampler, backend=backend, device=device, dtype=dtype,
                              batch_size=batch_size, return_latents=return_latents, **kwargs)


def images_per_second(pipe: Pipeline, n: int, steps: int, **kwargs) -> float:
    """Wall-clock throughput of one call (after the caller's own warm-up)."""
    t0 = time.perf_counter()
    pipe.sample(n, steps, **kwargs)
    return n / max(time.perf_counter() - t0, math.ulp(1.0))
