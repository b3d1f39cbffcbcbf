"""`anomaly int8-study`: speed and accuracy of each INT8 weight scheme per CPU (issue 36).

The same INT8 graph computes different numbers on different x86 CPUs. Without VNNI (AVX2,
or AVX-512 F/BW without VNNI) ONNX Runtime's MLAS multiplies uint8 activations by int8
weights with `vpmaddubsw`, which adds two products into a *saturating* 16-bit intermediate
(255 × 127 × 2 > 32767); VNNI's `vpdpbusd` accumulates in 32 bits. A model quantized and
evaluated on a VNNI machine can therefore lose points on an AVX2-only plant PC.

This study measures that for the weight schemes of `registry.variants.ptq.SCHEMES`
(`u8s8-rr`, `u8s8`, `u8u8`) and the symmetric `s8s8` of its `tensorrt` target:

- **kernel check**: one 3×3 Conv with large weights and activations, quantized in each
  scheme, run natively and emulated: shows whether the emulated CPU computes different
  integers at all, before any model is involved;
- **schemes**: each architecture's registered FP32 version (alias `<arch>-fp32`) is
  quantized in every scheme (real images, MinMax, as the demo's PTQ) and evaluated through
  the serving engine natively (this CPU) and, in a child process, under QEMU user-mode
  emulation of an AVX2 CPU without VNNI (`qemu-x86_64 -cpu Haswell`, whose TCG implements
  `vpmaddubsw`'s saturation, so MLAS picks its AVX2 kernels there); batch-1 p50 latency is
  timed natively, the models of an architecture interleaved;
- **registered**: every registered `<arch>-ptq-int8` / `<arch>-qat-int8` version, natively
  and emulated, against its FP32 parent (tag `parent_version`).

Emulation is slow (about 1.5-2.5 s per image for an INT8 STFPM, 5-7 s for US; FP32 40-80 s
for STFPM, TCG running AVX2's FMA in soft-float), so the emulated column uses a deterministic
subset of the test images (`test_subset`), and the native column it is compared with uses the
same subset.
The float-heavy rows (`PROBE_SCHEMES`: FP32, and s8s8, whose convolutions the CPU provider
leaves in float) are emulated on the subset's first `probe` images only: their score change.
Timings under emulation mean nothing and are not reported. The results go to the
`## INT8 across CPUs` section of docs/results.md.

Child commands (run under `qemu-x86_64 -cpu Haswell <python> -m studies.int8_cpus …`):
`evaluate <model dir>... <data root> [--images N] [--first K]` prints one JSON line per
model folder (an MLflow model folder, or a folder with `model.onnx` and
`anomaly_model.json`); `conv-check <dir>` prints the kernel check's outputs as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from registry.data.mvtec import Sample

log = logging.getLogger(__name__)

HEADING = "## INT8 across CPUs"
# Rows of the schemes table: FP32 for reference, then the CPU schemes of
# `registry.variants.ptq.SCHEMES` and the `tensorrt` target's symmetric s8s8.
SCHEMES = ("fp32", "u8s8-rr", "u8s8", "u8u8", "s8s8")
SCHEME_NOTES = {
    "fp32": "the exported FP32 graph",
    "u8s8-rr": "u8 activations × s8 weights on the 7-bit grid [-64, 64] (ORT `reduce_range`; the default)",
    "u8s8": "u8 activations × s8 weights on the full 8-bit grid (the PTQ before issue 36)",
    "u8u8": "u8 activations × u8 weights (zero point 128)",
    "s8s8": "s8 activations × s8 weights, both symmetric (`target=\"tensorrt\"`, run on the CPU provider)",
}
QEMU = "qemu-x86_64"
QEMU_CPU = "Haswell"
REGISTERED = ("ptq-int8", "qat-int8")
DEFAULT_EMULATED_IMAGES = 32
DEFAULT_PROBE = 1
# Emulated on the probe only: these run mostly in float (FP32; s8s8, whose convolutions the CPU
# provider leaves as float), which TCG executes in soft-float at tens of seconds per image.
PROBE_SCHEMES = ("fp32", "s8s8")
QEMU_NOISE = "TCG doesn't support requested feature"  # one warning per CPUID bit Haswell lists
KEPT_BEGIN = "<!-- kept by anomaly int8-study: -->"
KEPT_END = "<!-- end of kept text -->"
DEFAULT_KEPT = "**The demo of record**: see below."
# The report that started it (issue 36): image AUROC, u8s8 with 8-bit weights, on a 2-core
# AMD EPYC with AVX2 and no VNNI.
ISSUE_TABLE = {"stfpm": (0.968, 0.824, 0.828), "rd": (0.949, 0.893, 0.906), "us": (0.971, 0.815, 0.825)}
Progress = Callable[[str], None]


# --------------------------------------------------------------------------- evaluation


@dataclass
class Accuracy:
    """Metrics of one model on one list of test images, and its raw image scores."""

    image_auroc: float
    pixel_auroc: float
    images: int
    seconds: float
    scores: list[float] = field(default_factory=list, repr=False)


def test_subset(samples: list[Sample], n: int) -> list[Sample]:
    """A deterministic subset of about `n` test samples (all of them when `n <= 0` or
    `n >= len(samples)`): from every (category, good/defective) group its share of `n` (at
    least 2), evenly spaced over the group (so every defect type is represented), in the
    original order."""
    if n <= 0 or n >= len(samples):
        return list(samples)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.category, s.label), []).append(i)
    keep: set[int] = set()
    for idx in groups.values():
        k = min(len(idx), max(2, round(n * len(idx) / len(samples))))
        keep.update(idx[j] for j in np.linspace(0, len(idx) - 1, k).round().astype(int))
    return [s for i, s in enumerate(samples) if i in keep]


def accuracy(onnx_path: Path | str, metadata: Any, samples: list[Sample], warmup: bool = True) -> Accuracy:
    """Image and pixel AUROC (means over categories) through the serving engine, scored as
    `registry.evaluate.evaluate` scores (`score_samples`: PNG bytes → `OnnxModel`, batch 1),
    without its throughput and AUPRO passes (which would dominate under emulation). `warmup`:
    one dummy inference first (it changes no number; the emulated child skips it, since
    one inference of an FP32 model takes minutes there)."""
    import warnings

    from registry.evaluate import _mask, score_samples
    from registry.metrics import auroc
    from service.runtime.engine import OnnxModel

    t0 = time.perf_counter()
    model = OnnxModel(onnx_path, metadata)
    if warmup:
        model.warmup()
    scores, maps, _ = score_samples(model, samples)
    labels = np.array([s.label for s in samples])
    cats = np.array([s.category for s in samples])
    image, pixel = [], []
    for cat in sorted(set(cats)):
        sel = np.flatnonzero(cats == cat)
        image.append(auroc(labels[sel], scores[sel]))
        masks = np.stack([_mask(samples[i], model.metadata.map_size) for i in sel])
        pixel.append(auroc(masks, maps[sel]))
    with warnings.catch_warnings():  # a probe of a few images may hold one class only: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        image_auroc, pixel_auroc = float(np.nanmean(image)), float(np.nanmean(pixel))
    return Accuracy(image_auroc, pixel_auroc, len(samples), time.perf_counter() - t0,
                    [float(s) for s in scores])


def load_model_dir(folder: Path) -> tuple[Path, Any]:
    """(ONNX path, `ModelMetadata`) of an MLflow model folder or of a plain folder with
    `model.onnx` and `anomaly_model.json`."""
    from service.repository.artifact import read_model_dir
    from service.runtime.metadata import ModelMetadata

    if (folder / "MLmodel").is_file():
        return read_model_dir(folder)
    return folder / "model.onnx", ModelMetadata.load(folder)


def file_digest(path: Path) -> str:
    """SHA-256 of a file (identical ONNX files are evaluated once)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- emulation


