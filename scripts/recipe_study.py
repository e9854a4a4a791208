"""The VQ-GAN recipe study behind the shipped ``tiny`` (docs/recipe_study/README.md): train variants one
factor at a time on the phantom and measure what their reconstructions keep of the retinal vessels.

    python scripts/recipe_study.py --out runs/study [--steps 1000] [NAME ...]

Every variant is ``retina-fast train vqgan --preset tiny --data phantom --num-images 1024 --batch-size 8
--lr 3e-4 --amp bf16`` plus its own options (``VARIANTS``), without the GAN unless it says so, for
``--steps`` steps (a variant may fix its own). Runs that already finished are not trained again (a
killed one resumes). Each is then measured by ``scripts/vessel_contrast.py`` (48 held-out eyes): L1 in
reflectance (all bands, visible bands) and the local vessel contrast at 465/555/570/600/730 nm
(phantom at 555 nm: 0.167). Results accumulate in ``docs/recipe_study/results.json`` and the table
``docs/recipe_study/table.md``; the commands are written beside them.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_GAN = {"gan_warmup_steps": 10 ** 9}
SHIPPED_UP = {"upsample": "transposed"}

# name -> (what it tests, vqgan config overrides, extra command-line options[, steps instead of --steps])
VARIANTS: dict[str, tuple[str, dict, list[str]]] = {
    "f8-old": ("the shipped recipe's design: 2r-1 scaling, band-weighted L1, transposed upsampling",
               {**NO_GAN, **SHIPPED_UP, "f": 8}, ["--normalise", "global", "--band-weights", "std"]),
    "f8-norm": ("+ per-band normalisation (no band weights: the normalisation subsumes them)",
                {**NO_GAN, **SHIPPED_UP, "f": 8}, ["--normalise", "band"]),
    "f8-up": ("+ nearest x2 + conv3 upsampling (global scaling, band weights)",
              {**NO_GAN, "f": 8}, ["--normalise", "global", "--band-weights", "std"]),
    "f8-both": ("per-band normalisation + nearest-conv upsampling", {**NO_GAN, "f": 8}, ["--normalise", "band"]),
    "f4-both": ("f = 4 (32x32x8 latents) with both fixes", {**NO_GAN, "f": 4}, ["--normalise", "band"]),
    "f4-old": ("f = 4 with the old design", {**NO_GAN, **SHIPPED_UP, "f": 4},
               ["--normalise", "global", "--band-weights", "std"]),
    "f4-gn8": ("f = 4, both fixes, GroupNorm 8 groups (thin 16/32-channel layers: 2-4 channels per group "
               "instead of 1)", {**NO_GAN, "f": 4, "gn_groups": 8}, ["--normalise", "band"]),
    "f4-nosam": ("f = 4, both fixes, no spectral-angle term", {**NO_GAN, "f": 4, "spectral_angle_weight": 0.0},
                 ["--normalise", "band"]),
    "f4-lr1e-4": ("f = 4, both fixes, lr 1e-4", {**NO_GAN, "f": 4}, ["--normalise", "band", "--lr", "1e-4"]),
    "f4-gan": ("f = 4, both fixes, PatchGAN + feature matching from step 500",
               {"f": 4, "gan_warmup_steps": 500}, ["--normalise", "band"]),
    "f4-c16": ("f = 4, both fixes, 16 latent channels", {**NO_GAN, "f": 4, "latent_channels": 16},
               ["--normalise", "band"]),
    "f4-dec2": ("f = 4, both fixes, two decoder ResBlocks per stage (the source's; tiny has one)",
                {**NO_GAN, "f": 4, "dec_res_blocks": 2}, ["--normalise", "band"]),
    "f4-adam": ("f = 4, both fixes, Adam betas 0.9, 0.99 (instead of the GAN setting 0.5, 0.9)",
                {**NO_GAN, "f": 4}, ["--normalise", "band", "--betas", "0.9,0.99"]),
    "f4-noclip": ("f = 4, both fixes, no gradient clipping (the norm is ~8 against the clip at 1)",
                  {**NO_GAN, "f": 4}, ["--normalise", "band", "--grad-clip", "0"]),
    "f4-lr1e-3": ("f = 4, both fixes, lr 1e-3", {**NO_GAN, "f": 4}, ["--normalise", "band", "--lr", "1e-3"]),
    "f4-long": ("f = 4, both fixes, 3000 steps", {**NO_GAN, "f": 4}, ["--normalise", "band"], 3000),
    "f2-both": ("f = 2 (64x64x8 latents) with both fixes", {**NO_GAN, "f": 2}, ["--normalise", "band"]),
}


def variant_steps(name: str, default: int) -> int:
    return VARIANTS[name][3] if len(VARIANTS[name]) > 3 else default


def command(name: str, out: Path, steps: int) -> list[str]:
    _, over, extra = VARIANTS[name][:3]
    opts = {"--lr": "3e-4"}
    rest = list(extra)
    while "--lr" in rest:
        i = rest.index("--lr")
        opts["--lr"] = rest[i + 1]
        del rest[i:i + 2]
    return ["retina-fast", "train", "vqgan", "--preset", "tiny", "--data", "phantom", "--out", str(out / name),
            "--steps", str(steps), "--batch-size", "8", "--lr", opts["--lr"], "--num-images", "1024",
            "--num-workers", "2", "--amp", "bf16", "--sample-every", str(steps), "--ckpt-every", "250",
            "--config-json", json.dumps({"vqgan": over}), *rest]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/study", help="where the runs go (default runs/study)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("names", nargs="*", help=f"variants (default all): {', '.join(VARIANTS)}")
    args = p.parse_args(argv)
    out, docs = Path(args.out), ROOT / "docs" / "recipe_study"
    docs.mkdir(parents=True, exist_ok=True)
    results_path = docs / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in args.names or list(VARIANTS):
        run = out / name
        steps = variant_steps(name, args.steps)
        cmd = command(name, out, steps)
        if not (run / "final" / "config.json").is_file():
            resume = ["--resume"] if (run / "checkpoints" / "latest").is_file() else []
            print("+", shlex.join(cmd + resume), flush=True)
            t0 = time.time()
            subprocess.run(cmd + resume, check=True)
            wall = time.time() - t0
        else:
            wall = results.get(name, {}).get("train_s")
        tmp = run / "vessel_contrast.json"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "vessel_contrast.py"), "--json", str(tmp),
                        f"{name}={run}"], check=True)
        rows = json.loads(tmp.read_text())
        results[name] = {"what": VARIANTS[name][0], "steps": steps, "command": shlex.join(cmd),
                         "train_s": wall, **rows[name]}
        results["phantom"] = {"what": "the held-out eyes themselves", **rows["phantom"]}
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        (docs / "table.md").write_text(table(results))
    return 0


def table(results: dict) -> str:
    head = "| variant | what | steps | L1 | visible L1 | C465 | C555 | C570 | C600 | train s |\n|---|---|---|---|---|---|---|---|---|---|\n"
    lines = []
    for name, r in results.items():
        t = f"{r['train_s']:.0f}" if r.get("train_s") else "-"
        lines.append(f"| {name} | {r['what']} | {r.get('steps', '-')} | {r['l1']:.4f} | {r['l1_visible']:.4f} | "
                     f"{r['c465']:.3f} | {r['c555']:.3f} | {r['c570']:.3f} | {r['c600']:.3f} | {t} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
