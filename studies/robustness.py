"""Two studies that check the choices are not tuned to one generator or one image size.

- `families`: each architecture trained unified, with the demo's schedule, on both sample
  families (`registry.data.sample`: family 1 scratch/patch/stain on brick, coffee, grass,
  gravel; family 2 crack/warp/smudge on coins, ihc, moon), evaluated through the serving
  engine. Rows are kept in `<home>/robustness.json` so that re-running one architecture
  (e.g. after changing it) updates its rows and keeps the others; each row records the
  commit it was measured on.
- `tiling`: the 2048² `gravel_2k` category (defects of a few pixels) scored by the same
  architecture resized to its input vs tiled at a working size (`service.runtime.tiling`).

Both write their section of `docs/results.md`.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loadtests.report import replace_section
from registry.architectures import DEFAULT_EPOCHS, ModelConfig, extra_for, split_options
from registry.data.sample import (
    FAMILIES,
    FAMILY_DEFECTS,
    HIGHRES_CATEGORY,
    HighResSpec,
    SampleSpec,
    make_highres_category,
    make_sample_dataset,
)
from registry.pipeline import build_variant_fp32
from registry.train import TrainConfig
from service.runtime.tiling import Tiling

log = logging.getLogger(__name__)

FAMILIES_HEADING = "## Two defect families"
TILING_HEADING = "## High-resolution parts: tiled vs resized"


@dataclass
class Row:
    """One trained model's result."""

    architecture: str
    setup: str  # "family 1", "family 2", "resized 256²", "tiled …"
    image_auroc: float
    pixel_auroc: float
    aupro: float
    per_category: dict[str, float]  # image AUROC per category
    ms_per_image: float
    train_s: float
    epochs: int
    commit: str
    extra: str = ""  # the architecture options used


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def _train(data: Path, work: Path, arch: str, setup: str, epochs: int, input_size: int = 256,
           tiling: Tiling | None = None, options: dict[str, object] | None = None) -> Row:
    """Train one unified FP32 model (not registered) and score it through the engine."""
    extra = extra_for(arch, options)
    folder = "".join(ch if ch.isalnum() else "-" for ch in f"{setup}-{options or ''}")
    build = build_variant_fp32(data, work / f"{arch}-{folder}", architecture=arch,
                               model_config=ModelConfig(input_size=(input_size, input_size), extra=extra),
                               train_config=TrainConfig(epochs=epochs), register=False, tiling=tiling)
    r = build.report
    return Row(arch, setup, r.image_auroc, r.pixel_auroc, r.aupro,
               {c: m["image_auroc"] for c, m in r.per_category.items()}, r.latency_ms_p50,
               build.train.seconds if build.train else 0.0, epochs, _commit(),
               ", ".join(f"{k}={v}" for k, v in extra.items()))


def _load(path: Path) -> list[Row]:
    return [Row(**r) for r in json.loads(path.read_text())] if path.exists() else []


def _store(path: Path, rows: list[Row], new: list[Row]) -> list[Row]:
    """`rows` with each new row replacing the old one of its (architecture, setup, options)."""
    keys = {(r.architecture, r.setup, r.extra) for r in new}
    merged = [r for r in rows if (r.architecture, r.setup, r.extra) not in keys] + new
    path.write_text(json.dumps([asdict(r) for r in merged], indent=1))
    return merged


