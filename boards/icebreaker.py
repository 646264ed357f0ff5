"""iCEBreaker with the iCE40 UltraPlus UP5K (5,280 logic cells, 30 4-kbit block RAMs, 8 DSPs,
4 256-kbit single-port SPRAMs), 12 MHz oscillator, FTDI UART.

(defaults: see BOARD)
"""

from hw.config import AccelConfig

from .platforms import Board

__all__ = ["BOARD"]

BOARD = Board(
    name="icebreaker",
    family="ice40",
    platform_module="icebreaker",
    platform_name="ICEBreakerPlatform",
    config=AccelConfig(rows=2, cols=2, w_bits=4, a_bits=4, imem_depth=256, wmem_depth=1024,
                       param_depth=16, spad_depth=4096, acc_depth=1024),
    clk_hz=12_000_000,
    pll=False,
    # Two LEDs: green (led 1) = busy, red (led 0) = error; "done" is not shown.
    leds=(("led", 1), None, ("led", 0)),
    resources={"logic_cells": "ICESTORM_LC", "lut": ("yosys:SB_LUT4", "ICESTORM_LC"),
               "ff": ("yosys:SB_DFF", "ICESTORM_LC"), "bram": "ICESTORM_RAM", "dsp": "ICESTORM_DSP",
               "spram": "ICESTORM_SPRAM"},
    programmer="iceprog",
    bitstream="bin",
    synth_opts=("-dsp",),
)