def qemu_version() -> str | None:
    """`QEMU 7.2.22`-style version of the `qemu-x86_64` on PATH, or None when there is none."""
    exe = shutil.which(QEMU)
    if exe is None:
        return None
    try:
        first = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    words = first.split()
    return f"QEMU {words[2]}" if len(words) > 2 and words[1] == "version" else "QEMU"


def _emulated_child(args: list[str], timeout_s: float) -> Iterator[dict[str, Any]]:
    """Run `python -m studies.int8_cpus <args>` under `qemu-x86_64 -cpu Haswell`, yielding the
    JSON objects of its stdout lines as they arrive.

    Raises:
        FileNotFoundError: no `qemu-x86_64` on PATH.
        RuntimeError: the child failed or ran past `timeout_s`.
    """
    exe = shutil.which(QEMU)
    if exe is None:
        raise FileNotFoundError(QEMU)
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    cmd = [exe, "-cpu", QEMU_CPU, sys.executable, "-m", "studies.int8_cpus", *args]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        deadline = time.monotonic() + timeout_s
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("{"):
                    yield json.loads(line)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"emulated child ran past {timeout_s:.0f} s: {' '.join(args[:2])}")
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            err.seek(0)
            tail = "\n".join(x for x in err.read().splitlines() if QEMU_NOISE not in x)[-2000:]
            raise RuntimeError(f"emulated child exited {proc.returncode}: {tail}")


def emulated_accuracy(model_dirs: list[Path], data_root: Path, n_images: int, first: int = 0,
                      timeout_s: float = 7200.0) -> Iterator[tuple[Path, Accuracy]]:
    """Evaluate model folders in one child process under `qemu-x86_64 -cpu Haswell` (AVX2,
    no VNNI) on `test_subset(…, n_images)` (its first `first` images when `first > 0`),
    yielding each folder's `Accuracy` as it arrives.

    Raises:
        FileNotFoundError: no `qemu-x86_64` on PATH.
        RuntimeError: the child failed or printed no result for some folder.
    """
    args = ["evaluate", *map(str, model_dirs), str(data_root),
            "--images", str(n_images), "--first", str(first)]
    seen = 0
    for row in _emulated_child(args, timeout_s):
        seen += 1
        yield Path(row.pop("model_dir")), Accuracy(**row)
    if seen != len(model_dirs):
        raise RuntimeError(f"emulated evaluation answered {seen} of {len(model_dirs)} models")


