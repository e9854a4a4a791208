"""2D diffusion U-Net over VQ-GAN latents: a 2D reading of Medical Diffusion's Unet3D
(Khader et al., "Denoising diffusion probabilistic models for 3D medical image generation", Sci. Rep. 13,
7303, 2023).

The source's "3D" U-Net uses depth-1 kernels on a depth-1 volume, so it is a 2D U-Net plus a
"temporal" attention over the depth axis; at depth 1 that attention attends over a single token and
reduces to a pointwise linear residual (x + W x). **This 2D version drops that temporal attention**:
it mixes no positions, only adds a per-pixel linear map next to the neighbouring 1x1 convolutions.

Structure (levels L = len(channel_mults), dims c_l = base * mult_l):

    init: conv k x k (k = 7), C_in -> base                              -> r (kept for the last skip)
    down, level l:  num_res_blocks x ResnetBlock(t)  (first: c_{l-1} -> c_l)
                    PreNormResidual(LinearAttention 8 heads x 32; softmax Attention at the levels in
                    ``softmax_attn_levels``, default none)               -> push skip
                    Downsample (4x4 stride-2 conv), except at the last level
    mid:   ResnetBlock(t), PreNormResidual(softmax Attention 8 x 32), ResnetBlock(t)
    up, level l (reversed): concat skip -> ResnetBlock(2 c_l -> c_{l-1}), ResnetBlock(t) x (n-1),
                    PreNormResidual(the level's attention), Upsample (4x4 stride-2 transposed conv) except
                    at the first level
    out:   concat r -> ResnetBlock(2 base -> base) -> 1x1 conv -> C_in     (epsilon prediction)

ResnetBlock(t): Block(c_in, c_out, scale_shift from time) -> Block(c_out, c_out) + 1x1 skip;
Block = conv3x3 -> GroupNorm(8) -> x (1 + scale) + shift -> SiLU  (``GroupNormSiLU``).
Time: sinusoidal(base) -> Linear(base, 4 base) -> GELU -> Linear(4 base, 4 base); each ResnetBlock maps
it by SiLU -> Linear(4 base, 2 c_out) to (scale, shift).

Latent sides not divisible by 2**(L-1) (f = 16 at 224 gives 14) are padded (reflect where possible,
else zeros; ``pad_mode``) at the bottom/right up to the next multiple and the output is cropped back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retina_fast.models.attention import Attention, LinearAttention, PreNormResidual
from retina_fast.models.config import UNetConfig
from retina_fast.models.layers import Conv2d, ConvTranspose2d, GroupNormSiLU, sinusoidal_embedding
from retina_fast.ops.table import op

__all__ = ["UNet2D", "ResnetBlock", "Block", "pad_to_multiple"]


class Block(nn.Module):
    """conv3x3 -> GroupNorm -> (1 + scale) x + shift -> SiLU.  x (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, dim_in: int, dim_out: int, groups: int) -> None:
        super().__init__()
        self.proj = Conv2d(dim_in, dim_out, 3, padding=1)
        self.norm_act = GroupNormSiLU(dim_out, groups, eps=1e-5)

    def forward(self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        return self.norm_act(self.proj(x), scale_shift)


class ResnetBlock(nn.Module):
    """Time-conditioned residual block. x (B, C_in, H, W), temb (B, T_dim) -> (B, C_out, H, W)."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int, groups: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, dim_out * 2))
        self.block1 = Block(dim_in, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    @op("time_film")
    def film(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The time conditioning of this block: temb (B, T_dim) -> (scale, shift), each (B, C_out, 1, 1)."""
        scale, shift = self.mlp(temb)[:, :, None, None].chunk(2, dim=1)
        return scale, shift

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, self.film(temb))
        h = self.block2(h)
        return h + self.res_conv(x)


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (B, C, h, w) at the bottom/right so h, w are multiples of ``multiple``; returns (x, (h, w)).

    ``reflect`` falls back to zeros when the pad is not smaller than the side (reflect cannot)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "zeros"
    if mode == "zeros":
        return F.pad(x, (0, pw, 0, ph)), (h, w)
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


