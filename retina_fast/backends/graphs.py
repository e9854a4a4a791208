"""The three ways the backends run a fixed-shape network fast, each written once:

* :func:`fast_copy`: an inference copy of a module in another dtype / device / memory format.
* :class:`FrozenGraphs`: one traced, frozen TorchScript graph per input shape (``cpu`` decoder fallback, the
  ``cpu`` enhancer), optionally traced with an op table in force so the graph records its fused custom ops.
* :func:`capture_cuda_graph` / :class:`CudaGraphs`: one CUDA graph per input shape, captured after a warm-up
  on a side stream (the ``cuda`` runners, TensorRT engines): no host synchronisation inside a replay.
"""
from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from typing import Callable

import torch

from retina_fast.ops.table import OpTable, use_table

__all__ = ["fast_copy", "FrozenGraphs", "capture_cuda_graph", "CudaGraphs"]


def fast_copy(module: torch.nn.Module, dtype: torch.dtype, device: torch.device | str | None = None,
              channels_last: bool = False) -> torch.nn.Module:
    """An eval-mode, gradient-free deep copy of ``module`` in ``dtype`` (on ``device``; channels-last)."""
    fast = copy.deepcopy(module).eval().requires_grad_(False).to(device=device, dtype=dtype)
    return fast.to(memory_format=torch.channels_last) if channels_last else fast


def _key(args: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((tuple(a.shape), a.dtype) for a in args)


class FrozenGraphs:
    """Run ``module`` through a traced, frozen TorchScript graph, one per input shapes / dtypes.

    Freezing folds the weights in and fuses conv + add chains in oneDNN; tracing costs ~1 s per new shape.
    ``table``: an op table in force while tracing (the trace records what its ops call, e.g. fused custom ops).
    ``cache``: keep at most that many graphs (least recently used dropped; None: all). ``warmup``: runs right
    after freezing -- the profiling executor specialises a graph on its first runs.
    ``torch.jit.optimize_for_inference`` is deliberately not applied: on the 2-core AVX-512 CPU it made the
    channels-last fp32 graphs slower, not faster (same run, tiny model: decoder B=8 0.85x vs 1.63x over eager
    without it). Why TorchScript and not ``torch.compile`` / ``torch.export``: see ``COMPILED_VS_FROZEN``.
    """

    def __init__(self, module: torch.nn.Module, *, table: OpTable | None = None, cache: int | None = None,
                 warmup: int = 0) -> None:
        self.module = module
        self.table = table
        self.cache = cache
        self.warmup = warmup
        self._graphs: OrderedDict[tuple, torch.jit.ScriptModule] = OrderedDict()

    def graph(self, *args: torch.Tensor) -> torch.jit.ScriptModule:
        key = _key(args)
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        with warnings.catch_warnings():  # TorchScript is in maintenance (deprecation notices) but faster here
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            with use_table(self.table):
                traced = torch.jit.trace(self.module.eval(), args, check_trace=False)
            graph = torch.jit.freeze(traced.eval())
            for _ in range(self.warmup):
                graph(*args)
        self._graphs[key] = graph
        if self.cache is not None and len(self._graphs) > self.cache:
            self._graphs.popitem(last=False)
        return graph

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self.graph(*args)(*args)


# Measured side by side (benchmarks/bench_compile.py: one process, warm-up, 5 interleaved rounds, medians; every
# contender checked against eager fp32 first), 2-core AVX-512 CPU, torch 2.13, 2026-12-03. torch.compile =
# inductor with freezing; torch.export = AOTInductor (torch._inductor.aoti_compile_and_package), run on a quiet
# CPU in the third measurement (benchmarks/results/cpu-2core-compile-frozen-export.json; the first two:
# cpu-2core-amd-epyc-compile-vs-frozen.json). The frozen graphs are kept: they were the fastest or tied in every
# run (decoder: frozen 1.205x over eager, AOTInductor 1.203x, compile 0.91x; enhancer: 1.38x / 1.33x / 1.09x)
# and they build in 0.4-2 s per input shape against 7-23 s for AOTInductor and 8-28 s for torch.compile, a cost
# a user pays on the first call of every new shape. Caveat: on the enhancer dynamo hits its recompile limit (8,
# in MAGE-Net's forward), so part of the compiled run falls back to eager; an earlier measurement had compile
# ahead there (1.86x vs 1.72x).
COMPILED_VS_FROZEN: dict[str, str] = {
    "decoder_fp32 (shipped tiny, B = 8)": "frozen 1.21x / 1.04x / 1.21x over eager, torch.compile 0.92x / 0.81x / "
                                          "0.91x, AOTInductor 1.20x (third run only)",
    "enhancer_fp32 (512 px)": "frozen 1.43x / 1.36x / 1.38x over eager, torch.compile 1.13x / 1.04x / 1.09x, "
                              "AOTInductor 1.33x (third run only)",
}


def capture_cuda_graph(fn: Callable[[torch.cuda.Stream], torch.Tensor], device: torch.device, *, warmup: int = 2,
                       sync: bool = False) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run ``fn(stream)`` ``warmup`` times on a side stream (Triton compilation, allocator pools, TensorRT's
    lazy setup happen outside the graph; ``sync``: wait for them on the host), then capture one call into a
    CUDA graph. ``fn`` reads and writes static buffers only. Returns (graph, what the captured call returned)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn(stream)
    if sync:
        stream.synchronize()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn(stream)
    return graph, out


class CudaGraphs:
    """``fn(*static_inputs) -> output`` replayed from one CUDA graph per input shapes: inputs are copied into
    the graph's static buffers, the output is cloned out. ``table``: an op table in force while capturing (the
    graph then holds that table's kernels). ``cache``: keep at most that many graphs (None: all)."""

    def __init__(self, fn: Callable[..., torch.Tensor], device: torch.device, *, table: OpTable | None = None,
                 cache: int | None = None) -> None:
        self.fn, self.device, self.table, self.cache = fn, device, table, cache
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = _key(inputs)
        if key not in self._graphs:
            static = [x.clone() for x in inputs]
            with use_table(self.table):
                graph, out = capture_cuda_graph(lambda _stream: self.fn(*static), self.device)
            self._graphs[key] = (graph, static, out)
            if self.cache is not None and len(self._graphs) > self.cache:
                self._graphs.popitem(last=False)
        graph, static, out = self._graphs[key]
        for buf, x in zip(static, inputs):
            buf.copy_(x)
        graph.replay()
        return out.clone()
