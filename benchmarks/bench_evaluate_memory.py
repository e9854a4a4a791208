"""Peak memory of ``retina_fast.evaluate.evaluate_folders`` against the number of cubes (it streams).

    nice -n 19 python benchmarks/bench_evaluate_memory.py                   # N = 500, 2000, 10000 at 128 px
    python benchmarks/bench_evaluate_memory.py --ns 40 400 --size 64 --out /tmp/m.json    # the test's scale

Builds once, under ``--workdir`` (default /tmp/eval10k), a real and a synthetic folder of max(N) valid
16 x SIZE x SIZE float32 reflectance cubes (``.npy``; the real ones with ``<stem>_masks.npz``): 8 phantom eyes
per folder (``retina_fast.phantom``, different seeds for the two folders), each file one of them rolled by a
few pixels, scaled by a gain near 1 and given one of 5 noise fields (sigma 0.004), clipped to [0, 1]. 10 000
cubes at 128 px take 10.5 GB per folder. Then, for each N, a fresh Python process runs ``evaluate_folders(real,
synthetic, max_images=N)`` (no --train, small ``--pairs`` / ``--n-boot``, no report) and records its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), the RSS before the evaluation and the wall time. Holding one
set in memory, as before, would take N x 1 MiB at 128 px.

The feature extractor and segmenter are cheap stand-ins by default (band means over a 2 x 4 grid: 128 features;
masks from per-image quantiles of the 555-nm band), since the shipped structure network took ~0.6 s (features) +
~1.8 s (masks) per 128-px cube on this 2-core CPU while another job used it, i.e. hours for 2 x 10 000 cubes;
it too is called one batch at a time (``--shipped-net`` uses it). ``--compare-old N ...`` also runs the in-memory
implementation this replaced (``git show <--old-rev>:retina_fast/evaluate.py``, loaded as a separate module) at
those N, for comparison. Each run records the peak RSS after each stage (``peak_rss_mb_after_stage``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASES, NOISES, SIGMA = 8, 5, 0.004
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cpu-2core-amd-epyc-evaluate-memory.json"


# ------------------------------------------------------------------------------------------------- the cubes
def _folder(workdir: Path, size: int, role: str) -> Path:
    return workdir / f"cubes-{size}" / role


def prepare(workdir: Path, size: int, n: int) -> dict:
    """Make sure both folders hold cubes 0..n-1 (files already there are kept); returns the paths."""
    from retina_fast.phantom import render

    paths = {}
    for role, seed0 in (("real", 0), ("synthetic", 5000)):
        out = _folder(workdir, size, role)
        out.mkdir(parents=True, exist_ok=True)
        paths[role] = out
        todo = [i for i in range(n) if not (out / f"cube_{i:06d}.npy").is_file()]
        if not todo:
            continue
        eyes = [render(seed0 + k, size) for k in range(BASES)]
        rng = np.random.default_rng(seed0)
        noise = [rng.normal(0.0, SIGMA, (16, size, size)).astype(np.float32) for _ in range(NOISES)]
        for i in todo:
            eye = eyes[i % BASES]
            dy, dx = (i // BASES) % 7 - 3, (i // (7 * BASES)) % 7 - 3
            gain = np.float32(1.0 + 0.03 * np.sin(0.7 * i))
            cube = np.roll(eye.cube.numpy(), (dy, dx), axis=(1, 2)) * gain + noise[i % NOISES]
            np.clip(cube, 0.0, 1.0, out=cube)
            if role == "real":
                np.savez(out / f"cube_{i:06d}_masks.npz",
                         **{k: np.roll(m.numpy(), (dy, dx), axis=(0, 1)) for k, m in eye.masks.items()})
            tmp = out / f"cube_{i:06d}.tmp.npy"
            np.save(tmp, cube.astype(np.float32))
            os.replace(tmp, out / f"cube_{i:06d}.npy")  # a killed build leaves no half-written cube
    return paths


# ------------------------------------------------------------------------------------------ stand-in networks
class PoolFeatures:
    """(B, 16, H, W) -> (B, 128): the mean of every band over a 2 x 4 grid of tiles."""

    def __call__(self, x):
        import torch.nn.functional as F

        return F.adaptive_avg_pool2d(x.float(), (2, 4)).flatten(1)


class ThresholdSegmenter:
    """Masks from per-image quantiles of the 555-nm band (index 6): the darkest 5 % "vein", the next 5 %
    "artery", the brightest 3 % "onh", a middle slice "fovea"."""

    def __call__(self, x):
        import torch

        b = x[:, 6].float().flatten(1)
        b = b + 1e-6 * torch.linspace(0.0, 1.0, b.shape[1])  # break ties (the dark corners are all 0)
        q = torch.quantile(b, torch.tensor([0.05, 0.10, 0.45, 0.47, 0.97]), dim=1).T[:, :, None]
        shape = x.shape[:1] + x.shape[2:]
        masks = {"vein": b < q[:, 0], "artery": (b >= q[:, 0]) & (b < q[:, 1]), "onh": b > q[:, 4],
                 "fovea": (b > q[:, 2]) & (b < q[:, 3])}
        return {k: m.reshape(shape) for k, m in masks.items()}


# ---------------------------------------------------------------------------------------------------- a run
def child(args) -> dict:
    """One evaluation in this (fresh) process; peak RSS from getrusage."""
    import torch

    paths = {r: _folder(args.workdir, args.size, r) for r in ("real", "synthetic")}
    if args.old:
        import importlib.util

        src = subprocess.run(["git", "show", f"{args.old}:retina_fast/evaluate.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        spec = importlib.util.spec_from_loader("retina_fast._evaluate_old", loader=None)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        exec(compile(src, f"{args.old}:retina_fast/evaluate.py", "exec"), mod.__dict__)
        evaluate_folders = mod.evaluate_folders
    else:
        from retina_fast.evaluate import evaluate_folders
    stages = _watch_stages(sys.modules[evaluate_folders.__module__])
    kw = {}
    if not args.shipped_net:
        kw = {"extractor": PoolFeatures(), "segmenter": ThresholdSegmenter()}
    else:
        from retina_fast.models.structure_net import load_structure_net  # noqa: F401  (imported before rss0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.time()
    res = evaluate_folders(paths["real"], paths["synthetic"], max_images=args.n, pairs=args.pairs,
                           n_boot=args.n_boot, batch_size=args.batch_size, progress=False, plots=False, **kw)
    wall = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n": res["settings"]["n"], "implementation": f"in-memory ({args.old})" if args.old else "streamed",
            "peak_rss_mb": round(peak, 1), "rss_before_evaluation_mb": round(rss0, 1), "wall_s": round(wall, 1),
            "one_set_stacked_mb": round(args.n * 16 * args.size ** 2 * 4 / 2 ** 20, 1),
            "hs_fid": res["hs_fid"]["value"], "spectral_kl": {k: v["mean"] for k, v in res["spectral_kl"].items()},
            "abs_delta_ms_ssim": res["ms_ssim_diversity"]["abs_delta"], "torch_threads": torch.get_num_threads(),
            "peak_rss_mb_after_stage": stages}


def _watch_stages(mod) -> dict:
    """Record the peak RSS (MB) after each stage function of the evaluate module, in call order (the
    streamed module's names; the in-memory one has fewer)."""
    peaks: dict = {}
    names = ("load_set", "open_set", "_scan", "_features", "_second_pass", "_diversity", "_authenticity")
    targets = [(mod, n) for n in names if hasattr(mod, n)]
    targets += [(mod.M, n) for n in ("bootstrap_ci", "kid", "spectral_kl", "ms_ssim_diversity")]
    for owner, name in targets:
        fn = getattr(owner, name)

        def wrapped(*a, __fn=fn, __name=name, **k):
            out = __fn(*a, **k)
            key = f"{__name}#{sum(1 for n in peaks if n.split('#')[0] == __name) + 1}"
            peaks[key] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            return out
        setattr(owner, name, wrapped)
    return peaks


def _run_child(args, n: int, old: str | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--workdir", str(args.workdir), "--n", str(n),
           "--size", str(args.size), "--pairs", str(args.pairs), "--n-boot", str(args.n_boot),
           "--batch-size", str(args.batch_size)] + (["--shipped-net"] if args.shipped_net else []) + \
          (["--old", old] if old else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"N={n}: child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tree_state() -> str:
    files = ["retina_fast/evaluate.py", "retina_fast/evaluate_sets.py", "retina_fast/evaluate_plots.py",
             "benchmarks/bench_evaluate_memory.py"]
    changed = subprocess.run(["git", "status", "--porcelain", "--", *files], cwd=ROOT, capture_output=True,
                             text=True).stdout.split("\n")
    changed = [ln[3:] for ln in changed if ln.strip()]
    return (f"uncommitted changes to {', '.join(changed)}" if changed
            else f"{', '.join(files)} as in git_commit")


def _machine() -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((int(ln.split()[1]) // 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), None)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mb": mem, "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "platform": platform.platform()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/eval10k"), help="cube cache (default /tmp/eval10k)")
    p.add_argument("--ns", type=int, nargs="+", default=[500, 2000, 10000], help="cubes per set")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--pairs", type=int, default=50)
    p.add_argument("--n-boot", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shipped-net", action="store_true", help="the shipped structure network (slow on CPU)")
    p.add_argument("--old", metavar="REV", help="(child) run the in-memory evaluate.py of git revision REV")
    p.add_argument("--compare-old", type=int, nargs="*", default=[], metavar="N",
                   help="also run the in-memory implementation (--old-rev) at these N")
    p.add_argument("--old-rev", default="f44e2a1", help="revision holding the in-memory evaluate.py")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.workdir = a.workdir.resolve()
    if a.child:
        print(json.dumps(child(a)))
        return 0
    t0 = time.time()
    prepare(a.workdir, a.size, max(a.ns + a.compare_old))
    build_s = round(time.time() - t0, 1)
    print(f"cubes ready under {a.workdir} ({build_s} s)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    doc = {"benchmark": "peak RSS of retina_fast.evaluate.evaluate_folders vs cubes per set",
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "git_commit": commit, "working_tree": _tree_state(),
           "machine": _machine(), "niceness": os.nice(0),
           "command": "python " + " ".join([str(Path(__file__).relative_to(ROOT))] + (argv or sys.argv[1:])),
           "settings": {"size": a.size, "bands": 16, "pairs": a.pairs, "n_boot": a.n_boot, "batch_size": a.batch_size,
                        "train": None, "plots": False,
                        "networks": "shipped structure network" if a.shipped_net else
                        "stand-ins (PoolFeatures, ThresholdSegmenter; see the script)",
                        "data": f"{BASES} phantom eyes per folder, rolled / gain / noise variants, real with masks"},
           "build_cubes_s": build_s, "runs": []}
    for n, old in [(n, None) for n in a.ns] + [(n, a.old_rev) for n in a.compare_old]:
        r = _run_child(a, n, old)
        doc["runs"].append(r)
        print(json.dumps(r), flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
    streamed = [r for r in doc["runs"] if r["implementation"] == "streamed"]
    if len(streamed) > 1:
        lo, hi = streamed[0], streamed[-1]
        doc["peak_rss_ratio_largest_vs_smallest_n"] = round(hi["peak_rss_mb"] / lo["peak_rss_mb"], 3)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
