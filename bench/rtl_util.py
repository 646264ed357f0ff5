"""RTL utilisation of GEMMs on the generated accelerator (Verilator), and Verilog generation cost.

For arrays 4x4 and 8x8: GEMMs (M x K) @ (K x N) with K, N multiples of the array, M >= 256, run
on the RTL; utilisation = M*K*N / (RTL cycles * rows * cols). Two variants:

* ``to_acc`` — results stay in the accumulator memory (raw int sums, as a GEMM kernel or a
  classifier's logits would be read);
* ``requant`` — every output block is requantized by POST into the scratchpad (as a conv layer
  is). On the default (``post_overlap``) config, POST runs under the next pass's MATMULs and the
  compiler picks the rows per pass; only the last pass's POST and the first weight load are not
  hidden.

Also: Verilog generation seconds and peak memory of ``python -m hw.build --pe 16x16 --bits 4``.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

from compiler.builder import ProgramBuilder
from compiler.kernels import Requant
from hw.config import AccelConfig
from hw.isa import HostMem
from sim.golden import Machine
from sim.verilator import Job, build

from .common import ROOT

DESCRIPTION = "GEMM utilisation on the RTL under Verilator (4x4, 8x8) and 16x16 Verilog generation cost"
ARRAYS = ((4, 4), (8, 8))


def _gemm_program(cfg: AccelConfig, m: int, k: int, n: int, to_acc: bool, rng):
    b = ProgramBuilder(cfg)
    x = b.tensor(k, 1, m)
    w = rng.integers(-(1 << (cfg.w_bits - 1)), 1 << (cfg.w_bits - 1), (n, k, 1, 1))
    if to_acc:
        b.conv2d_to_acc(x, w)
    else:
        rq = Requant(bias=np.zeros(n, np.int64), mult=np.full(n, 1 << 10), shift=np.full(n, 20), zp=0,
                     lo=0, hi=(1 << cfg.a_bits) - 1)
        b.conv2d(x, w, rq)
    prog = b.build()
    xs = rng.integers(0, 1 << cfg.a_bits, (x.rows(cfg), cfg.rows))
    return prog, x, xs


def gemm_utilisation(quick: bool = False, log=print) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    # --quick: the smallest array only (each array is one Verilator build, minutes on a fresh clone).
    for r, c in ARRAYS[:1] if quick else ARRAYS:
        cfg = AccelConfig(rows=r, cols=c, w_bits=8, a_bits=8, spad_depth=8192, acc_depth=2048,
                          wmem_depth=1024, imem_depth=512, param_depth=16)
        rtl = build(cfg)
        shapes = [(256, 4 * r, 4 * c)] if quick else [(256, 4 * r, 4 * c), (512, 8 * r, 4 * c), (256, 16 * r, 2 * c)]
        for m, k, n in shapes:
            for to_acc in (True, False):
                prog, x, xs = _gemm_program(cfg, m, k, n, to_acc, rng)
                gold = Machine(cfg)
                gold.spad[x.base:x.base + len(xs)] = xs
                pred = gold.run(prog).cycles
                res = rtl.run([Job(prog, [(HostMem.SPAD, x.base, xs)], [(HostMem.ACC, 0, 1)])])[0]
                util = m * k * n / (res.cycles * r * c)
                rows.append({"array": f"{r}x{c}", "M": m, "K": k, "N": n, "variant": "to_acc" if to_acc else "requant",
                             "rtl_cycles": res.cycles, "predicted_cycles": pred, "ideal_cycles": m * k * n // (r * c),
                             "utilisation": round(util, 4)})
                log(f"  {r}x{c} GEMM {m}x{k}x{n} {rows[-1]['variant']:8s}: {res.cycles} RTL cycles "
                    f"(model {pred}), utilisation {util:.1%}")
    return rows


def verilog_generation(n: int = 16) -> dict:
    """Seconds, Verilog lines and peak memory of generating the n x n W4A4 accelerator."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c",
                          "import resource, time; from hw.config import AccelConfig; from hw.build import generate; "
                          f"t=time.perf_counter(); v=generate(AccelConfig(rows={n}, cols={n}, w_bits=4, a_bits=4)); "
                          "print(time.perf_counter()-t, v.count(chr(10)), "
                          "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    gen_s, lines, rss_kb = out.stdout.split()
    return {"config": f"{n}x{n} W4A4", "generation_seconds": round(float(gen_s), 2), "verilog_lines": int(lines),
            "peak_rss_mb": round(int(rss_kb) / 1024, 1), "wall_seconds": round(time.perf_counter() - t0, 2)}


