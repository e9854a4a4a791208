"""``onnxruntime`` backend (retina_fast/backends/onnxruntime_backend.py): same images as the reference."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx onnxruntime)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnx onnxruntime)")

from retina_fast import _ext, backends  # noqa: E402
from retina_fast.backends import onnxruntime_backend as ortb  # noqa: E402

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"retina_fast._C not loaded ({_ext.load_error})")


@pytest.fixture(scope="module")
def loaded():
    from retina_fast.models import VQGAN, UNet2D
    from retina_fast.models.config import get_preset
    from retina_fast.modelzoo import LoadedLDM, schedule_for

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    vq, unet = VQGAN(cfg.vqgan).eval(), UNet2D(cfg.unet).eval()
    return LoadedLDM(cfg, vq, unet, schedule_for(cfg), vq.latent_range(), tuple(cfg.vqgan.wavelengths))


@pytest.fixture
def registered(monkeypatch, tmp_path):
    """The backend as the registry will hold it (cache in tmp_path)."""
    monkeypatch.setenv("RETINA_FAST_CACHE", str(tmp_path))
    return tmp_path


def test_runner_is_registered():
    assert backends.runner_factory("onnxruntime", "sample") is ortb.ONNXRuntimeRunner
    assert ortb.need_onnxruntime() is None


def test_samples_match_the_torch_backend(loaded, registered):
    from retina_fast.engine import Pipeline

    pipe = Pipeline(loaded, "in-memory tiny")
    ref, ref_lat = pipe.sample(3, 4, seed=5, backend="torch", return_latents=True)
    out, lat = pipe.sample(3, 4, seed=5, backend="onnxruntime", dtype=torch.float32, return_latents=True)
    assert float((lat - ref_lat).abs().max()) <= 1e-4     # fp32 graph: eps agrees to ~1e-6
    assert float((out - ref).abs().max()) <= 1e-4
    assert len(list((registered / "onnxruntime").glob("*.onnx"))) == 1   # the U-Net, exported once, cached


def test_onnx_cache_is_reused_and_keyed_by_weights(loaded, tmp_path):
    first = ortb.cached_onnx(loaded.vqgan, "decoder", (8, 16, 16), tmp_path)
    mtime = first.stat().st_mtime_ns
    assert ortb.cached_onnx(loaded.vqgan, "decoder", (8, 16, 16), tmp_path) == first
    assert first.stat().st_mtime_ns == mtime
    import copy

    other = copy.deepcopy(loaded.vqgan)
    with torch.no_grad():
        other.post_quant.bias.add_(1.0)
    assert ortb.cached_onnx(other, "decoder", (8, 16, 16), tmp_path) != first


def test_rejects_non_fp32(loaded, registered):
    with pytest.raises(ValueError, match="float32"):
        ortb.ONNXRuntimeRunner(loaded, torch.device("cpu"), torch.bfloat16)


def test_enhancer_matches_magenet(tmp_path):
    from retina_fast.models.magenet import MAGENET_PRESETS, MAGENet

    torch.manual_seed(0)
    net = MAGENet(MAGENET_PRESETS["tiny"]).eval()
    enhancer = ortb.ONNXRuntimeEnhancer(net, threads=2, cache_dir=tmp_path)
    images = torch.rand(2, 3, 37, 50)
    with torch.no_grad():
        ref = net.restore(images)
    out = enhancer(images)
    assert out.shape == ref.shape and float((out - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))
    with pytest.raises(ValueError, match="N, 3, H, W"):
        enhancer(images[:, :1])
