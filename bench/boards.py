"""Bitstreams through the open flow (Amaranth + YoWASP yosys/nextpnr): resources and Fmax per board.

Builds, one after another (place and route is slow and the machine small):

* iCEBreaker (UP5K), 4x4 W4 with the default model (``quarry_cnn``) — the goal; it does not fit,
  the report says by how much;
* iCEBreaker, 2x2 W4 with ``quarry_tiny`` (the next step down; full run only);
* iCEBreaker, its default (2x1 W4, ``quarry_tiny``) at the board's 12 MHz;
* ULX3S-85F, its default (8x8 W4, default model) at 50 MHz from the PLL (the goal; full run only);
* ULX3S-85F, 16x16 W4 with the default model at 100 MHz (stretch goal; full run only).

``--budget S`` starts no new build after S seconds; the builds left are listed as not run.

Each build's ``report.json`` (``build/bench/boards/<label>/``) gives LUT/FF/BRAM/DSP use, Fmax per
clock and tool times; the program's accuracy and cycles per image come from the golden model
(which the RTL matches bit for bit, ``tests/test_boards_soc.py``).
"""

import time
from pathlib import Path

from .common import ROOT, BenchError

DESCRIPTION = "bitstreams for iCEBreaker and ULX3S-85F: LUT/FF/BRAM/DSP use and Fmax (yosys + nextpnr)"

#: (label, board, model, array, bits, target MHz or None for the board's, quick run too)
BUILDS = (
    ("icebreaker-4x4-w4-quarry_cnn", "icebreaker", "quarry_cnn", (4, 4), 4, None, False),
    ("icebreaker-2x2-w4-quarry_tiny", "icebreaker", "quarry_tiny", (2, 2), 4, None, False),
    # --quick runs only this one, the cheapest build that fitted (at da2ce82: 95 s of yosys and
    # 143 s of nextpnr-ice40 on the shared machine, about what the 4x4 build above takes to find
    # out it does not fit: 184 s of yosys). A 2x2 ULX3S build took longer (over 8 min).
    ("icebreaker-default", "icebreaker", "quarry_tiny", None, None, None, True),
    # Place and route of the whole 8x8 top takes 7-30 min here (area_sweep --quick covers
    # nextpnr-ecp5 on the array).
    ("ulx3s-85f-default", "ulx3s-85f", "quarry_cnn", None, None, None, False),
    ("ulx3s-85f-16x16-w4-100mhz", "ulx3s-85f", "quarry_cnn", (16, 16), 4, 100, False),
)


def _golden(prog, images, labels) -> dict:
    from sim.run import run_golden

    g = run_golden(prog, images, progress=False)
    return {"accuracy": round(g.accuracy(labels), 4), "images": len(images), "cycles_per_image": int(g.cycles[0])}


def run(ctx) -> dict:
    from boards.build import build, resolve_program, with_frequency
    from boards.platforms import get_board
    from compiler import data

    n = ctx.images or (100 if ctx.quick else 300)
    try:
        _, _, x, y = data.load("mnist")
    except data.DataError as e:
        raise BenchError(str(e)) from None
    images, labels = x[:n].numpy(), y[:n].numpy()
    out_root = ROOT / "build" / "bench" / ctx.pick("boards", "boards-quick")  # a quick run keeps the full builds
    rows, not_run, started = [], [], time.time()
    for label, bname, model, pe, bits, mhz, in_quick in BUILDS:
        if ctx.quick and not in_quick:
            continue
        if ctx.budget is not None and time.time() - started > ctx.budget:
            not_run.append({"label": label, "why": f"time budget of {ctx.budget:.0f} s used up"})
            continue
        board = get_board(bname)
        if mhz is not None:
            board = with_frequency(board, mhz * 1e6)
        ctx.log(f"{label}: compiling {model} ...")
        prog = resolve_program(board, model, pe, (bits, bits) if bits else None, log=ctx.log,
                               zoo_cache=ctx.zoo_cache, epochs=ctx.zoo_epochs(model, "mnist"), threads=ctx.zoo_threads)
        ctx.log(f"{label}: {prog.config.describe()} at {board.clk_hz / 1e6:g} MHz ...")
        t0 = time.perf_counter()
        # A finished build from an identical build plan (design, scripts, options, tools) is
        # reused: a run killed part way does not redo the builds it had finished.
        rep = build(board, prog, out_root / label, log=ctx.log, reuse=True)
        wall = time.perf_counter() - t0
        row = {"label": label, "board": bname, "model": model, "config": prog.config.describe(),
               "target_mhz": board.clk_hz / 1e6, "pass": rep["pass"], "failure": rep["failure"],
               "resources": rep["resources"], "fmax": rep["fmax"], "seconds": rep["seconds"],
               "build_wall_seconds": round(wall, 1), "reused": bool(rep.get("reused")), "needs": rep["needs"],
               "report": str((out_root / label / "report.json").relative_to(ROOT))}
        row.update(_golden(prog, images, labels))
        row["latency_ms_at_target"] = round(1e3 * row["cycles_per_image"] / board.clk_hz, 3)
        ctx.log(f"{label}: {'PASS' if rep['pass'] else 'FAIL: ' + str(rep['failure'])}; "
                + ", ".join(f"{k} {v['used']}/{v['available']}" for k, v in rep["resources"].items())
                + "; " + ", ".join(f"{c} {v['achieved_mhz']} MHz" for c, v in rep["fmax"].items())
                + f"; {wall:.0f} s")
        rows.append(row)
    return {"builds": rows, "images": n, "not_run": not_run}


