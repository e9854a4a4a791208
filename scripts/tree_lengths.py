"""Retinal vessel tree length of LDM samples, many draws, paired between models (issue: samples without vessels).

    python scripts/tree_lengths.py [--n 256] [--seed 0] [--steps 50] [--phantom 64] [--noise-floor] [--pair-folders]
        [--json FILE] NAME=MODEL ...

MODEL is anything ``retina_fast.load`` takes (``default``, a checkpoint directory), or ``cubes:DIR``: a folder of
cube files drawn elsewhere (its first n in name order; e.g. ``latent_vessel_painter.py sample --save-cubes``).
Each model samples images 0 .. n-1 of ``--seed`` (DDIM, ``--steps``; in batches of 64 with ``first_index``, so
every model draws from the same initial noise) and ``retina_fast.metrics.vessel_tree_length`` measures each
sample at 555 nm. Printed per model: mean, median, the 75 / 90 / 99 % points, how many samples have no tree, the
median arcade length (``retina_fast.metrics.vessel_arcade_length``: the part of the tree whose curves reach the
optic disc; the phantom's is ~90 % of its tree, but a dense dark crackle reaches the disc too) and branch length
(``vessel_branch_length``: the part in unbranched runs of >= 15 px, which a crackle lacks), the median pixel
noise relative to the background (``retina_fast.metrics.relative_noise``, the image the tree is
traced in), and the paired difference of the mean against the first model with a 95 % bootstrap interval (2000
resamples of the draws): model rows against the first model row, cube-folder rows against the first folder row
only with ``--pair-folders`` (their files are the same draws, e.g. painted and unpainted). ``--phantom K`` adds K
held-out phantom eyes (seeds 100000..) as the target row. ``--noise-floor`` (with ``--phantom``) adds, per row,
the median tree of those K eyes rendered *without* vessels, with multiplicative noise raising their relative
noise to that row's median: the tree that noise alone traces at that level. With ``--phantom``, the ``noisy``
column counts the draws noisier than the noisiest phantom eye: failed draws (textured fields) whose long
"trees" are noise, which the mean and the upper percentiles then carry.

Per draw the length swings from 0 to well over 100 for the models of 2026-12, so compare models over hundreds
of draws, never over a handful (16-draw medians moved by 2x between draw sets).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

BAND_555 = 5
BATCH = 64


def _measure(batches) -> tuple[np.ndarray, np.ndarray, dict]:
    """Tree length, relative noise and {"arcade", "branch"} lengths at 555 nm of each cube in an iterable of
    (N, bands, H, W) batches."""
    from retina_fast.metrics import relative_noise, vessel_arcade_length, vessel_branch_length, vessel_tree_length

    trees, noise, arcades, branches = [], [], [], []
    for x in batches:
        x = torch.as_tensor(x)
        trees.append(vessel_tree_length(x, BAND_555).numpy())
        noise.append(relative_noise(x, BAND_555).numpy())
        arcades.append(vessel_arcade_length(x, BAND_555).numpy())
        branches.append(vessel_branch_length(x, BAND_555).numpy())
    return np.concatenate(trees), np.concatenate(noise), {"arcade": np.concatenate(arcades),
                                                        "branch": np.concatenate(branches)}


def _folder(path: Path, n: int):
    """The first n cubes of a folder (``retina_fast.io.iter_cubes``: cube files by name, or a sample run), in
    batches of ``BATCH``; FileNotFoundError when it holds fewer."""
    from itertools import islice

    from retina_fast import io

    cubes = [torch.from_numpy(c.data) for c in islice(io.iter_cubes(path), n)]
    if len(cubes) < n:
        raise FileNotFoundError(f"{path}: {len(cubes)} cube files, --n asks for {n}")
    for first in range(0, n, BATCH):
        yield torch.stack(cubes[first:first + BATCH])


def tree_lengths(model: str, n: int, seed: int, steps: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(tree lengths, relative noise, {"arcade", "branch"} lengths) of draws 0 .. n-1 of ``model`` (or the first n
    cubes of ``cubes:DIR``)."""
    if model.startswith("cubes:"):
        return _measure(_folder(Path(model[len("cubes:"):]), n))
    import retina_fast

    pipe = retina_fast.load(model)
    return _measure(pipe.sample(min(BATCH, n - first), steps, seed=seed, first_index=first)
                    for first in range(0, n, BATCH))


def phantom_cubes(k: int, size: int, vessels: bool = True) -> torch.Tensor:
    from retina_fast import phantom

    return torch.stack([torch.as_tensor(np.asarray(phantom.render(100000 + i, size, vessels=vessels).cube))
                        for i in range(k)])


