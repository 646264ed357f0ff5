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


def test_host_cli_over_a_pty_to_the_simulated_board(tmp_path):
    """``python -m boards.host`` (pyserial, INFO check, program load, images) against the
    simulated SoC in the iCEBreaker's default configuration, through a pseudo-terminal. The
    model is an untrained ``quarry_tiny`` (no training in the test): only bit-exactness matters."""
    import re
    import subprocess
    import sys

    import torch

    from boards import tiny
    from boards.platforms import get_board
    from boards.simulate import soc_on_pty
    from compiler import compile as compile_model
    from compiler import data

    board = get_board("icebreaker")
    torch.manual_seed(0)
    xtr, _, xte, _ = data.load("mnist")
    prog = compile_model(tiny.TinyCNN().eval(), xtr[:64], board.config, **tiny.COMPILE_OPTIONS)
    prog.save(tmp_path / "program.qprog")
    images = xte[:2].numpy()
    for i, img in enumerate(images):
        np.save(tmp_path / f"img{i}.npy", img)
    gold = run_golden(prog, images, progress=False)
    sim = build_soc(prog, clocks_per_bit=4)
    with soc_on_pty(sim) as port:
        r = subprocess.run([sys.executable, "-m", "boards.host", "--port", port, "--model", str(tmp_path / "program.qprog"),
                            "--image", *(str(tmp_path / f"img{i}.npy") for i in range(len(images))),
                            "--timeout", "300"], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr
    got = [(int(p), int(c)) for p, c in re.findall(r"^image \d+: prediction (\d+), (\d+) cycles", r.stdout, re.M)]
    assert got == list(zip(gold.predictions, gold.cycles)), r.stdout
