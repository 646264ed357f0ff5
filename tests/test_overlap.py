"""MATMUL/POST overlap (``post_overlap`` configs, MATMUL ``overlap`` bit): the hazard rules of
``hw.timing`` (:func:`~hw.timing.overlap_hazard`), the golden model refusing a program that breaks
them, the compiler's marking pass, and the RTL honouring the rules exactly at their boundary.

The boundary test builds programs where a MATMUL overwrites accumulator rows a POST is still
reading, with the MATMUL's rows shifted by ``d`` rows against the POST's: for small ``d`` the
MATMUL writes each shared row after POST read it (overlap allowed), from ``d = matmul_latency``
on it would write first (overlap refused, the MATMUL waits). The tightest allowed ``d`` leaves one
cycle between POST's read and the MATMUL's write, so an off-by-one in the timing rules (or in the
RTL) shows up as a mismatch against the golden model under Verilator.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hw import isa, timing
from hw.config import AccelConfig
from hw.isa import HostMem, Opcode
from hw.program import Program, pack_rows
from sim.golden import Machine

_SMALL = dict(spad_depth=512, acc_depth=64, wmem_depth=64, imem_depth=64, param_depth=4)
CFG = AccelConfig(rows=4, cols=4, w_bits=4, a_bits=4, **_SMALL)
N_POST = 20  # rows the first POST reads
N_MM = 8  # rows the overlapping MATMUL writes
X2 = 40  # spad rows of the second MATMUL's input
RES = 60  # residual rows
OUT1, OUT2 = 100, 200  # spad rows the two POSTs write


def _marked(cfg: AccelConfig, rng, instrs) -> Program:
    """``instrs`` with overlap bits marked, two banks' worth of random weights and one random
    requantization param row."""
    R, C = cfg.rows, cfg.cols
    wlo, whi = -(1 << (cfg.w_bits - 1)), (1 << (cfg.w_bits - 1)) - 1
    wmem = rng.integers(wlo, whi + 1, (2 * R, C))
    params = {"bias": rng.integers(-50, 50, (1, C)), "mult": rng.integers(1 << 10, 1 << 14, (1, C)),
              "res_mult": rng.integers(1 << 10, 1 << 14, (1, C)), "shift": np.full((1, C), 14)}
    images = {"wmem": pack_rows(isa.wmem_row_layout(cfg), wmem),
              "param": pack_rows(isa.param_row_layout(cfg), params)}
    return Program(cfg, timing.mark_overlaps(cfg, instrs), images, {})


def _program(cfg: AccelConfig, rng, d: int, *, accumulate: bool, residual: bool, mm2_spad: int = X2) -> Program:
    """MATMUL -> acc rows 0..N_POST-1; POST of them (PRELOAD of the next tile before it, so the
    second MATMUL is ready to go); a second MATMUL into acc rows d..d+N_MM-1; POST of those."""
    R, C = cfg.rows, cfg.cols
    instrs = [
        isa.preload(bank=0, w_addr=0, n_rows=R),
        isa.matmul(bank=0, spad_base=0, acc_base=0, in_w=N_POST, out_w=N_POST),
        isa.preload(bank=1, w_addr=R, n_rows=R),
        isa.post(acc_base=0, spad_base=OUT1, n=N_POST, param_addr=0, n_lanes=C, lo=-8, hi=7,
                 res_base=RES if residual else None, res_signed=True),
        isa.matmul(bank=1, spad_base=mm2_spad, acc_base=d, in_w=N_MM, out_w=N_MM, accumulate=accumulate),
        isa.post(acc_base=d, spad_base=OUT2, n=N_MM, param_addr=0, n_lanes=C, lo=-8, hi=7),
        isa.halt(),
    ]
    return _marked(cfg, rng, instrs)


def _spad_writes(cfg, rng):
    return [(HostMem.SPAD, 0, rng.integers(0, 1 << cfg.a_bits, (RES + N_POST, cfg.rows)))]


def _overlaps(prog) -> bool:
    return bool([i for i in prog.instrs if i.op is Opcode.MATMUL][1].args["overlap"])


def test_overlap_field_only_on_post_overlap_configs():
    off = dataclasses.replace(CFG, post_overlap=False)
    assert isa.args_layout(off, Opcode.MATMUL)["overlap"].shape.width == 0
    assert isa.args_layout(CFG, Opcode.MATMUL)["overlap"].shape.width == 1
    mm = isa.matmul(bank=0, spad_base=0, acc_base=0, in_w=1, out_w=1, overlap=True)
    assert isa.decode(CFG, mm.encode(CFG)) == mm
    with pytest.raises(isa.IsaError, match=r"MATMUL\.overlap = 1 does not fit"):
        mm.encode(off)
    # The pass leaves a config without overlap alone.
    prog = _program(off, np.random.default_rng(0), 0, accumulate=False, residual=False)
    assert not any(i.args.get("overlap") for i in prog.instrs if i.op is Opcode.MATMUL)


def test_marking_follows_the_acc_boundary():
    """Overlap is chosen exactly while every shared acc row is written after POST read it."""
    rng = np.random.default_rng(1)
    ml = timing.matmul_latency(CFG)
    got = {d: _overlaps(_program(CFG, rng, d, accumulate=False, residual=False)) for d in range(0, N_POST + 1)}
    # The second MATMUL issues the cycle after the POST: row d + j is written in cycle
    # post + 1 + j + ml and read by POST in cycle post + 1 + d + j.
    assert got == {d: d < ml or d >= N_POST for d in got}


def test_golden_refuses_a_forced_hazard():
    rng = np.random.default_rng(2)
    ml = timing.matmul_latency(CFG)
    prog = _program(CFG, rng, ml, accumulate=False, residual=False)
    assert not _overlaps(prog)
    forced = [isa.Instr(i.op, {**i.args, "overlap": 1}) if i.op is Opcode.MATMUL else i for i in prog.instrs]
    with pytest.raises(timing.HazardError, match=r"^instruction 4 \(MATMUL\): .*writes acc row"):
        Machine(CFG).run(Program(CFG, forced, prog.images, {}))
    # Reading what the POST writes is refused too (the MATMUL's input is the POST's output).
    prog = _program(CFG, rng, 0, accumulate=False, residual=False, mm2_spad=OUT1 + 4)
    assert not _overlaps(prog)
    forced = [isa.Instr(i.op, {**i.args, "overlap": 1}) if i.op is Opcode.MATMUL else i for i in prog.instrs]
    with pytest.raises(timing.HazardError, match=r"reads spad rows 104\.\.111.*writes rows 100\.\.119"):
        Machine(CFG).run(Program(CFG, forced, prog.images, {}))


def test_overlap_saves_cycles_on_a_compiled_conv():
    """A conv with several output blocks: the marked program runs its MATMULs under the POSTs."""
    from compiler.kernels import Requant, SpadTensor, conv2d

    cfg = AccelConfig(rows=4, cols=4, w_bits=4, a_bits=4, **_SMALL)
    rng = np.random.default_rng(3)
    x, y = SpadTensor(0, 8, 6, 6), SpadTensor(100, 12, 6, 6)
    rq = Requant(bias=np.zeros(12, np.int64), mult=np.full(12, 1 << 12), shift=np.full(12, 16), zp=0, lo=0, hi=15)
    k = conv2d(cfg, x, y, rng.integers(-8, 8, (12, 8, 3, 3)), rq, padding=(1, 1))
    plain = k.instrs + [isa.halt()]
    marked = timing.mark_overlaps(cfg, plain)
    assert sum(i.args["overlap"] for i in marked if i.op is Opcode.MATMUL) >= 2  # one per later block
    assert timing.predict(cfg, marked)[2] < timing.predict(cfg, plain)[2]
    assert timing.mark_overlaps(cfg, marked) == marked


def _assert_rtl_matches(jobs) -> None:
    """Run ``jobs`` on CFG's RTL under Verilator: every word and the cycle count equal the golden
    model's."""
    from sim.rtlrun import compare
    from sim.verilator import build

    report = compare(CFG, jobs, build(CFG))
    assert not report, "; ".join(f"job {m.job}: {m.kind} {m.mem} row {m.row} expected {m.expected} got {m.got}"
                                 for m in report[:5])


