"""Data for MAGE-Net / T-MAGE-Net: synthetic degraded pairs and the real photograph's two halves.

Synthetic (labelled) domain. Eye ``e`` is ``retina_fast.phantom.render(e, size).rgb``, a whole colour
fundus image (the field of view spans 0.88–0.98 of the width). Each eye has ``per_eye`` degraded
versions ``degrade(rgb, seed=(SYN_TRAIN, e, k), kinds="random")`` (one of Cofe-Net's seven
combinations drawn per sample from that seed, ``mode="code"``), the clean ``rgb`` as target and the
vessel mask ``artery | vein`` for the RSP / segmentation loss. The synthetic test set uses other eyes
(seeds ``TEST_EYE_OFFSET + i``) and cycles through the seven combinations (image i gets combination
i mod 7), so every combination is equally represented.

Real domain: ``skimage.data.retina()`` (CC0, 1411×1411 RGB, a left eye: disc on the left, macula in
the centre). It is split at column 705:

- the **left** half, columns [0, 705) (optic disc side), is the unlabelled real training domain:
  ``n`` degraded versions with seeds (REAL_TRAIN, j) and random combinations, cropped at random;
- the **right** half, columns [706, 1411) (macula and temporal side), is held out: the real test set is
  that half degraded with fixed seeds (REAL_TEST, i) (combination i mod 7) with the clean half as
  ground truth. Column 705 belongs to neither.

Each half is resized on its own (bilinear with antialiasing) to height ``size`` and width
round(size·705/1411), i.e. the scale of a ``size``-px phantom, so no pixel of one half reaches the
other through interpolation. Cofe-Net's degradation is defined on a whole fundus (a halo ring and a
hole around the centre, the image mean), so a half is completed into a whole image by its mirror
image, degraded, and cut back (``degrade_half``): no pixel of the other half influences a degraded half.

Images are stored as uint8 (like photographs; 0.2 MB per 256² image) and returned as float32 in
[0, 1]. Everything is a pure function of the arguments; ``cache_dir`` stores the generated arrays as
safetensors keyed by a hash of those arguments (generation is ~0.3 s per image on one core).
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from retina_fast.training.degrade import DEGRADATION_KINDS, degradation_combinations, degrade, fov_mask

__all__ = ["SYN_TRAIN", "SYN_TEST", "SYN_SPOT", "SYN_BLUR", "REAL_TRAIN", "REAL_TEST", "REAL_PAIRS", "TEST_EYE_OFFSET",
           "SPLIT_COLUMN", "Pool", "synthetic_pairs", "single_kind_inputs", "spot_inputs",
           "synthetic_test_set", "real_image", "real_half",
           "degrade_half", "real_unlabelled", "real_pairs", "real_test_set", "random_crops", "augment_real"]

SYN_TRAIN, SYN_TEST, REAL_TRAIN, REAL_TEST, REAL_PAIRS = 0x5E1, 0x5E2, 0x4EA1, 0x4EA2, 0x4EA3  # degrade seed tags
SYN_SPOT = 0x5E3  # degrade seed tag of the spot-only training inputs (single_kind_inputs("spot", ...))
SYN_BLUR = 0x5E4  # degrade seed tag of the blur-only training inputs (single_kind_inputs("blur", ...))
_SINGLE_KIND_TAGS = {"spot": SYN_SPOT, "blur": SYN_BLUR}
TEST_EYE_OFFSET = 1_000_000
SPLIT_COLUMN = 705
_FULL = 1411


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


@dataclass
class Pool:
    """A set of images with optional targets and masks; all uint8/bool tensors on the CPU.

    inputs (M, 3, H, W) uint8; targets (E, 3, H, W) uint8 or None; source (M,) int64 = the target /
    mask row of each input; vessels, fov (E, 1, H, W) bool or None."""

    inputs: torch.Tensor
    targets: torch.Tensor | None = None
    source: torch.Tensor | None = None
    vessels: torch.Tensor | None = None
    fov: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def get(self, indices) -> dict[str, torch.Tensor]:
        """Float views of rows ``indices``: ``x`` (B, 3, H, W) and, when present, ``y``, ``vessels``,
        ``fov`` (B, 1, H, W) float32 in {0, 1}."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        out = {"x": _to_float(self.inputs[idx])}
        src = self.source[idx] if self.source is not None else idx
        if self.targets is not None:
            out["y"] = _to_float(self.targets[src])
        for name in ("vessels", "fov"):
            t = getattr(self, name)
            if t is not None:
                out[name] = t[src].float()
        return out


