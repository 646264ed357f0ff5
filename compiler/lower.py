"""Lowering: a quantized graph -> one Quarry program (instructions + weight/param images).

Every layer becomes a kernel from :mod:`compiler.kernels`; the graph's output layer (a conv or
linear) leaves its raw accumulators in acc memory, so the host reads exact integer logits.

Scratchpad allocation follows liveness: layers are emitted in graph order, and right after a
layer is emitted the rows of every tensor it was the last reader of (as its input or as the
residual operand of its POST) go back to a first-fit free list (:class:`~compiler.builder.SpadAllocator`).
A layer's output is allocated before its inputs are freed, so no kernel ever writes over rows
it still reads. The model input stays allocated for the whole run, so a program can be re-run
on the same input without the host writing it again. Layers that do not reach the output are
not emitted.

Power-of-two layers (``QLayer.pot``, from :mod:`compiler.pot`) store their weights as the
hardware's PoT codes and run with MATMUL ``pot = 1``; an ``int`` accelerator refuses them and a
``pot`` accelerator refuses integer layers (:class:`PotLayerError`, naming the layer). The
manifest's ``weight_memory`` and each layer's ``weights`` entry report the weight storage: the
number format's bytes (weights x code bits) and the wmem rows/bytes the program really uses.

Packed weights: on a ``packed_weights`` config an INT (or DSConv) layer whose weights are
narrower than ``w_bits`` (mixed precision, or a model quantized below the array's width) is
stored ``w_bits // k`` rows per wmem row and preloaded with ``pack_bits = k``; its ``weights``
entry says ``stored_bits`` (``k``; ``w_bits`` when unpacked) and the real, smaller ``wmem_rows``.
"""

from __future__ import annotations

import numpy as np

from hw import isa, timing
from hw.isa import PoolMode
from hw.program import Program

from . import CompileError
from .builder import ProgramBuilder
from .kernels import KernelError, Requant
from .quantize import POT_METHODS, QGraph

__all__ = ["lower", "LowerError", "PotLayerError", "AccumulatorOverflowError", "accumulator_bound",
           "live_layers", "weight_memory"]


class LowerError(CompileError):
    """A layer cannot be placed on the configured accelerator (names layer and memory)."""


class PotLayerError(LowerError):
    """A layer's weight format (PoT or INT) does not run on the accelerator's ``pe_kind``."""

    def __init__(self, layer: str, message: str):
        super().__init__(f"layer {layer}: {message}")
        self.layer = layer


class AccumulatorOverflowError(LowerError):
    """A conv/linear layer's worst-case accumulator sum does not fit the config's ``acc_width``.

    Attributes: ``layer``, ``channel`` (the first output channel that can overflow), ``bound``
    (its worst-case ``(min, max)`` sum), ``terms`` (reduction length), ``acc_width``.
    """

    def __init__(self, layer: str, channel: int, bound: tuple[int, int], terms: int, cfg, msg: str):
        super().__init__(f"layer {layer}: {msg}")
        self.layer, self.channel, self.bound, self.terms, self.acc_width = layer, channel, bound, terms, cfg.acc_width


