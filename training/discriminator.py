"""2D PatchGAN discriminator (pix2pixHD's NLayerDiscriminator as used by Medical Diffusion; training only).

    conv4x4 s2 (bands -> ndf), LeakyReLU(0.2)
    n = 1 .. layers-1:  conv4x4 s2 (nf -> min(2 nf, 512)), norm, LeakyReLU(0.2)
    conv4x4 s1 (nf -> min(2 nf, 512)), norm, LeakyReLU(0.2)
    conv4x4 s1 (nf -> 1)                                   -> patch logits (B, 1, ~H/2^layers, ~W/2^layers)

All convs pad 2 (ceil((4 - 1) / 2)). ``forward`` returns (logits, features) where features are the
outputs of every block before the last conv, for the feature-matching loss. ``norm``: ``batch``
(the source), ``group`` (GroupNorm(32); batch-size independent, so DDP equals one process) or ``none``.
"""
from __future__ import annotations

import torch
from torch import nn

from retina_fast.models.layers import group_count

__all__ = ["PatchDiscriminator"]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(group_count(channels, 32), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"discriminator norm {kind!r}: use batch, group or none")


class PatchDiscriminator(nn.Module):
    """x (B, bands, H, W) in model range -> (logits (B, 1, h, w), [block outputs])."""

    def __init__(self, in_channels: int = 16, ndf: int = 64, layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        kw, pad = 4, 2
        blocks: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, ndf, kw, 2, pad), nn.LeakyReLU(0.2))]
        nf = ndf
        for _ in range(1, layers):
            nf_prev, nf = nf, min(nf * 2, 512)
            blocks.append(nn.Sequential(nn.Conv2d(nf_prev, nf, kw, 2, pad), _norm(norm, nf), nn.LeakyReLU(0.2)))
        nf_prev, nf = nf, min(nf * 2, 512)
        blocks.append(nn.Sequential(nn.Conv2d(nf_prev, nf, kw, 1, pad), _norm(norm, nf), nn.LeakyReLU(0.2)))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(nf, 1, kw, 1, pad)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        h = x
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        return self.head(h), feats
