"""A small random-weight LDM shared by engine / CLI tests (speed and equivalence need no training).
``vq_overrides`` change VQGANConfig fields (e.g. per-band ``reflectance_scale`` / ``reflectance_shift``,
``upsample``); ``unet`` overrides UNetConfig fields (e.g. ``softmax_attn_levels``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from retina_fast.checkpoint import model_config, save_checkpoint
from retina_fast.models.config import LDMConfig, UNetConfig, VQGANConfig
from retina_fast.models.unet import UNet2D
from retina_fast.models.vqgan import VQGAN

# A per-band normalisation like the phantom's: visible bands dim and narrow, NIR bright and wide.
PER_BAND = {"reflectance_scale": tuple(1.0 / (0.02 + 0.004 * i) for i in range(16)),
            "reflectance_shift": tuple(-(0.03 + 0.012 * i) / (0.02 + 0.004 * i) for i in range(16))}


def small_config(unet: dict | None = None, **vq_overrides) -> LDMConfig:
    vq = VQGANConfig(**{"image_size": 32, "f": 4, "base_channels": 8, "latent_channels": 4, "codebook_size": 64,
                        "gn_groups": 8, **vq_overrides})
    un = UNetConfig(**{"in_channels": 4, "base_channels": 16, "channel_mults": (1, 2), "attn_heads": 2,
                       "attn_head_dim": 8, "groups": 4, **(unet or {})})
    return LDMConfig(vqgan=vq, unet=un, name="test-small")


def small_modules(seed: int = 0, unet: dict | None = None, **vq_overrides) -> tuple[LDMConfig, VQGAN, UNet2D]:
    torch.manual_seed(seed)
    cfg = small_config(unet, **vq_overrides)
    vqgan, unet = VQGAN(cfg.vqgan).eval(), UNet2D(cfg.unet).eval()
    with torch.no_grad():  # spread the codebook so nearest-code choices are well separated
        vqgan.codebook.embedding.copy_(torch.randn_like(vqgan.codebook.embedding))
    return cfg, vqgan, unet


def small_loaded(seed: int = 0, latent_range=None, clip_x0: bool = True, latent_asinh=None,
                 logsnr_shift: float = 0.0, unet: dict | None = None, latent_whiten=None, **vq_overrides):
    """``latent_range`` defaults to the codebook's min / max; ``clip_x0``, ``latent_asinh`` and ``latent_whiten``
    are config.json's ``latent_clip``, ``latent_asinh`` and ``latent_whiten``; ``logsnr_shift`` the config's
    schedule shift."""
    cfg, vqgan, net = small_modules(seed, unet, **vq_overrides)
    from retina_fast.modelzoo import LoadedLDM, schedule_for

    cfg = dataclasses.replace(cfg, logsnr_shift=logsnr_shift)
    return LoadedLDM(cfg, vqgan, net, schedule_for(cfg), latent_range or vqgan.latent_range(),
                     tuple(cfg.vqgan.wavelengths), clip_x0=clip_x0, latent_asinh=latent_asinh,
                     latent_whiten=latent_whiten)


def save_small_checkpoint(directory: Path, seed: int = 0, **vq_overrides) -> Path:
    cfg, vqgan, unet = small_modules(seed, **vq_overrides)
    return save_checkpoint(directory, {"vqgan": vqgan, "unet": unet}, model_config(cfg, vqgan.latent_range()),
                           {"data": "random weights (tests)"})
