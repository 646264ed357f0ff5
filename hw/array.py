"""Processing elements and the weight-stationary systolic array."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .config import AccelConfig

__all__ = ["IntPE", "SystolicArray", "delay"]


def delay(m: Module, sig, n: int, name: str = "dly"):
    """``sig`` delayed by ``n`` registers (``n == 0`` returns ``sig``)."""
    for i in range(n):
        nxt = Signal(sig.shape(), name=f"{name}_{i}")
        m.d.sync += nxt.eq(sig)
        sig = nxt
    return sig


class IntPE(wiring.Component):
    """Integer weight-stationary processing element.

    Holds two weight registers (banks) so the next tile's weights load while this tile runs.
    Each cycle it passes the activation (and the bank bit travelling with it) to the right and
    adds ``weight[bank] * activation`` to the partial sum coming from above. Both outputs are
    registered, which makes every PE-to-PE path one multiply-add long at any array size.

    Ports
    -----
    a_in, a_out : signed(a_bits + 1)
        Activation, already sign- or zero-extended (so one PE serves signed and unsigned tensors).
    bank_in, bank_out : 1
        Weight bank this activation uses.
    psum_in, psum_out : signed(acc_width)
        Partial sum; wraps modulo ``2**acc_width`` exactly like the accumulator memory.
    w_data, w_we, w_bank : weight load (``w_we`` writes ``w_data`` into bank ``w_bank``).

    The ``pot`` and ``hybrid`` kinds (a later issue) keep these ports and change only the
    product term.
    """

    def __init__(self, cfg: AccelConfig):
        self._cfg = cfg
        super().__init__({
            "a_in": In(signed(cfg.act_ext_bits)), "a_out": Out(signed(cfg.act_ext_bits)),
            "bank_in": In(1), "bank_out": Out(1),
            "psum_in": In(signed(cfg.acc_width)), "psum_out": Out(signed(cfg.acc_width)),
            "w_data": In(signed(cfg.w_bits)), "w_we": In(1), "w_bank": In(1),
        })

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
        m.d.sync += [
            self.a_out.eq(self.a_in),
            self.bank_out.eq(self.bank_in),
            self.psum_out.eq(self.psum_in + weight * self.a_in),
        ]
        return m


class SystolicArray(wiring.Component):
    """``rows`` x ``cols`` weight-stationary array with input skew and output de-skew.

    Row ``r`` holds reduction index ``r``; column ``c`` output channel ``c``. A vector presented
    on ``a_vec`` in cycle ``t`` appears, summed over rows, on ``psum`` in cycle
    ``t + rows + cols - 1`` (all columns aligned). Weights are written one row per cycle with
    ``w_we``/``w_row_idx``/``w_bank``; the bank bit of each vector travels with it through the
    PEs, so a bank can be rewritten while the other one is in use.
    """

    def __init__(self, cfg: AccelConfig):
        self._cfg = cfg
        R, C = cfg.rows, cfg.cols
        super().__init__({
            "a_vec": In(data.ArrayLayout(signed(cfg.act_ext_bits), R)),
            "a_bank": In(1),
            "w_row": In(data.ArrayLayout(signed(cfg.w_bits), C)),
            "w_row_idx": In(range(R)),
            "w_we": In(1),
            "w_bank": In(1),
            "psum": Out(data.ArrayLayout(signed(cfg.acc_width), C)),
        })

    @staticmethod
    def latency(cfg: AccelConfig) -> int:
        return cfg.rows + cfg.cols - 1

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        R, C = cfg.rows, cfg.cols
        pes = [[IntPE(cfg) for _ in range(C)] for _ in range(R)]
        for r in range(R):
            for c in range(C):
                pe = pes[r][c]
                m.submodules[f"pe_{r}_{c}"] = pe
                if c == 0:
                    m.d.comb += [
                        pe.a_in.eq(delay(m, self.a_vec[r], r, f"skew_a{r}")),
                        pe.bank_in.eq(delay(m, self.a_bank, r, f"skew_b{r}")),
                    ]
                else:
                    m.d.comb += [pe.a_in.eq(pes[r][c - 1].a_out), pe.bank_in.eq(pes[r][c - 1].bank_out)]
                m.d.comb += pe.psum_in.eq(0 if r == 0 else pes[r - 1][c].psum_out)
                m.d.comb += [
                    pe.w_data.eq(self.w_row[c]),
                    pe.w_we.eq(self.w_we & (self.w_row_idx == r)),
                    pe.w_bank.eq(self.w_bank),
                ]
        for c in range(C):
            m.d.comb += self.psum[c].eq(delay(m, pes[R - 1][c].psum_out, C - 1 - c, f"deskew{c}"))
        return m