def accumulator_bound(cfg, w_q, x_signed: bool, x_exp: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel, the smallest and largest sum ``sum_k w[k] * x[k]`` a MATMUL chain can
    leave in an accumulator for any input (``x`` over the full ``a_bits`` range of its signedness,
    zero padding included since 0 is in range): positive weights times the largest activation plus
    negative weights times the smallest, and the other way round. The bias is not part of it: POST
    adds it at ``acc_width + 1`` bits, after the accumulator (see ``hw/ppu.py``). A
    block-floating-point input's values reach ``2**x_exp`` times its code range (``x_exp`` the
    config's ``bfp_emax``).
    """
    w = np.asarray(w_q, np.int64).reshape(len(w_q), -1)
    lo, hi = (-(1 << (cfg.a_bits - 1)), (1 << (cfg.a_bits - 1)) - 1) if x_signed else (0, (1 << cfg.a_bits) - 1)
    lo, hi = lo << x_exp, hi << x_exp
    pos = np.where(w > 0, w, 0).sum(axis=1)
    neg = np.where(w < 0, -w, 0).sum(axis=1)
    return -(pos * -lo + neg * hi), pos * hi + neg * -lo


def _check_accumulator(cfg, name: str, w_q, x_signed: bool, x_exp: int = 0) -> dict:
    """Refuse a layer whose accumulators could wrap (:class:`AccumulatorOverflowError`); else
    return the manifest's ``accumulator`` entry (terms, worst-case sums, bits needed).

    The accumulators wrap modulo ``2**acc_width`` (golden model and RTL alike), so a sum outside
    the signed range would silently be wrong. With the derived ``acc_width`` (``product_bits +
    clog2(wmem_depth)``) no compiled layer can overflow, because each output channel's reduction
    reads every weight row once and has at most ``wmem_depth`` terms; a narrower ``acc_bits``
    override is checked here against the layer's real integer weights.
    """
    smin, smax = accumulator_bound(cfg, w_q, x_signed, x_exp)
    terms = int(np.prod(np.shape(w_q)[1:]))
    amin, amax = -(1 << (cfg.acc_width - 1)), (1 << (cfg.acc_width - 1)) - 1
    bad = np.nonzero((smin < amin) | (smax > amax))[0]
    lo, hi = int(smin.min(initial=0)), int(smax.max(initial=0))
    need = max((-lo - 1).bit_length(), hi.bit_length()) + 1  # signed bits holding lo..hi
    if len(bad):
        c = int(bad[0])
        a_max = ((1 << (cfg.a_bits - 1)) if x_signed else (1 << cfg.a_bits) - 1) << x_exp
        sum_w = int(np.abs(np.asarray(w_q, np.int64).reshape(len(w_q), -1)[c]).sum())
        depth_bits = max(1, (cfg.wmem_depth - 1).bit_length())  # clog2, as hw.config derives acc_width
        raise AccumulatorOverflowError(
            name, c, (int(smin[c]), int(smax[c])), terms, cfg,
            f"accumulator overflow: output channel {c} can reach a sum of {int(smin[c])}..{int(smax[c])} "
            f"(worst-case |sum| {max(-int(smin[c]), int(smax[c]))} = sum |w| {sum_w} over {terms} terms x "
            f"|activation| <= {a_max}), outside the {cfg.acc_width}-bit accumulator range {amin}..{amax}; "
            f"this layer needs acc_bits >= {need} ({len(bad)} of {len(smin)} channels overflow; the "
            f"config-level bound for {cfg.wmem_depth}-term reductions of {cfg.product_bits}-bit products "
            f"is |sum| < 2**{cfg.product_bits - 1 + depth_bits}, i.e. acc_bits {cfg.product_bits + depth_bits}, "
            f"the derived default)")
    return {"terms": terms, "sum_min": lo, "sum_max": hi, "bits_needed": need}


def _block_scale(ql):
    return None if getattr(ql, "block_mult", None) is None else (ql.block_mult, ql.block_shift)


def _summed_weights(cfg, l, ql):
    """The integer weights whose sums reach the accumulator: ``w_q``, or for a DSConv layer its
    weights times each block's rescale (rounded up in magnitude, a bound)."""
    if getattr(ql, "block_mult", None) is None:
        return ql.w_q
    from .dsconv import effective_weights

    return effective_weights(ql.w_q, ql.block_mult, ql.block_shift, cfg.rows, l.groups)


def _check_pe_kind(cfg, name: str, pot: bool) -> None:
    if pot and cfg.pe_kind == "int":
        raise PotLayerError(name, "has power-of-two weights, which need pe_kind pot or hybrid; "
                                  "this accelerator's PEs are int")
    if not pot and cfg.pe_kind == "pot":
        raise PotLayerError(name, "has INT weights, but pe_kind pot PEs only shift (quantize with "
                                  "weight_method inq/doubleq/doubleqext, or use pe_kind hybrid)")


def _pack_bits(qg: QGraph, ql) -> int:
    """PRELOAD ``pack_bits`` of a conv layer: its weight width when that is narrower than the
    array's on a ``packed_weights`` config, else 0 (unpacked). PoT layers stay unpacked (a PoT
    code is sign and magnitude; see :func:`hw.isa.pack_weights`)."""
    cfg = qg.config
    if not cfg.packed_weights or getattr(ql, "pot", False):
        return 0
    k = int(getattr(ql, "code_bits", None) or qg.w_bits)
    return k if k < cfg.w_bits else 0


def _weight_info(qg: QGraph, l, ql, wmem_rows: int) -> dict:
    """Weight storage of one conv layer: format bytes and the wmem it really takes."""
    cfg = qg.config
    n = int(np.prod(l.weight.shape))
    bits = int(getattr(ql, "code_bits", None) or qg.w_bits)
    fmt = "pot" if getattr(ql, "pot", False) else ("dsconv" if getattr(ql, "block_mult", None) is not None else "int")
    scale_bits = 0
    if getattr(ql, "block_mult", None) is not None:  # one scale (mult + shift) per block of every output channel
        blk = qg.options.dsconv_block or cfg.rows
        scale_bits = ql.block_mult.shape[0] * -(-l.weight.shape[1] * l.groups // blk) \
            * int(np.prod(ql.block_mult.shape[2:])) * (cfg.mult_bits + cfg.shift_bits)
    return {"format": fmt, "count": n, "bits": bits,
            "bytes": -(-(n * bits + scale_bits) // 8), "stored_bits": _pack_bits(qg, ql) or cfg.w_bits,
            "wmem_rows": wmem_rows,
            "wmem_bytes": -(-wmem_rows * cfg.cols * cfg.w_bits // 8)}


def weight_memory(layers_info: list[dict]) -> dict:
    """Totals of the per-layer ``weights`` entries of a manifest."""
    w = [i["weights"] for i in layers_info if "weights" in i]
    return {"bytes": sum(i["bytes"] for i in w), "int8_bytes": sum(i["count"] for i in w),
            "pot_layers": [i["name"] for i in layers_info if i.get("weights", {}).get("format") == "pot"],
            "wmem_rows": sum(i["wmem_rows"] for i in w), "wmem_bytes": sum(i["wmem_bytes"] for i in w)}


def live_layers(graph) -> list:
    """The layers the output depends on, in graph order."""
    by_name = {l.name: l for l in graph.layers}
    need, todo = set(), [graph.output]
    while todo:
        n = todo.pop()
        if n in need:
            continue
        need.add(n)
        l = by_name[n]
        todo += list(l.inputs) + ([l.residual] if l.residual else [])
    return [l for l in graph.layers if l.name in need]


def _last_uses(layers) -> dict[str, int]:
    """Index (in ``layers``) of the last layer that reads each tensor."""
    last = {}
    for i, l in enumerate(layers):
        last[l.name] = max(last.get(l.name, i), i)
        for src in list(l.inputs) + ([l.residual] if l.residual else []):
            last[src] = i
    return last


def _input_im2col(graph, layers, cfg):
    """The first conv, if the host should hand it its input already im2col'd.

    A conv reading the model input directly with few input channels (an image's 1 or 3) fills
    only ``Cin`` of the array's rows per pass and needs ``kh*kw`` passes. If the host lays the
    input out as ``Cin*kh*kw`` channels per output pixel (it quantizes the input anyway), the
    same conv is a 1x1 conv: ``ceil(Cin*kh*kw / rows)`` passes instead of ``kh*kw*ceil(Cin/rows)``.
    Only when the input has exactly one reader and that is a dense conv.
    """
    inp = layers[0]
    readers = [l for l in layers if inp.name in l.inputs or l.residual == inp.name]
    if len(readers) != 1 or readers[0].kind != "conv" or readers[0].groups != 1 or readers[0].residual == inp.name:
        return None
    conv = readers[0]
    cin, kh, kw = conv.weight.shape[1:]
    rows = cfg.rows
    # Worth it only when it at least halves the passes: the im2col'd input takes
    # ceil(Cin*kh*kw / rows) channel blocks of spad for the whole run.
    if 2 * -(-cin * kh * kw // rows) > kh * kw * -(-cin // rows):
        return None
    return conv


def lower(qg: QGraph, *, reuse_spad: bool = True, quant: dict | None = None, im2col_input: bool = True) -> Program:
    """Lower ``qg`` to a program.

    ``im2col_input`` lets the host lay the model input out im2col-style for the first conv when
    that saves array passes (see :func:`_input_im2col`); the manifest's ``input.im2col`` says how.
    ``reuse_spad=False`` gives every tensor its own spad rows (all intermediate results stay
    readable after the run, at the cost of spad). ``quant`` replaces the manifest's ``quant``
    entry; by default it comes from ``qg.quant_manifest`` if the graph has one (a graph imported
    from ``torch.ao``), else from ``qg.options``.
    The manifest records ``spad_rows_peak`` and, per layer, ``spad_base``/``spad_rows``.
    """
    cfg = qg.config
    graph = qg.graph
    layers = live_layers(graph)
    out_layer = graph[graph.output]
    if out_layer.kind != "conv":
        raise LowerError(f"the model output ({graph.output}) must be a conv or linear layer, not {out_layer.kind}")
    if out_layer.act is not None or out_layer.residual:
        raise LowerError(f"the model output ({graph.output}) must be a conv or linear layer without a fused "
                         "activation or residual add: its raw accumulators are the output")
    inp = layers[0]
    if inp.kind != "input":
        raise LowerError(f"the first layer ({inp.name}) must be the model input")
    first = _input_im2col(graph, layers, cfg) if im2col_input else None
    if first is not None and getattr(qg.layers[first.name], "block_mult", None) is not None:
        first = None  # DSConv blocks are the input's channels; im2col would mix taps into them
    if first is not None:
        try:
            return _lower(qg, layers, reuse_spad, quant, first)
        except LowerError:
            pass  # the im2col'd input is larger (Cin*kh*kw channels): it may not fit; go without
    return _lower(qg, layers, reuse_spad, quant, None)


def _lower(qg: QGraph, layers, reuse_spad: bool, quant, first) -> Program:
    cfg = qg.config
    graph = qg.graph
    b = ProgramBuilder(cfg, reuse_spad=reuse_spad)
    last = _last_uses(layers)
    tensors = {}
    layers_info = []
    out_info = None
    inp = layers[0]
    im2col = None
    for i, l in enumerate(layers):
        try:
            ql = qg.layers[l.name]
            info = {"name": l.name, "kind": l.kind, "shape": list(l.shape), "scale": ql.scale,
                    "signed": ql.signed}
            n0, w0 = len(b.instrs), b.wmem_rows
            pot = bool(getattr(ql, "pot", False))
            if l.kind == "conv":
                _check_pe_kind(cfg, l.name, pot)
                x_exp = cfg.bfp_emax if getattr(qg.layers[l.inputs[0]], "bfp", False) else 0
                info["accumulator"] = _check_accumulator(cfg, l.name, _summed_weights(cfg, l, ql),
                                                         tensors[l.inputs[0]].signed, x_exp)
                if x_exp and getattr(ql, "block_mult", None) is not None:
                    # The tile sums are rescaled after the array: they must not wrap either.
                    _check_accumulator(cfg, l.name, ql.w_q, tensors[l.inputs[0]].signed, x_exp)
            if l.kind == "input" and first is not None:
                cin, kh, kw = first.weight.shape[1:]
                _, oh, ow = first.shape
                im2col = {"kernel": [kh, kw], "stride": list(first.stride), "padding": list(first.padding),
                          "shape": [cin * kh * kw, oh, ow]}
                tensors[l.name] = b.tensor(cin * kh * kw, oh, ow, signed=ql.signed, name=l.name)
            elif l.kind == "input":
                tensors[l.name] = b.tensor(*l.shape, signed=ql.signed, name=l.name)
            elif l.kind == "conv" and l.name == graph.output:
                x = tensors[l.inputs[0]]
                out_info = b.conv2d_to_acc(x, ql.w_q, stride=l.stride, padding=l.padding, groups=l.groups,
                                           name=l.name, pot=pot, block_scale=_block_scale(ql),
                                           pack_bits=_pack_bits(qg, ql))
                xs = qg.layers[l.inputs[0]].scale
                out_info.update(bias_q=ql.bias_q.tolist(), scales=(xs * ql.w_scale).tolist())
            elif l.kind == "conv":
                x = tensors[l.inputs[0]]
                w_q, stride, padding = ql.w_q, l.stride, l.padding
                if l is first:  # the host did the im2col: a 1x1 conv over (c, dy, dx) channels
                    w_q, stride, padding = w_q.reshape(w_q.shape[0], -1, 1, 1), (1, 1), (0, 0)
                rq = Requant(bias=ql.bias_q, mult=ql.mult, shift=ql.shift, zp=int(getattr(ql, "zp", 0)),
                             lo=ql.lo, hi=ql.hi, res_mult=ql.res_mult, bfp=bool(getattr(ql, "bfp", False)))
                if rq.bfp:
                    info["bfp"] = True
                tensors[l.name] = b.conv2d(x, w_q, rq, stride=stride, padding=padding, groups=l.groups,
                                           residual=tensors[l.residual] if l.residual else None,
                                           out_signed=ql.signed, name=l.name, pot=pot,
                                           block_scale=_block_scale(ql), pack_bits=_pack_bits(qg, ql))
            elif l.kind in ("maxpool", "avgpool"):
                mode = PoolMode.MAX if l.kind == "maxpool" else PoolMode.AVG
                tensors[l.name] = b.pool2d(tensors[l.inputs[0]], mode, l.kernel, stride=l.stride,
                                           padding=l.padding, name=l.name)
            else:
                raise LowerError(f"layer {l.name}: unknown layer kind {l.kind!r}")
        except KernelError as e:
            msg = str(e)
            raise LowerError(msg if msg.startswith(f"layer {l.name}:") else f"layer {l.name}: {msg}") from None
        if l.name in tensors:
            info["spad_base"] = tensors[l.name].base
            info["spad_rows"] = tensors[l.name].rows(cfg)
        info["instructions"] = len(b.instrs) - n0
        if l.kind == "conv":
            info["weights"] = _weight_info(qg, l, ql, b.wmem_rows - w0)
        layers_info.append(info)
        # Free what this layer read for the last time (never the model input).
        for src in dict.fromkeys(list(l.inputs) + ([l.residual] if l.residual else [])):
            if last[src] == i and src != inp.name:
                b.free(tensors[src])
        if last[l.name] == i and l.name in tensors and l.name != inp.name:
            b.free(tensors[l.name])  # nobody reads it (cannot happen for live layers, but harmless)
    manifest = {
        "predicted_cycles": _predict_cycles(cfg, b.schedule(), layers_info),
        "input": {"spad_base": tensors[inp.name].base, "shape": list(inp.shape),
                  "scale": qg.layers[inp.name].scale, "signed": qg.layers[inp.name].signed,
                  # the input's code range: narrower than the array's when quantized at fewer bits
                  "lo": int(qg.layers[inp.name].lo), "hi": int(qg.layers[inp.name].hi),
                  **({"im2col": im2col} if im2col else {})},
        "output": out_info,
        "layers": layers_info,
        "weight_memory": weight_memory(layers_info),
        "quant": quant if quant is not None else getattr(qg, "quant_manifest", None) or _quant_manifest(qg),
    }
    try:
        return b.build(manifest)
    except KernelError as e:
        raise LowerError(str(e)) from None


def _predict_cycles(cfg, instrs, layers_info) -> int:
    """Set each layer's ``predicted_cycles`` (:class:`hw.timing.CycleModel`: from the previous
    layer's last completion to its own) and return the program's total, which is what the RTL's
    cycle counter reads after HALT (the golden model and the RTL tests reproduce it exactly)."""
    issue, done, total = timing.predict(cfg, instrs)
    pc, prev = 0, 0
    for info in layers_info:
        n = info.get("instructions", 0)
        end = max(done[pc:pc + n], default=prev)
        info["predicted_cycles"] = int(end - prev)
        prev, pc = max(end, prev), pc + n
    return total


def _quant_manifest(qg: QGraph) -> dict:
    o = qg.options
    q = {"method": o.method, "w_bits": qg.w_bits, "a_bits": qg.a_bits, "bias_correction": o.bias_correction}
    if o.weight_method == "dsconv":
        q |= {"weight_method": "dsconv", "dsconv_block": o.dsconv_block or qg.config.rows}
    if o.bfp:
        q |= {"activations": "bfp", "bfp_exp_bits": qg.config.bfp_exp_bits,
              "bfp_layers": sorted(n for n, ql in qg.layers.items() if ql.bfp)}
    if o.weight_method in POT_METHODS:  # additive: int settings keep the manifest they always had
        q |= {"weight_method": o.weight_method, "pot_bits": qg.pot_bits, "pot_granularity": o.pot_granularity,
              "pot_scale": o.pot_scale, "pot_layers": sorted(qg.pot_layers),
              "pot_selection": {k: v for k, v in (qg.pot_info or {}).items() if k != "pot_layers"}}
    return q
