"""Quarry as a PyTorch 2 backend: a PT2E ``Quantizer`` (torchao) and a lowering of the
``convert_pt2e`` graph (Q/DQ nodes around ATen ops) to a Quarry program.

The standard PT2E flow, ending in the same program container as :func:`compiler.compile`::

    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, convert_pt2e
    from compiler.pt2e import QuarryQuantizer, compile_pt2e

    m = torch.export.export(model.eval(), (x[:2],), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)).module()
    m = prepare_pt2e(m, QuarryQuantizer(cfg))     # cfg: hw.config.AccelConfig
    m(calibration_images)                         # observers
    m = convert_pt2e(m)                           # quantize/dequantize nodes around aten ops
    prog = compile_pt2e(m, (1, 28, 28), cfg)      # hw.program.Program

**The quantizer** (:class:`QuarryQuantizer`) reads every constraint from the
:class:`~hw.config.AccelConfig`, so the graph it produces always fits the hardware:

* weights per output channel, symmetric (zero point 0), ``quant_min/quant_max`` of ``w_bits``
  (``w_bits`` may be narrower than the config's, never wider);
* activations per tensor with zero point 0 at the config's ``a_bits``: unsigned
  ``[0, 2**a - 1]`` after a ReLU/ReLU6/Hardtanh(0, x) (the array multiplies raw codes and pads
  with 0), signed symmetric otherwise, and for the model input whichever the calibration data
  needs (the observer switches to signed the first time it sees a negative value);
* the bias quantized to the config's ``bias_bits`` at scale ``s_x * s_w`` (a
  ``DerivedQuantizationSpec``), so the integer bias POST adds is in the graph;
* patterns the hardware fuses are quantized once, at their end: conv/linear [+ residual add]
  [+ ReLU/ReLU6/Hardtanh(0, x)] is one POST, so nothing inside it is rounded;
* pooling and flatten share their input's observer (POOL keeps its input's scale and zero point);
* the residual operand of an add keeps its own scale: POST scales it with its own per-channel
  multiplier (``res_mult``), so the add's inputs need no shared scale;
* the model's last conv/linear is not quantized at its output: Quarry returns its raw
  accumulators (``hw.program.decode_output``).

``pe_kind`` ``pot`` is refused (PT2E's quantize ops are uniform; power-of-two weights come from
``compiler.compile(..., weight_method="inq"|"doubleq"|"doubleqext")``); ``hybrid`` runs the
uniform INT layers this quantizer produces.

**The lowering** (:func:`import_pt2e`, :func:`compile_pt2e`) takes every number from the graph:
the input's ``quantize_per_tensor`` scale and range, each ``dequantize_per_channel`` weight's
integer codes and scales, the integer bias (or, for graphs from other quantizers, a float bias
divided by ``s_x * s_w``), each output ``quantize_per_tensor``'s scale and range, and folds
ReLU/ReLU6/Hardtanh into the POST clamp. Only the fixed-point form of each requantization
multiplier (``mult``, ``shift``: :func:`compiler.quantize.mult_shift`) is computed here. The
result is a :class:`compiler.quantize.QGraph`, lowered by :func:`compiler.lower.lower` exactly
like Quarry's own PTQ output (and :func:`compiler.quantize.simulate` runs it bit-exact with
the golden model).

A pre-flight pass classifies every node before anything is built; ops Quarry cannot run raise
:class:`~compiler.frontend.UnsupportedOpError` naming each node, its op and why (with
:data:`SUPPORTED_PT2E_OPS`).

Numerics: PyTorch evaluates the Q/DQ graph in float (requantization = float multiply then
round half to even); Quarry requantizes with an integer multiplier and rounds ties away from
zero, and averages pools with a fixed-point reciprocal. The two agree within one LSB on almost
every element (../shared/METHODS.md), not bit for bit; the golden model and the RTL agree bit
for bit.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from hw.config import AccelConfig
from hw.program import Program

from . import CompileError
from . import _is_pt2e_quantized as is_pt2e_quantized
from .frontend import CaptureError, Graph, Layer, UnsupportedOpError
from .quantize import QGraph, QLayer, QuantError, QuantOptions, mult_shift, qrange

from torchao.quantization.pt2e.observer import (  # noqa: E402
    HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver)
from torchao.quantization.pt2e.quantizer import (  # noqa: E402
    DerivedQuantizationSpec, QuantizationAnnotation, QuantizationSpec, Quantizer, SharedQuantizationSpec)
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY  # noqa: E402

__all__ = ["QuarryQuantizer", "PT2EError", "import_pt2e", "compile_pt2e", "is_pt2e_quantized",
           "SUPPORTED_PT2E_OPS", "export_for_quarry", "write_model_dir", "quarry_observer",
           "QuarryWeightObserver"]

aten = torch.ops.aten
_qd = torch.ops.quantized_decomposed

SUPPORTED_PT2E_OPS = (
    "aten.conv2d (any kernel, stride, padding, groups; no dilation)", "aten.linear",
    "aten.add.Tensor (residual: fused into the POST of a conv/linear that only feeds the add)",
    "aten.relu/relu6/hardtanh(0, x)/clamp(0, x) (fused into the conv/linear/add before them)",
    "aten.max_pool2d", "aten.avg_pool2d", "aten.adaptive_avg_pool2d(1)/mean over H, W",
    "aten.flatten/view/reshape to (N, -1)", "aten.dropout (eval)",
    "quantize_per_tensor/dequantize_per_tensor with zero point 0",
    "dequantize_per_channel weights (axis 0, zero point 0)",
)


class PT2EError(CompileError):
    """The PT2E quantizer cannot target this configuration, or the graph is not a PT2E graph."""


# -- the quantizer -----------------------------------------------------------------------------

_CONV = (aten.conv2d.default,)
_LINEAR = (aten.linear.default,)
_ADD = (aten.add.Tensor, aten.add_.Tensor)
_RELU = (aten.relu.default, aten.relu_.default)
_RELU6 = (aten.relu6.default,)
_CLAMP = (aten.hardtanh.default, aten.hardtanh_.default, aten.clamp.default, aten.clamp_.default)
_MAXPOOL = (aten.max_pool2d.default,)
_AVGPOOL = (aten.avg_pool2d.default,)
_GAP = (aten.adaptive_avg_pool2d.default, aten.mean.dim)
_RESHAPE = (aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_IDENTITY = (aten.dropout.default, aten.contiguous.default, aten.clone.default)
_META = (aten.sym_size.int,)
_SHARED = _MAXPOOL + _AVGPOOL + _GAP + _RESHAPE + _IDENTITY


def _clamp_bounds(n: fx.Node):
    """(min, max) of a clamp-like node (max None: unbounded), or None if not one."""
    if n.target in _RELU:
        return 0.0, None
    if n.target in _RELU6:
        return 0.0, 6.0
    if n.target in _CLAMP:
        names = ("min_val", "max_val") if "hardtanh" in str(n.target) else ("min", "max")
        defaults = (-1.0, 1.0) if "hardtanh" in str(n.target) else (None, None)
        vals = list(n.args[1:3]) + [n.kwargs.get(k, d) for k, d in zip(names, defaults)][len(n.args) - 1:]
        lo, hi = (vals + [None, None])[:2]
        if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
            return None
        return lo, hi
    return None


def _sole_user(n: fx.Node):
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def _is_output_user(n: fx.Node) -> bool:
    return all(u.op == "output" for u in n.users)


def _sign_from_data(base):
    """An activation observer class that starts unsigned (zero point 0) and switches to signed
    symmetric the first time it sees a negative value: the model input, whose range is only known
    from the calibration data (as in :func:`compiler.quantize.quantize`)."""

    class SignFromData(base):
        def forward(self, x):
            if self.dtype != torch.int8 and x.numel() and float(x.detach().min()) < 0:
                bits = int(round(math.log2(self.quant_max - self.quant_min + 1)))
                self.dtype = torch.int8
                self.qscheme = torch.per_tensor_symmetric
                self.quant_min, self.quant_max = qrange(bits, True)
            return super().forward(x)

    SignFromData.__name__ = SignFromData.__qualname__ = f"SignFromData{base.__name__}"
    return SignFromData


class QuarryWeightObserver(PerChannelMinMaxObserver):
    """Per-output-channel min-max weights with Quarry's symmetric convention (as
    :func:`compiler.quantize.weight_scales` ``minmax``): ``scale = max|w| / quant_max``, so no
    weight is clipped. torch's ``PerChannelMinMaxObserver`` divides by ``(quant_max - quant_min) / 2``
    (7.5 at 4 bits), which clips each channel's largest positive weight by up to half a step: on
    ``quarry_cnn`` / Fashion-MNIST at W4A8 that costs about 5 points (bench/results/pt2e.md)."""

    def calculate_qparams(self):
        top = torch.maximum(-self.min_val, self.max_val).double()
        top = torch.where(top > 0, top, torch.ones_like(top))
        return (top / self.quant_max).float(), torch.zeros(top.shape, dtype=torch.int32)


def quarry_observer(method: str = "mse", percentile: float = 99.99, max_samples: int = 200_000):
    """An activation observer class that picks each tensor's clip the way Quarry's own PTQ does
    (:func:`compiler.quantize.estimate_clip`: ``minmax``, ``percentile``, ``mse``, ``aciq``,
    ``aciq_gauss``) on a seeded subsample of the calibration values, for the quant range it is
    given; zero point 0, ``scale = clip / quant_max`` (Quarry's convention). Use it as
    ``QuarryQuantizer(cfg, act_observer=quarry_observer("mse"))``. torch's HistogramObserver sizes
    its search for the dtype (256 levels) whatever the range, which costs accuracy at 4 bits."""
    from .quantize import METHODS, estimate_clip

    if method not in METHODS:
        raise PT2EError(f"method must be one of {', '.join(METHODS)}, not {method!r}")

    class QuarryObserver(MinMaxObserver):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._samples: list[np.ndarray] = []
            self._rng = np.random.default_rng(0)

        def forward(self, x):
            v = x.detach().reshape(-1).double().cpu().numpy()
            if v.size > max_samples:
                v = self._rng.choice(v, max_samples, replace=False)
            self._samples.append(v)
            if sum(len(a) for a in self._samples) > 2 * max_samples:
                allv = np.concatenate(self._samples)
                self._samples = [self._rng.choice(allv, max_samples, replace=False)]
            return super().forward(x)

        def calculate_qparams(self):
            if not self._samples:
                return super().calculate_qparams()
            v = np.concatenate(self._samples)
            if v.size > max_samples:
                v = np.random.default_rng(0).choice(v, max_samples, replace=False)
            signed = self.quant_min < 0
            clip = estimate_clip(v, _bits(self.quant_min, self.quant_max), signed, method, percentile)
            return (torch.tensor([clip / self.quant_max], dtype=torch.float32),
                    torch.tensor([0], dtype=torch.int32))

    QuarryObserver.__name__ = QuarryObserver.__qualname__ = f"QuarryObserver_{method}"
    return QuarryObserver


class QuarryQuantizer(Quantizer):
    """A torchao PT2E ``Quantizer`` for a Quarry accelerator (see the module docstring).

    ``QuarryQuantizer(config, w_bits=None, act_observer=HistogramObserver,
    weight_observer=QuarryWeightObserver)``: bit widths, signedness, zero points, bias width
    and which tensors are quantized all come from ``config`` (:class:`hw.config.AccelConfig`);
    only the observers (how a range is chosen) are the user's choice. ``w_bits`` may narrow the
    weights below the accelerator's width (e.g. W4 weights on a W8A8 array).
    """

    def __init__(self, config: AccelConfig, *, w_bits: int | None = None, act_observer=None,
                 weight_observer=None):
        super().__init__()
        if not isinstance(config, AccelConfig):
            raise PT2EError(f"QuarryQuantizer needs an hw.config.AccelConfig, not {type(config).__name__}")
        if config.pe_kind == "pot":
            raise PT2EError("pe_kind pot runs power-of-two weights only; PT2E's quantize ops are uniform "
                            "(use compiler.compile with weight_method inq/doubleq/doubleqext, or pe_kind hybrid)")
        wb = config.w_bits if w_bits is None else w_bits
        if not isinstance(wb, int) or isinstance(wb, bool) or not 2 <= wb <= config.w_bits:
            raise PT2EError(f"w_bits must be an integer in 2..{config.w_bits} (the accelerator's w_bits), "
                            f"not {w_bits!r}")
        self.config, self.w_bits, self.a_bits = config, wb, config.a_bits
        self.act_observer = act_observer or HistogramObserver
        self.weight_observer = weight_observer or QuarryWeightObserver
        wlo, whi = qrange(wb, True)
        self.weight_spec = QuantizationSpec(torch.int8, self.weight_observer, wlo, whi,
                                            torch.per_channel_symmetric, ch_axis=0)
        self._specs = {}

    # -- specs ----------------------------------------------------------------------------------

    def act_spec(self, signed: bool | None) -> QuantizationSpec:
        """Per tensor, zero point 0: signed symmetric (True), unsigned (False), or from the data (None)."""
        if signed not in self._specs:
            if signed:
                lo, hi = qrange(self.a_bits, True)
                spec = QuantizationSpec(torch.int8, self.act_observer, lo, hi, torch.per_tensor_symmetric)
            else:
                lo, hi = qrange(self.a_bits, False)
                obs = self.act_observer if signed is False else _sign_from_data(self.act_observer)
                # affine on [0, 2**a - 1]: the observer's min is clamped to <= 0, so zero point 0
                spec = QuantizationSpec(torch.uint8, obs, lo, hi, torch.per_tensor_affine)
            self._specs[signed] = spec
        return self._specs[signed]

    def bias_spec(self, x_edge, w_edge) -> DerivedQuantizationSpec:
        """int32 codes within the accelerator's bias field, at scale ``s_x * s_w`` per channel."""
        bmax = (1 << (self.config.bias_bits - 1)) - 1

        def derive(obs):
            s_x, _ = obs[0].calculate_qparams()
            s_w, _ = obs[1].calculate_qparams()
            scale = (s_x.reshape(-1)[0].double() * s_w.double()).float()
            return scale, torch.zeros_like(scale, dtype=torch.int32)

        return DerivedQuantizationSpec([x_edge, w_edge], derive, torch.int32, -bmax - 1, bmax,
                                       torch.per_channel_symmetric, ch_axis=0)

    # -- annotation -----------------------------------------------------------------------------

    @staticmethod
    def _pattern(conv: fx.Node, claimed: set):
        """conv [-> add(conv, other)] [-> relu/relu6/hardtanh(0, x)/clamp(0, x)], each link the
        only user of the one before: (add, residual operand, activation)."""
        add = residual = act = None
        tail = conv
        u = _sole_user(tail)
        if u is not None and u.op == "call_function" and u.target in _ADD and u not in claimed \
                and len(u.args) == 2 and all(isinstance(a, fx.Node) for a in u.args) \
                and u.kwargs.get("alpha", 1) == 1 and u.args[0] is not u.args[1]:
            add, residual = u, (u.args[1] if u.args[0] is conv else u.args[0])
            tail = u
            u = _sole_user(tail)
        if u is not None and u.op == "call_function":
            b = _clamp_bounds(u)
            if b is not None and b[0] == 0:
                act = u
        return add, residual, act

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        g = model.graph
        out_spec: dict[fx.Node, object] = {}  # node whose output is quantized -> its qspec
        convs: dict[fx.Node, tuple] = {}
        shared: list[fx.Node] = []
        claimed: set = set()
        for n in g.nodes:
            if n.op != "call_function":
                continue
            if n.target in _CONV + _LINEAR:
                add, residual, act = self._pattern(n, claimed)
                convs[n] = (add, residual, act)
                claimed.update(x for x in (add, act) if x is not None)
                tail = act or add or n
                if n.users and not _is_output_user(tail):  # the model output stays raw accumulators
                    out_spec[tail] = self.act_spec(act is None)
            elif n.target in _SHARED and n not in claimed and n.args and isinstance(n.args[0], fx.Node):
                src = n.args[0]
                if src in out_spec or src.op == "placeholder":
                    shared.append(n)
                    out_spec[n] = SharedQuantizationSpec((src, n))  # POOL keeps its input's scale
        first_edge: dict[fx.Node, tuple] = {}  # placeholder -> its first annotated input edge

        def in_spec(arg: fx.Node, user: fx.Node):
            if arg in out_spec:
                return SharedQuantizationSpec(arg)
            if arg.op == "placeholder":
                if arg in first_edge:
                    return SharedQuantizationSpec(first_edge[arg])
                first_edge[arg] = (arg, user)
                return self.act_spec(None)
            return self.act_spec(True)  # produced by an op Quarry cannot run: the lowering reports it

        def mark(n, inputs, output):
            n.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=inputs, output_qspec=output,
                                                              _annotated=True)

        for n in g.nodes:
            if n in convs:
                add, residual, act = convs[n]
                x, w = n.args[0], n.args[1]
                b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
                inputs = {x: in_spec(x, n), w: self.weight_spec}
                if isinstance(b, fx.Node):
                    inputs[b] = self.bias_spec((x, n), (w, n))
                mark(n, inputs, out_spec.get(n))
                if add is not None:
                    mark(add, {residual: in_spec(residual, add)}, out_spec.get(add))
                if act is not None:
                    mark(act, {}, out_spec.get(act))
            elif n in shared:
                src = n.args[0]
                mark(n, {src: in_spec(src, n)}, out_spec[n])
        return model

    def validate(self, model: fx.GraphModule) -> None:
        """Nothing to check: :func:`import_pt2e` runs the pre-flight check on the converted graph."""


