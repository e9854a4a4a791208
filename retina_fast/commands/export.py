"""``retina-fast export {onnx, tensorrt}``: the U-Net step, the VQ-GAN decoder or MAGE-Net as an ONNX
graph (dynamic batch) or a TensorRT engine (see retina_fast/export.py and docs/tensorrt.md).

``--model`` names a packaged model or a checkpoint directory. For ``unet`` / ``decoder`` a preset or
sweep-grid name (``tiny``, ``paper-224``, ``sweep-f8-c8-b128``) that is not a packaged model gives that
architecture with random weights; for ``magenet`` the presets are ``tiny`` and ``large`` (random weights), and
``default`` / a packaged name / a checkpoint directory is a trained enhancer (``default``: the shipped first
stage, ``magenet-tiny``; its follow-up stage is exported by naming it, ``magenet-spots``).
"""
from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a network as ONNX or as a TensorRT engine",
                       description=__doc__.split("\n\n")[0].replace("``", ""))
    fmt = p.add_subparsers(dest="format", required=True, metavar="FORMAT")

    onnx = fmt.add_parser("onnx", help="ONNX graph with a dynamic batch axis (validated by onnxruntime tests)")
    _common(onnx, "F.onnx")
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 17 (default 18; >= 21 needs onnxscript)")
    onnx.add_argument("--batch", type=int, default=None, metavar="N",
                      help="fix the batch axis to N (default: dynamic batch)")
    onnx.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="graph precision (default fp32)")
    onnx.add_argument("--external-data", action="store_true",
                      help="always write weights to F.onnx.data (automatic above 1 GiB)")
    onnx.set_defaults(func=run_onnx)

    trt = fmt.add_parser("tensorrt", help="TensorRT engine (needs a CUDA GPU and the tensorrt package)")
    _common(trt, "F.engine")
    prec = trt.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_const", dest="precision", const="fp16", help="fp16 engine")
    prec.add_argument("--bf16", action="store_const", dest="precision", const="bf16", help="bf16 engine")
    trt.add_argument("--min-batch", type=int, default=1, metavar="N", help="profile minimum batch (default 1)")
    trt.add_argument("--opt-batch", type=int, default=16, metavar="N", help="profile optimum batch (default 16)")
    trt.add_argument("--max-batch", type=int, default=64, metavar="N", help="profile maximum batch (default 64)")
    trt.set_defaults(func=run_tensorrt, precision="fp32")


def _common(p, out_example: str) -> None:
    p.add_argument("--model", default="default", help="packaged model, checkpoint directory or preset name")
    p.add_argument("--what", required=True, choices=("unet", "decoder", "magenet"), help="which network")
    p.add_argument("--out", required=True, metavar=out_example, help="output file")
    p.add_argument("--size", type=int, default=None, metavar="S",
                   help="spatial side of the input: latent side (unet, decoder; default the model's) or "
                        "image side (magenet; default 512)")


def _note(message: str) -> None:
    print(f"retina-fast export: {message}", file=sys.stderr)


def load_for_export(model: str, what: str):
    """The object ``export_onnx`` takes for (model, what): a loaded LDM, a stand-in built from a preset
    (random weights), or a MAGENet."""
    from retina_fast.errors import UserError

    if what == "magenet":
        return _load_magenet(model)
    from retina_fast.models import VQGAN, UNet2D
    from retina_fast.models.config import get_preset
    from retina_fast.modelzoo import load_ldm

    try:
        return load_ldm(model)
    except FileNotFoundError:
        try:
            config = get_preset(model)
        except KeyError:
            raise UserError(f"{model!r} is neither a packaged model, a checkpoint directory nor a preset") from None
    _note(f"{model!r} is not a packaged model: exporting the {model} architecture with random weights")
    return types.SimpleNamespace(config=config, unet=UNet2D(config.unet).eval(), vqgan=VQGAN(config.vqgan).eval())


