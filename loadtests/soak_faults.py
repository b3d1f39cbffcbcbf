"""The soak's fail-safe faults, injected from outside the server (`loadtests.soak`).

- `SpoolDisk`: the inspection spool on a small disk of its own (a tmpfs, as root) that is
  filled to the last byte (ENOSPC) and emptied again; where mounting is not allowed, a
  file-size limit set on the running server processes (`prlimit`, EFBIG) stands in.
- `damage_spool`: a damaged record and a torn tail written into a spool segment while the
  server is down (a bad sector, a crash mid-write).
- `IdleWatches`: many health `Watch` streams opened and left idle (a monitoring agent, a
  misconfigured probe).
- `HealthProbe`: health `Check` every half second; counts the checks that did not answer
  while the server was meant to be up.
- `kill_tree`: SIGKILL of the `--processes` supervisor, then the children it leaves
  running (none should be).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc

FILLER = "filler.bin"
DAMAGED = b"0badf00d this line is a damaged record: its checksum does not match\n"
TORN = b'5eed5eed {"table": "inspections", "request_id": "torn-by-a-cr'


class SpoolDisk:
    """A small disk for the spool folders: `fill` makes every write fail, `free` undoes it.

    Args:
        folder: where the spool folders live (mounted over when it can be).
        size_mb: the tmpfs size.
    """

    def __init__(self, folder: Path, size_mb: int = 64) -> None:
        self.folder = Path(folder)
        self.size_mb = size_mb
        self.mounted = False
        self.limited: list[int] = []

    def mount(self) -> str:
        """Mount the tmpfs; returns how the disk will be filled (for the report)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs",
                                 str(self.folder)], capture_output=True, text=True)
        self.mounted = result.returncode == 0
        if self.mounted:
            return f"a {self.size_mb} MB tmpfs filled to ENOSPC"
        why = result.stderr.strip()[:80]
        return f"a file-size limit on the server processes (EFBIG; mount refused: {why})"

    def fill(self, pids: list[int]) -> None:
        """Make the spool's next write fail: the disk full, or a file-size limit of 1 byte."""
        if self.mounted:
            with contextlib.suppress(OSError), (self.folder / FILLER).open("wb") as f:
                chunk = b"\0" * (1 << 20)
                while True:
                    f.write(chunk)
                    f.flush()
            return
        for pid in pids:  # Python ignores SIGXFSZ: the write fails with EFBIG instead
            with contextlib.suppress(OSError):
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
                self.limited.append(pid)

    def free(self) -> None:
        """Room again."""
        if self.mounted:
            (self.folder / FILLER).unlink(missing_ok=True)
        for pid in self.limited:
            with contextlib.suppress(OSError):
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        self.limited = []

    def unmount(self) -> None:
        """Unmount (the spools on it are gone with it)."""
        self.free()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)
            self.mounted = False


def damage_spool(folders: list[Path]) -> str:
    """Write a damaged record after the middle record of the newest non-empty segment, and a
    torn record at its end; returns what was damaged (for the progress log). Neither was
    ever acknowledged: every acknowledged record must still reach the database."""
    segments = sorted((p for folder in folders for p in folder.glob("*.seg") if p.stat().st_size),
                      key=lambda p: p.stat().st_mtime)
    if not segments:
        return "no spool segment to damage"
    path = segments[-1]
    lines = path.read_bytes().splitlines(keepends=True)
    middle = len(lines) // 2
    path.write_bytes(b"".join(lines[:middle]) + DAMAGED + b"".join(lines[middle:]) + TORN)
    return (f"{path.parent.name}/{path.name}: a damaged record after record {middle} of {len(lines)}, "
            "a torn tail")


def set_aside(folders: list[Path]) -> int:
    """Damaged records the spools set aside (`damaged-records.jsonl`)."""
    n = 0
    for folder in folders:
        with contextlib.suppress(OSError):
            lines = (folder / "damaged-records.jsonl").read_text().splitlines()
            n += sum(1 for line in lines if line.strip())
    return n


class IdleWatches:
    """`n` health Watch streams held open and idle until `close`."""

    def __init__(self, target: str, n: int) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.channel = grpc.insecure_channel(target)
        stub = health_pb2_grpc.HealthStub(self.channel)
        self.calls = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=300) for _ in range(n)]
        self.refused = 0
        self.threads = [threading.Thread(target=self._hold, args=(call,), daemon=True) for call in self.calls]
        for t in self.threads:
            t.start()

    def _hold(self, call: grpc.Call) -> None:
        try:
            for _ in call:  # type: ignore[attr-defined]
                pass
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.refused += 1

    def close(self) -> None:
        """Cancel every stream."""
        for call in self.calls:
            call.cancel()
        for t in self.threads:
            t.join(5)
        self.channel.close()


class HealthProbe:
    """Health `Check` every `every_s` while `up` is set; failures are counted."""

    def __init__(self, target: str, up: threading.Event, every_s: float = 0.5) -> None:
        self.target, self.up, self.every_s = target, up, every_s
        self.checks = self.failures = 0
        self.first_failure = ""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Start probing."""
        self.thread.start()

    def _run(self) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.stop.wait(self.every_s):
                if not self.up.is_set():
                    continue
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    ok, why = True, ""
                except grpc.RpcError as exc:
                    ok, why = False, f"{exc.code().name}: {exc.details()}"
                if self.up.is_set():  # a restart that began meanwhile does not count
                    self.checks += 1
                    if not ok:
                        self.failures += 1
                        self.first_failure = self.first_failure or why

    def close(self) -> None:
        """Stop probing."""
        self.stop.set()
        self.thread.join(5)


def children(pid: int) -> list[int]:
    """The child process ids of `pid`."""
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int, wait_s: float = 15.0) -> int:
    """SIGKILL `pid` (a supervisor); wait up to `wait_s` for its children to stop by
    themselves; SIGKILL those still running and return how many there were (orphans)."""
    import psutil

    kids = children(pid)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(psutil.pid_exists(k) and _alive(k) for k in kids):
        time.sleep(0.2)
    orphans = [k for k in kids if psutil.pid_exists(k) and _alive(k)]
    for k in orphans:
        with contextlib.suppress(ProcessLookupError):
            os.kill(k, signal.SIGKILL)
    return len(orphans)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
