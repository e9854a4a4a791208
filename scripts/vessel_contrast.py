"""How much retinal-vessel contrast a VQ-GAN keeps: the evidence behind issue #4 (vessels missing).

    python scripts/vessel_contrast.py [--continuous] NAME=RUN_DIR [NAME=RUN_DIR ...]

RUN_DIR is a ``retina-fast train vqgan`` run (or its ``final/``). For 48 held-out phantom eyes
(seeds 5000..5047, 128 px; training uses 0..1023) it reconstructs each cube (encode -> quantise ->
decode) and prints the mean L1 error (all bands, and the 8 visible bands 465-600 nm) and the local vessel
contrast at 465/555/570/600/730 nm: (mean of a 3-px ring around the retinal vessels - mean on the
vessels) / ring mean, away from the optic disc (its mask dilated by 12 px) and inside the field of view.
The first row is the phantom itself. ``--continuous`` adds, per run, a row "NAME~" decoding the encoder's
output without quantising it: the gap between the two rows is what the codebook loses, the rest is lost by
the encoder/decoder themselves.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from retina_fast.models.vqgan import model_to_reflectance, reflectance_to_model
from retina_fast.phantom import render
from retina_fast.training.train_ldm import load_vqgan

BANDS = {465: 0, 555: 5, 570: 6, 600: 8, 730: 12}


def dilate(mask: torch.Tensor, r: int) -> torch.Tensor:
    return F.max_pool2d(mask[None, None].float(), 2 * r + 1, stride=1, padding=r)[0, 0] > 0


def vessel_contrast(cubes: torch.Tensor, masks: list[dict], band: int) -> float:
    values = []
    for cube, m in zip(cubes, masks):
        vessels = m["artery"] | m["vein"]
        keep = m["fov"] & ~dilate(m["onh"], 12)
        ring = dilate(vessels, 3) & ~vessels & keep
        img = cube[band]
        values.append(float((img[ring].mean() - img[vessels & keep].mean()) / img[ring].mean()))
    return sum(values) / len(values)


def main(argv: list[str]) -> int:
    continuous = "--continuous" in argv
    argv = [a for a in argv if a != "--continuous"]
    if not argv or any("=" not in a for a in argv):
        print(__doc__)
        return 2
    eyes = [render(5000 + i, 128) for i in range(48)]
    real = torch.stack([e.cube for e in eyes])
    masks = [e.masks for e in eyes]
    rows = {"phantom": real}
    for arg in argv:
        name, path = arg.split("=", 1)
        vq, _ = load_vqgan(path)
        with torch.no_grad():
            z = vq.eval().encode(reflectance_to_model(real, vq.config))
            rows[name] = model_to_reflectance(vq.decode(vq.quantize(z)[0]), vq.config)
            if continuous:
                rows[name + "~"] = model_to_reflectance(vq.decode(z), vq.config)
    for name, cubes in rows.items():
        l1, vis = float((cubes - real).abs().mean()), float((cubes[:, :8] - real[:, :8]).abs().mean())
        contrast = " ".join(f"C{wl}={vessel_contrast(cubes, masks, b):.3f}" for wl, b in BANDS.items())
        print(f"{name:12s} L1 {l1:.4f}  visible-band L1 {vis:.4f}  {contrast}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
