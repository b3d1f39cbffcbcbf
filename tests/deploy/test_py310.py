"""The serve path on Python 3.10 (issue 37, point 5): JetPack 6 on Jetson Orin ships Python 3.10,
and NVIDIA's onnxruntime-gpu wheels for it are cp310.

- Static: ruff's 3.10 syntax check and vermin's standard-library check over the serve packages
  (`service`, `clients`, `protos`, `cli`, the images' health check), and a check for
  `except TimeoutError` around asyncio (on 3.10 `asyncio.wait_for` raises `asyncio.TimeoutError`,
  which is not the builtin before 3.11: such a handler catches nothing there).
- Real: a Python 3.10 environment made by docker/jetson-install.sh, the Jetson image's own install
  script (PyPI's CPU onnxruntime standing in for NVIDIA's build), cached between runs by the hash of
  what it installs; every serve module imported there; a real `anomaly serve --http` of that
  interpreter on loopback, serving the session's registered model from its SQLite MLflow store,
  scored over gRPC and HTTP from this process and by the 3.10 `anomaly score`, answers compared with
  the model run here; the image's HEALTHCHECK script run by 3.10 against it.

Without a Python 3.10 interpreter (pyenv's, `python3.10` on PATH, or ANOMALY_PY310) the real part
is skipped with the reason.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from loadtests.launch import ChildProcess, free_port, run_group, wait_grpc_serving, wait_http_ready

ROOT = Path(__file__).resolve().parents[2]
SERVE_PATHS = ["service", "clients", "protos/anomaly", "cli", "docker/healthcheck.py"]
INSTALL_SCRIPT = ROOT / "docker" / "jetson-install.sh"
# What the cached environment depends on: a change to any of these makes a new one.
ENV_INPUTS = ("pyproject.toml", "docker/jetson-install.sh", "constraints.txt")


def _python310() -> str | None:
    candidates = [os.environ.get("ANOMALY_PY310", "")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10.*/bin/python")), reverse=True)
    candidates.append(shutil.which("python3.10") or "")
    for candidate in filter(None, candidates):
        try:
            out = subprocess.run([candidate, "-c", "import sys, venv; print(sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.strip() == "(3, 10)":
            return candidate
    return None


# ---- static: no Python 3.10 needed


def _serve_files() -> list[Path]:
    files: list[Path] = []
    for rel in SERVE_PATHS:
        path = ROOT / rel
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if "_pb2" not in p.name)
    return files


def test_serve_path_syntax_and_stdlib_for_py310() -> None:
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "--target-version", "py310",
                           "--output-format", "concise", *SERVE_PATHS],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ruff.returncode == 0, ruff.stdout[-4000:] + ruff.stderr[-2000:]
    # vermin: the minimum Python each module's use of the standard library needs. Annotations are
    # evaluated (pydantic and typer read them at run time); `# novermin` marks a version-guarded line.
    vermin = subprocess.run([sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())",
                             "-t=3.10-", "--violations", "--no-tips", "--eval-annotations", *SERVE_PATHS],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert vermin.returncode == 0, vermin.stdout[-4000:] + vermin.stderr[-2000:]


def _bare_timeout_handlers(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            names = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            if any(isinstance(n, ast.Name) and n.id == "TimeoutError" for n in names):
                lines.append(node.lineno)
    return lines


def test_serve_path_catches_asyncio_timeouts_on_py310() -> None:
    """`except TimeoutError` misses `asyncio.wait_for`'s timeout on 3.10: the serve path says
    `asyncio.TimeoutError` (the same class from 3.11, so nothing changes there)."""
    found = []
    for path in _serve_files():
        source = path.read_text()
        if "asyncio" in source:
            lines = _bare_timeout_handlers(ast.parse(source))
            found += [f"{path.relative_to(ROOT)}:{line}" for line in lines]
    assert not found, f"`except TimeoutError` in asyncio code (write asyncio.TimeoutError): {found}"


def test_the_checker_sees_a_bare_timeout_handler() -> None:
    code = "try:\n    pass\nexcept (ValueError, TimeoutError):\n    pass\n"
    assert _bare_timeout_handlers(ast.parse(code)) == [3]
    assert _bare_timeout_handlers(ast.parse(code.replace("TimeoutError", "asyncio.TimeoutError"))) == []


def test_jetson_dockerfile_installs_only_through_the_script() -> None:
    """What the 3.10 run below checks is what the image does: its Python environment comes from
    jetson-install.sh alone (no other pip install in the Dockerfile), it runs unprivileged and
    asks gRPC health."""
    text = (ROOT / "docker" / "Dockerfile.jetson").read_text().replace("\\\n", " ")
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    assert not [r for r in runs if "pip" in r], runs
    assert any("jetson-install.sh runtime /opt/venv" in r for r in runs), runs
    assert any("jetson-install.sh project /opt/venv /src" in r for r in runs), runs
    assert "COPY docker/jetson-install.sh " in text
    # The tree is copied in a stage of its own and only bind-mounted into the install: a COPY
    # in the final stage would ship it (and whatever a working tree holds) in the image's layers.
    final = text.split("\nFROM ")[-1]
    assert "COPY . " not in final and "FROM scratch AS source\nCOPY . /src" in text
    assert any(r.startswith("RUN --mount=type=bind,from=source,source=/src,target=/src") for r in runs), runs
    assert "FROM ${L4T_BASE}" in text and "l4t-jetpack:r36" in text  # JetPack 6: Python 3.10
    assert "ARG ORT_PACKAGE=onnxruntime-gpu" in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), users
    assert "HEALTHCHECK" in text and "/opt/healthcheck.py" in text
    assert "[serve-core]" in INSTALL_SCRIPT.read_text()


# ---- real: a Python 3.10 environment made by the Jetson image's install script


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one maker at a time (parallel sessions share the cache)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(args: list[str], env: dict[str, str], log: Path, timeout: float) -> None:
    with log.open("ab") as out:
        proc = run_group(args, timeout, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n" + log.read_text()[-6000:]


@pytest.fixture(scope="module")
def py310_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python 3.10 venv with this tree's serve path installed, as docker/Dockerfile.jetson's
    steps make it: `jetson-install.sh runtime` (cached: a fresh venv, a current pip, ONNX Runtime)
    then `jetson-install.sh project` (every run: the project from this tree, `serve-core`)."""
    python = _python310()
    if python is None:
        pytest.skip("no Python 3.10 interpreter (pyenv's ~/.pyenv/versions/3.10.*, python3.10 on PATH, "
                    "or ANOMALY_PY310): the serve path's 3.10 run is not checked here")
    digest = hashlib.sha256(python.encode())
    for rel in ENV_INPUTS:
        digest.update(rel.encode() + b"\0" + ((ROOT / rel).read_bytes() if (ROOT / rel).exists() else b""))
    cache = Path(tempfile.gettempdir()) / "edge-anomaly-py310"
    venv = cache / digest.hexdigest()[:16]
    log = tmp_path_factory.mktemp("py310") / "install.log"
    env = {**os.environ, "PYTHON": python, "ORT_PACKAGE": "onnxruntime", "ORT_INDEX": "",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    with _locked(cache / f"{venv.name}.lock"):
        if not (venv / ".runtime-installed").exists():
            shutil.rmtree(venv, ignore_errors=True)
            _run(["sh", str(INSTALL_SCRIPT), "runtime", str(venv)], env, log, timeout=600)
            (venv / ".runtime-installed").touch()
        # From a copy of the tree as git sees it: pip builds in the source folder, and a `build/`
        # left in the checkout would carry modules deleted since into the 3.10 environment.
        source = _clean_tree(tmp_path_factory.mktemp("py310-src"))
        _run(["sh", str(INSTALL_SCRIPT), "project", str(venv), str(source)], env, log, timeout=600)
    _prune(cache, keep=venv)
    return venv


def _clean_tree(dst: Path) -> Path:
    """The checkout's files (tracked, and untracked ones git does not ignore) copied to `dst`."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, timeout=60, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    return dst


def _prune(cache: Path, keep: Path) -> None:
    """Environments of earlier inputs go, but one that another session is making or using."""
    for other in cache.iterdir():
        if not other.is_dir() or other == keep:
            continue
        with (cache / f"{other.name}.lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(other, ignore_errors=True)
            (cache / f"{other.name}.lock").unlink(missing_ok=True)


IMPORT_ALL = r"""
import asyncio, importlib, pkgutil, sys
assert sys.version_info[:2] == (3, 10), sys.version
import service
assert "/site-packages/" in service.__file__, service.__file__  # the installed package, not the tree
failed = []
for top in ("anomaly", "service", "clients", "cli"):
    package = importlib.import_module(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        if info.name.startswith(("service.inspection.migrations.env",
                                 "service.inspection.migrations.versions.")):
            continue  # Alembic's scripts, run by Alembic
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failed.append(f"{info.name}: {type(exc).__name__}: {exc}")
assert not failed, "\n".join(failed)
training = [m for m in sys.modules if m.split(".")[0] in ("torch", "registry", "studies")]
assert not training, f"training code on the serve path: {training}"

# The body reader's deadline, 3.10's branch (asyncio.wait_for): a stalled stream times out.
from service.protocol.rest.http_body import next_by

async def stalled():
    yield b"x"
    await asyncio.sleep(30)
    yield b"y"

async def main():
    loop, stream = asyncio.get_running_loop(), stalled()
    assert await next_by(stream, loop.time() + 5) == b"x"
    started = loop.time()
    try:
        await next_by(stream, started + 0.2)
    except asyncio.TimeoutError:
        assert loop.time() - started < 5
    else:
        raise AssertionError("no timeout")

asyncio.run(main())
print("IMPORTED", len(sys.modules))
"""


def test_py310_imports_every_serve_module(py310_env: Path, tmp_path: Path) -> None:
    proc = subprocess.run([str(py310_env / "bin" / "python"), "-c", IMPORT_ALL], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0 and "IMPORTED" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_py310_refuses_training_clearly(py310_env: Path) -> None:
    proc = subprocess.run([str(py310_env / "bin" / "anomaly"), "train", "--epochs", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "need Python 3.11" in proc.stderr, proc.stdout + proc.stderr


def _category(path: Path) -> str:
    return path.parts[-4]


def test_py310_server_scores_like_the_model(py310_env: Path, store, good_and_defect, tmp_path: Path) -> None:
    from edge_anomaly_client.sdk import AnomalyClient
    from service.runtime.engine import OnnxModel
    from service.runtime.imaging import decode_image

    grpc_port, http_port = free_port(), free_port()
    target, base = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    # A reader of the session's store that writes nothing to it (no served/hardware tags): the
    # other tests read that store after this one.
    env = {"PYTHONPATH": "", "PYTHONNOUSERSITE": "1", "ANOMALY_INTRA_OP_THREADS": "1",
           "ANOMALY_GRPC_PORT": str(grpc_port), "ANOMALY_HTTP_HOST": "127.0.0.1",
           "ANOMALY_GATE_WRITE_TAGS": "false"}
    server = ChildProcess([], tmp_path / "server.log", env,
                          command=[str(py310_env / "bin" / "anomaly"), "serve", "--tracking-uri",
                                   store.tracking_uri, "--host", "127.0.0.1", "--port", str(grpc_port),
                                   "--cache-dir", str(tmp_path / "cache"), "--http", "--http-port",
                                   str(http_port)])
    started = time.monotonic()
    proc = server.start()
    try:
        try:
            wait_grpc_serving(target, 120, proc)
            wait_http_ready(f"{base}/readyz", 60, proc)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\n{(tmp_path / 'server.log').read_text()[-4000:]}") from exc
        ready_s = time.monotonic() - started

        model = OnnxModel(store.build.onnx_path, store.build.metadata, intra_op_threads=1)
        images = [good_and_defect[0][0], good_and_defect[1][0]]
        with AnomalyClient(target) as client, httpx.Client(base_url=base, timeout=30) as http:
            for path in images:
                expected = model.score_image(decode_image(path.read_bytes()), _category(path))
                r = client.score(path, category=_category(path))
                assert r.model.name == store.model_name and r.model.version == store.version
                assert r.model.alias == "champion"
                # ONNX Runtime and numpy differ between the two interpreters' environments.
                assert r.score == pytest.approx(expected.score, rel=1e-4, abs=1e-5)
                assert r.is_anomalous == (r.score >= r.threshold)
                reply = http.post("/v1/score", content=path.read_bytes(),
                                  headers={"content-type": "image/png"},
                                  params={"category": _category(path)})
                assert reply.status_code == 200, reply.text
                body = reply.json()
                assert body["score"] == pytest.approx(r.score, rel=1e-6), body
                assert str(body["model"]["version"]) == store.version

        # The 3.10 client command, and the images' HEALTHCHECK script, run by the 3.10 interpreter.
        scored = subprocess.run([str(py310_env / "bin" / "anomaly"), "score", "--target", target,
                                 str(images[1])], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "COLUMNS": "200", "PYTHONPATH": ""})
        assert scored.returncode == 0 and images[1].name in scored.stdout, scored.stdout + scored.stderr
        health = subprocess.run([str(py310_env / "bin" / "python"), str(ROOT / "docker" / "healthcheck.py")],
                                capture_output=True, text=True, timeout=60, cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": "", "ANOMALY_GRPC_PORT": str(grpc_port)})
        assert health.returncode == 0 and "SERVING" in health.stdout, health.stdout + health.stderr
    finally:
        code = server.stop()
    assert code == 0, (tmp_path / "server.log").read_text()[-4000:]
    print(f"Python 3.10 server ready in {ready_s:.1f} s")
