"""Where a number was measured: the CPU, the instruction-set features that change integer
results, the ONNX Runtime version and the execution provider.

INT8 results depend on the host. ONNX Runtime's x86 kernels multiply uint8 activations by
int8 weights with `vpmaddubsw` on AVX2 and AVX-512 without VNNI, which adds pairs of
products into a *saturating* 16-bit intermediate; VNNI (`vpdpbusd`) adds into 32 bits and
does not saturate. The same model can therefore score differently on two plant PCs (see
docs/results.md, "INT8 across CPUs"). Versions record this description when built
(`measured.*` tags, `registry.mlflow_registry`), and servers check a version reproduces its
recorded scores on their own host before it serves (`service.repository.reproduction`), writing the
result back as `hardware.<host class>.status`.

The description is read from `/proc/cpuinfo` (what the kernel reports of the real CPU) and
`platform`; nothing here executes CPUID.
"""

from __future__ import annotations

import functools
import platform
import re
from dataclasses import dataclass
from pathlib import Path

# Features that change which integer kernels ONNX Runtime's MLAS picks (hence INT8 results
# or speed), in /proc/cpuinfo's spelling. x86: AVX2 (u8s8 via a saturating 16-bit
# intermediate), AVX-512 (the same at 512 bits), VNNI (32-bit accumulation, no saturation),
# AMX. ARM: `asimddp` (SDOT/UDOT), `i8mm` (SMMLA/UMMLA).
FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Host:
    """One machine as far as model numbers are concerned."""

    machine: str  # platform.machine(): x86_64, aarch64, …
    cpu: str  # the CPU's model name
    features: tuple[str, ...]  # the members of FEATURES this CPU has
    ort: str  # ONNX Runtime version

    @property
    def isa_class(self) -> str:
        """The host class whose INT8 kernels behave alike, e.g. `x86_64-avx512vnni`,
        `x86_64-avxvnni`, `x86_64-avx2`, `aarch64-dotprod`. Usable in a tag key."""
        f = set(self.features)
        if self.machine in ("x86_64", "AMD64", "i686", "x86"):
            if "avx512_vnni" in f:
                level = "avx512vnni"
            elif "avx_vnni" in f:
                level = "avxvnni"
            elif "avx512bw" in f:
                level = "avx512"
            elif "avx2" in f:
                level = "avx2"
            else:
                level = "sse"
        elif self.machine in ("aarch64", "arm64"):
            level = "i8mm" if "i8mm" in f else "dotprod" if "asimddp" in f else "neon"
        else:
            level = "generic"
        return f"{_slug(self.machine)}-{level}"

    def host_class(self, provider: str = "CPUExecutionProvider") -> str:
        """The ISA class, with the execution provider when it is not the CPU's
        (`aarch64-dotprod-tensorrt`): the key under which results are written back."""
        short = provider.removesuffix("ExecutionProvider").lower() or "cpu"
        return self.isa_class if short == "cpu" else f"{self.isa_class}-{_slug(short)}"

    def describe(self, provider: str = "CPUExecutionProvider") -> str:
        """One line for logs and version descriptions."""
        return (f"{self.cpu} ({self.machine}; {', '.join(self.features) or 'no listed features'}), "
                f"ONNX Runtime {self.ort}, {provider}")

    def tags(self, provider: str = "CPUExecutionProvider") -> dict[str, str]:
        """The `measured.*` version tags: where the version's scores were measured."""
        return {"measured.cpu": self.cpu[:250], "measured.machine": self.machine,
                "measured.isa": ",".join(self.features) or "none", "measured.ort": self.ort,
                "measured.provider": provider, "measured.host_class": self.host_class(provider)}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "", text.lower()) or "unknown"


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """The CPU model name and flag set from /proc/cpuinfo text (x86 `flags`, ARM
    `Features`)."""
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not name:
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return name, flags


@functools.cache
def this_host() -> Host:
    """The host this process runs on (read once)."""
    import onnxruntime as ort

    try:
        name, flags = parse_cpuinfo(CPUINFO.read_text(errors="replace"))
    except OSError:
        name, flags = "", set()
    return Host(machine=platform.machine() or "unknown", cpu=name or platform.processor() or "unknown CPU",
                features=tuple(f for f in FEATURES if f in flags), ort=ort.__version__)
