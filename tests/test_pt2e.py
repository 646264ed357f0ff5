"""compiler.pt2e: QuarryQuantizer's annotations, the lowering of convert_pt2e graphs (numbers from
the graph, bit-exact golden model), the pre-flight error, and one PT2E model golden-vs-RTL."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings("ignore", module="torchao")

from compiler import CompileError  # noqa: E402
from compiler import compile as compile_model  # noqa: E402
from compiler.frontend import UnsupportedOpError  # noqa: E402
from compiler.pt2e import (PT2EError, QuarryQuantizer, compile_pt2e, export_for_quarry,  # noqa: E402
                           import_pt2e, quarry_observer, write_model_dir)
from compiler.quantize import qrange, simulate  # noqa: E402
from hw.config import AccelConfig  # noqa: E402
from tests.compiler_models import run_golden  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: E402
from torchao.quantization.pt2e.quantizer import DerivedQuantizationSpec, SharedQuantizationSpec  # noqa: E402
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY  # noqa: E402

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
SEED = 10


class EveryOp(nn.Module):
    """Every op QuarryQuantizer annotates: conv+BN+ReLU, conv+ReLU6, conv+Hardtanh(0, x), residual
    add + ReLU, a depthwise conv without activation (signed output), max and average pooling,
    global average pooling, flatten and a linear output."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(SEED)
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(6, 6, 1)
        self.c4 = nn.Conv2d(6, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6)
        self.c5 = nn.Conv2d(6, 8, 1)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
            self.bn.running_mean.copy_(0.1 * torch.randn(6, generator=g))
            self.bn.running_var.copy_(0.5 + torch.rand(6, generator=g))

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = F.max_pool2d(x, 2)
        y = F.relu6(self.c2(x))
        y = F.hardtanh(self.c3(y), 0.0, 2.0)
        x = F.relu(self.c4(y) + x)
        x = F.avg_pool2d(x, 2, 1)
        x = self.dw(x)
        x = F.relu(self.c5(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


class Small(nn.Module):
    """For the RTL run: conv-ReLU, max-pool, residual block, global average pool, linear (8x8 input)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(SEED + 1)
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.relu(self.c2(x) + x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def images(n, shape=(1, 12, 12), seed=SEED):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def pt2e(model, x, quantizer):
    m = prepare_pt2e(export_for_quarry(model.eval(), x[:2]), quantizer)
    with torch.no_grad():
        m(x)
    return convert_pt2e(m)


BITS = [(8, 8), (4, 4), (2, 8), (4, 8)]


# -- annotations -------------------------------------------------------------------------------------

def _ann(n):
    return n.meta.get(Q_ANNOTATION_KEY)


@pytest.mark.parametrize("wb,ab", BITS)
def test_annotations_every_op(wb, ab):
    cfg = AccelConfig(rows=8, cols=8, w_bits=wb, a_bits=ab)
    gm = export_for_quarry(EveryOp().eval(), images(2))
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    _fuse_conv_bn_(gm)  # as prepare_pt2e does before annotating
    QuarryQuantizer(cfg).annotate(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    convs = [n for n in gm.graph.nodes if n.target in (aten.conv2d.default, aten.linear.default)]
    assert len(convs) == 7
    wlo, whi = qrange(wb, True)
    ulo, uhi = qrange(ab, False)
    slo, shi = qrange(ab, True)
    bmax = (1 << (cfg.bias_bits - 1)) - 1
    for c in convs:
        a = _ann(c)
        x, w = c.args[0], c.args[1]
        ws = a.input_qspec_map[w]
        assert (ws.dtype, ws.quant_min, ws.quant_max, ws.qscheme, ws.ch_axis) == \
            (torch.int8, wlo, whi, torch.per_channel_symmetric, 0)
        b = c.args[2] if len(c.args) > 2 else None
        if b is not None:
            bs = a.input_qspec_map[b]
            assert isinstance(bs, DerivedQuantizationSpec)
            assert (bs.dtype, bs.quant_min, bs.quant_max, bs.ch_axis) == (torch.int32, -bmax - 1, bmax, 0)
            assert bs.derived_from == [(x, c), (w, c)]
        xs = a.input_qspec_map[x]
        if x.op == "placeholder":  # the input: unsigned until the data shows a negative value
            assert (xs.dtype, xs.quant_min, xs.quant_max) == (torch.uint8, ulo, uhi)
        else:  # every other conv input shares its producer's observer
            assert isinstance(xs, SharedQuantizationSpec) and xs.edge_or_node is x
    # Output of each fused pattern: quantized once, at its end; nothing inside it.
    relu_out = [nodes[k] for k in nodes if k.startswith(("relu", "hardtanh"))]
    assert len(relu_out) == 5
    for n in relu_out:
        o = _ann(n).output_qspec
        assert (o.dtype, o.quant_min, o.quant_max, o.qscheme) == (torch.uint8, ulo, uhi, torch.per_tensor_affine)
        assert _ann(n.args[0]).output_qspec is None  # conv / add before the activation: not rounded
    dw = next(c for c in convs if len(c.args) > 6 and c.args[6] == 6)
    o = _ann(dw).output_qspec  # no activation: signed symmetric, zero point 0
    assert (o.dtype, o.quant_min, o.quant_max, o.qscheme) == (torch.int8, slo, shi, torch.per_tensor_symmetric)
    add = nodes["add"]
    res = [a for a in add.args if a.target is not aten.conv2d.default][0]
    assert isinstance(_ann(add).input_qspec_map[res], SharedQuantizationSpec)  # residual keeps its own scale
    assert _ann(add).input_qspec_map[res].edge_or_node is res
    for k in ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "flatten"):  # share their input's scale
        n = nodes[k]
        a = _ann(n)
        assert a.output_qspec == SharedQuantizationSpec((n.args[0], n))
    assert _ann(convs[-1]).output_qspec is None  # the model output: raw accumulators


@pytest.mark.parametrize("wb,ab", BITS)
def test_converted_numbers_come_from_the_graph(wb, ab):
    """After calibration and convert_pt2e: every Q/DQ has zero point 0 and the configured range,
    pools keep their input's scale, and the lowered layers hold the graph's integers."""
    cfg = AccelConfig(rows=8, cols=8, w_bits=wb, a_bits=ab)
    x = images(64)
    gm = pt2e(EveryOp(), x, QuarryQuantizer(cfg))
    q_nodes = [n for n in gm.graph.nodes if n.target is qd.quantize_per_tensor.default]
    for n in q_nodes:
        _, s, z, lo, hi, _ = n.args
        assert z == 0 and (lo, hi) in (qrange(ab, False), qrange(ab, True))
    qg = import_pt2e(gm, (1, 12, 12), cfg)
    layers = {l.name: l for l in qg.graph.layers}
    for name in ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d"):
        assert qg.layers[name].scale == qg.layers[layers[name].inputs[0]].scale
    consts = dict(gm.named_buffers()) | dict(gm.named_parameters()) | {k: getattr(gm, k) for k in dir(gm)
                                                                        if k.startswith("_frozen_param")}
    for n in gm.graph.nodes:
        if n.target in (aten.conv2d.default, aten.linear.default):
            ql = qg.layers[n.name]
            wdq = n.args[1]
            codes = consts[wdq.args[0].target].to(torch.int64).numpy()
            assert np.array_equal(ql.w_q.reshape(codes.shape), codes)
            assert np.array_equal(ql.w_scale, getattr(gm, wdq.args[1].target).double().numpy())
            assert codes.min() >= qrange(wb, True)[0] and codes.max() <= qrange(wb, True)[1]
            bdq = n.args[2] if len(n.args) > 2 else None
            bias = np.zeros(len(ql.w_q)) if bdq is None else consts[bdq.args[0].target].to(torch.int64).numpy()
            assert np.array_equal(ql.bias_q, bias)  # the graph's integer bias, as is
            if ql.mult is not None:  # requant: only the fixed-point form of s_x * s_w / s_y is computed
                m = qg.layers[layers[n.name].inputs[0]].scale * ql.w_scale / ql.scale
                assert np.all(np.abs(ql.mult - m * np.exp2(ql.shift)) <= 0.5)
    # The integer program follows PyTorch's float evaluation of the same graph (within rounding).
    xt = images(100, seed=SEED + 5)
    ours = simulate(qg, xt)
    with torch.no_grad():
        ref = gm(xt).numpy()
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.98
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_golden_equals_simulate_and_compile_api():
    cfg = AccelConfig(rows=8, cols=8, w_bits=4, a_bits=8)
    x = images(32)
    gm = pt2e(EveryOp(), x, QuarryQuantizer(cfg))
    prog = compile_pt2e(gm, (1, 12, 12), cfg)
    assert prog.manifest["quant"]["method"] == "pt2e"
    xt = images(4, seed=SEED + 3)
    out, _, _ = run_golden(prog, xt)
    assert np.array_equal(out, simulate(import_pt2e(gm, (1, 12, 12), cfg), xt))  # bit-exact
    # compiler.compile takes the converted graph too, and refuses quantization options for it.
    same = compile_model(gm, x[:1], cfg)
    assert same.words() == prog.words() and same.images == prog.images
    with pytest.raises(CompileError, match="already quantized by PT2E: method"):
        compile_model(gm, x[:1], cfg, method="mse")


def test_signed_input_and_other_quantizers():
    """An input with negative values gets signed codes (zero point 0). A graph from PyTorch's own
    X86InductorQuantizer is read with the same rules: where it leaves a conv result in float
    into a pool, or gives a zero point, the pre-flight check names the node."""
    cfg = AccelConfig(rows=8, cols=8)
    x = images(32, (1, 8, 8)) * 2 - 1
    gm = pt2e(Small(), x, QuarryQuantizer(cfg))
    qg = import_pt2e(gm, (1, 8, 8), cfg)
    inp = qg.layers[qg.graph.layers[0].name]
    assert inp.signed and (inp.lo, inp.hi) == qrange(8, True)
    with torch.no_grad():
        ref = gm(x).numpy()
    assert np.corrcoef(simulate(qg, x).ravel(), ref.ravel())[0, 1] > 0.98
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    x86 = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    with pytest.raises(UnsupportedOpError) as e:
        import_pt2e(pt2e(Small(), x, x86), (1, 8, 8), cfg)
    problems = {p[0]: p[2] for p in e.value.problems}
    assert "zero point 127" in problems["quantize_per_tensor_default"]  # asymmetric uint8 input
    with pytest.raises(UnsupportedOpError) as e:
        import_pt2e(pt2e(Small(), x.abs(), x86), (1, 8, 8), cfg)
    problems = {p[0]: p[2] for p in e.value.problems}
    assert "its input is not a dequantized" in problems["max_pool2d"]  # X86 leaves relu -> max_pool2d in float


@pytest.mark.parametrize("ab", [8, 4])
def test_quarry_observer(ab):
    """Quarry's own range estimators as a PT2E observer: zero point 0, scale = clip / quant_max."""
    cfg = AccelConfig(rows=8, cols=8, a_bits=ab)
    x = images(32, (1, 8, 8))
    gm = pt2e(Small(), x, QuarryQuantizer(cfg, act_observer=quarry_observer("minmax")))
    q_in = next(n for n in gm.graph.nodes if n.target is qd.quantize_per_tensor.default)
    assert q_in.args[2:5] == (0, 0, (1 << ab) - 1)
    assert q_in.args[1] == pytest.approx(float(x.max()) / ((1 << ab) - 1), rel=1e-6)
    gm = pt2e(Small(), x, QuarryQuantizer(cfg, act_observer=quarry_observer("mse")))
    qg = import_pt2e(gm, (1, 8, 8), cfg)
    with torch.no_grad():
        ref = gm(x).numpy()
    assert np.corrcoef(simulate(qg, x).ravel(), ref.ravel())[0, 1] > 0.98
    with pytest.raises(PT2EError, match="method must be one of"):
        quarry_observer("nope")


# -- the pre-flight check ---------------------------------------------------------------------------

class WithSigmoid(Small):
    def forward(self, x):
        x = torch.sigmoid(self.c1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.c2(x), 1), 1))


