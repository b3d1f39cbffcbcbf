"""Anomaly-detection architectures behind one interface (`AnomalyModel`)."""

from __future__ import annotations

from registry.architectures.base import AnomalyModel, ModelConfig
from registry.architectures.reverse_distillation import ReverseDistillation
from registry.architectures.stfpm import STFPM
from registry.architectures.uninformed_students import UninformedStudents

ARCHITECTURES: dict[str, type[AnomalyModel]] = {
    cls.name: cls for cls in (STFPM, ReverseDistillation, UninformedStudents)
}


def build_model(name: str, config: ModelConfig | None = None) -> AnomalyModel:
    """Instantiate an architecture by name.

    Raises:
        ValueError: for an unknown name.
    """
    try:
        cls = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}") from None
    return cls(config or ModelConfig())


__all__ = ["ARCHITECTURES", "AnomalyModel", "ModelConfig", "build_model"]
