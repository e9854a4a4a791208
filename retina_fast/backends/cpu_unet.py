"""The ``cpu`` backend's U-Net: the trained :class:`~retina_fast.models.unet.UNet2D` itself, its body recorded
with the backend's op table into a channels-last program of fused C++ ops (``cpu_graph``, ``cpu_table``).

Why (profile of the eager reference, tiny model, B = 8, 16x16 latents, 2-core AVX-512 CPU): convolutions
are half the time, and the rest is many small memory-bound ops that PyTorch runs slowly on channels-last
tensors -- ``GroupNorm`` on a bf16 channels-last (8, 32, 16, 16) tensor took 236 us, the attention pre-norm's
``var_mean`` 390 us, the linear attention's softmaxes and copies ~1 ms per call. In the recorded program each
of those is one pass over the tensor: GroupNorm * (1 + scale) + shift -> SiLU (+ the ResnetBlock's residual)
is one kernel, the channel LayerNorm one (its gamma folded into ``to_qkv``), each attention one, and the
residual of ``PreNormResidual`` is added inside ``to_out``'s convolution. Every convolution is the C++ direct
convolution on an AVX-512 CPU (fp32; bf16 with AVX512-BF16), else oneDNN (``cpu_pack``) -- or oneDNN for every
convolution (``library="onednn"``), chosen by measurement (:meth:`FusedCPUUNet.choose_library`): the direct
kernel is batch invariant and wins on small models, oneDNN's blocked kernels win at paper scale and, on CPUs
with AMX tiles, in bf16 at every size. One U-Net call, one thread, Intel Xeon with AMX-BF16 (2 cores), same
process: ``tiny`` B = 8 fp32 direct 43.7 ms / oneDNN 65.1 ms, bf16 62.5 / 27.2 ms; ``paper-224`` B = 1 fp32
3257 / 1051 ms, bf16 3135 / 208 ms.

Time conditioning: the program's FiLM input holds, per image, the (scale, shift) of every ResnetBlock; the
runner computes it per timestep value from the module's own ``time_embedding`` and the blocks' ``mlp``
(SiLU -> Linear, as one concatenated Linear), each image's row on its own and cached (a GEMM's row changes in
the last bits with the number of rows -- bf16, shipped model: 0.06 on a cube -- so computing it over the batch
would make image i depend on the batch; a sampler gives every image of a step the same t, so one row is
computed and broadcast, which is also cheaper: the time MLP costs ~0.3 ms per call at B = 8).

Storage is float32 or bfloat16 (``dtype``); every kernel computes in float32. With float32 the result
matches the reference to ~1e-7 (relative L2); bf16 rounds each activation to 8 bits of mantissa, the same
as running the reference module in bf16 (tests/test_cpu_unet.py compares the two errors).
"""
from __future__ import annotations

import os
import threading
import time

import torch
import torch.nn.functional as F

from retina_fast import _ext
from retina_fast.backends.cpu_graph import Program, SplitPrograms, meta_cl, record
from retina_fast.backends.cpu_pack import CONV_LIBRARIES, mkldnn_usable
from retina_fast.backends.cpu_table import CPU_OPS, ConvNode, Packing, TimeInput
from retina_fast.models.unet import UNet2D, pad_to_multiple

__all__ = ["FusedCPUUNet", "pick_library", "library_setting", "best_seconds", "measure_libraries", "direct_plan",
           "LIBRARY_ENV", "ONEDNN_MARGIN", "MEASURE_BATCH"]

LIBRARY_ENV = "RETINA_FAST_CPU_CONVS"  # direct | onednn | auto (default): pins the choice of choose_library
# oneDNN is taken only when it is this much faster: the direct kernels are batch invariant (image i the same in
# any batch), and a choice that flipped between runs on near-equal timings would change bf16 images slightly.
ONEDNN_MARGIN = 1.25
# the batch choose_library measures for when not told: the cpu runner asks for the batch a run uses
# (CPURunner.prepare), and one call at 8 costs a few seconds even for paper-224
MEASURE_BATCH = 8


def library_setting(setting: str | None = None) -> str:
    """``direct``, ``onednn`` or ``auto`` (measure): ``setting``, else the ``RETINA_FAST_CPU_CONVS``
    environment variable, else ``auto``; ``auto`` becomes ``direct`` when torch has no oneDNN."""
    setting = (setting if setting is not None else os.environ.get(LIBRARY_ENV, "auto")).strip().lower()
    if setting != "auto" and setting not in CONV_LIBRARIES:
        raise ValueError(f"{LIBRARY_ENV}={setting!r}: expected {', '.join(CONV_LIBRARIES)} or auto")
    return "direct" if setting == "auto" and not mkldnn_usable() else setting


