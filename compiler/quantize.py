"""Post-training quantization of a :class:`~compiler.frontend.Graph` to integer layers.

Weights: per output channel, symmetric, ``w_bits``. Activations: per tensor, zero point 0,
unsigned after ReLU/ReLU6 (full ``[0, 2**b - 1]`` range), signed symmetric otherwise. The clip of
each activation tensor comes from a range estimator over calibration data (``minmax``,
``percentile``, ``mse``, ``aciq`` Laplace / ``aciq_gauss``; ../shared/METHODS.md). Requantization
follows the integer recipe in ``sim/golden.py``: ``mult = round(M * 2**shift)`` with the largest
shift that keeps every multiplier within ``mult_bits``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from hw.config import AccelConfig

from .frontend import Graph, Layer

__all__ = ["QuantOptions", "QLayer", "QGraph", "quantize", "float_forward", "METHODS", "QuantError"]

METHODS = ("minmax", "percentile", "mse", "aciq", "aciq_gauss")

# ACIQ clipping multipliers (Banner et al.), METHODS.md.
_ACIQ_LAPLACE = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89}
_ACIQ_LAPLACE_ONESIDED = {2: 3.89, 3: 5.02, 4: 6.20, 5: 7.41, 6: 8.64, 7: 9.89, 8: 11.16}
_ACIQ_GAUSS = {1: 1.24, 2: 1.71, 3: 2.15, 4: 2.55, 5: 2.93, 6: 3.28, 7: 3.61, 8: 3.92}


class QuantError(ValueError):
    """Quantization options or data are invalid."""


@dataclass(frozen=True)
class QuantOptions:
    method: str = "percentile"
    percentile: float = 99.99
    weight_method: str = "minmax"  # or "mse"
    bias_correction: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise QuantError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.weight_method not in ("minmax", "mse"):
            raise QuantError(f"weight_method must be minmax or mse, not {self.weight_method!r}")


@dataclass
class QLayer:
    layer: Layer
    scale: float  # output activation scale
    signed: bool  # output activations signed
    lo: int = 0
    hi: int = 0
    w_q: np.ndarray | None = None
    w_scale: np.ndarray | None = None
    bias_q: np.ndarray | None = None
    mult: np.ndarray | None = None
    res_mult: np.ndarray | None = None
    shift: np.ndarray | None = None


@dataclass
class QGraph:
    graph: Graph
    config: AccelConfig
    layers: dict[str, QLayer] = field(default_factory=dict)
    options: QuantOptions = QuantOptions()
    w_bits: int = 8
    a_bits: int = 8


def float_forward(graph: Graph, x: torch.Tensor, record: bool = False):
    """Evaluate the (BN-folded, fused) graph in float; optionally return every layer's output."""
    vals = {}
    for l in graph.layers:
        if l.kind == "input":
            y = x
        elif l.kind == "conv":
            y = F.conv2d(vals[l.inputs[0]], l.weight, l.bias, l.stride, l.padding, 1, l.groups)
            if l.residual:
                y = y + vals[l.residual]
            y = _act(y, l.act)
        elif l.kind == "maxpool":
            y = F.max_pool2d(vals[l.inputs[0]], l.kernel, l.stride, l.padding)
        else:
            y = F.avg_pool2d(vals[l.inputs[0]], l.kernel, l.stride, l.padding)
        vals[l.name] = y
    return vals if record else vals[graph.output]


def _act(y, act):
    if act == "relu":
        return F.relu(y)
    if act == "relu6":
        return F.relu6(y)
    if isinstance(act, tuple):
        return torch.clamp(y, 0, act[1])
    return y


