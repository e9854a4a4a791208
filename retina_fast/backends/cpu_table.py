"""The ``cpu`` backend's op table for recording the U-Net and the VQ-GAN decoder (``cpu_graph.record``).

One implementation per op the layers call (:mod:`retina_fast.ops.table`); each adds a node to the program
and returns its meta output. A new layer type needs its op here once -- or it raises ``UnsupportedOp`` when
recorded -- and nothing else: the network walks are the models' own forwards.

    conv2d / conv_transpose2d / upconv   ConvNode (weights packed by ``cpu_pack.PackedConv``)
    group_norm_silu                      GroupNormNode (FiLM scale / shift read from the program's time input)
    time_film                            a slice of the program's FiLM input (computed per timestep outside)
    channel_norm                         ChannelNormNode (its gain folded into the 1x1 conv that reads it)
    multihead_attention                  AttentionNode
"""
from __future__ import annotations

import torch
from torch import nn

from retina_fast.backends.cpu_graph import Node, Program, meta_cl
from retina_fast.backends.cpu_pack import PackedConv
from retina_fast.ops.table import UnsupportedOp

__all__ = ["CPU_OPS", "TimeInput", "FilmSlice", "Packing"]


class TimeInput:
    """The time embedding while recording a U-Net body: ``time_film`` turns it into FiLM slices whose values
    the runner computes per timestep (``FusedCPUUNet``) and feeds as the program input ``film``."""


class FilmSlice:
    """Columns [start, start + 2 c) of the (B, F) float32 FiLM input: scale then shift of one block."""

    def __init__(self, start: int, channels: int) -> None:
        self.start, self.channels = start, channels


class Packing:
    """Packed weights of the recorded model, per layer (and folded gain), shared by every recording of it."""

    def __init__(self, dtype: torch.dtype, library: str = "direct") -> None:
        self.dtype, self.library = dtype, library
        self._convs: dict[tuple, PackedConv] = {}
        self._norms: dict[int, tuple] = {}

    def conv(self, module: nn.Module, scale: torch.Tensor | None = None, input_padded: bool = False) -> PackedConv:
        key = (id(module), id(scale) if scale is not None else None, input_padded)
        if key not in self._convs:
            self._convs[key] = PackedConv(module, self.dtype, scale, input_padded, self.library)
        return self._convs[key]

    def norm(self, m: nn.Module) -> tuple:
        if id(m) not in self._norms:
            self._norms[id(m)] = (int(m.num_groups), m.weight.detach().float().contiguous(),
                                  m.bias.detach().float().contiguous(), bool(m.act), float(m.eps))
        return self._norms[id(m)]


def _packing(program: Program) -> Packing:
    return program.notes["packing"]


class ConvNode(Node):
    def __init__(self, program: Program, module: nn.Module, x: torch.Tensor) -> None:
        self.module, self.program = module, program
        self.scale: torch.Tensor | None = None
        self.input_padded = x is program.inputs.get("x") and program.notes.get("pad_input", False)
        pack = self.pack
        super().__init__([x], meta_cl(pack.output_shape(tuple(x.shape)), x.dtype))

    @property
    def pack(self) -> PackedConv:
        return _packing(self.program).conv(self.module, self.scale, self.input_padded)

    @property
    def cpp(self) -> bool:  # type: ignore[override]
        return self.pack.cpp

    @property
    def residual_ok(self) -> bool:  # type: ignore[override]
        return self.pack.kind in ("direct", "onednn")

    def emit(self, env, graph) -> None:
        from retina_fast.ops import conv

        p, x, out = self.pack, env(self.inputs[0]), env(self.out)
        res = env(self.residual) if self.residual is not None else None
        if p.kind == "direct":
            conv.conv2d_cl_raw(x, out, p.packed, p.out_channels, *p.kernel, p.stride[0], p.padding[0], p.bias, res,
                               p.replicate, graph)
        elif p.kind == "transposed":
            conv.conv_transpose2d_k4s2p1_cl_raw(x, out, p.packed, p.out_channels, p.bias, p.replicate, graph)
        else:  # rows: reads the program input's zero-padded buffer
            conv.conv2d_rows_cl_raw(env.padded(self.inputs[0]), out, p.packed, p.out_channels, *p.kernel, p.bias,
                                    graph)

    def compute(self, env) -> torch.Tensor:
        res = env(self.residual) if self.residual is not None else None
        return self.pack.onednn(env(self.inputs[0]), res)

    def label(self) -> str:
        return f"conv[{self.pack.kind}]"