class _Level(nn.Module):
    def __init__(self, blocks: list[ResnetBlock], attn: nn.Module, resample: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = attn
        self.resample = resample


class UNet2D(nn.Module):
    """epsilon-prediction U-Net. forward(x (B, C, h, w), t (B,) timesteps in [0, T)) -> eps (B, C, h, w).

    ``t`` may be int64 or float (respaced samplers pass fractional or original-grid timesteps; the
    embedding is computed from the value, not an index). A scalar ``t`` is broadcast over the batch.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        base, groups, heads, hd = cfg.base_channels, cfg.groups, cfg.attn_heads, cfg.attn_head_dim
        time_dim = cfg.time_mult * base
        self.init_conv = Conv2d(cfg.in_channels, base, cfg.init_kernel, padding=cfg.init_kernel // 2)
        self.time_mlp = nn.Sequential(nn.Linear(base, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim))

        dims = (base,) + cfg.level_channels
        n = cfg.num_res_blocks
        self.downs = nn.ModuleList()
        for lvl in range(cfg.levels):
            c_in, c_out = dims[lvl], dims[lvl + 1]
            last = lvl == cfg.levels - 1
            blocks = [ResnetBlock(c_in if i == 0 else c_out, c_out, time_dim, groups) for i in range(n)]
            down = nn.Identity() if last else Conv2d(c_out, c_out, 4, stride=2, padding=1)
            self.downs.append(_Level(blocks, PreNormResidual(c_out, self._attention(lvl, c_out)), down))

        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, time_dim, groups)
        self.mid_attn = PreNormResidual(mid, Attention(mid, heads, hd))
        self.mid_block2 = ResnetBlock(mid, mid, time_dim, groups)

        self.ups = nn.ModuleList()
        for lvl in reversed(range(cfg.levels)):
            c_in, c_out = dims[lvl], dims[lvl + 1]
            first = lvl == 0
            blocks = [ResnetBlock(2 * c_out if i == 0 else c_in, c_in, time_dim, groups) for i in range(n)]
            up = nn.Identity() if first else ConvTranspose2d(c_in, c_in, 4, stride=2, padding=1)
            self.ups.append(_Level(blocks, PreNormResidual(c_in, self._attention(lvl, c_in)), up))

        self.final_block = ResnetBlock(2 * base, base, time_dim, groups)
        self.final_conv = Conv2d(base, cfg.in_channels, 1)

    def _attention(self, level: int, dim: int) -> nn.Module:
        """The attention of a level: linear, or softmax where ``config.softmax_attn_levels`` names the level."""
        cls = Attention if level in self.config.softmax_attn_levels else LinearAttention
        return cls(dim, self.config.attn_heads, self.config.attn_head_dim)

    def time_embedding(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """t (B,) or scalar -> (B, time_mult * base)."""
        t = torch.as_tensor(t, device=self.init_conv.weight.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or shape ({batch},), got {tuple(t.shape)}")
        emb = sinusoidal_embedding(t, self.config.base_channels).to(self.init_conv.weight.dtype)
        return self.time_mlp(emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"UNet2D expects (B, {self.config.in_channels}, h, w), got {tuple(x.shape)}")
        x, (h, w) = pad_to_multiple(x, self.config.multiple, self.config.pad_mode)
        return self.body(x, self.time_embedding(t, x.shape[0]))[..., :h, :w]

    def body(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The network on padded latents: x (B, C, H, W), H and W multiples of ``config.multiple``, and the time
        embedding (B, T_dim) -> eps (B, C, H, W). Backends run this walk with their op tables (the ``cpu``
        backend records it into an op graph, its time conditioning computed per timestep outside)."""
        x = self.init_conv(x)
        r = x
        skips = []
        for level in self.downs:
            for block in level.blocks:
                x = block(x, temb)
            x = level.attn(x)
            skips.append(x)
            x = level.resample(x)
        x = self.mid_block1(x, temb)
        x = self.mid_attn(x)
        x = self.mid_block2(x, temb)
        for level in self.ups:
            x = torch.cat([x, skips.pop()], dim=1)
            for block in level.blocks:
                x = block(x, temb)
            x = level.attn(x)
            x = level.resample(x)
        x = self.final_block(torch.cat([x, r], dim=1), temb)
        return self.final_conv(x)
