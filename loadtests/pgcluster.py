"""A throw-away PostgreSQL cluster for fault injection: `initdb` + `pg_ctl` on a free
loopback port, which the caller may stop and start again (a database outage, for real).

Used by the soak (`anomaly soak`) and the tests. Needs PostgreSQL's server binaries on the
PATH (`initdb`, `pg_ctl`); run as root, they run as the `postgres` user (PostgreSQL refuses
to run as root).
"""

from __future__ import annotations

import contextlib
import getpass
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from loadtests.launch import free_port

USER = "postgres"


class PostgresCluster:
    """One cluster in a fresh temporary folder (data directory, socket, log), listening on
    127.0.0.1:`port` with trust authentication; `remove` deletes it all. The folder is made
    under the system's temporary directory, which the `postgres` user can reach (a test's
    own temporary folder, private to root, it could not)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="anomaly-pg-"))
        self.pgdata = self.folder / "pgdata"
        self.port = free_port()
        self.url = f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []

    def init(self) -> None:
        """Create the cluster (`initdb`)."""
        if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not on the PATH")
        if getpass.getuser() == "root":
            shutil.chown(self.folder, USER)
            self._as = ["runuser", "-u", USER, "--"]
        self._run(["initdb", "-D", str(self.pgdata), "-U", USER, "--auth=trust", "-E", "UTF8"], 120)

    def _run(self, args: list[str], timeout: float, check: bool = True) -> None:
        proc = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {proc.stderr.strip()[-500:]}")

    def start(self) -> None:
        """Start it and wait until it accepts connections."""
        self._run(["pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-l", str(self.folder / "pg.log"),
                   "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "start"], 90)

    def stop(self) -> None:
        """Stop it (fast shutdown: connections are cut, as in an outage)."""
        self._run(["pg_ctl", "-D", str(self.pgdata), "-w", "-m", "fast", "stop"], 90, check=False)

    def remove(self) -> None:
        """Stop it and delete its files."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A started `PostgresCluster`, removed on exit."""
    cluster = PostgresCluster()
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.remove()
