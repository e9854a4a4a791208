"""ONNX export of the three networks the engines run: the U-Net step, the VQ-GAN decoder and MAGE-Net.

    export_onnx(model, "unet" | "decoder" | "magenet", "F.onnx", opset=18, dynamic_batch=True,
                external_data=None, dtype=torch.float32) -> Path

What each graph computes (names are the ONNX input / output names; B is the dynamic batch axis, the
other axes are fixed at export time because the networks pad / resize by shape):

    unet     x (B, C, h, w) float, t (B,) int64        -> eps (B, C, h, w)        UNet2D.forward
    decoder  zq (B, D, h, w) float (quantised codes)   -> cube (B, bands, hf, wf)  VQGAN.decode, then
                                                                                  the model's per-band
                                                                                  normalisation inverted:
                                                                                  reflectance in [0, 1]
    magenet  image (B, 3, H, W) float in [0, 1]        -> restored (B, 3, H, W)    MAGENet.restore

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)`` for opset <= 20 (no extra
packages; ~5x faster to export here than the dynamo exporter, which needs ``onnxscript``). Opset >= 21
uses the dynamo exporter, whose graphs use the ONNX ``GroupNormalization`` op (per-channel affine from
opset 21 on; opset 18's version has per-group affine and cannot express ``nn.GroupNorm``). Below 21,
GroupNorm is the standard InstanceNormalization decomposition (reshape -> InstanceNormalization ->
reshape -> Mul/Add), which onnxruntime and TensorRT's ONNX parser both recognise. Attention is exported
from the reference functions (MatMul / Softmax), never from a fused kernel a backend swapped in.

Weights above 1 GiB (or when ``external_data=True``) go to one side file ``F.onnx.data`` (ONNX external
data; protobuf cannot hold more than 2 GiB).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from retina_fast.models.attention import Attention, LinearAttention, linear_attention_ref, softmax_attention_ref
from retina_fast.models.layers import GroupNormSiLU
from retina_fast.models.normalisation import band_affine

__all__ = ["WHATS", "INPUT_NAMES", "OUTPUT_NAMES", "EXTERNAL_DATA_THRESHOLD", "export_onnx", "export_module",
           "default_sample_shape", "example_inputs", "weight_bytes", "architecture_hash", "weights_hash",
           "onnxruntime_session", "run_onnxruntime"]

WHATS = ("unet", "decoder", "magenet")
INPUT_NAMES: dict[str, tuple[str, ...]] = {"unet": ("x", "t"), "decoder": ("zq",), "magenet": ("image",)}
OUTPUT_NAMES: dict[str, tuple[str, ...]] = {"unet": ("eps",), "decoder": ("cube",), "magenet": ("restored",)}
EXTERNAL_DATA_THRESHOLD = 1 << 30
TORCHSCRIPT_MAX_OPSET = 20
DEFAULT_MAGENET_SIZE = 512


class _Decoder(nn.Module):
    """VQ-GAN decode path (post-quant 1x1 conv + decoder + the inverse of the model's normalisation,
    ``model_to_reflectance``): zq (B, D, h, w) -> reflectance cube (B, bands, hf, wf) in [0, 1]. The
    inverse affine r_b = x_b / s_b - t_b / s_b is held as two (bands, 1, 1) buffers."""

    def __init__(self, vqgan: nn.Module) -> None:
        super().__init__()
        self.post_quant = vqgan.post_quant
        self.decoder = vqgan.decoder
        cfg = vqgan.config
        scale, shift = band_affine(cfg, torch.empty(cfg.bands, 1, 1))
        scale = torch.as_tensor(scale, dtype=torch.float32).expand(cfg.bands, 1, 1)
        shift = torch.as_tensor(shift, dtype=torch.float32).expand(cfg.bands, 1, 1)
        self.register_buffer("inv_scale", (1.0 / scale).contiguous())
        self.register_buffer("inv_offset", (-shift / scale).contiguous())

    def forward(self, zq: torch.Tensor) -> torch.Tensor:
        x = self.decoder(self.post_quant(zq))
        return (x * self.inv_scale + self.inv_offset).clamp(0.0, 1.0)


class _Restore(nn.Module):
    """MAGENet.restore as a tensor-in, tensor-out module (MAGENetOutput is not a pytree)."""

    def __init__(self, magenet: nn.Module) -> None:
        super().__init__()
        self.magenet = magenet

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.magenet.restore(image)


def _pick(model: Any, what: str) -> nn.Module:
    """The network ``what`` out of a module or a loaded LDM (anything with ``.unet`` / ``.vqgan``)."""
    from retina_fast.models import VQGAN, UNet2D
    from retina_fast.models.magenet import MAGENet

    if what not in WHATS:
        raise ValueError(f"what must be one of {', '.join(WHATS)}, got {what!r}")
    if what == "unet":
        module = getattr(model, "unet", model)
        expected: type = UNet2D
    elif what == "decoder":
        module = getattr(model, "vqgan", model)
        expected = VQGAN
    else:
        module = getattr(model, "magenet", model)
        expected = MAGENet
    if not isinstance(module, expected):
        raise TypeError(f"export {what!r} needs a {expected.__name__} (or a loaded model holding one), "
                        f"got {type(model).__name__}")
    return module


def export_module(model: Any, what: str) -> nn.Module:
    """The tensor-in / tensor-out module that is exported for ``what`` (shares the model's weights)."""
    module = _pick(model, what)
    if what == "decoder":
        return _Decoder(module)
    if what == "magenet":
        return _Restore(module)
    return module


def default_sample_shape(model: Any, what: str) -> tuple[int, ...]:
    """Per-item input shape (no batch axis) used when none is given.

    unet: the LDM's latent shape (needs a loaded LDM with ``.config.latent_shape``: a bare UNet2D does
    not know its latent side); decoder: (D, s, s) from the VQ-GAN config; magenet: (3, 512, 512)."""
    module = _pick(model, what)
    if what == "unet":
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "latent_shape"):
            raise ValueError("a bare UNet2D does not know its latent side: pass sample_shape=(C, h, w)")
        return tuple(config.latent_shape)
    if what == "decoder":
        cfg = module.config
        return (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    return (3, DEFAULT_MAGENET_SIZE, DEFAULT_MAGENET_SIZE)


def example_inputs(what: str, sample_shape: Sequence[int], batch: int, *, dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs of the right kind: latents ~ N(0, 1) (unet, decoder), an image in [0, 1]
    (magenet), timesteps spread over [0, 1000) for the U-Net."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *sample_shape)
    if what == "magenet":
        return (torch.rand(shape, generator=gen).to(dtype),)
    x = torch.randn(shape, generator=gen).to(dtype)
    if what == "unet":
        return x, torch.randint(0, 1000, (batch,), generator=gen, dtype=torch.int64)
    return (x,)


def _hash_tensors(h: "hashlib._Hash", module: nn.Module, with_data: bool) -> None:
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if with_data:
            h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def architecture_hash(module: nn.Module, *extra: Any) -> str:
    """sha256 (hex) of the module class, its config, every state-dict name / shape / dtype and ``extra``
    (JSON-able): equal for two trainings of one architecture, different for anything else."""
    config = getattr(module, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else config
    h = hashlib.sha256(type(module).__qualname__.encode())
    h.update(json.dumps([config, *extra], sort_keys=True, default=str).encode())
    _hash_tensors(h, module, with_data=False)
    return h.hexdigest()


def weights_hash(module: nn.Module) -> str:
    """sha256 (hex) of every parameter and buffer (names and bytes, state-dict order)."""
    h = hashlib.sha256()
    _hash_tensors(h, module, with_data=True)
    return h.hexdigest()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of parameters + buffers (what the ONNX initialisers will hold)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def _reference_ops(module: nn.Module) -> Iterator[None]:
    """Export the reference math: undo per-instance kernel swaps (GroupNormSiLU.forward, attention_fn)
    that a backend may have installed, and run in eval mode; restore everything afterwards."""
    saved: list[tuple[nn.Module, str, Any]] = []
    for m in module.modules():
        if isinstance(m, GroupNormSiLU) and "forward" in m.__dict__:
            saved.append((m, "forward", m.__dict__.pop("forward")))
        elif isinstance(m, (LinearAttention, Attention)):
            saved.append((m, "attention_fn", m.attention_fn))
            m.attention_fn = linear_attention_ref if isinstance(m, LinearAttention) else softmax_attention_ref
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
        for m, name, value in saved:
            setattr(m, name, value)


def _dynamic_axes(what: str) -> dict[str, dict[int, str]]:
    return {name: {0: "batch"} for name in INPUT_NAMES[what] + OUTPUT_NAMES[what]}


def _torchscript_export(module: nn.Module, inputs: tuple, path: Path, what: str, opset: int,
                        dynamic_batch: bool) -> None:
    with warnings.catch_warnings():
        # Expected and harmless here: the legacy-exporter deprecation notice, and TracerWarnings about
        # shape checks / padding decisions that are constant for the fixed spatial size being exported.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(module, inputs, str(path), input_names=list(INPUT_NAMES[what]),
                          output_names=list(OUTPUT_NAMES[what]), opset_version=opset, do_constant_folding=True,
                          dynamic_axes=_dynamic_axes(what) if dynamic_batch else None, dynamo=False)


def _dynamo_export(module: nn.Module, inputs: tuple, path: Path, what: str, opset: int,
                   dynamic_batch: bool) -> None:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as exc:
        raise RuntimeError(f"opset {opset} > {TORCHSCRIPT_MAX_OPSET} needs torch's dynamo ONNX exporter, which needs "
                           f"the onnxscript package ({exc}); install onnxscript or use opset <= "
                           f"{TORCHSCRIPT_MAX_OPSET}") from exc
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    torch.onnx.export(module, inputs, str(path), input_names=list(INPUT_NAMES[what]),
                      output_names=list(OUTPUT_NAMES[what]), opset_version=opset, dynamo=True,
                      dynamic_shapes=dynamic_shapes, external_data=True)


def export_onnx(model: Any, what: str, out_path: str | Path, *, opset: int = 18, dynamic_batch: bool = True,
                external_data: bool | None = None, dtype: torch.dtype = torch.float32,
                sample_shape: Sequence[int] | None = None, batch: int = 2, exporter: str = "auto") -> Path:
    """Export network ``what`` of ``model`` to ``out_path``; returns the path.

    model: UNet2D / VQGAN / MAGENet, or a loaded LDM (``.unet``, ``.vqgan``, ``.config``).
    sample_shape: per-item input shape without the batch axis (default ``default_sample_shape``);
      spatial sides are fixed in the graph (the U-Net pads odd latent sides by shape).
    dynamic_batch: batch axis symbolic ("batch"); False fixes it to ``batch``.
    external_data: None = automatic (weights > 1 GiB), True / False force it. The side file is
      ``<out_path>.data`` next to the graph; keep the two together.
    dtype: float32 (default; TensorRT on 10.x builds fp16/bf16 engines from it) or float16 / bfloat16
      (a strongly typed graph, for TensorRT >= 11 where precision comes from the graph).
    exporter: "auto" (TorchScript for opset <= 20, dynamo above), "torchscript" or "dynamo".
    """
    import onnx

    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if exporter == "auto":
        exporter = "torchscript" if opset <= TORCHSCRIPT_MAX_OPSET else "dynamo"
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be auto, torchscript or dynamo, got {exporter!r}")
    if exporter == "torchscript" and opset > TORCHSCRIPT_MAX_OPSET:
        raise ValueError(f"the TorchScript exporter supports opset <= {TORCHSCRIPT_MAX_OPSET}, got {opset}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    module = export_module(model, what)
    shape = tuple(sample_shape) if sample_shape is not None else default_sample_shape(model, what)
    if dtype != torch.float32:
        module = copy.deepcopy(module).to(dtype)
    device = next(module.parameters()).device
    inputs = tuple(t.to(device) for t in example_inputs(what, shape, batch, dtype=dtype))
    use_external = weight_bytes(module) > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    data_name = out.name + ".data"
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".onnx-export-") as tmp:
        raw, final = Path(tmp) / "raw" / "model.onnx", Path(tmp) / out.name
        raw.parent.mkdir()
        run = _torchscript_export if exporter == "torchscript" else _dynamo_export
        with _reference_ops(module), torch.no_grad():
            run(module, inputs, raw, what, opset, dynamic_batch)
        proto = onnx.load(str(raw))  # pulls in any side files the exporter wrote for > 2 GiB graphs
        proto.doc_string = f"retina_fast {what}; inputs {INPUT_NAMES[what]} -> outputs {OUTPUT_NAMES[what]}"
        if use_external:
            onnx.save_model(proto, str(final), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(proto, str(final))
        del proto
        onnx.checker.check_model(str(final))  # by path: works with external data and for > 2 GiB graphs
        # Move into place (data first, graph last) so that a concurrent reader never sees half a file.
        if use_external:
            os.replace(final.with_name(data_name), out.with_name(data_name))
        else:
            out.with_name(data_name).unlink(missing_ok=True)
        os.replace(final, out)
    return out


def onnxruntime_session(path: str | Path, *, threads: int | None = None):
    """An onnxruntime CPU session with every graph optimisation on and ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # no busy-waiting between runs: spinning workers would steal the cores from everything else the
    # process does between U-Net calls (the sampler step, decode, other libraries, other backends)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnxruntime(session, what: str, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Run a session on torch inputs (named as ``INPUT_NAMES[what]``); returns the first output as a tensor."""
    feed = {name: t.detach().cpu().numpy() for name, t in zip(INPUT_NAMES[what], inputs)}
    return torch.from_numpy(session.run([OUTPUT_NAMES[what][0]], feed)[0])
