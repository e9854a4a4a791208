"""How far the fp32 backends are from the reference sampler on a model: relative L2 of the latents and the
cubes, per run and per image, and how many images a flipped codebook choice moves past 1e-4.

    python benchmarks/drop_in_error.py --n 8 64 --out benchmarks/results/drop-in-error-tiny.json

Each n draws images 0..n-1 (DDIM, --steps, --seed) with ``retina_fast.training.reference_sample`` and with
each backend in float32. The drop-in contract (README, "Sampling"): latents within 1e-4; cubes too unless a
latent lies next to a codebook Voronoi boundary and the decoder picks the neighbouring code (one such image
has a cube error of ~1e-3; ``images_over_1e-4`` counts them).
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def measure(model: str, ns: list[int], steps: int, seed: int, backends: list[str]) -> dict:
    import retina_fast
    from retina_fast.training.reference import reference_sample

    pipe = retina_fast.load(model)
    rows = {}
    for n in ns:
        ref, ref_lat = reference_sample(n, steps, seed=seed, model=pipe.loaded, return_latents=True, batch_size=16)
        for backend in backends:
            cubes, lat = pipe.sample(n, steps, seed=seed, backend=backend, dtype=torch.float32, return_latents=True)
            per_image = [_rel(cubes[i], ref[i]) for i in range(n)]
            worst = max(range(n), key=per_image.__getitem__)
            rows[f"{backend} n={n}"] = {
                "backend": backend, "n": n, "latent_rel_l2": _rel(lat, ref_lat), "cube_rel_l2": _rel(cubes, ref),
                "worst_image": worst, "worst_image_cube_rel_l2": per_image[worst],
                "worst_image_latent_rel_l2": _rel(lat[worst], ref_lat[worst]),
                "images_over_1e-4": sum(p > 1e-4 for p in per_image)}
            print(json.dumps(rows[f"{backend} n={n}"]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="packaged model name or checkpoint directory")
    p.add_argument("--n", type=int, nargs="+", default=[8, 64], help="image counts (default 8 64)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", nargs="+", default=["cpu", "onnxruntime"], help="fp32 backends to compare")
    p.add_argument("--out", help="write the rows as JSON here (with machine, commit and date)")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.n) or args.steps < 1:
        p.error("--n and --steps must be positive")
    from retina_fast.bench import machine

    rows = measure(args.model, args.n, args.steps, args.seed, args.backends)
    if args.out:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip() or None
        except OSError:
            commit = None
        doc = {"what": "fp32 backends vs reference_sample, DDIM", "model": args.model, "steps": args.steps,
               "seed": args.seed, "machine": machine(), "commit": commit,
               "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
