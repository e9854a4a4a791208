"""Real-vs-real baseline for ``retina-fast evaluate``: what the metrics give for two disjoint sets of
phantom eyes, i.e. for a perfect generator at this N and size. Readers compare a model's numbers
against these.

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/eval_baseline.py

Renders (with ``retina-fast phantom``, into a temporary folder) ``--n`` eyes at ``--size`` px each:
real = seeds ``--real-seed`` .., synthetic = seeds ``--synthetic-seed`` .., train = seeds
``--train-seed`` ..; evaluates synthetic against real with ``retina_fast.evaluate.evaluate_folders``
(train for the authenticity check, val = the real folder: it is held out from train), and writes

* ``docs/eval/baseline_real_vs_real/``: the evaluate report (report.md, metrics.json, plots);
* ``docs/eval/baseline_real_vs_real.json``: the metrics plus the extras below, settings, command,
  wall time;
* ``docs/eval/baseline_real_vs_real.md``: the summary table.

Extras: spectral KL with the synthetic set's *true* mask files instead of segmented masks (how much
of the KL is segmenter error), and a sensitivity check: HS-FID / KID / spectral KL (true masks) of
the real set against perturbed copies of the synthetic set (gain x0.9, Gaussian blur sigma 1 px,
additive noise sigma 0.01), so readers see how far the metrics move for visible defects.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from retina_fast.bench import hardware_line, render_phantom_folder

ROOT = Path(__file__).resolve().parent.parent




def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma + 0.5)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (r, r, 0, 0), mode="reflect"), k, groups=x.shape[1])
    y = torch.nn.functional.pad(y, (0, 0, r, r), mode="reflect")
    return torch.nn.functional.conv2d(y, k.transpose(-1, -2), groups=x.shape[1])


def _extras(real_dir: Path, syn_dir: Path, seed: int) -> dict:
    from retina_fast import metrics as M
    from retina_fast.evaluate import KL_STRUCTURES, kid_subset_size, load_set
    from retina_fast.models.structure_net import StructureFeatures, load_structure_net

    real, syn = load_set(real_dir, "real"), load_set(syn_dir, "synthetic")
    ex = StructureFeatures(load_structure_net())
    fr = M.extract_features(real.images, ex)
    g = torch.Generator().manual_seed(seed)
    variants = {
        "unchanged": syn.images,
        "gain x0.9": syn.images * 0.9,
        "blur sigma 1 px": _blur(syn.images, 1.0),
        "noise sigma 0.01": (syn.images + 0.01 * torch.randn(syn.images.shape, generator=g)).clamp(0, 1),
    }
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.MetricWarning)
        for name, x in variants.items():
            fs = M.extract_features(x, ex)
            kl = M.spectral_kl(real.images, real.masks, x, syn.masks, structures=KL_STRUCTURES)
            out[name] = {"hs_fid": M.frechet_distance_from_features(fr, fs),
                         "kid": M.kid(fr, fs, subset_size=kid_subset_size(len(fr), len(fs)), seed=seed)["mean"],
                         "spectral_kl_true_masks": {s: kl[s]["mean"] for s in KL_STRUCTURES}}
    return out




def _markdown(doc: dict) -> str:
    m, st = doc["metrics"], doc["metrics"]["settings"]
    fd, kid, div = m["hs_fid"], m["kid"], m["ms_ssim_diversity"]
    kl, auth = m["spectral_kl"], m["authenticity"]
    sens = doc["sensitivity"]
    lines = [
        "# Real-vs-real baseline of `retina-fast evaluate`", "",
        f"Two disjoint sets of phantom eyes, {st['n']['real']} vs {st['n']['synthetic']} at "
        f"{st['size'][0]}x{st['size'][1]} px (seeds {doc['seeds']['real']}.. vs {doc['seeds']['synthetic']}..; "
        f"train for authenticity: {st['n']['train']} eyes from seed {doc['seeds']['train']}; val = the real set). "
        "This is what a perfect generator scores at this N and size: compare a model's numbers with these, "
        "computed with the same N, size and seed.", "",
        "| metric | real vs real | 95 % interval |", "|---|---|---|",
        f"| HS-FID ({st['feature_dim']}-d structure-net features) | {fd['value']:.4g} | "
        f"[{fd['ci_low']:.4g}, {fd['ci_high']:.4g}] (bootstrap bias {fd['bias']:+.3g}) |",
        f"| KID | {kid['mean']:.3g} | ± {kid['std']:.2g} (std over subsets) |",
    ]
    for s in ("vein", "artery", "onh"):
        lines.append(f"| spectral KL {s} (segmented synthetic masks) | {kl[s]['mean']:.4g} | |")
    for s in ("vein", "artery", "onh"):
        lines.append(f"| spectral KL {s} (true synthetic masks) | "
                     f"{sens['unchanged']['spectral_kl_true_masks'][s]:.4g} | |")
    lines += [
        f"| \\|Δ MS-SSIM\\| ({div['scales']} scales, {div['pairs']} pairs) | {div['abs_delta']:.4g} | "
        f"[{div['ci_low']:.4g}, {div['ci_high']:.4g}] |",
        f"| mean pairwise MS-SSIM real / synthetic | {div['val_mean']:.4f} / {div['syn_mean']:.4f} | |",
    ]
    for space in ("pixel", "feature"):
        a = auth[space]
        lines.append(f"| NN authenticity ({space}): ratio < 1/3 / below val 5th pct | "
                     f"{len(a['ratio_flagged'])} / {len(a['percentile_flagged'])} of {st['n']['synthetic']} | "
                     f"min ratio {a['min_ratio']:.3f} |")
    lines += ["", "The percentile rule flags about 5 % of genuinely novel images by construction.", "",
              "## Sensitivity: synthetic set perturbed", "",
              "| synthetic set | HS-FID | KID | KL vein | KL artery | KL ONH |", "|---|---|---|---|---|---|"]
    for name, v in sens.items():
        k = v["spectral_kl_true_masks"]
        lines.append(f"| {name} | {v['hs_fid']:.4g} | {v['kid']:.3g} | {k['vein']:.4g} | {k['artery']:.4g} | "
                     f"{k['onh']:.4g} |")
    seg = m.get("segmenter_dice_on_real") or {}
    lines += ["", "Spectral KL here uses the true masks of both sets (no segmenter). HS-FID reads structure, "
              "sharpness and noise (blur and noise rows) but hardly a global gain: the structure network "
              "normalises intensity (GroupNorm). Spectral errors such as a wrong gain show in the spectral KL.", "",
              "Structure-net Dice on the real set (segmented vs mask files): "
              + ", ".join(f"{s} {v:.3f}" for s, v in seg.items()) + ".", "",
              f"Command: `{doc['command']}` — {doc['wall_s']:.0f} s on {doc['hardware']}. "
              "Full report with plots: [baseline_real_vs_real/report.md](baseline_real_vs_real/report.md).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--real-seed", type=int, default=0)
    p.add_argument("--synthetic-seed", type=int, default=10000)
    p.add_argument("--train-seed", type=int, default=20000)
    p.add_argument("--pairs", type=int, default=500)
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "eval"))
    p.add_argument("--name", default="baseline_real_vs_real")
    args = p.parse_args(argv)
    from retina_fast.evaluate import evaluate_folders

    t0 = time.time()
    out_dir = Path(args.out_dir)
    work = Path(tempfile.mkdtemp(prefix="eval_baseline_"))
    try:
        real = render_phantom_folder(work, "real", args.n, args.size, args.real_seed)
        syn = render_phantom_folder(work, "synthetic", args.n, args.size, args.synthetic_seed)
        train = render_phantom_folder(work, "train", args.n, args.size, args.train_seed)
        report = out_dir / args.name
        metrics = evaluate_folders(real, syn, train=train, val=real, out=report, pairs=args.pairs,
                                   seed=args.seed, n_boot=args.n_boot)
        sensitivity = _extras(real, syn, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for f in (report / "report.md", report / "metrics.json"):
        f.write_text(f.read_text().replace(str(work), "$WORK"))
    metrics = json.loads(json.dumps(metrics).replace(str(work), "$WORK"))
    doc = {"metrics": metrics, "sensitivity": sensitivity,
           "seeds": {"real": args.real_seed, "synthetic": args.synthetic_seed, "train": args.train_seed},
           "command": " ".join(["OMP_NUM_THREADS=1 nice -n 15 python benchmarks/eval_baseline.py", *sys.argv[1:]]),
           "wall_s": round(time.time() - t0, 1),
           "hardware": hardware_line(),
           "numpy": np.__version__}
    (out_dir / f"{args.name}.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    (out_dir / f"{args.name}.md").write_text(_markdown(doc))
    print(f"wrote {out_dir / args.name}.json, .md and {report}/ in {doc['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
