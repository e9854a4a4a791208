"""Losses for MAGE-Net and its RSP module.

- Charbonnier: mean √((x − y)² + ε²), ε = 1e-3 (MPRNet's form: mean over every element).
- Edge loss (MPRNet): Charbonnier between Laplacian-pyramid residuals x − G(U(D(G(x)))), with G the
  5×5 Gaussian outer([.05, .25, .4, .25, .05]) (replicate borders), D = keep every 2nd pixel,
  U = zero-insertion ×2 with gain 4. One pyramid level by default, as MPRNet. (As there, the
  replicate border after zero insertion leaves a non-zero residual of a constant image on the two
  outer rows/columns; the interior is exact.)
- Segmentation loss: binary cross-entropy with logits, mean over pixels, summed over the given scales
  (all side outputs are already at full resolution, so one full-resolution mask serves every scale).
  ``kind="dice"`` (1 − soft Dice) and ``"bce+dice"`` are available; BCE is the default (AG-Net trains
  with cross-entropy).
- MAGE-Net total: Σ_stages [Charbonnier + 0.05·edge] + λ·Σ_scales seg, λ = 0.5, over the 4 side outputs.
  RSP pretraining (AG-Net): seg over the 4 sides plus their mean.
Images (N, 3, H, W), masks (N, 1, H, W) or (N, H, W) in {0, 1}.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["EPS", "EDGE_WEIGHT", "SEG_LAMBDA", "GAUSS_1D", "charbonnier", "gauss_kernel", "conv_gauss",
           "laplacian_residual", "edge_loss", "dice_loss", "segmentation_loss", "magenet_loss", "rsp_loss"]

EPS = 1e-3
EDGE_WEIGHT = 0.05
SEG_LAMBDA = 0.5
GAUSS_1D = (0.05, 0.25, 0.4, 0.25, 0.05)
SEG_KINDS = ("bce", "dice", "bce+dice")


def charbonnier(x: torch.Tensor, y: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """mean √((x − y)² + ε²) over all elements; scalar."""
    d = x - y
    return torch.sqrt(d * d + eps * eps).mean()


def gauss_kernel(channels: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Depthwise 5×5 kernel outer(GAUSS_1D, GAUSS_1D): (channels, 1, 5, 5), sums to 1."""
    g = torch.tensor(GAUSS_1D, dtype=dtype, device=device)
    return torch.outer(g, g).expand(channels, 1, 5, 5).contiguous()


def conv_gauss(x: torch.Tensor) -> torch.Tensor:
    """5×5 Gaussian with replicate borders; (N, C, H, W) -> same."""
    c = x.shape[1]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), gauss_kernel(c, x.dtype, x.device), groups=c)


def laplacian_residual(x: torch.Tensor) -> torch.Tensor:
    """One Laplacian-pyramid level: x − G(U(D(G(x)))); (N, C, H, W) -> same."""
    down = conv_gauss(x)[..., ::2, ::2]
    up = torch.zeros_like(x)
    up[..., ::2, ::2] = 4 * down
    return x - conv_gauss(up)


def edge_loss(x: torch.Tensor, y: torch.Tensor, eps: float = EPS, levels: int = 1) -> torch.Tensor:
    """Charbonnier between Laplacian residuals, summed over ``levels`` pyramid levels (1 = MPRNet)."""
    total = x.new_zeros(())
    for level in range(levels):
        if level:
            x, y = conv_gauss(x)[..., ::2, ::2], conv_gauss(y)[..., ::2, ::2]
        total = total + charbonnier(laplacian_residual(x), laplacian_residual(y), eps)
    return total


def _mask_like(mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.shape != logits.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match segmentation output {tuple(logits.shape)}")
    return mask.to(logits.dtype)


def dice_loss(logits: torch.Tensor, mask: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 − (2 Σ p·m + s) / (Σ p + Σ m + s) per image, averaged; p = σ(logits)."""
    p, m = torch.sigmoid(logits).flatten(1), _mask_like(mask, logits).flatten(1)
    return (1 - (2 * (p * m).sum(1) + smooth) / (p.sum(1) + m.sum(1) + smooth)).mean()


def segmentation_loss(logits: torch.Tensor | Sequence[torch.Tensor], mask: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Σ over scales of the per-scale loss (BCE with logits, mean over pixels, by default)."""
    if kind not in SEG_KINDS:
        raise ValueError(f"segmentation loss kind must be one of {SEG_KINDS}, got {kind!r}")
    scales = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    total = scales[0].new_zeros(())
    for s in scales:
        m = _mask_like(mask, s)
        if "bce" in kind:
            total = total + F.binary_cross_entropy_with_logits(s, m)
        if "dice" in kind:
            total = total + dice_loss(s, m)
    return total


def magenet_loss(out, target: torch.Tensor, mask: torch.Tensor | None = None, *, lam: float = SEG_LAMBDA,
                 edge_weight: float = EDGE_WEIGHT, eps: float = EPS, seg_kind: str = "bce"):
    """Supervised MAGE-Net loss for a ``MAGENetOutput`` ``out`` against the clean ``target``.

    total = Σ_stages [charbonnier + edge_weight·edge] + lam·Σ_4 scales seg (seg only when the model
    has RSP and ``mask`` is given). Returns (total, parts) with parts a dict of detached scalar tensors (no host sync):
    ``char_s1``, ``edge_s1`` (and ``_s2``), ``seg``.
    """
    parts: dict[str, torch.Tensor] = {}
    total = target.new_zeros(())
    for i, img in enumerate(out.stages, start=1):
        c, e = charbonnier(img, target, eps), edge_loss(img, target, eps)
        total = total + c + edge_weight * e
        parts[f"char_s{i}"], parts[f"edge_s{i}"] = c.detach(), e.detach()
    if out.rsp is not None and mask is not None:
        seg = segmentation_loss(out.rsp.sides, mask, seg_kind)
        total = total + lam * seg
        parts["seg"] = seg.detach()
    parts["total"] = total.detach()
    return total, parts


def rsp_loss(out, mask: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """AG-Net pretraining loss for an ``RSPOutput``: seg over the 4 sides plus their mean."""
    return segmentation_loss([*out.sides, out.mean], mask, kind)
