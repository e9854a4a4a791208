"""The vessel tree drawn as a mask and painted into the latents by a small deterministic network.

    python scripts/latent_vessel_painter.py data    --out runs/painter [--images 1024]
    python scripts/latent_vessel_painter.py painter --out runs/painter [--steps 3000] [--threads 1]
    python scripts/latent_vessel_painter.py joint   --out runs/painter [--steps 3000] [--threads 1]
    python scripts/latent_vessel_painter.py sample  --out runs/painter [--n 256]
    python scripts/latent_vessel_painter.py maps    --out runs/painter [--steps 3000] [--threads 1] [--init PT --lr LR]
    python scripts/latent_vessel_painter.py bare    --out runs/painter [--steps 3000] [--threads 1]
    python scripts/latent_vessel_painter.py upsample --out runs/painter [--steps 1500] [--threads 1]
    python scripts/latent_vessel_painter.py sample  --out runs/painter --design two-stage [--n 256] [--maps pooled]
        [--map-sampler ddpm --map-steps 250] [--gain G] [--save-cubes DIR]
    python scripts/latent_vessel_painter.py calibrate --out runs/painter [--eyes 48] [--gains 1,1.25,1.5,1.75,2,2.5]
    python scripts/latent_vessel_painter.py plain   --out runs/plain [--gain 1.75] [--steps 3000] [--threads 1]
    python scripts/latent_vessel_painter.py sample  --out runs/plain --design plain [--gain 1.75] [--n 256]

Every LDM so far, the mask-conditioned ones included, renders a crackle of short dark segments where the shipped
VQ-GAN's own reconstructions keep a tree (docs/recipe_study/README.md). What the vessels add to the latents is,
however, a simple local function of where they run: a plain four-layer CNN given the vessel-free eye's latents
and the vessel mask predicts the vessels' latent difference on held-out eyes, and the decode of the sum keeps
the autoencoder's tree. So this splits the job: a diffusion model draws the *vessel-free* latents together with
the tree's mask (one more channel, at the latent grid; a U-Net alone draws that mask's tree well), and the
painter adds the vessels.

``data``: phantom eyes 0..N-1 at 128 px rendered with and without vessels (``phantom.render(..., vessels=False)``:
the same eye, illumination and camera noise), encoded by the packaged VQ-GAN into the U-Net's latent space
(``LoadedLDM.unet_latents``), and the artery + vein mask average-pooled to the latent grid; cached in OUT.
Held-out eyes 6000..6255 the same way.
``painter``: P(z_bare, 2 m - 1) -> z_full - z_bare, four 3 x 3 convolutions (96 channels, SiLU), MSE, Adam
1e-3, batch 32; reports the held-out R^2 and the tree of decode(z_bare + P) on held-out eyes (the painter's best:
the eyes' own vessel-free latents and masks).
``joint``: the shipped LDM recipe's loop (``mask_diffusion.train_eps``: U-Net preset ``tiny`` with nine
channels, L2 on eps balanced over noise levels, lr 8e-4, batch 32, EMA, bf16 autocast) on [z_bare, 2 m - 1].
``maps`` and ``bare``: the same loop in two stages instead of one joint model -- ``maps`` on the vessel map alone
(stage 1), ``bare`` on the vessel-free latents with the map as extra input channels (stage 2, the loss on the
latents), as in two-stage vessel-mask-conditioned fundus synthesis.
``upsample``: a CNN of the painter's shape from the pooled map (one channel) to the full map's f^2 channels
(logits, binary cross-entropy), so a stage 1 that draws the pooled map (which a U-Net draws as a tree) can feed
the full-map stage 2 and painter; reports the held-out Dice, the trees of the upsampled maps and of the painter
on them.
``sample``: DDIM-50 draws of the joint model (``--design joint``) or of stage 1 then stage 2 on its maps
(``--design two-stage``; seed 0; ``--maps pooled``: stage 1 draws the pooled map, ``upsample`` makes it full;
``--maps real``: stage 1 left out, the held-out eyes' own maps; ``--maps upsampled``: their pooled maps through
``upsample``, so stage 1 is the only thing missing; ``--map-sampler`` / ``--map-steps``: stage 1's sampler), the
painter on them, decoded by the packaged VQ-GAN; ``vessel_tree_length`` at 555 nm, as ``scripts/tree_lengths.py``
measures it, for the painted draws and, as controls, the same draws unpainted; and the drawn vessel map's own
tree (``mask_diffusion.tree``: a pseudo band 1 - 0.6 x the map at 128 px, eye 0's field of view) against the
held-out eyes' maps, so a short tree is put on the map or on the painter. Writes OUT/samples_MASK[...].json and
.png (555 nm unpainted, 555 nm painted, the drawn map dark on white); ``--save-cubes DIR`` also the painted and
unpainted draws as cube files, for ``retina-fast evaluate`` and ``tree_lengths.py cubes:DIR``; ``--gain G``
paints G times the painter's vessel difference.
``calibrate``: why a gain. The painter fits the autoencoder's own latents (least-squares gain ~1), and those
decode to vessels of about half the eyes' contrast -- the autoencoder's loss, not the painter's. So the held-out
eyes' vessel-free latents are painted with their own maps at each gain, decoded, and compared with the phantom
renders of the same eyes: local vessel contrast at 465/555/570/600 nm, the 555 nm tree, visible-band L1, and the
relative error of the mean spectrum over the vessel pixels (465-600 nm); the gain with the smallest spectrum error
is ``spectrum_gain`` in OUT/calibrate_MASK.json. That gain matches the vessels' mean, not their profile (the
autoencoder's vessels are blurred, so a gain widens them as it darkens them), and the global metrics of the draws
prefer a smaller one (docs/recipe_study/README.md: 1.25 keeps them, 1.75 doubles HS-FID).
``plain``: the control for what a gain does to the tree measure without a map -- one unconditional LDM, the shipped
recipe's loop with its vessel weight 5, on z_bare + G (z_full - z_bare) (``train.pt``; G = 1: the autoencoder's own
latents); ``sample --design plain --gain G`` draws it (OUT/samples_plain_gainG.json and .png).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BAND_555 = 5
SIDE = 128
HELD_OUT = 6000


def _loaded():
    import retina_fast

    return retina_fast.load("default").loaded


@torch.no_grad()
def encode_eyes(ldm, seeds) -> dict[str, torch.Tensor]:
    """U-Net-space latents of the eyes with and without vessels, their vessel mask (artery | vein, at the
    image size) and its fraction in each latent pixel's patch."""
    from retina_fast.models.normalisation import reflectance_to_model
    from retina_fast.phantom import render

    def enc(cubes):
        return ldm.unet_latents(ldm.vqgan.encode(reflectance_to_model(cubes, ldm.vqgan.config))).float()

    f = ldm.config.vqgan.f
    full, bare, frac, masks = [], [], [], []
    seeds = list(seeds)
    for first in range(0, len(seeds), 32):
        eyes = [render(s, SIDE) for s in seeds[first:first + 32]]
        full.append(enc(torch.stack([p.cube for p in eyes])))
        bare.append(enc(torch.stack([render(s, SIDE, vessels=False).cube for s in seeds[first:first + 32]])))
        mask = torch.stack([(p.masks["artery"] | p.masks["vein"]).float() for p in eyes])[:, None]
        frac.append(F.avg_pool2d(mask, f))
        masks.append(mask.bool())
    return {"full": torch.cat(full), "bare": torch.cat(bare), "frac": torch.cat(frac), "mask": torch.cat(masks)}


