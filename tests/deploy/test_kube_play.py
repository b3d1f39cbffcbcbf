"""The Kubernetes manifests, run and validated.

deploy/k8s (the files of kustomization.yaml: the ConfigMap and the server and gateway
Deployments) is played with `podman kube play` on the serve image built by `make image-serve`,
against a copy of the session's SQLite MLflow store, and from the host: gRPC health SERVING (and
the `liveness` service the liveness probe asks), the gateway's /readyz and /healthz (its probes),
the server's metrics port, one real image scored through the gateway and over gRPC (the model's
own score), every container non-root with the manifest's securityContext and limits applied; then
`podman kube down` leaves no pod, container or volume behind.

What podman (Debian's 4.3) cannot play is rendered away, programmatically, so the test still runs
the real files: Services and HPAs are dropped (podman has no Services, so the gateway reaches the
server on loopback); one replica per Deployment on the host's network (`hostNetwork: true`: no
CNI network here; free loopback ports through the ConfigMap, container ports dropped since podman
maps them only on a bridge, probe ports renumbered); the image is the local build
(`imagePullPolicy: Never`); the tracking URI points at the store copy, mounted by a `hostPath`
volume; names get a per-run suffix so runs cannot clash; each container's command is wrapped in
`timeout`, with `restartPolicy: Never`, so a killed test leaves nothing running for long (podman's
kube pods stop when their containers have). Podman 4.3 ignores readiness probes and gRPC liveness
probes, and turns the gateway's httpGet liveness probe into a `curl` healthcheck (no curl in the
image; no systemd timers here to run it), so the test asks those endpoints itself.

The KServe manifest (ServingRuntime, InferenceService) is validated against the CRD schemas of
KServe (deploy/k8s/crds, copied from upstream), rejecting unknown fields as kubectl's default
strict field validation does; mutated copies prove that a mistyped or unknown field fails.

The podman part skips only where podman cannot be installed (as tests/deploy/test_images.py).
"""

from __future__ import annotations

import copy
import functools
import json
import uuid
from pathlib import Path

import grpc
import httpx
import jsonschema
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from podman_support import APP_UID, podman

from edge_anomaly_client.sdk import AnomalyClient
from loadtests.launch import free_port, wait_grpc_serving, wait_http_ready

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CRDS = K8S / "crds"
PLAYABLE = {"ConfigMap", "Deployment"}
CLUSTER_ONLY = {"Service", "HorizontalPodAutoscaler"}  # what podman kube play cannot run
STOP_AFTER_S = 900  # a container left by a killed test stops by itself


