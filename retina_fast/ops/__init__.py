"""Ops, one module each: the plain PyTorch reference ``<op>_ref`` beside the dispatching ``<op>`` (``impl=``
torch | cpp | triton), and the raw C++ entry that records into op graphs (``<op>_cl``).

The networks call their compute through named ops (:mod:`retina_fast.ops.table`), which is how every
backend runs the same model definitions.

    nearest_code, sampler_step, group_norm_silu, multihead_attention (linear / softmax), channel_norm,
    conv (direct convolutions), concat_channels, add, channel_attention, bilinear_resize
"""
from retina_fast.ops.nearest_code import nearest_code, nearest_code_ref
from retina_fast.ops.sampler_step import sampler_step, sampler_step_ref

__all__ = ["nearest_code", "nearest_code_ref", "sampler_step", "sampler_step_ref"]
