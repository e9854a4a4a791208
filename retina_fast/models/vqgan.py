"""2D VQ-GAN for 16-band cubes: a 2D reading of Medical Diffusion's (TATS-derived) autoencoder.

With encoder channels c_0 = base, c_i = base * mult_i (default doubling) and S = log2(f) stages:

    Encoder:  conv3x3 bands -> c_0
              stage i = 0..S-1: conv4x4 stride 2 (c_i -> c_{i+1}), ResBlock(c_{i+1}) x enc_res_blocks
              GroupNorm + SiLU, conv1x1 c_S -> D                                   -> z (B, D, H/f, W/f)
    Codebook: nearest code, straight-through, EMA, K-Means (retina_fast.models.codebook)
    Decoder:  conv1x1 D -> c_S, GroupNorm + SiLU
              stage j = 0..S-1: x2 upsampling (c_{S-j+1} or c_S at j = 0 -> c_{S-j}),
                                ResBlock(c_{S-j}) x dec_res_blocks
              conv3x3 c_1 -> bands                                                  (no output clamp)

The x2 upsampling (``VQGANConfig.upsample``) is nearest x2 then a 3x3 conv (``nearest_conv``, the
default; as in Rombach et al.'s LDM autoencoders) or the source's 4x4 stride-2 transposed conv
(``transposed``, which on the phantom paints a checkerboard at 555 nm). Both are, exactly, four 2x2
convolutions of the (padded) input, one per output phase (``UpConv.phase_weight``), which is how the
fused backends run them.

So, as in the source, the decoder carries one level more channels than the encoder at each
resolution and ends at c_1 = 2 base. ResBlock = GN -> SiLU -> conv3 -> GN -> SiLU -> conv3, + x;
GroupNorm(32, eps 1e-6), or the largest divisor of the channel count below 32 when 32 does not divide
it (``group_count``). Convs pad by replication (the source's SamePadConv; ``padding_mode``).

Data inside the model: x_b = s_b r_b + t_b for reflectance r (``retina_fast.models.normalisation``; the
source's global 2 r - 1, or each band standardised inside the field of view).
Latent scaling for diffusion (FACTS §2): z' = 2 (z - min E) / (max E - min E) - 1 with min/max scalars
over the whole codebook E, applied to the continuous pre-quantisation z; decoding inverts it, takes the
nearest code and decodes.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from retina_fast.models.codebook import Codebook, QuantizeOutput
from retina_fast.models.config import VQGANConfig
from retina_fast.models.layers import Conv2d, ConvTranspose2d, GroupNormSiLU, group_count
from retina_fast.models.normalisation import model_to_reflectance, reflectance_to_model
from retina_fast.ops import nearest_code
from retina_fast.ops.table import op

__all__ = ["VQGAN", "VQGANOutput", "ResBlock", "UpConv", "scale_latent", "unscale_latent", "LatentWhitening",
           "reflectance_to_model", "model_to_reflectance"]


def scale_latent(z: torch.Tensor, lo: float, hi: float, asinh: float | None = None) -> torch.Tensor:
    """z' = 2 (u - lo) / (hi - lo) - 1 with u = z, or u = asinh(z / asinh) when ``asinh`` is given.

    The asinh companding (linear near 0, logarithmic in the tails) keeps a heavy-tailed latent distribution's
    extremes inside the scaling range without squeezing its bulk: with it, (lo, hi) can span every latent
    of the data (nothing clamped) while z' keeps a useful spread (the sinh-arcsinh family of Jones & Pewsey
    (2009), Biometrika 96(4), used here only as a fixed invertible map)."""
    u = torch.asinh(z / asinh) if asinh else z
    return 2.0 * (u - lo) / (hi - lo) - 1.0


def unscale_latent(z: torch.Tensor, lo: float, hi: float, asinh: float | None = None) -> torch.Tensor:
    """Inverse of ``scale_latent``: u = (z' + 1) (hi - lo) / 2 + lo, then z = asinh * sinh(u) when companded."""
    u = (z + 1.0) * (hi - lo) / 2.0 + lo
    return asinh * torch.sinh(u) if asinh else u


class LatentWhitening:
    """A fixed affine map of the latent channels, w = M (z' - mean), applied after ``scale_latent``; the
    diffusion model works on w and the decoder gets ``invert(w)`` = M^-1 w + mean.

    Why: a diffusion model resolves the directions of its data in order of their variance (high-variance ones at
    high noise, low-variance ones last), and the scaled latents' channel covariance is far from isotropic -- on the
    shipped VQ-GAN its eigenvalues span 0.0007..0.33, the largest one (field of view, background) holding 70 % of
    the variance, while the retinal vessels sit in low-variance directions (up to 76 % of a direction's variance,
    12 % of the whole). ``fit`` takes M = s C^-1/2 (ZCA whitening: Bell & Sejnowski 1997, "The 'independent
    components' of natural scenes are edge filters", Vision Research 37(23); the symmetric root keeps each
    channel closest to itself) so every direction has standard deviation ``s``."""

    def __init__(self, mean, matrix) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.matrix = torch.as_tensor(matrix, dtype=torch.float64)
        c = self.mean.numel()
        if self.mean.shape != (c,) or self.matrix.shape != (c, c):
            raise ValueError(f"mean must be (C,) and matrix (C, C), got {tuple(self.mean.shape)} "
                             f"and {tuple(self.matrix.shape)}")
        if not bool(torch.isfinite(self.mean).all() and torch.isfinite(self.matrix).all()):
            raise ValueError("mean and matrix must be finite")
        sv = torch.linalg.svdvals(self.matrix)
        if not float(sv[-1]) > 1e-9 * float(sv[0]):
            raise ValueError(f"the matrix is singular (singular values {sv.tolist()})")
        self.inverse = torch.linalg.inv(self.matrix)

    @classmethod
    def fit(cls, z: torch.Tensor, std: float) -> "LatentWhitening":
        """From scaled latents (N, C, h, w): mean and covariance over every pixel, M = std * C^-1/2."""
        x = z.transpose(0, 1).reshape(z.shape[1], -1).double()
        mean = x.mean(1)
        cov = torch.cov(x)
        lam, vec = torch.linalg.eigh(cov)
        if not float(lam[0]) > 1e-12 * float(lam[-1]):
            raise ValueError(f"latent whitening: the latents' channel covariance is singular (eigenvalues "
                             f"{lam.tolist()})")
        return cls(mean, std * (vec * lam.rsqrt()) @ vec.T)

    def _map(self, z: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ij,bjhw->bihw", matrix.to(z.device, z.dtype), z)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        return self._map(z - self.mean.to(z.device, z.dtype)[:, None, None], self.matrix)

    def invert(self, w: torch.Tensor) -> torch.Tensor:
        return self._map(w, self.inverse) + self.mean.to(w.device, w.dtype)[:, None, None]

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "matrix": self.matrix.tolist()}


def diffusion_latents(z: torch.Tensor, lo: float, hi: float, asinh: float | None = None, *, clip: bool = True,
                      whiten: LatentWhitening | None = None) -> torch.Tensor:
    """Continuous VQ-GAN latents (B, C, h, w) -> the diffusion model's space: ``scale_latent``, clamped to
    [-1, 1] when ``clip``, then ``whiten`` (when given), clamped again. The one definition shared by training
    and inference; the decode inverts it up to the clamps and the nearest-code step."""
    w = scale_latent(z, lo, hi, asinh)
    if clip:
        w = w.clamp(-1.0, 1.0)
    if whiten is not None:
        w = whiten.apply(w)
        if clip:
            w = w.clamp(-1.0, 1.0)
    return w


class VQGANOutput(NamedTuple):
    """recon (B, bands, H, W); z (B, D, h, w) continuous; quant: the codebook's QuantizeOutput."""

    recon: torch.Tensor
    z: torch.Tensor
    quant: QuantizeOutput


def _conv(c_in: int, c_out: int, k: int, stride: int, mode: str) -> Conv2d:
    pad = (k - stride) // 2 if stride > 1 else k // 2
    return Conv2d(c_in, c_out, k, stride=stride, padding=pad, padding_mode=mode)


def _phase_taps(k: int) -> torch.Tensor:
    """(4, k) 0/1 matrix mapping the ``k`` taps of a nearest-x2 + conv(k = 3) along one axis onto the four
    taps of the equivalent stride-2 transposed convolution (kernel 4, padding 1 on the padded input):
    output 2m reads x[m-1] (transposed tap 3) and x[m] (tap 1); output 2m+1 reads x[m] (tap 2) and x[m+1]
    (tap 0); nearest x2 makes conv tap d (-1, 0, 1) read x[m-1], x[m], x[m] for even and x[m], x[m], x[m+1]
    for odd outputs."""
    if k != 3:
        raise ValueError("nearest_conv phase form is for 3x3 convolutions")
    m = torch.zeros(4, 3)
    for tap, (even, odd) in enumerate(((3, 2), (1, 2), (1, 0))):
        m[even, tap] += 1.0
        m[odd, tap] += 1.0
    return m


class UpConv(nn.Module):
    """x2 upsampling, (B, C_in, h, w) -> (B, C_out, 2h, 2w), as configured by ``VQGANConfig.upsample``:

    * ``nearest_conv``: nearest x2, then a 3x3 conv padded by ``mode`` (weight (C_out, C_in, 3, 3));
    * ``transposed``: pad the input by 1 (``mode``), then a 4x4 stride-2 transposed conv with padding 3
      (the source's SamePadConvTranspose; weight (C_in, C_out, 4, 4)).

    For replicate or zero padding both equal a transposed conv (kernel 4, stride 2) of the input padded
    by 1 and cropped by 3 with ``phase_weight()`` -- i.e. four 2x2 phase convolutions, 4 instead of 9 taps
    per output for ``nearest_conv``."""

    def __init__(self, c_in: int, c_out: int, mode: str, kind: str = "transposed") -> None:
        super().__init__()
        self.kind = kind
        self.mode = "constant" if mode == "zeros" else mode
        if kind == "nearest_conv":
            self.conv = _conv(c_in, c_out, 3, 1, mode)
        elif kind == "transposed":
            self.conv = ConvTranspose2d(c_in, c_out, 4, stride=2, padding=3)
        else:
            raise ValueError(f"unknown upsampling {kind!r}")

    @op("upconv")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "nearest_conv":
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.pad(x, (1, 1, 1, 1), mode=self.mode))

    def phase_weight(self) -> torch.Tensor:
        """The equivalent ConvTranspose2d(kernel 4, stride 2) weight (C_in, C_out, 4, 4) (see the class
        docstring); for ``transposed`` the layer's own weight. The nearest-x2 equivalence holds at the
        border for replicate and zero padding, not for reflect."""
        w = self.conv.weight.detach()
        if self.kind == "transposed":
            return w
        if self.mode not in ("replicate", "constant"):
            raise ValueError(f"nearest_conv with {self.mode} padding has no phase form")
        m = _phase_taps(3).to(w)
        return torch.einsum("oiyx,ay,bx->ioab", w, m, m)


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3 -> GN -> SiLU -> conv3, + x.  (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, groups: int, eps: float, mode: str) -> None:
        super().__init__()
        g = group_count(channels, groups)
        self.norm1 = GroupNormSiLU(channels, g, eps)
        self.conv1 = _conv(channels, channels, 3, 1, mode)
        self.norm2 = GroupNormSiLU(channels, g, eps)
        self.conv2 = _conv(channels, channels, 3, 1, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.norm2(self.conv1(self.norm1(x))))