def measure_libraries(plan: dict[str, tuple[int, int]], current: str | None, cache: dict, key, time_one) -> dict:
    """Seconds per call for each library of ``plan`` ({library: (images timed, scale)}): ``cache[key(library,
    images)]``, else ``time_one(library, images)`` (which switches to ``library`` and times one call of that many
    images; remembered in ``cache``), times ``scale``. The library in use (``current``) is timed first, so a
    measurement switches at most once."""
    seconds = {}
    for library in sorted(plan, key=lambda lib: lib != current):
        images, scale = plan[library]
        k = key(library, images)
        if k not in cache:
            cache[k] = time_one(library, images)
        seconds[library] = cache[k] * scale
    return seconds


def direct_plan(batch: int, cores: int) -> tuple[int, int]:
    """(images to time, scale) for the direct kernels at ``batch``: they run one image per core, so a batch costs
    ceil(batch / cores) times the time of min(batch, cores) images. Timing fewer images than cores when the
    batch is smaller matters: two images side by side share memory bandwidth and are slower than one alone
    (sweep-f8-c8-b128 decoder at B = 1 on a 2-core AMD EPYC: the old estimate from 2 images made oneDNN look
    faster, where the direct decoder took 270 ms against 321)."""
    return min(batch, cores), -(-batch // cores)


def best_seconds(call, rounds: int) -> float:
    """Best wall time of ``rounds`` calls of ``call()``, after one warm-up call (which records programs,
    packs weights or freezes graphs)."""
    call()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def pick_library(direct_s: float | None, onednn_s: float | None, margin: float = ONEDNN_MARGIN) -> str:
    """The convolution library for measured seconds per call (None: that library cannot run the model)."""
    if direct_s is None and onednn_s is None:
        raise ValueError("neither convolution library can run this model")
    if direct_s is None or onednn_s is None:
        return "onednn" if direct_s is None else "direct"
    return "onednn" if onednn_s * margin < direct_s else "direct"


class FusedCPUUNet:
    """``__call__(x (B, C, h, w) float32, t (B,) or scalar) -> eps float32``: ``unet`` run as recorded programs.

    Weights are packed when a program is first recorded; later changes to the module are not seen.
    ``batch_invariant``: every op is a per-image C++ kernel (image i never depends on the batch);
    ``graphs``: programs are replayed as C++ op graphs (True exactly then; tests may switch it off to run
    the same nodes one by one)."""

    def __init__(self, unet: UNet2D, dtype: torch.dtype = torch.bfloat16, library: str = "direct") -> None:
        if not _ext.available():
            raise RuntimeError(f"FusedCPUUNet needs the compiled core retina_fast._C ({_ext.load_error})")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        self.unet = unet.eval()
        self.config = unet.config
        self.dtype = dtype
        self.films: list[torch.nn.Linear] | None = None
        self.film_weight = self.film_bias = None
        self._film_cache: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.timings: dict = {}  # what choose_library measured last
        self._seconds: dict[tuple, float] = {}  # (library, shape, images) -> best seconds per call
        self._direct_invariant: bool | None = None  # every layer on a direct kernel (known once recorded so)
        self.use_library(library)

    def use_library(self, library: str) -> None:
        """Run every convolution the ``library`` can (``direct``: the C++ direct kernel where the CPU has it,
        else oneDNN; ``onednn``: oneDNN except replicate-padded layers); programs are recorded afresh."""
        self.packing = Packing(self.dtype, library)
        self.library = library
        m = self.config.multiple
        probe = self._record(1, (m, m))  # which kernel runs each layer is known before the first call
        self.batch_invariant = probe.all_cpp
        if library == "direct":
            self._direct_invariant = probe.all_cpp
        self.programs = SplitPrograms(self._record, self._inputs, graphs=self.batch_invariant)

    def choose_library(self, shape: tuple[int, int], setting: str | None = None, rounds: int = 2,
                       batch: int = MEASURE_BATCH) -> str:
        """Use the faster convolution library for calls of ``batch`` latents of ``shape`` (h, w), measured here
        (after a warm-up call, best of ``rounds``; see ``_measure``; each measurement is cached), oneDNN only
        when :data:`ONEDNN_MARGIN` times faster (:func:`pick_library`). ``setting`` (default: the
        ``RETINA_FAST_CPU_CONVS`` environment variable, else ``auto``) = ``direct`` or ``onednn`` skips the
        measurement. Returns the library in use."""
        setting = library_setting(setting)
        if setting == "auto":
            if self._direct_invariant is None:  # built on oneDNN: whether the direct kernels cover every layer
                self.use_library("direct")
            if not self._direct_invariant:  # no direct kernel on this CPU: oneDNN runs either way
                if self.library != "direct":
                    self.use_library("direct")
                return self.library
            setting = pick_library(*self._measure(shape, rounds, batch))
        if setting != self.library:
            self.use_library(setting)
        return self.library

    def _measure(self, shape: tuple[int, int], rounds: int, batch: int = MEASURE_BATCH) -> tuple[float, float]:
        """Seconds per call at a batch of ``batch``: oneDNN timed at that batch; the direct kernels at
        min(batch, cores) images, times the images each core then runs (:func:`direct_plan`; one graph per core,
        each image computed on its own). Timings are cached per (library, shape, images), so a new batch size costs one
        oneDNN measurement; the library in use is measured first (at most one switch)."""
        cores = self.programs.cores
        shape = tuple(shape)

        def time_one(library: str, images: int) -> float:
            x = torch.randn((images, self.config.in_channels, *shape), generator=torch.Generator().manual_seed(0))
            t = torch.full((images,), 500, dtype=torch.int64)
            if library != self.library:
                self.use_library(library)
            return best_seconds(lambda: self(x, t), rounds)

        seconds = measure_libraries({"direct": direct_plan(batch, cores), "onednn": (batch, 1)}, self.library,
                                    self._seconds, lambda library, images: (library, shape, images), time_one)
        self.timings = {"seconds_at_batch": seconds, "batch": batch, "shape": shape}
        return seconds["direct"], seconds["onednn"]

    @property
    def graphs(self) -> bool:
        return self.programs.graphs

    @graphs.setter
    def graphs(self, on: bool) -> None:
        self.programs.graphs = on

    @property
    def cores(self) -> int:
        return self.programs.cores

    @cores.setter
    def cores(self, n: int) -> None:
        self.programs.cores = n

    def _record(self, batch: int, shape: tuple[int, int], pad_input: bool = True) -> Program:
        program = Program()
        program.notes.update(packing=self.packing, pad_input=pad_input)
        x = program.inputs["x"] = meta_cl((batch, self.config.in_channels, *shape), self.dtype)
        program.inputs["film"] = torch.empty((batch, 0), device="meta")
        record(CPU_OPS, self.unet.body, program, x, TimeInput())
        readers = program.readers().get(id(x), [])
        if pad_input and any(isinstance(r, ConvNode) and r.pack.kind == "rows" for r in readers) and len(readers) > 1:
            return self._record(batch, shape, pad_input=False)  # the padded input must have one reader
        films = program.notes.get("films", [])
        if self.films is None:
            self.films = films
            self.film_weight = torch.cat([lin.weight.detach().float() for lin in films]).contiguous() \
                if films else torch.zeros(0, 1)
            self.film_bias = torch.cat([lin.bias.detach().float() for lin in films]).contiguous() \
                if films else torch.zeros(0)
        elif [id(f) for f in films] != [id(f) for f in self.films]:
            raise RuntimeError("internal: two recordings of one U-Net registered different time conditionings")
        return program

    def _inputs(self, program: Program, batch: int, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        h, w = shape
        c = self.config.in_channels
        x = program.inputs["x"]
        rows = [r for r in program.readers().get(id(x), []) if isinstance(r, ConvNode) and r.pack.kind == "rows"]
        p = rows[0].pack.padding[0] if rows else 0
        x_buf = torch.zeros((batch, h + 2 * p, w + 2 * p, c), dtype=self.dtype).permute(0, 3, 1, 2)
        inputs = {"x": x_buf[:, :, p:p + h, p:p + w],
                  "film": torch.empty((batch, self.film_weight.shape[0]), dtype=torch.float32)}
        if rows:
            inputs["x:padded"] = x_buf
        return inputs

    def _film(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """(B, sum 2 c_out): every image's row computed on its own per timestep value (see the module doc)."""
        t = torch.as_tensor(t)
        values = t.reshape(-1).tolist()
        if len(values) == 1:
            values = values * batch
        if len(values) != batch:
            raise ValueError(f"timesteps must be a scalar or shape ({batch},), got {tuple(t.shape)}")
        unique = list(dict.fromkeys(values))
        rows = [self._film_row(t.dtype, v) for v in unique]
        if len(rows) == 1:
            return rows[0].expand(batch, -1).contiguous()
        index = {v: i for i, v in enumerate(unique)}
        return torch.cat(rows)[[index[v] for v in values]].contiguous()

    def _film_row(self, dtype: torch.dtype, value) -> torch.Tensor:
        key = (dtype, value)
        row = self._film_cache.get(key)
        if row is None:
            temb = self.unet.time_embedding(torch.tensor([value], dtype=dtype), 1).float()
            row = F.linear(F.silu(temb), self.film_weight, self.film_bias)
            if len(self._film_cache) >= 4096:
                self._film_cache.clear()
            self._film_cache[key] = row
        return row

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet2D expects (B, {cfg.in_channels}, h, w), got {tuple(x.shape)}")
        x, (h, w) = pad_to_multiple(x.float(), cfg.multiple, cfg.pad_mode)
        film = self._film(t, x.shape[0])

        def fill(inputs: dict, start: int, stop: int) -> None:
            inputs["x"].copy_(x[start:stop])
            inputs["film"].copy_(film[start:stop])

        with self._lock:  # one replay at a time: the programs' buffers are shared
            out = self.programs.run(x.shape[0], tuple(x.shape[2:]), fill)
            return out[..., :h, :w].float().contiguous()
