"""MAGE-Net enhancement of one 512×512 fundus photograph: ``cpu`` backend vs the eager fp32 reference.

    pytest benchmarks/test_bench_enhance.py --benchmark-json=OUT.json

``test_speedup_one_run`` times the two backends alternately in the same process (R rounds after a
warm-up that also builds the cpu backend's frozen graph), with torch's default threads and with one
thread, and stores in ``extra_info``: the median time of each, the speed-up (median torch / median cpu),
the per-round ratios and their median, the ratio of the best times, the load average before and after
and the thread count — the machine is shared, so the load is part of the result. It also prints one
line per thread setting to the terminal (even without ``-s``), e.g.
``enhance 512x512, 2 thread(s): torch 0.756 s, cpu 0.255 s (median of 9) -> 2.96x ...``.
Correctness is checked once first: err(cpu, torch) <= 2·err(eager bf16, torch) + 2/255
(tests/test_enhance.py's tolerance). The default shipped weights are used when installed (speed does not
depend on the weight values), with ``work_size=0``: the network runs at 512², whatever work size the weights
record (at the shipped 256 it would run on a quarter of the pixels).
"""
from __future__ import annotations

import copy
import os
import statistics
import time

import pytest
import torch

from retina_fast import backends
from retina_fast.enhance import enhance, load_enhancer, resolve_enhancer

ROUNDS = 9


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    try:
        return str(resolve_enhancer("default"))
    except FileNotFoundError:
        from retina_fast.checkpoint import save_checkpoint
        from retina_fast.models.magenet import MAGENet

        torch.manual_seed(0)
        net = MAGENet()
        path = tmp_path_factory.mktemp("bench") / "magenet"
        save_checkpoint(path, {"model": net}, {"kind": "magenet", "architecture": net.config.to_dict()})
        return str(path)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    from retina_fast.phantom import render

    return render(0, 512).rgb  # (3, 512, 512), a whole fundus with its black surround


def _check(model, image):
    from retina_fast.training.degrade import fov_mask

    ref = enhance(image, model=model, backend="torch", work_size=0)
    fast = enhance(image, model=model, backend="cpu", work_size=0)
    net = copy.deepcopy(load_enhancer(model).model).to(torch.bfloat16)
    with torch.no_grad():
        eager = net.restore(image[None].to(torch.bfloat16)).float()[0].clamp(0, 1) * fov_mask(image).float()
    err, err_eager = float((fast - ref).abs().max()), float((eager - ref).abs().max())
    assert err <= 2 * err_eager + 2 / 255, (err, err_eager)
    return err, err_eager


def _model_label(model: str) -> str:
    """The packaged weights' name (no machine paths in the JSON), or "random-init tiny" (the fallback)."""
    try:
        default = resolve_enhancer("default")
    except FileNotFoundError:
        return "random-init tiny"
    return f"packaged {default.name}" if model == str(default) else "random-init tiny"


requires_cpu = pytest.mark.skipif(not backends.get("cpu").usable("cpu"),
                                  reason="; ".join(backends.get("cpu").not_supported_reasons("cpu")) or "usable")


@requires_cpu
@pytest.mark.benchmark(group="enhance-512-cpu")
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_enhance_512(benchmark, model, image, backend):
    enhance(image, model=model, backend=backend, work_size=0)  # warm-up (builds the frozen graph for this shape)
    out = benchmark.pedantic(lambda: enhance(image, model=model, backend=backend, work_size=0), rounds=ROUNDS,
                             iterations=1)
    assert out.shape == image.shape
    benchmark.extra_info.update(loadavg=os.getloadavg(), threads=torch.get_num_threads())


@pytest.fixture(params=[None, 1], ids=["default-threads", "1-thread"])
def threads(request):
    before = torch.get_num_threads()
    if request.param:
        torch.set_num_threads(request.param)
    yield torch.get_num_threads()
    torch.set_num_threads(before)


@requires_cpu
@pytest.mark.benchmark(group="enhance-512-speedup")
def test_speedup_one_run(benchmark, model, image, threads, capsys):
    load_before = os.getloadavg()
    err, err_eager = _check(model, image)  # also warms both backends up
    times: dict[str, list[float]] = {"torch": [], "cpu": []}

    def pair():
        for name in ("torch", "cpu"):
            t0 = time.perf_counter()
            enhance(image, model=model, backend=name, work_size=0)
            times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(pair, rounds=ROUNDS, iterations=1)
    t_ref, t_cpu = statistics.median(times["torch"]), statistics.median(times["cpu"])
    ratios = [a / b for a, b in zip(times["torch"], times["cpu"])]
    benchmark.extra_info.update(
        torch_median_s=t_ref, cpu_median_s=t_cpu, speedup=t_ref / t_cpu, speedup_per_round=ratios,
        speedup_median_of_rounds=statistics.median(ratios), speedup_of_best=min(times["torch"]) / min(times["cpu"]),
        max_abs_err_cpu=err, max_abs_err_eager_bf16=err_eager, loadavg_before=load_before,
        loadavg_after=os.getloadavg(), threads=torch.get_num_threads(), cpu_fast_bf16=backends.cpu_has_fast_bf16(),
        model=_model_label(model))
    with capsys.disabled():
        print(f"\nenhance 512x512, {torch.get_num_threads()} thread(s): torch (eager fp32) {t_ref:.3f} s, "
              f"cpu {t_cpu:.3f} s (median of {len(ratios)}) -> {t_ref / t_cpu:.2f}x; median of per-round ratios "
              f"{statistics.median(ratios):.2f}x; load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    assert t_cpu < t_ref  # the bar is 3×; the measured value is reported, not asserted
