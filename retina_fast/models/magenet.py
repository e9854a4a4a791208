"""MAGE-Net (Guo et al., "Bridging synthetic and real images", multi-attention guided enhancement).

One definition, trained by ``retina_fast.training`` and accelerated by the engine. Shapes below are
for an input (N, 3, H, W) in [0, 1]; any H, W work: ``MAGENet.forward`` pads to multiples of 8
(reflect) and crops every output back. Outputs are not clamped (the reference; callers clamp).

Building blocks (MPRNet, which the paper cites; no bias, no normalisation):
- CAB: conv3×3 → PReLU → conv3×3 → channel attention → + input.
- Channel attention: global average pool → 1×1 conv C→C/4 → ReLU → 1×1 conv C/4→C → sigmoid → scale;
  the math lives in the pure function ``channel_attention_ref`` so a fused kernel can replace it.
- SAM: x1 = conv3×3(F); img = conv3×3(F) + input (supervised); out = x1 · σ(conv3×3(img)) + F.

Stage-1 (U-Net of CABs): shallow features conv3×3 + CAB; 3 levels with widths C, C+s, C+2s and 2 CABs
per level in encoder and decoder; downsample = bilinear ×0.5 + 1×1 conv; upsample = bilinear ×2 +
1×1 conv, plus the skip passed through its own CAB; SAM on the full-resolution decoder output gives
the Stage-1 image and the attention features handed to Stage-2.

Stage-2 (full resolution): shallow features conv3×3 + CAB, concatenated with the SAM features and
fused by conv3×3 (MPRNet's stage bridge); then 3 FABs; tail conv3×3 → 3 channels + input.
FAB i (the paper's words, our reading where it is silent):
  h = x + conv3×3(CAB^k(x))                       (k = cabs_per_fab; MPRNet's ORB residual)
  h = h + up(P_enc(enc_i)) + up(P_dec(dec_i))     (Stage-1 level-i features, 1×1 projections to C,
                                                   applied before the bilinear resize: they commute)
  out = h + PReLU(conv1×1(concat(h, R)))          (the "learnable non-linear transformation";
                                                   the residual is our choice, for stable training)
  where R = concat over the 4 RSP decoder scales of up(1×1 conv(d_k)) (rsp_channels each); without
  RSP the 1×1 conv sees h alone.
The paper's multi-patch split of the Stage-1 input is omitted (it needs fixed sizes; the U-Net sees
the whole image).

Output gate (``output_gate=True``; our addition, not the paper's): the final image is
x + sigmoid(gate(h)) · tail(h) with a 3×3 conv gate on the last Stage-2 features, so "leave this pixel
alone" is a saturating choice rather than an exact cancellation of the residual.

Ablations: ``use_rsp=False`` ("without RSP": no RSP module, no segmentation outputs);
``stage1_only=True`` (Stage-1 U-Net + SAM only; no Stage-2 and no RSP).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retina_fast.models.rsp import RSPNet, RSPOutput, crop_to, pad_to_multiple, resize_add
from retina_fast.ops.channel_attention import channel_attention_ref
from retina_fast.ops.table import op

__all__ = ["MAGENetConfig", "MAGENetOutput", "MAGENet", "CAB", "ChannelAttention", "SAM", "MAGENET_PRESETS"]


class ChannelAttention(nn.Module):
    """Squeeze-excite style channel attention without bias; (N, C, H, W) -> same."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, max(1, channels // reduction), 1, bias=False)
        self.up = nn.Conv2d(max(1, channels // reduction), channels, 1, bias=False)

    @op("channel_attention")
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x * gate(x) (+ residual): the op ``channel_attention`` (:mod:`retina_fast.ops.channel_attention`)."""
        return channel_attention_ref(x, self.down.weight, self.up.weight, residual)


def conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


class CAB(nn.Module):
    """Channel attention block: conv3×3 → PReLU → conv3×3 → CA → + x; (N, C, H, W) -> same."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(conv3(channels, channels), nn.PReLU(), conv3(channels, channels))
        self.ca = ChannelAttention(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ca(self.body(x), residual=x)


class SAM(nn.Module):
    """Supervised attention module: (F (N, C, H, W), input (N, 3, H, W)) -> (features, image)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = conv3(channels, channels), conv3(channels, 3), conv3(3, channels)

    def forward(self, feats: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.conv2(feats) + x
        return self.conv1(feats) * torch.sigmoid(self.conv3(img)) + feats, img


class Resample(nn.Module):
    """Bilinear resize to a target size (×0.5 down / ×2 up) then 1×1 conv cin -> cout."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return self.conv(resize_add(x, size))


def _cabs(n: int, channels: int, reduction: int) -> nn.Sequential:
    return nn.Sequential(*[CAB(channels, reduction) for _ in range(n)])


class Stage1(nn.Module):
    """U-Net of CABs + SAM. x (N, 3, H, W), H, W multiples of 4 -> (sam features (N, C, H, W),
    stage-1 image (N, 3, H, W), encoder features, decoder features) with level-i features
    (N, C + i·s, H/2^i, W/2^i), i = 0, 1, 2."""

    def __init__(self, cfg: "MAGENetConfig") -> None:
        super().__init__()
        c, s, r, k = cfg.channels, cfg.scale_channels, cfg.reduction, cfg.cabs_per_level
        w = [c, c + s, c + 2 * s]
        self.shallow = nn.Sequential(conv3(3, c), CAB(c, r))
        self.enc = nn.ModuleList([_cabs(k, ch, r) for ch in w])
        self.down = nn.ModuleList([Resample(w[0], w[1]), Resample(w[1], w[2])])
        self.dec = nn.ModuleList([_cabs(k, ch, r) for ch in w])
        self.up = nn.ModuleList([Resample(w[1], w[0]), Resample(w[2], w[1])])
        self.skip = nn.ModuleList([CAB(w[0], r), CAB(w[1], r)])
        self.sam = SAM(c)

    def forward(self, x: torch.Tensor):
        h = self.shallow(x)
        enc = []
        for i in range(3):
            if i:
                size = (h.shape[-2] // 2, h.shape[-1] // 2)
                h = self.down[i - 1](h, size)
            h = self.enc[i](h)
            enc.append(h)
        dec = [None, None, self.dec[2](enc[2])]
        for i in (1, 0):
            h = self.up[i](dec[i + 1], enc[i].shape[-2:]) + self.skip[i](enc[i])
            dec[i] = self.dec[i](h)
        feats, img = self.sam(dec[0], x)
        return feats, img, enc, dec


class FAB(nn.Module):
    """Fundus attention block (see module doc). x (N, C, H, W), Stage-1 level features enc, dec
    (N, C_i, H_i, W_i), RSP features (N, R, H, W) or None -> (N, C, H, W)."""

    def __init__(self, channels: int, stage1_channels: int, rsp_channels: int, cabs: int, reduction: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_cabs(cabs, channels, reduction), conv3(channels, channels))
        self.proj_enc = nn.Conv2d(stage1_channels, channels, 1, bias=False)
        self.proj_dec = nn.Conv2d(stage1_channels, channels, 1, bias=False)
        self.transform = nn.Sequential(nn.Conv2d(channels + rsp_channels, channels, 1, bias=False), nn.PReLU())

    def forward(self, x, enc, dec, rsp=None):
        size = x.shape[-2:]
        h = x + self.body(x)
        h = resize_add(self.proj_dec(dec), size, add=resize_add(self.proj_enc(enc), size, add=h))
        z = h if rsp is None else torch.cat([h, rsp], 1)
        return h + self.transform(z)


@dataclass
class MAGENetConfig:
    """Architecture hyper-parameters. Defaults: the small CPU-trainable size (0.35 M parameters; 0.21 M without RSP)."""

    channels: int = 16  # C
    scale_channels: int = 8  # s: Stage-1 widths C, C+s, C+2s
    cabs_per_level: int = 2
    cabs_per_fab: int = 2
    num_fabs: int = 3
    reduction: int = 4
    use_rsp: bool = True
    stage1_only: bool = False
    rsp_base: int = 8  # RSP widths b, 2b, 4b, 8b
    rsp_channels: int = 4  # RSP feature channels per scale fed to every FAB (4 scales)
    gf_radius: int = 1
    gf_eps: float = 1e-2
    output_gate: bool = False  # final image = x + sigmoid(gate(h)) * tail(h) (ours; see the module doc)

    def __post_init__(self) -> None:
        for name in ("channels", "cabs_per_level", "cabs_per_fab", "num_fabs", "reduction", "rsp_base", "rsp_channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MAGENetConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.scale_channels < 0 or self.num_fabs > 3:
            raise ValueError("MAGENetConfig: scale_channels must be >= 0 and num_fabs <= 3 (one per Stage-1 level)")

    @property
    def has_stage2(self) -> bool:
        return not self.stage1_only

    @property
    def has_rsp(self) -> bool:
        return self.use_rsp and not self.stage1_only

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MAGENetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MAGENetConfig keys: {sorted(unknown)}")
        return cls(**d)


MAGENET_PRESETS = {
    "tiny": MAGENetConfig(),
    # MPRNet's deblurring sizes (C, s) = (96, 48), 8 CABs per block; AG-Net's base width 32.
    "large": MAGENetConfig(channels=96, scale_channels=48, cabs_per_fab=8, rsp_base=32, rsp_channels=16),
}


@dataclass
class MAGENetOutput:
    """stage1: (N, 3, H, W) Stage-1 (SAM) image; stage2: (N, 3, H, W) final image or None when
    stage1_only; rsp: RSPOutput (4 side logits + mean, (N, 1, H, W)) or None without RSP."""

    stage1: torch.Tensor
    stage2: torch.Tensor | None
    rsp: RSPOutput | None

    @property
    def final(self) -> torch.Tensor:
        return self.stage2 if self.stage2 is not None else self.stage1

    @property
    def stages(self) -> list[torch.Tensor]:
        return [t for t in (self.stage1, self.stage2) if t is not None]

    @property
    def seg(self) -> list[torch.Tensor]:
        """The 4 side logits (empty without RSP)."""
        return [] if self.rsp is None else list(self.rsp.sides)


class MAGENet(nn.Module):
    """MAGE-Net; ``forward(x)`` -> MAGENetOutput, ``restore(x)`` -> final image tensor only."""

    def __init__(self, config: MAGENetConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or MAGENetConfig()
        c, s = cfg.channels, cfg.scale_channels
        self.stage1 = Stage1(cfg)
        self.rsp = RSPNet(cfg.rsp_base, gf_radius=cfg.gf_radius, gf_eps=cfg.gf_eps) if cfg.has_rsp else None
        if self.rsp is not None:
            self.rsp_proj = nn.ModuleList([nn.Conv2d(w, cfg.rsp_channels, 1, bias=False)
                                           for w in reversed(self.rsp.widths)])
        if cfg.has_stage2:
            r, rsp_ch = cfg.reduction, (4 * cfg.rsp_channels if cfg.has_rsp else 0)
            self.shallow2 = nn.Sequential(conv3(3, c), CAB(c, r))
            self.bridge = conv3(2 * c, c)
            self.fabs = nn.ModuleList([FAB(c, c + i * s, rsp_ch, cfg.cabs_per_fab, r) for i in range(cfg.num_fabs)])
            self.tail = conv3(c, 3)
            if cfg.output_gate:  # a per-pixel gate on the Stage-2 residual; starts half open (weights 0, bias 0)
                self.gate = nn.Conv2d(c, 1, 3, padding=1, bias=True)
                nn.init.zeros_(self.gate.weight)
                nn.init.zeros_(self.gate.bias)

    def forward(self, x: torch.Tensor) -> MAGENetOutput:
        """x (N, 3, H, W) in [0, 1], any H, W -> MAGENetOutput cropped to (H, W)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"MAGENet expects (N, 3, H, W), got {tuple(x.shape)}")
        xp, size = pad_to_multiple(x, 8)
        feats, img1, enc, dec = self.stage1(xp)
        rsp_out, img2 = None, None
        if self.rsp is not None:
            rsp_out = self.rsp.forward_padded(xp)
        if self.config.has_stage2:
            full = xp.shape[-2:]
            rsp_feats = None
            if rsp_out is not None:
                rsp_feats = torch.cat([resize_add(p(f), full) for p, f in zip(self.rsp_proj, rsp_out.features)], 1)
            h = self.bridge(torch.cat([self.shallow2(xp), feats], 1))
            for i, fab in enumerate(self.fabs):
                h = fab(h, enc[i], dec[i], rsp_feats)
            delta = self.tail(h)
            if self.config.output_gate:
                delta = torch.sigmoid(self.gate(h)) * delta
            img2 = crop_to(delta + xp, size)
        if rsp_out is not None:
            rsp_out = RSPOutput(sides=[crop_to(t, size) for t in rsp_out.sides], mean=crop_to(rsp_out.mean, size),
                                features=rsp_out.features)
        return MAGENetOutput(stage1=crop_to(img1, size), stage2=img2, rsp=rsp_out)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3, H, W) -> the final enhanced image (N, 3, H, W) (unclamped)."""
        return self.forward(x).final
