r"""Feature extractors that apply an RGB network to band triplets of a hyperspectral cube.

There is no published definition of a "hyperspectral FID" (FID: Heusel et al., NeurIPS 2017). One option is to
feed band triplets to an ImageNet Inception-v3 as if they were RGB images:

    x (B, C, H, W) → for each triplet τ = (b0, b1, b2): φ(pre(x[:, τ])) ∈ R^F
    features = mean_τ φ(...)             (combine="mean", F dims, the default)
             | concat_τ φ(...)           (combine="concat", F · #triplets dims).

The default triplets are consecutive bands (0,1,2), (3,4,5), ..., the last one padded by repeating
the final band: for 16 bands (0,1,2) … (12,13,14), (15,15,15). "concat" keeps more information
but gives 12,288 dimensions for 16 bands with Inception (FD needs N ≫ F and an F×F eigh), which is
why "mean" is the default.

No weights are downloaded: :class:`InceptionBandTriplets` loads a local file. This workplace cannot
download Inception weights, and the default HS-FID extractor is a different network (see
:func:`retina_fast.metrics.default_extractor`).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BandTriplets", "InceptionBandTriplets", "default_triplets"]


def default_triplets(bands: int) -> Tuple[Tuple[int, int, int], ...]:
    """Consecutive band triplets covering every band, the last padded with the final band."""
    if bands < 1:
        raise ValueError(f"bands must be >= 1, got {bands}")
    return tuple(tuple(min(3 * k + i, bands - 1) for i in range(3)) for k in range(math.ceil(bands / 3)))


class BandTriplets(nn.Module):
    """Wrap a 3-channel feature network ``backbone`` ((B, 3, h, w) → (B, F)) into a (B, C, H, W) →
    (B, F) or (B, F·T) extractor over band triplets (see the module docstring).

    ``preprocess`` (optional) maps each (B, 3, H, W) triplet image to the backbone's input.
    """

    def __init__(self, backbone: Callable[[torch.Tensor], torch.Tensor], bands: int = 16,
                 triplets: Optional[Sequence[Sequence[int]]] = None, combine: str = "mean",
                 preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        super().__init__()
        if combine not in ("mean", "concat"):
            raise ValueError(f"combine must be 'mean' or 'concat', got {combine!r}")
        self.triplets = tuple(tuple(int(b) for b in t) for t in (triplets or default_triplets(bands)))
        for t in self.triplets:
            if len(t) != 3 or not all(0 <= b < bands for b in t):
                raise ValueError(f"triplet {t} is not three band indices in [0, {bands})")
        self.backbone, self.bands, self.combine, self.preprocess = backbone, bands, combine, preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.bands:
            raise ValueError(f"expected (B, {self.bands}, H, W) images, got {tuple(x.shape)}")
        feats = []
        for t in self.triplets:
            rgb = x[:, list(t)]
            if self.preprocess is not None:
                rgb = self.preprocess(rgb)
            f = self.backbone(rgb)
            feats.append(f.reshape(f.shape[0], -1))
        return torch.stack(feats).mean(0) if self.combine == "mean" else torch.cat(feats, dim=1)


def _load_state_dict(path: str) -> dict:
    """Tensors of a ``.safetensors`` file. Nothing else is accepted: ``torch.load`` unpickles, and even with
    ``weights_only=True`` the pickle machinery runs on a file the user got from somewhere (see
    https://huggingface.co/docs/hub/security-pickle); convert a ``.pth`` once where you trust it, e.g.
    ``safetensors.torch.save_file(torch.load(p, weights_only=True), "inception_v3.safetensors")``."""
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: weights must be a .safetensors file (pickle-based .pt/.pth files are not read; "
                         f"convert it with safetensors.torch.save_file where you trust it)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        sd = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a valid safetensors file ({exc})") from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (name -> tensor)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


class InceptionBandTriplets(BandTriplets):
    """Inception-v3 (torchvision architecture, local weights) applied to band triplets.

    weights_path: a ``.safetensors`` file with torchvision's Inception-v3 state dict (pickle-based
    ``.pth`` / ``.pt`` files are refused: convert them once, see ``_load_state_dict``). The weights are assumed to be
    torchvision's ``IMAGENET1K_V1`` port of the Google weights, which expect inputs scaled to [−1, 1]:
    each triplet in [0, data_range] is mapped by x ↦ 2x / data_range − 1 and resized bilinearly to
    ``resize`` × ``resize`` (299). Features are the 2048-d global-average-pool output (fc removed).
    Needs torchvision; raises ``ImportError`` with the reason otherwise.
    """

    def __init__(self, weights_path: str, bands: int = 16, triplets: Optional[Sequence[Sequence[int]]] = None,
                 combine: str = "mean", data_range: float = 1.0, resize: int = 299) -> None:
        path = os.fspath(weights_path)
        if not path.endswith(".safetensors"):
            _load_state_dict(path)  # raises: the file is checked before torchvision is needed
        try:
            from torchvision.models import inception_v3
        except Exception as exc:  # noqa: BLE001 - a torchvision built for another torch raises RuntimeError
            raise ImportError("InceptionBandTriplets needs torchvision (the Inception-v3 architecture); "
                              f"it does not import here ({type(exc).__name__}: {exc}). Install the torchvision "
                              "build that matches your torch, or pass another extractor.") from exc
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception-v3 weights file not found: {path}")
        sd = _load_state_dict(path)
        if "fc.weight" not in sd:
            raise ValueError(f"{path}: not an Inception-v3 state dict (no 'fc.weight')")
        net = inception_v3(weights=None, aux_logits=any(k.startswith("AuxLogits.") for k in sd),
                           init_weights=False, transform_input=False, num_classes=sd["fc.weight"].shape[0])
        try:
            net.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{path}: does not match torchvision's Inception-v3: {exc}") from exc
        net.fc = nn.Identity()
        net.eval().requires_grad_(False)
        scale, size = float(data_range), int(resize)

        def preprocess(rgb: torch.Tensor) -> torch.Tensor:
            rgb = 2.0 * rgb / scale - 1.0
            if rgb.shape[-2:] != (size, size):
                rgb = F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False)
            return rgb

        super().__init__(net, bands=bands, triplets=triplets, combine=combine, preprocess=preprocess)
        self.weights_path = path