# --------------------------------------------------------------------------- kernel check


@dataclass
class KernelCheck:
    """One scheme of the single-Conv check: errors as % of the FP32 output's largest |value|."""

    scheme: str
    native_vs_emulated: float  # largest |native − emulated|
    native_error: float  # largest |native − FP32 native|
    emulated_error: float  # largest |emulated − FP32 native|


def _conv_model(folder: Path) -> None:
    """A 64→64-channel 3×3 Conv whose centre taps and inputs are large: u8 activations near 255
    meet s8 weights near ±127, the case that saturates `vpmaddubsw`. Writes `fp32.onnx`, one
    `<scheme>.onnx` per scheme (`registry.variants.ptq.quantize_int8`) and `x.npy`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from registry.variants.calibration import ArrayReader
    from registry.variants.ptq import quantize_int8

    rng = np.random.default_rng(0)
    c = 64
    w = rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.2
    w[:, :, 1, 1] *= 4
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")], "conv-check",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, c, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, c, 16, 16])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, folder / "fp32.onnx")
    calib = rng.random((16, c, 16, 16), dtype=np.float32) * 4
    np.save(folder / "x.npy", calib[:1])
    for scheme in SCHEMES[1:]:
        target, cpu = ("tensorrt", "u8s8-rr") if scheme == "s8s8" else ("cpu", scheme)
        quantize_int8(folder / "fp32.onnx", folder / f"{scheme}.onnx", ArrayReader(calib, "x"),
                      target=target, scheme=cpu, weight_preparation=False)


def _run_conv(folder: Path) -> dict[str, list[float]]:
    import onnxruntime as ort

    x = np.load(folder / "x.npy")
    out = {}
    for scheme in SCHEMES:
        name = "fp32" if scheme == "fp32" else scheme
        sess = ort.InferenceSession(str(folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        out[scheme] = sess.run(None, {"x": x})[0].ravel().tolist()
    return out


def kernel_check(work: Path, emulate: bool) -> list[KernelCheck]:
    """The single-Conv check, natively and (when `emulate`) under QEMU."""
    folder = work / "conv-check"
    folder.mkdir(parents=True, exist_ok=True)
    _conv_model(folder)
    native = {k: np.asarray(v) for k, v in _run_conv(folder).items()}
    emulated = ({k: np.asarray(v) for k, v in next(_emulated_child(["conv-check", str(folder)], 600)).items()}
                if emulate else {})
    scale = float(np.abs(native["fp32"]).max()) / 100
    nan = float("nan")
    return [KernelCheck(
        s, float(np.abs(native[s] - emulated[s]).max()) / scale if emulated else nan,
        float(np.abs(native[s] - native["fp32"]).max()) / scale,
        float(np.abs(emulated[s] - native["fp32"]).max()) / scale if emulated else nan) for s in SCHEMES]


def _child(argv: list[str]) -> int:
    """The child commands (`evaluate`, `conv-check`); see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m studies.int8_cpus")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="image/pixel AUROC of model folders, one JSON line each")
    ev.add_argument("model_dirs", nargs="+", type=Path)
    ev.add_argument("data", type=Path, help="dataset root (MVTec AD layout)")
    ev.add_argument("--images", type=int, default=0, help="deterministic test subset (0 = all)")
    ev.add_argument("--first", type=int, default=0, help="only the subset's first K images (0 = all)")
    cc = sub.add_parser("conv-check", help="outputs of the single-Conv check, as JSON")
    cc.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "conv-check":
        print(json.dumps(_run_conv(args.folder)), flush=True)
        return 0
    from registry.data.mvtec import load_test_split

    samples = test_subset(load_test_split(args.data), args.images)
    samples = samples[:args.first] if args.first > 0 else samples
    for folder in args.model_dirs:
        onnx_path, metadata = load_model_dir(folder)
        acc = accuracy(onnx_path, metadata, samples, warmup=False)
        print(json.dumps({"model_dir": str(folder), **asdict(acc)}), flush=True)
    return 0


# --------------------------------------------------------------------------- the study


@dataclass
class CpuLabels:
    """Which CPU each column came from."""

    native: str  # one line: model name, features, ORT version
    native_short: str
    emulated: str | None  # None: not measured (no qemu-x86_64, or --no-emulate)
    emulated_short: str = f"QEMU -cpu {QEMU_CPU}: AVX2, no VNNI"


@dataclass
class SchemeRow:
    """One architecture in one scheme (FP32 included)."""

    architecture: str
    scheme: str
    fp32_version: str
    digest: str
    native_all: Accuracy  # every test image, native
    native: Accuracy  # the compared subset, native
    emulated: Accuracy | None  # the subset (FP32: its first `probe` images), emulated
    latency_ms_p50: float = float("nan")
    model_mb: float = float("nan")
    quantize_s: float = 0.0

    @property
    def score_shift(self) -> float:
        """Largest |emulated − native| image score over the emulated images, as a % of the
        native subset's score range (NaN when not emulated)."""
        if self.emulated is None:
            return float("nan")
        b = np.asarray(self.emulated.scores)
        a = np.asarray(self.native.scores)
        return 100 * float(np.max(np.abs(a[:len(b)] - b)) / max(float(np.ptp(a)), 1e-12))


