"""How much retinal-vessel contrast a VQ-GAN keeps in its reconstructions (issue: samples without vessels).

    python scripts/vessel_contrast.py [--continuous] [--json FILE] NAME=RUN_DIR [NAME=RUN_DIR ...]

RUN_DIR is a ``retina-fast train vqgan`` run (or its ``final/`` or a ``checkpoints/step_N``). For 48 held-out
phantom eyes (seeds 5000..5047, at the model's image size; training uses 0..1023) it reconstructs each cube
(``VQGAN.reconstruct``: encode -> nearest code -> decode, reflectance in and out) and prints the mean L1 error
(all bands, and the first 8 bands, 465-585 nm) and the local vessel contrast
(``retina_fast.metrics.vessel_contrast``) at 465/555/570/600/730 nm, and the medians of the vessel tree, arcade and
branch lengths at 555 nm (``vessel_tree_length`` and the two after it). The first row is the phantom itself.
``--continuous`` adds, per run, a row "NAME~" decoding the encoder's output without quantising it: the gap
between the two rows is what the codebook loses. ``--json FILE`` also writes the rows as JSON;
``--figure FILE.png`` draws the 555 nm band of the first two eyes (whole and a 48-px crop at 2x) for the
phantom and each run, every panel on the phantom's grey scale.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from retina_fast.metrics import vessel_arcade_length, vessel_branch_length, vessel_contrast, vessel_tree_length
from retina_fast.phantom import render
from retina_fast.training.train_ldm import load_vqgan

BANDS = {465: 0, 555: 5, 570: 6, 600: 8, 730: 12}
EYES = range(5000, 5048)


def measure(cubes: torch.Tensor, real: torch.Tensor, masks: list[dict]) -> dict:
    row = {"l1": float((cubes - real).abs().mean()), "l1_visible": float((cubes[:, :8] - real[:, :8]).abs().mean())}
    row.update({f"c{wl}": vessel_contrast(cubes, masks, b) for wl, b in BANDS.items()})
    row.update({f"{name}_555": float(np.median(fn(cubes, BANDS[555]).numpy())) for name, fn in (
        ("tree", vessel_tree_length), ("arcade", vessel_arcade_length), ("branch", vessel_branch_length))})
    return row


def draw(panels: dict[str, torch.Tensor], path: str) -> None:
    """Rows: eye 0, eye 0 crop, eye 1, eye 1 crop; columns: phantom then the runs (555 nm, phantom's scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = 0.0, float(torch.quantile(panels["phantom"].flatten(), 0.99))
    fig, axes = plt.subplots(4, len(panels), figsize=(2.2 * len(panels), 8.8), squeeze=False)
    for col, (name, imgs) in enumerate(panels.items()):
        for eye in range(2):
            img = imgs[eye]
            s = img.shape[-1]
            crop = img[s // 8:s // 8 + 48, s // 2:s // 2 + 48]  # upper vascular arcade, above the fovea
            for k, (im, label) in enumerate(((img, f"eye {eye}"), (crop, f"eye {eye}, crop"))):
                ax = axes[2 * eye + k, col]
                ax.imshow(im.numpy(), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(label)
        axes[0, col].set_title(name, fontsize=9)
    fig.suptitle("555 nm reflectance: held-out phantom eyes and their reconstructions", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str]) -> int:
    continuous = "--continuous" in argv
    argv = [a for a in argv if a != "--continuous"]
    opts = {}
    for flag in ("--json", "--figure"):
        if flag in argv:
            i = argv.index(flag)
            opts[flag] = argv[i + 1] if i + 1 < len(argv) else None
            argv = argv[:i] + argv[i + 2:]
    out_json, figure = opts.get("--json"), opts.get("--figure")
    if not argv or any("=" not in a for a in argv) or None in opts.values():
        print(__doc__)
        return 2
    runs = {name: load_vqgan(path)[0] for name, path in (a.split("=", 1) for a in argv)}
    sizes = {vq.config.image_size for vq in runs.values()}
    rows: dict[str, dict] = {}
    panels: dict[str, torch.Tensor] = {}
    for size in sorted(sizes):
        eyes = [render(i, size) for i in EYES]
        real = torch.stack([e.cube for e in eyes])
        masks = [e.masks for e in eyes]
        rows[f"phantom@{size}" if len(sizes) > 1 else "phantom"] = measure(real, real, masks)
        panels.setdefault("phantom", real[:2, BANDS[555]])
        for name, vq in runs.items():
            if vq.config.image_size != size:
                continue
            vq.eval()
            recon = torch.cat([vq.reconstruct(real[i:i + 16]) for i in range(0, len(real), 16)])
            rows[name] = measure(recon, real, masks)
            panels[name] = recon[:2, BANDS[555]]
            if continuous:
                recon = torch.cat([vq.reconstruct(real[i:i + 16], quantize=False) for i in range(0, len(real), 16)])
                rows[name + "~"] = measure(recon, real, masks)
    for name, r in rows.items():
        contrast = " ".join(f"C{wl}={r[f'c{wl}']:.3f}" for wl in BANDS)
        print(f"{name:16s} L1 {r['l1']:.4f}  visible-band L1 {r['l1_visible']:.4f}  {contrast}  tree/arcade/branch "
              f"{r['tree_555']:.0f}/{r['arcade_555']:.0f}/{r['branch_555']:.0f}")
    if figure:
        draw(panels, figure)
    if out_json:
        Path(out_json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
