"""Processing elements and the weight-stationary systolic array."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from . import isa, timing
from .config import AccelConfig

__all__ = ["IntPE", "PotPE", "HybridPE", "PE_CLASSES", "SystolicArray", "delay", "pot_product"]


def delay(m: Module, sig, n: int, name: str = "dly"):
    """``sig`` delayed by ``n`` registers (``n == 0`` returns ``sig``)."""
    for i in range(n):
        nxt = Signal(sig.shape(), name=f"{name}_{i}")
        m.d.sync += nxt.eq(sig)
        sig = nxt
    return sig


def pot_product(cfg: AccelConfig, code, a):
    """``pot_decode(code) * a`` without a multiplier, as ``(term, carry)`` with
    ``term + carry == pot_decode(code) * a``.

    ``a`` (zeroed for the weight 0) is shifted left by ``k - 1``; a negative weight inverts the
    shifted value and returns carry 1 (two's complement negation), so the ``+ 1`` rides on the
    partial-sum adder's carry instead of needing an adder of its own. Zeroing the narrow input
    rather than the wide product, and the carry trick, were chosen by synthesis: W4A8 on
    ``synth_ice40`` 78 SB_LUT4 vs 100 for ``(zero ? 0 : sign ? -a : a) << (k - 1)`` (see
    ``bench/pe_area.py``). Only ``pot_max_exp.bit_length()`` exponent bits reach the shifter:
    codes above ``pot_max_exp`` are illegal (the golden model rejects them), so their high
    exponent bits need no hardware.
    """
    c = data.View(isa.pot_code_layout(cfg), code)
    x = Mux(c.mag == 0, 0, a)
    exp_bits = cfg.pot_max_exp.bit_length()
    shifted = x if exp_bits == 0 else x << (c.mag - 1)[:exp_bits]
    # "-0" (sign 1, k 0) needs no special case: ~0 + 1 == 0.
    return Mux(c.sign, ~shifted, shifted), c.sign


class _PE(wiring.Component):
    """Weight-stationary PE skeleton; subclasses define the product term.

    Holds two weight registers (banks) so the next tile's weights load while this tile runs.
    Each cycle it passes the activation (and the bank bit travelling with it) to the right and
    registers ``term, carry = product(weight[bank], activation)``; the next cycle it adds that
    registered ``term + carry`` to the partial sum coming from above (one adder: the 1-bit carry
    is its carry-in). All outputs are registered, so every PE-to-PE path is either the bank mux
    and one multiply (or shift) or one add, at any array size: on ECP5 the multiply sits in a
    MULT18X18D, and routing into and out of it in one cycle with the adder capped the ULX3S
    array at 49.8 MHz. The product register delays every column sum by one cycle
    (``hw.timing.PE_STAGES``); the weight is still read when the activation arrives, so bank
    reuse timing (``matmul_drain``) is unchanged.

    Ports
    -----
    a_in, a_out : signed(a_bits + 1)
        Activation, already sign- or zero-extended (so one PE serves signed and unsigned tensors).
    bank_in, bank_out : 1
        Weight bank this activation uses.
    psum_in, psum_out : signed(acc_width)
        Partial sum; wraps modulo ``2**acc_width`` exactly like the accumulator memory.
    w_data, w_we, w_bank : weight load (``w_we`` writes ``w_data`` into bank ``w_bank``).
    """

    #: The PE has ``pot_in``/``pot_out``: a per-activation mode bit that travels like ``bank``.
    HAS_MODE = False

    def __init__(self, cfg: AccelConfig):
        self._cfg = cfg
        ports = {
            "a_in": In(signed(cfg.act_ext_bits)), "a_out": Out(signed(cfg.act_ext_bits)),
            "bank_in": In(1), "bank_out": Out(1),
            "psum_in": In(signed(cfg.acc_width)), "psum_out": Out(signed(cfg.acc_width)),
            "w_data": In(signed(cfg.w_bits)), "w_we": In(1), "w_bank": In(1),
        }
        if self.HAS_MODE:
            ports.update(pot_in=In(1), pot_out=Out(1))
        super().__init__(ports)

    def product(self, weight, a):
        """``(term, carry)``: the product of ``weight`` and ``a`` is ``term + carry``."""
        raise NotImplementedError

    def elaborate(self, platform):
        m = Module()
        w0 = Signal(signed(self._cfg.w_bits))
        w1 = Signal(signed(self._cfg.w_bits))
        with m.If(self.w_we):
            with m.If(self.w_bank):
                m.d.sync += w1.eq(self.w_data)
            with m.Else():
                m.d.sync += w0.eq(self.w_data)
        weight = Mux(self.bank_in, w1, w0)
        term, carry = self.product(weight, self.a_in)
        p_term = Signal(term.shape(), name="p_term")
        m.d.sync += p_term.eq(term)
        if isinstance(carry, int):
            p_carry = carry
        else:
            p_carry = Signal(name="p_carry")
            m.d.sync += p_carry.eq(carry)
        m.d.sync += [
            self.a_out.eq(self.a_in),
            self.bank_out.eq(self.bank_in),
            self.psum_out.eq(self.psum_in + p_term + p_carry),
        ]
        if self.HAS_MODE:
            m.d.sync += self.pot_out.eq(self.pot_in)
        return m


class IntPE(_PE):
    """Integer PE: ``psum += weight * a`` with a signed ``w_bits`` weight (ports: see ``_PE``)."""

    def product(self, weight, a):
        return weight * a, 0


class PotPE(_PE):
    """Power-of-two PE: the weights are PoT codes (``hw.isa.pot_code_layout``) and the product
    is a shift (:func:`pot_product`), no multiplier. Same ports as :class:`IntPE`."""

    def product(self, weight, a):
        return pot_product(self._cfg, weight, a)


class HybridPE(_PE):
    """Int and PoT datapaths side by side, chosen per activation by ``pot_in``.

    Extra ports: ``pot_in``/``pot_out`` (1 bit), registered like ``bank``, so consecutive
    MATMULs in different modes can be in the array at the same time.
    """

    HAS_MODE = True

    def product(self, weight, a):
        term, carry = pot_product(self._cfg, weight, a)
        return Mux(self.pot_in, term, weight * a), self.pot_in & carry


#: PE class of each ``AccelConfig.pe_kind``.
PE_CLASSES = {"int": IntPE, "pot": PotPE, "hybrid": HybridPE}


class SystolicArray(wiring.Component):
    """``rows`` x ``cols`` weight-stationary array with input skew and output de-skew.

    Row ``r`` holds reduction index ``r``; column ``c`` output channel ``c``. A vector presented
    on ``a_vec`` in cycle ``t`` appears, summed over rows, on ``psum`` in cycle
    ``t + latency(cfg)`` (``hw.timing.array_latency``; all columns aligned). Weights are written one row per cycle with
    ``w_we``/``w_row_idx``/``w_bank``; the bank bit of each vector travels with it through the
    PEs, so a bank can be rewritten while the other one is in use. The PEs are
    ``PE_CLASSES[cfg.pe_kind]``; ``a_pot`` (the vector's MATMUL ``pot`` field) travels with the
    vector like ``a_bank`` in a ``hybrid`` array and is unused otherwise (the ISA fixes it).
    """

    def __init__(self, cfg: AccelConfig):
        self._cfg = cfg
        R, C = cfg.rows, cfg.cols
        super().__init__({
            "a_vec": In(data.ArrayLayout(signed(cfg.act_ext_bits), R)),
            "a_bank": In(1),
            "a_pot": In(1),
            "w_row": In(data.ArrayLayout(signed(cfg.w_bits), C)),
            "w_row_idx": In(range(R)),
            "w_we": In(1),
            "w_bank": In(1),
            "psum": Out(data.ArrayLayout(signed(cfg.acc_width), C)),
        })

    @staticmethod
    def latency(cfg: AccelConfig) -> int:
        return timing.array_latency(cfg)

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        R, C = cfg.rows, cfg.cols
        pe_cls = PE_CLASSES[cfg.pe_kind]
        pes = [[pe_cls(cfg) for _ in range(C)] for _ in range(R)]
        for r in range(R):
            for c in range(C):
                pe = pes[r][c]
                m.submodules[f"pe_{r}_{c}"] = pe
                if c == 0:
                    m.d.comb += [
                        pe.a_in.eq(delay(m, self.a_vec[r], r, f"skew_a{r}")),
                        pe.bank_in.eq(delay(m, self.a_bank, r, f"skew_b{r}")),
                    ]
                    if pe_cls.HAS_MODE:
                        m.d.comb += pe.pot_in.eq(delay(m, self.a_pot, r, f"skew_p{r}"))
                else:
                    left = pes[r][c - 1]
                    m.d.comb += [pe.a_in.eq(left.a_out), pe.bank_in.eq(left.bank_out)]
                    if pe_cls.HAS_MODE:
                        m.d.comb += pe.pot_in.eq(left.pot_out)
                m.d.comb += pe.psum_in.eq(0 if r == 0 else pes[r - 1][c].psum_out)
                m.d.comb += [
                    pe.w_data.eq(self.w_row[c]),
                    pe.w_we.eq(self.w_we & (self.w_row_idx == r)),
                    pe.w_bank.eq(self.w_bank),
                ]
        for c in range(C):
            m.d.comb += self.psum[c].eq(delay(m, pes[R - 1][c].psum_out, C - 1 - c, f"deskew{c}"))
        return m
