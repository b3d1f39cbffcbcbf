"""The model repository: what the data plane asks for models, behind one small facade.

It answers `name@alias` or `name/version` with a `LoadedModel`, composed of:

- `RegistryAccess` (`registry_access`): the MLflow registry, its schema check, alias and
  negative caches, and downloads into the content-addressed cache (`artifact`);
- `VersionCache` (`version_cache`): the versions loaded in this process (isolated check,
  ONNX Runtime build, validation, the reproduction check), least recently used dropped, pins;
- `AliasFollower` (`alias_follower`): what each watched alias serves, moved only through the
  promotion gate (`service.promotion`: the gate, its verdicts, what each alias last served).

Failures are remembered so that nothing is retried in a loop: an unknown model, alias or
version for `negative_cache_s`; a version that failed to load, with its content digest, for
`failed_retry_s`; a registry or download outage (`NotReady`) not at all (the watcher retries it
with backoff). All of this runs off the inference threads: alias following on the watcher's
own thread (`DataPlane.following`), loads that requests ask for on the loader threads
(`DataPlane.loader`), model control on a thread of its own. Nothing here is unpickled: the
artifact is read as ONNX + YAML (MLmodel) + JSON.
"""

from __future__ import annotations

import logging
from pathlib import Path

from service import metrics
from service.errors import ModelLoadError
from service.promotion.gate import Gatekeeper
from service.promotion.judgements import Judgements
from service.promotion.served import ServedMemory
from service.repository.alias_follower import AliasFollower
from service.repository.artifact import ArtifactCache
from service.repository.registry_access import RegistryAccess
from service.repository.version_cache import VersionCache
from service.repository.versions import Failure, LoadedModel, ModelSpec
from service.settings import Settings

log = logging.getLogger(__name__)
AD_HOC = "(ad hoc)"  # metric label of loads not made for a watched alias

__all__ = ["LoadedModel", "ModelRepository", "ModelSpec"]


class ModelRepository:
    """Thread-safe cache of loaded versions with alias resolution against MLflow."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = ArtifactCache(Path(settings.cache_dir))
        self.registry = RegistryAccess(settings, self.cache)
        self.client = self.registry.client
        self.versions = VersionCache(settings, self.registry, serving=lambda: self.follower.serving())
        judgements = Judgements(settings, Gatekeeper(self.client, settings, self.cache.staging))
        memory = ServedMemory(Path(settings.cache_dir), settings.tracking_uri)
        self.follower = AliasFollower(settings, self.registry, self.versions, judgements, memory)
        self.errors = self.follower.errors  # watched alias → (version, why its last move failed)
        self.verdicts = judgements.gatekeeper.history  # the gate's recent verdicts with their parts

    # -- versions -------------------------------------------------------------------------
    def resolve(self, spec: ModelSpec) -> str:
        """The version number `spec` names (a loaded version, or an ad-hoc alias lookup cached
        `alias_refresh_s`, needs no registry call)."""
        if spec.version and self.versions.cached((spec.name, str(spec.version))) is not None:
            return str(spec.version)
        return self.registry.resolve(spec)

    def load(self, name: str, version: str) -> LoadedModel:
        """The loaded version, loading it on first use (`VersionCache.load`)."""
        return self.versions.load(name, version)

    def failure(self, name: str, version: str) -> Failure | None:
        """The remembered load failure of a version, while it is still trusted."""
        return self.versions.failure(name, version)

    def pin(self, loaded: LoadedModel) -> None:
        """Keep a loaded version in memory until `unload` (model control's load)."""
        self.versions.pin(loaded)

    def pinned(self) -> set[tuple[str, str]]:
        """The (name, version) pairs pinned by model control."""
        return self.versions.pinned()

    def unload(self, name: str, version: str) -> bool:
        """Unpin and drop a loaded version (`VersionCache.unload`)."""
        return self.versions.unload(name, version)

    def loaded(self) -> list[LoadedModel]:
        """The versions currently loaded, least recently used first."""
        return self.versions.loaded()

    # -- watched aliases --------------------------------------------------------------------
    def watched(self, name: str, alias: str) -> bool:
        """Whether the server follows `name@alias`."""
        return (name, alias) in self.settings.watched()

    def current(self, name: str, alias: str) -> LoadedModel | None:
        """What a watched alias serves now (no registry call), or None if not watched/loaded."""
        return self.follower.current(name, alias)

    def refresh(self, name: str, alias: str) -> LoadedModel | None:
        """Re-resolve a watched alias and follow it through the promotion gate
        (`AliasFollower.refresh`)."""
        return self.follower.refresh(name, alias)

    def record_failure(self, key: tuple[str, str], version: str, message: str, context: str) -> None:
        """Remember (for GetModel), count and log at ERROR a failed move of a watched alias."""
        self.follower.record_failure(key, version, message, context)

    def not_serving_reason(self, name: str, alias: str) -> str:
        """Why a watched alias serves nothing (for the UNAVAILABLE answer)."""
        return self.follower.not_serving_reason(name, alias)

    # -- requests ---------------------------------------------------------------------------
    def cached_model(self, spec: ModelSpec) -> LoadedModel | None:
        """What `spec` names if it can be answered from memory (no registry call), else None."""
        if spec.version:
            return self.versions.cached((spec.name, str(spec.version)))
        current = self.follower.current(spec.name, spec.alias)
        if current is not None:
            return current
        version = self.registry.cached_alias(spec)
        return self.versions.cached((spec.name, version)) if version is not None else None

    def get(self, spec: ModelSpec) -> LoadedModel:
        """Resolve and load what `spec` names (watched aliases answer from memory)."""
        if not spec.version:
            current = self.follower.current(spec.name, spec.alias)
            if current is not None:
                return current
        version = self.resolve(spec)
        remembered = self.failure(spec.name, version)
        if remembered is not None:  # logged and counted when it failed: answer from memory
            raise ModelLoadError(remembered.message)
        try:
            loaded = self.load(spec.name, version)
        except ModelLoadError as exc:
            metrics.LOAD_FAILURES.labels(spec.name, spec.alias or AD_HOC).inc()
            log.error("request for %s: %s", spec, exc.message)
            raise
        if spec.alias and not spec.version:
            loaded.aliases.add(spec.alias)
        return loaded
