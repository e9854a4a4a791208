"""Same workloads timed on two checkouts of retina_fast, alternating, to show what a change did to speed.

    python benchmarks/bench_before_after.py --before DIR --after DIR [--rounds 5] [--json FILE]

Each checkout must have its C++ extension built in place (``python setup.py build_ext --inplace``). Every
measurement runs in a fresh interpreter with PYTHONPATH set to one checkout: it loads the model, runs the
workload once to warm up, then times two calls and reports their mean. Rounds alternate which checkout goes
first; the table gives each checkout's median over rounds and the ratio before / after (> 1: the change is
faster). Workloads (same model files for both: the --after checkout's packaged weights):

* ``sample fp32`` / ``sample bf16``: ``retina_fast.sample(8, 50)`` (DDIM) on the ``cpu`` backend, shipped ``tiny``;
* ``enhance``: ``retina_fast.enhance`` of one 512x512 image on the ``cpu`` backend (fp32), shipped MAGE-Net.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS = {
    "sample fp32": "lambda: retina_fast.sample(8, 50, seed=0, model=TINY, backend='cpu', dtype=torch.float32)",
    "sample bf16": "lambda: retina_fast.sample(8, 50, seed=0, model=TINY, backend='cpu', dtype=torch.bfloat16)",
    "enhance": "lambda: enhance(IMG, model=MAGE, backend='cpu')",
}
CHILD = """
import time, torch, retina_fast
from retina_fast.enhance import enhance  # the module path: the attribute failed in older checkouts
TINY, MAGE = {tiny!r}, {mage!r}
IMG = torch.rand(3, 512, 512, generator=torch.Generator().manual_seed(0))
run = {code}
run()
t0 = time.perf_counter(); run(); run(); print((time.perf_counter() - t0) / 2)
"""


def measure(tree: Path, workload: str, weights: Path) -> float:
    code = CHILD.format(tiny=str(weights / "tiny"), mage=str(weights / "magenet-tiny"), code=WORKLOADS[workload])
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: {workload} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of: "
                   + ", ".join(WORKLOADS))
    p.add_argument("--json")
    args = p.parse_args(argv)
    names = [w.strip() for w in args.workloads.split(",")]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    weights = trees["after"] / "retina_fast" / "weights"
    times: dict[str, dict[str, list[float]]] = {w: {"before": [], "after": []} for w in names}
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for w in names:
            for side in order:
                times[w][side].append(measure(trees[side], w, weights))
            print(f"round {r + 1}: {w}: before {times[w]['before'][-1]:.3f} s, after {times[w]['after'][-1]:.3f} s",
                  flush=True)
    rows = []
    print(f"\n{'workload':14s} {'before s':>9s} {'after s':>9s} {'before/after':>13s}")
    for w in names:
        b, a = statistics.median(times[w]["before"]), statistics.median(times[w]["after"])
        rows.append({"workload": w, "before_s": b, "after_s": a, "speedup": b / a, "rounds": times[w]})
        print(f"{w:14s} {b:9.3f} {a:9.3f} {b / a:12.3f}x")
    if args.json:
        def commit(t: Path) -> str:
            return subprocess.run(["git", "-C", str(t), "rev-parse", "HEAD"], capture_output=True,
                                  text=True).stdout.strip()
        from retina_fast.bench import hardware_line

        doc = {"device": hardware_line(), "cpu_count": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d"), "before": commit(trees["before"]), "after": commit(trees["after"]),
               "rows": rows}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
