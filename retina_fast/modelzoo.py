"""Where sampling checkpoints live and how they are loaded (engine side; never imports the trainers).

A *model* argument is one of

* ``"default"``  -> the packaged ``retina_fast/weights/tiny/`` (the shipped default, ``DEFAULT_MODEL``);
* a packaged model name (a sub-directory of ``retina_fast/weights`` holding ``config.json``), e.g. ``"tiny"``;
  names without a path separator are looked up here first;
* a checkpoint directory path (``config.json`` + ``vqgan.safetensors`` + ``unet.safetensors``), e.g. the
  ``final/`` directory written by ``retina-fast train ldm``.

An LDM checkpoint (written with ``retina_fast.checkpoint``) stores in
``config.json``: ``architecture`` (``LDMConfig.to_dict()``), ``preset``, ``wavelengths`` (nm, one per band),
``latent_range`` ({"min", "max"}: the latent scaling constants), ``latent_asinh`` (optional: the asinh
companding scale, see ``models.vqgan.scale_latent``), ``latent_whiten`` (optional: {"mean", "matrix"}, the
affine map of the latent channels after the scaling, see ``models.vqgan.LatentWhitening``), ``latent_clip``
(optional, default true: the samplers clamp x0 to [-1, 1]), ``normalisation`` and ``provenance``;
``vqgan.safetensors`` holds the autoencoder + codebook and ``unet.safetensors`` the EMA weights of the denoiser.
Every weights file is sha256-verified before it is parsed; nothing is unpickled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retina_fast.checkpoint import CheckpointError, load_checkpoint, load_state_into
from retina_fast.models import VQGAN, LatentWhitening, LDMConfig, UNet2D
from retina_fast.schedules import Schedule, cosine_schedule

__all__ = ["WEIGHTS_DIR", "DEFAULT_MODEL", "KINDS", "LoadedLDM", "available_models", "models_by_kind",
           "checkpoint_kind", "resolve_model", "load_ldm", "schedule_for"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "tiny"


@dataclass
class LoadedLDM:
    """A sampling-ready latent diffusion model (all modules in eval mode, no gradients needed).

    ``vqgan``: autoencoder + codebook; ``unet``: denoiser (EMA weights) predicting epsilon for latents
    (B, C, h, w) = (B, *config.latent_shape) in the scaled range [-1, 1]; ``schedule``: the training
    schedule (T = config.timesteps); ``latent_range``: (lo, hi), z = unscale_latent(z', lo, hi, latent_asinh);
    ``wavelengths``: nm per output band; ``meta``: the whole ``config.json`` (provenance included);
    ``path``: the checkpoint directory (None for a model assembled in memory, e.g. during training);
    ``clip_x0``: whether the samplers clamp their x0 prediction to [-1, 1] (config.json ``latent_clip``;
    true for checkpoints without the key, whose latents all lie inside their range); ``latent_asinh``: the
    asinh companding scale of the latents (config.json ``latent_asinh``; None: linear scaling);
    ``latent_whiten``: the channel map after the scaling (config.json ``latent_whiten``; None: none), so the
    U-Net's latents are ``latent_whiten.apply(scale_latent(z, ...))``.
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
    latent_asinh: float | None = None
    latent_whiten: LatentWhitening | None = None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def unet_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Continuous VQ-GAN latents (B, C, h, w) -> the U-Net's latent space, as training saw them
        (``diffusion_latents`` with this model's scaling, clamp and whitening)."""
        from retina_fast.models.vqgan import diffusion_latents

        lo, hi = self.latent_range
        return diffusion_latents(z, lo, hi, self.latent_asinh, clip=self.clip_x0, whiten=self.latent_whiten)


KINDS = ("ldm", "magenet", "structure-net")
DEFAULTS = {"ldm": DEFAULT_MODEL, "magenet": "magenet-tiny", "structure-net": "structure-net"}
KIND_NAMES = {"ldm": "a sampling model", "magenet": "a MAGE-Net model", "structure-net": "a structure network"}


def checkpoint_kind(directory: str | os.PathLike) -> str | None:
    """What a checkpoint directory holds, from its ``config.json``: ``ldm``, ``magenet``, ``structure-net``
    (checkpoints written before the ``kind`` key: told apart by their keys), None if unreadable."""
    import json

    try:
        doc = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    kind = doc.get("kind")
    if kind is None:
        kind = "structure-net" if "structure_net" in doc else "ldm" if "latent_range" in doc else None
    return kind


def available_models(kind: str | None = "ldm") -> list[str]:
    """Names of the packaged models of ``kind`` (sub-directories of ``WEIGHTS_DIR`` with a ``config.json``;
    ``kind=None``: all of them)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}")
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir()
                  if (p / "config.json").is_file() and (kind is None or checkpoint_kind(p) == kind))


def models_by_kind() -> dict[str, list[str]]:
    """Every packaged model, grouped by kind."""
    return {kind: available_models(kind) for kind in KINDS}


def resolve_model(model: str | os.PathLike = "default", kind: str = "ldm") -> Path:
    """``"default"`` (the default of ``kind``), a packaged name or a checkpoint directory -- or a training run
    directory, whose ``final/`` is the checkpoint -- -> the checkpoint directory. The one resolver of every
    model argument (the sampler's, the enhancer's).

    Raises ``FileNotFoundError`` naming what was looked for and listing the packaged models of ``kind``, and
    ``ValueError`` when the directory holds another kind of model."""
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a name or a path, got {type(model).__name__}")
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}")
    text = os.fspath(model)
    name = DEFAULTS[kind] if text == "default" else text
    packaged = available_models(kind)
    listed = ", ".join(packaged) if packaged else "none (the package ships no weights)"
    if os.sep not in name and (os.altsep is None or os.altsep not in name) and name in available_models(None):
        if name not in packaged:
            found = checkpoint_kind(WEIGHTS_DIR / name)
            raise CheckpointError(f"{name!r} is a packaged {found!r} checkpoint, not {KIND_NAMES[kind]}; "
                                    f"packaged models of kind {kind}: {listed}")
        return WEIGHTS_DIR / name
    path = Path(name).expanduser()
    for cand in (path, path / "final"):
        if cand.is_dir() and (cand / "config.json").is_file():
            found = checkpoint_kind(cand)
            if found is not None and found != kind:
                raise CheckpointError(f"{cand}: a {found!r} checkpoint, not {KIND_NAMES[kind]}")
            return cand
    if text == "default":
        raise FileNotFoundError(f"the default {kind} model {name!r} is not installed in {WEIGHTS_DIR}; "
                                f"packaged models of kind {kind}: {listed}")
    if path.is_dir():
        raise FileNotFoundError(f"{path}: directory has no config.json, so it is not a checkpoint; "
                                f"packaged models of kind {kind}: {listed}")
    raise FileNotFoundError(f"model {text!r} is neither a packaged {kind} model nor a checkpoint directory; "
                            f"packaged models of kind {kind}: {listed} (or pass a directory with config.json)")


def schedule_for(config: LDMConfig) -> Schedule:
    """The diffusion schedule a config was trained with."""
    if config.schedule != "cosine":
        raise ValueError(f"schedule {config.schedule!r} is not implemented; only 'cosine' is")
    return cosine_schedule(config.timesteps, config.cosine_s, config.max_beta, config.logsnr_shift)


def _check_ldm_doc(path: Path, doc: dict) -> tuple[LDMConfig, tuple[float, float], tuple[float, ...], bool,
                                                  float | None, LatentWhitening | None]:
    """The architecture, latent range, wavelengths, x0 clip, asinh scale and channel whitening of an LDM
    config.json, every value checked (type, range, consistency) before anything is built; CheckpointError naming
    the file and the field."""
    from retina_fast.config_check import check_fields, check_number, check_wavelengths, check_weight_budget
    from retina_fast.models.config import UNetConfig, VQGANConfig

    cfg_file = path / "config.json"
    kind = doc.get("kind", "ldm")
    if kind != "ldm":
        raise CheckpointError(f"{cfg_file}: a {kind!r} checkpoint, not a sampling (latent diffusion) model; "
                              f"packaged sampling models: {', '.join(available_models()) or 'none'}")
    missing = [m for m in ("vqgan", "unet") if m not in doc["weights"]]
    if missing:
        raise CheckpointError(f"{cfg_file}: no module(s) {missing} in its weights table, so it is not a sampling "
                              f"(latent diffusion) checkpoint; it has {sorted(doc['weights'])}")
    arch = doc.get("architecture")
    if arch is None:
        raise CheckpointError(f"{cfg_file}: no 'architecture' entry; not an LDM sampling checkpoint")
    check_fields(LDMConfig, arch, f"{cfg_file}: architecture")
    check_fields(VQGANConfig, arch.get("vqgan", {}), f"{cfg_file}: architecture.vqgan")
    check_fields(UNetConfig, arch.get("unet", {}), f"{cfg_file}: architecture.unet")
    try:
        config = LDMConfig.from_dict(arch)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_file}: invalid architecture ({exc})") from exc
    rng = doc.get("latent_range")
    if not isinstance(rng, dict) or "min" not in rng or "max" not in rng:
        raise CheckpointError(f"{cfg_file}: no latent_range {{min, max}} (latent scaling constants)")
    lo = check_number(rng["min"], f"{cfg_file}: latent_range.min")
    hi = check_number(rng["max"], f"{cfg_file}: latent_range.max")
    if not hi > lo:
        raise CheckpointError(f"{cfg_file}: latent_range max {hi} must exceed min {lo}")
    clip = doc.get("latent_clip", True)
    if not isinstance(clip, bool):
        raise CheckpointError(f"{cfg_file}: latent_clip must be true or false, got {clip!r}")
    asinh = doc.get("latent_asinh")
    if asinh is not None:
        asinh = check_number(asinh, f"{cfg_file}: latent_asinh")
        if not asinh > 0:
            raise CheckpointError(f"{cfg_file}: latent_asinh must be a positive number or null, got {asinh}")
    whiten = doc.get("latent_whiten")
    if whiten is not None:
        if not isinstance(whiten, dict) or set(whiten) != {"mean", "matrix"}:
            raise CheckpointError(f"{cfg_file}: latent_whiten must be null or {{mean, matrix}}")
        try:
            whiten = LatentWhitening(whiten["mean"], whiten["matrix"])
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{cfg_file}: latent_whiten: {exc}") from None
        if whiten.mean.numel() != config.vqgan.latent_channels:
            raise CheckpointError(f"{cfg_file}: latent_whiten is for {whiten.mean.numel()} channels, the VQ-GAN has "
                                  f"{config.vqgan.latent_channels}")
    wavelengths = config.vqgan.wavelengths
    if "wavelengths" in doc:
        wavelengths = check_wavelengths(doc["wavelengths"], config.vqgan.bands, f"{cfg_file}: wavelengths")
    check_weight_budget(cfg_file, doc, "vqgan", lambda: VQGAN(config.vqgan))
    check_weight_budget(cfg_file, doc, "unet", lambda: UNet2D(config.unet))
    return config, (lo, hi), tuple(float(w) for w in wavelengths), clip, asinh, whiten


def _check_finite(states: dict[str, dict[str, torch.Tensor]], path: Path, doc: dict) -> None:
    for name, state in states.items():
        for key, t in state.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{path / doc['weights'][name]['file']}: tensor {key!r} holds NaN or Inf: "
                                      f"the weights are broken (a diverged training?)")


def load_ldm(model: str | os.PathLike = "default", device: str | torch.device = "cpu") -> LoadedLDM:
    """Load an LDM sampling checkpoint (values checked, sha256-verified, strict state-dict match) onto ``device``."""
    from retina_fast.checkpoint import read_config

    path = resolve_model(model)
    config, (lo, hi), wavelengths, clip, asinh, whiten = _check_ldm_doc(path, read_config(path))
    doc, states = load_checkpoint(path, ["vqgan", "unet"])
    _check_finite(states, path, doc)
    vqgan, unet = VQGAN(config.vqgan), UNet2D(config.unet)
    load_state_into(vqgan, states["vqgan"], str(path / doc["weights"]["vqgan"]["file"]))
    load_state_into(unet, states["unet"], str(path / doc["weights"]["unet"]["file"]))
    vqgan.to(device).eval().requires_grad_(False)
    unet.to(device).eval().requires_grad_(False)
    return LoadedLDM(config, vqgan, unet, schedule_for(config), (lo, hi), wavelengths, doc, path, clip, asinh,
                     whiten)
