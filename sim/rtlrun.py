"""Compare RTL runs against the golden model, job by job, word by word.

``compare(cfg, jobs, rtl)`` executes every :class:`~sim.verilator.Job` on a fresh
:class:`sim.golden.Machine` (starting from the RTL build's power-on contents) and on the RTL (one
simulator invocation, with :meth:`RtlSim.run`'s isolation so each RTL job also starts from
power-on), then compares every read region lane by lane and the cycle counter against the golden
prediction. It returns a :class:`Report`: a list of :class:`Mismatch` (empty means equal) that
also carries the cycle figures of every job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from hw.config import AccelConfig
from hw.isa import HostMem, IsaError
from hw.program import Program

from .golden import GoldenError, Machine
from .verilator import Job, JobError, JobResult, RtlSim, pack_host_rows, timeout_for, unpack_host_rows

__all__ = ["Mismatch", "CycleFigure", "Report", "compare", "golden_job"]


@dataclass(frozen=True)
class Mismatch:
    """One difference between golden model and RTL.

    ``kind`` is ``"data"`` (a lane of a read region; ``lane`` is an int, ``"field[i]"`` for PARAM,
    or ``None`` for a whole IMEM word), ``"cycles"`` (``expected`` = prediction) or ``"timeout"``.
    """

    job: int
    kind: str
    mem: HostMem | None = None
    row: int | None = None
    lane: int | str | None = None
    expected: int | None = None
    got: int | None = None

    def __str__(self):
        if self.kind == "data":
            lane = "" if self.lane is None else f" lane {self.lane}"
            return (f"job {self.job}: {self.mem.name} row {self.row}{lane}: expected {self.expected}, "
                    f"got {self.got}")
        if self.kind == "cycles":
            return f"job {self.job}: cycles: predicted {self.expected}, RTL {self.got}"
        return f"job {self.job}: no done within {self.expected} cycles"


@dataclass(frozen=True)
class CycleFigure:
    """Golden prediction vs RTL cycle counter for one job (``None`` where no program ran)."""

    job: int
    predicted: int | None
    rtl: int | None
    timed_out: bool = False

    @property
    def rel_error(self) -> float | None:
        if self.predicted is None or self.rtl is None or self.timed_out:
            return None
        return (self.rtl - self.predicted) / self.predicted if self.predicted else float(self.rtl != 0)


class Report(list):
    """A ``list[Mismatch]`` with the per-job :class:`CycleFigure` list and raw RTL results."""

    def __init__(self, mismatches=(), cycles=(), results=()):
        super().__init__(mismatches)
        self.cycles: list[CycleFigure] = list(cycles)
        self.results: list[JobResult] = list(results)

    @property
    def ok(self) -> bool:
        return not self

    def summary(self, limit: int = 20) -> str:
        lines = [f"{len(self)} mismatch(es) in {len(self.cycles)} job(s)"]
        lines += [f"  {m}" for m in self[:limit]]
        if len(self) > limit:
            lines.append(f"  ... {len(self) - limit} more")
        for c in self.cycles:
            if c.predicted is not None:
                err = "timeout" if c.timed_out else f"{100 * c.rel_error:+.2f}%"
                lines.append(f"  job {c.job}: cycles predicted {c.predicted}, RTL {c.rtl} ({err})")
        return "\n".join(lines)


def _expected_region(m: Machine, imem: np.ndarray, mem: HostMem, addr: int, n: int):
    sl = slice(addr, addr + n)
    if mem is HostMem.IMEM:
        return imem[sl]
    if mem is HostMem.PARAM:
        return {k: v[sl].copy() for k, v in m.param.items()}
    if mem is HostMem.SPAD_EXP:
        return m.spad_exp[sl, None].copy()
    return {HostMem.SPAD: m.spad, HostMem.ACC: m.acc, HostMem.WMEM: m.wmem}[mem][sl].copy()


def _store(m: Machine, imem: np.ndarray, cfg: AccelConfig, mem: HostMem, addr: int, packed: list[int]):
    n = len(packed)
    if mem is HostMem.IMEM:
        imem[addr:addr + n] = packed
        return
    vals = unpack_host_rows(cfg, mem, packed)
    if mem is HostMem.PARAM:
        for k, arr in m.param.items():
            arr[addr:addr + n] = vals[k]
    elif mem is HostMem.SPAD_EXP:
        m.spad_exp[addr:addr + n] = vals[:, 0]
    else:
        {HostMem.SPAD: m.spad, HostMem.ACC: m.acc, HostMem.WMEM: m.wmem}[mem][addr:addr + n] = vals
        if mem is HostMem.SPAD:  # a host SPAD write sets the row's exponent to 0
            m.spad_exp[addr:addr + n] = 0


def golden_job(cfg: AccelConfig, job: Job, rtl: RtlSim | None = None):
    """Run ``job`` on a fresh :class:`Machine`; returns (predicted cycles or None, expected reads).

    The machine starts from ``rtl``'s power-on contents (its ``wmem_init``/``param_init``). Order
    as on the RTL: program images, then the job's writes, then the program runs with no images.
    IMEM is modelled as an array of words for read-back; a write into the program's own words is
    refused, because the golden model executes ``program.instrs``, not IMEM.
    """
    m = Machine(cfg)
    imem = np.zeros(cfg.imem_depth, dtype=object)
    if rtl is not None:
        for mem, rows in rtl.power_on.items():
            if rows:
                _store(m, imem, cfg, mem, 0, rows)
    prog = job.program
    if prog is not None:
        words = prog.words()
        imem[:len(words)] = words
        m.load_images(prog)
    for mem, addr, rows in job.writes:
        mem = HostMem(mem)
        packed = pack_host_rows(cfg, mem, rows)
        if mem is HostMem.IMEM and prog is not None and addr < len(prog.instrs):
            raise JobError(f"IMEM write at {addr} overlaps the program's {len(prog.instrs)} words")
        _store(m, imem, cfg, mem, int(addr), packed)
    cycles = None
    if prog is not None:
        cycles = m.run(Program(cfg, prog.instrs, {}, prog.manifest)).cycles
    expected = [_expected_region(m, imem, HostMem(mem), int(a), int(n)) for mem, a, n in job.reads]
    return cycles, expected


def _diff(j: int, mem: HostMem, addr: int, exp, got) -> list[Mismatch]:
    out = []
    if mem is HostMem.IMEM:
        for i, (e, g) in enumerate(zip(exp, got)):
            if int(e) != int(g):
                out.append(Mismatch(j, "data", mem, addr + i, None, int(e), int(g)))
        return out
    pairs = [(k, exp[k], got[k]) for k in exp] if isinstance(exp, dict) else [(None, exp, got)]
    for key, e, g in pairs:
        e, g = np.asarray(e), np.asarray(g)
        for r, lane in zip(*np.nonzero(e != g)):
            name = int(lane) if key is None else f"{key}[{int(lane)}]"
            out.append(Mismatch(j, "data", mem, addr + int(r), name, int(e[r, lane]), int(g[r, lane])))
    return out


def compare(cfg: AccelConfig, jobs, rtl: RtlSim, *, cycle_tolerance: float = 0.0) -> Report:
    """Run ``jobs`` on the golden model and on ``rtl``; return every difference.

    A cycle count is a mismatch when ``|rtl - predicted| > cycle_tolerance * predicted`` (exact by
    default). Jobs whose ``timeout_cycles`` is ``None`` get :func:`sim.verilator.default_timeout`.

    Raises
    ------
    JobError
        A job is malformed, or the golden model rejects its program (the message names the job).
    """
    jobs = list(jobs)
    golden = []
    for j, job in enumerate(jobs):
        try:
            golden.append(golden_job(cfg, job, rtl))
        except (GoldenError, IsaError, JobError) as e:
            raise JobError(f"job {j}: {e}") from None
    # The prediction is known here; don't make run() execute every program a second time.
    run_jobs = [dataclasses.replace(job, timeout_cycles=timeout_for(cyc))
                if job.timeout_cycles is None and cyc is not None else job
                for job, (cyc, _) in zip(jobs, golden)]
    results = rtl.run(run_jobs, isolate=True)
    mismatches, figures = [], []
    for j, (job, (pred, expected), res) in enumerate(zip(run_jobs, golden, results)):
        figures.append(CycleFigure(j, pred, res.cycles, res.timed_out))
        if res.timed_out:
            mismatches.append(Mismatch(j, "timeout", expected=res.timeout_cycles, got=res.cycles))
            continue
        if pred is not None and abs(res.cycles - pred) > cycle_tolerance * pred:
            mismatches.append(Mismatch(j, "cycles", expected=pred, got=res.cycles))
        for (mem, addr, _), exp, got in zip(job.reads, expected, res.reads):
            mismatches.extend(_diff(j, HostMem(mem), int(addr), exp, got))
    return Report(mismatches, figures, results)
