"""Model definitions shared by the trainers and the engine: one definition per architecture.

``VQGAN`` (autoencoder + ``Codebook``), ``UNet2D`` (latent denoiser), their configs and presets.
"""
from retina_fast.models.attention import Attention, LinearAttention
from retina_fast.models.codebook import Codebook, QuantizeOutput
from retina_fast.models.config import (PRESETS, LDMConfig, UNetConfig, VQGANConfig, get_preset,
                                       sweep_grid)
from retina_fast.models.kmeans import kmeans, quantisation_stats
from retina_fast.models.layers import GroupNormSiLU
from retina_fast.models.unet import UNet2D
from retina_fast.models.vqgan import (VQGAN, LatentWhitening, VQGANOutput, model_to_reflectance,
                                      reflectance_to_model, scale_latent, unscale_latent)

__all__ = [
    "Attention", "LinearAttention",
    "Codebook", "QuantizeOutput", "PRESETS", "LDMConfig", "UNetConfig", "VQGANConfig", "get_preset",
    "sweep_grid", "kmeans", "quantisation_stats", "GroupNormSiLU", "UNet2D",
    "VQGAN", "VQGANOutput", "model_to_reflectance", "reflectance_to_model", "scale_latent",
    "unscale_latent", "LatentWhitening",
]
