"""Where a latent diffusion model commits to the vessel tree's layout: sample with one LDM for the noisy steps
and hand over to another (same VQ-GAN and latent scaling, other noise schedule) at a given noise level.

    python scripts/ldm_expert_handoff.py FIRST SECOND [--n 16] [--out DIR]

DDIM-50 from the same initial noise (seed 0): FIRST's timesteps down to each handover timestep t of FIRST's
schedule, then SECOND from its timestep with the nearest alpha-bar (the same noise level: the marginals of
x_t depend only on alpha-bar) down to 0. Rows: FIRST alone, the handovers, SECOND alone; each the median
``retina_fast.metrics.vessel_tree_length`` at 555 nm over the samples and how many have a tree of >= 100 px.
With ``--out`` a 555 nm grid per row is written there (PNG, each image stretched to its 1-99 % range). A
tree that appears only when SECOND runs from high noise is laid out early; one that appears at any handover
is a matter of the last, low-noise steps.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from retina_fast.backends.runners import Runner
from retina_fast.metrics import vessel_tree_length
from retina_fast.modelzoo import load_ldm
from retina_fast.samplers import sample, step_coefficients
from retina_fast.schedules import timesteps_for

HANDOVERS = (82, 183, 285, 387, 489)  # DDIM-50 timesteps of FIRST
BAND = 5  # 555 nm


def _grid(cubes: torch.Tensor, path: Path) -> None:
    from PIL import Image

    tiles = []
    for im in cubes[:, BAND].numpy():
        lo, hi = np.percentile(im, 1), np.percentile(im, 99)
        tiles.append(np.clip((im - lo) / (hi - lo + 1e-9), 0, 1))
    rows = [np.concatenate(tiles[i:i + 8], 1) for i in range(0, len(tiles), 8)]
    if len(rows) > 1 and rows[-1].shape != rows[0].shape:
        rows[-1] = np.pad(rows[-1], ((0, 0), (0, rows[0].shape[1] - rows[-1].shape[1])))
    Image.fromarray((np.concatenate(rows, 0) * 255).astype(np.uint8)).save(path)


def handoff(first: str, second: str, n: int, out: Path | None) -> list[dict]:
    a, b = load_ldm(first), load_ldm(second)
    if a.latent_range != b.latent_range or a.latent_asinh != b.latent_asinh or \
            a.config.latent_shape != b.config.latent_shape:
        raise SystemExit("the two models must share their latent space (VQ-GAN, latent range, asinh)")
    runner = Runner(a, torch.device("cpu"), torch.float32)
    x_T = torch.randn((n, *a.config.latent_shape), generator=torch.Generator().manual_seed(0))
    ts_a = timesteps_for(50, a.schedule.num_timesteps, "linspace", a.schedule)
    ts_b = timesteps_for(50, b.schedule.num_timesteps, "linspace", b.schedule)
    abar_b = np.array([b.schedule.alpha_bar(t) for t in range(b.schedule.num_timesteps)])
    clip = a.clip_x0
    rows = []
    plans = [("first only", None)] + [(f"handover t={t}", t) for t in HANDOVERS] + [("second only", -1)]
    with torch.no_grad():
        for label, at in plans:
            if at is None:
                z = sample(lambda v, t: a.unet(v, t), x_T.clone(), step_coefficients("ddim", a.schedule, ts_a),
                           clip_x0=clip)
            elif at < 0:
                z = sample(lambda v, t: b.unet(v, t), x_T.clone(), step_coefficients("ddim", b.schedule, ts_b),
                           clip_x0=clip)
            else:  # FIRST down to exactly alpha-bar(at), then SECOND from the timestep nearest that noise level
                head = step_coefficients("ddim", a.schedule, [t for t in ts_a if t > at] + [at])[:-1]
                z = sample(lambda v, t: a.unet(v, t), x_T.clone(), head, clip_x0=clip)
                t2 = int(np.argmin(np.abs(abar_b - a.schedule.alpha_bar(at))))
                z = sample(lambda v, t: b.unet(v, t), z,
                           step_coefficients("ddim", b.schedule, [t2] + [t for t in ts_b if t < t2]), clip_x0=clip)
            cubes = runner.decode(z)
            tree = vessel_tree_length(cubes, BAND)
            rows.append({"row": label, "median": float(tree.median()), "trees_100px": int((tree >= 100).sum()),
                         "n": n})
            if out is not None:
                _grid(cubes, out / f"{label.replace(' ', '_').replace('=', '')}.png")
            print(f"{label:18s} median tree {rows[-1]['median']:6.0f}   >= 100 px: {rows[-1]['trees_100px']}/{n}",
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first", help="LDM for the noisy steps (a packaged name or a checkpoint directory)")
    p.add_argument("second", help="LDM after the handover")
    p.add_argument("--n", type=int, default=16, help="samples (default 16)")
    p.add_argument("--out", type=Path, help="folder for the 555 nm grids and rows.json")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    rows = handoff(args.first, args.second, args.n, args.out)
    if args.out is not None:
        (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
