"""Retinal vessel tree length of LDM samples, many draws, paired between models (issue: samples without vessels).

    python scripts/tree_lengths.py [--n 256] [--seed 0] [--steps 50] [--phantom 64] [--json FILE] NAME=MODEL ...

MODEL is anything ``retina_fast.load`` takes (``default``, a checkpoint directory). Each model samples images
0 .. n-1 of ``--seed`` (DDIM, ``--steps``; in batches of 64 with ``first_index``, so every model draws from the
same initial noise) and ``retina_fast.metrics.vessel_tree_length`` measures each sample at 555 nm. Printed per
model: mean, median, the 75 / 90 / 99 % points, how many samples have no tree, and the paired difference of the
mean against the first model with a 95 % bootstrap interval (2000 resamples of the draws). ``--phantom K`` adds
K held-out phantom eyes (seeds 100000..) as the target row.

Per draw the length swings from 0 to well over 100 for the models of 2026-12, so compare models over hundreds
of draws, never over a handful (16-draw medians moved by 2x between draw sets).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

BAND_555 = 5
BATCH = 64


def tree_lengths(model: str, n: int, seed: int, steps: int) -> np.ndarray:
    import retina_fast
    from retina_fast.metrics import vessel_tree_length

    pipe = retina_fast.load(model)
    out = []
    for first in range(0, n, BATCH):
        x = pipe.sample(min(BATCH, n - first), steps, seed=seed, first_index=first)
        out.append(vessel_tree_length(torch.as_tensor(x), BAND_555).numpy())
    return np.concatenate(out)


def phantom_lengths(k: int, size: int) -> np.ndarray:
    from retina_fast import phantom
    from retina_fast.metrics import vessel_tree_length

    cubes = torch.stack([torch.as_tensor(np.asarray(phantom.render(100000 + i, size).cube)) for i in range(k)])
    return vessel_tree_length(cubes, BAND_555).numpy()


def summary(t: np.ndarray) -> dict:
    p75, p90, p99 = np.percentile(t, [75, 90, 99])
    return {"n": int(t.size), "mean": float(t.mean()), "median": float(np.median(t)), "p75": float(p75),
            "p90": float(p90), "p99": float(p99), "no_tree": int((t == 0).sum())}


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0, resamples: int = 2000) -> dict:
    """Mean of a - b over the same draws, with a 95 % percentile-bootstrap interval."""
    d = a - b
    rng = np.random.default_rng(seed)
    boot = [d[rng.integers(0, d.size, d.size)].mean() for _ in range(resamples)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"mean": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", metavar="NAME=MODEL")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--phantom", type=int, default=0, metavar="K")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.n < 2 or args.steps < 1 or args.phantom < 0:
        print("tree_lengths.py: --n must be >= 2, --steps >= 1, --phantom >= 0", file=sys.stderr)
        return 2
    pairs = [m.split("=", 1) for m in args.models]
    if any(len(x) != 2 or not all(x) for x in pairs):
        print("tree_lengths.py: models are NAME=MODEL", file=sys.stderr)
        return 2
    rows, first = {}, None
    if args.phantom:
        import retina_fast

        size = retina_fast.load(pairs[0][1]).config.vqgan.image_size
        rows["phantom"] = summary(phantom_lengths(args.phantom, size))
    print(f"{'model':<16} {'mean':>6} {'median':>6} {'75/90/99 %':>16} {'no tree':>8}  paired vs {pairs[0][0]}")
    if "phantom" in rows:
        r = rows["phantom"]
        print(f"{'phantom':<16} {r['mean']:6.1f} {r['median']:6.1f} {r['p75']:5.0f}/{r['p90']:4.0f}/{r['p99']:4.0f} "
              f"{r['no_tree']:5d}/{r['n']}")
    for name, model in pairs:
        t = tree_lengths(model, args.n, args.seed, args.steps)
        r = rows[name] = {**summary(t), "model": model, "lengths": t.tolist()}
        line = (f"{name:<16} {r['mean']:6.1f} {r['median']:6.1f} {r['p75']:5.0f}/{r['p90']:4.0f}/{r['p99']:4.0f} "
                f"{r['no_tree']:5d}/{r['n']}")
        if first is None:
            first = t
        else:
            d = r["paired"] = paired(t, first)
            line += f"  {d['mean']:+.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "seed": args.seed, "steps": args.steps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
