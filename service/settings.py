"""One typed settings object for the server and the gateway (environment + CLI + file).

Every field can be set, highest priority first, with the matching CLI option, an
`ANOMALY_<FIELD>` environment variable (e.g. `ANOMALY_GRPC_PORT=50052`), or a key of the TOML
file named by `ANOMALY_SETTINGS_FILE` (`grpc_port = 50052`); `MLFLOW_TRACKING_URI` is honoured
for the registry. docs/settings.md lists them all (generated from this class: `anomaly
settings-reference`).

Habits kept: an `ANOMALY_` variable (or file key) that names no setting stops start-up with the
closest known name, rather than being ignored; lists take commas (`ANOMALY_PROVIDERS=
CUDAExecutionProvider,CPUExecutionProvider`) or a JSON list; every error names the variable,
option or file key it came from (`load_settings`, `SettingsError`).

This module is longer than most (about 550 lines): it is the one settings object the design
asks for, and each of its 80 or so fields carries its bounds and help text here, from which
docs/settings.md and the CLI's help are generated; how the settings are read (sources,
unknown names, error messages) follows it. The reference's generator is apart
(`service.settings_reference`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6): the same parser from PyPI
    import tomli as tomllib

from anomaly.wire import DEFAULT_MODEL_NAME
from service.keys import ROLES, parse_entry

DEFAULT_HOME = Path(".demo")
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"
PREFIX = "ANOMALY_"
SETTINGS_FILE_VARIABLE = "ANOMALY_SETTINGS_FILE"
MAX_SETTINGS_FILE = 256 * 1024  # bytes
# `ANOMALY_` variables that are not server settings: the SDK's and the CLI's key, and the test and
# benchmark tooling's. Start-up does not refuse them.
OTHER_VARIABLES = frozenset({
    "ANOMALY_API_KEY",         # the client commands' API key (cli/common.py)
    "ANOMALY_TRACEBACK",       # the CLI: print the traceback of an error (cli/main.py)
    "ANOMALY_KSERVE_PYTHON",   # tests and `anomaly bench`: KServe's environment
    "ANOMALY_MLSERVER",        # tests and `anomaly bench`: MLServer's environment
    "ANOMALY_PY310",           # tests/deploy/test_py310.py: a Python 3.10 interpreter
    "ANOMALY_DOCS_SCREENSHOT",  # the MLflow UI test: where its screenshot goes
    "ANOMALY_TEST_POSTGRES",   # tests: the PostgreSQL server to use
})
# Variables Kubernetes puts in every pod for each Service of its namespace ("service links"): a
# Service named `anomaly-gateway` gives ANOMALY_GATEWAY_SERVICE_HOST, ANOMALY_GATEWAY_PORT=tcp://…,
# ANOMALY_GATEWAY_PORT_80_TCP_ADDR and so on. They are not settings, and not typos.
SERVICE_LINK = re.compile(r"^[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_\d+_(TCP|UDP|SCTP)"
                          r"(_PROTO|_PORT|_ADDR)?)$")
SERVICE_LINK_URL = re.compile(r"^(tcp|udp|sctp)://")

# A list setting from the environment or an option: a JSON list, or items separated by commas.
CommaList = Annotated[list[str], NoDecode]


def usable_cores() -> int:
    """CPU cores this process may use: its CPU affinity, capped by the cgroup v2 CPU quota
    (a container's CPU limit, e.g. Kubernetes `limits.cpu: 2` on a 32-core node → 2),
    rounded down, at least 1."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, int(quota) // int(period))
    except (OSError, ValueError):  # no cgroup v2 CPU controller here
        pass
    return max(1, cores)


def comma_list(value: object) -> object:
    """A list from text: a JSON list (`["a", "b"]`), or items separated by commas (`a, b`)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("starts with '[' but is not a JSON list") from None
    return [item.strip() for item in text.split(",") if item.strip()]


class Settings(BaseSettings):
    """Server and gateway configuration."""

    # hide_input_in_errors: an error never shows a value (it may be an API key). Unknown
    # `ANOMALY_*` variables and file keys are refused by `unknown_settings`, not here.
    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", hide_input_in_errors=True)

    tracking_uri: str = Field(
        default=f"sqlite:///{DEFAULT_HOME / 'mlflow.db'}",
        validation_alias=AliasChoices("ANOMALY_TRACKING_URI", "MLFLOW_TRACKING_URI", "tracking_uri"),
        description="MLflow tracking/registry URI",
    )
    model_name: str = Field(DEFAULT_MODEL_NAME, description="registered model served by default")
    model_alias: str = Field("champion", description="alias served by default (and followed)")
    grpc_host: str = Field("127.0.0.1", description="gRPC bind address")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    http_host: str = Field("127.0.0.1", description="gateway bind address")
    http_port: int = Field(8000, ge=0, le=65535, description="gateway port (0 = pick a free one)")
    grpc_connections: int = Field(1, ge=1, description="gateway: gRPC connections to the server, used in "
                                                       "turn (more than one spreads calls over the server "
                                                       "processes of `processes`)")
    http_in_process: bool = Field(False, description="the gRPC server also answers the HTTP API (the "
                                                     "gateway's routes) on http_host:http_port from its "
                                                     "own process, without a gateway or a gRPC hop")
    grpc_target: str = Field("127.0.0.1:50051", min_length=1, description="gateway → gRPC server address")
    cache_dir: Path = Field(Path.home() / ".cache" / "edge-anomaly" / "models",
                            description="where downloaded model versions are kept")
    providers: CommaList = Field(default_factory=lambda: ["CPUExecutionProvider"],
                                 description="ONNX Runtime execution providers, in order (comma-separated)")
    intra_op_threads: int = Field(0, ge=0, description="ORT threads per inference call (0 = auto: the "
                                                       "cores shared among the concurrent calls)")
    solo_threads: int = Field(0, ge=0, description="adaptive execution: ORT threads of a call that runs "
                                                   "alone, on a second session of the model (0 = auto: "
                                                   "every core; 1 or ≤ intra_op_threads turns it off)")
    ort_spinning: bool = Field(False, description="let idle ORT threads spin (faster alone, "
                                                  "steals CPU from decoding and gRPC when shared)")
    workers: int = Field(0, ge=0, description="threads decoding and running inference (0 = one per "
                                              "CPU core this process may use, container limit included)")
    processes: int = Field(1, ge=1, description="server processes sharing the gRPC (and in-process HTTP) "
                                               "port with SO_REUSEPORT, each with its own models and "
                                               "an equal share of the cores (`service.processes`)")
    process_index: int = Field(-1, ge=-1, description="set by `processes` for each child (0 … N-1); "
                                                      "metrics on metrics_port + index, its own spool")
    runtime_dir: Path | None = Field(None, description="where `processes` keeps its per-port lock "
                                                       "(None = $XDG_RUNTIME_DIR/edge-anomaly, else "
                                                       "<tmp>/edge-anomaly-<uid>); must be this user's own")
    max_inflight: int = Field(256, ge=1,
                              description="requests admitted at once; more get RESOURCE_EXHAUSTED")
    max_concurrent_rpcs: int = Field(16, ge=1, description="unary anomaly.v1 and Open Inference Protocol "
                                                           "calls running at once (streams, health and "
                                                           "reflection have their own caps); more get "
                                                           "RESOURCE_EXHAUSTED")
    max_streams: int = Field(8, ge=1, description="ScoreStream calls open at once (a line camera's stream "
                                                  "is one); more get RESOURCE_EXHAUSTED")
    max_watch_streams: int = Field(16, ge=1, description="health Watch and server reflection streams open at "
                                                         "once (callers need no key for them); more get "
                                                         "RESOURCE_EXHAUSTED; health Check is never capped")
    request_read_timeout_s: float = Field(5.0, gt=0, description="longest wait for a unary call's request "
                                                                 "message once the call has started (or the "
                                                                 "call's deadline, if sooner); a call that "
                                                                 "sends no message in time ends with "
                                                                 "DEADLINE_EXCEEDED and frees its slot")
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1, description="largest encoded image (or raw pixel "
                                                                    "buffer) accepted")
    max_image_pixels: int = Field(24_000_000, ge=1, description="largest decoded image (width × height)")
    decode_memory_mb: int = Field(256, ge=1, description="memory images being decoded may take at once "
                                                         "(estimated from each header); beyond it a "
                                                         "request waits, then gets RESOURCE_EXHAUSTED")
    decode_wait_s: float = Field(2.0, ge=0, description="longest wait for decode memory before "
                                                        "RESOURCE_EXHAUSTED")
    http_body_memory_mb: int = Field(128, ge=1, description="gateway: memory request bodies (and their "
                                                            "copies) may take at once")
    http_body_timeout_s: float = Field(10.0, gt=0, description="HTTP: time a request body has to arrive "
                                       "in whole once reading starts; a late one answers 408 and frees its "
                                       "memory")
    models: CommaList = Field(default_factory=list,
                              description='extra "name@alias" entries served and followed (comma-separated)')
    poll_interval_s: float = Field(10.0, gt=0, description="how often watched aliases are re-resolved")
    alias_refresh_s: float = Field(30.0, ge=0,
                                   description="how long an ad-hoc (unwatched) alias lookup is trusted")
    negative_cache_s: float = Field(5.0, ge=0, description="how long an unknown model, alias or version "
                                                           "is remembered as unknown")
    failed_retry_s: float = Field(600.0, ge=0, description="how long a version that failed to load is "
                                                           "not tried again; then it is loaded again only "
                                                           "if its artifact changed")
    reproduction: bool = Field(True, description="a version serves only where it reproduces the scores "
                                                 "recorded when it was built: its recorded parts are "
                                                 "scored on this host after the load and compared; see "
                                                 "docs/promotion.md")
    reproduction_tolerance: float = Field(0.01, gt=0, le=0.5,
                                          description="reproduction check: largest relative error of a "
                                                      "recorded part's score (on the threshold's scale) or "
                                                      "map summary")
    reproduction_max_flipped: int = Field(0, ge=0, description="reproduction check: recorded decisions "
                                                               "that may come out the other way here")
    gate: bool = Field(True, description="promotion gate: a moved alias swaps, and a changed threshold "
                                         "tag applies, only if the known parts (the serving version's "
                                         "reference set and the plant's) are decided right; at start-up "
                                         "too, against what the alias last served; see docs/promotion.md")
    gate_max_false_reject: float = Field(0.1, ge=0, le=1, description="promotion gate: largest fraction "
                                                                      "of known-good parts the new version "
                                                                      "may reject")
    gate_write_tags: bool = Field(True, description="promotion gate: write the verdict to the version's "
                                                    "tags (gate.status, gate.reason, gate.against) and "
                                                    "description; overrides need it (gate.override.for)")
    shadow_alias: str = Field("", description="shadow challenger: also score a sample of answered images "
                                              "with this alias of the served model, off the hot path "
                                              "(e.g. challenger; empty = off)")
    shadow_fraction: float = Field(1.0, ge=0, le=1, description="shadow challenger: fraction of answered "
                                                                "images it scores")
    shadow_queue: int = Field(8, ge=1, description="shadow challenger: images waiting for it; more are "
                                                   "dropped (counted), never delaying answers")
    load_isolation: bool = Field(True, description="load and validate each new version in a child process "
                                                   "first (memory limit, timeout)")
    load_probe_memory_mb: int = Field(2048, ge=64, description="address-space limit of that child process")
    load_probe_timeout_s: float = Field(120.0, gt=0, description="time limit of that child process")
    max_batch_size: int = Field(0, ge=0, description="dynamic batching: largest batch (1 = off; 0 = "
                                                     "off on CPU-only providers, 8 with a GPU provider)")
    max_queue_delay_ms: float = Field(2.0, ge=0, description="dynamic batching: wait for more requests")
    max_queue: int = Field(64, ge=1, description="queued images per model; beyond → RESOURCE_EXHAUSTED")
    batch_workers: int = Field(2, ge=1, description="batches run concurrently per model")
    metrics_port: int = Field(0, ge=0, le=65535,
                              description="Prometheus metrics port of the gRPC server (0 = off)")
    log_format: Literal["text", "json"] = Field("text", description="text | json log lines")
    trt_engine_cache_dir: Path | None = Field(None, description="TensorRT engine cache folder")
    ort_log_severity: int = Field(3, ge=0, le=4, description="ONNX Runtime log severity: 0 verbose, "
                                  "1 info, 2 warning, 3 error (default), 4 fatal")
    trt_fp16: bool = Field(False, description="let TensorRT build FP16 engines")
    trt_int8: bool = Field(False, description="let TensorRT use INT8 (explicit Q/DQ models)")
    max_loaded_models: int = Field(4, ge=1, description="versions kept loaded at once (LRU)")
    request_timeout_s: float = Field(10.0, gt=0, description="gateway deadline for a gRPC call")
    grace_s: float = Field(5.0, ge=0, description="graceful-shutdown drain time")
    reflection: bool = Field(True, description="serve gRPC server reflection")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="logging level (any case)")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="API keys the gRPC server accepts, each with a role: "
                                          "'role:name:key' entries separated by commas, or a JSON list of "
                                          "them or of {\"key\", \"role\", \"name\"} (a bare key has "
                                          "the role score; see service.keys); empty = no auth")
    api_keys_file: Path | None = Field(None, description="file with more API keys, one entry per line (as "
                                                         "in api_keys, or a bare key)")
    max_pinned_models: int = Field(2, ge=0, description="versions model control (V2 repository load) may "
                                                        "keep pinned at once; more get RESOURCE_EXHAUSTED")
    tls_cert_file: Path | None = Field(None, description="gRPC server certificate (PEM): serve TLS")
    tls_key_file: Path | None = Field(None, description="gRPC server private key (PEM)")
    tls_client_ca_file: Path | None = Field(None, description="CA of client certificates: require mutual TLS")
    grpc_tls_ca_file: Path | None = Field(None, description="gateway → server: CA to trust (TLS)")
    grpc_client_cert_file: Path | None = Field(None,
                                               description="gateway → server: client certificate (mTLS)")
    grpc_client_key_file: Path | None = Field(None, description="gateway → server: client key (mTLS)")
    https_cert_file: Path | None = Field(None, description="gateway HTTPS certificate (PEM)")
    https_key_file: Path | None = Field(None, description="gateway HTTPS private key (PEM)")
    inspection_log: bool = Field(False, description="record every decision in the inspection log")
    inspection_db_url: str = Field("sqlite:///inspections.db",
                                   description="inspection-log database (any SQLAlchemy URL)")
    inspection_db_password_file: Path | None = Field(
        None, description="file holding the inspection database's password (a mounted secret; one line): "
                          "used in place of a password in the URL, which then need not carry one")
    inspection_spool_dir: Path | None = Field(
        None, description="local durable spool of decisions not yet in the database (default: beside a "
                          "SQLite database, else ~/.local/share/edge-anomaly/spool-<hash of the URL>)")
    inspection_spool_max_mb: int = Field(1024, ge=1, description="spool bound; when full, requests are "
                                                                 "refused (UNAVAILABLE), never unrecorded")
    inspection_durability: Literal["sync", "async"] = Field(
        "sync", description="sync: a decision is fsync'd to the spool before its response leaves; async: "
                            "fsync'd just after")
    evidence: bool = Field(False, description="keep the image and anomaly map of every NG decision, every "
                                              "shadow disagreement and a sample of OK ones, for review "
                                              "(`service.inspection.evidence`)")
    evidence_dir: Path = Field(Path("evidence"), description="the evidence folder")
    evidence_max_mb: int = Field(2048, ge=1, description="evidence size bound; the oldest goes first")
    evidence_max_age_days: float = Field(30.0, gt=0, description="evidence age bound")
    evidence_ok_fraction: float = Field(0.01, ge=0, le=1,
                                        description="share of OK decisions kept as evidence")
    evidence_min_free_mb: int = Field(1024, ge=0, description="free space evidence leaves on its disk (for "
                                                              "the inspection spool beside it): below, the "
                                                              "oldest goes, then new evidence is dropped")
    evidence_queue_mb: int = Field(64, ge=1, description="images waiting to be written as evidence; beyond, "
                                                         "evidence is dropped (counted), never a decision "
                                                         "delayed")

    evidence_remote_uri: str = Field("", max_length=2000, description=(
        "copy evidence to this MLflow artifact location too: `s3://bucket/prefix` (an S3-compatible "
        "bucket; endpoint and keys from MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; "
        "the s3 extra), `mlflow-artifacts:/evidence` (the tracking server's artifact store) or "
        "`file:///mount`; the review station fetches from it what the local bounds evicted "
        "(`service.inspection.remote`); empty: local folder only"))
    evidence_remote_queue: int = Field(10000, ge=1, description="evidence items waiting to be copied to "
                                                                "the bucket; beyond, the copy is dropped "
                                                                "(counted)")
    evidence_remote_max_age_days: float = Field(90.0, ge=0, description="day folders older than this are "
                                                                       "deleted from the bucket (hourly); 0: "
                                                                       "never (the bucket's lifecycle rules)")

    settings_file: Path | None = Field(
        None, description="TOML file of settings (keys are the field names: `grpc_port = 50052`); the "
                          "environment and options override it; only its environment variable sets it")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Options, then the environment, then the TOML file of `ANOMALY_SETTINGS_FILE`."""
        return init_settings, env_settings, TomlFileSource(settings_cls)

    @model_validator(mode="before")
    @classmethod
    def _no_empty_paths(cls, data: object) -> object:
        """An empty path setting is an error (it would mean the current folder), not "unset"."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if field is not None and isinstance(value, str) and not value.strip() \
                        and "Path" in str(field.annotation):
                    raise ValueError(f"{PREFIX}{name.upper()} is empty: unset it for the default")
        return data

    @field_validator("providers", "models", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return comma_list(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_any_case(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys(cls, value: object) -> object:
        """Each entry checked (`service.keys.parse_entry`) and kept as its text (a JSON object
        as its JSON), a secret like any key; `security.load_api_keys` reads them.

        From text: a JSON list, or `role:name:key` entries separated by commas, each with its
        role and name (a bare key, which may itself hold a comma, only in a JSON list or the key
        file). An empty value is refused: unset the variable for no authentication."""
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("empty value: unset it to run without API keys, or give role:name:key "
                                 "entries")
            if not value.strip().startswith("["):
                pieces = [piece.strip() for piece in value.split(",")]
                for i, piece in enumerate(pieces, 1):
                    role, _, rest = piece.partition(":")
                    if role not in ROLES or ":" not in rest:
                        raise ValueError(f"entry {i} of {len(pieces)} is not role:name:key (role one of "
                                         f"{', '.join(ROLES)}); a key holding a comma, or a bare key, needs "
                                         "the JSON list form or ANOMALY_API_KEYS_FILE")
        value = comma_list(value)
        if not isinstance(value, list):
            return value
        entries = []
        for i, entry in enumerate(value):
            try:
                parse_entry(entry)
            except ValueError as exc:  # its message never holds the secret
                raise ValueError(f"API key entry {i + 1}: {exc}") from None
            entries.append(json.dumps(entry) if isinstance(entry, dict) else entry)
        return entries

    @field_validator("models")
    @classmethod
    def _name_at_alias(cls, value: list[str]) -> list[str]:
        for entry in value:
            name, sep, alias = entry.partition("@")
            if not (sep and name and alias):
                raise ValueError(f"models entry {entry!r} is not of the form name@alias")
        return value

    @model_validator(mode="after")
    def _consistent_tls(self) -> Settings:
        """Refuse TLS settings that cannot mean what they say (e.g. a client CA without a server
        certificate would silently serve plaintext)."""
        pairs = (("ANOMALY_TLS_CERT_FILE", self.tls_cert_file, "ANOMALY_TLS_KEY_FILE", self.tls_key_file),
                 ("ANOMALY_GRPC_CLIENT_CERT_FILE", self.grpc_client_cert_file,
                  "ANOMALY_GRPC_CLIENT_KEY_FILE", self.grpc_client_key_file),
                 ("ANOMALY_HTTPS_CERT_FILE", self.https_cert_file,
                  "ANOMALY_HTTPS_KEY_FILE", self.https_key_file))
        for a, va, b, vb in pairs:
            if bool(va) != bool(vb):
                have, missing = (a, b) if va else (b, a)
                raise ValueError(f"{have} is set but {missing} is not: set both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("ANOMALY_TLS_CLIENT_CA_FILE (mutual TLS) needs ANOMALY_TLS_CERT_FILE and "
                             "ANOMALY_TLS_KEY_FILE: without a server certificate the server would serve "
                             "plaintext")
        return self

    def inspection_db(self) -> str:
        """The inspection database's URL, with the password of `inspection_db_password_file`
        when one is set (read now: a missing or unreadable file is an OSError naming it)."""
        from sqlalchemy.engine import make_url

        if self.inspection_db_password_file is None:
            return self.inspection_db_url
        path = Path(self.inspection_db_password_file)
        try:
            password = path.read_text().rstrip("\r\n")
        except OSError as exc:
            raise OSError(f"ANOMALY_INSPECTION_DB_PASSWORD_FILE {path}: {exc.strerror or exc}") from exc
        if not password:
            raise OSError(f"ANOMALY_INSPECTION_DB_PASSWORD_FILE {path} is empty")
        return make_url(self.inspection_db_url).set(password=password).render_as_string(hide_password=False)

    def spool_dir(self) -> Path:
        """Where the inspection log spools decisions (see `inspection_spool_dir`); each child
        of `processes` has its own (`-p<index>` appended)."""
        base = self._spool_dir()
        return base.with_name(f"{base.name}-p{self.process_index}") if self.process_index > 0 else base

    def _spool_dir(self) -> Path:
        if self.inspection_spool_dir is not None:
            return Path(self.inspection_spool_dir)
        from sqlalchemy.engine import make_url

        url = make_url(self.inspection_db_url)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            return Path(f"{url.database}.spool")
        digest = hashlib.sha1(self.inspection_db_url.encode()).hexdigest()[:10]
        return Path.home() / ".local" / "share" / "edge-anomaly" / f"spool-{digest}"

    @model_validator(mode="after")
    def _resolve_auto(self) -> Settings:
        """Resolve the 0 = automatic defaults, measured in docs/benchmarks.md: on a CPU, one
        inference call per core, each on one ONNX Runtime thread, and no batching gave the
        most images/s. More ORT threads than cores (2 calls × 2 threads on 2 cores), or
        batches, only made the threads wait for each other and for decoding. A call alone
        still gets every core: adaptive execution runs it on a second session with
        `solo_threads` (all cores) when no other request is in flight (`service.runtime.engine`)."""
        cores = usable_cores()
        if self.workers == 0:
            self.workers = cores
        if self.max_batch_size == 0:
            gpu = any(p in GPU_PROVIDERS for p in self.providers)
            self.max_batch_size = 8 if gpu else 1
        if self.intra_op_threads == 0:
            self.intra_op_threads = max(1, cores // self.concurrent_runs)
        if self.solo_threads == 0:
            self.solo_threads = cores
        return self

    @property
    def concurrent_runs(self) -> int:
        """How many ONNX Runtime calls per model may run at once: one per worker thread with
        batching off, `batch_workers` batches with batching on."""
        return self.workers if self.max_batch_size == 1 else self.batch_workers

    def watched(self) -> list[tuple[str, str]]:
        """(name, alias) pairs the server keeps loaded and follows: the default first."""
        pairs = [(self.model_name, self.model_alias)]
        if self.shadow_alias and self.shadow_alias != self.model_alias:
            pairs.append((self.model_name, self.shadow_alias))
        for entry in self.models:
            name, _, alias = entry.partition("@")
            if (name, alias) not in pairs:
                pairs.append((name, alias))
        return pairs


class SettingsError(ValueError):
    """Settings that cannot be used; `lines` are one-line messages, each naming the variable,
    option or file key at fault (never its value: it may be a secret)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


def _settings_file(environ: Mapping[str, str]) -> Path | None:
    value = next((v for k, v in environ.items() if k.upper() == SETTINGS_FILE_VARIABLE), "")
    return Path(value) if value.strip() else None


def read_settings_file(path: Path) -> dict[str, Any]:
    """The keys of a TOML settings file.

    Raises:
        SettingsError: unreadable, not TOML, or a key that names no setting (with the closest).
    """
    try:
        if path.exists() and not path.is_file():
            raise SettingsError([f"{SETTINGS_FILE_VARIABLE} {path}: not a regular file"])
        if path.stat().st_size > MAX_SETTINGS_FILE:
            raise SettingsError([f"{SETTINGS_FILE_VARIABLE} {path}: over {MAX_SETTINGS_FILE // 1024} KiB; "
                                 "a settings file is a few lines"])
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError([f"{SETTINGS_FILE_VARIABLE} {path}: {exc.strerror or exc}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError([f"{SETTINGS_FILE_VARIABLE} {path}: not TOML: {exc}"]) from None
    fields = [name for name in Settings.model_fields if name != "settings_file"]
    unknown = [f"{path}: {key!r} is not a setting{_closest(key, fields, '')}"
               for key in data if key not in fields]
    if unknown:
        raise SettingsError(unknown)
    return data


class TomlFileSource(PydanticBaseSettingsSource):
    """The settings file named by `ANOMALY_SETTINGS_FILE` (lowest priority but the defaults)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        """Unused: `__call__` reads the whole file."""
        return None, field_name, False  # unused: __call__ reads the whole file

    def __call__(self) -> dict[str, Any]:
        """The file's settings ({} without a file)."""
        path = _settings_file(os.environ)
        return read_settings_file(path) if path is not None else {}


def _closest(name: str, known: list[str], prefix: str) -> str:
    match = difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=1, cutoff=0.6)
    return f" (did you mean {prefix}{match[0].upper() if prefix else match[0]}?)" if match else ""


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per `ANOMALY_*` variable that names no setting (a typo, or one this version
    dropped), with the closest known name; the tooling's variables and Kubernetes' service
    links are not settings and not reported."""
    fields = list(Settings.model_fields)
    lines = []
    for name, value in sorted(environ.items()):
        upper = name.upper()
        if not upper.startswith(PREFIX) or upper in OTHER_VARIABLES:
            continue
        if upper[len(PREFIX):].lower() in fields:
            continue
        if SERVICE_LINK.match(upper) or (upper.endswith("_PORT") and SERVICE_LINK_URL.match(value)):
            continue
        lines.append(f"{name} is not a setting{_closest(upper[len(PREFIX):], fields, PREFIX)}")
    return lines


def _source_name(field: str, options: Mapping[str, str], environ: Mapping[str, str],
                 file_keys: set[str], file: Path | None) -> str:
    """Where `field`'s value came from, as the user would write it."""
    if field in options:
        return options[field]
    variables = {k.upper() for k in environ}
    if field == "tracking_uri" and "ANOMALY_TRACKING_URI" not in variables \
            and "MLFLOW_TRACKING_URI" in variables:
        return "MLFLOW_TRACKING_URI"
    if f"{PREFIX}{field.upper()}" not in variables and field in file_keys and file is not None:
        return f"{field} in {file}"
    return f"{PREFIX}{field.upper()}"


def load_settings(options: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Settings from `overrides` (CLI options; None = not given), the environment and the
    settings file.

    Args:
        options: the option that set each override, by field (`{"grpc_port": "--port"}`), for
            errors; a field not named is shown as `--field-name`.
        environ: the environment to check for unknown variables (default: `os.environ`).
        **overrides: settings given as options.

    Raises:
        SettingsError: unknown `ANOMALY_*` variables or file keys, or values that do not
            validate; each line names where the value came from.
    """
    environ = os.environ if environ is None else environ
    given = {k: v for k, v in overrides.items() if v is not None}
    names = {field: (options or {}).get(field, "--" + field.replace("_", "-")) for field in given}
    problems = unknown_variables(environ)
    if problems:
        raise SettingsError(problems)
    try:
        return Settings(**given)  # reads the settings file (`TomlFileSource`), refusing unknown keys
    except ValidationError as exc:
        file = _settings_file(environ)  # read again only to say which values came from it
        file_keys = set(read_settings_file(file)) if file is not None else set()
        lines = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            message = error["msg"].removeprefix("Value error, ")
            known = field in Settings.model_fields
            where = _source_name(field, names, environ, file_keys, file) if known else ""
            lines.append(f"{where}: {message}" if where else message)
        raise SettingsError(lines) from None
