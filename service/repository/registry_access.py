"""Reading the MLflow registry for the server: versions and aliases, with negative and alias
caches, a schema check before the store is opened, and downloads into the local cache.

Registry failures are classified once here: an unknown model, alias or version is
`ModelNotFound` (remembered for `negative_cache_s`); anything else (an outage, a refused
schema) is `NotReady`, which the watcher retries with backoff.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from service.errors import ModelNotFound, NotReady
from service.repository.artifact import ArtifactCache
from service.repository.versions import ModelSpec
from service.settings import Settings

log = logging.getLogger("service.repository.model_repository")  # where these lines have always been logged
SCHEMA_RECHECK_S = 5.0  # a registry refused for its schema is looked at again after this


class LazyClient:
    """An `MlflowClient` made on first use, once `check` passes: making one opens a SQL store,
    and opening it runs MLflow's migrations (`service.repository.registry_schema`)."""

    def __init__(self, make: Any, check: Any) -> None:
        self._make, self._check, self._client = make, check, None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._check()  # raises NotReady while the store's schema is not this MLflow's
                    self._client = self._make()
        return getattr(self._client, name)


class RegistryAccess:
    """The registry as the repository reads it (`client` for the rest: tags, reference sets)."""

    def __init__(self, settings: Settings, cache: ArtifactCache) -> None:
        from mlflow import MlflowClient

        # MLflow's REST client retries a refused connection 7 times with exponential backoff
        # (minutes) by default; the watcher has its own backoff, so fail fast and let it retry.
        # Either can still be set in the environment.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.settings = settings
        self.cache = cache
        self.client = LazyClient(lambda: MlflowClient(tracking_uri=settings.tracking_uri,
                                                      registry_uri=settings.tracking_uri), self.check_schema)
        self._aliases: dict[tuple[str, str], tuple[str, float]] = {}  # ad-hoc lookups: (version, when)
        self._unknown: dict[ModelSpec, tuple[str, float]] = {}  # spec → (message, until)
        self._schema_ok, self._schema_problem, self._schema_checked_at = False, "", -SCHEMA_RECHECK_S

    def call(self, spec: ModelSpec, fn, *args):  # type: ignore[no-untyped-def]
        """`fn(*args)`, its failures classified (`ModelNotFound` remembered, else `NotReady`)."""
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                message = f"model {spec} not found in the registry"
                self._unknown[spec] = (message, time.monotonic() + self.settings.negative_cache_s)
                raise ModelNotFound(message) from exc
            raise NotReady(f"registry error resolving {spec}: {exc.message}") from exc
        except Exception as exc:  # connection errors of any HTTP/DB client
            raise NotReady(f"registry unreachable resolving {spec}: {exc}") from exc

    def check_schema(self) -> None:
        """Refuse to open a registry database whose schema is not this MLflow's (opening it
        would migrate it: `service.repository.registry_schema`); checked until it passes, at
        most every few seconds.

        Raises:
            NotReady: the store's schema revision differs, or cannot be read.
        """
        if self._schema_ok:
            return
        now = time.monotonic()
        if now - self._schema_checked_at >= SCHEMA_RECHECK_S:
            from service.repository.registry_schema import schema_problem

            problem = schema_problem(self.settings.tracking_uri)
            if problem and problem != self._schema_problem:
                log.error("%s", problem)
            self._schema_problem, self._schema_checked_at = problem, now
            self._schema_ok = not self._schema_problem
        if self._schema_problem:
            raise NotReady(self._schema_problem)

    def model_version(self, spec: ModelSpec):  # type: ignore[no-untyped-def]
        """The registry's `ModelVersion` for `spec` (negatively cached when unknown)."""
        self.check_schema()
        unknown = self._unknown.get(spec)
        if unknown is not None and time.monotonic() < unknown[1]:
            raise ModelNotFound(unknown[0])
        if spec.version:
            return self.call(spec, self.client.get_model_version, spec.name, str(spec.version))
        return self.call(spec, self.client.get_model_version_by_alias, spec.name, spec.alias)

    def resolve(self, spec: ModelSpec) -> str:
        """The version number `spec` names; ad-hoc alias lookups are cached `alias_refresh_s`."""
        if spec.version:
            return str(self.model_version(spec).version)
        version = self.cached_alias(spec)
        if version is None:
            version = str(self.model_version(spec).version)
            self._aliases[(spec.name, spec.alias)] = (version, time.monotonic())
        return version

    def cached_alias(self, spec: ModelSpec) -> str | None:
        """The version an ad-hoc alias lookup found, while it is trusted (`alias_refresh_s`)."""
        cached = self._aliases.get((spec.name, spec.alias))
        if cached and time.monotonic() - cached[1] < self.settings.alias_refresh_s:
            return cached[0]
        return None

    def fetch(self, name: str, version: str) -> tuple[Path, str, Any]:
        """The version's folder in the local cache (downloaded if needed), its digest and
        its registry entry (`ModelVersion`: run id, tags).

        Raises:
            NotReady: the registry or the artifact store cannot be reached (transient).
            ModelLoadError: the artifact cannot be a model (no MLmodel, symbolic links).
        """
        import mlflow.artifacts

        spec = ModelSpec(name, version=int(version))
        mv = self.model_version(spec)
        identity = {"run_id": str(mv.run_id or ""), "source": str(mv.source or ""),
                    "created": str(mv.creation_timestamp or "")}
        hit = self.cache.lookup(name, version, identity)
        if hit is not None:
            return (*hit, mv)

        def download(dest: Path) -> Path:
            try:
                source = self.client.get_model_version_download_uri(name, version)
                return Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=str(dest), tracking_uri=self.settings.tracking_uri))
            except Exception as exc:
                raise NotReady(f"could not download models:/{name}/{version}: {exc}") from exc

        return (*self.cache.store(name, version, identity, download), mv)