@dataclass
class RegisteredRow:
    """One registered INT8 version and its FP32 parent."""

    architecture: str
    variant: str
    version: str
    scheme: str  # the `int8_scheme` run parameter, or "not recorded"
    parent_version: str
    native: Accuracy
    emulated: Accuracy | None
    parent_native: Accuracy | None
    parent_emulated: Accuracy | None
    built_on: str  # the `measured.cpu` tag, if any
    same_as: str = ""  # the scheme row whose ONNX file is byte-identical, if any


def cpu_labels(emulate: bool) -> CpuLabels:
    """Labels for this host (`service.runtime.hardware.this_host`) and the emulated CPU."""
    from service.runtime.hardware import this_host

    host = this_host()
    f = set(host.features)
    isa = ("AVX-512 VNNI" if "avx512_vnni" in f else "AVX-VNNI" if "avx_vnni" in f
           else "AVX-512, no VNNI" if "avx512bw" in f else "AVX2, no VNNI" if "avx2" in f else host.isa_class)
    cpu = host.cpu.replace("(R)", "").replace("(TM)", "").replace(" CPU", "").split(" @ ")[0]
    version = qemu_version() if emulate else None
    emulated = None
    if version is not None:
        emulated = (f"{version} TCG (user mode), `-cpu {QEMU_CPU}`: AVX2, no VNNI, emulated on the "
                    f"{cpu} above, the same ONNX Runtime {host.ort} wheel (inside, /proc/cpuinfo still "
                    "lists the host's flags, so `service.runtime.hardware` cannot tell; MLAS reads CPUID, "
                    "which QEMU emulates)")
    return CpuLabels(host.describe(), f"{cpu}: {isa}", emulated)


