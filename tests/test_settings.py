"""The typed settings object: environment variables, defaults, validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_environment_overrides_and_watched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    monkeypatch.setenv("ANOMALY_GRPC_PORT", "50099")
    monkeypatch.setenv("ANOMALY_MODELS", '["other@stfpm-fp32", "anomaly-detector@champion"]')
    s = Settings()
    assert s.tracking_uri == "sqlite:///x.db" and s.grpc_port == 50099
    assert s.watched() == [("anomaly-detector", "champion"), ("other", "stfpm-fp32")]
    monkeypatch.setenv("ANOMALY_TRACKING_URI", "postgresql://db/mlflow")
    assert Settings().tracking_uri == "postgresql://db/mlflow"


@pytest.mark.parametrize(("field", "value"), [("models", ["no-alias"]), ("max_batch_size", -1),
                                              ("log_format", "xml"), ("max_queue", -1)])
def test_bad_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        Settings(**{field: value})


def test_automatic_defaults_follow_the_hardware() -> None:
    """0 = automatic: one worker per usable core; batching off on CPU, on with a GPU provider."""
    from service.settings import usable_cores

    cpu = Settings()
    assert cpu.workers == usable_cores() and cpu.max_batch_size == 1
    gpu = Settings(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert gpu.max_batch_size == 8
    assert Settings(workers=3, max_batch_size=4).workers == 3
    assert Settings(workers=3, max_batch_size=4).max_batch_size == 4


def test_a_container_cpu_limit_caps_the_automatic_threads(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a big node with `limits.cpu: 1.5`, the cgroup quota (150000/100000) → 1 core, not
    the node's count: one worker, one ORT thread."""
    import os

    from service import settings as settings_module

    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(settings_module, "CGROUP_CPU_MAX", cpu_max)
    assert settings_module.usable_cores() == len(os.sched_getaffinity(0))  # no file: affinity
    cpu_max.write_text("max 100000\n")
    assert settings_module.usable_cores() == len(os.sched_getaffinity(0))
    cpu_max.write_text("150000 100000\n")
    assert settings_module.usable_cores() == 1
    s = Settings()
    assert (s.workers, s.intra_op_threads) == (1, 1)
    cpu_max.write_text("5000 100000\n")  # 0.05 CPU still gets one thread
    assert settings_module.usable_cores() == 1


def test_automatic_intra_op_threads_never_oversubscribe_the_cores() -> None:
    """0 = automatic: the usable cores shared among the ONNX Runtime calls that may run at
    once (one per worker with batching off, `batch_workers` with batching on), at least 1."""
    from service.settings import usable_cores

    cores = usable_cores()
    assert Settings().intra_op_threads == 1  # a worker per core, each call on one core
    assert Settings(workers=1).intra_op_threads == cores  # one call at a time: all cores
    assert Settings(max_batch_size=8, batch_workers=1).intra_op_threads == cores
    assert Settings(max_batch_size=8, batch_workers=2).intra_op_threads == max(1, cores // 2)
    assert Settings(workers=4 * cores).intra_op_threads == 1
    assert Settings(intra_op_threads=3).intra_op_threads == 3