def _not_run(res: dict) -> list[str]:
    return [f"Not run: {r['label']} ({r['why']})." for r in res.get("not_run", [])]


def _res(row, key) -> str:
    r = row["resources"].get(key)
    if not r:
        return "–"
    pct = f" ({r['percent']:.0f} %)" if r.get("percent") is not None else ""
    return f"{r['used']}/{r['available']}{pct}"


def _fmax(row) -> str:
    if not row["fmax"]:
        return "–"
    return ", ".join(f"{v['achieved_mhz']:.1f}" for v in row["fmax"].values())


def markdown(res: dict, meta: dict) -> str:
    lines = ["# Board builds (Amaranth + YoWASP yosys / nextpnr)", "",
             f"Measured {meta.get('date', '')} at {meta.get('git', {}).get('revision', '')} on "
             f"{meta.get('machine', {}).get('cpu', '?')} ({meta.get('machine', {}).get('usable_cpus', '?')} CPUs, "
             "shared with other jobs: tool times are wall clock under load).", "",
             "| build | config | target MHz | Fmax MHz | result | logic (LUT) | FF | BRAM | DSP | "
             f"accuracy ({res['images']} MNIST) | cycles/image | synth + PnR s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["builds"]:
        lut = _res(r, "logic_cells") if "logic_cells" in r["resources"] else _res(r, "lut")
        verdict = "pass" if r["pass"] else f"**fail**: {r['failure']}"
        secs = r["seconds"]
        lines.append(f"| {r['label']} | {r['config']} | {r['target_mhz']:g} | {_fmax(r)} | {verdict} | {lut} | "
                     f"{_res(r, 'ff')} | {_res(r, 'bram')} | {_res(r, 'dsp')} | {r['accuracy']:.1%} | "
                     f"{r['cycles_per_image']} | {secs.get('synth', 0):.0f} + {secs.get('pnr', 0):.0f} |")
    lines += ["", "iCE40 \"logic\" is nextpnr's logic cells (a LUT4 and a flip-flop each); ECP5 \"logic\" is "
              "TRELLIS_COMB (LUT4 or half a carry), FF is TRELLIS_FF. BRAM: 4-kbit EBR (iCE40), 18-kbit DP16KD "
              "(ECP5). Accuracy and cycles come from the golden model on the built program (the RTL equals it "
              "bit for bit and cycle for cycle). Reports: `build/bench/boards/<build>/report.json`."]
    lines += ["", *_not_run(res)] if res.get("not_run") else []
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .common import save_figure

    rows = res["builds"]
    keys = ("logic_cells", "lut", "ff", "bram", "dsp")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        used = [r["resources"].get(k, {}).get("percent") or 0 for k in keys]
        ax1.bar([j + i * width for j in range(len(keys))], used, width, label=r["label"])
    ax1.axhline(100, color="gray", ls="--", lw=1)
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys)
    ax1.set_ylabel("% of the device")
    ax1.set_yscale("log")
    ax1.legend(fontsize=6)
    ax1.set_title("resource use")
    labels = [r["label"] for r in rows]
    ax2.barh(labels, [r["target_mhz"] for r in rows], color="lightgray", label="target")
    ax2.barh(labels, [max((v["achieved_mhz"] for v in r["fmax"].values()), default=0) for r in rows],
             height=0.4, color="tab:blue", label="achieved (nextpnr)")
    ax2.tick_params(axis="y", labelsize=6)
    ax2.set_xlabel("MHz")
    ax2.legend(fontsize=6)
    ax2.set_title("Fmax of the accelerator clock")
    save_figure(fig, path)
    plt.close(fig)



def summary(res: dict, meta: dict) -> str:
    lines = ["| build | config | target MHz | Fmax MHz | result | logic | FF | BRAM | DSP | cycles/image |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["builds"]:
        lut = _res(r, "logic_cells") if "logic_cells" in r["resources"] else _res(r, "lut")
        verdict = "pass" if r["pass"] else f"fail: {r['failure']}"
        lines.append(f"| {r['label']} | {r['config']} | {r['target_mhz']:g} | {_fmax(r)} | {verdict} | {lut} | "
                     f"{_res(r, 'ff')} | {_res(r, 'bram')} | {_res(r, 'dsp')} | {r['cycles_per_image']:,} |")
    return "\n".join([*lines, *([""] + _not_run(res) if res.get("not_run") else [])])