def condition(d: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    """The vessel map at the latent grid, in [0, 1]: ``pooled`` -- the fraction of each latent pixel's patch (one
    channel); ``full`` -- the image-size mask itself, each f x f patch as f^2 channels (``pixel_unshuffle``), so
    it says where in the patch the vessel runs."""
    if mode == "pooled":
        return d["frac"]
    f = d["mask"].shape[-1] // d["frac"].shape[-1]
    return F.pixel_unshuffle(d["mask"].float(), f)


def conv_stack(c_in: int, c_out: int) -> nn.Module:
    """Four 3 x 3 convolutions, 96 channels, SiLU: the painter's and the upsampler's shape."""
    return nn.Sequential(nn.Conv2d(c_in, 96, 3, padding=1), nn.SiLU(), nn.Conv2d(96, 96, 3, padding=1), nn.SiLU(),
                         nn.Conv2d(96, 96, 3, padding=1), nn.SiLU(), nn.Conv2d(96, c_out, 3, padding=1))


def painter_net(channels: int, cond_channels: int) -> nn.Module:
    """[vessel-free latents, vessel map] -> the vessels' latent difference."""
    return conv_stack(channels + cond_channels, channels)


def paint(net: nn.Module, bare: torch.Tensor, cond: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """The vessel-free latents plus ``gain`` times the painter's vessel difference (``calibrate`` fits the gain)."""
    return bare + gain * net(torch.cat([bare, cond * 2 - 1], 1))


def _tree(cubes: torch.Tensor) -> np.ndarray:
    from retina_fast.metrics import vessel_tree_length

    return vessel_tree_length(cubes, BAND_555).numpy()


def _summary(t: np.ndarray) -> dict:
    from mask_diffusion import summary

    return summary(t)


def _decode(ldm, z: torch.Tensor) -> torch.Tensor:
    from retina_fast.backends.runners import Runner

    runner = Runner(ldm, torch.device("cpu"), torch.float32)
    return torch.cat([runner.decode(z[i:i + 32]) for i in range(0, len(z), 32)])


def cmd_data(a) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ldm = _loaded()
    torch.save(encode_eyes(ldm, range(a.images)), out / "train.pt")
    torch.save(encode_eyes(ldm, range(HELD_OUT, HELD_OUT + a.held_out)), out / "held_out.pt")
    return 0


def cmd_painter(a) -> int:
    out = Path(a.out)
    tr, te = torch.load(out / "train.pt"), torch.load(out / "held_out.pt")
    c_tr, c_te = condition(tr, a.mask), condition(te, a.mask)
    torch.manual_seed(a.seed)
    net = painter_net(tr["full"].shape[1], c_tr.shape[1])
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    g = torch.Generator().manual_seed(a.seed)
    log, t0 = [], time.time()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(tr["full"]), (32,), generator=g)
        loss = F.mse_loss(paint(net, tr["bare"][idx], c_tr[idx]), tr["full"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == a.steps:
            with torch.no_grad():
                delta = te["full"] - te["bare"]
                r2 = 1 - float((paint(net, te["bare"], c_te) - te["full"]).square().sum() / delta.square().sum())
            log.append({"step": step, "mse": float(loss.detach()), "held_out_r2": r2,
                        "s": round(time.time() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
    torch.save(net.state_dict(), out / f"painter_{a.mask}.pt")
    ldm = _loaded()
    n = min(len(te["full"]), a.eyes)
    with torch.no_grad():
        rows = {"autoencoder": _tree(_decode(ldm, te["full"][:n])),
                "vessel-free": _tree(_decode(ldm, te["bare"][:n])),
                "vessel-free + painter": _tree(_decode(ldm, paint(net, te["bare"][:n], c_te[:n])))}
    res = {"command": _command(a), "mask": a.mask, "log": log, "held_out_eyes": n,
           "rows": {k: _summary(v) for k, v in rows.items()}}
    (out / f"painter_{a.mask}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res["rows"], indent=1))
    return 0


def _joint_unet(ldm, channels: int):
    import dataclasses

    from retina_fast.models import UNet2D

    cfg = dataclasses.replace(ldm.config.unet, in_channels=channels)  # the output has as many channels
    return UNet2D(cfg)


def _train(a, data: torch.Tensor, name: str, cond: torch.Tensor | None = None,
           weights: torch.Tensor | None = None) -> int:
    """The shipped LDM recipe's loop on ``data`` (``cond``: extra input channels) -> OUT/NAME.pt, OUT/NAME.json."""
    from mask_diffusion import train_eps

    out = Path(a.out)
    ldm = _loaded()
    torch.manual_seed(a.seed)
    path = out / f"{name}.pt"
    if path.is_symlink():  # torch.save would write through it into whatever it points at
        print(f"latent_vessel_painter.py: {path} is a symbolic link (saving would overwrite what it points at); "
              "train into a folder of its own", file=sys.stderr)
        raise SystemExit(2)
    save = lambda m, step: torch.save({"ema": m.state_dict(), "step": step}, path)  # noqa: E731
    k = 0 if cond is None else cond.shape[1]
    unet = _joint_unet(ldm, data.shape[1] + k)
    if getattr(a, "init", None):  # go on from a trained model's EMA weights (e.g. at a lower --lr)
        unet.load_state_dict(torch.load(a.init)["ema"])
    _, log = train_eps(unet, data, ldm.schedule, steps=a.steps, batch=32, lr=a.lr, seed=a.seed, cond=cond,
                       weights=weights, save=save)
    doc = {"command": _command(a), "log": log, "init": getattr(a, "init", None)}
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1))
    return 0


def cmd_joint(a) -> int:
    tr = torch.load(Path(a.out) / "train.pt")
    return _train(a, torch.cat([tr["bare"], condition(tr, a.mask) * 2 - 1], 1), f"joint_{a.mask}")


def cmd_maps(a) -> int:
    return _train(a, condition(torch.load(Path(a.out) / "train.pt"), a.mask) * 2 - 1, f"maps_{a.mask}")


def cmd_bare(a) -> int:
    tr = torch.load(Path(a.out) / "train.pt")
    return _train(a, tr["bare"], f"bare_{a.mask}", cond=condition(tr, a.mask) * 2 - 1)


def cmd_plain(a) -> int:
    """One unconditional LDM, the shipped recipe (vessel weight 5), on z_bare + G (z_full - z_bare): G = 1 the
    autoencoder's own latents; G > 1 latents whose vessels decode at the contrast ``calibrate`` found."""
    from retina_fast.training.train_ldm import _entry_weights  # the trainer's --vessel-weight

    tr = torch.load(Path(a.out) / "train.pt")
    data = tr["bare"] + a.gain * (tr["full"] - tr["bare"])
    return _train(a, data, f"plain_gain{a.gain:g}", weights=_entry_weights(tr["frac"], 5.0))


def upsample_net(f: int) -> nn.Module:
    """The pooled map (one channel, 2 m - 1) -> logits of the full map's f^2 channels."""
    return conv_stack(1, f * f)


def upsampled(net: nn.Module, frac: torch.Tensor) -> torch.Tensor:
    """Pooled map (N, 1, h, w) in [0, 1] -> the full map's f^2 channels, binary (probability > 1/2)."""
    return (torch.cat([net(frac[i:i + 64] * 2 - 1) for i in range(0, len(frac), 64)]) > 0).float()


def cmd_upsample(a) -> int:
    out = Path(a.out)
    tr, te = torch.load(out / "train.pt"), torch.load(out / "held_out.pt")
    full_tr, full_te = condition(tr, "full"), condition(te, "full")
    torch.manual_seed(a.seed)
    net = upsample_net(SIDE // full_tr.shape[-1])
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    g = torch.Generator().manual_seed(a.seed)
    log, t0 = [], time.time()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(full_tr), (32,), generator=g)
        loss = F.binary_cross_entropy_with_logits(net(tr["frac"][idx] * 2 - 1), full_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == a.steps:
            with torch.no_grad():
                pred = upsampled(net, te["frac"])
            dice = float(2 * (pred * full_te).sum() / (pred.sum() + full_te.sum()))
            log.append({"step": step, "bce": float(loss.detach()), "held_out_dice": dice,
                        "s": round(time.time() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
    torch.save(net.state_dict(), out / "upsample.pt")
    ldm = _loaded()
    painter = painter_net(te["bare"].shape[1], full_te.shape[1])
    painter.load_state_dict(torch.load(out / "painter_full.pt"))
    n = min(len(te["full"]), a.eyes)
    with torch.no_grad():
        pred = upsampled(net, te["frac"][:n])
        rows = {"held-out maps": _map_tree(full_te[:n], "full"), "upsampled maps": _map_tree(pred, "full"),
                "vessel-free + painter, own map": _tree(_decode(ldm, paint(painter, te["bare"][:n], full_te[:n]))),
                "vessel-free + painter, upsampled map": _tree(_decode(ldm, paint(painter, te["bare"][:n], pred)))}
    res = {"command": _command(a), "log": log, "held_out_eyes": n, "rows": {k: _summary(v) for k, v in rows.items()}}
    (out / "upsample.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res["rows"], indent=1))
    return 0


def _unet(ldm, path: Path, channels: int):
    unet = _joint_unet(ldm, channels)
    unet.load_state_dict(torch.load(path)["ema"])
    return unet.eval()


def _draw(model, x: torch.Tensor, coefs, cond: torch.Tensor | None = None, g: torch.Generator | None = None
          ) -> torch.Tensor:
    """Draws from the noise ``x`` in chunks of 32 (``coefs``: the sampler's steps; ``g``: the generator of the
    per-step noise a stochastic sampler needs); with ``cond``, the model sees it as extra channels and only its
    first ``x.shape[1]`` outputs are used."""
    from retina_fast.samplers import sample as run_loop

    c, out = x.shape[1], []
    for i in range(0, len(x), 32):
        xi = x[i:i + 32]
        noise = None if g is None else (lambda step, xi=xi: torch.randn(xi.shape, generator=g))
        if cond is None:
            out.append(run_loop(lambda v, t: model(v, t), xi, coefs, noise_fn=noise))
        else:
            m = cond[i:i + 32]
            out.append(run_loop(lambda v, t, m=m: model(torch.cat([v, m], 1), t)[:, :c], xi, coefs, noise_fn=noise))
    return torch.cat(out)


@torch.no_grad()
def cmd_sample(a) -> int:
    from retina_fast.samplers import plan

    out = Path(a.out)
    ldm = _loaded()
    coefs = plan("ddim", ldm.schedule, 50)
    g = torch.Generator().manual_seed(a.seed)
    if a.design == "plain":
        return _sample_plain(a, ldm, coefs, g)
    c = ldm.config.latent_shape[0]
    k = 1 if a.mask == "pooled" else ldm.config.vqgan.f ** 2
    net = painter_net(c, k)
    net.load_state_dict(torch.load(out / f"painter_{a.mask}.pt"))
    net.eval()
    shape = ldm.config.latent_shape[1:]
    if a.design == "joint":
        z = _draw(_unet(ldm, out / f"joint_{a.mask}.pt", c + k), torch.randn(a.n, c + k, *shape, generator=g), coefs)
        bare, cond = z[:, :c], ((z[:, c:] + 1) / 2).clamp(0, 1)
    else:
        if a.maps == "real":  # stage 2 and the painter alone: the held-out eyes' own maps
            cond = condition(torch.load(out / "held_out.pt"), a.mask)[:a.n]
        elif a.maps == "upsampled":  # the held-out eyes' pooled maps, made full by the upsampler
            cond = torch.load(out / "held_out.pt")["frac"][:a.n]
        else:
            km = 1 if a.maps == "pooled" else k
            g_maps = torch.randn(a.n, km, *shape, generator=g)
            map_coefs = plan(a.map_sampler, ldm.schedule, a.map_steps)
            drawn = _draw(_unet(ldm, out / f"maps_{a.maps or a.mask}.pt", km), g_maps, map_coefs,
                          g=torch.Generator().manual_seed(a.seed + 1) if a.map_sampler == "ddpm" else None)
            cond = ((drawn + 1) / 2).clamp(0, 1)
        if cond.shape[1] != k:  # a pooled map, the full one made from it
            up = upsample_net(ldm.config.vqgan.f)
            up.load_state_dict(torch.load(out / "upsample.pt"))
            cond = upsampled(up.eval(), cond)
        bare = _draw(_unet(ldm, out / f"bare_{a.mask}.pt", c + k), torch.randn(len(cond), c, *shape, generator=g),
                     coefs, cond=cond * 2 - 1)
    plain, painted = _decode(ldm, bare), _decode(ldm, paint(net, bare, cond, a.gain))
    held = condition(torch.load(out / "held_out.pt"), a.mask)
    rows = {"joint draws, unpainted": _tree(plain), "joint draws, painted": _tree(painted),
            "drawn map": _map_tree(cond, a.mask), "held-out eyes' maps": _map_tree(held, a.mask)}
    res = {"command": _command(a), "mask": a.mask, "design": a.design, "maps": a.maps or a.mask, "n": len(bare),
           "gain": a.gain,
           "mask_vessel_fraction": float(cond.mean()),
           "held_out_vessel_fraction": float(held.mean()),
           "rows": {k: _summary(v) for k, v in rows.items()}}
    name = f"samples_{a.mask}" + ("" if a.design == "joint" else "_two_stage") + (f"_{a.maps}_maps" if a.maps else "")
    if (a.map_sampler, a.map_steps) != ("ddim", 50):
        name += f"_{a.map_sampler}{a.map_steps}"
    if a.gain != 1:
        name += f"_gain{a.gain:g}"
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    _figure(plain[:8], painted[:8], _map_image(cond[:8], a.mask), out / f"{name}.png")
    if a.save_cubes:
        _save_cubes(Path(a.save_cubes), {"painted": painted, "unpainted": plain}, ldm.wavelengths, res["command"])
    print(json.dumps(res, indent=1))
    return 0


VISIBLE_NM = 600  # the bands up to here carry the retinal vessels' contrast
CONTRAST_NM = (465, 555, 570, 600)  # scripts/vessel_contrast.py's visible bands


@torch.no_grad()
def cmd_calibrate(a) -> int:
    """The painter's gain against the eyes themselves: held-out eyes' vessel-free latents painted with their own
    maps at each gain, decoded, and compared with the phantom renders of the same eyes (what the decoded vessels
    should be); the gain whose vessels' mean spectrum is closest to the eyes' over the visible bands wins."""
    from retina_fast.metrics import vessel_contrast
    from retina_fast.phantom import render

    out = Path(a.out)
    ldm = _loaded()
    te = torch.load(out / "held_out.pt")
    n = min(len(te["full"]), a.eyes)
    cond = condition(te, a.mask)[:n]
    net = painter_net(te["bare"].shape[1], cond.shape[1])
    net.load_state_dict(torch.load(out / f"painter_{a.mask}.pt"))
    net.eval()
    eyes = [render(HELD_OUT + i, SIDE) for i in range(n)]
    masks = [p.masks for p in eyes]
    truth = torch.stack([p.cube for p in eyes]).float()
    vessel_masks = torch.stack([p.masks["artery"] | p.masks["vein"] for p in eyes])
    if not torch.equal(vessel_masks[:, None], te["mask"][:n]):
        print(f"latent_vessel_painter.py calibrate: {out / 'held_out.pt'} does not hold the phantom's held-out eyes "
              f"{HELD_OUT}.. at {SIDE} px (made by another version of 'data'?)", file=sys.stderr)
        return 2
    fov = torch.stack([p.masks["fov"] for p in eyes])
    vessels = vessel_masks & fov
    wl = [float(w) for w in ldm.wavelengths]
    vis = [i for i, w in enumerate(wl) if w <= VISIBLE_NM]
    contrast_bands = [wl.index(w) for w in CONTRAST_NM]

    def row(cubes: torch.Tensor) -> dict:
        cubes = cubes.float()
        err = (cubes - truth).abs()[:, vis].transpose(0, 1)  # (bands, N, H, W)
        spec = cubes.transpose(0, 1)[:, vessels].mean(1)
        want = truth.transpose(0, 1)[:, vessels].mean(1)
        rel = ((spec - want) / want)[vis].abs()
        r = {f"contrast_{wl[b]:g}": vessel_contrast(cubes, masks, b) for b in contrast_bands}
        r.update({"tree_median": float(np.median(_tree(cubes))), "visible_l1_fov": float(err[:, fov].mean()),
                  "visible_l1_vessels": float(err[:, vessels].mean()),
                  "vessel_spectrum_error": float(rel.mean()), "vessel_spectrum_error_max": float(rel.max())})
        return r

    delta = torch.cat([net(torch.cat([te["bare"][i:i + 64], cond[i:i + 64] * 2 - 1], 1)) for i in range(0, n, 64)])
    decoded = {"autoencoder": _decode(ldm, te["full"][:n])}
    rows = {"phantom eyes": row(truth), "autoencoder": row(decoded["autoencoder"]),
            "vessel-free": row(_decode(ldm, te["bare"][:n]))}
    for g in a.gains:
        decoded[f"gain{g:g}"] = _decode(ldm, te["bare"][:n] + g * delta)
        rows[f"gain {g:g}"] = row(decoded[f"gain{g:g}"])
        print(f"gain {g:g}: " + json.dumps({k: round(v, 4) for k, v in rows[f'gain {g:g}'].items()}), flush=True)
        if not a.save_cubes:
            del decoded[f"gain{g:g}"]
    best = min(a.gains, key=lambda g: rows[f"gain {g:g}"]["vessel_spectrum_error"])
    true_delta = te["full"][:n] - te["bare"][:n]
    res = {"command": _command(a), "mask": a.mask, "eyes": n, "visible_bands_nm": [wl[i] for i in vis],
           "least_squares_gain": float((delta * true_delta).sum() / delta.square().sum()), "spectrum_gain": best,
           "rows": rows}
    (out / f"calibrate_{a.mask}.json").write_text(json.dumps(res, indent=1))
    if a.save_cubes:
        _save_cubes(Path(a.save_cubes), decoded, ldm.wavelengths, res["command"])
    print(json.dumps({"spectrum_gain": best, "least_squares_gain": res["least_squares_gain"]}))
    return 0


def _sample_plain(a, ldm, coefs, g: torch.Generator) -> int:
    """``sample --design plain``: draws of the ``plain`` LDM trained at ``--gain``, decoded; their tree."""
    c, shape = ldm.config.latent_shape[0], ldm.config.latent_shape[1:]
    z = _draw(_unet(ldm, Path(a.out) / f"plain_gain{a.gain:g}.pt", c), torch.randn(a.n, c, *shape, generator=g), coefs)
    cubes = _decode(ldm, z)
    res = {"command": _command(a), "design": "plain", "gain": a.gain, "n": len(z), "rows": {"draws": _summary(
        _tree(cubes))}}
    name = f"samples_plain_gain{a.gain:g}"
    (Path(a.out) / f"{name}.json").write_text(json.dumps(res, indent=1))
    _figure(cubes[:8], cubes[8:16] if len(cubes) > 8 else cubes[:8], None, Path(a.out) / f"{name}.png")
    if a.save_cubes:
        _save_cubes(Path(a.save_cubes), {"draws": cubes}, ldm.wavelengths, res["command"])
    print(json.dumps(res, indent=1))
    return 0


def _save_cubes(root: Path, sets: dict[str, torch.Tensor], wavelengths, command: str) -> None:
    """Each set of draws as ``root/NAME/sample_NNNNNN.npy`` reflectance cubes, for ``retina-fast evaluate``."""
    from retina_fast import io

    for name, cubes in sets.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, cube in enumerate(cubes):
            io.save_cube(root / name / f"sample_{i:06d}.npy", cube, wavelengths,
                         metadata={"source": command, "set": name, "index": i})


def _map_image(cond: torch.Tensor, mode: str) -> torch.Tensor:
    """The vessel map at the latent grid -> (N, 1, SIDE, SIDE) in [0, 1]: the full map's channels back to their
    pixels, the pooled fraction bilinear (as ``mask_diffusion.pseudo_cubes`` does)."""
    if mode == "full":
        return F.pixel_shuffle(cond, SIDE // cond.shape[-1])
    return F.interpolate(cond, size=(SIDE, SIDE), mode="bilinear", align_corners=False).clamp(0, 1)


def _map_tree(cond: torch.Tensor, mode: str) -> np.ndarray:
    from mask_diffusion import FOV_SEED, pooled_masks, tree

    fov = pooled_masks([FOV_SEED], 1, SIDE)[1]
    return tree(_map_image(cond, mode), fov.expand(len(cond), -1, -1))


def _figure(top: torch.Tensor, bottom: torch.Tensor, maps: torch.Tensor | None, path: Path) -> None:
    """555 nm of two rows of draws over the maps (if any), on one grey scale: the 1st to 99.5th percentile of eight
    held-out phantom eyes at 555 nm, so faint and strong vessels look as they are against the data."""
    from PIL import Image

    from retina_fast.phantom import render

    ref = np.stack([render(HELD_OUT + i, SIDE).cube[BAND_555].numpy() for i in range(8)])
    lo, hi = np.percentile(ref, 1), np.percentile(ref, 99.5)

    def row(cubes):
        return np.concatenate([np.clip((im - lo) / (hi - lo), 0, 1) for im in cubes[:, BAND_555].numpy()], 1)

    rows = [row(top), row(bottom)] + ([] if maps is None else [np.concatenate([1 - m[0] for m in maps.numpy()], 1)])
    Image.fromarray((np.concatenate(rows, 0) * 255).astype(np.uint8)).save(path)


def _command(a) -> str:
    return "python scripts/latent_vessel_painter.py " + " ".join(shlex.quote(x) for x in a.argv)


def _gains(text: str) -> tuple[float, ...]:
    try:
        gains = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not gains or min(gains) <= 0:
        raise argparse.ArgumentTypeError(f"gains must be > 0: {text!r}")
    return gains


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("data", "painter", "joint", "maps", "bare", "upsample", "sample", "calibrate", "plain"):
        s = sub.add_parser(name)
        s.add_argument("--out", required=True)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        if name != "data":
            s.add_argument("--mask", choices=("pooled", "full"), default="full",
                           help="the vessel map at the latent grid: pooled fraction (1 channel) or the image-size "
                                "mask (f^2 channels; default)")
    sub.choices["data"].add_argument("--images", type=int, default=1024)
    sub.choices["data"].add_argument("--held-out", type=int, default=256)
    sub.choices["painter"].add_argument("--steps", type=int, default=3000)
    sub.choices["painter"].add_argument("--eyes", type=int, default=64, help="held-out eyes for the trees")
    sub.choices["upsample"].add_argument("--steps", type=int, default=1500)
    sub.choices["upsample"].add_argument("--eyes", type=int, default=64, help="held-out eyes for the trees")
    for name in ("joint", "maps", "bare", "plain"):
        sub.choices[name].add_argument("--steps", type=int, default=3000)
        sub.choices[name].add_argument("--lr", type=float, default=8e-4)
        if name != "plain":
            sub.choices[name].add_argument("--init", default=None, metavar="PT",
                                           help="start from this trained model's EMA weights (its NAME.pt; read "
                                                "before this run writes OUT/NAME.pt)")
    sub.choices["plain"].add_argument("--gain", type=float, default=1.0,
                                      help="the vessels' part of the training latents times this (default 1)")
    sub.choices["sample"].add_argument("--n", type=int, default=256)
    sub.choices["sample"].add_argument("--gain", type=float, default=1.0,
                                       help="the painter's vessel difference times this (calibrate fits it; "
                                            "default 1: as trained)")
    sub.choices["calibrate"].add_argument("--eyes", type=int, default=48, help="held-out eyes")
    sub.choices["calibrate"].add_argument("--save-cubes", metavar="DIR", default=None,
                                          help="also write the decoded eyes as cubes to DIR/autoencoder and "
                                               "DIR/gainG (for retina-fast evaluate)")
    sub.choices["calibrate"].add_argument("--gains", type=_gains, default=(1.0, 1.25, 1.5, 1.75, 2.0, 2.5),
                                          help="comma-separated gains to try (default 1,1.25,1.5,1.75,2,2.5)")
    sub.choices["sample"].add_argument("--design", choices=("joint", "two-stage", "plain"), default="joint",
                                       help="one joint model (joint_MASK.pt), stage 1 then 2 (maps_MASK.pt, "
                                            "bare_MASK.pt), or the plain LDM trained at --gain (plain_gainG.pt)")
    sub.choices["sample"].add_argument("--maps", choices=("pooled", "real", "upsampled"), default=None,
                                       help="two-stage: stage 1 draws the pooled map (maps_pooled.pt), upsample.pt "
                                            "makes the full one (with --mask full); real: no stage 1, the held-out "
                                            "eyes' own maps; upsampled: the held-out eyes' pooled maps made full by "
                                            "upsample.pt (with --mask full)")
    sub.choices["sample"].add_argument("--map-sampler", choices=("ddim", "ddpm"), default="ddim",
                                       help="stage 1's sampler (--maps pooled or no --maps; default ddim)")
    sub.choices["sample"].add_argument("--map-steps", type=int, default=50, help="stage 1's steps (default 50)")
    sub.choices["sample"].add_argument("--save-cubes", metavar="DIR", default=None,
                                       help="also write the painted and unpainted draws as cubes to DIR/painted and "
                                            "DIR/unpainted (for retina-fast evaluate)")
    a = p.parse_args(argv)
    a.argv = argv
    for key in ("images", "held_out", "steps", "eyes", "n", "map_steps"):
        if getattr(a, key, 1) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if getattr(a, "gain", 1) <= 0:
        p.error("--gain must be > 0")
    if getattr(a, "maps", None) and (a.design != "two-stage" or (a.maps != "real" and a.mask != "full")):
        p.error(f"--maps {a.maps} goes with --design two-stage" + (" --mask full" if a.maps != "real" else ""))
    if a.cmd == "sample" and (a.map_sampler, a.map_steps) != ("ddim", 50) and (
            a.design != "two-stage" or a.maps in ("real", "upsampled")):
        p.error("--map-sampler and --map-steps set stage 1's sampler: they go with --design two-stage and stage 1 "
                "drawing the maps (no --maps, or --maps pooled)")
    if getattr(a, "save_cubes", None):
        names = (["autoencoder"] + [f"gain{g:g}" for g in a.gains] if a.cmd == "calibrate"
                 else ["draws"] if a.design == "plain" else ["painted", "unpainted"])
        full = [str(Path(a.save_cubes) / d) for d in names
                if (Path(a.save_cubes) / d).is_dir() and any((Path(a.save_cubes) / d).iterdir())]
        if full:  # refused before the draws, so nothing is mixed with or lost to an earlier run
            p.error(f"--save-cubes: {full[0]} already holds files (choose a new DIR)")
    if a.threads:
        torch.set_num_threads(a.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        return {"data": cmd_data, "painter": cmd_painter, "joint": cmd_joint, "maps": cmd_maps, "bare": cmd_bare,
                "upsample": cmd_upsample, "sample": cmd_sample, "calibrate": cmd_calibrate,
                "plain": cmd_plain}[a.cmd](a)
    except FileNotFoundError as exc:  # a step run before the one that writes its input
        print(f"latent_vessel_painter.py {a.cmd}: {exc.filename}: not found (run the earlier steps first)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