def random_crops(batch: dict[str, torch.Tensor], crop: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The same random crop (crop × crop) and random horizontal / vertical flips applied to every
    tensor of ``batch`` (each (B, C, H, W)), drawn per image from ``generator``."""
    any_t = next(iter(batch.values()))
    b, _, h, w = any_t.shape
    if crop > h or crop > w:
        raise ValueError(f"crop {crop} is larger than the images ({h}×{w})")
    tops = torch.randint(0, h - crop + 1, (b,), generator=generator).tolist()
    lefts = torch.randint(0, w - crop + 1, (b,), generator=generator).tolist()
    flips = torch.randint(0, 2, (b, 2), generator=generator).tolist()
    out: dict[str, list[torch.Tensor]] = {k: [] for k in batch}
    for i in range(b):
        dims = [d for d, f in zip((-1, -2), flips[i]) if f]
        for k, t in batch.items():
            c = t[i, :, tops[i]:tops[i] + crop, lefts[i]:lefts[i] + crop]
            out[k].append(c.flip(dims) if dims else c)
    return {k: torch.stack(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- caching


def _cached(cache_dir, spec: dict, build) -> Pool:
    if cache_dir is None:
        return build()
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{spec['kind']}-{key}.safetensors"
    if path.is_file():
        return Pool(**load_file(str(path)))
    pool = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in pool.tensors().items()}, str(tmp), metadata={"spec": json.dumps(spec)})
    tmp.replace(path)
    return pool


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", leave=False)


# ----------------------------------------------------------------------------- synthetic domain


def _colour_gains(tag: int, eye: int, k: int, amplitude: float) -> torch.Tensor:
    """Per-channel gains exp(U(−a, a)) for pair (eye, k), from its own seed; (3, 1, 1)."""
    rng = np.random.default_rng(np.random.SeedSequence([tag, eye, k, 0xC010]))
    return torch.from_numpy(np.exp(rng.uniform(-amplitude, amplitude, 3))).float().view(3, 1, 1)


def _phantom_pool(eye_seeds: list[int], per_eye: int, size: int, tag: int, cycle: bool, progress: bool,
                  colour_jitter: float = 0.0, kinds="random", degrade_tag: int | None = None) -> Pool:
    """Pairs of phantom eyes: ``per_eye`` degraded inputs per eye (combination i mod 7 with ``cycle``, else
    ``kinds``), degrade seeds (``degrade_tag`` or ``tag``, eye, k); colour gains always from ``tag``."""
    from retina_fast.phantom import render

    combos = degradation_combinations()
    clean, vessels, fovs, inputs, source = [], [], [], [], []
    for e, eye in enumerate(_progress(eye_seeds, progress, "phantom pairs")):
        ph = render(int(eye), size)
        rgb = _to_float(_to_u8(ph.rgb))
        fov = ph.masks["fov"]
        for k in range(per_eye):
            if colour_jitter or k == 0:
                target = rgb if not colour_jitter else _to_float(_to_u8(rgb * _colour_gains(tag, int(eye), k, colour_jitter)))
                clean.append(_to_u8(target))
                vessels.append((ph.masks["artery"] | ph.masks["vein"])[None])
                fovs.append(fov[None])
            row_kinds = combos[(e * per_eye + k) % len(combos)] if cycle else kinds
            seed = (tag if degrade_tag is None else degrade_tag, int(eye), k)
            inputs.append(_to_u8(degrade(target, seed=seed, kinds=row_kinds, fov_mask=fov)))
            source.append(len(clean) - 1)
    return Pool(inputs=torch.stack(inputs), targets=torch.stack(clean), source=torch.tensor(source),
                vessels=torch.stack(vessels), fov=torch.stack(fovs))


def synthetic_pairs(n_eyes: int, per_eye: int = 4, size: int = 256, *, first_eye: int = 0, colour_jitter: float = 0.0,
                    cache_dir=None, progress: bool = False) -> Pool:
    """Training pairs: eyes first_eye .. first_eye + n_eyes − 1, ``per_eye`` random degradations each.
    Pool with inputs (n_eyes·per_eye, 3, size, size) and targets / vessels / fov per eye, or per pair with
    ``colour_jitter`` = a > 0: pair (e, k) then starts from the clean image times per-channel gains
    exp(U(−a, a)) (domain randomisation of the fundus colour; target = that recoloured clean image)."""
    spec = {"kind": "synthetic", "n_eyes": n_eyes, "per_eye": per_eye, "size": size, "first_eye": first_eye,
            "tag": SYN_TRAIN, "colour_jitter": colour_jitter, "version": 2}
    return _cached(cache_dir, spec, lambda: _phantom_pool(list(range(first_eye, first_eye + n_eyes)), per_eye,
                                                          size, SYN_TRAIN, False, progress, colour_jitter))


def single_kind_inputs(kind: str, n_eyes: int, per_eye: int = 4, size: int = 256, *, first_eye: int = 0,
                       colour_jitter: float = 0.0, cache_dir=None, progress: bool = False) -> Pool:
    """Inputs degraded by one kind alone ("spot" or "blur": Cofe-Net's step for it), aligned row for row with
    ``synthetic_pairs`` of the same arguments: the same eyes, variants and targets (the same colour gains).
    Seeds (SYN_SPOT or SYN_BLUR, eye, k): a stream apart from the random combinations'."""
    if kind not in _SINGLE_KIND_TAGS:
        raise ValueError(f"single-kind inputs exist for {tuple(_SINGLE_KIND_TAGS)}, not {kind!r}")
    tag = _SINGLE_KIND_TAGS[kind]
    spec = {"kind": f"synthetic-{kind}", "n_eyes": n_eyes, "per_eye": per_eye, "size": size, "first_eye": first_eye,
            "tag": SYN_TRAIN, "degrade_tag": tag, "colour_jitter": colour_jitter, "version": 1}
    return _cached(cache_dir, spec, lambda: _phantom_pool(list(range(first_eye, first_eye + n_eyes)), per_eye, size,
                                                          SYN_TRAIN, False, progress, colour_jitter, (kind,), tag))


def spot_inputs(n_eyes: int, per_eye: int = 4, size: int = 256, **kw) -> Pool:
    """``single_kind_inputs("spot", ...)``: each input degraded by spots alone."""
    return single_kind_inputs("spot", n_eyes, per_eye, size, **kw)


def synthetic_test_set(n: int = 14, size: int = 256, *, cache_dir=None, progress: bool = False) -> Pool:
    """The degraded phantom test set: eyes TEST_EYE_OFFSET + i, one degradation each, combination i mod 7."""
    spec = {"kind": "synthetic-test", "n": n, "size": size, "tag": SYN_TEST, "version": 2}
    return _cached(cache_dir, spec, lambda: _phantom_pool([TEST_EYE_OFFSET + i for i in range(n)], 1, size,
                                                          SYN_TEST, True, progress))


# ----------------------------------------------------------------------------- real domain


@functools.lru_cache(maxsize=1)
def _retina_u8() -> np.ndarray:
    from skimage import data

    arr = np.ascontiguousarray(data.retina())
    arr.setflags(write=False)
    return arr


def real_image() -> torch.Tensor:
    """``skimage.data.retina()`` as float32 (3, 1411, 1411) in [0, 1]."""
    return torch.from_numpy(_retina_u8().copy()).permute(2, 0, 1).float() / 255.0


def real_half(side: str, size: int = 256) -> torch.Tensor:
    """The ``"left"`` (columns [0, 705)) or ``"right"`` (columns [706, 1411)) half, resized alone to
    (3, size, round(size·705/1411)), float32 in [0, 1]."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    img = real_image()
    half = img[..., :SPLIT_COLUMN] if side == "left" else img[..., SPLIT_COLUMN + 1:]
    width = max(1, round(size * SPLIT_COLUMN / _FULL))
    out = F.interpolate(half[None], size=(size, width), mode="bilinear", antialias=True, align_corners=False)
    return _to_float(_to_u8(out[0]))


def degrade_half(half: torch.Tensor, side: str, *, seed, kinds="random") -> torch.Tensor:
    """Degrade a half fundus (3, H, W) as part of the whole image made of it and its mirror image."""
    mirror = half.flip(-1)
    whole = torch.cat([half, mirror], -1) if side == "left" else torch.cat([mirror, half], -1)
    out = degrade(whole, seed=seed, kinds=kinds, fov_mask=fov_mask(whole))
    w = half.shape[-1]
    return out[..., :w] if side == "left" else out[..., w:]


def augment_real(half: torch.Tensor, seed, amount: float) -> torch.Tensor:
    """A photometric / geometric variant of a clean half fundus (3, H, W): a zoom onto a random window of
    (1 − U(0, amount/2)) of its size resized back (bilinear), per-channel colour gains exp(U(−a, a)) and an
    exposure gain exp(U(−a, a)) with a = ``amount`` (0 returns the half unchanged). The field of view is
    kept: the surround stays black. Everything from ``np.random.default_rng(SeedSequence(seed))``."""
    if amount <= 0:
        return half
    rng = np.random.default_rng(np.random.SeedSequence(list(seed)))
    _, h, w = half.shape
    z = 1.0 - rng.uniform(0.0, amount / 2)
    ch, cw = max(8, round(h * z)), max(8, round(w * z))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    win = half[None, :, top:top + ch, left:left + cw]
    out = F.interpolate(win, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
    gains = np.exp(rng.uniform(-amount, amount, 3)) * np.exp(rng.uniform(-amount, amount))
    out = out * torch.from_numpy(gains).float().view(3, 1, 1) * fov_mask(out).float()
    return _to_float(_to_u8(out))


def _real_pool(side: str, n: int, size: int, tag: int, cycle: bool, progress: bool, augment: float = 0.0,
               kinds: tuple[str, ...] | None = None) -> Pool:
    """``n`` degradations of a half; with ``augment`` each of its own ``augment_real`` variant, which is then
    that row's target (else every row's target is the half itself); ``kinds``: every row degraded by these
    kinds only (else a random combination, or the seven in turn with ``cycle``)."""
    half = real_half(side, size)
    combos = degradation_combinations()
    inputs, targets, fovs = [], [], []
    for i in _progress(range(n), progress, f"real {side} half"):
        clean = augment_real(half, (tag, i, 0xA6), augment)
        which = kinds if kinds is not None else combos[i % 7] if cycle else "random"
        inputs.append(_to_u8(degrade_half(clean, side, seed=(tag, i), kinds=which)))
        if augment > 0 or i == 0:
            targets.append(_to_u8(clean))
            fovs.append(fov_mask(clean)[None])
    source = torch.arange(n) if augment > 0 else torch.zeros(n, dtype=torch.long)
    return Pool(inputs=torch.stack(inputs), targets=torch.stack(targets), source=source, fov=torch.stack(fovs))


def real_unlabelled(n: int = 64, size: int = 256, *, augment: float = 0.0, cache_dir=None,
                    progress: bool = False) -> Pool:
    """The unlabelled real domain: ``n`` random degradations of the left half, each of its own
    ``augment_real`` variant when ``augment`` > 0 (targets are kept in the pool for inspection only; the
    trainers never read them)."""
    spec = {"kind": "real-left", "n": n, "size": size, "tag": REAL_TRAIN, "version": 1}
    if augment > 0:
        spec["augment"] = augment
    return _cached(cache_dir, spec, lambda: _real_pool("left", n, size, REAL_TRAIN, False, progress, augment))


def real_pairs(n: int = 48, size: int = 256, *, augment: float = 0.2, cache_dir=None, progress: bool = False,
               kinds: tuple[str, ...] | None = None) -> Pool:
    """Labelled real pairs: ``n`` ``augment_real`` variants of the left half (the training half), each degraded
    with its own random combination (seeds (REAL_PAIRS, j), a stream apart from the unlabelled pool's), or by
    ``kinds`` only, and paired with its clean variant as the target. The right half never enters."""
    spec = {"kind": "real-left-pairs", "n": n, "size": size, "tag": REAL_PAIRS, "augment": augment, "version": 1}
    if kinds is not None:
        bad = [k for k in kinds if k not in DEGRADATION_KINDS]
        if bad or not kinds:
            raise ValueError(f"real pair kinds must be among {DEGRADATION_KINDS}, got {tuple(kinds)}")
        kinds = tuple(k for k in DEGRADATION_KINDS if k in kinds)  # Cofe-Net's order, whatever was given
        spec["kinds"] = list(kinds)
    return _cached(cache_dir, spec, lambda: _real_pool("left", n, size, REAL_PAIRS, False, progress, augment, kinds))


def real_test_set(n: int = 14, size: int = 256, *, cache_dir=None, progress: bool = False) -> Pool:
    """The held-out real test set: the right half degraded with seeds (REAL_TEST, i), combination
    i mod 7; the clean right half is the ground truth of every row."""
    spec = {"kind": "real-right-test", "n": n, "size": size, "tag": REAL_TEST, "version": 1}
    return _cached(cache_dir, spec, lambda: _real_pool("right", n, size, REAL_TEST, True, progress))
