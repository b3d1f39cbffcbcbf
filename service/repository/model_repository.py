"""Model repository: resolve `name@alias` / `name/version` in the MLflow registry, download
the artifact into the content-addressed cache, check it in an isolated process, load it
into an ONNX Runtime session, warm it up, validate it, and keep it.

Failures are remembered so that nothing is retried in a loop:

- an unknown model, alias or version is remembered as unknown for `negative_cache_s`;
- a version that failed to load (bad YAML, garbage ONNX, non-finite outputs, a crash in
  the isolated check) is remembered with its content digest and not loaded again for
  `failed_retry_s`; after that it is checked again only if its artifact changed;
- a registry or download outage (`NotReady`, UNAVAILABLE) is not remembered: the watcher
  retries it with backoff.

All of this runs off the inference threads: alias following on the watcher's own thread
(`DataPlane.following`), loads that requests ask for on the loader threads
(`DataPlane.loader`), model control on a thread of its own. Loads of different versions do
not wait for each other's downloads; only the in-process ONNX Runtime build is serialised
(memory). Nothing here is unpickled: the artifact is read as ONNX + YAML (MLmodel) + JSON.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from service import metrics
from service.errors import ModelLoadError, ModelNotFound, NotReady, Refused
from service.promotion.gate import Against, Candidate, Gatekeeper
from service.promotion.rules import (
    GATE_AGAINST,
    GATE_REASON,
    GATE_STATUS,
    GateResult,
    gate_inputs,
    override_of,
    threshold_overrides,
    threshold_tags,
)
from service.promotion.served import SERVED_TAG_PREFIX, Served, ServedMemory
from service.repository import reproduction
from service.repository.artifact import ArtifactCache, read_model_dir, reference_inputs
from service.runtime.engine import OnnxModel
from service.runtime.metadata import ModelMetadata, threshold_source
from service.settings import Settings

log = logging.getLogger(__name__)
AD_HOC = "(ad hoc)"  # metric label of loads not made for a watched alias
MAX_REASON = 2000  # characters of a load failure's reason kept
SCHEMA_RECHECK_S = 5.0  # a registry refused for its schema is looked at again after this

__all__ = ["LoadedModel", "ModelRepository", "ModelSpec", "load_model_dir", "read_model_dir"]


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


def load_model_dir(local_dir: Path, settings: Settings) -> OnnxModel:
    """Load, warm up and validate (with its reference images) the model in a folder."""
    onnx_path, metadata = read_model_dir(local_dir)
    model = OnnxModel(onnx_path, metadata, providers=settings.providers,
                      intra_op_threads=settings.intra_op_threads, log_severity=settings.ort_log_severity,
                      provider_options=provider_options(settings), spinning=settings.ort_spinning,
                      solo_threads=settings.solo_threads)
    model.validate(reference_inputs(local_dir, model.prepare_encoded))
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
        from mlflow import MlflowClient

        # MLflow's REST client retries a refused connection 7 times with exponential backoff
        # (minutes) by default; the watcher has its own backoff, so fail fast and let it retry.
        # Either can still be set in the environment.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.settings = settings
        self.client = LazyClient(lambda: MlflowClient(tracking_uri=settings.tracking_uri,
                                                      registry_uri=settings.tracking_uri), self._check_schema)
        self.cache = ArtifactCache(Path(settings.cache_dir))
        self._loaded: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._aliases: dict[tuple[str, str], tuple[str, float]] = {}
        self._unknown: dict[ModelSpec, tuple[str, float]] = {}  # spec → (message, until)
        self._failed: dict[tuple[str, str], Failure] = {}
        # Watched aliases: what each serves now, and the last failed attempt to move it.
        self._current: dict[tuple[str, str], LoadedModel] = {}
        for name, alias in settings.watched():  # 0 until the alias serves (an alert watches this)
            metrics.ALIAS_SERVING.labels(name, alias).set(0)
        self._pinned: set[tuple[str, str]] = set()  # (name, version) loaded on request: never evicted
        self.errors: dict[tuple[str, str], tuple[str, str]] = {}
        # Gate refusals: (name, candidate, judged against) → (the candidate's gate-relevant tags
        # when judged, verdict, when): judged again only when one of those changes, or after
        # `failed_retry_s`.
        self._verdicts: dict[tuple[str, str, str], tuple[tuple, GateResult, float]] = {}
        self.memory = ServedMemory(Path(settings.cache_dir), settings.tracking_uri)
        self.gatekeeper = Gatekeeper(self.client, settings, self.cache.staging)
        self._lru_lock = threading.Lock()  # brief: bookkeeping
        self._key_locks: dict[tuple[str, str], threading.Lock] = {}
        self._build_lock = threading.Lock()  # one in-process ONNX Runtime build at a time
        self._schema_ok, self._schema_problem, self._schema_checked_at = False, "", -SCHEMA_RECHECK_S

    # -- the registry -------------------------------------------------------------------
    def _registry_call(self, spec: ModelSpec, fn, *args):  # type: ignore[no-untyped-def]
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

    def _check_schema(self) -> None:
        """Refuse to open a registry database whose schema is not this MLflow's (opening it
        would migrate it: `service.repository.registry_schema`); checked until it passes, at most every
        few seconds.

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

    def _model_version(self, spec: ModelSpec):  # type: ignore[no-untyped-def]
        """The registry's `ModelVersion` for `spec` (negatively cached when unknown)."""
        self._check_schema()
        unknown = self._unknown.get(spec)
        if unknown is not None and time.monotonic() < unknown[1]:
            raise ModelNotFound(unknown[0])
        if spec.version:
            return self._registry_call(spec, self.client.get_model_version, spec.name, str(spec.version))
        return self._registry_call(spec, self.client.get_model_version_by_alias, spec.name, spec.alias)

    def _resolve(self, spec: ModelSpec) -> str:
        return str(self._model_version(spec).version)

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

    def _fetch(self, name: str, version: str) -> tuple[Path, str, Any]:
        """The version's folder in the local cache (downloaded if needed), its digest and
        its registry entry (`ModelVersion`: run id, tags).

        Raises:
            NotReady: the registry or the artifact store cannot be reached (transient).
            ModelLoadError: the artifact cannot be a model (no MLmodel, symbolic links).
        """
        import mlflow.artifacts

        spec = ModelSpec(name, version=int(version))
        mv = self._model_version(spec)
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

    # -- loading --------------------------------------------------------------------------
    def _cached(self, key: tuple[str, str]) -> LoadedModel | None:
        with self._lru_lock:
            loaded = self._loaded.get(key)
            if loaded is not None:
                self._loaded.move_to_end(key)
            return loaded

    def _key_lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._lru_lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def failure(self, name: str, version: str) -> Failure | None:
        """The remembered load failure of a version, while it is still trusted."""
        failure = self._failed.get((name, version))
        if failure is not None and time.monotonic() - failure.at < self.settings.failed_retry_s:
            return failure
        return None

    def load(self, name: str, version: str) -> LoadedModel:
        """Return the loaded version, downloading, checking and loading it on first use.

        Raises:
            NotReady: registry or artifact store unreachable (retry later).
            ModelNotFound: no such version.
            ModelLoadError: the version is broken (remembered; see the module docstring).
        """
        key = (name, version)
        loaded = self._cached(key)
        if loaded is not None:
            return loaded
        failed = self.failure(name, version)
        if failed is not None:
            raise ModelLoadError(failed.message)
        with self._key_lock(key):
            loaded = self._cached(key)
            if loaded is not None:
                return loaded
            t0 = time.perf_counter()
            local, digest, mv = self._fetch(name, version)
            previous = self._failed.get(key)
            overrides = reproduction.override_inputs(dict(mv.tags or {}))
            if previous is not None and previous.digest == digest and previous.overrides == overrides:
                previous.at = time.monotonic()  # checked again: unchanged
                raise ModelLoadError(previous.message)
            try:
                if self.settings.load_isolation:
                    from service.repository.isolation import probe_in_child

                    probe_in_child(local, memory_mb=self.settings.load_probe_memory_mb,
                                   timeout_s=self.settings.load_probe_timeout_s)
                with self._build_lock:
                    model = load_model_dir(local, self.settings)
                self._reproduce(name, version, model, local, dict(mv.tags or {}))
            except Exception as exc:  # ModelLoadError, or anything else the load throws: the version's fault
                reason = exc.message if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
                if len(reason) > MAX_REASON:  # it travels in GetModel and every refused call's details
                    reason = reason[:MAX_REASON] + " …"
                self._failed[key] = Failure(f"version {version}: {reason}", digest, overrides=overrides)
                raise ModelLoadError(self._failed[key].message) from exc
            self._failed.pop(key, None)
            loaded = LoadedModel(name, version, model, f"models:/{name}/{version}", digest,
                                 str(mv.run_id or ""))
            self._ad_hoc_thresholds(loaded, dict(mv.tags or {}))
            with self._lru_lock:
                self._loaded[key] = loaded
                self._evict()
            md = loaded.metadata
            metrics.MODEL_INFO.labels(name, version, md.architecture, md.variant,
                                      loaded.model.provider).set(1)
            log.info("loaded %s/%s (%s, %s, sha256 %s) in %.2fs on %s", name, version, md.architecture,
                     md.variant, digest[:12], time.perf_counter() - t0, loaded.model.provider)
            return loaded

    def _reproduce(self, name: str, version: str, model: OnnxModel, local: Path,
                   tags: dict[str, str]) -> None:
        """The version's recorded parts, scored on this host, must match what its build host
        recorded (`service.repository.reproduction`); the result is written back as
        `hardware.<host class>.*` tags.

        Raises:
            ModelLoadError: it does not reproduce here (remembered like any failed load).
        """
        if not self.settings.reproduction:
            return
        result = reproduction.check(model, local, self.settings.reproduction_tolerance,
                                    self.settings.reproduction_max_flipped, tags)
        metrics.REPRODUCTION.labels(name, result.status).inc()
        if result.status == "unrecorded":
            log.warning("%s/%s is not checked against recorded scores: %s", name, version, result.detail)
            return
        self._write_hardware_tags(name, version, result, tags)
        if not result.allows:
            message = f"does not reproduce its registered scores on this host: {result.detail}"
            log.error("%s/%s %s", name, version, message)
            raise ModelLoadError(message)
        if result.status == "overridden":
            log.warning("%s/%s does not reproduce its registered scores on this host: %s", name, version,
                        result.detail)
            return
        log.info("%s/%s reproduces its registered scores: %s", name, version, result.detail)

    def _write_hardware_tags(self, name: str, version: str, result: reproduction.Reproduction,
                             tags: dict[str, str]) -> None:
        """Write the result back (`hardware.<host class>.*`) off the load path: a slow or
        read-only registry delays nothing and changes nothing about the check."""
        if not self.settings.gate_write_tags:
            return
        wanted = {reproduction.STATUS_TAG.format(result.host_class): result.status,
                  reproduction.DETAIL_TAG.format(result.host_class): result.detail[:4000]}
        wanted = {k: v for k, v in wanted.items() if tags.get(k) != v}

        def write() -> None:
            try:
                for key, value in wanted.items():
                    self.client.set_model_version_tag(name, version, key, value)
            except Exception as exc:  # a read-only registry, an outage: the check itself stands
                log.warning("could not write the reproduction result to %s/%s: %s", name, version, exc)

        if wanted:
            threading.Thread(target=write, name=f"hardware-tags-{name}-{version}", daemon=True).start()

    @staticmethod
    def _ad_hoc_thresholds(loaded: LoadedModel, tags: dict[str, str]) -> None:
        """Requests naming a version by number decide with its threshold tags when they are
        valid (a watched alias sets the thresholds it judged: `_swap`)."""
        try:
            loaded.model.overrides = threshold_overrides(tags, loaded.metadata)
            loaded.thresholds = threshold_tags(tags)
        except ValueError as exc:
            log.error("%s/%s: invalid threshold tag: %s; requests naming it use its calibrated thresholds",
                      loaded.name, loaded.version, exc)

    def _evict(self) -> None:
        """Drop least recently used versions beyond the cap; never one a watched alias serves
        or one pinned by an explicit load."""
        pinned = {(m.name, m.version) for m in self._current.values()} | self._pinned
        for key in list(self._loaded):
            if len(self._loaded) <= self.settings.max_loaded_models:
                break
            if key not in pinned:
                self._drop(key, "LRU")

    def _drop(self, key: tuple[str, str], why: str) -> None:
        old = self._loaded.pop(key)
        md = old.metadata
        metrics.MODEL_INFO.remove(old.name, old.version, md.architecture, md.variant, old.model.provider)
        log.info("unloaded %s/%s (%s)", *key, why)

    def pin(self, loaded: LoadedModel) -> None:
        """Keep a loaded version in memory until `unload` (the repository API's load)."""
        with self._lru_lock:
            self._pinned.add((loaded.name, loaded.version))

    def pinned(self) -> set[tuple[str, str]]:
        """The (name, version) pairs pinned by explicit loads (model control)."""
        with self._lru_lock:
            return set(self._pinned)

    def unload(self, name: str, version: str) -> bool:
        """Unpin and drop a loaded version; False when it was not loaded.

        Raises:
            Refused: a watched alias serves it (move the alias first).
        """
        key = (name, version)
        with self._lru_lock:
            aliases = sorted(alias for (n, alias), m in self._current.items()
                             if n == name and m.version == version)
            if aliases:
                raise Refused(f"{name} version {version} is served by the watched alias "
                              f"{', '.join(f'{name}@{a}' for a in aliases)}; it cannot be unloaded "
                              "(move the alias, or stop watching it with ANOMALY_MODELS)")
            self._pinned.discard(key)
            if key not in self._loaded:
                return False
            self._drop(key, "unload requested")
            return True


    # -- watched aliases ------------------------------------------------------------------
    def watched(self, name: str, alias: str) -> bool:
        """Whether the server follows `name@alias`."""
        return (name, alias) in self.settings.watched()

    def current(self, name: str, alias: str) -> LoadedModel | None:
        """What a watched alias serves now (no registry call), or None if not watched/loaded."""
        return self._current.get((name, alias))

    def refresh(self, name: str, alias: str) -> LoadedModel | None:
        """Re-resolve a watched alias and follow it, through the promotion gate.

        Nothing served yet (start-up): `_first_serve`, judged against what the alias last
        served (`service.promotion.served`). Unmoved: a change of its version's threshold tags is judged
        before it applies (`_follow_thresholds`). Moved: the new version is loaded, checked,
        validated and judged against what serves now, and only then swapped in (`_move`). A
        failure at any step leaves the serving version (and its thresholds) in place and is
        recorded in `errors` (and counted, and logged at ERROR).

        Returns:
            The newly swapped-in version, or None when nothing changed or the move failed.

        Raises:
            NotReady: the registry or artifact store cannot be reached (keep serving, retry
                later with backoff); recorded in `errors` too.
        """
        key = (name, alias)
        serving = self._current.get(key)
        still = f"still serving {serving.version if serving else 'nothing'}"
        try:
            mv = self._model_version(ModelSpec(name, alias))
        except (ModelNotFound, NotReady) as exc:
            self.record_failure(key, "", exc.message, f"watched alias {name}@{alias}; {still}")
            if isinstance(exc, NotReady):
                raise
            return None
        version, tags = str(mv.version), dict(mv.tags or {})
        if serving is None:
            return self._first_serve(key, version, tags)
        if serving.version == version:
            self._follow_thresholds(key, serving, tags)
            return None
        return self._move(key, serving, version, tags)

    def _gated(self, key: tuple[str, str]) -> bool:
        """Whether the gate judges what `key` serves: on (`ANOMALY_GATE`), except for the shadow
        challenger's alias, whose decisions never answer a request (a challenger is there to be
        tried on live traffic, refused candidates included)."""
        return self.settings.gate and key != (self.settings.model_name, self.settings.shadow_alias)

    def _load_for(self, key: tuple[str, str], version: str, context: str) -> LoadedModel | None:
        """Load a version a watched alias needs; a failure is recorded (None), an outage raised."""
        failed = self.failure(key[0], version)
        if failed is not None:  # already refused: keep saying why, do not load it again
            self.errors[key] = (version, failed.message)
            return None
        try:
            return self.load(key[0], version)
        except NotReady as exc:
            self.record_failure(key, version, exc.message, context)
            raise
        except Exception as exc:  # ModelLoadError, ModelNotFound, or anything unforeseen
            self.record_failure(key, version, getattr(exc, "message", None) or repr(exc), context)
            return None

    def _move(self, key: tuple[str, str], serving: LoadedModel, version: str,
              tags: dict[str, str]) -> LoadedModel | None:
        """The alias names another version than the one serving: judge it, then swap."""
        name, alias = key
        still = f"still serving {serving.version}"
        against = Against(serving.version, serving.run_id, serving.model, serving.model.overrides)
        refused = self._refused(name, version, against, tags)
        if refused is not None:  # judged already: not scored again
            self.errors[key] = (version, refused.reason)
            return None
        loaded = self._load_for(key, version, f"alias {name}@{alias} moved to version {version}, which "
                                              f"failed to load; {still}")
        if loaded is None:
            return None
        moved = f"alias {name}@{alias} moved to version {version}; {still}"
        problem = self._shared(key, loaded, tags)
        if problem:
            self.note_failure(key, version, problem, moved)
            return None
        verdict, overrides = self._judge(alias, loaded, tags, against, f"version {version}")
        if not verdict.allows:
            self.record_failure(key, version, verdict.reason, moved)
            return None
        self._swap(key, loaded, overrides, tags)
        return loaded

    def _first_serve(self, key: tuple[str, str], version: str, tags: dict[str, str]) -> LoadedModel | None:
        """Start serving a watched alias (at start-up, or once its first load succeeds).

        With the gate on, the record of what the alias last served decides (`ServedMemory`,
        else the registry's `served.<alias>` tag): the same version serves with the threshold
        tags it was accepted with (a change since is then judged as a live one); another
        version is judged against it as a live move, and if refused the recorded version
        serves instead. With no record (a first start), the version is judged against its own
        reference set and the plant's parts (with no known parts at all it serves, as a first
        ever does); a version tagged `gate.status=refused` never serves at start-up unless it
        carries an override.
        """
        name, alias = key
        context = f"watched alias {name}@{alias} names version {version}, which failed to load"
        if not self._gated(key):
            loaded = self._load_for(key, version, context)
            if loaded is not None:
                try:
                    self._swap(key, loaded, threshold_overrides(tags, loaded.metadata), tags)
                except ValueError as exc:
                    self._swap(key, loaded, {}, {})
                    self.note_failure(key, version, f"version {version}: invalid threshold tag: {exc}; the "
                                                    "calibrated thresholds apply", context)
            return loaded
        remembered = self._record(name, alias)
        flagged = tags.get(GATE_STATUS) == "refused" and tags.get(GATE_AGAINST, "") != version and \
            override_of(tags)[0] is None
        if remembered is not None and remembered.version != version:
            return self._fall_back(key, version, tags, remembered, flagged)
        if remembered is None and flagged:
            self.record_failure(key, version, (
                f"version {version} is tagged {GATE_STATUS}=refused ({tags.get(GATE_REASON, 'no reason')}); "
                f"this server has no record of a version that served {name}@{alias} before (neither its "
                f"ANOMALY_CACHE_DIR nor the registry's {SERVED_TAG_PREFIX}{alias} tag), so nothing serves: "
                "move the alias to a version that passes, or override the gate (gate.override, "
                "gate.override.by, gate.override.reason)"), f"watched alias {name}@{alias} at start-up")
            return None
        loaded = self._load_for(key, version, context)
        if loaded is None:
            return None
        if remembered is None:
            return self._first_ever(key, loaded, tags)
        return self._serve_recorded(key, loaded, remembered.thresholds, tags)

    def _first_ever(self, key: tuple[str, str], loaded: LoadedModel,
                    tags: dict[str, str]) -> LoadedModel | None:
        """No record of what served the alias: judge the version, with its threshold tags, against
        its own reference set and the plant's parts; with no known parts at all it serves (a
        first ever has nothing to be compared with), and a refusal caused by its threshold tags
        leaves it serving with its calibrated thresholds."""
        name, alias = key
        version = loaded.version
        own = Against(version, loaded.run_id, loaded.model, {})
        try:
            verdict, overrides = self._judge(alias, loaded, tags, own, f"version {version} (first start)",
                                             allow_empty=True)
            if not verdict.allows and threshold_tags(tags):
                calibrated, _ = self._judge(alias, loaded, {}, own, f"version {version} with its calibrated "
                                            "thresholds (first start)", allow_empty=True)
                if calibrated.allows:
                    self._swap(key, loaded, {}, {})
                    context = f"watched alias {name}@{alias} at start-up; its calibrated thresholds serve"
                    self.record_failure(key, version, verdict.reason, context)
                    return loaded
        except NotReady:  # the known parts cannot be fetched now: judged at a later poll
            return None
        if not verdict.allows:
            self.record_failure(key, version, verdict.reason, f"watched alias {name}@{alias} at start-up; "
                                                              "nothing serves")
            return None
        if verdict.status == "skipped":
            log.warning("%s", verdict.reason)
        self._swap(key, loaded, overrides, tags)
        return loaded

    def _serve_recorded(self, key: tuple[str, str], loaded: LoadedModel, accepted: dict[str, str],
                        tags: dict[str, str]) -> LoadedModel | None:
        """Serve the recorded version with the thresholds it was accepted with, then judge its
        threshold tags if they changed since."""
        try:
            overrides = threshold_overrides(accepted, loaded.metadata)
        except ValueError:  # accepted once, refused now (the rules tightened): the calibrated ones
            overrides, accepted = {}, {}
        problem = self._shared(key, loaded, accepted)
        if problem:
            self.note_failure(key, loaded.version, problem, f"watched alias {key[0]}@{key[1]} at start-up")
            return None
        self._swap(key, loaded, overrides, accepted)
        try:
            self._follow_thresholds(key, loaded, tags)  # a change since: judged as a live one
        except NotReady:  # recorded; the change is judged at a later poll, the accepted ones serve
            pass
        return loaded

    def _record(self, name: str, alias: str) -> Served | None:
        """What the alias last served: this server's record, else the registry's
        `served.<alias>` tag (written by every server that swaps, for hosts with an empty
        cache). A record naming a version that does not exist is ignored (ERROR)."""
        remembered = self.memory.get(name, alias)
        source = f"the record in {self.memory.path(name, alias)}"
        if remembered is None:
            try:
                registered = self.client.get_registered_model(name)
            except Exception as exc:  # an outage: start as a first start would (still judged)
                log.warning("could not read %s's %s%s tag: %s", name, SERVED_TAG_PREFIX, alias, exc)
                return None
            recorded = (registered.tags or {}).get(f"{SERVED_TAG_PREFIX}{alias}", "").strip()
            if not recorded:
                return None
            remembered = Served(name, alias, recorded, "")
            source = f"the registry's {SERVED_TAG_PREFIX}{alias} tag"
        if not remembered.version.isdigit():
            log.error("%s names version %r of %s, which is not a version number; ignored", source,
                      remembered.version, name)
            return None
        try:
            mv = self._model_version(ModelSpec(name, version=int(remembered.version)))
        except ModelNotFound:
            log.error("%s names %s version %s, which the registry does not hold; ignored", source, name,
                      remembered.version)
            return None
        run_id = str(mv.run_id or "")
        if remembered.run_id and remembered.run_id != run_id:
            log.error("%s names %s version %s of run %s, but that version is of run %s now; ignored", source,
                      name, remembered.version, remembered.run_id, run_id)
            return None
        return Served(name, alias, remembered.version, run_id, remembered.thresholds, remembered.at)

    def _fall_back(self, key: tuple[str, str], version: str, tags: dict[str, str], remembered: Served,
                   flagged: bool) -> LoadedModel | None:
        """At start-up the alias names another version than the one it last served: judge it
        against that one; if refused (or tagged refused), serve the remembered one."""
        name, alias = key
        against = Against(remembered.version, remembered.run_id)
        moved = f"alias {name}@{alias} names version {version}, which did not serve it before"
        if flagged:
            why = tags.get(GATE_REASON, "no reason")
            reason = (f"version {version} is tagged {GATE_STATUS}=refused ({why}); a refused version is not "
                      "served at start-up (it is judged again after "
                      "ANOMALY_FAILED_RETRY_S, when its tags change, or with an override)")
            self._verdicts[(name, version, against.version)] = (
                gate_inputs(tags), GateResult("refused", reason), time.monotonic())
        else:
            try:
                candidate = self._load_for(key, version, f"{moved}, and failed to load")
                if candidate is not None:
                    problem = self._shared(key, candidate, tags)
                    if problem:
                        reason = problem
                    else:
                        subject = f"version {version}"
                        verdict, overrides = self._judge(alias, candidate, tags, against, subject)
                        if verdict.allows:
                            self._swap(key, candidate, overrides, tags)
                            return candidate
                        reason = verdict.reason
                else:
                    reason = self.errors.get(key, (version, "it failed to load"))[1]
            except NotReady as exc:  # judged at a later poll; meanwhile what served last serves
                reason = f"not judged yet: {exc.message}"
        last = self._load_for(key, remembered.version, f"{moved}; version {remembered.version}, which served "
                                                       "it last, failed to load too")
        if last is None:
            self.record_failure(key, version, f"{reason}; and version {remembered.version}, which served it "
                                              f"last, cannot be loaded: {self.errors[key][1]}", moved)
            return None
        try:
            last_tags = dict(self._model_version(ModelSpec(name, version=int(last.version))).tags or {})
        except (ModelNotFound, NotReady):
            last_tags = remembered.thresholds
        if self._serve_recorded(key, last, remembered.thresholds, last_tags) is None:
            return None
        self.record_failure(key, version, reason,
                            f"{moved}; serving version {remembered.version}, the last that served it")
        return last

    def _shared(self, key: tuple[str, str], loaded: LoadedModel, tags: dict[str, str]) -> str:
        """Why the alias may not serve `loaded` with these threshold tags ("" when it may): the
        version serves another watched alias with other thresholds (that alias judged them;
        one loaded version decides with one set of thresholds)."""
        others = sorted(a for (n, a), m in self._current.items() if m is loaded and (n, a) != key)
        wanted = threshold_tags(tags)
        if not others or wanted == loaded.thresholds:
            return ""
        shown = lambda t: ", ".join(f"{k}={v}" for k, v in sorted(t.items())) or "calibrated"  # noqa: E731
        return (f"version {loaded.version} serves {key[0]}@{', '.join(others)} with thresholds "
                f"{shown(loaded.thresholds)}, not the {shown(wanted)} its tags ask for (a change that "
                f"alias has not accepted); {key[0]}@{key[1]} moves to it once they agree")

    def _swap(self, key: tuple[str, str], loaded: LoadedModel, overrides: dict[str, float],
              tags: dict[str, str]) -> None:
        """Make `loaded` (with these thresholds) what the alias serves, and remember it."""
        name, alias = key
        serving = self._current.get(key)
        loaded.model.overrides = overrides  # replaced whole: a decision sees old or new, never a mix
        loaded.thresholds = threshold_tags(tags)
        loaded.aliases.add(alias)
        self._current[key] = loaded  # the swap: one reference assignment
        self.errors.pop(key, None)
        if serving is not None and serving is not loaded:
            serving.aliases.discard(alias)
            metrics.SWAPS.labels(name, alias).inc()
        metrics.SERVED_VERSION.labels(name, alias).set(float(loaded.version))
        metrics.ALIAS_SERVING.labels(name, alias).set(1)
        if serving is not loaded:
            log.info("alias %s@%s now serves version %s (was %s)", name, alias, loaded.version,
                     serving.version if serving else "none")
        self.memory.put(Served(name, alias, loaded.version, loaded.run_id, loaded.thresholds))
        if self.settings.gate_write_tags and serving is not loaded:  # the record of hosts with no cache
            try:
                self.client.set_registered_model_tag(name, f"{SERVED_TAG_PREFIX}{alias}", loaded.version)
            except Exception as exc:  # a read-only registry, an outage: the local record stands
                log.warning("could not write %s%s=%s on %s: %s", SERVED_TAG_PREFIX, alias, loaded.version,
                            name, exc)

    # -- live thresholds and the promotion gate ----------------------------------------------
    def _follow_thresholds(self, key: tuple[str, str], serving: LoadedModel, tags: dict[str, str]) -> None:
        """A change of the serving version's `threshold.*` tags applies only once the gate
        passes it (against the version's own reference set and the plant's parts)."""
        name, alias = key
        wanted = threshold_tags(tags)
        if wanted == serving.thresholds:
            self.errors.pop(key, None)  # the alias names what serves, as it serves: nothing pending
            return
        version = serving.version
        context = f"threshold tags of {name}/{version} (served by {name}@{alias}) changed; thresholds kept"
        if not self._gated(key):
            try:
                overrides = threshold_overrides(tags, serving.metadata)
            except ValueError as exc:
                self.note_failure(key, version, f"version {version}: invalid threshold tag: {exc}; "
                                                "thresholds unchanged", context)
                return
            self._apply_thresholds(key, serving, overrides, wanted)
            return
        against = Against(version, serving.run_id, serving.model, serving.model.overrides)
        refused = self._refused(name, version, against, tags)
        if refused is not None:
            self.errors[key] = (version, refused.reason)
            return
        shown = ", ".join(f"{k}={v}" for k, v in sorted(wanted.items())) or "none"
        verdict, overrides = self._judge(alias, serving, tags, against,
                                         f"threshold tags of version {version} ({shown})")
        if not verdict.allows:
            self.record_failure(key, version, verdict.reason, context)
            return
        self._apply_thresholds(key, serving, overrides, wanted)

    def _apply_thresholds(self, key: tuple[str, str], serving: LoadedModel, overrides: dict[str, float],
                          wanted: dict[str, str]) -> None:
        serving.model.overrides = overrides  # replaced whole: a decision sees old or new, never a mix
        serving.thresholds = wanted
        self.errors.pop(key, None)
        shown = ", ".join(f"{threshold_source(c)}={t:.6g}" for c, t in sorted(overrides.items()))
        log.info("%s/%s thresholds now follow its tags: %s", serving.name, serving.version,
                 shown or "none (the calibrated thresholds)")
        self.memory.put(Served(key[0], key[1], serving.version, serving.run_id, wanted))

    def _refused(self, name: str, version: str, against: Against, tags: dict[str, str]) -> GateResult | None:
        """The remembered refusal of this judgement, while trusted (`failed_retry_s`)."""
        memo = self._verdicts.get((name, version, against.version))
        if memo is not None and memo[0] == gate_inputs(tags) and \
                time.monotonic() - memo[2] < self.settings.failed_retry_s:
            return memo[1]
        return None

    def _judge(self, alias: str, loaded: LoadedModel, tags: dict[str, str], against: Against,
               subject: str, allow_empty: bool = False) -> tuple[GateResult, dict[str, float]]:
        """Judge `loaded` with the thresholds its tags ask for; returns the verdict and those
        thresholds. A refusal is remembered; tags that are not valid thresholds are refused
        without scoring anything.

        Raises:
            NotReady: the reference sets could not be fetched (judged at a later poll).
        """
        name, version = loaded.name, loaded.version
        key = (name, version, against.version)
        try:
            overrides = threshold_overrides(tags, loaded.metadata)
        except ValueError as exc:
            overrides = {}
            verdict = self.gatekeeper.refuse(alias, name, version, against.version,
                                             f"{name} {subject} refused: invalid threshold tag: {exc}")
        else:
            if not self._gated((name, alias)):
                return GateResult("passed", "the promotion gate is off for this alias"), overrides
            try:
                candidate = Candidate(name, version, loaded.model, overrides, tags, loaded.run_id)
                verdict = self.gatekeeper.judge(alias, candidate, against, subject, allow_empty)
            except NotReady as exc:
                self.record_failure((name, alias), version, exc.message,
                                    f"{name} {subject}: the promotion gate cannot fetch the known parts")
                raise
        if verdict.allows:
            self._verdicts.pop(key, None)
        else:
            self._verdicts[key] = (gate_inputs(tags), verdict, time.monotonic())
        return verdict, overrides

    def record_failure(self, key: tuple[str, str], version: str, message: str, context: str) -> None:
        """Remember (for GetModel), count and log at ERROR a failed move of a watched alias."""
        self.errors[key] = (version, message)
        metrics.LOAD_FAILURES.labels(*key).inc()
        log.error("%s: %s", context, message)

    def note_failure(self, key: tuple[str, str], version: str, message: str, context: str) -> None:
        """`record_failure`, once per distinct message (a problem seen at every poll)."""
        if self.errors.get(key) != (version, message):
            self.record_failure(key, version, message, context)

    def not_serving_reason(self, name: str, alias: str) -> str:
        """Why a watched alias serves nothing (for the UNAVAILABLE answer)."""
        version, message = self.errors.get((name, alias), ("", "not loaded yet"))
        return f"version {version}: {message}" if version and not message.startswith("version") else message

    # -- requests ---------------------------------------------------------------------------
    def cached_model(self, spec: ModelSpec) -> LoadedModel | None:
        """What `spec` names if it can be answered from memory (no registry call), else None."""
        if spec.version:
            return self._cached((spec.name, str(spec.version)))
        current = self._current.get((spec.name, spec.alias))
        if current is not None:
            return current
        alias = self._aliases.get((spec.name, spec.alias))
        if alias and time.monotonic() - alias[1] < self.settings.alias_refresh_s:
            return self._cached((spec.name, alias[0]))
        return None

    def get(self, spec: ModelSpec) -> LoadedModel:
        """Resolve and load what `spec` names (watched aliases answer from memory)."""
        if not spec.version:
            current = self._current.get((spec.name, spec.alias))
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

    def loaded(self) -> list[LoadedModel]:
        """The versions currently loaded, least recently used first."""
        with self._lru_lock:
            return list(self._loaded.values())