def run(ctx) -> dict:
    ctx.log("GEMM utilisation on the RTL (Verilator):")
    util = gemm_utilisation(ctx.quick, ctx.log)
    # --quick: 4x4 (16x16 takes about a minute; tool_speed --quick times 4x4 and 8x8 too).
    n = ctx.pick(16, 4)
    ctx.log(f"Verilog generation {n}x{n} W4A4:")
    gen = verilog_generation(n)
    ctx.log(f"  {gen['generation_seconds']} s, {gen['verilog_lines']} lines, peak {gen['peak_rss_mb']} MB")
    return {"gemm": util, "verilog_generation": gen}


def markdown(res: dict, meta: dict) -> str:
    lines = ["# RTL GEMM utilisation (Verilator)", "",
             f"Measured {meta.get('date', '')} at {meta.get('git', {}).get('revision', '')}.", "",
             "| array | M x K x N | variant | RTL cycles | model cycles | ideal | utilisation |",
             "|---|---|---|---|---|---|---|"]
    for g in res["gemm"]:
        lines.append(f"| {g['array']} | {g['M']}x{g['K']}x{g['N']} | {g['variant']} | {g['rtl_cycles']} | "
                     f"{g['predicted_cycles']} | {g['ideal_cycles']} | {g['utilisation']:.1%} |")
    v = res["verilog_generation"]
    lines += ["", f"Verilog generation ({v['config']}): {v['generation_seconds']} s, {v['verilog_lines']} lines, "
              f"peak RSS {v['peak_rss_mb']} MB.", "",
              "`requant`: POST overlaps the next pass's MATMULs (acc ping-pong); what is left is the first "
              "weight load, the last pass's POST and the array drain before it."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .common import save_figure

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{g['array']}\n{g['M']}x{g['K']}x{g['N']}\n{g['variant']}" for g in res["gemm"]]
    ax.bar(range(len(labels)), [100 * g["utilisation"] for g in res["gemm"]],
           color=["tab:blue" if g["variant"] == "to_acc" else "tab:orange" for g in res["gemm"]])
    ax.axhline(90, color="gray", ls="--", lw=1)
    ax.set_xticks(range(len(labels)), labels, fontsize=6)
    ax.set_ylabel("PE utilisation (%)")
    ax.set_title("GEMM on the RTL (Verilator): MACs / (cycles x rows x cols)")
    save_figure(fig, path)
    plt.close(fig)


def summary(res: dict, meta: dict) -> str:
    g = res["gemm"]
    lines = []
    for variant, what in (("to_acc", "results left in the accumulators"),
                          ("requant", "every output block requantized by POST into the scratchpad")):
        u = [x["utilisation"] for x in g if x["variant"] == variant]
        if u:
            lines.append(f"{what}: {min(u):.1%}–{max(u):.1%} PE utilisation")
    errs = [abs(x["predicted_cycles"] - x["rtl_cycles"]) / x["rtl_cycles"] for x in g]
    exact = sum(x["predicted_cycles"] == x["rtl_cycles"] for x in g)
    arrays = ", ".join(sorted({x["array"] for x in g}))
    text = (f"GEMMs (M >= 256) on the RTL under Verilator ({arrays}, W8A8): " + "; ".join(lines) + ". "
            f"Cycle model (`hw/timing.py` via the golden model) vs RTL: {exact} of {len(g)} runs equal, "
            f"largest error {max(errs):.2%}.")
    v = res["verilog_generation"]
    return text + (f" Verilog generation {v['config']}: {v['generation_seconds']} s, {v['verilog_lines']:,} lines, "
                   f"peak {v['peak_rss_mb']} MB.")
