"""One model definition, every backend: the fused paths are recorded from the models' own forwards through op
tables (retina_fast.ops.table), so a layer type the backends never saw either works (it is made of known ops)
or fails clearly when the backend records it -- it never runs half-recorded."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from retina_fast import _ext
from retina_fast.models.config import UNetConfig, VQGANConfig
from retina_fast.models.layers import Conv2d, GroupNormSiLU
from retina_fast.models.unet import UNet2D
from retina_fast.models.vqgan import VQGAN
from retina_fast.ops.table import OpTable, UnsupportedOp, current_table, op, use_table

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"extension not loaded: {_ext.load_error}")


def _unet() -> UNet2D:
    torch.manual_seed(0)
    return UNet2D(UNetConfig(in_channels=4, base_channels=16, channel_mults=(1, 2), attn_heads=2, attn_head_dim=16,
                             groups=4, num_res_blocks=1)).eval()


class Refine(nn.Module):
    """A layer type the fused paths never saw, made of ops they have: x + conv(GN-SiLU(x))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = GroupNormSiLU(channels, 4)
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.norm(x))


class Tanh(nn.Module):
    """A layer type whose computation is a torch function the cpu op graph does not have."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


class Scale(nn.Module):
    """A layer type with its own named op, which the cpu table does not implement."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.full((channels,), 1.5))

    @op("scale_channels")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain[:, None, None]


def _with(net: UNet2D, layer: nn.Module) -> UNet2D:
    """The same U-Net with ``layer`` after its first ResnetBlock (the walk is UNet2D.body, unchanged)."""
    block = net.downs[0].blocks[0]

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block, self.layer = block, layer

        def forward(self, x, temb):
            return self.layer(self.block(x, temb))

    net.downs[0].blocks[0] = Wrapped()
    return net


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_new_layer_made_of_known_ops_runs_fused_and_matches(dtype):
    from retina_fast.backends.cpu_unet import FusedCPUUNet

    net = _with(_unet(), Refine(16))
    fused = FusedCPUUNet(net, dtype)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 900])
    with torch.no_grad():
        want = net(x, t)
        plain = net.to(dtype)(x.to(dtype), t).float()
        net.float()
    got = fused(x, t)
    err = ((got - want).norm() / want.norm()).item()
    assert err < 2e-6 if dtype == torch.float32 else err <= 1.5 * ((plain - want).norm() / want.norm()).item() + 1e-3


@needs_ext
@pytest.mark.parametrize("layer,match", [(Tanh(), "tanh"), (Scale(16), "scale_channels")])
def test_a_new_layer_the_cpu_table_lacks_fails_clearly(layer, match):
    from retina_fast.backends.cpu_unet import FusedCPUUNet

    with pytest.raises(UnsupportedOp, match=match):
        FusedCPUUNet(_with(_unet(), layer), torch.float32)


@needs_ext
def test_the_cpu_runner_names_what_it_could_not_record(recwarn):
    """The sampling runner reports the unseen layer and runs the U-Net as a frozen graph of the same module."""
    from _small_model import small_loaded
    from retina_fast.backends.runners import CPURunner

    loaded = small_loaded()
    _with(loaded.unet, Tanh())
    runner = CPURunner(loaded, torch.device("cpu"), torch.float32)
    assert "tanh" in runner.unet_path and not runner.batch_invariant
    assert any("tanh" in str(w.message) for w in recwarn)
    x, t = torch.randn(2, *loaded.config.latent_shape), torch.tensor([7, 7])
    with torch.no_grad():
        torch.testing.assert_close(runner.denoise(x, t), loaded.unet(x, t), rtol=1e-4, atol=1e-5)


@needs_ext
def test_a_decoder_with_an_unseen_layer_decodes_through_the_frozen_graph():
    from retina_fast.backends.cpu_decoder import FusedCPUDecoder

    torch.manual_seed(1)
    vq = VQGAN(VQGANConfig(image_size=16, f=4, latent_channels=4, base_channels=16, codebook_size=32)).eval()
    vq.decoder.stages[0].append(Tanh())
    reason = FusedCPUDecoder.unsupported_reason(vq, torch.float32)
    assert reason is not None and "tanh" in reason


def test_tables_replace_named_ops_and_strict_tables_refuse_the_rest():
    gn = GroupNormSiLU(8, 2)
    x = torch.randn(2, 8, 3, 3)
    seen = []
    table = OpTable("t", {"group_norm_silu": lambda m, x, ss=None: seen.append(m) or x})
    with use_table(table):
        assert current_table() is table
        assert gn(x) is x and seen == [gn]
        assert torch.equal(Scale(8)(x), x * 1.5)                    # not in a lenient table: the reference
    with use_table(OpTable("strict", {}, strict=True)), pytest.raises(UnsupportedOp, match="group_norm_silu"):
        gn(x)
    assert current_table() is None
    assert not torch.equal(gn(x), x)                                   # outside: the reference again


def test_ops_dispatch_traces_under_torch_compile():
    """No table active: dispatch is one global read, so torch.compile traces the reference in one graph."""
    gn = GroupNormSiLU(8, 2)
    x = torch.randn(2, 8, 3, 3)
    compiled = torch.compile(gn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), gn(x))