def _download(model_name: str, ref: str, dst: Path) -> tuple[Path, Path, Any, Any] | None:
    """(folder, ONNX path, metadata, model version) of `models:/<name>@<alias>` (or `/<version>`
    when `ref` is a number), or None when there is no such alias."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        mv = client.get_model_version(model_name, ref) if ref.isdigit() else \
            client.get_model_version_by_alias(model_name, ref)
    except MlflowException:
        return None
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{mv.version}", dst_path=str(dst)))
    onnx_path, metadata = load_model_dir(local)
    return local, onnx_path, metadata, mv


def _emulate(dirs: list[Path], data_root: Path, n_images: int, progress: Progress,
             first: int = 0) -> dict[Path, Accuracy]:
    """Emulated `Accuracy` of each folder; a failed child leaves the folders it did not
    answer out (their columns read "not measured") instead of losing the whole study."""
    out: dict[Path, Accuracy] = {}
    if not dirs:
        return out
    progress(f"emulating {', '.join(d.name for d in dirs)} …")
    try:
        for folder, acc in emulated_accuracy(dirs, data_root, n_images, first):
            out[folder] = acc
            progress(f"emulated {folder.parent.name} {folder.name}: image AUROC {acc.image_auroc:.3f} "
                     f"({acc.seconds:.0f} s)")
    except RuntimeError as exc:
        log.warning("emulated evaluation failed: %s", exc)
        progress(f"emulated evaluation failed, {len(dirs) - len(out)} model(s) not measured: "
                 f"{str(exc)[:300]}")
    return out


def scheme_study(data_root: Path, model_name: str, architectures: list[str], *, emulate: bool,
                 n_images: int, probe: int, progress: Progress, work: Path,
                 schemes: tuple[str, ...] = SCHEMES) -> list[SchemeRow]:
    """Quantize each `<arch>-fp32` version in every scheme and evaluate natively (every test
    image, and the subset) and emulated (the subset; `PROBE_SCHEMES` its first `probe`
    images); time batch-1 p50 natively, the models of an architecture interleaved."""
    from registry.data.mvtec import load_test_split, load_train_split
    from registry.evaluate import evaluate, interleaved_p50_ms
    from registry.pipeline import CALIBRATION_IMAGES, calibration_images, calibration_label
    from registry.variants.calibration import CalibrationAlgo, CalibrationData
    from registry.variants.ptq import quantize_int8
    from service.runtime.engine import OnnxModel

    train_set, test_set = load_train_split(data_root), load_test_split(data_root)
    subset = test_subset(test_set, n_images)
    rows: list[SchemeRow] = []
    for arch in architectures:
        got = _download(model_name, f"{arch}-fp32", work / arch / "download")
        if got is None:
            progress(f"{arch}: no {arch}-fp32 alias, skipped")
            continue
        _, fp32_path, fp32_md, mv = got
        dirs: dict[str, Path] = {}
        quantize_s: dict[str, float] = {}
        reader = calibration_images(CalibrationData.real, train_set, fp32_md, CALIBRATION_IMAGES)
        for scheme in dict.fromkeys(("fp32", *schemes)):
            folder = work / arch / scheme
            folder.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            md = fp32_md
            if scheme == "fp32":
                shutil.copyfile(fp32_path, folder / "model.onnx")
            else:
                progress(f"{arch}: quantizing {scheme}")
                target, cpu_scheme = ("tensorrt", "u8s8-rr") if scheme == "s8s8" else ("cpu", scheme)
                quantize_int8(fp32_path, folder / "model.onnx", reader, CalibrationAlgo.minmax,
                              target=target, scheme=cpu_scheme)
                md = fp32_md.model_copy(update={
                    "variant": "ptq-int8", "precision": "int8",
                    "calibration": calibration_label(CalibrationData.real, CalibrationAlgo.minmax)})
            md.save(folder)
            quantize_s[scheme] = time.perf_counter() - t0
            dirs[scheme] = folder
        native_all, native = {}, {}
        for scheme, folder in dirs.items():
            onnx_path, md = load_model_dir(folder)
            report = evaluate(onnx_path, md, test_set)
            native_all[scheme] = Accuracy(report.image_auroc, report.pixel_auroc, len(test_set), 0.0,
                                          [] if report.scores is None else [float(s) for s in report.scores])
            native[scheme] = (native_all[scheme] if len(subset) == len(test_set)
                              else accuracy(onnx_path, md, subset))
            progress(f"{arch} {scheme}: native image AUROC {native_all[scheme].image_auroc:.3f} (all), "
                     f"{native[scheme].image_auroc:.3f} (subset of {len(subset)})")
        progress(f"{arch}: timing {len(dirs)} models side by side (batch 1, interleaved)")
        models = {s: OnnxModel(*load_model_dir(f)) for s, f in dirs.items()}
        prepared = np.stack([models["fp32"].prepare_encoded(s.path.read_bytes()) for s in subset[:8]])
        p50 = interleaved_p50_ms(models, {s: prepared for s in models})
        del models
        emulated: dict[Path, Accuracy] = {}
        if emulate:
            emulated = _emulate([f for s, f in dirs.items() if s not in PROBE_SCHEMES], data_root, n_images,
                                progress)
            if probe > 0:
                emulated |= _emulate([f for s, f in dirs.items() if s in PROBE_SCHEMES], data_root, n_images,
                                     progress, first=probe)
        for scheme, folder in dirs.items():
            rows.append(SchemeRow(arch, scheme, str(mv.version), file_digest(folder / "model.onnx"),
                                  native_all[scheme], native[scheme], emulated.get(folder), p50[scheme],
                                  (folder / "model.onnx").stat().st_size / 1e6, quantize_s[scheme]))
    return rows


def registered_study(data_root: Path, model_name: str, architectures: list[str], *, emulate: bool,
                     n_images: int, progress: Progress, work: Path,
                     schemes: list[SchemeRow]) -> list[RegisteredRow]:
    """Every registered `<arch>-ptq-int8` / `<arch>-qat-int8` version and its FP32 parent,
    natively and emulated, on the compared subset. A file byte-identical to a scheme row's
    (e.g. the demo's PTQ and this study's `u8s8-rr`) and an FP32 parent the schemes study
    evaluated are not evaluated again."""
    from mlflow import MlflowClient

    from registry.data.mvtec import load_test_split

    subset = test_subset(load_test_split(data_root), n_images)
    client = MlflowClient()
    by_digest = {r.digest: r for r in schemes if r.scheme != "fp32"}
    fp32_rows = {r.fp32_version: r for r in schemes if r.scheme == "fp32"}
    found, parents = [], {}
    for arch in architectures:
        for variant in REGISTERED:
            got = _download(model_name, f"{arch}-{variant}", work / "registered" / f"{arch}-{variant}")
            if got is None:
                continue
            folder, onnx_path, _, mv = got
            params = client.get_run(mv.run_id).data.params if mv.run_id else {}
            parent = params.get("parent_version") or mv.tags.get("parent_version", "")
            found.append((arch, variant, folder, file_digest(onnx_path), mv, params, parent))
            if parent and parent not in fp32_rows and parent not in parents:
                p = _download(model_name, parent, work / "registered" / f"v{parent}")
                if p is not None:
                    parents[parent] = p[0]
    todo = [f[2] for f in found if f[3] not in by_digest] + list(parents.values())
    native: dict[Path, Accuracy] = {}
    for folder in todo:
        onnx_path, md = load_model_dir(folder)
        native[folder] = accuracy(onnx_path, md, subset)
        progress(f"registered {folder.name}: native image AUROC {native[folder].image_auroc:.3f}")
    emulated = _emulate(todo, data_root, n_images, progress) if emulate else {}
    rows = []
    for arch, variant, folder, digest, mv, params, parent in found:
        same = by_digest.get(digest)
        if parent in fp32_rows:
            pn, pe = fp32_rows[parent].native, None  # FP32 is emulated on a probe only
        elif parent in parents:
            pn, pe = native[parents[parent]], emulated.get(parents[parent])
        else:
            pn = pe = None
        rows.append(RegisteredRow(
            arch, variant, str(mv.version), params.get("int8_scheme", "not recorded"), parent,
            same.native if same else native[folder], same.emulated if same else emulated.get(folder), pn, pe,
            mv.tags.get("measured.cpu", ""), same.scheme if same else ""))
    return rows


# --------------------------------------------------------------------------- the report


def _f(x: float | None, spec: str = ".3f") -> str:
    return "not measured" if x is None or x != x else format(x, spec)


def _d(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or a != a or b != b else f"{a - b:+.3f}"


def code_version() -> str:
    """`commit abc1234`, plus the tracked files under registry/, service/ and studies/ that
    differ from it (the study ran on those)."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = [p for p in git("diff", "--name-only", "HEAD").splitlines()
             if p.split("/")[0] in ("registry", "service", "studies")]
    return f"commit {commit}" + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else "")


