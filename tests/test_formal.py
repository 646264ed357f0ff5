"""Formal proofs (SymbiYosys + boolector from pip, see ``sim/formal.py``): the arithmetic units
(every PE kind at weight/activation widths 2..8, the requantization lane) equal their
specification for *every* input, not only sampled ones.

The specifications here are written independently of the RTL and of ``sim/golden.py`` (e.g.
rounding by sign and magnitude instead of the hardware's bias-and-shift), and the golden model's
functions are checked against the same definitions in ``tests/test_requant.py``.

The arithmetic proofs are k-induction (``mode prove``) or bounded from reset where noted (a
pipeline that holds nothing older than its latency is covered completely by a BMC one cycle
deeper). The requantization lane is proved whole at small accumulator widths
(:class:`PpuProof`) and in two parts at the real widths (W8A8 int: 28-bit accumulator, 24-bit
multiplier, 55-bit product; W8A8 PoT: 36 + 24, 63-bit product, the widest legal):
:class:`MulStageProof` (bias add and both multiplies, every input) and :class:`RoundClampProof`
(rounding shift, zero point, clamp, every 55/63-bit product, one job per shift value).
POST's block-floating-point stages (shared exponent, mantissa rounding and clamp, behind the
lanes' last two stages) are proved for every product, lane window and bound at small widths
(:class:`BfpPostProof`).

Controller safety and liveness (bounded model checking of the whole ``QuarryTop`` at tiny
configs, memories' ports observed from a wrapper that elaborates the top itself; the only hook in
``hw/top.py`` is ``QuarryTop.used_reads``, which drives nothing):

* :class:`AddressSafety` -- every memory write, and every read address whose data an engine uses,
  stays inside its memory (depths that are not powers of two, so it could leave them) for any
  program of well-formed instructions (:func:`well_formed`: the golden model's run-time rules)
  the host writes, any data, any start time;
* :class:`HostIsolation` -- while busy, host-port traffic (any memory, address, data, read or
  write) changes nothing the design does: a two-copy miter;
* :class:`HaltReached` -- every program of well-formed instructions with bounded work per
  instruction and a HALT among its ``imem_depth`` words stops (done) within
  :func:`halt_bound` cycles.

The long ones run under ``make formal`` (``--slow-formal``: minutes); each has a negative twin in
``make test`` (the check fails without the well-formedness assumption / with the "used" qualifier
dropped / when host inputs also differ while idle / without a HALT / against a wrong spec).
"""

from __future__ import annotations

import pytest
from amaranth.hdl import Assert, Assume, Const, Elaboratable, Module, Mux, Signal, signed, unsigned

from hw.array import PE_CLASSES, psum_width
from hw.config import AccelConfig
from hw.ppu import RequantLane, RoundClamp
from sim import formal

pytestmark = pytest.mark.skipif(formal.available() is not None, reason=str(formal.available()))


def _pipe(m: Module, sig, n: int, name: str):
    for i in range(n):
        nxt = Signal(sig.shape(), name=f"{name}{i}")
        m.d.sync += nxt.eq(sig)
        sig = nxt
    return sig


def _valid_after(m: Module, n: int) -> Signal:
    """1 from the ``n``-th cycle after reset on (the pipeline holds only real inputs by then)."""
    cnt = Signal(range(n + 1))
    with m.If(cnt != n):
        m.d.sync += cnt.eq(cnt + 1)
    return cnt == n


def round_half_away(m: Module, x, s, width: int):
    """Spec rounding: |x| / 2**s rounded half up, with the sign put back (ties away from zero)."""
    mag = Signal(unsigned(width))
    m.d.comb += mag.eq(Mux(x < 0, -x, x))
    q = Signal(unsigned(width))
    m.d.comb += q.eq(Mux(s == 0, mag, (mag + (Const(1, unsigned(width)) << (s - 1)[:len(s)])) >> s))
    out = Signal(signed(width + 1))
    m.d.comb += out.eq(Mux(x < 0, -q, q))
    return out


def _assert_zp_clamp(m, d, r, W, latency):
    """Assert ``d.y == clamp(r + d.zp, d.lo, d.hi)`` ``latency`` cycles after ``r`` (``W`` bits)."""
    z = Signal(signed(W + 2))
    m.d.comb += z.eq(r + d.zp)
    spec = Signal(signed(W + 2))
    m.d.comb += spec.eq(Mux(z < d.lo, d.lo, Mux(z > d.hi, d.hi, z)))
    expect = _pipe(m, spec, latency, "spec")
    with m.If(_valid_after(m, latency)):
        m.d.comb += Assert(d.y == expect)


class PpuProof(Elaboratable):
    """RequantLane output == clamp(zp + round(((acc + bias) * mult + res * res_mult) / 2**shift), lo, hi)
    for every acc/res stream and every constant parameter set (lo <= hi not even required)."""

    def __init__(self, cfg: AccelConfig, ties: str = "away"):
        self.cfg = cfg
        self.ties = ties
        self.dut = RequantLane(cfg)

    def elaborate(self, platform):
        m = Module()
        d = self.dut
        m.submodules.dut = d
        for p in (d.bias, d.mult, d.res_mult, d.shift, d.zp, d.lo, d.hi):
            formal.hold(m, p)
        W = self.cfg.acc_width + self.cfg.mult_bits + self.cfg.a_bits + 4 + (1 << self.cfg.shift_bits)
        x = Signal(signed(W))
        m.d.comb += x.eq((d.acc + d.bias) * d.mult + d.res * d.res_mult)
        if self.ties == "away":
            r = round_half_away(m, x, d.shift, W)
        else:  # floor(x / 2**s + 1/2)
            r = Signal(signed(W + 1))
            m.d.comb += r.eq(Mux(d.shift == 0, x, (x + (Const(1, signed(W + 1)) << (d.shift - 1)[:len(d.shift)])) >> d.shift))
        _assert_zp_clamp(m, d, r, W, RequantLane.LATENCY)
        return m

    def ports(self):
        d = self.dut
        return [d.acc, d.res, d.bias, d.mult, d.res_mult, d.shift, d.zp, d.lo, d.hi, d.y]


