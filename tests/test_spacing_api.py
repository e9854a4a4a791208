"""The timestep spacing as a public argument: ``Pipeline.sample(spacing=)``, ``reference_sample(spacing=)``
and ``retina-fast sample --spacing``, recorded in run.json and kept (or asked for) on ``--resume``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retina_fast import cli, engine, samplers, shards
from retina_fast.training.reference import reference_sample

from _newcomer import snapshot


def _args(model_dir, out, *extra, n=3):
    return ["sample", "--n", str(n), "--steps", "3", "--seed", "5", "--model", str(model_dir), "--out", str(out),
            "--shard-size", "2", "--backend", "torch", "--quiet", *extra]


def _run_images(out) -> np.ndarray:
    spec = shards.load_spec(out)
    return np.concatenate([shards.read_shard(spec.shard_path(out, k)) for k, _, _ in spec.shards()])


def test_pipeline_and_reference_take_the_spacing(model_dir):
    pipe = engine.load(str(model_dir))
    kw = dict(seed=5, sampler="ddim", backend="torch")
    default = pipe.sample(2, 3, **kw)
    old = pipe.sample(2, 3, spacing="linspace", **kw)
    assert torch.equal(default, pipe.sample(2, 3, spacing="trimmed", **kw))  # None = the sampler's default
    assert not torch.equal(default, old)
    for spacing in (None, "linspace", "logsnr"):
        ref = reference_sample(2, 3, seed=5, sampler="ddpm", model=pipe.loaded, spacing=spacing)
        assert torch.equal(ref, pipe.sample(2, 3, seed=5, sampler="ddpm", backend="torch", spacing=spacing))
    # the timesteps are the spacing's own
    lin = [c.t for c in samplers.plan("ddim", pipe.loaded.schedule, 3, spacing="linspace")]
    trim = [c.t for c in samplers.plan("ddim", pipe.loaded.schedule, 3)]
    assert lin == [999, 500, 0] and trim == [989, 494, 0]


@pytest.mark.parametrize("bad", ["uniform", "", 3])
def test_a_bad_spacing_is_named(model_dir, bad):
    pipe = engine.load(str(model_dir))
    with pytest.raises(ValueError, match="unknown spacing"):
        pipe.sample(1, 2, spacing=bad, backend="torch")
    with pytest.raises(ValueError, match="unknown spacing"):
        reference_sample(1, 2, model=str(model_dir), spacing=bad)


def test_cli_records_the_spacing_and_keeps_it_on_resume(tmp_path, model_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(_args(model_dir, out, "--spacing", "linspace")) == 0
    assert json.loads((out / "run.json").read_text())["spacing"] == "linspace"
    batch = shards.load_spec(out).batch_size  # torch's images may depend on the batch: the run's own
    want = engine.load(str(model_dir)).sample(3, 3, seed=5, spacing="linspace", backend="torch",
                                              batch_size=batch).numpy()
    np.testing.assert_array_equal(_run_images(out), want)

    before = snapshot(out)
    capsys.readouterr()
    assert cli.main(_args(model_dir, out, "--resume")) == 2  # default spacing is trimmed: a different run
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "spacing: 'linspace' -> 'trimmed'" in err, err
    assert snapshot(out) == before
    assert cli.main(_args(model_dir, out, "--resume", "--spacing", "linspace")) == 0

    out2 = tmp_path / "default"
    assert cli.main(_args(model_dir, out2, "--sampler", "dpmpp_2m", n=1)) == 0
    assert json.loads((out2 / "run.json").read_text())["spacing"] == "logsnr"


def test_a_run_written_before_the_field_asks_for_its_spacing(tmp_path, model_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(_args(model_dir, out, "--spacing", "linspace")) == 0
    full = _run_images(out)
    # make it an interrupted run of an older version: no spacing in run.json, the last shard not yet written
    data = json.loads((out / "run.json").read_text())
    del data["spacing"]
    (out / "run.json").write_text(json.dumps(data))
    for p in list(out.glob("shard-00001*")) + [out / "manifest.json"]:
        p.unlink()
    before = snapshot(out)
    capsys.readouterr()
    assert cli.main(_args(model_dir, out, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--spacing linspace" in err and "before 2026-12-04" in err, err
    assert snapshot(out) == before
    assert cli.main(_args(model_dir, out, "--resume", "--spacing", "linspace")) == 0
    assert json.loads((out / "run.json").read_text())["spacing"] == "linspace"
    np.testing.assert_array_equal(_run_images(out), full)


def test_a_bad_spacing_in_run_json_is_named(tmp_path, model_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(_args(model_dir, out, n=1)) == 0
    data = json.loads((out / "run.json").read_text())
    data["spacing"] = "uniform"
    (out / "run.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert cli.main(_args(model_dir, out, "--resume", n=1)) == 2
    err = capsys.readouterr().err.strip()
    assert "spacing must be null or one of linspace, trimmed, logsnr" in err, err


def test_cli_choices_are_the_library_s():
    """``retina-fast sample``'s --sampler / --spacing lists are literal (the CLI starts without importing torch):
    they must name exactly what the library accepts."""
    import argparse

    from retina_fast.schedules import SPACINGS

    top = cli.build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices["sample"]
    options = {a.dest: a for a in sub._actions}
    assert tuple(options["sampler"].choices) == samplers.SAMPLERS
    assert tuple(options["spacing"].choices) == SPACINGS
    assert set(samplers.DEFAULT_SPACING) == set(samplers.SAMPLERS)
