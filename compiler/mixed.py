"""Per-layer mixed precision: weight bits per conv/linear layer under a total weight-bit budget.

Sensitivity (:func:`sensitivity`): for every conv/linear layer ``l`` and every candidate width
``b``, the network is quantized with only ``l``'s weights at ``b`` bits and every other layer at
the accelerator's weight width, and the cost is the increase of the loss on the calibration
images over that all-wide network. The loss is the KL divergence from the float model's outputs
(labels are not needed), as DoubleQExt's sensitivity in :mod:`compiler.pot`. Activation clips are
measured once on the all-wide network and reused, so each variant only re-quantizes one layer's
weights and runs :func:`compiler.quantize.simulate` (the accelerator's integer arithmetic).

Choice (:func:`choose_bits`): each layer takes one width; the predicted cost of a choice is the
sum of its layers' costs, its memory ``sum(weights x bits)``. :func:`pareto_knapsack` finds the
cheapest choice within the budget exactly (a multiple-choice knapsack over the Pareto front of
(memory, cost); :func:`compiler.pot.select_layers` is its two-option special case), so the
predicted cost never increases when the budget grows. The user may pin any layer's bits by name
(``layer_bits``); a pinned layer has one option.

Activation bits are per layer too (``QLayer.lo``/``hi``: POST clamps per layer), but they do not
enter a weight-memory budget, and on Quarry's array the cycle count does not depend on any
layer's bit width (the PE width is fixed; :func:`hw.timing.predict` sees the same instructions),
so a cycle budget cannot trade bits either: activation bits are the global width unless pinned.

Hardware: a layer's bits may be anything from 2 to the PE width. On a ``packed_weights``
accelerator (``hw.build --packed-weights``) a layer of ``k < w_bits`` bits is stored
``w_bits // k`` weights per ``w_bits`` wmem lane and unpacked by the loader (PRELOAD
``pack_bits``, :func:`hw.isa.pack_weights`), so the weight memory really shrinks; without it its
codes fill one ``w_bits`` lane each (sign-extended). The manifest reports both the format bytes
(``weights.bytes`` = weights x the layer's bits) and the physical wmem rows/bytes
(``weights.wmem_rows``/``wmem_bytes``; ``weights.stored_bits`` is the width in wmem).
"""

from __future__ import annotations

import dataclasses
import re
import time

import numpy as np
import torch

__all__ = ["pareto_knapsack", "parse_layer_bits", "sensitivity", "choose_bits", "plan", "layer_sizes",
           "packed_bits", "MIN_BITS"]

MIN_BITS = 2


def _error(msg: str):
    from .quantize import QuantError  # local: compiler.pot imports this module lazily from quantize's import

    return QuantError(msg)


# -- exact solver ------------------------------------------------------------------------------------

def pareto_knapsack(items, budget: float):
    """Cheapest choice of one option per item whose total memory is at most ``budget``.

    ``items`` is a sequence of option lists; an option is ``(memory, cost, label)``, and the
    labels of the chosen options that are not ``None`` make up the returned selection, in item
    order. Returns ``(selection tuple, total cost, total memory)`` or ``None`` if even the
    smallest choice exceeds the budget. Ties go to the smaller memory, then to the
    lexicographically first selection.

    Exact: the partial choices are kept as the Pareto front of (memory, cost), ascending in
    memory with strictly falling cost; a dominated partial choice cannot become optimal.
    """
    front = [(0, 0.0, ())]
    for options in items:
        cand = sorted((m + om, cost + oc, sel + ((lab,) if lab is not None else ()))
                      for m, cost, sel in front for om, oc, lab in options)
        front = []
        for m, cost, sel in cand:  # ascending memory: keep a point only if it is cheaper
            if not front or cost < front[-1][1]:
                front.append((m, cost, sel))
    ok = [p for p in front if p[0] <= budget]
    if not ok:
        return None
    m, cost, sel = min(ok, key=lambda p: (p[1], p[0], p[2]))
    return sel, cost, m


# -- the user's pins -----------------------------------------------------------------------------------

_PIN = re.compile(r"^\s*([^=\s,]+)\s*=\s*(\d+)\s*(?:/\s*(\d+)\s*)?$")


def parse_layer_bits(text: str, option: str = "--layer-bits") -> dict:
    """``name=W[/A],...`` -> ``{name: (W, A or None)}`` (syntax only; :func:`compiler.quantize.quantize`
    checks the names and widths against the model and the accelerator)."""
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        m = _PIN.match(part)
        if not m:
            raise _error(f"{option} wants name=W or name=W/A separated by commas (e.g. stem_0=8,fc=4/8), "
                         f"not {part.strip()!r}")
        name, w, a = m.group(1), int(m.group(2)), m.group(3)
        if name in out:
            raise _error(f"{option}: layer {name} is given twice")
        out[name] = (w, int(a) if a is not None else None)
    if not out:
        raise _error(f"{option} is empty (want name=W[/A],...)")
    return out


# -- sensitivity and choice ------------------------------------------------------------------------------

def layer_sizes(graph) -> dict:
    """Weights per conv/linear layer, in graph order."""
    return {l.name: int(np.prod(l.weight.shape)) for l in graph.layers if l.kind == "conv"}


def packed_bits(graph, bits: dict) -> int:
    """Total weight bits of ``bits`` ({layer: weight bits}) stored packed."""
    sizes = layer_sizes(graph)
    return sum(sizes[n] * int(b) for n, b in bits.items())


def _kl(ref: np.ndarray, logits: np.ndarray) -> float:
    p = torch.log_softmax(torch.from_numpy(ref), 1)
    q = torch.log_softmax(torch.from_numpy(np.asarray(logits, np.float64)), 1)
    return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))


