"""Fused / accelerated ops, each with its plain PyTorch reference beside it (``<op>_ref``)."""
from retina_fast.ops.nearest_code import nearest_code, nearest_code_ref
from retina_fast.ops.sampler_step import sampler_step, sampler_step_ref

__all__ = ["nearest_code", "nearest_code_ref", "sampler_step", "sampler_step_ref"]
