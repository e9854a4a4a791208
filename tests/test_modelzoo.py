"""retina_fast.modelzoo: resolving model names / directories and loading LDM sampling checkpoints."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from retina_fast.checkpoint import CheckpointError, model_config, save_checkpoint
from retina_fast.models import VQGAN, LDMConfig, UNet2D, UNetConfig, VQGANConfig
from retina_fast.modelzoo import (DEFAULT_MODEL, WEIGHTS_DIR, LoadedLDM, available_models, load_ldm,
                                  resolve_model)

TINY = LDMConfig(vqgan=VQGANConfig(image_size=32, f=8, base_channels=8, latent_channels=4, codebook_size=32),
                 unet=UNetConfig(in_channels=4, base_channels=16, channel_mults=(1, 2), attn_heads=2,
                                 attn_head_dim=8), name="test-tiny")


def make_checkpoint(path, seed: int = 0, modules=("vqgan", "unet")):
    torch.manual_seed(seed)
    vq, unet = VQGAN(TINY.vqgan), UNet2D(TINY.unet)
    mods = {"vqgan": vq, "unet": unet}
    save_checkpoint(path, {k: mods[k] for k in modules}, model_config(TINY, vq.latent_range()),
                    {"data": "random weights", "steps": 0})
    return vq, unet


def test_load_ldm_round_trip(tmp_path):
    vq, unet = make_checkpoint(tmp_path / "ck")
    ldm = load_ldm(tmp_path / "ck")
    assert isinstance(ldm, LoadedLDM) and ldm.config == TINY and ldm.path == tmp_path / "ck"
    assert not ldm.vqgan.training and not ldm.unet.training
    assert ldm.latent_range == pytest.approx(vq.latent_range())
    assert ldm.wavelengths == tuple(float(w) for w in TINY.vqgan.wavelengths)
    assert ldm.schedule.num_timesteps == TINY.timesteps
    assert ldm.meta["provenance"]["data"] == "random weights"
    for k, v in unet.state_dict().items():
        assert torch.equal(ldm.unet.state_dict()[k], v)
    assert torch.equal(ldm.vqgan.codebook.embedding, vq.codebook.embedding)
    assert load_ldm(str(tmp_path / "ck")).config == TINY      # str paths too


def test_load_ldm_detects_tampering_and_missing_modules(tmp_path):
    make_checkpoint(tmp_path / "ck")
    data = bytearray((tmp_path / "ck" / "unet.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "ck" / "unet.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="unet.safetensors.*sha256"):
        load_ldm(tmp_path / "ck")
    make_checkpoint(tmp_path / "vq_only", modules=("vqgan",))
    with pytest.raises(CheckpointError, match="unet"):
        load_ldm(tmp_path / "vq_only")
    make_checkpoint(tmp_path / "norange")
    doc = json.loads((tmp_path / "norange" / "config.json").read_text())
    doc["latent_range"] = None
    (tmp_path / "norange" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="latent_range"):
        load_ldm(tmp_path / "norange")


def test_resolve_model_errors_list_what_exists(tmp_path):
    with pytest.raises(FileNotFoundError, match="packaged models"):
        resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(tmp_path / "empty")
    with pytest.raises(TypeError):
        resolve_model(3)
    make_checkpoint(tmp_path / "ck")
    assert resolve_model(tmp_path / "ck") == tmp_path / "ck"


def test_default_model_is_packaged():
    assert DEFAULT_MODEL in available_models(), f"no packaged weights in {WEIGHTS_DIR}"
    assert resolve_model("default") == WEIGHTS_DIR / DEFAULT_MODEL == resolve_model(DEFAULT_MODEL)
    ldm = load_ldm("default")
    assert ldm.config.name == "tiny" and ldm.config.vqgan.bands == 16 and ldm.config.vqgan.image_size >= 128
    prov = ldm.meta["provenance"]
    assert prov["data"] and prov["steps"] > 0 and prov["command"]
    sizes = sum(p.stat().st_size for p in (WEIGHTS_DIR / DEFAULT_MODEL).iterdir())
    assert sizes < 20e6


def test_engine_side_does_not_import_training():
    """Importing every engine module (all of retina_fast but the CLI front-ends in retina_fast.commands, whose
    train / degrade / bench-reference commands run the trainers' code when invoked) loads no trainer module."""
    code = ("import importlib, pkgutil, sys, retina_fast\n"
            "names = [m.name for m in pkgutil.walk_packages(retina_fast.__path__, 'retina_fast.')\n"
            "         if not m.name.startswith(('retina_fast.training', 'retina_fast.commands', 'retina_fast.__main__'))]\n"
            "assert len(names) > 40, names\n"
            "for n in names: importlib.import_module(n)\n"
            "bad = [m for m in sys.modules if m.startswith('retina_fast.training')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("value,match", [(-1.0, "latent_asinh must be a positive number"),
                                         (0, "latent_asinh must be a positive number"),
                                         ("2", "latent_asinh must be a finite number")])
