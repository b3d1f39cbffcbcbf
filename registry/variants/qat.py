"""QAT-INT8: quantization-aware fine-tuning in torch, quantized by ONNX Runtime's QDQ quantizer.

The seed's torch-eager QAT does not export to ONNX, and a graph exported with torch's
fake-quant ops puts a Q/DQ pair between every convolution and its activation, which
ONNX Runtime runs slower than FP32. So training and quantization are split:

1. **Fold batch-norm** into the preceding convolution (found by tracing a forward pass,
   checked by comparing outputs), so that the weights trained are the weights deployed.
2. **Fake-quantize** every convolution with torch's own fake-quant ops, in exactly the
   scheme the ONNX Runtime quantizer will use later: weights symmetric, per output
   channel, in the integer range of the export's scheme (7-bit [-64, 64] for the default
   `u8s8-rr`, see `ptq.SCHEMES`; a weight parametrization, straight-through gradient); inputs uint8,
   asymmetric, with ranges observed during training (a forward pre-hook). The frozen
   teacher/encoder is fake-quantized too, so the students learn to match the *quantized*
   teacher.
3. **Fine-tune** the trainable networks for a few epochs with the architecture's own loss
   (the training loop of `registry.train`, setup hooks skipped, best validation epoch kept).
4. **Export and quantize**: the fake-quant is removed, the model exported to ONNX as
   usual, and `ptq.quantize_int8` quantizes it, with activation ranges either calibrated
   on real normal images (default) or the ranges learned during fine-tuning passed as
   `TensorQuantOverrides` (`QATConfig.ranges`). The result has the same graph layout,
   hence the same speed, as PTQ-INT8.

Plain torch ops only (`torch.fake_quantize_per_*_affine`, parametrizations, hooks): the
eager `torch.ao.quantization` workflow is deprecated in favour of torchao, which does not
export QDQ ONNX.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn.utils import parametrize

from registry.architectures import AnomalyModel
from registry.data.mvtec import Sample
from registry.train import TrainConfig, TrainResult, train_model
from registry.variants.graph import is_layer
from service.runtime.tiling import Tiling

log = logging.getLogger(__name__)

CONV_TYPES = (nn.Conv2d, nn.ConvTranspose2d)
# Symmetric weight integer range of each `ptq.SCHEMES` entry, as ONNX Runtime's quantizer
# computes it (`get_qmin_qmax_for_qType`: symmetric int8 is [-127, 127], reduce_range
# [-64, 64]; symmetric uint8 is the int8 grid shifted by its zero point 128).
WEIGHT_QRANGE = {"u8s8-rr": (-64, 64), "u8s8": (-127, 127), "u8u8": (-127, 127)}


@dataclass
class QATConfig:
    """Fine-tuning schedule of quantization-aware training."""

    epochs: int = 4
    lr: float = 1e-4
    batch_size: int = 8
    # Activation ranges: None = the running min/max over fine-tuning (like MinMax
    # calibration); a float = a moving average with that momentum, which clips rare large
    # activations. Anomalies *are* rare large activations, so the default keeps the full
    # range (in one development run both gave about the same AUROC: 0.815 vs 0.817).
    momentum: float | None = None
    # Which activation ranges the final INT8 graph uses: "calibrated" (MinMax over real
    # normal images, on the QAT-trained weights) or "learned" (the ranges observed during
    # fine-tuning, passed as TensorQuantOverrides). One development run on the sample data
    # (STFPM, 3 QAT epochs): learned 0.817 vs calibrated 0.844 image AUROC (float 0.856).
    ranges: str = "calibrated"

    # The CPU weight scheme it is exported with (`ptq.SCHEMES`): training sees the same
    # weight grid the INT8 graph computes with.
    scheme: str = "u8s8-rr"

    def __post_init__(self) -> None:
        if self.scheme not in WEIGHT_QRANGE:
            raise ValueError(f"QATConfig.scheme must be one of {', '.join(WEIGHT_QRANGE)}, "
                             f"not {self.scheme!r}")
        if self.ranges not in ("calibrated", "learned"):
            raise ValueError(f"QATConfig.ranges must be 'calibrated' or 'learned', not {self.ranges!r}")
        if self.epochs < 1:
            raise ValueError("QATConfig.epochs must be at least 1")
    seed: int = 0


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> int:
    """Fold every BatchNorm2d that directly follows a convolution into it, in place.

    Pairs are found by running `model(example)` with hooks (a BN whose input is a
    convolution's output), so this works for any architecture. Returns the number folded.
    """
    produced: dict[int, nn.Module] = {}
    pairs: list[tuple[nn.Module, nn.BatchNorm2d]] = []
    hooks = []
    for m in model.modules():
        if isinstance(m, CONV_TYPES):
            hooks.append(m.register_forward_hook(lambda mod, i, o: produced.__setitem__(id(o), mod)))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_hook(
                lambda mod, i, o: pairs.append((produced[id(i[0])], mod)) if id(i[0]) in produced else None))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(example)
    for h in hooks:
        h.remove()
    parents = {id(child): (parent, name) for parent in model.modules()
               for name, child in parent.named_children()}
    folded = 0
    for conv, bn in dict((id(b), (c, b)) for c, b in pairs).values():
        with torch.no_grad():
            std = torch.sqrt(bn.running_var + bn.eps)
            gain = bn.weight / std
            shape = (1, -1, 1, 1) if isinstance(conv, nn.ConvTranspose2d) else (-1, 1, 1, 1)
            conv.weight.mul_(gain.reshape(shape))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            new_bias = bn.bias + (bias - bn.running_mean) * gain
            conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
        parent, name = parents[id(bn)]
        setattr(parent, name, nn.Identity())
        folded += 1
    model.train(was_training)
    return folded


class _WeightFakeQuant(nn.Module):
    """Parametrization: symmetric per-output-channel fake quantization onto [qmin, qmax]."""

    def __init__(self, axis: int, qrange: tuple[int, int] = WEIGHT_QRANGE["u8s8-rr"]) -> None:
        super().__init__()
        self.axis = axis
        self.qmin, self.qmax = qrange

    def forward(self, w: torch.Tensor) -> torch.Tensor:  # noqa: D102
        dims = [d for d in range(w.dim()) if d != self.axis]
        absmax = w.detach().abs().amax(dim=dims).clamp_min(1e-8)
        scale = (2 * absmax / (self.qmax - self.qmin)).float()  # ONNX Runtime's symmetric rule
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, self.axis, self.qmin, self.qmax)


class _InputFakeQuant(nn.Module):
    """Observed min/max of a convolution's input, and uint8 fake quantization of it.

    Ranges update only while the owning model is in training mode (a frozen teacher is in
    eval mode but still observed).
    """

    def __init__(self, root: list[nn.Module], momentum: float | None) -> None:
        super().__init__()
        self._root = root  # a list, so the model is not registered as a sub-module
        self.momentum = momentum
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self._root[0].training:
            lo, hi = x.detach().min(), x.detach().max()
            if int(self.seen) == 0:
                self.lo.copy_(lo)
                self.hi.copy_(hi)
            elif self.momentum is None:
                self.lo.copy_(torch.minimum(self.lo, lo))
                self.hi.copy_(torch.maximum(self.hi, hi))
            else:
                self.lo.lerp_(lo, self.momentum)
                self.hi.lerp_(hi, self.momentum)
            self.seen += 1
        lo, hi = torch.clamp(self.lo, max=0.0), torch.clamp(self.hi, min=0.0)
        scale = ((hi - lo) / 255).clamp_min(1e-8).reshape(1)
        zero = torch.round(-lo / scale).clamp(0, 255).to(torch.int32).reshape(1)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)

    @property
    def range(self) -> tuple[float, float]:
        """The learned (min, max), widened to include 0 as the quantizer does."""
        return min(float(self.lo), 0.0), max(float(self.hi), 0.0)


def _network_convs(model: AnomalyModel) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, CONV_TYPES)]


def attach_fake_quant(model: AnomalyModel, momentum: float | None,
                      scheme: str = "u8s8-rr") -> list[nn.Module]:
    """Fake-quantize every convolution's weight (on `scheme`'s weight grid) and input;
    returns the convolutions."""
    root = [model]
    convs = _network_convs(model)
    for conv in convs:
        axis = 1 if isinstance(conv, nn.ConvTranspose2d) else 0
        parametrize.register_parametrization(conv, "weight", _WeightFakeQuant(axis, WEIGHT_QRANGE[scheme]))
        conv.input_fq = _InputFakeQuant(root, momentum)
        conv.input_fq_hook = conv.register_forward_pre_hook(lambda mod, args: (mod.input_fq(args[0]),))
    return convs


def detach_fake_quant(convs: list[nn.Module]) -> list[tuple[float, float]]:
    """Remove the fake quantization (keeping the trained float weights); returns each
    convolution's learned input range, in the order of `convs`."""
    ranges = []
    for conv in convs:
        ranges.append(conv.input_fq.range)
        conv.input_fq_hook.remove()
        del conv.input_fq, conv.input_fq_hook
        parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)
    return ranges


