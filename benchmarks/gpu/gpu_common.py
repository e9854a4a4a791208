"""Shared pieces of the GPU check (gpu_check.py): the plan, assumed rates, the time budget, deadlines."""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# Assumed rates for the estimates, per contender kind: (achieved TFLOP/s, seconds of overhead per U-Net call
# -- per call for enhancement --, seconds of set-up in the first call). H100/H200: ~400 TFLOP/s bf16 is what large
# GEMMs reach (790 measured on an H200 for 8192^3), convolutions and attention less; the fp32 reference runs
# without TF32 (67 TFLOP/s fp32 peak); eager launches ~300 kernels per U-Net call, a CUDA graph replays them;
# torch.compile's set-up is its compile (~1-2 min per graph), the cuda backend's Triton JIT and graph capture.
# MAGE-Net (16-channel convolutions) is launch- and transfer-bound: per-call overhead dominates. The dry run's
# rates are a 2-core AVX-512 CPU's on one thread. Measured on an H200 (2026-12-04, paper-224, n = 64, DDIM-50,
# benchmarks/results/gpu-check-nvidia-h200-20261204.json): fp32 39.6, eager bf16 240, cuda bf16 252 TFLOP/s,
# cuda set-up 4.5 s; the rates below keep a margin under those. torch.compile's set-up was not measured yet.
ASSUMED = {
    "real": {"torch": (35.0, 3e-3, 3.0), "plain": (220.0, 3e-3, 3.0), "cuda": (230.0, 3e-4, 10.0),
             "compile": (300.0, 1e-3, 100.0), "enhance-torch": (30.0, 0.05, 3.0),
             "enhance-plain": (150.0, 0.05, 3.0), "enhance-cuda": (150.0, 0.02, 15.0)},
    "dry": {"torch": (0.05, 0.03, 2.0), "plain": (0.05, 0.03, 2.0), "cpu": (0.1, 0.01, 3.0),
            "compile": (0.05, 0.03, 10.0), "enhance-torch": (0.05, 0.02, 1.0), "enhance-plain": (0.05, 0.02, 1.0),
            "enhance-cpu": (0.1, 0.02, 3.0)},
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run does (gpu_check.REAL on a GPU, gpu_check.DRY on a CPU)."""

    dry_run: bool
    device: str
    budget_s: float
    tiny_n: int
    paper_n: int
    steps: int
    warm_steps: int
    rounds: int
    enhance_sizes: tuple[int, ...]
    enhance_rounds: int
    sample_specs: tuple[tuple[str, str], ...]     # (spec, the GPU contender it stands in for, or "")
    enhance_specs: tuple[tuple[str, str], ...]
    compile_backend: str
    build_cap_s: float
    tests_cap_s: float


class PhaseTimeout(Exception):
    """A phase or contender ran past its allowance (raised by ``deadline``)."""


class Terminated(Exception):
    """SIGTERM (the outer ``timeout`` of run.sh): record what was done and stop."""


class Budget:
    def __init__(self, total_s: float) -> None:
        self.total, self.start = total_s, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.total - self.elapsed()


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Raise PhaseTimeout in the main thread after ``seconds`` (a safety net; rounds are fitted first)."""
    def on_alarm(signum, frame):
        raise PhaseTimeout(f"{what}: over its {seconds:.0f} s allowance")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def is_timeout(exc: BaseException) -> bool:
    """PhaseTimeout, also when a library caught the alarm and re-raised it wrapped (torch._dynamo does)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, PhaseTimeout):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def describe_error(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (wall time on a loaded CI machine says little)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def tail(text: str, n: int = 2500) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def rows_status(rows: list[dict]) -> tuple[str, str]:
    """A phase's status from its contender rows: failed > timed_out > skipped > ok, with their reasons."""
    for status in ("failed", "timed_out", "skipped"):
        hit = [r for r in rows if r.get("status") == status]
        if hit:
            where = lambda r: f"{r['contender']}" + (f" {r['size']}px" if "size" in r else "")  # noqa: E731
            return status, "; ".join(f"{where(r)}: {r.get('reason', '')}" for r in hit)
    if not rows or any(r.get("status") != "ok" for r in rows):
        return "failed", "no contender row finished"
    return "ok", ""
