"""Front end: capture a float ``nn.Module`` with ``torch.fx``, fold BatchNorm, check every op,
and produce a small layer graph (:class:`Graph`) that quantization and lowering walk.

Activations (ReLU, ReLU6, Hardtanh(0, x)) are fused into the layer that produces their input
(through a max-pool too: ``relu(maxpool(conv))`` is ``maxpool(relu(conv))`` exactly, max being
monotonic); a residual ``+`` is fused into the POST of the convolution that produces one of its
operands.

The pre-flight check runs before anything is quantized or written: every node of the traced
graph is classified, and :class:`UnsupportedOpError` lists *all* nodes that cannot run (node
name, op, reason) together with :data:`SUPPORTED_OPS`. A node downstream of an unsupported one
is not reported again unless it is unsupported itself.
"""

from __future__ import annotations

import contextlib
import copy
import io
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import CompileError

__all__ = ["Layer", "Graph", "CaptureError", "UnsupportedOpError", "capture", "SUPPORTED_OPS"]

SUPPORTED_OPS = (
    "Conv2d (any kernel, stride, padding, groups)", "Linear", "BatchNorm2d/1d (folded)",
    "ReLU/ReLU6/Hardtanh(0, x) (module, functional or method)", "MaxPool2d", "AvgPool2d",
    "AdaptiveAvgPool2d(1)", "flatten/view/reshape to (N, -1)", "residual add (+, +=, torch.add)",
    "Dropout/Identity (no-ops in eval)",
)

_CONCAT_REASON = (
    "concatenation is not supported: its operands would have to share one activation scale, "
    "which compiler.quantize does not provide, and the first operand's channel count would have "
    "to be a multiple of the array rows (so the second starts on a channel block)")


class CaptureError(CompileError):
    """The model cannot be traced or run on the given input shape."""


class UnsupportedOpError(CaptureError):
    """The model uses ops Quarry cannot run; ``problems`` lists (node name, op, reason)."""

    def __init__(self, problems, supported=SUPPORTED_OPS):
        self.problems = list(problems)
        lines = "; ".join(f"{n} ({op}): {why}" for n, op, why in self.problems)
        super().__init__(f"unsupported ops: {lines}. Supported: {', '.join(supported)}")


@dataclass
class Layer:
    """One accelerator-level layer.

    kind: ``input`` | ``conv`` (Linear is a conv over the whole input) | ``maxpool`` | ``avgpool``.
    ``act``: ``None`` | ``relu`` | ``relu6`` | ``("clamp", hi)``; ``residual``: layer name added
    before the activation.
    """

    name: str
    kind: str
    inputs: list[str] = field(default_factory=list)
    weight: torch.Tensor | None = None  # conv weight (Cout, Cin/groups, kh, kw)
    bias: torch.Tensor | None = None
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    groups: int = 1
    kernel: tuple = (1, 1)
    act: object = None
    residual: str | None = None
    shape: tuple = ()  # output (C, H, W)
    torch_node: str = ""


@dataclass
class Graph:
    layers: list[Layer]
    input_shape: tuple
    output: str

    def __getitem__(self, name) -> Layer:
        return next(l for l in self.layers if l.name == name)


def _fold_bn(w, b, bn):
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b = (b if b is not None else torch.zeros_like(bn.running_mean)) - bn.running_mean
    return w, b * scale + bn.bias.detach()


