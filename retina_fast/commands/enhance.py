"""``retina-fast enhance IN... --out DIR``: enhance colour fundus photographs with MAGE-Net.

Reads PNG / JPEG / TIFF (8- or 16-bit; greyscale or palette images are converted to RGB), writes
``DIR/<stem>.png`` (8-bit RGB). Images of any size: padded to multiples of 8 and cropped back; images
above ~4 megapixels (or with ``--tile``) are processed in overlapping tiles. Everything outside the
field of view estimated on the input stays black. Same-size images are enhanced in batches.
"""
from __future__ import annotations

from pathlib import Path

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def add_parser(sub) -> None:
    p = sub.add_parser("enhance", help="enhance colour fundus photographs (MAGE-Net)",
                       description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("inputs", nargs="+", metavar="IN", help="PNG / JPEG / TIFF colour fundus images")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--model", default="default",
                   help="'default' (packaged magenet-tiny, then its follow-up stage), a packaged name or a checkpoint / "
                        "training run directory")
    p.add_argument("--backend", default="auto", help="auto (default), torch, cpu or cuda")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the backend's)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="same-size images per forward pass (default: from the image size)")
    p.add_argument("--tile", type=int, default=None, metavar="PX",
                   help="tile side for large images (default: whole image up to ~4 MP; 0 = never tile)")
    p.add_argument("--residual-threshold", type=float, default=None, metavar="T",
                   help="soft threshold on the network's change to each pixel, in [0, 1) (default: the model's "
                        "own, chosen on a validation split; 0 = the network's output as it is)")
    p.add_argument("--work-size", type=int, default=None, metavar="PX",
                   help="enhance on a copy whose shorter side is PX and add the network's change, resized back, to "
                        "the full-size image (default: the model's own, the scale it was trained at; 0 = at the "
                        "image's size)")
    p.add_argument("--then", nargs="+", default=None, metavar="MODEL",
                   help="the stages run after --model, in order ('none': --model alone; default: the model's own "
                        "follow-up stages -- the shipped default has one, magenet-spots, which removes light spots)")
    p.add_argument("--deblur", choices=("auto", "on", "off"), default="auto",
                   help="undo blur read off the field-of-view edge before the networks: auto (default) = as the model "
                        "says (the shipped default does), on, off")
    p.add_argument("-q", "--quiet", "--no-progress", dest="quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def read_image(path: Path):
    """(H, W, 3) uint8 or float32-in-[0, 1] (16-bit / float files) array; UserError naming the file."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from retina_fast.errors import UserError

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix.lower() not in EXTENSIONS:
        raise UserError(f"{path}: unsupported extension (use {', '.join(EXTENSIONS)})")
    arr = None
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError:
            tifffile = None
        if tifffile is not None:
            try:
                arr = np.asarray(tifffile.imread(str(path)))
            except Exception as exc:  # tifffile raises several error types for damaged files
                raise UserError(f"{path}: cannot read TIFF ({exc})") from None
    if arr is None:
        try:
            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im if im.mode in ("RGB", "I;16", "I", "F") else im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read image ({exc})") from None
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar TIFF
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise UserError(f"{path}: expected an RGB image, got an array of shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.uint16:
        return (arr / 65535.0).astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise UserError(f"{path}: float images must hold finite values in [0, 1]")
        return arr.astype(np.float32)
    raise UserError(f"{path}: unsupported pixel type {arr.dtype} (8- or 16-bit, or float in [0, 1])")


def _output_paths(paths: list[Path], out_dir: Path) -> list[Path]:
    """``out_dir/<stem>.png`` per input; an output that would replace one of the inputs is refused."""
    import os

    from retina_fast.errors import UserError

    targets = [out_dir / f"{p.stem}.png" for p in paths]
    for src, dst in zip(paths, targets):
        same = dst.exists() and os.path.samefile(src, dst)
        if same or os.path.abspath(src) == os.path.abspath(dst):
            raise UserError(f"{src}: the output {dst} would overwrite this input; choose another --out")
    return targets


def _prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and check that files can be created in it, before any work is done."""
    from retina_fast.files import temp_beside
    from retina_fast.cli import os_error_text
    from retina_fast.errors import UserError

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        temp_beside(out_dir / "probe").unlink()
    except OSError as exc:
        raise UserError(f"--out {out_dir}: cannot write there ({os_error_text(exc)})") from None


def run(args) -> int:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from retina_fast.files import atomic_path
    from retina_fast.backends import BackendUnavailable
    from retina_fast.cli import input_files
    from retina_fast.errors import UserError
    from retina_fast.enhance import MIN_SIDE, enhance, load_enhancer, work_size_option_error

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.tile is not None and args.tile != 0 and args.tile < 64:
        raise UserError(f"--tile must be 0 or >= 64, got {args.tile}")
    if args.residual_threshold is not None and not 0.0 <= args.residual_threshold < 1.0:  # NaN fails too
        raise UserError(f"--residual-threshold must be in [0, 1), got {args.residual_threshold}")
    if work_size_option_error(args.work_size):
        raise UserError(work_size_option_error(args.work_size))
    then = None
    if args.then is not None:
        then = [] if args.then == ["none"] else args.then
        if "none" in then:
            raise UserError("--then: 'none' stands alone (it means --model without follow-up stages)")
    try:  # a missing or broken model or stage: one line before any work
        enhancer = load_enhancer(args.model)
        for stage in (enhancer.then if then is None else then):
            load_enhancer(stage)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None
    paths = input_files(args.inputs)
    for p in paths:  # fail before any work
        if p.suffix.lower() not in EXTENSIONS:
            raise UserError(f"{p}: unsupported extension (use {', '.join(EXTENSIONS)})")
    out_dir = Path(args.out)
    targets = dict(zip(paths, _output_paths(paths, out_dir)))
    _prepare_out_dir(out_dir)
    batch = max(1, args.batch_size or 4)
    bar = tqdm(total=len(paths), desc="enhance", unit="img", disable=args.quiet or len(paths) < 2)
    for start in range(0, len(paths), batch):
        group: dict[tuple, list[tuple[Path, np.ndarray]]] = {}
        for path in paths[start:start + batch]:
            img = read_image(path)
            if min(img.shape[:2]) < MIN_SIDE:
                raise UserError(f"{path}: {img.shape[1]}×{img.shape[0]} px is smaller than {MIN_SIDE}×{MIN_SIDE}")
            group.setdefault((img.shape, img.dtype.str), []).append((path, img))
        for items in group.values():
            stack = np.stack([img for _, img in items])
            try:
                out = enhance(stack, model=args.model, backend=args.backend, device=args.device,
                              tile=args.tile, batch_size=args.batch_size,
                              residual_threshold=args.residual_threshold, work_size=args.work_size, then=then,
                              deblur={"auto": None, "on": True, "off": False}[args.deblur])
            except (ValueError, TypeError, BackendUnavailable) as exc:
                raise UserError(f"{items[0][0]}: {exc}") from None
            for (path, _), res in zip(items, out):
                if res.dtype != np.uint8:
                    res = np.round(np.clip(res, 0, 1) * 255).astype(np.uint8)
                # written beside the target and renamed: a full disk or a kill never leaves half a file,
                # and an earlier output of the same name stays intact until the new one is complete
                with atomic_path(targets[path]) as tmp:
                    Image.fromarray(res).save(tmp, format="PNG")
            bar.update(len(items))
    bar.close()
    return 0
