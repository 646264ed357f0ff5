"""QAT (LSQ, PACT + SAWB) and per-layer mixed precision: the exact knapsack, budgets and pins,
per-layer bits through quantize/lower (golden == simulate, and on the RTL under Verilator), the
fake-quant forward against the integer network, QAT recovering 2-bit accuracy on real MNIST, the
CLI, and the benchmarks' checkpoint. Seeded throughout."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from compiler import data
from compiler.__main__ import main as cli_main
from compiler.frontend import capture
from compiler.lower import lower
from compiler.mixed import choose_bits, pareto_knapsack, parse_layer_bits, plan
from compiler.qat import FakeQuantNet, build, qat, sawb_coefficients
from compiler.quantize import QuantError, QuantOptions, quantize, simulate
from compiler.zoo import QuarryCNN
from hw.config import AccelConfig
from hw.isa import Opcode

from tests.compiler_models import run_golden, tiny

SEED = 20261127


# -- solver ---------------------------------------------------------------------------------------------

def _brute(items, budget):
    best = None
    for pick in itertools.product(*items):
        m, c = sum(o[0] for o in pick), sum(o[1] for o in pick)
        if m <= budget and (best is None or (c, m) < best):
            best = (c, m)
    return best


def test_pareto_knapsack_is_exact_and_monotone():
    rng = np.random.default_rng(SEED)
    for trial in range(40):
        items = [[(int(rng.integers(1, 60)) * b, float(rng.uniform(0, 1)) / b, (i, b)) for b in (2, 4, 8)]
                 for i in range(int(rng.integers(1, 6)))]
        lo, hi = sum(min(o[0] for o in it) for it in items), sum(max(o[0] for o in it) for it in items)
        prev = None
        for budget in np.linspace(lo - 1, hi, 15):
            got, want = pareto_knapsack(items, budget), _brute(items, budget)
            assert (got is None) == (want is None), f"seed {SEED} trial {trial}"
            if got is None:
                continue
            sel, cost, mem = got
            assert mem <= budget and cost == pytest.approx(want[0]), f"seed {SEED} trial {trial}: not optimal"
            assert len(sel) == len(items)
            if prev is not None:
                assert cost <= prev + 1e-12
            prev = cost


def test_choose_bits_respects_budget_and_pins():
    sizes = {"a": 100, "b": 1000, "c": 50}
    cost = {n: {b: (8 - b) ** 2 * w for b in range(2, 9)} for n, w in (("a", 1.0), ("b", 0.01), ("c", 5.0))}
    for budget in (2 * 1150, 3 * 1150, 4 * 1150, 8 * 1150):
        bits, c, mem = choose_bits(sizes, cost, budget)
        assert mem == sum(sizes[n] * bits[n] for n in sizes) <= budget
    bits, _, _ = choose_bits(sizes, cost, 3 * 1150)
    assert bits["b"] < bits["a"] <= bits["c"]  # the big, insensitive layer gives up bits first
    bits, _, mem = choose_bits(sizes, cost, 4 * 1150, pinned={"b": 3})
    assert bits["b"] == 3 and mem <= 4 * 1150
    with pytest.raises(QuantError, match=r"budget of 2299 weight bits is below the least .* \(2300 bits"):
        choose_bits(sizes, cost, 2299)


@pytest.mark.parametrize("text,message", [
    ("conv", "wants name=W or name=W/A"), ("conv=x", "wants name=W"), ("conv=4/", "wants name=W"),
    ("conv=4,conv=5", "given twice"), (",", "is empty"),
])
def test_parse_layer_bits_errors(text, message):
    with pytest.raises(QuantError, match=message):
        parse_layer_bits(text)


def test_parse_layer_bits():
    assert parse_layer_bits("conv=3, fc=4/6") == {"conv": (3, None), "fc": (4, 6)}


# -- per-layer bits through quantize and lower ----------------------------------------------------------

def _small(seed=0, width=8, n=40):
    torch.manual_seed(seed)
    model = QuarryCNN(width=width).eval()
    x = data.load("mnist")[0][:n]
    return model, capture(model, (1, 28, 28)), x


def test_layer_bits_set_codes_clamps_and_weight_report():
    _, g, x = _small()
    cfg = AccelConfig(rows=8, cols=8, w_bits=8, a_bits=8)
    bits = {"stem_0": (8, 4), "res1_0": (2, None), "res2_0": (3, 5), "dw_0": (5, None), "pw_0": (4, 3), "fc": (6, None)}
    qg = quantize(g, cfg, x, QuantOptions("mse", weight_method="mse"), layer_bits=bits)
    for name, (w, a) in bits.items():
        ql = qg.layers[name]
        assert ql.w_q.min() >= -(1 << (w - 1)) and ql.w_q.max() <= (1 << (w - 1)) - 1 and ql.code_bits == w
        if name != "fc":
            assert (ql.lo, ql.hi) == (0, (1 << (a or 8)) - 1)
    prog = lower(qg)
    info = {i["name"]: i["weights"] for i in prog.manifest["layers"] if "weights" in i}
    for name, (w, _) in bits.items():
        assert info[name]["bits"] == w and info[name]["bytes"] == -(-info[name]["count"] * w // 8)
        assert info[name]["wmem_bytes"] == info[name]["wmem_rows"] * cfg.cols  # 8-bit wmem
    wm = prog.manifest["weight_memory"]
    assert wm["bytes"] < wm["int8_bytes"] <= wm["wmem_bytes"]
    out, _, _ = run_golden(prog, x[:2])
    np.testing.assert_array_equal(out, simulate(qg, x[:2]))
    # Cycles do not depend on the bits (the reason mixed precision has no cycle budget here).
    assert prog.manifest["predicted_cycles"] == lower(quantize(g, cfg, x, QuantOptions("mse"))).manifest["predicted_cycles"]
    with pytest.raises(QuantError, match="layer_bits: 'nope' is not a conv/linear layer"):
        quantize(g, cfg, x, layer_bits={"nope": (4, None)})
    with pytest.raises(QuantError, match=r"layer_bits: fc weight bits must be an integer in 2..4"):
        quantize(g, AccelConfig(rows=8, cols=8, w_bits=4), x, layer_bits={"fc": (6, None)})


def test_mixed_plan_respects_budget_and_pins():
    _, g, x = _small()
    cfg = AccelConfig(rows=8, cols=8, w_bits=8, a_bits=8)
    sizes = {l.name: int(np.prod(l.weight.shape)) for l in g.layers if l.kind == "conv"}
    budget = 3 * sum(sizes.values())
    bits, rec = plan(g, cfg, x[:32], QuantOptions("mse", weight_method="mse"), budget, pinned={"fc": (8, None)},
                     choices=(2, 4, 8))
    assert bits["fc"][0] == 8 and rec["total_bits"] == sum(sizes[n] * bits[n][0] for n in sizes) <= budget
    assert rec["packed_bytes"] == -(-rec["total_bits"] // 8)
    assert set(rec["sensitivity"]) == set(sizes)


# -- RTL ---------------------------------------------------------------------------------------------------

@pytest.mark.rtl
def test_mixed_precision_programs_golden_vs_verilator():
    """On one 4x4 hybrid build: a program with a PoT conv (5-bit codes, 4-bit activations) and a
    3-bit INT linear layer, and an all-INT program with 2-bit conv weights and 6-bit linear weights:
    raw outputs and cycle counts of the RTL equal the golden model's, image by image."""
    from sim.run import compare_runs, run_golden as golden_run, run_verilator

    x = torch.rand((10, 1, 8, 8), generator=torch.Generator().manual_seed(SEED))
    cfg = AccelConfig(rows=4, cols=4, pe_kind="hybrid", spad_depth=256, acc_depth=64, wmem_depth=128,
                      imem_depth=128, param_depth=8)
    g = capture(tiny(), (1, 8, 8))
    progs = []
    qg = quantize(g, cfg, x[:8], QuantOptions("mse", weight_method="inq", pot_bits=5, pot_layers=("conv",)),
                  layer_bits={"conv": (8, 4), "fc": (3, None)})
    assert qg.layers["conv"].pot and not qg.layers["fc"].pot and qg.layers["fc"].code_bits == 3
    assert qg.layers["conv"].hi == 15
    progs.append(lower(qg))
    mm = [i.args["pot"] for i in progs[0].instrs if i.op is Opcode.MATMUL]
    assert 0 in mm and 1 in mm
    qg2 = quantize(g, cfg, x[:8], QuantOptions("mse", weight_method="mse"), layer_bits={"conv": (2, 6), "fc": (6, None)})
    progs.append(lower(qg2))
    images = x[8:].numpy()
    for prog, q in zip(progs, (qg, qg2)):
        gres = golden_run(prog, images, progress=False)
        r = run_verilator(prog, images, rom=False, progress=False, optimize=False)
        assert not compare_runs(gres, r)
        np.testing.assert_array_equal(np.stack(gres.logits), simulate(q, images).reshape(len(images), -1))


