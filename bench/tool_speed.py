"""How fast the tools are: Verilog generation, Verilator build and simulation, compilation and the
golden model.

* ``hw.build``: wall time and peak memory of generating the Verilog (fresh Python process per
  size, W4A4 int), arrays 4x4..32x32;
* Verilator: build time (uncached, ``-O0`` and ``-O2``) and simulated cycles per second on a long
  GEMM program (cycles from the RTL's own counter / wall time of the job inside the simulator),
  arrays 4x4, 8x8, 16x16;
* the compiler: seconds to compile the default model (W8A8 min-max; W4A4 MSE + GPTQ + empirical
  bias correction), 16x16;
* the golden model: images per second on the compiled default model, one process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .common import ROOT, Context, progress, save_figure

DESCRIPTION = "hw.build time/memory, Verilator build time and cycles/s, compile time, golden images/s"

GEN_SIZES = (4, 8, 16, 32)
SIM_SIZES = (4, 8, 16)


def _generation(n: int) -> dict:
    code = ("import resource, time, json; from hw.config import AccelConfig; from hw.build import generate; "
            f"t=time.perf_counter(); v=generate(AccelConfig(rows={n}, cols={n}, w_bits=4, a_bits=4)); "
            "print(json.dumps({'seconds': time.perf_counter()-t, 'lines': v.count(chr(10)), "
            "'peak_rss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"pe": f"{n}x{n}", "pes": n * n, "generate_seconds": round(r["seconds"], 2),
            "process_seconds": round(time.perf_counter() - t0, 2), "verilog_lines": r["lines"],
            "peak_rss_mb": round(r["peak_rss_kb"] / 1024, 1)}


def _gemm(cfg, m: int, rng):
    from compiler.builder import ProgramBuilder

    b = ProgramBuilder(cfg)
    k, n = 4 * cfg.rows, 4 * cfg.cols
    x = b.tensor(k, 1, m)
    w = rng.integers(-(1 << (cfg.w_bits - 1)), 1 << (cfg.w_bits - 1), (n, k, 1, 1))
    b.conv2d_to_acc(x, w)
    return b.build(), x


def _verilator(n: int, opt: str, work: Path, quick: bool) -> dict:
    from hw.config import AccelConfig
    from hw.isa import HostMem
    from sim.golden import Machine
    from sim.verilator import Job, build

    # acc_depth: the 1000-row GEMM's raw output is 4 blocks x 1000 accumulator rows.
    cfg = AccelConfig(rows=n, cols=n, w_bits=4, a_bits=4, acc_depth=4096)
    old = os.environ.get("MAKEFLAGS")
    words = [w for w in (old or "").split() if not w.startswith("OPT_FAST=")]
    os.environ["MAKEFLAGS"] = " ".join(words + [f"OPT_FAST={opt}"])
    d = work / f"{n}x{n}{opt}"
    shutil.rmtree(d, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        rtl = build(cfg, build_dir=d)
        build_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        prog, x = _gemm(cfg, 256 if quick else 1000, rng)
        xs = rng.integers(0, 1 << cfg.a_bits, (x.rows(cfg), cfg.rows))
        t0 = time.perf_counter()
        res = rtl.run([Job(prog, [(HostMem.SPAD, x.base, xs)], [(HostMem.ACC, 0, 1)])])[0]
        wall = time.perf_counter() - t0
        stats = rtl.last_run
        expect = Machine(cfg).run(prog).cycles
    finally:
        if old is None:
            os.environ.pop("MAKEFLAGS", None)
        else:
            os.environ["MAKEFLAGS"] = old
        shutil.rmtree(d, ignore_errors=True)
    return {"pe": f"{n}x{n}", "opt": opt, "build_seconds": round(build_s, 1), "cycles": res.cycles,
            "cycles_match_golden": res.cycles == expect, "run_wall_seconds": round(wall, 2),
            "startup_seconds": round(stats.startup_seconds, 2), "job_seconds": round(res.wall_seconds, 2),
            "cycles_per_second": round(res.cycles / res.wall_seconds)}


def _compile_and_golden(model, quick: bool) -> dict:
    import compiler
    from compiler import data
    from hw.config import AccelConfig
    from hw.program import decode_output, output_region, quantize_input
    from sim.golden import Machine

    xtr, _, xte, _ = data.load("mnist")
    out = {}
    for label, bits, kw in (("W8A8 minmax", 8, dict(method="minmax")),
                            ("W4A4 mse + gptq + empirical bias correction", 4,
                             dict(method="mse", weight_method="gptq", bias_correction="empirical"))):
        cfg = AccelConfig(rows=16, cols=16, w_bits=bits, a_bits=bits)
        t0 = time.perf_counter()
        prog = compiler.compile(model, xtr[:256], cfg, **kw)
        out.setdefault("compile", []).append({"setting": label, "calibration_images": 256,
                                              "seconds": round(time.perf_counter() - t0, 2),
                                              "instructions": len(prog.instrs)})
    n = 50 if quick else 200
    t0 = time.perf_counter()
    for img in xte[:n].numpy():
        m = Machine(prog.config)
        addr, rows = quantize_input(prog, img)
        m.spad[addr:addr + len(rows)] = rows
        m.run(prog)
        a0, k = output_region(prog)
        decode_output(prog, m.acc[a0:a0 + k])
    s = time.perf_counter() - t0
    out["golden"] = {"images": n, "seconds": round(s, 2), "images_per_second": round(n / s, 1),
                     "processes": 1, "setting": "W4A4 16x16"}
    return out


def run(ctx: Context) -> dict:
    res = {"generation": [], "verilator": []}
    for n in progress(GEN_SIZES[:2] if ctx.quick else GEN_SIZES, desc="hw.build", unit="size"):
        res["generation"].append(_generation(n))
        ctx.log(f"hw.build {n}x{n}: {res['generation'][-1]}")
    work = ROOT / "build" / "bench" / "verilator"
    runs = [(n, "-O0") for n in SIM_SIZES] + [(n, "-O2") for n in SIM_SIZES]
    if ctx.quick:  # one build (-O2 is the same flow with another flag, and minutes more on a fresh clone)
        runs = [(4, "-O0")]
    for n, opt in progress(runs, desc="verilator", unit="build"):
        res["verilator"].append(_verilator(n, opt, work, ctx.quick))
        ctx.log(f"verilator {n}x{n} {opt}: {res['verilator'][-1]}")
    res.update(_compile_and_golden(ctx.trained("quarry_cnn", "mnist"), ctx.quick))
    return res


def markdown(res: dict, meta: dict) -> str:
    lines = ["# Tool speed", "",
             f"Generated by `{meta['command']}` on {meta['date']} (git {str(meta['git']['revision'])[:10]}"
             f"{', dirty tree' if meta['git']['dirty'] else ''}; {meta['machine']['cpu_count']} CPUs).", "",
             "## Verilog generation (`hw.build`, W4A4 int)", "",
             "| array | PEs | generate s | process s | Verilog lines | peak RSS MB |", "|---|---|---|---|---|---|"]
    for g in res["generation"]:
        lines.append(f"| {g['pe']} | {g['pes']} | {g['generate_seconds']} | {g['process_seconds']} | "
                     f"{g['verilog_lines']:,} | {g['peak_rss_mb']} |")
    lines += ["", "## Verilator (W4A4 int, GEMM program, cycles from the RTL's counter)", "",
              "| array | OPT_FAST | build s | cycles | cycles/s | equals golden |", "|---|---|---|---|---|---|"]
    for v in res["verilator"]:
        lines.append(f"| {v['pe']} | {v['opt']} | {v['build_seconds']} | {v['cycles']:,} | "
                     f"{v['cycles_per_second']:,} | {'yes' if v['cycles_match_golden'] else 'NO'} |")
    lines += ["", "## Compiler and golden model (default model, 16x16)", "",
              "| what | seconds |", "|---|---|"]
    for c in res["compile"]:
        lines.append(f"| compile, {c['setting']}, {c['calibration_images']} calibration images | {c['seconds']} |")
    g = res["golden"]
    lines.append(f"| golden model, {g['images']} images ({g['setting']}, one process): "
                 f"{g['images_per_second']} images/s | {g['seconds']} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    g = res["generation"]
    a1.plot([x["pes"] for x in g], [x["generate_seconds"] for x in g], "o-", label="hw.build seconds")
    a1b = a1.twinx()
    a1b.plot([x["pes"] for x in g], [x["peak_rss_mb"] for x in g], "s--", color="C1", label="peak RSS MB")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("PEs")
    a1.set_ylabel("seconds")
    a1b.set_ylabel("MB")
    a1.set_title("Verilog generation")
    for opt, mk in (("-O0", "o-"), ("-O2", "s-")):
        v = [x for x in res["verilator"] if x["opt"] == opt]
        if v:
            a2.plot([int(x["pe"].split("x")[0]) ** 2 for x in v], [x["cycles_per_second"] for x in v], mk,
                    label=f"OPT_FAST={opt}")
    a2.set_xscale("log", base=2)
    a2.set_yscale("log")
    a2.set_xlabel("PEs")
    a2.set_ylabel("simulated cycles / s")
    a2.set_title("Verilator")
    a2.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def summary(res: dict, meta: dict) -> str:
    gen = ", ".join(f"{g['pe']} {g['generate_seconds']} s / {g['peak_rss_mb']:.0f} MB" for g in res["generation"])
    lines = [f"`hw.build` (W4A4 int, generate + peak memory): {gen}.", "",
             "| Verilator (W4A4 GEMM) | OPT_FAST | build s | simulated cycles/s | cycles == golden |",
             "|---|---|---|---|---|"]
    for v in res["verilator"]:
        lines.append(f"| {v['pe']} | {v['opt']} | {v['build_seconds']} | {v['cycles_per_second']:,} | "
                     f"{'yes' if v['cycles_match_golden'] else 'NO'} |")
    comp = "; ".join(f"{c['setting']} {c['seconds']} s" for c in res["compile"])
    g = res["golden"]
    lines += ["", f"Compiling the default model for 16x16 ({res['compile'][0]['calibration_images']} calibration "
              f"images): {comp}. Golden model: {g['images_per_second']} images/s ({g['setting']}, one process)."]
    return "\n".join(lines)
