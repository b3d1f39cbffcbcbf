"""Uninformed Students architecture."""

from registry.architectures.uninformed_students.model import UninformedStudents

__all__ = ["UninformedStudents"]
