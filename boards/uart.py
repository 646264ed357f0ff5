"""A small 8N1 UART: receiver and transmitter with a parameterised bit period.

Both work in the ``sync`` domain; ``clocks_per_bit`` is the bit period in clock cycles
(``clk_hz / baud``, rounded; at 115200 baud a 12 MHz clock gives 104, 0.2 % off, well inside
the ~2 % an 8N1 receiver tolerates). Simulation uses a small value (4 and up) to stay fast.
"""

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

__all__ = ["UARTRx", "UARTTx", "clocks_per_bit"]

#: Fewest clocks per bit the receiver handles: it needs a half-bit wait of at least one cycle
#: after the two synchroniser stages and the start-bit edge.
MIN_CLOCKS_PER_BIT = 4


def clocks_per_bit(clk_hz: float, baud: int) -> int:
    """Bit period in cycles; raises ``ValueError`` when the rounding error exceeds 1 %."""
    cpb = round(clk_hz / baud)
    if cpb < MIN_CLOCKS_PER_BIT:
        raise ValueError(f"{baud} baud needs at least {MIN_CLOCKS_PER_BIT * baud} Hz, clock is {clk_hz:.0f} Hz")
    err = abs(clk_hz / cpb - baud) / baud
    if err > 0.01:
        raise ValueError(f"{baud} baud from {clk_hz:.0f} Hz is {err:.1%} off (more than 1 %)")
    return cpb


class _UART(wiring.Component):
    """Both directions take the bit period, validated the same way."""

    def __init__(self, clocks_per_bit: int):
        if not isinstance(clocks_per_bit, int) or clocks_per_bit < MIN_CLOCKS_PER_BIT:
            raise ValueError(f"clocks_per_bit must be an integer >= {MIN_CLOCKS_PER_BIT}, not {clocks_per_bit!r}")
        self._cpb = clocks_per_bit
        super().__init__()

    @property
    def clocks_per_bit(self) -> int:
        return self._cpb


class UARTRx(_UART):
    """8N1 receiver.

    ``rx`` (in, 1) is the raw pin; it passes a two-flip-flop synchroniser (it is asynchronous to
    the clock). A falling edge starts a byte; the receiver waits half a bit, checks the start bit
    is still low (else it was a glitch), then samples each data bit and the stop bit in the middle
    of its period.

    ``data`` (out, stream of 8 bits) holds a byte until it is taken. A UART cannot be stalled: a
    byte that completes while the previous one is still waiting replaces it and pulses
    ``overrun``; a stop bit of 0 drops the byte and pulses ``framing``.
    """

    data: Out(stream.Signature(8))
    rx: In(1, init=1)
    overrun: Out(1)
    framing: Out(1)

    def elaborate(self, platform):
        m = Module()
        cpb = self._cpb
        rx = Signal(init=1)
        m.submodules.sync = FFSynchronizer(self.rx, rx, init=1)

        timer = Signal(range(cpb))
        bit = Signal(range(9))
        shreg = Signal(8)
        m.d.sync += [self.overrun.eq(0), self.framing.eq(0)]
        with m.If(self.data.valid & self.data.ready):
            m.d.sync += self.data.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~rx):
                    m.d.sync += timer.eq(cpb // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Elif(rx):
                    m.next = "IDLE"  # a glitch, not a start bit
                with m.Else():
                    m.d.sync += [timer.eq(cpb - 1), bit.eq(0)]
                    m.next = "DATA"
            with m.State("DATA"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Else():
                    # LSB first: each bit enters at the top.
                    m.d.sync += [shreg.eq(Cat(shreg[1:], rx)), bit.eq(bit + 1), timer.eq(cpb - 1)]
                    with m.If(bit == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Else():
                    with m.If(rx):
                        m.d.sync += [self.data.payload.eq(shreg), self.data.valid.eq(1),
                                     self.overrun.eq(self.data.valid & ~self.data.ready)]
                    with m.Else():
                        m.d.sync += self.framing.eq(1)
                    # Back to IDLE in the middle of the stop bit: the next start edge is caught
                    # even if the sender's clock is a little fast.
                    m.next = "IDLE"
        return m


class UARTTx(_UART):
    """8N1 transmitter. ``data`` (in, stream of 8 bits) is taken when idle; ``tx`` idles high."""

    data: In(stream.Signature(8))
    tx: Out(1, init=1)

    def elaborate(self, platform):
        m = Module()
        cpb = self._cpb
        timer = Signal(range(cpb))
        # start bit, 8 data bits, stop bit, LSB first; shifted out from bit 0.
        shreg = Signal(10, init=0x3FF)
        bits = Signal(range(11))
        m.d.comb += [self.tx.eq(shreg[0]), self.data.ready.eq(bits == 0)]
        with m.If(bits == 0):
            with m.If(self.data.valid):
                m.d.sync += [shreg.eq(Cat(0, self.data.payload, 1)), bits.eq(10), timer.eq(cpb - 1)]
        with m.Elif(timer != 0):
            m.d.sync += timer.eq(timer - 1)
        with m.Else():
            m.d.sync += [shreg.eq(Cat(shreg[1:], 1)), bits.eq(bits - 1), timer.eq(cpb - 1)]
        return m
