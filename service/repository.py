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

All of this runs on the loader threads (`DataPlane.loader`), never on the inference
threads. Loads of different versions do not wait for each other's downloads; only the
in-process ONNX Runtime build is serialised (memory). Nothing here is unpickled: the
artifact is read as ONNX + YAML (MLmodel) + JSON.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service import metrics
from service.artifact import ArtifactCache, read_model_dir, reference_inputs
from service.engine import OnnxModel
from service.errors import ModelLoadError, ModelNotFound, NotReady, Refused, ServiceError
from service.metadata import ModelMetadata
from service.promotion import (
    GATE_OVERRIDE,
    GATE_REASON,
    GATE_STATUS,
    PLANT_REFERENCE_TAG,
    REFERENCE_ARTIFACTS,
    THRESHOLD_PREFIX,
    GateResult,
    ReferenceItem,
    ReferenceSetError,
    judge,
    overridden,
    reference_items,
    threshold_overrides,
    threshold_source,
)
from service.settings import Settings

log = logging.getLogger(__name__)
GATE_SECTION = "\n\n---\n**Promotion gate**: "  # the part of a version's description the gate writes
AD_HOC = "(ad hoc)"  # metric label of loads not made for a watched alias

__all__ = ["LoadedModel", "ModelRepository", "ModelSpec", "load_model_dir", "read_model_dir"]


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
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

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


def _gate_inputs(tags: dict[str, str]) -> tuple:
    """The tags of a candidate that can change the gate's verdict (thresholds, the override)."""
    return tuple(sorted((k, v) for k, v in tags.items()
                        if k.startswith(THRESHOLD_PREFIX) or k == GATE_OVERRIDE))


