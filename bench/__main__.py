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
from .common import ROOT, BenchError, Context, run_meta, write_json, write_text

#: Benchmark modules, in the order ``python -m bench`` runs them.
BENCHMARKS = ("accuracy", "rtl_util", "cycles", "tool_speed", "pot_accuracy", "dsconv", "qat", "boards", "pe_area",
              "area_sweep", "pt2e")


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


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return v


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = _Parser(prog="python -m bench", description="Quarry benchmarks; results go to bench/results/.")
    p.add_argument("--only", type=_names, default=None, metavar="NAME[,NAME]",
                   help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    p.add_argument("--quick", action="store_true", help="small smoke-test version (minutes, not tens of minutes)")
    p.add_argument("--jobs", type=_positive, default=min(2, len(os.sched_getaffinity(0))),
                   help="worker processes for golden-model runs (default: 2 or the CPU count if smaller)")
    p.add_argument("--images", type=_positive, default=None,
                   help="test images per data set (default: 1000, or 200 with --quick)")
    p.add_argument("--timeout", type=_positive, default=None, metavar="SECONDS",
                   help="per-run timeout of external tools (area_sweep; default: the benchmark's own)")
    p.add_argument("--budget", type=_positive, default=None, metavar="SECONDS",
                   help="wall-time budget per benchmark: those that support it (area_sweep) start no new "
                        "runs after it and list the rest as not run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="result directory")
    p.add_argument("--readme", type=Path, default=None,
                   help="README whose generated results block to rewrite (default: README.md when --out is "
                        "bench/results, else none)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--report-only", action="store_true",
                   help="re-render the PNG, Markdown and README block from the existing JSON results, "
                        "measure nothing")
    args = p.parse_args(argv)
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
        meta = run_meta(started, argv, benchmark=name, quick=args.quick, jobs=args.jobs)
        # JSON first: a failure while rendering never loses the measurements (--report-only).
        write_json(out.with_suffix(".json"), {"meta": meta, "results": results})
        _report(mod, out, results, meta)
        print(f"{name}: {meta['wall_seconds']:.0f} s -> {out}.json, .png"
              + (", .md" if hasattr(mod, "markdown") else ""), file=sys.stderr)
    target = args.readme
    if target is None and args.out.resolve() == (ROOT / "bench" / "results").resolve():
        target = readme.DEFAULT_README
    if target is not None:
        try:
            changed = readme.update(target, args.out, BENCHMARKS)
        except (OSError, BenchError) as e:
            print(f"python -m bench: error: {target}: {e}", file=sys.stderr)
            return 2
        print(f"{target}: results block {'regenerated' if changed else 'unchanged'}", file=sys.stderr)
    return 0


def _report(mod, out: Path, results: dict, meta: dict) -> None:
    mod.plot(results, out.with_suffix(".png"))
    if hasattr(mod, "markdown"):
        write_text(out.with_suffix(".md"), mod.markdown(results, meta))


if __name__ == "__main__":
    sys.exit(main())
