"""RSP (retinal structure preservation) module: AG-Net-style vessel segmentation (Zhang et al., 2019).

Architecture (shapes for an input (N, 3, H, W), H and W multiples of 8; ``RSPNet.forward`` pads any
size to a multiple of 8 with reflection and crops the side outputs back):

- Multi-scale input pyramid (M-Net): x/2, x/4, x/8 by 2×2 average pooling; each level is mapped by
  conv3×3 + GroupNorm + ReLU and concatenated with the max-pooled encoder features of that scale.
- Encoder: per scale a block (conv3×3 → GroupNorm → ReLU) × 2 with widths b, 2b, 4b, 8b at scales
  1, 1/2, 1/4, 1/8; the 1/8 block is the centre (AG-Net goes one level deeper; stopping at 1/8 keeps
  the 4 side outputs at 1/8, 1/4, 1/2, 1/1 and the padding multiple at 8 — our choice).
- Decoder: per scale an attention-guided filter (``AttentionGuidedUpsample``) upsamples the coarser
  decoder features using the encoder features of the finer scale as guidance, then a block on
  concat(upsampled, encoder skip).
- 4 side outputs d(1/8), d(1/4), d(1/2), d(1/1): each upsampled (bilinear) to the input size and
  mapped by a 1×1 conv to one vessel logit. (The 1×1 conv is applied before upsampling: bilinear
  interpolation and a per-pixel linear map commute, so this is the same function at 1/64 of the cost.)
  The fused output is the mean of the 4 side logits.

GroupNorm uses min(32, c/2) groups: AG-Net's 32 groups at its widths, and at least two channels per
group at the small widths used for CPU training. Convolutions have no bias where a norm follows.
Vessel outputs are logits (one channel, sigmoid/BCE) rather than AG-Net's 2-class softmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from retina_fast.ops.resize import bilinear_resize_ref
from retina_fast.ops.table import op

__all__ = ["RSPNet", "RSPOutput", "AttentionGate", "AttentionGuidedUpsample", "box_filter",
           "weighted_guided_filter", "pad_to_multiple", "crop_to"]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (N, C, H, W) at the bottom/right to multiples of ``multiple`` (reflect; replicate for
    sides too small to reflect). Returns (padded, (H, W))."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop (…, H', W') to the top-left (…, H, W)."""
    return x[..., : size[0], : size[1]]


