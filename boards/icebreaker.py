"""iCEBreaker with the iCE40 UltraPlus UP5K (5,280 logic cells, 30 4-kbit block RAMs, 8 DSPs,
four 256-kbit single-port SPRAMs), 12 MHz oscillator, FTDI UART.

What fits, measured (``bench/results/boards.md``):

* The default model (``quarry_cnn``) does not, at any array size: at 4x4 W4 the SoC needs
  11.3k logic cells, 110 block RAMs and 31 DSPs. Its memories alone (about 100 kbit of
  scratchpad, 105 kbit of instructions at 4x4) exceed the 120 kbit of block RAM, and yosys cannot
  put them in SPRAM: QuarryTop reads and writes the scratchpad and the accumulators in the same
  cycle (POST, POOL, MATMUL's read-modify-write), which a single-port SPRAM cannot do.
* Logic: QuarryTop's controller, engines and requantization lanes leave room for a 2x1 array of
  4-bit PEs next to the UART bridge, with the requantization multiplier narrowed to 12 bits
  (``mult_bits``), 5-bit tensor dimensions (``dim_bits``: up to 31x31) and an 8-bit average-pool
  multiplier. A 2x2 array needs 5.5k cells (104 %).

So the default here is 2x1 W4 running ``quarry_tiny`` (:mod:`boards.tiny`), with memory depths
sized for it: 442 instructions, 391 weight rows, 12 parameter rows, 1,372 scratchpad rows and
196 accumulator rows, rounded up to powers of two. It runs at the board's 12 MHz (no PLL).
"""

from hw.config import AccelConfig

from .platforms import Board

__all__ = ["BOARD"]

BOARD = Board(
    name="icebreaker",
    family="ice40",
    platform_module="icebreaker",
    platform_name="ICEBreakerPlatform",
    default_model="quarry_tiny",
    config=AccelConfig(rows=2, cols=1, w_bits=4, a_bits=4, mult_bits=12, dim_bits=5, pool_mult_bits=8,
                       imem_depth=512, wmem_depth=512, param_depth=16, spad_depth=2048, acc_depth=256,
                       # No MATMUL/POST overlap: its second accumulator read port and ping-pong
                       # regions cost block RAM and logic cells the UP5K does not have to spare.
                       post_overlap=False),
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
