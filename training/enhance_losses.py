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
- ``pixel="l2"`` (not in the paper): both image terms use L2_WEIGHT·(x − y)² instead of Charbonnier. The
  Charbonnier form is an L1 loss for |d| ≫ ε, whose minimiser is the per-pixel posterior *median*: a
  correction the network is unsure of (a small light spot it cannot tell from the background for certain)
  is not made at all, while the mean, L2's minimiser, makes part of it. L2_WEIGHT = 10 gives the squared
  error the Charbonnier gradient at |d| = 0.05, so the image terms keep their weight against the
  segmentation and structure terms at typical degradation errors.
- ``pixel="hybrid"`` (not in the paper): L2_WEIGHT·d² where the degradation changed the pixel (any channel
  of |target − input| above HYBRID_DELTA), Charbonnier elsewhere. A correction is then pulled toward the
  mean where there is something to correct (a spot the network is fairly sure of is removed, not left at
  the median's zero) and toward the median of no change on untouched pixels and identity pairs, where L2's
  mean would spread a small correction over every uncertain pixel of a good photograph. Measured, it does not
  work so: trained on spot-only rows it removed 2 % of the spots (L2: 45 %), since the L1 term on the untouched
  pixels charges every leak of a not-yet-sure detector from the first step and so holds the network at "no
  change" (docs/enhance_eval/no_harm_study.md). Kept for that comparison.
- ``image_weighting="log"`` (not in the paper): each stage's image term becomes the batch mean of
  LOG_SCALE·log(c_i + 0.05·e_i) over the rows i, with c_i, e_i that row's Charbonnier and edge loss. Its
  gradient is LOG_SCALE/(c_i + 0.05·e_i) times the row's own, so an error on a nearly clean photograph
  counts by its ratio to that row's error, as PSNR counts it, instead of in absolute L1, where a dark
  photograph's large error outweighs it ~100:1. LOG_SCALE = 0.01 makes a row at error 0.01 weigh as
  in the mean form. With ``pixel="l2"`` / ``"hybrid"`` a row reproduced exactly (an identity pair at the
  identity start) has loss 0, so LOG_FLOOR (the L2 term of an error of one uint8 level) is added inside the
  log; a Charbonnier row needs none (each element is at least ε).
- ``image_weighting="sqrt"`` (not in the paper): between the two, each stage's image term is the batch mean
  of SQRT_SCALE·sqrt(c_i + 0.05·e_i + floor). A row's gradient is SQRT_SCALE/(2·sqrt(row)) times its own, so
  a row 100× closer to its target pulls 10× (not 100×, as under "log") harder per unit of error, and a
  dark photograph's large error still counts more than a mild row's, by the square root of their ratio.
  SQRT_SCALE = 0.2 makes a row at error 0.01 weigh as in the mean form; the floor (LOG_FLOOR for
  ``pixel="l2"`` / ``"hybrid"``) keeps an exact row's gradient finite. Measured, it keeps none of log's spot
  removal (docs/enhance_eval/no_harm_study.md): the removal is learnt at log's say for a spot row or not at all.
Images (N, 3, H, W), masks (N, 1, H, W) or (N, H, W) in {0, 1}.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["EPS", "L2_WEIGHT", "PIXEL_LOSSES", "HYBRID_DELTA", "EDGE_WEIGHT", "LOG_SCALE", "LOG_FLOOR", "SQRT_SCALE",
           "IMAGE_WEIGHTINGS",
           "SEG_LAMBDA", "GAUSS_1D", "charbonnier", "pixel_loss", "changed_pixels", "gauss_kernel", "conv_gauss",
           "laplacian_residual", "edge_loss", "dice_loss", "segmentation_loss", "magenet_loss", "rsp_loss"]

EPS = 1e-3
L2_WEIGHT = 10.0
PIXEL_LOSSES = ("charbonnier", "l2", "hybrid")
HYBRID_DELTA = 0.02
EDGE_WEIGHT = 0.05
LOG_SCALE = 0.01
LOG_FLOOR = L2_WEIGHT / 255.0 ** 2  # the L2 term of a one-level (uint8) error: the log of an exact row stays finite
SQRT_SCALE = 0.2  # d/dr SQRT_SCALE·sqrt(r) = 1 at r = 0.01, as LOG_SCALE for "log"
IMAGE_WEIGHTINGS = ("mean", "sqrt", "log")
SEG_LAMBDA = 0.5
GAUSS_1D = (0.05, 0.25, 0.4, 0.25, 0.05)
SEG_KINDS = ("bce", "dice", "bce+dice")


def charbonnier(x: torch.Tensor, y: torch.Tensor, eps: float = EPS, *, per_row: bool = False) -> torch.Tensor:
    """mean √((x − y)² + ε²) over all elements (scalar), or over each row's elements ((N,) with ``per_row``)."""
    d = x - y
    c = torch.sqrt(d * d + eps * eps)
    return c.flatten(1).mean(1) if per_row else c.mean()


def pixel_loss(x: torch.Tensor, y: torch.Tensor, kind: str = "charbonnier", eps: float = EPS, *,
               per_row: bool = False, changed: torch.Tensor | None = None) -> torch.Tensor:
    """The image terms' per-element loss, averaged like :func:`charbonnier`: ``"charbonnier"`` √(d² + ε²),
    ``"l2"`` L2_WEIGHT·d², or ``"hybrid"``: L2 where the bool ``changed`` (broadcastable to ``x``; see
    :func:`changed_pixels`) is True, Charbonnier elsewhere (module docstring)."""
    if kind not in PIXEL_LOSSES:
        raise ValueError(f"pixel loss must be one of {PIXEL_LOSSES}, got {kind!r}")
    if kind == "charbonnier":
        return charbonnier(x, y, eps, per_row=per_row)
    d = x - y
    c = L2_WEIGHT * d * d
    if kind == "hybrid":
        if changed is None:
            raise ValueError("the hybrid pixel loss needs the pixels the degradation changed (changed=...)")
        c = torch.where(changed, c, torch.sqrt(d * d + eps * eps))
    return c.flatten(1).mean(1) if per_row else c.mean()


def changed_pixels(degraded: torch.Tensor, target: torch.Tensor, delta: float = HYBRID_DELTA) -> torch.Tensor:
    """(N, 1, H, W) bool: pixels where any channel of the degraded input differs from the target by more
    than ``delta`` (where the hybrid pixel loss uses L2)."""
    return (degraded - target).abs().amax(1, keepdim=True) > delta


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


def edge_loss(x: torch.Tensor, y: torch.Tensor, eps: float = EPS, levels: int = 1, *,
              per_row: bool = False, pixel: str = "charbonnier", changed: torch.Tensor | None = None) -> torch.Tensor:
    """Charbonnier (or ``pixel``, see :func:`pixel_loss`) between Laplacian residuals, summed over ``levels``
    pyramid levels (1 = MPRNet); scalar, or (N,) with ``per_row``. ``changed`` (hybrid) is max-pooled ×2 with
    each further level."""
    total = x.new_zeros((x.shape[0],) if per_row else ())
    for level in range(levels):
        if level:
            x, y = conv_gauss(x)[..., ::2, ::2], conv_gauss(y)[..., ::2, ::2]
            if changed is not None:
                changed = F.max_pool2d(changed.float(), 2, ceil_mode=True)[..., :x.shape[-2], :x.shape[-1]] > 0
        total = total + pixel_loss(laplacian_residual(x), laplacian_residual(y), pixel, eps, per_row=per_row,
                                   changed=changed)
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
                 edge_weight: float = EDGE_WEIGHT, eps: float = EPS, seg_kind: str = "bce",
                 image_weighting: str = "mean", pixel: str = "charbonnier", degraded: torch.Tensor | None = None):
    """Supervised MAGE-Net loss for a ``MAGENetOutput`` ``out`` against the clean ``target``.

    total = Σ_stages [charbonnier + edge_weight·edge] + lam·Σ_4 scales seg (seg only when the model
    has RSP and ``mask`` is given); ``pixel="l2"`` puts L2_WEIGHT·d² in both image terms, ``"hybrid"`` only
    where the ``degraded`` input (needed then) differs from the target (:func:`changed_pixels`); with
    ``image_weighting="log"`` each stage's image term is
    mean_i LOG_SCALE·log(c_i + edge_weight·e_i) over the rows, with ``"sqrt"``
    mean_i SQRT_SCALE·sqrt(c_i + edge_weight·e_i) (module docstring). Returns (total, parts)
    with parts a dict of detached scalar tensors (no host sync): ``char_s1``, ``edge_s1`` (and ``_s2``,
    batch means in either weighting), ``seg``.
    """
    if image_weighting not in IMAGE_WEIGHTINGS:
        raise ValueError(f"image_weighting must be one of {IMAGE_WEIGHTINGS}, got {image_weighting!r}")
    changed = None
    if pixel == "hybrid":
        if degraded is None:
            raise ValueError("pixel='hybrid' needs the degraded input (degraded=...)")
        changed = changed_pixels(degraded, target)
    parts: dict[str, torch.Tensor] = {}
    total = target.new_zeros(())
    for i, img in enumerate(out.stages, start=1):
        c = pixel_loss(img, target, pixel, eps, per_row=True, changed=changed)
        e = edge_loss(img, target, eps, per_row=True, pixel=pixel, changed=changed)
        row = c + edge_weight * e
        floor = LOG_FLOOR if pixel != "charbonnier" else 0.0  # a Charbonnier row is >= (1 + w)·ε already
        if image_weighting == "log":
            total = total + LOG_SCALE * torch.log(row + floor).mean()
        elif image_weighting == "sqrt":
            total = total + SQRT_SCALE * torch.sqrt(row + floor).mean()
        else:
            total = total + row.mean()
        parts[f"char_s{i}"], parts[f"edge_s{i}"] = c.mean().detach(), e.mean().detach()
    if out.rsp is not None and mask is not None:
        seg = segmentation_loss(out.rsp.sides, mask, seg_kind)
        total = total + lam * seg
        parts["seg"] = seg.detach()
    parts["total"] = total.detach()
    return total, parts


def rsp_loss(out, mask: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """AG-Net pretraining loss for an ``RSPOutput``: seg over the 4 sides plus their mean."""
    return segmentation_loss([*out.sides, out.mean], mask, kind)
