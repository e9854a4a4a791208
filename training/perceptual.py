"""Optional perceptual loss from a user-supplied VGG-style weights file (safetensors; never downloaded).

The network is a plain VGG feature stack (torchvision's ``features`` layout: keys ``features.<i>.weight``
and ``features.<i>.bias`` with i counting Conv/ReLU/MaxPool layers), so a torchvision VGG16 state dict
saved with ``safetensors.torch.save_file`` loads as is (``classifier.*`` keys are ignored).

Distance (LPIPS without its learned per-channel weights, which need another download):

    d(x, y) = mean over band triplets t of  sum over taps l of  mean_{h,w} sum_c (f̂_l(x_t) - f̂_l(y_t))^2
    f̂ = f / (||f||_2 over channels + 1e-10)

16 bands -> 3-channel images: each triplet of bands (increasing wavelength) is read as (B, G, R), i.e.
fed to the net as (R, G, B) = (b2, b1, b0), after mapping model range [-1, 1] to [0, 1] and ImageNet
mean/std normalisation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

__all__ = ["VGG16_CFG", "VGGFeatures", "PerceptualLoss", "default_band_triplets"]

VGG16_CFG: tuple = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class VGGFeatures(nn.Module):
    """VGG conv stack (3x3 convs, ReLU, 2x2 max-pools per ``cfg``); taps are the ReLU outputs before each
    pool and at the end (relu1_2 ... relu5_3 for VGG16). x (B, 3, H, W) -> list of feature maps."""

    def __init__(self, cfg: Sequence = VGG16_CFG, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        self.taps: list[int] = []
        c = in_channels
        for item in cfg:
            if item == "M":
                self.taps.append(len(layers) - 1)
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(item), 3, padding=1), nn.ReLU(inplace=False)]
                c = int(item)
        self.taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out

    @classmethod
    def from_file(cls, path: str | os.PathLike, cfg: Sequence = VGG16_CFG) -> "VGGFeatures":
        """Load weights from a safetensors file; clear errors for a missing file or mismatched tensors."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual-loss weights {path} not found: the perceptual loss needs a "
                                    "user-supplied VGG safetensors file (nothing is downloaded); set "
                                    "perceptual_weight=0 to train without it")
        try:
            state = load_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
        net = cls(cfg)
        state = {k: v for k, v in state.items() if k.startswith("features.")}
        own = net.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{k}: file {tuple(state[k].shape)} vs net {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(f"{path}: does not match the VGG layout {list(cfg)}: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}, shape mismatches {shapes[:4]}")
        net.load_state_dict(state)
        return net


def default_band_triplets(bands: int) -> list[tuple[int, int, int]]:
    """Consecutive band triplets covering every band; the last one overlaps (16 -> 6 triplets)."""
    if bands < 3:
        raise ValueError("the perceptual loss needs at least 3 bands")
    starts = list(range(0, bands - 2, 3))
    if starts[-1] + 3 < bands:
        starts.append(bands - 3)
    return [(s, s + 1, s + 2) for s in starts]


class PerceptualLoss(nn.Module):
    """Frozen VGG feature distance between (B, bands, H, W) tensors in model range; returns a scalar."""

    def __init__(self, net: VGGFeatures, bands: int = 16,
                 triplets: Sequence[tuple[int, int, int]] | None = None) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.triplets = [tuple(t) for t in (triplets or default_band_triplets(bands))]
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike, bands: int = 16, cfg: Sequence = VGG16_CFG) -> "PerceptualLoss":
        return cls(VGGFeatures.from_file(path, cfg), bands)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.net.eval()
        return self

    def _prep(self, x: torch.Tensor, t: tuple[int, int, int]) -> torch.Tensor:
        rgb = x[:, [t[2], t[1], t[0]]]
        return ((rgb + 1.0) / 2.0 - self.mean) / self.std

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(())
        for t in self.triplets:
            fx, fy = self.net(self._prep(x, t)), self.net(self._prep(y, t))
            for a, b in zip(fx, fy):
                a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
                b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
                total = total + ((a - b) ** 2).sum(dim=1).mean()
        return total / len(self.triplets)
