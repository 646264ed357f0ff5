"""Pipeline timing of the generated accelerator, as functions of the config.

The RTL (``hw.top``) sizes its drain counters from these functions, and :class:`CycleModel`
uses them to predict cycles (the golden model reports them, the compiler writes per-layer
predictions into the manifest); ``tests/test_rtl_system.py`` checks the prediction against the
RTL's cycle counter. Cycle numbering: the cycle after ``start`` is 0; the first
instruction can issue in cycle 2 (one cycle of instruction-memory read latency, one in the
decode register); at most one instruction issues per cycle.
"""

from __future__ import annotations

from . import isa
from .config import AccelConfig
from .isa import Opcode
from .ppu import RequantLane

__all__ = ["FIRST_ISSUE", "PE_STAGES", "array_latency", "preload_busy", "matmul_drain", "matmul_latency", "post_latency", "pool_latency", "CycleModel", "predict"]

#: Cycle in which the first instruction can issue: imem read (1) + decode register (1).
FIRST_ISSUE = 2

#: Registers a product crosses inside one PE: the product register (between the multiplier or
#: shifter and the partial-sum adder) and the partial-sum register.
PE_STAGES = 2


def array_latency(cfg: AccelConfig) -> int:
    """Cycles from a vector entering the systolic array until its column sums leave it (all
    columns aligned): row skew (rows - 1) + one cycle per PE across (cols - 1) + ``PE_STAGES`` in
    the last PE + de-skew, i.e. ``rows + cols - 2 + PE_STAGES``."""
    return cfg.rows + cfg.cols - 2 + PE_STAGES


def preload_busy(cfg: AccelConfig) -> int:
    """Cycles from PRELOAD issue until the loader (and the bank it fills) is free/ready.

    One wmem read per weight row, plus one cycle of read latency, plus the issue cycle.
    """
    return cfg.rows + 2


def matmul_drain(cfg: AccelConfig) -> int:
    """Cycles after a MATMUL's last vector is issued during which its weight bank is still read.

    Spad read (1) + zero-mask register (1) + row skew (rows - 1) + one PE per column (cols) + 1.
    """
    return cfg.rows + cfg.cols + 2


def matmul_latency(cfg: AccelConfig) -> int:
    """Cycles from a MATMUL's last vector address cycle until the array pipeline is empty.

    Spad read (1), mask register (1), array (:func:`array_latency`, skew included), acc read
    (1), acc write (1), plus the cycle in which an idle engine may issue; a ``block_scale``
    config adds the rescale multiply (1) and rounding shift (1).
    """
    return 4 + array_latency(cfg) + (2 if cfg.block_scale else 0)


def post_latency(cfg: AccelConfig) -> int:
    """Cycles from a POST row's acc read to its spad write: read (1), the requantization lane
    (``hw.ppu.RequantLane.LATENCY``: bias, multiply, residual add, round+shift, clamp), write (1)."""
    return 2 + RequantLane.LATENCY


def pool_latency(cfg: AccelConfig) -> int:
    """Cycles from POOL's last window read until the pool engine is idle: data (1), fold (1),
    average multiply (1), round/clamp (1), write (1)."""
    return 5


class CycleModel:
    """Event model of the RTL's issue rules: when each instruction issues and completes.

    Rules: one instruction per cycle at most, in order. PRELOAD needs the loader free and its
    bank drained of the previous MATMUL on it. MATMUL needs the matmul engine free (it may
    issue in the cycle of the previous one's last vector), its bank loaded and POST/POOL idle.
    Everything else waits for every engine to be idle.
    """

    def __init__(self, cfg: AccelConfig):
        self.cfg = cfg
        self.t = FIRST_ISSUE  # earliest issue cycle of the next instruction
        self.loader_free = 0
        self.bank_ready = [0, 0]
        self.bank_free = [0, 0]
        self.mm_free = 0
        self.pipe_idle = 0
        self.misc_free = 0

    def all_idle(self):
        return max(self.loader_free, self.mm_free, self.pipe_idle, self.misc_free,
                   *self.bank_ready)

    def step(self, ins: isa.Instr) -> tuple[int, int]:
        cfg, op, a = self.cfg, ins.op, ins.args
        if op is Opcode.NOP:
            issue = self.t
            done = issue
        elif op is Opcode.PRELOAD:
            issue = max(self.t, self.loader_free, self.bank_free[a["bank"]])
            done = issue + preload_busy(cfg)
            self.loader_free = self.bank_ready[a["bank"]] = done
        elif op is Opcode.MATMUL:
            m = a["out_h"] * a["out_w"]
            issue = max(self.t, self.mm_free, self.bank_ready[a["bank"]], self.misc_free)
            self.mm_free = issue + m
            b = a["bank"]
            self.bank_free[b] = max(self.bank_free[b], issue + m + 1 + matmul_drain(cfg))
            done = issue + m + matmul_latency(cfg)
            self.pipe_idle = max(self.pipe_idle, done)
        elif op is Opcode.POST:
            issue = max(self.t, self.all_idle())
            done = issue + a["n"] + post_latency(cfg)
            self.misc_free = done
        elif op is Opcode.POOL:
            issue = max(self.t, self.all_idle())
            done = issue + a["out_h"] * a["out_w"] * a["k_h"] * a["k_w"] + pool_latency(cfg)
            self.misc_free = done
        else:  # SYNC, HALT
            issue = max(self.t, self.all_idle())
            done = issue
        self.t = issue + 1
        return issue, done


def predict(cfg: AccelConfig, instrs) -> tuple[list[int], list[int], int]:
    """(issue cycle, completion cycle) of every instruction up to the first HALT, and the total
    cycles (HALT's issue + 1, as the RTL's cycle counter reads after the run; without a HALT, the
    last completion + 1)."""
    model = CycleModel(cfg)
    issue, done = [], []
    for ins in instrs:
        i, d = model.step(ins)
        issue.append(i)
        done.append(d)
        if ins.op is Opcode.HALT:
            return issue, done, i + 1
    return issue, done, (max(done) + 1 if done else 0)