class PeProof(Elaboratable):
    """Any PE kind: psum_out(t + 2) == psum_in(t + 1) + value(weight[bank](t)) * a(t) (mod
    2**psum_width; ``psum_width`` None: the PE's default, acc_width), where value is
    the two's-complement weight (int, or hybrid with pot=0) or the power of two a PoT code stands
    for (pot, or hybrid with pot=1): sign bit, magnitude k, k == 0 -> 0, else (-1)**sign * 2**(k-1).
    a, bank (and pot) pass through. Loaded PoT codes are assumed legal (k <= pot_max_exp + 1):
    the golden model and the program loader reject others."""

    def __init__(self, cfg: AccelConfig, exp_offset: int = 1, psum_width: int | None = None):
        self.cfg = cfg
        self.exp_offset = exp_offset  # 1 is the spec; anything else is a wrong spec
        self.width = cfg.acc_width if psum_width is None else psum_width
        self.dut = PE_CLASSES[cfg.pe_kind](cfg, psum_width)

    def elaborate(self, platform):
        m = Module()
        cfg, d = self.cfg, self.dut
        m.submodules.dut = d
        wb = cfg.w_bits
        # Reference copies of the two weight registers, written by the same load port.
        w = [Signal(signed(wb), name=f"ref_w{i}") for i in range(2)]
        with m.If(d.w_we):
            m.d.sync += w[0].eq(Mux(d.w_bank, w[0], d.w_data)), w[1].eq(Mux(d.w_bank, d.w_data, w[1]))
        mag = d.w_data.as_unsigned()[:wb - 1]
        if cfg.pe_kind != "int":
            with m.If(d.w_we):
                m.d.comb += Assume(mag <= cfg.pot_max_exp + 1)
        code = Mux(d.bank_in, w[1], w[0])
        k, s = code.as_unsigned()[:wb - 1], code.as_unsigned()[wb - 1]
        big = cfg.pot_max_exp + 2
        pot_val = Signal(signed(big + 1))
        e = (k - self.exp_offset)[:len(k)]
        m.d.comb += pot_val.eq(Mux(k == 0, 0, Mux(s, -(Const(1, signed(big + 1)) << e), Const(1, signed(big + 1)) << e)))
        mode = {"int": Const(0), "pot": Const(1)}.get(cfg.pe_kind, d.pot_in if cfg.pe_kind == "hybrid" else None)
        value = Mux(mode, pot_val, code)
        # The product of the activation presented in cycle t meets the partial sum presented in
        # cycle t + 1 (the PE's product register, hw.timing.PE_STAGES) and leaves in t + 2.
        product = Signal(signed(big + cfg.w_bits + cfg.act_ext_bits + 2))
        m.d.comb += product.eq(value * d.a_in)
        full = Signal(signed(self.width + len(product) + 1))
        m.d.comb += full.eq(d.psum_in + _pipe(m, product, 1, "prod"))
        expect = _pipe(m, full[:self.width].as_signed(), 1, "psum")
        a, b = _pipe(m, d.a_in, 1, "a"), _pipe(m, d.bank_in, 1, "b")
        p = _pipe(m, d.pot_in, 1, "p") if cfg.pe_kind == "hybrid" else None
        with m.If(_valid_after(m, 2)):
            m.d.comb += [Assert(d.psum_out == expect), Assert(d.a_out == a), Assert(d.bank_out == b)]
            if p is not None:
                m.d.comb += Assert(d.pot_out == p)
        return m

    def ports(self):
        d = self.dut
        extra = [d.pot_in, d.pot_out] if self.cfg.pe_kind == "hybrid" else []
        return [d.a_in, d.bank_in, d.psum_in, d.w_data, d.w_we, d.w_bank, d.a_out, d.bank_out, d.psum_out, *extra]


class ArrayPsumProof(Elaboratable):
    """A whole ``SystolicArray`` (PEs built with the per-row partial-sum widths of
    :func:`hw.array.psum_width`): after a load phase (``2 * rows`` cycles in which any weights of
    either bank are written, in any order; legal PoT codes assumed as in :class:`PeProof`), every
    vector of legal activations (``a_bits`` signed or unsigned: ``-2**(a_bits-1) <= a <=
    2**a_bits - 1``), any bank and (hybrid) mode, leaves the array ``array_latency`` cycles later
    as exactly ``sum_r value(weight[bank][r][c]) * a[r]`` modulo ``2**acc_width``: no row's narrow
    partial sum wraps. BMC from reset deep enough for the first vectors after the load phase
    (each vector's result depends only on its own inputs and the then constant weights, and
    all inputs are free, so that covers every legal weight set and vector)."""

    def __init__(self, cfg: AccelConfig):
        from hw.array import SystolicArray

        self.cfg = cfg
        self.dut = SystolicArray(cfg)
        self.load = 2 * cfg.rows

    def elaborate(self, platform):
        from hw.timing import array_latency

        m = Module()
        cfg, d = self.cfg, self.dut
        m.submodules.dut = d
        R, C, wb, a = cfg.rows, cfg.cols, cfg.w_bits, cfg.a_bits
        cnt = Signal(range(self.load + 1))
        with m.If(cnt != self.load):
            m.d.sync += cnt.eq(cnt + 1)
        loaded = cnt == self.load
        m.d.comb += Assume(~(loaded & d.w_we))
        ref = [[[Signal(signed(wb), name=f"ref_w{b}_{r}_{c}") for c in range(C)] for r in range(R)] for b in range(2)]
        with m.If(d.w_we):
            for r in range(R):
                with m.If(d.w_row_idx == r):
                    for c in range(C):
                        with m.If(d.w_bank):
                            m.d.sync += ref[1][r][c].eq(d.w_row[c])
                        with m.Else():
                            m.d.sync += ref[0][r][c].eq(d.w_row[c])
                if cfg.pe_kind != "int":
                    for c in range(C):
                        m.d.comb += Assume(d.w_row[c].as_unsigned()[:wb - 1] <= cfg.pot_max_exp + 1)
        for r in range(R):
            m.d.comb += Assume((d.a_vec[r] >= -(1 << (a - 1))) & (d.a_vec[r] <= (1 << a) - 1))
        big = cfg.pot_max_exp + 2
        mode = {"int": Const(0), "pot": Const(1)}.get(cfg.pe_kind, d.a_pot)
        W = cfg.acc_width + big + wb + a + 4
        lat = array_latency(cfg)
        valid = _pipe(m, loaded, lat, "valid")
        for c in range(C):
            total = Const(0, signed(W))
            for r in range(R):
                code = Mux(d.a_bank, ref[1][r][c], ref[0][r][c])
                k, sgn = code.as_unsigned()[:wb - 1], code.as_unsigned()[wb - 1]
                one = Const(1, signed(big + 1))
                pot_val = Mux(k == 0, 0, Mux(sgn, -(one << (k - 1)[:len(k)]), one << (k - 1)[:len(k)]))
                total = total + Mux(mode, pot_val, code) * d.a_vec[r]
            s = Signal(signed(W), name=f"sum{c}")
            m.d.comb += s.eq(total)
            expect = _pipe(m, s[:cfg.acc_width].as_signed(), lat, f"expect{c}_")
            with m.If(valid):
                m.d.comb += Assert(d.psum[c] == expect)
        return m

    def ports(self):
        d = self.dut
        return [d.a_vec.as_value(), d.a_bank, d.a_pot, d.w_row.as_value(), d.w_row_idx, d.w_we, d.w_bank,
                d.psum.as_value()]


