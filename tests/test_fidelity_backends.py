"""Per-band normalisation and both decoder upsamplings through every sampling backend and the exports:
each must decode exactly as the reference (``training.reference.decode_latents``) does, on odd shapes."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from retina_fast import _ext
from retina_fast.engine import Pipeline
from retina_fast.models.normalisation import model_to_reflectance

from _small_model import PER_BAND, small_loaded

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"extension not loaded: {_ext.load_error}")
needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")

VARIANTS = {"per-band+nearest_conv": {**PER_BAND, "upsample": "nearest_conv"},
            "per-band+transposed": {**PER_BAND, "upsample": "transposed"},
            "global+nearest_conv/zeros": {"upsample": "nearest_conv", "padding_mode": "zeros"}}


def relerr(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=list(VARIANTS))
def pipe(request):
    return Pipeline(small_loaded(3, **VARIANTS[request.param]), request.param)


def test_torch_backend_decodes_as_the_reference(pipe):
    from retina_fast.training.reference import decode_latents

    cube, lat = pipe.sample(3, 6, seed=2, backend="torch", return_latents=True)
    torch.testing.assert_close(cube, decode_latents(pipe.loaded, lat), rtol=0, atol=0)
    if pipe.config.vqgan.per_band_normalisation:  # the per-band inverse is really applied
        vq = pipe.loaded.vqgan
        idx, _ = vq.codebook_nearest(torch.zeros(1, vq.config.latent_channels, 8, 8))
        x = vq.decode_indices(idx)
        assert not torch.allclose(model_to_reflectance(x, vq.config), ((x + 1) / 2).clamp(0, 1))


@needs_ext
def test_cpu_fp32_drop_in_and_bf16_tolerance(pipe):
    from retina_fast.bench import plain_bf16_pipeline

    ref_cube, ref_lat = pipe.sample(3, 8, seed=4, backend="torch", return_latents=True)
    cube, lat = pipe.sample(3, 8, seed=4, backend="cpu", dtype=torch.float32, return_latents=True)
    assert relerr(lat, ref_lat) <= 1e-4 and relerr(cube, ref_cube) <= 1e-4
    fast = pipe.sample(3, 8, seed=4, backend="cpu", dtype=torch.bfloat16)
    plain = plain_bf16_pipeline(pipe).sample(3, 8, seed=4, backend="torch")
    assert relerr(fast, ref_cube) <= 2 * relerr(plain, ref_cube) + 1e-3
    assert float(fast.min()) >= 0 and float(fast.max()) <= 1


@needs_ext
@needs_ort
def test_onnxruntime_drop_in(pipe):
    ref_cube, ref_lat = pipe.sample(2, 6, seed=7, backend="torch", return_latents=True)
    cube, lat = pipe.sample(2, 6, seed=7, backend="onnxruntime", return_latents=True)
    assert relerr(lat, ref_lat) <= 1e-4 and relerr(cube, ref_cube) <= 1e-4


@needs_ort
@pytest.mark.parametrize("side", [(8, 8), (7, 9)])
def test_exported_decoder_ends_in_reflectance(pipe, tmp_path, side):
    from retina_fast.export import export_onnx, onnxruntime_session, run_onnxruntime

    vq = pipe.loaded.vqgan
    path = export_onnx(vq, "decoder", tmp_path / "d.onnx", sample_shape=(vq.config.latent_channels, *side))
    idx = torch.randint(0, vq.config.codebook_size, (2, *side), generator=torch.Generator().manual_seed(0))
    zq = vq.codebook.lookup(idx)
    got = run_onnxruntime(onnxruntime_session(path), "decoder", [zq.detach()])
    with torch.no_grad():
        want = model_to_reflectance(vq.decode(zq), vq.config)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


def test_pipeline_reconstruct_is_the_vqgan_round_trip_in_reflectance(pipe):
    vq = pipe.loaded.vqgan
    r = torch.rand(5, 16, 32, 32, generator=torch.Generator().manual_seed(5)) * 0.4
    got = pipe.reconstruct(r, batch_size=2)
    assert got.shape == r.shape and got.dtype == torch.float32 and float(got.min()) >= 0 and float(got.max()) <= 1
    torch.testing.assert_close(got, vq.reconstruct(r), rtol=1e-5, atol=1e-6)  # batches of 2 vs 5: last bits
    torch.testing.assert_close(pipe.reconstruct(r, quantize=False), vq.reconstruct(r, quantize=False))


@pytest.mark.parametrize("bad,match", [(torch.rand(2, 15, 32, 32), "16, H, W"), (torch.rand(16, 32, 32), "16, H, W"),
                                       (torch.rand(1, 16, 30, 32), "divisible"), ((torch.rand(1, 16, 32, 32) * 255).byte(),
                                                                                  "floating-point"),
                                       (torch.full((1, 16, 32, 32), float("nan")), "NaN"), ([1, 2], "list")])
def test_pipeline_reconstruct_rejects_bad_input(pipe, bad, match):
    with pytest.raises(ValueError, match=match):
        pipe.reconstruct(bad)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext),
                                     pytest.param("onnxruntime", marks=[needs_ext, needs_ort])])
def test_unclipped_latents_follow_the_reference(backend):
    """config.json ``latent_clip: false`` (latents beyond the scaling range kept): every backend leaves x0
    unclamped as the reference does. A narrow range makes the U-Net's x0 predictions exceed [-1, 1], so
    clamping would change the images."""
    from retina_fast.training.reference import sample_loaded

    base = small_loaded(5)
    lo, hi = base.latent_range
    narrow = (lo / 8, hi / 8)
    free = Pipeline(small_loaded(5, latent_range=narrow, clip_x0=False), "unclipped")
    ref_cube, ref_lat = sample_loaded(free.loaded, 3, 6, seed=1, return_latents=True)
    assert float(ref_lat.abs().max()) > 1.5  # the case the flag is for
    cube, lat = free.sample(3, 6, seed=1, backend=backend, dtype=torch.float32, return_latents=True)
    assert relerr(lat, ref_lat) <= 1e-4 and relerr(cube, ref_cube) <= 1e-4
    clipped = Pipeline(small_loaded(5, latent_range=narrow, clip_x0=True), "clipped")
    _, lat_c = clipped.sample(3, 6, seed=1, backend=backend, dtype=torch.float32, return_latents=True)
    assert float(lat_c.abs().max()) <= 1.0 + 1e-6 and relerr(lat_c, ref_lat) > 1e-2


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext),
                                     pytest.param("onnxruntime", marks=[needs_ext, needs_ort])])
def test_companded_latents_follow_the_reference(backend, tmp_path):
    """config.json ``latent_asinh`` (latents companded, z = C sinh(u)): every backend decodes as the
    reference does, the value survives save_pretrained / from_pretrained, and it changes the images (so the
    check can fail: a backend that ignored it would decode other codes)."""
    import math

    base = small_loaded(6)
    lo, hi = base.latent_range
    comp = (math.asinh(lo / 0.5), math.asinh(hi / 0.5))
    pipe = Pipeline(small_loaded(6, latent_range=comp, latent_asinh=0.5), "companded")
    linear = Pipeline(small_loaded(6, latent_range=comp), "linear")
    again = _follows_the_reference_and_survives_saving(pipe, linear, backend, 2, tmp_path)
    assert again.loaded.latent_asinh == 0.5 and again.loaded.clip_x0 is True


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext),
                                     pytest.param("onnxruntime", marks=[needs_ext, needs_ort])])
def test_whitened_latents_follow_the_reference(backend, tmp_path):
    """config.json ``latent_whiten`` (a channel map after the scaling, w = M (z' - mean)): every backend decodes
    M^-1 w + mean as the reference does, the map survives save_pretrained / from_pretrained, and the same weights
    without it give other images."""
    from retina_fast.models.vqgan import LatentWhitening

    c = small_loaded(9).config.vqgan.latent_channels
    g = torch.Generator().manual_seed(9)
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
    whiten = LatentWhitening(0.1 * torch.randn(c, generator=g, dtype=torch.float64),
                             q @ torch.diag(torch.linspace(0.5, 2.0, c, dtype=torch.float64)) @ q.T)
    pipe = Pipeline(small_loaded(9, latent_whiten=whiten), "whitened")
    again = _follows_the_reference_and_survives_saving(pipe, Pipeline(small_loaded(9), "plain"), backend, 5, tmp_path)
    torch.testing.assert_close(again.loaded.latent_whiten.matrix, whiten.matrix, rtol=0, atol=1e-15)
    torch.testing.assert_close(again.loaded.latent_whiten.mean, whiten.mean, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext),
                                     pytest.param("onnxruntime", marks=[needs_ext, needs_ort])])
def test_shifted_schedule_follows_the_reference(backend, tmp_path):
    """config ``logsnr_shift`` (shifted cosine schedule): every backend samples as the reference does, the
    value survives save_pretrained / from_pretrained, and it changes the images (a backend that kept the plain
    schedule would fail)."""
    pipe = Pipeline(small_loaded(7, logsnr_shift=2.5), "shifted")
    again = _follows_the_reference_and_survives_saving(pipe, Pipeline(small_loaded(7), "plain"), backend, 3, tmp_path)
    assert again.loaded.config.logsnr_shift == 2.5


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext),
                                     pytest.param("onnxruntime", marks=[needs_ext, needs_ort])])
def test_softmax_attention_levels_follow_the_reference(backend, tmp_path):
    """config ``unet.softmax_attn_levels`` (softmax instead of linear attention at a level): every backend
    samples as the reference does and the value survives save_pretrained / from_pretrained. The two kinds have
    the same weights, so the same weights read as linear attention must give other images (a backend that
    ignored the field would fail)."""
    pipe = Pipeline(small_loaded(8, unet={"softmax_attn_levels": (0,)}), "softmax-finest")
    plain = Pipeline(small_loaded(8), "linear-everywhere")
    again = _follows_the_reference_and_survives_saving(pipe, plain, backend, 4, tmp_path)
    assert again.loaded.config.unet.softmax_attn_levels == (0,)


def _follows_the_reference_and_survives_saving(pipe, without, backend, seed, tmp_path):
    """``pipe`` (a model with some config field set) samples with ``backend`` as the reference does, ``without``
    (the same weights without the field) samples other images -- so a backend ignoring the field fails -- and a
    save_pretrained / from_pretrained round trip samples the same images; returns the reloaded pipeline."""
    from retina_fast.training.reference import sample_loaded

    ref_cube, ref_lat = sample_loaded(pipe.loaded, 3, 6, seed=seed, return_latents=True)
    cube, lat = pipe.sample(3, 6, seed=seed, backend=backend, dtype=torch.float32, return_latents=True)
    assert relerr(lat, ref_lat) <= 1e-4 and relerr(cube, ref_cube) <= 1e-4
    assert relerr(without.sample(3, 6, seed=seed, backend=backend, dtype=torch.float32), ref_cube) > 1e-2
    again = Pipeline.from_pretrained(pipe.save_pretrained(tmp_path / "ck"))
    torch.testing.assert_close(again.sample(3, 6, seed=seed, backend=backend, dtype=torch.float32), cube,
                               rtol=0, atol=1e-6)
    return again
