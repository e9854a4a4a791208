"""Benchmarks (pytest-benchmark): `pytest benchmarks --benchmark-json=benchmarks/results/<name>.json`.

Kept apart from tests/ so the unit-test run stays fast. Each benchmark checks correctness once before
timing. On CPU machines Triton kernels are not timed (the interpreter is not a speed reference).
"""
from __future__ import annotations

import platform
import subprocess

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--compile-backend", default="inductor",
                     help="torch.compile backend of the `compile` contenders (default inductor, what users get; "
                          "`eager` only traces, for a quick functional pass)")


@pytest.fixture(scope="session")
def compile_backend(request):
    return request.config.getoption("--compile-backend")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    if torch.backends.cuda.is_built() and torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name(0)
    machine_info["python"] = platform.python_version()
    try:
        machine_info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                check=False).stdout.strip()
    except OSError:
        pass