def _prove(name, proof, depth, mode="prove", script="", timeout=600):
    res = formal.check(name, proof, proof.ports(), mode=mode, depth=depth, timeout=timeout, script=script)
    print(f"formal {name}: {mode} depth {depth}: {res.status} in {res.seconds:.1f} s")
    assert res.passed, f"{name}: {res.status}\n{res.summary()}\n(job in {res.workdir})"
    return res


class RoundClampProof(Elaboratable):
    """The lane's last two stages (:class:`hw.ppu.RoundClamp`) alone: y == clamp(zp + round(prod / 2**shift),
    lo, hi) for every product of the register's full width (no multiplier in the proof, so it runs
    at the real widths) and every constant zero point / bounds. ``shift=s`` fixes the shift to
    the constant ``s`` (one job per shift value: with a free shift, two 57-bit barrel shifters in
    a miter gave no result in 10 minutes; with a constant one they are wiring)."""

    def __init__(self, cfg: AccelConfig, shift: int | None = None):
        self.cfg = cfg
        self.shift = shift
        self.dut = RoundClamp(cfg)

    def elaborate(self, platform):
        m = Module()
        d = self.dut
        m.submodules.dut = d
        if self.shift is not None:
            m.d.comb += d.shift.eq(self.shift)
        for p in (d.shift, d.zp, d.lo, d.hi):
            formal.hold(m, p)
        W = RequantLane.prod_bits(self.cfg) + 2
        r = round_half_away(m, d.prod, d.shift, W)
        _assert_zp_clamp(m, d, r, W, RoundClamp.LATENCY)
        return m

    def ports(self):
        d = self.dut
        return [d.prod, *([d.shift] if self.shift is None else []), d.zp, d.lo, d.hi, d.y]


class RoundClampEveryShift(Elaboratable):
    """:class:`RoundClampProof` for every listed constant shift in one job: one RoundClamp per shift,
    all fed the same free product, zero point and bounds."""

    def __init__(self, cfg: AccelConfig, shifts):
        self.proofs = [RoundClampProof(cfg, shift=s) for s in shifts]
        for p in self.proofs:
            p.dut.prod.name = "prod"

    def elaborate(self, platform):
        m = Module()
        first = self.proofs[0].dut
        for i, p in enumerate(self.proofs):
            m.submodules[f"s{p.shift}"] = p
            if i:
                m.d.comb += [p.dut.prod.eq(first.prod), p.dut.zp.eq(first.zp), p.dut.lo.eq(first.lo),
                             p.dut.hi.eq(first.hi)]
        return m

    def ports(self):
        d = self.proofs[0].dut
        return [d.prod, d.zp, d.lo, d.hi]


class MulStageProof(Elaboratable):
    """The lane's stages before its RoundClamp (bias add, multiplies, their sum) at the real width: the product register (the input of its
    :class:`hw.ppu.RoundClamp`) equals (acc + bias) * mult + res * res_mult exactly (computed
    here at a width where nothing can overflow), for every acc/res stream and constant bias,
    mult and res_mult; shift, zero point and bounds reach the RoundClamp unchanged and its output
    is the lane's. With :class:`RoundClampProof` this is the whole lane at the real width.
    ``signed_mult=True`` is a wrong spec (``mult`` read as two's complement): must fail."""

    def __init__(self, cfg: AccelConfig, signed_mult: bool = False):
        self.cfg = cfg
        self.signed_mult = signed_mult
        self.lane = RequantLane(cfg)
        self.mod = self.lane.elaborate(None)
        self.lane._MustUse__silence = True  # used through its Module
        self.rc = self.mod.submodules.round

    def elaborate(self, platform):
        m = Module()
        cfg, d, rc = self.cfg, self.lane, self.rc
        m.submodules.lane = self.mod
        for p in (d.bias, d.mult, d.res_mult):
            formal.hold(m, p)
        W = cfg.acc_width + cfg.mult_bits + cfg.a_bits + 6
        x = Signal(signed(W))
        mult = d.mult.as_signed() if self.signed_mult else d.mult
        m.d.comb += x.eq((d.acc + d.bias) * mult + d.res * d.res_mult)
        lat = RequantLane.LATENCY - RoundClamp.LATENCY  # stages before the RoundClamp
        expect = _pipe(m, x, lat, "prod")
        with m.If(_valid_after(m, lat)):
            m.d.comb += Assert(rc.prod == expect)
        m.d.comb += [Assert(rc.shift == d.shift), Assert(rc.zp == d.zp), Assert(rc.lo == d.lo),
                     Assert(rc.hi == d.hi), Assert(d.y == rc.y)]
        return m

    def ports(self):
        d = self.lane
        return [d.acc, d.res, d.bias, d.mult, d.res_mult, d.shift, d.zp, d.lo, d.hi, d.y]


# Small accumulators (the proof's multiplier stays small), every activation width class.
PPU_CONFIGS = [dict(w_bits=2, a_bits=2, acc_bits=8, mult_bits=8, shift_bits=4),
               dict(w_bits=2, a_bits=4, acc_bits=10, mult_bits=8, shift_bits=4)]


@pytest.mark.parametrize("kw", PPU_CONFIGS, ids=lambda kw: "a{a_bits}_acc{acc_bits}_m{mult_bits}".format(**kw))
def test_ppu_equals_spec(kw):
    cfg = AccelConfig(rows=1, cols=1, **kw)
    _prove(f"ppu_a{kw['a_bits']}_acc{kw['acc_bits']}", PpuProof(cfg), depth=RequantLane.LATENCY + 2)


# Real widths of the requantization lane: the default W8A8 int config (acc 28, mult 24: a 55-bit
# product) and the widest legal one, W8A8 PoT (acc 36 + mult 24 = 60: a 63-bit product).
REAL_PPU = {"int_w8a8": AccelConfig(rows=1, cols=1, w_bits=8, a_bits=8),
            "pot_w8a8": AccelConfig(rows=1, cols=1, w_bits=8, a_bits=8, pe_kind="pot")}
#: Shifts of the fast (``make test``) round/clamp proofs; ``make formal`` takes every shift value.
FAST_SHIFTS = (1, 29)


def _round_clamp(name: str, shift: int):
    cfg = REAL_PPU[name]
    _prove(f"rc_{name}_s{shift}", RoundClampProof(cfg, shift=shift), depth=RoundClamp.LATENCY + 2, mode="bmc")


@pytest.mark.parametrize("shift", FAST_SHIFTS)
def test_round_clamp_real_width(shift):
    """The lane's last two stages at the real width (55-bit product, W8A8 int), a few shifts. BMC
    from reset at depth 4 covers every input: the stages hold nothing older than 2 cycles."""
    _round_clamp("int_w8a8", shift)


@pytest.mark.slow_formal
@pytest.mark.parametrize("name", list(REAL_PPU))
def test_round_clamp_real_width_every_shift(name):
    """Every shift value 0..2**shift_bits - 1, one job each (~5 s each)."""
    cfg = REAL_PPU[name]
    for shift in range(1 << cfg.shift_bits):
        if name != "int_w8a8" or shift not in FAST_SHIFTS:
            _round_clamp(name, shift)


