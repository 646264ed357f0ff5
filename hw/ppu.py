"""Post-processing: the per-channel requantization lane."""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .config import AccelConfig

__all__ = ["RequantLane", "RoundClamp"]


class RequantLane(wiring.Component):
    """One output channel of the post-processing unit, five pipeline stages.

    ``y = clamp(zp + round_shift((acc + bias) * mult + res * res_mult, shift), lo, hi)`` where
    ``round_shift`` rounds to nearest with ties away from zero (the rounding defined in
    ``sim/golden.py``): ``(x + 2**(shift-1) - (x < 0)) >> shift`` for ``shift > 0``.

    ``acc``/``res`` enter every cycle; ``y`` is the result for the inputs of ``LATENCY`` cycles
    earlier. On a ``bfp_exp_bits`` config the lane also has an output ``rounded``: the stage-4
    register ``round_shift(...)`` before zero point and clamp (``LATENCY - 1`` cycles after its
    inputs), which the block-floating-point POST stages in ``hw.top`` take.
    ``bias``, ``mult``, ``res_mult``, ``shift``, ``zp``, ``lo``, ``hi`` must be stable while a
    stream is in flight (they are per-instruction / per-channel constants).

    Stages: (1) bias add, (2) the two multiplies, (3) their sum (the residual add), (4) rounding
    shift, (5) zero point and clamp. The multiplies are alone in their stage: at the default
    accumulator width ``(acc + bias) * mult`` spans several ECP5 MULT18X18Ds whose partial
    products yosys adds in carry chains, and routing to the DSP column and back plus those chains
    plus the residual add in one cycle was the ULX3S 8x8's critical path (49.9 MHz at 50).
    """

    LATENCY = 5

    def __init__(self, cfg: AccelConfig):
        self._cfg = cfg
        a1 = cfg.a_bits + 1
        super().__init__({
            "acc": In(signed(cfg.acc_width)),
            "res": In(signed(a1)),
            "bias": In(signed(cfg.bias_bits)),
            "mult": In(unsigned(cfg.mult_bits)),
            "res_mult": In(unsigned(cfg.mult_bits)),
            "shift": In(unsigned(cfg.shift_bits)),
            "zp": In(signed(a1)),
            "lo": In(signed(a1)),
            "hi": In(signed(a1)),
            "y": Out(signed(a1)),
            **({"rounded": Out(signed(self.prod_bits(cfg)))} if cfg.bfp_exp_bits else {}),
        })

    @staticmethod
    def prod_bits(cfg: AccelConfig) -> int:
        """Width of the product register (the config guarantees it stays <= 63)."""
        return cfg.acc_width + cfg.mult_bits + 3

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg

        t0 = Signal(signed(cfg.acc_width + 1))
        r0 = Signal(signed(cfg.a_bits + 1))
        m.d.sync += [t0.eq(self.acc + self.bias), r0.eq(self.res)]

        p_acc = Signal(signed(cfg.acc_width + cfg.mult_bits + 1))
        p_res = Signal(signed(cfg.a_bits + cfg.mult_bits + 1))
        m.d.sync += [p_acc.eq(t0 * self.mult), p_res.eq(r0 * self.res_mult)]
        prod = Signal(signed(self.prod_bits(cfg)))
        m.d.sync += prod.eq(p_acc + p_res)

        m.submodules.round = rc = RoundClamp(cfg)
        m.d.comb += [rc.prod.eq(prod), rc.shift.eq(self.shift), rc.zp.eq(self.zp), rc.lo.eq(self.lo),
                     rc.hi.eq(self.hi), self.y.eq(rc.y)]
        if cfg.bfp_exp_bits:
            m.d.comb += self.rounded.eq(rc.rounded)
        return m


class RoundClamp(wiring.Component):
    """The last two stages of :class:`RequantLane`: ``y = clamp(zp + round_shift(prod, shift), lo, hi)``
    (its own component so a formal check can take it alone at the real width)."""

    LATENCY = 2

    def __init__(self, cfg: AccelConfig):
        self._cfg = cfg
        a1 = cfg.a_bits + 1
        super().__init__({
            "prod": In(signed(RequantLane.prod_bits(cfg))),
            "shift": In(unsigned(cfg.shift_bits)),
            "zp": In(signed(a1)),
            "lo": In(signed(a1)),
            "hi": In(signed(a1)),
            "y": Out(signed(a1)),
            **({"rounded": Out(signed(RequantLane.prod_bits(cfg)))} if cfg.bfp_exp_bits else {}),
        })

    def elaborate(self, platform):
        m = Module()
        prod_bits = RequantLane.prod_bits(self._cfg)
        prod = self.prod

        # A shift beyond prod_bits + 1 rounds every product to 0, exactly like prod_bits + 1 does,
        # so saturating it keeps the rounding constant (and this stage) prod_bits + 2 wide.
        shift = Signal(range(prod_bits + 2))
        m.d.comb += shift.eq(Mux(self.shift > prod_bits + 1, prod_bits + 1, self.shift))
        half = Signal(unsigned(prod_bits + 1))
        m.d.comb += half.eq(Mux(shift == 0, 0, (Const(1, unsigned(prod_bits + 2)) << shift) >> 1))
        neg = (prod < 0) & (shift != 0)
        rounded = Signal(signed(prod_bits))
        m.d.sync += rounded.eq((prod + half - neg) >> shift)

        z = Signal(signed(prod_bits + 1))
        m.d.comb += z.eq(rounded + self.zp)
        m.d.sync += self.y.eq(Mux(z < self.lo, self.lo, Mux(z > self.hi, self.hi, z)))
        if self._cfg.bfp_exp_bits:
            m.d.comb += self.rounded.eq(rounded)
        return m
