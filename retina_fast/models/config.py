"""Model configurations: frozen dataclasses that round-trip through JSON, and the named presets.

``LDMConfig`` = ``VQGANConfig`` (autoencoder + codebook + its training losses) + ``UNetConfig``
(latent denoiser) + the diffusion schedule. Presets:

* ``tiny``      128x128x16, f = 4 -> 32x32x8 latents, codebook 1024, VQ base 16, U-Net base 32;
                sized to train VQ-GAN + LDM on a 2-core CPU within ~2 hours.
* ``paper-224`` 224x224x16, f = 8, 8 latent channels, codebook 1024, U-Net base 512, 3 levels.
* ``paper-672`` the same at 672x672.
* ``sweep_grid()`` the source's grid f in {4, 8, 16} x latent channels in {8, 32, 256} x U-Net base in
  {128, 256, 512} at 224x224 (names ``sweep-f{f}-c{c}-b{b}``).

Data inside the VQ-GAN: ``x_b = reflectance_scale_b * r_b + reflectance_shift_b`` for band b with r the
reflectance in [0, 1]. The scale and shift are either one number for every band (the source's global
``2 r - 1``, the default of a bare config and of checkpoints written before per-band normalisation) or
one per band: ``retina-fast train vqgan`` (``--normalise band``, its default) standardises each band
with its mean and standard deviation inside the field of view of the training data
(``retina_fast.models.normalisation``), so that the dim visible bands -- where the retinal vessels have
their contrast -- reach the network at the same scale as the bright near-infrared ones.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from retina_fast import DEFAULT_WAVELENGTHS

UPSAMPLE_MODES = ("nearest_conv", "transposed")

__all__ = ["UPSAMPLE_MODES", "VQGANConfig", "UNetConfig", "LDMConfig", "PRESETS", "get_preset", "sweep_grid",
           "DEFAULT_WAVELENGTHS"]


def _from_dict(cls, data: dict[str, Any]):
    """Build a (flat) config dataclass from a JSON dict: lists become tuples, unknown keys are errors."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known keys are {sorted(names)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class VQGANConfig:
    """2D VQ-GAN (Medical Diffusion's TATS-derived autoencoder read in 2D) and its losses.

    Encoder channels: ``base`` at full resolution, then ``base * channel_mults[i]`` after downsampling
    stage i (default mults 2, 4, 8, ...: channels double per stage). ``f = 2**stages``.
    """

    bands: int = 16
    image_size: int = 128
    f: int = 8
    base_channels: int = 16
    channel_mults: tuple[int, ...] = ()           # () = doubling: (2, 4, ..., 2**stages)
    enc_res_blocks: int = 1                       # ResBlocks per encoder stage (source: 1)
    dec_res_blocks: int = 2                       # ResBlocks per decoder stage (source: 2)
    latent_channels: int = 8                      # embedding dim D
    codebook_size: int = 1024
    commitment: float = 0.25
    ema_decay: float = 0.99
    ema_eps: float = 1e-5                         # Laplace smoothing of the EMA cluster sizes
    restart_threshold: float = 1.0                # EMA count below which a code is restarted
    kmeans_iters: int = 20
    kmeans_tol: float = 1e-4
    kmeans_samples_per_code: int = 256            # K-Means subsample: at most K * this vectors
    gn_groups: int = 32
    gn_eps: float = 1e-6
    padding_mode: str = "replicate"               # the source pads its convs by replication
    disc_channels: int = 64
    disc_layers: int = 3
    gan_warmup_steps: int = 10000
    l1_weight: float = 4.0
    # Per-band weights of the L1 term (mean 1), or None for plain L1. ``retina-fast train vqgan
    # --band-weights std`` sets them to 1/std of each band over the training data, so that the dim
    # visible bands (where the phantom's vessels have their contrast) count as much as the bright NIR ones.
    band_loss_weights: tuple[float, ...] | None = None
    spectral_angle_weight: float = 1.0
    # Weight each pixel's spectral angle by the target's spectral norm (training/losses.spectral_angle):
    # the angles of black pixels are noise and dominate the plain mean's gradient. Off by default: it
    # converges faster early on but did not give a better tiny after the full 6000 steps (issue #4).
    spectral_angle_weighted: bool = False
    gan_weight: float = 1.0
    feature_matching_weight: float = 4.0
    perceptual_weight: float = 0.0                # > 0 only with a user-supplied weights file
    wavelengths: tuple[float, ...] = DEFAULT_WAVELENGTHS
    # x = reflectance_scale * r + reflectance_shift: one number for all bands, or one per band (see above)
    reflectance_scale: float | tuple[float, ...] = 2.0
    reflectance_shift: float | tuple[float, ...] = -1.0
    # Decoder x2 upsampling: "nearest_conv" (nearest x2, then a 3x3 conv; Rombach/Esser's LDM autoencoders)
    # or "transposed" (the source's 4x4 stride-2 transposed conv, which paints a checkerboard at 555 nm on
    # the phantom). A config dict without this key predates the option and means "transposed" (from_dict).
    upsample: str = "nearest_conv"

    def __post_init__(self) -> None:
        if self.f not in (2, 4, 8, 16, 32):
            raise ValueError(f"VQGANConfig.f must be a power of two in 2..32, got {self.f}")
        if self.channel_mults and len(self.channel_mults) != self.stages:
            raise ValueError(f"channel_mults {self.channel_mults} needs one entry per downsampling stage "
                             f"(f={self.f} -> {self.stages})")
        if len(self.wavelengths) != self.bands:
            raise ValueError(f"{len(self.wavelengths)} wavelengths for {self.bands} bands")
        if self.band_loss_weights is not None:
            w = self.band_loss_weights
            if len(w) != self.bands or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in w):
                raise ValueError(f"band_loss_weights needs {self.bands} finite positive numbers, got {w!r}")
        if self.image_size % self.f:
            raise ValueError(f"image_size {self.image_size} is not divisible by f={self.f}")
        if self.padding_mode not in ("replicate", "zeros", "reflect"):
            raise ValueError(f"padding_mode {self.padding_mode!r}: use replicate, zeros or reflect")
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample {self.upsample!r}: use {' or '.join(UPSAMPLE_MODES)}")
        for name in ("reflectance_scale", "reflectance_shift"):
            v = getattr(self, name)
            vals = v if isinstance(v, tuple) else (v,)
            if isinstance(v, tuple) and len(v) != self.bands:
                raise ValueError(f"{name} needs one number or {self.bands} (one per band), got {len(v)}")
            if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in vals):
                raise ValueError(f"{name} must be finite numbers, got {v!r}")
            if name == "reflectance_scale" and not all(a > 0 for a in vals):
                raise ValueError(f"reflectance_scale must be positive, got {v!r}")

    @property
    def per_band_normalisation(self) -> bool:
        """True when the scale or shift differs between bands (stored as one number per band)."""
        return isinstance(self.reflectance_scale, tuple) or isinstance(self.reflectance_shift, tuple)

    @property
    def stages(self) -> int:
        return int(math.log2(self.f))

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Encoder channels per resolution level: (c_0 at full res, c_1, ..., c_stages at the latent)."""
        mults = self.channel_mults or tuple(2 ** (i + 1) for i in range(self.stages))
        return (self.base_channels,) + tuple(self.base_channels * m for m in mults)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.f

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VQGANConfig":
        if isinstance(data, dict) and "upsample" not in data:
            data = {**data, "upsample": "transposed"}  # written before the option existed
        return _from_dict(cls, data)


@dataclass(frozen=True)
class UNetConfig:
    """2D diffusion U-Net (Medical Diffusion's Unet3D at depth 1, temporal attention dropped)."""

    in_channels: int = 8
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 4)    # one per level; 3 levels
    num_res_blocks: int = 2
    attn_heads: int = 8
    attn_head_dim: int = 32
    groups: int = 8                               # GroupNorm groups in the time-conditioned blocks
    init_kernel: int = 7
    time_mult: int = 4                            # time embedding width = time_mult * base_channels
    pad_mode: str = "reflect"                     # for latent sides not divisible by 2**(levels-1)
    # levels (0 = finest) whose down and up attention is full softmax attention instead of linear attention
    # (the middle is always softmax); () = the source's layout
    softmax_attn_levels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.channel_mults:
            raise ValueError("UNetConfig.channel_mults needs at least one level")
        levels = self.softmax_attn_levels
        if (not isinstance(levels, tuple) or len(set(levels)) != len(levels)
                or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.levels for v in levels)):
            raise ValueError(f"UNetConfig.softmax_attn_levels {levels!r}: distinct level indices in "
                             f"0..{self.levels - 1} (0 = finest)")
        for c in self.level_channels:
            if c % self.groups:
                raise ValueError(f"U-Net channels {c} not divisible by groups={self.groups}")
        if self.pad_mode not in ("reflect", "zeros", "replicate"):
            raise ValueError(f"pad_mode {self.pad_mode!r}: use reflect, zeros or replicate")

    @property
    def levels(self) -> int:
        return len(self.channel_mults)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def multiple(self) -> int:
        """Latent sides are padded up to a multiple of this (2**(levels-1))."""
        return 2 ** (self.levels - 1)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UNetConfig":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class LDMConfig:
    """Latent diffusion model: autoencoder + denoiser + cosine schedule (T steps, epsilon prediction)."""

    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    timesteps: int = 1000
    schedule: str = "cosine"
    cosine_s: float = 0.008
    max_beta: float = 0.9999
    prediction: str = "eps"
    name: str = "custom"
    # log-SNR shift of the cosine schedule in nats (retina_fast.schedules; 0: the plain cosine schedule)
    logsnr_shift: float = 0.0

    def __post_init__(self) -> None:
        if self.unet.in_channels != self.vqgan.latent_channels:
            raise ValueError(f"U-Net in_channels {self.unet.in_channels} != VQ-GAN latent_channels "
                             f"{self.vqgan.latent_channels}")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule {self.schedule!r}: use cosine or linear")
        if self.prediction != "eps":
            raise ValueError("only epsilon prediction is implemented (prediction='eps')")
        from retina_fast.schedules import check_logsnr_shift

        check_logsnr_shift(self.logsnr_shift)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""
        s = self.vqgan.latent_size
        return (self.vqgan.latent_channels, s, s)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vqgan": self.vqgan.to_dict(), "unet": self.unet.to_dict()}
        for f in dataclasses.fields(self):
            if f.name not in out:
                out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LDMConfig":
        data = dict(data)
        vq = VQGANConfig.from_dict(data.pop("vqgan", {}))
        un = UNetConfig.from_dict(data.pop("unet", {}))
        return _from_dict(cls, {**data, "vqgan": vq, "unet": un})


