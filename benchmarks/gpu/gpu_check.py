"""The GPU path in one prepared command: build, GPU tests, timings; one JSON, one table, a time budget.

    bash benchmarks/gpu/run.sh [--out FILE] [--budget-s 450] [--commit SHA]     # H100 / H200: < 8 min
    bash benchmarks/gpu/run.sh --dry-run [--out FILE]                            # any CPU (CI)
    python benchmarks/gpu/gpu_check.py --estimate [--dry-run]                     # the budget, per phase

Phases, in order of importance (that is the order they run in):

    build             pip install -e . with the CUDA part for sm_90; then what _C was built with; the rest
                      runs in a fresh interpreter (exec), the only kind that sees an editable install
    tests             pytest -m gpu tests; the Triton kernel test files, now on the GPU
    sample-paper-224  random weights (556 M-parameter U-Net, 110.8 GFLOP per call), n = 64, DDIM-50
    enhance           MAGE-Net (packaged magenet-tiny) on a real fundus photograph at 512² and 1024²
    sample-tiny       the shipped model tiny, n = 64, DDIM-50

Sampling contenders: ``torch`` fp32 (the reference; TF32 off), ``plain`` bf16 (eager PyTorch at bf16:
the yardstick), ``cuda`` bf16, ``torch.compile`` bf16 (inductor, default mode, U-Net compiled; the decoder
eager bf16) and, last in priority, ``cuda@nhwc`` (the cuda backend with its U-Net channels-last, which decides
``RETINA_FAST_CUDA_LAYOUT``'s default) -- retina_fast.bench. Enhancement: ``torch`` fp32, ``plain`` bf16, ``cuda`` bf16.
Each contender is warmed up at the timed batch shape (compiles, captures, JITs: ``setup_s``), then its
first full run is its correctness check against the reference -- sampling: relative L2 of the latents
<= 2 err(plain bf16) + 1e-3; enhancement: max error <= 2 err(plain bf16) + 2/255 -- and only contenders
that pass are timed, in interleaved rounds (medians). TFLOP/s from retina_fast.flops (sampling) and
torch's FlopCounterMode (MAGE-Net).

Budget (450 s; run.sh's ``timeout`` at 465 s is the last resort). Each phase and contender is estimated
before it starts (FLOPs over an assumed achieved rate, per-call overheads, set-up such as compilation:
``gpu_common.ASSUMED``; ``--estimate`` prints them). What would not fit in what is left is skipped and
recorded with the reason; the timed rounds are fitted to the time left; an alarm stops a contender that
overruns its allowance (``timed_out``). The less important phases are the ones that get cut. The JSON is
rewritten after every phase, so even a killed run keeps what it finished.

Dry run (``--dry-run``, CPU, one thread): the same code -- argument parsing, model construction,
contenders, correctness checks, budget, timing, JSON and table -- at toy sizes, with stand-ins recorded
as such: the ``cpu`` backend (bf16) for ``cuda``, torch.compile's ``aot_eager`` backend for inductor;
``build`` checks the installed extension instead of building; ``tests`` only collects; and a ``triton``
phase runs the cuda backend's Triton kernels (U-Net, sampler steps, nearest code, channel attention,
noise) in the interpreter against their references and compiles every launch it saw for sm_90
(gpu_triton.py). Any status other than ok fails the dry run.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from gpu_common import ASSUMED, ROOT, Budget, Plan, Terminated, cpu_seconds, describe_error, is_timeout
from gpu_phases import (enhance_estimate, phase_build, phase_enhance, phase_sample, phase_tests,
                        sample_estimate)
from gpu_triton import phase_triton

SCHEMA = "retina_fast.gpu_check/1"


def environment(plan: Plan, commit: str | None) -> dict:
    import torch

    from retina_fast import _ext, bench

    env = bench.machine()
    if commit:
        env["commit_full"], env["commit"], env["commit_source"] = commit, commit[:7], "--commit"
    elif env.get("commit_full") is None:
        env["commit_source"] = "not a git checkout here; pass --commit"
    env["extension"] = _ext.build_info()
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                         "memory_gib": round(props.total_memory / 2 ** 30, 1),
                         "multiprocessors": props.multi_processor_count, "cudnn": torch.backends.cudnn.version(),
                         "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                         "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["device"]["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            env["device"]["nvidia_smi"] = f"unavailable: {exc}"
    else:
        env["device"] = {"name": bench.hardware_line(), "threads": torch.get_num_threads()}
    return env


REAL = Plan(False, "cuda", 450.0, 64, 64, 50, 2, 3, (512, 1024), 5,
            (("torch", ""), ("plain:bf16", ""), ("cuda", ""), ("compile:bf16", ""), ("cuda@nhwc", "")),
            (("torch", ""), ("plain:bf16", ""), ("cuda", "")), "inductor", 150.0, 120.0)
DRY = Plan(True, "cpu", 900.0, 2, 2, 2, 1, 2, (48,), 1,
           (("torch", ""), ("plain:bf16", ""), ("cpu:bf16", "cuda bf16"), ("compile:bf16", "torch.compile inductor bf16")),
           (("torch", ""), ("plain:bf16", ""), ("cpu", "cuda bf16")), "aot_eager", 30.0, 900.0)


# --------------------------------------------------------------------------------- the run


def paper_config(plan: Plan):
    """paper-224, or in a dry run its structure at a size a CPU runs in seconds."""
    from retina_fast.models.config import get_preset

    cfg = get_preset("paper-224")
    if not plan.dry_run:
        return cfg
    return dataclasses.replace(cfg, name="paper-224 (dry-run toy: 64 px, VQ base 8, U-Net base 32)",
                               vqgan=dataclasses.replace(cfg.vqgan, image_size=64, base_channels=8),
                               unet=dataclasses.replace(cfg.unet, base_channels=32))


def estimates(plan: Plan, tiny_cfg) -> dict[str, tuple[float, float]]:
    """(estimated seconds, seconds of its first and most important part) of each timing phase, in the order
    they run (most important first). A phase whose first part does not fit is skipped; within a phase, each
    contender (or image size) that does not fit in what is left is skipped on its own."""
    runs = 1 + plan.rounds  # the checked run and the timed rounds (set-up and warm-up come on top)
    est = {"triton": (30.0, 30.0)} if plan.dry_run else {}
    for name, cfg, n in (("sample-paper-224", paper_config(plan), plan.paper_n), ("enhance", None, 0),
                         ("sample-tiny", tiny_cfg, plan.tiny_n)):
        if cfg is None:
            parts = [enhance_estimate(plan, s, plan.enhance_rounds) for s in plan.enhance_sizes]
        else:
            parts = [sample_estimate(plan, s, cfg, n, runs) for s, _ in plan.sample_specs]
        est[name] = (sum(parts), parts[0])
    return est


def table(result: dict) -> str:
    env = result["environment"]
    what = "DRY RUN (CPU stand-ins, toy sizes; no GPU figures)" if result["dry_run"] else "GPU check"
    lines = [f"{what}: {env['device']['name']}, torch {env['torch']}, triton {env['triton']}, commit "
             f"{env.get('commit')}{' (dirty)' if env.get('dirty') else ''}, {env['date']}, "
             f"{result['elapsed_s']:.0f} s of {result['budget_s']:.0f} s", ""]
    for ph in result["phases"]:
        extra = f" -- {ph['reason']}" if ph.get("reason") else ""
        lines.append(f"{ph['name']:<18} {ph['status']:<9} {ph.get('seconds', 0):6.1f} s (est. "
                     f"{ph.get('estimate_s', 0):.0f} s){extra}")
        for run in ph.get("runs", []):
            lines.append(f"    {run.get('command')}: {run.get('status')}, {run.get('summary', run.get('reason', ''))}")
    lines += ["", "| phase | contender | stands in for | status | median s | items/s | speed-up | TFLOP/s | "
              "first call s | error vs fp32 | check |", "|" + "---|" * 11]
    for ph in result["phases"]:
        for r in ph.get("rows", []):
            what = f"{ph['name']} {r['size']}²" if "size" in r else ph["name"]
            err = r.get("latent_rel_l2", r.get("max_abs_err"))
            fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"  # noqa: E731
            check = ("ok" if r.get("check_passed") else "FAIL") if "check_passed" in r else "-"
            label = r["contender"] if ":" in r["contender"] else f"{r['contender']} {r.get('dtype', '')}".strip()
            lines.append(f"| {what} | {label} | {r.get('stands_in_for') or ''} | "
                         f"{r.get('status')} | {fmt(r.get('median_s'), '.3f')} | {fmt(r.get('items_per_s'), '.2f')} | "
                         f"{fmt(r.get('speedup'), '.2f')} | {fmt(r.get('tflop_per_s'), '.3g')} | "
                         f"{fmt(r.get('setup_s'), '.1f')} | {fmt(err, '.2e')} | {check} |")
    lines.append("")
    lines.append(f"overall: {'OK' if result['ok'] else 'FAILED'}; JSON: {result['out']}")
    return "\n".join(lines)


def print_estimates(plan: Plan) -> int:
    from retina_fast import engine

    tiny = engine.load("default").config
    print(f"{'dry run' if plan.dry_run else 'GPU run'}: budget {plan.budget_s:.0f} s; estimated seconds (ASSUMED rates)")
    print(f"  build {1 if plan.dry_run else 60}, tests {15 if plan.dry_run else 60}")
    runs = 1 + plan.rounds
    for name, (total, _) in estimates(plan, tiny).items():
        print(f"  {name}: {total:.0f}")
        if name.startswith("sample"):
            cfg = paper_config(plan) if name.endswith("224") else tiny
            n = plan.paper_n if name.endswith("224") else plan.tiny_n
            for spec, _ in plan.sample_specs:
                print(f"      {spec}: {sample_estimate(plan, spec, cfg, n, runs):.0f}")
    return 0


def _statuses_ok(result: dict) -> bool:
    allowed = {"ok"} if result["dry_run"] else {"ok", "skipped"}
    for ph in result["phases"]:
        if ph["status"] not in allowed:
            return False
        if any(r.get("status") not in allowed or r.get("check_passed") is False for r in ph.get("rows", [])):
            return False
    return True


def restart_after_build(result: dict, budget: Budget, argv: list[str]) -> None:
    """Run the rest in a fresh interpreter (same PID, so run.sh's ``timeout`` still governs it). The process
    that ran ``pip install -e .`` cannot import what it installed: an editable install is a path hook that
    site-packages' .pth files register at interpreter start (seen on an H200: ``No module named
    'retina_fast'`` right after a build that succeeded). The dry run takes the same path."""
    fd, path = tempfile.mkstemp(prefix="retina-fast-gpu-check-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"start": budget.start, "phases": result["phases"]}, f, default=str)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv, "--after-build", path])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, stand-ins (CI)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/gpu-check-"
                                                          "<device>-<date>.json; dry run: a temporary file)")
    p.add_argument("--budget-s", type=float, default=None, help="time budget (default 450; dry run 900: a loaded CI machine must not turn into a skip)")
    p.add_argument("--commit", default=None, help="git commit to record where the tree has no .git")
    p.add_argument("--skip", default="", help="comma-separated phases to leave out (recorded as skipped)")
    p.add_argument("--estimate", action="store_true", help="print each phase's estimated seconds and exit")
    p.add_argument("--after-build", type=Path, default=None, help=argparse.SUPPRESS)  # set by the re-exec below
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    plan = DRY if a.dry_run else REAL
    if a.budget_s is not None:
        plan = dataclasses.replace(plan, budget_s=a.budget_s)
    if a.estimate:
        return print_estimates(plan)
    skip = {s for s in a.skip.split(",") if s}
    if plan.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton
        # One thread (torch, the extension's OpenMP): toy sizes are Python-bound, and on a shared CI machine a
        # second thread spin-waits for the first (measured: a 48 px MAGE-Net call 0.03 s of CPU on 1 thread,
        # 1.3 s on 2 under load).
        os.environ["OMP_NUM_THREADS"] = "1"
    budget = Budget(plan.budget_s)
    after_build = json.loads(a.after_build.read_text()) if a.after_build is not None else None
    if after_build is not None:
        a.after_build.unlink(missing_ok=True)
        budget.start = after_build["start"]  # time.monotonic is one clock for every process of the machine

    def on_term(signum, frame):
        raise Terminated(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    result = {"schema": SCHEMA, "dry_run": plan.dry_run, "budget_s": plan.budget_s, "elapsed_s": 0.0,
              "plan": {k: v for k, v in dataclasses.asdict(plan).items()}, "assumed_rates": ASSUMED[
                  "dry" if plan.dry_run else "real"], "phases": [], "ok": False, "out": None}
    if plan.dry_run:
        result["dry_run_note"] = ("DRY RUN on a CPU: toy sizes and stand-in backends; no figure here is a GPU "
                                  "measurement")
    out = a.out

    def write() -> None:
        result["elapsed_s"] = budget.elapsed()
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    def run_phase(name: str, estimate: float, fn) -> dict:
        rec = {"name": name, "estimate_s": round(estimate, 1)}
        result["phases"].append(rec)
        t0, c0 = time.monotonic(), cpu_seconds()
        if name in skip:
            rec.update(status="skipped", reason="--skip")
        else:
            try:
                rec.update(fn())
            except Exception as exc:
                rec.update(status="timed_out" if is_timeout(exc) else "failed", reason=describe_error(exc))
        rec["seconds"], rec["cpu_s"] = round(time.monotonic() - t0, 1), round(cpu_seconds() - c0, 1)
        print(f"[{budget.elapsed():5.0f} s] {name}: {rec['status']}" + (f" -- {rec['reason']}" if rec.get("reason")
                                                                       else ""), flush=True)
        write()
        return rec

    status = 0
    try:
        if after_build is None:
            run_phase("build", 1.0 if plan.dry_run else 60.0, lambda: phase_build(plan, budget))
            restart_after_build(result, budget, argv)
        result["phases"], result["restarted_after_build"] = after_build["phases"], True
        import torch  # after the build: retina_fast (and its _C) is imported only once it exists

        from retina_fast import engine

        if not plan.dry_run:  # the torch row is the fp32 reference: no TF32 in its convolutions or matmuls
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        result["environment"] = environment(plan, a.commit)
        if out is None:
            if plan.dry_run:
                out = Path(tempfile.gettempdir()) / "retina-fast-gpu-check-dry-run.json"
            else:
                slug = re.sub(r"[^a-z0-9]+", "-", result["environment"]["device"]["name"].lower()).strip("-")
                out = ROOT / "benchmarks" / "results" / f"gpu-check-{slug}-{time.strftime('%Y%m%d-%H%M')}.json"
        result["out"] = str(out)
        tiny = engine.load("default")
        est = estimates(plan, tiny.config)
        result["estimates_s"] = {k: round(v[0], 1) for k, v in est.items()}
        run_phase("tests", 15.0 if plan.dry_run else 60.0,
                  lambda: phase_tests(plan, budget, min(plan.tests_cap_s, budget.left())))
        for name, (full, first) in est.items():  # in order of importance; what does not fit is skipped
            if name not in skip and first > budget.left():
                result["phases"].append({"name": name, "estimate_s": round(full, 1), "status": "skipped",
                                         "reason": f"estimated {first:.0f} s for its first part > "
                                                   f"{budget.left():.0f} s left of the {plan.budget_s:.0f} s budget"})
                write()
                continue
            if name == "triton":
                run_phase(name, full, lambda: phase_triton(plan))
            elif name == "enhance":
                run_phase(name, full, lambda: phase_enhance(plan, budget, 0.0))
            elif name == "sample-tiny":
                run_phase(name, full, lambda: phase_sample(plan, budget, 0.0, name, tiny, plan.tiny_n))
            else:
                def paper():
                    from retina_fast import bench

                    pipe = bench.random_pipeline(paper_config(plan), plan.device)
                    try:
                        return phase_sample(plan, budget, 0.0, name, pipe, plan.paper_n)
                    finally:
                        del pipe
                        gc.collect()  # compiled graphs and CUDA graph pools hold the 556 M-parameter copies
                        if plan.device == "cuda":
                            torch.cuda.empty_cache()

                run_phase(name, full, paper)
        result["ok"] = _statuses_ok(result)
        status = 0 if result["ok"] else 1
    except (Terminated, KeyboardInterrupt) as exc:
        result["phases"].append({"name": "run", "status": "killed", "reason": str(exc)})
        status = 124
    except Exception as exc:  # a bug in this script: fail loudly, keep what was done
        result["phases"].append({"name": "run", "status": "failed", "reason": describe_error(exc),
                                 "traceback": traceback.format_exc()})
        status = 1
    write()
    if "environment" in result:
        print(table(result), flush=True)
    else:
        print(json.dumps(result["phases"], indent=2, default=str), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
