"""ULX3S with the ECP5-85F (LFE5U-85F, 84k LUT4, 208 DP16KD block RAMs, 156 18x18 multipliers).

Default accelerator: an 8x8 array of 4-bit PEs at 50 MHz from the PLL (the 25 MHz oscillator
with ``--freq 25``); measured 50.9 MHz after place and route with MATMUL/POST overlap
(``bench/results/boards.md``), after the decode register, the PE product register and the
requantization multiply stage moved it from 34 MHz. Memory depths are
sized for the default model (``quarry_cnn``, MNIST) compiled for it: it needs
286 instructions, 866 weight rows, 12 parameter rows, 3,528 scratchpad rows and 1,288 accumulator
rows (two ping-pong regions), rounded up to powers of two below. ``python -m boards.build --pe 16x16`` builds the bigger
array (the benchmark targets 100 MHz for it).
"""

from hw.config import AccelConfig

from .platforms import Board

__all__ = ["BOARD"]

BOARD = Board(
    name="ulx3s-85f",
    family="ecp5",
    platform_module="ulx3s",
    platform_name="ULX3S_85F_Platform",
    default_model="quarry_cnn",
    config=AccelConfig(rows=8, cols=8, w_bits=4, a_bits=4, imem_depth=512, wmem_depth=1024,
                       param_depth=16, spad_depth=4096, acc_depth=2048),
    clk_hz=50_000_000,  # PLL from the 25 MHz oscillator
    pll=True,
    # LEDs 0..2 (the row next to the buttons): busy, done, error.
    leds=(("led", 0), ("led", 1), ("led", 2)),
    resources={"lut": "TRELLIS_COMB", "ff": "TRELLIS_FF", "bram": "DP16KD", "dsp": "MULT18X18D",
               "lutram": "TRELLIS_RAMW"},
    programmer="openFPGALoader",
    bitstream="bit",
    # 156 multipliers: a 16x16 array's 256 small PE multipliers go into LUTs (TOOLCHAIN.md pitfall 9).
    nodsp_above_pes=64,
    extra={"program_args": ("--board", "ulx3s")},
)
