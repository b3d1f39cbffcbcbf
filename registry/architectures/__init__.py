"""Anomaly-detection architectures behind one interface (`AnomalyModel`)."""

from __future__ import annotations

from registry.architectures.base import AnomalyModel, ModelConfig
from registry.architectures.reverse_distillation import ReverseDistillation
from registry.architectures.stfpm import STFPM
from registry.architectures.uninformed_students import UninformedStudents

ARCHITECTURES: dict[str, type[AnomalyModel]] = {
    cls.name: cls for cls in (STFPM, ReverseDistillation, UninformedStudents)
}

# CPU-budget schedules used by the demo and `anomaly compare` (sample data, 2 cores):
# epochs per architecture and extra options. Pass explicit values for full training.
DEFAULT_EPOCHS: dict[str, int] = {"stfpm": 40, "rd": 30, "us": 20}
DEFAULT_EXTRA: dict[str, dict[str, object]] = {}
# QAT fine-tuning epochs per architecture in the same budget.
DEFAULT_QAT_EPOCHS: dict[str, int] = {"stfpm": 3, "rd": 3, "us": 2}


def extra_for(name: str, options: dict[str, object] | None = None) -> dict[str, object]:
    """Architecture `name`'s `ModelConfig.extra`: its CPU-budget defaults (`DEFAULT_EXTRA`),
    then `options` over them (a new dict)."""
    return {**DEFAULT_EXTRA.get(name, {}), **(options or {})}


def split_options(names: list[str], options: dict[str, object]) -> dict[str, dict[str, object]]:
    """`options` (architecture options given once for several architectures) as each
    architecture's own: `{name: {key: value}}` with the keys it reads.

    Raises:
        ValueError: an unknown architecture, or a key no named architecture reads (a typo
            must not silently train the default).
    """
    for n in names:
        if n not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {n!r}; choose from {sorted(ARCHITECTURES)}")
    unknown = sorted(set(options) - {k for n in names for k in ARCHITECTURES[n].options})
    if unknown:
        known = "; ".join(f"{n}: {', '.join(ARCHITECTURES[n].options)}" for n in names)
        raise ValueError(f"no chosen architecture reads option(s) {', '.join(unknown)} (known: {known})")
    return {n: {k: v for k, v in options.items() if k in ARCHITECTURES[n].options} for n in names}


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


__all__ = ["ARCHITECTURES", "DEFAULT_EPOCHS", "DEFAULT_EXTRA", "DEFAULT_QAT_EPOCHS", "AnomalyModel",
           "ModelConfig", "build_model", "extra_for", "split_options"]
