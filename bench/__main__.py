"""``python -m bench [--only NAME[,NAME...]] [--quick] [--jobs N] [--images N] [--out DIR] [--report-only] [--readme FILE] [--timeout S] [--budget S]``

Runs Quarry's benchmarks. Each benchmark is a module ``bench.<name>`` listed in
:data:`BENCHMARKS` that defines

* ``DESCRIPTION`` — one line for ``--list``;
* ``run(ctx: bench.common.Context) -> dict`` — measures and returns JSON-able results;
* ``plot(results: dict, path: Path)`` — writes the PNG;
* ``markdown(results: dict, meta: dict) -> str`` — a Markdown report (optional);
* ``summary(results: dict, meta: dict) -> str`` — its headline figures for README.md (optional).

and this driver writes ``<out>/<name>.json`` (``{"meta": ..., "results": ...}``), ``<name>.png``
and ``<name>.md``, each atomically, then regenerates the results block of README.md from every
``<out>/*.json`` (:mod:`bench.readme`; only when ``<out>`` is bench/results or ``--readme`` names
the file). Adding a benchmark = adding a module and its name here.

``--quick`` is a smoke test (every benchmark's real code path on its smallest case, zoo models
trained for a few epochs, see :class:`bench.common.Context`). Its results go to :data:`QUICK_OUT`
(unless ``--out`` says otherwise) and the README is left alone unless ``--readme`` names it, so a
smoke test never overwrites the committed full results (:func:`targets`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

from . import readme
from .common import QUICK_ZOO_EPOCHS, QUICK_ZOO_THREADS, ROOT, BenchError, Context, run_meta, write_json, write_text

#: Benchmark modules, in the order ``python -m bench`` runs them.
BENCHMARKS = ("accuracy", "rtl_util", "cycles", "peers", "tool_speed", "pot_accuracy", "dsconv", "qat", "boards", "pe_area",
              "area_sweep", "pt2e")
#: Where results go: the committed full results, and the ``--quick`` smoke test's (not committed).
RESULTS = ROOT / "bench" / "results"
QUICK_OUT = ROOT / "build" / "bench" / "quick"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark {unknown[0] if unknown else text!r} (known: {', '.join(BENCHMARKS)})")
    return names


def _non_negative(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds >= 0, not {text!r}")
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return v


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, with ``out`` and ``readme`` resolved (:func:`targets`)."""
    p = _Parser(prog="python -m bench",
                description="Quarry benchmarks: full runs write bench/results/ and regenerate README.md's results "
                            "block; --quick (a smoke test) writes build/bench/quick/ and leaves README.md alone.")
    p.add_argument("--only", type=_names, default=None, metavar="NAME[,NAME]",
                   help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: every benchmark's real code path on its smallest case, zoo models trained "
                        f"for a few epochs ({', '.join(f'{k} {v}' for k, v in QUICK_ZOO_EPOCHS.items())}) on one "
                        "thread, the second data set skipped (minutes, not hours); results go to "
                        f"{QUICK_OUT.relative_to(ROOT)}/ and README.md is left alone unless --readme names it")
    p.add_argument("--jobs", type=_positive, default=min(2, len(os.sched_getaffinity(0))),
                   help="worker processes for golden-model runs (default: 2 or the CPU count if smaller)")
    p.add_argument("--images", type=_positive, default=None,
                   help="test images per data set (default: the benchmark's own, up to 1000; 100-200 with --quick)")
    p.add_argument("--timeout", type=_positive, default=None, metavar="SECONDS",
                   help="per-run timeout of external tools (area_sweep; default: the benchmark's own)")
    p.add_argument("--budget", type=_non_negative, default=None, metavar="SECONDS",
                   help="wall-time budget per benchmark: those that support it (area_sweep) start no new "
                        "runs after it and list the rest as not run (0: report what the checkpoint holds, "
                        "start nothing)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"result directory (default: bench/results, or {QUICK_OUT.relative_to(ROOT)} with --quick)")
    p.add_argument("--readme", type=Path, default=None,
                   help="README whose generated results block to rewrite (default: README.md when --out is "
                        "bench/results and not --quick, else none)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--report-only", action="store_true",
                   help="re-render the PNG, Markdown and README block from the existing JSON results, "
                        "measure nothing")
    args = p.parse_args(argv)
    args.out, args.readme = targets(args)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.list:
        for name in BENCHMARKS:
            print(f"{name:12s} {importlib.import_module(f'.{name}', __package__).DESCRIPTION}")
        return 0
    for name in args.only or BENCHMARKS:
        mod = importlib.import_module(f".{name}", __package__)
        out = args.out / name
        if args.report_only:
            if args.only is None and not out.with_suffix(".json").exists():
                print(f"{name}: no results in {args.out}, skipped", file=sys.stderr)
                continue
            try:
                saved = json.loads(out.with_suffix(".json").read_text())
            except (OSError, ValueError) as e:
                print(f"python -m bench: error: {name}: cannot read {out}.json: {e}", file=sys.stderr)
                return 2
            _report(mod, out, saved["results"], saved["meta"])
            continue
        started = time.time()
        ctx = Context(quick=args.quick, jobs=args.jobs, images=args.images, out=args.out,
                      timeout=args.timeout, budget=args.budget, log=lambda s: print(s, file=sys.stderr, flush=True))
        try:
            results = mod.run(ctx)
        except BenchError as e:
            print(f"python -m bench: error: {name}: {e}", file=sys.stderr)
            return 2
        quick_zoo = {"zoo_epochs": dict(QUICK_ZOO_EPOCHS), "zoo_threads": QUICK_ZOO_THREADS} if args.quick else {}
        meta = run_meta(started, argv, benchmark=name, quick=args.quick, jobs=args.jobs, **quick_zoo)
        # JSON first: a failure while rendering never loses the measurements (--report-only).
        write_json(out.with_suffix(".json"), {"meta": meta, "results": results})
        _report(mod, out, results, meta)
        print(f"{name}: {meta['wall_seconds']:.0f} s -> {out}.json, .png"
              + (", .md" if hasattr(mod, "markdown") else ""), file=sys.stderr)
    target = args.readme
    if target is not None:
        try:
            changed = readme.update(target, args.out, BENCHMARKS)
        except (OSError, BenchError) as e:
            print(f"python -m bench: error: {target}: {e}", file=sys.stderr)
            return 2
        print(f"{target}: results block {'regenerated' if changed else 'unchanged'}", file=sys.stderr)
    return 0


def targets(args) -> tuple[Path, Path | None]:
    """(result directory, README to regenerate or None) of parsed arguments: a full run writes
    bench/results and README.md; ``--quick`` writes :data:`QUICK_OUT` (unless ``--out`` is given)
    and no README unless ``--readme`` is given (``--quick --out bench/results`` alone still leaves
    the README alone: its block is for full runs)."""
    out = args.out if args.out is not None else (QUICK_OUT if args.quick else RESULTS)
    target = args.readme
    if target is None and not args.quick and out.resolve() == RESULTS.resolve():
        target = readme.DEFAULT_README
    return out, target


def _report(mod, out: Path, results: dict, meta: dict) -> None:
    mod.plot(results, out.with_suffix(".png"))
    if hasattr(mod, "markdown"):
        text = mod.markdown(results, meta)
        if meta.get("quick"):
            epochs = meta.get("zoo_epochs") or {}
            text = ("> **Quick smoke-test run** (`--quick`): the smallest case of each measurement, the first data "
                    "set only"
                    + (", zoo models trained for " + " / ".join(f"{v} epochs ({k})" for k, v in epochs.items())
                       + f" on {meta.get('zoo_threads', '?')} thread(s)" if epochs else "")
                    + ". Not the reference figures (those are in bench/results/).\n\n" + text)
        write_text(out.with_suffix(".md"), text)


if __name__ == "__main__":
    sys.exit(main())
