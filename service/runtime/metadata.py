"""The metadata file that travels with every exported model (`anomaly_model.json`).

Written by the registry after evaluation, read by the server at load time. JSON only:
nothing is unpickled in the serve path. It holds what the server needs besides the ONNX
graph: input size, tensor names, categories, per-category thresholds and the statistics
that turn a raw score into a normalised one.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from service.runtime.tiling import Tiling

METADATA_FILE = "anomaly_model.json"
GLOBAL = ""  # key of the category-independent threshold / statistics
# Version tags that override a calibrated threshold live (`service.promotion.rules`).
THRESHOLD_PREFIX = "threshold."
GLOBAL_THRESHOLD_TAG = "threshold.global"


def threshold_source(category: str) -> str:
    """The version tag that overrides `category`'s threshold ("" = global)."""
    return GLOBAL_THRESHOLD_TAG if category == GLOBAL else f"{THRESHOLD_PREFIX}{category}"


class ScoreStats(BaseModel):
    """Raw-score statistics of one category on the evaluation set."""

    threshold: float
    min: float
    max: float

    def normalize(self, score: float) -> float:
        """Map a raw score to [0, 1] so that the threshold lands on 0.5 (anomalib's rule)."""
        span = max(self.max - self.min, 1e-12)
        return float(min(max((score - self.threshold) / span + 0.5, 0.0), 1.0))


class ModelMetadata(BaseModel):
    """Everything the engine needs to serve an exported model."""

    schema_version: int = 1
    architecture: str
    variant: str = "fp32"
    precision: str = "fp32"
    calibration: str = ""
    input_name: str = "image"
    score_output: str = "score"
    map_output: str = "anomaly_map"
    input_height: int
    input_width: int
    mean: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = Field(default_factory=lambda: [0.229, 0.224, 0.225])
    categories: list[str]
    image_stats: dict[str, ScoreStats]
    map_range: tuple[float, float] = (0.0, 1.0)  # anomaly-map values shown as 0 … 255
    dataset: str = ""
    backbone: str = ""
    tiling: Tiling | None = None  # large images: scored as tiles of the input size (`service.runtime.tiling`)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        return self.input_height, self.input_width

    @property
    def map_size(self) -> tuple[int, int]:
        """(height, width) of the anomaly map a prepared image gets: the working size of a
        tiled model, the input size otherwise."""
        return self.tiling.image_size if self.tiling else self.input_size

    def stats_for(self, category: str) -> ScoreStats:
        """Statistics for `category` ("" = global). Raises KeyError when unknown."""
        return self.image_stats[category]

    def thresholds(self) -> dict[str, float]:
        """Raw-score threshold per category ("" = global)."""
        return {k: v.threshold for k, v in self.image_stats.items()}

    def save(self, folder: Path | str) -> Path:
        """Write `anomaly_model.json` into `folder` and return its path."""
        path = Path(folder) / METADATA_FILE
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, path: Path | str) -> ModelMetadata:
        """Read a metadata file (or the one inside a model folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / METADATA_FILE
        return cls.model_validate_json(path.read_text())
