"""``make demo``: the whole Quarry flow on the bundled default.

Train (or load) the default CNN on real MNIST, quantize it at W8A8 and W4A4 (integer PEs), with
DoubleQExt (INT and power-of-two layers in one program, hybrid PEs) and with DSConv block-scaled
4-bit weights and block-floating-point activations (block rescale in the accumulator path), compile each for a 16x16 array, generate the accelerator with the weights in ROM, run N test images through the
RTL under Verilator and through the golden model, and report accuracy, bit-exactness, cycles
and utilisation. Writes ``build/demo/report.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SETTINGS = (
    # name, config fields, compile() keywords
    ("W8A8", dict(w_bits=8, a_bits=8), dict(method="percentile", weight_method="minmax", bias_correction="none")),
    ("W4A4", dict(w_bits=4, a_bits=4), dict(method="mse", weight_method="mse", bias_correction="empirical")),
    ("HYB-DQE", dict(w_bits=8, a_bits=8, pe_kind="hybrid"),
     dict(method="mse", weight_method="doubleqext", pot_budget=0.77, bias_correction="empirical")),
    ("DSCONV4", dict(w_bits=4, a_bits=8, block_scale=True, bfp_exp_bits=3),
     dict(method="mse", weight_method="dsconv", bias_correction="empirical", bfp=True)),
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.demo", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="test images through RTL and golden (default 100)")
    p.add_argument("--pe", default="16x16")
    p.add_argument("--out", type=Path, default=Path("build/demo"))
    p.add_argument("--settings", default=",".join(s[0] for s in SETTINGS))
    args = p.parse_args(argv)


    from compiler import compile as compile_model
    from compiler import data, zoo
    from compiler.__main__ import write_outputs
    from hw.build import build as hw_build
    from hw.config import AccelConfig
    from hw.program import atomic_write

    from .run import compare_runs, run_golden, run_verilator

    def say(msg):
        print(msg, flush=True)

    rows, cols = AccelConfig.parse_pe(args.pe)
    say("== Quarry demo: PyTorch CNN -> integer program -> systolic-array RTL (Verilator) ==")
    model = zoo.trained("quarry_cnn", "mnist", log=say)
    xtr, ytr, xte, yte = data.load("mnist")
    float_acc_n = zoo.evaluate(model, xte[:args.n], yte[:args.n])
    float_acc_all = zoo.evaluate(model, xte, yte)
    say(f"float model: {float_acc_all:.2%} on all {len(yte)} MNIST test images, {float_acc_n:.2%} on the first {args.n}")
    images, labels = xte[:args.n].numpy(), yte[:args.n].numpy()
    report = {"images": args.n, "array": f"{rows}x{cols}", "float_acc_all_test": float_acc_all, "settings": {}}
    wanted = args.settings.split(",")
    for name, cfg_kw, ckw in (s for s in SETTINGS if s[0] in wanted):
        cfg = AccelConfig(rows=rows, cols=cols, **cfg_kw)
        out = args.out / name
        method = ckw["method"]
        say(f"\n-- {name}: {cfg.describe()}; activations {method}, weights {ckw['weight_method']}, "
            f"bias correction {ckw['bias_correction']}; 256 calibration images --")
        t0 = time.perf_counter()
        prog = compile_model(model, xtr[:256], cfg, **ckw)
        compile_s = time.perf_counter() - t0
        write_outputs(prog, out / "model", {"model": "quarry_cnn", "data": "mnist", "method": method,
                                            "compile_seconds": round(compile_s, 3)})
        info = hw_build(cfg, out / "hw", rom=out / "model")
        say(f"compiled in {compile_s:.2f} s: {len(prog.instrs)} instructions, {len(prog.images['wmem'])} weight rows; "
            f"Verilog with weights in ROM: {info['verilog_lines']} lines in {info['generation_seconds']:.1f} s "
            f"-> {out / 'hw' / 'quarry_top.v'}")
        gold = run_golden(prog, images)
        say(f"golden model: {args.n} images in {gold.seconds:.1f} s")
        say("building the RTL under Verilator (first time for a design: a few minutes) and running it ...")
        rtl = run_verilator(prog, images, verilog=(out / "hw" / "quarry_top.v").read_text())
        say(f"RTL: build {rtl.build_seconds:.0f} s, {args.n} images in {rtl.seconds:.0f} s "
            f"({sum(rtl.cycles) / rtl.seconds:.0f} simulated cycles/s)")
        diffs = compare_runs(gold, rtl)
        exact = sum(np.array_equal(a, b) and ca == cb for a, b, ca, cb in
                    zip(gold.outputs, rtl.outputs, gold.cycles, rtl.cycles))
        cyc = float(np.mean(rtl.cycles))
        util = prog.manifest["macs"] / (cyc * cfg.pe_count)
        s = {"float_acc": float_acc_n, "golden_acc": gold.accuracy(labels), "rtl_acc": rtl.accuracy(labels),
             "images": args.n, "bit_exact": exact, "cycles_per_image": cyc, "utilization": util,
             "macs_per_image": prog.manifest["macs"], "compile_seconds": compile_s,
             "rtl_build_seconds": rtl.build_seconds, "rtl_seconds": rtl.seconds, "method": method,
             "weight_method": ckw["weight_method"], "pe_kind": cfg.pe_kind, "block_scale": cfg.block_scale,
             "weight_bytes": prog.manifest["weight_memory"]["bytes"],
             "pot_layers": prog.manifest["weight_memory"]["pot_layers"]}
        report["settings"][name] = s
        say(f"\n  {'setting':8s} {'float':>7s} {'golden':>7s} {'RTL':>7s} {'RTL==golden':>12s} {'cycles/img':>11s} {'PE util':>8s}")
        say(f"  {name:8s} {s['float_acc']:7.2%} {s['golden_acc']:7.2%} {s['rtl_acc']:7.2%} "
            f"{exact:>5d}/{args.n:<6d} {cyc:11.0f} {util:8.1%}")
        for d in diffs[:10]:
            say("  MISMATCH " + d)
    atomic_write(args.out / "report.json", json.dumps(report, indent=1) + "\n")
    say(f"\nreport: {args.out / 'report.json'}")
    ok = all(s["bit_exact"] == s["images"] for s in report["settings"].values())
    say("RTL == golden on every image." if ok else "RTL != golden on some images (see MISMATCH lines).")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
