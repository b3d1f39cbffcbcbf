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

ROOT = Path(__file__).resolve().parents[2]
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
            source = vol.split(":")[0]
            assert (ROOT / source).is_file() if source.startswith("./") else source in compose["volumes"], vol
        for secret in svc.get("secrets", []):
            assert (ROOT / compose["secrets"][secret]["file"]).is_file()
    # MLflow on PostgreSQL, artifacts served by MLflow from a volume
    mlflow_cmd = " ".join(services["mlflow"]["entrypoint"])
    assert "--backend-store-uri postgresql://" in mlflow_cmd and "--serve-artifacts" in mlflow_cmd
    assert services["server"]["command"] == ["serve"] and services["gateway"]["command"] == ["gateway"]
    # the inspection log's database exists before a server starts, on an old volume too
    assert services["server"]["depends_on"]["inspections-db"]["condition"] == "service_completed_successfully"
    assert services["server"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["server"]["deploy"]["replicas"] >= 2  # scalable replicas
    assert "--master" in services["locust-master"]["command"]


def test_serve_image_has_no_torch() -> None:
    stages = _stages(ROOT / "docker" / "Dockerfile")
    assert "pyproject.toml serve" in stages["serve"] and "torch" not in stages["serve"].replace(
        "find_spec('torch') is None", "").replace("'torch in the serve image'", "")
    assert "download.pytorch.org/whl/cpu" in stages["train"] and "torch==2.13.0" in stages["train"]
    # Every image installs the versions of constraints.txt, as `make venv` does (one MLflow version).
    text = (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    installs = [line for line in text.splitlines() if "pip install" in line and "--no-deps" not in line]
    assert installs and all("-c /tmp/deps/constraints.txt" in line for line in installs), installs
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
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
             .removeprefix("clients.")  # the SDK is installed as the top-level edge_anomaly_client
             for top in ("registry", "service", "clients", "loadtests", "protos", "cli", "studies")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(pod: dict, where: str) -> list[str]:
    """What keeps a pod spec (or a ServingRuntime's spec) out of Kubernetes' Pod Security
    Standards "restricted" profile (https://kubernetes.io/docs/concepts/security/pod-security-standards/)."""
    bad = []
    pod_sc = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            bad.append(f"{where}: {flag}")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            bad.append(f"{where}: volume {volume['name']} of type {kinds - RESTRICTED_VOLUMES}")
    for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
        sc = c.get("securityContext") or {}
        name = f"{where}/{c['name']}"
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: adds capabilities {caps['add']}")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            bad.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            bad.append(f"{name}: runs as user 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile is {seccomp!r}")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                bad.append(f"{name}: hostPort {port['hostPort']}")
    return bad


def test_pods_pass_the_restricted_profile_and_probe_grpc_health() -> None:
    """Every pod the manifests make passes the "restricted" Pod Security profile; the gRPC
    server's readiness and liveness are gRPC health checks (readiness: a model serves;
    liveness: the process answers, service "liveness"); the KServe runtime passes the
    InferenceService's name through as the model."""
    docs = [d for f in sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text()) if d]
    pods = [(d["spec"]["template"]["spec"], f"{d['kind']}/{d['metadata']['name']}") for d in docs
            if d["kind"] == "Deployment"]
    pods += [(d["spec"], f"{d['kind']}/{d['metadata']['name']}") for d in docs
             if d["kind"] == "ServingRuntime"]
    assert len(pods) == 3
    violations = [v for pod, where in pods for v in restricted_violations(pod, where)]
    assert not violations, violations
    assert restricted_violations({"containers": [{"name": "c"}]}, "bare")  # the check itself bites
    for pod, where in pods:
        for c in pod["containers"]:
            if c["args"][0] != "serve":
                continue
            assert c["readinessProbe"]["grpc"]["port"] == 50051, where
            assert c["livenessProbe"]["grpc"] == {"port": 50051, "service": "liveness"}, where
    (runtime,) = [d for d in docs if d["kind"] == "ServingRuntime"]
    args = runtime["spec"]["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "{{.Name}}"
