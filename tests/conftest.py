"""Test configuration shared by every test module.

On machines without a CUDA GPU, Triton kernels run in the interpreter: TRITON_INTERPRET=1 must be set
before Triton decorates any kernel, i.e. before the first test module imports retina_fast.kernels.
Tests marked ``gpu`` / ``tensorrt`` skip with the backend's own reason.
"""
from __future__ import annotations

import os

import pytest
import torch


from retina_fast.backends import cuda_device_reason  # noqa: E402  (imports no Triton)

GPU_SKIP_REASON = cuda_device_reason()
if GPU_SKIP_REASON is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    from retina_fast import backends

    trt_reasons = backends.get("tensorrt").not_supported_reasons("cuda")
    for item in items:
        if "gpu" in item.keywords and GPU_SKIP_REASON:
            item.add_marker(pytest.mark.skip(reason=GPU_SKIP_REASON))
        if "tensorrt" in item.keywords and trt_reasons:
            item.add_marker(pytest.mark.skip(reason="; ".join(trt_reasons)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small random-weight LDM checkpoint directory (``_small_model.save_small_checkpoint``), one per module."""
    from _small_model import save_small_checkpoint

    return save_small_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if GPU_SKIP_REASON is None else "cpu")