class WithCat(Small):
    def forward(self, x):
        y = F.relu(self.c1(x))
        x = torch.cat([y, F.relu(self.c2(y))], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)[:, :4])


@pytest.mark.parametrize("model,node,op", [(WithSigmoid, "sigmoid", "aten.sigmoid.default"),
                                           (WithCat, "cat", "aten.cat.default")])
def test_unsupported_op_fails_preflight_naming_the_node(model, node, op):
    cfg = AccelConfig(rows=8, cols=8)
    x = images(16, (1, 8, 8))
    gm = pt2e(model(), x, QuarryQuantizer(cfg))
    with pytest.raises(UnsupportedOpError) as e:
        compile_pt2e(gm, (1, 8, 8), cfg)
    names = [p[0] for p in e.value.problems]
    assert node in names and (node, op) in [(p[0], p[1]) for p in e.value.problems]
    assert f"{node} ({op})" in str(e.value) and "Supported:" in str(e.value)
    with pytest.raises(UnsupportedOpError):  # the same error through compiler.compile
        compile_model(gm, x[:1], cfg)


def test_quantizer_refuses_what_the_hardware_cannot_run():
    with pytest.raises(PT2EError, match="pe_kind pot"):
        QuarryQuantizer(AccelConfig(pe_kind="pot"))
    with pytest.raises(PT2EError, match="w_bits must be an integer in 2..4"):
        QuarryQuantizer(AccelConfig(w_bits=4), w_bits=8)
    QuarryQuantizer(AccelConfig(pe_kind="hybrid"))
    # Weights quantized for 8 bits do not fit a 4-bit accelerator: the lowering names the layer.
    x = images(16, (1, 8, 8))
    gm = pt2e(Small(), x, QuarryQuantizer(AccelConfig(rows=8, cols=8)))
    with pytest.raises(UnsupportedOpError, match="conv2d .*w_bits=4"):
        import_pt2e(gm, (1, 8, 8), AccelConfig(rows=8, cols=8, w_bits=4))


