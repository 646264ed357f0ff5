"""Import a model quantized with PyTorch's own FX flow and lower it to a Quarry program.

Input: the ``GraphModule`` returned by ``torch.ao.quantization.quantize_fx.convert_fx`` (weights
``qint8`` per channel or per tensor with zero point 0, activations ``quint8``/``qint8`` per tensor).
Every number comes from the converted graph: the input's ``quantize_per_tensor`` scale and zero
point, each quantized module's integer weights, weight scales, float bias and output
``scale``/``zero_point``, and the scale/zero point arguments of ``quantized.add``/``add_relu``.
Only the fixed-point form of each requantization multiplier (``mult``, ``shift``) is computed here.

Zero points. Quarry's array multiplies raw activation codes, i.e. it assumes zero point 0 for
every matmul input, and the POST residual path has no zero point either. A PyTorch tensor is
stored as follows (``q`` is PyTorch's code, ``z`` its zero point):

* ``quint8``, ``z == 0`` (every ReLU output): unsigned codes ``q``, exact;
* ``quint8``, ``z == 128`` (symmetric quint8) or ``qint8``, ``z == 0``: signed codes ``q - z``,
  exact (same range, padding value 0 is the real zero);
* any other ``z``: the codes ``q`` themselves, POST adding ``z`` as its output zero point. A conv
  reading such a tensor subtracts ``z * sum(w)`` in its bias, which is exact only when the conv
  does not pad (PyTorch pads with ``z``, the array pads with 0), so a padded conv, a padded
  average pool, a residual operand or the model input with such a zero point fails the
  pre-flight check.

Numerics. PyTorch (fbgemm/qnnpack) requantizes in float with ties to even and rounds a conv's
output before a following ``quantized.add``; Quarry requantizes with an integer multiplier and
fuses the add into the conv's POST (one rounding). Results agree within +-1 LSB on almost every
element (../shared/METHODS.md), not bit for bit.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from hw.config import AccelConfig
from hw.program import Program

from .frontend import CaptureError, Graph, Layer, UnsupportedOpError, _bind, _op_name, _pair

__all__ = ["is_fx_quantized", "import_fx", "compile_fx", "FxQLayer", "FxQGraph", "SUPPORTED_FX_OPS"]

try:  # torch.ao namespaces (torch >= 1.13)
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq
except ImportError:  # pragma: no cover - very old torch
    nnq = nniq = None

SUPPORTED_FX_OPS = (
    "quantize_per_tensor of the input", "quantized Conv2d/ConvReLU2d (any kernel, stride, padding, groups)",
    "quantized Linear/LinearReLU", "quantized.add/add_relu (fused into a conv)", "MaxPool2d", "AvgPool2d",
    "AdaptiveAvgPool2d(1)", "flatten/view/reshape to (N, -1)", "ReLU on a zero-point-0 tensor (no-op)",
    "Dropout/Identity", "dequantize of the output",
)


@dataclass
class FxQLayer:
    """A layer's integer parameters, duck-typed like :class:`compiler.quantize.QLayer`.

    ``scale``/``signed``/``lo``/``hi``/``zp`` describe the codes Quarry stores; ``torch_zp`` and
    ``offset`` relate them to PyTorch's: ``q_torch = stored + offset``.
    """

    layer: Layer
    scale: float
    signed: bool
    lo: int = 0
    hi: int = 0
    zp: int = 0
    torch_zp: int = 0
    torch_dtype: str = "quint8"
    offset: int = 0
    #: PyTorch nodes this layer's POST does in one rounding where PyTorch rounds (and clamps)
    #: after each: the conv's own output, then ``add`` / a dequantize-ReLU-quantize region.
    fused: tuple = ()
    w_q: np.ndarray | None = None
    w_scale: np.ndarray | None = None
    bias_q: np.ndarray | None = None
    mult: np.ndarray | None = None
    res_mult: np.ndarray | None = None
    shift: np.ndarray | None = None


@dataclass
class FxQGraph:
    """Duck-typed like :class:`compiler.quantize.QGraph` for :func:`compiler.lower.lower`."""

    graph: Graph
    config: AccelConfig
    layers: dict[str, FxQLayer] = field(default_factory=dict)
    w_bits: int = 8
    a_bits: int = 8
    options: object = None
    #: The manifest's ``quant`` entry (see :func:`compiler.lower.lower`).
    quant_manifest: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Act:
    """PyTorch's quantization of one activation tensor, and how Quarry stores it."""

    scale: float
    zp: int
    dtype: torch.dtype

    @property
    def qrange(self) -> tuple[int, int]:
        return (-128, 127) if self.dtype == torch.qint8 else (0, 255)

    @property
    def offset(self) -> int:
        """``stored = q - offset``; 128 turns symmetric quint8 into int8 codes."""
        return 128 if self.dtype == torch.quint8 and self.zp == 128 else 0

    @property
    def signed(self) -> bool:
        return self.dtype == torch.qint8 or self.offset == 128

    @property
    def stored_zp(self) -> int:
        """Zero point of the stored codes (0 except for the 'any other z' case)."""
        return self.zp - self.offset


