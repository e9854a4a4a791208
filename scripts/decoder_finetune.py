"""Fine-tune only the decoder of a trained VQ-GAN, encoder and codebook frozen: what can a decoder draw from the codes
it is given? The latents, the latent range and any LDM trained on them stay valid, so the result is a drop-in model.

    python scripts/decoder_finetune.py --out RUN [--model default] [--steps 1500] [--eyes 512] [--batch-size 8]
        [--lr 2e-4] [--gan on|off] [--gan-start 200] [--vessel-weight W] [--grad-weight G] [--eval-every 250]
        [--eval-eyes 48] [--threads 1]

Why: the shipped VQ-GAN's reconstructions carry half the phantom's vessel contrast (0.082 against 0.167 at 555 nm),
and latents fitted to the eyes through its frozen decoder do not get past 0.09 (scripts/decoder_capacity.py), so the
decoder is the limit. This trains the decoder (post-quantisation conv included) on the eyes' nearest codes, which
are computed once.

Loss per step (x an eye in model units, x̂ the decode of its nearest codes):
    4 · mean(w ⊙ |x − x̂|) + SAM(r, r̂) + G · mean |∇x − ∇x̂|  [+ hinge GAN + 4 · feature matching, from --gan-start]
w = 1 + (W − 1) · m per pixel, m the eye's artery ∪ vein mask (phantom renders), scaled to mean 1 per eye; ∇ the
finite differences along H and W (per band). The weights 4 / 1 / 1 / 4 are the VQ-GAN trainer's (training/losses.py).
With --gan on a fresh PatchGAN (the trainer's, batch norm) learns from step 0 and the decoder sees it from
--gan-start; Adam betas 0.5, 0.9 as the trainer; bf16 autocast.

Every --eval-every steps: the 48 held-out eyes of scripts/vessel_contrast.py (5000..5047; --eval-eyes) are
reconstructed; their ``vessel_contrast.measure`` row (L1, vessel contrast, 555 nm tree lengths) goes to RUN/eval.jsonl
(step 0 = the model given). At the end RUN/final: the given model directory with this decoder (same U-Net, config
and latent range), which ``retina_fast.load`` and ``retina-fast sample --model`` read, and RUN/recon_555.png: the
first two held-out eyes at 555 nm, phantom, given decoder and fine-tuned decoder (``vessel_contrast.py``'s figure).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

EYES_TRAIN, EYES_EVAL, SIDE = 0, 5000, 128


def _grad_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = a - b
    return 0.5 * ((d[..., 1:, :] - d[..., :-1, :]).abs().mean() + (d[..., :, 1:] - d[..., :, :-1]).abs().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="default", help="a model directory or name (default: the shipped one)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eyes", type=int, default=512, help="training eyes 0..N-1 (the trainer's: 0..1023)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--gan", choices=("on", "off"), default="on")
    p.add_argument("--gan-start", type=int, default=200)
    p.add_argument("--vessel-weight", type=float, default=1.0, metavar="W")
    p.add_argument("--grad-weight", type=float, default=0.0, metavar="G")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-eyes", type=int, default=48, help="held-out eyes 5000.. (default 48, as vessel_contrast.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if min(a.steps, a.batch_size, a.eval_every) < 1 or a.eval_eyes < 2 or a.eyes < a.batch_size or not a.lr > 0:
        p.error("--steps, --batch-size, --eval-every must be >= 1, --eval-eyes >= 2 (the figure shows two), "
                "--eyes >= --batch-size, --lr > 0")
    if not (a.vessel_weight >= 1.0 and a.grad_weight >= 0.0):
        p.error("--vessel-weight must be >= 1 and --grad-weight >= 0")
    out = Path(a.out)
    taken = [out / n for n in ("final", "eval.jsonl") if (out / n).exists()]
    if taken:
        p.error(f"{taken[0]} exists: choose another --out")
    if a.threads:
        torch.set_num_threads(a.threads)
    from retina_fast.checkpoint import CONFIG_NAME, load_checkpoint, save_checkpoint
    from retina_fast.modelzoo import resolve_model
    from retina_fast.models.normalisation import model_to_reflectance, reflectance_to_model
    from retina_fast.phantom import render
    from retina_fast.training.losses import VQGANLoss, feature_matching_loss, hinge_d_loss, hinge_g_loss, \
        spectral_angle
    from retina_fast.training.train_ldm import load_vqgan
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from vessel_contrast import draw, measure

    try:
        src = resolve_model(a.model)
        vq, _ = load_vqgan(src)
        doc, states = load_checkpoint(src)
    except (FileNotFoundError, ValueError) as exc:  # CheckpointError is a ValueError
        p.error(f"--model {a.model}: {exc}")
    if "unet" not in states:
        p.error(f"--model {a.model}: not a model with a diffusion U-Net (kind {doc.get('kind')!r})")
    cfg = vq.config
    torch.manual_seed(a.seed)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    eyes = [render(EYES_TRAIN + i, SIDE) for i in range(a.eyes)]
    x_all = reflectance_to_model(torch.stack([e.cube for e in eyes]).float(), cfg)
    vessel = torch.stack([(e.masks["artery"] | e.masks["vein"]).float() for e in eyes]).unsqueeze(1)
    w_all = 1.0 + (a.vessel_weight - 1.0) * vessel
    w_all = w_all / w_all.mean(dim=(2, 3), keepdim=True)
    del eyes
    held = [render(EYES_EVAL + i, SIDE) for i in range(a.eval_eyes)]
    held_cubes, held_masks = torch.stack([e.cube for e in held]).float(), [e.masks for e in held]
    with torch.no_grad():
        codes = torch.cat([vq.codebook.lookup(vq.codebook_nearest(vq.encode(x_all[i:i + 32]))[0])
                           for i in range(0, a.eyes, 32)])
        held_codes = vq.codebook.lookup(vq.codebook_nearest(vq.encode(reflectance_to_model(held_cubes, cfg)))[0])
    print(f"{a.eyes} eyes rendered and encoded in {time.time() - t0:.0f} s", flush=True)

    decoder = torch.nn.Sequential(vq.post_quant, vq.decoder).train().requires_grad_(True)
    crit = VQGANLoss(cfg, disc_norm="batch").train()
    disc = crit.discriminator
    opt_g = torch.optim.Adam(decoder.parameters(), lr=a.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=a.lr, betas=(0.5, 0.9))
    amp = torch.autocast("cpu", dtype=torch.bfloat16)

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        decoder.eval()
        recon = torch.cat([decoder(held_codes[i:i + 16]) for i in range(0, len(held_codes), 16)])
        decoder.train()
        cubes = model_to_reflectance(recon, cfg).float()
        row = {"step": step, **measure(cubes, held_cubes, held_masks), "s": round(time.time() - t0, 1)}
        with open(out / "eval.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return cubes

    first = evaluate(0)
    gen = torch.Generator().manual_seed(a.seed)
    log = open(out / "log.jsonl", "a")
    for step in range(a.steps):
        idx = torch.randint(0, a.eyes, (a.batch_size,), generator=gen)
        x, zq, w = x_all[idx], codes[idx], w_all[idx]
        with amp:
            recon = decoder(zq).float()
        parts = {"l1": ((recon - x).abs() * w).mean(),
                 "sam": spectral_angle(model_to_reflectance(recon, cfg, clamp=False),
                                       model_to_reflectance(x, cfg, clamp=False), offset=0.0)}
        total = cfg.l1_weight * parts["l1"] + cfg.spectral_angle_weight * parts["sam"]
        if a.grad_weight > 0:
            parts["grad"] = _grad_l1(recon, x)
            total = total + a.grad_weight * parts["grad"]
        if a.gan == "on" and step >= a.gan_start:
            disc.requires_grad_(False)
            with amp:
                logits_fake, feats_fake = disc(recon)
                with torch.no_grad():
                    _, feats_real = disc(x)
            parts["gan"] = hinge_g_loss(logits_fake.float())
            parts["fm"] = feature_matching_loss([f.float() for f in feats_fake], [f.float() for f in feats_real])
            total = total + cfg.gan_weight * parts["gan"] + cfg.feature_matching_weight * parts["fm"]
            disc.requires_grad_(True)
        if not torch.isfinite(total):
            raise SystemExit(f"error: the loss is not finite at step {step + 1}")
        opt_g.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt_g.step()
        if a.gan == "on":
            with amp:
                loss_d = hinge_d_loss(disc(x)[0].float(), disc(recon.detach())[0].float())
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            torch.nn.utils.clip_grad_norm_(disc.parameters(), 1.0)
            opt_d.step()
            parts["d"] = loss_d
        if (step + 1) % 25 == 0:
            row = {"step": step + 1, **{k: round(float(v.detach()), 5) for k, v in parts.items()}}
            log.write(json.dumps(row) + "\n")
            log.flush()
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            last = evaluate(step + 1)
    log.close()
    decoder.eval()
    vq.eval()
    config = {k: v for k, v in doc.items() if k not in {"format", "format_version", "provenance", "weights"}}
    prov = {"command": "python scripts/decoder_finetune.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "steps": a.steps, "data": f"phantom eyes {EYES_TRAIN}..{EYES_TRAIN + a.eyes - 1} at {SIDE}x{SIDE}; "
            "decoder only, encoder and codebook frozen", "base_model": {"path": str(src),
                                                                          "provenance": doc.get("provenance")}}
    save_checkpoint(out / "final", {**states, "vqgan": vq.state_dict()}, config, prov)
    for extra in sorted(src.iterdir()):
        if extra.suffix in {".md", ".csv"} and extra.name != CONFIG_NAME:
            shutil.copy(extra, out / "final" / extra.name)
    draw({"phantom": held_cubes[:2, 5], "given decoder": first[:2, 5], "fine-tuned": last[:2, 5]},
         str(out / "recon_555.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
