"""The committed gRPC stubs are exactly what `grpc_tools.protoc` generates from the protos."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("proto", ["anomaly/v1/anomaly.proto", "anomaly/oip/inference.proto"])
def test_stubs_are_reproducible(tmp_path: Path, proto: str) -> None:
    src = tmp_path / "protos"
    (src / proto).parent.mkdir(parents=True)
    shutil.copy(ROOT / "protos" / proto, src / proto)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(src),
                    f"--python_out={src}", f"--pyi_out={src}", f"--grpc_python_out={src}",
                    str(src / proto)], check=True)
    stem = Path(proto).stem
    for name in (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"):
        generated = (src / proto).parent / name
        assert generated.read_bytes() == (ROOT / "protos" / proto).parent.joinpath(name).read_bytes(), name
