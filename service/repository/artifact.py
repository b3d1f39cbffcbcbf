"""A model version's artifact folder: reading it safely, and the local cache it lives in.

Reading (`read_model_dir`): `MLmodel` (YAML, safe loader) names the ONNX file of the
`onnx` flavor; `anomaly_model.json` holds the metadata; an optional `reference/` folder
holds reference images that a new version must score with finite outputs. Every path the
folder names must resolve inside it, and the folder may hold no symbolic links.

Caching (`ArtifactCache`): downloaded folders are kept by the SHA-256 of their content
(`blobs/<digest>/`, with a manifest of every file's hash), never by model name and version
alone. An index maps a registry version's identity (name, version, run id, source URI,
creation time) to its digest, so a registry that was recreated (a new "version 1") can
never be served a stale file. A cached folder is re-hashed before use; a mismatch (a torn
write, a changed file) means it is downloaded again. Downloads land in `staging/` and move
into place only when complete (each process stages in its own folder, so servers may share
a cache); staging folders are removed on any failure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import numpy as np
import yaml

from anomaly.durable import write_atomic
from anomaly.wire import IMAGE_SUFFIXES
from service.errors import InvalidInput, ModelLoadError
from service.runtime.metadata import METADATA_FILE, ModelMetadata

log = logging.getLogger(__name__)

MANIFEST = ".manifest.json"
REFERENCE_DIR = "reference"
MAX_REFERENCE_IMAGES = 64


def _inside(folder: Path, relative: str, what: str) -> Path:
    """`folder / relative`, refused unless it resolves inside `folder`."""
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ModelLoadError(f"{what} path {relative!r} points outside the model folder")
    return path


def read_model_dir(local_dir: Path) -> tuple[Path, ModelMetadata]:
    """Find the ONNX file (from MLmodel's onnx flavor) and the metadata in a model folder.

    Raises:
        ModelLoadError: when the folder is not an MLflow ONNX model with our metadata, its
            `MLmodel` or metadata cannot be parsed, or a path leaves the folder.
    """
    mlmodel = local_dir / "MLmodel"
    if not mlmodel.is_file():
        raise ModelLoadError(f"{local_dir} has no MLmodel file")
    try:
        spec = yaml.safe_load(mlmodel.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"MLmodel is not valid YAML: {str(exc)[:300]}") from exc
    if not isinstance(spec, dict):
        raise ModelLoadError("MLmodel is not a YAML mapping")
    flavors = spec.get("flavors")
    onnx_conf = flavors.get("onnx") if isinstance(flavors, dict) else None
    if not isinstance(onnx_conf, dict):
        raise ModelLoadError("artifact is not an MLflow ONNX model (MLmodel has no onnx flavor)")
    data = onnx_conf.get("data", "model.onnx")
    if not isinstance(data, str):
        raise ModelLoadError(f"MLmodel's onnx flavor names no file (data: {data!r})")
    onnx_path = _inside(local_dir, data, "ONNX model")
    if not onnx_path.is_file():
        raise ModelLoadError(f"MLmodel names {data!r}, which is not in the artifact")
    for relative in (METADATA_FILE, f"extra_files/{METADATA_FILE}"):
        candidate = _inside(local_dir, relative, "metadata")
        if candidate.is_file():
            try:
                return onnx_path, ModelMetadata.load(candidate)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ModelLoadError(f"invalid {METADATA_FILE}: {str(exc)[:300]}") from exc
    raise ModelLoadError(f"artifact has no {METADATA_FILE}")


def reference_inputs(local_dir: Path, prepare_encoded: Callable[[bytes], np.ndarray]) -> list[np.ndarray]:
    """The version's reference images (`reference/**`), decoded and preprocessed by the
    serving path (`OnnxModel.prepare_encoded`), at most `MAX_REFERENCE_IMAGES`; none when
    there is no folder.

    Raises:
        ModelLoadError: a reference image cannot be decoded.
    """
    folder = local_dir / REFERENCE_DIR
    if not folder.is_dir():
        return []
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    inputs = []
    for path in paths[:MAX_REFERENCE_IMAGES]:
        try:
            inputs.append(prepare_encoded(path.read_bytes()))
        except InvalidInput as exc:
            raise ModelLoadError(f"reference image {path.relative_to(local_dir)}: {exc.message}") from exc
    return inputs


def manifest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` (relative POSIX paths), the manifest excluded.

    Raises:
        ModelLoadError: the folder holds a symbolic link or something that is not a file.
    """
    files: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise ModelLoadError(f"artifact holds a symbolic link ({rel}); refused")
        if path.is_dir() or rel == MANIFEST:
            continue
        if not path.is_file():
            raise ModelLoadError(f"artifact holds {rel}, which is not a regular file; refused")
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        files[rel] = digest.hexdigest()
    return files


def content_digest(files: dict[str, str]) -> str:
    """One SHA-256 over a manifest: the identity of a folder's content."""
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ArtifactCache:
    """Content-addressed local copies of model version folders (see the module docstring).

    Args:
        root: the cache folder (`ANOMALY_CACHE_DIR`).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.index = self.root / "index"
        self.staging = self.root / "staging" / str(os.getpid())  # servers may share a cache
        for left in (self.root / "staging").glob("*"):  # left over by processes that crashed
            if not (left.name.isascii() and left.name.isdigit()) or not _alive(int(left.name)):
                shutil.rmtree(left, ignore_errors=True)

    def _index_path(self, name: str, version: str) -> Path:
        return self.index / quote(name, safe="") / f"{quote(version, safe='')}.json"

    def lookup(self, name: str, version: str, identity: dict[str, str]) -> tuple[Path, str] | None:
        """The cached folder and digest of this exact registry version, verified, or None."""
        try:
            entry = json.loads(self._index_path(name, version).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("identity") != identity:
            return None
        digest = str(entry.get("digest", ""))
        folder = self.blobs / digest
        if not digest or not folder.is_dir():
            return None
        try:
            recorded = json.loads((folder / MANIFEST).read_text())
            if recorded == manifest(folder) and content_digest(recorded) == digest:
                return folder, digest
        except (OSError, ValueError, ModelLoadError):
            pass
        log.warning("cached copy of %s/%s does not match its manifest; downloading it again", name, version)
        shutil.rmtree(folder, ignore_errors=True)
        return None

    def store(self, name: str, version: str, identity: dict[str, str],
              download: Callable[[Path], Path]) -> tuple[Path, str]:
        """Download into staging with `download(dest) -> folder`, hash, and move into place.

        Returns:
            The cached folder and its content digest.

        Raises:
            Whatever `download` raises; ModelLoadError for content that cannot be cached
            (no MLmodel, symbolic links). Staging is removed either way.
        """
        self.staging.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{quote(name, safe='')}-{version}-", dir=self.staging))
        try:
            local = download(staging)
            if not (local / "MLmodel").is_file():
                raise ModelLoadError(f"the artifact of {name}/{version} holds no MLmodel file")
            files = manifest(local)
            digest = content_digest(files)
            write_atomic(local / MANIFEST, json.dumps(files, indent=1))
            target = self.blobs / digest
            if not target.is_dir():
                self.blobs.mkdir(parents=True, exist_ok=True)
                try:
                    local.rename(target)  # atomic: a half-downloaded folder is never used
                except OSError:  # the same content arrived concurrently
                    if not target.is_dir():
                        raise
            write_atomic(self._index_path(name, version), json.dumps({"identity": identity,
                                                                      "digest": digest}))
            return target, digest
        finally:
            shutil.rmtree(staging, ignore_errors=True)
