"""The SoC under Verilator: build (cached, through :mod:`sim.verilator`) and run
:mod:`boards.cocotb_soc` against it, which talks to the design over its UART pins.

::

    sim = build_soc(prog, clocks_per_bit=4)
    res = run_soc(sim, images)             # {"outputs": [...], "cycles": [...], "probes": {...}, ...}
"""

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hw.program import Program

from . import protocol as P
from .soc import QuarrySoC

__all__ = ["TOPLEVEL", "TEST_MODULE", "SocSim", "soc_verilog", "build_soc", "run_soc", "SocSimError"]

TOPLEVEL = "quarry_soc"
TEST_MODULE = "boards.cocotb_soc"
#: Nominal clock the simulated SoC reports in INFO (the simulation has no real time).
SIM_CLK_HZ = 1_000_000


class SocSimError(RuntimeError):
    """The simulator failed or returned no results (the message holds the log tail)."""


@dataclass(frozen=True)
class SocSim:
    """A finished Verilator build of the SoC for one program."""

    prog: Program
    rtl: object  # sim.verilator.RtlSim: path, cached, build_seconds
    clocks_per_bit: int


def soc(prog: Program, *, clocks_per_bit: int, timeout_cycles: int | None = None) -> QuarrySoC:
    return QuarrySoC(prog.config, wmem_init=prog.images.get("wmem"), param_init=prog.images.get("param"),
                     clk_hz=SIM_CLK_HZ, clocks_per_bit=clocks_per_bit, timeout_cycles=timeout_cycles)


def soc_verilog(prog: Program, *, clocks_per_bit: int, timeout_cycles: int | None = None) -> str:
    from amaranth.back import verilog

    return verilog.convert(soc(prog, clocks_per_bit=clocks_per_bit, timeout_cycles=timeout_cycles),
                           name=TOPLEVEL, emit_src=False)


def build_soc(prog: Program, *, clocks_per_bit: int = 4, timeout_cycles: int | None = None,
              optimize: bool = True) -> SocSim:
    """Verilate the SoC for ``prog`` (its weights in ROM); cached by the Verilog text.

    ``timeout_cycles`` defaults to 100 byte times (the simulated host never pauses mid-frame).
    ``optimize`` compiles with ``-O2`` (as :func:`sim.run.run_verilator` does for whole models):
    most simulated cycles are UART bits."""
    from sim.verilator import build_from_verilog

    if timeout_cycles is None:
        timeout_cycles = 100 * 10 * clocks_per_bit
    t0 = time.perf_counter()
    text = soc_verilog(prog, clocks_per_bit=clocks_per_bit, timeout_cycles=timeout_cycles)
    old = os.environ.get("MAKEFLAGS")
    if optimize:
        words = [w for w in (old or "").split() if not w.startswith("OPT_FAST=")]
        os.environ["MAKEFLAGS"] = " ".join(words + ["OPT_FAST=-O2"])
    try:
        rtl = build_from_verilog(prog.config, text, toplevel=TOPLEVEL, verilog_seconds=time.perf_counter() - t0)
    finally:
        if old is None:
            os.environ.pop("MAKEFLAGS", None)
        else:
            os.environ["MAKEFLAGS"] = old
    return SocSim(prog, rtl, clocks_per_bit)


def run_soc(sim: SocSim, images, *, poll_cycles: int = 2000, probes: bool = True) -> dict:
    """Run :mod:`boards.cocotb_soc` on a :func:`build_soc` build: INFO check, program load, one
    inference per image over the UART, then (``probes``) the bad-frame probes."""
    from cocotb_tools.check_results import get_results

    from sim.verilator import _get_runner, _repo_on_sys_path, _tail, ensure_verilator

    ensure_verilator()
    prog, rtl = sim.prog, sim.rtl
    run_dir = Path(tempfile.mkdtemp(prefix=".soc-run-", dir=rtl.path.parent))
    prog.save(run_dir / "program.qprog")
    np.save(run_dir / "images.npy", np.asarray(images, dtype=np.float32))
    job = {"program": str(run_dir / "program.qprog"), "images": str(run_dir / "images.npy"),
           "clocks_per_bit": sim.clocks_per_bit, "poll_cycles": poll_cycles, "probes": probes,
           "rom_id": P.rom_id(prog.config, prog.images.get("wmem"), prog.images.get("param"))}
    (run_dir / "job.json").write_text(json.dumps(job))
    results = run_dir / "results.json"
    env = {"QUARRY_SOC_JOB": str(run_dir / "job.json"), "QUARRY_SOC_RESULTS": str(results)}
    log = run_dir / "sim.log"
    error = None
    t0 = time.time()
    try:
        with _repo_on_sys_path():
            _get_runner().test(test_module=TEST_MODULE, hdl_toplevel=TOPLEVEL, hdl_toplevel_lang="verilog",
                               build_dir=rtl.path, test_dir=run_dir, results_xml=str(run_dir / "results.xml"),
                               extra_env=env, log_file=log)
    except (Exception, SystemExit) as e:  # the runner sys.exit()s on failure under pytest
        error = f"{type(e).__name__}: {e}"
    try:
        n_tests, n_failed = get_results(run_dir / "results.xml")
    except RuntimeError:
        n_tests, n_failed = 0, 1
    if n_tests != 1 or n_failed or not results.exists():
        raise SocSimError(f"SoC simulation failed ({error or f'{n_failed} of {n_tests} tests failed'}); "
                          f"run directory kept: {run_dir}\n{_tail(log)}")
    out = json.loads(results.read_text())
    out["wall_seconds"] = time.time() - t0
    out["outputs"] = [np.asarray(o, dtype=np.int64) for o in out["outputs"]]
    shutil.rmtree(run_dir, ignore_errors=True)
    return out
