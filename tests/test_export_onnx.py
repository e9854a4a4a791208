"""ONNX export (retina_fast/export.py) validated with onnxruntime against eager fp32 torch.

Tolerance (fp32 graphs): max |onnxruntime - torch| <= 1e-4 * max(1, max |torch|) — relative to the
output scale; measured errors are ~3e-6 at outputs of magnitude ~2 (full paper-224 U-Net included).
fp16 graphs: <= 1e-2 * max(1, max |torch fp32|). Every case runs batch 1 and 3 through one session
exported with a dynamic batch axis (traced at batch 2).

``paper-224``: the decoder runs at full size; the U-Net at reduced width (the sweep grid's
``sweep-f8-c8-b128``: same 28x28x8 latents, levels, heads and blocks, base 128 instead of 512), because
the full 556 M-parameter U-Net takes ~2.5 min and ~5 GB to export and validate on a 2-core machine
(done once by hand: max abs error 2.6e-6, see docs/tensorrt.md). MAGE-Net's large preset runs at full
width on a small image.
"""
from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx onnxruntime)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnx onnxruntime)")

from retina_fast import export as ex  # noqa: E402
from retina_fast.models import VQGAN, UNet2D  # noqa: E402
from retina_fast.models.config import get_preset  # noqa: E402
from retina_fast.models.magenet import MAGENET_PRESETS, MAGENet  # noqa: E402

FP32_RTOL = 1e-4


def _models(preset: str, unet_preset: str | None = None, magenet_preset: str = "tiny") -> dict:
    torch.manual_seed(0)
    return {"unet": UNet2D(get_preset(unet_preset or preset).unet).eval(),
            "decoder": VQGAN(get_preset(preset).vqgan).eval(),
            "magenet": MAGENet(MAGENET_PRESETS[magenet_preset]).eval()}


@pytest.fixture(scope="module")
def tiny() -> dict:
    return _models("tiny")


def _check(model, what, shape, path, *, rtol=FP32_RTOL, dtype=torch.float32, **kwargs) -> None:
    out_path = ex.export_onnx(model, what, path, sample_shape=shape, dtype=dtype, **kwargs)
    session = ex.onnxruntime_session(out_path, threads=2)
    module = ex.export_module(model, what)
    for batch in (1, 3):
        inputs = ex.example_inputs(what, shape, batch, seed=batch)
        with torch.no_grad():
            ref = module(*(t.float() if t.is_floating_point() else t for t in inputs))
        out = ex.run_onnxruntime(session, what, [t.to(dtype) if t.is_floating_point() else t for t in inputs])
        assert out.shape == ref.shape
        err = float((out.float() - ref).abs().max())
        assert err <= rtol * max(1.0, float(ref.abs().max())), f"{what} batch {batch}: max abs err {err}"


@pytest.mark.parametrize("what, shape", [
    ("unet", (8, 16, 16)),
    ("unet", (8, 15, 13)),       # odd latent sides: the U-Net pads to a multiple of 4 and crops back
    ("decoder", (8, 16, 16)),
    ("decoder", (8, 7, 9)),
    ("magenet", (3, 45, 70)),    # not a multiple of 8: MAGE-Net pads (reflect) and crops
])
def test_tiny_matches_torch(tiny, tmp_path, what, shape):
    _check(tiny[what], what, shape, tmp_path / f"{what}.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("what, shape", [("unet", (8, 28, 28)), ("unet", (8, 27, 27)), ("decoder", (8, 28, 28)),
                                         ("magenet", (3, 40, 56))])
def test_paper224_matches_torch(tmp_path, what, shape):
    models = _models("paper-224", unet_preset="sweep-f8-c8-b128", magenet_preset="large")
    _check(models[what], what, shape, tmp_path / f"{what}.onnx")


