"""Can the shipped VQ-GAN's frozen decoder draw the phantom's vessels? Latents fitted to each eye through it.

    python scripts/decoder_capacity.py [--eyes 8] [--steps 300] [--lr 0.01] [--json FILE] [--threads 1]

The autoencoder's reconstructions carry about half the eyes' vessel contrast (0.082 against 0.168 at 555 nm), and
latents with the vessels' part scaled up decode darker vessels, but wider ones (docs/recipe_study/README.md, "The
painter's gain"). This asks whether *any* latents decode to the eyes' thin, dark vessels: for held-out phantom eyes
(6000..), the continuous latents start at the encoder's and are fitted by Adam to minimise the L1 distance of their
decode (model units, every band) to the eye, the decoder frozen. Reported before and after, decoded continuously and
through the nearest codes: local vessel contrast at 555 and 600 nm, the 555 nm tree (median), L1 over 465-600 nm in
the field of view. If the fitted latents reach the eye's contrast, a painter trained through the decoder could too;
if L1 falls while the contrast stays, the decoder is the limit.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

HELD_OUT, SIDE, VISIBLE = 6000, 128, 9  # the first 9 bands: 465-600 nm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eyes", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--json", default=None, metavar="FILE", help="write the rows here")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.eyes < 1 or a.steps < 1 or not a.lr > 0:
        p.error("--eyes and --steps must be >= 1 and --lr > 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    import retina_fast
    from retina_fast.metrics import vessel_contrast, vessel_tree_length
    from retina_fast.models.normalisation import model_to_reflectance, reflectance_to_model
    from retina_fast.phantom import render

    vq = retina_fast.load("default").loaded.vqgan.eval()
    for w in vq.parameters():
        w.requires_grad_(False)
    eyes = [render(HELD_OUT + i, SIDE) for i in range(a.eyes)]
    truth = torch.stack([e.cube for e in eyes]).float()
    masks = [e.masks for e in eyes]
    fov = torch.stack([e.masks["fov"] for e in eyes])
    x = reflectance_to_model(truth, vq.config)

    def row(model_units: torch.Tensor) -> dict:
        cubes = model_to_reflectance(model_units, vq.config).float()
        return {"contrast_555": vessel_contrast(cubes, masks, 5), "contrast_600": vessel_contrast(cubes, masks, 8),
                "tree_median": float(np.median(vessel_tree_length(cubes, 5).numpy())),
                "l1_465_600_fov": float((cubes - truth).abs()[:, :VISIBLE].transpose(0, 1)[:, fov].mean())}

    rows = {"phantom eyes": row(x)}
    with torch.no_grad():
        z = vq.encode(x)
        rows["encoder's latents, continuous"] = row(vq.decode(z))
        rows["encoder's latents, nearest codes"] = row(vq.decode_latent(z))
    z = z.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=a.lr)
    t0, log = time.time(), []
    for step in range(1, a.steps + 1):
        loss = (vq.decode(z) - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == a.steps:
            log.append({"step": step, "l1_model_units": float(loss.detach()), "s": round(time.time() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
    with torch.no_grad():
        rows["fitted latents, continuous"] = row(vq.decode(z))
        rows["fitted latents, nearest codes"] = row(vq.decode_latent(z))
    for name, r in rows.items():
        print(f"{name:34s} " + "  ".join(f"{k} {v:.4f}" for k, v in r.items()))
    if a.json:
        res = {"command": "python scripts/decoder_capacity.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "eyes": a.eyes, "steps": a.steps, "lr": a.lr, "log": log, "rows": rows}
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
