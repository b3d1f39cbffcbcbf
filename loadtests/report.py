"""Reports: the machine a measurement ran on, Markdown blocks spliced into hand-written
documents (between `<!-- name:begin/end -->` markers, or as a `## heading` section), and
the serving benchmark's table and chart.
"""

from __future__ import annotations

import platform
import statistics
from pathlib import Path

from loadtests.targets import GRPC_OFF, HTTP, HTTP_IN
from loadtests.timing import BARE, LATENCY, SATURATION, Result

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def machine_line(provider: str) -> str:
    """"Machine: …" for a report: architecture, cores, OS, Python, and (when a GPU provider
    runs) the GPU and driver from nvidia-smi; then the execution provider."""
    from service.settings import usable_cores

    line = (f"Machine: {platform.machine()}, {usable_cores()} CPU cores, "
            f"{platform.platform()}, Python {platform.python_version()}")
    if provider != "CPUExecutionProvider":
        import subprocess

        try:
            gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=10, check=True).stdout
            name, _, driver = gpus.split("\n")[0].partition(",")
            line += f", GPU: {name.strip()} (driver {driver.strip()})"
        except (OSError, subprocess.SubprocessError):
            line += ", GPU: unknown (no nvidia-smi)"
    return f"{line}. Execution provider: {provider}."


def _splice(path: Path, span: tuple[int, int] | None, block: str, new_file: str) -> None:
    """Write `path` with `block` in place of `text[span[0]:span[1]]`; without a span the
    block is appended (a new file starts with `new_file`)."""
    text = path.read_text() if path.exists() else ""
    if span is not None:
        text = text[:span[0]] + block + text[span[1]:]
    else:
        text = f"{text.rstrip()}\n\n{block}\n" if text else f"{new_file}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_report(out: Path, table: str, markers: tuple[str, str] = (BEGIN, END),
                 heading: str = "# Serving benchmarks\n\nProduced by `anomaly bench`.") -> None:
    """Put the generated part between the `markers` (`bench:begin/end`) of `out`, keeping
    the hand-written reading around it; a file without them gets the block appended (a new
    file: after `heading`)."""
    begin, end = markers
    text = out.read_text() if out.exists() else ""
    start, stop = text.find(begin), text.find(end, max(0, text.find(begin)))
    span = (start, stop + len(end)) if start >= 0 and stop >= 0 else None
    _splice(out, span, f"{begin}\n{table.rstrip()}\n{end}", heading)


def replace_section(path: Path, heading: str, section: str) -> None:
    """Replace the `## heading` section of a Markdown file (up to the next `## `) with
    `section` (which starts with that heading), or append it; other sections are kept."""
    text = path.read_text() if path.exists() else ""
    start = text.find(heading)
    span = None
    if start >= 0:
        stop = text.find("\n## ", start + len(heading))
        span = (start, stop + 1 if stop >= 0 else len(text))
    block = section.rstrip("\n")
    if span is not None:  # the newline(s) the replaced part ended with
        block += "\n" if span[1] == len(text) else "\n\n"
    _splice(path, span, block, "# Results")


def _fmt(x: float, spec: str = ".2f") -> str:
    return "" if x != x else format(x, spec)  # NaN → blank


def render(results: list[Result], *, model: str, images: int, concurrency: int, seconds: float,
           rounds: int, command: str = "", skipped: list[str] | None = None,
           provider: str = "CPUExecutionProvider", camera: str = "") -> str:
    """Markdown: the machine, the command, and one table with ratios to bare ORT."""
    by = {(r.name, r.mode): r for r in results}
    lines = [
        f"Model: `{model}`; {images} real PNG images from the sample data"
        f"{f' (and {camera}, rows marked with their size)' if camera else ''}; {concurrency} concurrent "
        f"clients at saturation; {rounds} interleaved rounds of {seconds:g} s per path and mode. "
        f"{machine_line(provider)} Clients and servers share the machine's cores (loopback).",
        "",
    ]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        "| path | mode | images/s | p50 ms | p99 ms | ÷ bare ORT (median of rounds) | range over rounds "
        "| HTTP ÷ gRPC | server CPU ms/image | load-generator CPU (cores) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        vs_grpc = ""
        http = next((p for p in (HTTP, HTTP_IN) if r.name.startswith(p)), None)
        grpc_sat = by.get((GRPC_OFF + r.name[len(http):], SATURATION)) if http else None
        if r.mode == SATURATION and grpc_sat:  # an HTTP path ÷ gRPC on the same images, per round
            vs = [a / b for a, b in zip(r.per_round, grpc_sat.per_round, strict=False) if b > 0]
            vs_grpc = _fmt(statistics.median(vs)) if vs else ""
        span = "" if r.name == BARE else f"{_fmt(r.ratio_range[0])}–{_fmt(r.ratio_range[1])}"
        name = f"{r.name} ({r.detail})" if r.detail and r.mode == SATURATION else r.name
        lines.append(f"| {name} | {r.mode} | {r.images_per_s:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
                     f"{_fmt(r.ratio)} | {span} | {vs_grpc} | {_fmt(r.server_ms_per_image, '.1f')} | "
                     f"{_fmt(r.client_cores)} |")
    if skipped:
        lines += ["", "Peers not measured:", *skipped]
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path, title: str) -> None:
    """Bar chart: images/s at saturation and p50 at batch 1, one bar per path (log scale, so
    the slow peers stay visible). Needs matplotlib (the `train` extra has it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in results if r.mode == SATURATION]
    by = {(r.name, r.mode): r for r in results}
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.5), sharey=True)
    for ax, mode, attr, label in ((axes[0], SATURATION, "images_per_s", "images/s at saturation"),
                                  (axes[1], LATENCY, "p50_ms", "p50 ms at batch 1")):
        values = [getattr(by[(n, mode)], attr) for n in names]
        colors = ["#888888" if n == BARE else "#1f77b4" if n.startswith(("gRPC", "HTTP")) else "#d62728"
                  for n in names]
        ax.barh(names, values, color=colors)
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log)")
        for y, v in enumerate(values):
            ax.annotate(f"{v:.1f}", (v, y), xytext=(3, 0), textcoords="offset points", va="center",
                        fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