def _table(rows: list[Row], categories: list[str], by: str = "options") -> str:
    """Markdown table; the second column is each row's architecture `options` or `setup`."""
    head = ["architecture", by, "image AUROC", "pixel AUROC", "AUPRO", *categories, "ms/image",
            "epochs", "train s", "commit"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        cats = [f"{r.per_category[c]:.3f}" if c in r.per_category else "" for c in categories]
        second = (r.extra or "-") if by == "options" else r.setup
        cells = [r.architecture, second, f"{r.image_auroc:.3f}", f"{r.pixel_auroc:.3f}", f"{r.aupro:.3f}",
                 *cats, f"{r.ms_per_image:.1f}", str(r.epochs), f"{r.train_s:.0f}", r.commit]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def families(home: Path, out: Path, architectures: list[str], family_ids: list[int],
             command: str, options: dict[str, object] | None = None) -> list[Row]:
    """Train each architecture on each family (with `options` over its default extras, e.g.
    an ablation; each architecture takes the keys it reads); update the cached rows and the
    report.

    Raises:
        ValueError: an option no named architecture reads.
    """
    own = split_options(architectures, options or {})
    cache = home / "robustness.json"
    rows = _load(cache)
    for fam in family_ids:
        data = home / ("data" if fam == 1 else f"data-family{fam}")
        if not (data / FAMILIES[fam][0] / "train" / "good").is_dir():
            make_sample_dataset(data, spec=SampleSpec(family=fam))
        for arch in architectures:
            row = _train(data, home / "robustness", arch, f"family {fam}", DEFAULT_EPOCHS.get(arch, 30),
                         options=own[arch])
            rows = _store(cache, rows, [row])  # kept at once: a stopped run loses no finished row
            log.info("%s family %d: image AUROC %.3f", arch, fam, row.image_auroc)
    fam_rows = sorted((r for r in rows if r.setup.startswith("family")),
                      key=lambda r: (r.setup, r.architecture, r.extra))
    sections = []
    for fam in sorted(FAMILIES):
        chosen = [r for r in fam_rows if r.setup == f"family {fam}"]
        if chosen:
            sections.append(f"Family {fam} ({', '.join(FAMILY_DEFECTS[fam])} on {', '.join(FAMILIES[fam])}); "
                            "per-category columns are image AUROC:\n\n" + _table(chosen, list(FAMILIES[fam])))
    text = (f"{FAMILIES_HEADING}\n\nProduced by `{command}` (rows kept in `{cache.name}`; each row names the "
            "commit it was measured on). Unified models, the demo's schedule (STFPM 40 epochs, RD 30, "
            "US 20), input 256², every model scored from its ONNX file through the serving engine. "
            "The demo trains the same FP32 models on family 1 (its table above).\n\n"
            + "\n\n".join(sections) + "\n")
    replace_section(out, FAMILIES_HEADING, text)
    return rows


def tiling(home: Path, out: Path, architecture: str, epochs: int, working: int, stride: int,
           command: str, input_size: int = 256) -> list[Row]:
    """The high-resolution category resized vs tiled; writes its section of the report."""
    t0 = time.perf_counter()
    data = home / "data-2k"
    if not (data / HIGHRES_CATEGORY / "train" / "good").is_dir():
        make_highres_category(data, HighResSpec())
    margin = round(input_size * ModelConfig().score_margin_fraction)
    stride = stride or Tiling.full_coverage_stride(input_size, margin)
    tiled = Tiling(image_height=working, image_width=working, stride=stride)
    setup = f"tiled {working}² / {input_size}² tiles, stride {stride}"
    rows = [_train(data, home / "tiling", architecture, f"resized {input_size}²", epochs, input_size),
            _train(data, home / "tiling", architecture, setup, epochs, input_size, tiled)]
    spec = HighResSpec()
    text = (f"{TILING_HEADING}\n\nProduced by `{command}` in {time.perf_counter() - t0:.0f} s. Category "
            f"`{HIGHRES_CATEGORY}`: {spec.image_size}² JPEG frames (a mosaic of the gravel photo), "
            f"{spec.n_train} good training frames, {spec.n_test_good} good and {2 * spec.n_test_per_defect} "
            "defective test frames (rust pits of radius 8–14 px and blue flecks 40–80 px long, 6–8 px "
            f"wide). The same {architecture} schedule ({epochs} epochs) either sees each frame resized to "
            f"{input_size}² (a defect shrinks 8×) or at {working}² cut into {input_size}² tiles that run as "
            "one batch, their maps stitched and the image score taken from the stitched map (training, "
            "thresholds and serving use the same tiles). Pixel metrics are computed at each model's map "
            "size.\n\n"
            + _table(rows, [HIGHRES_CATEGORY], by="setup") + "\n")
    replace_section(out, TILING_HEADING, text)
    return rows
