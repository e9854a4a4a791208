"""``retina-fast bench`` on random-weight presets: torch.compile and eager-bf16 rows, one U-Net call + decode
(--part step) with GFLOP/s from the written count. torch.compile runs with its ``eager`` backend here
(dynamo tracing only), which computes exactly what eager PyTorch does -- a check the rows can fail."""
from __future__ import annotations

import json

import pytest
import torch

from retina_fast import bench, cli, flops
from retina_fast.models.config import get_preset


def test_step_part_reports_flops_and_checks_each_row(tmp_path):
    out = tmp_path / "step.json"
    assert cli.main(["bench", "--preset", "tiny", "--part", "step", "--n", "2", "--backends",
                     "plain:bf16,compile", "--compile-backend", "eager", "--repeats", "1",
                     "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    cfg = get_preset("tiny")
    _, h, w = cfg.latent_shape
    assert res["unet_gflop_per_image"] == pytest.approx(flops.unet_flops(cfg.unet, h, w) / 1e9)
    assert res["decode_gflop_per_image"] == pytest.approx(flops.decode_flops(cfg.vqgan) / 1e9)
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"torch", "plain:bf16", "compile"}
    assert rows["torch"]["unet_relative_l2_error"] == 0 and rows["compile"]["unet_relative_l2_error"] < 1e-6
    assert rows["compile"]["decode_relative_l2_error"] < 1e-6 and rows["plain:bf16"]["unet_relative_l2_error"] > 1e-4
    assert all(r["unet_check_passed"] for r in rows.values())
    for r in rows.values():
        assert r["unet_gflop_per_s"] > 0 and r["decode_median_ms"] > 0 and len(r["unet_runs_s"]) == 1
        assert r["sample_s_per_image"] == pytest.approx((50 * r["unet_median_ms"] + r["decode_median_ms"]) / 2e3)


def test_sample_part_on_a_preset_has_a_compile_row(tmp_path, capsys):
    out = tmp_path / "sample.json"
    assert cli.main(["bench", "--preset", "tiny", "--n", "1", "--steps", "2", "--backends", "compile:bf16,plain:bf16",
                     "--compile-backend", "eager", "--repeats", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"reference", "compile:bf16", "plain:bf16"}
    assert rows["compile:bf16"]["relative_l2_error"] == pytest.approx(rows["plain:bf16"]["relative_l2_error"], abs=1e-6)
    assert res["gflop_per_image"] == pytest.approx(flops.sample_flops(get_preset("tiny"), 2) / 1e9)
    assert "compile:bf16" in capsys.readouterr().out


def test_unknown_preset_and_contender_fail_before_work(capsys):
    assert cli.main(["bench", "--preset", "paper-999", "--backends", "cpu"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert cli.main(["bench", "--preset", "tiny", "--backends", "compile:int8"]) == 2
    assert "unknown dtype 'int8'" in capsys.readouterr().err


def test_random_pipeline_builds_on_the_device_and_derived_rows_do_not_track_gradients():
    pipe = bench.random_pipeline("tiny")
    assert pipe.config.name == "tiny" and not any(p.requires_grad for p in pipe.loaded.unet.parameters())
    con = bench.make_contender(pipe, "plain:bf16", "cpu")
    x, t = torch.randn(1, *pipe.config.latent_shape), torch.full((1,), 10)
    eps = con.runner.denoise(x, t)
    assert eps.dtype == torch.float32 and not eps.requires_grad
    assert next(con.pipe.loaded.unet.parameters()).dtype == torch.bfloat16
    assert next(pipe.loaded.unet.parameters()).dtype == torch.float32  # the original is untouched
