"""A real iCEBreaker bitstream through ``python -m boards.build`` (yosys + nextpnr-ice40 + icepack,
YoWASP): about 70 s on an idle 2-core machine, several minutes under load.

The board's default accelerator (2x1 W4) with an untrained ``quarry_tiny`` compiled for it, so a
fresh clone trains nothing; the design is the same size as with trained weights."""

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.fpga

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def work():
    # Not pytest's tmp_path: YoWASP tools cannot see absolute paths under /tmp (TOOLCHAIN.md pitfall 7).
    path = ROOT / "build" / "test-boards" / uuid.uuid4().hex[:8]
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_icebreaker_default_bitstream(work):
    import torch

    from boards import tiny
    from boards.platforms import get_board
    from compiler import compile as compile_model
    from compiler import data
    from compiler.__main__ import write_outputs

    board = get_board("icebreaker")
    torch.manual_seed(0)
    prog = compile_model(tiny.TinyCNN().eval(), data.load("mnist")[0][:64], board.config, **tiny.COMPILE_OPTIONS)
    write_outputs(prog, work / "model", {"model": "untrained quarry_tiny"})
    out = work / "board"
    r = subprocess.run([sys.executable, "-m", "boards.build", "--board", "icebreaker", "--model", str(work / "model"),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["pass"] and rep["failure"] is None
    assert rep["config_hash"] == board.config.hash  # sized exactly as the board's default
    for name, res in rep["resources"].items():
        assert res["used"] <= res["available"], name
    (clock, fmax), = rep["fmax"].items()
    assert fmax["constraint_mhz"] == pytest.approx(board.clk_hz / 1e6, rel=1e-3)
    assert fmax["achieved_mhz"] >= fmax["constraint_mhz"]
    bitstream = Path(rep["bitstream"])
    assert bitstream.is_file() and bitstream.stat().st_size > 0
    assert (out / "program.qprog").is_file()
    print(f"iCEBreaker {rep['describe']}: {rep['resources']}, {fmax['achieved_mhz']} MHz, {rep['seconds']}")