class Encoder(nn.Module):
    """(B, bands, H, W) -> (B, c_S, H/f, W/f), before the 1x1 projection to the embedding dim."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        ch, mode = cfg.stage_channels, cfg.padding_mode
        self.conv_in = _conv(cfg.bands, ch[0], 3, 1, mode)
        self.stages = nn.ModuleList()
        for i in range(cfg.stages):
            blocks = [_conv(ch[i], ch[i + 1], 4, 2, mode)]
            blocks += [ResBlock(ch[i + 1], cfg.gn_groups, cfg.gn_eps, mode) for _ in range(cfg.enc_res_blocks)]
            self.stages.append(nn.Sequential(*blocks))
        self.norm_out = GroupNormSiLU(ch[-1], group_count(ch[-1], cfg.gn_groups), cfg.gn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.stages:
            h = stage(h)
        return self.norm_out(h)


class Decoder(nn.Module):
    """(B, c_S, h, w) (after the 1x1 projection from the embedding dim) -> (B, bands, h f, w f)."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        ch, mode, s = cfg.stage_channels, cfg.padding_mode, cfg.stages
        self.norm_in = GroupNormSiLU(ch[-1], group_count(ch[-1], cfg.gn_groups), cfg.gn_eps)
        self.stages = nn.ModuleList()
        c_prev = ch[s]
        for j in range(s):
            c_out = ch[s - j]
            blocks: list[nn.Module] = [UpConv(c_prev, c_out, mode, cfg.upsample)]
            blocks += [ResBlock(c_out, cfg.gn_groups, cfg.gn_eps, mode) for _ in range(cfg.dec_res_blocks)]
            self.stages.append(nn.Sequential(*blocks))
            c_prev = c_out
        self.conv_out = _conv(c_prev, cfg.bands, 3, 1, mode)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm_in(h)
        for stage in self.stages:
            h = stage(h)
        return self.conv_out(h)


