"""Front end: capture a float ``nn.Module`` with ``torch.fx``, fold BatchNorm, check every op,
and produce a small layer graph (:class:`Graph`) that quantization and lowering walk.

Activations (ReLU, ReLU6, Hardtanh(0, x)) are fused into the layer that produces their input;
a residual ``+`` is fused into the POST of the convolution that produces one of its operands.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Layer", "Graph", "UnsupportedOpError", "capture", "SUPPORTED_OPS"]

SUPPORTED_OPS = (
    "Conv2d (any kernel, stride, padding, groups)", "Linear", "BatchNorm2d/1d (folded)", "ReLU", "ReLU6",
    "Hardtanh(0, x)", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d(1)", "flatten/view/reshape to 2-D",
    "residual add (+, torch.add)", "Dropout/Identity (no-ops in eval)",
)


class UnsupportedOpError(ValueError):
    """The model uses ops Quarry cannot run; ``problems`` lists (node name, op, reason)."""

    def __init__(self, problems):
        self.problems = problems
        lines = "; ".join(f"{n} ({op}): {why}" for n, op, why in problems)
        super().__init__(f"unsupported ops: {lines}. Supported: {', '.join(SUPPORTED_OPS)}")


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


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def capture(model: nn.Module, input_shape: tuple) -> Graph:
    """Trace ``model`` (eval mode) for inputs of shape (C, H, W) and lower it to a :class:`Graph`.

    Raises :class:`UnsupportedOpError` listing every node that cannot run, before any output.
    """
    model = model.eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - tracing errors come in many types
        raise UnsupportedOpError([("<model>", "trace", f"torch.fx cannot trace it: {e}")]) from None
    ShapeProp = fx.passes.shape_prop.ShapeProp
    ShapeProp(gm).propagate(torch.zeros(1, *input_shape))
    mods = dict(gm.named_modules())
    problems = []
    layers: list[Layer] = []
    alias: dict[str, str] = {}  # fx node -> layer producing its value
    users = {n.name: len(n.users) for n in gm.graph.nodes}

    def src(n):
        return alias[n.name]

    def out_shape(n):
        s = tuple(n.meta["tensor_meta"].shape[1:])
        return s if len(s) == 3 else (s[0], 1, 1)

    def by_name(name):
        return next(l for l in layers if l.name == name)

    def set_act(n, act):
        prod = by_name(src(n.args[0]))
        if prod.kind != "conv" or prod.act is not None or users[n.args[0].name] != 1:
            problems.append((n.name, str(n.target), "activation must follow a conv/linear/add with no other users"))
            return
        prod.act = act
        alias[n.name] = prod.name

    output = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            layers.append(Layer(n.name, "input", shape=tuple(input_shape), torch_node=n.name))
            alias[n.name] = n.name
        elif n.op == "output":
            output = src(n.args[0])
        elif n.op == "call_module":
            mod = mods[n.target]
            if isinstance(mod, nn.Conv2d):
                layers.append(Layer(n.name, "conv", [src(n.args[0])], mod.weight.detach().clone(),
                                    None if mod.bias is None else mod.bias.detach().clone(),
                                    _pair(mod.stride), _pair(mod.padding), mod.groups,
                                    shape=out_shape(n), torch_node=n.name))
                if mod.dilation not in ((1, 1), 1) or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                    problems.append((n.name, "Conv2d", "dilation, non-zero padding modes and string padding are not supported"))
                alias[n.name] = n.name
            elif isinstance(mod, nn.Linear):
                prev = by_name(src(n.args[0]))
                c, h, w = prev.shape
                wt = mod.weight.detach().reshape(mod.out_features, c, h, w).clone()
                layers.append(Layer(n.name, "conv", [prev.name], wt,
                                    None if mod.bias is None else mod.bias.detach().clone(),
                                    shape=(mod.out_features, 1, 1), torch_node=n.name))
                alias[n.name] = n.name
            elif isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
                prod = by_name(src(n.args[0]))
                if prod.kind != "conv" or prod.act is not None or prod.residual or users[n.args[0].name] != 1:
                    problems.append((n.name, type(mod).__name__, "BatchNorm must directly follow a conv/linear"))
                    continue
                prod.weight, prod.bias = _fold_bn(prod.weight, prod.bias, mod)
                alias[n.name] = prod.name
            elif isinstance(mod, nn.ReLU):
                set_act(n, "relu")
            elif isinstance(mod, nn.ReLU6):
                set_act(n, "relu6")
            elif isinstance(mod, nn.Hardtanh) and mod.min_val == 0:
                set_act(n, ("clamp", float(mod.max_val)))
            elif isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
                k, s, p = _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size), _pair(mod.padding)
                bad = getattr(mod, "ceil_mode", False) or (isinstance(mod, nn.MaxPool2d) and _pair(mod.dilation) != (1, 1)) \
                    or (isinstance(mod, nn.AvgPool2d) and (not mod.count_include_pad or mod.divisor_override))
                if bad:
                    problems.append((n.name, type(mod).__name__, "ceil_mode, dilation, count_include_pad=False and divisor_override are not supported"))
                kind = "maxpool" if isinstance(mod, nn.MaxPool2d) else "avgpool"
                layers.append(Layer(n.name, kind, [src(n.args[0])], stride=s, padding=p, kernel=k,
                                    shape=out_shape(n), torch_node=n.name))
                alias[n.name] = n.name
            elif isinstance(mod, nn.AdaptiveAvgPool2d) and _pair(mod.output_size) == (1, 1):
                c, h, w = by_name(src(n.args[0])).shape
                layers.append(Layer(n.name, "avgpool", [src(n.args[0])], stride=(h, w), kernel=(h, w),
                                    shape=(c, 1, 1), torch_node=n.name))
                alias[n.name] = n.name
            elif isinstance(mod, (nn.Flatten, nn.Identity, nn.Dropout)):
                alias[n.name] = src(n.args[0])
            else:
                problems.append((n.name, type(mod).__name__, "module not supported"))
        elif n.op == "call_function" and n.target in (operator.add, torch.add):
            a, b = n.args[:2]
            if not all(isinstance(x, fx.Node) for x in (a, b)) or len(n.args) > 2 or n.kwargs:
                problems.append((n.name, "add", "only tensor + tensor is supported"))
                continue
            la, lb = by_name(src(a)), by_name(src(b))
            # Fuse into the conv whose output is used only here; the other operand is the residual.
            for conv, other, node in ((lb, la, b), (la, lb, a)):
                if conv.kind == "conv" and conv.act is None and conv.residual is None and users[node.name] == 1:
                    conv.residual = other.name
                    alias[n.name] = conv.name
                    break
            else:
                problems.append((n.name, "add", "one operand must be a conv/linear output used only by the add"))
        elif n.op == "call_function" and n.target in (F.relu, torch.relu):
            set_act(n, "relu")
        elif n.op == "call_function" and n.target is F.relu6:
            set_act(n, "relu6")
        elif n.op == "call_function" and n.target is torch.flatten or (
                n.op == "call_method" and n.target in ("view", "reshape", "flatten")):
            alias[n.name] = src(n.args[0])
        elif n.op == "call_method" and n.target == "relu":
            set_act(n, "relu")
        elif n.op == "get_attr":
            problems.append((n.name, "get_attr", "parameters used outside modules are not supported"))
        else:
            problems.append((n.name, str(getattr(n.target, "__name__", n.target)), f"{n.op} not supported"))
    if problems:
        raise UnsupportedOpError(problems)
    return Graph(layers, tuple(input_shape), output)
