"""The repository's vocabulary: what a request asks for (`ModelSpec`), a version loaded and
warm (`LoadedModel`) and a version that failed to load (`Failure`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from service.runtime.engine import OnnxModel
from service.runtime.metadata import ModelMetadata


@dataclass(frozen=True)
class ModelSpec:
    """What a request asks for: a model name and an alias or a version (0 = use alias)."""

    name: str
    alias: str = ""
    version: int = 0

    def __str__(self) -> str:
        return f"{self.name}/{self.version}" if self.version else f"{self.name}@{self.alias}"


@dataclass
class LoadedModel:
    """A model version loaded and warm, ready to serve."""

    name: str
    version: str
    model: OnnxModel
    source_uri: str
    digest: str = ""
    run_id: str = ""  # the MLflow run that logged it (its reference set lives there)
    aliases: set[str] = field(default_factory=set)
    thresholds: dict[str, str] = field(default_factory=dict)  # the `threshold.*` tags it decides with
    loaded_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def metadata(self) -> ModelMetadata:
        """The model's metadata."""
        return self.model.metadata


@dataclass
class Failure:
    """A version that failed to load for a reason its content decides."""

    message: str
    digest: str
    at: float = field(default_factory=time.monotonic)
    overrides: tuple[str, ...] = ()  # the version's hardware-override tags when it failed
