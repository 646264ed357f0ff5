"""Cycles and utilisation per layer: Quarry vs the ideal and vs SCALE-Sim, same layers, same array.

For a 16x16 weight-stationary array (8-bit):

* **ideal** = MACs / (rows x cols);
* **Quarry** = cycles of the compiled program on ``sim.golden`` (its cycle model reproduces the
  RTL's cycle count exactly: ``tests/test_rtl_system.py`` compares them on every random program,
  and ``make demo`` on the default model under Verilator). A single layer is compiled on its own
  (program start to HALT: weight preloads, every pass, requantization into the scratchpad); the
  default model's per-layer split comes from the issue cycles of each layer's instructions;
* **SCALE-Sim** 2.0.2 (PyPI ``scalesim``; 3.0.0 crashes on plain convs), weight-stationary, the
  config of ``bench/scalesim_ws.cfg`` with the same array size; its total cycles per
  layer (compute, with its own fill/drain; no pooling, no requantization). SCALE-Sim has no
  padding or groups: a padded conv is given the padded input size, a depthwise conv is ``C``
  one-channel convs (cycles summed).

Workloads: the default model (``compiler.zoo`` quarry_cnn, MNIST), a ResNet-18-style conv stack
at 16x16 input (widths 16-32-64-128, as for CIFAR-size images), the two conv layers measured in
``../shared/PEERS.md``, and GEMMs.
"""

from __future__ import annotations

import csv
import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .common import ROOT, BenchError, Context, progress, save_figure

DESCRIPTION = "per-layer cycles/utilisation: Quarry (golden = RTL) vs ideal vs SCALE-Sim 2.0.2, 16x16 WS"

ROWS = COLS = 16
BITS = 8
#: Big enough for the widest ResNet layer's weights (3x3x128x128 = 9,216 rows of 16).
WMEM_DEPTH = 16384
#: The 1024-row GEMM input (128 channels = 8 blocks x 1024 rows) and its output.
SPAD_DEPTH = 32768
#: The 128-channel 3x3 layers take over 1,024 instructions each.
IMEM_DEPTH = 4096
#: SCALE-Sim's weight-stationary config (a copy of the team's checked ``scalesim-example.cfg``);
#: the array size is substituted.
SCALESIM_CFG = ROOT / "bench" / "scalesim_ws.cfg"


def _config():
    from hw.config import AccelConfig

    return AccelConfig(rows=ROWS, cols=COLS, w_bits=BITS, a_bits=BITS, wmem_depth=WMEM_DEPTH, spad_depth=SPAD_DEPTH,
                       imem_depth=IMEM_DEPTH)


# -- workloads ---------------------------------------------------------------------------------------
# A layer: dict(name, h, w, cin, cout, k, stride, pad, groups) of a conv (GEMM: a 1x1 conv).

