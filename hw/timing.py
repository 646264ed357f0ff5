"""Pipeline timing of the generated accelerator, as functions of the config.

The RTL (``hw.top``) sizes its drain counters from these functions, and :class:`CycleModel`
uses them to predict cycles (the golden model reports them, the compiler writes per-layer
predictions into the manifest); ``tests/test_rtl_system.py`` checks the prediction against the
RTL's cycle counter. Cycle numbering: the cycle after ``start`` is 0; the first
instruction can issue in cycle 2 (one cycle of instruction-memory read latency, one in the
decode register); at most one instruction issues per cycle.
"""

from __future__ import annotations

import copy

from . import isa
from .config import AccelConfig
from .isa import Opcode
from .ppu import RequantLane

__all__ = ["FIRST_ISSUE", "PE_STAGES", "array_latency", "preload_busy", "matmul_drain", "matmul_latency", "post_latency", "post_bfp_stages", "pool_latency", "CycleModel", "predict",
           "HazardError", "overlap_hazard", "post_hazard", "matmul_spad_span", "mark_overlaps"]

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


def post_bfp_stages(cfg: AccelConfig) -> int:
    """Extra POST pipeline stages of a ``bfp_exp_bits`` config (every POST on it, ``bfp`` or not):
    (1) each lane's unclamped requantized value, saturated, and its one's-complement magnitude;
    (2) the OR of the row's magnitudes, priority-encoded into the shared exponent; (3) each lane's
    rounding shift by the exponent and the clamp. Stage (3) reuses the requantization lane's clamp
    stage, which stage (1) replaces on a BFP POST, so two stages are added; 0 without BFP."""
    return 2 if cfg.bfp_exp_bits else 0


def post_latency(cfg: AccelConfig) -> int:
    """Cycles from a POST row's acc read to its spad write: read (1), the requantization lane
    (``hw.ppu.RequantLane.LATENCY``: bias, multiply, residual add, round+shift, clamp), the BFP
    exponent stages (:func:`post_bfp_stages`), write (1). Its spad row (and, on a BFP config, its
    exponent) is written in that last cycle."""
    return 2 + RequantLane.LATENCY + post_bfp_stages(cfg)


def pool_latency(cfg: AccelConfig) -> int:
    """Cycles from POOL's last window read until the pool engine is idle: data (1), fold (1),
    average multiply (1), round/clamp (1), write (1)."""
    return 5


class HazardError(isa.IsaError):
    """A MATMUL or POST with ``overlap = 1`` conflicts with what it overlaps (see
    :func:`overlap_hazard`, :func:`post_hazard`)."""


