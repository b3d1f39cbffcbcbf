"""Model repository: resolve `name@alias` / `name/version` in the MLflow registry,
download the artifact, load it into an ONNX Runtime session, warm it up, and keep it.

Nothing here is unpickled: the artifact is read as ONNX + YAML (MLmodel) + JSON.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

from service import metrics
from service.engine import OnnxModel
from service.errors import ModelLoadError, ModelNotFound, NotReady, ServiceError
from service.metadata import METADATA_FILE, ModelMetadata
from service.settings import Settings

log = logging.getLogger(__name__)


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
    aliases: set[str] = field(default_factory=set)
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def metadata(self) -> ModelMetadata:
        """The model's metadata."""
        return self.model.metadata


def read_model_dir(local_dir: Path) -> tuple[Path, ModelMetadata]:
    """Find the ONNX file (from MLmodel's onnx flavor) and the metadata in a model folder.

    Raises:
        ModelLoadError: when the folder is not an MLflow ONNX model with our metadata.
    """
    mlmodel = local_dir / "MLmodel"
    if not mlmodel.is_file():
        raise ModelLoadError(f"{local_dir} has no MLmodel file")
    spec = yaml.safe_load(mlmodel.read_text()) or {}
    onnx_conf = (spec.get("flavors") or {}).get("onnx")
    if not onnx_conf:
        raise ModelLoadError("artifact is not an MLflow ONNX model (no onnx flavor)")
    onnx_path = local_dir / onnx_conf.get("data", "model.onnx")
    for candidate in (local_dir / METADATA_FILE, local_dir / "extra_files" / METADATA_FILE):
        if candidate.is_file():
            try:
                return onnx_path, ModelMetadata.load(candidate)
            except ValueError as exc:
                raise ModelLoadError(f"invalid {METADATA_FILE}: {exc}") from exc
    raise ModelLoadError(f"artifact has no {METADATA_FILE}")


def load_model_dir(local_dir: Path, settings: Settings) -> OnnxModel:
    """Load, warm up and validate the model stored in an MLflow model folder."""
    onnx_path, metadata = read_model_dir(local_dir)
    model = OnnxModel(onnx_path, metadata, providers=settings.providers,
                      intra_op_threads=settings.intra_op_threads,
                      provider_options=provider_options(settings), spinning=settings.ort_spinning)
    model.validate()
    return model


def provider_options(settings: Settings) -> dict[str, dict[str, str]]:
    """Execution-provider options from settings (TensorRT engine cache, FP16/INT8)."""
    trt: dict[str, str] = {"trt_fp16_enable": str(settings.trt_fp16),
                           "trt_int8_enable": str(settings.trt_int8)}
    if settings.trt_engine_cache_dir:
        trt.update(trt_engine_cache_enable="True",
                   trt_engine_cache_path=str(settings.trt_engine_cache_dir))
    return {"TensorrtExecutionProvider": trt}


