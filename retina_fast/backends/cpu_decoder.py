"""The ``cpu`` backend's VQ-GAN decoder: code indices -> cube, the model's own ``Decoder.forward`` recorded with
the backend's op table (``cpu_graph``, ``cpu_table``) into a program of C++ ops.

On an AVX-512 CPU (bf16: AVX512-BF16) every convolution is the direct convolution (replicate padding read by
clamping the taps; each x2 ``UpConv`` -- nearest x2 + 3x3 conv, or the source's ``ConvTranspose2d(4, 2,
padding 3)`` of the padded input -- as four 2x2 phase convolutions, ``UpConv.phase_weight``), every GroupNorm
+ SiLU the fused kernel, each ResBlock's residual added inside its second convolution, and the program for a
batch shape is replayed as an op graph with a planned activation arena. The codebook lookup and the 1x1
``post_quant`` projection are folded into one (K, C) float32 table (a per-code linear map), so the program's
input is a row gather. Every op computes per image: image i does not depend on the batch. Speed (bf16,
session 4): as fast as the frozen oneDNN graph, 5.4-5.6 ms per image, convolutions at 530-770 GFLOP/s.
"""
from __future__ import annotations

import threading

import torch

from retina_fast.backends.cpu_graph import Program, SplitPrograms, meta_cl, record
from retina_fast.backends.cpu_table import CPU_OPS, Packing
from retina_fast.models.vqgan import VQGAN
from retina_fast.ops.conv import direct_conv_usable
from retina_fast.ops.table import UnsupportedOp

__all__ = ["FusedCPUDecoder"]


class FusedCPUDecoder:
    """``__call__(indices (B, h, w) int64) -> (B, bands, h f, w f) float32``, the decoder of ``vqgan`` with
    activations stored in ``dtype`` (bfloat16 or float32; fp32 accumulation). Weights are packed when a
    program is first recorded."""

    @staticmethod
    def unsupported_reason(vqgan: VQGAN, dtype: torch.dtype = torch.bfloat16) -> str | None:
        """Why this decoder cannot run ``vqgan`` in ``dtype`` here (None: it can)."""
        if dtype not in (torch.float32, torch.bfloat16):
            return f"stores float32 or bfloat16, not {dtype}"
        if not direct_conv_usable(dtype):
            isa = "AVX512-BF16" if dtype == torch.bfloat16 else "AVX-512"
            return f"needs the {isa} direct convolution (retina_fast._C on a CPU with {isa})"
        if vqgan.config.padding_mode not in ("replicate", "zeros"):
            return f"padding_mode {vqgan.config.padding_mode!r} (zeros or replicate only)"
        try:
            program = FusedCPUDecoder._record_with(vqgan, Packing(dtype), 1, (1, 1))
        except (UnsupportedOp, ValueError) as exc:
            return str(exc)
        if not program.all_cpp:
            return "a layer would run on oneDNN (bf16 needs even channel counts >= 16)"
        return None

    def __init__(self, vqgan: VQGAN, dtype: torch.dtype = torch.bfloat16) -> None:
        reason = self.unsupported_reason(vqgan, dtype)
        if reason:
            raise RuntimeError(f"FusedCPUDecoder: {reason}")
        self.vqgan = vqgan.eval()
        self.dtype = dtype
        emb = vqgan.codebook.embedding.detach().float()
        pq = vqgan.post_quant
        self.table = (emb @ pq.weight.detach().float().flatten(1).t() + pq.bias.detach().float()).contiguous()
        self.channels = self.table.shape[1]
        self.packing = Packing(dtype)
        self.programs = SplitPrograms(self._record, self._inputs)
        self._lock = threading.Lock()

    @property
    def cores(self) -> int:
        return self.programs.cores

    @staticmethod
    def _record_with(vqgan: VQGAN, packing: Packing, batch: int, shape: tuple[int, int]) -> Program:
        program = Program()
        program.notes["packing"] = packing
        c = vqgan.post_quant.out_channels
        x = program.inputs["x"] = meta_cl((batch, c, *shape), packing.dtype)
        return record(CPU_OPS, vqgan.decoder, program, x)

    def _record(self, batch: int, shape: tuple[int, int]) -> Program:
        return self._record_with(self.vqgan, self.packing, batch, shape)

    def _inputs(self, program: Program, batch: int, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        x_buf = torch.empty((batch, *shape, self.channels), dtype=self.dtype)
        return {"x": x_buf.permute(0, 3, 1, 2), "rows": x_buf}

    @torch.no_grad()
    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.dim() != 3 or indices.dtype != torch.int64:
            raise ValueError(f"indices must be (B, h, w) int64, got {indices.dtype} {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.table.shape[0]):
            raise ValueError(f"code indices must be in [0, {self.table.shape[0]})")

        def fill(inputs: dict, start: int, stop: int) -> None:
            inputs["rows"].copy_(self.table[indices[start:stop]])

        with self._lock:  # one replay at a time: the programs' buffers are shared
            return self.programs.run(indices.shape[0], tuple(indices.shape[1:]), fill).float().contiguous()
