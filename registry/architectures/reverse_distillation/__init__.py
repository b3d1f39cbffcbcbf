"""Reverse Distillation architecture."""

from registry.architectures.reverse_distillation.model import ReverseDistillation

__all__ = ["ReverseDistillation"]
