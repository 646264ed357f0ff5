"""Power-of-two weights (compiler.pot): INQ / DoubleQ rounding properties, the DoubleQExt layer
selection, PoT options and pe_kind checks, lowering to PoT codes (golden == simulate on PoT and
hybrid-mixed models), the weight-memory report, INQ re-training mechanics, the CLI, and one small
golden-vs-Verilator run of a hybrid model. Seeded; every assertion names its seed."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

from compiler import CompileError
from compiler import compile as compile_model
from compiler.__main__ import main as cli_main
from compiler.frontend import capture
from compiler.lower import LowerError, PotLayerError, lower
from compiler.pot import (
    doubleq_quantize, e_max, inq_n1, inq_quantize, inq_retrain, round_pot, select_layers,
)
from compiler.quantize import QuantError, QuantOptions, quantize, simulate, weight_scales
from compiler.zoo import QuarryCNN
from hw import isa
from hw.config import AccelConfig
from hw.isa import Opcode
from hw.program import unpack_rows

from tests.compiler_models import ROOT, run_golden
from tests import test_quantize

SEED = test_quantize.SEED
rng = test_quantize.rng  # the seeded fixture (prints its seed on failure)


def _is_pot(q, emax):
    a = np.abs(np.asarray(q, np.int64))
    nz = a[a != 0]
    return bool(((nz & (nz - 1)) == 0).all() and (nz <= 1 << emax).all())


# -- rounding ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("emax", [0, 3, 6, 14])
def test_round_pot_is_nearest_member(rng, emax):
    v = np.concatenate([rng.laplace(0, 2.0 ** (emax / 2), 4000),
                        # exact midpoints: 0.5 and 1.5 * 2**e (ties go up in magnitude)
                        [0.5, -0.5, 0.49999, *[s * 1.5 * 2.0 ** e for e in range(emax) for s in (1, -1)]],
                        [2.0 ** (emax + 3), -(2.0 ** (emax + 3))]])
    q = round_pot(v, emax)
    assert q.dtype == np.int64 and _is_pot(q, emax)
    levels = np.array([0] + [s << e for e in range(emax + 1) for s in (1, -1)], np.float64)
    dist = np.abs(v[:, None] - levels[None, :])
    best = dist.min(axis=1)
    assert np.allclose(np.abs(v - q), best), "not the nearest member"
    ties = np.isclose(dist, best[:, None]).sum(axis=1) > 1
    assert (np.abs(q[ties]) == np.abs(levels[np.argmax(np.where(np.isclose(dist, best[:, None]), np.abs(levels), -1)[ties], axis=1)])).all()
    assert round_pot([0.5], emax)[0] == 1 and round_pot([0.49999], emax)[0] == 0
    assert round_pot([1e9], emax)[0] == 1 << emax  # saturates


@pytest.mark.parametrize("bits", [3, 4, 5, 8])
def test_e_max_comes_from_the_hardware_format(bits):
    cfg = AccelConfig(w_bits=bits, pe_kind="pot")
    assert e_max(AccelConfig(), bits) == cfg.pot_max_exp
    # every value the quantizer may produce has a code in a config of that width
    emax = e_max(AccelConfig(), bits)
    vals = np.array([0] + [s << e for e in range(emax + 1) for s in (1, -1)])
    assert np.array_equal(isa.pot_decode(isa.pot_encode(vals, cfg), cfg), vals)


@pytest.mark.parametrize("granularity", ["layer", "channel"])
@pytest.mark.parametrize("bits", [4, 5])
def test_inq_levels_and_rounding(rng, granularity, bits):
    w = rng.laplace(0, 0.1, (8, 4, 3, 3)) * rng.uniform(0.2, 3, (8, 1, 1, 1))
    w[3] = 0  # a dead channel
    emax = e_max(AccelConfig(), bits)
    q, s = inq_quantize(w, emax, granularity)
    assert q.shape == w.shape and _is_pot(q, emax) and (q[3] == 0).all()
    n1 = inq_n1(w, granularity)
    flat = np.abs(w).reshape(8, -1)
    top = flat.max(1) if granularity == "channel" else np.full(8, flat.max())
    for o in range(8):
        if top[o] == 0:
            continue
        assert 2.0 ** n1[o] <= 4 * top[o] / 3 < 2.0 ** (n1[o] + 1)  # INQ's n1
        assert s[o] == 2.0 ** (n1[o] - emax)  # the levels are +-2**n, n1 - emax <= n <= n1
        # nearest member of {0, +-2**n} in the linear domain, per weight
        levels = np.array([0.0] + [sg * 2.0 ** n for n in range(n1[o] - emax, n1[o] + 1) for sg in (1, -1)])
        r = q[o].reshape(-1) * s[o]
        best = np.abs(w[o].reshape(-1, 1) - levels[None]).min(1)
        assert np.allclose(np.abs(w[o].reshape(-1) - r), best)
    if granularity == "layer":
        assert np.all(s == s[0])


def test_inq_lsq_scale_not_worse(rng):
    w = rng.laplace(0, 0.1, (8, 4, 3, 3)) * rng.uniform(0.2, 3, (8, 1, 1, 1))
    for granularity in ("layer", "channel"):
        qp, sp = inq_quantize(w, 6, granularity)
        ql, sl = inq_quantize(w, 6, granularity, scale="lsq")
        assert _is_pot(ql, 6)
        err = lambda q, s: ((w - q * s[:, None, None, None]) ** 2).reshape(8, -1).sum(1)  # noqa: E731
        if granularity == "channel":
            assert (err(ql, sl) <= err(qp, sp) + 1e-15).all()
        else:
            assert err(ql, sl).sum() <= err(qp, sp).sum() + 1e-15 and np.all(sl == sl[0])


def test_gptq_pot_rounding_lowers_output_error(rng):
    """GPTQ over the PoT levels keeps every weight PoT on the same scale and beats nearest
    rounding on the layer output error for correlated inputs."""
    from compiler.quantize import gptq_round

    w = rng.laplace(0, 0.1, (6, 4, 3, 3))
    x = np.maximum(rng.normal(size=(4000, 36)) @ rng.normal(size=(36, 36)) * 0.3 + 0.5, 0)
    q, s = inq_quantize(w, 6)
    g = gptq_round(w, s, 4, x, rounder=lambda v: round_pot(v, 6))
    assert g.shape == w.shape and _is_pot(g, 6)
    err = lambda q: float(((x @ (w - q * s[:, None, None, None]).reshape(6, -1).T) ** 2).mean())  # noqa: E731
    assert err(g) < err(q)


def test_doubleq_level2_is_pot_of_level1(rng):
    w = rng.laplace(0, 0.1, (6, 3, 3, 3))
    q1, q2, s = doubleq_quantize(w, 14)
    assert np.array_equal(s, weight_scales(w, 8, "minmax"))  # level 1: per-channel min-max int8
    assert np.array_equal(q1, np.clip(np.round(w / s[:, None, None, None]), -128, 127))
    assert np.array_equal(q2, round_pot(q1, 14))  # level 2 rounds the int8 codes, same scale
    assert _is_pot(q2, 7) and np.abs(q2).max() == 128  # 127 -> 2**7: exponents 0..7 (5-bit codes)


# -- DoubleQExt selection -------------------------------------------------------------------------------

def _brute(sizes, costs, ib, pb, budget):
    best = None
    names = sorted(sizes)
    for r in range(len(names) + 1):
        for sel in itertools.combinations(names, r):
            mem = sum(sizes[n] * (pb if n in sel else ib) for n in names)
            c = sum(max(0.0, costs[n]) for n in sel)
            if mem <= budget and (best is None or (c, mem) < best[:2]):
                best = (c, mem, sel)
    return best


def test_select_layers_is_optimal_and_monotone(rng):
    for trial in range(30):
        k = int(rng.integers(1, 8))
        sizes = {f"l{i}": int(rng.integers(1, 500)) for i in range(k)}
        costs = {n: float(rng.normal(0.05, 0.05)) for n in sizes}
        full = 8 * sum(sizes.values())
        prev = None
        for frac in np.linspace(0.55, 1.0, 19):
            budget = frac * full
            got, want = select_layers(sizes, costs, 8, 5, budget), _brute(sizes, costs, 8, 5, budget)
            assert (got is None) == (want is None), f"trial {trial} budget {frac:.3f}"
            if got is None:
                continue
            sel, cost, mem = got
            assert mem <= budget and mem == sum(sizes[n] * (5 if n in sel else 8) for n in sizes)
            assert cost == pytest.approx(want[0]), f"trial {trial} budget {frac:.3f}: not optimal"
            if prev is not None:
                assert cost <= prev + 1e-12, f"trial {trial}: predicted loss grew with the budget"
            prev = cost
        assert select_layers(sizes, costs, 8, 5, 5 * sum(sizes.values()) - 1) is None


def _small(seed=0, width=8):
    torch.manual_seed(seed)
    model = QuarryCNN(width=width).eval()
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.uniform(0, 1, (40, 1, 28, 28)) * (rng.uniform(size=(40, 1, 28, 28)) < 0.3)).float()
    return model, capture(model, (1, 28, 28)), x


def test_doubleqext_respects_budget_and_pe_kind():
    _, g, x = _small()
    hyb = AccelConfig(rows=8, cols=8, pe_kind="hybrid")
    sizes = {l.name: int(np.prod(l.weight.shape)) for l in g.layers if l.kind == "conv"}
    int8 = sum(sizes.values())
    prev = None
    for budget in (0.65, 0.8, 0.95, 1.0):
        qg = quantize(g, hyb, x[:32], QuantOptions(weight_method="doubleqext", pot_budget=budget))
        info = qg.pot_info
        mem = sum(sizes[n] * (5 if n in qg.pot_layers else 8) for n in sizes)
        assert mem <= budget * 8 * int8 and -(-mem // 8) == info["weight_bytes"]
        # the choice is select_layers on the measured sensitivities
        assert set(select_layers(sizes, info["sensitivity"], 8, 5, budget * 8 * int8)[0]) == set(qg.pot_layers)
        assert all(ql.pot == (n in qg.pot_layers) for n, ql in qg.layers.items() if ql.layer.kind == "conv")
        if prev is not None:
            assert info["predicted_loss"] <= prev + 1e-12
        prev = info["predicted_loss"]
    qg = quantize(g, hyb, x[:32], QuantOptions(weight_method="doubleqext", pot_budget=int8 * 5 // 8 + 20))  # bytes
    assert qg.pot_info["weight_bytes"] <= int8 * 5 // 8 + 20
    with pytest.raises(QuantError, match=r"pot_budget 0.5 \(fraction of 8-bit\) is below the all-PoT weight memory"):
        quantize(g, hyb, x[:32], QuantOptions(weight_method="doubleqext", pot_budget=0.5))
    with pytest.raises(QuantError, match="doubleqext .* needs pe_kind hybrid .*not int"):
        quantize(g, AccelConfig(rows=8, cols=8), x[:32], QuantOptions(weight_method="doubleqext"))
    qg = quantize(g, AccelConfig(rows=8, cols=8, w_bits=5, pe_kind="pot"), x[:32], QuantOptions(weight_method="doubleqext"))
    assert qg.pot_layers == set(sizes)  # pot: every layer


def test_pot_options_validation():
    _, g, x = _small()
    with pytest.raises(QuantError, match=r"pot_bits must be an integer in 2\.\.8, not 9"):
        QuantOptions(weight_method="inq", pot_bits=9)
    with pytest.raises(QuantError, match="pot_granularity must be one of layer, channel, not 'tensor'"):
        QuantOptions(pot_granularity="tensor")
    with pytest.raises(QuantError, match="pot_scale must be one of pow2, lsq"):
        QuantOptions(pot_scale="log")
    with pytest.raises(QuantError, match="pot_rounding must be one of nearest, gptq"):
        QuantOptions(pot_rounding="up")
    for bad in (0.0, 1.5, 0, True, "0.5"):
        with pytest.raises(QuantError, match="pot_budget must be a fraction"):
            QuantOptions(pot_budget=bad)
    with pytest.raises(QuantError, match="pot_layers must be a sequence of layer names"):
        QuantOptions(pot_layers="fc")
    with pytest.raises(QuantError, match=r"pot_layers: 'nope' is not a conv/linear layer"):
        quantize(g, AccelConfig(rows=8, cols=8, pe_kind="hybrid"), x[:32], QuantOptions(weight_method="inq", pot_layers=("nope",)))
    with pytest.raises(QuantError, match="pe_kind pot runs PoT weights only: layer stem_0 would be INT"):
        quantize(g, AccelConfig(rows=8, cols=8, pe_kind="pot"), x[:32], QuantOptions(weight_method="inq", pot_layers=("fc",)))
    with pytest.raises(QuantError, match="pot_bits 6 does not fit the accelerator's 5-bit weight memory"):
        quantize(g, AccelConfig(rows=8, cols=8, w_bits=5, pe_kind="pot"), x[:32], QuantOptions(weight_method="inq", pot_bits=6))
    with pytest.raises(QuantError, match="doubleq keeps its INT layers at 8 bits"):
        quantize(g, AccelConfig(rows=8, cols=8, w_bits=6, pe_kind="hybrid"), x[:32], QuantOptions(weight_method="doubleq"))


# -- lowering: golden == simulate -------------------------------------------------------------------

CASES = {
    "inq4_pot": (dict(w_bits=4, pe_kind="pot"), QuantOptions("mse", weight_method="inq", bias_correction="empirical")),
    "inq4_gptq_pot": (dict(w_bits=4, pe_kind="pot"), QuantOptions("mse", weight_method="inq", pot_rounding="gptq")),
    "inq5_layer_lsq_pot": (dict(w_bits=5, pe_kind="pot"),
                           QuantOptions("percentile", weight_method="inq", pot_granularity="layer", pot_scale="lsq")),
    "doubleq_pot": (dict(w_bits=5, pe_kind="pot"), QuantOptions("aciq", weight_method="doubleq", bias_correction="both")),
    "inq_mixed_hybrid": (dict(pe_kind="hybrid"),
                         QuantOptions("mse", weight_method="inq", pot_bits=5, pot_layers=("res1_0", "pw_0", "fc"))),
    "doubleqext_hybrid": (dict(pe_kind="hybrid"), QuantOptions("mse", weight_method="doubleqext", pot_budget=0.8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pot_programs_golden_equals_simulate(case):
    cfg_kw, opts = CASES[case]
    _, g, x = _small(seed=list(CASES).index(case))
    cfg = AccelConfig(rows=8, cols=8, **cfg_kw)
    qg = quantize(g, cfg, x[:32], opts)
    prog = lower(qg)
    got, _, _ = run_golden(prog, x[32:35])
    assert np.array_equal(got, simulate(qg, x[32:35])), f"{case}: golden != simulate"
    # the MATMULs of PoT layers carry pot = 1, the others 0; wmem holds the hardware's codes
    n_pot = sum(ins.args["pot"] for ins in prog.instrs if ins.op is Opcode.MATMUL)
    assert (n_pot > 0) == bool(qg.pot_layers)
    assert (n_pot == sum(ins.op is Opcode.MATMUL for ins in prog.instrs)) == (len(qg.pot_layers) == 6)
    info = {i["name"]: i["weights"] for i in prog.manifest["layers"] if "weights" in i}
    for name, ql in qg.layers.items():
        if ql.layer.kind == "conv":
            assert info[name]["format"] == ("pot" if name in qg.pot_layers else "int")
            assert _is_pot(ql.w_q, cfg.pot_max_exp) or not ql.pot
    wm = prog.manifest["weight_memory"]
    assert wm["bytes"] == sum(-(-i["count"] * i["bits"] // 8) for i in info.values())
    assert wm["wmem_rows"] == len(prog.images["wmem"])
    assert sorted(wm["pot_layers"]) == sorted(qg.pot_layers)
    assert prog.manifest["quant"]["pot_layers"] == sorted(qg.pot_layers)


def test_pot_wmem_holds_codes_and_shrinks():
    _, g, x = _small()
    progs = {}
    for kind, bits, wm in (("int", 8, "minmax"), ("pot", 4, "inq")):
        cfg = AccelConfig(rows=8, cols=8, w_bits=bits, pe_kind=kind)
        qg = quantize(g, cfg, x[:32], QuantOptions(weight_method=wm))
        progs[kind] = (qg, lower(qg, im2col_input=False))
    qg, prog = progs["pot"]
    # the stem's first tile: wmem rows are pot_encode of the integer weights, decoded back exactly
    w = qg.layers["stem_0"].w_q
    lanes = unpack_rows(isa.wmem_row_layout(prog.config), prog.images["wmem"][:1])[0]
    assert np.array_equal(isa.pot_decode(lanes, prog.config)[:w.shape[0]], w[:, 0, 0, 0])
    wm_int, wm_pot = progs["int"][1].manifest["weight_memory"], prog.manifest["weight_memory"]
    assert wm_int["wmem_rows"] == wm_pot["wmem_rows"]
    assert 2 * wm_pot["wmem_bytes"] == wm_int["wmem_bytes"] and 2 * wm_pot["bytes"] == wm_int["bytes"]


def test_pe_kind_mismatch_names_the_layer():
    _, g, x = _small()
    qg = quantize(g, AccelConfig(rows=8, cols=8), x[:32], QuantOptions(weight_method="inq"))
    with pytest.raises(PotLayerError, match="^layer stem_0: has power-of-two weights, which need pe_kind pot or hybrid") as e:
        lower(qg)
    assert e.value.layer == "stem_0" and isinstance(e.value, LowerError)
    qg = quantize(g, AccelConfig(rows=8, cols=8, pe_kind="pot"), x[:32], QuantOptions())
    with pytest.raises(PotLayerError, match="^layer stem_0: has INT weights, but pe_kind pot PEs only shift"):
        lower(qg)
    # a hybrid with the PoT set empty is an all-INT program: every MATMUL has pot = 0
    qg = quantize(g, AccelConfig(rows=8, cols=8, pe_kind="hybrid"), x[:32], QuantOptions(weight_method="inq", pot_layers=()))
    assert not any(i.args["pot"] for i in lower(qg).instrs if i.op is Opcode.MATMUL)


def test_compile_api_pot_options():
    model, _, x = _small()
    cfg = AccelConfig(rows=8, cols=8, pe_kind="hybrid")
    prog = compile_model(model, x[:32], cfg, weight_method="doubleqext", pot_budget=0.9, bias_correction="empirical")
    assert prog.manifest["quant"]["weight_method"] == "doubleqext"
    with pytest.raises(TypeError, match="unexpected keyword argument 'pot_bogus'"):
        compile_model(model, x[:32], cfg, pot_bogus=1)
    with pytest.raises(CompileError, match="inq_retrain applies to weight_method inq, not doubleq"):
        compile_model(model, x[:32], cfg, weight_method="doubleq", inq_retrain={"x": x, "y": x})


# -- INQ re-training ----------------------------------------------------------------------------------

def test_inq_retrain_mechanics():
    """Tiny run on real digits: afterwards every weight is PoT on the grid fixed at the start,
    ``inq`` reproduces the weights exactly, and the run is deterministic."""
    from compiler import data

    xtr, ytr = data.load("mnist")[:2]
    _, g, _ = _small(width=4)
    cfg = AccelConfig(w_bits=4, pe_kind="pot")
    kw = dict(epochs=1, per_epoch=64, batch=32, seed=3, progress=False)
    g1, rec = inq_retrain(g, xtr[:256], ytr[:256], cfg, 4, **kw)
    g2, _ = inq_retrain(g, xtr[:256], ytr[:256], cfg, 4, **kw)
    assert [h["frozen"] for h in rec["history"]] == [0.5, 0.75, 0.875]
    for l0, l1, l2 in zip(g.layers, g1.layers, g2.layers):
        if l0.kind != "conv":
            continue
        w = l1.weight.double().numpy()
        q, s = inq_quantize(w, 6)
        assert np.array_equal(q * s[:, None, None, None], w), l1.name  # idempotent
        _, s0 = inq_quantize(l0.weight.double().numpy(), 6)
        assert np.all(s <= s0)  # levels fixed at the start (a channel's top may only drop)
        assert torch.equal(l1.weight, l2.weight) and torch.equal(l1.bias, l2.bias)
        assert not l1.weight.requires_grad
    assert not torch.equal(g.layers[1].weight, g1.layers[1].weight)  # the input graph is untouched


# -- CLI -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--weight-method", "doubleqext"], r"doubleqext puts layers in PoT: it needs --pe-kind hybrid"),
    (["--weight-method", "inq"], r"--weight-method inq makes layers PoT: it needs --pe-kind pot or hybrid"),
    (["--weight-method", "doubleqext", "--pe-kind", "hybrid", "--pot-budget", "1.5"], r"--pot-budget must be a fraction"),
    (["--weight-method", "doubleqext", "--pe-kind", "hybrid", "--pot-budget", "0.2"],
     r"pot_budget 0.2 \(fraction of 8-bit\) is below the all-PoT weight memory"),
    (["--pot-bits", "4"], r"--pot-bits applies to --weight-method inq/doubleq/doubleqext, not minmax"),
    (["--weight-method", "inq", "--pe-kind", "pot", "--pot-granularity", "x"], r"pot_granularity must be one of"),
    (["--weight-method", "doubleq", "--pe-kind", "pot", "--inq-retrain", "1"], r"--inq-retrain applies to --weight-method inq"),
    (["--weight-method", "inq", "--pe-kind", "hybrid", "--pot-layers", "conv,nope"], r"pot_layers: 'nope' is not a conv"),
    (["--pe-kind", "pot"], r"layer conv: has INT weights, but pe_kind pot PEs only shift"),
])
def test_cli_pot_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    rc = cli_main(["tests.compiler_models:tiny", "--input-shape", "1x8x8", "--calib", "8", *args, "--out", "out"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert list(tmp_path.iterdir()) == []


def test_cli_pot_report(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    rc = cli_main(["tests.compiler_models:tiny", "--input-shape", "1x8x8", "--calib", "8", "--pe", "4x4",
                   "--pe-kind", "hybrid", "--weight-method", "doubleqext", "--pot-budget", "0.9",
                   "--bias-correction", "empirical", "--out", "out"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    wm = report["weight_memory"]
    assert wm["bytes"] <= 0.9 * wm["int8_bytes"] and wm["pot_layers"]
    assert set(report["weights_per_layer"]) == {"conv", "fc"}
    assert "PoT layers" in capsys.readouterr().out


# -- RTL ---------------------------------------------------------------------------------------------------

@pytest.mark.rtl
def test_hybrid_model_golden_vs_verilator():
    """A tiny model with one PoT and one INT layer on a 4x4 hybrid array: raw outputs and cycle
    counts of the RTL equal the golden model's, image by image."""
    from sim.run import compare_runs, run_golden as golden_run, run_verilator

    from tests.compiler_models import tiny

    x = torch.rand((10, 1, 8, 8), generator=torch.Generator().manual_seed(SEED))
    cfg = AccelConfig(rows=4, cols=4, pe_kind="hybrid", spad_depth=256, acc_depth=64, wmem_depth=128,
                      imem_depth=128, param_depth=8)
    prog = compile_model(tiny(), x[:8], cfg, weight_method="inq", pot_bits=5, pot_layers=("conv",),
                         bias_correction="empirical")
    mm = [i.args["pot"] for i in prog.instrs if i.op is Opcode.MATMUL]
    assert 0 in mm and 1 in mm  # both modes in one program
    images = x[8:].numpy()
    g = golden_run(prog, images, progress=False)
    r = run_verilator(prog, images, progress=False, optimize=False)
    assert not compare_runs(g, r)
