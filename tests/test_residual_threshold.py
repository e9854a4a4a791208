"""The enhancer's residual threshold: ``shrink_residual`` itself, the checkpoint field, the ``enhance`` /
``retina-fast enhance`` overrides, and its choice on the validation split (``enhance_kinds --choose-threshold``)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from retina_fast import cli
from retina_fast.checkpoint import CheckpointError
from retina_fast.enhance import enhance, load_enhancer, resolve_enhancer, shrink_residual
from retina_fast.fov import fov_mask
from retina_fast.training import enhance_kinds


def test_shrink_residual_is_a_soft_threshold_on_the_change():
    x = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5])
    y = torch.tensor([0.52, 0.48, 0.6, 0.3, 0.5])
    got = shrink_residual(x, y, 0.05)
    torch.testing.assert_close(got, torch.tensor([0.5, 0.5, 0.55, 0.35, 0.5]))
    assert shrink_residual(x, y, 0.0) is y
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 9, 7, generator=g), torch.rand(2, 3, 9, 7, generator=g)
    s = shrink_residual(a, b, 0.1)  # between input and output, never further than the output
    assert bool(((s - a).abs() <= (b - a).abs() + 1e-7).all()) and bool(((s - a) * (b - a) >= 0).all())
    torch.testing.assert_close((s - a).abs(), ((b - a).abs() - 0.1).clamp_min(0))


def _single_stage_copy(dst):
    """A copy of the shipped first stage without its follow-up stage: these tests are about one network."""
    shutil.copytree(resolve_enhancer("default"), dst)
    doc = json.loads((dst / "config.json").read_text())
    doc.pop("then", None)
    (dst / "config.json").write_text(json.dumps(doc))
    return dst


@pytest.fixture
def model_copy(tmp_path):
    return _single_stage_copy(tmp_path / "m")


def _set(model_dir, value):
    doc = json.loads((model_dir / "config.json").read_text())
    if value is None:
        doc.pop("residual_threshold", None)
    else:
        doc["residual_threshold"] = value
    (model_dir / "config.json").write_text(json.dumps(doc).replace('"@nan"', "NaN"))


def test_enhance_applies_the_checkpoints_threshold_and_a_call_overrides_it(model_copy):
    x = enhance_kinds.kind_inputs(64, (0,))[1][:3]
    _set(model_copy, 0.05)
    raw = enhance(x, model=str(model_copy), backend="torch", residual_threshold=0.0)
    got = enhance(x, model=str(model_copy), backend="torch")
    want = shrink_residual(x, raw, 0.05) * fov_mask(x).float()[:, None]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, raw)
    torch.testing.assert_close(enhance(x, model=str(model_copy), backend="torch", residual_threshold=0.02),
                               shrink_residual(x, raw, 0.02) * fov_mask(x).float()[:, None], rtol=0, atol=0)
    for bad in (-0.1, 1.0, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="residual_threshold must be a number in"):
            enhance(x, model=str(model_copy), backend="torch", residual_threshold=bad)


@pytest.mark.parametrize("value", [-0.5, 2, "@nan", "x"])
def test_a_bad_threshold_in_config_json_is_named(tmp_path, value):
    dst = _single_stage_copy(tmp_path / f"m{abs(hash(str(value)))}")
    _set(dst, value)
    with pytest.raises(CheckpointError, match="config.json: residual_threshold must be a number in"):
        load_enhancer(str(dst))


def test_cli_takes_the_threshold_and_refuses_a_bad_one(tmp_path, model_copy, capsys):
    rng = np.random.default_rng(0)
    photo = tmp_path / "p.png"
    Image.fromarray((rng.random((48, 48, 3)) * 200 + 30).astype(np.uint8)).save(photo)
    _set(model_copy, None)
    outs = {}
    for t in ("0", "0.2"):
        out = tmp_path / f"out{t}"
        assert cli.main(["enhance", str(photo), "--out", str(out), "--model", str(model_copy), "--backend", "torch",
                         "--residual-threshold", t, "--quiet"]) == 0
        outs[t] = np.asarray(Image.open(out / "p.png")).astype(int)
    src = np.asarray(Image.open(photo)).astype(int)
    assert np.abs(outs["0.2"] - src).sum() < np.abs(outs["0"] - src).sum()  # fewer, smaller changes
    capsys.readouterr()
    assert cli.main(["enhance", str(photo), "--out", str(tmp_path / "bad"), "--residual-threshold", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--residual-threshold must be in [0, 1)" in err
    assert not (tmp_path / "bad").exists()


def test_the_threshold_is_chosen_on_the_validation_split_and_written(model_copy):
    _set(model_copy, None)
    grid = (0.0, 0.05, 0.2, 0.5)
    tau, rows = enhance_kinds.choose_residual_threshold(str(model_copy), size=64, seeds=(10,), grid=grid,
                                                        max_loss_db=0.1, backend="torch")
    assert [r["threshold"] for r in rows] == list(grid)
    ok = [r["threshold"] for r in rows if r["worst_image_gain_left"] >= -0.1]
    assert tau == (ok[0] if ok else None)
    # a larger threshold changes less: the worst loss shrinks towards 0
    worst = [r["worst_image_gain_left"] for r in rows]
    assert worst[-1] >= worst[0] - 1e-6 and worst[-1] > -0.1
    enhance_kinds.write_residual_threshold(model_copy, 0.05, rows, (10,), 0.1, "torch")
    doc = json.loads((model_copy / "config.json").read_text())
    assert doc["residual_threshold"] == 0.05
    assert doc["provenance"]["residual_threshold_selection"]["grid"] == rows
    assert load_enhancer(str(model_copy)).residual_threshold == 0.05


def test_work_size_from_config_json_the_call_and_the_cli(model_copy, tmp_path, capsys):
    """``work_size`` in config.json is applied (enhance(work_size=None)), a call or --work-size overrides it
    (0 = off), a bad value is named, and ``write_residual_threshold(work_size=)`` records it with the threshold."""
    x = enhance_kinds.kind_inputs(96, (0,))[1][:2]
    doc = json.loads((model_copy / "config.json").read_text())
    doc.pop("work_size", None)
    (model_copy / "config.json").write_text(json.dumps(doc))
    full = enhance(x, model=str(model_copy), backend="torch")
    at48 = enhance(x, model=str(model_copy), backend="torch", work_size=48)
    assert not torch.equal(full, at48)
    enhance_kinds.write_residual_threshold(model_copy, doc.get("residual_threshold", 0.0), [], (10,), 0.1, "torch",
                                           96, work_size=48)
    doc = json.loads((model_copy / "config.json").read_text())
    assert doc["work_size"] == 48 and "--work-size 48" in doc["provenance"]["residual_threshold_selection"]["command"]
    assert load_enhancer(str(model_copy)).work_size == 48
    torch.testing.assert_close(enhance(x, model=str(model_copy), backend="torch"), at48, rtol=0, atol=0)
    torch.testing.assert_close(enhance(x, model=str(model_copy), backend="torch", work_size=0), full, rtol=0, atol=0)
    photo = tmp_path / "p.png"
    Image.fromarray(np.round(x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(photo)
    for ws in ("48", "0"):
        assert cli.main(["enhance", str(photo), "--out", str(tmp_path / f"o{ws}"), "--model", str(model_copy),
                         "--backend", "torch", "--work-size", ws, "--quiet"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"o{ws}" / "p.png")) for ws in ("48", "0"))
    assert not np.array_equal(a, b)
    capsys.readouterr()
    assert cli.main(["enhance", str(photo), "--out", str(tmp_path / "bad"), "--work-size", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--work-size must be 0 or >= 16" in err
    with pytest.raises(SystemExit) as exc:
        enhance_kinds.main(["--work-size", "8"])
    assert exc.value.code == 2 and "--work-size must be 0 or >= 16" in capsys.readouterr().err
    for bad in (8, "256", 1.5):
        doc["work_size"] = bad
        (model_copy / "config.json").write_text(json.dumps(doc))
        from retina_fast.enhance import unload_enhancer
        unload_enhancer(str(model_copy))
        with pytest.raises(CheckpointError, match="config.json: work_size must be"):
            load_enhancer(str(model_copy))