def onnx_overrides(onnx_path: Path | str, convs: list[nn.Module],
                   ranges: list[tuple[float, float]]) -> dict[str, list[dict[str, float]]]:
    """Map learned conv-input ranges onto the exported graph's tensors.

    Each ONNX convolution is matched to the torch convolution with the same weights (the
    export is simplified and reordered, so names and order do not carry over); unmatched
    convolutions keep their calibrated ranges.
    """
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {i.name: i for i in model.graph.initializer}
    weights = [c.weight.detach().float().numpy() for c in convs]
    overrides: dict[str, list[dict[str, float]]] = {}
    unmatched = 0
    for node in (n for n in model.graph.node if is_layer(n, inits)):
        w = numpy_helper.to_array(inits[node.input[1]])
        idx = next((i for i, tw in enumerate(weights)
                    if tw.shape == w.shape and np.allclose(tw, w, rtol=1e-4, atol=1e-6)), None)
        if idx is None:
            unmatched += 1
            continue
        lo, hi = ranges[idx]
        overrides[node.input[0]] = [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
    if unmatched:
        log.warning("QAT: %d ONNX convolutions without a learned range (calibrated instead)", unmatched)
    return overrides


def qat_finetune(model: AnomalyModel, samples: list[Sample], config: QATConfig,
                 show_progress: bool = True, tiling: Tiling | None = None,
                 ) -> tuple[TrainResult, dict[str, object]]:
    """Fold BN, fake-quantize, observe ranges and fine-tune `model` in place (on the
    tiles of a tiled model).

    Returns:
        The fine-tuning `TrainResult` and a state to pass to `finish_qat` after export
        (the convolutions and their learned input ranges).
    """
    h, w = model.config.input_size
    example = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.eval()(example)[0]
    n_folded = fold_batchnorm(model, example)
    with torch.no_grad():
        after = model.eval()(example)[0]
    err = float((before - after).abs().max() / before.abs().max().clamp_min(1e-8))
    if err > 1e-3:
        raise RuntimeError(f"batch-norm folding changed the output (relative error {err:.2e})")
    convs = attach_fake_quant(model, config.momentum, config.scheme)
    result = train_model(model, samples, TrainConfig(epochs=config.epochs, batch_size=config.batch_size,
                                                     lr=config.lr, seed=config.seed),
                         show_progress=show_progress, run_setup=False, tiling=tiling)
    ranges = detach_fake_quant(convs)
    log.info("QAT: folded %d batch-norms, %d fake-quantized convolutions, %d epochs", n_folded,
             len(convs), config.epochs)
    return result, {"convs": convs, "ranges": ranges, "bn_folded": n_folded}


def learned_overrides(onnx_path: Path | str, state: dict[str, object]) -> dict[str, list[dict[str, float]]]:
    """The `TensorQuantOverrides` for the exported QAT model (see `onnx_overrides`)."""
    return onnx_overrides(onnx_path, state["convs"], state["ranges"])  # type: ignore[arg-type]


def range_summary(overrides: dict[str, list[dict[str, float]]]) -> str:
    """A short human summary of the learned ranges."""
    if not overrides:
        return "no learned ranges"
    spans = np.array([o[0]["rmax"] - o[0]["rmin"] for o in overrides.values()])
    return f"{len(overrides)} tensors, range widths median {np.median(spans):.3g}, max {spans.max():.3g}"
