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


# -- habits: unknown variables, lists, bounds, the settings file, errors that name the source --------
def _load(environ: dict[str, str], monkeypatch: pytest.MonkeyPatch, **overrides: object) -> Settings:
    from service.settings import load_settings

    for name in [k for k in __import__("os").environ if k.upper().startswith("ANOMALY_")]:
        monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    return load_settings({"grpc_port": "--port"}, **overrides)


def test_an_unknown_variable_is_refused_with_the_closest_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import SettingsError

    with pytest.raises(SettingsError) as err:
        _load({"ANOMALY_GRPC_PROT": "50052", "ANOMALY_INSPECTON_LOG": "true"}, monkeypatch)
    assert err.value.lines == [
        "ANOMALY_GRPC_PROT is not a setting (did you mean ANOMALY_GRPC_PORT?)",
        "ANOMALY_INSPECTON_LOG is not a setting (did you mean ANOMALY_INSPECTION_LOG?)"]
    with pytest.raises(SettingsError, match="ANOMALY_NOTHING_LIKE_IT is not a setting$"):
        _load({"ANOMALY_NOTHING_LIKE_IT": "1"}, monkeypatch)


def test_kubernetes_service_links_and_the_tooling_variables_are_not_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What Kubernetes puts in a pod for a Service named anomaly-gateway, and the variables
    of the SDK and the test tooling, start a server."""
    links = {"ANOMALY_GATEWAY_SERVICE_HOST": "10.0.0.7", "ANOMALY_GATEWAY_SERVICE_PORT": "80",
             "ANOMALY_GATEWAY_SERVICE_PORT_HTTP": "80", "ANOMALY_GATEWAY_PORT": "tcp://10.0.0.7:80",
             "ANOMALY_GATEWAY_PORT_80_TCP": "tcp://10.0.0.7:80", "ANOMALY_GATEWAY_PORT_80_TCP_PROTO": "tcp",
             "ANOMALY_GATEWAY_PORT_80_TCP_PORT": "80", "ANOMALY_GATEWAY_PORT_80_TCP_ADDR": "10.0.0.7",
             "ANOMALY_API_KEY": "k", "ANOMALY_KSERVE_PYTHON": "/x"}
    assert _load(links, monkeypatch).grpc_port == 50051
    from service.settings import SettingsError

    with pytest.raises(SettingsError, match="ANOMALY_GATEWAY_PORT is not a setting"):  # a typo, not a link
        _load({"ANOMALY_GATEWAY_PORT": "8080"}, monkeypatch)


@pytest.mark.parametrize(("value", "expected"), [
    ("CPUExecutionProvider", ["CPUExecutionProvider"]),
    ("CUDAExecutionProvider, CPUExecutionProvider", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ('["CUDAExecutionProvider","CPUExecutionProvider"]', ["CUDAExecutionProvider", "CPUExecutionProvider"]),
])
def test_lists_take_commas_or_json(value: str, expected: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    s = _load({"ANOMALY_PROVIDERS": value, "ANOMALY_MODELS": "a@champion,b@canary",
               "ANOMALY_API_KEYS": "score:line1:k1, admin:ops:k2"}, monkeypatch)
    assert s.providers == expected
    assert s.models == ["a@champion", "b@canary"]
    assert [k.get_secret_value() for k in s.api_keys] == ["score:line1:k1", "admin:ops:k2"]


def test_errors_name_the_variable_option_or_file_key(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import SettingsError

    with pytest.raises(SettingsError) as err:
        _load({"ANOMALY_HTTP_PORT": "70000", "ANOMALY_LOG_FORMAT": "xml"}, monkeypatch)
    named = [line.split(":")[0] for line in err.value.lines]
    assert named == ["ANOMALY_HTTP_PORT", "ANOMALY_LOG_FORMAT"]
    assert "65535" in err.value.lines[0] and "'text' or 'json'" in err.value.lines[1]
    with pytest.raises(SettingsError, match="^--port: Input should be greater than or equal to 0$"):
        _load({}, monkeypatch, grpc_port=-5)
    with pytest.raises(SettingsError, match="^ANOMALY_PROVIDERS: .*not a JSON list$"):
        _load({"ANOMALY_PROVIDERS": "[CPUExecutionProvider"}, monkeypatch)
    file = tmp_path / "anomaly.toml"
    file.write_text("metrics_port = 99999\n")
    with pytest.raises(SettingsError, match=f"^metrics_port in {file}: .*65535"):
        _load({"ANOMALY_SETTINGS_FILE": str(file)}, monkeypatch)
    assert _load({"ANOMALY_LOG_LEVEL": "debug"}, monkeypatch).log_level == "DEBUG"


def test_the_settings_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys are field names; the environment and options override the file; an unknown key, a
    missing file and a file that is not TOML are errors naming them."""
    from service.settings import SettingsError

    file = tmp_path / "anomaly.toml"
    file.write_text('grpc_port = 50070\nproviders = ["CPUExecutionProvider"]\nmodel_alias = "canary"\n'
                    'inspection_log = true\n')
    s = _load({"ANOMALY_SETTINGS_FILE": str(file), "ANOMALY_MODEL_ALIAS": "champion"}, monkeypatch)
    assert (s.grpc_port, s.model_alias, s.inspection_log) == (50070, "champion", True)
    assert _load({"ANOMALY_SETTINGS_FILE": str(file)}, monkeypatch, grpc_port=50071).grpc_port == 50071
    file.write_text("grpc_prot = 1\n")
    with pytest.raises(SettingsError, match=r"'grpc_prot' is not a setting \(did you mean grpc_port\?\)"):
        _load({"ANOMALY_SETTINGS_FILE": str(file)}, monkeypatch)
    file.write_text("grpc_port = \n")
    with pytest.raises(SettingsError, match="not TOML"):
        _load({"ANOMALY_SETTINGS_FILE": str(file)}, monkeypatch)
    with pytest.raises(SettingsError, match="No such file"):
        _load({"ANOMALY_SETTINGS_FILE": str(tmp_path / "missing.toml")}, monkeypatch)


