"""Phantom eyes without the choroidal vessel pattern, as a folder of cubes (a control for the LDM study).

    python scripts/render_choroid_free.py OUT N [--start S] [--size 128]

Renders eyes S..S+N-1 exactly as ``retina_fast.phantom.render`` does, except that the large choroidal
vessels' contrast against the stroma is 0 (the tigroid pattern that dominates the near-infrared bands is
gone; RPE mottling, pigment, retinal vessels, disc and macula stay). Writes ``OUT/eye_<seed>.npy`` (16, H, W)
float32 reflectance, readable by ``retina-fast train ldm --data OUT``. The question it serves: does a latent
diffusion model learn the retinal vessel tree once the texture that carries most of the latents' fine detail
is absent (docs/recipe_study/README.md, "Which part of the latents the vessels are")?
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from retina_fast import phantom


def render_without_choroid(seed: int, size: int):
    original = phantom._eye_parameters

    def no_choroid(rng):
        p = original(rng)
        p["choroid_contrast"] = 0.0  # drawn all the same, so every later random draw is unchanged
        return p

    phantom._eye_parameters = no_choroid
    try:
        return phantom.render(seed, size)
    finally:
        phantom._eye_parameters = original


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("n", type=int)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    a = p.parse_args(argv)
    if a.n < 1 or a.start < 0:
        p.error("N must be >= 1 and --start >= 0")
    a.out.mkdir(parents=True, exist_ok=True)
    for seed in range(a.start, a.start + a.n):
        np.save(a.out / f"eye_{seed:06d}.npy", render_without_choroid(seed, a.size).cube.numpy())
    print(f"{a.n} choroid-free eyes ({a.size} px) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
