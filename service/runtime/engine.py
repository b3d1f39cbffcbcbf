"""The inference engine: ONNX Runtime sessions of one model plus its metadata.

`OnnxModel` is what both the server and the registry's evaluation run, so the numbers
logged to MLflow come from the same artifact and the same pre/post-processing as serving.
Every exported architecture has the same contract: input `image` `(B, 3, H, W)` float32
RGB in [0, 1]; outputs `anomaly_map` `(B, 1, H, W)` and `score` `(B,)`.

Adaptive execution: on a CPU the fastest way to run one call alone is all cores on it,
and the most images per second under load come from one core per concurrent call. A
model can therefore hold two sessions of the same file: the *shared* one (`intra_op_threads`,
one thread by default on the server) and a *solo* one (`solo_threads`, all cores). Each
call runs on the solo session when nothing else is running, or about to run, on the model
(`run(..., alone=...)`: the server says whether other requests are in flight), and on the
shared one otherwise; `runs` and the `anomaly_inference_runs_total` metric count which.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from service import metrics
from service.errors import InvalidInput, ModelLoadError, NonFiniteOutput
from service.runtime.imaging import anomaly_map_png, decode_image, defect_region, overlay_png
from service.runtime.metadata import GLOBAL, ModelMetadata, ScoreStats, threshold_source
from service.runtime.tiling import image_score, prepare_input, scored_region, stitch

log = logging.getLogger(__name__)


@dataclass
class Decision:
    """The outcome for one image."""

    score: float
    normalized_score: float
    is_anomalous: bool
    threshold: float
    category: str
    anomaly_map_png: bytes = b""
    threshold_source: str = "model"  # "model" (calibrated) or the tag that overrode it
    overlay_png: bytes = b""  # the image with its heat map and the region at the threshold outlined


def available_providers(requested: list[str]) -> list[str]:
    """The requested execution providers that this ONNX Runtime build has, CPU last.

    Unavailable ones are dropped with a warning; CPU is always appended as fallback.
    """
    have = set(ort.get_available_providers())
    chosen = []
    for p in requested:
        if p in have:
            chosen.append(p)
        else:
            log.warning("execution provider %s is not available here; falling back", p)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def finite(scores: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Per image of a batch: whether its score and every value of its map are finite.

    Args:
        scores: `(B,)`.
        maps: `(B, H, W)`.
    """
    return np.isfinite(scores) & np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)