def matmul_spad_span(a) -> tuple[int, int] | None:
    """First and last spad row a MATMUL (argument dict) reads, over the window positions inside
    the input (``None`` if every position is padding)."""
    def axis(n_out, stride, off, n_in):
        lo = max(0, -(off // stride) if off < 0 else 0)
        hi = min(n_out - 1, (n_in - 1 - off) // stride) if n_in - 1 - off >= 0 else -1
        return (lo * stride + off, hi * stride + off) if lo <= hi else None

    h = axis(a["out_h"], a["stride_h"], a["off_h"], a["in_h"])
    w = axis(a["out_w"], a["stride_w"], a["off_w"], a["in_w"])
    if h is None or w is None:
        return None
    return a["spad_base"] + h[0] * a["in_w"] + w[0], a["spad_base"] + h[1] * a["in_w"] + w[1]


def overlap_hazard(cfg: AccelConfig, post, post_issue: int, mm, mm_issue: int) -> str | None:
    """Why a MATMUL (arguments ``mm``, issuing in ``mm_issue``) may not overlap the POST
    (``post``, issued in ``post_issue``) still running, or ``None`` if it may.

    Overlapping, the two must not exchange data through memory, since the program means POST to
    finish first: the MATMUL reads no spad row POST writes (its window's row span and POST's rows
    are disjoint), and it writes every acc row that POST reads strictly after POST read it. POST
    reads acc row ``acc_base + i`` in cycle ``post_issue + 1 + i``; MATMUL writes vector ``j``'s
    row in cycle ``mm_issue + j + matmul_latency`` (address cycle ``mm_issue + 1 + j``, then the
    pipeline). Both advance one row per cycle, so one comparison covers every shared row."""
    if mm_issue >= post_issue + post["n"] + post_latency(cfg):
        return None  # POST has finished
    span = matmul_spad_span(mm)
    p0, p1 = post["spad_base"], post["spad_base"] + post["n"] - 1
    if span is not None and span[0] <= p1 and p0 <= span[1]:
        return (f"it reads spad rows {span[0]}..{span[1]}, and the POST it overlaps writes "
                f"rows {p0}..{p1}")
    m = mm["out_h"] * mm["out_w"]
    a0, a1 = max(mm["acc_base"], post["acc_base"]), min(mm["acc_base"] + m, post["acc_base"] + post["n"]) - 1
    if a0 <= a1 and mm_issue + matmul_latency(cfg) + post["acc_base"] - mm["acc_base"] <= post_issue + 1:
        return (f"it writes acc row {a0} in cycle {mm_issue + a0 - mm['acc_base'] + matmul_latency(cfg)}, "
                f"before the POST it overlaps reads it (cycle {post_issue + 1 + a0 - post['acc_base']})")
    return None


def post_hazard(cfg: AccelConfig, mm, mm_issue: int, post, post_issue: int) -> str | None:
    """Why a POST (``post``, issuing in ``post_issue``) may not overlap an earlier MATMUL (``mm``,
    issued in ``mm_issue``) still streaming or draining, or ``None`` if it may.

    The program means the MATMUL to finish first: every acc row both touch must be written by
    the MATMUL (cycle ``mm_issue + j + matmul_latency`` for vector ``j``) strictly before POST reads
    it (cycle ``post_issue + 1 + i``), and POST writes no spad row the MATMUL reads."""
    m = mm["out_h"] * mm["out_w"]
    if post_issue >= mm_issue + m + matmul_latency(cfg):
        return None  # the MATMUL has drained
    span = matmul_spad_span(mm)
    p0, p1 = post["spad_base"], post["spad_base"] + post["n"] - 1
    if span is not None and span[0] <= p1 and p0 <= span[1]:
        return (f"it writes spad rows {p0}..{p1}, and the MATMUL it overlaps reads rows "
                f"{span[0]}..{span[1]}")
    a0, a1 = max(mm["acc_base"], post["acc_base"]), min(mm["acc_base"] + m, post["acc_base"] + post["n"]) - 1
    if a0 <= a1 and post_issue + 1 - post["acc_base"] <= mm_issue + matmul_latency(cfg) - mm["acc_base"]:
        return (f"it reads acc row {a0} in cycle {post_issue + 1 + a0 - post['acc_base']}, before the "
                f"MATMUL it overlaps writes it (cycle {mm_issue + a0 - mm['acc_base'] + matmul_latency(cfg)})")
    return None


class CycleModel:
    """Event model of the RTL's issue rules: when each instruction issues and completes.

    Rules: one instruction per cycle at most, in order. PRELOAD needs the loader free and its
    bank drained of the previous MATMUL on it. MATMUL needs the matmul engine free (it may
    issue in the cycle of the previous one's last vector), its bank loaded and POST/POOL idle;
    with ``overlap = 1`` (``post_overlap`` configs) only POOL idle and a running POST past its
    spad reads (a residual POST reads spad, one row per cycle), and it must pass
    :func:`overlap_hazard` (else :class:`HazardError`). POST waits for every engine to be idle;
    with ``overlap = 1`` only for POST/POOL idle (and, residual, for the MATMUL engine's spad
    reads to end), and it must pass :func:`post_hazard` against every MATMUL still in flight.
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
        self.misc_free = 0  # POST or POOL done
        self.pool_free = 0
        self.post = None  # (issue, args) of the last POST
        self.mms = []  # (issue, args) of the MATMULs that may still be in flight

    def clone(self) -> "CycleModel":
        c = copy.copy(self)
        c.bank_ready, c.bank_free, c.mms = list(self.bank_ready), list(self.bank_free), list(self.mms)
        return c

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
            if a["overlap"]:
                wait = self.pool_free
                if self.post is not None and self.post[1]["res_en"]:
                    wait = max(wait, self.post[0] + self.post[1]["n"] + 1)
            else:
                wait = self.misc_free
            issue = max(self.t, self.mm_free, self.bank_ready[a["bank"]], wait)
            if a["overlap"] and self.post is not None:
                why = overlap_hazard(cfg, self.post[1], self.post[0], a, issue)
                if why:
                    raise HazardError(f"MATMUL with overlap = 1 issuing in cycle {issue}: {why}")
            self.mm_free = issue + m
            b = a["bank"]
            self.bank_free[b] = max(self.bank_free[b], issue + m + 1 + matmul_drain(cfg))
            done = issue + m + matmul_latency(cfg)
            self.pipe_idle = max(self.pipe_idle, done)
            self.mms = [(i, x) for i, x in self.mms if i + x["out_h"] * x["out_w"] + matmul_latency(cfg) > issue]
            self.mms.append((issue, a))
        elif op is Opcode.POST:
            if a["overlap"]:
                issue = max(self.t, self.misc_free, self.mm_free + 1 if a["res_en"] else 0)
                for mm_issue, mm in self.mms:
                    why = post_hazard(cfg, mm, mm_issue, a, issue)
                    if why:
                        raise HazardError(f"POST with overlap = 1 issuing in cycle {issue}: {why}")
            else:
                issue = max(self.t, self.all_idle())
            done = issue + a["n"] + post_latency(cfg)
            self.misc_free = done
            self.post = (issue, a)
        elif op is Opcode.POOL:
            issue = max(self.t, self.all_idle())
            done = issue + a["out_h"] * a["out_w"] * a["k_h"] * a["k_w"] + pool_latency(cfg)
            self.misc_free = self.pool_free = done
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


def mark_overlaps(cfg: AccelConfig, instrs) -> list[isa.Instr]:
    """``instrs`` with ``overlap = 1`` on every MATMUL that would otherwise wait for a running
    POST and may overlap it (:func:`overlap_hazard`), on every POST that would otherwise wait for
    MATMULs in flight and may overlap them (:func:`post_hazard`), and 0 on every other MATMUL and
    POST. On a config without ``post_overlap`` the instructions are returned unchanged. One pass
    of the cycle model; an overlap only moves an issue earlier, and each decision is taken with
    the issue cycles of everything before it final."""
    instrs = list(instrs)
    if not cfg.post_overlap:
        return instrs
    model = CycleModel(cfg)
    out = []
    for ins in instrs:
        if ins.op in (Opcode.MATMUL, Opcode.POST):
            plain = isa.Instr(ins.op, {**ins.args, "overlap": 0})
            fast = isa.Instr(ins.op, {**ins.args, "overlap": 1})
            trial = model.clone()
            try:
                early = trial.step(fast)[0] < model.clone().step(plain)[0]
            except HazardError:
                early = False
            ins = fast if early else plain
            if early:
                model = trial
                out.append(ins)
                continue
        model.step(ins)
        out.append(ins)
        if ins.op is Opcode.HALT:
            out.extend(instrs[len(out):])
            break
    return out
