"""System tests: random programs on the generated Verilog under Verilator (cocotb), every output
word and the cycle counter compared with the golden model.

``test_fuzz_random_configs`` runs a short :mod:`sim.fuzz` session; ``make fuzz N=...`` runs the
long, resumable one (``python -m sim.fuzz``).
"""

import numpy as np
import pytest

from hw.config import AccelConfig
from hw.isa import HostMem
from sim.rtlrun import compare
from sim.verilator import Job, build

from tests import helpers

pytestmark = pytest.mark.rtl

_SMALL = dict(spad_depth=512, acc_depth=40, wmem_depth=512, imem_depth=512, param_depth=16)
CONFIGS = {
    "2x2_w8a8": AccelConfig(rows=2, cols=2, w_bits=8, a_bits=8, **_SMALL),
    "4x4_w4a4": AccelConfig(rows=4, cols=4, w_bits=4, a_bits=4, **_SMALL),
    "8x4_w2a8": AccelConfig(rows=8, cols=4, w_bits=2, a_bits=8, **_SMALL),
    "3x5_w6a3": AccelConfig(rows=3, cols=5, w_bits=6, a_bits=3, mult_bits=16, pool_mult_bits=12, **_SMALL),
    # PoT weights (every MATMUL pot=1): exponents up to 6, and up to the cap (15) at W8.
    "4x4_pot_w4a4": AccelConfig(rows=4, cols=4, w_bits=4, a_bits=4, pe_kind="pot", **_SMALL),
    "2x3_pot_w8a8": AccelConfig(rows=2, cols=3, w_bits=8, a_bits=8, pe_kind="pot", **_SMALL),
    # Hybrid: programs with int, PoT, or per-tile mixed MATMULs (both modes in the array at once).
    "4x4_hybrid_w4a8": AccelConfig(rows=4, cols=4, w_bits=4, a_bits=8, pe_kind="hybrid", **_SMALL),
    "3x5_hybrid_w6a3": AccelConfig(rows=3, cols=5, w_bits=6, a_bits=3, pe_kind="hybrid", mult_bits=16,
                                   pool_mult_bits=12, **_SMALL),
}
#: Programs per config in the default run (8 configs -> 480 programs).
PROGRAMS_PER_CONFIG = 60
KINDS = ("conv", "gemm", "pool", "residual")


def _job(case) -> Job:
    reads = [(HostMem.SPAD, addr, n) for addr, n in case.outputs]
    return helpers.rtl_job(case, reads + [(HostMem.ACC, 0, case.program.config.acc_depth)])


def _cases(cfg, seed, n):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        cases.append((kind, getattr(helpers, f"random_{kind}_case")(rng, cfg)))
    return cases


def _check(cfg, seed, n, label):
    rtl = build(cfg)
    cases = _cases(cfg, seed, n)
    report = compare(cfg, [_job(c) for _, c in cases], rtl)
    worst = max((abs(f.rtl - f.predicted) / f.predicted for f in report.cycles if f.predicted), default=0.0)
    print(f"{label}: {n} programs, {sum(f.rtl for f in report.cycles)} RTL cycles, "
          f"worst cycle-model error {worst:.2%}")
    details = "; ".join(f"job {m.job} ({cases[m.job][0]}): {m.kind} {m.mem} row {m.row} lane {m.lane} "
                        f"expected {m.expected} got {m.got}" for m in report[:5])
    assert not report, f"{label} seed {seed}: {len(report)} mismatches: {details}"
    # The cycle model is exact today; the contract is +-5 %.
    assert worst <= 0.05


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_programs(name):
    cfg = CONFIGS[name]
    seed = 1000 + list(CONFIGS).index(name)
    _check(cfg, seed, PROGRAMS_PER_CONFIG, name)


def test_fuzz_random_configs(request, tmp_path):
    """Random configs x random programs through :mod:`sim.fuzz` (the driver of ``make fuzz``).
    Default: 2 configs x 12 programs; ``--fuzz-n N`` for more."""
    from sim import fuzz

    n = request.config.getoption("--fuzz-n") or 24
    seed = request.config.getoption("--fuzz-seed")
    st = fuzz.run(n, seed, per_config=12 if n == 24 else 1000, batch=50, state_path=tmp_path / "state.json")
    s = fuzz.summarize(st, n)
    print(f"fuzz seed {seed}: {s['programs']} programs on {s['configs']} configs {s['pe_kinds']}, "
          f"{s['mismatching_programs']} mismatching")
    assert st["done"] == n
    assert not st["mismatches"], f"fuzz seed {seed}: mismatches {st['mismatches']}"
