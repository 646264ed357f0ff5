"""DSConv block-scaled weights against per-channel integer weights at 4, 3 and 2 bits, and DSConv
with its block-floating-point activations.

The default model (``compiler.zoo``'s ``quarry_cnn``) on MNIST and Fashion-MNIST, same data,
calibration and test subsets as :mod:`bench.accuracy`; every number from the compiled program on
the golden model (``simulate`` is checked against it on the first 200 images). Each width runs
on a 16x16 array of that weight width with ``block_scale`` (DSConv's rescale in the accumulator
path; INT rows use its identity scale row), 8-bit and 4-bit activations, empirical bias
correction. Weight memory counts the weights at their bits plus, for DSConv, one scale
(``mult_bits`` + ``shift_bits``) per block of 16 input channels per output channel and tap.
``dsconv+bfp`` rows add DSConv's block-floating-point activations (``QuantOptions.bfp``: an
exponent of :data:`BFP_EXP_BITS` bits per pixel and block of 16 channels beside the ``a_bits``
mantissas) on a config with ``bfp_exp_bits``; the tensors it applies to are listed per row.
Finished rows are checkpointed, so a killed run resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .accuracy import CALIB_IMAGES, COLS, ROWS, _data
from .common import Checkpoint, GoldenRunner, fingerprint, progress, save_figure

DESCRIPTION = "DSConv block-scaled weights vs per-channel INT at 4/3/2 bits: top-1 and weight memory"

DATASETS = ("mnist", "fashion")
SIM_CHECK_IMAGES = 200
BASE = {"method": "mse", "bias_correction": "empirical"}
#: Exponent bits of the ``dsconv+bfp`` rows (exponents 0..7).
BFP_EXP_BITS = 3
METHODS = ("minmax", "dsconv", "dsconv+bfp")
#: (weight bits, activation bits, weight method; ``dsconv+bfp``: DSConv with BFP activations)
GRID = tuple((wb, ab, wm) for ab in (8, 4) for wb in (4, 3, 2) for wm in METHODS)
QUICK_GRID = ((4, 8, "minmax"), (4, 8, "dsconv"), (3, 8, "dsconv"), (4, 4, "dsconv"), (4, 4, "dsconv+bfp"))
PAPER = "DSConv (Nascimento et al., ICCV 2019): < 1 % top-1 loss at 4-bit weights without retraining"


def run(ctx) -> dict:
    import torch

    from compiler import zoo
    from compiler.frontend import capture
    from compiler.lower import lower
    from compiler.quantize import QuantOptions, quantize, simulate
    from hw.config import AccelConfig

    n = ctx.images or ctx.pick(1000, 200)
    grid = ctx.pick(GRID, QUICK_GRID)
    out = {"config": {"rows": ROWS, "cols": COLS, "block_scale": True, "bfp_exp_bits": BFP_EXP_BITS}, "images": n,
           "calibration_images": CALIB_IMAGES, "base": BASE, "paper": PAPER, "datasets": {}, "rows": []}
    fp = fingerprint([grid, n, ROWS, COLS, CALIB_IMAGES, BASE, SIM_CHECK_IMAGES],
                     ("compiler/quantize.py", "compiler/dsconv.py", "compiler/zoo.py", "compiler/data.py"),
                     [ctx.zoo_glob()])
    ckpt = Checkpoint(ctx.out / f".dsconv{'-quick' if ctx.quick else ''}.checkpoint.json", fp,
                      lambda r: (r["dataset"], r["w_bits"], r["a_bits"], r["weight_method"]), "rows", ctx.log)
    done = ckpt.load()
    for ds in ctx.datasets(DATASETS):
        calib, _, _, x, y = _data(ds, n)
        model = ctx.trained("quarry_cnn", ds)
        float_acc = zoo.evaluate(model, torch.from_numpy(x), torch.from_numpy(y))
        graph = capture(model, tuple(x.shape[1:]))
        out["datasets"][ds] = {"images": len(x), "float_top1": float_acc}
        with GoldenRunner(x, ctx.jobs) as golden:
            for wb, ab, wm in progress(grid, desc=f"{ds} DSConv"):
                if (ds, wb, ab, wm) in done:
                    out["rows"].append(done[(ds, wb, ab, wm)])
                    continue
                bfp = wm.endswith("+bfp")
                cfg = AccelConfig(rows=ROWS, cols=COLS, w_bits=wb, a_bits=ab, block_scale=True, param_depth=1024,
                                  bfp_exp_bits=BFP_EXP_BITS if bfp else 0)
                t = time.time()
                qg = quantize(graph, cfg, calib, QuantOptions(weight_method=wm.removesuffix("+bfp"), bfp=bfp, **BASE))
                prog = lower(qg)
                secs = time.time() - t
                logits = golden.logits(prog)
                sim = simulate(qg, x[:SIM_CHECK_IMAGES])
                wmem = prog.manifest["weight_memory"]
                top1 = float((logits.argmax(1) == y).mean())
                row = {"dataset": ds, "w_bits": wb, "a_bits": ab, "weight_method": wm, "top1": top1,
                       "delta_float": top1 - float_acc, "weight_bytes": wmem["bytes"],
                       "int8_bytes": wmem["int8_bytes"], "param_rows": len(prog.images.get("param", [])),
                       "seconds": round(secs, 1),
                       "bfp_layers": prog.manifest["quant"].get("bfp_layers", []),
                       "simulate_matches_golden": bool(np.array_equal(sim, logits[:len(sim)]))}
                out["rows"].append(row)
                ctx.log(f"{ds} W{wb}A{ab} {wm}: top-1 {top1:.4f}, weights {wmem['bytes']} bytes")
                ckpt.save(out["rows"])
    ckpt.remove()
    return out


def markdown(res: dict, meta: dict) -> str:
    lines = [f"# DSConv vs per-channel INT weights ({res['images']} test images per data set)", "",
             f"16x16 `block_scale` array, {res['calibration_images']} calibration images, activations "
             "OMSE-clipped, empirical bias correction; top-1 from the golden model. Paper: " + res["paper"] + ".", ""]
    for ds, d in res["datasets"].items():
        lines += [f"## {ds} (float top-1 {100 * d['float_top1']:.1f} %)", "",
                  "| weights | activations | per-channel INT | DSConv | DSConv + BFP activations | INT bytes "
                  "| DSConv bytes |",
                  "|---|---|---|---|---|---|---|"]
        rows = {(r["w_bits"], r["a_bits"], r["weight_method"]): r for r in res["rows"] if r["dataset"] == ds}
        for wb, ab in sorted({(k[0], k[1]) for k in rows}, key=lambda t: (-t[1], -t[0])):
            i, s, f = (rows.get((wb, ab, m)) for m in METHODS)

            def cell(r):
                return "—" if r is None else f"{100 * r['top1']:.1f} % ({100 * r['delta_float']:+.1f})"

            lines.append(f"| {wb}-bit | {ab}-bit | {cell(i)} | {cell(s)} | {cell(f)} | {i['weight_bytes'] if i else '—'} | "
                         f"{s['weight_bytes'] if s else '—'} |")
        lines.append("")
    bl = sorted({", ".join(r.get("bfp_layers", [])) for r in res["rows"] if r["weight_method"].endswith("+bfp")})
    if bl:
        lines += [f"BFP activations: {res['config'].get('bfp_exp_bits')}-bit exponent per pixel and block of "
                  f"{res['config']['rows']} channels, on the conv-to-conv tensors ({'; '.join(bl)}); the model "
                  "input, pool inputs and residual operands stay uniform.", ""]
    bad = [r for r in res["rows"] if not r["simulate_matches_golden"]]
    lines.append(f"`simulate` equals the golden model on every row: {'yes' if not bad else 'NO'}.")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res["datasets"]), figsize=(5 * len(res["datasets"]), 3.6), squeeze=False)
    for ax, (ds, d) in zip(axes[0], res["datasets"].items()):
        for wm, mk in (("minmax", "o"), ("dsconv", "s"), ("dsconv+bfp", "^")):
            for ab, ls in ((8, "-"), (4, "--")):
                rs = sorted((r for r in res["rows"] if r["dataset"] == ds and r["weight_method"] == wm
                             and r["a_bits"] == ab), key=lambda r: r["weight_bytes"])
                if rs:
                    ax.plot([r["weight_bytes"] for r in rs], [100 * r["top1"] for r in rs], marker=mk, ls=ls,
                            label=f"{ {'dsconv': 'DSConv', 'minmax': 'INT per-channel'}.get(wm, 'DSConv + BFP')} A{ab}")
        ax.axhline(100 * d["float_top1"], color="gray", lw=0.8, label="float")
        ax.set(title=ds, xlabel="weight bytes", ylabel="top-1 %")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def summary(res: dict, meta: dict) -> str:
    dss = list(res["datasets"])
    lines = [f"DSConv block-scaled weights vs per-channel INT on a {res['config']['rows']}x{res['config']['cols']} "
             f"`block_scale` array, {res['images']} test images per data set, no retraining; top-1 (vs float) on "
             "the golden model. Float: " + ", ".join(f"{ds} {100 * d['float_top1']:.1f} %"
                                                       for ds, d in res["datasets"].items()) + ".", "",
             "| weights / activations | " + " | ".join(f"{ds} INT | {ds} DSConv | {ds} DSConv + BFP" for ds in dss)
             + " | INT bytes | DSConv bytes |", "|---|" + "---|" * (3 * len(dss) + 2)]
    rows = {(r["dataset"], r["w_bits"], r["a_bits"], r["weight_method"]): r for r in res["rows"]}
    for wb, ab in sorted({(r["w_bits"], r["a_bits"]) for r in res["rows"]}, key=lambda t: (-t[1], -t[0])):
        cells = []
        for ds in dss:
            for wm in METHODS:
                r = rows.get((ds, wb, ab, wm))
                cells.append("–" if r is None else f"{100 * r['top1']:.1f} % ({100 * r['delta_float']:+.1f})")
        i = next((r for k, r in rows.items() if k[1:] == (wb, ab, "minmax")), None)
        d = next((r for k, r in rows.items() if k[1:] == (wb, ab, "dsconv")), None)
        lines.append(f"| W{wb}A{ab} | " + " | ".join(cells) + f" | {i['weight_bytes'] if i else '–'} | "
                     f"{d['weight_bytes'] if d else '–'} |")
    lines += ["", f"Paper: {res['paper']}. DSConv bytes include each block's scale (a 24-bit multiplier + 6-bit "
              "shift per block of input channels). BFP: DSConv's block-floating-point activations, a "
              f"{res['config'].get('bfp_exp_bits')}-bit exponent per pixel and block of channels on the conv-to-conv "
              "tensors (details in bench/results/dsconv.md)."]
    return "\n".join(lines)
