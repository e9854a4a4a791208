"""Where the retinal vessels sit among the latent channels' directions, and what whitening does to their share.

    python scripts/latent_directions.py [--train 256] [--eyes 48] [--json FILE] [MODEL]

MODEL (default: the packaged default) is anything ``retina_fast.load`` takes. The channel covariance of the
U-Net's latents over every pixel of ``--train`` training eyes (phantom seeds 0..) gives the directions and their
variances (eigenvalues). ``--eyes`` held-out eyes (seeds 6000..) are rendered noise-free with and without vessels
(``phantom.render(..., vessels=False)``) and encoded; inside the field of view the vessels' difference has a
covariance of its own, and the generalised eigenvalues of the two (vessel variance over all variance along a
direction, between 0 and 1) say how strongly single directions carry the vessels. Printed: both spectra, the
vessels' share of the whole variance as the U-Net sees it, and the share after a ZCA whitening of the channels
fitted on the training eyes (``retina_fast.models.vqgan.LatentWhitening``; the share a model trained with
``train ldm --latent-whiten`` sees, whatever its S). A diffusion model resolves high-variance directions at high
noise and low-variance ones last; a share that rises under whitening is a tree that competes better for the
noise levels where the layout is decided (docs/recipe_study/README.md).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from retina_fast.models.normalisation import reflectance_to_model
from retina_fast.models.vqgan import LatentWhitening
from retina_fast.phantom import render


def _latents(ldm, cubes: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ldm.unet_latents(ldm.vqgan.encode(reflectance_to_model(cubes, ldm.vqgan.config))).double()


def _rows(z: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    x = z.permute(0, 2, 3, 1)
    return (x[keep] if keep is not None else x.reshape(-1, z.shape[1]))


def directions(model: str = "default", train: int = 256, eyes: int = 48) -> dict:
    import retina_fast

    ldm = retina_fast.load(model).loaded
    size, f = ldm.config.vqgan.image_size, ldm.config.vqgan.f
    tr = torch.cat([_latents(ldm, torch.stack([render(s, size).cube for s in range(b, min(b + 32, train))]))
                    for b in range(0, train, 32)])
    x = _rows(tr)
    cov = torch.cov(x.T)
    whiten = LatentWhitening.fit(tr, 1.0)
    full = [render(s, size, noise=False) for s in range(6000, 6000 + eyes)]
    z_full = _latents(ldm, torch.stack([p.cube for p in full]))
    z_bare = _latents(ldm, torch.stack([render(s, size, noise=False, vessels=False).cube
                                        for s in range(6000, 6000 + eyes)]))
    fov = torch.stack([p.masks["fov"].float() for p in full])[:, None]
    inside = (F.avg_pool2d(fov, f) > 0.99)[:, 0]

    def share(a: torch.Tensor, b: torch.Tensor) -> float:
        d = a - b
        return float(d.pow(2).mean(0).sum() / a.var(0).sum())

    a, b = _rows(z_full, inside), _rows(z_bare, inside)
    s_all = torch.cov(a.T)
    d = a - b
    s_ves = d.T @ d / len(d)
    chol_inv = torch.linalg.inv(torch.linalg.cholesky(s_all))
    gen = torch.linalg.eigvalsh(chol_inv @ s_ves @ chol_inv.T)
    wa, wb = (_rows(whiten.apply(z), inside) for z in (z_full, z_bare))
    return {"model": model, "train_eyes": train, "held_out_eyes": eyes,
            "channel_variance_eigenvalues": torch.linalg.eigvalsh(cov).tolist(),
            "vessel_share_along_directions": gen.clamp(0, 1).tolist(),
            "vessel_share": share(a, b), "vessel_share_whitened": share(wa, wb)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="default")
    p.add_argument("--train", type=int, default=256, help="training eyes for the covariance (default 256)")
    p.add_argument("--eyes", type=int, default=48, help="held-out eyes with and without vessels (default 48)")
    p.add_argument("--json", help="also write the result as JSON")
    args = p.parse_args(argv)
    if args.train < 2 or args.eyes < 2:
        p.error("--train and --eyes must be >= 2")
    r = directions(args.model, args.train, args.eyes)
    fmt = lambda v: " ".join(f"{x:.4g}" for x in v)  # noqa: E731
    print(f"{r['model']}: channel variance along its directions: {fmt(r['channel_variance_eigenvalues'])}")
    print(f"vessels' share of the variance along single directions: {fmt(r['vessel_share_along_directions'])}")
    print(f"vessels' share of the latents' variance inside the field of view: {100 * r['vessel_share']:.1f} %, "
          f"after whitening the channels: {100 * r['vessel_share_whitened']:.1f} %")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