def _ldm(name: str, image_size: int, f: int, latent: int, vq_base: int, unet_base: int,
         unet_extra: dict[str, Any] | None = None, **vq_extra: Any) -> LDMConfig:
    vq = VQGANConfig(image_size=image_size, f=f, latent_channels=latent, base_channels=vq_base, **vq_extra)
    unet = UNetConfig(in_channels=latent, base_channels=unet_base, **(unet_extra or {}))
    return LDMConfig(vqgan=vq, unet=unet, name=name)


PRESETS: dict[str, LDMConfig] = {
    # VQ base 16 is Medical Diffusion's n_hiddens: every GroupNorm then has >= 32 channels. The
    # smaller discriminator and the earlier GAN start suit a run of a few thousand CPU steps.
    # tiny is the shipped CPU default: U-Net base 32 with 4 attention heads (2.4 M parameters, ~10 MB)
    # and one decoder ResBlock per stage (the source has two; no better in docs/recipe_study) so that
    # training both models fits in ~2 hours on a 2-core CPU and sampling stays interactive there.
    # f = 4 (32x32x8 latents): at f = 8 the autoencoder kept a third of f = 4's retinal-vessel contrast
    # after the same 1000 steps (docs/recipe_study: 555 nm 0.013 vs 0.029; phantom 0.167).
    "tiny": _ldm("tiny", 128, 4, 8, 16, 32, unet_extra={"attn_heads": 4}, disc_channels=32,
                 gan_warmup_steps=1000, dec_res_blocks=1),
    "paper-224": _ldm("paper-224", 224, 8, 8, 32, 512),
    "paper-672": _ldm("paper-672", 672, 8, 8, 32, 512),
}


def sweep_grid(image_size: int = 224) -> dict[str, LDMConfig]:
    """The source's sweep: f in {4, 8, 16} x latent channels in {8, 32, 256} x U-Net base {128, 256, 512}."""
    grid: dict[str, LDMConfig] = {}
    for f in (4, 8, 16):
        for c in (8, 32, 256):
            for b in (128, 256, 512):
                name = f"sweep-f{f}-c{c}-b{b}"
                grid[name] = _ldm(name, image_size, f, c, 32, b)
    return grid


def get_preset(name: str) -> LDMConfig:
    """A preset (``tiny``, ``paper-224``, ``paper-672``) or a sweep-grid name (``sweep-f8-c8-b512``)."""
    if name in PRESETS:
        return PRESETS[name]
    grid = sweep_grid()
    if name in grid:
        return grid[name]
    raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}; sweep grid: "
                   f"sweep-f{{4,8,16}}-c{{8,32,256}}-b{{128,256,512}} (e.g. sweep-f8-c8-b512)")
