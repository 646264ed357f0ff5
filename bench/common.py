"""Shared benchmark plumbing: run metadata, atomic result files, golden-model batch runs.

Every benchmark module writes ``<out>/<name>.json`` with a ``meta`` block from :func:`run_meta`
(machine, tool versions, git revision, date, wall time) next to its own ``results``, plus a PNG
and usually a Markdown table, all through :func:`write_text` / :func:`write_bytes` (temp file +
rename, so a killed run never leaves a half-written result).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["BenchError", "Context", "ROOT", "ZOO_CACHE", "QUICK_ZOO_EPOCHS", "QUICK_ZOO_THREADS", "QUICK_ZOO_CACHE",
           "tool", "run_meta", "write_text", "write_bytes", "write_json", "save_figure", "progress", "golden_logits",
           "GoldenRunner", "Checkpoint", "fingerprint"]

ROOT = Path(__file__).resolve().parent.parent


class BenchError(RuntimeError):
    """A benchmark cannot run (missing data set, bad option); the CLI prints it on one line."""


#: The zoo's cache of trained reference models (``compiler.zoo``; not committed, trained on first use).
ZOO_CACHE = ROOT / "build" / "zoo"
#: ``--quick``: zoo models are trained for this many epochs instead of the recipes' 60 (MNIST) and
#: 40 (Fashion-MNIST): real training on the real data, but seconds instead of minutes on a fresh
#: clone. They are cached apart from the reference weights (:data:`QUICK_ZOO_CACHE`), and every
#: quick result says which model it used (``meta["zoo_epochs"]``).
QUICK_ZOO_EPOCHS = {"quarry_cnn/mnist": 6, "quarry_cnn/fashion": 2,
                    # boards' 4-channel model learns slower: 45.5 % test top-1 after 6 epochs, 79.3 % after 20
                    "quarry_tiny/mnist": 20, "peer_lenet/mnist": 3}
#: ... on one thread: on a shared machine the reference recipe's two (spinning) OpenMP threads run
#: up to 8x slower than one (30 steps: 170 s wall against 21 s next to 4 other jobs on 2 cores).
QUICK_ZOO_THREADS = 1
QUICK_ZOO_CACHE = ZOO_CACHE / "quick"


@dataclass(frozen=True)
class Context:
    """What the driver hands every benchmark's ``run``.

    ``--quick`` is a smoke test: every benchmark runs its real code path (real data, real tools)
    on its smallest meaningful case. A benchmark says what that is through :meth:`pick` (its own
    quick profile), :meth:`datasets` (the first data set only) and :meth:`trained` (the zoo
    models trained for :data:`QUICK_ZOO_EPOCHS`)."""

    quick: bool = False
    #: Worker processes for golden-model runs.
    jobs: int = 1
    #: Test images per data set; ``None``: the benchmark's default for ``quick``.
    images: int | None = None
    out: Path = ROOT / "bench" / "results"
    log: Callable[[str], None] = print
    #: Per-run timeout in seconds for benchmarks that run external tools (``None``: their default).
    timeout: float | None = None
    #: Wall-time budget in seconds: benchmarks that support it start no new runs after it.
    budget: float | None = None

    def pick(self, full, quick):
        """The benchmark's ``quick`` profile value under ``--quick``, else ``full``."""
        return quick if self.quick else full

    def datasets(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """``names``, or under ``--quick`` the first one only (the others run the same code on
        other data)."""
        return tuple(names[:1]) if self.quick else tuple(names)

    def zoo_epochs(self, name: str, dataset: str) -> int | None:
        """Training epochs of the zoo model this run uses (``None``: the reference recipe)."""
        return QUICK_ZOO_EPOCHS[f"{name}/{dataset}"] if self.quick else None

    @property
    def zoo_threads(self) -> int | None:
        """Training threads of those models (``None``: the reference recipe's)."""
        return QUICK_ZOO_THREADS if self.quick else None

    @property
    def zoo_cache(self) -> Path:
        return QUICK_ZOO_CACHE if self.quick else ZOO_CACHE

    def trained(self, name: str = "quarry_cnn", dataset: str = "mnist"):
        """The zoo model this run measures: the cached reference model (trained on first use), or
        under ``--quick`` the short-trained one."""
        from compiler import zoo  # noqa: PLC0415 - heavy

        return zoo.trained(name, dataset, cache=self.zoo_cache, epochs=self.zoo_epochs(name, dataset),
                           threads=self.zoo_threads, log=self.log)

    def zoo_info(self, name: str = "quarry_cnn", dataset: str = "mnist") -> dict | None:
        """Training record of :meth:`trained`'s model."""
        from compiler import zoo  # noqa: PLC0415

        return zoo.info(name, dataset, cache=self.zoo_cache, epochs=self.zoo_epochs(name, dataset),
                        threads=self.zoo_threads)

    def zoo_glob(self, name: str = "quarry_cnn") -> tuple[Path, str]:
        """``(directory, pattern)`` of the cached weights of ``name`` (for :func:`fingerprint`)."""
        return self.zoo_cache, f"{name}-*.pt"


def tool(name: str) -> str | None:
    """Path of a command-line tool: on PATH, or next to this Python (the venv's ``bin``, which is
    not on PATH when the venv's python is run directly); None if neither."""
    found = shutil.which(name)
    if found:
        return found
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else None


# -- metadata ------------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_meta(started: float, argv: list[str] | None = None, **extra) -> dict:
    """Provenance of one benchmark run; ``started`` is its ``time.time()`` at start."""
    import torch  # noqa: PLC0415 - heavy, and only needed once

    status = _git("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        # Results of other benchmarks (and the README block they regenerate) do not make the code dirty.
        status = "\n".join(l for l in status.splitlines()
                           if l.strip() and not (l.split(None, 1)[-1].startswith("bench/results/")
                                                 or l.split(None, 1)[-1] == "README.md"))
    return {
        "date": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 1),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git": {"revision": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None},
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {name: _version(name) for name in ("torch", "numpy", "amaranth", "matplotlib", "mlxtend")},
        **extra,
    }


# -- atomic output -------------------------------------------------------------------------------

def write_bytes(path: Path, payload: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes(path, buf.getvalue())


def progress(iterable=None, **kw):
    """tqdm on stderr (a no-op wrapper if tqdm is missing)."""
    try:
        from tqdm import tqdm  # noqa: PLC0415
    except ImportError:  # pragma: no cover - tqdm is a project dependency
        return iterable
    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("leave", False)
    return tqdm(iterable, **kw)


# -- resumable runs -------------------------------------------------------------------------------

def fingerprint(payload, files=(), globs=()) -> str:
    """What a checkpoint's numbers depend on: a JSON-able ``payload`` (the grid, data sizes,
    seeds...) and the bytes of ``files`` (paths relative to the repository) and of every file
    matching ``globs`` (``(directory, pattern)`` pairs, e.g. the cached zoo weights)."""
    h = hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode())
    for f in files:
        h.update((ROOT / f).read_bytes())
    for d, pattern in globs:
        for f in sorted(Path(d).glob(pattern)):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


class Checkpoint:
    """Finished rows of a benchmark run, rewritten (atomically) after every row, so a killed run
    resumes where it stopped. Rows saved under another fingerprint are ignored.

    ``path`` is the checkpoint file, ``field`` the name of the row list in it, ``key`` maps a row
    to what identifies it."""

    def __init__(self, path: Path, fp: str, key: Callable[[dict], tuple], field: str = "rows",
                 log: Callable[[str], None] = print):
        self.path, self.fp, self.key, self.field, self.log = Path(path), fp, key, field, log

    def load(self) -> dict:
        """{key: row} of the rows already measured (empty if none or stale)."""
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if saved.get("fingerprint") != self.fp:
            return {}
        done = {self.key(r): r for r in saved.get(self.field, [])}
        self.log(f"resuming: {len(done)} {self.field} from {self.path}")
        return done

    def save(self, rows: list) -> None:
        write_json(self.path, {"fingerprint": self.fp, self.field: rows})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# -- golden-model batch runs ---------------------------------------------------------------------

def _golden_chunk(args) -> np.ndarray:
    """Worker: decoded outputs (n, outputs) of a chunk of images on :class:`sim.golden.Machine`."""
    blob, cfg_dict, images = args
    from hw.config import AccelConfig  # noqa: PLC0415 - imported in the worker process
    from hw.isa import Opcode
    from hw.program import Program, decode_output, output_region, quantize_input
    from sim.golden import Machine

    cfg = AccelConfig.from_dict(cfg_dict)
    prog = Program.from_bytes(blob, cfg)
    a0, na = output_region(prog)
    mach = Machine(cfg)
    out = []
    for i, x in enumerate(images):
        addr, rows = quantize_input(prog, x)
        if i == 0:
            mach.spad[addr:addr + len(rows)] = rows
            mach.run(prog)  # loads the memory images (and runs the cycle model once)
        else:
            # Machine.run re-unpacks the weight/param images on every call (a third of the run
            # time). The program never writes wmem or param, so reset what it does write to a
            # fresh machine's zeros and execute the same instruction stream.
            mach.spad[:] = 0
            mach.acc[:] = 0
            mach.banks[:] = 0
            mach.spad[addr:addr + len(rows)] = rows
            for ins in prog.instrs:
                mach.execute(ins)
                if ins.op is Opcode.HALT:
                    break
        out.append(decode_output(prog, mach.acc[a0:a0 + na]).reshape(-1))
    return np.stack(out)


class GoldenRunner:
    """Runs compiled programs on the golden model over a fixed image set, in ``jobs`` processes.

    The pool lives as long as the runner (use it as a context manager); each call splits the
    images into ``jobs`` contiguous chunks, so results come back in image order.
    """

    def __init__(self, images: np.ndarray, jobs: int = 1):
        self.images = np.asarray(images, dtype=np.float32)
        self.jobs = max(1, int(jobs))
        self._pool = None

    def __enter__(self):
        if self.jobs > 1:
            # fork: workers inherit the imported modules; each is single-threaded NumPy work.
            self._pool = mp.get_context("fork").Pool(self.jobs)
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def submit(self, program) -> "_Pending":
        """Start running ``program`` over the images; ``.get()`` on the result waits for the
        decoded outputs (n_images, outputs). With ``jobs > 1`` the caller can compile the next
        program meanwhile."""
        blob, cfg = program.to_bytes(), program.config.to_dict()
        chunks = np.array_split(self.images, self.jobs)
        work = [(blob, cfg, c) for c in chunks if len(c)]
        if self._pool is None:
            return _Pending(value=np.concatenate([_golden_chunk(w) for w in work]))
        return _Pending(async_result=self._pool.map_async(_golden_chunk, work))

    def logits(self, program) -> np.ndarray:
        return self.submit(program).get()


class _Pending:
    def __init__(self, value=None, async_result=None):
        self._value, self._async = value, async_result

    def get(self) -> np.ndarray:
        if self._async is not None:
            self._value, self._async = np.concatenate(self._async.get()), None
        return self._value


def golden_logits(program, images: np.ndarray, jobs: int = 1) -> np.ndarray:
    """One-off :class:`GoldenRunner` call."""
    with GoldenRunner(images, jobs) as r:
        return r.logits(program)