class GroupNormNode(Node):
    residual_ok = True
    inplace = True

    def __init__(self, program: Program, module: nn.Module, x: torch.Tensor, film: FilmSlice | None) -> None:
        self.norm = _packing(program).norm(module)
        self.film = film
        self.program = program
        super().__init__([x], meta_cl(x.shape, x.dtype))

    def emit(self, env, graph) -> None:
        from retina_fast.ops.group_norm_silu import group_norm_silu_cl

        g, w, b, act, eps = self.norm
        res = env(self.residual) if self.residual is not None else None
        scale = shift = None
        stride = 0
        if self.film is not None:
            film = env(self.program.inputs["film"])
            s, c = self.film.start, self.film.channels
            scale, shift, stride = film[:, s:s + c], film[:, s + c:s + 2 * c], film.shape[1]
        group_norm_silu_cl(env(self.inputs[0]), env(self.out), res, g, w, b, scale, shift, stride, act, eps, graph)


class ChannelNormNode(Node):
    def __init__(self, module: nn.Module, x: torch.Tensor) -> None:
        self.eps = float(module.eps)
        self.gamma = module.gamma
        super().__init__([x], meta_cl(x.shape, x.dtype))

    def fold(self, program: Program) -> None:
        """The gain moves into the weights of the one 1x1 convolution that reads this norm (``to_qkv``)."""
        readers = program.readers().get(id(self.out), [])
        if self.gamma is None:
            return
        if len(readers) != 1 or not isinstance(readers[0], ConvNode) or readers[0].inputs[0] is not self.out \
                or readers[0].scale is not None or isinstance(readers[0].module, nn.ConvTranspose2d) \
                or readers[0].pack.kernel != (1, 1) or self.out is program.output:
            raise UnsupportedOp("the cpu backend folds a channel norm's gain into the single 1x1 convolution "
                                "that reads it; this norm feeds something else")
        readers[0].scale = self.gamma.reshape(-1)
        self.gamma = None

    def emit(self, env, graph) -> None:
        from retina_fast.ops.channel_norm import channel_norm_cl

        channel_norm_cl(env(self.inputs[0]), env(self.out), self.eps, graph)


class AttentionNode(Node):
    def __init__(self, module: nn.Module, qkv: torch.Tensor) -> None:
        self.heads, self.dim, self.linear = int(module.heads), int(module.head_dim), module.kind == "linear"
        if qkv.shape[1] != 3 * self.heads * self.dim:
            raise UnsupportedOp(f"attention input with {qkv.shape[1]} channels for {self.heads} x {self.dim} heads")
        b, _, h, w = qkv.shape
        super().__init__([qkv], meta_cl((b, self.heads * self.dim, h, w), qkv.dtype))

    def emit(self, env, graph) -> None:
        from retina_fast.ops.attention import multihead_attention_cl

        multihead_attention_cl(env(self.inputs[0]), env(self.out), self.heads, self.dim, self.linear, graph)


def _conv(program: Program, module: nn.Module, x: torch.Tensor, *extra) -> torch.Tensor:
    if extra and any(e is not None for e in extra):
        raise UnsupportedOp("conv_transpose2d with an explicit output_size")
    return program.add(ConvNode(program, module, x))


def _group_norm_silu(program: Program, module: nn.Module, x: torch.Tensor, scale_shift=None) -> torch.Tensor:
    if scale_shift is not None and not isinstance(scale_shift, FilmSlice):
        raise UnsupportedOp("group_norm_silu with a scale/shift that is not the recorded time FiLM")
    return program.add(GroupNormNode(program, module, x, scale_shift))


def _time_film(program: Program, block: nn.Module, temb) -> FilmSlice:
    if not isinstance(temb, TimeInput):
        raise UnsupportedOp("time_film of something other than the recorded time embedding")
    mlp = getattr(block, "mlp", None)
    if not (isinstance(mlp, nn.Sequential) and len(mlp) == 2 and isinstance(mlp[0], nn.SiLU)
            and isinstance(mlp[1], nn.Linear)):
        raise UnsupportedOp(f"time_film of {type(block).__name__}: the cpu backend computes SiLU -> Linear "
                            f"conditionings, this block's mlp is {mlp}")
    films = program.notes.setdefault("films", [])
    start = sum(m.out_features for m in films)
    films.append(mlp[1])
    return FilmSlice(start, mlp[1].out_features // 2)


def _channel_norm(program: Program, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return program.add(ChannelNormNode(module, x))


def _attention(program: Program, module: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    return program.add(AttentionNode(module, qkv))


CPU_OPS = {"conv2d": _conv, "conv_transpose2d": _conv, "upconv": _conv, "group_norm_silu": _group_norm_silu,
           "time_film": _time_film, "channel_norm": _channel_norm, "multihead_attention": _attention}
