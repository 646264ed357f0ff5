"""Overflow policy (issue 9, deliverable 4).

* The config's derived ``acc_width = product_bits + clog2(wmem_depth)`` holds any reduction of up
  to ``wmem_depth`` full-scale products, for every PE kind and width (proved here by the closed
  form, exhaustively over widths and a spread of depths). A compiled layer's reduction reads each
  weight row once, so it never has more than ``wmem_depth`` terms.
* A program *can* express longer reductions (MATMULs with ``accumulate = 1`` repeated over the same
  or re-preloaded weights): the accumulators then wrap modulo ``2**acc_width`` (two's complement),
  in the golden model and, bit for bit, in the RTL (below, and in every narrow-accumulator config
  of ``make fuzz``).
* With an ``acc_bits`` override narrower than that, the compiler computes each layer's worst-case
  sum from its integer weights and refuses a layer that could wrap, naming the layer and the numbers
  (:class:`compiler.lower.AccumulatorOverflowError`); the CLI exits 2 and writes nothing.
"""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

import compiler
from compiler.lower import AccumulatorOverflowError, accumulator_bound
from hw import isa
from hw.config import PE_KINDS, AccelConfig
from hw.isa import HostMem, Instr, Opcode
from hw.program import Program, pack_rows
from sim.golden import Machine, wrap
from tests.compiler_models import ROOT
from tests.test_malformed import CALIB, CFG, net


def _max_abs_weight(cfg: AccelConfig) -> int:
    ints = 1 << (cfg.w_bits - 1)  # -2**(w_bits-1)
    pots = int(np.abs(isa.pot_values(cfg)).max())
    return {"int": ints, "pot": pots, "hybrid": max(ints, pots)}[cfg.pe_kind]


@pytest.mark.parametrize("pe_kind", PE_KINDS)
def test_derived_acc_width_holds_any_wmem_depth_reduction(pe_kind):
    for w_bits in range(2, 9):
        for a_bits in range(2, 9):
            for depth in (2, 3, 5, 300, 1000, 1024, 1025, 4096, 65537, 1 << 20):
                cfg = AccelConfig(w_bits=w_bits, a_bits=a_bits, pe_kind=pe_kind, wmem_depth=depth, mult_bits=8)
                a_max = (1 << a_bits) - 1  # unsigned activations are the larger magnitude
                worst = depth * _max_abs_weight(cfg) * a_max
                assert worst <= (1 << (cfg.acc_width - 1)) - 1, cfg.describe()
                # and product_bits is not loose by more than one bit (the +1 of the sign)
                assert _max_abs_weight(cfg) * a_max >= 1 << (cfg.product_bits - 2), cfg.describe()


def test_accumulator_bound_is_attained():
    """The bound is exact: the activations that pick each weight's worst sign reach it."""
    cfg = AccelConfig(rows=4, cols=4, w_bits=4, a_bits=4)
    rng = np.random.default_rng(0)
    w = rng.integers(-8, 8, (5, 3, 3, 3))
    for signed, (lo, hi) in ((False, (0, 15)), (True, (-8, 7))):
        smin, smax = accumulator_bound(cfg, w, signed)
        flat = w.reshape(5, -1)
        assert (smax == np.where(flat > 0, flat * hi, flat * lo).sum(1)).all()
        assert (smin == np.where(flat > 0, flat * lo, flat * hi).sum(1)).all()


# -- longer reductions wrap ----------------------------------------------------------------------------

WRAP_CFG = AccelConfig(rows=2, cols=2, w_bits=8, a_bits=8, acc_bits=17, spad_depth=16, acc_depth=4,
                       wmem_depth=4, imem_depth=16, param_depth=2)


