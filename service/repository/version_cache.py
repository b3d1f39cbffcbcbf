"""The versions loaded in this process: downloaded, checked in an isolated child, built into
ONNX Runtime sessions, warmed up, validated and checked against their recorded scores on this
host, then kept (least recently used dropped beyond `max_loaded_models`, never one a watched
alias serves or one pinned by model control).

A version that failed to load for a reason its content decides (bad YAML, garbage ONNX,
non-finite outputs, a crash in the isolated check, scores that do not reproduce here) is
remembered with its content digest and not loaded again for `failed_retry_s`; after that it
is checked again only if its artifact (or its hardware-override tags) changed. Loads of
different versions do not wait for each other's downloads; only the in-process ONNX Runtime
build is serialised (memory).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from service import metrics
from service.errors import ModelLoadError, Refused
from service.promotion.rules import threshold_overrides, threshold_tags
from service.repository import reproduction
from service.repository.artifact import read_model_dir, reference_inputs
from service.repository.registry_access import RegistryAccess
from service.repository.versions import Failure, LoadedModel
from service.runtime.engine import OnnxModel
from service.settings import Settings

log = logging.getLogger("service.repository.model_repository")  # where these lines have always been logged
MAX_REASON = 2000  # characters of a load failure's reason kept


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


class VersionCache:
    """Thread-safe map of loaded versions, `(name, version)` → `LoadedModel`.

    Args:
        settings: the server's settings.
        registry: where versions are read and downloaded from.
        serving: what each watched alias serves now (never evicted; `unload` refuses them).
    """

    def __init__(self, settings: Settings, registry: RegistryAccess,
                 serving: Callable[[], dict[tuple[str, str], LoadedModel]]) -> None:
        self.settings = settings
        self.registry = registry
        self._serving = serving
        self._loaded: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._failed: dict[tuple[str, str], Failure] = {}
        self._pinned: set[tuple[str, str]] = set()  # (name, version) loaded on request: never evicted
        self._lru_lock = threading.Lock()  # brief: bookkeeping
        self._key_locks: dict[tuple[str, str], threading.Lock] = {}
        self._build_lock = threading.Lock()  # one in-process ONNX Runtime build at a time

    def cached(self, key: tuple[str, str]) -> LoadedModel | None:
        """The loaded version (marked recently used), or None."""
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
        loaded = self.cached(key)
        if loaded is not None:
            return loaded
        failed = self.failure(name, version)
        if failed is not None:
            raise ModelLoadError(failed.message)
        with self._key_lock(key):
            loaded = self.cached(key)
            if loaded is not None:
                return loaded
            t0 = time.perf_counter()
            local, digest, mv = self.registry.fetch(name, version)
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
                    self.registry.client.set_model_version_tag(name, version, key, value)
            except Exception as exc:  # a read-only registry, an outage: the check itself stands
                log.warning("could not write the reproduction result to %s/%s: %s", name, version, exc)

        if wanted:
            threading.Thread(target=write, name=f"hardware-tags-{name}-{version}", daemon=True).start()

    @staticmethod
    def _ad_hoc_thresholds(loaded: LoadedModel, tags: dict[str, str]) -> None:
        """Requests naming a version by number decide with its threshold tags when they are
        valid (a watched alias sets the thresholds it judged: `AliasFollower.swap`)."""
        try:
            loaded.model.overrides = threshold_overrides(tags, loaded.metadata)
            loaded.thresholds = threshold_tags(tags)
        except ValueError as exc:
            log.error("%s/%s: invalid threshold tag: %s; requests naming it use its calibrated thresholds",
                      loaded.name, loaded.version, exc)

    def _evict(self) -> None:
        """Drop least recently used versions beyond the cap; never one a watched alias serves
        or one pinned by an explicit load."""
        pinned = {(m.name, m.version) for m in self._serving().values()} | self._pinned
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
            aliases = sorted(alias for (n, alias), m in self._serving().items()
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

    def loaded(self) -> list[LoadedModel]:
        """The versions currently loaded, least recently used first."""
        with self._lru_lock:
            return list(self._loaded.values())
