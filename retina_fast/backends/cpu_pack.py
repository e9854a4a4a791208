"""Weight preparation for the ``cpu`` backend's recorded programs: one convolution layer of the model ->
the kernel that runs it, with its weights packed once.

Which kernel (``PackedConv.kind``):

* ``direct``: the C++ direct convolution (:mod:`retina_fast.ops.conv`) -- fp32 on AVX-512, bf16 on
  AVX512-BF16 with an even input channel count >= 16 (fewer channels give too short a reduction per tap);
  zero or replicate padding, square stride and padding; a residual can be added in its epilogue.
* ``rows``: its row form for stride-1 convs on fewer than 16 channels (the 7x7 init conv on 8 latent
  channels: 7 x 8 = 56-long reductions per tap instead of 8; bf16 per-pixel form 135-250 us vs oneDNN
  96-150 us), only on the program's input, which the caller pads itself (the row form reads a padded
  input; padding inside a recorded graph is not possible).
* ``transposed``: a 4x4 stride-2 transposed conv (the U-Net's Upsample; the VQ-GAN decoder's ``UpConv`` of
  either kind through ``UpConv.phase_weight``) as four 2x2 phase convs of the direct kernel.
* ``onednn``: everything else (a CPU without AVX-512, odd bf16 channel counts): oneDNN with the weights
  reordered once per input shape -- a 1x1 conv (8, 32, 16, 16) -> 384 took 562 us with weights packed
  without the input size and 87 us with it (bf16, 2-core AVX-512 CPU). Not recordable into an op graph, and
  oneDNN picks kernels per batch size, so a program using it is not batch invariant.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retina_fast.models.vqgan import UpConv
from retina_fast.ops.conv import direct_conv_usable, pack_conv_rows, pack_conv_transpose_k4s2p1, pack_conv_weight

__all__ = ["PackedConv", "mkldnn_usable", "CONV_LIBRARIES"]

CONV_LIBRARIES = ("direct", "onednn")


def mkldnn_usable() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class PackedConv:
    """A ``Conv2d`` / ``ConvTranspose2d`` / ``UpConv`` of the model in ``dtype``. ``weight_scale`` (C_in,)
    multiplies the weight's input channels (a folded per-channel norm gain); ``input_padded``: the conv reads
    the program's input, which the caller can hand over already zero-padded (row form allowed)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, weight_scale: torch.Tensor | None = None,
                 input_padded: bool = False, library: str = "direct") -> None:
        if library not in CONV_LIBRARIES:
            raise ValueError(f"convolution library must be one of {CONV_LIBRARIES}, got {library!r}")
        self.dtype = dtype
        self.replicate = False
        if isinstance(module, UpConv):
            if module.mode not in ("replicate", "constant"):
                raise ValueError(f"UpConv with {module.mode} padding has no phase form")
            conv, w = module.conv, module.phase_weight().float()     # (C_in, C_out, 4, 4), stride 2, padding 1
            self.transposed, self.stride, self.padding = True, [2, 2], [1, 1]
            self.replicate = module.mode == "replicate"
            self.output_padding, self.dilation, self.groups = [0, 0], [1, 1], 1
        else:
            conv, w = module, module.weight.detach().float()
            self.transposed = isinstance(conv, nn.ConvTranspose2d)
            self.stride, self.padding = list(conv.stride), list(conv.padding)
            self.dilation, self.groups = list(conv.dilation), conv.groups
            self.output_padding = list(conv.output_padding) if self.transposed else None
            mode = getattr(conv, "padding_mode", "zeros")
            if mode not in ("zeros", "replicate"):
                raise ValueError(f"PackedConv handles zero or replicate padding, got padding_mode={mode!r}")
            self.replicate = mode == "replicate" and any(self.padding)
        if weight_scale is not None:
            w = w * weight_scale.detach().float().reshape((-1, 1, 1, 1) if self.transposed else (1, -1, 1, 1))
        self.weight = w
        self.bias = conv.bias.detach().float().contiguous() if conv.bias is not None else None
        self.out_channels = w.shape[1] if self.transposed else w.shape[0]
        self.kernel = (int(w.shape[2]), int(w.shape[3]))
        c_in = w.shape[0] if self.transposed else w.shape[1]
        bf16 = dtype == torch.bfloat16
        square = len(set(self.stride)) == 1 and len(set(self.padding)) == 1 and self.dilation == [1, 1]
        usable = self.groups == 1 and square and direct_conv_usable(dtype)
        channels_ok = not bf16 or (c_in % 2 == 0 and c_in >= 16)
        self.kind, self.packed = "onednn", None
        if library == "onednn" and mkldnn_usable() and not self.replicate:
            pass  # oneDNN chosen (replicate padding has no oneDNN form: those layers stay direct)
        elif self.transposed:
            if usable and channels_ok and self.kernel == (4, 4) and self.stride == [2, 2] and \
                    self.padding == [1, 1] and self.output_padding == [0, 0]:
                self.kind, self.packed = "transposed", pack_conv_transpose_k4s2p1(w, dtype)
        elif (input_padded and usable and not self.replicate and c_in < 16 and self.stride == [1, 1]
              and self.kernel[1] > 1 and (not bf16 or (self.kernel[1] * c_in) % 2 == 0)
              and self.kernel[1] * c_in >= 16):
            self.kind, self.packed = "rows", pack_conv_rows(w, dtype)
        elif usable and channels_ok:
            self.kind, self.packed = "direct", pack_conv_weight(w, dtype)
        if self.kind == "onednn" and self.replicate:
            raise ValueError("replicate padding runs only as a direct convolution (AVX-512; bf16: even channel "
                             "counts >= 16)")
        self.cpp = self.kind != "onednn"
        self._onednn_weight = w.to(dtype) if self.transposed else w.to(dtype).contiguous(
            memory_format=torch.channels_last)
        self._onednn_bias = conv.bias.detach().to(dtype) if conv.bias is not None else None
        self._by_shape: dict[tuple[int, ...], torch.Tensor] = {}

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        b, _, h, w = shape
        kh, kw = self.kernel
        if self.transposed:
            op = self.output_padding
            return (b, self.out_channels, (h - 1) * self.stride[0] - 2 * self.padding[0] + kh + op[0],
                    (w - 1) * self.stride[1] - 2 * self.padding[1] + kw + op[1])
        return (b, self.out_channels, (h + 2 * self.padding[0] - kh) // self.stride[0] + 1,
                (w + 2 * self.padding[1] - kw) // self.stride[1] + 1)

    # -- oneDNN (not recordable) ---------------------------------------------------------------------------

    def _reordered(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        w = self._by_shape.get(key)
        if w is None:
            args = (self.padding, self.output_padding, self.stride, self.dilation, self.groups, list(key)) \
                if self.transposed else (self.padding, self.stride, self.dilation, self.groups, list(key))
            reorder = torch.ops.mkldnn._reorder_convolution_transpose_weight if self.transposed else \
                torch.ops.mkldnn._reorder_convolution_weight
            w = self._by_shape[key] = reorder(self._onednn_weight, *args)
        return w

    def onednn(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """conv(x) (+ add) through oneDNN (or ``F.conv*`` without it) on a channels-last x in ``dtype``."""
        w, b = self._onednn_weight, self._onednn_bias
        if not mkldnn_usable():
            conv = F.conv_transpose2d if self.transposed else F.conv2d
            kw = dict(output_padding=self.output_padding) if self.transposed else {}
            y = conv(x, w, b, stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                     **kw)
            return y if add is None else y + add
        if self.transposed:
            y = torch.ops.mkldnn._convolution_transpose_pointwise(
                x, self._reordered(x), b, self.padding, self.output_padding, self.stride, self.dilation,
                self.groups, "none", [], "")
            return y if add is None else y + add
        if add is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self._reordered(x), b, self.padding, self.stride, self.dilation, self.groups, "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, add.contiguous(memory_format=torch.channels_last), self._reordered(x), b, self.padding, self.stride,
            self.dilation, self.groups, "add", None, None, [], None)
