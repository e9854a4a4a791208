"""The phases of the GPU check (gpu_check.py): build, tests, enhancement and sampling timings.

Each phase returns a record {"status", "reason", ...}; a contender row holds its own status, its
correctness check against the fp32 reference and, when timed, medians over interleaved rounds.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from gpu_common import ASSUMED, ROOT, Budget, Plan, deadline, describe_error, is_timeout, rows_status, tail

BUILD_CMD = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
BUILD_ENV = {"RETINA_FAST_CUDA": "1", "RETINA_FAST_CUDA_ARCHS": "90"}
TEST_CMDS = [["-m", "gpu", "tests"], ["tests/test_kernels_unet.py", "tests/test_kernels_channel_attention.py"]]


# --------------------------------------------------------------------------------- build and tests


def _build_env() -> dict:
    env = {**os.environ, **BUILD_ENV}
    if shutil.which("nvcc") is None and Path("/usr/local/cuda/bin/nvcc").exists():
        env["CUDACXX"] = "/usr/local/cuda/bin/nvcc"  # CMake looks on PATH, then at CUDACXX
    return env


def phase_build(plan: Plan, budget: Budget) -> dict:
    cmd = " ".join(f"{k}={v}" for k, v in BUILD_ENV.items()) + " " + " ".join(BUILD_CMD[1:])
    rec: dict = {"command": f"python {cmd}"}
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        return {**rec, "status": "failed", "reason": f"no Python headers ({headers}): pybind11 cannot build _C"}
    if not plan.dry_run:
        cap = min(plan.build_cap_s, budget.left())
        try:
            out = subprocess.run(BUILD_CMD, cwd=ROOT, env=_build_env(), capture_output=True, text=True, timeout=cap)
        except subprocess.TimeoutExpired:
            return {**rec, "status": "timed_out", "reason": f"build took over {cap:.0f} s"}
        if out.returncode:
            return {**rec, "status": "failed", "reason": f"pip exited {out.returncode}",
                    "log_tail": tail(out.stdout + out.stderr)}
    probe = subprocess.run([sys.executable, "-c", "import json; from retina_fast import _ext; "
                            "print(json.dumps(_ext.build_info()))"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    if probe.returncode:
        return {**rec, "status": "failed", "reason": "retina_fast does not import", "log_tail": tail(probe.stderr)}
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    rec["build_info"] = info
    if "error" in info:
        return {**rec, "status": "failed", "reason": f"retina_fast._C did not load: {info['error']}"}
    if plan.dry_run:
        return {**rec, "status": "ok", "reason": "dry run: the build command was not run; the installed "
                "extension loads (its CUDA part: " + str(info.get("cuda")) + ")"}
    if not info.get("with_cuda") or "sm_90" not in str(info.get("cuda")):
        return {**rec, "status": "failed", "reason": f"extension built without CUDA for sm_90: {info.get('cuda')}"}
    return {**rec, "status": "ok"}


def _junit_counts(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed_tests"] = [f"{tc.get('classname')}::{tc.get('name')}" for tc in suite.iter("testcase")
                              if tc.find("failure") is not None or tc.find("error") is not None]
    return counts


def phase_tests(plan: Plan, budget: Budget, cap: float) -> dict:
    runs, status = [], "ok"
    deadline_t = time.monotonic() + cap
    with tempfile.TemporaryDirectory() as tmp:
        for i, args in enumerate(TEST_CMDS):
            xml = Path(tmp) / f"junit{i}.xml"
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, f"--junitxml={xml}"]
            if plan.dry_run:
                cmd.append("--collect-only")
            left = deadline_t - time.monotonic()
            if left < 5:
                runs.append({"command": " ".join(cmd[1:]), "status": "skipped", "reason": "no time left in the cap"})
                status = "skipped"
                continue
            t0 = time.monotonic()
            try:
                out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left)
            except subprocess.TimeoutExpired:
                runs.append({"command": " ".join(cmd[1:]), "status": "timed_out", "reason": f"over {left:.0f} s"})
                status = "timed_out"
                continue
            run = {"command": " ".join(cmd[3:]), "exit_code": out.returncode,
                   "seconds": round(time.monotonic() - t0, 1), "summary": (out.stdout.strip().splitlines() or [""])[-1]}
            if xml.exists():
                run.update(_junit_counts(xml))
            collected = re.search(r"(\d+)(?:/\d+)? tests? collected", out.stdout)
            if collected:
                run["collected"] = int(collected.group(1))
            ok = out.returncode == 0 and (not plan.dry_run or run.get("collected", 0) > 0)
            run["status"] = "ok" if ok else "failed"
            if not ok:
                run["log_tail"] = tail(out.stdout + out.stderr)
                status = "failed"
            runs.append(run)
    reason = "dry run: collected only (GPU tests skip on a CPU)" if plan.dry_run else ""
    return {"status": status, "reason": reason, "runs": runs}


# --------------------------------------------------------------------------------- sampling


def _kind(spec: str) -> str:
    from retina_fast import bench

    name, _ = bench.parse_spec(spec)
    return name.partition("@")[0]  # cuda@nhwc: the rates of cuda


def sample_estimate(plan: Plan, spec: str, cfg, n: int, runs: int) -> float:
    """Seconds for set-up + warm-up + ``runs`` full runs of one sampling contender (ASSUMED rates)."""
    from retina_fast import flops

    rate, per_call, setup = ASSUMED["dry" if plan.dry_run else "real"][_kind(spec)]
    run = n * flops.sample_flops(cfg, plan.steps) / (rate * 1e12) + plan.steps * per_call
    warm = n * flops.sample_flops(cfg, plan.warm_steps) / (rate * 1e12) + plan.warm_steps * per_call
    return setup + warm + runs * run


def phase_sample(plan: Plan, budget: Budget, reserve_s: float, name: str, pipe, n: int) -> dict:
    """Contenders of ``plan.sample_specs`` on ``pipe``: warm-up, a checked full run each, interleaved rounds."""
    import torch

    from retina_fast import backends, bench, flops

    cfg = pipe.config
    per_image = flops.sample_flops(cfg, plan.steps)
    rec = {"model": pipe.source, "config": cfg.name, "n": n, "steps": plan.steps, "sampler": "ddim",
           "gflop_per_image": per_image / 1e9, "rows": []}
    committed = [0.0]  # the timed rounds of contenders already admitted run after every check
    available = lambda: budget.left() - reserve_s - committed[0]  # noqa: E731
    ref = None
    live = {}
    for spec, stands_in in plan.sample_specs:
        row = {"contender": spec, "stands_in_for": stands_in or None}
        rec["rows"].append(row)
        need = sample_estimate(plan, spec, cfg, n, 1 + plan.rounds)
        row["estimate_s"] = round(need, 1)
        if ref is None and spec != "torch":
            row.update(status="skipped", reason="no reference output to check against")
            continue
        if need > available():
            row.update(status="skipped", reason=f"estimated {need:.0f} s (set-up, warm-up, check, {plan.rounds} "
                                                f"rounds) > {available():.0f} s left for this phase")
            continue
        try:
            allowance = available() if plan.dry_run else min(available(), 2.5 * need + 30)
            with deadline(allowance, f"{name} {spec}"):
                t0 = time.perf_counter()
                con = bench.make_contender(pipe, spec, plan.device, compile_backend=plan.compile_backend)
                con.sample(n, plan.warm_steps, batch_size=n)   # compile / capture / JIT at the timed shape
                row["setup_s"] = round(time.perf_counter() - t0, 2)
                t0 = time.perf_counter()
                cubes, latents = con.sample(n, plan.steps, batch_size=n)
                row["check_run_s"] = time.perf_counter() - t0
        except backends.BackendUnavailable as exc:
            row.update(status="skipped", reason=str(exc))
            continue
        except Exception as exc:
            if is_timeout(exc):
                row.update(status="timed_out", reason=f"{name} {spec}: over its {allowance:.0f} s allowance")
                torch._dynamo.reset()
            else:
                row.update(status="failed", reason=describe_error(exc))
            continue
        row.update(dtype=bench.dtype_name(con.dtype), note=con.note)
        if not (torch.isfinite(latents).all() and torch.isfinite(cubes).all()):
            row.update(status="failed", reason="non-finite output")
            continue
        if spec == "torch":
            ref = (cubes, latents)
        row["latent_rel_l2"] = bench.relative_l2(latents, ref[1])
        row["cube_rel_l2"] = bench.relative_l2(cubes, ref[0])
        live[spec] = (con, row)
        committed[0] += plan.rounds * row["check_run_s"]
        del cubes, latents
    yard = {c.dtype: r["latent_rel_l2"] for c, r in live.values() if c.kind == "plain"}
    timed = {}
    for spec, (con, row) in live.items():
        ok, rule = within_rule(row["latent_rel_l2"], con.dtype, yard.get(con.dtype), spec == "torch")
        row.update(check=rule, check_passed=ok)
        if ok:
            timed[spec] = (lambda con=con: con.sample(n, plan.steps, batch_size=n))
        else:
            row.update(status="failed", reason=f"correctness: latents rel. L2 {row['latent_rel_l2']:.2e}, needs {rule}")
    _time_rows(plan, budget, reserve_s, name, timed, {s: r for s, (c, r) in live.items()}, plan.rounds,
               per_item=n, flop_per_call=n * per_image)
    rec["status"], rec["reason"] = rows_status(rec["rows"])
    return rec


def within_rule(err: float, dtype, yardstick: float | None, is_reference: bool) -> tuple[bool, str]:
    from retina_fast import bench

    if is_reference:
        return True, "reference"
    return bench.within_tolerance(err, dtype, yardstick)


def _time_rows(plan: Plan, budget: Budget, reserve_s: float, name: str, fns: dict, rows: dict, max_rounds: int,
               per_item: int, flop_per_call: float) -> None:
    """Interleaved rounds of ``fns`` (rows already hold ``check_run_s``), as many as fit, then medians."""
    from retina_fast import bench

    if not fns:
        return
    one_round = sum(rows[s]["check_run_s"] for s in fns)
    available = budget.left() - reserve_s
    rounds = min(max_rounds, int(available // (one_round * 1.1)))
    if rounds < 1:
        for s in fns:
            rows[s].update(status="skipped", reason=f"checked, not timed: one round takes ~{one_round:.1f} s, "
                                                    f"{available:.0f} s left for this phase")
        return
    try:
        with deadline(available, f"{name} timing"):
            timing = bench.interleaved(fns, rounds, warmup=False,
                                       keep_going=lambda: budget.left() - reserve_s > one_round * 1.1)
    except Exception as exc:
        if not is_timeout(exc):
            raise
        for s in fns:
            rows[s].update(status="timed_out", reason=describe_error(exc))
        return
    ref_name = next(iter(fns))
    for s, t in timing.items():
        rows[s].update(status="ok", rounds=len(t["runs"]), median_s=t["median_s"], min_s=t["min_s"],
                       runs_s=t["runs"], items_per_s=per_item / t["median_s"],
                       tflop_per_s=flop_per_call / t["median_s"] / 1e12,
                       speedup=timing[ref_name]["median_s"] / t["median_s"])


# --------------------------------------------------------------------------------- enhancement


def _photo(size: int):
    """The real fundus photograph that ships with scikit-image (CC0), resized to size x size, (3, H, W)."""
    import numpy as np
    import torch
    from skimage import data

    x = torch.from_numpy(np.ascontiguousarray(data.retina())).permute(2, 0, 1).float()[None] / 255
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)[0].clamp(0, 1)


@functools.lru_cache(maxsize=None)
def mage_flops(size: int) -> float:
    """FLOPs of one MAGE-Net restore at size² (torch's FlopCounterMode on a meta-device copy)."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from retina_fast.enhance import load_enhancer

    net = copy.deepcopy(load_enhancer("default").model).to("meta")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net.restore(torch.empty(1, 3, size, size, device="meta"))
    return float(fc.get_total_flops())


def enhance_estimate(plan: Plan, size: int, runs: int) -> float:
    key = "dry" if plan.dry_run else "real"
    total = 0.0
    for spec, _ in plan.enhance_specs:
        rate, per_call, setup = ASSUMED[key][f"enhance-{_kind(spec)}"]
        total += setup + (1 + runs) * (mage_flops(size) / (rate * 1e12) + per_call)
    return total


def phase_enhance(plan: Plan, budget: Budget, reserve_s: float) -> dict:
    import copy

    import torch

    from retina_fast import backends, bench
    from retina_fast.enhance import enhance, load_enhancer
    from retina_fast.training.degrade import fov_mask

    rec = {"model": "packaged magenet-tiny", "sizes": list(plan.enhance_sizes), "rows": []}
    for size in plan.enhance_sizes:
        need = enhance_estimate(plan, size, plan.enhance_rounds)
        if need > budget.left() - reserve_s:
            rec["rows"] += [{"contender": spec, "size": size, "status": "skipped",
                             "reason": f"estimated {need:.0f} s for {size} px > {budget.left() - reserve_s:.0f} s left"}
                            for spec, _ in plan.enhance_specs]
            continue
        image = _photo(size)
        fov = fov_mask(image).float()
        count = mage_flops(size)
        outputs, fns, rows = {}, {}, {}
        for spec, stands_in in plan.enhance_specs:
            row = {"contender": spec, "size": size, "stands_in_for": stands_in or None, "gflop": count / 1e9}
            rec["rows"].append(row)
            name, dtype = bench.parse_spec(spec)
            dev = None if name == "cpu" else plan.device
            try:
                with deadline(max(budget.left() - reserve_s, 1.0), f"enhance {size} {spec}"):
                    t0 = time.perf_counter()
                    if name == "plain":
                        net = copy.deepcopy(load_enhancer("default").model).to(plan.device, dtype)

                        def fn(net=net, dtype=dtype):
                            with torch.no_grad():
                                y = net.restore(image[None].to(plan.device, dtype)).float()[0].cpu()
                            return y.clamp(0, 1) * fov
                    else:
                        fn = (lambda name=name, dev=dev: enhance(image, backend=name, device=dev))
                    fn()
                    row["setup_s"] = round(time.perf_counter() - t0, 2)
                    if dtype is None:  # the backend's own default, as enhance() resolved it
                        dtype = load_enhancer("default").runner(name, dev).dtype
                    row["dtype"] = bench.dtype_name(dtype)
                    t0 = time.perf_counter()
                    outputs[spec] = fn()
                    row["check_run_s"] = time.perf_counter() - t0
            except backends.BackendUnavailable as exc:
                row.update(status="skipped", reason=str(exc))
                continue
            except Exception as exc:
                row.update(status="timed_out" if is_timeout(exc) else "failed", reason=describe_error(exc))
                continue
            fns[spec], rows[spec] = fn, row
        if "torch" not in outputs:
            continue
        ref = outputs["torch"]
        errs = {s: float((o - ref).abs().max()) for s, o in outputs.items()}
        plain = next((errs[s] for s in outputs if s.startswith("plain")), None)
        for s in list(fns):
            rows[s]["max_abs_err"] = errs[s]
            if s == "torch" or s.startswith("plain"):
                rows[s].update(check="reference" if s == "torch" else "yardstick", check_passed=True)
                continue
            ok = plain is not None and errs[s] <= 2 * plain + 2 / 255
            rule = f"<= 2 x {plain:.2e} (plain bf16) + 2/255" if plain is not None else "no plain bf16 row"
            rows[s].update(check=rule, check_passed=ok)
            if not ok:
                rows[s].update(status="failed", reason=f"correctness: max error {errs[s]:.3e}, needs {rule}")
                del fns[s]
        _time_rows(plan, budget, reserve_s, f"enhance {size}", fns, rows, plan.enhance_rounds,
                   per_item=1, flop_per_call=count)
    rec["status"], rec["reason"] = rows_status(rec["rows"])
    return rec