def _ratio(rows: list[SchemeRow], arch: str, num: str, den: str) -> float:
    by = {r.scheme: r for r in rows if r.architecture == arch}
    if num not in by or den not in by:
        return float("nan")
    return by[den].latency_ms_p50 / by[num].latency_ms_p50


def _deltas(rows: list[SchemeRow], scheme: str) -> str:
    """Native image AUROC on every test image minus FP32's, per architecture."""
    fp32 = {r.architecture: r.native_all.image_auroc for r in rows if r.scheme == "fp32"}
    return ", ".join(f"{r.architecture} {r.native_all.image_auroc - fp32[r.architecture]:+.3f}"
                     for r in rows if r.scheme == scheme and r.architecture in fp32) or "not measured"


def _rate(rows: list[SchemeRow], probe: bool) -> str:
    """Seconds per emulated image (session creation included), smallest–largest, of the probe
    rows or of the others."""
    rates = [r.emulated.seconds / r.emulated.images for r in rows
             if r.emulated and r.emulated.images and (r.scheme in PROBE_SCHEMES) == probe]
    if not rates:
        return "not measured"
    return f"{min(rates):.1f}–{max(rates):.1f} s per image" if min(rates) < 10 else \
        f"{min(rates):.0f}–{max(rates):.0f} s per image"


