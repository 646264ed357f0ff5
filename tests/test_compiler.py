"""Compiler front end, lowering and CLI: random models end to end on the golden model, BN folding,
the pre-flight op check, memory-overflow messages, liveness-based spad allocation, config checks.

Random models come from ``tests/compiler_models.py`` (seeded; every assertion names its seed).
Nothing here trains a network. The FX-quantized import and the trained zoo model are in
``test_compiler_zoo.py``.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compiler import CompileError
from compiler import compile as compile_model
from compiler.__main__ import main as cli_main
from compiler.builder import ProgramBuilder, SpadAllocator
from compiler.frontend import SUPPORTED_OPS, CaptureError, UnsupportedOpError, capture
from compiler.kernels import KernelError, SpadTensor
from compiler.lower import LowerError, live_layers, lower
from compiler.quantize import QuantOptions, quantize
from hw import isa
from hw.config import AccelConfig
from hw.program import Program, ProgramError
from sim.golden import Machine

from tests import compiler_models as CM
from tests.compiler_models import ROOT, acc_to_chw, run_golden
from tests.helpers import read

SEEDS = range(16)


# -- helpers ---------------------------------------------------------------------------------------

def random_case(seed):
    """(model, input shape, config, inputs) for one seed: odd sizes, arrays that do not divide."""
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 5)), int(rng.integers(3, 11)), int(rng.integers(3, 11)))
    model = CM.random_net(seed, shape)
    cfg = AccelConfig(rows=int(rng.choice([3, 4, 8])), cols=int(rng.choice([2, 3, 5, 8])))
    x = torch.rand((8, *shape), generator=torch.Generator().manual_seed(seed)) * 2 - 0.5
    return model, shape, cfg, x


def graph_forward(graph, x):
    """Independent float evaluation of a captured graph (folded BN, fused activations/residuals)."""
    vals = {}
    for l in graph.layers:
        if l.kind == "input":
            y = x
        elif l.kind == "conv":
            y = F.conv2d(vals[l.inputs[0]], l.weight, l.bias, l.stride, l.padding, 1, l.groups)
            if l.residual:
                y = y + vals[l.residual]
            if l.act == "relu":
                y = torch.relu(y)
            elif l.act == "relu6":
                y = torch.clamp(y, 0, 6)
            elif isinstance(l.act, tuple):
                y = torch.clamp(y, 0, l.act[1])
        elif l.kind == "maxpool":
            y = F.max_pool2d(vals[l.inputs[0]], l.kernel, l.stride, l.padding)
        else:
            y = F.avg_pool2d(vals[l.inputs[0]], l.kernel, l.stride, l.padding)
        vals[l.name] = y
    return vals[graph.output]


# -- random models end to end ------------------------------------------------------------------------

def test_random_models_cover_every_supported_op():
    """The seeds below exercise every op form the front end accepts (else the e2e test is blind)."""
    seen = set()
    for seed in SEEDS:
        model = random_case(seed)[0]
        for kind, o in model.plan:
            seen.add(kind)
            if kind == "conv":
                seen |= {f"act:{o['act']}", f"conv:{o['mode']}"} | ({"bn"} if o["bn"] is not None else set())
            elif kind == "res":
                seen |= {f"res:{o['op']}", f"res_first:{o['conv_first']}"}
            elif kind == "pool":
                seen |= {f"pool:{o['mode']}"} | ({"pool_relu"} if o["relu_after"] else set())
    want = {"conv", "res", "pool", "bn", "head_conv", "head_gap", "head_flat", "head_mlp", "pool_relu",
            "conv:dense", "conv:depthwise", "conv:grouped", "res:plus", "res:torch_add", "res:iadd",
            "res_first:True", "res_first:False", "pool:max", "pool:max_f", "pool:avg", "pool:avg_f"}
    want |= {f"act:{a}" for a in CM.ACTS}
    assert want <= seen, f"not covered by seeds {SEEDS}: {sorted(want - seen)}"


@pytest.mark.parametrize("seed", SEEDS)
def test_random_model_golden_vs_float(seed):
    """Golden integer output vs the float model (BN folded), and bit-exact vs the quantizer's
    integer simulation.

    Tolerance unit, from the manifest's scales: one step of the output (the output layer's
    activation scale) plus one step of the output layer's input carried through that layer's
    weights (``scales[o] * ||w_q[o]||_2``). Quantization error of a few layers stays around one
    such unit on average; a lowering mistake (a wrong tap, channel block or offset) is off by a
    sizeable fraction of the output range, i.e. by tens of units.
    """
    model, shape, cfg, x = random_case(seed)
    qg = quantize(capture(model, shape), cfg, x, QuantOptions("minmax"))
    prog = lower(qg)
    got, accs, _ = run_golden(prog, x)
    with torch.no_grad():
        ref = model(x).reshape(len(x), -1).numpy()
    out = prog.manifest["output"]
    w_q = qg.layers[qg.graph.output].w_q
    unit = prog.manifest["layers"][-1]["scale"] + np.asarray(out["scales"]) * np.sqrt(
        (w_q.reshape(len(w_q), -1).astype(np.float64) ** 2).sum(1))
    unit = np.repeat(unit, out["h"] * out["w"])
    err = np.abs(got - ref) / unit
    assert err.mean() <= 1.25 and err.max() <= 5, \
        f"seed {seed} {cfg.describe()}: error mean {err.mean():.2f}, max {err.max():.2f} units"
    from compiler import quantize as Q
    if hasattr(Q, "simulate"):  # the quantizer's own integer model must agree to the bit
        sim = Q.simulate(qg, x, record=True)[qg.graph.output]
        for i in range(len(x)):
            assert np.array_equal(acc_to_chw(prog, accs[i]), sim[i]), f"seed {seed} image {i}: golden != simulate"


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_manifest_predicted_cycles_equal_the_golden_run(seed):
    """The manifest's per-layer predicted cycles add up to the program's cycles on the golden model
    (whose count the RTL tests show equals the RTL's counter)."""
    model, shape, cfg, x = random_case(seed)
    prog = lower(quantize(capture(model, shape), cfg, x, QuantOptions("minmax")))
    cycles = Machine(cfg).run(prog).cycles
    layers = prog.manifest["layers"]
    assert prog.manifest["predicted_cycles"] == cycles
    assert sum(l["predicted_cycles"] for l in layers) == cycles - 1  # + the HALT cycle
    assert all(l["predicted_cycles"] > 0 for l in layers if l.get("instructions"))


def test_bn_folding_is_exact():
    for seed in SEEDS:
        model, shape, _, x = random_case(seed)
        g = capture(model, shape)
        with torch.no_grad():
            want = model(x).reshape(len(x), -1)
            got = graph_forward(g, x).reshape(len(x), -1)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), f"seed {seed}: {float((got - want).abs().max())}"
    assert any(any(o.get("bn") is not None for _, o in random_case(s)[0].plan) for s in SEEDS)


