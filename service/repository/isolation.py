"""Isolated model loading: a new version is first loaded and validated in a throw-away
child process, so an ONNX file that crashes or hangs ONNX Runtime, or whose shapes would
exhaust memory, is refused with the reason while the server keeps serving.

The child (`python -m service.repository.isolation FOLDER --memory-mb N`) limits its own address space,
loads the folder exactly as the server would (on the CPU provider, one thread), runs the
validation inputs (flat grays, noise, the version's reference images, the images of its
reproduction record, `service.repository.reproduction`) and prints one JSON
line: `{"ok": true}` or `{"ok": false, "error": "…"}`. The parent (`probe_in_child`) also
bounds it in time and turns a crash (signal), a timeout or an allocation failure into a
`ModelLoadError` naming what happened.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from service.errors import ModelLoadError

_THREADS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_MEMORY_WORDS = ("alloc", "memory", "bad_alloc")


def probe_in_child(folder: Path, *, memory_mb: int, timeout_s: float) -> None:
    """Load and validate the model in `folder` in a child process.

    Raises:
        ModelLoadError: the child found the model broken, crashed, ran out of its memory
            limit or did not finish within `timeout_s`.
    """
    env = {**os.environ, **{k: "1" for k in _THREADS_ENV}}
    cmd = [sys.executable, "-m", "service.repository.isolation", str(folder), "--memory-mb", str(memory_mb)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise ModelLoadError(f"loading and validating the model did not finish within {timeout_s:.0f}s in "
                             "an isolated process (does the graph hang ONNX Runtime?); refused") from exc
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise ModelLoadError(f"ONNX Runtime crashed ({name}) loading or validating the model in an isolated "
                             f"process (memory limit {memory_mb} MB); refused")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ModelLoadError(f"the isolated model check exited with code {proc.returncode}: "
                             f"{tail[0][:300]}") from None
    if not answer.get("ok"):
        error = str(answer.get("error", "unknown error"))
        if any(w in error.lower() for w in _MEMORY_WORDS):
            error += f" (the isolated check may use {memory_mb} MB: ANOMALY_LOAD_PROBE_MEMORY_MB)"
        raise ModelLoadError(error)


def _check(folder: Path) -> None:
    from service.repository.artifact import read_model_dir, reference_inputs
    from service.repository.reproduction import ReproductionError, measure_record
    from service.runtime.engine import OnnxModel

    onnx_path, metadata = read_model_dir(folder)
    model = OnnxModel(onnx_path, metadata, providers=["CPUExecutionProvider"], intra_op_threads=1,
                      spinning=False)
    model.validate(reference_inputs(folder, model.prepare_encoded))
    try:  # the reproduction record's images, here first: bounded in time and memory
        measure_record(model, folder)
    except ReproductionError as exc:
        raise ModelLoadError(f"its reproduction record is unusable: {exc}") from exc


def main(argv: list[str]) -> int:
    """Entry point of the child: returns 0 when the model is fine, 3 when it is not."""
    folder = Path(argv[0])
    memory_mb = int(argv[argv.index("--memory-mb") + 1]) if "--memory-mb" in argv else 0
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        _check(folder)
    except MemoryError:
        print(json.dumps({"ok": False, "error": "out of memory while loading or validating the model"}))
        return 3
    except Exception as exc:  # any failure is an answer, not a crash
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        print(json.dumps({"ok": False, "error": str(message)[:1000]}))
        return 3
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
