"""Evaluation of the shipped default model (``tiny``) with ``retina-fast evaluate``, next to the
real-vs-real baseline, for the README.

    python benchmarks/eval_shipped.py --baseline

Samples ``--n`` images from ``--model`` (default: the shipped default) with
``retina_fast.engine.load(model).sample(n, --steps, seed=--seed, sampler=--sampler, backend=--backend)``
(default DDIM-50, seed 0, backend auto) into a temporary folder and renders (``retina-fast phantom``)
at the model's image size:

* real = ``--n`` held-out eyes from ``--real-seed`` (default 100000: disjoint from the training eyes);
* train = the model's training eyes for the authenticity check: by default read from the
  checkpoint's provenance ("phantom eyes 0..1023 at 128x128" for the shipped LDM; its VQ-GAN saw a
  subset, eyes 0..511). ``retina-fast phantom`` renders eye i exactly as the trainers' phantom data do
  (``phantom.render(i, size)``, default wavelengths, camera noise on); the trainers store it as float16
  in [-1, 1], i.e. within 1.2e-4 reflectance;
* with ``--baseline``: a second held-out set of ``--n`` eyes from ``--baseline-seed`` (default 200000),
  evaluated against the same real set as the samples: the real-vs-real baseline at this N and size.

Evaluates the samples against real (train for authenticity, val = real, which is held out from train)
with ``retina_fast.evaluate.evaluate_folders`` and writes

* ``docs/eval/shipped_tiny/``: the evaluate report (report.md, metrics.json, plots);
* ``docs/eval/shipped_tiny.json``: the metrics, sampling settings and time, the same-N baseline
  (with ``--baseline``), the stored baseline (``docs/eval/baseline_real_vs_real.json``), settings,
  command, wall time;
* ``docs/eval/shipped_tiny.md``: the table, shipped model next to the baselines.

FD is biased upward by O(F/N): the stored baseline (``benchmarks/eval_baseline.py``, 200 vs 200) is only
an approximate reference for another N, which the table says; ``--baseline`` gives the like-for-like one.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from retina_fast.bench import hardware_line, render_phantom_folder

ROOT = Path(__file__).resolve().parent.parent
KL = ("vein", "artery", "onh")






def training_eyes(meta: dict) -> tuple[int, int, int] | None:
    """(first seed, count, size) of the phantom eyes a checkpoint was trained on, from its provenance."""
    m = re.fullmatch(r"phantom eyes (\d+)\.\.(\d+) at (\d+)x(\d+)", str((meta.get("provenance") or {}).get("data")))
    if not m:
        return None
    first, last, size = int(m.group(1)), int(m.group(2)), int(m.group(3))
    return first, last - first + 1, size


def _sample(pipe, args, out: Path) -> dict:
    from retina_fast import backends, io

    runner = pipe.runner(args.backend)
    t0 = time.perf_counter()
    cubes = pipe.sample(args.n, args.steps, seed=args.seed, sampler=args.sampler, backend=args.backend)
    wall = time.perf_counter() - t0
    out.mkdir(parents=True)
    for i, cube in enumerate(cubes):
        io.save_cube(out / f"sample_{i:06d}.npy", cube, pipe.wavelengths,
                     metadata={"source": str(pipe.source), "seed": args.seed, "index": i})
    return {"n": args.n, "steps": args.steps, "sampler": args.sampler, "seed": args.seed,
            "backend": {"requested": args.backend, "resolved": backends.resolve(args.backend).name,
                        "runner": type(runner).__name__, "device": str(runner.device), "dtype": str(runner.dtype)},
            "wall_s": round(wall, 2), "images_per_s": args.n / wall, "note": "one call, no warm-up, includes setup"}


def _pick(m: dict) -> dict:
    """The headline numbers of an evaluate_folders result."""
    out = {"n": m["settings"]["n"], "size": m["settings"]["size"], "hs_fid": m["hs_fid"], "kid": m["kid"],
           "spectral_kl": {s: m["spectral_kl"][s]["mean"] for s in KL},
           "ms_ssim_diversity": m["ms_ssim_diversity"], "mask_fraction": m.get("mask_fraction")}
    a = m.get("authenticity")
    if a:
        out["authenticity"] = {sp: {"ratio_flagged": len(a[sp]["ratio_flagged"]),
                                    "percentile_flagged": len(a[sp]["percentile_flagged"]),
                                    "min_ratio": a[sp]["min_ratio"], "median_ratio": a[sp]["median_ratio"],
                                    "median_nearest_distance": a[sp]["median_nearest_distance"],
                                    "val_median_nearest_distance": a[sp]["val_median_nearest_distance"]}
                               for sp in ("pixel", "feature")}
        out["authenticity"]["n_train"] = a["n_train"]
    return out


def _f(v, spec: str = ".4g") -> str:
    return "n/a" if v is None else format(v, spec)


def _markdown(doc: dict) -> str:
    cols = [(doc["label"], doc["shipped"])]
    same, stored = doc.get("baseline_same_n"), doc.get("baseline_stored")
    if same:
        cols.append((f"real vs real, N = {same['n']['synthetic']}", same))
    if stored:
        cols.append((f"real vs real (stored), N = {stored['n']['synthetic']}", stored))
    sm, smp = doc["shipped"], doc["sampling"]
    n, size = sm["n"]["synthetic"], sm["size"]

    def row(label: str, fn) -> str:
        return f"| {label} | " + " | ".join(fn(c) for _, c in cols) + " |"

    def auth(c, sp):
        a = c.get("authenticity")
        return "n/a" if not a else (f"{a[sp]['ratio_flagged']} / {a[sp]['percentile_flagged']} of "
                                    f"{c['n']['synthetic']} "
                                    f"(min ratio {a[sp]['min_ratio']:.3f})")

    tr = doc["train"]
    lines = [
        "# Shipped default model `tiny`: evaluation", "",
        f"{n} samples of `{doc['model']['path']}` ({smp['sampler'].upper()}-{smp['steps']}, seed {smp['seed']}, "
        f"backend {smp['backend']['requested']} -> `{smp['backend']['resolved']}`) against {sm['n']['real']} held-out "
        f"phantom eyes (seeds {doc['seeds']['real']}..{doc['seeds']['real'] + sm['n']['real'] - 1}) at "
        f"{size[0]}x{size[1]} px with `retina-fast evaluate`; authenticity against the {tr['n']} training eyes "
        f"(seeds {tr['seed']}..{tr['seed'] + tr['n'] - 1}, {tr['source']}), val = the held-out real set. "
        "All metrics: lower is better.", "",
    ]
    caption = []
    if same:
        caption.append(f"*Real vs real, N = {same['n']['synthetic']}*: a second held-out set (seeds "
                       f"{doc['seeds']['baseline']}..) scored against the same real set, same settings: what a perfect "
                       f"generator reaches here.")
    if stored:
        ss = stored["size"]
        differs = stored["n"]["synthetic"] != n or list(ss) != list(size)
        caption.append(f"*Stored*: [baseline_real_vs_real.md](baseline_real_vs_real.md), {stored['n']['real']} vs "
                       f"{stored['n']['synthetic']} eyes at {ss[0]}x{ss[1]} px"
                       + (f" — **a different N{' and size' if list(ss) != list(size) else ''} than this "
                          "evaluation**: "
                          "HS-FID and KID are biased by O(1/N), so read it as an approximate reference only."
                          if differs else ", the same N and size."))
    lines += [" ".join(caption), "",
              "| metric | " + " | ".join(name for name, _ in cols) + " |", "|---" * (len(cols) + 1) + "|",
              row(f"HS-FID ({sm['feature_dim']}-d structure-net features)", lambda c: _f(c["hs_fid"]["value"])),
              row("HS-FID 95 % bootstrap interval",
                  lambda c: f"[{_f(c['hs_fid']['ci_low'], '.3g')}, {_f(c['hs_fid']['ci_high'], '.3g')}]"),
              row("KID", lambda c: f"{_f(c['kid']['mean'], '.3g')} ± {_f(c['kid']['std'], '.2g')}")]
    for s in KL:
        lines.append(row(f"spectral KL {s} (segmented synthetic masks)", lambda c, s=s: _f(c["spectral_kl"][s])))
    lines += [row("\\|Δ MS-SSIM\\|", lambda c: _f(c["ms_ssim_diversity"]["abs_delta"])),
              row("mean pairwise MS-SSIM real / synthetic",
                  lambda c: f"{c['ms_ssim_diversity']['val_mean']:.4f} / {c['ms_ssim_diversity']['syn_mean']:.4f}"),
              row("NN authenticity (pixel): ratio < 1/3 / below val 5th pct", lambda c: auth(c, "pixel")),
              row("NN authenticity (feature): ratio < 1/3 / below val 5th pct", lambda c: auth(c, "feature"))]
    mf = sm.get("mask_fraction") or {}
    if mf:
        lines += ["", "Segmented structure fractions of the samples (real, true masks): " + ", ".join(
            f"{s} {mf['synthetic'][s]:.4f} ({mf['real'][s]:.4f})" for s in KL) + "."]
    lines += ["", "The authenticity percentile rule flags about 5 % of genuinely novel images by construction; the "
              "ratio test (nearest / second-nearest training image < 1/3) flags near-copies.", ""]
    if sm.get("notes"):
        lines += ["Notes from `evaluate`:", ""] + [f"- {x}" for x in sm["notes"]] + [""]
    lines += [f"Sampling: {smp['n']} images in {smp['wall_s']:.1f} s ({smp['images_per_s']:.2f} images/s, one call "
              f"without warm-up). Command: `{doc['command']}` — {doc['wall_s']:.0f} s on {doc['hardware']}, "
              f"{doc['date']}. Full report with plots: [{doc['name']}/report.md]({doc['name']}/report.md).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--seed", type=int, default=0, help="sampling seed and metric seed")
    p.add_argument("--backend", default="auto")
    p.add_argument("--real-seed", type=int, default=100000)
    p.add_argument("--train-seed", type=int, default=None, help="first training eye (default: from provenance, else 0)")
    p.add_argument("--train-n", type=int, default=None, help="training eyes (default: from provenance, else 1024)")
    p.add_argument("--baseline", action="store_true", help="also compute the real-vs-real baseline at this N")
    p.add_argument("--baseline-seed", type=int, default=200000)
    p.add_argument("--stored-baseline", default=str(ROOT / "docs" / "eval" / "baseline_real_vs_real.json"))
    p.add_argument("--pairs", type=int, default=500)
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "eval"))
    p.add_argument("--name", default="shipped_tiny")
    args = p.parse_args(argv)
    from retina_fast import engine
    from retina_fast.bench import machine
    from retina_fast.evaluate import evaluate_folders

    t0 = time.time()
    pipe = engine.load(args.model)
    meta = getattr(pipe.loaded, "meta", None) or {}
    size = pipe.config.vqgan.image_size
    eyes = training_eyes(meta)
    train_seed = args.train_seed if args.train_seed is not None else (eyes[0] if eyes else 0)
    train_n = args.train_n if args.train_n is not None else (eyes[1] if eyes else 1024)
    source = ("from the checkpoint's provenance" if eyes and args.train_seed is None and args.train_n is None
              else "given on the command line" if args.train_seed is not None or args.train_n is not None
              else "assumed: the checkpoint records no phantom training data")
    if eyes and eyes[2] != size:
        print(f"warning: the model was trained at {eyes[2]} px, it samples {size} px", file=sys.stderr)
    held = range(args.real_seed, args.real_seed + args.n)
    if set(held) & set(range(train_seed, train_seed + train_n)):
        raise SystemExit(f"--real-seed {args.real_seed}: the held-out eyes overlap the training eyes "
                         f"{train_seed}..{train_seed + train_n - 1}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="eval_shipped_"))
    report = out_dir / args.name
    try:
        syn = work / "synthetic"
        sampling = _sample(pipe, args, syn)
        print(f"sampled {args.n} images in {sampling['wall_s']:.1f} s ({sampling['backend']['resolved']})", flush=True)
        real = render_phantom_folder(work, "real", args.n, size, args.real_seed)
        train = render_phantom_folder(work, "train", train_n, size, train_seed)
        kw = dict(pairs=args.pairs, seed=args.seed, n_boot=args.n_boot)
        metrics = evaluate_folders(real, syn, train=train, val=real, out=report, **kw)
        baseline = None
        if args.baseline:
            other = render_phantom_folder(work, "baseline", args.n, size, args.baseline_seed)
            baseline = evaluate_folders(real, other, train=train, val=real, out=None, plots=False, **kw)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for f in (report / "report.md", report / "metrics.json"):
        f.write_text(f.read_text().replace(str(work), "$WORK"))
    clean = lambda x: json.loads(json.dumps(x).replace(str(work), "$WORK"))  # noqa: E731
    stored = None
    sp = Path(args.stored_baseline)
    if sp.is_file():
        sdoc = json.loads(sp.read_text())
        stored = {**_pick(sdoc["metrics"]), "source": str(sp.relative_to(ROOT) if sp.resolve().is_relative_to(ROOT)
                                                            else sp), "seeds": sdoc.get("seeds")}
    mpath = Path(pipe.source).resolve()
    prov = meta.get("provenance") or {}
    doc = {
        "name": args.name,
        "label": "shipped `tiny`" if args.model == "default" else f"`{args.model}`",
        "model": {"path": str(mpath.relative_to(ROOT) if mpath.is_relative_to(ROOT) else mpath),
                  "preset": meta.get("preset"), "training_data": prov.get("data"), "steps": prov.get("steps"),
                  "command": prov.get("command"), "vqgan": prov.get("vqgan"), "git_commit": prov.get("git_commit")},
        "sampling": sampling,
        "shipped": {**_pick(metrics), "feature_dim": metrics["settings"]["feature_dim"], "notes": metrics["notes"]},
        "baseline_same_n": clean(_pick(baseline)) if baseline else None,
        "baseline_stored": stored,
        "metrics": clean(metrics),
        "seeds": {"real": args.real_seed, "train": train_seed,
                  "baseline": args.baseline_seed if args.baseline else None},
        "train": {"seed": train_seed, "n": train_n, "source": source},
        "command": " ".join([*([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ
                               else []), "python benchmarks/eval_shipped.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "wall_s": round(time.time() - t0, 1),
        "hardware": hardware_line(),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "numpy": np.__version__,
    }
    (out_dir / f"{args.name}.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    (out_dir / f"{args.name}.md").write_text(_markdown(doc))
    print(f"wrote {out_dir / args.name}.json, .md and {report}/ in {doc['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