class ModelRepository:
    """Thread-safe cache of loaded versions with alias resolution against MLflow."""

    def __init__(self, settings: Settings) -> None:
        import os

        from mlflow import MlflowClient

        # MLflow's REST client retries a refused connection 7 times with exponential backoff
        # (minutes) by default; the watcher has its own backoff, so fail fast and let it retry.
        # Either can still be set in the environment.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.settings = settings
        self.client = MlflowClient(tracking_uri=settings.tracking_uri,
                                   registry_uri=settings.tracking_uri)
        self._loaded: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._aliases: dict[tuple[str, str], tuple[str, float]] = {}
        # Watched aliases: what each serves now, and the last failed attempt to move it.
        self._current: dict[tuple[str, str], LoadedModel] = {}
        self.errors: dict[tuple[str, str], tuple[str, str]] = {}
        self._lru_lock = threading.Lock()  # brief: LRU bookkeeping
        self._load_lock = threading.Lock()  # long: one download/load at a time

    def _resolve(self, spec: ModelSpec) -> str:
        from mlflow.exceptions import MlflowException

        try:
            if spec.version:
                return str(self.client.get_model_version(spec.name, str(spec.version)).version)
            return str(self.client.get_model_version_by_alias(spec.name, spec.alias).version)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                raise ModelNotFound(f"model {spec} not found in the registry") from exc
            raise NotReady(f"registry error resolving {spec}: {exc.message}") from exc
        except Exception as exc:  # connection errors of any HTTP/DB client
            raise NotReady(f"registry unreachable resolving {spec}: {exc}") from exc

    def resolve(self, spec: ModelSpec) -> str:
        """The version number `spec` names; ad-hoc alias lookups are cached `alias_refresh_s`."""
        if spec.version:
            if (spec.name, str(spec.version)) in self._loaded:
                return str(spec.version)
            return self._resolve(spec)
        key = (spec.name, spec.alias)
        cached = self._aliases.get(key)
        if cached and time.monotonic() - cached[1] < self.settings.alias_refresh_s:
            return cached[0]
        version = self._resolve(spec)
        self._aliases[key] = (version, time.monotonic())
        return version

    def _download(self, name: str, version: str) -> tuple[Path, str]:
        import mlflow.artifacts

        uri = f"models:/{name}/{version}"
        dest = Path(self.settings.cache_dir) / name / version
        if not (dest / "MLmodel").is_file():
            try:
                source = self.client.get_model_version_download_uri(name, version)
                staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=dest.parent.mkdir(
                    parents=True, exist_ok=True) or dest.parent))
                local = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=str(staging),
                    tracking_uri=self.settings.tracking_uri))
                if not (local / "MLmodel").is_file():
                    raise ModelLoadError(f"{source} holds no MLmodel file")
                shutil.rmtree(dest, ignore_errors=True)
                local.rename(dest)  # atomic: a half-downloaded version is never used
                shutil.rmtree(staging, ignore_errors=True)
            except ModelLoadError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"could not download {uri}: {exc}") from exc
        return dest, uri

    def _cached(self, key: tuple[str, str]) -> LoadedModel | None:
        with self._lru_lock:
            loaded = self._loaded.get(key)
            if loaded is not None:
                self._loaded.move_to_end(key)
            return loaded

    def load(self, name: str, version: str) -> LoadedModel:
        """Return the loaded version, downloading and loading it on first use.

        Loads are serialised, but requests for versions already loaded never wait for one.
        """
        key = (name, version)
        loaded = self._cached(key)
        if loaded is not None:
            return loaded
        with self._load_lock:
            loaded = self._cached(key)
            if loaded is not None:
                return loaded
            t0 = time.perf_counter()
            local, uri = self._download(name, version)
            loaded = LoadedModel(name, version, load_model_dir(local, self.settings), uri)
            with self._lru_lock:
                self._loaded[key] = loaded
                self._evict()
            md = loaded.metadata
            metrics.MODEL_INFO.labels(name, version, md.architecture, md.variant,
                                      loaded.model.provider).set(1)
            log.info("loaded %s/%s (%s, %s) in %.2fs on %s", name, version,
                     loaded.metadata.architecture, loaded.metadata.variant,
                     time.perf_counter() - t0, loaded.model.provider)
            return loaded

    def _evict(self) -> None:
        """Drop least recently used versions beyond the cap; never one a watched alias serves."""
        pinned = {(m.name, m.version) for m in self._current.values()}
        for key in list(self._loaded):
            if len(self._loaded) <= self.settings.max_loaded_models:
                break
            if key not in pinned:
                old = self._loaded.pop(key)
                md = old.metadata
                metrics.MODEL_INFO.remove(old.name, old.version, md.architecture, md.variant,
                                          old.model.provider)
                log.info("unloaded %s/%s (LRU)", *key)

    def current(self, name: str, alias: str) -> LoadedModel | None:
        """What a watched alias serves now (no registry call), or None if not watched/loaded."""
        return self._current.get((name, alias))

    def refresh(self, name: str, alias: str) -> LoadedModel | None:
        """Re-resolve a watched alias; if it moved, load, warm up and validate the new version
        and only then swap it in. A failure leaves the serving version in place and is
        recorded in `errors`.

        Returns:
            The newly swapped-in version, or None when nothing changed or the load failed.

        Raises:
            NotReady: the registry cannot be reached (keep serving, retry later).
        """
        key = (name, alias)
        try:
            version = self._resolve(ModelSpec(name, alias))
        except ModelNotFound as exc:
            self._record_failure(key, "", exc.message, f"watched alias {name}@{alias}")
            return None
        serving = self._current.get(key)
        if serving is not None and serving.version == version:
            return None
        try:
            loaded = self.load(name, version)
        except ServiceError as exc:
            self._record_failure(key, version, exc.message,
                                 f"alias {name}@{alias} moved to version {version}, which failed to "
                                 f"load; still serving {serving.version if serving else 'nothing'}")
            return None
        loaded.aliases.add(alias)
        self._current[key] = loaded  # the swap: one reference assignment
        self.errors.pop(key, None)
        if serving is not None:
            serving.aliases.discard(alias)
            metrics.SWAPS.labels(name, alias).inc()
        metrics.SERVED_VERSION.labels(name, alias).set(float(version))
        log.info("alias %s@%s now serves version %s (was %s)", name, alias, version,
                 serving.version if serving else "none")
        return loaded

    def _record_failure(self, key: tuple[str, str], version: str, message: str, context: str) -> None:
        """Remember (for GetModel), count and log a failed move of a watched alias."""
        self.errors[key] = (version, message)
        metrics.LOAD_FAILURES.labels(*key).inc()
        log.error("%s: %s", context, message)

    def get(self, spec: ModelSpec) -> LoadedModel:
        """Resolve and load what `spec` names (watched aliases answer from memory)."""
        if not spec.version:
            current = self._current.get((spec.name, spec.alias))
            if current is not None:
                return current
        version = self.resolve(spec)
        loaded = self.load(spec.name, version)
        if spec.alias and not spec.version:
            loaded.aliases.add(spec.alias)
        return loaded

    def loaded(self) -> list[LoadedModel]:
        """The versions currently loaded, least recently used first."""
        with self._lru_lock:
            return list(self._loaded.values())