def test_graph_is_plain_onnx_with_dynamic_batch(tiny, tmp_path):
    path = ex.export_onnx(tiny["unet"], "unet", tmp_path / "u.onnx", sample_shape=(8, 16, 16))
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert [i.name for i in model.graph.input] == ["x", "t"] and model.graph.output[0].name == "eps"
    for value in (model.graph.input[0], model.graph.input[1], model.graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64
    ops = {n.op_type for n in model.graph.node}
    assert {"InstanceNormalization", "MatMul", "Softmax", "Conv"} <= ops  # GroupNorm decomposed, attention plain
    assert not any(op.startswith("ATen") for op in ops)


def test_static_batch(tiny, tmp_path):
    path = ex.export_onnx(tiny["decoder"], "decoder", tmp_path / "d.onnx", dynamic_batch=False, batch=3)
    dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 3 and not dim.dim_param


def test_external_data_forced(tiny, tmp_path):
    path = tmp_path / "sub" / "u.onnx"
    _check(tiny["unet"], "unet", (8, 16, 16), path, external_data=True)
    data = path.with_name("u.onnx.data")
    assert data.is_file() and data.stat().st_size >= 0.9 * ex.weight_bytes(tiny["unet"])
    assert path.stat().st_size < 0.1 * data.stat().st_size
    assert sorted(p.name for p in path.parent.iterdir()) == ["u.onnx", "u.onnx.data"]  # no temp files left


def test_external_data_automatic_above_threshold(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "EXTERNAL_DATA_THRESHOLD", 1024)
    path = ex.export_onnx(tiny["decoder"], "decoder", tmp_path / "d.onnx")
    assert path.with_name("d.onnx.data").is_file()
    monkeypatch.setattr(ex, "EXTERNAL_DATA_THRESHOLD", 1 << 40)
    path = ex.export_onnx(tiny["decoder"], "decoder", tmp_path / "d.onnx")  # re-export inline: side file removed
    assert not path.with_name("d.onnx.data").exists()


def test_fp16_graph(tiny, tmp_path):
    _check(tiny["decoder"], "decoder", (8, 16, 16), tmp_path / "d16.onnx", dtype=torch.float16, rtol=1e-2)
    model = onnx.load(str(tmp_path / "d16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_exports_reference_ops_even_under_a_backend_table(tiny, tmp_path):
    """A backend's op table in force while exporting is not exported: the graph holds the references."""
    from retina_fast.ops.table import OpTable, use_table

    unet = tiny["unet"]
    broken = OpTable("broken", {"multihead_attention": lambda m, qkv: torch.zeros_like(qkv[:, :m.heads * m.head_dim]),
                                "group_norm_silu": lambda m, x, scale_shift=None: x})
    with use_table(broken):
        path = ex.export_onnx(unet, "unet", tmp_path / "u.onnx", sample_shape=(8, 16, 16))
    inputs = ex.example_inputs("unet", (8, 16, 16), 2)
    out = ex.run_onnxruntime(ex.onnxruntime_session(path), "unet", inputs)
    with torch.no_grad():
        ref = unet(*inputs)
    assert float((out - ref).abs().max()) <= FP32_RTOL * max(1.0, float(ref.abs().max()))


def test_loaded_ldm_gives_default_shapes():
    import types

    cfg = get_preset("tiny")
    loaded = types.SimpleNamespace(config=cfg, unet=UNet2D(cfg.unet), vqgan=VQGAN(cfg.vqgan))
    assert ex.default_sample_shape(loaded, "unet") == cfg.latent_shape
    assert ex.default_sample_shape(loaded, "decoder") == cfg.latent_shape  # tiny: (8, 32, 32)
    assert ex.default_sample_shape(MAGENet(MAGENET_PRESETS["tiny"]), "magenet") == (3, 512, 512)


def test_bad_arguments(tiny, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        ex.export_onnx(tiny["decoder"], "decoder", tmp_path / "d.onnx", opset=16)
    with pytest.raises(ValueError, match="what"):
        ex.export_onnx(tiny["decoder"], "encoder", tmp_path / "d.onnx")
    with pytest.raises(TypeError, match="VQGAN"):
        ex.export_onnx(tiny["unet"], "decoder", tmp_path / "d.onnx")
    with pytest.raises(ValueError, match="latent side"):
        ex.export_onnx(tiny["unet"], "unet", tmp_path / "u.onnx")
    with pytest.raises(ValueError, match="TorchScript exporter"):
        ex.export_onnx(tiny["decoder"], "decoder", tmp_path / "d.onnx", opset=21, exporter="torchscript")


def test_dynamo_exporter_groupnormalization(tiny, tmp_path):
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter (opset >= 21) needs onnxscript")
    _check(tiny["decoder"], "decoder", (8, 16, 16), tmp_path / "d21.onnx", opset=21)
    assert "GroupNormalization" in {n.op_type for n in onnx.load(str(tmp_path / "d21.onnx")).graph.node}


# --- CLI ---------------------------------------------------------------------------------------------

def test_cli_export_onnx(tmp_path, capsys):
    from retina_fast.cli import main

    out = tmp_path / "dec.onnx"
    assert main(["export", "onnx", "--model", "tiny", "--what", "decoder", "--out", str(out), "--size", "5"]) == 0
    graph = onnx.load(str(out)).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [8, 5, 5]
    assert "dynamic" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["export", "onnx", "--model", "nope", "--what", "unet", "--out", "x.onnx"], "neither"),
    (["export", "onnx", "--model", "tiny", "--what", "unet", "--out", "x.onnx", "--batch", "0"], "--batch"),
    (["export", "onnx", "--model", "tiny", "--what", "unet", "--out", "x.onnx", "--opset", "13"], "--opset"),
    (["export", "onnx", "--model", "huge", "--what", "magenet", "--out", "x.onnx"], "presets"),
    (["export", "tensorrt", "--model", "tiny", "--what", "unet", "--out", "x.engine", "--max-batch", "0"], "batch"),
])
def test_cli_bad_input(argv, message, capsys, tmp_path, monkeypatch):
    from retina_fast.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "retina-fast export: error:" in err and message in err


def test_cli_export_tensorrt_reports_why_not(tmp_path, capsys):
    from retina_fast import backends
    from retina_fast.cli import main

    reasons = backends.get("tensorrt").not_supported_reasons("cuda")
    if not reasons:
        pytest.skip("TensorRT is usable here; covered by tests/test_tensorrt.py")
    argv = ["export", "tensorrt", "--model", "tiny", "--what", "unet", "--out", str(tmp_path / "u.engine"), "--fp16"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot build TensorRT engines here" in err and reasons[-1] in err
    assert not (tmp_path / "u.engine").exists()


def test_cli_exports_the_trained_enhancers_not_random_weights(tmp_path, capsys):
    """--what magenet with --model default / a packaged enhancer exports its trained weights (it once built the
    tiny preset with random weights for "default" and refused packaged names)."""
    from retina_fast.cli import main
    from retina_fast.enhance import load_enhancer

    for model, name in (("default", "magenet-tiny"), ("magenet-spots", "magenet-spots")):
        out = tmp_path / f"{name}.onnx"
        assert main(["export", "onnx", "--model", model, "--what", "magenet", "--out", str(out), "--size", "48"]) == 0
        captured = capsys.readouterr()
        assert "random weights" not in captured.out + captured.err
        session = ex.onnxruntime_session(out, threads=2)
        inputs = ex.example_inputs("magenet", (3, 48, 48), 2, seed=0)
        with torch.no_grad():
            ref = load_enhancer(name).model.restore(inputs[0])
        got = ex.run_onnxruntime(session, "magenet", inputs)
        assert float((got - ref).abs().max()) <= FP32_RTOL * max(1.0, float(ref.abs().max()))
    assert main(["export", "onnx", "--model", "tiny", "--what", "magenet", "--out", str(tmp_path / "r.onnx"),
                 "--size", "48"]) == 0
    captured = capsys.readouterr()
    assert "random weights" in captured.out + captured.err