def render(schemes: list[SchemeRow], registered: list[RegisteredRow], checks: list[KernelCheck],
           cpus: CpuLabels, *, command: str, seconds: float, n_subset: int, n_test: int, probe: int,
           version: str, kept: str = DEFAULT_KEPT) -> str:
    """The Markdown section. `kept`: the hand-written text between `KEPT_BEGIN` and
    `KEPT_END`, carried over from the section this one replaces."""
    a, b = cpus.native_short, cpus.emulated_short
    archs = list(dict.fromkeys(r.architecture for r in schemes))
    sub = f"{n_subset} of the {n_test}" if n_subset < n_test else f"all {n_test}"
    lines = [
        HEADING, "",
        "**The report that started it** (issue 36): image AUROC of the demo's builds evaluated on a "
        "2-core AMD EPYC with AVX2 and no VNNI, PTQ and QAT then using 8-bit weights (`u8s8`), "
        "while on VNNI machines every INT8 build was within a point of its FP32:", "",
        "| architecture | FP32 | PTQ-INT8 | QAT-INT8 |", "|---|---:|---:|---:|",
        *[f"| {k} | {v[0]:.3f} | {v[1]:.3f} | {v[2]:.3f} |" for k, v in ISSUE_TABLE.items()], "",
        "**Cause.** ONNX Runtime's x86 INT8 kernels (MLAS) multiply uint8 activations by int8 weights "
        "with `vpmaddubsw` on CPUs without VNNI (AVX2, and AVX-512 F/BW without VNNI): it adds each "
        "pair of adjacent u8 × s8 products into a *saturating* signed 16-bit lane before widening, and "
        "255 × 127 × 2 = 64 770 > 32 767. With VNNI, `vpdpbusd` multiplies and accumulates four "
        "products straight into 32 bits, nothing saturates, and the same file computes the exact "
        "integers. So a model quantized and checked on a VNNI machine silently loses accuracy on an "
        "AVX2 plant PC. Fixes: keep 255 × |w| × 2 ≤ 32 767, i.e. weights in [-64, 64] (`u8s8-rr`, "
        "ONNX Runtime's `reduce_range`: 7-bit weights, one bit of weight precision for the same "
        "integers on every CPU), or uint8 weights (`u8u8`: MLAS widens both operands to 16 bits and "
        "uses `vpmaddwd`, no saturation).", "",
        f"Produced by `{command}` ({version}) in {seconds / 60:.1f} min of wall time on a 2-core "
        "machine shared with other jobs. Which CPU each number came from:", "",
        f"- **native** ({a}): {cpus.native};",
        f"- **emulated** ({b}): "
        f"{cpus.emulated or 'not measured (no `qemu-x86_64` on PATH, or `--no-emulate`)'}. "
        "Only accuracy is read there; timings under emulation mean nothing.", "",
        "### Kernel check: one Conv", "",
        "A single 64→64-channel 3×3 Conv with large weights and inputs in [0, 4], quantized by "
        "`registry/variants/ptq.py` in each scheme and run natively and emulated; largest output "
        "difference as a % of the FP32 output's largest |value|:", "",
        f"| scheme | native ({a}) vs emulated ({b}) | native vs FP32 | emulated vs FP32 |",
        "|---|---:|---:|---:|",
        *[f"| {c.scheme} | {_f(c.native_vs_emulated, '.3f')} % | {_f(c.native_error, '.2f')} % "
          f"| {_f(c.emulated_error, '.2f')} % |" for c in checks], "",
        "### Accuracy per scheme", "",
        "Each architecture's registered FP32 version (`<arch>-fp32`) quantized by "
        "`registry/variants/ptq.py` (QDQ, per-channel weights, networks only, 64 real calibration "
        "images, MinMax, as the demo's PTQ) in each scheme, every file evaluated through the serving "
        "engine (`OnnxModel`, PNG bytes in, batch 1). Image / pixel AUROC are means over the 4 "
        f"categories. The emulated columns, and the native columns they are compared with, use the "
        f"same fixed subset of {sub} test images (`studies.int8_cpus.test_subset`: evenly spaced within "
        "each category's good and defective images; a subset, because the INT8 models take "
        f"{_rate(schemes, False)} under emulation here); the first column uses every test image. FP32 "
        "and s8s8 run mostly in float (the CPU provider leaves s8s8's convolutions as float), which "
        f"TCG executes in soft-float ({_rate(schemes, True)} here), so they are emulated on a probe, "
        f"the subset's first {f'{probe} images' if probe != 1 else 'image'}: only their score change "
        "is read there. Schemes: "
        + "; ".join(f"`{k}` = {v}" for k, v in SCHEME_NOTES.items()) + ".", "",
        f"| architecture | scheme | image AUROC, native, all {n_test} | image AUROC, native, subset "
        "| image AUROC, emulated, subset | emulated − native | pixel AUROC, native, subset "
        "| pixel AUROC, emulated, subset | largest image-score change, emulated vs native |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in schemes:
        probed = r.scheme in PROBE_SCHEMES
        e = None if probed else r.emulated
        missing = "probe only" if probed and r.emulated else "not measured"
        shift = f"{r.score_shift:.2f} % of the score range" if r.emulated else "not measured"
        if probed and r.emulated:
            shift += f" (probe: {r.emulated.images} image{'s' if r.emulated.images != 1 else ''})"
        lines.append(
            f"| {r.architecture} | {r.scheme} | {_f(r.native_all.image_auroc)} | {_f(r.native.image_auroc)} "
            f"| {_f(e.image_auroc) if e else missing} "
            f"| {_d(e.image_auroc if e else None, r.native.image_auroc)} | {_f(r.native.pixel_auroc)} "
            f"| {_f(e.pixel_auroc) if e else missing} | {shift} |")
    lines += [
        "", f"### Speed per scheme (native only: {a})", "",
        "Batch-1 p50 of `OnnxModel.infer` on 8 test images, the models of an architecture loaded "
        "together and timed in interleaved rounds (`registry.evaluate.interleaved_p50_ms`), so the "
        "ratios come from one run.", "",
        "| architecture | scheme | ms/image (b=1, p50) | speed × FP32 | speed × u8s8-rr | model MB "
        "| quantize s |",
        "|---|---|---:|---:|---:|---:|---:|"]
    for r in schemes:
        lines.append(f"| {r.architecture} | {r.scheme} | {r.latency_ms_p50:.2f} "
                     f"| {_ratio(schemes, r.architecture, r.scheme, 'fp32'):.2f}× "
                     f"| {_ratio(schemes, r.architecture, r.scheme, 'u8s8-rr'):.2f}× "
                     f"| {r.model_mb:.2f} | {r.quantize_s:.0f} |")
    lines += ["", "### Registered INT8 versions", ""]
    if not registered:
        lines.append("This store has no registered `<arch>-ptq-int8` / `<arch>-qat-int8` version: no rows.")
    else:
        lines += [
            f"Image AUROC on the same {n_subset}-image subset; Δ = the version minus its FP32 parent on "
            "the same images (the parent's native value: FP32 does not depend on VNNI, see the FP32 "
            "probe above).", "",
            f"| architecture | variant | version | INT8 scheme | FP32 parent | native ({a}) "
            f"| Δ vs parent, native | emulated ({b}) | Δ vs parent, emulated | recorded as measured on |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
        for g in registered:
            e, pn = g.emulated, g.parent_native
            pe = g.parent_emulated or pn
            scheme = g.scheme + (f" (the same file as the {g.same_as} row)" if g.same_as else "")
            lines.append(
                f"| {g.architecture} | {g.variant} | {g.version} | {scheme} | {g.parent_version or '—'} "
                f"| {_f(g.native.image_auroc)} | {_d(g.native.image_auroc, pn.image_auroc if pn else None)} "
                f"| {_f(e.image_auroc if e else None)} "
                f"| {_d(e.image_auroc if e else None, pe.image_auroc if pe else None)} "
                f"| {g.built_on or 'not recorded'} |")
    speed = "; ".join(f"{arch} {_ratio(schemes, arch, 'u8s8', 'u8s8-rr'):.2f}×" for arch in archs)
    u8u8 = "; ".join(f"{arch} {_ratio(schemes, arch, 'u8u8', 'u8s8-rr'):.2f}×" for arch in archs)
    lines += [
        "", "### The choice", "",
        "`u8s8-rr` is the default (`registry.variants.ptq.DEFAULT_SCHEME`, and QAT fake-quantizes "
        "on the same 7-bit grid): the only u8 × s8 scheme that computes the same integers on every "
        "x86 CPU, with or without VNNI, at `u8s8`'s speed. Speed of `u8s8` relative to `u8s8-rr` on "
        f"this VNNI host (above): {speed}; of `u8u8`: {u8u8} (VNNI's `vpdpbusd` multiplies u8 by s8 "
        "only; u8 × u8 takes slower widening kernels). Its price is the eighth weight bit: natively, "
        f"on all {n_test} test images, image AUROC minus FP32's is {_deltas(schemes, 'u8s8-rr')} for "
        f"`u8s8-rr`, against {_deltas(schemes, 'u8s8')} for `u8s8` (exact there, on VNNI) and "
        f"{_deltas(schemes, 'u8u8')} for `u8u8`; without VNNI `u8s8` loses more (the emulated "
        "column). QAT fine-tunes on the same 7-bit grid: its versions are in the registered table "
        "above.", "",
        KEPT_BEGIN, kept.strip(), KEPT_END]
    return "\n".join(lines) + "\n"


def kept_text(doc: Path) -> str:
    """The hand-written text between `KEPT_BEGIN` and `KEPT_END` in `doc`'s section, if any."""
    text = doc.read_text() if doc.exists() else ""
    start = text.find(HEADING)
    if start < 0:
        return DEFAULT_KEPT
    stop = text.find("\n## ", start + len(HEADING))
    section = text[start:stop if stop >= 0 else len(text)]
    i, j = section.find(KEPT_BEGIN), section.find(KEPT_END)
    return section[i + len(KEPT_BEGIN):j].strip() if 0 <= i < j else DEFAULT_KEPT


@dataclass
class StudyResult:
    """Everything `anomaly int8-study` measured."""

    schemes: list[SchemeRow]
    registered: list[RegisteredRow]
    checks: list[KernelCheck]
    cpus: CpuLabels
    seconds: float = 0.0


def run(data_root: Path, architectures: list[str], *, emulate: bool = True,
        n_images: int = DEFAULT_EMULATED_IMAGES, probe: int = DEFAULT_PROBE,
        model_name: str | None = None, progress: Progress | None = None,
        schemes: tuple[str, ...] = SCHEMES) -> StudyResult:
    """The study on the current MLflow store. With no `qemu-x86_64` on PATH the emulated
    columns read "not measured".

    Raises:
        LookupError: no `<arch>-fp32` alias of the model in this store.
    """
    from anomaly.wire import DEFAULT_MODEL_NAME

    t0 = time.perf_counter()
    say = progress or (lambda message: log.info("%s", message))
    cpus = cpu_labels(emulate)
    emulate = cpus.emulated is not None
    name = model_name or DEFAULT_MODEL_NAME
    with tempfile.TemporaryDirectory(prefix="int8-study-") as tmp:
        work = Path(tmp)
        say("kernel check (one Conv) …")
        checks = kernel_check(work, emulate)
        schemes = scheme_study(data_root, name, architectures, emulate=emulate, n_images=n_images,
                               probe=probe, progress=say, work=work, schemes=schemes)
        if not schemes:
            raise LookupError(f"no <arch>-fp32 alias of {name!r} for {architectures} in this store: "
                              "run `anomaly demo` first")
        registered = registered_study(data_root, name, architectures, emulate=emulate, n_images=n_images,
                                      progress=say, work=work, schemes=schemes)
    return StudyResult(schemes, registered, checks, cpus, time.perf_counter() - t0)


def run_and_write(data_root: Path, doc: Path, architectures: list[str], command: str, *,
                  emulate: bool = True, n_images: int = DEFAULT_EMULATED_IMAGES,
                  probe: int = DEFAULT_PROBE, progress: Progress | None = None,
                  schemes: tuple[str, ...] = SCHEMES) -> StudyResult:
    """Everything `anomaly int8-study` does: run the study, (re)write its section of `doc`."""
    from loadtests.report import replace_section
    from registry.data.mvtec import load_test_split

    version = code_version()
    result = run(data_root, architectures, emulate=emulate, n_images=n_images, probe=probe,
                 progress=progress, schemes=schemes)
    test_set = load_test_split(data_root)
    section = render(result.schemes, result.registered, result.checks, result.cpus, command=command,
                     seconds=result.seconds, n_subset=len(test_subset(test_set, n_images)),
                     n_test=len(test_set), probe=probe, version=version, kept=kept_text(doc))
    replace_section(doc, HEADING, section)
    return result


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