def is_fx_quantized(model) -> bool:
    """True for a ``GraphModule`` produced by ``convert_fx`` (quantized modules or ops inside)."""
    if not isinstance(model, fx.GraphModule):
        return False
    for n in model.graph.nodes:
        if n.op == "call_function" and n.target in (torch.quantize_per_tensor, torch.quantize_per_channel):
            return True
    if nnq is None:
        return False
    return any(isinstance(m, (nnq.Conv2d, nnq.Linear, nnq.Quantize)) for m in model.modules())


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _mult_shift(cfg: AccelConfig, ms: list[np.ndarray]):
    """Fixed-point multipliers: the largest shift (per channel) that keeps every one of ``ms``
    within ``mult_bits``, as in ``compiler.quantize``, so POST keeps the most precision."""
    top = (1 << cfg.mult_bits) - 1
    biggest = np.max(np.stack(ms), axis=0)
    biggest = np.where(biggest <= 0, 1e-30, biggest)
    shift = np.clip(np.floor(np.log2(top / biggest)).astype(np.int64), 0, (1 << cfg.shift_bits) - 1)
    outs = [np.round(m * np.exp2(shift)).astype(np.int64) for m in ms]
    return outs, shift


@dataclass
class _Conv:
    """A quantized conv/linear as found in the graph, before its requantization is fixed."""

    layer: Layer
    w_q: np.ndarray
    w_scale: np.ndarray
    bias: np.ndarray
    out: _Act
    relu: bool
    residual_act: _Act | None = None
    fused: tuple = ()