def _conv(name, h, w, cin, cout, k, stride=1, pad=None, groups=1, suite=""):
    return {"suite": suite, "name": name, "h": h, "w": w, "cin": cin, "cout": cout, "k": k, "stride": stride,
            "pad": (k // 2) if pad is None else pad, "groups": groups}


def resnet18_small(suite="resnet18-16x16") -> list[dict]:
    """ResNet-18's conv layers (stem 3x3 as in CIFAR ResNets, no stem pooling) at 16x16 input,
    widths 16/32/64/128; 1x1 stride-2 projections included."""
    L = [_conv("stem", 16, 16, 3, 16, 3, suite=suite)]
    h, c = 16, 16
    for stage, width in enumerate((16, 32, 64, 128)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            tag = f"s{stage + 1}b{block + 1}"
            L.append(_conv(f"{tag}.conv1", h, h, c, width, 3, stride, suite=suite))
            oh = h // stride
            L.append(_conv(f"{tag}.conv2", oh, oh, width, width, 3, suite=suite))
            if stride != 1 or c != width:
                L.append(_conv(f"{tag}.proj", h, h, c, width, 1, stride, pad=0, suite=suite))
            h, c = oh, width
    return L


def peers_layers(suite="PEERS.md") -> list[dict]:
    return [_conv("conv 30x30x16->32 3x3", 30, 30, 16, 32, 3, pad=0, suite=suite),
            _conv("conv 16x16x32->64 3x3", 16, 16, 32, 64, 3, pad=0, suite=suite)]


def gemms(suite="GEMM") -> list[dict]:
    # M output rows as an (M/16) x 16 map of a 1x1 conv (the same computation; a dimension field
    # of the ISA holds up to 2**dim_bits - 1).
    return [_conv(f"GEMM {m}x{k}x{n}", m // 16, 16, k, n, 1, pad=0, suite=suite)
            for m, k, n in ((256, 64, 64), (1024, 128, 128), (64, 256, 256))]


def out_hw(L) -> tuple[int, int]:
    return ((L["h"] + 2 * L["pad"] - L["k"]) // L["stride"] + 1, (L["w"] + 2 * L["pad"] - L["k"]) // L["stride"] + 1)


def macs(L) -> int:
    oh, ow = out_hw(L)
    return oh * ow * L["cout"] * (L["cin"] // L["groups"]) * L["k"] * L["k"]


# -- Quarry ------------------------------------------------------------------------------------------

def quarry_layer_cycles(L, cfg) -> int:
    """Start-to-HALT cycles of a one-layer program (conv + requantization into spad)."""
    from compiler.builder import ProgramBuilder
    from compiler.kernels import Requant
    from sim.golden import Machine

    b = ProgramBuilder(cfg)
    x = b.tensor(L["cin"], L["h"], L["w"])
    cout = L["cout"]
    w = np.ones((cout, L["cin"] // L["groups"], L["k"], L["k"]), np.int64)
    rq = Requant(bias=np.zeros(cout, np.int64), mult=np.ones(cout, np.int64), shift=np.full(cout, 8),
                 zp=0, lo=0, hi=(1 << cfg.a_bits) - 1)
    b.conv2d(x, w, rq, stride=(L["stride"],) * 2, padding=(L["pad"],) * 2, groups=L["groups"])
    return Machine(cfg).run(b.build()).cycles


def default_model_layers(cfg, model):
    """The default model compiled for ``cfg``: one row per layer with Quarry's cycles (the golden
    run split at each layer's last completion), its conv geometry, and the end-to-end cycles and
    program."""
    import compiler
    from compiler import data
    from compiler.frontend import capture
    from sim.golden import Machine

    xtr = data.load("mnist")[0]
    prog = compiler.compile(model, xtr[:64], cfg, method="minmax")
    graph = capture(model, tuple(xtr.shape[1:]))
    res = Machine(cfg).run(prog)
    # A layer's cycles: from the previous layer's last completion to its own (layers overlap
    # only at their boundaries: a POST or POOL waits for every engine).
    rows, pc, prev_end = [], 0, 0
    for lay in prog.manifest["layers"]:
        n = lay.get("instructions", 0)
        if not n:
            continue
        end = max(res.done[pc:pc + n])
        pc += n
        row = {"suite": "quarry_cnn", "name": lay["name"], "kind": lay["kind"], "quarry_cycles": int(end - prev_end)}
        prev_end = end
        L = graph[lay["name"]]
        if L.kind == "conv":
            cin_shape = graph[L.inputs[0]].shape
            cout, cin_g, kh, kw = L.weight.shape
            row.update(h=cin_shape[1], w=cin_shape[2], cin=cin_g * L.groups, cout=cout, k=kh, stride=L.stride[0],
                       pad=L.padding[0], groups=L.groups)
            row.update(macs=macs(row), ideal=-(-macs(row) // (cfg.rows * cfg.cols)))
        rows.append(row)
    return rows, res.cycles, prog


# -- SCALE-Sim ----------------------------------------------------------------------------------------

def scalesim_cycles(layers: list[dict], work: Path, log) -> list[int]:
    """SCALE-Sim total cycles for each layer (depthwise: summed over one-channel convs)."""
    if importlib.util.find_spec("scalesim") is None:
        raise BenchError("SCALE-Sim is not installed: pip install scalesim==2.0.2")
    if not SCALESIM_CFG.exists():
        raise BenchError(f"{SCALESIM_CFG} is missing")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cfg_text = SCALESIM_CFG.read_text().replace("ArrayHeight:    16", f"ArrayHeight:    {ROWS}") \
        .replace("ArrayWidth:     16", f"ArrayWidth:     {COLS}").replace("quarry_probe", "quarry")
    (work / "quarry.cfg").write_text(cfg_text)
    rows, owner = [], []
    for i, L in enumerate(layers):
        hp, wp = L["h"] + 2 * L["pad"], L["w"] + 2 * L["pad"]
        if L["groups"] == 1:
            rows.append((hp, wp, L["k"], L["cin"], L["cout"], L["stride"]))
            owner.append(i)
        else:  # depthwise / grouped: one conv per group
            for _ in range(L["groups"]):
                rows.append((hp, wp, L["k"], L["cin"] // L["groups"], L["cout"] // L["groups"], L["stride"]))
                owner.append(i)
    with open(work / "topology.csv", "w") as f:
        f.write("Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, Channels, Num Filter, Strides,\n")
        for j, (h, w, k, c, n, s) in enumerate(rows):
            f.write(f"l{j}, {h}, {w}, {k}, {k}, {c}, {n}, {s},\n")
    log(f"SCALE-Sim: {len(rows)} layers ...")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "scalesim.scale", "-c", "quarry.cfg", "-t", "topology.csv", "-p", "out"],
                       cwd=work, capture_output=True, text=True)
    if p.returncode != 0:
        raise BenchError(f"SCALE-Sim failed (rc {p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    log(f"SCALE-Sim: done in {time.time() - t0:.0f} s")
    with open(work / "out" / "quarry" / "COMPUTE_REPORT.csv") as f:
        rep = [r for r in csv.reader(f)][1:]
    totals = [0] * len(layers)
    for j, r in enumerate(rep):
        totals[owner[j]] += int(r[1])
    return totals


# -- benchmark ----------------------------------------------------------------------------------------

def run(ctx: Context) -> dict:
    cfg = _config()
    layers = peers_layers() + gemms() + (ctx.pick(resnet18_small(), resnet18_small()[:5]))
    out = {"config": {"rows": ROWS, "cols": COLS, "bits": BITS, "wmem_depth": WMEM_DEPTH, "spad_depth": SPAD_DEPTH,
                      "imem_depth": IMEM_DEPTH},
           "scalesim": {"version": "2.0.2", "config": SCALESIM_CFG.name}, "layers": [], "models": []}
    for L in progress(layers, desc="quarry layers", unit="layer"):
        out["layers"].append({**L, "macs": macs(L), "ideal": -(-macs(L) // (ROWS * COLS)),
                              "quarry_cycles": quarry_layer_cycles(L, cfg)})
    # The default model, layer by layer, as compiled.
    model_rows, model_cycles, prog = default_model_layers(cfg, ctx.trained("quarry_cnn", "mnist"))
    conv_rows = [r for r in model_rows if "cin" in r]
    ss = scalesim_cycles([r for r in out["layers"]] + conv_rows, ROOT / "build" / "bench" / "scalesim", ctx.log)
    for r, c in zip(out["layers"] + conv_rows, ss):
        r["scalesim_cycles"] = c
    for r in out["layers"] + model_rows:
        if "ideal" in r:
            r["quarry_util"] = r["macs"] / (r["quarry_cycles"] * ROWS * COLS)
        if "scalesim_cycles" in r:
            r["scalesim_util"] = r["macs"] / (r["scalesim_cycles"] * ROWS * COLS)
            r["quarry_over_scalesim"] = r["quarry_cycles"] / r["scalesim_cycles"]
    total_macs = sum(r.get("macs", 0) for r in model_rows)
    out["models"].append({"name": "quarry_cnn", "cycles": model_cycles, "macs": prog.manifest["macs"],
                          "ideal": -(-prog.manifest["macs"] // (ROWS * COLS)),
                          "utilisation": prog.manifest["macs"] / (model_cycles * ROWS * COLS),
                          "scalesim_cycles_convs": sum(r["scalesim_cycles"] for r in conv_rows),
                          "quarry_cycles_convs": sum(r["quarry_cycles"] for r in conv_rows),
                          "layer_macs": total_macs, "layers": model_rows})
    suites = {}
    for r in out["layers"]:
        s = suites.setdefault(r["suite"], {"quarry": 0, "scalesim": 0, "ideal": 0, "macs": 0})
        s["quarry"] += r["quarry_cycles"]
        s["scalesim"] += r["scalesim_cycles"]
        s["ideal"] += r["ideal"]
        s["macs"] += r["macs"]
    out["suites"] = suites
    return out


def _suite_table(res: dict, pes: int) -> list[str]:
    """Markdown rows of the per-suite totals: cycles, utilisation and the ratio to SCALE-Sim."""
    lines = ["| suite | MACs | ideal | Quarry | SCALE-Sim | Quarry util | SCALE-Sim util | Quarry / SCALE-Sim |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in res["suites"].items():
        lines.append(f"| {name} | {s['macs']:,} | {s['ideal']:,} | {s['quarry']:,} | {s['scalesim']:,} | "
                     f"{s['macs'] / (s['quarry'] * pes):.1%} | {s['macs'] / (s['scalesim'] * pes):.1%} | "
                     f"{s['quarry'] / s['scalesim']:.2f} |")
    return lines


def markdown(res: dict, meta: dict) -> str:
    c = res["config"]
    lines = [f"# Cycles per layer: Quarry vs ideal vs SCALE-Sim ({c['rows']}x{c['cols']}, weight stationary, "
             f"{c['bits']}-bit)", "",
             f"Generated by `{meta['command']}` on {meta['date']} (git {str(meta['git']['revision'])[:10]}"
             f"{', dirty tree' if meta['git']['dirty'] else ''}).", "",
             "Quarry cycles: the compiled program on `sim.golden`, whose cycle model equals the RTL's cycle count "
             "exactly (checked in `tests/test_rtl_system.py` on every random program and by `make demo` under "
             "Verilator). A single layer runs from program start to HALT, including weight preloads and the "
             "requantization of every output block into the scratchpad. SCALE-Sim 2.0.2, same array, "
             "weight-stationary (`bench/scalesim_ws.cfg`); it models compute only (no requantization).",
             "", "| suite | layer | MACs | ideal | Quarry | SCALE-Sim | Quarry util | SCALE-Sim util | Quarry / SCALE-Sim |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["layers"]:
        lines.append(f"| {r['suite']} | {r['name']} | {r['macs']:,} | {r['ideal']:,} | {r['quarry_cycles']:,} | "
                     f"{r['scalesim_cycles']:,} | {r['quarry_util']:.1%} | {r['scalesim_util']:.1%} | "
                     f"{r['quarry_over_scalesim']:.2f} |")
    lines += ["", *_suite_table(res, c["rows"] * c["cols"])]
    for mdl in res["models"]:
        lines += ["", f"## {mdl['name']} (default model, MNIST), end to end", "",
                  f"{mdl['cycles']:,} cycles per image for {mdl['macs']:,} MACs: {mdl['utilisation']:.1%} of "
                  f"{c['rows']}x{c['cols']} peak (ideal {mdl['ideal']:,}). Conv/linear layers: Quarry "
                  f"{mdl['quarry_cycles_convs']:,} cycles vs SCALE-Sim {mdl['scalesim_cycles_convs']:,} "
                  f"({mdl['quarry_cycles_convs'] / mdl['scalesim_cycles_convs']:.2f}x).", "",
                  "| layer | kind | MACs | ideal | Quarry | SCALE-Sim | Quarry util |", "|---|---|---|---|---|---|---|"]
        for r in mdl["layers"]:
            lines.append(f"| {r['name']} | {r['kind']} | {r.get('macs', 0):,} | {r.get('ideal', 0):,} | "
                         f"{r['quarry_cycles']:,} | {r.get('scalesim_cycles', '–') if 'scalesim_cycles' not in r else format(r['scalesim_cycles'], ',')} | "
                         f"{r['quarry_util']:.1%} |" if "quarry_util" in r else
                         f"| {r['name']} | {r['kind']} | – | – | {r['quarry_cycles']:,} | – | – |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["layers"] + [r for m in res["models"] for r in m["layers"] if "quarry_util" in r]
    fig, ax = plt.subplots(figsize=(max(8, 0.38 * len(rows)), 4.2))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["quarry_util"] for r in rows], 0.4, label="Quarry (RTL-exact cycle model)")
    ax.bar(x + 0.2, [r.get("scalesim_util", 0) for r in rows], 0.4, label="SCALE-Sim 2.0.2")
    ax.set_xticks(x, [r["name"] for r in rows], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("utilisation (MACs / (cycles x PEs))")
    ax.set_ylim(0, 1.05)
    ax.axhline(0.95, color="grey", lw=0.6, ls="--")
    ax.legend(fontsize=8)
    ax.set_title(f"Per-layer utilisation, {res['config']['rows']}x{res['config']['cols']} weight stationary")
    save_figure(fig, path)
    plt.close(fig)


#: Output positions from which a layer counts as large for the utilisation headline.
BIG_MAP = 256


def fills_array(r: dict, cfg: dict) -> bool:
    """A layer whose reduction (cin/groups x k x k) and output channels both fill the array."""
    return (r["cin"] // r["groups"]) * r["k"] * r["k"] >= cfg["rows"] and r["cout"] // r["groups"] >= cfg["cols"]


def summary(res: dict, meta: dict) -> str:
    c = res["config"]
    pes = c["rows"] * c["cols"]
    full = [r for r in res["layers"] if fills_array(r, c)]
    utils = [r["quarry_util"] for r in full]
    lines = [f"Per-layer cycles on a {c['rows']}x{c['cols']} {c['bits']}-bit weight-stationary array: Quarry "
             "(the golden model's cycle count, which equals the RTL's: see rtl_util below and "
             "`tests/test_rtl_system.py`) against the ideal MACs / PEs and SCALE-Sim "
             f"{res['scalesim']['version']} on the same array (compute only, no requantization)."]
    if utils:
        lines[-1] += (f" Layers that fill the array (reduction cin/groups x k x k >= {c['rows']} and >= {c['cols']} "
                      f"output channels; {len(full)} of {len(res['layers'])}): utilisation {min(utils):.1%}–"
                      f"{max(utils):.1%}, median {sorted(utils)[len(utils) // 2]:.1%}.")
        big = [r["quarry_util"] for r in full if out_hw(r)[0] * out_hw(r)[1] >= BIG_MAP]
        if big:
            lines[-1] += (f" Of those, the {len(big)} with >= {BIG_MAP} output positions (where the weight preload "
                          f"and pipeline fill are amortised): {min(big):.1%}–{max(big):.1%}.")
    lines += ["", *_suite_table(res, pes)]
    tot_q = sum(s["quarry"] for s in res["suites"].values())
    tot_s = sum(s["scalesim"] for s in res["suites"].values())
    lines.append(f"| all | {sum(s['macs'] for s in res['suites'].values()):,} | "
                 f"{sum(s['ideal'] for s in res['suites'].values()):,} | {tot_q:,} | {tot_s:,} | | | "
                 f"{tot_q / tot_s:.2f} |")
    for mdl in res["models"]:
        lines += ["", f"Default model ({mdl['name']}, MNIST) end to end: {mdl['cycles']:,} cycles per image for "
                  f"{mdl['macs']:,} MACs, {mdl['utilisation']:.1%} of the {c['rows']}x{c['cols']} peak; its "
                  f"conv/linear layers {mdl['quarry_cycles_convs']:,} cycles vs SCALE-Sim "
                  f"{mdl['scalesim_cycles_convs']:,} ({mdl['quarry_cycles_convs'] / mdl['scalesim_cycles_convs']:.2f}x)."]
    return "\n".join(lines)
