"""Per-band normalisation (retina_fast/models/normalisation.py), the decoder's upsampling choice, and how
both travel through configs, checkpoints, losses and the trainer."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from retina_fast.models import LDMConfig, VQGAN, VQGANConfig, get_preset
from retina_fast.models.normalisation import (band_statistics, cube_fov, model_to_reflectance,
                                              reflectance_to_model, standardised)
from retina_fast.models.vqgan import UpConv


def _eyes(n: int = 3, size: int = 64) -> torch.Tensor:
    from retina_fast.phantom import render

    return torch.stack([render(i, size).cube for i in range(n)])


def test_per_band_round_trip_and_global_default():
    cfg = VQGANConfig(image_size=32, f=4)
    r = torch.rand(2, 16, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(reflectance_to_model(r, cfg), 2 * r - 1)  # the source's 2 r - 1
    mean = tuple(0.01 * (i + 1) for i in range(16))
    std = tuple(0.002 * (i + 3) for i in range(16))
    per = standardised(cfg, mean, std)
    assert per.per_band_normalisation and not cfg.per_band_normalisation
    x = reflectance_to_model(r, per)
    want = (r - torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)) / torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
    torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model_to_reflectance(x, per), r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model_to_reflectance(x[0], per), r[0], rtol=1e-6, atol=1e-6)  # (bands, H, W)
    assert float(model_to_reflectance(x + 1e3, per).max()) == 1.0  # clamped
    with pytest.raises(ValueError, match="16, H, W"):
        reflectance_to_model(torch.rand(2, 3, 4, 4), per)


def test_band_statistics_inside_the_field_of_view():
    cubes = _eyes()
    fov = cube_fov(cubes)
    assert 0.5 < float(fov.float().mean()) < 0.85          # the phantom's circular field stop
    mean, std = band_statistics([cubes[:2], cubes[2:]])
    x = cubes.transpose(0, 1)[:, fov].double()             # (bands, pixels inside the FOV)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), x.mean(1))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), x.std(1, unbiased=False))
    assert mean[0] < 0.06 < mean[-1]                       # visible bands dim, NIR bright
    with pytest.raises(ValueError, match="constant"):
        band_statistics([torch.ones(2, 16, 8, 8)])


@pytest.mark.parametrize("bad", [{"reflectance_scale": (1.0,) * 15}, {"reflectance_scale": 0.0},
                                 {"reflectance_shift": float("inf")}, {"reflectance_scale": (1.0,) * 15 + (-1.0,)},
                                 {"upsample": "bilinear"}])
def test_config_rejects_bad_normalisation_and_upsampling(bad):
    with pytest.raises(ValueError):
        VQGANConfig(**bad)


def test_configs_written_before_the_upsample_option_mean_transposed():
    cfg = get_preset("tiny")
    assert cfg.vqgan.upsample == "nearest_conv"
    d = json.loads(json.dumps(cfg.to_dict()))
    assert LDMConfig.from_dict(d) == cfg                    # round trip keeps it
    del d["vqgan"]["upsample"]
    assert LDMConfig.from_dict(d).vqgan.upsample == "transposed"
    per = standardised(cfg.vqgan, [0.1] * 16, [0.05] * 16)
    assert VQGANConfig.from_dict(json.loads(json.dumps(per.to_dict()))) == per


@pytest.mark.parametrize("mode", ["replicate", "zeros"])
@pytest.mark.parametrize("shape", [(2, 5, 9, 6), (1, 3, 1, 4)])
def test_nearest_conv_equals_its_phase_form(mode, shape):
    torch.manual_seed(shape[2])
    up = UpConv(shape[1], 7, mode, "nearest_conv").double()
    x = torch.randn(*shape, dtype=torch.float64)
    want = F.conv2d(F.pad(F.interpolate(x, scale_factor=2.0, mode="nearest"), (1,) * 4,
                          mode="constant" if mode == "zeros" else mode), up.conv.weight, up.conv.bias)
    torch.testing.assert_close(up(x), want)
    pad = F.pad(x, (1,) * 4, mode="constant" if mode == "zeros" else mode)
    got = F.conv_transpose2d(pad, up.phase_weight(), up.conv.bias, stride=2, padding=3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_nearest_conv_with_reflect_padding_has_no_phase_form():
    with pytest.raises(ValueError, match="reflect"):
        UpConv(4, 4, "reflect", "nearest_conv").phase_weight()


def test_reconstruct_is_reflectance_in_and_out():
    cfg = standardised(VQGANConfig(image_size=32, f=4, latent_channels=4, codebook_size=32),
                       [0.05] * 8 + [0.2] * 8, [0.02] * 8 + [0.06] * 8)
    torch.manual_seed(0)
    vq = VQGAN(cfg).eval()
    r = torch.rand(2, 16, 32, 32) * 0.3
    with torch.no_grad():
        want = model_to_reflectance(vq.decode_latent(vq.encode(reflectance_to_model(r, cfg))), cfg)
        want_c = model_to_reflectance(vq.decode(vq.encode(reflectance_to_model(r, cfg))), cfg)
    torch.testing.assert_close(vq.reconstruct(r), want)
    torch.testing.assert_close(vq.reconstruct(r, quantize=False), want_c)


def test_spectral_angle_term_is_taken_in_reflectance():
    """Under 2 r - 1 the loss's angle is the one between x + 1 and x̂ + 1; per band it is the angle between
    the reflectance spectra, not between the standardised values."""
    from retina_fast.training.losses import VQGANLoss, spectral_angle
    from retina_fast.models.codebook import QuantizeOutput
    from retina_fast.models.vqgan import VQGANOutput

    class Disc(torch.nn.Module):
        def forward(self, x):
            return x.mean((1, 2, 3)), [x]

    g = torch.Generator().manual_seed(1)
    r, r_hat = torch.rand(2, 16, 4, 4, generator=g) * 0.3, torch.rand(2, 16, 4, 4, generator=g) * 0.3
    q = QuantizeOutput(torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.tensor(0.0), torch.tensor(1.0))
    for cfg in (VQGANConfig(), standardised(VQGANConfig(), [0.05] * 16, [0.01 * (i + 1) for i in range(16)])):
        x, x_hat = reflectance_to_model(r, cfg), reflectance_to_model(r_hat, cfg)
        _, parts = VQGANLoss(cfg, discriminator=Disc()).generator_loss(x, VQGANOutput(x_hat, x, q), 0)
        assert float(parts["sam"]) == pytest.approx(float(spectral_angle(r_hat, r, offset=0.0)), rel=1e-5)
    assert float(spectral_angle(2 * r_hat - 1, 2 * r - 1)) == pytest.approx(float(spectral_angle(r_hat, r, offset=0.0)),
                                                                              rel=1e-5)


def test_checkpoint_records_per_band_normalisation(tmp_path):
    from retina_fast.checkpoint import load_checkpoint, model_config, save_checkpoint

    cfg = get_preset("tiny")
    per = dataclasses.replace(cfg, vqgan=standardised(cfg.vqgan, [0.1] * 16, [0.05] * 16))
    save_checkpoint(tmp_path, {"w": {"a": torch.zeros(1)}}, model_config(per, (-1.0, 1.0)))
    doc, _ = load_checkpoint(tmp_path)
    assert doc["normalisation"]["per_band"] is True
    assert doc["normalisation"]["reflectance_scale"] == pytest.approx([20.0] * 16)
    assert LDMConfig.from_dict(doc["architecture"]) == per
