"""Training loop shared by every architecture: seeds, progress bar, validation loss,
best-checkpoint keeping, loss history (for MLflow).

Images are decoded and preprocessed by `service.runtime.imaging` (the serving path) once and
kept in memory as a `(N, 3, H, W)` tensor; datasets here are small (MVTec AD train
splits are a few hundred images per category).
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from registry.architectures import AnomalyModel
from registry.data.mvtec import Sample
from service.runtime.imaging import decode_image
from service.runtime.tiling import Tiling, prepare_input

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run."""

    epochs: int = 20
    batch_size: int = 8
    lr: float = 3e-3
    val_fraction: float = 0.1
    seed: int = 0
    threads: int = 0  # 0 = torch's default


@dataclass
class TrainResult:
    """What a run produced: the best weights are loaded into the model already."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    seconds: float = 0.0
    n_train: int = 0
    n_val: int = 0


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_images(samples: list[Sample], size: tuple[int, int], tiling: Tiling | None = None) -> torch.Tensor:
    """Decode and preprocess samples exactly as the server does: `(N, 3, H, W)` float32
    (a tiled model: every tile of every image)."""
    working = tiling.image_size if tiling else size
    arrays = [prepare_input(decode_image(s.path.read_bytes(), draft=working), size, tiling) for s in samples]
    return torch.from_numpy(np.concatenate(arrays) if tiling else np.stack(arrays))


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    return idx[n_val:], idx[:n_val]


def _batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [x[i:i + batch_size].contiguous(memory_format=torch.channels_last)
            for i in range(0, len(x), batch_size)]


def train_model(
    model: AnomalyModel,
    samples: list[Sample],
    config: TrainConfig,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    show_progress: bool = True,
    run_setup: bool = True,
    tiling: Tiling | None = None,
) -> TrainResult:
    """Train `model` on good images; keep the weights of the best validation epoch.

    Args:
        model: any `AnomalyModel`.
        samples: good training images (all categories: the model is unified).
        config: hyper-parameters.
        on_epoch: called with each epoch's record (epoch, train_loss, val_loss, seconds).
        show_progress: draw a rich progress bar.
        run_setup: call the architecture's `fit_setup` hook first (False when fine-tuning
            an already trained model, e.g. quantization-aware training).
        tiling: train on the tiles a tiled model will see (`service.runtime.tiling`).

    Returns:
        A `TrainResult`; `model` holds the best weights and is left in eval mode.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    seed_everything(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    size = tuple(model.config.input_size)
    images = load_images(samples, size, tiling)  # type: ignore[arg-type]
    train_idx, val_idx = _split(len(images), config.val_fraction, config.seed)
    train_x, val_x = images[train_idx], images[val_idx]
    model.to(memory_format=torch.channels_last)
    if run_setup:
        model.fit_setup(train_x, config.batch_size, config.lr)
    optimizer = model.make_optimizer(config.lr)
    result = TrainResult(n_train=len(train_x), n_val=len(val_x))
    best_state = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} epochs"),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                  disable=not show_progress) as progress:
        task = progress.add_task(f"train {model.name}", total=config.epochs, info="")
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            perm = torch.randperm(len(train_x), generator=gen)
            losses = []
            for batch in _batches(train_x[perm], config.batch_size):
                loss = model.loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            model.eval()
            with torch.no_grad():
                val_losses = [model.loss(b).item() for b in _batches(val_x, config.batch_size)]
            record = {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "val_loss": float(np.mean(val_losses)) if val_losses else float(np.mean(losses)),
                "seconds": time.perf_counter() - t0,
            }
            result.history.append(record)
            if record["val_loss"] < result.best_val_loss:
                result.best_val_loss, result.best_epoch = record["val_loss"], epoch
                best_state = copy.deepcopy(model.state_dict())
            if on_epoch:
                on_epoch(record)
            log.info("epoch %d train_loss %.4f val_loss %.4f", epoch, record["train_loss"],
                     record["val_loss"])
            progress.update(task, advance=1, info=(
                f"loss {record['train_loss']:.3f} val {record['val_loss']:.3f}"))
    model.load_state_dict(best_state)
    model.eval()
    model.fit_finalize(train_x, config.batch_size, config.lr)
    model.to(memory_format=torch.contiguous_format)
    result.seconds = time.perf_counter() - start
    return result