@pytest.mark.rtl
def test_rtl_overlap_boundary():
    """Both sides of the acc boundary, overwrite and accumulate, with and without a residual POST
    (whose spad reads the MATMUL must wait out): RTL == golden, cycles exact."""
    from sim.verilator import Job

    rng = np.random.default_rng(4)
    ml = timing.matmul_latency(CFG)
    jobs, overlapped = [], []
    for d in (0, ml - 2, ml - 1, ml, ml + 1, ml + 2):
        for accumulate, residual in ((False, False), (True, False), (False, True)):
            prog = _program(CFG, rng, d, accumulate=accumulate, residual=residual)
            overlapped.append(_overlaps(prog))
            reads = [(HostMem.SPAD, OUT1, N_POST), (HostMem.SPAD, OUT2, N_MM), (HostMem.ACC, 0, CFG.acc_depth)]
            jobs.append(Job(prog, _spad_writes(CFG, rng), reads))
    assert any(overlapped) and not all(overlapped)
    _assert_rtl_matches(jobs)


# -- POST overlapping the MATMULs before it (ping-pong accumulators) ---------------------------------

MM_B = 16  # rows of the MATMUL the POST is placed behind
ACC_B = 32  # its acc rows (the other half)


def _post_program(cfg: AccelConfig, rng, m_a: int, *, residual: bool, post_spad: int = OUT1) -> Program:
    """MATMUL A -> acc rows 0..m_a-1; MATMUL B -> acc rows ACC_B..; POST of A placed after B (it
    may issue while A drains and B streams); POST of B."""
    R, C = cfg.rows, cfg.cols
    instrs = [
        isa.preload(bank=0, w_addr=0, n_rows=R),
        isa.matmul(bank=0, spad_base=0, acc_base=0, in_w=m_a, out_w=m_a),
        isa.preload(bank=1, w_addr=R, n_rows=R),
        isa.matmul(bank=1, spad_base=X2, acc_base=ACC_B, in_w=MM_B, out_w=MM_B),
        isa.post(acc_base=0, spad_base=post_spad, n=m_a, param_addr=0, n_lanes=C, lo=-8, hi=7,
                 res_base=RES if residual else None, res_signed=True),
        isa.post(acc_base=ACC_B, spad_base=OUT2, n=MM_B, param_addr=0, n_lanes=C, lo=-8, hi=7),
        isa.halt(),
    ]
    return _marked(cfg, rng, instrs)