# -- QAT -----------------------------------------------------------------------------------------------------

def test_sawb_coefficients_fit_the_grid():
    for b in (2, 3, 4):
        c1, c2 = sawb_coefficients(b)
        assert c1 > 0
        # On a Gaussian the fitted clip is within 10 % of the MSE-optimal one.
        w = np.random.default_rng(SEED).standard_normal(50_000)
        hi = (1 << (b - 1)) - 1
        grid = np.linspace(0.2, 6, 300)
        err = [((w - np.clip(np.round(w / (a / hi)), -hi - 1, hi) * (a / hi)) ** 2).mean() for a in grid]
        alpha = c1 * np.sqrt((w ** 2).mean()) - c2 * np.abs(w).mean()
        assert alpha == pytest.approx(grid[int(np.argmin(err))], rel=0.1), f"{b} bits"


@pytest.fixture(scope="module")
def mnist_small():
    """The zoo's MNIST quarry_cnn (cached under build/zoo; trained deterministically if not) and the
    real MNIST split."""
    from compiler import zoo

    model = zoo.trained("quarry_cnn", "mnist")
    xtr, ytr, xte, yte = data.load("mnist")
    return model, capture(model, (1, 28, 28)), (xtr, ytr, xte[:500], yte[:500].numpy())


@pytest.mark.parametrize("method", ["lsq", "pact"])
def test_fake_quant_forward_matches_the_integer_network(mnist_small, method):
    _, g, (xtr, ytr, xte, yte) = mnist_small
    cfg = AccelConfig(rows=16, cols=16, w_bits=8, a_bits=3)
    qg = quantize(g, cfg, xtr[:256], QuantOptions("mse", weight_method="mse"), w_bits=3,
                  layer_bits={"stem_0": (5, None), "fc": (4, None)})
    net = FakeQuantNet(qg, method).eval()
    g2, act, wsc = net.export()
    qi = quantize(g2, cfg, xtr[:256], QuantOptions("mse", weight_method="mse"), w_bits=3,
                  layer_bits={"stem_0": (5, None), "fc": (4, None)}, act_scales=act, w_scales=wsc)
    for name in ("stem_0", "res1_0", "fc"):
        assert qi.layers[name].code_bits == qg.layers[name].code_bits
    with torch.no_grad():
        fq = net(xte).double().numpy()
    ref = simulate(qi, xte)
    # Identical except where POST's fixed-point multiplier moves a value across a rounding boundary.
    agree = (fq.argmax(1) == ref.argmax(1)).mean()
    assert agree >= 0.99, f"{method}: predictions agree on {agree:.3f}"
    assert np.median(np.abs(fq - ref)) < 1e-4 * np.abs(ref).max()


