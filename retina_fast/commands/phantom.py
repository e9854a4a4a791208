"""``retina-fast phantom``: render phantom eyes to a folder (cubes, masks, colour images, manifest).

For eye ``i`` (seed = ``--seed`` + i) it writes ``phantom_<seed>.<ext>`` (the cube with its
wavelengths), ``phantom_<seed>_masks.npz`` (artery, vein, onh, fovea, fov) and
``phantom_<seed>_rgb.png`` (the colour fundus rendering), then ``manifest.json`` (files, seeds,
size, wavelengths, per-eye parameters) and, with ``--preview``, ``preview.png`` (a contact sheet of
the first few eyes, see ``retina_fast.preview``). The output folder can be read back with
``retina_fast.data.CubeFolderDataset``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

FORMATS = {"npy": ".npy", "npz": ".npz", "tiff": ".tif", "h5": ".h5"}
PREVIEW_ROWS = 4


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "phantom",
        help="render hyperspectral retina phantoms (cubes + masks) to a folder",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
    )
    p.add_argument("--num-images", "--n", dest="n", type=int, default=16, help="number of eyes")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--format", choices=sorted(FORMATS), default="npy",
                   help="cube file format (default npy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first eye; eye i uses seed + i (default 0)")
    p.add_argument("--preview", action="store_true", help="also write preview.png (contact sheet)")
    p.add_argument("-q", "--quiet", "--no-progress", dest="quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _check_args(args) -> None:
    from retina_fast.errors import UserError
    from retina_fast.phantom import MIN_SIZE

    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.size < MIN_SIZE:
        raise UserError(f"--size must be at least {MIN_SIZE}, got {args.size}")
    if args.seed < 0:
        raise UserError(f"--seed must be non-negative, got {args.seed}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    needs = {"tiff": "tifffile", "h5": "h5py"}.get(args.format)
    if needs:
        import importlib.util

        if importlib.util.find_spec(needs) is None:
            raise UserError(
                f"--format {args.format} needs the optional package '{needs}' (pip install {needs})")


def run(args) -> int:
    _check_args(args)
    import numpy as np
    import torch
    from PIL import Image
    from tqdm import tqdm

    import retina_fast
    from retina_fast import io
    from retina_fast.phantom import render

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ext = FORMATS[args.format]
    entries, preview = [], []
    for i in tqdm(range(args.n), desc="phantom", unit="eye", disable=args.quiet):
        seed = args.seed + i
        ph = render(seed, args.size)
        wavelengths = ph.wavelengths
        stem = f"phantom_{seed:06d}"
        cube_path = io.save_cube(out / f"{stem}{ext}", ph.cube, ph.wavelengths,
                                 metadata={"source": "retina_fast.phantom", "seed": seed})
        io.save_masks(out / f"{stem}_masks.npz", ph.masks)
        rgb8 = (ph.rgb.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
        Image.fromarray(rgb8).save(out / f"{stem}_rgb.png")
        entries.append({"seed": seed, "cube": cube_path.name, "masks": f"{stem}_masks.npz",
                        "rgb": f"{stem}_rgb.png", "params": ph.params})
        if args.preview and len(preview) < PREVIEW_ROWS:
            preview.append(ph)
    manifest = {"generator": "retina_fast.phantom", "version": retina_fast.__version__, "n": args.n,
                "size": args.size, "format": args.format, "first_seed": args.seed,
                "wavelengths": list(wavelengths), "items": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if preview:
        from retina_fast.preview import contact_sheet

        contact_sheet(torch.stack([p.cube for p in preview]), preview[0].wavelengths,
                      [p.masks for p in preview], out / "preview.png",
                      rgb=torch.stack([p.rgb for p in preview]),
                      titles=[f"seed {p.params['seed']} ({p.params['eye']})" for p in preview])
    print(f"{args.n} phantom eyes ({args.size}x{args.size}, {len(wavelengths)} bands, "
          f"{args.format}) -> {out}")
    return 0
