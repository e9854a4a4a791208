"""Backend registry: capabilities as data, reasons, explicit selection, no silent fallback."""
from __future__ import annotations

import json

import pytest
import torch

from retina_fast import _ext, backends, cli


def test_table_has_the_design_backends():
    assert backends.names() == ["torch", "cpu", "onnxruntime", "cuda", "tensorrt"]
    torch_b = backends.get("torch")
    assert torch_b.usable("cpu") and torch_b.dtypes == (torch.float32,)


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="known: auto, torch, cpu"):
        backends.get("vulkan")


def test_unusable_backend_raises_with_every_reason():
    with pytest.raises(backends.BackendUnavailable) as err:
        backends.resolve("cuda", device="cpu")
    assert "runs on cuda, not cpu" in str(err.value)
    with pytest.raises(backends.BackendUnavailable, match="dtypes float32, not float16"):
        backends.resolve("torch", device="cpu", dtype=torch.float16)


def test_auto_on_cpu_picks_the_fastest_usable():
    usable = [b for b in backends.all_backends() if b.usable("cpu")]
    expected = max(usable, key=lambda b: b.speed_rank).name
    assert backends.resolve("auto", device="cpu").name == expected
    assert expected in ("onnxruntime", "cpu", "torch")


def test_missing_optional_package_is_skipped_quietly(monkeypatch, recwarn):
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    chosen = backends.resolve("auto", device="cpu")
    assert chosen.name != "onnxruntime"
    assert not [w for w in recwarn if issubclass(w.category, backends.BackendFallbackWarning)]
    with pytest.raises(backends.BackendUnavailable, match="onnx and onnxruntime not installed"):
        backends.resolve("onnxruntime", device="cpu")


def test_precedence_argument_context_environment(monkeypatch):
    monkeypatch.setenv("RETINA_FAST_BACKEND", "torch")
    assert backends.requested_name(None) == "torch"
    with backends.use_backend("cpu"):
        assert backends.requested_name(None) == "cpu"
        assert backends.requested_name("torch") == "torch"
        with backends.use_backend("torch"):
            assert backends.requested_name(None) == "torch"
        assert backends.requested_name(None) == "cpu"
    monkeypatch.delenv("RETINA_FAST_BACKEND")
    assert backends.requested_name(None) == "auto"
    with pytest.raises(ValueError):
        with backends.use_backend("nope"):
            pass


def test_auto_warns_when_skipping_a_faster_backend_and_strict_raises(monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "load_error", "ImportError: simulated")
    with pytest.warns(backends.BackendFallbackWarning, match="cpu: compiled core.*simulated"):
        assert backends.resolve("auto", device="cpu").name == "torch"
    monkeypatch.setenv("RETINA_FAST_STRICT", "1")
    with pytest.raises(backends.BackendUnavailable, match="STRICT"):
        backends.resolve("auto", device="cpu")
    with pytest.raises(backends.BackendUnavailable, match="simulated"):
        backends.resolve("cpu", device="cpu")


def test_register_rejects_duplicates():
    with pytest.raises(ValueError):
        backends.register(backends.get("torch"))


def test_cpu_features_are_booleans():
    feats = backends.cpu_features()
    assert set(feats) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    assert all(isinstance(v, bool) for v in feats.values())


def test_info_cli_text_and_json(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "backends:" in text and "torch" in text and "auto ->" in text
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {b["name"] for b in data["backends"]} == {"torch", "cpu", "onnxruntime", "cuda", "tensorrt"}
    if _ext.available():
        assert data["extension"] == "loaded" and "isa" in data["extension_build"]
    trt = [b for b in data["backends"] if b["name"] == "tensorrt"][0]
    assert not trt["usable"] or trt["reasons"] == []
