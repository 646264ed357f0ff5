"""``python -m sim run MODEL_DIR --backend golden|verilator [--n 100] [--compare] [--data mnist]``"""

from __future__ import annotations

import sys

import numpy as np

from hw.build import _Parser
from hw.program import ProgramError

from .run import RunError, compare_runs, load_model_dir, run_golden, run_verilator


def _images(dataset: str, n: int):
    from compiler import data

    _, _, x, y = data.load(dataset)
    return x[:n].numpy(), y[:n].numpy()


def cmd_run(args) -> int:
    prog, report = load_model_dir(args.model)
    dataset = args.data or report.get("data") or "mnist"
    images, labels = _images(dataset, args.n)
    cfg = prog.config
    macs = prog.manifest.get("macs", 0)
    runs = []
    if args.backend == "golden" or args.compare:
        runs.append(run_golden(prog, images))
    if args.backend == "verilator" or args.compare:
        runs.append(run_verilator(prog, images))
    for r in runs:
        cyc = float(np.mean(r.cycles))
        util = macs / (cyc * cfg.pe_count) if cyc else 0.0
        extra = f", RTL build {r.build_seconds:.1f} s" if r.backend == "verilator" else ""
        print(f"{r.backend:9s}: {len(r.predictions)} {dataset} images, accuracy {r.accuracy(labels):.2%}, "
              f"{cyc:.0f} cycles/image, PE utilisation {util:.1%}, {len(images) / r.seconds:.1f} images/s{extra}")
    if args.n <= 20:
        print("predictions:", " ".join(map(str, runs[0].predictions)), "| labels:", " ".join(map(str, labels)))
    if args.compare:
        diffs = compare_runs(*runs)
        if diffs:
            print(f"RTL != golden on {len(diffs)} counts:", file=sys.stderr)
            for d in diffs[:20]:
                print("  " + d, file=sys.stderr)
            return 1
        print(f"RTL == golden: every output accumulator and cycle count of {len(images)} images is identical")
    return 0


def main(argv=None) -> int:
    p = _Parser(prog="python -m sim", description="Run compiled Quarry models.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run a compiled model on images of its data set")
    r.add_argument("model", help="compiled model directory (python -m compiler --out DIR) or .qprog")
    r.add_argument("--backend", choices=("golden", "verilator"), default="golden")
    r.add_argument("--n", type=int, default=100, help="test images (default 100)")
    r.add_argument("--compare", action="store_true", help="run golden and verilator; exit 1 on any difference")
    r.add_argument("--data", help="data set (default: the one the model was compiled with)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, not {args.n}")
    try:
        return cmd_run(args)
    except (RunError, ProgramError) as e:
        print(f"python -m sim: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