def test_qat_recovers_2_bit_accuracy(mnist_small):
    """W2A2: two LSQ epochs (seed fixed) on top of the best PTQ (OMSE + GPTQ + empirical bias
    correction, which QAT starts from) gain a wide margin on 500 real MNIST test images, and the
    integer program runs on the golden model as simulate says."""
    _, g, (xtr, ytr, xte, yte) = mnist_small
    cfg = AccelConfig(rows=16, cols=16, w_bits=8, a_bits=2)
    calib = xtr[:256]
    opts = QuantOptions("mse", weight_method="gptq", bias_correction="empirical")
    ptq = quantize(g, cfg, calib, opts, w_bits=2)
    acc_ptq = float((simulate(ptq, xte).argmax(1) == yte).mean())
    qg = build(g, cfg, calib, opts=opts, w_bits=2, qat_method="lsq", train=(xtr, ytr), epochs=2, seed=0,
               progress=False)
    acc_qat = float((simulate(qg, xte).argmax(1) == yte).mean())
    assert acc_qat >= acc_ptq + 0.10, f"QAT {acc_qat:.3f} vs PTQ {acc_ptq:.3f}"
    assert qg.quant_manifest["qat"]["epochs"] == 2 and len(qg.quant_manifest["qat"]["history"]) == 2
    prog = lower(qg)
    out, _, _ = run_golden(prog, xte[:2])
    np.testing.assert_array_equal(out, simulate(qg, xte[:2]))


