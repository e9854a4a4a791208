"""``retina-fast degrade IN... --out DIR --seed S``: synthesise low-quality fundus photographs with the
Cofe-Net degradation model (``retina_fast.training.degrade``).

Image i (in command-line order) uses the seed sequence (S, i), i.e. the output equals
``degrade(image, seed=(S, i), ...)``. Outputs are named ``<stem>_<code><ext>`` where the code is
Cofe-Net's 3-bit combination (blur, spot, illumination), e.g. ``101`` = illumination + blur.
The field of view is estimated from each image (``fov_mask``) and everything outside it is zeroed.
"""
from __future__ import annotations

import json
from pathlib import Path

EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}


def add_parser(sub) -> None:
    p = sub.add_parser("degrade", help="degrade clean fundus photographs (Cofe-Net model, seeded)",
                       description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("inputs", nargs="+", metavar="IN", help="PNG / JPEG / TIFF colour fundus images")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="non-negative base seed (default 0)")
    p.add_argument("--kinds", nargs="+", default=["all"], metavar="KIND",
                   help="illumination / spot / blur (any subset), 'all' (default), 'random' (one of the "
                        "7 combinations per image) or a code such as 101 (bits blur, spot, illumination)")
    p.add_argument("--mode", choices=("code", "paper"), default="code",
                   help="'code': the public generator's values (default); 'paper': 10-30 spots, blur noise")
    p.add_argument("--size", type=int, default=None, metavar="N",
                   help="resize to N x N (bicubic) before degrading; Cofe-Net uses 512")
    p.add_argument("--fov-threshold", type=float, default=0.04, metavar="T",
                   help="field-of-view threshold on the max channel, in [0, 1] (default 0.04)")
    p.add_argument("--format", choices=("same", "png", "jpg", "tif"), default="same",
                   help="output format (default: same as the input)")
    p.add_argument("--params", action="store_true", help="also write <output>.json with the sampled parameters")
    p.set_defaults(func=run)


def _kinds(values: list[str]):
    from retina_fast.errors import UserError
    from retina_fast.training.degrade import parse_kinds

    if len(values) == 1 and values[0] == "random":
        return "random"
    try:
        return parse_kinds(values[0] if len(values) == 1 else values)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _read(path: Path, size: int | None):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from retina_fast.errors import UserError

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix.lower() not in EXTENSIONS:
        raise UserError(f"{path}: unsupported extension (use {', '.join(sorted(EXTENSIONS))})")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size:
                im = im.resize((size, size), Image.BICUBIC)
            return np.array(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path}: cannot read image ({exc})") from None


def run(args) -> int:
    from PIL import Image
    from tqdm import tqdm

    from retina_fast.cli import input_files
    from retina_fast.errors import UserError
    from retina_fast.training.degrade import degrade, fov_mask, kinds_code

    if args.seed < 0:
        raise UserError(f"--seed must be non-negative, got {args.seed}")
    if args.size is not None and args.size < 16:
        raise UserError(f"--size must be at least 16, got {args.size}")
    kinds = _kinds(args.kinds)
    paths = input_files(args.inputs)  # fail before writing anything
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(tqdm(paths, desc="degrade", unit="img", disable=len(paths) < 2)):
        img = _read(path, args.size)
        mask = fov_mask(img, args.fov_threshold)
        if not mask.any():
            raise UserError(f"{path}: empty field of view at threshold {args.fov_threshold}")
        out, params = degrade(img, seed=(args.seed, i), kinds=kinds, mode=args.mode, fov_mask=mask,
                              return_params=True)
        ext = path.suffix.lower() if args.format == "same" else "." + args.format
        code = params["code"] if kinds == "random" else kinds_code(kinds)
        target = out_dir / f"{path.stem}_{code}{ext}"
        Image.fromarray(out).save(target, format=EXTENSIONS[ext], **({"quality": 95} if ext in (".jpg", ".jpeg") else {}))
        if args.params:
            meta = {"input": str(path), "seed": [args.seed, i], "params": params}
            target.with_suffix(target.suffix + ".json").write_text(json.dumps(meta, indent=1))
    return 0
