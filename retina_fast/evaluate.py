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

Memory is bounded by a batch, not by the number of images: the sets are read lazily
(:mod:`retina_fast.evaluate_sets`) and only per-image vectors (features, file names, nearest-neighbour results),
histograms and running sums are kept. Every set is first read once to validate it (so bad input fails before any
network runs); the real and synthetic sets are then read twice more: a first pass computes features,
masks (spilled as packed bits to a temporary file), mask counts, running mean / variance and the range of the
in-mask reflectance per structure and band; the second pass fills the histograms on the edges spanned by both
sets' ranges and draws the pixels for the percentiles. MS-SSIM reads only the images of each batch of pairs, and
the pixel-space nearest-neighbour search streams the training set once per group of synthetic (and validation)
chunks. The numbers equal those of computing each metric on the stacked sets, bit for bit (MS-SSIM runs on 4
pairs per call instead of 16, which CPU convolutions compute identically), except the spectra's mean and standard
deviation, accumulated by batch: equal to float64 rounding (``tests/test_evaluate_stream.py``).

All sets must share one image size. Output (when ``out`` is given): ``metrics.json``, ``report.md``
and PNG plots (see :mod:`retina_fast.evaluate_plots`). Bad input raises :class:`EvaluationError`
whose message names the folder or file.
"""
from __future__ import annotations

import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from retina_fast import DEFAULT_WAVELENGTHS
from retina_fast import metrics as M
from retina_fast.evaluate_sets import (KL_STRUCTURES, CubeSet, EvaluationError, ImageSet, check_sizes, count_images,
                                       load_set, nearest_two_sets, open_set, pairwise_ms_ssim)

__all__ = ["EvaluationError", "ImageSet", "load_set", "evaluate_folders", "kid_subset_size", "KL_STRUCTURES"]

_STAGES = ("features", "segmentation", "hs-fid", "spectral kl", "diversity", "authenticity", "report")
KL_BINS, KL_EPS = 64, 1e-10            # retina_fast.metrics.spectral_kl's defaults
QUANTILE_PIXELS = 200_000              # pixels (evenly spaced in image order) behind the spectra's percentiles
PAIR_BATCH = 16                        # pairs per MS-SSIM batch (retina_fast.metrics.ms_ssim_diversity's default)
NN_RATIO, NN_PERCENTILE = 1.0 / 3.0, 5.0  # retina_fast.metrics.nn_authenticity's defaults


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


def _as_masks(masks: dict, n: int, size: tuple, which: str) -> dict:
    out = {}
    for name, m in masks.items():
        m = torch.as_tensor(m)
        if m.ndim == 4 and m.shape[1] == 1:
            m = m[:, 0]
        if tuple(m.shape) != (n, *size):
            raise ValueError(f"{which} mask {name!r} must have shape {(n, *size)}, got {tuple(m.shape)}")
        out[name] = m.to("cpu", torch.bool)
    missing = [s for s in KL_STRUCTURES if s not in out]
    if missing:
        raise KeyError(f"{which} masks have no entry {missing[0]!r} (available: {sorted(out)})")
    return out


class _InMask:
    """One set's in-mask reflectance per structure, streamed: pixel counts, per-band min / max and running mean /
    M2 (Chan, Golub & LeVeque's pairwise update, 1979) in float64; the masks are spilled as packed bits to a
    temporary file for the second pass."""

    def __init__(self, cset: CubeSet) -> None:
        self.n, self.size, self.bands = cset.n, tuple(cset.size), cset.bands
        self.count = {s: 0 for s in KL_STRUCTURES}
        self.lo = {s: torch.full((self.bands,), math.inf, dtype=torch.float64) for s in KL_STRUCTURES}
        self.hi = {s: torch.full((self.bands,), -math.inf, dtype=torch.float64) for s in KL_STRUCTURES}
        self.mean = {s: torch.zeros(self.bands, dtype=torch.float64) for s in KL_STRUCTURES}
        self.m2 = {s: torch.zeros(self.bands, dtype=torch.float64) for s in KL_STRUCTURES}
        self.spill = tempfile.TemporaryFile(prefix="retina-fast-evaluate-masks-")
        self.batches: list[int] = []

    def add(self, x: torch.Tensor, masks: dict) -> None:
        for s in KL_STRUCTURES:
            m = masks[s]
            self.spill.write(np.packbits(m.numpy().reshape(-1)).tobytes())
            v = x.permute(1, 0, 2, 3)[:, m].double()
            c = v.shape[1]
            if c == 0:
                continue
            torch.minimum(self.lo[s], v.min(1).values, out=self.lo[s])
            torch.maximum(self.hi[s], v.max(1).values, out=self.hi[s])
            mb = v.mean(1)
            m2b = ((v - mb[:, None]) ** 2).sum(1)
            na, tot = self.count[s], self.count[s] + c
            delta = mb - self.mean[s]
            self.mean[s].add_(delta * (c / tot))  # in place: no small long-lived allocations between batches
            self.m2[s].add_(m2b).add_(delta * delta * (na * c / tot))
            self.count[s] = tot
        self.batches.append(x.shape[0])

    def masks(self):
        """The spilled masks again, batch by batch ({structure: bool (B, H, W)})."""
        self.spill.seek(0)
        h, w = self.size
        for b in self.batches:
            nbytes = (b * h * w + 7) // 8
            yield {s: torch.from_numpy(np.unpackbits(np.frombuffer(self.spill.read(nbytes), dtype=np.uint8),
                                                     count=b * h * w).astype(bool).reshape(b, h, w))
                   for s in KL_STRUCTURES}

    def fraction(self, s: str) -> float:
        return float(np.float32(self.count[s]) / np.float32(self.n * self.size[0] * self.size[1]))


def _scan(cset: CubeSet, extractor, segmenter, batch_size: int, use_files: bool, rows: int):
    """First pass over the real or synthetic set: features, masks (files when ``use_files``, else the
    segmenter's), in-mask statistics, the segmenter's Dice counts against the files and the first ``rows`` masks."""
    feats, stats, dice, first = None, _InMask(cset), {}, []
    for start, x in cset.iter_batches(batch_size):
        feats = _put_features(feats, start, x, extractor, batch_size, cset.n)
        with torch.no_grad():
            seg = _as_masks(segmenter(x), x.shape[0], cset.size, cset.role)
        masks = seg
        if use_files:
            loaded = cset.load_masks(range(start, start + x.shape[0]))
            masks = {k: torch.from_numpy(np.stack([m[k] for m in loaded])) for k in cset.mask_keys}
            for s in seg:
                if s in masks:
                    p, t = seg[s], masks[s]
                    c = dice.setdefault(s, [0, 0])
                    c[0] += int((p & t).sum())
                    c[1] += int(p.sum() + t.sum())
        stats.add(x, masks)
        first += [{name: m[i].clone() for name, m in masks.items()}
                  for i in range(min(x.shape[0], rows - len(first)))]
    dice = {s: 1.0 if tot == 0 else 2.0 * float(inter) / tot for s, (inter, tot) in dice.items()}
    return feats, stats, dice if use_files else None, first


def _put_features(feats: Optional[torch.Tensor], start: int, x: torch.Tensor, extractor, batch_size: int,
                  n: int) -> torch.Tensor:
    """Features of batch ``x`` written into one (n, F) float64 tensor allocated at the first batch (per-batch
    pieces kept until the end would fragment the heap between the batches' large buffers: RSS growing with n)."""
    f = M.extract_features(x, extractor, batch_size)
    if feats is None:
        feats = torch.empty((n, f.shape[1]), dtype=torch.float64)
    feats[start:start + f.shape[0]] = f
    return feats


def _features(cset: CubeSet, extractor, batch_size: int) -> torch.Tensor:
    feats = None
    for start, x in cset.iter_batches(batch_size):
        feats = _put_features(feats, start, x, extractor, batch_size, cset.n)
    return feats


def _edges(r: _InMask, s: _InMask) -> dict:
    """Histogram range per structure and band: the pooled range of both sets (as spectral_kl's)."""
    out = {}
    for name in KL_STRUCTURES:
        if r.count[name] and s.count[name]:
            out[name] = []
            for b in range(r.bands):
                lo = min(float(r.lo[name][b]), float(s.lo[name][b]))
                hi = max(float(r.hi[name][b]), float(s.hi[name][b]))
                out[name].append((lo, hi if hi > lo else lo + max(abs(lo), 1.0) * 1e-6))
    return out


def _second_pass(cset: CubeSet, stats: _InMask, edges: dict, batch_size: int) -> tuple[dict, dict]:
    """Histograms on ``edges`` and the spectra (mean, std, 10th / 90th percentile of evenly spaced pixels)."""
    hist = {s: torch.zeros(stats.bands, KL_BINS, dtype=torch.float64) for s in edges}
    picks = {s: torch.linspace(0, c - 1, min(c, QUANTILE_PIXELS)).long() for s, c in stats.count.items() if c}
    pool = {s: torch.empty(stats.bands, len(idx), dtype=torch.float32) for s, idx in picks.items()}
    offset, filled = dict.fromkeys(picks, 0), dict.fromkeys(picks, 0)
    for (_, x), masks in zip(cset.iter_batches(batch_size), stats.masks()):
        for s in picks:
            v = x.permute(1, 0, 2, 3)[:, masks[s]].double()
            for b, (lo, hi) in enumerate(edges.get(s, ())):
                hist[s][b] += torch.histc(v[b].clamp(lo, hi), bins=KL_BINS, min=lo, max=hi)
            o, idx = offset[s], picks[s]
            sel = idx[(idx >= o) & (idx < o + v.shape[1])] - o
            pool[s][:, filled[s]:filled[s] + len(sel)] = v[:, sel]  # float32 values: exact
            offset[s], filled[s] = o + v.shape[1], filled[s] + len(sel)
    spectra = {}
    for s in KL_STRUCTURES:
        c = stats.count[s]
        if c == 0:
            spectra[s] = None
            continue
        q = torch.stack([torch.quantile(pool[s][b].double(), torch.tensor([0.1, 0.9], dtype=torch.float64))
                         for b in range(stats.bands)], 1)  # band by band: the same values as dim=1, less memory
        std = (stats.m2[s] / (c - 1)).sqrt().tolist() if c > 1 else [0.0] * stats.bands
        spectra[s] = {"mean": stats.mean[s].tolist(), "std": std, "p10": q[0].tolist(), "p90": q[1].tolist(),
                      "pixels": int(c)}
        del pool[s]
    return hist, spectra


def _spectral_kl(r: _InMask, s: _InMask, hist_r: dict, hist_s: dict) -> dict:
    table = {}
    for name in KL_STRUCTURES:
        nr, ns = r.count[name], s.count[name]
        if nr == 0 or ns == 0:
            warnings.warn(f"spectral_kl: structure {name!r} has no pixels in the "
                          f"{'real' if nr == 0 else 'synthetic'} masks; its KL is NaN", M.MetricWarning)
            mean, per_band = float("nan"), [float("nan")] * r.bands
        else:
            per_band = [M.kl_divergence_hist(hist_r[name][b], hist_s[name][b], KL_EPS) for b in range(r.bands)]
            mean = float(sum(per_band) / r.bands)
        table[name] = {"mean": mean, "per_band": per_band, "n_real_pixels": int(nr), "n_synthetic_pixels": int(ns)}
    return table


def _diversity(real: CubeSet, syn: CubeSet, pairs: int, seed: int, n_boot: int, alpha: float = 0.05) -> dict:
    """retina_fast.metrics.ms_ssim_diversity on lazily read sets (same pairs, same numbers)."""
    from retina_fast.metrics.ssim import _scale_weights

    scales = _scale_weights(min(real.size), M.MS_SSIM_WEIGHTS, 11, warn_reduced=True).numel()
    v = pairwise_ms_ssim(real, M.sample_pairs(real.n, pairs, seed), PAIR_BATCH, weights=M.MS_SSIM_WEIGHTS)
    s = pairwise_ms_ssim(syn, M.sample_pairs(syn.n, pairs, seed), PAIR_BATCH, weights=M.MS_SSIM_WEIGHTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.MetricWarning)
        ci = M.bootstrap_ci(lambda a, b: abs(float(a.mean()) - float(b.mean())), v.numpy(), s.numpy(),
                            n_boot=n_boot, seed=seed, alpha=alpha)
    return {"val_mean": float(v.mean()), "syn_mean": float(s.mean()), "abs_delta": ci["value"],
            "ci_low": ci["low"], "ci_high": ci["high"], "alpha": alpha, "pairs": pairs, "seed": seed,
            "scales": scales, "val_scores": v.tolist(), "syn_scores": s.tolist()}


def _space_report(d1, d2, i1, val_d1) -> dict:
    """The per-space report of retina_fast.metrics.nn_authenticity from nearest distances."""
    r = torch.where(d2 > 0, d1 / d2.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(d1))
    ratio_flagged = torch.nonzero(r < NN_RATIO).flatten().tolist()
    threshold, pct_flagged = None, []
    if val_d1 is not None:
        threshold = float(np.percentile(val_d1.numpy(), NN_PERCENTILE))
        pct_flagged = torch.nonzero(d1 < threshold).flatten().tolist()
    return {"nearest_index": i1, "nearest_distance": d1, "ratio": r, "ratio_flagged": ratio_flagged,
            "threshold": threshold, "percentile_flagged": pct_flagged,
            "flagged": sorted(set(ratio_flagged) | set(pct_flagged)), "val_nearest_distance": val_d1}


def _authenticity(sets: dict, feats: dict) -> dict:
    train, syn, val = sets["train"], sets["synthetic"], sets.get("val")
    near = nearest_two_sets([syn] if val is None else [syn, val], train)
    spaces = {"pixel": _space_report(*near[0][:3], None if val is None else near[1][0])}
    # Feature space from the features already extracted (same extractor, no second pass).
    fres = M.nn_authenticity(feats["train"], feats["synthetic"], feats.get("val"))
    spaces["feature"] = fres["pixel"]
    out = {"ratio": NN_RATIO, "percentile": NN_PERCENTILE, "n_train": train.n, "percentile_rule": val is not None}
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


def _report_images(sets: dict, result: dict, rows: dict) -> dict:
    """The few images the plots show: the first images of each set with their masks, and the nearest pairs."""
    from retina_fast.evaluate_plots import nearest_rows

    contact = {}
    for role in ("real", "synthetic"):
        s, k = sets[role], len(rows[role])
        contact[role] = (s.get(range(k)), rows[role], [f.name for f in s.files[:k]])
    nearest = []
    if result["authenticity"] is not None:
        pairs = nearest_rows(result)
        syn = sets["synthetic"].get([i for i, _ in pairs])
        tr = sets["train"].get([j for _, j in pairs])
        nearest = [(i, j, syn[r], tr[r], sets["synthetic"].files[i].name, sets["train"].files[j].name)
                   for r, (i, j) in enumerate(pairs)]
    return {"contact": contact, "nearest": nearest}


def evaluate_folders(real: str | Path, synthetic: str | Path, train: str | Path | None = None,
                     val: str | Path | None = None, out: str | Path | None = None, *,
                     max_images: Optional[int] = None, pairs: int = 500, seed: int = 0, n_boot: int = 200,
                     extractor: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                     segmenter: Optional[Callable[[torch.Tensor], dict]] = None, batch_size: int = 16,
                     progress: bool = True, plots: bool = True) -> dict:
    """Evaluate ``synthetic`` against ``real`` (and ``train`` / ``val`` for authenticity).

    Folders of cubes or sample runs (see the module docstring), read ``batch_size`` images at a time;
    ``extractor`` / ``segmenter`` (called on such batches) default to the shipped structure network.
    Returns the metrics dict (also written to ``out/metrics.json`` with ``out/report.md`` and PNG plots
    when ``out`` is given).
    """
    from tqdm import tqdm

    from retina_fast.evaluate_plots import SHEET_ROWS

    if pairs < 1 or n_boot < 2 or (max_images is not None and max_images < 2) or batch_size < 1:
        raise EvaluationError(f"need pairs >= 1, n_boot >= 2, max_images >= 2 (got {pairs}, {n_boot}, {max_images})"
                              + ("" if batch_size >= 1 else f" and batch_size >= 1 (got {batch_size})"))
    t0 = time.time()
    roles = {"real": real, "synthetic": synthetic, "train": train, "val": val}
    roles = {k: Path(v) for k, v in roles.items() if v is not None}
    if "val" in roles and "train" not in roles:
        raise EvaluationError("--val is only used with --train (the percentile rule of the authenticity check)")
    counts = {k: count_images(v, k) for k, v in roles.items()}
    total = sum(min(c, max_images or c) for k, c in counts.items()
                if not (k == "val" and roles["val"] == roles["real"])) + len(_STAGES)
    bar = tqdm(total=total, desc="evaluate", unit="step", disable=not progress)
    tick = lambda: bar.update(1)  # noqa: E731
    try:
        sets: dict[str, CubeSet] = {}
        for role, path in roles.items():
            bar.set_description(f"load {role}")
            same = role == "val" and path == roles["real"]
            sets[role] = sets["real"] if same else open_set(path, role, max_images, tick, with_masks=role == "real")
        check_sizes(list(sets.values()))
        return _evaluate(sets, out, max_images, pairs, seed, n_boot, extractor, segmenter, batch_size, plots,
                         bar, tick, t0, SHEET_ROWS)
    finally:
        bar.close()


def _evaluate(sets, out, max_images, pairs, seed, n_boot, extractor, segmenter, batch_size, plots, bar, tick, t0,
              sheet_rows) -> dict:
    if extractor is None or segmenter is None:
        from retina_fast.models.structure_net import StructureFeatures, StructureSegmenter, load_structure_net

        net = load_structure_net()
        if extractor is None:
            extractor = StructureFeatures(net)
        if segmenter is None:
            segmenter = StructureSegmenter(net, batch_size=batch_size)
    real_s, syn_s = sets["real"], sets["synthetic"]
    masks_source = "files" if real_s.mask_keys is not None else "segmenter"
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", M.MetricWarning)
        bar.set_description("features, segmentation")
        feats: dict[str, torch.Tensor] = {}
        stats, rows, dice = {}, {}, None
        for k, s in sets.items():
            same = [j for j in feats if sets[j] is s]
            if same:
                feats[k] = feats[same[0]]
            elif k in ("real", "synthetic"):
                feats[k], stats[k], d, rows[k] = _scan(s, extractor, segmenter, batch_size,
                                                      k == "real" and masks_source == "files", sheet_rows)
                dice = d if k == "real" else dice
            else:
                feats[k] = _features(s, extractor, batch_size)
        tick()
        tick()
        bar.set_description("hs-fid")
        fr, fs = feats["real"], feats["synthetic"]
        fd = M.bootstrap_ci(M.frechet_distance_from_features, fr, fs, n_boot=n_boot, seed=seed)
        kid = M.kid(fr, fs, subsets=100, subset_size=kid_subset_size(len(fr), len(fs)), seed=seed)
        tick()
        bar.set_description("spectral kl")
        edges = _edges(stats["real"], stats["synthetic"])
        hist_r, spectra_r = _second_pass(real_s, stats["real"], edges, batch_size)
        hist_s, spectra_s = _second_pass(syn_s, stats["synthetic"], edges, batch_size)
        kl = _spectral_kl(stats["real"], stats["synthetic"], hist_r, hist_s)
        tick()
        bar.set_description("diversity")
        div = _diversity(real_s, syn_s, pairs, seed, max(n_boot, 200))
        tick()
        bar.set_description("authenticity")
        auth = _authenticity(sets, feats) if "train" in sets else None
        tick()
    for w in caught:
        msg = str(w.message).replace("f1: ", "real features: ").replace("f2: ", "synthetic features: ")
        if msg not in notes:
            notes.append(msg)
    if auth is None:
        notes.append("no --train folder: the authenticity (nearest-neighbour) check was skipped")
    elif not auth["percentile_rule"]:
        notes.append("no --val folder: the 5th-percentile rule was skipped (ratio test only)")
    h, w = real_s.size
    result = {
        "settings": {"real": str(real_s.root), "synthetic": str(syn_s.root),
                     "train": str(sets["train"].root) if "train" in sets else None,
                     "val": str(sets["val"].root) if "val" in sets else None,
                     "n": {k: s.n for k, s in sets.items()}, "size": [int(h), int(w)],
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
        "segmenter_dice_on_real": dice,
        "mask_fraction": {role: {s: stats[role].fraction(s) for s in KL_STRUCTURES} for role in ("real", "synthetic")},
        "spectra": {"real": spectra_r, "synthetic": spectra_s},
        "notes": notes,
    }
    if out is not None:
        bar.set_description("report")
        from retina_fast.evaluate_plots import write_report

        result["settings"]["wall_s"] = round(time.time() - t0, 1)
        clean = _clean(result)
        images = _report_images(sets, clean, rows) if plots else None
        write_report(Path(out), clean, div, images, plots=plots)
    tick()
    result["settings"]["wall_s"] = round(time.time() - t0, 1)
    return _clean(result)
