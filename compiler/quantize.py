"""Post-training quantization of a :class:`~compiler.frontend.Graph` to integer layers.

Number formats (../shared/METHODS.md, "Uniform INT-b"):

* weights: per output channel, symmetric, ``w_bits`` (codes ``-2**(b-1) .. 2**(b-1) - 1``);
* activations: per tensor, zero point 0; unsigned ``[0, 2**b - 1]`` after ReLU / ReLU6 / clamp
  (a ReLU output never needs the sign bit), signed symmetric otherwise.

Range estimators (``QuantOptions.method``) choose each activation tensor's clip on calibration
data: ``minmax``, ``percentile``, ``mse`` (OMSE: the clip minimising ``||X - Q(X)||^2``), ``aciq``
(Laplace fit) and ``aciq_gauss`` (Gaussian fit), with the one-sided tables after a ReLU. A
tensor read only by average pools gets the clip that is best for the *pooled* values instead
(``QuantOptions.pool_aware``, default on: the POOL instruction keeps its input's scale).

Weights (``QuantOptions.weight_method``): per-channel ``minmax`` scale, per-channel ``mse``
(OMSE) scale, or ``gptq`` — the ``mse`` scale with GPTQ/OBQ rounding (Frantar et al. 2022), which
picks each integer weight to minimise the layer's output error on the calibration inputs rather
than the weight error. Not in METHODS.md; added because round-to-nearest loses 1-2 points at
4-bit weights on Fashion-MNIST and ~30 at 2 bits, and GPTQ only changes which integers are stored.

Power-of-two weights (``weight_method`` ``inq``, ``doubleq``, ``doubleqext``; options ``pot_bits``,
``pot_granularity``, ``pot_budget``, ``pot_layers``): see :mod:`compiler.pot`. A PoT layer's
``w_q`` is 0 or ``+-2**e`` and its ``QLayer.pot`` is set; everything downstream (bias correction,
requantization, :func:`simulate`) treats it as an integer layer.

Bias correction (``QuantOptions.bias_correction``):

* ``analytic`` — Banner et al.: per output channel, rescale the dequantized weights so their
  standard deviation matches the float weights (folded into the requant multiplier) and restore
  their mean; the additive part ``d_o`` is folded into the bias as ``d_o * sum E[x]`` over the
  receptive field, with ``E[x]`` measured on the calibration input of the layer.
* ``empirical`` — Nagel et al. 2019: walk the network in order, simulating the *integer* network
  built so far on the calibration batch, and add ``E[y_float - y_quant]`` (pre-activation, per
  channel) to each layer's bias. It also removes the mean error that activation quantization and
  upstream layers inject, which the analytic form cannot see.
* ``both`` — analytic weight correction, then the empirical bias pass on top.

Only the integer weights, ``bias_q``, ``mult`` and ``shift`` change: every correction stays on
the integer path the accelerator runs. Requantization follows ``sim/golden.py``: ``mult =
round(M * 2**shift)`` with the largest shift that keeps every multiplier within ``mult_bits``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from hw.config import AccelConfig

from . import pot as _pot
from .frontend import Graph, Layer

__all__ = [
    "QuantOptions", "QLayer", "QGraph", "QuantError", "quantize", "float_forward", "simulate", "bfp_layers", "code_max",
    "METHODS", "WEIGHT_METHODS", "BIAS_CORRECTIONS", "POT_METHODS",
    "qrange", "fake_quant", "estimate_clip", "mse_clip", "pooled_mse_clip", "aciq_clip", "aciq_k",
    "weight_scales", "gptq_round", "mult_shift", "analytic_bias_correction",
]

METHODS = ("minmax", "percentile", "mse", "aciq", "aciq_gauss")
POT_METHODS = _pot.POT_METHODS
WEIGHT_METHODS = ("minmax", "mse", "gptq", "dsconv") + POT_METHODS
BIAS_CORRECTIONS = ("none", "analytic", "empirical", "both")

# ACIQ clipping multipliers (Banner et al.; METHODS.md). They minimise the Laplace / Gaussian
# clipping + rounding noise 2b^2 e^{-a/b} + a^2 / (3 * 4^M) (resp. the Gaussian analogue); the
# one-sided Laplace table is the two-sided one shifted by one bit (2^M levels on [0, a] have the
# step of 2^(M+1) levels on [-a, a]). tests/test_quantize.py re-derives the tables numerically.
_ACIQ_LAPLACE = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89}
_ACIQ_LAPLACE_ONESIDED = {2: 3.89, 3: 5.02, 4: 6.20, 5: 7.41, 6: 8.64, 7: 9.89, 8: 11.16}
# 9: 4.22 is not in the paper's table; it is the numerical optimum of the same expression and is
# only used for the one-sided 8-bit case (Gaussian one-sided b bits == two-sided b + 1 bits).
_ACIQ_GAUSS = {1: 1.24, 2: 1.71, 3: 2.15, 4: 2.55, 5: 2.93, 6: 3.28, 7: 3.61, 8: 3.92, 9: 4.22}

# Calibration values kept per tensor for the range search (a random subsample beyond this).
_MAX_SAMPLES = 200_000


class QuantError(ValueError):
    """Quantization options or data are invalid."""


@dataclass(frozen=True)
class QuantOptions:
    """How to quantize.

    ``bias_correction`` also accepts a bool for compatibility (``True`` is ``"analytic"``).
    """

    method: str = "percentile"
    percentile: float = 99.99
    weight_method: str = "minmax"
    bias_correction: str = "none"
    #: Choose the clip of a tensor read only by average pools for the pooled result
    #: (:func:`pooled_mse_clip`) whatever ``method`` is.
    pool_aware: bool = True
    #: PoT methods only (:mod:`compiler.pot`). Code width of PoT layers; ``None``: the weight
    #: bits for ``inq``, 5 (sign + exponents 0..7 of an int8 weight) for ``doubleq*``.
    pot_bits: int | None = None
    #: ``inq``: one power-of-two scale per ``layer`` or per output ``channel``.
    pot_granularity: str = "channel"
    #: ``inq``: ``pow2`` scales (the paper) or ``lsq`` (least-squares fitted; see ``compiler.pot``).
    pot_scale: str = "pow2"
    #: ``inq``: each weight to the ``nearest`` level (the paper), or ``gptq`` (GPTQ/OBQ error
    #: compensation on the calibration inputs, over the same PoT levels and scale).
    pot_rounding: str = "nearest"
    #: ``doubleqext``: weight-memory budget, a fraction (float in (0, 1]) of the all-8-bit size or
    #: bytes (int). Default: the paper's operating point, 23 % below 8 bits.
    pot_budget: float | int = 0.77
    #: The conv/linear layers to make PoT (names), instead of all (``inq``, ``doubleq``) or the
    #: DoubleQExt selection. A mix needs ``pe_kind`` hybrid.
    pot_layers: tuple | None = None
    #: ``dsconv`` (:mod:`compiler.dsconv`): input channels per weight block, a multiple of the
    #: array's rows; ``None``: the rows (the finest the hardware rescales).
    dsconv_block: int | None = None
    #: Block-floating-point activations (DSConv's activation format, :func:`compiler.dsconv.bfp_round`):
    #: every conv output that only convs read (not the model output, no residual add on either
    #: side, no pool) is stored as ``a_bits`` mantissas with one exponent per pixel and channel
    #: block of the array's rows. Needs an accelerator with ``bfp_exp_bits`` (``hw.build
    #: --block-scale --bfp-exp-bits N``). The model input stays uniform (the host quantizes it).
    bfp: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise QuantError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.weight_method not in WEIGHT_METHODS:
            raise QuantError(f"weight_method must be one of {', '.join(WEIGHT_METHODS)}, not {self.weight_method!r}")
        bc = self.bias_correction
        if isinstance(bc, bool):
            object.__setattr__(self, "bias_correction", "analytic" if bc else "none")
        elif bc not in BIAS_CORRECTIONS:
            raise QuantError(f"bias_correction must be one of {', '.join(BIAS_CORRECTIONS)}, not {bc!r}")
        if self.dsconv_block is not None and (not isinstance(self.dsconv_block, int)
                                              or isinstance(self.dsconv_block, bool) or self.dsconv_block < 1):
            raise QuantError(f"dsconv_block must be a positive integer, not {self.dsconv_block!r}")
        if self.weight_method == "dsconv" and self.bias_correction in ("analytic", "both"):
            raise QuantError("bias_correction analytic rescales whole channels; with weight_method dsconv "
                             "use none or empirical")
        if not isinstance(self.bfp, bool):
            raise QuantError(f"bfp must be True or False, not {self.bfp!r}")
        if not 0 < self.percentile <= 100:
            raise QuantError(f"percentile must be in (0, 100], not {self.percentile!r}")
        self._check_pot()

    def _check_pot(self):
        if self.pot_bits is not None and (not isinstance(self.pot_bits, int) or isinstance(self.pot_bits, bool)
                                          or not 2 <= self.pot_bits <= 8):
            raise QuantError(f"pot_bits must be an integer in 2..8, not {self.pot_bits!r}")
        if self.pot_granularity not in _pot.GRANULARITIES:
            raise QuantError(f"pot_granularity must be one of {', '.join(_pot.GRANULARITIES)}, "
                             f"not {self.pot_granularity!r}")
        if self.pot_scale not in _pot.POT_SCALES:
            raise QuantError(f"pot_scale must be one of {', '.join(_pot.POT_SCALES)}, not {self.pot_scale!r}")
        if self.pot_rounding not in _pot.POT_ROUNDINGS:
            raise QuantError(f"pot_rounding must be one of {', '.join(_pot.POT_ROUNDINGS)}, not {self.pot_rounding!r}")
        b = self.pot_budget
        if isinstance(b, bool) or not (isinstance(b, float) and 0 < b <= 1 or isinstance(b, int) and b >= 1):
            raise QuantError(f"pot_budget must be a fraction in (0, 1] or a whole number of bytes >= 1, not {b!r}")
        if self.pot_layers is not None:
            if isinstance(self.pot_layers, str) or not all(isinstance(n, str) for n in self.pot_layers):
                raise QuantError(f"pot_layers must be a sequence of layer names, not {self.pot_layers!r}")
            object.__setattr__(self, "pot_layers", tuple(self.pot_layers))


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
    #: ``w_q`` is power-of-two (0 or +-2**e): lowered as PoT codes with MATMUL ``pot = 1``.
    pot: bool = False
    #: Bits of one stored weight code in the number format (the weight-memory report).
    code_bits: int | None = None
    #: DSConv (:mod:`compiler.dsconv`): per (output channel, channel block of the array, tap)
    #: rescale ``mult``/``shift`` applied to each MATMUL tile's sums; ``None`` for other layers.
    block_mult: np.ndarray | None = None
    block_shift: np.ndarray | None = None
    #: The output is block floating point (``QuantOptions.bfp``): codes are ``a_bits`` mantissas
    #: in ``lo..hi`` with an exponent ``0..cfg.bfp_emax`` per pixel and channel block; ``scale``
    #: is the value of a mantissa unit at exponent 0.
    bfp: bool = False


def code_max(cfg: AccelConfig, ql: QLayer) -> int:
    """Largest magnitude of a tensor's integer values in units of its ``scale``: the code range,
    times ``2**bfp_emax`` for a block-floating-point tensor (a mantissa shifted by its exponent)."""
    return max(-ql.lo, ql.hi) << (cfg.bfp_emax if ql.bfp else 0)


@dataclass
class QGraph:
    graph: Graph
    config: AccelConfig
    layers: dict[str, QLayer] = field(default_factory=dict)
    options: QuantOptions = QuantOptions()
    w_bits: int = 8
    a_bits: int = 8
    #: PoT methods: the layers with PoT weights, their code width, and how they were chosen.
    pot_layers: frozenset = frozenset()
    pot_bits: int | None = None
    pot_info: dict | None = None
    #: Per-layer (weight bits, activation bits) of the layers given ``layer_bits`` (mixed precision).
    layer_bits: dict = field(default_factory=dict)


# -- float reference --------------------------------------------------------------------------

def float_forward(graph: Graph, x: torch.Tensor, record: bool = False):
    """Evaluate the (BN-folded, fused) graph in float; optionally return every layer's output."""
    vals = {}
    for l in graph.layers:
        if l.kind == "input":
            y = x
        elif l.kind == "conv":
            y = _conv(l, vals[l.inputs[0]])
            if l.residual:
                y = y + vals[l.residual]
            y = _act(y, l.act)
        elif l.kind == "maxpool":
            y = F.max_pool2d(vals[l.inputs[0]], l.kernel, l.stride, l.padding)
        else:
            y = F.avg_pool2d(vals[l.inputs[0]], l.kernel, l.stride, l.padding)
        vals[l.name] = y
    return vals if record else vals[graph.output]


