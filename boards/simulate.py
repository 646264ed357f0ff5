"""The SoC under Verilator: build (cached, through :mod:`sim.verilator`) and run
:mod:`boards.cocotb_soc` against it, which talks to the design over its UART pins.

::

    sim = build_soc(prog, clocks_per_bit=4)
    res = run_soc(sim, images)             # {"outputs": [...], "cycles": [...], "probes": {...}, ...}
"""

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hw.program import Program

from . import protocol as P
from .soc import QuarrySoC

__all__ = ["TOPLEVEL", "TEST_MODULE", "SocSim", "soc_verilog", "build_soc", "run_soc", "soc_on_pty", "SocSimError"]

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


def _run_test(sim: SocSim, run_dir: Path, job: dict) -> dict:
    """Run :mod:`boards.cocotb_soc` with ``job``; its results (raises :class:`SocSimError`)."""
    from cocotb_tools.check_results import get_results

    from sim.verilator import _get_runner, _repo_on_sys_path, _tail, ensure_verilator

    ensure_verilator()
    (run_dir / "job.json").write_text(json.dumps({**job, "clocks_per_bit": sim.clocks_per_bit}))
    results = run_dir / "results.json"
    env = {"QUARRY_SOC_JOB": str(run_dir / "job.json"), "QUARRY_SOC_RESULTS": str(results)}
    log = run_dir / "sim.log"
    error = None
    t0 = time.time()
    try:
        with _repo_on_sys_path():
            _get_runner().test(test_module=TEST_MODULE, hdl_toplevel=TOPLEVEL, hdl_toplevel_lang="verilog",
                               build_dir=sim.rtl.path, test_dir=run_dir, results_xml=str(run_dir / "results.xml"),
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
    return out


def _run_dir(sim: SocSim) -> Path:
    return Path(tempfile.mkdtemp(prefix=".soc-run-", dir=sim.rtl.path.parent))


def run_soc(sim: SocSim, images, *, poll_cycles: int = 2000, probes: bool = True) -> dict:
    """Run :mod:`boards.cocotb_soc` on a :func:`build_soc` build: INFO check, program load, one
    inference per image over the UART, then (``probes``) the bad-frame probes."""
    prog = sim.prog
    run_dir = _run_dir(sim)
    prog.save(run_dir / "program.qprog")
    np.save(run_dir / "images.npy", np.asarray(images, dtype=np.float32))
    out = _run_test(sim, run_dir, {
        "program": str(run_dir / "program.qprog"), "images": str(run_dir / "images.npy"),
        "poll_cycles": poll_cycles, "probes": probes,
        "rom_id": P.rom_id(prog.config, prog.images.get("wmem"), prog.images.get("param"))})
    out["outputs"] = [np.asarray(o, dtype=np.int64) for o in out["outputs"]]
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


@contextlib.contextmanager
def soc_on_pty(sim: SocSim, *, wall_limit: float = 900):
    """Serve the simulated SoC's UART on a pseudo-terminal while the block runs; yields the
    terminal's path, for ``python -m boards.host --port PATH``. Simulated time is slow: give the
    host a reply timeout of many seconds."""
    run_dir = _run_dir(sim)
    pty_file, stop_file = run_dir / "pty", run_dir / "stop"
    job = {"pty_file": str(pty_file), "stop_file": str(stop_file), "wall_limit": wall_limit}
    box = {}

    def serve():
        try:
            box["result"] = _run_test(sim, run_dir, job)
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    deadline = time.time() + 300
    while not pty_file.exists():
        if not thread.is_alive() or time.time() > deadline:
            stop_file.touch()
            thread.join()
            raise box.get("error") or SocSimError("the simulator did not open its pseudo-terminal")
        time.sleep(0.1)
    try:
        yield pty_file.read_text()
    finally:
        stop_file.touch()
        thread.join()
    if "error" in box:
        raise box["error"]
    shutil.rmtree(run_dir, ignore_errors=True)