class _Tracer(fx.Tracer):
    """torch.fx's default tracer, also keeping quantization observers/stubs as leaves, so a model
    prepared (but not converted) for quantization is reported instead of failing to trace."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or type(m).__module__.startswith("torch.ao.quantization")


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# Signatures (names, defaults) of the functional ops we accept, to read their arguments.
_SIGS = {
    F.max_pool2d: (("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                   {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}),
    F.avg_pool2d: (("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
                   {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                    "divisor_override": None}),
    F.adaptive_avg_pool2d: (("input", "output_size"), {}),
    F.hardtanh: (("input", "min_val", "max_val", "inplace"), {"min_val": -1.0, "max_val": 1.0, "inplace": False}),
    torch.flatten: (("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1}),
}


def _bind(fn, n: fx.Node) -> dict | None:
    names, defaults = _SIGS[fn]
    if len(n.args) > len(names) or set(n.kwargs) - set(names):
        return None
    out = dict(defaults)
    out.update(zip(names, n.args))
    out.update(n.kwargs)
    return out if all(k in out for k in names) else None


def _op_name(n: fx.Node, mods) -> str:
    if n.op == "call_module":
        return type(mods[n.target]).__name__
    if n.op == "call_method":
        return f"Tensor.{n.target}"
    if n.op == "get_attr":
        return "get_attr"
    t = n.target
    name = getattr(t, "__name__", str(t))
    if getattr(F, name, None) is t:
        return f"F.{name}"
    if getattr(operator, name, None) is t:
        return f"operator.{name}"
    if getattr(torch, name, None) is t:
        return f"torch.{name}"
    return name


_ADD = (operator.add, operator.iadd, torch.add)
_RELU = (F.relu, torch.relu, torch.relu_)
_CAT = (torch.cat, torch.concat)


def _classify(n: fx.Node, mods) -> tuple[str | None, str]:
    """(handler kind, reason). kind None means the op itself is unsupported (reason says why)."""
    if n.op == "call_module":
        mod = mods[n.target]
        if isinstance(mod, nn.Conv2d):
            return "conv", ""
        if isinstance(mod, nn.Linear):
            return "linear", ""
        if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
            return "bn", ""
        if isinstance(mod, (nn.ReLU, nn.ReLU6)):
            return "act", ""
        if isinstance(mod, nn.Hardtanh):
            return ("act", "") if mod.min_val == 0 else (None, "Hardtanh only with min_val=0")
        if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
            return "pool", ""
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            return ("gap", "") if _pair(mod.output_size) == (1, 1) else (None, "AdaptiveAvgPool2d only with output size 1")
        if isinstance(mod, nn.Flatten):
            return "flatten", ""
        if isinstance(mod, (nn.Identity, nn.Dropout)):
            return "identity", ""
        if type(mod).__module__.startswith("torch.ao.quantization"):
            return None, "observer/fake-quantize module: convert the model with convert_fx() first"
        return None, "module not supported"
    if n.op == "call_function":
        t = n.target
        if t in _ADD:
            return "add", ""
        if t in _RELU or t in (F.relu6, F.hardtanh):
            return "act", ""
        if t in (F.max_pool2d, F.avg_pool2d):
            return "pool", ""
        if t is F.adaptive_avg_pool2d:
            return "gap", ""
        if t is torch.flatten:
            return "flatten", ""
        if t is operator.getitem:
            return "getitem", ""
        if t is getattr and len(n.args) == 2 and n.args[1] == "shape":
            return "meta", ""
        if t in _CAT:
            return None, _CONCAT_REASON
        return None, "function not supported"
    if n.op == "call_method":
        if n.target == "relu":
            return "act", ""
        if n.target in ("view", "reshape", "flatten"):
            return "flatten", ""
        if n.target == "size":
            return "meta", ""
        if n.target == "contiguous":
            return "identity", ""
        return None, "method not supported"
    if n.op == "get_attr":
        return None, "parameters/buffers used outside modules are not supported"
    return n.op, ""  # placeholder, output


def capture(model: nn.Module, input_shape: tuple) -> Graph:
    """Trace ``model`` (eval mode) for inputs of shape (C, H, W) and lower it to a :class:`Graph`.

    Raises :class:`UnsupportedOpError` listing every node that cannot run, and
    :class:`CaptureError` if the model does not trace or does not run on ``input_shape``.
    """
    input_shape = tuple(int(v) for v in input_shape)
    model = model.eval()
    try:
        # A GraphModule is used as traced (re-tracing it could trace into observers); a copy,
        # because dead code is removed and shapes are recorded on the graph.
        graph = copy.deepcopy(model.graph) if isinstance(model, fx.GraphModule) else _Tracer().trace(model)
        gm = fx.GraphModule(model, graph)
    except Exception as e:  # noqa: BLE001 - tracing errors come in many types
        raise UnsupportedOpError([("<model>", "trace", f"torch.fx cannot trace it: {e}")]) from None
    gm.graph.eliminate_dead_code()
    gm.recompile()
    # Batch 2, so a reshape that merges the batch dimension is visible in the shapes.
    shape_error = failing_node = None
    try:
        # ShapeProp prints the traceback of a failing node to stderr before re-raising; the
        # user gets one line (below) instead.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            fx.passes.shape_prop.ShapeProp(gm).propagate(torch.zeros(2, *input_shape))
    except Exception as e:  # noqa: BLE001 - whatever the model raises
        # ShapeProp wraps the model's own error in one that dumps the node's metadata.
        shape_error = e.__cause__ if e.__cause__ is not None else e
        failing_node = str(e).split("node=", 1)[1].split(" ", 1)[0] if "node=" in str(e) else None
    mods = dict(gm.named_modules(remove_duplicate=False))  # shared modules have several names
    problems = []
    layers: list[Layer] = []
    alias: dict[str, str | None] = {}  # fx node -> layer producing its value; None: not computable
    members: dict[str, list[fx.Node]] = {}  # layer -> fx nodes whose value is that layer's output
    meta_nodes: set[str] = set()  # shape arithmetic (x.size(0), x.shape): allowed as arguments only
    by_name: dict[str, Layer] = {}

    def meta(n):
        tm = n.meta.get("tensor_meta")
        return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None

    def out_shape(n):
        s = meta(n)[1:]
        return s if len(s) == 3 else (s[0], 1, 1)

    def bind(layer: Layer, n: fx.Node):
        alias[n.name] = layer.name
        members.setdefault(layer.name, []).append(n)

    def new_layer(layer: Layer, n: fx.Node):
        layers.append(layer)
        by_name[layer.name] = layer
        bind(layer, n)

    def sole_user(layer: Layer, n: fx.Node) -> bool:
        """``n`` is the only node outside the layer's own alias chain that reads its value."""
        own = {m.name for m in members[layer.name]}
        ext = [u for m in members[layer.name] for u in m.users if u.name not in own]
        return ext == [n]

    def producer(n: fx.Node) -> Layer:
        return by_name[alias[n.name]]

    def bad(n, why):
        problems.append((n.name, _op_name(n, mods), why))
        alias[n.name] = None

    def act_of(n) -> object:
        if n.op == "call_module":
            mod = mods[n.target]
            if isinstance(mod, nn.ReLU6):
                return "relu6"
            if isinstance(mod, nn.Hardtanh):
                return ("clamp", float(mod.max_val))
            return "relu"
        if n.target is F.relu6:
            return "relu6"
        if n.target is F.hardtanh:
            a = _bind(F.hardtanh, n)
            if a is None or a["min_val"] != 0 or isinstance(a["max_val"], fx.Node):
                return None
            return ("clamp", float(a["max_val"]))
        return "relu"

    def fuse_act(n: fx.Node):
        act = act_of(n)
        if act is None:
            return bad(n, "hardtanh only with min_val=0 and a constant max_val")
        prod = producer(n.args[0])
        if prod.kind == "maxpool" and sole_user(prod, n):
            conv = by_name[prod.inputs[0]]
            # relu(maxpool(y)) == maxpool(relu(y)): fuse into the conv under the pool.
            if conv.kind == "conv" and conv.act is None and sole_user(conv, members[prod.name][0]):
                conv.act = act
                return bind(prod, n)
        if prod.kind != "conv" or prod.act is not None or not sole_user(prod, n):
            return bad(n, "activation must follow a conv/linear/add (or a max-pool of one) with no other users")
        prod.act = act
        bind(prod, n)

    def pool(n: fx.Node, kind: str, k, s, p, unsupported: bool):
        if unsupported:
            return bad(n, "ceil_mode, dilation, return_indices, count_include_pad=False and divisor_override "
                          "are not supported")
        if any(isinstance(v, fx.Node) for v in (*k, *s, *p)):
            return bad(n, "pooling parameters must be constants")
        new_layer(Layer(n.name, kind, [alias[n.args[0].name]], stride=tuple(s), padding=tuple(p),
                        kernel=tuple(k), shape=out_shape(n), torch_node=n.name), n)

    n_inputs = 0
    output = None
    for n in gm.graph.nodes:
        kind, why = _classify(n, mods)
        if kind == "getitem" and isinstance(n.args[0], fx.Node) and n.args[0].name in meta_nodes:
            kind = "meta"  # x.shape[0]
        if kind is None:
            bad(n, why)
            continue
        if kind == "meta":
            meta_nodes.add(n.name)
            continue
        ins = [a for a in n.all_input_nodes if a.name not in meta_nodes]
        if kind == "output":
            out = n.args[0]
            if not isinstance(out, fx.Node):
                problems.append((n.name, "output", "the model must return a single tensor"))
            elif alias.get(out.name) is not None:
                output = alias[out.name]
                ol = by_name[output]
                if ol.kind != "conv" or ol.act is not None or ol.residual:
                    problems.append((out.name, _op_name(out, mods),
                                     "the model output must come straight from a Conv2d/Linear (no activation, "
                                     "pooling or residual add after it): its raw accumulators are read back"))
            continue
        if kind == "getitem" and isinstance(n.args[1], int) and any(alias.get(a.name, "") is None for a in ins):
            alias[n.name] = None  # unpacking the tuple an unsupported module returns (LSTM): reported
            continue
        if kind == "getitem":
            bad(n, "indexing/slicing tensors is not supported")
            continue
        if any(alias.get(a.name, "") is None for a in ins):
            alias[n.name] = None  # downstream of an unsupported node: already reported
            continue
        if kind == "placeholder":
            n_inputs += 1
            if n_inputs > 1:
                bad(n, "models with more than one input are not supported")
                continue
            new_layer(Layer(n.name, "input", shape=input_shape, torch_node=n.name), n)
            continue
        if shape_error is not None and meta(n) is None:
            alias[n.name] = None  # no shapes past the failure; reported below if nothing else is
            continue
        if kind == "identity":
            bind(producer(n.args[0]), n)
        elif kind == "conv":
            mod = mods[n.target]
            if mod.dilation not in ((1, 1), 1) or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                bad(n, "dilation, non-zero padding modes and string padding are not supported")
                continue
            new_layer(Layer(n.name, "conv", [alias[n.args[0].name]], mod.weight.detach().clone(),
                            None if mod.bias is None else mod.bias.detach().clone(),
                            _pair(mod.stride), _pair(mod.padding), mod.groups,
                            shape=out_shape(n), torch_node=n.name), n)
        elif kind == "linear":
            mod = mods[n.target]
            x = n.args[0]
            if len(meta(x)) != 2:
                bad(n, f"Linear needs a flattened (N, features) input, not shape {list(meta(x))}")
                continue
            prev = producer(x)
            c, h, w = prev.shape
            wt = mod.weight.detach().reshape(mod.out_features, c, h, w).clone()
            new_layer(Layer(n.name, "conv", [prev.name], wt,
                            None if mod.bias is None else mod.bias.detach().clone(),
                            shape=(mod.out_features, 1, 1), torch_node=n.name), n)
        elif kind == "bn":
            prod = producer(n.args[0])
            if prod.kind != "conv" or prod.act is not None or prod.residual or not sole_user(prod, n):
                bad(n, "BatchNorm must directly follow a conv/linear with no other users")
                continue
            prod.weight, prod.bias = _fold_bn(prod.weight, prod.bias, mods[n.target])
            bind(prod, n)
        elif kind == "act":
            fuse_act(n)
        elif kind == "pool":
            if n.op == "call_module":
                mod = mods[n.target]
                is_max = isinstance(mod, nn.MaxPool2d)
                k, s, p = _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size), _pair(mod.padding)
                unsup = mod.ceil_mode or (is_max and (_pair(mod.dilation) != (1, 1) or mod.return_indices)) \
                    or (not is_max and (not mod.count_include_pad or mod.divisor_override))
            else:
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
        elif kind == "gap":
            if n.op == "call_function" and _pair(n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")) != (1, 1):
                bad(n, "adaptive_avg_pool2d only with output size 1")
                continue
            c, h, w = producer(n.args[0]).shape
            pool(n, "avgpool", (h, w), (1, 1), (0, 0), False)  # one output: the stride is never used
        elif kind == "flatten":
            src, dst = meta(n.args[0]), meta(n)
            if not (dst == src or (len(dst) == 2 and dst[0] == src[0])):
                bad(n, f"only a flatten to (N, -1) is supported (here {list(src)} -> {list(dst)})")
                continue
            bind(producer(n.args[0]), n)
        elif kind == "add":
            a, b = n.args[:2] if len(n.args) >= 2 else (None, None)
            if not all(isinstance(v, fx.Node) for v in (a, b)) or len(n.args) > 2 or n.kwargs \
                    or a.name in meta_nodes or b.name in meta_nodes:
                bad(n, "only tensor + tensor (no scalars, no alpha) is supported")
                continue
            if meta(a) != meta(b):
                bad(n, f"operands must have the same shape (no broadcasting): {list(meta(a))} + {list(meta(b))}")
                continue
            la, lb = producer(a), producer(b)
            # Fuse into the conv whose output is used only here; the other operand is the residual.
            for conv, other in ((lb, la), (la, lb)):
                if conv is not other and conv.kind == "conv" and conv.act is None and conv.residual is None \
                        and sole_user(conv, n):
                    conv.residual = other.name
                    # The conv is read only by this add, so it may move after the residual's
                    # producer: lowering needs the residual computed first.
                    layers.remove(conv)
                    layers.append(conv)
                    bind(conv, n)
                    break
            else:
                bad(n, "one operand must be a conv/linear output (no activation yet) used only by the add")
    if problems:
        raise UnsupportedOpError(problems)
    if shape_error is not None:
        msg = " ".join(str(shape_error).split()) or type(shape_error).__name__
        where = f" (at {failing_node})" if failing_node else ""
        raise CaptureError(f"the model does not run on inputs of shape (N, {', '.join(map(str, input_shape))})"
                           f"{where}: {msg}")
    if output is None:
        raise CaptureError("the model has no tensor output")
    bad_values = []
    for l in layers:  # after BatchNorm folding, which can itself produce inf (zero variance)
        for what, t in (("weight", l.weight), ("bias", l.bias)):
            if t is not None and not bool(torch.isfinite(t).all()):
                n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                name = l.name if l.torch_node in ("", l.name) else f"{l.name} ({l.torch_node})"
                bad_values.append(f"layer {name} {what}: {n_nan} NaN, {n_inf} inf")
    if bad_values:
        raise CaptureError(f"non-finite parameters (after BatchNorm folding): {'; '.join(bad_values)}")
    return Graph(layers, input_shape, output)


def check_calibration(calib) -> torch.Tensor:
    """The calibration set as a float tensor (N, C, H, W), or :class:`CaptureError` naming what is
    wrong with it (not a tensor or array, wrong rank, empty, non-finite values)."""
    try:
        t = torch.as_tensor(calib)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CaptureError(f"calibration set must be a tensor or array of images (N, C, H, W): {e}") from None
    if t.dim() != 4:
        raise CaptureError(f"calibration set must have shape (N, C, H, W), not {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise CaptureError(f"calibration set is empty (shape {tuple(t.shape)})")
    if not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise CaptureError(f"calibration set has dtype {t.dtype}; give real-valued images")
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise CaptureError(f"calibration set has {int((~torch.isfinite(t)).sum())} non-finite values (NaN/inf)")
    return t
