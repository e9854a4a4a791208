"""Checkpoint format: round trip, sha256 / size checks, clear errors, atomic writes, no pickle."""
from __future__ import annotations

import json

import pytest
import torch

from retina_fast.checkpoint import (CheckpointError, load_checkpoint, load_state_into, model_config,
                                    save_checkpoint)
from retina_fast.models import VQGAN, UNet2D, UNetConfig, VQGANConfig, get_preset

SMALL_VQ = VQGANConfig(image_size=32, base_channels=8, codebook_size=32)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    vq = VQGAN(SMALL_VQ)
    un = UNet2D(UNetConfig(in_channels=8, base_channels=16, attn_heads=2, attn_head_dim=8))
    cfg = model_config(get_preset("tiny"), vq.latent_range())
    path = save_checkpoint(tmp_path / "run", {"vqgan": vq, "unet": un.state_dict()}, cfg,
                           {"data": "phantom", "steps": 12, "command": "retina-fast train ..."})
    return path, vq, un


def test_round_trip(saved):
    path, vq, un = saved
    config, states = load_checkpoint(path)
    assert config["preset"] == "tiny" and len(config["wavelengths"]) == 16
    assert config["latent_range"] == {"min": vq.latent_range()[0], "max": vq.latent_range()[1]}
    assert config["normalisation"]["reflectance_scale"] == 2.0
    assert config["provenance"]["steps"] == 12 and "code_version" in config["provenance"]
    assert set(config["weights"]) == {"vqgan", "unet"} and len(config["weights"]["unet"]["sha256"]) == 64
    vq2 = VQGAN(SMALL_VQ)
    load_state_into(vq2, states["vqgan"])
    for k, v in vq.state_dict().items():
        assert torch.equal(vq2.state_dict()[k], v), k
    assert int(vq2.codebook.kmeans_epoch) == -1
    assert all(torch.equal(states["unet"][k], v) for k, v in un.state_dict().items())
    assert not list(path.glob("*.tmp")) and not list(path.glob(".*"))       # no temp files left
    _, only = load_checkpoint(path, names=["unet"])
    assert set(only) == {"unet"}


def test_tampered_file_is_named(saved):
    path, _, _ = saved
    f = path / "unet.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"unet\.safetensors: sha256 mismatch"):
        load_checkpoint(path)


def test_truncated_file_is_named(saved):
    path, _, _ = saved
    f = path / "vqgan.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"vqgan\.safetensors: truncated"):
        load_checkpoint(path)


def test_missing_and_corrupt_files(saved, tmp_path):
    path, _, _ = saved
    (path / "unet.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"unet\.safetensors: missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no module"):
        load_checkpoint(path, names=["discriminator"])
    cfg = path / "config.json"
    cfg.write_text(cfg.read_text()[:50])
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(path)
    cfg.unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"format": "diffusers"}))
    with pytest.raises(CheckpointError, match="not a retina_fast checkpoint"):
        load_checkpoint(tmp_path / "other")


def test_consistent_rewrite_still_detected_when_hash_not_updated(saved):
    """A valid safetensors file of the right size but other weights is caught by the hash."""
    path, vq, _ = saved
    other = VQGAN(SMALL_VQ)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    save_checkpoint(path / "elsewhere", {"vqgan": other}, {})
    (path / "vqgan.safetensors").write_bytes((path / "elsewhere" / "vqgan.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(path)


def test_mismatched_architecture(saved):
    path, _, _ = saved
    _, states = load_checkpoint(path)
    bigger = VQGAN(VQGANConfig(image_size=32, base_channels=16, codebook_size=32))
    with pytest.raises(CheckpointError, match=r"vqgan\.safetensors: does not match VQGAN: shape mismatch"):
        load_state_into(bigger, states["vqgan"], source=str(path / "vqgan.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_state_into(VQGAN(SMALL_VQ), {k: v for k, v in states["vqgan"].items() if "decoder" not in k})


def test_never_unpickles(saved, monkeypatch):
    path, _, _ = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must not be called on checkpoints")

    monkeypatch.setattr(torch, "load", forbidden)
    load_checkpoint(path)


def test_bad_names_and_reserved_keys(tmp_path):
    with pytest.raises(ValueError, match="module name"):
        save_checkpoint(tmp_path, {"../x": {}}, {})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path, {}, {"weights": 1})
