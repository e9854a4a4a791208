"""Evaluate a folder of synthetic cubes against a folder of real ones (``retina-fast evaluate``).

:func:`evaluate_folders` reads cube folders with :mod:`retina_fast.io` (every ``.npy .npz .tif .h5``
file, sorted by path, the first ``max_images``; bands mapped to the 16 default wavelengths), or a
finished ``retina-fast sample`` run directory (its shards in order, each checked against the
manifest's sha256), and
computes the four metrics of the hyperspectral latent-diffusion study this package reproduces (HS-FID,
spectral KL per structure, MS-SSIM diversity, nearest-neighbour authenticity) with :mod:`retina_fast.metrics`:

* **HS-FID**: Fréchet distance of structure-network features (the shipped 128-d extractor unless
  another is given), with a percentile bootstrap interval and bias estimate, and KID alongside
  (100 subsets of min(1000, N/2) images, mean and spread).
  FD is biased upward by O(F/N): compare values only at equal N and image size. The features hardly
  react to a global gain (GroupNorm); the spectral KL does.
* **Spectral KL** (vein, artery, ONH): KL(real ‖ synthetic) of the pooled in-mask reflectance per
  band on shared histogram edges, averaged over bands. Real masks come from ``<stem>_masks.npz``
  files next to the cubes when every cube has one, else from the segmenter; synthetic masks always
  from the segmenter (sigmoid > 0.5). With mask files, the segmenter's Dice on the real set is
  reported, a check of how far segmented masks can be trusted.
* **Diversity**: |mean MS-SSIM over ``pairs`` random pairs of real − same for synthetic| with a
  bootstrap interval; below 161 px MS-SSIM uses fewer scales (stated in the report).
* **Authenticity** (with ``train``): nearest training image of every synthetic one in pixel and
  feature space, the nearest / second-nearest < 1/3 ratio test and, with ``val``, the rule "closer
  than the 5th percentile of validation-to-train nearest distances" (≈ 5 % of novel images are
  flagged by construction: candidates to inspect, not proof of copying).

All sets must share one image size. Output (when ``out`` is given): ``metrics.json``, ``report.md``
and PNG plots (see :mod:`retina_fast.evaluate_plots`). Bad input raises :class:`EvaluationError`
whose message names the folder or file.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from retina_fast import DEFAULT_WAVELENGTHS
from retina_fast import metrics as M
from retina_fast.io import CubeFormatError, load_masks

__all__ = ["EvaluationError", "ImageSet", "load_set", "evaluate_folders", "kid_subset_size", "KL_STRUCTURES"]

KL_STRUCTURES = ("vein", "artery", "onh")
_STAGES = ("features", "segmentation", "hs-fid", "spectral kl", "diversity", "authenticity", "report")


class EvaluationError(ValueError):
    """Bad evaluation input; the message names the folder or file."""


@dataclass
class ImageSet:
    """A loaded folder: ``images`` (N, 16, H, W) float32 reflectance, ``files`` (N paths),
    ``masks`` ({name: bool (N, H, W)} from mask files, or None)."""

    role: str
    root: Path
    files: list
    images: torch.Tensor
    masks: Optional[dict] = None


def _mask_path(cube: Path) -> Path:
    return cube.with_name(cube.name[: -len(cube.suffix)] + "_masks.npz")


def _dataset(root: Path, role: str):
    from retina_fast.data import CubeFolderDataset

    if not root.exists():
        raise EvaluationError(f"--{role} {root}: no such directory")
    if not root.is_dir():
        raise EvaluationError(f"--{role} {root}: not a directory")
    try:
        return CubeFolderDataset(root, DEFAULT_WAVELENGTHS, out_range=None)
    except FileNotFoundError as exc:
        raise EvaluationError(f"--{role} {exc}") from exc


def _is_run(root: Path) -> bool:
    """A ``retina-fast sample`` run directory (shards + manifest) rather than a folder of cube files."""
    return (root / "run.json").is_file()  # written first by every run (``retina-fast phantom`` folders
    # have a manifest.json of their own)


def _run_records(root: Path, role: str) -> list:
    from retina_fast import shards

    try:
        return list(shards.iter_manifest(root))
    except FileNotFoundError:
        raise EvaluationError(f"--{role} {root}: a retina-fast sample run without manifest.json, i.e. unfinished; "
                              f"finish it with `retina-fast sample ... --resume`") from None
    except shards.RunError as exc:
        raise EvaluationError(f"--{role} {exc}") from None


def _count(root: Path, role: str) -> int:
    if root.is_dir() and _is_run(root):
        return sum(record["count"] for record, _ in _run_records(root, role))
    return len(_dataset(root, role))


def _load_run(root: Path, role: str, max_images: Optional[int], tick: Callable[[], None]) -> ImageSet:
    """The images of a finished sample run, in order, each shard verified against the manifest's sha256."""
    from retina_fast import shards
    from retina_fast.data import resample_bands

    records = _run_records(root, role)
    try:
        spec = shards.load_spec(root)
    except shards.RunError as exc:
        raise EvaluationError(f"--{role} {exc}") from None
    limit = max_images if max_images is not None else math.inf
    cubes, files = [], []
    for record, path in records:
        if len(cubes) >= limit:
            break
        try:
            arr = shards.read_shard(path, sha256=record["sha256"])
            for j, cube in enumerate(arr[: int(min(len(arr), limit - len(cubes)))]):
                cubes.append(resample_bands(cube, spec.wavelengths, DEFAULT_WAVELENGTHS, path=path))
                files.append(Path(f"{path.name}[{j}]"))  # image j of the shard (names in the report)
                tick()
        except (shards.RunError, CubeFormatError) as exc:
            raise EvaluationError(f"--{role}: {exc}") from None
    if len(cubes) < 2:
        raise EvaluationError(f"--{role} {root}: the run holds {len(cubes)} image(s); at least 2 are needed")
    return ImageSet(role, root, files, torch.from_numpy(np.stack(cubes)), None)


