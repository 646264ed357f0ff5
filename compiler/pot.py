"""Power-of-two (PoT) weights: INQ, DoubleQ and DoubleQExt (../shared/METHODS.md, "Power-of-two
weights").

Integer form
------------
A PoT layer's integer weights (``QLayer.w_q``) are 0 or ``+-2**e`` with ``0 <= e <= e_max``; the
real weight is ``w_q * w_scale[o]``, where ``w_scale`` is a power of two per output channel (or
one per layer) for INQ and the level-1 int8 scale for DoubleQ. The scale folds into the requant
multiplier exactly like an int layer's per-channel weight scale, so the PEs only shift. Lowering
turns ``w_q`` into the hardware's codes with :func:`hw.isa.pot_encode` (sign + magnitude code
``k``; ``k == 0`` is 0, ``k >= 1`` is ``2**(k-1)``); nothing here builds a code.

``e_max`` for ``b``-bit codes is :attr:`hw.config.AccelConfig.pot_max_exp` of a ``b``-bit
config (``2**(b-1) - 2`` capped by ``POT_EXP_CAP``): INQ uses every exponent the code allows, so
5-bit INQ spans 15 octaves rather than the paper's 8 (more levels can only lower the rounding
error, because the levels are a superset).

Methods (``QuantOptions.weight_method``)
----------------------------------------
* ``inq`` (Zhou et al. 2017): levels ``{+-2**n1, ..., +-2**(n1-e_max), 0}`` with
  ``n1 = floor(log2(4 * max|W| / 3))`` per layer or per output channel
  (``QuantOptions.pot_granularity``), each weight rounded to the nearest level in the linear
  domain (ties to the larger magnitude, as INQ's ``(a + b) / 2 <= |w|`` rule). ``n1`` is chosen
  so that ``max|W| < 1.5 * 2**n1``: no weight ever wants ``2**(n1+1)``.
  Beyond the paper, for post-training use: ``pot_scale="lsq"`` (a fitted per-channel scale, see
  :func:`inq_quantize`) and ``pot_rounding="gptq"`` (GPTQ error compensation over the PoT levels).
  :func:`inq_retrain` is INQ's incremental re-training (optional, minutes on the CPU).
* ``doubleq`` (IEEE Access 2021): level 1 = 8-bit per-channel min-max int weights; level 2 =
  each int8 weight rounded to the nearest power of two (same rule), keeping the level-1 scale.
  Exponents 0..7 need ``k`` up to 8: a 5-bit code, 62.5 % of the 8-bit storage (the paper's
  -37.5 %).
* ``doubleqext``: level 2 only on the layers whose PoT rounding costs least, under a weight
  memory budget (:func:`select_layers`, :func:`doubleqext_plan`). A mix needs ``pe_kind
  hybrid``; on ``pot`` every layer is PoT; on ``int`` it is an error.

With ``pot_layers`` (a mix on a ``hybrid`` array) the other layers of ``inq`` are per-channel
min-max INT at the weight bits, those of ``doubleq*`` are the level-1 int8 weights.

Weight memory (:func:`weight_bytes`): a layer's parameters x its code bits (8 for int8 layers,
the PoT code width for PoT layers) -- the storage the number format needs, which is what the
budget constrains. The physical wmem of a ``hybrid`` accelerator is one ``w_bits`` width for every
row, so there PoT layers save format bytes, not wmem rows; a ``pot`` accelerator built at
``w_bits = b`` has a ``b``-bit wmem.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from hw.config import AccelConfig

__all__ = [
    "POT_METHODS", "GRANULARITIES", "POT_SCALES", "POT_ROUNDINGS", "DOUBLEQ_L1_BITS", "DOUBLEQ_POT_BITS", "e_max", "round_pot", "inq_n1",
    "inq_quantize", "doubleq_quantize", "weight_bytes", "select_layers", "plan",
    "quantize_weights", "doubleqext_plan", "inq_retrain", "retrain_recipe",
]

POT_METHODS = ("inq", "doubleq", "doubleqext")
GRANULARITIES = ("layer", "channel")
#: INQ scale: ``pow2`` (the paper's power-of-two levels) or ``lsq`` (least-squares fitted).
POT_SCALES = ("pow2", "lsq")
#: INQ rounding: ``nearest`` (the paper) or ``gptq`` (error-compensating, on calibration inputs).
POT_ROUNDINGS = ("nearest", "gptq")
#: DoubleQ's level 1 is static 8-bit weights (the paper's definition, whatever the array width).
DOUBLEQ_L1_BITS = 8
#: Code width DoubleQ needs: sign + k for exponents 0..7 (k = 1..8, 4 bits).
DOUBLEQ_POT_BITS = 5


def _quant_error(msg: str):
    from .quantize import QuantError  # local: quantize imports this module

    return QuantError(msg)


def e_max(cfg: AccelConfig, bits: int) -> int:
    """Largest exponent of a ``bits``-bit PoT code on this hardware (``hw.config`` defines it)."""
    return dataclasses.replace(cfg, w_bits=bits, pe_kind="pot").pot_max_exp


# -- rounding --------------------------------------------------------------------------------------

def round_pot(v, emax: int) -> np.ndarray:
    """Nearest member of ``{0, +-2**0, ..., +-2**emax}`` to each real ``v`` (linear domain).

    Ties go to the larger magnitude (INQ's rule); magnitudes beyond ``2**emax`` saturate to it.
    Exact: the thresholds ``0.5`` and ``1.5 * 2**e`` are read off the binary exponent
    (``np.frexp``), not from a floating-point log.
    """
    a = np.abs(np.asarray(v, dtype=np.float64))
    m, ex = np.frexp(a)  # a = m * 2**ex, m in [0.5, 1)
    e = ex - 1 + (m >= 0.75)  # floor(log2 a), +1 when a >= 1.5 * 2**floor(log2 a)
    e = np.clip(e, 0, emax)
    mag = np.where(a >= 0.5, np.left_shift(np.int64(1), e.astype(np.int64)), 0)
    return np.where(np.asarray(v) < 0, -mag, mag).astype(np.int64)


def inq_n1(w: np.ndarray, granularity: str = "channel") -> np.ndarray:
    """INQ's top exponent ``floor(log2(4 * max|W| / 3))`` per output channel (``granularity``
    ``layer``: the layer's one value repeated). An all-zero channel gets 0 (its weights are 0)."""
    flat = np.abs(np.asarray(w, dtype=np.float64)).reshape(len(w), -1)
    top = flat.max(axis=1) if granularity == "channel" else np.full(len(w), flat.max())
    top = np.where(top > 0, top, 0.75)
    # frexp is exact: 4/3 * top = m * 2**ex with m in [0.5, 1) -> floor(log2) = ex - 1.
    return (np.frexp(top * 4 / 3)[1] - 1).astype(np.int64)


def inq_quantize(w: np.ndarray, emax: int, granularity: str = "channel", scale: str = "pow2",
                 iters: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """INQ PoT weights: (integer weights ``0 | +-2**e``, ``e <= emax``; scale per output channel).

    ``scale="pow2"`` is INQ: the scale is ``2**(n1 - emax)``, so the real levels are powers of two.
    ``scale="lsq"`` keeps the PoT integer weights but fits the scale (per ``granularity``) by
    alternating least squares, ``s = <w, q> / <q, q>`` then ``q = round_pot(w / s)``, starting from
    INQ's: a power-of-two grid anchored at ``2**n1`` can miss a channel's weights by up to a
    factor 4/3 in gain, which no rounding can fix but a free scale can (it folds into the requant
    multiplier like any weight scale). Never worse than ``pow2`` in ``||w - s q||^2``.
    """
    if granularity not in GRANULARITIES:
        raise _quant_error(f"pot_granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    if scale not in POT_SCALES:
        raise _quant_error(f"pot_scale must be one of {', '.join(POT_SCALES)}, not {scale!r}")
    w = np.asarray(w, np.float64)
    bshape = (-1, *([1] * (w.ndim - 1)))
    s = np.exp2((inq_n1(w, granularity) - emax).astype(np.float64))
    q = round_pot(w / s.reshape(bshape), emax)
    if scale == "lsq":
        flat = w.reshape(len(w), -1)
        axis = 1 if granularity == "channel" else None

        def err(s, q):
            e = ((flat - q.reshape(len(w), -1) * s[:, None]) ** 2).sum(axis=1)
            return e if axis else np.full(len(w), e.sum())

        best = err(s, q)
        for _ in range(iters):
            qf = q.reshape(len(w), -1).astype(np.float64)
            num, den = (flat * qf).sum(axis=axis), (qf * qf).sum(axis=axis)
            s_new = np.broadcast_to(np.where(den > 0, num / np.where(den > 0, den, 1), 1.0), s.shape)
            s_new = np.where(s_new > 0, s_new, s)
            q_new = round_pot(w / s_new.reshape(bshape), emax)
            e = err(s_new, q_new)
            better = e < best  # per channel (all-or-nothing per layer): keep only improvements
            s = np.where(better, s_new, s)
            q = np.where(better.reshape(bshape), q_new, q)
            best = np.minimum(best, e)
    return q, s


def doubleq_quantize(w: np.ndarray, emax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DoubleQ: (level-1 int8 weights, level-2 PoT weights, the shared per-channel scale)."""
    from .quantize import qrange, weight_scales

    lo, hi = qrange(DOUBLEQ_L1_BITS, True)
    s = weight_scales(w, DOUBLEQ_L1_BITS, "minmax")
    q1 = np.clip(np.round(np.asarray(w, np.float64) / s.reshape(-1, *([1] * (np.ndim(w) - 1)))), lo, hi)
    return q1.astype(np.int64), round_pot(q1, emax), s


def weight_bytes(n_weights: int, bits: int) -> int:
    """Bytes of ``n_weights`` codes of ``bits`` each, packed."""
    return -(-int(n_weights) * int(bits) // 8)


# -- which layers are PoT ------------------------------------------------------------------------

def _convs(graph) -> list:
    return [l for l in graph.layers if l.kind == "conv"]


def _pot_bits(qg, wb: int) -> int:
    """Code width of the PoT layers of ``qg`` (checked against the accelerator)."""
    opts, cfg = qg.options, qg.config
    bits = opts.pot_bits
    if bits is None:
        bits = wb if opts.weight_method == "inq" else min(DOUBLEQ_POT_BITS, cfg.w_bits)
    if bits > cfg.w_bits:
        raise _quant_error(f"pot_bits {bits} does not fit the accelerator's {cfg.w_bits}-bit weight memory")
    return bits


def plan(qg, calib: torch.Tensor, wb: int) -> None:
    """Decide which conv layers of ``qg`` get PoT weights and at which code width (sets
    ``qg.pot_layers``, ``qg.pot_bits``, ``qg.pot_info``). Called by :func:`compiler.quantize.quantize`."""
    opts, cfg, graph = qg.options, qg.config, qg.graph
    names = [l.name for l in _convs(graph)]
    qg.pot_bits = _pot_bits(qg, wb)
    if opts.weight_method != "inq" and cfg.w_bits < DOUBLEQ_L1_BITS and cfg.pe_kind != "pot":
        raise _quant_error(f"{opts.weight_method} keeps its INT layers at {DOUBLEQ_L1_BITS} bits: "
                           f"needs w_bits {DOUBLEQ_L1_BITS}, not {cfg.w_bits} (or pe_kind pot)")
    if opts.pot_layers is not None:
        unknown = sorted(set(opts.pot_layers) - set(names))
        if unknown:
            raise _quant_error(f"pot_layers: {unknown[0]!r} is not a conv/linear layer (layers: {', '.join(names)})")
        chosen = [n for n in names if n in set(opts.pot_layers)]
        if cfg.pe_kind == "pot" and len(chosen) != len(names):
            raise _quant_error(f"pe_kind pot runs PoT weights only: layer {[n for n in names if n not in chosen][0]} "
                               "would be INT (use pe_kind hybrid for a mix)")
        qg.pot_layers = frozenset(chosen)
        qg.pot_info = {"selection": "given"}
        return
    if opts.weight_method in ("inq", "doubleq") or cfg.pe_kind == "pot":
        qg.pot_layers = frozenset(names)
        qg.pot_info = {"selection": "all"}
        return
    # doubleqext
    if cfg.pe_kind == "int":
        raise _quant_error("weight_method doubleqext puts some layers in PoT: it needs pe_kind hybrid "
                           "(or pot for all layers), not int")
    qg.pot_info = doubleqext_plan(graph, cfg, calib, opts, wb, qg.a_bits, qg.pot_bits)
    qg.pot_layers = frozenset(qg.pot_info["pot_layers"])


def quantize_weights(qg, l, w: np.ndarray, wb: int, patches=None):
    """(integer weights, per-channel scale, is PoT, code bits) of conv ``l`` for a PoT method.

    ``patches()`` gives the layer's calibration receptive fields (only ``pot_rounding="gptq"``
    calls it)."""
    from .quantize import gptq_round, qrange, weight_scales

    opts, cfg = qg.options, qg.config
    emax = e_max(cfg, qg.pot_bits)
    if l.name in qg.pot_layers:
        if opts.weight_method == "inq":
            wq, s = inq_quantize(w, emax, opts.pot_granularity, opts.pot_scale)
            if opts.pot_rounding == "gptq":
                with torch.no_grad():
                    wq = gptq_round(w, s, qg.pot_bits, patches(), l.groups, rounder=lambda v: round_pot(v, emax))
        else:
            _, wq, s = doubleq_quantize(w, emax)
        return wq, s, True, qg.pot_bits
    if opts.weight_method == "inq":
        lo, hi = qrange(wb, True)
        s = weight_scales(w, wb, "minmax")
        return np.clip(np.round(w / s.reshape(-1, 1, 1, 1)), lo, hi).astype(np.int64), s, False, wb
    q1, _, s = doubleq_quantize(w, emax)
    return q1, s, False, DOUBLEQ_L1_BITS


# -- DoubleQExt: sensitivity and selection ---------------------------------------------------------

def select_layers(sizes: dict, costs: dict, int_bits: int, pot_bits: int, budget_bits: float):
    """Exact choice of the PoT layers: the set with the least total cost whose weight memory
    ``sum(size * (pot_bits if PoT else int_bits))`` is at most ``budget_bits``.

    ``sizes``: weights per layer; ``costs``: predicted loss of making that layer PoT (negative
    costs count as 0: a measured gain from rounding is noise, not a reason to pick a layer).
    Ties go to the smaller memory, then to the lexicographically first set. Returns
    ``(names, predicted cost, memory bits)`` or ``None`` if even all-PoT exceeds the budget.

    A 0/1 knapsack (each layer either stays or goes PoT) solved exactly by
    :func:`compiler.mixed.pareto_knapsack`, the solver per-layer mixed precision uses too, so
    the predicted cost never increases when the budget grows.
    """
    from .mixed import pareto_knapsack  # local: mixed imports quantize, which imports this module

    items = [[(sizes[n] * int_bits, 0.0, None), (sizes[n] * pot_bits, max(0.0, float(costs[n])), n)]
             for n in sorted(sizes)]
    return pareto_knapsack(items, budget_bits)


def _kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(softmax(ref) || softmax(logits)): the loss increase against the float model's own
    predictions (labels are not needed, so calibration images suffice)."""
    p = torch.log_softmax(torch.from_numpy(ref_logits), 1)
    q = torch.log_softmax(torch.from_numpy(logits), 1)
    return float(F.kl_div(q, p, log_target=True, reduction="batchmean"))


def doubleqext_plan(graph, cfg: AccelConfig, calib, opts, wb: int, ab: int, pot_bits: int) -> dict:
    """Measure each conv layer's sensitivity to level 2 and choose the PoT layers for the budget.

    Sensitivity of layer ``l``: the loss of the integer network (``simulate``) with only ``l``'s
    level-1 weights rounded to PoT, minus the all-INT8 loss, on the calibration images. The loss
    is the KL divergence from the float model's outputs. Level 2 keeps level 1's scale, bias and
    requant constants, so each variant is the level-1 network with one ``w_q`` swapped. The
    predicted loss of a set is the sum of its layers' sensitivities.
    """
    from .quantize import float_forward, quantize, simulate

    t0 = time.perf_counter()
    calib = torch.as_tensor(calib, dtype=torch.float32)
    qg1 = quantize(graph, cfg, calib, dataclasses.replace(opts, pot_layers=()), w_bits=wb, a_bits=ab)
    with torch.no_grad():
        ref = float_forward(graph, calib).reshape(len(calib), -1).double().numpy()
    base = _kl(ref, simulate(qg1, calib))
    emax = e_max(cfg, pot_bits)
    sens, sizes = {}, {}
    for l in _convs(graph):
        ql = qg1.layers[l.name]
        q1 = ql.w_q
        ql.w_q = round_pot(q1, emax)
        sens[l.name] = _kl(ref, simulate(qg1, calib)) - base
        ql.w_q = q1
        sizes[l.name] = int(np.prod(l.weight.shape))
    int8_bits = DOUBLEQ_L1_BITS * sum(sizes.values())
    budget = opts.pot_budget
    budget_bits = budget * int8_bits if isinstance(budget, float) else 8 * budget
    picked = select_layers(sizes, sens, DOUBLEQ_L1_BITS, pot_bits, budget_bits)
    if picked is None:
        least = weight_bytes(sum(sizes.values()), pot_bits)
        raise _quant_error(f"pot_budget {_budget_str(budget)} is below the all-PoT weight memory "
                           f"({least} bytes, {least / (int8_bits / 8):.1%} of the 8-bit {int8_bits // 8} bytes)")
    sel, cost, mem = picked
    return {"selection": "doubleqext", "budget": budget, "budget_bytes": int(budget_bits // 8),
            "int8_bytes": int8_bits // 8, "pot_layers": [n for n in sizes if n in sel],
            "predicted_loss": cost, "weight_bytes": -(-int(mem) // 8), "baseline_kl": base,
            "sensitivity": sens, "sensitivity_images": len(calib),
            "seconds": round(time.perf_counter() - t0, 2)}


def _budget_str(b) -> str:
    return f"{b:g} (fraction of 8-bit)" if isinstance(b, float) else f"{b} bytes"


# -- INQ incremental re-training -------------------------------------------------------------------

#: INQ's schedule: cumulative fraction of each layer's weights quantized (and frozen) per step.
INQ_SCHEDULE = (0.5, 0.75, 0.875, 1.0)


def inq_retrain(graph, x, y, cfg: AccelConfig, bits: int, *, granularity: str = "channel",
                schedule=INQ_SCHEDULE, epochs: int = 2, per_epoch: int | None = 10_000, batch: int = 128,
                lr: float = 5e-4, augment: dict | None = None, seed: int = 0, progress: bool = True,
                log=None):
    """INQ incremental quantization (Zhou et al. 2017) of the BN-folded ``graph``.

    For each cumulative fraction in ``schedule``: in every conv layer, the largest-magnitude
    not-yet-quantized weights are rounded to the layer's PoT levels (fixed at the start from the
    pre-trained weights, as INQ does) and frozen until that fraction of the layer is PoT; the
    remaining float weights and the biases are re-trained for ``epochs`` epochs (Adam, ``lr``,
    cross-entropy on ``x``/``y``, ``per_epoch`` images drawn per epoch, optional
    :func:`compiler.zoo.augment` arguments). After the last step every weight is PoT and no
    training follows. Training runs on the folded graph, so the PoT values are exactly what the
    compiler quantizes: ``inq`` on the returned graph reproduces them (the levels are
    re-derived from the same maxima).

    Deterministic for a ``seed`` (seeded shuffling and augmentation, deterministic kernels,
    fixed thread count). Returns ``(new graph, record)``.
    """
    from . import zoo

    emax = e_max(cfg, bits)
    g = copy.deepcopy(graph)
    convs = _convs(g)
    scales = {}
    for l in convs:
        _, s = inq_quantize(l.weight.detach().double().numpy(), emax, granularity)
        scales[l.name] = torch.from_numpy(s).float().reshape(-1, 1, 1, 1)  # powers of two: exact
        l.weight = l.weight.detach().clone().float().requires_grad_(True)
        l.bias = (l.bias.detach().clone() if l.bias is not None else torch.zeros(l.weight.shape[0])).float()
        l.bias.requires_grad_(True)
    frozen = {l.name: torch.zeros_like(l.weight, dtype=torch.bool) for l in convs}
    n = min(per_epoch or len(x), len(x))
    steps_per_epoch = -(-n // batch)
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(zoo.TRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    history = []
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(1 for f in schedule if f < 1.0) * epochs * steps_per_epoch
        bar = tqdm(total=total, desc=f"INQ {bits}-bit", unit="step", leave=False)
    try:
        for frac in schedule:
            with torch.no_grad():
                for l in convs:
                    _freeze(l, frozen[l.name], scales[l.name], emax, frac)
            if frac >= 1.0:
                break
            params = [l.weight for l in convs] + [l.bias for l in convs]
            opt = torch.optim.Adam(params, lr=lr)
            from .quantize import float_forward

            for _ in range(epochs):
                perm = torch.randperm(len(x), generator=gen)[:n]
                for i in range(0, n, batch):
                    idx = perm[i:i + batch]
                    xb = x[idx]
                    if augment:
                        xb = zoo.augment(xb, gen, **augment)
                    loss = F.cross_entropy(float_forward(g, xb).reshape(len(idx), -1), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    for l in convs:
                        l.weight.grad[frozen[l.name]] = 0
                    opt.step()
                    with torch.no_grad():  # Adam's moments may still nudge a frozen weight
                        for l in convs:
                            f = frozen[l.name]
                            l.weight[f] = (torch.from_numpy(round_pot((l.weight / scales[l.name]).double().numpy(),
                                                                      emax)).float() * scales[l.name])[f]
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(f"{frac:.1%} frozen, loss {loss.item():.3f}")
            history.append({"frozen": frac, "loss": round(loss.item(), 4)})
            if log:
                log(f"  INQ {frac:.1%} frozen: last batch loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    finally:
        if bar is not None:
            bar.close()
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    for l in convs:
        l.weight = l.weight.detach()
        l.bias = l.bias.detach()
    record = {"bits": bits, "e_max": emax, "granularity": granularity, "schedule": list(schedule), "epochs": epochs,
              "per_epoch": n, "batch": batch, "lr": lr, "seed": seed, "augment": augment, "history": history,
              "seconds": round(time.perf_counter() - t0, 1)}
    return g, record


def retrain_recipe(dataset: str) -> dict:
    """:func:`inq_retrain` keywords that sample like the zoo's training recipe of ``dataset``
    (images per epoch, batch, augmentation), so re-training sees what training saw."""
    from . import zoo

    rc = zoo.RECIPES[dataset]
    aug = {k: rc[k] for k in ("shift", "rotate", "scale", "hflip")}
    return {"per_epoch": rc["per_epoch"], "batch": rc["batch"], "augment": aug if any(aug.values()) else None}


def _freeze(l, frozen: torch.Tensor, scale: torch.Tensor, emax: int, frac: float) -> None:
    """Quantize and freeze the largest free weights of ``l`` until ``frac`` of it is frozen."""
    w = l.weight
    total = w.numel()
    want = total if frac >= 1.0 else int(math.floor(frac * total + 0.5))
    extra = want - int(frozen.sum())
    if extra > 0:
        mag = torch.where(frozen, torch.full_like(w, -1.0), w.detach().abs()).reshape(-1)
        idx = torch.sort(mag, descending=True, stable=True).indices[:extra]
        frozen.view(-1)[idx] = True
    q = torch.from_numpy(round_pot((w.detach() / scale).double().numpy(), emax)).float() * scale
    w.data[frozen] = q[frozen]