def import_fx(gm: fx.GraphModule, input_shape: tuple, cfg: AccelConfig) -> FxQGraph:
    """Read a ``convert_fx`` model into a Quarry layer graph with integer parameters.

    Raises :class:`~compiler.frontend.UnsupportedOpError` listing every node that cannot run
    (with :data:`SUPPORTED_FX_OPS`), or :class:`~compiler.frontend.CaptureError`.
    """
    input_shape = tuple(int(v) for v in input_shape)
    if cfg.a_bits != 8:
        raise CaptureError(f"a model quantized by PyTorch has 8-bit activations; the accelerator has "
                           f"a_bits={cfg.a_bits} (use an A8 config)")
    # A copy of the graph: shape propagation annotates nodes, and the user's model stays as it was.
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph)).eval()
    shape_error = None
    try:
        with torch.no_grad():
            fx.passes.shape_prop.ShapeProp(gm).propagate(torch.zeros(2, *input_shape))
    except Exception as e:  # noqa: BLE001 - whatever the model raises
        shape_error = e
    mods = dict(gm.named_modules(remove_duplicate=False))  # shared modules have several names
    problems = []
    consts: dict[str, object] = {}
    alias: dict[str, str | None] = {}  # node -> layer name; None: not computable (already reported)
    members: dict[str, list[fx.Node]] = {}
    acts: dict[str, _Act] = {}  # layer -> PyTorch quantization of its output
    layers: list[Layer] = []
    by_name: dict[str, Layer] = {}
    convs: dict[str, _Conv] = {}
    meta_nodes: set[str] = set()
    float_input = None
    output = None

    def bad(n, why):
        problems.append((n.name, _op_name(n, mods), why))
        alias[n.name] = None

    def meta(n):
        tm = n.meta.get("tensor_meta")
        return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None

    def out_shape(n):
        s = meta(n)[1:]
        return s if len(s) == 3 else (s[0], 1, 1)

    def value(a):
        if isinstance(a, fx.Node):
            v = consts[a.name]
        else:
            v = a
        return v.item() if isinstance(v, torch.Tensor) else v

    def bind(layer, n):
        alias[n.name] = layer.name
        members.setdefault(layer.name, []).append(n)
        layer.torch_node = n.name  # the node whose value the layer's output is (after fusion)

    def new_layer(layer, n, act):
        layers.append(layer)
        by_name[layer.name] = layer
        acts[layer.name] = act
        bind(layer, n)

    def sole_user(layer, n):
        own = {m.name for m in members[layer.name]}
        return [u for m in members[layer.name] for u in m.users if u.name not in own] == [n]

    def producer(n):
        return by_name[alias[n.name]]

    def conv_like(n, mod, linear: bool):
        x = n.args[0]
        prev = producer(x)
        xa = acts[prev.name]
        w = mod.weight()
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            if w.q_per_channel_axis() != 0:
                return bad(n, "per-channel weight scales must be per output channel (axis 0)")
            scale = w.q_per_channel_scales().double().numpy()
            zps = w.q_per_channel_zero_points().numpy()
        else:
            scale = np.full(w.shape[0], float(w.q_scale()))
            zps = np.full(w.shape[0], int(w.q_zero_point()))
        if np.any(zps != 0):
            return bad(n, "weights must be quantized symmetrically (zero point 0)")
        w_q = w.int_repr().numpy().astype(np.int64)
        lo, hi = -(1 << (cfg.w_bits - 1)), (1 << (cfg.w_bits - 1)) - 1
        if w_q.min() < lo or w_q.max() > hi:
            return bad(n, f"integer weights span {w_q.min()}..{w_q.max()}, the accelerator's w_bits={cfg.w_bits} "
                          f"holds {lo}..{hi}")
        b = mod.bias()
        bias = np.zeros(w.shape[0]) if b is None else b.detach().double().numpy()
        if linear:
            if len(meta(x)) != 2:
                return bad(n, f"Linear needs a flattened (N, features) input, not shape {list(meta(x))}")
            c, h, wd = prev.shape
            w_q = w_q.reshape(w.shape[0], c, h, wd)
            layer = Layer(n.name, "conv", [prev.name], shape=(w.shape[0], 1, 1), torch_node=n.name)
            relu = nniq is not None and isinstance(mod, nniq.LinearReLU)
        else:
            if _pair(mod.dilation) != (1, 1) or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                return bad(n, "dilation, non-zero padding modes and string padding are not supported")
            layer = Layer(n.name, "conv", [prev.name], stride=_pair(mod.stride), padding=_pair(mod.padding),
                          groups=mod.groups, shape=out_shape(n), torch_node=n.name)
            relu = nniq is not None and isinstance(mod, nniq.ConvReLU2d)
            if xa.stored_zp and layer.padding != (0, 0):
                return bad(n, f"its input ({prev.name}) has zero point {xa.zp}: Quarry folds a non-zero input zero "
                              "point into the bias, which is exact only for a conv without padding (the array pads "
                              "with 0, PyTorch with the zero point)")
        out = _Act(float(mod.scale), int(mod.zero_point), xa.dtype)  # fbgemm/qnnpack keep the input dtype
        layer.weight = torch.from_numpy(w_q * scale.reshape(-1, *([1] * (w_q.ndim - 1))))  # dequantized, for reference
        layer.bias = torch.from_numpy(bias)
        new_layer(layer, n, out)
        convs[layer.name] = _Conv(layer, w_q, scale, bias, out, relu)

    def pool(n, kind, k, s, p, unsupported):
        if unsupported:
            return bad(n, "ceil_mode, dilation, return_indices, count_include_pad=False and divisor_override "
                          "are not supported")
        prev = producer(n.args[0])
        xa = acts[prev.name]
        if kind == "avgpool" and xa.stored_zp and tuple(p) != (0, 0):
            return bad(n, f"its input ({prev.name}) has zero point {xa.zp}: a padded average pool needs zero point 0")
        new_layer(Layer(n.name, kind, [prev.name], stride=tuple(s), padding=tuple(p), kernel=tuple(k),
                        shape=out_shape(n), torch_node=n.name), n, xa)

    def relu_noop(n):
        prev = producer(n.args[0])
        xa = acts[prev.name]
        if xa.stored_zp or xa.signed:
            return bad(n, f"a separate ReLU is only supported on a tensor with zero point 0 (here {xa.zp}); "
                          "let PyTorch fuse it (ConvReLU2d, add_relu)")
        bind(prev, n)

    def requantize(n, act, prod, sole, relu):
        """quantize_per_tensor(f(dequantize(prod))) with f made of ReLU/flatten."""
        c = convs.get(prod.name)
        old = acts[prod.name]
        if c is not None and sole:
            c.out = act  # the conv requantizes straight to the new scale (one rounding, not two)
            c.relu = c.relu or relu
            c.fused += (n.name,)
            acts[prod.name] = act
            return bind(prod, n)
        noop_relu = not relu or (not old.signed and old.stored_zp == 0)
        if noop_relu and act == old:
            return bind(prod, n)
        bad(n, f"requantizing {prod.name} ({prod.kind}) to scale {act.scale:.4g}, zero point {act.zp} is only "
               "supported when a conv used by nothing else produces it")

    islands: dict[str, tuple] = {}  # quantize_per_tensor closing a float region -> (producer, sole user, relu)
    skip: set[str] = set()  # nodes inside a float region (handled at its quantize node)
    for n in gm.graph.nodes:
        if n.name in skip:
            continue
        if n.op == "get_attr":
            consts[n.name] = _fetch(gm, n.target)
            continue
        if n.op == "placeholder":
            if float_input is None:
                float_input = n
            else:
                bad(n, "models with more than one input are not supported")
            continue
        if n.op == "call_method" and n.target == "size" or \
                n.op == "call_function" and n.target is getattr and len(n.args) == 2 and n.args[1] == "shape":
            meta_nodes.add(n.name)
            continue
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node) \
                and n.args[0].name in meta_nodes:
            meta_nodes.add(n.name)
            continue
        if n.op == "output":
            out = n.args[0]
            if not isinstance(out, fx.Node):
                problems.append((n.name, "output", "the model must return a single tensor"))
            else:
                output = alias.get(out.name)
            continue
        ins = [a for a in n.all_input_nodes if a.name not in meta_nodes and a.name not in consts
               and a is not float_input]
        if any(alias.get(a.name, "") is None for a in ins) and _supported(n, mods):
            alias[n.name] = None  # downstream of a reported node (unsupported ones are reported too)
            continue
        if shape_error is not None and meta(n) is None:
            alias[n.name] = None  # no shapes past the failure; reported below if nothing else is
            continue
        if n.op == "call_function" and n.target is torch.quantize_per_tensor:
            qa = dict(zip(("input", "scale", "zero_point", "dtype"), n.args), **n.kwargs)
            x, s, z, dt = (qa.get(k) for k in ("input", "scale", "zero_point", "dtype"))
            if dt not in (torch.quint8, torch.qint8):
                bad(n, f"dtype {dt} is not supported (quint8 or qint8)")
                continue
            act = _Act(float(value(s)), int(value(z)), dt)
            if n.name in islands:
                requantize(n, act, *islands[n.name])
                continue
            if x is not float_input:
                bad(n, "only the model input, or a float region after a dequantize, may be quantized")
                continue
            if act.stored_zp:
                bad(n, f"the input has zero point {act.zp}: the host quantizes inputs with zero point 0 (or 128 "
                       "for quint8, read as int8); use an input observer with one of those, e.g. a symmetric one")
                continue
            new_layer(Layer(n.name, "input", shape=input_shape, torch_node=n.name), n, act)
        elif n.op == "call_module":
            mod = mods[n.target]
            if nnq is not None and isinstance(mod, nnq.Conv2d):
                conv_like(n, mod, linear=False)
            elif nnq is not None and isinstance(mod, nnq.Linear):
                conv_like(n, mod, linear=True)
            elif isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
                is_max = isinstance(mod, nn.MaxPool2d)
                k, s, p = _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size), _pair(mod.padding)
                unsup = mod.ceil_mode or (is_max and (_pair(mod.dilation) != (1, 1) or mod.return_indices)) \
                    or (not is_max and (not mod.count_include_pad or mod.divisor_override))
                pool(n, "maxpool" if is_max else "avgpool", k, s, p, unsup)
            elif isinstance(mod, nn.AdaptiveAvgPool2d):
                if _pair(mod.output_size) != (1, 1):
                    bad(n, "AdaptiveAvgPool2d only with output size 1")
                    continue
                c, h, w = producer(n.args[0]).shape
                pool(n, "avgpool", (h, w), (1, 1), (0, 0), False)  # one output: the stride is never used
            elif isinstance(mod, nn.ReLU) or (nnq is not None and type(mod).__name__ == "ReLU"):
                relu_noop(n)
            elif isinstance(mod, (nn.Identity, nn.Dropout)):
                bind(producer(n.args[0]), n)
            elif isinstance(mod, nn.Flatten):
                _flatten(n, meta, producer, bind, bad)
            else:
                bad(n, "module not supported")
        elif n.op == "call_function" and n.target in _Q_ADD:
            a, b = n.args[:2]
            scale, zp = (list(n.args[2:4]) + [n.kwargs.get("scale"), n.kwargs.get("zero_point")])[:2]
            if not all(isinstance(v, fx.Node) for v in (a, b)) or meta(a) != meta(b):
                bad(n, "only tensor + tensor of the same shape is supported")
                continue
            la, lb = producer(a), producer(b)
            out = _Act(float(value(scale)), int(value(zp)), acts[la.name].dtype)
            for conv, other in ((la, lb), (lb, la)):
                c = convs.get(conv.name)
                if c is None or conv is other or c.relu or conv.residual or not sole_user(conv, n):
                    continue
                if acts[other.name].stored_zp:
                    continue
                conv.residual = other.name
                c.residual_act = acts[other.name]
                c.out = out
                c.relu = n.target == torch.ops.quantized.add_relu
                c.fused += (n.name,)
                acts[conv.name] = out
                layers.remove(conv)  # read only by this add: may move after the residual's producer
                layers.append(conv)
                bind(conv, n)
                break
            else:
                bad(n, "one operand must be a quantized Conv2d/Linear without ReLU used only by this add, and the "
                       "other must have zero point 0 (or 128 for quint8)")
        elif n.op == "call_function" and n.target in (F.max_pool2d, F.avg_pool2d):
            is_max = n.target is F.max_pool2d
            a = _bind(n.target, n)
            if a is None:
                bad(n, "unexpected arguments")
                continue
            k, p = _pair(a["kernel_size"]), _pair(a["padding"])
            s = _pair(a["stride"]) if a["stride"] not in (None, [], ()) else k
            unsup = a["ceil_mode"] or (is_max and (_pair(a["dilation"]) != (1, 1) or a["return_indices"])) \
                or (not is_max and (not a["count_include_pad"] or a["divisor_override"]))
            pool(n, "maxpool" if is_max else "avgpool", k, s, p, unsup)
        elif n.op == "call_function" and n.target is F.adaptive_avg_pool2d:
            if _pair(n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")) != (1, 1):
                bad(n, "adaptive_avg_pool2d only with output size 1")
                continue
            c, h, w = producer(n.args[0]).shape
            pool(n, "avgpool", (h, w), (1, 1), (0, 0), False)  # one output: the stride is never used
        elif n.op == "call_function" and n.target in (F.relu, torch.relu) or n.op == "call_method" and n.target == "relu":
            relu_noop(n)
        elif n.op == "call_function" and n.target is torch.flatten or \
                n.op == "call_method" and n.target in ("flatten", "view", "reshape"):
            _flatten(n, meta, producer, bind, bad)
        elif n.op == "call_method" and n.target == "dequantize":
            if all(u.op == "output" for u in n.users):
                alias[n.name] = alias[n.args[0].name]  # the float output is the dequantized layer
                continue
            end, why = _float_region(n, meta, mods)
            if end is None:
                bad(n, f"float region after dequantize: {why}")
                continue
            # dequantize -> relu/flatten -> quantize_per_tensor: PyTorch leaves ops its backend
            # config does not cover (torch.relu, Tensor.flatten) in float. Treated as a
            # requantization at the quantize node (below), fused into the producing conv.
            prod = producer(n.args[0])
            islands[end.name] = (prod, sole_user(prod, n), any(_is_relu(u, mods) for u in _chain(n, end)))
            for u in [n, *_chain(n, end)]:
                bind(prod, u)
                skip.add(u.name)
        elif n.op == "call_method" and n.target == "contiguous":
            bind(producer(n.args[0]), n)
        else:
            bad(n, f"{n.op} not supported")
    if output is not None and output in convs and (convs[output].relu or by_name[output].residual):
        problems.append((by_name[output].torch_node, "output",
                         "the model output must come straight from a quantized Conv2d/Linear without ReLU or add: "
                         "its raw accumulators are read back"))
    elif output is not None and output not in convs:
        problems.append((by_name[output].torch_node, "output",
                         "the model output must come from a quantized Conv2d/Linear (raw accumulators are read back)"))
    if problems:
        raise UnsupportedOpError(problems, supported=SUPPORTED_FX_OPS)
    if shape_error is not None:
        msg = " ".join(str(shape_error).split()) or type(shape_error).__name__
        raise CaptureError(f"the model does not run on inputs of shape (N, {', '.join(map(str, input_shape))}): {msg}")
    if output is None:
        raise CaptureError("the model has no tensor output")
    graph = Graph(layers, input_shape, output)
    qlayers = _integer_layers(cfg, layers, acts, convs, output)
    quant = {"method": "torch.ao.quantization.quantize_fx", "w_bits": 8, "a_bits": 8,
             "zero_points": {name: ql.torch_zp for name, ql in qlayers.items()}}
    return FxQGraph(graph, cfg, qlayers, quant_manifest=quant)


_RELUS = (F.relu, torch.relu)
_Q_ADD = (torch.ops.quantized.add, torch.ops.quantized.add_relu)


def _supported(n: fx.Node, mods) -> bool:
    """The node is of a kind :func:`import_fx` handles (its arguments may still be refused)."""
    if n.op == "call_module":
        mod = mods[n.target]
        return (nnq is not None and isinstance(mod, (nnq.Conv2d, nnq.Linear))) or isinstance(mod, (
            nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.ReLU, nn.Identity, nn.Dropout, nn.Flatten)) \
            or type(mod).__name__ == "ReLU"
    if n.op == "call_function":
        return n.target in _Q_ADD or n.target in _RELUS or n.target in (
            torch.quantize_per_tensor, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, torch.flatten)
    if n.op == "call_method":
        return n.target in ("relu", "dequantize", *_FLATTEN_METHODS)
    return False
_FLATTEN_METHODS = ("flatten", "view", "reshape", "contiguous")


def _is_relu(n: fx.Node, mods) -> bool:
    return (n.op == "call_function" and n.target in _RELUS) or (n.op == "call_method" and n.target == "relu") \
        or (n.op == "call_module" and isinstance(mods[n.target], nn.ReLU))


def _chain(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    """Nodes strictly between ``start`` and ``end`` along single-user links."""
    out, cur = [], next(iter(start.users))
    while cur is not end:
        out.append(cur)
        cur = next(iter(cur.users))
    return out


def _float_region(dq: fx.Node, meta, mods):
    """The quantize_per_tensor closing ``dequantize -> (ReLU | flatten)* -> quantize``, or (None, why)."""
    cur = dq
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return None, f"{cur.name} has {len(users)} users (only a single chain of ReLU/flatten is supported)"
        u = users[0]
        if u.op == "call_function" and u.target is torch.quantize_per_tensor:
            return u, ""
        flat = (u.op == "call_function" and u.target is torch.flatten) or \
            (u.op == "call_method" and u.target in _FLATTEN_METHODS)
        if flat:
            src, dst = meta(u.args[0]), meta(u)
            if src is None or dst is None or not (dst == src or (len(dst) == 2 and dst[0] == src[0])):
                return None, f"{u.name} is not a flatten to (N, -1)"
        elif not _is_relu(u, mods) and not (u.op == "call_module" and isinstance(mods[u.target], (nn.Identity, nn.Dropout))):
            return None, f"{u.name} ({_op_name(u, mods)}) cannot run between dequantize and quantize_per_tensor"
        cur = u


def _flatten(n, meta, producer, bind, bad):
    src, dst = meta(n.args[0]), meta(n)
    if not (dst == src or (len(dst) == 2 and dst[0] == src[0])):
        return bad(n, f"only a flatten to (N, -1) is supported (here {list(src)} -> {list(dst)})")
    bind(producer(n.args[0]), n)


def _stored(act: _Act, relu: bool) -> dict:
    """Stored-code description (scale, signed, zp, lo, hi) of a PyTorch activation."""
    qmin, qmax = act.qrange
    lo = max(qmin, act.zp) if relu else qmin  # PyTorch's fused ReLU clamps at the zero point
    off = act.offset
    return dict(scale=act.scale, signed=act.signed, zp=act.stored_zp, lo=lo - off, hi=qmax - off,
                torch_zp=act.zp, torch_dtype=str(act.dtype).replace("torch.", ""), offset=off)


def _integer_layers(cfg, layers, acts, convs, output) -> dict[str, FxQLayer]:
    out: dict[str, FxQLayer] = {}
    bmax = (1 << (cfg.bias_bits - 1)) - 1
    for l in layers:
        if l.name not in convs:
            out[l.name] = FxQLayer(l, **_stored(acts[l.name], relu=False))
            continue
        c = convs[l.name]
        xa = acts[l.inputs[0]]
        acc_scale = xa.scale * c.w_scale
        # fbgemm adds the float bias at the accumulator scale; Quarry keeps it as an integer there.
        bias_q = np.round(c.bias / acc_scale).astype(np.int64)
        if xa.stored_zp:  # sum((q - z) w) = sum(q w) - z sum(w), exact without padding
            bias_q = bias_q - xa.stored_zp * c.w_q.reshape(len(c.w_q), -1).sum(axis=1)
        if np.abs(bias_q).max(initial=0) > bmax:
            raise CaptureError(f"layer {l.name}: quantized bias {int(np.abs(bias_q).max())} does not fit the "
                               f"{cfg.bias_bits}-bit bias field")
        ql = FxQLayer(l, **_stored(c.out, relu=c.relu), w_q=c.w_q, w_scale=c.w_scale, bias_q=bias_q, fused=c.fused)
        if l.name != output:
            ms = [acc_scale / c.out.scale]
            if c.residual_act is not None:
                ms.append(np.full(len(c.w_scale), c.residual_act.scale / c.out.scale))
            (mult, *res), shift = _mult_shift(cfg, ms)
            if mult.max() >= (1 << cfg.mult_bits) or (res and res[0].max() >= (1 << cfg.mult_bits)):
                raise CaptureError(f"layer {l.name}: requantization multiplier "
                                   f"{float(np.max(np.stack(ms))):.3g} is too large for mult_bits={cfg.mult_bits}")
            ql.mult, ql.shift = mult, shift
            ql.res_mult = res[0] if res else np.zeros_like(mult)
        out[l.name] = ql
    return out


def compile_fx(gm: fx.GraphModule, input_shape: tuple, cfg: AccelConfig, *, reuse_spad: bool = True) -> Program:
    """Import a ``convert_fx`` model (:func:`import_fx`) and lower it for ``cfg``."""
    from .lower import lower

    return lower(import_fx(gm, input_shape, cfg), reuse_spad=reuse_spad)