@pytest.mark.parametrize("name", list(REAL_PPU))
def test_mul_stage_real_width(name):
    """The lane's stages before the RoundClamp at the real width (every acc, bias, res, 24-bit
    mult and res_mult). BMC from reset one cycle deeper than those stages covers every input."""
    lat = RequantLane.LATENCY - RoundClamp.LATENCY
    _prove(f"mul_{name}", MulStageProof(REAL_PPU[name]), depth=lat + 2, mode="bmc")


def test_wrong_mul_spec_is_caught():
    """The real-width product check can fail: against ``mult`` read as signed."""
    p = MulStageProof(REAL_PPU["int_w8a8"], signed_mult=True)
    res = formal.check("mul_signed_mult", p, p.ports(), mode="bmc",
                       depth=RequantLane.LATENCY - RoundClamp.LATENCY + 2, timeout=600)
    assert res.status == "FAIL", res.summary()


@pytest.mark.parametrize("kind", ["int", "pot", "hybrid"])
@pytest.mark.parametrize("wa", [(2, 2), (4, 4), (8, 8), (2, 8)], ids=lambda wa: f"w{wa[0]}a{wa[1]}")
def test_pe_equals_spec(kind, wa):
    w, a = wa
    cfg = AccelConfig(rows=1, cols=1, w_bits=w, a_bits=a, pe_kind=kind)
    # k-induction cannot relate the reference weight registers to the PE's own (a state where they
    # differ is unreachable but self-consistent while the bank is idle), so this is bounded from
    # reset. Every state of the PE (both weights, the product and output registers) is reachable
    # within 4 cycles (weights written in cycles 0 and 1, used in 2, product registered in 3, sum
    # seen in 4), so depth 6 covers them all.
    _prove(f"pe_{kind}_w{w}a{a}", PeProof(cfg), depth=6, mode="bmc")


_FAST_PE = {(2, 2), (4, 4), (8, 8), (2, 8)}


@pytest.mark.parametrize("kind,w,a", [(k, 4, 4) for k in ("int", "pot", "hybrid")] + [("int", 8, 8), ("pot", 8, 8)]
                         + [pytest.param("hybrid", 8, 8, marks=pytest.mark.slow_formal)])  # ~2 min each
@pytest.mark.parametrize("terms", [1, 8])
def test_pe_narrow_psum_equals_spec(kind, w, a, terms):
    """The same proof for a PE built as the array builds row ``terms - 1`` of an 8-row array
    (``hw.array.psum_width``: row 0, the narrowest, and row 7): it adds modulo its own width."""
    cfg = AccelConfig(rows=1, cols=1, w_bits=w, a_bits=a, pe_kind=kind)
    width = psum_width(AccelConfig(rows=8, cols=8, w_bits=w, a_bits=a, pe_kind=kind), terms)
    assert width < cfg.acc_width
    _prove(f"pe_{kind}_w{w}a{a}_psum{width}", PeProof(cfg, psum_width=width), depth=6, mode="bmc")


@pytest.mark.slow_formal
@pytest.mark.parametrize("kind", ["int", "pot", "hybrid"])
@pytest.mark.parametrize("wa", [(w, a) for w in range(2, 9) for a in range(2, 9) if (w, a) not in _FAST_PE],
                         ids=lambda wa: f"w{wa[0]}a{wa[1]}")
def test_pe_equals_spec_every_width(kind, wa):
    """The same proof at every other weight/activation width pair 2..8 (make formal: ~15 min)."""
    test_pe_equals_spec(kind, wa)


def test_wrong_spec_is_caught():
    """The proof can fail: against a spec that rounds ties up (toward +inf) instead of away from
    zero, which differs only on negative ties, the prover must find a counterexample."""
    cfg = AccelConfig(rows=1, cols=1, **PPU_CONFIGS[0])
    proof = PpuProof(cfg, ties="up")
    res = formal.check("ppu_ties_up", proof, proof.ports(), mode="prove", depth=RequantLane.LATENCY + 2,
                       timeout=600)
    assert res.status == "FAIL", res.summary()


#: Array proof configs: (rows, cols, w_bits, a_bits); 4 rows reach a 3-term and a 4-term row.
_ARRAY_PSUM = [(4, 2, 3, 3)]


@pytest.mark.slow_formal
@pytest.mark.parametrize("kind", ["int"])
@pytest.mark.parametrize("shape", _ARRAY_PSUM, ids=lambda s: "r{}c{}w{}a{}".format(*s))
def test_array_narrow_psums_equal_spec(kind, shape):
    """The array with per-row partial-sum widths computes every legal vector's exact column sums
    (int: ~5-9 min; the same proof of a PoT array gave no answer in 5 minutes, so PoT and hybrid
    arrays rest on the PE proofs at their row widths plus
    ``tests/test_rtl_units.py::test_array_psum_width_is_tight``'s worst-case simulation)."""
    from hw.timing import array_latency

    rows, cols, w, a = shape
    cfg = AccelConfig(rows=rows, cols=cols, w_bits=w, a_bits=a, wmem_depth=64, pe_kind=kind)
    proof = ArrayPsumProof(cfg)
    _prove(f"array_psum_{kind}_r{rows}c{cols}w{w}a{a}", proof, depth=proof.load + array_latency(cfg) + 2, mode="bmc")


def test_array_narrower_psum_rule_is_caught(monkeypatch):
    """With a ``psum_width`` rule one bit narrower, the array proof must fail (int W3A3)."""
    import hw.array
    from hw.timing import array_latency

    rule = hw.array.psum_width
    monkeypatch.setattr(hw.array, "psum_width", lambda c, n: rule(c, n) - 1)
    cfg = AccelConfig(rows=4, cols=2, w_bits=3, a_bits=3, wmem_depth=64, pe_kind="int")
    proof = ArrayPsumProof(cfg)
    res = formal.check("array_psum_narrower", proof, proof.ports(), mode="bmc",
                       depth=proof.load + array_latency(cfg) + 2, timeout=600)
    assert res.status == "FAIL", res.summary()


def test_wrong_pot_spec_is_caught():
    """Against 2**k instead of 2**(k-1) for a PoT code, the PoT PE proof must fail."""
    cfg = AccelConfig(rows=1, cols=1, w_bits=4, a_bits=4, pe_kind="pot")
    proof = PeProof(cfg, exp_offset=0)
    res = formal.check("pe_pot_wrong_exp", proof, proof.ports(), mode="bmc", depth=6, timeout=600)
    assert res.status == "FAIL", res.summary()


# -- block floating point: POST's exponent and mantissa stages ------------------------------------

