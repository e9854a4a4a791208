"""How much retinal-vessel contrast a VQ-GAN keeps in its reconstructions (issue: samples without vessels).

    python scripts/vessel_contrast.py [--continuous] [--json FILE] NAME=RUN_DIR [NAME=RUN_DIR ...]

RUN_DIR is a ``retina-fast train vqgan`` run (or its ``final/`` or a ``checkpoints/step_N``). For 48 held-out
phantom eyes (seeds 5000..5047, at the model's image size; training uses 0..1023) it reconstructs each cube
(``VQGAN.reconstruct``: encode -> nearest code -> decode, reflectance in and out) and prints the mean L1 error
(all bands, and the 8 visible bands 465-600 nm) and the local vessel contrast
(``retina_fast.metrics.vessel_contrast``) at 465/555/570/600/730 nm. The first row is the phantom itself.
``--continuous`` adds, per run, a row "NAME~" decoding the encoder's output without quantising it: the gap
between the two rows is what the codebook loses. ``--json FILE`` also writes the rows as JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from retina_fast.metrics import vessel_contrast
from retina_fast.phantom import render
from retina_fast.training.train_ldm import load_vqgan

BANDS = {465: 0, 555: 5, 570: 6, 600: 8, 730: 12}
EYES = range(5000, 5048)


def measure(cubes: torch.Tensor, real: torch.Tensor, masks: list[dict]) -> dict:
    row = {"l1": float((cubes - real).abs().mean()), "l1_visible": float((cubes[:, :8] - real[:, :8]).abs().mean())}
    row.update({f"c{wl}": vessel_contrast(cubes, masks, b) for wl, b in BANDS.items()})
    return row


def main(argv: list[str]) -> int:
    continuous = "--continuous" in argv
    argv = [a for a in argv if a != "--continuous"]
    out_json = None
    if "--json" in argv:
        i = argv.index("--json")
        out_json = argv[i + 1] if i + 1 < len(argv) else None
        argv = argv[:i] + argv[i + 2:]
    if not argv or any("=" not in a for a in argv) or ("--json" in sys.argv and out_json is None):
        print(__doc__)
        return 2
    runs = {name: load_vqgan(path)[0] for name, path in (a.split("=", 1) for a in argv)}
    sizes = {vq.config.image_size for vq in runs.values()}
    rows: dict[str, dict] = {}
    for size in sorted(sizes):
        eyes = [render(i, size) for i in EYES]
        real = torch.stack([e.cube for e in eyes])
        masks = [e.masks for e in eyes]
        rows[f"phantom@{size}" if len(sizes) > 1 else "phantom"] = measure(real, real, masks)
        for name, vq in runs.items():
            if vq.config.image_size != size:
                continue
            vq.eval()
            recon = torch.cat([vq.reconstruct(real[i:i + 16]) for i in range(0, len(real), 16)])
            rows[name] = measure(recon, real, masks)
            if continuous:
                recon = torch.cat([vq.reconstruct(real[i:i + 16], quantize=False) for i in range(0, len(real), 16)])
                rows[name + "~"] = measure(recon, real, masks)
    for name, r in rows.items():
        contrast = " ".join(f"C{wl}={r[f'c{wl}']:.3f}" for wl in BANDS)
        print(f"{name:16s} L1 {r['l1']:.4f}  visible-band L1 {r['l1_visible']:.4f}  {contrast}")
    if out_json:
        Path(out_json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
