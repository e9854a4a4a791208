"""The 16-band retinal structure network: segmentation of artery, vein, optic nerve head and fovea, and
the feature extractor behind the default HS-FID (issue 6).

Architecture (a small U-Net, one definition used by the trainer and the metrics)
--------------------------------------------------------------------------------
::

    x (N, 16, H, W) reflectance -> (x - mean_b) / std_b            per-band input normalisation (buffers)
    -> pad bottom/right to a multiple of 2^(levels-1)               (reflect, replicate for tiny sides)
    encoder: level 0 at full size with c_0 channels, level i at 1/2^i with c_i channels;
             each level = [conv3x3 -> GroupNorm -> SiLU] x 2, 2x2 max-pool between levels;
             the deepest level (1/8 for 4 levels) is the bottleneck
    decoder: per level, bilinear x2 upsample -> conv1x1 to c_i -> concat the encoder skip -> block
    head:    conv1x1 c_0 -> one logit per structure, cropped back to (H, W)

**Outputs are independent sigmoids** (multi-label), one per structure in ``config.structures``
(default ``artery, vein, onh, fovea``), not a softmax: the phantom's masks overlap (vessels run over
the optic nerve head; arteries cross veins), and a pixel may belong to several structures. A mask is
``sigmoid(logit) > 0.5``.

**Features** (:meth:`StructureNet.features`): the global average over space of the bottleneck
activations (after its last GroupNorm + SiLU), concatenated with those of the ``feature_levels - 1``
levels above it when ``feature_levels > 1``. With the shipped configuration (channels 16, 32, 64, 128;
``feature_levels = 1``) that is a 128-dimensional vector per image. Spatial averaging makes it defined
at any image size; compare HS-FID values only at equal image size and N (FD is biased by ~1/N: Chong &
Forsyth, CVPR 2020). GroupNorm makes
the features nearly invariant to a global gain: measured on 200 vs 200 phantom eyes at 128 px, a gain
of x0.9 moved HS-FID from 0.0058 to 0.0076, while a 1-px blur gave 0.13 and noise sigma 0.01 gave 0.30
(``docs/eval/baseline_real_vs_real.md``). Spectral errors are the spectral KL's job.

:class:`StructureFeatures` and :class:`StructureSegmenter` wrap a network as the extractor
((N, 16, H, W) -> (N, F)) and the segmenter ((N, 16, H, W) -> {structure: bool (N, H, W)}) expected by
``retina_fast.metrics`` (``hs_fid``, ``spectral_kl``, ``nn_authenticity``). The shipped weights live in
``retina_fast/weights/structure-net/`` and are loaded by :func:`load_structure_net`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from retina_fast.models.layers import group_count
from retina_fast.models.rsp import crop_to, pad_to_multiple

__all__ = ["StructureNetConfig", "StructureNet", "StructureFeatures", "StructureSegmenter",
           "load_structure_net", "save_structure_net", "SHIPPED_DIR", "STRUCTURES"]

STRUCTURES = ("artery", "vein", "onh", "fovea")
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "weights" / "structure-net"
ARCHITECTURE = "retina_fast.StructureNet"


@dataclass
class StructureNetConfig:
    """in_channels: bands; channels: per level, full size first (the last is the bottleneck);
    structures: output names (one sigmoid each); groups: preferred GroupNorm groups;
    feature_levels: how many of the deepest levels are pooled into the feature vector."""

    in_channels: int = 16
    channels: tuple[int, ...] = (16, 32, 64, 128)
    structures: tuple[str, ...] = STRUCTURES
    groups: int = 8
    feature_levels: int = 1
    threshold: float = 0.5

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.structures = tuple(str(s) for s in self.structures)
        if len(self.channels) < 2:
            raise ValueError(f"need at least 2 levels, got channels={self.channels}")
        if not 1 <= self.feature_levels <= len(self.channels):
            raise ValueError(f"feature_levels must be in [1, {len(self.channels)}], got {self.feature_levels}")
        if not self.structures:
            raise ValueError("structures must not be empty")

    @property
    def feature_dim(self) -> int:
        return sum(self.channels[-self.feature_levels:])

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"], d["structures"] = list(self.channels), list(self.structures)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StructureNetConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def _block(cin: int, cout: int, groups: int) -> nn.Sequential:
    g = group_count(cout, groups)
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(g, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(g, cout), nn.SiLU(),
    )


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(cin, cout, 1)
        self.block = _block(2 * cout, cout, groups)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.block(torch.cat([self.reduce(x), skip], dim=1))


class StructureNet(nn.Module):
    """U-Net segmenting retinal structures from a reflectance cube; see the module docstring.

    forward(x (N, C, H, W)) -> logits (N, S, H, W) for any H, W >= 1 (padded internally);
    :meth:`forward_all` returns (logits, features (N, F)) from one pass.
    """

    def __init__(self, config: StructureNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or StructureNetConfig()
        ch, g = config.channels, config.groups
        self.register_buffer("band_mean", torch.zeros(config.in_channels))
        self.register_buffer("band_std", torch.ones(config.in_channels))
        self.down = nn.ModuleList([_block(config.in_channels if i == 0 else ch[i - 1], ch[i], g)
                                   for i in range(len(ch))])
        self.up = nn.ModuleList([_Up(ch[i + 1], ch[i], g) for i in reversed(range(len(ch) - 1))])
        self.head = nn.Conv2d(ch[0], len(config.structures), 1)

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Per-band input statistics (reflectance): x' = (x - mean) / std."""
        self.band_mean.copy_(torch.as_tensor(mean, dtype=self.band_mean.dtype))
        self.band_std.copy_(torch.as_tensor(std, dtype=self.band_std.dtype).clamp_min(1e-6))

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"StructureNet expects (N, {self.config.in_channels}, H, W) reflectance, "
                             f"got {tuple(x.shape)}")

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check(x)
        x = (x.to(self.band_mean.dtype) - self.band_mean.view(1, -1, 1, 1)) / self.band_std.view(1, -1, 1, 1)
        x, _ = pad_to_multiple(x, self.config.multiple)
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        return skips

    def _pool(self, skips: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        # Average only over the part of each level that covers the unpadded image.
        out = []
        for level in range(len(skips) - self.config.feature_levels, len(skips)):
            f = 2 ** level
            h, w = max(1, -(-size[0] // f)), max(1, -(-size[1] // f))
            out.append(skips[level][..., :h, :w].mean(dim=(-2, -1)))
        return torch.cat(out[::-1], dim=1)

    def _decode(self, skips: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = skips[-1]
        for up, skip in zip(self.up, reversed(skips[:-1])):
            x = up(x, skip)
        return crop_to(self.head(x), size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._decode(self._encode(x), tuple(x.shape[-2:]))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, feature_dim) pooled encoder features (the decoder is not run)."""
        return self._pool(self._encode(x), tuple(x.shape[-2:]))

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = self._encode(x)
        size = tuple(x.shape[-2:])
        return self._decode(skips, size), self._pool(skips, size)

    def predict_masks(self, x: torch.Tensor, threshold: float | None = None) -> dict[str, torch.Tensor]:
        """{structure: bool (N, H, W)} = sigmoid(logit) > threshold (default config.threshold)."""
        t = self.config.threshold if threshold is None else threshold
        prob = torch.sigmoid(self(x))
        return {name: prob[:, k] > t for k, name in enumerate(self.config.structures)}


class StructureFeatures(nn.Module):
    """HS-FID feature extractor: (N, 16, H, W) reflectance -> (N, F) pooled encoder features."""

    def __init__(self, net: StructureNet) -> None:
        super().__init__()
        self.net = net
        self.feature_dim = net.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


class StructureSegmenter(nn.Module):
    """Segmenter for synthetic images: (N, 16, H, W) -> {structure: bool (N, H, W)} (CPU tensors),
    run without gradients in chunks of ``batch_size`` images on the network's device."""

    def __init__(self, net: StructureNet, batch_size: int = 16, threshold: float | None = None) -> None:
        super().__init__()
        self.net, self.batch_size = net, int(batch_size)
        self.threshold = net.config.threshold if threshold is None else float(threshold)
        self.structures = net.config.structures

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.as_tensor(x)
        device = next(self.net.parameters()).device
        was_training = self.net.training
        self.net.eval()
        parts: dict[str, list[torch.Tensor]] = {s: [] for s in self.structures}
        try:
            with torch.no_grad():
                for start in range(0, x.shape[0], self.batch_size):
                    m = self.net.predict_masks(x[start:start + self.batch_size].to(device), self.threshold)
                    for s in self.structures:
                        parts[s].append(m[s].cpu())
        finally:
            self.net.train(was_training)
        return {s: torch.cat(v) if v else torch.zeros((0, *x.shape[-2:]), dtype=torch.bool)
                for s, v in parts.items()}


def save_structure_net(directory: str | Path, net: StructureNet, provenance: Mapping[str, Any] | None = None,
                       **extra: Any) -> Path:
    """Write ``net`` as a checkpoint directory (``config.json`` + ``structure_net.safetensors``)."""
    from retina_fast import DEFAULT_WAVELENGTHS
    from retina_fast.checkpoint import save_checkpoint

    config = {"architecture": ARCHITECTURE, "structure_net": net.config.to_dict(),
              "feature_dim": net.feature_dim, "wavelengths": list(DEFAULT_WAVELENGTHS),
              "normalisation": {"input": "reflectance in [0, 1]", "band_mean": net.band_mean.tolist(),
                                "band_std": net.band_std.tolist()},
              **extra}
    return save_checkpoint(directory, {"structure_net": net}, config, provenance)


def _read(path: Path) -> tuple[dict, dict]:
    from retina_fast.checkpoint import CheckpointError, load_checkpoint

    if path == SHIPPED_DIR and not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: the shipped structure network is missing from this installation "
                              f"(train it with training/train_structure.py)")
    doc, states = load_checkpoint(path, ["structure_net"])
    if doc.get("architecture") != ARCHITECTURE:
        raise CheckpointError(f"{path / 'config.json'}: architecture {doc.get('architecture')!r} is not "
                              f"{ARCHITECTURE!r}")
    return doc, states["structure_net"]


def load_structure_net(directory: str | Path | None = None, device: str | torch.device | None = None
                       ) -> StructureNet:
    """A fresh :class:`StructureNet` in eval mode with the weights of ``directory`` (default: the
    shipped ``retina_fast/weights/structure-net``); sha256-checked, no pickle."""
    from retina_fast.checkpoint import load_state_into

    path = SHIPPED_DIR if directory is None else Path(directory)
    doc, state = _read(path)
    net = StructureNet(StructureNetConfig.from_dict(doc["structure_net"]))
    load_state_into(net, state, str(path / doc["weights"]["structure_net"]["file"]))
    net.eval()
    return net if device is None else net.to(device)
