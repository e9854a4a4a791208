"""Floating-point operations of one U-Net call and one decode, written out from the architecture.

Benchmarks report achieved GFLOP/s as (this count) / (measured time). The count is the one
``torch.utils.flop_counter.FlopCounterMode`` makes -- 2 FLOPs per multiply-add of every convolution,
transposed convolution and matrix product -- computed from the config alone (no model, no forward pass;
tests/test_flops.py checks the two agree). Normalisations, softmaxes, SiLU and other elementwise work
are not counted: they are O(C·H·W) against O(C²·H·W·k²) and below 1 % at the paper's sizes.

Per image, with H×W the latent side padded to a multiple of 2**(levels-1) and T = time_mult·base:

* convolution C_in -> C_out, k×k, output h×w:            2·C_in·C_out·k²·h·w
* transposed convolution, k×k, *input* h×w:               2·C_in·C_out·k²·h·w
* linear layer                                            2·in·out
* linear attention, N tokens, heads×d:   qkv 2·C·3hd·N, context 2·h·N·d², output 2·h·N·d², out 2·hd·C·N
* softmax attention:                     qkv, out as above, scores 2·h·N²·d, weighted sum 2·h·N²·d
* U-Net: time MLP, 7×7 input conv, per level ResnetBlocks (3×3 convs, 1×1 skip when C changes, the time
  projection T -> 2·C_out) and linear attention (softmax at the levels in ``softmax_attn_levels``), 4×4
  stride-2 down / transposed up convs, the middle's softmax attention, the final block and the 1×1 output
  conv (retina_fast.models.unet).
* decode (``VQGAN.decode_indices``): 1×1 post-quant conv, per stage the x2 upsampling (nearest + 3×3
  conv at the doubled size, or a 4×4 stride-2 transposed conv of the input padded by 1) and the
  ResBlocks' 3×3 convs, then the 3×3 output conv (retina_fast.models.vqgan).
* nearest-code lookup: 2·h·w·K·D per image (retina_fast.ops.nearest_code).

Paper-224 (base 512, 28×28×8 latents): 110.8 GFLOP per U-Net call, 63.8 GFLOP per decode.
"""
from __future__ import annotations

from retina_fast.models.config import LDMConfig, UNetConfig, VQGANConfig

__all__ = ["conv", "unet_flops", "decode_flops", "nearest_code_flops", "sample_flops"]


def conv(c_in: int, c_out: int, k: int, h: int, w: int) -> int:
    """2·C_in·C_out·k²·h·w: a k×k convolution with output h×w (or a transposed one with input h×w)."""
    return 2 * c_in * c_out * k * k * h * w


def _linear_attention(c: int, heads: int, d: int, n: int) -> int:
    hid = heads * d
    return conv(c, 3 * hid, 1, n, 1) + 2 * heads * n * d * d * 2 + conv(hid, c, 1, n, 1)


def _softmax_attention(c: int, heads: int, d: int, n: int) -> int:
    hid = heads * d
    return conv(c, 3 * hid, 1, n, 1) + 2 * heads * n * n * d * 2 + conv(hid, c, 1, n, 1)


def _resnet_block(c_in: int, c_out: int, time_dim: int, h: int, w: int) -> int:
    skip = conv(c_in, c_out, 1, h, w) if c_in != c_out else 0
    return 2 * time_dim * 2 * c_out + conv(c_in, c_out, 3, h, w) + conv(c_out, c_out, 3, h, w) + skip


def _level_attention(cfg: UNetConfig, lvl: int, c: int, n: int) -> int:
    fn = _softmax_attention if lvl in cfg.softmax_attn_levels else _linear_attention
    return fn(c, cfg.attn_heads, cfg.attn_head_dim, n)


def unet_flops(cfg: UNetConfig, h: int, w: int) -> int:
    """FLOPs of one ``UNet2D`` call on one (C, h, w) latent (see the module docstring)."""
    m = cfg.multiple
    h, w = -(-h // m) * m, -(-w // m) * m
    base, heads, d, n_res = cfg.base_channels, cfg.attn_heads, cfg.attn_head_dim, cfg.num_res_blocks
    t_dim = cfg.time_mult * base
    dims = (base,) + cfg.level_channels
    total = 2 * base * t_dim + 2 * t_dim * t_dim + conv(cfg.in_channels, base, cfg.init_kernel, h, w)
    for lvl in range(cfg.levels):
        c_in, c_out = dims[lvl], dims[lvl + 1]
        for i in range(n_res):
            total += _resnet_block(c_in if i == 0 else c_out, c_out, t_dim, h, w)
        total += _level_attention(cfg, lvl, c_out, h * w)
        if lvl != cfg.levels - 1:
            h, w = h // 2, w // 2
            total += conv(c_out, c_out, 4, h, w)
    mid = dims[-1]
    total += 2 * _resnet_block(mid, mid, t_dim, h, w) + _softmax_attention(mid, heads, d, h * w)
    for lvl in reversed(range(cfg.levels)):
        c_in, c_out = dims[lvl], dims[lvl + 1]
        for i in range(n_res):
            total += _resnet_block(2 * c_out if i == 0 else c_in, c_in, t_dim, h, w)
        total += _level_attention(cfg, lvl, c_in, h * w)
        if lvl != 0:
            total += conv(c_in, c_in, 4, h, w)
            h, w = 2 * h, 2 * w
    return total + _resnet_block(2 * base, base, t_dim, h, w) + conv(base, cfg.in_channels, 1, h, w)


def decode_flops(cfg: VQGANConfig) -> int:
    """FLOPs of ``VQGAN.decode_indices`` for one image (code indices -> cube)."""
    ch, s = cfg.stage_channels, cfg.stages
    h = w = cfg.latent_size
    total = conv(cfg.latent_channels, ch[s], 1, h, w)
    c_prev = ch[s]
    for j in range(s):
        c_out = ch[s - j]
        if cfg.upsample == "nearest_conv":
            total += conv(c_prev, c_out, 3, 2 * h, 2 * w)
        else:
            total += conv(c_prev, c_out, 4, h + 2, w + 2)
        h, w = 2 * h, 2 * w
        total += cfg.dec_res_blocks * 2 * conv(c_out, c_out, 3, h, w)
        c_prev = c_out
    return total + conv(c_prev, cfg.bands, 3, h, w)


def nearest_code_flops(cfg: VQGANConfig) -> int:
    """FLOPs of the nearest-code lookup of one image's latent: 2·h·w·K·D."""
    return 2 * cfg.latent_size ** 2 * cfg.codebook_size * cfg.latent_channels


def sample_flops(cfg: LDMConfig, steps: int) -> int:
    """FLOPs to sample one image: ``steps`` U-Net calls (DDIM, DDPM and DPM-Solver++(2M) make one per step),
    one nearest-code lookup and one decode."""
    _, h, w = cfg.latent_shape
    return steps * unet_flops(cfg.unet, h, w) + nearest_code_flops(cfg.vqgan) + decode_flops(cfg.vqgan)
