"""``benchmarks/gpu/run.sh --dry-run``: the GPU check's own code on a CPU at toy sizes, so that a mistake in
it never costs the scarce GPU time (the real run is the same script without ``--dry-run``)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"
KERNELS = {"_gn_silu_kernel", "_gn_silu_nhwc_kernel", "_flash_kernel", "_linear_attn_kernel", "_sampler_step_kernel",
           "_nearest_code_kernel", "_randn_rows_kernel", "_pool_kernel", "_excite_scale_kernel"}


def _dry_run(tmp_path, *args, timeout=900):
    out = tmp_path / "gpu-check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets what it needs
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_dry_run_exercises_every_phase_and_passes(tmp_path):
    proc, res = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert res["dry_run"] is True and res["ok"] is True and "DRY RUN" in res["dry_run_note"]
    assert res["restarted_after_build"] is True  # a fresh interpreter after pip install -e (see gpu_check.py)
    env = res["environment"]
    assert env["torch"] and env["triton"] and env["date"] and env["commit"]
    phases = {p["name"]: p for p in res["phases"]}
    assert list(phases) == ["build", "tests", "triton", "sample-paper-224", "enhance", "sample-tiny"]
    assert {p["status"] for p in phases.values()} == {"ok"}, {n: p.get("reason") for n, p in phases.items()}
    assert all(run["collected"] > 0 for run in phases["tests"]["runs"])
    assert all(c["passed"] for c in phases["triton"]["checks"])
    assert KERNELS <= {k["kernel"] for k in phases["triton"]["sm90"] if k.get("cubin_bytes", 0) > 0}
    for name in ("sample-tiny", "sample-paper-224"):
        rows = {r["contender"]: r for r in phases[name]["rows"]}
        assert set(rows) == {"torch", "plain:bf16", "cpu:bf16", "compile:bf16"}
        assert rows["cpu:bf16"]["stands_in_for"] == "cuda bf16"
        assert rows["compile:bf16"]["stands_in_for"] == "torch.compile inductor bf16"
        for r in rows.values():
            assert r["check_passed"] and r["rounds"] >= 1 and r["median_s"] > 0 and r["tflop_per_s"] > 0, r
        assert rows["torch"]["latent_rel_l2"] == 0 and rows["plain:bf16"]["latent_rel_l2"] > 0
    enhance = {r["contender"]: r for r in phases["enhance"]["rows"]}
    assert set(enhance) == {"torch", "plain:bf16", "cpu"} and all(r["median_s"] > 0 for r in enhance.values())
    assert "| sample-paper-224 |" in proc.stdout and "overall: OK" in proc.stdout


def test_dry_run_budget_skips_with_reasons_and_fails(tmp_path):
    """A budget too small for anything: every timed phase is skipped with its estimate, and a dry run with
    anything not ok exits non-zero."""
    proc, res = _dry_run(tmp_path, "--budget-s", "1", timeout=300)
    assert proc.returncode == 1 and "overall: FAILED" in proc.stdout
    phases = {p["name"]: p for p in res["phases"]}
    for name in ("triton", "enhance", "sample-tiny", "sample-paper-224"):
        assert phases[name]["status"] == "skipped" and "estimated" in phases[name]["reason"], phases[name]
    assert phases["tests"]["status"] == "skipped"


def test_real_plan_contenders_parse_and_have_assumed_rates(monkeypatch):
    """Every contender the GPU run times (not only the dry run's stand-ins) is a valid spec with a budget
    estimate: a typo there would otherwise first show on the GPU machine."""
    from retina_fast import bench

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks" / "gpu"))
    import gpu_check
    import gpu_common
    import gpu_phases

    for spec, _ in gpu_check.REAL.sample_specs:
        bench.parse_spec(spec)
        assert gpu_phases._kind(spec) in gpu_common.ASSUMED["real"], spec
    for spec, _ in gpu_check.REAL.enhance_specs:
        assert "enhance-" + gpu_phases._kind(spec) in gpu_common.ASSUMED["real"], spec
    assert ("cuda@nhwc", "") in gpu_check.REAL.sample_specs