@op("bilinear_resize")
def resize_add(x: torch.Tensor, size, add: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear resize of x to ``size`` (align_corners=False; none when already that size) [+ add]: the op
    ``bilinear_resize`` (reference and kernels in :mod:`retina_fast.ops.resize`)."""
    return bilinear_resize_ref(x, size, add)


def box_filter(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over the (2r+1)² window clipped at the borders (differentiable); (N, C, H, W) -> same."""
    return F.avg_pool2d(x, 2 * r + 1, stride=1, padding=r, count_include_pad=False)


def weighted_guided_filter(guide: torch.Tensor, src: torch.Tensor, weight: torch.Tensor, r: int,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear coefficients of a weighted guided filter (He et al. with per-pixel weights, as AG-Net).

    Per window ω_k minimise Σ_i w_i (a_k I_i + b_k − p_i)² + ε a_k², per channel:
    a = cov_w(I, p) / (var_w(I) + ε), b = mean_w(p) − a·mean_w(I), then both are box-averaged.
    guide, src: (N, C, h, w); weight: (N, 1, h, w) ≥ 0. Returns (A, B), each (N, C, h, w); the filtered
    output at any resolution is A↑ · I↑ + B↑.
    """
    wsum = box_filter(weight, r).clamp_min(1e-6)
    mean_i = box_filter(weight * guide, r) / wsum
    mean_p = box_filter(weight * src, r) / wsum
    cov = box_filter(weight * guide * src, r) / wsum - mean_i * mean_p
    var = (box_filter(weight * guide * guide, r) / wsum - mean_i * mean_i).clamp_min(0)
    a = cov / (var + eps)
    b = mean_p - a * mean_i
    return box_filter(a, r), box_filter(b, r)


def _groups(c: int) -> int:
    return max(1, min(32, c // 2))


def conv_gn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(_groups(cout), cout),
                         nn.ReLU(inplace=True))


class Block(nn.Sequential):
    """(conv3×3 → GroupNorm → ReLU) × 2: (N, cin, H, W) -> (N, cout, H, W)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(conv_gn_relu(cin, cout), conv_gn_relu(cout, cout))


class AttentionGate(nn.Module):
    """Grid attention (Oktay et al.): σ(ψ(ReLU(θ(x) + φ(g)))), x, g (N, C, h, w) -> (N, 1, h, w)."""

    def __init__(self, channels: int, inter: int | None = None) -> None:
        super().__init__()
        inter = inter or max(1, channels // 2)
        self.theta = nn.Conv2d(channels, inter, 1, bias=False)
        self.phi = nn.Conv2d(channels, inter, 1, bias=True)
        self.psi = nn.Conv2d(inter, 1, 1, bias=True)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.psi(F.relu(self.theta(x) + self.phi(g))))


class AttentionGuidedUpsample(nn.Module):
    """AG-Net's attention-guided filter used as a learned ×2 upsampling.

    guide (N, c, H, W) (encoder skip, fine scale), low (N, c_low, H/2, W/2) (decoder, coarse scale)
    -> (N, c, H, W). Steps: map ``low`` to c channels (1×1 conv); downsample the guide to the coarse
    grid (2×2 average); attention map T = gate(guide↓, low); weighted guided filter coefficients (A, B)
    on the coarse grid; bilinear upsampling of A, B; output A↑ · guide + B↑.
    """

    def __init__(self, channels: int, low_channels: int, radius: int = 1, eps: float = 1e-2) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(low_channels, channels, 1, bias=False)
        self.gate = AttentionGate(channels)
        self.radius, self.eps = radius, eps

    def forward(self, guide: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        low = self.reduce(low)
        guide_low = F.avg_pool2d(guide, 2)  # exact ×2 grids (inputs padded to multiples of 8)
        t = self.gate(guide_low, low)
        a, b = weighted_guided_filter(guide_low, low, t, self.radius, self.eps)
        size = guide.shape[-2:]
        a, b = resize_add(a, size), resize_add(b, size)
        return a * guide + b


@dataclass
class RSPOutput:
    """sides: 4 vessel logits (N, 1, H, W) from the 1/8, 1/4, 1/2, 1/1 decoder scales, in that order;
    mean: their mean (N, 1, H, W); features: the decoder features [(N, 8b, H/8, W/8), (N, 4b, H/4, W/4),
    (N, 2b, H/2, W/2), (N, b, H, W)] of the padded input (H, W rounded up to multiples of 8)."""

    sides: list[torch.Tensor]
    mean: torch.Tensor
    features: list[torch.Tensor]


class RSPNet(nn.Module):
    """AG-Net-style vessel segmentation network; ``base`` = b, widths b, 2b, 4b, 8b. See module doc."""

    def __init__(self, base: int = 8, in_channels: int = 3, gf_radius: int = 1, gf_eps: float = 1e-2) -> None:
        super().__init__()
        c = [base, 2 * base, 4 * base, 8 * base]
        self.widths = c
        self.enc = nn.ModuleList([Block(in_channels, c[0])] + [Block(2 * c[i - 1], c[i]) for i in range(1, 4)])
        self.pyramid = nn.ModuleList([conv_gn_relu(in_channels, c[i - 1]) for i in range(1, 4)])
        self.up = nn.ModuleList([AttentionGuidedUpsample(c[i], c[i + 1], gf_radius, gf_eps) for i in range(3)])
        self.dec = nn.ModuleList([Block(2 * c[i], c[i]) for i in range(3)])
        self.side = nn.ModuleList([nn.Conv2d(ch, 1, 1) for ch in reversed(c)])

    def forward_padded(self, x: torch.Tensor) -> RSPOutput:
        """x (N, 3, H, W) with H, W multiples of 8 -> RSPOutput at (H, W)."""
        skips, h, inp = [], None, x
        for i in range(4):
            if i == 0:
                h = self.enc[0](x)
            else:
                inp = F.avg_pool2d(inp, 2)
                h = self.enc[i](torch.cat([F.max_pool2d(h, 2), self.pyramid[i - 1](inp)], 1))
            skips.append(h)
        feats = [h]  # centre, 1/8
        for i in (2, 1, 0):
            h = self.dec[i](torch.cat([self.up[i](skips[i], h), skips[i]], 1))
            feats.append(h)
        size = x.shape[-2:]
        sides = [F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
                 for conv, f in zip(self.side, feats)]
        return RSPOutput(sides=sides, mean=torch.stack(sides).mean(0), features=feats)

    def forward(self, x: torch.Tensor) -> RSPOutput:
        """x (N, 3, H, W) any size in [0, 1] -> RSPOutput with sides/mean cropped to (H, W)."""
        xp, size = pad_to_multiple(x, 8)
        out = self.forward_padded(xp)
        if xp.shape[-2:] == x.shape[-2:]:
            return out
        sides = [crop_to(s, size) for s in out.sides]
        return RSPOutput(sides=sides, mean=crop_to(out.mean, size), features=out.features)
