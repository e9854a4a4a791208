"""The cpu backend's bf16 VQ-GAN decoder (retina_fast/backends/cpu_decoder.py) and the replicate-padding
forms of the direct bf16 convolution it uses, against PyTorch on odd shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retina_fast.ops import conv
from retina_fast.models.config import VQGANConfig
from retina_fast.models.vqgan import VQGAN

pytestmark = pytest.mark.skipif(not conv.direct_bf16_conv_usable(), reason="CPU lacks AVX512-BF16")


def cl(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("b,c,n,h,w,k,stride,pad", [(2, 16, 32, 9, 7, 3, 1, 1), (1, 32, 40, 5, 6, 5, 1, 2),
                                                    (3, 18, 16, 8, 8, 4, 2, 1), (1, 16, 8, 1, 3, 3, 1, 1)])
def test_replicate_padded_conv_matches_padded_conv2d(b, c, n, h, w, k, stride, pad):
    gen = torch.Generator().manual_seed(b * 100 + c)
    x = cl(torch.randn(b, c, h, w, generator=gen))
    weight = (torch.randn(n, c, k, k, generator=gen) / (c * k * k) ** 0.5).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen)
    got = conv.conv2d_cl(x, conv.pack_conv_weight(weight, torch.bfloat16), n, (k, k), stride, pad, bias,
                                  replicate=True)
    want = F.conv2d(F.pad(x.float(), (pad,) * 4, mode="replicate"), weight.float(), bias, stride=stride)
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), rtol=8e-3, atol=8e-3)


@pytest.mark.parametrize("b,c,n,h,w", [(2, 16, 32, 4, 4), (1, 34, 20, 5, 3), (1, 16, 16, 1, 1)])
def test_replicate_transposed_conv_matches_the_decoder_upsampling(b, c, n, h, w):
    gen = torch.Generator().manual_seed(c + n)
    x = cl(torch.randn(b, c, h, w, generator=gen))
    weight = (torch.randn(c, n, 4, 4, generator=gen) / (c * 4) ** 0.5).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen)
    got = conv.conv_transpose2d_k4s2p1_cl(x, conv.pack_conv_transpose_k4s2p1(weight, torch.bfloat16), n, bias,
                                                   replicate=True)
    want = F.conv_transpose2d(F.pad(x.float(), (1, 1, 1, 1), mode="replicate"), weight.float(), bias, stride=2,
                              padding=3)
    assert got.shape == want.shape == (b, n, 2 * h, 2 * w)
    torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), rtol=8e-3, atol=8e-3)


def _vqgan(seed: int, **kw) -> VQGAN:
    torch.manual_seed(seed)
    vq = VQGAN(VQGANConfig(**{"image_size": 32, "f": 4, "latent_channels": 4, "base_channels": 16,
                              "codebook_size": 64, **kw})).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for m in vq.modules():
            if hasattr(m, "num_groups"):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
        vq.codebook.embedding.normal_()
    return vq


@pytest.mark.parametrize("kw,side", [({}, (8, 8)), ({"f": 8, "dec_res_blocks": 2}, (5, 7)),
                                     ({"f": 2, "latent_channels": 8}, (3, 4)), ({"padding_mode": "zeros"}, (5, 6)),
                                     ({"upsample": "transposed"}, (7, 5)),
                                     ({"upsample": "transposed", "padding_mode": "zeros", "f": 8}, (3, 3))])
def test_fused_decoder_matches_decode_indices_within_bf16_error(kw, side):
    from retina_fast.backends.cpu_decoder import FusedCPUDecoder

    vq = _vqgan(3, **kw)
    fused = FusedCPUDecoder(vq)
    idx = torch.randint(0, vq.config.codebook_size, (3, *side), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = vq.decode_indices(idx)
        eager_bf16 = VQGAN(vq.config).eval()
        eager_bf16.load_state_dict(vq.state_dict())
        eager_bf16 = eager_bf16.to(torch.bfloat16).decode_indices(idx)
    got = fused(idx)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel(got, want) <= 2 * rel(eager_bf16, want) + 1e-3
    assert torch.equal(fused(idx[1:2]), got[1:2])  # image i never depends on the batch
    assert torch.equal(fused(idx), got)            # replaying the recorded graph again
    with pytest.raises(ValueError, match="code indices"):
        fused(torch.full((1, *side), vq.config.codebook_size))
    with pytest.raises(ValueError, match="int64"):
        fused(idx.int())


@pytest.mark.skipif(not conv.direct_conv_usable(torch.float32), reason="CPU lacks AVX-512")
@pytest.mark.parametrize("kw,side", [({}, (5, 7)), ({"upsample": "transposed", "padding_mode": "zeros"}, (3, 4)),
                                     ({"f": 8, "dec_res_blocks": 2}, (4, 4))])
def test_fused_decoder_fp32_matches_decode_indices_and_ignores_the_batch(kw, side):
    from retina_fast.backends.cpu_decoder import FusedCPUDecoder

    vq = _vqgan(5, **kw)
    fused = FusedCPUDecoder(vq, torch.float32)
    idx = torch.randint(0, vq.config.codebook_size, (5, *side), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = vq.decode_indices(idx)
    got = fused(idx)
    assert rel(got, want) < 1e-5
    for a, b in ((0, 1), (1, 4), (2, 5)):
        assert torch.equal(fused(idx[a:b]), got[a:b])


def test_fused_decoder_says_what_it_cannot_run():
    from retina_fast.backends.cpu_decoder import FusedCPUDecoder

    vq = _vqgan(0, padding_mode="reflect")
    assert "padding_mode 'reflect'" in FusedCPUDecoder.unsupported_reason(vq)
    with pytest.raises(RuntimeError, match="reflect"):
        FusedCPUDecoder(vq)
