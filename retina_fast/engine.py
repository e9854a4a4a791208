"""``retina_fast.sample`` / ``retina_fast.load``: the fast drop-in replacement for the reference sampler.

Same seed -> same images as ``retina_fast.training.reference_sample``: the initial latents, every step's
noise, the timesteps and the update formulas are shared (retina_fast.noise, .samplers); only the
execution differs by backend (retina_fast.backends.runners). Image i depends only on (seed, i), never
on batch size, split or rank; ``first_index`` lets a caller (a torchrun rank, a resumed run) draw images
first_index .. first_index + n - 1 of a run.
"""
from __future__ import annotations

import math
import numbers
import time
from pathlib import Path
from typing import Callable

import torch

from retina_fast import backends, noise, samplers
from retina_fast.backends.runners import Runner, default_dtype

__all__ = ["Pipeline", "load", "sample"]


class Pipeline:
    """A loaded model plus resolved backend runners (resolved once per (backend, device, dtype))."""

    def __init__(self, loaded, source: str) -> None:
        self.loaded = loaded
        self.source = source
        self._runners: dict[tuple, Runner] = {}

    @classmethod
    def from_pretrained(cls, name_or_dir: str = "default") -> "Pipeline":
        """A packaged model name (``default`` = ``tiny``), a checkpoint directory or a training run directory;
        loaded once per path (the same as :func:`load`)."""
        return load(name_or_dir)

    def save_pretrained(self, directory) -> "Path":
        """Write this model as a checkpoint directory (``config.json`` + ``vqgan.safetensors`` +
        ``unet.safetensors``, sha256 recorded) that :meth:`from_pretrained` and the trainers' tools read back;
        the source's provenance is kept."""
        from retina_fast.checkpoint import config_part, model_config, save_checkpoint

        meta = dict(self.loaded.meta)
        config = config_part(meta)
        config.update(model_config(self.loaded.config, self.loaded.latent_range), kind="ldm",
                      latent_clip=bool(self.loaded.clip_x0), latent_asinh=self.loaded.latent_asinh)
        whiten = self.loaded.latent_whiten
        config["latent_whiten"] = None if whiten is None else whiten.to_dict()
        config["wavelengths"] = list(self.wavelengths)
        provenance = dict(meta.get("provenance", {}))
        provenance.setdefault("saved_from", self.source)
        return save_checkpoint(directory, {"vqgan": self.loaded.vqgan, "unet": self.loaded.unet}, config, provenance)

    @property
    def config(self):
        return self.loaded.config

    @property
    def wavelengths(self) -> tuple[float, ...]:
        return tuple(self.loaded.wavelengths)

    def runner(self, backend: str = "auto", device=None, dtype: torch.dtype | None = None) -> Runner:
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")
        device = backends.check_device(device)
        chosen = backends.resolve(backend, device=device, dtype=dtype)
        dev = torch.device(device) if device is not None else torch.device(chosen.devices[0])
        dtype = dtype or default_dtype(chosen.name, dev)
        chosen_reasons = chosen.not_supported_reasons(dev, dtype)
        if chosen_reasons:
            raise backends.BackendUnavailable(f"backend {chosen.name!r}: " + "; ".join(chosen_reasons))
        key = (chosen.name, str(dev), dtype)
        if key not in self._runners:
            runner = backends.runner_factory(chosen, "sample")(self.loaded, dev, dtype)
            runner.backend = chosen.name  # the registry name (run manifests record it)
            self._runners[key] = runner
        return self._runners[key]

    def sample(self, n: int, steps: int = 50, *, seed: int = 0, sampler: str = "ddim", backend: str = "auto",
               device=None, dtype: torch.dtype | None = None, batch_size: int | None = None,
               return_latents: bool = False, eta: float = 0.0, first_index: int = 0,
               progress: Callable[[int], None] | None = None, spacing: str | None = None):
        """n images (n, bands, H, W) float32 reflectance in [0, 1] (and latents (n, C, h, w) if asked).

        ``spacing``: the timestep spacing (``retina_fast.schedules.SPACINGS``); None = the sampler's default
        (``retina_fast.samplers.DEFAULT_SPACING``). ``"linspace"`` gives DDIM / DDPM images of versions
        before 2026-12-04, which started at t = T - 1."""
        _check_sample_args(n, steps, seed, eta, batch_size, first_index)
        coefs = samplers.plan(sampler, self.loaded.schedule, steps, eta=eta, spacing=spacing)
        runner = self.runner(backend, device, dtype)
        batch = batch_size or auto_batch_size(runner, n)
        runner.prepare(min(batch, n))  # the cpu backend measures its convolution libraries for this batch
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
        _check_int("batch_size", batch_size, 1)
        dev = next(vq.parameters()).device
        out = [vq.eval().reconstruct(chunk.to(dev), quantize=quantize).cpu() for chunk in cubes.split(batch_size)]
        return torch.cat(out)


def _check_int(name: str, value, lo: int, hi: int | None = None, allow_none: bool = False,
               bound: str | None = None) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        what = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = bound or ("a positive int" if (lo, hi) == (1, None) else
                          f">= {lo}" if hi is None else f"in [{lo}, {hi}]")
        raise ValueError(f"{name} must be {bound}, got {value}" + (" (None means automatic)" if allow_none else ""))


def _check_sample_args(n, steps, seed, eta, batch_size, first_index) -> None:
    """Argument checks of ``Pipeline.sample``, before any work (steps' upper bound: samplers.plan)."""
    _check_int("n", n, 1)
    _check_int("steps", steps, 1)
    _check_int("seed", seed, -(2**63), 2**64 - 1, bound="a 64-bit integer (-2**63 .. 2**64 - 1)")
    _check_int("batch_size", batch_size, 1, allow_none=True)
    _check_int("first_index", first_index, 0)
    if first_index + n > 2**32:  # image indices are 32-bit Philox counters (retina_fast.noise)
        raise ValueError(f"first_index + n must be <= 2**32, got {first_index + n}")
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")


def auto_batch_size(runner: Runner, n: int) -> int:
    """CPU: 16 (bf16 GEMMs saturate around there); CUDA: from free memory, a generous estimate per image."""
    if runner.device.type != "cuda":
        return min(n, 16)
    free, _ = torch.cuda.mem_get_info(runner.device)
    cfg = runner.loaded.config
    per_image = 4 * cfg.vqgan.bands * cfg.vqgan.image_size ** 2 * max(cfg.vqgan.stage_channels) // 4 + (64 << 20)
    return max(1, min(n, int(0.5 * free) // per_image))


def _sample_batch(runner: Runner, coefs, seed: int, images: range, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's loop (``samplers.sample``) with the runner's denoiser and fused step, then its decoder."""
    dev = runner.device
    x = samplers.initial_latents(seed, images, shape, device=dev)

    def step(i, x, eps, c, x0_prev):
        keys = noise.derive_keys(seed, images, step=i, stream=noise.STREAM_STEP).to(dev) if c.std else None
        return runner.step(x, eps, c, x0_prev, keys, runner.loaded.clip_x0)

    x = samplers.sample(runner.denoise, x, coefs, step=step)
    if not bool(torch.isfinite(x).all()):
        hint = ("try dtype=torch.float32" if runner.dtype != torch.float32 else
                "in float32: the model's weights or its latent range are broken")
        raise FloatingPointError(f"non-finite latents for images {images.start}..{images.stop - 1} "
                                 f"(dtype {str(runner.dtype).replace('torch.', '')}); {hint}")
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
