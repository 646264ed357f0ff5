"""Run a compiled model (``python -m compiler ... --out DIR``) on the golden model or on the
generated RTL under Verilator, over images of its data set.

``python -m sim run DIR --backend golden|verilator [--n 100] [--compare]``
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hw.isa import HostMem
from hw.program import Program, ProgramError, decode_output, output_region, quantize_input

from .golden import Machine

__all__ = ["ModelRun", "run_golden", "run_verilator", "load_model_dir", "RunError"]


class RunError(RuntimeError):
    """The model directory or the run request is unusable (one line, names the problem)."""


@dataclass
class ModelRun:
    """Per-image results of one backend."""

    backend: str
    outputs: list = field(default_factory=list)  # raw output accumulator rows per image
    logits: list = field(default_factory=list)
    predictions: list = field(default_factory=list)
    cycles: list = field(default_factory=list)
    seconds: float = 0.0
    build_seconds: float = 0.0

    def add(self, prog: Program, out, cycles: int) -> None:
        """Record one image: its raw output accumulator rows and cycle count."""
        out = np.asarray(out)
        self.outputs.append(out)
        logits = decode_output(prog, out).reshape(-1)
        self.logits.append(logits)
        self.predictions.append(int(np.argmax(logits)))
        self.cycles.append(cycles)

    def accuracy(self, labels) -> float:
        return float(np.mean(np.asarray(self.predictions) == np.asarray(labels[:len(self.predictions)])))


def load_model_dir(path) -> tuple[Program, dict]:
    path = Path(path)
    prog_path = path / "program.qprog" if path.is_dir() else path
    try:
        prog = Program.load(prog_path)
    except ProgramError as e:
        raise RunError(str(e)) from None
    report = {}
    rp = prog_path.parent / "report.json"
    if rp.exists():
        report = json.loads(rp.read_text())
    if "input" not in prog.manifest or "output" not in prog.manifest:
        raise RunError(f"{prog_path} is a program without model input/output (not compiled from a model)")
    return prog, report


def _progress(iterable, total, desc, enabled=True):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)


def run_golden(prog: Program, images, progress: bool = True) -> ModelRun:
    res = ModelRun("golden")
    t0 = time.perf_counter()
    a0, na = output_region(prog)
    for img in _progress(images, len(images), "golden", progress):
        m = Machine(prog.config)
        addr, rows = quantize_input(prog, img)
        m.spad[addr:addr + len(rows)] = rows
        r = m.run(prog)
        res.add(prog, m.acc[a0:a0 + na].copy(), r.cycles)
    res.seconds = time.perf_counter() - t0
    return res


def run_verilator(prog: Program, images, *, rom: bool = True, chunk: int = 10, progress: bool = True,
                  verilog: str | None = None, optimize: bool = True) -> ModelRun:
    """Run on the generated RTL. With ``rom`` the weights/params are baked into the Verilog (as
    ``hw.build --rom`` does) and only instructions and inputs travel over the host port.
    ``verilog`` is that Verilog text if already generated. ``optimize`` compiles the model with
    ``-O2`` (longer build, about 4x faster simulation: worth it for whole-model runs)."""
    import os

    from .verilator import Job, build, build_from_verilog

    res = ModelRun("verilator")
    t0 = time.perf_counter()
    cfg = prog.config
    wmem, param = (prog.images.get("wmem"), prog.images.get("param")) if rom else (None, None)
    old = os.environ.get("MAKEFLAGS")
    if optimize:
        # Replace whatever OPT_FAST an earlier ensure_verilator() put there (it defaults to -O0).
        words = [w for w in (old or "").split() if not w.startswith("OPT_FAST=")]
        os.environ["MAKEFLAGS"] = " ".join(words + ["OPT_FAST=-O2"])
    try:
        if verilog is not None:
            rtl = build_from_verilog(cfg, verilog, wmem_init=wmem, param_init=param)
        else:
            rtl = build(cfg, wmem_init=wmem, param_init=param)
    finally:
        if old is None:
            os.environ.pop("MAKEFLAGS", None)
        else:
            os.environ["MAKEFLAGS"] = old
    run_prog = dataclasses.replace(prog, images={}) if rom else prog
    res.build_seconds = time.perf_counter() - t0
    a0, na = output_region(prog)
    jobs = []
    for img in images:
        addr, rows = quantize_input(prog, img)
        jobs.append(Job(run_prog, [(HostMem.SPAD, addr, rows)], [(HostMem.ACC, a0, na)]))
    t1 = time.perf_counter()
    chunks = range(0, len(jobs), chunk)
    for i in _progress(chunks, len(chunks), "verilator", progress):
        # Outputs do not depend on stale memory contents (every row a layer reads was written by
        # the layer before, every acc row is overwritten first), so no isolation rewrites.
        for r in rtl.run(jobs[i:i + chunk], isolate=False):
            if r.timed_out:
                raise RunError(f"RTL timed out after {r.cycles} cycles")
            res.add(prog, r.reads[0], r.cycles)
    res.seconds = time.perf_counter() - t1
    return res


def compare_runs(a: ModelRun, b: ModelRun) -> list[str]:
    """Every image whose raw output accumulators or cycle count differ."""
    diffs = []
    for i, (x, y) in enumerate(zip(a.outputs, b.outputs)):
        if not np.array_equal(x, y):
            bad = np.argwhere(np.asarray(x) != np.asarray(y))
            r, c = bad[0]
            diffs.append(f"image {i}: output differs in {len(bad)} values (first: row {r} lane {c}: "
                         f"{a.backend} {x[r][c]}, {b.backend} {y[r][c]})")
    for i, (x, y) in enumerate(zip(a.cycles, b.cycles)):
        if x != y:
            diffs.append(f"image {i}: cycles {a.backend} {x}, {b.backend} {y}")
    return diffs