# -- liveness allocation --------------------------------------------------------------------------

def test_spad_allocator_random_sequences():
    rng = np.random.default_rng(7)
    for trial in range(50):
        a = SpadAllocator()
        live = {}
        high = 0
        for _ in range(60):
            if live and rng.random() < 0.45:
                start = int(rng.choice(list(live)))
                a.free(start)
                del live[start]
            else:
                n = int(rng.integers(1, 50))
                s = a.alloc(n)
                for t, m in live.items():
                    assert s + n <= t or t + m <= s, f"trial {trial}: [{s}, {s + n}) overlaps [{t}, {t + m})"
                live[s] = n
                high = max(high, s + n)
            assert a.peak == high and a.live_rows == sum(live.values())
            assert a.top == max((s + n for s, n in live.items()), default=0), f"trial {trial}: top not trimmed"
        for s in list(live):
            a.free(s)
        assert a.top == 0 and a.alloc(high) == 0, f"trial {trial}: free space did not coalesce"
    with pytest.raises(ValueError, match=r"not the start of a live allocation"):
        SpadAllocator().free(3)


@pytest.mark.parametrize("seed", list(SEEDS)[:8])
def test_liveness_no_live_overlap_and_same_results(seed):
    """No two tensors that are live at the same time share a row; results equal the no-reuse
    program bit for bit; the peak never exceeds the no-reuse peak."""
    model, shape, cfg, x = random_case(seed)
    qg = quantize(capture(model, shape), cfg, x[:4], QuantOptions("minmax"))
    prog, flat = lower(qg), lower(qg, reuse_spad=False)
    layers = live_layers(qg.graph)
    last = {}
    for i, l in enumerate(layers):
        for src in list(l.inputs) + ([l.residual] if l.residual else []):
            last[src] = i
    info = {l["name"]: l for l in prog.manifest["layers"]}
    spans = [(i, last.get(l.name, i) if i > 0 else len(layers), info[l.name]) for i, l in enumerate(layers)
             if "spad_base" in info[l.name]]
    for i, (d1, u1, t1) in enumerate(spans):
        for d2, u2, t2 in spans[i + 1:]:
            if d2 <= u1 and d1 <= u2:  # lifetimes overlap (a layer's output lives from its definition)
                r1 = range(t1["spad_base"], t1["spad_base"] + t1["spad_rows"])
                r2 = range(t2["spad_base"], t2["spad_base"] + t2["spad_rows"])
                assert not set(r1) & set(r2), f"seed {seed}: {t1['name']} and {t2['name']} share spad rows"
    assert prog.manifest["spad_rows_peak"] <= flat.manifest["spad_rows_peak"]
    assert prog.manifest["spad_rows_peak"] == max(t["spad_base"] + t["spad_rows"] for _, _, t in spans)
    _, a1, _ = run_golden(prog, x[:3])
    _, a2, _ = run_golden(flat, x[:3])
    assert np.array_equal(a1, a2), f"seed {seed}: spad reuse changed the results"