def sensitivity(graph, cfg, calib, opts, *, choices=None, a_bits: int | None = None,
                act_bits: dict | None = None) -> dict:
    """Loss increase (KL from the float outputs, on ``calib``) when only one layer's weights go to
    each width in ``choices`` (default ``2 .. cfg.w_bits``) and every other layer stays at
    ``cfg.w_bits``. ``act_bits`` ({layer: bits}) and ``a_bits`` set the activation widths (held
    fixed throughout). Returns ``{"cost": {layer: {bits: cost}}, "baseline_kl", "images", "seconds"}``."""
    from .quantize import float_forward, quantize, simulate

    t0 = time.perf_counter()
    calib = torch.as_tensor(calib, dtype=torch.float32)
    choices = sorted(set(choices or range(MIN_BITS, cfg.w_bits + 1)))
    ab = a_bits or cfg.a_bits
    act_bits = act_bits or {}
    wide = {n: (cfg.w_bits, act_bits.get(n)) for n in layer_sizes(graph)}
    base = quantize(graph, cfg, calib, opts, a_bits=ab, layer_bits=wide)
    scales = {n: ql.scale for n, ql in base.layers.items() if ql.layer.kind in ("input", "conv")}
    with torch.no_grad():
        ref = float_forward(graph, calib).reshape(len(calib), -1).double().numpy()
    base_kl = _kl(ref, simulate(base, calib))
    cost = {}
    for name in wide:
        cost[name] = {}
        for b in choices:
            if b == cfg.w_bits:
                cost[name][b] = 0.0
                continue
            bits = dict(wide, **{name: (b, act_bits.get(name))})
            qg = quantize(graph, cfg, calib, opts, a_bits=ab, layer_bits=bits, act_scales=scales)
            cost[name][b] = _kl(ref, simulate(qg, calib)) - base_kl
    return {"cost": cost, "baseline_kl": base_kl, "images": len(calib), "choices": choices,
            "seconds": round(time.perf_counter() - t0, 2)}


def choose_bits(sizes: dict, cost: dict, budget_bits: float, pinned: dict | None = None):
    """Weight bits per layer with the least predicted cost (sum of ``cost[layer][bits]``, negative
    costs as 0: a measured gain from rounding is noise) whose ``sum(sizes x bits)`` is at most
    ``budget_bits``. ``pinned`` ({layer: bits}) fixes layers. Returns ``({layer: bits}, predicted
    cost, total bits)``; raises ``QuantError`` naming the least feasible budget if none fits."""
    pinned = pinned or {}
    names = list(sizes)
    items = []
    for n in names:
        opts = {pinned[n]: 0.0} if n in pinned else {b: max(0.0, float(c)) for b, c in cost[n].items()}
        items.append([(sizes[n] * b, c, (n, b)) for b, c in sorted(opts.items())])
    got = pareto_knapsack(items, budget_bits)
    if got is None:
        least = sum(min(o[0] for o in opts) for opts in items)
        raise _error(f"budget of {int(budget_bits)} weight bits is below the least this model can take "
                     f"({least} bits: every layer at its narrowest{' allowed' if pinned else ''} width, "
                     f"{least / sum(sizes.values()):.2f} bits per weight)")
    sel, c, mem = got
    return dict(sel), c, mem


def plan(graph, cfg, calib, opts, budget_bits: int, *, a_bits: int | None = None, pinned: dict | None = None,
         choices=None) -> tuple[dict, dict]:
    """Measure the sensitivity and choose the bits: returns (``layer_bits`` for
    :func:`compiler.quantize.quantize` -- {layer: (weight bits, activation bits or None)} --,
    a record for the manifest). ``pinned`` is {layer: (W or None, A or None)}; a pinned A holds
    during the measurement too."""
    pinned = dict(pinned or {})
    sizes = layer_sizes(graph)
    unknown = [n for n in pinned if n not in sizes]
    if unknown:
        raise _error(f"layer_bits: {unknown[0]!r} is not a conv/linear layer (layers: {', '.join(sizes)})")
    act_bits = {n: a for n, (w, a) in pinned.items() if a}
    wpins = {n: w for n, (w, a) in pinned.items() if w}
    for n, w in wpins.items():
        if not MIN_BITS <= w <= cfg.w_bits:
            raise _error(f"layer_bits: {n} weight bits must be an integer in {MIN_BITS}..{cfg.w_bits} "
                         f"(the accelerator's weight width), not {w}")
    # Measured with nearest rounding on the OMSE scales and no bias correction: GPTQ and the
    # empirical correction per variant would cost ~10x more and mostly shift every layer alike.
    fast = dataclasses.replace(opts, weight_method="mse" if opts.weight_method == "gptq" else opts.weight_method,
                               bias_correction="none")
    sens = sensitivity(graph, cfg, calib, fast, choices=choices, a_bits=a_bits, act_bits=act_bits)
    bits, pred, mem = choose_bits(sizes, sens["cost"], budget_bits, wpins)
    layer_bits = {n: (bits[n], act_bits.get(n)) for n in sizes}
    record = {"budget_bits": int(budget_bits), "weight_bits": {n: bits[n] for n in sizes},
              "activation_bits": act_bits, "pinned": sorted(pinned), "total_bits": int(mem),
              "bits_per_weight": mem / sum(sizes.values()), "packed_bytes": -(-int(mem) // 8),
              "predicted_kl_increase": pred, "sensitivity": {n: {str(b): v for b, v in c.items()}
                                                             for n, c in sens["cost"].items()},
              "baseline_kl": sens["baseline_kl"], "sensitivity_images": sens["images"],
              "sensitivity_weights": fast.weight_method, "sensitivity_bias_correction": fast.bias_correction,
              "seconds": sens["seconds"]}
    return layer_bits, record