def load_set(root: str | Path, role: str = "real", max_images: Optional[int] = None,
             tick: Callable[[], None] = lambda: None) -> ImageSet:
    """Read a cube folder or a finished ``retina-fast sample`` run (see the module docstring); ``tick``
    is called once per image."""
    root = Path(root)
    if root.is_dir() and _is_run(root):
        return _load_run(root, role, max_images, tick)
    ds = _dataset(root, role)
    n = len(ds) if max_images is None else min(len(ds), int(max_images))
    if n < 2:
        raise EvaluationError(f"--{role} {root}: {len(ds)} cube file(s); at least 2 are needed")
    cubes = []
    for i in range(n):
        try:
            cube = ds.load(i)
        except CubeFormatError as exc:
            raise EvaluationError(f"--{role}: {exc}") from exc
        if cubes and cube.shape != cubes[0].shape:
            raise EvaluationError(f"--{role}: {ds.files[i]}: image is {cube.shape[1]}x{cube.shape[2]}, but "
                                  f"{ds.files[0].name} is {cubes[0].shape[1]}x{cubes[0].shape[2]}; "
                                  f"all images must have one size")
        cubes.append(cube)
        tick()
    files = list(ds.files[:n])
    masks = None
    if all(_mask_path(f).is_file() for f in files):
        loaded = []
        for f in files:
            try:
                loaded.append(load_masks(_mask_path(f)))
            except CubeFormatError as exc:
                raise EvaluationError(f"--{role}: {exc}") from exc
        if all(set(KL_STRUCTURES) <= set(m) and m[KL_STRUCTURES[0]].shape == cubes[0].shape[1:] for m in loaded):
            keys = set.intersection(*(set(m) for m in loaded))
            masks = {k: torch.from_numpy(np.stack([m[k] for m in loaded])) for k in sorted(keys)}
    return ImageSet(role, root, files, torch.from_numpy(np.stack(cubes)), masks)


def _check_sizes(sets: list[ImageSet]) -> None:
    ref = sets[0]
    for s in sets[1:]:
        if s.images.shape[-2:] != ref.images.shape[-2:]:
            h, w = s.images.shape[-2:]
            raise EvaluationError(f"--{s.role} {s.root}: images are {h}x{w}, --{ref.role} images are "
                                  f"{ref.images.shape[-2]}x{ref.images.shape[-1]}; all sets must share one size")