def _post_overlaps(prog) -> bool:
    return bool([i for i in prog.instrs if i.op is Opcode.POST][0].args["overlap"])


def test_post_marking_follows_the_acc_boundary():
    """POST of A (behind MATMUL B, which issues in A's last vector cycle) reads A's row i in cycle
    t_A + m_a + 2 + i; A writes it in cycle t_A + i + matmul_latency."""
    rng = np.random.default_rng(5)
    ml = timing.matmul_latency(CFG)
    got = {m: _post_overlaps(_post_program(CFG, rng, m, residual=False)) for m in range(ml - 4, ml + 3)}
    assert got == {m: m + 2 > ml for m in got}


def test_golden_refuses_a_forced_post_hazard():
    rng = np.random.default_rng(6)
    ml = timing.matmul_latency(CFG)

    def forced(prog):
        return Program(CFG, [isa.Instr(i.op, {**i.args, "overlap": 1}) if i.op is Opcode.POST else i
                             for i in prog.instrs], prog.images, {})

    with pytest.raises(timing.HazardError, match=r"^instruction 4 \(POST\): .*reads acc row 0 in cycle"):
        Machine(CFG).run(forced(_post_program(CFG, rng, ml - 3, residual=False)))
    # Writing rows the MATMUL it overlaps reads is refused too.
    with pytest.raises(timing.HazardError, match=r"writes spad rows 44\.\.56.*reads rows 40\.\.55"):
        Machine(CFG).run(forced(_post_program(CFG, rng, ml + 1, residual=False, post_spad=X2 + 4)))


def test_compiled_layers_ping_pong():
    """A compiled multi-block conv alternates acc halves, overlaps POSTs both ways, and is faster
    than the same layer on a config without overlap."""
    from compiler.kernels import Requant, SpadTensor, conv2d

    rng = np.random.default_rng(7)
    x, y = SpadTensor(0, 8, 12, 12), SpadTensor(300, 12, 12, 12)
    rq = Requant(bias=np.zeros(12, np.int64), mult=np.full(12, 1 << 12), shift=np.full(12, 16), zp=0, lo=0, hi=15)
    w = rng.integers(-8, 8, (12, 8, 3, 3))
    cycles = {}
    for overlap in (True, False):
        cfg = dataclasses.replace(CFG, spad_depth=1024, acc_depth=256, wmem_depth=128, post_overlap=overlap)
        prog = timing.mark_overlaps(cfg, conv2d(cfg, x, y, w, rq, padding=(1, 1)).instrs + [isa.halt()])
        cycles[overlap] = timing.predict(cfg, prog)[2]
        posts = [i for i in prog if i.op is Opcode.POST]
        if overlap:
            assert len({p.args["acc_base"] for p in posts}) == 2
            assert any(p.args["overlap"] for p in posts)
            assert any(i.args["overlap"] for i in prog if i.op is Opcode.MATMUL)
    assert cycles[True] < cycles[False]


@pytest.mark.rtl
def test_rtl_post_overlap_boundary():
    """Both sides of the POST's acc boundary, with and without a residual (whose spad reads wait
    for the MATMUL's): RTL == golden, cycles exact."""
    from sim.verilator import Job

    rng = np.random.default_rng(8)
    ml = timing.matmul_latency(CFG)
    jobs, overlapped = [], []
    for m_a in (ml - 5, ml - 3, ml - 2, ml - 1, ml, ml + 2):
        for residual in (False, True):
            prog = _post_program(CFG, rng, m_a, residual=residual)
            overlapped.append(_post_overlaps(prog))
            reads = [(HostMem.SPAD, OUT1, m_a), (HostMem.SPAD, OUT2, MM_B), (HostMem.ACC, 0, CFG.acc_depth)]
            jobs.append(Job(prog, _spad_writes(CFG, rng), reads))
    assert any(overlapped) and not all(overlapped)
    _assert_rtl_matches(jobs)