def _conv(l: Layer, x, weight=None, bias=None):
    w = l.weight if weight is None else weight
    return F.conv2d(x, w.to(x.dtype), None if bias is None and l.bias is None else
                    (l.bias if bias is None else bias).to(x.dtype), l.stride, l.padding, 1, l.groups)


def _act(y, act):
    if act == "relu":
        return F.relu(y)
    if act == "relu6":
        return F.relu6(y)
    if isinstance(act, tuple):
        return torch.clamp(y, 0, act[1])
    return y


# -- quantizers and range estimators -----------------------------------------------------------

def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range: ``[-2**(b-1), 2**(b-1) - 1]`` signed, ``[0, 2**b - 1]`` unsigned."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _qmax(bits, signed):
    return qrange(bits, signed)[1]


def fake_quant(x, clip, bits: int, signed: bool):
    """Quantize-dequantize ``x`` with scale ``clip / qmax`` (broadcasts over ``clip``)."""
    lo, hi = qrange(bits, signed)
    s = np.asarray(clip, dtype=np.float64) / hi
    return np.clip(np.round(x / s), lo, hi) * s


def _sq_err(x: np.ndarray, clips: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Sum of squared quantization errors of ``x`` (1-D) for each clip, in memory-bounded chunks."""
    out = np.empty(len(clips))
    step = max(1, 4_000_000 // max(1, x.size))
    for i in range(0, len(clips), step):
        c = clips[i:i + step, None]
        out[i:i + step] = ((x[None, :] - fake_quant(x[None, :], c, bits, signed)) ** 2).sum(axis=1)
    return out


def mse_clip(x: np.ndarray, bits: int, signed: bool, n_grid: int = 100) -> float:
    """OMSE clip: minimise ``||x - Q(x)||^2`` over clips in ``(0, max]``.

    A log-spaced coarse grid (the optimum at 2 bits can sit far below the max) is refined by a
    linear grid between the best point's neighbours. The max itself is always a candidate, so the
    result is never worse than ``minmax`` on the same data.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    top = float(np.abs(x).max() if signed else np.maximum(x, 0).max()) if x.size else 0.0
    if top == 0.0:
        return 1.0
    coarse = top * np.geomspace(2.0 ** -10, 1.0, n_grid)
    err = _sq_err(x, coarse, bits, signed)
    i = int(np.argmin(err))
    lo, hi = coarse[max(i - 1, 0)], coarse[min(i + 1, n_grid - 1)]
    fine = np.linspace(lo, hi, 41)
    err_f = _sq_err(x, fine, bits, signed)
    j = int(np.argmin(err_f))
    return float(fine[j]) if err_f[j] < err[i] else float(coarse[i])


def aciq_k(bits: int, signed: bool, dist: str = "laplace") -> float:
    """ACIQ clip multiplier for ``bits`` (one-sided table when not ``signed``)."""
    if dist == "laplace":
        table = _ACIQ_LAPLACE if signed else _ACIQ_LAPLACE_ONESIDED
        return table[bits]
    if dist == "gauss":
        return _ACIQ_GAUSS[bits if signed else bits + 1]
    raise QuantError(f"ACIQ distribution must be laplace or gauss, not {dist!r}")


def aciq_clip(x: np.ndarray, bits: int, signed: bool, dist: str = "laplace") -> float:
    """ACIQ analytic clip, capped at the observed max.

    Signed tensors: fit around the mean (``b = mean|x - mu|`` or ``sigma``) and clip at
    ``|mu| + k * b`` because the grid is symmetric about 0. After a ReLU the positive part is
    treated as a half-Laplace / half-normal from 0: ``b = E[x | x > 0]``, ``sigma = sqrt(E[x^2 | x > 0])``.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    top = float(np.abs(x).max() if signed else np.maximum(x, 0).max()) if x.size else 0.0
    if top == 0.0:
        return 1.0
    k = aciq_k(bits, signed, dist)
    if signed:
        mu = float(x.mean())
        spread = float(np.mean(np.abs(x - mu))) if dist == "laplace" else float(x.std())
        clip = abs(mu) + k * spread
    else:
        pos = x[x > 0]
        spread = float(pos.mean()) if dist == "laplace" else float(np.sqrt(np.mean(pos ** 2)))
        clip = k * spread
    return min(top, clip) if clip > 0 else top


def estimate_clip(x: np.ndarray, bits: int, signed: bool, method: str, percentile: float = 99.99) -> float:
    """Clip (the real value of the largest code) of tensor samples ``x`` by ``method``."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    a = np.abs(x) if signed else np.maximum(x, 0)
    top = float(a.max()) if a.size else 0.0
    if top == 0.0:
        return 1.0
    if method == "minmax":
        return top
    if method == "percentile":
        return max(float(np.percentile(a, percentile)), top * 1e-3)
    if method == "mse":
        return mse_clip(x, bits, signed)
    if method == "aciq":
        return aciq_clip(x, bits, signed, "laplace")
    if method == "aciq_gauss":
        return aciq_clip(x, bits, signed, "gauss")
    raise QuantError(f"method must be one of {', '.join(METHODS)}, not {method!r}")


def pooled_mse_clip(x: torch.Tensor, bits: int, signed: bool, pools: list[Layer], n_grid: int = 60) -> float:
    """Clip for a tensor read only by average pools, chosen for the pooled outputs.

    An average pool keeps its input's scale (the POOL instruction divides by the window size
    and rounds back onto the same grid), so a global average pool of a 4-bit tensor has 4-bit
    resolution although it averages 49 values that rarely approach the clip. This picks the
    clip minimising ``sum ||pool(x) - Q(pool(Q(x)))||^2`` over the pools (OMSE, evaluated on the
    calibration batch) instead of the error of ``x`` itself.
    """
    x = x.double()
    top = float(x.abs().max() if signed else x.clamp(min=0).max())
    if top == 0.0:
        return 1.0
    lo, hi = qrange(bits, signed)
    refs = [F.avg_pool2d(x, p.kernel, p.stride, p.padding) for p in pools]

    def err(c):
        s = c / hi
        xq = torch.clamp(torch.round(x / s), lo, hi)
        return sum(float(((torch.clamp(torch.round(F.avg_pool2d(xq, p.kernel, p.stride, p.padding)), lo, hi) * s
                           - r) ** 2).sum()) for p, r in zip(pools, refs))

    coarse = top * np.geomspace(2.0 ** -8, 1.0, n_grid)
    e = [err(c) for c in coarse]
    i = int(np.argmin(e))
    fine = np.linspace(coarse[max(i - 1, 0)], coarse[min(i + 1, n_grid - 1)], 21)
    ef = [err(c) for c in fine]
    j = int(np.argmin(ef))
    return float(fine[j]) if ef[j] < e[i] else float(coarse[i])


def weight_scales(w: np.ndarray, bits: int, method: str = "minmax", n_grid: int = 80) -> np.ndarray:
    """Per-output-channel symmetric weight scales (``clip / qmax``).

    ``mse`` searches each channel's clip in ``[0.1, 1] * max|w|`` (linear grid, the max included)
    for the least ``||w - Q(w)||^2``; all channels are searched at once.
    """
    if method not in ("minmax", "mse"):
        raise QuantError(f"weight scales come from minmax or mse, not {method!r}")
    q = _qmax(bits, True)
    flat = np.asarray(w, dtype=np.float64).reshape(w.shape[0], -1)
    top = np.abs(flat).max(axis=1)
    top = np.where(top == 0, 1.0, top)
    if method == "minmax":
        return top / q
    ratios = np.linspace(0.1, 1.0, n_grid)
    clips = top[:, None] * ratios[None, :]  # (Cout, n_grid)
    s = (clips / q)[:, :, None]
    err = ((flat[:, None, :] - np.clip(np.round(flat[:, None, :] / s), -q - 1, q) * s) ** 2).sum(axis=2)
    return clips[np.arange(len(top)), np.argmin(err, axis=1)] / q


def mult_shift(cfg: AccelConfig, ms: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """Integer multipliers and one shift per channel for the real multipliers in ``ms``.

    The shift is the largest that keeps the biggest multiplier of each channel within
    ``mult_bits`` (``M * 2**shift <= 2**mult_bits - 1``), so that multiplier keeps at least
    ``mult_bits - 1`` significant bits (relative error <= 2**-(mult_bits - 1)); the others share
    the shift because POST applies one shift to ``(acc + bias) * mult + residual * res_mult``.
    """
    top = (1 << cfg.mult_bits) - 1
    biggest = np.max(np.stack([np.asarray(m, dtype=np.float64) for m in ms]), axis=0)
    if (biggest > top).any():
        raise QuantError(f"requantization multiplier {float(biggest.max()):.3g} too large for "
                         f"mult_bits={cfg.mult_bits}")
    biggest = np.where(biggest <= 0, 1e-30, biggest)
    shift = np.floor(np.log2(top / biggest)).astype(np.int64)
    shift = np.clip(shift, 0, (1 << cfg.shift_bits) - 1)
    outs = []
    for mreal in ms:
        q = np.round(np.asarray(mreal, dtype=np.float64) * np.exp2(shift)).astype(np.int64)
        outs.append(np.minimum(q, top))  # guards log2 landing one ulp high
    return outs, shift


# -- bias correction ----------------------------------------------------------------------------

def _patch_mean(l: Layer, x: torch.Tensor) -> np.ndarray:
    """E[x] over every tap of the receptive field, (Cin, kh, kw), zero padding included."""
    kh, kw = l.weight.shape[2:]
    cols = F.unfold(x.double(), (kh, kw), padding=l.padding, stride=l.stride)  # (N, Cin*kh*kw, L)
    return cols.mean(dim=(0, 2)).numpy().reshape(x.shape[1], kh, kw)


def _patches(l: Layer, x: torch.Tensor, max_rows: int = 50_000) -> np.ndarray:
    """Receptive-field vectors of the layer's input, (n, Cin*kh*kw), zero padding included
    (a seeded subsample of at most ``max_rows``)."""
    kh, kw = l.weight.shape[2:]
    cols = F.unfold(x.double(), (kh, kw), padding=l.padding, stride=l.stride)  # (N, K, L)
    cols = cols.permute(0, 2, 1).reshape(-1, cols.shape[1]).numpy()
    if len(cols) > max_rows:
        cols = cols[np.random.default_rng(0).choice(len(cols), max_rows, replace=False)]
    return cols


def gptq_round(w: np.ndarray, w_scale: np.ndarray, bits: int, patches: np.ndarray, groups: int = 1,
               damp: float = 0.01, rounder=None) -> np.ndarray:
    """Integer weights by GPTQ / OBQ rounding (Frantar et al. 2022) on fixed per-channel scales.

    Instead of rounding every weight to nearest, quantize the inputs of each output channel one at
    a time (largest input energy first) and spread each rounding error over the weights not yet
    quantized, weighted by the inverse of ``H = E[x x^T]`` of the layer's calibration inputs, which
    minimises the layer's output error ``E||(W - W_q) x||^2`` rather than ``||W - W_q||^2``.
    ``patches`` is (n, Cin*kh*kw) from the float calibration input; grouped convolutions use
    their group's slice of it. Returns int64 codes shaped like ``w``. ``rounder`` replaces the
    uniform ``bits`` grid (a function from real values in units of the scale to integers, e.g.
    the power-of-two rounding of :func:`compiler.pot.round_pot`).
    """
    lo, hi = qrange(bits, True)
    cout, cin_g, kh, kw = w.shape
    k = cin_g * kh * kw
    per_g = cout // groups
    out = np.empty((cout, k), np.int64)
    for g in range(groups):
        rows = slice(g * per_g, (g + 1) * per_g)
        x = patches[:, g * k:(g + 1) * k]
        W = w[rows].reshape(per_g, k).copy()
        s = w_scale[rows][:, None]
        H = x.T @ x / len(x)
        dead = np.diag(H) <= 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        H += damp * np.mean(np.diag(H)) * np.eye(k)
        order = np.argsort(-np.diag(H), kind="stable")
        H, W = H[np.ix_(order, order)], W[:, order]
        # Upper Cholesky factor of H^-1: row i holds the error-propagation weights of column i.
        U = np.linalg.cholesky(np.linalg.inv(H)).T
        Q = np.empty_like(W)
        for i in range(k):
            q = np.clip(np.round(W[:, i:i + 1] / s), lo, hi) if rounder is None else rounder(W[:, i:i + 1] / s)
            Q[:, i:i + 1] = q
            err = (W[:, i:i + 1] - q * s) / U[i, i]
            W[:, i + 1:] -= err * U[i, i + 1:][None, :]
        unperm = np.empty_like(Q)
        unperm[:, order] = Q
        out[rows] = unperm.astype(np.int64)
    return out.reshape(w.shape)


def analytic_bias_correction(w: np.ndarray, w_q: np.ndarray, w_scale: np.ndarray, bias: np.ndarray,
                             in_mean: np.ndarray, groups: int = 1):
    """Banner et al. per-channel weight correction, folded into (scale, bias).

    The hardware weights of channel ``o`` become ``ratio_o * w_scale_o * w_q`` (std matched to the
    float weights); the remaining additive part ``d_o = mean(w_o) - ratio_o * mean(w_scale_o * w_q_o)``
    applies to every tap, so it adds ``d_o * sum_{c,kh,kw} E[x_{c,kh,kw}]`` to the bias, with
    ``in_mean`` (Cin, kh, kw) from the layer's calibration input.
    Returns (new w_scale, new bias).
    """
    wr = w_q * w_scale.reshape(-1, 1, 1, 1)
    axes = (1, 2, 3)
    std_f, std_q = w.std(axis=axes), wr.std(axis=axes)
    ratio = np.where(std_q > 0, std_f / np.where(std_q > 0, std_q, 1), 1.0)
    d = w.mean(axis=axes) - ratio * wr.mean(axis=axes)
    cout, cin_g = w.shape[:2]
    per_g = cout // groups
    field_sum = np.array([in_mean[(o // per_g) * cin_g:(o // per_g + 1) * cin_g].sum() for o in range(cout)])
    return w_scale * ratio, bias + d * field_sum


# -- integer simulation -------------------------------------------------------------------------

def _round_shift(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    # Same rounding as sim.golden.round_shift (ties away from zero); kept local so the compiler
    # does not import the simulator. tests/test_quantize.py checks simulate() against golden.
    half = np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 0)
    return np.right_shift(x + half - ((x < 0) & (s > 0)), s)


def _int_conv(l: Layer, ql: QLayer, xq: np.ndarray, cfg: AccelConfig | None = None) -> np.ndarray:
    # float64 convolution of integer tensors is exact while |acc| < 2**53 (acc_width <= 48).
    if ql.block_mult is not None:
        return _int_conv_blocks(l, ql, xq, cfg)
    acc = F.conv2d(torch.from_numpy(xq.astype(np.float64)), torch.from_numpy(ql.w_q.astype(np.float64)),
                   None, l.stride, l.padding, 1, l.groups)
    return np.rint(acc.numpy()).astype(np.int64)


def _wrap(x: np.ndarray, bits: int) -> np.ndarray:
    half = np.int64(1) << np.int64(bits - 1)
    return ((x + half) & ((half << 1) - 1)) - half


def _int_conv_blocks(l: Layer, ql: QLayer, xq: np.ndarray, cfg: AccelConfig) -> np.ndarray:
    """A DSConv layer as the hardware sums it: each tile's (tap, channel block) sums, wrapped at
    ``acc_width`` like the array's, rescaled by its block scale, then accumulated (wrapping)."""
    from .kernels import dense_weights

    R = cfg.rows
    w = dense_weights(ql.w_q, l.groups).astype(np.float64)
    cout, cin, kh, kw = w.shape
    x = torch.from_numpy(xq.astype(np.float64))
    acc = 0
    for cb in range(-(-cin // R)):
        xb = x[:, cb * R:(cb + 1) * R]
        for dy in range(kh):
            for dx in range(kw):
                wt = np.zeros((cout, xb.shape[1], kh, kw))
                wt[:, :, dy, dx] = w[:, cb * R:(cb + 1) * R, dy, dx]
                if not wt.any():
                    continue
                p = F.conv2d(xb, torch.from_numpy(wt), None, l.stride, l.padding)
                p = _wrap(np.rint(p.numpy()).astype(np.int64), cfg.acc_width)
                m = ql.block_mult[:, cb, dy, dx].reshape(1, -1, 1, 1)
                sh = ql.block_shift[:, cb, dy, dx].reshape(1, -1, 1, 1)
                acc = _wrap(acc + _round_shift(p * m, sh), cfg.acc_width)
    if isinstance(acc, int):  # every tile zero
        oh = (xq.shape[2] + 2 * l.padding[0] - kh) // l.stride[0] + 1
        ow = (xq.shape[3] + 2 * l.padding[1] - kw) // l.stride[1] + 1
        acc = np.zeros((len(xq), cout, oh, ow), np.int64)
    return acc


def _requant(ql: QLayer, acc: np.ndarray, res: np.ndarray | None, cfg: AccelConfig) -> np.ndarray:
    """POST of one layer; a block-floating-point output (``ql.bfp``) as its values, each mantissa
    shifted left by its block's exponent (:func:`compiler.dsconv.bfp_round`)."""
    t = (acc + ql.bias_q.reshape(1, -1, 1, 1)) * ql.mult.reshape(1, -1, 1, 1)
    if res is not None:
        t = t + res * ql.res_mult.reshape(1, -1, 1, 1)
    y = _round_shift(t, ql.shift.reshape(1, -1, 1, 1))
    if ql.bfp:
        from .dsconv import bfp_round

        mant, exp = bfp_round(y, ql.lo, ql.hi, cfg.bfp_emax, cfg.rows)
        return mant << np.repeat(exp, cfg.rows, axis=1)[:, :y.shape[1]]
    return np.clip(y, ql.lo, ql.hi)


def _int_pool(qg: QGraph, l: Layer, xq: np.ndarray) -> np.ndarray:
    from .kernels import avg_pool_mult  # the exact constants lowering puts in the POOL instruction
    t = torch.from_numpy(xq.astype(np.float64))
    if l.kind == "maxpool":
        return np.rint(F.max_pool2d(t, l.kernel, l.stride, l.padding).numpy()).astype(np.int64)
    kh, kw = l.kernel
    total = np.rint(F.avg_pool2d(t, l.kernel, l.stride, l.padding).numpy() * (kh * kw)).astype(np.int64)
    mult, shift = avg_pool_mult(qg.config, kh * kw)
    lo, _ = qrange(qg.a_bits, qg.layers[l.name].signed)
    return np.clip(_round_shift(total * mult, np.int64(shift)), lo, lo + (1 << qg.a_bits) - 1)


def _quantize_input(ql: QLayer, x: np.ndarray) -> np.ndarray:
    # As hw.program.quantize_input: np.round (ties to even) then clamp.
    return np.clip(np.round(np.asarray(x, np.float64) / ql.scale), ql.lo, ql.hi).astype(np.int64)


def simulate(qg: QGraph, x, record: bool = False):
    """Run the quantized graph on a float batch (N, C, H, W) with the accelerator's integer
    arithmetic, vectorised over the batch.

    Returns the float logits of the output layer (``(acc + bias_q) * s_x * s_w`` as
    :func:`hw.program.decode_output`), or with ``record`` a dict of every layer's integer codes
    (the output layer: raw accumulators ``acc``). Matches :class:`sim.golden.Machine` bit for bit
    on the programs :func:`compiler.lower.lower` emits (tested); it exists so calibration passes
    and quick sweeps need not run the instruction-level model.
    """
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    codes: dict[str, np.ndarray] = {}
    out = None
    for l in qg.graph.layers:
        ql = qg.layers[l.name]
        if l.kind == "input":
            codes[l.name] = _quantize_input(ql, x)
        elif l.kind == "conv":
            acc = _int_conv(l, ql, codes[l.inputs[0]], qg.config)
            if l.name == qg.graph.output:
                codes[l.name] = acc
                out = (acc + ql.bias_q.reshape(1, -1, 1, 1)) * (qg.layers[l.inputs[0]].scale * ql.w_scale).reshape(1, -1, 1, 1)
            else:
                codes[l.name] = _requant(ql, acc, codes[l.residual] if l.residual else None, qg.config)
        else:
            codes[l.name] = _int_pool(qg, l, codes[l.inputs[0]])
    return codes if record else out.reshape(len(x), -1)


# -- driver ------------------------------------------------------------------------------------

def quantize(graph: Graph, cfg: AccelConfig, calib: torch.Tensor, opts: QuantOptions = QuantOptions(),
             w_bits: int | None = None, a_bits: int | None = None, *, layer_bits: dict | None = None,
             act_scales: dict | None = None, w_scales: dict | None = None) -> QGraph:
    """Calibrate on ``calib`` (N, C, H, W float) and quantize every layer.

    Per-layer mixed precision (:mod:`compiler.mixed`): ``layer_bits`` maps a conv/linear layer's
    name to ``(weight bits, activation bits)`` (either may be ``None``: the global width), each at
    most the accelerator's. The weight bits set that layer's code range and ``code_bits`` (the
    packed weight-memory report); the activation bits set its output clamp ``lo``/``hi`` (POST
    clamps per layer, so narrower codes need nothing else). The model input keeps the global
    activation width (the host quantizes it at the accelerator's ``a_bits``).

    Learned scales (:mod:`compiler.qat`): ``act_scales`` maps a layer (the input or a conv) to its
    output activation scale, used as is instead of a range estimate; ``w_scales`` maps a conv to
    its per-output-channel weight scales, with which its weights are rounded to nearest (ties to
    even) and clamped, exactly as the QAT forward did (``weight_method`` does not apply to it).
    Without these keywords nothing changes.
    """
    wb = w_bits or cfg.w_bits
    ab = a_bits or cfg.a_bits
    if wb > cfg.w_bits or ab > cfg.a_bits:
        raise QuantError(f"W{wb}A{ab} does not fit a W{cfg.w_bits}A{cfg.a_bits} accelerator")
    per_layer = _check_layer_bits(graph, cfg, layer_bits or {}, wb, ab)
    act_scales, w_scales = act_scales or {}, w_scales or {}
    calib = torch.as_tensor(calib, dtype=torch.float32)
    with torch.no_grad():
        vals = float_forward(graph, calib, record=True)
    qg = QGraph(graph, cfg, options=opts, w_bits=wb, a_bits=ab, layer_bits=per_layer)
    if opts.weight_method in POT_METHODS:
        _pot.plan(qg, calib, wb)
    if opts.weight_method == "dsconv" and not cfg.block_scale:
        raise QuantError("weight_method dsconv needs an accelerator with block_scale (hw.build --block-scale): "
                         f"{cfg.describe()} has none")
    if opts.bfp and not cfg.bfp_exp_bits:
        raise QuantError("bfp (block-floating-point activations) needs an accelerator with bfp_exp_bits "
                         f"(hw.build --block-scale --bfp-exp-bits N): {cfg.describe()} has none")
    if opts.bfp and cfg.cols % cfg.rows:
        raise QuantError(f"bfp needs cols ({cfg.cols}) to be a multiple of rows ({cfg.rows}): a spad row's "
                         "exponent is computed by the one POST that writes the row")
    empirical = opts.bias_correction in ("empirical", "both")
    codes: dict[str, np.ndarray] = {}  # integer codes of the network built so far (empirical BC)
    rng = np.random.default_rng(0)
    consumers = {l.name: [] for l in graph.layers}
    for l in graph.layers:
        for src in l.inputs + ([l.residual] if l.residual else []):
            consumers[src].append(l)
    bfp = bfp_layers(graph) if opts.bfp else set()
    for l in graph.layers:
        if l.kind in ("maxpool", "avgpool"):
            src = qg.layers[l.inputs[0]]
            ql = QLayer(l, src.scale, src.signed, src.lo, src.hi)
        else:
            lwb, lab = per_layer.get(l.name, (wb, ab))
            v = vals[l.name].numpy().reshape(-1)
            if l.name in act_scales:
                signed = bool(v.min() < 0) if l.kind == "input" else l.act is None
                lo, hi = qrange(lab, signed)
                ql = QLayer(l, float(act_scales[l.name]) / (1 << cfg.bfp_emax if l.name in bfp else 1),
                            signed, lo, hi, bfp=l.name in bfp)
            else:
                if v.size > _MAX_SAMPLES:
                    v = rng.choice(v, _MAX_SAMPLES, replace=False)
                signed = bool(v.min() < 0) if l.kind == "input" else l.act is None
                clip = estimate_clip(v, lab, signed, opts.method, opts.percentile)
                pools = [c for c in consumers[l.name] if c.kind == "avgpool"]
                if opts.pool_aware and pools and len(pools) == len(consumers[l.name]):
                    clip = pooled_mse_clip(vals[l.name], lab, signed, pools)
                if l.act == "relu6":
                    clip = min(clip, 6.0)
                elif isinstance(l.act, tuple):
                    clip = min(clip, l.act[1])
                lo, hi = qrange(lab, signed)
                # A BFP tensor's largest blocks (exponent bfp_emax) get the uniform code's step.
                ql = QLayer(l, clip / hi / (1 << cfg.bfp_emax if l.name in bfp else 1), signed, lo, hi,
                            bfp=l.name in bfp)
            if l.kind == "conv":
                _quantize_conv(qg, ql, lwb, vals, codes if empirical else None, w_scales.get(l.name))
        qg.layers[l.name] = ql
        if empirical:
            if l.kind == "input":
                codes[l.name] = _quantize_input(ql, calib.numpy())
            elif l.kind == "conv":
                pass  # filled by _quantize_conv
            else:
                codes[l.name] = _int_pool(qg, l, codes[l.inputs[0]])
    return qg


def bfp_layers(graph: Graph) -> set[str]:
    """The layers whose outputs are stored block floating point under ``QuantOptions.bfp``: conv
    layers other than the model output, without a residual add, whose every reader is a conv
    reading it as its input (a BFP POST cannot add a residual, and POOL and residual operands see
    raw mantissas). The array must write each spad row with one POST (``cols`` a multiple of
    ``rows``: one exponent per row); :func:`quantize` checks that."""
    readers = {l.name: [] for l in graph.layers}
    for l in graph.layers:
        for src in l.inputs:
            readers[src].append((l, "input"))
        if l.residual:
            readers[l.residual].append((l, "residual"))
    return {l.name for l in graph.layers
            if l.kind == "conv" and l.name != graph.output and not l.residual and readers[l.name]
            and all(r.kind == "conv" and how == "input" for r, how in readers[l.name])}


def _check_layer_bits(graph: Graph, cfg: AccelConfig, layer_bits: dict, wb: int, ab: int) -> dict:
    """``layer_bits`` checked and completed: {conv name: (weight bits, activation bits)}."""
    convs = [l.name for l in graph.layers if l.kind == "conv"]
    out = {}
    for name, bits in layer_bits.items():
        if name not in convs:
            raise QuantError(f"layer_bits: {name!r} is not a conv/linear layer (layers: {', '.join(convs)})")
        w, a = (bits, None) if isinstance(bits, int) else tuple(bits)
        w, a = w or wb, a or ab
        for what, v, top in (("weight", w, cfg.w_bits), ("activation", a, cfg.a_bits)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 2 <= v <= top:
                raise QuantError(f"layer_bits: {name} {what} bits must be an integer in 2..{top} "
                                 f"(the accelerator's {what} width), not {v!r}")
        out[name] = (int(w), int(a))
    return out


def _quantize_conv(qg: QGraph, ql: QLayer, wb: int, vals: dict, codes: dict | None, w_scale=None):
    cfg, l, opts = qg.config, ql.layer, qg.options
    x = qg.layers[l.inputs[0]]
    w = l.weight.numpy().astype(np.float64)
    qmin, qmax = qrange(wb, True)
    ql.code_bits = wb
    if w_scale is not None:  # learned (QAT): round to nearest on the given per-channel scales
        sw = np.asarray(w_scale, dtype=np.float64).reshape(-1)
        wq = np.clip(np.round(w / sw.reshape(-1, 1, 1, 1)), qmin, qmax).astype(np.int64)
    elif opts.weight_method in POT_METHODS:
        wq, sw, ql.pot, ql.code_bits = _pot.quantize_weights(qg, l, w, wb, lambda: _patches(l, vals[l.inputs[0]]))
    elif opts.weight_method == "dsconv":
        from .dsconv import DSConvError, block_quantize, fixed_point_scales

        try:
            wq, alpha = block_quantize(w, wb, opts.dsconv_block or cfg.rows, cfg.rows, l.groups)
        except DSConvError as e:
            raise QuantError(f"layer {l.name}: {e}") from None
        ql.block_mult, ql.block_shift, sw, _ = fixed_point_scales(
            wq, alpha, cfg.rows, l.groups, cfg.mult_bits, (1 << cfg.shift_bits) - 1, code_max(cfg, x), cfg.acc_width)
    elif opts.weight_method == "gptq":
        sw = weight_scales(w, wb, "mse")
        with torch.no_grad():
            wq = gptq_round(w, sw, wb, _patches(l, vals[l.inputs[0]]), l.groups)
    else:
        sw = weight_scales(w, wb, opts.weight_method)
        wq = np.clip(np.round(w / sw.reshape(-1, 1, 1, 1)), qmin, qmax).astype(np.int64)
    bias = l.bias.numpy().astype(np.float64) if l.bias is not None else np.zeros(w.shape[0])
    if opts.bias_correction in ("analytic", "both"):
        with torch.no_grad():
            in_mean = _patch_mean(l, vals[l.inputs[0]])
        sw, bias = analytic_bias_correction(w, wq, sw, bias, in_mean, l.groups)
    ql.w_q, ql.w_scale = wq, sw
    ms = [x.scale * sw / ql.scale]
    if l.residual:
        ms.append(np.full(len(sw), qg.layers[l.residual].scale / ql.scale))
    outs, ql.shift = mult_shift(cfg, ms)
    ql.mult = outs[0]
    ql.res_mult = outs[1] if l.residual else np.zeros_like(outs[0])
    _set_bias(qg, ql, bias)
    if codes is None:
        return
    # Empirical bias correction: pre-activation mean error of the integer network so far against
    # the float network, per output channel, folded into the bias (Nagel et al. 2019, sec. 4.2).
    acc = _int_conv(l, ql, codes[l.inputs[0]], cfg)
    acc_scale = (x.scale * sw).reshape(1, -1, 1, 1)
    y_q = (acc + ql.bias_q.reshape(1, -1, 1, 1)) * acc_scale
    with torch.no_grad():
        y_f = _conv(l, vals[l.inputs[0]].double()).numpy()
    if l.residual:
        r = qg.layers[l.residual]
        y_q = y_q + codes[l.residual] * r.scale
        y_f = y_f + vals[l.residual].double().numpy()
    # The bias the hardware adds is bias_q * acc_scale, so correct relative to that, not `bias`.
    _set_bias(qg, ql, ql.bias_q * acc_scale.reshape(-1) + (y_f - y_q).mean(axis=(0, 2, 3)))
    acc_res = codes[l.residual] if l.residual else None
    codes[l.name] = acc if l.name == qg.graph.output else _requant(ql, acc, acc_res, cfg)


def _set_bias(qg: QGraph, ql: QLayer, bias: np.ndarray):
    acc_scale = qg.layers[ql.layer.inputs[0]].scale * ql.w_scale
    bmax = (1 << (qg.config.bias_bits - 1)) - 1
    ql.bias_q = np.clip(np.round(bias / acc_scale), -bmax - 1, bmax).astype(np.int64)
