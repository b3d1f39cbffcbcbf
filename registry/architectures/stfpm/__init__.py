"""STFPM architecture."""

from registry.architectures.stfpm.model import STFPM

__all__ = ["STFPM"]
