"""Processing elements and the weight-stationary systolic array."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from . import isa, timing
from .config import AccelConfig

__all__ = ["IntPE", "PotPE", "HybridPE", "PE_CLASSES", "SystolicArray", "delay", "pot_product", "pot_early", "pot_late",
           "pot_shift", "psum_width"]


def delay(m: Module, sig, n: int, name: str = "dly"):
    """``sig`` delayed by ``n`` registers (``n == 0`` returns ``sig``)."""
    for i in range(n):
        nxt = Signal(sig.shape(), name=f"{name}_{i}")
        m.d.sync += nxt.eq(sig)
        sig = nxt
    return sig


def psum_width(cfg: AccelConfig, terms: int) -> int:
    """Signed width of a partial sum of ``terms`` PE products: the psum leaving array row ``r``
    (``terms = r + 1``; row 0 adds to zero) is built this wide, and it cannot overflow.

    ``min(cfg.acc_width, cfg.product_bits + ceil(log2(terms)))``. Derivation: the PE's
    activation is an ``a_bits`` value sign- or zero-extended (:attr:`AccelConfig.act_ext_bits`),
    so ``|a| <= 2**a_bits - 1``; an int weight has ``|w| <= 2**(w_bits-1)`` and the value of a
    PoT code the shifter can form is at most ``2**pot_max_exp`` in magnitude (:func:`pot_shift`:
    only the magnitude bits a legal code needs reach the shifter, so even an illegal code
    shifts by at most ``pot_max_exp``). So every product ``p`` (of the PE's mode; a hybrid
    array's vector uses one mode, and :attr:`AccelConfig.product_bits` is the larger of both)
    has ``|p| <= 2**(P-1) - 1`` with ``P = product_bits`` (int: ``2**(w_bits-1) * (2**a_bits - 1)
    < 2**(w_bits+a_bits-1)``; PoT: ``2**pot_max_exp * (2**a_bits - 1) < 2**(a_bits+pot_max_exp)``).
    A sum of ``n <= 2**k`` of them (``k = ceil(log2(n))``) lies in
    ``[-n * 2**(P-1), n * (2**(P-1) - 1)]``, inside ``[-2**(P-1+k), 2**(P-1+k) - 1]``: ``P + k``
    signed bits. It never needs more than ``acc_width``, and when ``acc_bits`` makes
    ``acc_width`` narrower the psum wraps modulo ``2**acc_width`` as before. Either way the
    last row's psum sign-extended to ``acc_width`` is exactly the full-width sum modulo
    ``2**acc_width``, bit for bit. The bound is tight: ``n = 2**k`` products of the most
    negative int weight and ``2**a_bits - 1`` (or of ``-2**pot_max_exp`` and ``2**a_bits - 1``)
    wrap in one bit fewer (``tests/test_rtl_units.py::test_array_psum_width_is_tight``).
    """
    if terms < 1:
        raise ValueError(f"psum_width: terms must be >= 1, got {terms}")
    return min(cfg.acc_width, cfg.product_bits + (terms - 1).bit_length())


def pot_shift(cfg: AccelConfig) -> tuple[bool, int]:
    """How the PoT shifter reads a code's magnitude ``k``: ``(by_k, bits)``.

    The product ``x << (k - 1)`` is formed as ``(x << k)`` without its (zero) LSB when every
    legal ``k`` (``0 .. pot_max_exp + 1``) fits the ``bits = pot_max_exp.bit_length()`` bits
    that ``k - 1`` needs (``w_bits`` 3..5): that saves the decrement (one W4A4 PE: 54 vs 57
    LUT4 equivalents on ``synth_ecp5 -nodsp``, 56 either way on ``synth_ice40``). Otherwise (W2: no shift at all; W6..W8, where ``k`` reaches 16) it
    shifts by ``(k - 1)[:bits]``. Only those ``bits`` reach the shifter: codes above
    ``pot_max_exp + 1`` are illegal (the golden model rejects them), so their high magnitude
    bits need no hardware.
    """
    bits = cfg.pot_max_exp.bit_length()
    return bits > 0 and (cfg.pot_max_exp + 1).bit_length() == bits, bits


def pot_early(cfg: AccelConfig, code, a):
    """First half of ``pot_decode(code) * a`` (the product register's cycle):
    ``(y, late_amount, sign)`` for :func:`pot_late`.

    ``a`` is zeroed for the weight 0 (on the narrow input, not the wide product) and goes
    through all stages of the logarithmic shifter but the last; ``late_amount`` is the shift
    amount's last bit (empty without a shifter). Registering ``y`` there rather than the
    finished product, so that the last shift stage and the negation share the adder's cycle
    with one LUT level, was chosen by synthesis (``bench/pe_area.py`` flows; one W4A4 PE on
    ``synth_ecp5 -nodsp`` / ``synth_ice40``: 54 / 56 LUT4 equivalents, vs 61 / 59 with the whole
    shift before the register and 60 / 55 with all of it after; W8A8 106 / 107 vs 115 / 108).
    """
    c = data.View(isa.pot_code_layout(cfg), code)
    by_k, bits = pot_shift(cfg)
    amount = c.mag[:bits] if by_k else (c.mag - 1)[:bits]
    y = Mux(c.mag == 0, 0, a)
    for i in range(bits - 1):
        y = Mux(amount[i], y << (1 << i), y)
    return y, amount[max(bits - 1, 0):], c.sign


def pot_late(cfg: AccelConfig, y, late_amount, sign):
    """Second half of the PoT product (the adder's cycle), from :func:`pot_early`'s
    registered outputs: ``(term, carry)`` with ``term + carry == pot_decode(code) * a``.

    The last shift stage, then a negative weight inverts the shifted value and returns carry
    1 (two's complement negation), so the ``+ 1`` rides on the partial-sum adder's carry
    instead of needing an adder of its own ("-0", sign 1 and k 0, needs no special case:
    ``~0 + 1 == 0``).
    """
    by_k, bits = pot_shift(cfg)
    for j in range(len(late_amount)):
        y = Mux(late_amount[j], y << (1 << (bits - 1 + j)), y)
    if by_k:
        y = y[1:].as_signed()
    return Mux(sign, ~y, y), sign


def pot_product(cfg: AccelConfig, code, a):
    """``pot_decode(code) * a`` without a multiplier and without a register, as
    ``(term, carry)`` with ``term + carry == pot_decode(code) * a``: :func:`pot_late` of
    :func:`pot_early` (the PEs register in between)."""
    return pot_late(cfg, *pot_early(cfg, code, a))


class _PE(wiring.Component):
    """Weight-stationary PE skeleton; subclasses define the product term.

    Holds two weight registers (banks) so the next tile's weights load while this tile runs.
    Each cycle it passes the activation (and the bank bit travelling with it) to the right and
    registers :meth:`early` of ``weight[bank]`` and the activation; the next cycle :meth:`late`
    turns those registers into ``term, carry`` and it adds ``term + carry`` to the partial sum
    coming from above (one adder: the 1-bit carry is its carry-in). All outputs are registered,
    so every PE-to-PE path is either the bank mux and one multiply (or most of a shift) or at
    most one LUT level and one add, at any array size: on ECP5 the multiply sits in a
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
    psum_in, psum_out : signed(psum_width)
        Partial sum; wraps modulo ``2**psum_width``. ``psum_width`` defaults to ``acc_width``
        (wrapping exactly like the accumulator memory); :class:`SystolicArray` builds row ``r``
        with :func:`psum_width` ``(cfg, r + 1)`` bits, which cannot overflow.
    w_data, w_we, w_bank : weight load (``w_we`` writes ``w_data`` into bank ``w_bank``).
    """

    #: The PE has ``pot_in``/``pot_out``: a per-activation mode bit that travels like ``bank``.
    HAS_MODE = False

    def __init__(self, cfg: AccelConfig, psum_width: int | None = None):
        self._cfg = cfg
        pw = cfg.acc_width if psum_width is None else psum_width
        if not 1 <= pw <= cfg.acc_width:
            raise ValueError(f"PE psum_width must be 1..acc_width ({cfg.acc_width}), got {pw}")
        self.psum_width = pw
        ports = {
            "a_in": In(signed(cfg.act_ext_bits)), "a_out": Out(signed(cfg.act_ext_bits)),
            "bank_in": In(1), "bank_out": Out(1),
            "psum_in": In(signed(pw)), "psum_out": Out(signed(pw)),
            "w_data": In(signed(cfg.w_bits)), "w_we": In(1), "w_bank": In(1),
        }
        if self.HAS_MODE:
            ports.update(pot_in=In(1), pot_out=Out(1))
        super().__init__(ports)

    def early(self, weight, a) -> dict:
        """What the product register holds: name -> value, computed from ``weight`` (the
        bank's) and the activation ``a`` (and ``pot_in``) in the activation's cycle."""
        raise NotImplementedError

    def late(self, regs: dict):
        """``(term, carry)`` in the adder's cycle from the registered :meth:`early` values:
        the product of that weight and activation is ``term + carry`` (``carry``: 1 bit, the
        adder's carry-in, or the constant 0)."""
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
        regs = {}
        for name, value in self.early(weight, self.a_in).items():
            regs[name] = Signal.like(value, name=f"p_{name}")
            m.d.sync += regs[name].eq(value)
        term, carry = self.late(regs)
        m.d.sync += [
            self.a_out.eq(self.a_in),
            self.bank_out.eq(self.bank_in),
            self.psum_out.eq(self.psum_in + term + carry),
        ]
        if self.HAS_MODE:
            m.d.sync += self.pot_out.eq(self.pot_in)
        return m


class IntPE(_PE):
    """Integer PE: ``psum += weight * a`` with a signed ``w_bits`` weight (ports: see ``_PE``).
    The product register holds the whole product."""

    def early(self, weight, a):
        return {"prod": weight * a}

    def late(self, regs):
        return regs["prod"], 0


class PotPE(_PE):
    """Power-of-two PE: the weights are PoT codes (``hw.isa.pot_code_layout``) and the product
    is a shift, no multiplier: :func:`pot_early` before the product register, :func:`pot_late`
    after it. Same ports as :class:`IntPE`."""

    def early(self, weight, a):
        y, amount, sign = pot_early(self._cfg, weight, a)
        return {"y": y, "amount": amount, "sign": sign}

    def late(self, regs):
        return pot_late(self._cfg, regs["y"], regs["amount"], regs["sign"])


class HybridPE(_PE):
    """Int and PoT datapaths side by side, chosen per activation by ``pot_in``.

    Extra ports: ``pot_in``/``pot_out`` (1 bit), registered like ``bank``, so consecutive
    MATMULs in different modes can be in the array at the same time. The product register
    holds the finished product of either mode (:func:`pot_product` or the int multiply), so
    the adder's cycle is a plain add as in :class:`IntPE`. Chosen by synthesis: splitting the
    PoT shift around the register as :class:`PotPE` does, with the int product sharing the
    register or beside it, measured within a few LUTs either way (``bench/pe_area.py``: W4A8
    on ``synth_ecp5 -nodsp`` 197 or 186 LUT4 equivalents vs 189, W8A8 333 or 337 vs 344), and
    it would put a mux after the int multiplier's register.
    """

    HAS_MODE = True

    def early(self, weight, a):
        term, carry = pot_product(self._cfg, weight, a)
        return {"term": Mux(self.pot_in, term, weight * a), "carry": self.pot_in & carry}

    def late(self, regs):
        return regs["term"], regs["carry"]


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

    The partial sum leaving row ``r`` is :func:`psum_width` ``(cfg, r + 1)`` bits wide (it cannot
    overflow there), and so are the de-skew registers after the last row; ``psum`` sign-extends
    it to ``acc_width``, which gives exactly the full-width sum modulo ``2**acc_width``.
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
        pes = [[pe_cls(cfg, psum_width(cfg, r + 1)) for _ in range(C)] for r in range(R)]
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
                # Row r - 1's psum is narrower or as wide: the assignment sign-extends it.
                m.d.comb += pe.psum_in.eq(0 if r == 0 else pes[r - 1][c].psum_out)
                m.d.comb += [
                    pe.w_data.eq(self.w_row[c]),
                    pe.w_we.eq(self.w_we & (self.w_row_idx == r)),
                    pe.w_bank.eq(self.w_bank),
                ]
        for c in range(C):
            # De-skew at the last row's width; the port assignment sign-extends to acc_width.
            m.d.comb += self.psum[c].eq(delay(m, pes[R - 1][c].psum_out, C - 1 - c, f"deskew{c}"))
        return m
