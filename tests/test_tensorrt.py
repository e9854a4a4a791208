"""TensorRT backend (retina_fast/backends/tensorrt_backend.py).

The pure-Python parts (engine spec and profile shapes, cache keys and paths, ONNX dtype choice, runner
registration) run everywhere. Tests marked ``tensorrt`` need a CUDA GPU and the tensorrt package and skip
elsewhere with the backend's own reasons (tests/conftest.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retina_fast import backends
from retina_fast.backends import tensorrt_backend as trtb
from retina_fast.backends.tensorrt_backend import DeviceInfo, EngineSpec
from retina_fast.models import VQGAN, UNet2D
from retina_fast.models.config import get_preset
from retina_fast.models.magenet import MAGENET_PRESETS, MAGENet

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), "10.13.0.35")


def _tiny_unet(seed: int = 0) -> UNet2D:
    torch.manual_seed(seed)
    return UNet2D(get_preset("tiny").unet).eval()


def test_profile_shapes_vary_only_the_batch():
    spec = EngineSpec("unet", (8, 15, 13), "fp16", 1, 4, 32)
    assert spec.profile_shapes() == {"x": ((1, 8, 15, 13), (4, 8, 15, 13), (32, 8, 15, 13)),
                                     "t": ((1,), (4,), (32,))}
    assert EngineSpec("decoder", (8, 28, 28), "bf16", 2, 2, 2).profile_shapes() == {
        "zq": ((2, 8, 28, 28), (2, 8, 28, 28), (2, 8, 28, 28))}
    assert set(EngineSpec("magenet", (3, 512, 512)).profile_shapes()) == {"image"}


@pytest.mark.parametrize("kwargs, message", [
    ({"what": "encoder"}, "what"),
    ({"precision": "int8"}, "precision"),
    ({"min_batch": 0}, "min_batch"),
    ({"min_batch": 8, "opt_batch": 4}, "min_batch"),
    ({"opt_batch": 128, "max_batch": 64}, "max_batch"),
])
def test_spec_rejects_bad_values(kwargs, message):
    base = {"what": "unet", "sample_shape": (8, 16, 16)}
    with pytest.raises(ValueError, match=message):
        EngineSpec(**{**base, **kwargs})


def test_structure_hash_ignores_weights_but_not_architecture_or_spec():
    spec = EngineSpec("unet", (8, 16, 16))
    a, b = _tiny_unet(0), _tiny_unet(1)
    assert trtb.structure_hash(a, spec) == trtb.structure_hash(b, spec)       # new weights: refit
    assert trtb.weights_hash(a) != trtb.weights_hash(b)
    assert trtb.weights_hash(a) == trtb.weights_hash(_tiny_unet(0))
    other = UNet2D(get_preset("sweep-f8-c8-b128").unet)
    assert trtb.structure_hash(other, spec) != trtb.structure_hash(a, spec)   # new architecture: rebuild
    for changed in (EngineSpec("unet", (8, 16, 16), "bf16"), EngineSpec("unet", (8, 16, 16), max_batch=128),
                    EngineSpec("unet", (8, 15, 15))):
        assert trtb.structure_hash(a, changed) != trtb.structure_hash(a, spec)


def test_engine_path_names_gpu_and_tensorrt_version(tmp_path):
    spec = EngineSpec("decoder", (8, 28, 28), "fp16", 1, 16, 64)
    path = trtb.engine_path("ab" * 32, spec, H100, cache_dir=tmp_path)
    assert path.parent == tmp_path / "tensorrt"
    assert path.name == "decoder-abababababababab-nvidia-h100-80gb-hbm3-sm90-trt10.13.0.35-fp16-b1-16-64.engine"
    other_gpu = DeviceInfo("NVIDIA H200", (9, 0), "10.13.0.35")
    other_trt = DeviceInfo(H100.gpu_name, (9, 0), "11.0.0")
    assert len({trtb.engine_path("ab" * 32, spec, d, tmp_path) for d in (H100, other_gpu, other_trt)}) == 3
    timing = trtb.timing_cache_path(H100, tmp_path)
    assert timing == tmp_path / "tensorrt" / "timing-nvidia-h100-80gb-hbm3-sm90-trt10.13.0.35.cache"


def test_cache_dir_comes_from_env_module(tmp_path, monkeypatch):
    monkeypatch.setenv("RETINA_FAST_CACHE", str(tmp_path / "cache"))
    path = trtb.engine_path("0" * 64, EngineSpec("magenet", (3, 64, 64)), H100)
    assert path.parent == tmp_path / "cache" / "tensorrt"


def test_onnx_dtype_follows_tensorrt_generation():
    assert trtb.onnx_dtype("fp16", has_precision_flags=True) is torch.float32     # TensorRT 10: builder flags
    assert trtb.onnx_dtype("fp16", has_precision_flags=False) is torch.float16    # TensorRT 11: strong typing
    assert trtb.onnx_dtype("bf16", has_precision_flags=False) is torch.bfloat16
    assert trtb.onnx_dtype("fp32", has_precision_flags=False) is torch.float32


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_backend_reports_why_it_is_unusable():
    reasons = backends.get("tensorrt").not_supported_reasons("cuda")
    if _installed("tensorrt") and torch.cuda.is_available():
        pytest.skip("TensorRT is usable here")
    assert reasons
    if not _installed("tensorrt"):
        assert any("tensorrt Python package is not installed" in r for r in reasons)


def test_pure_parts_import_no_tensorrt():
    code = ("import sys, retina_fast.backends.tensorrt_backend as t; from retina_fast.models.magenet import MAGENet;"
            "t.structure_hash(MAGENet(), t.EngineSpec('magenet', (3, 64, 64)));"
            "print('tensorrt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("with_fake_tensorrt", [False, True])
def test_registry_names_runners_by_module_path_and_imports_neither(tmp_path, with_fake_tensorrt):
    """The registry holds the tensorrt runners as module paths: importing it (or building the factory) never
    imports the tensorrt package, and the backend says why it is unusable exactly when the package is missing."""
    env = dict(os.environ)
    if with_fake_tensorrt:
        (tmp_path / "tensorrt").mkdir()
        (tmp_path / "tensorrt" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    code = ("import sys, retina_fast.backends as b; "
            "print(any('tensorrt Python package' in r for r in b.get('tensorrt').not_supported_reasons('cuda'))); "
            "print('retina_fast.backends.tensorrt_backend' in sys.modules); "
            "f = b.runner_factory('tensorrt', 'sample'); print(f.__name__, 'tensorrt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    missing, imported_backend, factory = out.stdout.split("\n")[:3]
    assert missing == str(not with_fake_tensorrt)
    assert imported_backend == "False"
    assert factory == "TensorRTRunner False"


# --- on a machine with a CUDA GPU and TensorRT ---------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RETINA_FAST_CACHE", str(tmp_path))
    return tmp_path


def _max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max()) / max(1.0, float(ref.abs().max()))


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision, tol", [("fp32", 1e-3), ("fp16", 3e-2), ("bf16", 8e-2)])
def test_unet_engine_matches_torch_and_refits(cache, precision, tol):
    unet = _tiny_unet(0).cuda()
    spec = EngineSpec("unet", (8, 15, 13), precision, 1, 4, 8)
    path = trtb.ensure_engine(unet, spec)
    engine = trtb.TensorRTEngine(path)
    x = torch.randn(3, 8, 15, 13, device="cuda")
    t = torch.tensor([1, 500, 999], device="cuda")
    with torch.no_grad():
        assert _max_rel_err(engine(x, t), unet(x, t)) <= tol
        assert _max_rel_err(engine(x.repeat(4, 1, 1, 1), t.repeat(4)), unet(x, t).repeat(4, 1, 1, 1)) <= tol  # > max
    # Same architecture, new weights: the cached engine is refitted in place (same file), not rebuilt.
    new = _tiny_unet(1).cuda()
    assert trtb.ensure_engine(new, spec) == path
    assert trtb.ensure_engine(new, spec) == path  # now up to date: nothing to do
    with torch.no_grad():
        assert _max_rel_err(trtb.TensorRTEngine(path)(x, t), new(x, t)) <= tol
    assert trtb.timing_cache_path(DeviceInfo.current(), cache).is_file()


@pytest.mark.tensorrt
def test_sampling_with_tensorrt_backend_matches_cuda(cache):
    from retina_fast.engine import Pipeline
    from retina_fast.modelzoo import LoadedLDM, schedule_for

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    vq, unet = VQGAN(cfg.vqgan).eval(), UNet2D(cfg.unet).eval()
    loaded = LoadedLDM(cfg, vq, unet, schedule_for(cfg), vq.latent_range(), tuple(cfg.vqgan.wavelengths))
    pipe = Pipeline(loaded, "in-memory tiny")
    ref = pipe.sample(3, 5, seed=7, backend="torch", device="cuda")
    out = pipe.sample(3, 5, seed=7, backend="tensorrt", device="cuda", dtype=torch.float32)
    # fp32 engines (TF32 off): eps agrees to ~1e-5, so a rare nearest-code flip is all that can differ.
    assert out.shape == ref.shape and float((out - ref).abs().mean()) <= 1e-3


@pytest.mark.tensorrt
def test_enhancer_matches_magenet(cache):
    torch.manual_seed(0)
    net = MAGENet(MAGENET_PRESETS["tiny"]).eval().cuda()
    enhancer = trtb.TensorRTEnhancer(net, precision="fp32", max_batch=2)
    images = torch.rand(3, 3, 45, 70, device="cuda")
    with torch.no_grad():
        assert _max_rel_err(enhancer(images), net.restore(images)) <= 1e-2


@pytest.mark.tensorrt
def test_cli_export_tensorrt(cache, tmp_path):
    from retina_fast.cli import main

    out = tmp_path / "dec.engine"
    assert main(["export", "tensorrt", "--model", "tiny", "--what", "decoder", "--out", str(out), "--fp16",
                 "--min-batch", "1", "--opt-batch", "2", "--max-batch", "4"]) == 0
    assert out.stat().st_size > 0