def test_liveness_reuses_rows_of_dead_tensors():
    """A chain of convs runs in about two tensors' worth of spad (plus the input), not one per layer."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(5, 5, 3, padding=1), nn.ReLU()) for _ in range(6)],
                          nn.Flatten(), nn.Linear(5 * 6 * 6, 3)).eval()
    cfg = AccelConfig(rows=4, cols=4)
    x = torch.rand(4, 5, 6, 6)
    prog = compile_model(model, x, cfg, method="minmax")
    rows = 2 * 36  # one 5-channel 6x6 tensor: 2 channel blocks of 36 rows
    assert prog.manifest["spad_rows_peak"] == 3 * rows  # input + the conv being read + the one written
    flat = lower(quantize(capture(model, (5, 6, 6)), cfg, x, QuantOptions("minmax")), reuse_spad=False)
    assert flat.manifest["spad_rows_peak"] == 7 * rows
    bases = [l["spad_base"] for l in prog.manifest["layers"] if "spad_base" in l]
    assert bases[0] == prog.manifest["input"]["spad_base"] == 0 and len(set(bases[1:])) == 2


# -- pre-flight -------------------------------------------------------------------------------------

SUPPORTED_RE = re.escape(". Supported: " + ", ".join(SUPPORTED_OPS)) + "$"


def test_preflight_lists_every_unsupported_op():
    with pytest.raises(UnsupportedOpError, match=r"^unsupported ops: sigmoid \(torch\.sigmoid\): function not "
                       r"supported; lstm \(LSTM\): module not supported" + SUPPORTED_RE) as e:
        capture(CM.bad(), (1, 8, 8))
    assert [p[0] for p in e.value.problems] == ["sigmoid", "lstm"]


class _Many(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.ht = nn.Hardtanh(-1.0, 1.0)
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        a = self.conv(x)
        b = torch.cat([a, self.conv2(a)], 1)  # unsupported, downstream of nothing bad
        c = self.ht(a) * 2  # two unsupported ops in a row
        d = torch.tanh(b[:, :4] + c)  # getitem, tanh: reported too
        return self.fc(F.max_pool2d(d, 2).flatten(1))


def test_preflight_reports_each_node_with_reason():
    with pytest.raises(UnsupportedOpError) as e:
        capture(_Many(), (2, 8, 8))
    probs = {n: (op, why) for n, op, why in e.value.problems}
    assert list(probs) == ["cat", "ht", "mul", "getitem", "tanh"]
    assert probs["cat"][0] == "torch.cat" and re.search(r"share one activation scale.*multiple of the array rows",
                                                        probs["cat"][1])
    assert probs["ht"] == ("Hardtanh", "Hardtanh only with min_val=0")
    assert probs["mul"][0] == "operator.mul" and probs["tanh"][0] == "torch.tanh"
    assert re.search(r"; tanh \(torch\.tanh\): function not supported" + SUPPORTED_RE, str(e.value))


@pytest.mark.parametrize("make, node, reason", [
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), "_1", r"output must come straight from a Conv2d/Linear"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2)), "_1", r"output must come straight"),
    (lambda: nn.Sequential(nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(1, 2, 1)), "_1", r"activation must follow a conv"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2), nn.Conv2d(2, 2, 1)), "_0", r"dilation"),
    (lambda: nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(1, 2, 1)), "_0", r"ceil_mode"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(2), nn.Conv2d(2, 2, 1)), "_1", r"output size 1"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(6, 2)), "_1", r"Linear needs a flattened"),
])
def test_preflight_structural_problems(make, node, reason):
    with pytest.raises(UnsupportedOpError, match=reason) as e:
        capture(make().eval(), (1, 8, 8))
    assert e.value.problems[0][0] == node


def test_preflight_shape_and_trace_errors():
    with pytest.raises(CaptureError, match=r"^the model does not run on inputs of shape \(N, 3, 8, 8\) \(at %_0\): Given"):
        capture(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 2)), (3, 8, 8))

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedOpError, match=r"^unsupported ops: <model> \(trace\): torch\.fx cannot trace it"):
        capture(Branchy(), (1, 4, 4))


def test_preflight_observed_model_hint():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx
    prepared = prepare_fx(CM.tiny(), get_default_qconfig_mapping("fbgemm"), (torch.rand(1, 1, 8, 8),))
    with pytest.raises(UnsupportedOpError, match=r"convert the model with convert_fx\(\) first"):
        capture(prepared, (1, 8, 8))


# -- memory overflow --------------------------------------------------------------------------------

def _tiny_qgraph(cfg, model=None, shape=(1, 8, 8)):
    model = model or CM.tiny()
    x = torch.rand((4, *shape), generator=torch.Generator().manual_seed(0))
    return quantize(capture(model, shape), cfg, x, QuantOptions("minmax"))


def _mem_re(memory, unit="rows"):
    return (rf"^layer (\w+): {memory} needs (\d+) {unit} \((\d+) bytes\), {memory}_depth is (\d+) {unit} "
            rf"\((\d+) bytes\)")


def test_out_of_memory_spad_names_layer_and_sizes():
    big = AccelConfig(rows=3, cols=3)
    ref = lower(_tiny_qgraph(big), im2col_input=False)  # one layout, no im2col fallback
    layers = [l for l in ref.manifest["layers"] if "spad_base" in l]
    for depth in (ref.manifest["spad_rows_peak"] - 1, layers[0]["spad_rows"] + 2, 2):
        cfg = AccelConfig(rows=3, cols=3, spad_depth=depth)
        with pytest.raises(LowerError, match=_mem_re("spad")) as e:
            lower(_tiny_qgraph(cfg), im2col_input=False)
        layer, need, nbytes, have, hbytes = re.match(_mem_re("spad"), str(e.value)).groups()
        # The first layer (in order) whose rows end beyond the depth fails, needing that end.
        want = next(l for l in layers if l["spad_base"] + l["spad_rows"] > depth)
        assert (layer, int(need), int(have)) == (want["name"], want["spad_base"] + want["spad_rows"], depth)
        assert int(nbytes) == -(-int(need) * cfg.spad_row_bits // 8)
        assert int(hbytes) == -(-depth * cfg.spad_row_bits // 8)


def _chain(n=4, c=5):
    return nn.Sequential(*[nn.Sequential(nn.Conv2d(c if i else 1, c, 3, padding=1), nn.ReLU()) for i in range(n)],
                         nn.Flatten(), nn.Linear(c * 8 * 8, 2)).eval()


@pytest.mark.parametrize("memory", ["wmem", "param", "imem"])
def test_out_of_memory_other_memories(memory):
    """Shrink one memory below what the chain needs; the message names the first layer that does
    not fit, and the rows it needs are what the program needs up to and including that layer."""
    base = AccelConfig(rows=3, cols=3)
    ref = lower(_tiny_qgraph(base, _chain()))
    images = {"wmem": len(ref.images["wmem"]), "param": len(ref.images["param"]), "imem": len(ref.instrs)}
    depth = images[memory] // 2
    cfg = AccelConfig(rows=3, cols=3, **{f"{memory}_depth": depth})
    unit = "instructions" if memory == "imem" else "rows"
    with pytest.raises(LowerError, match=_mem_re(memory, unit) + "$") as e:
        lower(_tiny_qgraph(cfg, _chain()))
    layer, need, _, have, _ = re.match(_mem_re(memory, unit), str(e.value)).groups()
    assert int(have) == depth and depth < int(need) <= images[memory]
    assert layer in [l["name"] for l in ref.manifest["layers"]]


def test_out_of_memory_acc_names_layer():
    cfg = AccelConfig(rows=4, cols=4, acc_depth=6)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 2)).eval()
    with pytest.raises(LowerError, match=r"^layer _0: acc needs 8 rows \(\d+ bytes\) for one output row, "
                                         r"acc_depth is 6 rows \(\d+ bytes\)$"):
        lower(_tiny_qgraph(cfg, model))


def test_field_overflow_names_layer():
    cfg = AccelConfig(rows=4, cols=4)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=9), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 2 * 2, 2)).eval()
    with pytest.raises(LowerError, match=r"^layer _0: MATMUL\.stride_h = 9 does not fit \(0\.\.7\)"):
        lower(_tiny_qgraph(cfg, model, (1, 20, 20)), im2col_input=False)  # im2col would make it 1x1


def test_builder_messages_without_lowering():
    cfg = AccelConfig(rows=2, cols=2, spad_depth=10)
    b = ProgramBuilder(cfg)
    x = b.tensor(3, 2, 2, name="x")  # 2 blocks x 4 rows
    with pytest.raises(KernelError, match=r"^layer y: spad needs 12 rows \(24 bytes\), spad_depth is 10 rows "
                                          r"\(20 bytes\); its output takes 4 rows, live tensors hold 8$"):
        b.tensor(2, 2, 2, name="y")
    b.free(x)
    assert b.tensor(2, 2, 2, name="y").base == 0  # (the failed allocation is not kept)


# -- programs and configs -------------------------------------------------------------------------

def test_program_refuses_mismatched_config():
    cfg = AccelConfig(rows=3, cols=3)
    prog = lower(_tiny_qgraph(cfg))
    blob = prog.to_bytes()
    assert Program.from_bytes(blob, cfg).words() == prog.words()
    other = AccelConfig(rows=3, cols=3, spad_depth=cfg.spad_depth * 2)
    with pytest.raises(ProgramError, match=rf"^program was built for config {cfg.hash} .*, not {other.hash} "):
        Program.from_bytes(blob, other)
    with pytest.raises(ProgramError, match=rf"^program was built for config {cfg.hash} "):
        Machine(other).load_images(prog)
    with pytest.raises(ProgramError, match=r"^program was built for config"):
        Machine(other).run(prog)


def test_manifest_records_allocation():
    cfg = AccelConfig(rows=3, cols=3)
    prog = lower(_tiny_qgraph(cfg))
    man = prog.manifest
    assert man["spad_rows_peak"] > 0 and man["spad_reuse"] is True
    *inner, last = man["layers"]
    assert all({"spad_base", "spad_rows"} <= set(l) for l in inner) and "spad_base" not in last
    # The manifest's spad_base is where the tensor really is: read the conv output after a run.
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    _, _, (m,) = run_golden(prog, x)
    conv = next(l for l in man["layers"] if l["name"] == "pool")
    t = SpadTensor(conv["spad_base"], *conv["shape"], conv["signed"])
    assert read(m, t).max() > 0


# -- compile() and the CLI -----------------------------------------------------------------------------

def _cli(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "compiler", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["tests.compiler_models:tiny", "--input-shape", "1x8x8", "--pe", "0x4", "--out", "out"],
     r"rows must be an integer in 1\.\.32"),
    (["tests.compiler_models:bad", "--input-shape", "1x8x8", "--out", "out"],
     r"unsupported ops: sigmoid \(torch\.sigmoid\).*; lstm \(LSTM\): module not supported\. Supported: "),
    (["tests.compiler_models:tiny", "--input-shape", "1x8x8", "--spad-depth", "20", "--out", "out"],
     r"layer \w+: spad needs \d+ rows \(\d+ bytes\), spad_depth is 20 rows \(\d+ bytes\)"),
])
def test_cli_errors_exit_2_one_line_nothing_written(tmp_path, args, message):
    r = _cli(tmp_path, *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and re.match(r"^python -m compiler: error: " + message, lines[0]), r.stderr
    assert list(tmp_path.iterdir()) == [], f"left behind: {list(tmp_path.iterdir())}"


def test_cli_success_writes_outputs(tmp_path):
    r = _cli(tmp_path, "tests.compiler_models:tiny", "--input-shape", "1x8x8", "--pe", "3x5", "--calib", "8",
             "--out", "out")
    assert r.returncode == 0, r.stderr
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"program.qprog", "manifest.json", "report.json", "imem.hex", "wmem.hex", "param.hex"} <= files
    prog = Program.load(tmp_path / "out" / "program.qprog", AccelConfig(rows=3, cols=5))
    assert prog.manifest["spad_rows_peak"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("args, message", [
    (["tests.compiler_models:tiny", "--input-shape", "1x8"], r"--input-shape must look like CxHxW"),
    (["tests.compiler_models:tiny", "--input-shape", "1x8x8", "--method", "bogus"], r"method must be one of"),
    (["tests.compiler_models:tiny", "--input-shape", "1x8x8", "--calib", "0"], r"--calib must be >= 1"),
    (["tests.compiler_models:tiny", "--data", "cifar"], r"unknown data set 'cifar'"),
    (["tests.compiler_models:nope", "--input-shape", "1x8x8"], r"cannot load model factory"),
    (["no_such_module_xyz:f", "--input-shape", "1x8x8"], r"cannot load model factory .*ModuleNotFoundError"),
    (["tests.compiler_models:ACTS", "--input-shape", "1x8x8"], r"model factory 'tests\.compiler_models:ACTS' failed: TypeError"),
    (["quarry_cnn", "--method", "bogus"], r"method must be one of"),  # before any training
    (["tests.compiler_models:tiny", "--input-shape", "1x8x8", "--bogus-flag"], r"unrecognized arguments"),
])
def test_cli_bad_options_in_process(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    try:
        rc = cli_main([*args, "--out", "out"])
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert list(tmp_path.iterdir()) == []


def test_compile_rejects_options_for_fx_models():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    p = prepare_fx(CM.tiny(), get_default_qconfig_mapping("fbgemm"), (x[:1],))
    p(x)
    q = convert_fx(p)
    with pytest.raises(CompileError, match=r"already quantized by PyTorch \(FX\): method do not apply"):
        compile_model(q, x, AccelConfig(), method="mse")
    assert isinstance(compile_model(q, x, AccelConfig()), Program)


def test_isa_fields_fit_for_global_pool_on_wide_maps():
    """Global average pooling over a map wider than the stride field (stride is irrelevant)."""
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    x = torch.rand(2, 1, 12, 20)
    prog = compile_model(model.eval(), x, AccelConfig(rows=4, cols=4), method="minmax")
    pools = [i for i in prog.instrs if i.op is isa.Opcode.POOL]
    assert pools and all(i.k_h == 12 and i.k_w == 20 and i.stride_w == 1 for i in pools)
    got, _, _ = run_golden(prog, x)
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max() + 1e-3


def test_input_im2col_is_exact_and_saves_passes():
    """The host-side im2col of the model input gives bit-identical outputs in fewer cycles, also
    for strides the MATMUL stride field cannot hold."""
    from sim.run import run_golden

    torch.manual_seed(3)
    for stride in (1, 2, 9):
        model = nn.Sequential(nn.Conv2d(1, 6, 3, stride=stride, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.LazyLinear(3)).eval()
        model(torch.rand(1, 1, 20, 20))
        cfg = AccelConfig(rows=8, cols=4)
        qg = _tiny_qgraph(cfg, model, (1, 20, 20))
        x = torch.rand(3, 1, 20, 20).numpy()
        with_ = lower(qg)
        assert with_.manifest["input"]["im2col"]["kernel"] == [3, 3]
        got = run_golden(with_, x, progress=False)
        if stride <= 7:
            ref = run_golden(lower(qg, im2col_input=False), x, progress=False)
            assert all(np.array_equal(a, b) for a, b in zip(got.outputs, ref.outputs)), f"stride {stride}"
            assert got.cycles[0] < ref.cycles[0]


def test_narrow_activation_bits_input_matches_simulate():
    """quantize(a_bits=3) on an 8-bit array: the host clamps the input to the model's 3-bit
    range (manifest input lo/hi), so the golden model equals the integer simulation."""
    from compiler.quantize import simulate

    from tests.compiler_models import tiny

    torch.manual_seed(0)
    x = torch.rand((12, 1, 8, 8)) * 3 - 1  # signed input well outside a 3-bit range at some pixels
    cfg = AccelConfig(rows=4, cols=4, spad_depth=256, acc_depth=64, wmem_depth=128, imem_depth=128, param_depth=8)
    g = capture(tiny(), (1, 8, 8))
    qg = quantize(g, cfg, x[:8] * 0.5, QuantOptions(), a_bits=3)
    prog = lower(qg)
    assert (prog.manifest["input"]["lo"], prog.manifest["input"]["hi"]) == (-4, 3)
    got, _, _ = run_golden(prog, x[8:])
    assert np.array_equal(got, simulate(qg, x[8:]))
