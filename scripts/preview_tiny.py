"""docs/tiny_samples.png: samples of the shipped default model next to phantom eyes it never saw.

    python scripts/preview_tiny.py [--n 6] [--out docs/tiny_samples.png]

Rows: ``reference_sample(n, steps=50, seed=0)`` (the same images ``retina_fast.sample`` gives), then two
held-out phantom eyes (seeds 100000, 100001; training used eyes 0..1023) rendered at the model's size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--out", type=Path, default=Path("docs/tiny_samples.png"))
    a = p.parse_args(argv)
    from retina_fast import phantom
    from retina_fast.modelzoo import load_ldm
    from retina_fast.preview import contact_sheet
    from retina_fast.training import reference_sample

    ldm = load_ldm("default")
    cubes = reference_sample(a.n, steps=50, seed=0, model=ldm)
    size = ldm.config.vqgan.image_size
    eyes = [torch.as_tensor(phantom.render(s, size, wavelengths=ldm.wavelengths).cube) for s in (100000, 100001)]
    batch = torch.cat([cubes, torch.stack(eyes).float()])
    titles = [f"sample {i} (seed 0)" for i in range(a.n)] + ["phantom eye 100000", "phantom eye 100001"]
    contact_sheet(batch, ldm.wavelengths, path=a.out, titles=titles)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
