"""Where sampling checkpoints live and how they are loaded (engine side; never imports the trainers).

A *model* argument is one of

* ``"default"``  -> the packaged ``retina_fast/weights/tiny/`` (the shipped default, ``DEFAULT_MODEL``);
* a packaged model name (a sub-directory of ``retina_fast/weights`` holding ``config.json``), e.g. ``"tiny"``;
  names without a path separator are looked up here first;
* a checkpoint directory path (``config.json`` + ``vqgan.safetensors`` + ``unet.safetensors``), e.g. the
  ``final/`` directory written by ``retina-fast train ldm``.

An LDM checkpoint (DESIGN.md "Checkpoint format", written with ``retina_fast.checkpoint``) stores in
``config.json``: ``architecture`` (``LDMConfig.to_dict()``), ``preset``, ``wavelengths`` (nm, one per band),
``latent_range`` ({"min", "max"} of the codebook: the latent scaling constants), ``normalisation`` and
``provenance``; ``vqgan.safetensors`` holds the autoencoder + codebook and ``unet.safetensors`` the EMA
weights of the denoiser. Every weights file is sha256-verified before it is parsed; nothing is unpickled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retina_fast.checkpoint import CheckpointError, load_checkpoint, load_state_into
from retina_fast.models import VQGAN, LDMConfig, UNet2D
from retina_fast.schedules import Schedule, cosine_schedule

__all__ = ["WEIGHTS_DIR", "DEFAULT_MODEL", "LoadedLDM", "available_models", "resolve_model", "load_ldm",
           "schedule_for"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "tiny"


@dataclass
class LoadedLDM:
    """A sampling-ready latent diffusion model (all modules in eval mode, no gradients needed).

    ``vqgan``: autoencoder + codebook; ``unet``: denoiser (EMA weights) predicting epsilon for latents
    (B, C, h, w) = (B, *config.latent_shape) in the scaled range [-1, 1]; ``schedule``: the training
    schedule (T = config.timesteps); ``latent_range``: (lo, hi) codebook min/max, z = unscale(z', lo, hi);
    ``wavelengths``: nm per output band; ``meta``: the whole ``config.json`` (provenance included);
    ``path``: the checkpoint directory (None for a model assembled in memory, e.g. during training);
    ``clip_x0``: whether the samplers clamp their x0 prediction to [-1, 1] (config.json ``latent_clip``;
    true for checkpoints without the key, whose latents all lie inside their range).
    """

    config: LDMConfig
    vqgan: VQGAN
    unet: UNet2D
    schedule: Schedule
    latent_range: tuple[float, float]
    wavelengths: tuple[float, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    clip_x0: bool = True

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


def available_models() -> list[str]:
    """Names of the packaged models (sub-directories of ``WEIGHTS_DIR`` with a ``config.json``)."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "config.json").is_file())


def resolve_model(model: str | os.PathLike = "default") -> Path:
    """``"default"``, a packaged name or a checkpoint directory -> the checkpoint directory.

    Raises ``FileNotFoundError`` naming what was looked for and listing the packaged models."""
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a name or a path, got {type(model).__name__}")
    text = os.fspath(model)
    name = DEFAULT_MODEL if text == "default" else text
    packaged = available_models()
    if os.sep not in name and (os.altsep is None or os.altsep not in name) and name in packaged:
        return WEIGHTS_DIR / name
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    listed = ", ".join(packaged) if packaged else "none (the package ships no weights)"
    if text == "default":
        raise FileNotFoundError(f"the default model {DEFAULT_MODEL!r} is not installed in {WEIGHTS_DIR}; "
                                f"packaged models: {listed}")
    if path.is_dir():
        raise FileNotFoundError(f"{path}: directory has no config.json, so it is not a checkpoint; "
                                f"packaged models: {listed}")
    raise FileNotFoundError(f"model {text!r} is neither a packaged model nor a checkpoint directory; "
                            f"packaged models: {listed} (or pass a directory with config.json)")


def schedule_for(config: LDMConfig) -> Schedule:
    """The diffusion schedule a config was trained with."""
    if config.schedule != "cosine":
        raise ValueError(f"schedule {config.schedule!r} is not implemented; only 'cosine' is")
    return cosine_schedule(config.timesteps, config.cosine_s, config.max_beta)


def load_ldm(model: str | os.PathLike = "default", device: str | torch.device = "cpu") -> LoadedLDM:
    """Load an LDM sampling checkpoint (sha256-verified, strict state-dict match) onto ``device``."""
    path = resolve_model(model)
    doc, states = load_checkpoint(path, ["vqgan", "unet"])
    cfg_file = path / "config.json"
    try:
        config = LDMConfig.from_dict(doc["architecture"])
    except KeyError:
        raise CheckpointError(f"{cfg_file}: no 'architecture' entry; not an LDM sampling checkpoint") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_file}: invalid architecture ({exc})") from exc
    rng = doc.get("latent_range")
    if not isinstance(rng, dict) or "min" not in rng or "max" not in rng:
        raise CheckpointError(f"{cfg_file}: no latent_range {{min, max}} (latent scaling constants)")
    lo, hi = float(rng["min"]), float(rng["max"])
    if not hi > lo:
        raise CheckpointError(f"{cfg_file}: latent_range max {hi} must exceed min {lo}")
    clip = doc.get("latent_clip", True)
    if not isinstance(clip, bool):
        raise CheckpointError(f"{cfg_file}: latent_clip must be true or false, got {clip!r}")
    vqgan, unet = VQGAN(config.vqgan), UNet2D(config.unet)
    load_state_into(vqgan, states["vqgan"], str(path / doc["weights"]["vqgan"]["file"]))
    load_state_into(unet, states["unet"], str(path / doc["weights"]["unet"]["file"]))
    vqgan.to(device).eval().requires_grad_(False)
    unet.to(device).eval().requires_grad_(False)
    wavelengths = tuple(float(w) for w in doc.get("wavelengths", config.vqgan.wavelengths))
    return LoadedLDM(config, vqgan, unet, schedule_for(config), (lo, hi), wavelengths, doc, path, clip)

