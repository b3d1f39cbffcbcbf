"""The committed gRPC stubs are exactly what `grpc_tools.protoc` generates from the proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("anomaly_pb2.py", "anomaly_pb2.pyi", "anomaly_pb2_grpc.py")


def test_stubs_are_reproducible(tmp_path: Path) -> None:
    src = tmp_path / "protos"
    (src / "anomaly" / "v1").mkdir(parents=True)
    shutil.copy(ROOT / "protos/anomaly/v1/anomaly.proto", src / "anomaly/v1/anomaly.proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(src),
                    f"--python_out={src}", f"--pyi_out={src}", f"--grpc_python_out={src}",
                    str(src / "anomaly/v1/anomaly.proto")], check=True)
    for name in GENERATED:
        assert (src / "anomaly/v1" / name).read_bytes() == \
            (ROOT / "protos/anomaly/v1" / name).read_bytes(), name