def test_load_ldm_checks_latent_asinh(tmp_path, value, match):
    make_checkpoint(tmp_path / "ck")
    cfg = tmp_path / "ck" / "config.json"
    doc = json.loads(cfg.read_text())
    doc["latent_asinh"] = 2.0
    cfg.write_text(json.dumps(doc))
    assert load_ldm(tmp_path / "ck").latent_asinh == 2.0
    doc["latent_asinh"] = value
    cfg.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=match):
        load_ldm(tmp_path / "ck")


def test_latent_whitening_fit_whitens_and_inverts():
    """LatentWhitening.fit on correlated channels: the mapped latents have covariance std^2 I, the matrix is the
    symmetric (ZCA) root, and invert undoes apply to round-off."""
    from retina_fast.models.vqgan import LatentWhitening

    g = torch.Generator().manual_seed(3)
    mix = torch.randn(5, 5, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.3, 0.1, 0.02],
                                                                            dtype=torch.float64)
    z = torch.einsum("ij,bjhw->bihw", mix, torch.randn(40, 5, 6, 7, generator=g, dtype=torch.float64)) + 0.7
    w = LatentWhitening.fit(z, 0.1)
    y = w.apply(z)
    cov = torch.cov(y.transpose(0, 1).reshape(5, -1))
    torch.testing.assert_close(cov, 0.01 * torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(w.matrix, w.matrix.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.invert(y), z, rtol=0, atol=1e-10)
    assert float(y.mean(dim=(0, 2, 3)).abs().max()) < 1e-10
    with pytest.raises(ValueError, match="covariance is singular"):
        LatentWhitening.fit(z[:, :1].expand(-1, 5, -1, -1), 0.1)


def _eye(n: int) -> list:
    return [[float(i == j) for j in range(n)] for i in range(n)]


@pytest.mark.parametrize("value,match", [([1, 2], "latent_whiten must be null or"),
                                         ({"mean": [0.0] * 4}, "latent_whiten must be null or"),
                                         ({"mean": [0.0] * 3, "matrix": _eye(3)}, "for 3 channels"),
                                         ({"mean": [0.0] * 4, "matrix": [[1.0] * 4] * 4}, "singular"),
                                         ({"mean": [0.0] * 4, "matrix": [[1.0] * 3] * 4}, r"matrix \(C, C\)"),
                                         ({"mean": [float("nan")] + [0.0] * 3, "matrix": _eye(4)}, "finite"),
                                         ({"mean": "0", "matrix": "1"}, "latent_whiten")])
def test_load_ldm_checks_latent_whiten(tmp_path, value, match):
    """config.json latent_whiten: absent or null = none; {mean (C,), matrix (C, C)} finite and invertible, C the
    latent channels; anything else is refused with the file named."""
    make_checkpoint(tmp_path / "ck")
    cfg = tmp_path / "ck" / "config.json"
    doc = json.loads(cfg.read_text())
    c = doc["architecture"]["vqgan"]["latent_channels"]
    assert c == 4 and load_ldm(tmp_path / "ck").latent_whiten is None
    doc["latent_whiten"] = {"mean": [0.5] * c, "matrix": [[2.0 * (i == j) for j in range(c)] for i in range(c)]}
    cfg.write_text(json.dumps(doc))
    w = load_ldm(tmp_path / "ck").latent_whiten
    z = torch.randn(2, c, 3, 5)
    torch.testing.assert_close(w.apply(z), 2.0 * (z - 0.5))
    doc["latent_whiten"] = value
    cfg.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=match) as err:
        load_ldm(tmp_path / "ck")
    assert "config.json" in str(err.value)


@pytest.mark.parametrize("value,match", [(25.0, "logsnr_shift must be a finite number in"),
                                         ("2", "logsnr_shift must be a finite number"),
                                         (None, "logsnr_shift must be a finite number")])
def test_load_ldm_checks_logsnr_shift(tmp_path, value, match):
    """config.json architecture.logsnr_shift: absent = the plain schedule (older checkpoints), a number shifts
    the schedule load_ldm builds, anything else is refused with the file named."""
    make_checkpoint(tmp_path / "ck")
    cfg = tmp_path / "ck" / "config.json"
    doc = json.loads(cfg.read_text())
    assert doc["architecture"].pop("logsnr_shift", 0.0) == 0.0
    cfg.write_text(json.dumps(doc))
    plain = load_ldm(tmp_path / "ck").schedule.alphas_cumprod
    doc["architecture"]["logsnr_shift"] = 1.5
    cfg.write_text(json.dumps(doc))
    shifted = load_ldm(tmp_path / "ck").schedule.alphas_cumprod
    logit = lambda a: torch.log(a) - torch.log1p(-a)  # noqa: E731
    torch.testing.assert_close(logit(shifted) - logit(plain), torch.full_like(plain, 1.5), rtol=0, atol=1e-7)
    doc["architecture"]["logsnr_shift"] = value
    cfg.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=match) as err:
        load_ldm(tmp_path / "ck")
    assert "config.json" in str(err.value)
