"""One typed settings object for the server and the gateway (environment + CLI).

Every field can be set with an `ANOMALY_<FIELD>` environment variable (e.g.
`ANOMALY_GRPC_PORT=50052`) or the matching CLI option; `MLFLOW_TRACKING_URI` is honoured
for the registry. The README lists them all.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path(".demo")


class Settings(BaseSettings):
    """Server and gateway configuration."""

    model_config = SettingsConfigDict(env_prefix="ANOMALY_", extra="ignore")

    tracking_uri: str = Field(
        default=f"sqlite:///{DEFAULT_HOME / 'mlflow.db'}",
        validation_alias=AliasChoices("ANOMALY_TRACKING_URI", "MLFLOW_TRACKING_URI", "tracking_uri"),
        description="MLflow tracking/registry URI",
    )
    model_name: str = Field("anomaly-detector", description="registered model served by default")
    model_alias: str = Field("champion", description="alias served by default")
    grpc_host: str = Field("127.0.0.1", description="gRPC bind address")
    grpc_port: int = Field(50051, description="gRPC port (0 = pick a free one)")
    http_host: str = Field("127.0.0.1", description="gateway bind address")
    http_port: int = Field(8000, description="gateway port")
    grpc_target: str = Field("127.0.0.1:50051", description="gateway → gRPC server address")
    cache_dir: Path = Field(Path.home() / ".cache" / "edge-anomaly" / "models",
                            description="where downloaded model versions are kept")
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"],
                                 description="ONNX Runtime execution providers, in order")
    intra_op_threads: int = Field(0, ge=0, description="ORT threads per operator (0 = default)")
    workers: int = Field(4, ge=1, description="threads decoding and running inference")
    max_inflight: int = Field(64, ge=1, description="requests admitted at once; more get RESOURCE_EXHAUSTED")
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1, description="largest encoded image accepted")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest decoded image (width × height)")
    alias_refresh_s: float = Field(30.0, ge=0, description="how long an alias → version lookup is trusted")
    max_loaded_models: int = Field(4, ge=1, description="versions kept loaded at once (LRU)")
    request_timeout_s: float = Field(10.0, gt=0, description="gateway deadline for a gRPC call")
    grace_s: float = Field(5.0, ge=0, description="graceful-shutdown drain time")
    log_level: str = Field("INFO", description="logging level")