def export_for_quarry(model: torch.nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """``torch.export`` with a dynamic batch dimension (the first step of the PT2E flow)."""
    ep = torch.export.export(model.eval(), (example.contiguous(),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    return ep.module()


# -- the lowering ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Act:
    """A ``quantize_per_tensor``'s parameters: codes in [qmin, qmax], real = scale * (q - zp)."""

    scale: float
    zp: int
    qmin: int
    qmax: int
    dtype: object

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def same(self, other: "_Act") -> bool:
        return (self.scale, self.zp, self.qmin, self.qmax) == (other.scale, other.zp, other.qmin, other.qmax)


@dataclass
class _Codes:
    """Quantized codes of a layer (``q``: a quantize node) or their float view (a dequantize)."""

    layer: str
    act: _Act
    q: bool


@dataclass
class _Weight:
    codes: np.ndarray
    scale: np.ndarray
    bits: int


@dataclass
class _Bias:
    values: np.ndarray  # float
    codes: np.ndarray | None = None  # integer, at ``scale``
    scale: np.ndarray | None = None


@dataclass
class _Conv:
    """A float conv/linear result on its way to a quantize node."""

    node: fx.Node
    x: _Codes
    w: _Weight
    bias: _Bias | None
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    groups: int = 1
    linear: bool = False
    residual: _Codes | None = None
    clamp: tuple | None = None  # (lo, hi) real values, hi may be None
    fused: list = field(default_factory=list)


@dataclass
class _PoolF:
    """A float pool of quantized codes (before its quantize node)."""

    kind: str
    src: _Codes
    kernel: tuple
    stride: tuple
    padding: tuple
    node: fx.Node


def _op(n: fx.Node) -> str:
    if n.op == "call_function":
        t = n.target
        return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))
    if n.op == "call_module":
        return f"module {n.target}"
    return n.op


def _pair(v):
    if isinstance(v, (list, tuple)):
        return tuple(int(a) for a in v) * (2 if len(v) == 1 else 1)
    return (int(v), int(v))


def _fetch(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _arg(n: fx.Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def import_pt2e(gm: fx.GraphModule, input_shape: tuple, cfg: AccelConfig) -> QGraph:
    """Read a ``convert_pt2e`` graph into a :class:`~compiler.quantize.QGraph` for ``cfg``.

    Raises :class:`~compiler.frontend.UnsupportedOpError` listing every node Quarry cannot run
    (node name, op, reason), or :class:`~compiler.frontend.CaptureError`.
    """
    input_shape = tuple(int(v) for v in input_shape)
    if not is_pt2e_quantized(gm):
        raise PT2EError("not a convert_pt2e graph (no quantized_decomposed quantize/dequantize nodes)")
    gm = fx.GraphModule(gm, gm.graph)  # shape propagation annotates nodes: not the user's module
    batch = 2
    for n in gm.graph.nodes:
        v = n.meta.get("val") if n.op == "placeholder" else None
        if v is not None and hasattr(v, "shape") and isinstance(v.shape[0], int):
            batch = int(v.shape[0])  # exported with a static batch: propagate exactly that
            break
    shapes: dict[str, tuple] = {}
    shape_error = None
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            fx.passes.shape_prop.ShapeProp(gm).propagate(torch.zeros(batch, *input_shape))
        for n in gm.graph.nodes:
            tm = n.meta.get("tensor_meta")
            if tm is not None and hasattr(tm, "shape"):
                shapes[n.name] = tuple(tm.shape)
    except Exception as e:  # noqa: BLE001 - whatever the model raises
        shape_error = e.__cause__ if e.__cause__ is not None else e
    problems: list[tuple[str, str, str]] = []
    vals: dict[str, object] = {}  # node -> _Codes | _Weight | _Bias | _Conv | _PoolF | tensor | None (bad)
    layers: list[Layer] = []
    by_name: dict[str, Layer] = {}
    acts: dict[str, _Act] = {}
    convs: dict[str, _Conv] = {}
    lohi: dict[str, tuple] = {}
    output = None
    n_inputs = 0

    def bad(n, why):
        problems.append((n.name, _op(n), why))
        vals[n.name] = None

    def out_shape(n):
        s = shapes[n.name][1:]
        return s if len(s) == 3 else (s[0], 1, 1)

    def new_layer(layer: Layer, act: _Act):
        layers.append(layer)
        by_name[layer.name] = layer
        acts[layer.name] = act
        return _Codes(layer.name, act, True)

    def act_of(n: fx.Node) -> _Act | str:
        """The Q/DQ parameters of a per-tensor quantize/dequantize node, or why not supported."""
        a = list(n.args[1:6])
        if len(a) < 5:
            return "unexpected arguments"
        scale, zp, qmin, qmax, dtype = (_const(v) for v in a)
        try:
            act = _Act(float(scale), int(zp), int(qmin), int(qmax), dtype)
        except (TypeError, ValueError):
            return "scale, zero point and range must be constants"
        if act.zp != 0:
            return (f"zero point {act.zp}: Quarry's array multiplies raw codes and pads with 0, so every "
                    "activation needs zero point 0 (QuarryQuantizer gives that)")
        smin, smax = qrange(cfg.a_bits, act.signed)
        if act.qmin < smin or act.qmax > smax:
            return (f"range {act.qmin}..{act.qmax} does not fit the accelerator's a_bits={cfg.a_bits} "
                    f"({smin}..{smax})")
        return act

    def _const(v):
        if isinstance(v, fx.Node):
            t = vals.get(v.name)
            return t.item() if isinstance(t, torch.Tensor) and t.numel() == 1 else t
        return v

    def codes_arg(n, a, what) -> _Codes | None:
        v = vals.get(a.name) if isinstance(a, fx.Node) else None
        if isinstance(v, _Codes) and not v.q:
            return v
        bad(n, f"its {what} is not a dequantized (quantized) tensor: {a.name if isinstance(a, fx.Node) else a!r} "
               "must come from dequantize_per_tensor (quantize the model with QuarryQuantizer)")
        return None

    def finish_conv(c: _Conv, act: _Act, n: fx.Node) -> _Codes:
        l = _conv_layer(c, shapes, by_name)
        lo, hi = act.qmin, act.qmax
        if c.clamp is not None:
            lo = max(lo, _quant(n, 0.0 if c.clamp[0] is None else c.clamp[0], act))
            if c.clamp[1] is not None:
                hi = min(hi, _quant(n, c.clamp[1], act))
        lohi[l.name] = (lo, hi)
        convs[l.name] = c
        c.fused.append(n.name)
        return new_layer(l, act)

    for n in gm.graph.nodes:
        if n.op == "get_attr":
            v = _fetch(gm, n.target)
            vals[n.name] = v.detach() if isinstance(v, torch.Tensor) else v
            continue
        if n.op == "placeholder":
            n_inputs += 1
            if n_inputs > 1:
                bad(n, "models with more than one input are not supported")
            else:
                vals[n.name] = "input"
            continue
        if n.op == "output":
            outs = n.args[0]
            if isinstance(outs, (tuple, list)):
                if len(outs) != 1:
                    problems.append((n.name, "output", f"the model must return a single tensor, not {len(outs)}"))
                    continue
                outs = outs[0]
            v = vals.get(outs.name) if isinstance(outs, fx.Node) else None
            if isinstance(v, _Conv) and v.residual is None and v.clamp is None:
                l = _conv_layer(v, shapes, by_name)
                convs[l.name] = v
                new_layer(l, _Act(0.0, 0, 0, 0, None))
                output = l.name
            elif isinstance(v, _Codes) and v.layer in convs and not v.q and convs[v.layer].residual is None \
                    and convs[v.layer].clamp is None:
                output = v.layer  # quantized then dequantized: Quarry returns the exact accumulators
            elif v is not None or not isinstance(outs, fx.Node) or outs.name not in vals:
                problems.append((outs.name if isinstance(outs, fx.Node) else "output", "output",
                                 "the model output must come straight from a conv/linear (no activation, residual "
                                 "add or pooling after it): Quarry reads back its raw accumulators"))
            continue
        if n.op == "call_module" and not n.users:
            continue  # torch.export's _guards_fn
        if n.op != "call_function":
            bad(n, f"{n.op} is not supported")
            continue
        t = n.target
        if t in _META:
            vals[n.name] = "meta"
            continue
        if any(a.name in vals and vals[a.name] is None for a in n.all_input_nodes):
            vals[n.name] = None  # downstream of a reported node
            continue
        if shape_error is not None and n.name not in shapes:
            vals[n.name] = None
            continue
        if t in (_qd.quantize_per_tensor.default, _qd.quantize_per_tensor.tensor):
            act = act_of(n)
            if isinstance(act, str):
                bad(n, act)
                continue
            src = n.args[0]
            v = vals.get(src.name)
            if v == "input":
                if act.qmin != qrange(cfg.a_bits, act.signed)[0] or act.qmax != qrange(cfg.a_bits, act.signed)[1]:
                    bad(n, f"the input must use the full {cfg.a_bits}-bit range (the host quantizes it so), "
                           f"not {act.qmin}..{act.qmax}")
                    continue
                prev = next((l for l in layers if l.kind == "input"), None)
                if prev is not None:
                    if not acts[prev.name].same(act):
                        bad(n, "the input is quantized twice with different parameters")
                        continue
                    vals[n.name] = _Codes(prev.name, act, True)
                    continue
                vals[n.name] = new_layer(Layer(src.name, "input", shape=input_shape, torch_node=n.name), act)
            elif isinstance(v, _Conv):
                if len(src.users) != 1:
                    bad(n, f"{src.name} is also used in float by another op: quantize it once")
                    continue
                vals[n.name] = finish_conv(v, act, n)
            elif isinstance(v, _PoolF):
                if not v.src.act.same(act):
                    bad(n, f"pooling output quantized with scale {act.scale:.6g}, range {act.qmin}..{act.qmax}, "
                           f"its input with {v.src.act.scale:.6g}, {v.src.act.qmin}..{v.src.act.qmax}: Quarry's POOL "
                           "keeps its input's scale (share the observer, as QuarryQuantizer does)")
                    continue
                pn = v.node
                vals[n.name] = new_layer(Layer(pn.name, v.kind, [v.src.layer], stride=v.stride, padding=v.padding,
                                               kernel=v.kernel, shape=out_shape(pn), torch_node=pn.name), act)
            elif isinstance(v, _Codes) and not v.q:
                if not v.act.same(act):
                    bad(n, f"requantizing {v.layer} to a new scale is only done by the POST of a conv/linear "
                           "(share the observer, as QuarryQuantizer does)")
                    continue
                vals[n.name] = _Codes(v.layer, act, True)
            else:
                bad(n, f"quantizes {src.name}, which is not the model input, a conv/linear/add/activation "
                       "result or a pooling of quantized values")
        elif t in (_qd.dequantize_per_tensor.default, _qd.dequantize_per_tensor.tensor):
            src = n.args[0]
            v = vals.get(src.name) if isinstance(src, fx.Node) else None
            if isinstance(v, torch.Tensor):  # per-tensor weights (or bias) of another quantizer
                scale, zp, qmin, qmax = (_const(a) for a in n.args[1:5])
                if zp != 0:
                    bad(n, "weights must be quantized symmetrically (zero point 0)")
                    continue
                codes, sc = v.to(torch.int64).numpy(), np.full(v.shape[0], float(scale))
                vals[n.name] = _Weight(codes, sc, _bits(int(qmin), int(qmax))) if v.dim() > 1 else \
                    _Bias(codes * sc, codes, sc)
                continue
            act = act_of(n)
            if not isinstance(v, _Codes) or not v.q:
                bad(n, "dequantizes something that is not a quantized tensor")
                continue
            if isinstance(act, str) or not act.same(v.act):
                bad(n, "dequantize parameters differ from the quantize node's")
                continue
            vals[n.name] = _Codes(v.layer, v.act, False)
        elif t in (_qd.dequantize_per_channel.default, _qd.quantize_per_channel.default):
            vals[n.name] = _per_channel(n, vals, cfg, bad)
        elif t in _CONV + _LINEAR:
            x = codes_arg(n, n.args[0], "input")
            if x is None:
                continue
            w = vals.get(n.args[1].name) if isinstance(n.args[1], fx.Node) else None
            if not isinstance(w, _Weight):
                bad(n, "its weight must be a dequantize_per_channel/per_tensor of integer codes")
                continue
            wlo, whi = qrange(cfg.w_bits, True)
            if w.codes.min() < wlo or w.codes.max() > whi:
                bad(n, f"integer weights span {w.codes.min()}..{w.codes.max()}; the accelerator's w_bits="
                       f"{cfg.w_bits} holds {wlo}..{whi}")
                continue
            b = _arg(n, 2, "bias")
            bias = None
            if isinstance(b, fx.Node):
                bv = vals.get(b.name)
                bias = bv if isinstance(bv, _Bias) else _Bias(bv.double().numpy()) if isinstance(bv, torch.Tensor) else None
                if bias is None:
                    bad(n, "its bias must be a constant (float, or a dequantized integer)")
                    continue
            if t in _LINEAR:
                if len(shapes.get(n.args[0].name, ())) != 2:
                    bad(n, f"linear needs a flattened (N, features) input, not shape {list(shapes.get(n.args[0].name, ()))}")
                    continue
                vals[n.name] = _Conv(n, x, w, bias, linear=True)
            else:
                stride, padding = _pair(_arg(n, 3, "stride", 1)), _arg(n, 4, "padding", 0)
                dilation, groups = _pair(_arg(n, 5, "dilation", 1)), int(_arg(n, 6, "groups", 1))
                if isinstance(padding, str) or dilation != (1, 1):
                    bad(n, "dilation and string padding are not supported")
                    continue
                vals[n.name] = _Conv(n, x, w, bias, stride, _pair(padding), groups)
        elif t in _ADD:
            a, b = (list(n.args) + [None, None])[:2]
            if not all(isinstance(v, fx.Node) for v in (a, b)) or n.kwargs.get("alpha", 1) != 1 or len(n.args) > 2:
                bad(n, "only tensor + tensor (no scalars, no alpha) is supported")
                continue
            va, vb = vals.get(a.name), vals.get(b.name)
            for conv_n, cv, other in ((a, va, vb), (b, vb, va)):
                if isinstance(cv, _Conv) and cv.residual is None and cv.clamp is None and len(conv_n.users) == 1 \
                        and isinstance(other, _Codes) and not other.q:
                    if shapes.get(a.name) != shapes.get(b.name):
                        bad(n, "operands must have the same shape (no broadcasting)")
                        break
                    cv.residual = other
                    cv.fused.append(n.name)
                    vals[n.name] = cv
                    break
            else:
                if n.name not in vals:
                    bad(n, "one operand must be a conv/linear result (no activation yet) used only by this add, the "
                           "other a dequantized tensor: Quarry adds the residual in the conv's POST")
        elif _clamp_bounds(n) is not None:
            lo, hi = _clamp_bounds(n)
            v = vals.get(n.args[0].name)
            if isinstance(v, _Conv) and v.clamp is None and len(n.args[0].users) == 1 and lo == 0:
                v.clamp = (0.0, None if hi is None else float(hi))
                v.fused.append(n.name)
                vals[n.name] = v
            elif isinstance(v, _Codes) and not v.q and lo is not None and lo <= 0 and v.act.qmin >= 0 \
                    and (hi is None or hi >= v.act.scale * v.act.qmax):
                vals[n.name] = v  # a clamp that cannot change any value of an unsigned tensor: a no-op
            else:
                bad(n, "an activation must directly follow a conv/linear (or its residual add) with no other "
                       "users, and clamp at 0 below (ReLU, ReLU6, Hardtanh(0, x))")
        elif t in _MAXPOOL + _AVGPOOL + _GAP:
            x = codes_arg(n, n.args[0], "input")
            if x is None:
                continue
            src_shape = shapes[n.args[0].name]
            if t in _GAP:
                if t is aten.mean.dim:
                    dims = sorted(d % 4 for d in _arg(n, 1, "dim"))
                    if dims != [2, 3] or len(src_shape) != 4:
                        bad(n, "mean only over H and W")
                        continue
                elif _pair(n.args[1]) != (1, 1):
                    bad(n, "adaptive_avg_pool2d only with output size 1")
                    continue
                vals[n.name] = _PoolF("avgpool", x, tuple(src_shape[2:]), (1, 1), (0, 0), n)
                continue
            k = _pair(n.args[1])
            s = _arg(n, 2, "stride", [])
            s = _pair(s) if s not in (None, [], ()) else k
            p = _pair(_arg(n, 3, "padding", 0))
            if t in _MAXPOOL:
                unsup = _pair(_arg(n, 4, "dilation", 1)) != (1, 1) or _arg(n, 5, "ceil_mode", False)
            else:
                unsup = _arg(n, 4, "ceil_mode", False) or not _arg(n, 5, "count_include_pad", True) \
                    or _arg(n, 6, "divisor_override") is not None
            if unsup:
                bad(n, "ceil_mode, dilation, count_include_pad=False and divisor_override are not supported")
                continue
            vals[n.name] = _PoolF("maxpool" if t in _MAXPOOL else "avgpool", x, k, s, p, n)
        elif t in _RESHAPE:
            src, dst = shapes.get(n.args[0].name), shapes.get(n.name)
            v = vals.get(n.args[0].name)
            if src is None or dst is None or not (dst == src or (len(dst) == 2 and dst[0] == src[0])):
                bad(n, f"only a flatten to (N, -1) is supported (here {list(src or ())} -> {list(dst or ())})")
            elif isinstance(v, (_Codes, _PoolF)):
                vals[n.name] = v
            else:
                bad(n, "flattens something that is not a quantized tensor")
        elif t in _IDENTITY:
            if t is aten.dropout.default and _arg(n, 2, "train", False):
                bad(n, "dropout in training mode")
                continue
            vals[n.name] = vals.get(n.args[0].name)
        elif t in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            bad(n, "BatchNorm that prepare_pt2e did not fold into a conv (it must directly follow one)")
        else:
            bad(n, "op not supported")
    if problems:
        raise UnsupportedOpError(problems, supported=SUPPORTED_PT2E_OPS)
    if shape_error is not None:
        msg = " ".join(str(shape_error).split()) or type(shape_error).__name__
        raise CaptureError(f"the model does not run on inputs of shape (N, {', '.join(map(str, input_shape))}): {msg}")
    if output is None:
        raise CaptureError("the model has no tensor output")
    if not any(l.kind == "input" for l in layers):
        raise CaptureError("the model input is not quantized (no quantize_per_tensor on it)")
    graph = Graph(layers, input_shape, output)
    return _qgraph(graph, cfg, acts, convs, lohi)


def _bits(qmin: int, qmax: int) -> int:
    return int(math.ceil(math.log2(qmax - qmin + 1)))


def _quant(n: fx.Node, value: float, act: _Act) -> int:
    """The code the graph's own quantize op gives ``value`` (clamped to the range)."""
    t = _qd.quantize_per_tensor.default(torch.tensor([float(value)]), act.scale, act.zp, act.qmin, act.qmax,
                                        act.dtype)
    return int(t.to(torch.int64)[0])


def _per_channel(n: fx.Node, vals: dict, cfg: AccelConfig, bad):
    """A per-channel (de)quantize of a constant: weight codes (or a bias) and scales, axis 0."""
    src = n.args[0]
    v = vals.get(src.name) if isinstance(src, fx.Node) else None
    scales, zps, axis, qmin, qmax, dtype = (vals.get(a.name) if isinstance(a, fx.Node) else a for a in n.args[1:7])
    if n.target is _qd.quantize_per_channel.default:
        if not isinstance(v, torch.Tensor):
            return bad(n, "quantize_per_channel of something that is not a constant")
        return n.target(v, scales, zps, axis, qmin, qmax, dtype)  # the graph's own op gives the codes
    if not isinstance(v, torch.Tensor) or not isinstance(scales, torch.Tensor):
        return bad(n, "dequantize_per_channel of something that is not a constant")
    if axis != 0:
        return bad(n, f"per-channel scales must be per output channel (axis 0), not axis {axis}")
    if isinstance(zps, torch.Tensor) and bool((zps != 0).any()):
        return bad(n, "weights must be quantized symmetrically (zero point 0)")
    codes = v.to(torch.int64).numpy()
    scale = scales.double().numpy().reshape(-1)
    if v.dim() == 1:  # a bias: integer codes at scale s_x * s_w per channel
        return _Bias(codes * scale, codes, scale)
    return _Weight(codes, scale, _bits(int(qmin), int(qmax)))


def _conv_layer(c: _Conv, shapes: dict, by_name: dict) -> Layer:
    n = c.node
    prev = by_name[c.x.layer]
    w_q = c.w.codes
    if c.linear:
        cc, h, w = prev.shape
        w_q = w_q.reshape(w_q.shape[0], cc, h, w)
        shape = (w_q.shape[0], 1, 1)
    else:
        s = shapes[n.name][1:]
        shape = tuple(s)
    c.w.codes = w_q
    wf = torch.from_numpy(w_q * c.w.scale.reshape(-1, 1, 1, 1))
    bias = None if c.bias is None else torch.from_numpy(c.bias.values)
    act = None
    if c.clamp is not None:
        act = "relu" if c.clamp[1] is None else ("relu6" if c.clamp[1] == 6.0 else ("clamp", c.clamp[1]))
    return Layer(n.name, "conv", [c.x.layer], wf, bias, c.stride, c.padding, c.groups, act=act,
                 residual=None if c.residual is None else c.residual.layer, shape=shape, torch_node=n.name)


def _qgraph(graph: Graph, cfg: AccelConfig, acts: dict, convs: dict, lohi: dict) -> QGraph:
    bmax = (1 << (cfg.bias_bits - 1)) - 1
    w_bits = max((c.w.bits for c in convs.values()), default=cfg.w_bits)
    qg = QGraph(graph, cfg, options=QuantOptions(), w_bits=w_bits, a_bits=cfg.a_bits)
    for l in graph.layers:
        a = acts[l.name]
        if l.kind in ("maxpool", "avgpool"):
            src = qg.layers[l.inputs[0]]
            qg.layers[l.name] = QLayer(l, src.scale, src.signed, src.lo, src.hi)
            continue
        if l.kind == "input":
            qg.layers[l.name] = QLayer(l, a.scale, a.signed, a.qmin, a.qmax)
            continue
        c = convs[l.name]
        xs = c.x.act.scale
        acc_scale = xs * c.w.scale
        if c.bias is None:
            bias_q = np.zeros(len(acc_scale), np.int64)
        elif c.bias.codes is not None and np.allclose(c.bias.scale, acc_scale, rtol=1e-5, atol=0):
            bias_q = c.bias.codes.astype(np.int64)  # the graph's integer bias, as is
        else:  # a float bias (other quantizers): at the accumulator's scale, as fbgemm adds it
            bias_q = np.round(c.bias.values / acc_scale).astype(np.int64)
        if np.abs(bias_q).max(initial=0) > bmax:
            raise CaptureError(f"layer {l.name}: integer bias {int(np.abs(bias_q).max())} does not fit the "
                               f"{cfg.bias_bits}-bit bias field")
        ql = QLayer(l, a.scale, a.signed, *(lohi.get(l.name, (a.qmin, a.qmax))), w_q=c.w.codes,
                    w_scale=c.w.scale, bias_q=bias_q, code_bits=c.w.bits)
        if l.name == graph.output:
            ql.scale, ql.signed = 1.0, True  # raw accumulators: no output quantization
        else:
            ms = [acc_scale / a.scale]
            if c.residual is not None:
                ms.append(np.full(len(acc_scale), c.residual.act.scale / a.scale))
            try:
                outs, ql.shift = mult_shift(cfg, ms)
            except QuantError as e:
                raise CaptureError(f"layer {l.name}: {e}") from None
            ql.mult = outs[0]
            ql.res_mult = outs[1] if c.residual is not None else np.zeros_like(outs[0])
        qg.layers[l.name] = ql
    return qg


def _manifest(qg: QGraph) -> dict:
    return {"method": "pt2e", "quantizer": "torchao.quantization.pt2e (convert_pt2e graph)",
            "w_bits": qg.w_bits, "a_bits": qg.a_bits,
            "torch_nodes": {l.name: l.torch_node for l in qg.graph.layers}}


def compile_pt2e(gm: fx.GraphModule, input_shape: tuple, cfg: AccelConfig, *, reuse_spad: bool = True) -> Program:
    """Import a ``convert_pt2e`` graph (:func:`import_pt2e`) and lower it for ``cfg``."""
    from .lower import lower

    qg = import_pt2e(gm, input_shape, cfg)
    return lower(qg, reuse_spad=reuse_spad, quant=_manifest(qg))


def write_model_dir(prog: Program, out, *, data: str | None = None, model: str = "pt2e") -> None:
    """Write ``prog`` as ``python -m compiler --out DIR`` does (program.qprog, manifest.json, hex/bin
    images, report.json), so ``python -m hw.build --rom DIR`` and ``python -m sim run DIR`` take it.
    ``data`` names the data set (``mnist``, ``fashion``) ``sim run`` evaluates on by default."""
    from pathlib import Path

    from .__main__ import write_outputs

    cfg = prog.config
    man = prog.manifest
    report = {"model": model, "data": data, "config": cfg.to_dict(), "config_hash": cfg.hash, "method": "pt2e",
              "quant": man.get("quant"), "instructions": len(prog.instrs),
              "wmem_rows": len(prog.images.get("wmem", [])), "macs": man["macs"],
              "predicted_cycles": man["predicted_cycles"],
              "predicted_utilisation": man["macs"] / (man["predicted_cycles"] * cfg.rows * cfg.cols),
              "weight_memory": man["weight_memory"],
              "weights_per_layer": {i["name"]: i["weights"] for i in man["layers"] if "weights" in i}}
    write_outputs(prog, Path(out), report)