def test_write_model_dir(tmp_path):
    from sim.run import load_model_dir

    cfg = AccelConfig(rows=4, cols=4, spad_depth=256, acc_depth=64, wmem_depth=128, imem_depth=128, param_depth=8)
    x = images(16, (1, 8, 8))
    prog = compile_pt2e(pt2e(Small(), x, QuarryQuantizer(cfg)), (1, 8, 8), cfg)
    write_model_dir(prog, tmp_path / "m", data="mnist")
    p, report = load_model_dir(tmp_path / "m")
    assert p.words() == prog.words() and report["method"] == "pt2e" and report["data"] == "mnist"


# -- RTL ----------------------------------------------------------------------------------------------

@pytest.mark.rtl
def test_pt2e_model_golden_vs_verilator():
    """A PT2E-quantized model (QuarryQuantizer, W4A8) on a 4x4 array: the RTL's raw outputs and
    cycle counts equal the golden model's, image by image."""
    from sim.run import compare_runs, run_golden as golden_run, run_verilator

    cfg = AccelConfig(rows=4, cols=4, w_bits=4, spad_depth=256, acc_depth=64, wmem_depth=128, imem_depth=128,
                      param_depth=8)
    x = images(24, (1, 8, 8))
    prog = compile_model(pt2e(Small(), x[:16], QuarryQuantizer(cfg)), x[:1], cfg)
    imgs = x[16:].numpy()
    g = golden_run(prog, imgs, progress=False)
    r = run_verilator(prog, imgs, progress=False, optimize=False)
    assert len(r.outputs) == len(imgs)
    assert not compare_runs(g, r)