class OnnxModel:
    """An ONNX anomaly detector ready to score preprocessed batches.

    Args:
        onnx_path: the exported model file.
        metadata: its `ModelMetadata`.
        providers: ONNX Runtime execution providers, in order of preference.
        intra_op_threads: threads per operator (0 = ONNX Runtime's default).
        solo_threads: threads of a second session for calls that run alone (adaptive
            execution, see the module docstring); made only on the CPU provider and when
            `0 < intra_op_threads < solo_threads`, so 0 means no second session.
        provider_options: per-provider options (e.g. TensorRT engine cache settings).
        spinning: let idle intra-op threads spin-wait (best when ORT has the CPU alone).
        log_severity: ONNX Runtime log severity for this session (3 = errors only).

    Raises:
        ModelLoadError: when the file does not load or does not match the contract.
    """

    def __init__(
        self,
        onnx_path: Path | str,
        metadata: ModelMetadata,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        provider_options: dict[str, dict[str, str]] | None = None,
        spinning: bool = True,
        log_severity: int = 3,
        solo_threads: int = 0,
    ) -> None:
        self.path = Path(onnx_path)
        self.metadata = metadata
        # Live threshold overrides ({category: threshold}, "" = global) from the version's
        # `threshold.<category>` tags (`service.promotion.rules`); replaced whole, never mutated.
        self.overrides: dict[str, float] = {}
        self._scored = np.ones(0, dtype=bool)  # a tiled model's scored pixels (`service.runtime.tiling`)
        chosen = available_providers(providers or ["CPUExecutionProvider"])
        options = [(provider_options or {}).get(p, {}) for p in chosen]

        def session(threads: int) -> ort.InferenceSession:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = log_severity
            if not spinning:
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                return ort.InferenceSession(str(self.path), sess_options=opts,
                                            providers=chosen, provider_options=options)
            except Exception as exc:  # onnxruntime raises several unrelated types
                raise ModelLoadError(f"ONNX Runtime could not load {self.path.name}: {exc}") from exc

        self.session = session(intra_op_threads)
        adaptive = 0 < intra_op_threads < solo_threads and chosen[0] == "CPUExecutionProvider"
        self.solo: ort.InferenceSession | None = session(solo_threads) if adaptive else None
        self.runs = {"solo": 0, "shared": 0}  # calls per session (adaptive execution)
        self._running = 0
        self._lock = threading.Lock()
        self._check_contract()

    def _check_contract(self) -> None:
        m = self.metadata
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if m.input_name not in inputs:
            raise ModelLoadError(f"model has no input {m.input_name!r} (has {sorted(inputs)})")
        shape = inputs[m.input_name].shape
        if len(shape) != 4 or list(shape[1:]) != [3, m.input_height, m.input_width]:
            raise ModelLoadError(
                f"model input shape {shape} does not match metadata "
                f"(B, 3, {m.input_height}, {m.input_width})"
            )
        missing = {m.score_output, m.map_output} - outputs
        if missing:
            raise ModelLoadError(f"model lacks outputs {sorted(missing)} (has {sorted(outputs)})")
        t = m.tiling
        if t is not None:
            too_small = t.image_height < m.input_height or t.image_width < m.input_width
            if too_small or t.stride > min(m.input_size):
                raise ModelLoadError(
                    f"tiling {t.image_height}×{t.image_width} with stride {t.stride} does not fit "
                    f"{m.input_height}×{m.input_width} tiles: the working size must hold a tile and the "
                    "stride must not exceed the tile (pixels would be left unscored)")
            self._scored = scored_region(t.image_size, m.input_size, t.stride, t.score_margin)
            if not self._scored.any():
                raise ModelLoadError(f"tiling score margin {t.score_margin} leaves no tile interior to score")

    @property
    def provider(self) -> str:
        """The execution provider that runs this session (the first in use)."""
        return self.session.get_providers()[0]

    def run(self, batch: np.ndarray, alone: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Run a preprocessed batch.

        Args:
            batch: `(B, 3, H, W)` float32 in [0, 1].
            alone: the caller knows of no other request in flight; the call then runs on
                the solo session (all cores) if no other call is running on this model.

        Returns:
            scores `(B,)` and anomaly maps `(B, H, W)`, float32.
        """
        m = self.metadata
        with self._lock:
            solo = self.solo is not None and alone and self._running == 0
            self._running += 1
            self.runs["solo" if solo else "shared"] += 1
        try:
            session = self.solo if solo and self.solo is not None else self.session
            score, amap = session.run([m.score_output, m.map_output], {m.input_name: batch})
        finally:
            with self._lock:
                self._running -= 1
        if self.solo is not None:
            metrics.INFERENCE_RUNS.labels("solo" if solo else "shared").inc()
        return score.reshape(-1), amap.reshape(amap.shape[0], *amap.shape[-2:])

    def prepare(self, image: np.ndarray | Image.Image) -> np.ndarray:
        """Preprocess one decoded image (array or `L`/`RGB` Pillow image) to this model's
        `(3, H, W)` input; for a tiled model, to its working size cut into `(N, 3, H, W)`
        tiles (`service.runtime.tiling`)."""
        return prepare_input(image, self.metadata.input_size, self.metadata.tiling)

    def prepare_encoded(self, data: bytes) -> np.ndarray:
        """`prepare` of encoded image bytes, decoded at the smallest JPEG scale that still holds
        the model's working size (`decode_image(draft=)`): what evaluation, the champion rule and
        the benchmarks feed the model. Raises `InvalidInput` for bytes that are no image."""
        return self.prepare(decode_image(data, draft=self.metadata.map_size))

    def infer(self, batch: np.ndarray, alone: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Run a stack of `prepare` outputs: scores `(B,)` and anomaly maps `(B, *map_size)`.

        Untiled, this is `run`. Tiled, every image's tiles run in one call, their maps are
        stitched and each image's score is taken from its stitched map. `alone` as in `run`.
        """
        t = self.metadata.tiling
        if t is None:
            return self.run(batch, alone)
        b, n = batch.shape[:2]
        _, maps = self.run(batch.reshape(b * n, *batch.shape[2:]), alone)
        maps = maps.reshape(b, n, *maps.shape[-2:])
        stitched = np.stack([stitch(m, t.image_size, t.stride, t.score_margin) for m in maps])
        scores = np.array([image_score(m, self._scored) for m in stitched], dtype=np.float32)
        return scores, stitched

    def resolve_category(self, category: str) -> str:
        """Validate a request's category ("" = global threshold).

        Raises:
            InvalidInput: for a category the model was not calibrated on.
        """
        if category and category not in self.metadata.image_stats:
            raise InvalidInput(
                f"unknown category {category!r}; this model knows {self.metadata.categories}"
            )
        return category or GLOBAL

    def decide(
        self, score: float, amap: np.ndarray | None, category: str,
        original_size: tuple[int, int] | None = None, overrides: dict[str, float] | None = None,
        *, map_png: bool = True, overlay_on: np.ndarray | None = None,
    ) -> Decision:
        """Turn one raw score (and optionally its map) into a `Decision` (with the live
        threshold overrides in use, or with `overrides` when given: the promotion gate's
        judgement of proposed thresholds). With `amap`: its PNG when `map_png`, and the overlay
        drawn on `overlay_on` (`imaging.overlay_base` of the image) when given.

        Raises:
            NonFiniteOutput: the score is NaN or infinite (`NaN >= threshold` is false, so it
                would otherwise pass as OK): no decision is made from it.
        """
        if not np.isfinite(score):
            raise NonFiniteOutput(f"model produced a non-finite score ({score}); no decision was made")
        cat = self.resolve_category(category)
        stats, source = self.stats_for(cat, overrides)
        png = overlay = b""
        if amap is not None:
            lo, hi = self.metadata.map_range
            if map_png:
                png = anomaly_map_png(amap, original_size or amap.shape, lo, hi)
            if overlay_on is not None:
                scored = self._scored if self._scored.shape == amap.shape else None  # tiled models
                region = defect_region(amap, stats.threshold, bool(score >= stats.threshold), scored)
                overlay = overlay_png(overlay_on, amap, lo, hi, region)
        return Decision(
            score=float(score),
            normalized_score=stats.normalize(score),
            is_anomalous=bool(score >= stats.threshold),
            threshold=stats.threshold,
            category=cat,
            anomaly_map_png=png,
            threshold_source=source,
            overlay_png=overlay,
        )

    def score_image(self, image: np.ndarray | Image.Image, category: str,
                    original_size: tuple[int, int] | None = None,
                    overrides: dict[str, float] | None = None) -> Decision:
        """Prepare, run and decide one decoded image at batch 1, outside the batcher (the
        promotion gate's known parts, the shadow challenger).

        Raises:
            NonFiniteOutput: the score or map is NaN or infinite (no decision).
            InvalidInput: a category this model does not know.
        """
        scores, maps = self.infer(self.prepare(image)[None])
        if not finite(scores, maps).all():
            raise NonFiniteOutput(f"{self.metadata.architecture}-{self.metadata.variant} produced a "
                                  "non-finite score or map; no decision was made")
        return self.decide(float(scores[0]), None, category, original_size, overrides)

    def stats_for(self, category: str,
                  overrides: dict[str, float] | None = None) -> tuple[ScoreStats, str]:
        """The score statistics a decision in `category` uses, with a live threshold override
        (or one of `overrides`) applied, and where the threshold came from ("model" or the
        overriding tag)."""
        stats = self.metadata.stats_for(category)
        override = (self.overrides if overrides is None else overrides).get(category)
        if override is None:
            return stats, "model"
        return stats.model_copy(update={"threshold": override}), threshold_source(category)

    def thresholds(self) -> dict[str, tuple[float, str]]:
        """Threshold in use per category ("" = global), with where it came from."""
        used = {}
        for category in self.metadata.image_stats:
            stats, source = self.stats_for(category)
            used[category] = (stats.threshold, source)
        return used

    def validation_inputs(self) -> list[tuple[str, np.ndarray]]:
        """Raw input batches a new version must pass: two flat grays and seeded uniform noise."""
        h, w = self.metadata.input_size
        noise = np.random.default_rng(0).random((2, 3, h, w), dtype=np.float32)
        return [("flat gray", np.stack([np.full((3, h, w), v, np.float32) for v in (0.2, 0.7)])),
                ("noise", noise)]

    def validate(self, reference: list[np.ndarray] = ()) -> None:
        """Warm up and smoke-test: every batch of `validation_inputs` (through `run`) and each
        of the version's reference images (prepared inputs, through `infer`) must give finite
        outputs of the right shapes.

        Raises:
            ModelLoadError: when the model fails the smoke test (the message says which input).
        """
        try:
            self.warmup((1,))
        except Exception as exc:
            raise ModelLoadError(f"smoke test failed: {exc}") from exc
        checks = [(name, batch, self.run, self.metadata.input_size)
                  for name, batch in self.validation_inputs()]
        checks += [(f"reference image {i}", x[None], self.infer, self.metadata.map_size)
                   for i, x in enumerate(reference)]
        for name, batch, call, (h, w) in checks:
            try:
                scores, maps = call(batch)
            except Exception as exc:
                raise ModelLoadError(f"smoke test failed on {name}: {exc}") from exc
            n = len(batch)
            if scores.shape != (n,) or maps.shape != (n, h, w):
                raise ModelLoadError(f"smoke test: output shapes {scores.shape}, {maps.shape} for {name}; "
                                     f"expected ({n},) and ({n}, {h}, {w})")
            if not finite(scores, maps).all():
                raise ModelLoadError(f"smoke test: the model produced non-finite outputs on {name}")

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run dummy batches so the first real request pays no lazy-initialisation cost."""
        h, w = self.metadata.input_size
        sessions = [self.session] + ([self.solo] if self.solo is not None else [])
        m = self.metadata
        for session in sessions:
            for b in batch_sizes:
                session.run([m.score_output], {m.input_name: np.full((b, 3, h, w), 0.5, dtype=np.float32)})
