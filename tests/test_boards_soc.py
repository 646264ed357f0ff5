"""The SoC end to end under Verilator: images go in over the simulated UART (driven by the same
``boards.link`` code as a real board), predictions come back and must equal the golden model's
for the same program, bit for bit (raw output accumulators) and cycle for cycle."""

import numpy as np
import pytest

from boards.build import board_config, compile_zoo, memory_needs
from boards.protocol import Status
from boards.simulate import build_soc, run_soc
from hw.config import AccelConfig
from sim.run import run_golden

pytestmark = pytest.mark.rtl

#: A small array keeps the simulated design (and the UART traffic per image) small.
ARRAY = dict(rows=4, cols=4, w_bits=4, a_bits=4)
IMAGES = 3


@pytest.fixture(scope="module")
def program():
    from compiler import data

    base = AccelConfig(**ARRAY)
    # Depths sized to what the default model needs, as boards.build does for a board.
    big = compile_zoo("quarry_cnn", AccelConfig(**ARRAY, spad_depth=16384, acc_depth=4096))
    prog = compile_zoo("quarry_cnn", board_config(base, memory_needs(big)))
    images = data.load("mnist")[2][:IMAGES].numpy()
    return prog, images


def test_soc_over_uart_matches_golden(program):
    prog, images = program
    gold = run_golden(prog, images, progress=False)
    sim = build_soc(prog, clocks_per_bit=4)
    res = run_soc(sim, images, poll_cycles=max(500, min(gold.cycles) // 8))
    assert res["info"]["config_hash"] == prog.config.hash
    for i in range(IMAGES):
        assert np.array_equal(res["outputs"][i], gold.outputs[i]), f"image {i}: outputs differ from golden"
    assert res["cycles"] == gold.cycles
    want = {
        "bad_checksum": Status.ERR_CHECKSUM, "unknown_command": Status.ERR_COMMAND,
        "read_out_of_range": Status.ERR_ADDRESS, "write_rom": Status.ERR_ADDRESS,
        "bad_length": Status.ERR_LENGTH, "start": Status.OK, "start_while_busy": Status.ERR_BUSY,
        "write_while_busy": Status.ERR_BUSY, "cut_short": Status.ERR_TIMEOUT, "after_errors": Status.OK,
    }
    assert res["probes"] == {k: v.name for k, v in want.items()}
    print(f"SoC {prog.config.describe()}: {IMAGES} images over UART (4 clocks/bit), "
          f"build {sim.rtl.build_seconds:.0f} s (cached: {sim.rtl.cached}), run {res['wall_seconds']:.0f} s, "
          f"program load {res['program_load_seconds']:.1f} s, {res['uart_bits']} UART bits")
