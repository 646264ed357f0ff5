"""Low-bit recovery: accuracy vs total weight bits for uniform W2/W3/W4 (PTQ and QAT) and per-layer
mixed precision at the same budgets, on the default model (``compiler.zoo``'s ``quarry_cnn``).

Same data, calibration images and test subsets as :mod:`bench.accuracy`. Every row is the integer
program on a 16x16 array built with 8-bit weight memory (so a layer may take any width up to 8)
and ``b``-bit activations; the row's top-1 is :func:`compiler.quantize.simulate` on all test images
(the accelerator's integer arithmetic), and the compiled program is run on the golden model for
the first ``GOLDEN_IMAGES`` images and compared bit for bit.

Rows per data set and ``b`` in 2, 3, 4 (activations ``b`` bits everywhere):

* ``ptq``: uniform W``b``, the recommended PTQ of :mod:`bench.accuracy` (OMSE clip, GPTQ weights,
  empirical bias correction);
* ``lsq`` / ``pact``: uniform W``b`` fine-tuned with LSQ (every ``b``) or PACT + SAWB (``b`` = 2,
  the paper's claim; CPU time), starting from the ``ptq`` network (:mod:`compiler.qat`);
* ``mixed_ptq``: per-layer weight bits in 2..8 chosen by :mod:`compiler.mixed` under the budget
  ``b x weights`` (the uniform row's total), same PTQ;
* ``mixed_lsq``: those bits, then LSQ.

Finished rows are checkpointed, so a killed run resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .accuracy import CALIB_IMAGES, COLS, RECOMMENDED, ROWS, _data
from .common import Checkpoint, GoldenRunner, fingerprint, progress, save_figure

DESCRIPTION = "LSQ / PACT fine-tuning and per-layer mixed precision at 2-4 bits: top-1 vs total weight bits"

DATASETS = ("mnist", "fashion")
BITS = (2, 3, 4)
#: QAT epochs per data set (MNIST: the 4,000 training images per epoch with the zoo's
#: augmentation; Fashion-MNIST: 10,000 of its 60,000 per epoch, as the zoo recipe samples).
EPOCHS = {"mnist": 4, "fashion": 2}
QUICK_EPOCHS = {"mnist": 1, "fashion": 1}
SEED = 0
GOLDEN_IMAGES = 50
#: (key, label, QAT method or None, mixed precision, bits it runs at)
SETTINGS = (
    ("ptq", "PTQ uniform", None, False, BITS),
    ("lsq", "LSQ uniform", "lsq", False, BITS),
    ("pact", "PACT+SAWB uniform", "pact", False, (2,)),  # PACT/SAWB's claim is about 2 bits
    ("mixed_ptq", "PTQ mixed", None, True, BITS),
    ("mixed_lsq", "LSQ mixed", "lsq", True, BITS),
)
QUICK_KEYS = ("ptq", "lsq", "mixed_ptq")
#: The papers' headlines (../shared/METHODS.md).
PAPERS = {
    "lsq": "LSQ (Esser et al.): 3-bit weights and activations reach full-precision accuracy (ImageNet)",
    "pact": "PACT + SAWB (Choi et al.): 2-bit comparable to full precision",
    "mixed": "bit-length regularisation (Nikolic et al.): ~4 bits per layer on average within 0.5-2 % of float",
}


def _fp(keys, n, epochs, zoo_glob: tuple) -> str:
    return fingerprint([keys, n, epochs, ROWS, COLS, CALIB_IMAGES, RECOMMENDED, BITS, SEED, GOLDEN_IMAGES],
                       ("compiler/quantize.py", "compiler/qat.py", "compiler/mixed.py", "compiler/zoo.py",
                        "compiler/data.py"), [zoo_glob])


def run(ctx) -> dict:
    import torch

    from compiler import data, mixed, zoo
    from compiler.frontend import capture
    from compiler.lower import lower
    from compiler.pot import retrain_recipe
    from compiler.qat import build
    from compiler.quantize import QuantOptions, simulate
    from hw.config import AccelConfig

    n = ctx.images or ctx.pick(1000, 200)
    keys = ctx.pick(tuple(s[0] for s in SETTINGS), QUICK_KEYS)
    epochs = ctx.pick(EPOCHS, QUICK_EPOCHS)
    bits_list = ctx.pick(BITS, (2,))
    datasets = ctx.datasets(DATASETS)
    out = {"config": {"rows": ROWS, "cols": COLS, "w_bits": 8}, "images": n, "calibration_images": CALIB_IMAGES,
           "ptq": RECOMMENDED, "epochs": epochs, "seed": SEED, "golden_images": GOLDEN_IMAGES, "papers": PAPERS,
           "datasets": {}, "rows": []}
    for ds in datasets:
        ctx.trained("quarry_cnn", ds)
    ckpt = Checkpoint(ctx.out / f".qat{'-quick' if ctx.quick else ''}.checkpoint.json",
                      _fp(keys, n, epochs, ctx.zoo_glob()),
                      lambda r: (r["dataset"], r["key"], r["bits"]), "rows", ctx.log)
    done = ckpt.load()
    opts = QuantOptions(**RECOMMENDED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # QAT trains on one thread; the golden workers take the other core
    try:
        for ds in datasets:
            calib, _, _, x, y = _data(ds, n)
            xtr, ytr = data.load(ds)[:2]
            model = ctx.trained("quarry_cnn", ds)
            float_acc = zoo.evaluate(model, torch.from_numpy(x), torch.from_numpy(y))
            graph = capture(model, tuple(x.shape[1:]))
            sizes = mixed.layer_sizes(graph)
            total = sum(sizes.values())
            out["datasets"][ds] = {"images": len(x), "float_top1": float_acc, "weights": total, "layers": sizes}
            ctx.log(f"{ds}: float top-1 {float_acc:.4f} on {len(x)} images, {total} weights")
            rc = retrain_recipe(ds)
            qat_kw = {"per_epoch": rc["per_epoch"], "batch": rc["batch"], "augment": rc["augment"],
                      "epochs": epochs[ds], "seed": SEED, "log": ctx.log}
            plans = {}
            with GoldenRunner(x[:GOLDEN_IMAGES], ctx.jobs) as golden:
                todo = [(b, s) for b in bits_list for s in SETTINGS if s[0] in keys and (ctx.quick or b in s[4])]
                for b, (key, label, method, is_mixed, _) in progress(todo, desc=f"{ds} QAT"):
                    if (ds, key, b) in done:
                        out["rows"].append(done[(ds, key, b)])
                        continue
                    cfg = AccelConfig(rows=ROWS, cols=COLS, w_bits=8, a_bits=b)
                    t = time.time()
                    budget = b * total if is_mixed else None
                    layer_bits = None
                    if is_mixed and b in plans:  # the same bits for PTQ and QAT at a budget
                        layer_bits, budget = plans[b], None
                    qg = build(graph, cfg, calib, opts=opts, w_bits=b, a_bits=b, layer_bits=layer_bits,
                               budget_bits=budget, qat_method=method, train=(xtr, ytr), progress=False, **qat_kw)
                    q = qg.quant_manifest
                    if is_mixed and q["mixed"] is not None:
                        plans[b] = {n_: (w, None) for n_, (w, a) in q["layer_bits"].items()}
                        out["datasets"][ds].setdefault("mixed", {})[str(b)] = q["mixed"]
                    prog = lower(qg)
                    secs = time.time() - t
                    pending = golden.submit(prog)
                    logits = simulate(qg, x)
                    top1 = float((logits.argmax(1) == y).mean())
                    gold = pending.get()
                    wm = prog.manifest["weight_memory"]
                    row = {"dataset": ds, "key": key, "label": label, "bits": b, "method": method or "ptq",
                           "mixed": is_mixed, "top1": top1, "delta_float": top1 - float_acc,
                           "layer_bits": q["layer_bits"], "weight_bits": sum(sizes[k] * v[0] for k, v in q["layer_bits"].items()),
                           "packed_bytes": wm["bytes"], "wmem_bytes": wm["wmem_bytes"], "wmem_rows": wm["wmem_rows"],
                           "budget_bits": b * total, "predicted_cycles": prog.manifest["predicted_cycles"],
                           "qat": q["qat"], "seconds": round(secs, 1),
                           "golden_matches_simulate": bool(np.array_equal(gold, logits[:len(gold)]))}
                    out["rows"].append(row)
                    ctx.log(f"{ds} W{b}A{b} {label}: top-1 {top1:.4f} ({row['delta_float'] * 100:+.1f} pt), "
                            f"{row['weight_bits']} weight bits, {secs:.0f} s")
                    ckpt.save(out["rows"])
    finally:
        torch.set_num_threads(threads)
    bad = [r for r in out["rows"] if not r["golden_matches_simulate"]]
    if bad:
        ctx.log(f"WARNING: the golden model disagrees with simulate on {len(bad)} rows")
    ckpt.remove()
    return out


# -- reporting -------------------------------------------------------------------------------------

def _pt(v: float) -> str:
    return f"{round(100 * v, 1) + 0.0:+.1f} pt"


def _row(res, ds, key, b):
    return next((r for r in res["rows"] if (r["dataset"], r["key"], r["bits"]) == (ds, key, b)), None)


def markdown(res: dict, meta: dict) -> str:
    lines = [
        "# Low bits: QAT (LSQ, PACT + SAWB) and per-layer mixed precision", "",
        f"Model `quarry_cnn` (compiler/zoo.py), {res['config']['rows']}x{res['config']['cols']} array with 8-bit "
        f"weight memory and b-bit activations, {res['calibration_images']} calibration images from the training "
        f"split, {res['images']} test images per data set (one image is {100 / res['images']:.1f} pt). Top-1 is "
        "`compiler.quantize.simulate` (the accelerator's integer arithmetic) on the compiled integer graph; the "
        f"lowered program on `sim.golden.Machine` gives the same raw outputs on the first {res['golden_images']} "
        "images of every row (checked below).",
        f"Generated by `{meta['command']}` on {meta['date']} (git {str(meta['git']['revision'])[:10]}"
        f"{', dirty tree' if meta['git']['dirty'] else ''}; {meta['machine']['cpu_count']} CPUs shared with other "
        f"jobs, {meta['wall_seconds']:.0f} s wall).", "",
        f"PTQ: `{res['ptq']}`. QAT starts from that PTQ network (its integer weights, corrected biases and "
        "scales) and trains "
        + ", ".join(f"{e} epochs on {ds}" for ds, e in res["epochs"].items())
        + f" (Adam, cosine schedule, zoo sampling/augmentation, seed {res['seed']}, one thread). Mixed precision: "
        "weight bits per layer in 2..8 under the budget b x (number of weights), chosen from each layer's measured "
        "sensitivity (KL from the float outputs on the calibration images with only that layer narrowed) by the "
        "exact knapsack of `compiler.mixed` (the sensitivity is measured with nearest rounding and no bias "
        "correction, the rows then use the PTQ above); activations stay b bits. At b = 2 the budget leaves no "
        "choice (2 bits is the narrowest width), so the mixed rows repeat the uniform ones. *weight bits* = sum of weights x the layer's "
        "bits (the packed size); *wmem bytes* = the weight-memory rows the program uses x 16 lanes x 8 bits "
        "(these programs were compiled without `--packed-weights`, so every weight takes an 8-bit lane; with it, "
        "a layer of k-bit weights stores 8 // k per lane: the README's mixed-precision section measures 233 "
        "instead of 505 wmem rows for a 3-bit-per-weight budget).", "",
    ]
    for ds, d in res["datasets"].items():
        lines += [f"## {ds}: float top-1 {d['float_top1']:.2%}, {d['weights']} weights", "",
                  "| b | setting | top-1 | vs float | weight bits | bits/weight | packed bytes | wmem bytes | "
                  "per-layer W | QAT s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in [r for r in res["rows"] if r["dataset"] == ds]:
            per = " ".join(f"{k.split('_')[0]}:{v[0]}" for k, v in r["layer_bits"].items())
            qs = r["qat"]["seconds"] if r["qat"] else "–"
            lines.append(f"| {r['bits']} | {r['label']} | {r['top1']:.2%} | {_pt(r['delta_float'])} | "
                         f"{r['weight_bits']} | {r['weight_bits'] / d['weights']:.2f} | {r['packed_bytes']} | "
                         f"{r['wmem_bytes']} | {per} | {qs} |")
        for b, m in sorted(d.get("mixed", {}).items()):
            sens = "; ".join(f"{k}: " + " ".join(f"{w}b {v:+.3f}" for w, v in c.items() if int(w) < 8)
                             for k, c in m["sensitivity"].items())
            lines += ["", f"Sensitivity at A{b} (KL increase; all-8-bit-weight KL {m['baseline_kl']:.4f}): {sens}."]
        lines.append("")
    lines += ["## Against the papers", ""]
    for ds in res["datasets"]:
        f = res["datasets"][ds]["float_top1"]
        cells = []
        for b in (2, 3, 4):
            got = {k: _row(res, ds, k, b) for k in ("ptq", "lsq", "pact", "mixed_lsq")}
            if got["ptq"] is None:
                continue
            cells.append(f"W{b}A{b}: PTQ {_pt(got['ptq']['top1'] - f)}"
                         + "".join(f", {k} {_pt(r['top1'] - f)}" for k, r in got.items() if k != "ptq" and r))
        lines.append(f"- {ds} (vs float): " + "; ".join(cells) + ".")
    lines += ["", *(f"- Paper: {v}." for v in res["papers"].values()), ""]
    ok = all(r["golden_matches_simulate"] for r in res["rows"])
    lines += [f"Golden model == simulate on the first {res['golden_images']} images of "
              f"{'every' if ok else 'NOT every'} row.", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dss = list(res["datasets"])
    fig, axes = plt.subplots(1, len(dss), figsize=(6.4 * len(dss), 4.6), squeeze=False)
    style = {"ptq": ("o", "C0"), "lsq": ("s", "C1"), "pact": ("^", "C2"), "mixed_ptq": ("D", "C3"),
             "mixed_lsq": ("*", "C4")}
    for ax, ds in zip(axes[0], dss):
        d = res["datasets"][ds]
        for key, label, *_ in SETTINGS:
            rows = sorted([r for r in res["rows"] if r["dataset"] == ds and r["key"] == key], key=lambda r: r["weight_bits"])
            if not rows:
                continue
            mk, c = style[key]
            ax.plot([r["weight_bits"] / d["weights"] for r in rows], [100 * r["top1"] for r in rows], marker=mk,
                    color=c, ms=8 if mk == "*" else 6, label=label)
        ax.axhline(100 * d["float_top1"], color="k", ls="--", lw=1, label="float")
        ax.set_xlabel("weight bits per weight (total / weights); activations = budget bits")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{ds} ({res['images']} test images)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle("quarry_cnn: PTQ vs QAT vs mixed precision")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def summary(res: dict, meta: dict) -> str:
    dss = list(res["datasets"])
    keys = dict.fromkeys(r["key"] for r in res["rows"])
    labels = {r["key"]: r["label"] for r in res["rows"]}
    lines = [f"Low bits (W*b*A*b*), {res['images']} test images per data set; QAT epochs "
             + ", ".join(f"{ds} {e}" for ds, e in res["epochs"].items())
             + f"; PTQ = {res['ptq']['method']} / {res['ptq']['weight_method']} / {res['ptq']['bias_correction']}; "
             "*mixed*: per-layer weight bits under the same total weight bits as uniform *b*. "
             "Top-1 (vs float); float " + ", ".join(f"{ds} {d['float_top1']:.1%}" for ds, d in res["datasets"].items())
             + ".", "",
             "| b | " + " | ".join(f"{ds} {labels[k]}" for ds in dss for k in keys) + " |",
             "|---|" + "---|" * (len(dss) * len(keys))]
    for b in sorted({r["bits"] for r in res["rows"]}):
        cells = []
        for ds in dss:
            f = res["datasets"][ds]["float_top1"]
            for k in keys:
                r = _row(res, ds, k, b)
                cells.append("–" if r is None else f"{r['top1']:.1%} ({_pt(r['top1'] - f)})")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += ["", *(f"Paper: {v}." for v in res["papers"].values())]
    return "\n".join(lines)