def kid_subset_size(n1: int, n2: int) -> int:
    """KID subset size: 1000, or half the smaller set (so that subsets differ and their spread means
    something), at least 2."""
    return max(2, min(1000, min(n1, n2) // 2))


def _clean(x: Any) -> Any:
    """JSON-ready copy: tensors / arrays to lists, NaN / Inf to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return _clean(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x).tolist())
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _spectra(images: torch.Tensor, masks: dict) -> dict:
    out = {}
    for s in KL_STRUCTURES:
        v = images.permute(1, 0, 2, 3)[:, masks[s].bool()].double()
        if v.shape[1] == 0:
            out[s] = None
            continue
        q = torch.quantile(v[:, torch.linspace(0, v.shape[1] - 1, min(v.shape[1], 200_000)).long()],
                           torch.tensor([0.1, 0.9], dtype=torch.float64), dim=1)
        out[s] = {"mean": v.mean(1).tolist(), "std": v.std(1).tolist() if v.shape[1] > 1 else [0.0] * v.shape[0],
                  "p10": q[0].tolist(), "p90": q[1].tolist(), "pixels": int(v.shape[1])}
    return out


def _dice(pred: dict, target: dict) -> dict:
    out = {}
    for s in pred:
        if s in target:
            p, t = pred[s].bool(), target[s].bool()
            tot = float(p.sum() + t.sum())
            out[s] = 1.0 if tot == 0 else 2.0 * float((p & t).sum()) / tot
    return out


def _authenticity(train: ImageSet, syn: ImageSet, val: Optional[ImageSet], feats: dict) -> dict:
    res = M.nn_authenticity(train.images, syn.images, None if val is None else val.images)
    spaces = {"pixel": res["pixel"]}
    # Feature space from the features already extracted (same extractor, no second pass).
    fres = M.nn_authenticity(feats["train"], feats["synthetic"], feats.get("val"))
    spaces["feature"] = fres["pixel"]
    out = {"ratio": res["ratio"], "percentile": res["percentile"], "n_train": len(train.files),
           "percentile_rule": val is not None}
    flagged = set()
    for name, r in spaces.items():
        d1 = r["nearest_distance"].numpy()
        out[name] = {
            "nearest_index": r["nearest_index"].tolist(),
            "nearest_file": [train.files[i].name for i in r["nearest_index"].tolist()],
            "nearest_distance": d1.tolist(), "ratio_values": r["ratio"].tolist(),
            "ratio_flagged": r["ratio_flagged"], "percentile_flagged": r["percentile_flagged"],
            "threshold": r["threshold"], "flagged": r["flagged"],
            "min_ratio": float(r["ratio"].min()), "median_ratio": float(r["ratio"].median()),
            "median_nearest_distance": float(np.median(d1)),
            "val_median_nearest_distance": (None if r["val_nearest_distance"] is None
                                            else float(r["val_nearest_distance"].median())),
        }
        flagged |= set(r["flagged"])
    out["flagged"] = sorted(flagged)
    out["flagged_files"] = [syn.files[i].name for i in out["flagged"]]
    return out


def evaluate_folders(real: str | Path, synthetic: str | Path, train: str | Path | None = None,
                     val: str | Path | None = None, out: str | Path | None = None, *,
                     max_images: Optional[int] = None, pairs: int = 500, seed: int = 0, n_boot: int = 200,
                     extractor: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                     segmenter: Optional[Callable[[torch.Tensor], dict]] = None, batch_size: int = 16,
                     progress: bool = True, plots: bool = True) -> dict:
    """Evaluate ``synthetic`` against ``real`` (and ``train`` / ``val`` for authenticity).

    Folders of cubes (see the module docstring). ``extractor`` / ``segmenter`` default to the
    shipped structure network. Returns the metrics dict (also written to ``out/metrics.json`` with
    ``out/report.md`` and PNG plots when ``out`` is given).
    """
    from tqdm import tqdm

    if pairs < 1 or n_boot < 2 or (max_images is not None and max_images < 2):
        raise EvaluationError(f"need pairs >= 1, n_boot >= 2, max_images >= 2 (got {pairs}, {n_boot}, {max_images})")
    t0 = time.time()
    roles = {"real": real, "synthetic": synthetic, "train": train, "val": val}
    roles = {k: Path(v) for k, v in roles.items() if v is not None}
    if "val" in roles and "train" not in roles:
        raise EvaluationError("--val is only used with --train (the percentile rule of the authenticity check)")
    counts = {k: _count(v, k) for k, v in roles.items()}
    total = sum(min(c, max_images or c) for k, c in counts.items()
                if not (k == "val" and roles["val"] == roles["real"])) + len(_STAGES)
    bar = tqdm(total=total, desc="evaluate", unit="step", disable=not progress)
    tick = lambda: bar.update(1)  # noqa: E731
    sets: dict[str, ImageSet] = {}
    try:
        for role, path in roles.items():
            bar.set_description(f"load {role}")
            same = role == "val" and path == roles["real"]
            sets[role] = sets["real"] if same else load_set(path, role, max_images, tick)
        _check_sizes(list(sets.values()))
    except EvaluationError:
        bar.close()
        raise
    if extractor is None or segmenter is None:
        from retina_fast.models.structure_net import StructureFeatures, StructureSegmenter, load_structure_net

        net = load_structure_net()
        if extractor is None:
            extractor = StructureFeatures(net)
        if segmenter is None:
            segmenter = StructureSegmenter(net, batch_size=batch_size)
    real_s, syn_s = sets["real"], sets["synthetic"]
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", M.MetricWarning)
        bar.set_description("features")
        feats: dict[str, torch.Tensor] = {}
        for k, s in sets.items():
            same = [j for j in feats if sets[j] is s]
            feats[k] = feats[same[0]] if same else M.extract_features(s.images, extractor, batch_size)
        tick()
        bar.set_description("segmentation")
        syn_masks = segmenter(syn_s.images)
        seg_real = segmenter(real_s.images)
        masks_source = "files" if real_s.masks is not None else "segmenter"
        real_masks = real_s.masks if real_s.masks is not None else seg_real
        tick()
        bar.set_description("hs-fid")
        fr, fs = feats["real"], feats["synthetic"]
        fd = M.bootstrap_ci(M.frechet_distance_from_features, fr, fs, n_boot=n_boot, seed=seed)
        kid = M.kid(fr, fs, subsets=100, subset_size=kid_subset_size(len(fr), len(fs)), seed=seed)
        tick()
        bar.set_description("spectral kl")
        kl = M.spectral_kl(real_s.images, real_masks, syn_s.images, syn_masks, structures=KL_STRUCTURES)
        tick()
        bar.set_description("diversity")
        div = M.ms_ssim_diversity(real_s.images, syn_s.images, pairs=pairs, seed=seed, n_boot=max(n_boot, 200))
        tick()
        bar.set_description("authenticity")
        auth = _authenticity(sets["train"], syn_s, sets.get("val"), feats) if "train" in sets else None
        tick()
    for w in caught:
        msg = str(w.message).replace("f1: ", "real features: ").replace("f2: ", "synthetic features: ")
        if msg not in notes:
            notes.append(msg)
    if auth is None:
        notes.append("no --train folder: the authenticity (nearest-neighbour) check was skipped")
    elif not auth["percentile_rule"]:
        notes.append("no --val folder: the 5th-percentile rule was skipped (ratio test only)")
    h, w = real_s.images.shape[-2:]
    result = {
        "settings": {"real": str(real_s.root), "synthetic": str(syn_s.root),
                     "train": str(sets["train"].root) if "train" in sets else None,
                     "val": str(sets["val"].root) if "val" in sets else None,
                     "n": {k: len(s.files) for k, s in sets.items()}, "size": [int(h), int(w)],
                     "max_images": max_images, "pairs": pairs, "seed": seed, "n_boot": n_boot,
                     "extractor": type(extractor).__name__, "feature_dim": int(fr.shape[1]),
                     "real_masks": masks_source, "synthetic_masks": "segmenter",
                     "wavelengths": list(DEFAULT_WAVELENGTHS)},
        "hs_fid": {"value": fd["value"], "ci_low": fd["low"], "ci_high": fd["high"], "bias": fd["bias"],
                   "std": fd["std"], "alpha": fd["alpha"], "n_boot": fd["n_boot"]},
        "kid": kid,
        "spectral_kl": kl,
        "ms_ssim_diversity": {k: v for k, v in div.items() if not k.endswith("_scores")},
        "authenticity": auth,
        "segmenter_dice_on_real": _dice(seg_real, real_s.masks) if real_s.masks is not None else None,
        "mask_fraction": {"real": {s: float(real_masks[s].float().mean()) for s in KL_STRUCTURES},
                          "synthetic": {s: float(syn_masks[s].float().mean()) for s in KL_STRUCTURES}},
        "spectra": {"real": _spectra(real_s.images, real_masks), "synthetic": _spectra(syn_s.images, syn_masks)},
        "notes": notes,
    }
    if out is not None:
        bar.set_description("report")
        from retina_fast.evaluate_plots import write_report

        result["settings"]["wall_s"] = round(time.time() - t0, 1)
        write_report(Path(out), _clean(result), sets, {"real": real_masks, "synthetic": syn_masks},
                     div, plots=plots)
    tick()
    bar.close()
    result["settings"]["wall_s"] = round(time.time() - t0, 1)
    return _clean(result)