def _bitlen_spec(m: Module, v, width: int, name: str) -> Signal:
    """Spec bit length of a non-negative ``v``: the number of thresholds 2**i it reaches (by
    comparison, where the RTL priority-encodes the bits)."""
    out = Signal(range(width + 1), name=name)
    m.d.comb += out.eq(sum((v >= (1 << i)).as_unsigned() for i in range(width)))
    return out


class BfpPostProof(Elaboratable):
    """POST on a ``bfp_exp_bits`` config, from the lanes' products to what is written: the
    lanes' :class:`hw.ppu.RoundClamp` followed by ``QuarryTop._bfp_post``, for ``cols`` lanes with
    free products every cycle and constant per-lane shifts and POST fields (``src``/``nl`` any
    lane window, ``lo``/``hi`` any bounds, ``lo > hi`` included). With ``r_c = round(prod_c /
    2**shift_c)`` (ties away from zero):

    * a ``bfp`` POST (``zp = 0``, ``hi >= 1``, as :func:`hw.isa.check_bfp_post` demands) writes
      ``e = min(emax, max(0, bitlen(max t_c) - bitlen(hi)))`` over the POST's lanes, ``t_c = r_c``
      if ``r_c >= 0`` else ``-r_c - 1`` (``lo < 0``) or 0, and lanes ``clamp(round(r_c / 2**e),
      lo, hi)``;
    * a plain POST writes exponent 0 and lanes ``clamp(zp + r_c, lo, hi)``;

    where clamp tests ``lo`` first. ``magnitude="twos"`` takes ``-r_c`` for the magnitude of a
    negative lane (the negative twin: it must fail)."""

    def __init__(self, cfg: AccelConfig, magnitude: str = "ones"):
        from hw.top import QuarryTop

        self.cfg, self.magnitude, self._post = cfg, magnitude, QuarryTop._bfp_post
        self.lanes = [RoundClamp(cfg) for _ in range(cfg.cols)]
        A = cfg.a_bits
        self.po = {"src": Signal(range(cfg.cols), name="po_src"), "nl": Signal(range(cfg.cols + 1), name="po_nl"),
                   "zp": Signal(signed(A + 1), name="po_zp"), "lo": Signal(signed(A + 1), name="po_lo"),
                   "hi": Signal(signed(A + 1), name="po_hi"), "bfp": Signal(name="po_bfp")}

    def elaborate(self, platform):
        m = Module()
        cfg, po, A, emax = self.cfg, self.po, self.cfg.a_bits, self.cfg.bfp_emax
        for p in po.values():
            formal.hold(m, p)
        m.d.comb += [Assume(po["nl"] >= 1), Assume(po["src"] + po["nl"] <= cfg.cols),
                     Assume(~po["bfp"] | ((po["zp"] == 0) & (po["hi"] >= 1)))]
        for c, lane in enumerate(self.lanes):
            m.submodules[f"rc{c}"] = lane
            formal.hold(m, lane.shift)
            m.d.comb += [lane.zp.eq(po["zp"]), lane.lo.eq(po["lo"]), lane.hi.eq(po["hi"])]
        outs, exp = self._post(m, cfg, po, self.lanes)

        P = RequantLane.prod_bits(cfg) + 2
        r = [round_half_away(m, lane.prod, lane.shift, P) for lane in self.lanes]
        tmax = Signal(unsigned(P + 1), name="spec_tmax")
        terms = []
        for c, rc in enumerate(r):
            neg = -rc if self.magnitude == "twos" else -rc - 1
            t = Signal(unsigned(P + 1), name=f"spec_t{c}")
            active = (c >= po["src"]) & (c < po["src"] + po["nl"])
            m.d.comb += t.eq(Mux(~active, 0, Mux(rc >= 0, rc, Mux(po["lo"] < 0, neg, 0))))
            terms.append(t)
        best = terms[0]
        for t in terms[1:]:
            best = Mux(t > best, t, best)
        m.d.comb += tmax.eq(best)
        diff = Signal(signed(P.bit_length() + 3), name="spec_diff")
        m.d.comb += diff.eq(_bitlen_spec(m, tmax, P + 1, "spec_bl") - _bitlen_spec(m, po["hi"].as_unsigned(), A, "spec_bl_hi"))
        e = Signal(range(emax + 1), name="spec_e")
        m.d.comb += e.eq(Mux(diff < 0, 0, Mux(diff > emax, emax, diff)))
        latency = RoundClamp.LATENCY + 2  # the lanes' two stages, then exponent and mantissa
        valid = _valid_after(m, latency)
        exp_spec = _pipe(m, Mux(po["bfp"], e, 0), latency, "spec_exp")
        with m.If(valid):
            m.d.comb += Assert(exp == exp_spec)
        for c, rc in enumerate(r):
            q = round_half_away(m, rc, e, P + 1)
            z = Signal(signed(P + 3), name=f"spec_z{c}")
            m.d.comb += z.eq(Mux(po["bfp"], q, rc + po["zp"]))
            y = Signal(signed(P + 3), name=f"spec_y{c}")
            m.d.comb += y.eq(Mux(z < po["lo"], po["lo"], Mux(z > po["hi"], po["hi"], z)))
            want = _pipe(m, y[:A], latency, f"spec_y{c}_")
            active = (c >= po["src"]) & (c < po["src"] + po["nl"])
            with m.If(valid & active):
                m.d.comb += Assert(outs[c] == want)
        return m

    def ports(self):
        return [*self.po.values(), *(x for lane in self.lanes for x in (lane.prod, lane.shift))]


#: Small BFP configs (3 lanes, so the POST's lane window matters): (a_bits, exponent bits); the
#: fast ones run in ``make test`` (~15-40 s), the rest (emax 7, 4-bit lanes: minutes) in ``make formal``.
_BFP_POST_FAST = [(2, 1), (3, 2)]
_BFP_POST = _BFP_POST_FAST + [pytest.param(*v, marks=pytest.mark.slow_formal) for v in [(4, 2), (3, 3)]]


def _bfp_cfg(a_bits: int, exp_bits: int) -> AccelConfig:
    return AccelConfig(rows=1, cols=3, w_bits=2, a_bits=a_bits, acc_bits=8, mult_bits=8, shift_bits=4,
                       block_scale=True, bfp_exp_bits=exp_bits)


@pytest.mark.parametrize("a_bits,exp_bits", _BFP_POST, ids=[f"a{a}_e{e}" for a, e in [(2, 1), (3, 2), (4, 2), (3, 3)]])
def test_bfp_post_equals_spec(a_bits, exp_bits):
    """BMC from reset two cycles past the latency covers every input: the stages hold nothing older."""
    _prove(f"bfp_post_a{a_bits}_e{exp_bits}", BfpPostProof(_bfp_cfg(a_bits, exp_bits)),
           depth=RoundClamp.LATENCY + 4, mode="bmc")


