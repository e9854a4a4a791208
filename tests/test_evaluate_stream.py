"""Streamed ``evaluate_folders`` against the in-memory computation it replaced, and its memory bound.

The reference below stacks every set in memory (read independently of ``retina_fast.evaluate_sets``: cube files
through ``CubeFolderDataset``, runs through ``shards.read_shard``) and calls the ``retina_fast.metrics``
functions on the full tensors, exactly as ``evaluate_folders`` did before it streamed. Every metric key must
agree: bit for bit, except the spectra's mean / std (float64 running sums, equal to rounding).
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from retina_fast import DEFAULT_WAVELENGTHS
from retina_fast import metrics as M
from retina_fast.cli import main
from retina_fast.evaluate import evaluate_folders, kid_subset_size
from retina_fast.evaluate_sets import nearest_two_sets, open_set

SIZE = 64
KL = ("vein", "artery", "onh")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    for name, n, seed in (("real", 12, 0), ("synthetic", 10, 100), ("train", 8, 200)):
        assert main(["phantom", "--n", str(n), "--size", str(SIZE), "--seed", str(seed), "--out", str(root / name),
                     "--no-progress"]) == 0
    shutil.copytree(root / "real", root / "bare")
    for f in (root / "bare").glob("*_masks.npz"):
        f.unlink()
    from _small_model import save_small_checkpoint

    model = save_small_checkpoint(root / "ckpt", image_size=SIZE)
    assert main(["sample", "--n", "10", "--steps", "2", "--seed", "1", "--model", str(model), "--out",
                 str(root / "run"), "--shard-size", "3", "--backend", "torch", "--quiet"]) == 0
    return root


# ------------------------------------------------------------------------------------ the in-memory reference
def _stack(root: Path, max_images):
    """(images (N, 16, H, W), names, file masks or None) of a folder or run, all in memory."""
    from retina_fast import shards
    from retina_fast.data import CubeFolderDataset, resample_bands
    from retina_fast.io import load_masks

    limit = max_images or math.inf
    if (root / "run.json").is_file():
        spec, cubes, names = shards.load_spec(root), [], []
        for record, path in shards.iter_manifest(root):
            arr = shards.read_shard(path, sha256=record["sha256"])
            for j in range(min(len(arr), int(min(limit, 1e9)) - len(cubes))):
                cubes.append(resample_bands(arr[j], spec.wavelengths, DEFAULT_WAVELENGTHS, path=path))
                names.append(f"{path.name}[{j}]")
        return torch.from_numpy(np.stack(cubes)), names, None
    ds = CubeFolderDataset(root, DEFAULT_WAVELENGTHS, out_range=None)
    n = int(min(len(ds), limit))
    images = torch.from_numpy(np.stack([ds.load(i) for i in range(n)]))
    files = ds.files[:n]
    mpaths = [f.with_name(f.stem + "_masks.npz") for f in files]
    masks = None
    if all(p.is_file() for p in mpaths):
        loaded = [load_masks(p) for p in mpaths]
        keys = set.intersection(*(set(m) for m in loaded))
        masks = {k: torch.from_numpy(np.stack([m[k] for m in loaded])) for k in sorted(keys)}
    return images, [f.name for f in files], masks


def _spectra(images, masks):
    out = {}
    for s in KL:
        v = images.permute(1, 0, 2, 3)[:, masks[s].bool()].double()
        if v.shape[1] == 0:
            out[s] = None
            continue
        q = torch.quantile(v[:, torch.linspace(0, v.shape[1] - 1, min(v.shape[1], 200_000)).long()],
                           torch.tensor([0.1, 0.9], dtype=torch.float64), dim=1)
        out[s] = {"mean": v.mean(1).tolist(), "std": v.std(1).tolist() if v.shape[1] > 1 else [0.0] * v.shape[0],
                  "p10": q[0].tolist(), "p90": q[1].tolist(), "pixels": int(v.shape[1])}
    return out


def _reference(real, synthetic, train=None, val=None, *, max_images=None, pairs=30, seed=0, n_boot=20,
               batch_size=16, extractor=None, segmenter=None):
    from retina_fast.models.structure_net import StructureFeatures, StructureSegmenter, load_structure_net

    if extractor is None or segmenter is None:
        net = load_structure_net()
        extractor, segmenter = StructureFeatures(net), StructureSegmenter(net, batch_size=batch_size)
    paths = {k: Path(v) for k, v in (("real", real), ("synthetic", synthetic), ("train", train), ("val", val))
             if v is not None}
    sets = {k: _stack(p, max_images) for k, p in paths.items()}
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", M.MetricWarning)
        feats = {k: M.extract_features(s[0], extractor, batch_size) for k, s in sets.items()}
        (ri, _, rfile), (si, snames, _) = sets["real"], sets["synthetic"]
        syn_masks, seg_real = segmenter(si), segmenter(ri)
        real_masks = rfile if rfile is not None else seg_real
        fr, fs = feats["real"], feats["synthetic"]
        fd = M.bootstrap_ci(M.frechet_distance_from_features, fr, fs, n_boot=n_boot, seed=seed)
        kid = M.kid(fr, fs, subsets=100, subset_size=kid_subset_size(len(fr), len(fs)), seed=seed)
        kl = M.spectral_kl(ri, real_masks, si, syn_masks, structures=KL)
        div = M.ms_ssim_diversity(ri, si, pairs=pairs, seed=seed, n_boot=max(n_boot, 200))
        auth = None
        if "train" in sets:
            ti, tnames, _ = sets["train"]
            vi = sets["val"][0] if "val" in sets else None
            res = M.nn_authenticity(ti, si, vi)
            fres = M.nn_authenticity(feats["train"], fs, feats.get("val"))
            auth = {"ratio": res["ratio"], "percentile": res["percentile"], "n_train": len(tnames),
                    "percentile_rule": vi is not None}
            flagged = set()
            for name, r in (("pixel", res["pixel"]), ("feature", fres["pixel"])):
                d1 = r["nearest_distance"].numpy()
                auth[name] = {
                    "nearest_index": r["nearest_index"].tolist(),
                    "nearest_file": [tnames[i] for i in r["nearest_index"].tolist()],
                    "nearest_distance": d1.tolist(), "ratio_values": r["ratio"].tolist(),
                    "ratio_flagged": r["ratio_flagged"], "percentile_flagged": r["percentile_flagged"],
                    "threshold": r["threshold"], "flagged": r["flagged"],
                    "min_ratio": float(r["ratio"].min()), "median_ratio": float(r["ratio"].median()),
                    "median_nearest_distance": float(np.median(d1)),
                    "val_median_nearest_distance": (None if r["val_nearest_distance"] is None
                                                    else float(r["val_nearest_distance"].median()))}
                flagged |= set(r["flagged"])
            auth["flagged"] = sorted(flagged)
            auth["flagged_files"] = [snames[i] for i in auth["flagged"]]
    for w in caught:
        msg = str(w.message).replace("f1: ", "real features: ").replace("f2: ", "synthetic features: ")
        if msg not in notes:
            notes.append(msg)
    if auth is None:
        notes.append("no --train folder: the authenticity (nearest-neighbour) check was skipped")
    elif not auth["percentile_rule"]:
        notes.append("no --val folder: the 5th-percentile rule was skipped (ratio test only)")
    dice = None
    if rfile is not None:
        dice = {}
        for s in seg_real:
            if s in rfile:
                p, t = seg_real[s].bool(), rfile[s].bool()
                tot = float(p.sum() + t.sum())
                dice[s] = 1.0 if tot == 0 else 2.0 * float((p & t).sum()) / tot
    return {
        "n": {k: len(s[1]) for k, s in sets.items()}, "feature_dim": int(fr.shape[1]),
        "real_masks": "files" if rfile is not None else "segmenter",
        "hs_fid": {"value": fd["value"], "ci_low": fd["low"], "ci_high": fd["high"], "bias": fd["bias"],
                   "std": fd["std"], "alpha": fd["alpha"], "n_boot": fd["n_boot"]},
        "kid": kid, "spectral_kl": kl,
        "ms_ssim_diversity": {k: v for k, v in div.items() if not k.endswith("_scores")},
        "authenticity": auth, "segmenter_dice_on_real": dice,
        "mask_fraction": {"real": {s: float(real_masks[s].float().mean()) for s in KL},
                          "synthetic": {s: float(syn_masks[s].float().mean()) for s in KL}},
        "spectra": {"real": _spectra(ri, real_masks), "synthetic": _spectra(si, syn_masks)},
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------------- comparison
def _same(new, old, path=""):
    """Bitwise (NaN == NaN as None) except the running sums named in the module docstring."""
    from retina_fast.evaluate import _clean

    old = _clean(old) if path == "" else old
    if isinstance(old, dict):
        assert isinstance(new, dict) and list(new) == list(old), f"{path}: keys {list(new)} vs {list(old)}"
        for k in old:
            _same(new[k], old[k], f"{path}/{k}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), f"{path}: length {len(new)} vs {len(old)}"
        for i, (a, b) in enumerate(zip(new, old)):
            _same(a, b, f"{path}[{i}]")
    elif isinstance(old, float) and ("/spectra/" in path and path.split("/")[-1].startswith(("mean", "std"))):
        assert new == pytest.approx(old, rel=1e-9, abs=1e-15), path
    else:
        assert new == old and type(new) is type(old), f"{path}: {new!r} vs {old!r}"


def _compare(new: dict, ref: dict) -> None:
    st = new["settings"]
    assert st["n"] == ref.pop("n") and st["feature_dim"] == ref.pop("feature_dim")
    assert st["real_masks"] == ref.pop("real_masks")
    assert set(new) - {"settings"} == set(ref), set(new) ^ set(ref)
    _same({k: new[k] for k in ref}, ref)


def test_folders_with_mask_files_equal_the_in_memory_metrics(data, tmp_path):
    kw = dict(pairs=30, seed=3, n_boot=20, batch_size=5)
    new = evaluate_folders(data / "real", data / "synthetic", data / "train", data / "real", tmp_path / "rep",
                           progress=False, **kw)
    ref = _reference(data / "real", data / "synthetic", data / "train", data / "real", **kw)
    assert new["settings"]["real_masks"] == "files" and new["segmenter_dice_on_real"]
    assert all(v["mean"] is not None for v in new["spectral_kl"].values())
    _compare(new, ref)
    written = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert written["hs_fid"] == new["hs_fid"] and written["spectra"] == new["spectra"]
    for f in ("nearest_neighbours.png", "contact_real.png", "contact_synthetic.png", "spectra.png", "ms_ssim.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 0


def test_a_sample_run_and_segmented_real_masks_equal_the_in_memory_metrics(data):
    kw = dict(pairs=25, seed=1, n_boot=20, batch_size=4, max_images=9)  # 9 of 10 run images: a partial shard
    new = evaluate_folders(data / "bare", data / "run", data / "train", data / "synthetic", progress=False,
                           plots=False, **kw)
    ref = _reference(data / "bare", data / "run", data / "train", data / "synthetic", **kw)
    assert new["settings"]["real_masks"] == "segmenter" and new["settings"]["n"]["synthetic"] == 9
    assert new["authenticity"]["flagged_files"] is not None
    _compare(new, ref)


def _pool_features(x):
    return torch.nn.functional.adaptive_avg_pool2d(x, (2, 4)).flatten(1)


def _no_veins(x):
    """Per-image thresholds of the 555-nm band (batch-independent), and an empty vein mask."""
    b = x[:, 6]
    m = b.mean((1, 2), keepdim=True)
    return {"artery": b < 0.8 * m, "vein": torch.zeros_like(b, dtype=torch.bool), "onh": b > 1.5 * m}


def test_an_empty_structure_and_custom_networks_equal_the_in_memory_metrics(data):
    kw = dict(pairs=200, seed=2, n_boot=10, batch_size=3, extractor=_pool_features, segmenter=_no_veins)
    new = evaluate_folders(data / "bare", data / "synthetic", progress=False, plots=False, **kw)
    ref = _reference(data / "bare", data / "synthetic", **kw)
    assert new["spectral_kl"]["vein"]["mean"] is None and new["spectra"]["real"]["vein"] is None
    assert any("'vein' has no pixels" in n for n in new["notes"]) and any("replacement" in n for n in new["notes"])
    _compare(new, ref)


def test_blockwise_nearest_neighbours_equal_nearest_two(data):
    syn, train, run = (open_set(data / k, k) for k in ("synthetic", "train", "run"))
    # 3-image chunks (memory budget 3 MB at 64 px) in groups of 2: several groups and training passes
    got = nearest_two_sets([syn, run], train, memory_budget_mb=3.0, query_budget_mb=1.5)
    for q, res in zip((syn, run), got):
        want = M.nearest_two(q.get(range(q.n)), train.get(range(train.n)), memory_budget_mb=3.0)
        for a, b in zip(res, want):
            assert torch.equal(a, b)
    # a run read in random order across shards (one shard cached) gives the images of the sequential read
    order = [7, 0, 8, 3, 3, 9, 1]
    assert torch.equal(run.get(order), torch.cat([x for _, x in run.iter_batches(4)])[order])


# ---------------------------------------------------------------------------------------------- memory bound
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Peak RSS of an evaluation in a fresh process, 40 vs 400 cubes of 16x64x64 per set (cheap stand-in
    networks; benchmarks/bench_evaluate_memory.py). Stacking both sets costs 0.25 MB per cube: +180 MB."""
    script = ROOT / "benchmarks" / "bench_evaluate_memory.py"
    out = subprocess.run([sys.executable, str(script), "--workdir", str(tmp_path), "--ns", "40", "400", "--size",
                          str(SIZE), "--pairs", "20", "--n-boot", "5", "--out", str(tmp_path / "m.json")],
                         capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    small, large = json.loads((tmp_path / "m.json").read_text())["runs"]
    assert small["n"] == {"real": 40, "synthetic": 40} and large["n"] == {"real": 400, "synthetic": 400}
    stacked = 2 * (400 - 40) * 16 * SIZE * SIZE * 4 / 2 ** 20
    growth = large["peak_rss_mb"] - small["peak_rss_mb"]
    assert growth < 0.15 * stacked, (small, large, stacked)
