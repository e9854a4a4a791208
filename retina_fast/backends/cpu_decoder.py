"""The ``cpu`` backend's bf16 VQ-GAN decoder: code indices -> cube with the C++ ops of the fused U-Net.

On an AVX512-BF16 CPU every convolution is the direct bf16 convolution of ``csrc/cpu/conv_bf16_cpu.cpp``
(replicate padding read by clamping the taps; each x2 upsampling -- nearest x2 + 3x3 conv, or the
source's ``ConvTranspose2d(4, 2, padding 3)`` of the replicate-padded input -- as four 2x2 phase
convolutions with clamped taps, ``UpConv.phase_weight``), every GroupNorm + SiLU the fused
C++ kernel, the ResBlock residual added inside its second convolution, and the whole decoder for a batch
shape is recorded once into an OpGraph with a planned activation arena (``record_graph``), then replayed.
The codebook lookup and the 1x1 ``post_quant`` projection are folded into one (K, C) float32 table (a
per-code linear map), so the graph's input is a row gather. Every op computes per image, so image i does
not depend on the batch (no padding of batches, unlike oneDNN's bf16 kernels).
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from retina_fast.backends.cpu_unet import (_conv_raw, _convt_raw, _empty, _gn_raw, direct_conv_usable,
                                           graph_threads, pack_conv_transpose_k4s2p1, pack_conv_weight, record_graph,
                                           replay, split_batch)
from retina_fast.models.layers import GroupNormSiLU
from retina_fast.models.vqgan import VQGAN, ResBlock, UpConv

__all__ = ["FusedCPUDecoder"]


def _norm(m: GroupNormSiLU) -> tuple:
    return (m.num_groups, m.weight.detach().float().contiguous(), m.bias.detach().float().contiguous(),
            bool(m.act), float(m.eps))


def _conv3(conv: nn.Conv2d, dtype: torch.dtype) -> tuple:
    if conv.padding_mode not in ("replicate", "zeros") or conv.stride != (1, 1) or conv.groups != 1 \
            or conv.padding[0] != conv.padding[1] or (dtype == torch.bfloat16 and conv.weight.shape[1] % 2):
        raise ValueError(f"unsupported decoder conv {conv}")
    w = conv.weight.detach().float()
    bias = conv.bias.detach().float().contiguous() if conv.bias is not None else None
    return (pack_conv_weight(w, dtype), w.shape[0], int(w.shape[2]), int(w.shape[3]), conv.padding[0], bias,
            conv.padding_mode == "replicate")


class FusedCPUDecoder:
    """``__call__(indices (B, h, w) int64) -> (B, bands, h f, w f) float32``, the decoder of ``vqgan`` with
    activations stored in ``dtype`` (bfloat16 or float32; fp32 accumulation). Weights are copied at
    construction."""

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
        return None

    def __init__(self, vqgan: VQGAN, dtype: torch.dtype = torch.bfloat16) -> None:
        reason = self.unsupported_reason(vqgan, dtype)
        if reason:
            raise RuntimeError(f"FusedCPUDecoder: {reason}")
        self.dtype = dtype
        dec = vqgan.decoder
        emb = vqgan.codebook.embedding.detach().float()
        pq = vqgan.post_quant
        self.table = (emb @ pq.weight.detach().float().flatten(1).t() + pq.bias.detach().float()).contiguous()
        self.channels = self.table.shape[1]
        self.norm_in = _norm(dec.norm_in)
        self.stages = []
        for stage in dec.stages:
            up, *blocks = list(stage)
            if not isinstance(up, UpConv) or up.mode not in ("replicate", "constant"):
                raise ValueError(f"unsupported decoder upsampling {up}")
            # both kinds are a 4x4 stride-2 transposed conv of the input padded by 1 (UpConv.phase_weight):
            # padding by 1 then padding 3 = padding 1 of the input (zeros), or with clamped taps (replicate)
            up_packed = (pack_conv_transpose_k4s2p1(up.phase_weight(), dtype), up.conv.out_channels,
                         up.conv.bias.detach().float().contiguous() if up.conv.bias is not None else None,
                         up.mode == "replicate")
            res = [(_norm(b.norm1), _conv3(b.conv1, dtype), _norm(b.norm2), _conv3(b.conv2, dtype)) for b in blocks
                   if isinstance(b, ResBlock)]
            if len(res) != len(blocks):
                raise ValueError("decoder stages must be an upsampling followed by ResBlocks")
            self.stages.append((up_packed, res))
        self.conv_out = _conv3(dec.conv_out, dtype)
        self.bands = self.conv_out[1]
        self.cores = graph_threads()
        self._graphs: dict[tuple, list] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _gn(x: torch.Tensor, norm: tuple, out: torch.Tensor | None = None) -> torch.Tensor:
        g, w, b, act, eps = norm
        return _gn_raw(x, _empty(tuple(x.shape), x.dtype) if out is None else out, None, g, w, b, None, None, 0,
                       act, eps)

    @staticmethod
    def _conv(x: torch.Tensor, conv: tuple, residual: torch.Tensor | None = None) -> torch.Tensor:
        packed, n, kh, kw, pad, bias, replicate = conv
        return _conv_raw(x, packed, n, kh, kw, 1, pad, bias, residual, replicate)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._gn(x, self.norm_in)
        for (packed, n, bias, replicate), blocks in self.stages:
            h = _convt_raw(h, packed, n, bias, replicate)
            for norm1, conv1, norm2, conv2 in blocks:
                t = self._conv(self._gn(h, norm1), conv1)
                h = self._conv(self._gn(t, norm2, out=t), conv2, residual=h)
        return self._conv(h, self.conv_out)

    def _capture(self, b: int, hl: int, wl: int) -> tuple:
        def build():
            x_buf = torch.empty((b, hl, wl, self.channels), dtype=self.dtype)
            out = self._forward(x_buf.permute(0, 3, 1, 2))
            return out, [x_buf], x_buf

        cap, out, x_buf = record_graph(build)
        return cap, x_buf, out

    @torch.no_grad()
    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.dim() != 3 or indices.dtype != torch.int64:
            raise ValueError(f"indices must be (B, h, w) int64, got {indices.dtype} {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.table.shape[0]):
            raise ValueError(f"code indices must be in [0, {self.table.shape[0]})")
        key = tuple(indices.shape)
        with self._lock:  # one replay at a time: the graphs' buffers are shared
            if key not in self._graphs:  # one graph per core (see cpu_unet.replay)
                self._graphs[key] = [self._capture(n, *key[1:]) for n in split_batch(key[0], self.cores)]
            parts = self._graphs[key]
            start = 0
            for _, x_buf, out in parts:
                x_buf.copy_(self.table[indices[start:start + out.shape[0]]])
                start += out.shape[0]
            replay([cap for cap, *_ in parts])
            return torch.cat([out for *_, out in parts]).float().contiguous()