def kustomize_documents() -> list[dict]:
    """The documents of deploy/k8s as `kubectl apply -k` reads them (resources only: the
    kustomization has no patches or generators; checked)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization) == {"apiVersion", "kind", "resources"}, "render the new kustomize fields"
    return [doc for name in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def render_for_podman(docs: list[dict], *, suffix: str, image: str, store_copy: Path, store_home: Path,
                      tracking_uri: str, ports: dict[str, int]) -> tuple[list[dict], dict[str, dict]]:
    """The documents podman can play, changed only where it must (module docstring).

    Returns the documents and, for each Deployment, its pod template's original spec.
    """
    dropped = {doc["kind"] for doc in docs if doc["kind"] not in PLAYABLE}
    assert dropped <= CLUSTER_ONLY, f"kinds neither played nor cluster-only: {dropped - CLUSTER_ONLY}"
    played = [copy.deepcopy(doc) for doc in docs if doc["kind"] in PLAYABLE]
    configmaps = {doc["metadata"]["name"] for doc in played if doc["kind"] == "ConfigMap"}
    originals = {}
    for doc in played:
        original_name = doc["metadata"]["name"]
        doc["metadata"]["name"] = f"{original_name}-{suffix}"
        if doc["kind"] == "ConfigMap":
            grpc_target = doc["data"]["ANOMALY_GRPC_TARGET"]
            scheme = grpc_target.split("///")[0] + "///" if "///" in grpc_target else ""
            doc["data"].update({
                "MLFLOW_TRACKING_URI": tracking_uri,
                "ANOMALY_GRPC_TARGET": f"{scheme}127.0.0.1:{ports['grpc']}",  # no Service: loopback
                "ANOMALY_GRPC_HOST": "127.0.0.1", "ANOMALY_HTTP_HOST": "127.0.0.1",
                "ANOMALY_GRPC_PORT": str(ports["grpc"]), "ANOMALY_HTTP_PORT": str(ports["http"]),
                "ANOMALY_METRICS_PORT": str(ports["metrics"]),
            })
            continue
        originals[original_name] = copy.deepcopy(doc["spec"]["template"]["spec"])
        doc["spec"]["replicas"] = 1  # host network: one process per port
        pod = doc["spec"]["template"]["spec"]
        pod["hostNetwork"] = True
        pod["restartPolicy"] = "Never"  # podman restarts `Always` containers, a timed-out one too
        for volume in pod.get("volumes", []):
            volume["name"] = f"{volume['name']}-{suffix}"  # podman makes emptyDirs named volumes
        pod.setdefault("volumes", []).append(
            {"name": f"store-{suffix}", "hostPath": {"path": str(store_copy), "type": "Directory"}})
        for container in pod["containers"]:
            assert container["image"] == "edge-anomaly:serve"
            container["image"], container["imagePullPolicy"] = image, "Never"
            # The image's ENTRYPOINT (`anomaly`) with the manifest's args, stopped after a while.
            container["command"] = ["timeout", str(STOP_AFTER_S), "anomaly"]
            numbers = {}
            for port in container.pop("ports", []):  # port mappings need a bridge network
                numbers[port["name"]] = numbers[port["containerPort"]] = ports[port["name"]]
            for probe in ("readinessProbe", "livenessProbe"):
                for handler in container.get(probe, {}).values():
                    if isinstance(handler, dict) and "port" in handler:
                        handler["port"] = numbers[handler["port"]]
            for source in container.get("envFrom", []):
                if source.get("configMapRef", {}).get("name") in configmaps:
                    source["configMapRef"]["name"] += f"-{suffix}"
            for mount in container.get("volumeMounts", []):
                mount["name"] = f"{mount['name']}-{suffix}"
            container.setdefault("volumeMounts", []).append(
                {"name": f"store-{suffix}", "mountPath": str(store_home)})
    return played, originals


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity ("2", "250m", "512Mi", "1Gi") as a number."""
    value = str(value)
    for unit, scale in (("m", 1e-3), ("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30)):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * scale
    return float(value)


def health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status


def proc_status(container: str) -> dict[str, str]:
    text = podman("exec", container, "cat", "/proc/1/status").stdout
    return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}


def check_security(container: str, pod_spec: dict, spec: dict) -> None:
    """The container runs as the manifest says: its user, no privilege escalation, no
    capabilities, seccomp on, the resource limits."""
    pod_security, security = pod_spec["securityContext"], spec["securityContext"]
    info = json.loads(podman("inspect", "--format", "json", container).stdout)[0]
    uid, gid = pod_security["runAsUser"], pod_security["runAsGroup"]
    assert uid == APP_UID and pod_security["runAsNonRoot"]
    assert info["Config"]["User"] == f"{uid}:{gid}", info["Config"]["User"]
    assert info["Config"]["Cmd"] == spec["args"], info["Config"]["Cmd"]  # the manifest's args run
    host = info["HostConfig"]
    assert security["allowPrivilegeEscalation"] is False
    assert "no-new-privileges" in host["SecurityOpt"], host["SecurityOpt"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert not host["CapAdd"] and {"CAP_CHOWN", "CAP_SETUID", "CAP_NET_RAW"} <= set(host["CapDrop"])
    assert not host["Privileged"]
    limits = spec["resources"]["limits"]
    assert host["Memory"] == quantity(limits["memory"])
    assert host["NanoCpus"] == quantity(limits["cpu"]) * 1e9
    status = proc_status(container)  # the process itself (PID 1: `timeout`, then `anomaly`)
    assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(gid)] * 4, status
    assert status["NoNewPrivs"] == "1"
    capabilities = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
    assert all(int(status[cap], 16) == 0 for cap in capabilities), status
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    assert status["Seccomp"] == "2", status  # filter mode: podman's default profile
    assert podman("exec", container, "id", "-u").stdout.strip() == str(uid)


def test_kube_play_serves_and_scores(serve_image: str, store, store_copy: Path, good_and_defect,
                                     tmp_path: Path) -> None:
    from service.runtime.engine import OnnxModel
    from service.runtime.imaging import decode_image

    suffix = uuid.uuid4().hex[:8]
    ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
    played, originals = render_for_podman(
        kustomize_documents(), suffix=suffix, image=f"localhost/{serve_image}", store_copy=store_copy,
        store_home=store.home, tracking_uri=store.tracking_uri, ports=ports)
    kube_file = tmp_path / "kube.yaml"
    kube_file.write_text(yaml.safe_dump_all(played, sort_keys=False))
    deployments = [doc for doc in played if doc["kind"] == "Deployment"]
    assert sorted(d["metadata"]["name"] for d in deployments) == [f"anomaly-gateway-{suffix}",
                                                                    f"anomaly-server-{suffix}"]
    # podman 4.3: a Deployment's pods are <name>-pod-<i>, their containers <pod>-<container>.
    pods = [f"{d['metadata']['name']}-pod-0" for d in deployments]
    containers = {f"{d['metadata']['name']}-pod-0-{c['name']}": (original, c_original)
                  for d, original in zip(deployments, originals.values(), strict=True)
                  for c, c_original in zip(d["spec"]["template"]["spec"]["containers"],
                                           original["containers"], strict=True)}
    volumes = [v["name"] for d in deployments for v in d["spec"]["template"]["spec"]["volumes"]
               if "emptyDir" in v]
    target = f"127.0.0.1:{ports['grpc']}"
    gateway = f"http://127.0.0.1:{ports['http']}"
    try:
        played_out = podman("kube", "play", str(kube_file), timeout=120, check=False)
        assert played_out.returncode == 0, played_out.stderr + played_out.stdout
        try:
            wait_grpc_serving(target, timeout=240)  # the readiness probe: SERVING once the champion is warm
            wait_http_ready(f"{gateway}/readyz", timeout=60)
        except (TimeoutError, RuntimeError) as exc:
            logs = "".join(podman("logs", "--tail", "30", name, check=False).stdout for name in containers)
            raise AssertionError(f"{exc}\n{logs}") from exc
        assert health(target, "liveness") == health_pb2.HealthCheckResponse.SERVING  # the liveness probe
        assert httpx.get(f"{gateway}/healthz", timeout=10).status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10)
        assert metrics.status_code == 200 and "# TYPE" in metrics.text

        # One real image, from the host, through the gateway and over gRPC: the model's own score.
        model = OnnxModel(store.build.onnx_path, store.build.metadata, intra_op_threads=1)
        defect = good_and_defect[1][0]
        expected = model.score_image(decode_image(defect.read_bytes()), "").score
        reply = httpx.post(f"{gateway}/v1/score", content=defect.read_bytes(),
                           headers={"content-type": "image/png"}, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["score"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
        with AnomalyClient(target) as client:
            result = client.score(defect)
        assert result.score == pytest.approx(expected, rel=1e-4, abs=1e-5)
        assert (result.model.name, result.model.version) == (store.model_name, store.version)

        for name, (pod_spec, spec) in containers.items():
            check_security(name, pod_spec, spec)

        down = podman("kube", "down", str(kube_file), timeout=120, check=False)
        assert down.returncode == 0, down.stderr + down.stdout
        for pod in pods:
            assert podman("pod", "exists", pod, check=False).returncode == 1, f"pod {pod} left"
        for name in containers:
            assert podman("container", "exists", name, check=False).returncode == 1, f"container {name} left"
        for volume in volumes:
            assert podman("volume", "exists", volume, check=False).returncode == 1, f"volume {volume} left"
        with pytest.raises(grpc.RpcError):
            health(target, "")
    finally:
        # One call per object: podman 4.3 removes none of several names when one is missing.
        for pod in pods:
            podman("pod", "rm", "--force", "--ignore", "--time", "5", pod, check=False)
        for volume in volumes:
            if podman("volume", "exists", volume, check=False).returncode == 0:
                podman("volume", "rm", "--force", volume, check=False)


# KServe: the manifest against the CRD schemas.

KSERVE = K8S / "kserve-inferenceservice.yaml"


def strict(schema: object) -> object:
    """A CRD's structural schema as JSON Schema that rejects unknown fields, as the API server
    does under kubectl's default `--validate=strict` (an object's fields are its `properties`
    unless it has `x-kubernetes-preserve-unknown-fields` or `additionalProperties`)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) → a validator, for each CRD kept in deploy/k8s/crds."""
    validators = {}
    for path in sorted(CRDS.glob("*.json")):
        crd = json.loads(path.read_text())
        schema = strict(crd["openAPIV3Schema"])
        jsonschema.Draft202012Validator.check_schema(schema)
        api_version = f"{crd['group']}/{crd['version']}"
        validators[(api_version, crd["kind"])] = jsonschema.Draft202012Validator(schema)
    return validators


def kserve_errors(docs: list[dict]) -> list[str]:
    validators = crd_validators()
    errors = []
    for doc in docs:
        validator = validators.get((doc.get("apiVersion"), doc.get("kind")))
        if validator is None:
            errors.append(f"{doc.get('kind')} {doc.get('apiVersion')}: no such CRD version")
            continue
        errors += [f"{doc['kind']} {'.'.join(map(str, e.absolute_path))}: {e.message}"
                   for e in validator.iter_errors(doc)]
    return errors


def kserve_documents() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(KSERVE.read_text()) if doc]


def test_kserve_manifests_match_the_crd_schemas() -> None:
    docs = kserve_documents()
    assert {doc["kind"] for doc in docs} == {"ServingRuntime", "InferenceService"}
    assert kserve_errors(docs) == []


def _set(doc: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    for key in parents:
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    doc[last] = value


@pytest.mark.parametrize(("kind", "path", "value", "error"), [
    ("InferenceService", "spec.predictor.model.protocolVerison", "grpc-v2", "protocolVerison"),  # unknown
    ("InferenceService", "spec.predictor.minReplicas", "one", "is not of type 'integer'"),
    ("InferenceService", "spec.predictor.scaleMetric", "gpu", "is not one of"),
    ("ServingRuntime", "spec.containers.0.securityContext.allowPrivilegeEscalaton", False,
     "allowPrivilegeEscalaton"),
    ("ServingRuntime", "spec.containers.0.readinessProbe.grpc.port", "50051", "is not of type 'integer'"),
    ("ServingRuntime", "spec.supportedModelFormats.0.autoSelect", "yes", "is not of type 'boolean'"),
    ("ServingRuntime", "apiVersion", "serving.kserve.io/v1alpha2", "no such CRD version"),
])
def test_kserve_schema_rejects_a_mistyped_or_unknown_field(kind: str, path: str, value: object,
                                                           error: str) -> None:
    docs = kserve_documents()
    mutated = copy.deepcopy(docs)
    _set(next(doc for doc in mutated if doc["kind"] == kind), path, value)
    errors = kserve_errors(mutated)
    assert len(errors) == 1 and error in errors[0], errors
