"""What each watched alias last served: the promotion gate's durable memory.

The gate is a property of what serves, not of a swap: after a crash, a rollout or a child
restart of `--processes`, a server must not serve a version (or threshold tags) that no
gate passed. So every time a watched alias starts serving a version, or accepts a threshold
change, the server writes down here which version it serves, the MLflow run holding that
version's reference set, and the threshold tags it accepted. At start-up it reads this back
and judges whatever the alias names now against it, as a live move would be judged
(`service.repository.model_repository`).

One small JSON file per (registry, model, alias) under `<cache_dir>/served/`, replaced
atomically and fsync'd, so a power cut leaves the old record or the new one. The processes
of `--processes` share the cache folder, so they share the memory: given the same record and
the same registry, each child reaches the same verdict and serves the same version.

A record that cannot be read (a damaged disk, a hand edit) is reported at ERROR and treated
as absent. Servers also write the version they swap in to the registered model's tag
`served.<alias>`: a server whose cache is empty (a new pod, an `emptyDir` cache) takes that
as its record. With neither, the server starts as a first start: the version the alias
names is judged against its own reference set and the plant's parts, and a version tagged
`gate.status=refused` never serves.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from anomaly.durable import write_atomic

log = logging.getLogger(__name__)
FOLDER = "served"
SERVED_TAG_PREFIX = "served."  # registered-model tag `served.<alias>` = the version a server last swapped in


@dataclass(frozen=True)
class Served:
    """One watched alias's last served version."""

    name: str
    alias: str
    version: str
    run_id: str  # the MLflow run holding its reference set
    thresholds: dict[str, str] = field(default_factory=dict)  # the `threshold.*` tags it served with
    at: str = ""  # when it started serving (UTC, ISO 8601)


class ServedMemory:
    """The durable record of what each watched alias of one registry last served.

    Args:
        cache_dir: the server's model cache folder (the memory lives in `served/` inside it).
        tracking_uri: the registry it belongs to (a cache shared by two registries keeps
            their aliases apart).
    """

    def __init__(self, cache_dir: Path, tracking_uri: str) -> None:
        self.folder = Path(cache_dir) / FOLDER
        self.tracking_uri = tracking_uri

    def path(self, name: str, alias: str) -> Path:
        """The file holding `name@alias`'s record."""
        key = hashlib.sha256(json.dumps([self.tracking_uri, name, alias]).encode()).hexdigest()[:20]
        return self.folder / f"{key}.json"

    def get(self, name: str, alias: str) -> Served | None:
        """The alias's last served version, or None when none is recorded (or readable)."""
        path = self.path(name, alias)
        try:
            data = json.loads(path.read_text())
            served = Served(**{k: data[k] for k in ("name", "alias", "version", "run_id")},
                            thresholds={str(k): str(v) for k, v in dict(data.get("thresholds", {})).items()},
                            at=str(data.get("at", "")))
            if (served.name, served.alias) != (name, alias) or not str(served.version).isdigit():
                raise ValueError(f"it names {served.name}@{served.alias} version {served.version!r}")
            return served
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("the record of what %s@%s last served (%s) cannot be read (%s); starting as a first "
                      "start would", name, alias, path, exc)
            return None

    def put(self, served: Served) -> None:
        """Record what an alias serves now (atomically; failures are logged, not raised: the
        server keeps serving, and a later swap or restart writes it again)."""
        record = asdict(served)
        record["at"] = served.at or datetime.now(timezone.utc).isoformat()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path(served.name, served.alias), json.dumps(record, indent=1))
        except OSError as exc:
            log.error("could not record that %s@%s serves version %s (%s): after a restart the server "
                      "will judge from an older record", served.name, served.alias, served.version, exc)