def test_qat_is_deterministic(mnist_small):
    _, g, (xtr, ytr, _, _) = mnist_small
    cfg = AccelConfig(rows=16, cols=16, w_bits=8, a_bits=4)
    qg = quantize(g, cfg, xtr[:128], QuantOptions("mse", weight_method="mse"), w_bits=3)
    runs = [qat(qg, xtr[:256], ytr[:256], method="pact", epochs=1, seed=3, progress=False) for _ in range(2)]
    for name in runs[0][2]:
        np.testing.assert_array_equal(runs[0][2][name], runs[1][2][name])
    assert runs[0][1] == runs[1][1]


# -- CLI --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--layer-bits", "conv=9"], r"layer_bits: conv weight bits must be an integer in 2..8"),
    (["--layer-bits", "conv"], r"--layer-bits wants name=W or name=W/A"),
    (["--layer-bits", "nope=4"], r"layer_bits: 'nope' is not a conv/linear layer \(layers: conv, fc\)"),
    (["--layer-bits", "conv=4/9"], r"conv activation bits must be an integer in 2..8"),
    (["--budget-bits", "12x"], r"--budget-bits must be a whole number of weight bits"),
    (["--budget-bits", "100"], r"budget of 100 weight bits is below the least this model can take \(456 bits"),
    (["--qat", "dorefa"], r"--qat must be one of lsq, pact, not 'dorefa'"),
    (["--epochs", "2"], r"--epochs applies to --qat"),
    (["--qat", "lsq", "--epochs", "0"], r"--epochs must be >= 1"),
    (["--qat", "lsq"], r"--qat needs --data"),
    (["--budget-bits", "400", "--weight-method", "inq", "--pe-kind", "pot"], r"--budget-bits works on INT weights"),
])
def test_cli_low_bit_errors(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    rc = cli_main(["tests.compiler_models:tiny", "--input-shape", "1x8x8", "--pe", "4x4", "--calib", "16",
                   "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("python -m compiler: error: ")
    assert __import__("re").search(message, err), err
    assert not out.exists()


def test_cli_mixed_precision_and_qat(tmp_path, capsys):
    out = tmp_path / "mixed"
    rc = cli_main(["tests.compiler_models:tiny", "--input-shape", "1x8x8", "--pe", "4x4", "--calib", "16",
                   "--budget-bits", "700", "--layer-bits", "conv=6/4", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    man = json.loads((out / "manifest.json").read_text())
    q = man["quant"]
    assert q["layer_bits"]["conv"] == [6, 4] and q["mixed"]["total_bits"] <= 700
    w = {i["name"]: i["weights"] for i in man["layers"] if "weights" in i}
    assert w["fc"]["bits"] == q["layer_bits"]["fc"][0] and man["weight_memory"]["bytes"] <= 700 // 8 + 2
    assert "packed weights" in capsys.readouterr().out
    # QAT from the CLI: a saved (untrained) width-4 model, one epoch on MNIST's training split.
    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    torch.save(QuarryCNN(width=4).eval(), path)
    out2 = tmp_path / "qat"
    rc = cli_main([str(path), "--data", "mnist", "--pe", "8x8", "--bits", "3", "--calib", "32", "--qat", "pact",
                   "--epochs", "1", "--out", str(out2)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rep = json.loads((out2 / "report.json").read_text())
    assert rep["qat"]["method"] == "pact" and rep["qat"]["epochs"] == 1 and "QAT pact 1 epochs" in cap.out


# -- bench plumbing ------------------------------------------------------------------------------------

def test_bench_checkpoint_resumes_only_matching_runs(tmp_path):
    from bench.common import Checkpoint

    logs = []
    ck = Checkpoint(tmp_path / "c.json", "fp1", lambda r: (r["a"],), "rows", logs.append)
    assert ck.load() == {}
    ck.save([{"a": 1, "v": 2}])
    assert ck.load() == {(1,): {"a": 1, "v": 2}} and "resuming: 1 rows" in logs[-1]
    assert Checkpoint(tmp_path / "c.json", "fp2", lambda r: (r["a"],)).load() == {}
    ck.remove()
    assert not (tmp_path / "c.json").exists()