def noise_floor(bare: torch.Tensor, level: float, seed: int) -> float:
    """Median tree of the vessel-free eyes ``bare`` with multiplicative Gaussian noise added in quadrature up to a
    median relative noise of ``level`` (none added when they are already that noisy)."""
    from retina_fast.metrics import relative_noise, vessel_tree_length

    extra = max(level ** 2 - float(relative_noise(bare, BAND_555).median()) ** 2, 0.0) ** 0.5
    g = torch.Generator().manual_seed(seed)
    return float(vessel_tree_length(bare * (1 + extra * torch.randn(bare.shape, generator=g)), BAND_555).median())


def summary(t: np.ndarray) -> dict:
    p75, p90, p99 = np.percentile(t, [75, 90, 99])
    return {"n": int(t.size), "mean": float(t.mean()), "median": float(np.median(t)), "p75": float(p75),
            "p90": float(p90), "p99": float(p99), "no_tree": int((t == 0).sum())}


def structure(parts: dict) -> dict:
    """Median, mean and values of each of ``_measure``'s structure lengths."""
    out = {}
    for name, a in parts.items():
        out.update({f"{name}_median": float(np.median(a)), f"{name}_mean": float(a.mean()),
                    f"{name}_lengths": a.tolist()})
    return out


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
    p.add_argument("--noise-floor", action="store_true", help="with --phantom: the tree noise alone traces, per row")
    p.add_argument("--pair-folders", action="store_true", help="the cubes:DIR rows hold the same draws, in order")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.n < 2 or args.steps < 1 or args.phantom < 0 or (args.noise_floor and not args.phantom):
        print("tree_lengths.py: --n must be >= 2, --steps >= 1, --phantom >= 0 (and >= 1 with --noise-floor)",
              file=sys.stderr)
        return 2
    pairs = [m.split("=", 1) for m in args.models]
    if any(len(x) != 2 or not all(x) for x in pairs):
        print("tree_lengths.py: models are NAME=MODEL", file=sys.stderr)
        return 2
    rows, first, bare = {}, {}, None
    folders = [Path(m[len("cubes:"):]) for _, m in pairs if m.startswith("cubes:")]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        print(f"tree_lengths.py: cubes:{missing[0]}: not a folder", file=sys.stderr)
        return 2
    if args.phantom:
        import retina_fast

        models = [m for _, m in pairs if not m.startswith("cubes:")]
        size = (retina_fast.load(models[0]).config.vqgan.image_size if models  # else the first folder's size
                else next(_folder(folders[0], 1)).shape[-1])
        t, z, arc = _measure([phantom_cubes(args.phantom, size)])
        rows["phantom"] = {**summary(t), **structure(arc), "noise": float(np.median(z)), "noise_values": z.tolist()}
        bare = phantom_cubes(args.phantom, size, vessels=False) if args.noise_floor else None
    top = max(rows["phantom"]["noise_values"]) if "phantom" in rows else None

    def noise_columns(r: dict) -> dict:
        """The row with its noise floor and its count of draws noisier than every phantom eye (None without)."""
        r["noise_floor"] = None if bare is None else noise_floor(bare, r["noise"], args.seed)
        r["noisy"] = None if top is None else int((np.asarray(r["noise_values"]) > top).sum())
        return r

    print(f"{'model':<16} {'mean':>6} {'median':>6} {'75/90/99 %':>16} {'no tree':>8} {'arcade':>6} {'branch':>6} "
          f"{'noise':>6}"
          f"{' noisy' if top is not None else ''}{' floor' if bare is not None else ''}  paired mean difference")

    def line(name: str, r: dict) -> str:
        return (f"{name:<16} {r['mean']:6.1f} {r['median']:6.1f} {r['p75']:5.0f}/{r['p90']:4.0f}/{r['p99']:4.0f} "
                f"{r['no_tree']:5d}/{r['n']} {r['arcade_median']:6.1f} {r['branch_median']:6.1f} {r['noise']:6.3f}"
                + ("" if top is None else f" {r['noisy']:5d}")
                + ("" if r["noise_floor"] is None else f" {r['noise_floor']:5.0f}"))

    if "phantom" in rows:
        print(line("phantom", noise_columns(rows["phantom"])))
    for name, model in pairs:
        try:
            t, z, arc = tree_lengths(model, args.n, args.seed, args.steps)
        except FileNotFoundError as exc:
            print(f"tree_lengths.py: {exc}", file=sys.stderr)
            return 2
        r = rows[name] = noise_columns({**summary(t), **structure(arc), "noise": float(np.median(z)), "model": model,
                                        "lengths": t.tolist(), "noise_values": z.tolist()})
        text = line(name, r)
        kind = "folder" if model.startswith("cubes:") else "model"
        if kind not in first:
            first[kind] = (name, t)
        elif kind == "model" or args.pair_folders:
            d = r["paired"] = {**paired(t, first[kind][1]), "against": first[kind][0]}
            text += f"  {d['mean']:+.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}] vs {d['against']}"
        print(text, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "seed": args.seed, "steps": args.steps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
