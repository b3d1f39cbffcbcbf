"""docker-compose.yml run with podman on the host's network, for tests/deploy/test_stack.py.

Where compose and a bridge network are at hand, `docker compose up` runs the file as it is. On
this project's machines neither is (Debian's podman 4.3, no working CNI network, no registry), so
this module plays the file's services itself, changed only where host networking forces it, and
programmatically, so the test still runs the real file:

- every service on the host's network, bound to 127.0.0.1 on free ports: a service's own ports
  and `0.0.0.0` in its own strings become its loopback port(s); `name:port` of another service
  becomes `127.0.0.1:<its port>` (a replicated one: `ipv4:` with every replica, for gRPC's
  round_robin, where the file says `dns:///`); a service name as the value of a `--…host`
  option becomes 127.0.0.1; what each image binds that the file leaves to the image's default is set by
  LISTEN_ENV / LISTEN_ARGS;
- named volumes and containers get a per-run prefix and a label, so runs cannot clash and
  `down` finds everything it made; secrets are mounted from their files as compose does;
- an image that cannot be had is replaced where IMAGE_STAND_INS says (postgres:16 by PostgreSQL
  from Debian's package, deploy/podman/postgres);
- `depends_on` conditions are honoured: `service_healthy` runs the service's healthcheck with
  `podman exec` (podman 4.3 runs healthchecks with systemd timers, absent here),
  `service_completed_successfully` waits for exit status 0;
- each container's entry point runs under `timeout`, so a stack left by a killed test stops by
  itself.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from podman_support import podman

from loadtests.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
STOP_AFTER_S = 3600  # a container left by a killed test stops by itself (podman run --timeout)
LABEL = "edge-anomaly-stack"  # on every container and volume of a run: value = the run's project
# Where the file relies on an image's default port or bind address: what binds it to loopback.
LISTEN_ENV = {
    "server": lambda own: {"ANOMALY_GRPC_HOST": "127.0.0.1", "ANOMALY_GRPC_PORT": own[50051],
                           "ANOMALY_HTTP_HOST": "127.0.0.1"},
    "gateway": lambda own: {"ANOMALY_HTTP_HOST": "127.0.0.1", "ANOMALY_HTTP_PORT": own[8000]},
    "postgres": lambda own: {"PGPORT": own[5432]},
}
LISTEN_ARGS = {  # (stack, the replica's ports) → arguments appended to its command
    "postgres": lambda stack, own: ["-c", "listen_addresses=127.0.0.1"],
    "locust-master": lambda stack, own: ["--web-host", "127.0.0.1", "--web-port", own[8089],
                                         "--master-bind-host", "127.0.0.1", "--master-bind-port", own[5557]],
    "locust-worker": lambda stack, own: ["--master-port", stack.replicas["locust-master"][0].ports[5557]],
}
# The ports each service listens on, in the container (what the file's `name:port` strings name).
CONTAINER_PORTS = {"postgres": (5432,), "mlflow": (5000,), "server": (50051, 9100), "gateway": (8000,),
                   "locust-master": (8089, 5557)}
IMAGE_STAND_INS = {"postgres:16": "localhost/edge-anomaly-postgres:15"}


@dataclass
class Replica:
    """One container of a service."""

    service: str
    index: int
    name: str
    ports: dict[int, str]  # container port → host port


@dataclass
class ComposeStack:
    """The services of one compose file, started with podman under `project`."""

    project: str
    compose: dict = field(default_factory=lambda: yaml.safe_load(COMPOSE_FILE.read_text()))
    replicas: dict[str, list[Replica]] = field(default_factory=dict)
    # (service, command) → command: the test's bounds (fewer epochs, a headless Locust run).
    adjust: Callable[[str, list[str]], list[str]] = lambda service, command: command
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        for name, service in self.compose["services"].items():
            count = int(service.get("deploy", {}).get("replicas", 1))
            self.replicas[name] = [
                Replica(name, i, f"{self.project}-{name}-{i + 1}",
                        {port: str(free_port()) for port in CONTAINER_PORTS.get(name, ())})
                for i in range(count)]

    # ---- rendering
    def endpoints(self, service: str, port: int) -> list[str]:
        """`127.0.0.1:<host port>` of each replica of `service` for its container `port`."""
        return [f"127.0.0.1:{r.ports[port]}" for r in self.replicas[service]]

    def rewrite(self, text: str, own: Replica) -> str:
        """`text` of `own`'s definition with host-network addresses (module docstring), in one pass."""
        patterns: dict[str, str] = {}
        for name, reps in self.replicas.items():
            for port in CONTAINER_PORTS.get(name, ()):
                hosts = ",".join(self.endpoints(name, port))
                patterns[f"dns:///{name}:{port}"] = f"ipv4:{hosts}" if len(reps) > 1 else hosts
                patterns[f"{name}:{port}"] = hosts
        for port, host_port in own.ports.items():
            patterns[str(port)] = host_port
        patterns["0.0.0.0"] = "127.0.0.1"
        keys = sorted(patterns, key=len, reverse=True)
        regex = re.compile("|".join(rf"(?<![\w.-]){re.escape(k)}(?![\w.-])" if k.isdigit() or k == "0.0.0.0"
                                    else rf"(?<![\w-]){re.escape(k)}(?![\w-])" for k in keys))
        return regex.sub(lambda m: patterns[m.group(0)], text)

    def image(self, service: str) -> str:
        name = self.compose["services"][service].get("image")
        if name is None:  # `image:` of another service with the same build (locust-worker)
            raise AssertionError(f"{service}: no image name")
        if name in IMAGE_STAND_INS and podman("image", "exists", name, check=False).returncode != 0:
            return IMAGE_STAND_INS[name]
        return name

    def image_cmd(self, image: str) -> list[str]:
        return list(json.loads(podman("image", "inspect", image).stdout)[0]["Config"].get("Cmd") or [])

    def volume(self, name: str) -> str:
        """The run's volume for the file's named volume `name`, made with the run's label."""
        volume = f"{self.project}-{name}"
        if podman("volume", "exists", volume, check=False).returncode != 0:
            podman("volume", "create", "--label", f"{LABEL}={self.project}", volume)
        return volume

    def grace(self, service: str) -> int:
        """`stop_grace_period` in whole seconds (compose's default: 10)."""
        return round(seconds(self.compose["services"][service].get("stop_grace_period", "10s")))

    def run_args(self, replica: Replica, override: list[str] | None = None) -> list[str]:
        """`podman run` arguments for `replica` as the file defines it (`override`: in place of
        the file's entry point and command, as `docker compose run --entrypoint`)."""
        spec = self.compose["services"][replica.service]
        image = self.image(replica.service)
        entrypoint: list[str] | None = None  # None: the image's own
        cmd = self.image_cmd(image)
        if "entrypoint" in spec:
            entrypoint = spec["entrypoint"]
            entrypoint = entrypoint if isinstance(entrypoint, list) else shlex.split(entrypoint)
            cmd = []
        if "command" in spec:
            cmd = spec["command"] if isinstance(spec["command"], list) else shlex.split(spec["command"])
        if override is not None:
            entrypoint, cmd = override, []
        names, argv = set(self.compose["services"]), []
        for arg in [*(entrypoint or []), *cmd]:  # a service named as a host option's value: loopback
            host = arg in names and bool(argv) and argv[-1].startswith("--") and argv[-1].endswith("host")
            argv.append("127.0.0.1" if host else self.rewrite(arg, replica))
        argv += LISTEN_ARGS.get(replica.service, lambda stack, own: [])(self, replica.ports)
        argv = self.adjust(replica.service, argv)
        env = {k: self.rewrite(str(v), replica) for k, v in (spec.get("environment") or {}).items()}
        env.update(LISTEN_ENV.get(replica.service, lambda own: {})(replica.ports))
        if any("$" in a.replace("$$", "") for a in [*argv, *env.values()]):
            raise AssertionError(f"{replica.service}: interpolate compose variables before running it")
        argv = [a.replace("$$", "$") for a in argv]  # compose's escape for a literal $
        env = {k: v.replace("$$", "$") for k, v in env.items()}
        # The service is PID 1, as under compose; podman kills it after STOP_AFTER_S whatever happens.
        args = ["run", "--detach", "--name", replica.name, "--label", f"{LABEL}={self.project}",
                "--network", "host", "--timeout", str(STOP_AFTER_S),
                "--stop-timeout", str(self.grace(replica.service))]
        if entrypoint is not None:
            args += ["--entrypoint", json.dumps(argv[:len(entrypoint)])]
            argv = argv[len(entrypoint):]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        for volume in spec.get("volumes", []):
            source, _, target = volume.partition(":")
            if source.startswith("."):
                source = str((COMPOSE_FILE.parent / source).resolve())
            else:
                source = self.volume(source)
            args += ["--volume", f"{source}:{target}"]
        for secret in spec.get("secrets", []):
            path = (COMPOSE_FILE.parent / self.compose["secrets"][secret]["file"]).resolve()
            args += ["--volume", f"{path}:/run/secrets/{secret}:ro"]
        if "user" in spec:
            args += ["--user", str(spec["user"])]
        limits = spec.get("deploy", {}).get("resources", {}).get("limits", {})
        if "cpus" in limits:
            args += ["--cpus", str(limits["cpus"])]
        if "memory" in limits:
            args += ["--memory", str(limits["memory"])]
        return [*args, image, *argv]

    # ---- running
    def start(self, service: str) -> None:
        """Wait for `service`'s dependencies' conditions, then start its replicas."""
        for dependency, condition in self.conditions(service).items():
            self.wait(dependency, condition)
        for replica in self.replicas[service]:
            podman(*self.run_args(replica), timeout=120)
            self.log(f"started {replica.name}")

    def run_once(self, service: str, entrypoint: list[str] | None, suffix: str, timeout: float = 900) -> str:
        """A one-off container of `service`'s definition (as `docker compose run`; with
        `entrypoint`, `--entrypoint`); its log, once it has ended with status 0."""
        replica = Replica(service, 0, f"{self.project}-{service}-{suffix}", self.replicas[service][0].ports)
        podman(*self.run_args(replica, override=entrypoint), timeout=120)
        status = podman("wait", replica.name, timeout=timeout).stdout.strip()
        log = self.logs(replica.name)
        assert status == "0", f"{replica.name} exited {status}:\n{log[-3000:]}"
        return log

    def conditions(self, service: str) -> dict[str, str]:
        depends = self.compose["services"][service].get("depends_on", {})
        if isinstance(depends, list):
            return {name: "service_started" for name in depends}
        return {name: spec.get("condition", "service_started") for name, spec in depends.items()}

    def wait(self, service: str, condition: str, timeout: float = 900) -> None:
        """Block until `condition` holds for every replica of `service` (a one-shot: within
        `timeout`; health: within the healthcheck's own budget, as compose)."""
        started = time.monotonic()
        for replica in self.replicas[service]:
            if condition == "service_completed_successfully":
                status = podman("wait", replica.name, timeout=timeout).stdout.strip()
                assert status == "0", f"{replica.name} exited {status}:\n{self.logs(replica.name)[-3000:]}"
            elif condition == "service_healthy":
                self.wait_healthy(replica)
        self.log(f"{service}: {condition} ({time.monotonic() - started:.0f} s)")

    def wait_healthy(self, replica: Replica) -> None:
        """Until the healthcheck passes, within compose's budget: start_period + interval ×
        retries, each check within its timeout (compose's defaults: 0, 30 s, 3, 30 s)."""
        check = self.compose["services"][replica.service]["healthcheck"]
        kind, *test = check["test"]
        argv = test if kind == "CMD" else ["sh", "-c", test[0]]
        argv = [self.rewrite(a, replica) for a in argv]
        interval = seconds(check.get("interval", "30s"))
        deadline = time.monotonic() + seconds(check.get("start_period", "0s")) + \
            interval * int(check.get("retries", 3))
        while True:
            if podman("exec", replica.name, *argv, check=False,
                      timeout=seconds(check.get("timeout", "30s"))).returncode == 0:
                return
            state = self.state(replica.name)
            assert state.get("Running"), f"{replica.name} stopped ({state.get('ExitCode')}):\n" \
                                         f"{self.logs(replica.name)[-3000:]}"
            assert time.monotonic() < deadline, \
                f"{replica.name} not healthy:\n{self.logs(replica.name)[-3000:]}"
            time.sleep(interval)

    def state(self, name: str) -> dict:
        return json.loads(podman("inspect", "--type", "container", name).stdout)[0]["State"]

    def logs(self, name: str) -> str:
        result = podman("logs", name, check=False, timeout=60)
        return result.stdout + result.stderr

    def containers(self) -> list[str]:
        listed = podman("ps", "--all", "--filter", f"label={LABEL}={self.project}", "--format", "{{.Names}}",
                        check=False)
        return listed.stdout.split()

    def volumes(self) -> list[str]:
        listed = podman("volume", "ls", "--filter", f"label={LABEL}={self.project}", "--format", "{{.Name}}",
                        check=False)
        return listed.stdout.split()

    def stop(self) -> dict[str, dict]:
        """`docker compose stop`: dependents first, each with its `stop_grace_period` (compose's
        default 10 s) before SIGKILL; the final State of every container."""
        order = self.start_order()
        for service in reversed(order):
            for replica in self.replicas[service]:
                if replica.name in self.containers() and self.state(replica.name).get("Running"):
                    grace = self.grace(service)
                    podman("stop", "--time", str(grace), replica.name, timeout=grace + 60)
        return {name: self.state(name) for name in self.containers()}

    def start_order(self) -> list[str]:
        order: list[str] = []

        def visit(name: str) -> None:
            if name not in order:
                for dependency in self.conditions(name):
                    visit(dependency)
                order.append(name)
        for name in self.compose["services"]:
            visit(name)
        return order

    def remove(self) -> None:
        """Every container and volume of this project, whatever state it is in."""
        for name in self.containers():
            podman("rm", "--force", "--time", "5", name, check=False, timeout=120)
        for volume in self.volumes():
            podman("volume", "rm", "--force", volume, check=False)


def sweep() -> list[str]:
    """Remove what earlier runs left (a test killed before its clean-up: SIGKILL, a CI cancel):
    the containers and volumes of every project none of whose containers still runs; the
    projects removed."""
    project_state = f'{{{{.Label "{LABEL}"}}}} {{{{.State}}}}'
    listed = podman("ps", "--all", "--filter", f"label={LABEL}", "--format", project_state,
                    check=False).stdout.split("\n")
    volumes = podman("volume", "ls", "--filter", f"label={LABEL}", "--format",
                     f'{{{{index .Labels "{LABEL}"}}}}', check=False).stdout.split()
    states: dict[str, set[str]] = {project: set() for project in volumes}
    for line in filter(None, listed):
        project, _, state = line.partition(" ")
        states.setdefault(project, set()).add(state)
    stale = [project for project, seen in states.items() if "running" not in seen]
    for project in stale:
        ComposeStack(project).remove()
    return stale


def seconds(duration: str | int | float) -> float:
    """A compose duration ("1m30s", "5s", "500ms", or a number of seconds) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)