def test_bfp_post_twos_complement_magnitude_is_caught():
    """The BFP check can fail: a spec taking ``-r`` (not ``-r - 1``) as a negative lane's magnitude."""
    p = BfpPostProof(_bfp_cfg(3, 2), magnitude="twos")
    res = formal.check("bfp_post_twos", p, p.ports(), mode="bmc", depth=RoundClamp.LATENCY + 4, timeout=600)
    assert res.status == "FAIL", res.summary()


# -- controller safety (bounded model checking of the whole QuarryTop) ---------------------------------

#: Tiny config with depths that are not powers of two, so an address *can* leave a memory.
CTRL_CFG = AccelConfig(rows=2, cols=2, w_bits=2, a_bits=2, spad_depth=6, acc_depth=5, wmem_depth=3,
                       imem_depth=4, param_depth=3, mult_bits=8, shift_bits=4, pool_mult_bits=4, dim_bits=4)
_MEMS = ("imem", "wmem", "spad", "acc", "param")


def _top(cfg: AccelConfig):
    """QuarryTop elaborated here, so the proof can see its memories' ports (``hw/top.py`` is not
    touched): (component, its Module, {name: Memory})."""
    from hw.top import QuarryTop

    top = QuarryTop(cfg)
    mod = top.elaborate(None)
    top._MustUse__silence = True  # used through its Module
    names = _MEMS + (("spad_exp",) if cfg.bfp_exp_bits else ())  # BFP configs' exponent memory
    return top, mod, {n: getattr(mod.submodules, n) for n in names}


def well_formed(m: Module, cfg: AccelConfig, word) -> Signal:
    """1 when the instruction ``word`` satisfies the rules the golden model enforces at run time
    (``sim/golden.py``: every row a PRELOAD/MATMUL/POST/POOL touches lies inside its memory, counts
    are non-zero, POST lanes fit the array, the PoT mode exists, a block-scale row exists); the
    field widths are the ISA's. (A window's whole ``in_h x in_w`` input must lie in spad, where the
    golden model only checks the elements a window touches: slightly stronger, never weaker.)"""
    from amaranth.lib import data

    from hw import isa
    from hw.isa import Opcode

    w = data.View(isa.instr_layout(cfg), word[:isa.instr_bits(cfg)])
    op = w.op.as_value()
    ok = Signal(name="well_formed")
    pre, mm, po, pl = w.args.preload, w.args.matmul, w.args.post, w.args.pool
    rules = {
        Opcode.NOP: Const(1), Opcode.HALT: Const(1), Opcode.SYNC: Const(1),
        Opcode.PRELOAD: (pre.n_rows <= cfg.rows) & (pre.w_addr + pre.n_rows <= cfg.wmem_depth),
        Opcode.MATMUL: ((mm.out_h != 0) & (mm.out_w != 0) & (mm.in_w != 0)
                        & (mm.acc_base + mm.out_h * mm.out_w <= cfg.acc_depth)
                        & (mm.spad_base + mm.in_h * mm.in_w <= cfg.spad_depth)
                        & ((mm.pot == 0) if cfg.pe_kind == "int" else (mm.pot == 1) if cfg.pe_kind == "pot"
                           else Const(1))
                        & ((mm.scale_addr < cfg.param_depth) if cfg.block_scale else Const(1))),
        Opcode.POST: ((po.n != 0) & (po.n_lanes != 0) & (po.src_lane + po.n_lanes <= cfg.cols)
                      & (po.dst_lane + po.n_lanes <= cfg.rows) & (po.acc_base + po.n <= cfg.acc_depth)
                      & (po.spad_base + po.n <= cfg.spad_depth) & (po.param_addr < cfg.param_depth)
                      & (~po.res_en | (po.res_base + po.n <= cfg.spad_depth))),
        Opcode.POOL: ((pl.out_h != 0) & (pl.out_w != 0) & (pl.k_h != 0) & (pl.k_w != 0) & (pl.in_w != 0)
                      & (pl.dst_base + pl.out_h * pl.out_w <= cfg.spad_depth)
                      & (pl.src_base + pl.in_h * pl.in_w <= cfg.spad_depth)),
    }
    m.d.comb += ok.eq(0)
    with m.Switch(op):
        for o, rule in rules.items():
            with m.Case(o.value):
                m.d.comb += ok.eq(rule)
    return ok


class AddressSafety(Elaboratable):
    """Every write into imem/wmem/spad/acc/param stays inside the memory, and so does every read
    address whose data an engine uses (``QuarryTop.used_reads``: wmem, spad, acc, param), for any
    program of well-formed instructions the host writes, any data, any start time (BMC from reset).

    The host is assumed to address inside the memory it writes (its own contract); every other
    write comes from the engines. ``well_formed=False`` drops the instruction assumption (the proof
    must then fail: it shows the assumption is what keeps the engines inside). ``reads="driven"``
    checks every read address an engine drives while busy, used or not (must fail: engines drive
    addresses whose data they drop, hence the "used" qualifier); ``reads=None`` checks writes only,
    ``writes=False`` reads only.
    The instruction fetch (imem reads) is not an address generator: the front end reads ahead of
    the instruction it issues; :class:`HaltReached` covers programs ending in HALT."""

    def __init__(self, cfg: AccelConfig, assume_well_formed: bool = True, reads: str | None = "used",
                 writes: bool = True):
        self.cfg = cfg
        self.assume_well_formed = assume_well_formed
        self.reads = reads
        self.writes = writes
        self.top, self.mod, self.mems = _top(cfg)

    def elaborate(self, platform):
        from hw import isa
        from hw.isa import HostMem

        m = Module()
        cfg, t = self.cfg, self.top
        m.submodules.top = self.mod
        depth = isa.host_depths(cfg)  # every memory the host port reaches (SPAD_EXP on BFP configs)
        hm = t.host_mem.as_value()
        in_range = Const(0)
        for mem, d in depth.items():
            in_range = in_range | ((hm == mem.value) & (t.host_addr < d))
        m.d.comb += Assume(~t.host_we | in_range)
        if self.assume_well_formed:
            ok = well_formed(m, cfg, t.host_wdata)
            m.d.comb += Assume(~(t.host_we & ~t.busy & (hm == HostMem.IMEM.value)) | ok)
        for name, mem in self.mems.items():
            for i, wp in enumerate(mem.write_ports if self.writes else ()):
                m.d.comb += Assert(~wp.en.any() | (wp.addr < mem.depth))
        for name, ports in t.used_reads.items():
            for used, addr in ports:
                if self.reads == "used":
                    m.d.comb += Assert(~used | (addr < self.mems[name].depth))
                elif self.reads == "driven":
                    m.d.comb += Assert(~t.busy | (addr < self.mems[name].depth))
        return m

    def ports(self):
        t = self.top
        return [t.start, t.host_mem.as_value(), t.host_addr, t.host_wdata, t.host_we, t.host_re,
                t.busy, t.done, t.cycles, t.host_rdata]


