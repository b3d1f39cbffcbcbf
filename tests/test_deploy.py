"""Deployment files are consistent with the code: docker-compose.yml, the Dockerfiles and the
Kubernetes manifests name real build stages, real commands and real settings.

`docker compose config` runs where a Docker Compose exists; elsewhere (no Docker engine or
compose plugin on the CI machines) that one test skips, saying so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SETTING_ENV = {f"ANOMALY_{name.upper()}" for name in Settings.model_fields} | {"MLFLOW_TRACKING_URI"}
SERVE_COMMANDS = {"serve", "gateway"}


def _stages(dockerfile: Path) -> dict[str, str]:
    """Stage name → its text."""
    text = dockerfile.read_text()
    parts = re.split(r"^FROM .* AS (\w+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_are_wired(compose: dict) -> None:
    services = compose["services"]
    assert {"postgres", "mlflow", "trainer", "server", "gateway", "locust-master",
            "locust-worker"} <= set(services)
    stages = _stages(ROOT / "docker" / "Dockerfile")
    for name, svc in services.items():
        if "build" in svc:
            assert svc["build"]["target"] in stages, name
            assert (ROOT / svc["build"]["dockerfile"]).is_file()
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for key in svc.get("environment", {}):
            if key.startswith(("ANOMALY_", "MLFLOW_")):
                assert key in SETTING_ENV, f"{name}: {key} is not a setting"
        for vol in svc.get("volumes", []):
            assert vol.split(":")[0] in compose["volumes"], vol
        for secret in svc.get("secrets", []):
            assert (ROOT / compose["secrets"][secret]["file"]).is_file()
    # MLflow on PostgreSQL, artifacts served by MLflow from a volume
    mlflow_cmd = " ".join(services["mlflow"]["entrypoint"])
    assert "--backend-store-uri postgresql://" in mlflow_cmd and "--serve-artifacts" in mlflow_cmd
    assert services["server"]["command"] == ["serve"] and services["gateway"]["command"] == ["gateway"]
    assert services["server"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["server"]["deploy"]["replicas"] >= 2  # scalable replicas
    assert "--master" in services["locust-master"]["command"]


def test_serve_image_has_no_torch() -> None:
    stages = _stages(ROOT / "docker" / "Dockerfile")
    assert "'.[serve]'" in stages["serve"] and "torch" not in stages["serve"].replace(
        "find_spec('torch') is None", "")
    assert "download.pytorch.org/whl/cpu" in stages["train"] and "torch==2.13.0" in stages["train"]
    jetson = (ROOT / "docker" / "Dockerfile.jetson").read_text()
    assert "l4t" in jetson and "onnxruntime-gpu" in jetson and "torch" not in jetson


def test_serve_commands_exist() -> None:
    from cli.main import app

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert SERVE_COMMANDS <= names


def test_kubernetes_manifests() -> None:
    docs = [d for f in sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text()) if d and d.get("kind") != "Kustomization"]
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    deployments = by_kind["Deployment"]
    assert set(deployments) == {"anomaly-server", "anomaly-gateway"}
    for dep in deployments.values():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        assert container["args"][0] in SERVE_COMMANDS and "readinessProbe" in container
        assert container["resources"]["requests"]["cpu"]  # the HPA needs CPU requests
    for hpa in by_kind["HorizontalPodAutoscaler"].values():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    for svc in by_kind["Service"].values():
        selected = [n for n, d in deployments.items()
                    if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert selected, svc["metadata"]["name"]
    for key in by_kind["ConfigMap"]["anomaly-config"]["data"]:
        assert key in SETTING_ENV, key
    isvc = by_kind["InferenceService"]["anomaly-detector"]
    model = isvc["spec"]["predictor"]["model"]
    runtime = by_kind["ServingRuntime"][model["runtime"]]
    assert model["protocolVersion"] == "grpc-v2" and "grpc-v2" in runtime["spec"]["protocolVersions"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    container = runtime["spec"]["containers"][0]
    assert container["image"] == "edge-anomaly:serve" and container["args"][0] in SERVE_COMMANDS
    assert {e["name"] for e in container["env"]} <= SETTING_ENV
    kustomization = yaml.safe_load((ROOT / "deploy" / "k8s" / "kustomization.yaml").read_text())
    assert all((ROOT / "deploy" / "k8s" / r).is_file() for r in kustomization["resources"])


def test_docker_compose_config_validates() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI on this machine")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no Docker Compose here: {probe.stderr.strip() or probe.stdout.strip()}")
    result = subprocess.run([docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_every_package_is_installed_by_a_non_editable_install() -> None:
    """Docker images run `pip install .`: every package folder must be listed in pyproject."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(ROOT)).replace("/", ".").removeprefix("protos.")
             for top in ("registry", "service", "clients", "loadtests", "protos")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