def _load_magenet(model: str):
    """A preset name (tiny, large): that architecture with random weights; anything else: the trained enhancer
    it names ("default" = the shipped first stage, a packaged name such as magenet-spots, or a checkpoint / run
    directory), its weights verified (``retina_fast.enhance.load_enhancer``). One network: a follow-up stage
    is exported by naming it."""
    import copy

    from retina_fast.checkpoint import CheckpointError, load_checkpoint, load_state_into
    from retina_fast.enhance import load_enhancer
    from retina_fast.errors import UserError
    from retina_fast.models.magenet import MAGENET_PRESETS, MAGENet, MAGENetConfig

    if model in MAGENET_PRESETS:
        _note(f"MAGE-Net preset {model!r}: exporting random weights")
        return MAGENet(MAGENET_PRESETS[model]).eval()
    try:
        return copy.deepcopy(load_enhancer(model).model).eval()
    except (FileNotFoundError, CheckpointError) as exc:
        path = Path(model)
        if path.is_dir() and "magenet" in (load_checkpoint(path, [])[0].get("weights") or {}):
            doc, states = load_checkpoint(path, ["magenet"])  # a checkpoint holding a 'magenet' module
            net = MAGENet(MAGENetConfig.from_dict(doc.get("architecture", {})))
            load_state_into(net, states["magenet"], str(path / doc["weights"]["magenet"]["file"]))
            return net.eval()
        raise UserError(f"MAGE-Net model {model!r}: {exc}; presets (random weights): "
                        f"{', '.join(MAGENET_PRESETS)}") from None


def _sample_shape(loaded, what: str, size: int | None):
    from retina_fast.errors import UserError
    from retina_fast.export import default_sample_shape

    shape = default_sample_shape(loaded, what)
    if size is None:
        return shape
    if size < 1:
        raise UserError(f"--size must be >= 1, got {size}")
    return (shape[0], size, size)


def run_onnx(args) -> int:
    import torch

    from retina_fast.errors import UserError
    from retina_fast.export import export_onnx

    if args.opset < 17:
        raise UserError(f"--opset must be >= 17, got {args.opset}")
    if args.batch is not None and args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    loaded = load_for_export(args.model, args.what)
    shape = _sample_shape(loaded, args.what, args.size)
    try:
        out = export_onnx(loaded, args.what, args.out, opset=args.opset, dynamic_batch=args.batch is None,
                          batch=args.batch or 2, external_data=True if args.external_data else None,
                          dtype=getattr(torch, DTYPES[args.dtype]), sample_shape=shape)
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    batch = "dynamic" if args.batch is None else str(args.batch)
    print(f"{out}  ({args.what}, per-item input {shape}, batch {batch}, opset {args.opset}, {args.dtype})")
    return 0


def run_tensorrt(args) -> int:
    from retina_fast import backends
    from retina_fast.errors import UserError

    if not 1 <= args.min_batch <= args.opt_batch <= args.max_batch:
        raise UserError(f"need 1 <= --min-batch <= --opt-batch <= --max-batch, got "
                        f"{args.min_batch}, {args.opt_batch}, {args.max_batch}")
    reasons = backends.get("tensorrt").not_supported_reasons("cuda")
    if reasons:
        raise UserError("cannot build TensorRT engines here: " + "; ".join(reasons))
    from retina_fast.backends.tensorrt_backend import EngineSpec, ensure_engine

    loaded = load_for_export(args.model, args.what)
    shape = _sample_shape(loaded, args.what, args.size)
    spec = EngineSpec(args.what, tuple(shape), args.precision, args.min_batch, args.opt_batch, args.max_batch)
    module = {"unet": getattr(loaded, "unet", None), "decoder": getattr(loaded, "vqgan", None)}.get(args.what, loaded)
    engine = ensure_engine(module.to("cuda"), spec, "cuda")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(engine, args.out)
    print(f"{args.out}  ({args.what}, {args.precision}, batch {args.min_batch}..{args.max_batch}; cached as {engine})")
    return 0