#: Power-of-two depths: every address is inside its memory, so a memory's contents are defined at
#: every address and two copies of the design can only differ through their inputs.
ISO_CFG = AccelConfig(rows=2, cols=2, w_bits=2, a_bits=2, spad_depth=8, acc_depth=4, wmem_depth=4,
                      imem_depth=4, param_depth=2, mult_bits=8, shift_bits=4, pool_mult_bits=4, dim_bits=4)


class HostIsolation(Elaboratable):
    """The host port cannot disturb a running program: two copies of QuarryTop get the same
    ``start`` and the same host-port inputs while idle, but *independent* host-port inputs (writes
    and reads to any memory, any address, any data) while busy; they must agree on busy, done and
    the cycle counter and on every memory write (enable, address, data) at every cycle. Any program
    (the host writes arbitrary imem words), BMC from reset. ``independent_while_idle=True`` is the
    negative test: host inputs that also differ while idle must show up as different writes.
    """

    def __init__(self, cfg: AccelConfig, *, independent_while_idle: bool = False):
        self.cfg = cfg
        self.independent_while_idle = independent_while_idle
        self.a, self.mod_a, self.mems_a = _top(cfg)
        self.b, self.mod_b, self.mems_b = _top(cfg)
        self.start = Signal(name="start")
        self.host = [{"mem": Signal(3, name=f"{c}_host_mem"), "addr": Signal(len(self.a.host_addr), name=f"{c}_host_addr"),
                      "wdata": Signal(len(self.a.host_wdata), name=f"{c}_host_wdata"),
                      "we": Signal(name=f"{c}_host_we"), "re": Signal(name=f"{c}_host_re")} for c in "ab"]

    def elaborate(self, platform):
        from hw import isa

        m = Module()
        m.submodules.a = self.mod_a
        m.submodules.b = self.mod_b
        for t, h in zip((self.a, self.b), self.host):
            m.d.comb += [t.start.eq(self.start), t.host_mem.eq(h["mem"]), t.host_addr.eq(h["addr"]),
                         t.host_wdata.eq(h["wdata"]), t.host_we.eq(h["we"]), t.host_re.eq(h["re"])]
            m.d.comb += Assume(h["mem"] <= max(mem.value for mem in isa.host_mems(self.cfg)))
        ha, hb = self.host
        same = Const(1)
        for k in ha:
            same = same & (ha[k] == hb[k])
        if not self.independent_while_idle:
            m.d.comb += Assume(self.a.busy | same)
        m.d.comb += [Assert(self.a.busy == self.b.busy), Assert(self.a.done == self.b.done),
                     Assert(self.a.cycles == self.b.cycles)]
        for name in self.mems_a:
            for pa, pb in zip(self.mems_a[name].write_ports, self.mems_b[name].write_ports):
                m.d.comb += Assert(pa.en == pb.en)
                with m.If(pa.en.any()):
                    m.d.comb += [Assert(pa.addr == pb.addr), Assert(pa.data == pb.data)]
        return m

    def ports(self):
        return [self.start, *[s for h in self.host for s in h.values()]]


#: BMC depths of the controller proofs (cycles from reset). Without the well-formedness assumption
#: the first out-of-memory write is found at step 8: 24 cycles cover the host loading a program,
#: start and its first instructions writing memories (depth 31 passed in ~15 min, too slow for a
#: routine target). The isolation miter is shallower (10: a
#: program written, started, and 8 busy cycles of free host traffic); at 11+ boolector does not
#: finish within 10 minutes (two copies of the datapath, multipliers included).
ADDR_DEPTH = 24
#: The read check is harder for the solver (the window address generators feed it): depth 16
#: (the host writes a program, starts it, and ~11 cycles of engine reads); depth 20 reached
#: step 17 in 30 min on a loaded machine, where writes-only depth 24 took 115 s (depth 16: 670 s).
READ_DEPTH = 16
ISO_DEPTH = 10
#: Memories as flip-flops (the configs are tiny): boolector handles them far better than arrays
#: (address proof: depth 16 took 207 s with arrays, depth 20 56 s mapped; the miter got stuck at
#: step 9 with two sets of arrays, and passes depth 10 in ~15 s CPU mapped).
MEM_SCRIPT = "memory_map; opt"


@pytest.mark.slow_formal
def test_controller_writes_stay_in_memories():
    p = AddressSafety(CTRL_CFG, reads=None)
    _prove("ctrl_addr", p, depth=ADDR_DEPTH, mode="bmc", script=MEM_SCRIPT, timeout=1800)


@pytest.mark.slow_formal
def test_controller_used_reads_stay_in_memories():
    """Read addresses whose data an engine uses (``QuarryTop.used_reads``), depth ``READ_DEPTH``."""
    p = AddressSafety(CTRL_CFG, reads="used", writes=False)
    _prove("ctrl_reads", p, depth=READ_DEPTH, mode="bmc", script=MEM_SCRIPT, timeout=3600)


def test_controller_reads_without_the_used_qualifier_are_caught():
    """The read check can fail, and "used" matters: engines drive read addresses outside the
    memories (e.g. the loader's rows past ``n_rows``) whose data they drop."""
    p = AddressSafety(CTRL_CFG, reads="driven")
    res = formal.check("ctrl_addr_driven_reads", p, p.ports(), mode="bmc", depth=10, timeout=600,
                       script=MEM_SCRIPT)
    assert res.status == "FAIL", res.summary()


def test_controller_without_well_formed_instructions_is_caught():
    """The assumption matters: with any imem word allowed, an engine writes outside a memory."""
    p = AddressSafety(CTRL_CFG, assume_well_formed=False)
    res = formal.check("ctrl_addr_any_word", p, p.ports(), mode="bmc", depth=10, timeout=600, script=MEM_SCRIPT)
    assert res.status == "FAIL", res.summary()


@pytest.mark.slow_formal
def test_host_port_cannot_disturb_a_running_program():
    p = HostIsolation(ISO_CFG)
    _prove("ctrl_host_iso", p, depth=ISO_DEPTH, mode="bmc", script=MEM_SCRIPT, timeout=1800)


def test_host_writes_while_idle_are_seen_by_the_isolation_check():
    """The miter can fail: host inputs that differ while idle reach the memories."""
    p = HostIsolation(ISO_CFG, independent_while_idle=True)
    res = formal.check("ctrl_host_iso_idle", p, p.ports(), mode="bmc", depth=4, timeout=600, script=MEM_SCRIPT)
    assert res.status == "FAIL", res.summary()


# -- HALT reachability (bounded liveness) ---------------------------------------------------------------

#: Programs of at most ``imem_depth`` = 3 words (2 instructions and a HALT), 2x2 array; with
#: ``POOL_WORK`` the largest POOL, in window reads (out_h * out_w * k_h * k_w). ``make test``.
HALT_CFG = AccelConfig(rows=2, cols=2, w_bits=2, a_bits=2, spad_depth=4, acc_depth=3, wmem_depth=2,
                       imem_depth=3, param_depth=2, mult_bits=8, shift_bits=4, pool_mult_bits=4, dim_bits=4)
