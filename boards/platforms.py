"""Board descriptions shared by every board module, and the pin-level top of the SoC.

A board module (:mod:`boards.icebreaker`, :mod:`boards.ulx3s`) defines one :class:`Board`: the
amaranth-boards platform, the accelerator it carries by default (array, bit width, memory depths
that hold the default model), the clock it runs at and how LEDs are wired. :data:`BOARDS` maps
the CLI names to them.
"""

import importlib
import math
from dataclasses import dataclass, field

from amaranth.hdl import ClockDomain, ClockSignal, Elaboratable, Instance, Module, Signal
from amaranth.lib.cdc import ResetSynchronizer

from hw.config import AccelConfig

from .soc import LEDS, QuarrySoC

__all__ = ["Board", "BoardTop", "BOARDS", "get_board", "ecp5_pll_dividers", "DEPTH_FIELDS"]

#: Board modules, by CLI name.
_MODULES = {"icebreaker": "boards.icebreaker", "ulx3s-85f": "boards.ulx3s"}
BOARDS = tuple(_MODULES)
#: The memory-depth fields of :class:`~hw.config.AccelConfig`, in the order reports list them.
DEPTH_FIELDS = ("imem_depth", "wmem_depth", "param_depth", "spad_depth", "acc_depth")


@dataclass(frozen=True)
class Board:
    """One supported board.

    ``config`` is the default accelerator: its memory depths are what ``default_model`` compiled
    for it needs, rounded up to powers of two (``tests/test_boards.py`` checks that). ``clk_hz`` is
    the accelerator clock: the board oscillator where the design meets timing there, else a PLL
    output made from it (``pll``: the board wrapper can make one, ECP5 only for now).  ``resources`` maps the
    report's names (lut, ff, bram, dsp, ...) to nextpnr's cell types for this family.
    """

    name: str
    family: str                       # "ice40" or "ecp5"
    platform_name: str                # class name in amaranth_boards.<platform_module>
    platform_module: str
    #: Zoo model whose needs ``config``'s memory depths are sized to.
    default_model: str
    config: AccelConfig
    clk_hz: int
    #: A PLL can make other clocks than the oscillator's (``--freq``).
    pll: bool
    #: For each SoC LED (boards.soc.LEDS order): (resource name, number) or None (not shown).
    leds: tuple
    resources: dict
    programmer: str                   # the tool --program runs
    bitstream: str                    # file suffix of the bitstream
    synth_opts: tuple = ()
    #: Added to synth_opts when the array has more PEs than this (small multipliers in LUTs).
    nodsp_above_pes: int | None = None
    baud: int = 115200
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def platform(self):
        mod = importlib.import_module(f"amaranth_boards.{self.platform_module}")
        return getattr(mod, self.platform_name)()

    def uses_pll(self) -> bool:
        """The accelerator clock is not the oscillator's: a PLL makes it."""
        return self.clk_hz != self.platform().default_clk_frequency

    def synth_options(self, cfg: AccelConfig) -> list[str]:
        opts = list(self.synth_opts)
        if self.nodsp_above_pes is not None and cfg.pe_count > self.nodsp_above_pes:
            opts.append("-nodsp")
        return opts


def get_board(name: str) -> Board:
    if name not in _MODULES:
        raise KeyError(name)
    return importlib.import_module(_MODULES[name]).BOARD


def ecp5_pll_dividers(fin_hz: float, fout_hz: float) -> tuple[int, int, int]:
    """(CLKI_DIV, CLKFB_DIV, CLKOP_DIV) of an ECP5 EHXPLLL with CLKOP feedback making exactly
    ``fout_hz`` from ``fin_hz``; the VCO (400..800 MHz) closest to 600 MHz is preferred.

    Ref: Lattice FPGA-TN-02200 (ECP5 sysCLOCK PLL), PFD 3.125..400 MHz, VCO 400..800 MHz."""
    best = None
    for clki in range(1, 129):
        pfd = fin_hz / clki
        if not 3.125e6 <= pfd <= 400e6:
            continue
        for clkfb in range(1, 81):
            if not math.isclose(pfd * clkfb, fout_hz, rel_tol=1e-9):
                continue
            for clkop in range(1, 129):
                vco = fout_hz * clkop
                if 400e6 <= vco <= 800e6 and (best is None or abs(vco - 600e6) < best[0]):
                    best = (abs(vco - 600e6), (clki, clkfb, clkop))
    if best is None:
        raise ValueError(f"no ECP5 PLL setting makes {fout_hz / 1e6:g} MHz from {fin_hz / 1e6:g} MHz")
    return best[1]


class BoardTop(Elaboratable):
    """The SoC wired to a board's pins: clock (PLL if the board needs one), UART, LEDs."""

    def __init__(self, board: Board, soc: QuarrySoC):
        self.board = board
        self.soc = soc

    def elaborate(self, platform):
        m = Module()
        b = self.board
        if b.uses_pll():
            self._ecp5_pll(m, platform)
        # else: no "sync" domain here, so the platform makes it from its default clock (with its
        # power-on reset).
        m.submodules.soc = soc = self.soc
        uart = platform.request("uart", 0)
        m.d.comb += [soc.uart_rx.eq(uart.rx.i), uart.tx.o.eq(soc.uart_tx)]
        for bit, pin in zip(LEDS, b.leds):
            if pin is not None:
                led = platform.request(*pin)
                m.d.comb += led.o.eq(soc.leds[LEDS.index(bit)])
        return m

    def _ecp5_pll(self, m, platform):
        b = self.board
        clk_in = platform.request(platform.default_clk).i
        fin = platform.default_clk_frequency
        clki, clkfb, clkop = ecp5_pll_dividers(fin, b.clk_hz)
        m.domains.sync = cd = ClockDomain("sync")
        locked = Signal()
        m.submodules.pll = Instance(
            "EHXPLLL",
            a_FREQUENCY_PIN_CLKI=f"{fin / 1e6:g}", a_FREQUENCY_PIN_CLKOP=f"{b.clk_hz / 1e6:g}",
            a_ICP_CURRENT="12", a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1", a_MFG_GMCREF_SEL="2",
            p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
            p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA", p_OUTDIVIDER_MUXB="DIVB",
            p_OUTDIVIDER_MUXC="DIVC", p_OUTDIVIDER_MUXD="DIVD",
            p_CLKI_DIV=clki, p_CLKOP_ENABLE="ENABLED", p_CLKOP_DIV=clkop,
            p_CLKOP_CPHASE=max(0, clkop // 2 - 1), p_CLKOP_FPHASE=0,  # as Trellis' ecppll sets them
            p_FEEDBK_PATH="CLKOP", p_CLKFB_DIV=clkfb,
            i_RST=0, i_STDBY=0, i_CLKI=clk_in, o_CLKOP=ClockSignal("sync"), i_CLKFB=ClockSignal("sync"),
            i_PHASESEL0=0, i_PHASESEL1=0, i_PHASEDIR=1, i_PHASESTEP=1, i_PHASELOADREG=1,
            i_PLLWAKESYNC=0, i_ENCLKOP=0, o_LOCK=locked,
        )
        # Held in reset until the PLL locks; released synchronously.
        m.submodules.rst_sync = ResetSynchronizer(~locked, domain="sync")
        platform.add_clock_constraint(cd.clk, b.clk_hz)