class VQGAN(nn.Module):
    """Autoencoder + codebook. Images in model range [-1, 1], (B, bands, H, W) with H, W divisible by f."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        c_top = config.stage_channels[-1]
        self.encoder = Encoder(config)
        self.pre_quant = Conv2d(c_top, config.latent_channels, 1)
        self.codebook = Codebook(config.codebook_size, config.latent_channels,
                                 commitment=config.commitment, decay=config.ema_decay, eps=config.ema_eps,
                                 restart_threshold=config.restart_threshold,
                                 kmeans_iters=config.kmeans_iters, kmeans_tol=config.kmeans_tol,
                                 samples_per_code=config.kmeans_samples_per_code)
        self.post_quant = Conv2d(config.latent_channels, c_top, 1)
        self.decoder = Decoder(config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, bands, H, W) -> continuous pre-quantisation z (B, D, H/f, W/f)."""
        f = self.config.f
        if x.dim() != 4 or x.shape[1] != self.config.bands or x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"VQGAN.encode expects (B, {self.config.bands}, H, W) with H, W divisible by "
                             f"f={f}, got {tuple(x.shape)}")
        return self.pre_quant(self.encoder(x))

    def quantize(self, z: torch.Tensor) -> QuantizeOutput:
        """z (B, D, h, w) -> QuantizeOutput(zq_st, indices (B, h, w), commit_loss, perplexity).
        In training mode this also runs the codebook's EMA update and dead-code restart."""
        return self.codebook(z)

    def decode(self, zq: torch.Tensor) -> torch.Tensor:
        """Quantised latents (B, D, h, w) -> x (B, bands, h f, w f) in model range (not clamped)."""
        return self.decoder(self.post_quant(zq))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) int64 -> x (B, bands, h f, w f)."""
        return self.decode(self.codebook.lookup(indices))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Continuous (unscaled) latents (B, D, h, w) -> nearest codes -> decoder (no codebook update)."""
        idx, _ = self.codebook_nearest(z)
        return self.decode_indices(idx)

    def codebook_nearest(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) -> (indices (B, h, w), squared distances (B, h, w)), never updating the codebook."""
        b, _, h, w = z.shape
        idx, dist = nearest_code(Codebook.flatten(z.detach()).float(), self.codebook.embedding.float())
        return idx.view(b, h, w), dist.view(b, h, w)

    def latent_range(self) -> tuple[float, float]:
        """(min, max) over every entry of the codebook: the latent scaling constants."""
        emb = self.codebook.embedding
        return float(emb.min()), float(emb.max())

    @torch.no_grad()
    def reconstruct(self, cubes: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Reflectance (B, bands, H, W) -> encode -> nearest code (``quantize``; else the continuous
        latent) -> decode -> reflectance in [0, 1] (float32). Never updates the codebook."""
        x = reflectance_to_model(cubes.float(), self.config)
        z = self.encode(x)
        return model_to_reflectance(self.decode_latent(z) if quantize else self.decode(z), self.config).float()

    def forward(self, x: torch.Tensor) -> VQGANOutput:
        """Training pass: encode, quantise (EMA update in training mode), decode."""
        z = self.encode(x)
        q = self.quantize(z)
        return VQGANOutput(self.decode(q.zq_st), z, q)