POOL_WORK = 4
#: Programs of 4 words (3 instructions and a HALT), MATMULs of up to 5 vectors, POSTs of up to 5
#: rows, POOLs of up to 8 window reads (``make formal``).
HALT_CFG_4 = AccelConfig(rows=2, cols=2, w_bits=2, a_bits=2, spad_depth=6, acc_depth=5, wmem_depth=2,
                         imem_depth=4, param_depth=2, mult_bits=8, shift_bits=4, pool_mult_bits=4, dim_bits=4)
POOL_WORK_4 = 8


def small_work(m: Module, cfg: AccelConfig, word, pool_work: int) -> Signal:
    """1 unless ``word`` is a POOL reading more than ``pool_work`` window elements. (MATMUL's
    vectors and POST's rows are already bounded by ``acc_depth`` through :func:`well_formed`.)"""
    from amaranth.lib import data

    from hw import isa
    from hw.isa import Opcode

    w = data.View(isa.instr_layout(cfg), word[:isa.instr_bits(cfg)])
    pl = w.args.pool
    ok = Signal(name="small_work")
    m.d.comb += ok.eq((w.op.as_value() != Opcode.POOL.value)
                      | (pl.out_h * pl.out_w * pl.k_h * pl.k_w <= pool_work))
    return ok


def halt_bound(cfg: AccelConfig, n_words: int, pool_work: int) -> int:
    """Busy cycles within which a program of ``n_words`` words (the last a HALT) must stop, from
    the cycle model's latencies (``hw/timing.py``): the first instruction issues in cycle
    ``FIRST_ISSUE``; each later one issues at most one cycle after every earlier one completed,
    and the slowest instruction completes ``c`` cycles after it issues; HALT issues, and busy
    drops the cycle after."""
    from hw import timing

    c = max(timing.preload_busy(cfg), cfg.acc_depth + timing.matmul_latency(cfg),
            cfg.acc_depth + timing.post_latency(cfg), pool_work + timing.pool_latency(cfg))
    return timing.FIRST_ISSUE + (n_words - 1) * (c + 1) + 1


class HaltReached(Elaboratable):
    """Bounded liveness: the host writes a program of ``imem_depth`` words into imem (cycles
    0..L-1) and starts it (cycle L); every word is well-formed (:func:`well_formed`, the golden
    model's run-time rules) with small work (:func:`small_work`), and one of them is a HALT.
    Then ``busy`` lasts at most ``bound`` cycles and ends with ``done`` (HALT issued), for every
    such program (the words are free, constant inputs). Memory contents start at power-on zeros;
    no engine's control depends on memory data (addresses and counts come from the instruction
    only), so data does not change the timing. ``assume_halt=False`` drops the HALT (must fail:
    NOPs run forever)."""

    def __init__(self, cfg: AccelConfig, bound: int, pool_work: int = POOL_WORK, assume_halt: bool = True):
        from hw import isa

        self.cfg, self.bound, self.pool_work, self.assume_halt = cfg, bound, pool_work, assume_halt
        self.top, self.mod, _ = _top(cfg)
        self.words = [Signal(isa.instr_bits(cfg), name=f"prog{i}") for i in range(cfg.imem_depth)]

    def elaborate(self, platform):
        from amaranth.hdl import Array
        from amaranth.lib import data

        from hw import isa
        from hw.isa import HostMem, Opcode

        m = Module()
        cfg, t, L = self.cfg, self.top, len(self.words)
        m.submodules.top = self.mod
        has_halt = Const(0)
        for w in self.words:
            formal.hold(m, w)
            m.d.comb += Assume(well_formed(m, cfg, w) & small_work(m, cfg, w, self.pool_work))
            has_halt = has_halt | (data.View(isa.instr_layout(cfg), w[:isa.instr_bits(cfg)]).op == Opcode.HALT)
        if self.assume_halt:
            m.d.comb += Assume(has_halt)
        step = Signal(range(L + 2))
        with m.If(step != L + 1):
            m.d.sync += step.eq(step + 1)
        m.d.comb += [t.host_we.eq(step < L), t.host_mem.eq(HostMem.IMEM), t.host_addr.eq(step),
                     t.host_wdata.eq(Array(self.words)[step]), t.host_re.eq(0), t.start.eq(step == L)]
        elapsed = Signal(range(self.bound + 2))
        with m.If(t.busy & (elapsed != self.bound + 1)):
            m.d.sync += elapsed.eq(elapsed + 1)
        m.d.comb += Assert(elapsed <= self.bound)
        with m.If((step == L + 1) & ~t.busy):
            m.d.comb += Assert(t.done)
        return m

    def ports(self):
        t = self.top
        return [*self.words, t.busy, t.done, t.cycles]

    def depth(self) -> int:
        """BMC depth that reaches the bound: L writes, start, ``bound`` busy cycles and one more."""
        return len(self.words) + 1 + self.bound + 2


def test_halt_is_reached():
    """Every well-formed program of at most 3 words (2 instructions + HALT) on a 2x2 array with
    at most ``acc_depth`` = 3 MATMUL vectors / POST rows and ``POOL_WORK`` = 4 POOL window reads
    per instruction stops within :func:`halt_bound` busy cycles (27 with the 5-stage PE/PPU
    pipelines: BMC depth 33, ~15-30 s; the tightest bound that holds is 24, 23 fails)."""
    bound = halt_bound(HALT_CFG, HALT_CFG.imem_depth, POOL_WORK)
    p = HaltReached(HALT_CFG, bound)
    _prove("ctrl_halt", p, depth=p.depth(), mode="bmc", script=MEM_SCRIPT, timeout=600)


@pytest.mark.slow_formal
def test_halt_is_reached_4_words():
    """The same for programs of 4 words (3 instructions + HALT), MATMULs of up to 5 vectors,
    POSTs of up to 5 rows, POOLs of up to 8 window reads: within 45 busy cycles (depth 52, ~3 min)."""
    bound = halt_bound(HALT_CFG_4, HALT_CFG_4.imem_depth, POOL_WORK_4)
    p = HaltReached(HALT_CFG_4, bound, pool_work=POOL_WORK_4)
    _prove("ctrl_halt4", p, depth=p.depth(), mode="bmc", script=MEM_SCRIPT, timeout=3000)


def test_program_without_halt_is_caught():
    """The liveness check can fail: without the HALT assumption (e.g. three NOPs, which the front
    end fetches round and round), busy outlasts a bound of 6 cycles."""
    p = HaltReached(HALT_CFG, 6, assume_halt=False)
    res = formal.check("ctrl_halt_no_halt", p, p.ports(), mode="bmc", depth=p.depth(), timeout=600,
                       script=MEM_SCRIPT)
    assert res.status == "FAIL", res.summary()