def _wrap_program(repeats: int) -> Program:
    """PRELOAD 127s, then ``repeats`` MATMULs over the same two activations of 127 (the first
    overwrites, the rest accumulate): a reduction of ``2 * repeats`` terms from 2 weight rows."""
    cfg = WRAP_CFG
    mm = dict(bank=0, a_signed=1, spad_base=0, in_h=1, in_w=1, out_h=1, out_w=1, stride_h=1, stride_w=1,
              acc_base=0)
    instrs = [Instr(Opcode.PRELOAD, dict(bank=0, w_addr=0, n_rows=2))]
    instrs += [Instr(Opcode.MATMUL, dict(mm, accumulate=int(i > 0))) for i in range(repeats)]
    instrs.append(isa.halt())
    wmem = pack_rows(isa.wmem_row_layout(cfg), np.full((2, 2), 127))
    return Program(cfg, instrs, {"wmem": wmem})


def _expected_wrap(repeats):
    return int(wrap(2 * 127 * 127 * repeats, WRAP_CFG.acc_width))


def test_longer_reductions_wrap_in_the_golden_model():
    for repeats in (1, 2, 3, 5):
        m = Machine(WRAP_CFG)
        m.write_spad(0, np.full((1, 2), 127), signed=True)
        m.run(_wrap_program(repeats))
        assert (m.acc[0] == _expected_wrap(repeats)).all()
    assert _expected_wrap(3) == 2 * 127 * 127 * 3 - (1 << 17)  # really wrapped


@pytest.mark.rtl
def test_longer_reductions_wrap_identically_on_the_rtl():
    from sim.rtlrun import compare
    from sim.verilator import Job, build

    rtl = build(WRAP_CFG)
    jobs = [Job(_wrap_program(r), [(HostMem.SPAD, 0, np.full((1, 2), 127))], [(HostMem.ACC, 0, 1)])
            for r in (1, 3, 5)]
    report = compare(WRAP_CFG, jobs, rtl)
    assert not report, report.summary()
    assert [int(res.reads[0][0, 0]) for res in report.results] == [_expected_wrap(r) for r in (1, 3, 5)]


# -- the compiler refuses layers that could overflow ------------------------------------------------------

def big_net():
    """tests.test_malformed's net with huge, same-sign linear weights: every quantized fc weight is
    the largest code, 144 terms x 7 x 15 = 15120 needs 15 accumulator bits."""
    m = net()
    m.fc.weight.data[:] = 1e6
    return m


def test_default_accumulator_fits_and_manifest_records_the_bound():
    prog = compiler.compile(net(), CALIB, CFG)
    acc = {l["name"]: l["accumulator"] for l in prog.manifest["layers"] if "accumulator" in l}
    assert set(acc) == {"c1", "c2", "fc"}
    assert acc["fc"]["terms"] == 144 and max(a["bits_needed"] for a in acc.values()) <= CFG.acc_width


def test_narrow_accumulator_refuses_the_layer_with_the_numbers():
    cfg = dataclasses.replace(CFG, acc_bits=14)
    compiler.compile(net(), CALIB, cfg)  # needs 13 bits
    with pytest.raises(AccumulatorOverflowError) as ei:
        compiler.compile(big_net(), CALIB, cfg)
    e = ei.value
    assert e.layer == "fc" and e.bound == (0, 15120) and e.terms == 144 and e.acc_width == 14
    msg = str(e)
    for part in ("layer fc", "15120", "-8192..8191", "acc_bits >= 15", "144 terms", "acc_bits 20"):
        assert part in msg, msg


def _cli(tmp_path, model, acc_bits):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "compiler", f"tests.test_overflow:{model}", "--input-shape",
                           "1x6x6", "--pe", "4x4", "--bits", "4", "--acc-bits", str(acc_bits), "--calib", "8",
                           "--out", "out"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_cli_refuses_overflow_exit_2_nothing_written(tmp_path):
    r = _cli(tmp_path, "big_net", 13)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "layer fc: accumulator overflow" in lines[0] and "15120" in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []
    r = _cli(tmp_path, "net", 13)  # the normal model at the same width compiles
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "program.qprog").is_file()