def test_a_server_with_an_unknown_variable_does_not_start(tmp_path) -> None:
    """From outside: `anomaly serve` with a typo in a variable exits 2 at once with one line."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ANOMALY_")}
    proc = subprocess.run([sys.executable, "-m", "cli.main", "serve", "--tracking-uri",
                           f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", "0"],
                          env={**env, "ANOMALY_INSPECTION_DB_UR": "sqlite:///x.db"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("error: invalid settings: ANOMALY_INSPECTION_DB_UR is not a setting "
                                   "(did you mean ANOMALY_INSPECTION_DB_URL?)")
    assert not (tmp_path / "mlflow.db").exists()


def test_the_settings_reference_is_generated_and_current() -> None:
    """docs/settings.md is `anomaly settings-reference`: a setting added, renamed or re-described
    without regenerating it fails here."""
    from pathlib import Path

    from service.settings_reference import reference_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "settings.md"
    assert doc.read_text(encoding="utf-8") == reference_markdown(), \
        "docs/settings.md is stale: run `anomaly settings-reference --out docs/settings.md`"
    for name in Settings.model_fields:
        assert f"`ANOMALY_{name.upper()}`" in doc.read_text(encoding="utf-8")


def test_api_keys_from_text_never_split_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """A comma inside a key would make two keys (one of them a bare score key made of the rest of
    the secret): comma-separated entries must each be role:name:key; an empty value is not "no
    authentication"; an error never shows a secret, even one written in the name's place."""
    from service.settings import SettingsError

    with pytest.raises(SettingsError, match="entry 2 of 2 is not role:name:key") as err:
        _load({"ANOMALY_API_KEYS": "admin:ops:abc,def"}, monkeypatch)
    assert "abc" not in str(err.value) and "def" not in str(err.value).replace("default", "")
    with pytest.raises(SettingsError, match="ANOMALY_API_KEYS: empty value"):
        _load({"ANOMALY_API_KEYS": " "}, monkeypatch)
    with pytest.raises(SettingsError) as err:
        _load({"ANOMALY_API_KEYS": "admin:Zm9vYmFyU2VjcmV0+/==:ops"}, monkeypatch)
    assert "Zm9vYmFyU2VjcmV0" not in str(err.value) and "role:name:key, in that order" in str(err.value)
    keys = _load({"ANOMALY_API_KEYS": '["a,b-is-one-bare-key"]'}, monkeypatch).api_keys
    assert [k.get_secret_value() for k in keys] == ["a,b-is-one-bare-key"]


def test_empty_paths_odd_files_and_the_tooling_variables(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import SettingsError

    with pytest.raises(SettingsError, match="ANOMALY_CACHE_DIR is empty"):
        _load({"ANOMALY_CACHE_DIR": ""}, monkeypatch)
    for odd in ("/dev/zero", str(tmp_path)):
        with pytest.raises(SettingsError, match="not a regular file"):
            _load({"ANOMALY_SETTINGS_FILE": odd}, monkeypatch)
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * 40_000)
    with pytest.raises(SettingsError, match="KiB"):
        _load({"ANOMALY_SETTINGS_FILE": str(big)}, monkeypatch)
    assert _load({"ANOMALY_TRACEBACK": "1"}, monkeypatch).grpc_port == 50051


def test_the_reference_does_not_depend_on_the_home_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings_reference import reference_markdown

    here = reference_markdown()
    monkeypatch.setenv("HOME", "/")
    default = "sqlite:///.demo/mlflow.db"
    assert reference_markdown().count(default) == here.count(default) == 1
