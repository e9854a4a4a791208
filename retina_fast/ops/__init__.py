"""Fused / accelerated ops, each with its plain PyTorch reference beside it (``<op>_ref``)."""
from retina_fast.ops.nearest_code import nearest_code, nearest_code_ref

__all__ = ["nearest_code", "nearest_code_ref"]