def _reference_call(what: str, fn, *args):  # type: ignore[no-untyped-def]
    """A registry call made for the promotion gate: something missing (a deleted run named by
    `reference.run_id`) is a broken reference set, anything else an outage.

    Raises:
        ReferenceSetError: the registry says it does not exist.
        NotReady: the registry or artifact store failed or cannot be reached (retry later).
    """
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise ReferenceSetError(f"{what}: {exc.message}") from exc
        raise NotReady(f"registry error reading {what}: {exc.message}") from exc
    except Exception as exc:  # connection errors of any HTTP/DB client, a failed download
        raise NotReady(f"could not read {what}: {exc}") from exc


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
        self.client = MlflowClient(tracking_uri=settings.tracking_uri,
                                   registry_uri=settings.tracking_uri)
        self.cache = ArtifactCache(Path(settings.cache_dir))
        self._loaded: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._aliases: dict[tuple[str, str], tuple[str, float]] = {}
        self._unknown: dict[ModelSpec, tuple[str, float]] = {}  # spec → (message, until)
        self._failed: dict[tuple[str, str], Failure] = {}
        # Watched aliases: what each serves now, and the last failed attempt to move it.
        self._current: dict[tuple[str, str], LoadedModel] = {}
        self._pinned: set[tuple[str, str]] = set()  # (name, version) loaded on request: never evicted
        self.errors: dict[tuple[str, str], tuple[str, str]] = {}
        # Gate refusals: (name, candidate) → ((serving version, the candidate's gate-relevant
        # tags) when judged, verdict, when): judged again only when one of those changes.
        self._refusals: dict[tuple[str, str], tuple[tuple[str, tuple], GateResult, float]] = {}
        self._lru_lock = threading.Lock()  # brief: bookkeeping
        self._key_locks: dict[tuple[str, str], threading.Lock] = {}
        self._build_lock = threading.Lock()  # one in-process ONNX Runtime build at a time

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

    def _model_version(self, spec: ModelSpec):  # type: ignore[no-untyped-def]
        """The registry's `ModelVersion` for `spec` (negatively cached when unknown)."""
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
            if previous is not None and previous.digest == digest:  # checked again: unchanged
                previous.at = time.monotonic()
                raise ModelLoadError(previous.message)
            try:
                if self.settings.load_isolation:
                    from service.probe import probe_in_child

                    probe_in_child(local, memory_mb=self.settings.load_probe_memory_mb,
                                   timeout_s=self.settings.load_probe_timeout_s)
                with self._build_lock:
                    model = load_model_dir(local, self.settings)
            except Exception as exc:  # ModelLoadError, or anything else the load throws: the version's fault
                reason = exc.message if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
                self._failed[key] = Failure(f"version {version}: {reason}", digest)
                raise ModelLoadError(self._failed[key].message) from exc
            self._failed.pop(key, None)
            loaded = LoadedModel(name, version, model, f"models:/{name}/{version}", digest,
                                 str(mv.run_id or ""))
            problem = self.follow_thresholds(loaded, dict(mv.tags or {}))
            if problem:  # a watched alias will not move to it (see `refresh`)
                log.error("%s; requests naming it use its calibrated thresholds", problem)
            with self._lru_lock:
                self._loaded[key] = loaded
                self._evict()
            md = loaded.metadata
            metrics.MODEL_INFO.labels(name, version, md.architecture, md.variant,
                                      loaded.model.provider).set(1)
            log.info("loaded %s/%s (%s, %s, sha256 %s) in %.2fs on %s", name, version, md.architecture,
                     md.variant, digest[:12], time.perf_counter() - t0, loaded.model.provider)
            return loaded

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
        """Re-resolve a watched alias and follow it.

        Unmoved: apply its version's live threshold tags (`service.promotion`). Moved: load,
        check and validate the new version, apply its threshold tags, pass it through the
        promotion gate against what serves now, and only then swap it in. A failure at any
        step leaves the serving version in place and is recorded in `errors` (and counted,
        and logged at ERROR).

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
        except ModelNotFound as exc:
            self.record_failure(key, "", exc.message, f"watched alias {name}@{alias}; {still}")
            return None
        except NotReady as exc:
            self.record_failure(key, "", exc.message, f"watched alias {name}@{alias}; {still}")
            raise
        version, tags = str(mv.version), dict(mv.tags or {})
        if serving is not None and serving.version == version:
            problem = self.follow_thresholds(serving, tags)
            if problem:
                self.note_failure(key, version, problem, f"watched alias {name}@{alias}")
            else:
                self.errors.pop(key, None)
            return None
        failed = self.failure(name, version)
        if failed is not None:  # already refused: keep saying why, do not load it again
            self.errors[key] = (version, failed.message)
            return None
        refused = self._refusals.get((name, version))
        judged = (serving.version if serving else "", _gate_inputs(tags))
        if (refused is not None and refused[0] == judged
                and time.monotonic() - refused[2] < self.settings.failed_retry_s):
            self.errors[key] = (version, refused[1].reason)  # judged already: not scored again
            return None
        context = f"alias {name}@{alias} moved to version {version}, which failed to load; {still}"
        try:
            loaded = self.load(name, version)
        except NotReady as exc:
            self.record_failure(key, version, exc.message, context)
            raise
        except Exception as exc:  # ModelLoadError, ModelNotFound, or anything unforeseen
            self.record_failure(key, version, getattr(exc, "message", None) or repr(exc), context)
            return None
        moved = f"alias {name}@{alias} moved to version {version}; {still}"
        problem = self.follow_thresholds(loaded, tags)
        if problem:
            self.note_failure(key, version, problem, moved)
            return None
        if serving is not None and self.settings.gate:
            try:
                verdict = self.gate(name, alias, loaded, serving, tags)
            except NotReady as exc:  # the reference sets could not be fetched: judged at a later poll
                self.record_failure(key, version, exc.message, moved)
                raise
            if not verdict.allows:
                self._refusals[(name, version)] = (judged, verdict, time.monotonic())
                self.record_failure(key, version, verdict.reason, moved)
                return None
        self._refusals.pop((name, version), None)
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

    # -- live thresholds and the promotion gate ----------------------------------------------
    def follow_thresholds(self, loaded: LoadedModel, tags: dict[str, str]) -> str:
        """Apply a version's `threshold.<category>` tags to its loaded model.

        Returns:
            "" when applied (or unchanged), else why the tags were refused (the thresholds
            in use stay as they were).
        """
        try:
            overrides = threshold_overrides(tags, loaded.metadata)
        except ValueError as exc:
            return f"version {loaded.version}: invalid threshold tag: {exc}; thresholds unchanged"
        if overrides != loaded.model.overrides:
            loaded.model.overrides = overrides  # replaced whole: a decision sees old or new, never a mix
            shown = ", ".join(f"{threshold_source(c)}={t:.6g}" for c, t in sorted(overrides.items()))
            log.info("%s/%s thresholds now follow its tags: %s", loaded.name, loaded.version,
                     shown or "none (the calibrated thresholds)")
        return ""

    def gate(self, name: str, alias: str, candidate: LoadedModel, serving: LoadedModel,
             tags: dict[str, str]) -> GateResult:
        """Score the known parts (the serving version's reference set and the plant's) with the
        candidate; the verdict is logged, counted and written back to the candidate's tags.

        Raises:
            NotReady: the reference sets cannot be downloaded now (retried at the next poll).
        """
        what = f"{name} version {candidate.version}"
        if overridden(tags):
            verdict = GateResult("overridden", f"{what}: promotion gate overridden by the tag "
                                               f"{GATE_OVERRIDE}=true (serving version {serving.version} "
                                               "was not compared)")
        else:
            with tempfile.TemporaryDirectory(dir=self._scratch()) as scratch:
                try:
                    items = self._known_parts(name, serving, Path(scratch))
                    outcomes = [self._outcome(candidate.model, item) for item in items]
                    against = f"the reference set of version {serving.version} and the plant's known parts"
                    verdict = judge(outcomes, self.settings.gate_max_false_reject, what, against)
                except ReferenceSetError as exc:
                    verdict = GateResult("refused", f"{what} refused by the promotion gate: a reference "
                                                    f"set cannot be read: {exc}")
        metrics.GATE_VERDICTS.labels(name, alias, verdict.status).inc()
        (log.error if verdict.status == "refused" else log.info)("promotion gate: %s", verdict.reason)
        if self.settings.gate_write_tags:
            self._write_verdict(name, candidate.version, verdict)
        return verdict

    def _scratch(self) -> Path:
        folder = self.cache.staging
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _known_parts(self, name: str, serving: LoadedModel, scratch: Path) -> list[ReferenceItem]:
        """Download the serving version's reference set and the plant's into `scratch`."""
        runs = [(serving.run_id, f"version {serving.version}")]
        registered = _reference_call(f"registered model {name}", self.client.get_registered_model, name)
        plant = (registered.tags or {}).get(PLANT_REFERENCE_TAG, "")
        if plant:
            runs.append((plant, "plant"))
        items: list[ReferenceItem] = []
        for run_id, source in runs:
            if not run_id:
                continue
            what = f"the reference set of {source} (run {run_id})"
            if not _reference_call(what, self.client.list_artifacts, run_id, REFERENCE_ARTIFACTS):
                continue
            local = _reference_call(what, self.client.download_artifacts, run_id, REFERENCE_ARTIFACTS,
                                    str(scratch / source.replace(" ", "-")))
            items += reference_items(Path(local), source)
        return items

    def _outcome(self, model: OnnxModel, item: ReferenceItem) -> tuple[ReferenceItem, bool | None, str]:
        """Whether the candidate flags one known part (None: it could not be scored, and why)."""
        from service.imaging import decode_image

        s = self.settings
        try:
            image = decode_image(item.path.read_bytes(), max_bytes=s.max_image_bytes,
                                 max_pixels=s.max_image_pixels, draft=model.metadata.map_size)
            return item, model.score_image(image, item.category).is_anomalous, ""
        except ServiceError as exc:
            return item, None, exc.message
        except Exception as exc:  # the candidate's fault (a crash in its graph): refuse it
            return item, None, f"{type(exc).__name__}: {exc}"

    def _write_verdict(self, name: str, version: str, verdict: GateResult) -> None:
        """Best effort: the verdict on the version's tags and in its description."""
        try:
            self.client.set_model_version_tag(name, version, GATE_STATUS, verdict.status)
            self.client.set_model_version_tag(name, version, GATE_REASON, verdict.reason[:4000])
            mv = self.client.get_model_version(name, version)
            own = (mv.description or "").split(GATE_SECTION)[0].rstrip()
            stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
            self.client.update_model_version(name, version, description=(
                f"{own}{GATE_SECTION}{verdict.status.upper()} ({stamp}): {verdict.reason}"))
        except Exception as exc:  # a read-only registry, an outage: the verdict stands regardless
            log.warning("could not write the gate verdict to %s version %s: %s", name, version, exc)

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