def _qmax(bits, signed):
    return (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1


def _fake_quant(x, clip, bits, signed):
    q = _qmax(bits, signed)
    s = clip / q
    lo = -q - 1 if signed else 0
    return np.clip(np.round(x / s), lo, q) * s


def _clip(x: np.ndarray, bits: int, signed: bool, opts: QuantOptions) -> float:
    a = np.abs(x) if signed else np.maximum(x, 0)
    top = float(a.max()) if a.size else 0.0
    if top == 0.0:
        return 1.0
    m = opts.method
    if m == "minmax":
        return top
    if m == "percentile":
        return max(float(np.percentile(a, opts.percentile)), top * 1e-3)
    if m == "mse":
        cands = top * np.linspace(0.05, 1.0, 60)
        errs = [np.mean((x - _fake_quant(x, c, bits, signed)) ** 2) for c in cands]
        return float(cands[int(np.argmin(errs))])
    if m == "aciq":
        if signed:
            b = np.mean(np.abs(x - x.mean()))
            return min(top, _ACIQ_LAPLACE[bits] * b)
        pos = x[x > 0]
        b = np.mean(pos) if pos.size else top
        return min(top, _ACIQ_LAPLACE_ONESIDED[bits] * b)
    sigma = float(x.std())  # aciq_gauss
    return min(top, _ACIQ_GAUSS[bits] * sigma) if sigma > 0 else top


def _weight_scale(w: np.ndarray, bits: int, method: str) -> np.ndarray:
    q = _qmax(bits, True)
    flat = w.reshape(w.shape[0], -1)
    top = np.abs(flat).max(axis=1)
    top = np.where(top == 0, 1.0, top)
    if method == "minmax":
        return top / q
    scales = np.empty(len(top))
    for o in range(len(top)):
        cands = top[o] * np.linspace(0.2, 1.0, 50)
        errs = [np.mean((flat[o] - _fake_quant(flat[o], c, bits, True)) ** 2) for c in cands]
        scales[o] = cands[int(np.argmin(errs))] / q
    return scales


def _mult_shift(cfg: AccelConfig, ms: list[np.ndarray]):
    """Largest common shift per channel so every multiplier in ``ms`` fits ``mult_bits``."""
    top = (1 << cfg.mult_bits) - 1
    biggest = np.max(np.stack(ms), axis=0)
    biggest = np.where(biggest <= 0, 1e-30, biggest)
    shift = np.floor(np.log2(top / biggest)).astype(np.int64)
    shift = np.clip(shift, 0, (1 << cfg.shift_bits) - 1)
    outs = []
    for mreal in ms:
        q = np.round(mreal * np.exp2(shift)).astype(np.int64)
        if (q > top).any():
            raise QuantError(f"requantization multiplier {float(mreal.max()):.3g} too large for mult_bits={cfg.mult_bits}")
        outs.append(q)
    return outs, shift


def quantize(graph: Graph, cfg: AccelConfig, calib: torch.Tensor, opts: QuantOptions = QuantOptions(),
             w_bits: int | None = None, a_bits: int | None = None) -> QGraph:
    """Calibrate on ``calib`` (N, C, H, W float) and quantize every layer."""
    wb = w_bits or cfg.w_bits
    ab = a_bits or cfg.a_bits
    if wb > cfg.w_bits or ab > cfg.a_bits:
        raise QuantError(f"W{wb}A{ab} does not fit a W{cfg.w_bits}A{cfg.a_bits} accelerator")
    with torch.no_grad():
        vals = float_forward(graph, calib, record=True)
    qg = QGraph(graph, cfg, options=opts, w_bits=wb, a_bits=ab)
    rng = np.random.default_rng(0)
    for l in graph.layers:
        v = vals[l.name].numpy().reshape(-1)
        if v.size > 200_000:
            v = rng.choice(v, 200_000, replace=False)
        if l.kind in ("maxpool", "avgpool"):
            src = qg.layers[l.inputs[0]]
            qg.layers[l.name] = QLayer(l, src.scale, src.signed, src.lo, src.hi)
            continue
        signed = bool(v.min() < 0) if l.kind == "input" else l.act is None
        clip = _clip(v, ab, signed, opts)
        if l.act == "relu6":
            clip = min(clip, 6.0)
        elif isinstance(l.act, tuple):
            clip = min(clip, l.act[1])
        scale = clip / _qmax(ab, signed)
        lo, hi = (-(1 << (ab - 1)), _qmax(ab, True)) if signed else (0, _qmax(ab, False))
        ql = QLayer(l, scale, signed, lo, hi)
        if l.kind == "conv":
            _quantize_conv(qg, ql, wb)
        qg.layers[l.name] = ql
    return qg


def _quantize_conv(qg: QGraph, ql: QLayer, wb: int):
    cfg, l = qg.config, ql.layer
    x = qg.layers[l.inputs[0]]
    w = l.weight.numpy().astype(np.float64)
    sw = _weight_scale(w, wb, qg.options.weight_method)
    qmax = _qmax(wb, True)
    wq = np.clip(np.round(w / sw.reshape(-1, 1, 1, 1)), -qmax - 1, qmax).astype(np.int64)
    bias = l.bias.numpy().astype(np.float64) if l.bias is not None else np.zeros(w.shape[0])
    if qg.options.bias_correction:
        # Banner et al.: match each channel's quantized weight mean/std to the float weights;
        # the multiplicative part folds into the scale, the additive part into the bias.
        wr = wq * sw.reshape(-1, 1, 1, 1)
        axes = (1, 2, 3)
        std_f, std_q = w.std(axis=axes), wr.std(axis=axes)
        ratio = np.where(std_q > 0, std_f / np.where(std_q > 0, std_q, 1), 1.0)
        shift_mean = w.mean(axis=axes) - (wr * ratio.reshape(-1, 1, 1, 1)).mean(axis=axes)
        sw = sw * ratio
        # The mean shift acts on every input: fold it with the mean input activation ~ 0 for
        # signed, ~ calibrated mean otherwise (approximated by half the clip).
        in_mean = 0.0 if x.signed else x.scale * x.hi / 4
        bias = bias + shift_mean * in_mean * np.prod(w.shape[1:])
    acc_scale = x.scale * sw
    bmax = (1 << (cfg.bias_bits - 1)) - 1
    ql.bias_q = np.clip(np.round(bias / acc_scale), -bmax - 1, bmax).astype(np.int64)
    ql.w_q, ql.w_scale = wq, sw
    ms = [acc_scale / ql.scale]
    if l.residual:
        ms.append(np.full(len(sw), qg.layers[l.residual].scale / ql.scale))
    outs, ql.shift = _mult_shift(cfg, ms)
    ql.mult = outs[0]
    ql.res_mult = outs[1] if l.residual else np.zeros_like(outs[0])
