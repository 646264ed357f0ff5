"""``python -m compiler MODEL --pe 16x16 --bits 4 --method aciq --calib 256 --data mnist --out build/model``

Power-of-two weights: ``--weight-method inq|doubleq|doubleqext --pe-kind pot|hybrid`` with
``--pot-bits``, ``--pot-granularity``, ``--pot-scale``, ``--pot-rounding``, ``--pot-budget`` (``0.77`` = 77 % of the 8-bit
weight memory, ``4000B`` = bytes), ``--pot-layers a,b`` and ``--inq-retrain EPOCHS`` (see
:mod:`compiler.pot`).

Low bits (:mod:`compiler.qat`, :mod:`compiler.mixed`): ``--qat lsq|pact --epochs N`` fine-tunes on the
data set's training split, ``--budget-bits B`` chooses each conv/linear layer's weight bits (2 .. the
PE width) under a total of B weight bits, ``--layer-bits name=W[/A],...`` pins layers.

MODEL is a zoo name (``quarry_cnn``), a ``torch.save``d module file, or ``package.module:factory``.
Writes OUT/program.qprog, OUT/manifest.json, OUT/{wmem,param}.hex ($readmemh) and .bin, and
OUT/report.json; all or nothing.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

import torch

from hw import isa
from hw.build import _Parser, add_config_args, config_from_args
from hw.config import ConfigError
from hw.program import IMAGE_LAYOUTS, atomic_dir, write_readmemh

from . import CompileError, data, zoo
from .frontend import UnsupportedOpError
from .kernels import KernelError
from .lower import LowerError
from .quantize import METHODS, POT_METHODS, WEIGHT_METHODS, QuantError, QuantOptions


def load_model(spec: str, dataset: str | None):
    if spec in zoo.MODELS:
        return zoo.trained(spec, dataset or "mnist", log=lambda s: print(s, file=sys.stderr))
    if ":" in spec and not Path(spec).exists():
        mod, _, fn = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except Exception as e:  # noqa: BLE001 - ImportError, AttributeError, or the module's own error
            raise CompileError(f"cannot load model factory {spec!r}: {type(e).__name__}: {e}") from None
        try:
            model = factory()
        except Exception as e:  # noqa: BLE001 - user code
            raise CompileError(f"model factory {spec!r} failed: {type(e).__name__}: {e}") from None
        if not isinstance(model, torch.nn.Module):
            raise CompileError(f"model factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    try:
        obj = torch.load(spec, weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CompileError(f"cannot load model file {spec!r}: {e}") from None
    if not isinstance(obj, torch.nn.Module):
        raise CompileError(f"{spec} holds a {type(obj).__name__}, not a torch.nn.Module (save the module itself)")
    return obj


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise CompileError(f"--input-shape must look like CxHxW (e.g. 1x28x28), not {text!r}")
    return dims


def parse_budget(text: str) -> float | int:
    """``--pot-budget``: ``0.77`` (fraction of the 8-bit weight memory) or ``4000B`` (bytes)."""
    t = text.strip()
    try:
        v = int(t[:-1]) if t[-1:] in "bB" and t[:-1].strip().isdigit() else float(t)
    except ValueError:
        v = None
    if isinstance(v, float) and not 0 < v <= 1 or isinstance(v, int) and v < 1 or v is None:
        raise CompileError(f"--pot-budget must be a fraction in (0, 1] (e.g. 0.77) or bytes (e.g. 4000B), not {text!r}")
    return v


def pot_options(args) -> dict:
    """QuantOptions keywords for the ``--pot-*`` options that were given."""
    kw = {}
    if args.pot_bits is not None:
        kw["pot_bits"] = args.pot_bits
    if args.pot_granularity is not None:
        kw["pot_granularity"] = args.pot_granularity
    if args.pot_scale is not None:
        kw["pot_scale"] = args.pot_scale
    if args.pot_rounding is not None:
        kw["pot_rounding"] = args.pot_rounding
    if args.pot_budget is not None:
        kw["pot_budget"] = parse_budget(args.pot_budget)
    if args.pot_layers is not None:
        kw["pot_layers"] = tuple(n.strip() for n in args.pot_layers.split(",") if n.strip())
    if args.dsconv_block is not None:
        kw["dsconv_block"] = args.dsconv_block
    if args.bfp:
        kw["bfp"] = True
    return kw


def parse_budget_bits(text: str) -> int:
    """``--budget-bits``: a whole number of weight bits >= 1."""
    t = text.strip()
    if not t.isdigit() or int(t) < 1:
        raise CompileError(f"--budget-bits must be a whole number of weight bits >= 1 (e.g. 17184), not {text!r}")
    return int(t)


def low_bit_options(args, cfg) -> dict:
    """Check ``--qat``/``--epochs``/``--budget-bits``/``--layer-bits``; {} when none is given."""
    from .mixed import parse_layer_bits
    from .qat import QAT_METHODS

    low = {}
    if args.qat is not None:
        if args.qat not in QAT_METHODS:
            raise CompileError(f"--qat must be one of {', '.join(QAT_METHODS)}, not {args.qat!r}")
        low["qat"] = args.qat
        low["epochs"] = 3 if args.epochs is None else args.epochs
        if low["epochs"] < 1:
            raise CompileError(f"--epochs must be >= 1, not {args.epochs}")
        if args.data is None and args.model not in zoo.MODELS:
            raise CompileError("--qat needs --data (it trains on the data set's training split)")
    elif args.epochs is not None:
        raise CompileError("--epochs applies to --qat")
    if args.budget_bits is not None:
        low["budget_bits"] = parse_budget_bits(args.budget_bits)
    if args.layer_bits is not None:
        low["layer_bits"] = parse_layer_bits(args.layer_bits)
    if low and args.weight_method not in ("minmax", "mse", "gptq"):
        which = "--qat" if "qat" in low else "--budget-bits" if "budget_bits" in low else "--layer-bits"
        raise CompileError(f"{which} works on INT weights, not --weight-method {args.weight_method}")
    if low and args.inq_retrain is not None:
        raise CompileError("--inq-retrain does not combine with --qat/--budget-bits/--layer-bits")
    return low


def compile_low_bit(model, calib, cfg, args, low: dict):
    """The ``--qat``/``--budget-bits``/``--layer-bits`` path: PTQ (with the per-layer bits) ->
    optional QAT -> the same quantize + lower as every other program."""
    from .frontend import capture, check_calibration
    from .fx_import import is_fx_quantized
    from .lower import lower
    from .qat import build

    if is_fx_quantized(model):
        raise CompileError("the model is already quantized by PyTorch (FX): --qat/--budget-bits/--layer-bits do not apply")
    calib = check_calibration(calib)
    graph = capture(model, tuple(calib.shape[1:]))
    opts = QuantOptions(method=args.method, weight_method=args.weight_method, bias_correction=args.bias_correction,
                        bfp=args.bfp)
    train, kw = None, {}
    if "qat" in low:
        from .pot import retrain_recipe

        ds = args.data or "mnist"
        train = data.load(ds)[:2]
        rc = retrain_recipe(ds)
        kw = {"per_epoch": rc["per_epoch"], "batch": rc["batch"], "augment": rc["augment"],
              "log": lambda s: print(s, file=sys.stderr)}
    qg = build(graph, cfg, calib, opts=opts, layer_bits=low.get("layer_bits"), budget_bits=low.get("budget_bits"),
               qat_method=low.get("qat"), train=train, epochs=low.get("epochs", 3), **kw)
    return lower(qg)


def low_bit_summary(prog) -> str:
    q = prog.manifest["quant"]
    wm = prog.manifest["weight_memory"]
    bits = ", ".join(f"{n} W{w}A{a}" for n, (w, a) in q["layer_bits"].items())
    qat = f", QAT {q['qat']['method']} {q['qat']['epochs']} epochs" if q.get("qat") else ""
    narrow = any(w < prog.config.w_bits for w, _ in q["layer_bits"].values())
    hint = (" (weights unpacked: build with --packed-weights to store each layer at its own width)"
            if narrow and not prog.config.packed_weights else "")
    return (f"; layer bits {bits}{qat}; packed weights {wm['bytes']} bytes, wmem {wm['wmem_bytes']} bytes "
            f"in {wm['wmem_rows']} rows{hint}")


def write_outputs(prog, out: Path, report: dict) -> None:
    """OUT/program.qprog, manifest.json, {wmem,param,imem}.hex, {wmem,param}.bin, report.json."""
    with atomic_dir(out) as tmp:
        prog.save(tmp / "program.qprog")
        (tmp / "manifest.json").write_text(json.dumps(prog.manifest, indent=1) + "\n")
        for name, rows in prog.images.items():
            bits = IMAGE_LAYOUTS[name](prog.config).size
            write_readmemh(tmp / f"{name}.hex", rows, bits)
            nb = -(-bits // 8)
            (tmp / f"{name}.bin").write_bytes(b"".join(int(r).to_bytes(nb, "little") for r in rows))
        write_readmemh(tmp / "imem.hex", prog.words(), isa.instr_bits(prog.config))
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")


def main(argv=None) -> int:
    p = _Parser(prog="python -m compiler", description="Compile a PyTorch CNN for a Quarry accelerator.")
    p.add_argument("model", help="zoo name (quarry_cnn), torch.save file, or module:factory")
    add_config_args(p)
    p.add_argument("--method", default="percentile", help=f"activation range estimator ({', '.join(METHODS)})")
    p.add_argument("--weight-method", default="minmax", help=f"weight quantizer ({', '.join(WEIGHT_METHODS)})")
    p.add_argument("--bias-correction", nargs="?", const="analytic", default="none",
                   help="none, analytic (the default when given without a value), empirical or both")
    p.add_argument("--pot-bits", type=int, help="PoT code bits (default: weight bits for inq, 5 for doubleq*)")
    p.add_argument("--pot-granularity", help="inq scale per layer or per channel (default channel)")
    p.add_argument("--pot-scale", help="inq scale: pow2 (paper) or lsq (least squares); default pow2")
    p.add_argument("--pot-rounding", help="inq rounding: nearest (paper) or gptq; default nearest")
    p.add_argument("--pot-budget", help="doubleqext weight memory: fraction of 8-bit (0.77) or bytes (4000B)")
    p.add_argument("--dsconv-block", type=int, help="dsconv: input channels per weight block, a multiple of "
                   "the array rows (default: the rows); needs --block-scale")
    p.add_argument("--bfp", action="store_true", help="block-floating-point activations (DSConv's): an exponent "
                   "per pixel and channel block; needs --block-scale --bfp-exp-bits N")
    p.add_argument("--pot-layers", help="comma-separated layers to make PoT (instead of all / the selection)")
    p.add_argument("--inq-retrain", type=int, metavar="EPOCHS",
                   help="inq: INQ incremental re-training, EPOCHS per step (minutes on the CPU; needs --data)")
    p.add_argument("--qat", help="quantization-aware fine-tuning: lsq or pact (PACT + SAWB); needs --data")
    p.add_argument("--epochs", type=int, help="--qat epochs (default 3)")
    p.add_argument("--budget-bits", help="mixed precision: total weight bits (e.g. 17184), per-layer bits chosen")
    p.add_argument("--layer-bits", help="pin layers' bits: name=W[/A],... (e.g. stem_0=8,fc=4/8)")
    p.add_argument("--calib", type=int, default=256, help="calibration images (default 256)")
    p.add_argument("--data", help="bundled data set for calibration (mnist, fashion)")
    p.add_argument("--input-shape", help="CxHxW: calibrate on random inputs (marked as such in the report)")
    p.add_argument("--out", type=Path, default=Path("build/model"))
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.calib < 1:
            raise CompileError(f"--calib must be >= 1, not {args.calib}")
        if args.data is None and args.input_shape is None and args.model not in zoo.MODELS:
            raise CompileError("give --data (mnist, fashion) or --input-shape CxHxW for calibration")
        # Check every option before loading (maybe training) the model, so a bad one writes nothing.
        if args.data is not None and args.data not in data.DATASETS:
            raise data.DataError(f"unknown data set {args.data!r} (known: {', '.join(data.DATASETS)})")
        if args.input_shape is not None:
            parse_shape(args.input_shape)
        pot_kw = pot_options(args)
        QuantOptions(method=args.method, weight_method=args.weight_method, bias_correction=args.bias_correction,
                     **pot_kw)
        if "dsconv_block" in pot_kw and args.weight_method != "dsconv":
            raise CompileError(f"--dsconv-block applies to --weight-method dsconv, not {args.weight_method}")
        if set(pot_kw) - {"dsconv_block", "bfp"} and args.weight_method not in POT_METHODS:
            raise CompileError(f"--{next(iter(pot_kw)).replace('_', '-')} applies to --weight-method "
                               f"{'/'.join(POT_METHODS)}, not {args.weight_method}")
        if args.inq_retrain is not None:
            if args.weight_method != "inq":
                raise CompileError(f"--inq-retrain applies to --weight-method inq, not {args.weight_method}")
            if args.inq_retrain < 1:
                raise CompileError(f"--inq-retrain must be >= 1 epoch per step, not {args.inq_retrain}")
            if args.data is None and args.model not in zoo.MODELS:
                raise CompileError("--inq-retrain needs --data (it trains on the data set's training split)")
        if cfg.pe_kind == "int" and args.weight_method in ("inq", "doubleq") and pot_kw.get("pot_layers") != ():
            raise CompileError(f"--weight-method {args.weight_method} makes layers PoT: it needs --pe-kind pot or hybrid")
        if cfg.pe_kind == "int" and args.weight_method == "doubleqext":
            raise CompileError("--weight-method doubleqext puts layers in PoT: it needs --pe-kind hybrid (or pot)")
        low = low_bit_options(args, cfg)
        if args.out.exists() and not args.out.is_dir():
            raise CompileError(f"--out {args.out} exists and is not a directory")
        model = load_model(args.model, args.data)
        if args.data or args.input_shape is None:
            xtr = data.load(args.data or "mnist")[0]
            calib, calib_kind = xtr[:args.calib], f"{args.data or 'mnist'} training images"
        else:
            shape = parse_shape(args.input_shape)
            calib = torch.rand((args.calib, *shape), generator=torch.Generator().manual_seed(0))
            calib_kind = "RANDOM uniform inputs (no data set): scales are not representative"
        t0 = time.perf_counter()
        from . import compile as compile_model
        retrain = None
        if args.inq_retrain is not None:
            from .pot import retrain_recipe

            xtr, ytr = data.load(args.data or "mnist")[:2]
            retrain = {"x": xtr, "y": ytr, "epochs": args.inq_retrain, **retrain_recipe(args.data or "mnist")}
        if low:
            prog = compile_low_bit(model, calib, cfg, args, low)
        else:
            prog = compile_model(model, calib, cfg, method=args.method, bias_correction=args.bias_correction,
                                 weight_method=args.weight_method, inq_retrain=retrain, **pot_kw)
        secs = time.perf_counter() - t0
    except (ConfigError, CompileError, UnsupportedOpError, QuantError, LowerError, KernelError, data.DataError) as e:
        print(f"python -m compiler: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    report = {"model": args.model, "data": args.data or ("mnist" if args.input_shape is None else None),
              "config": cfg.to_dict(), "config_hash": cfg.hash, "method": args.method,
              "bias_correction": args.bias_correction, "weight_method": args.weight_method,
              "calibration": {"images": len(calib), "kind": calib_kind},
              "compile_seconds": round(secs, 3), "instructions": len(prog.instrs),
              "wmem_rows": len(prog.images.get("wmem", [])), "macs": prog.manifest["macs"],
              "predicted_cycles": prog.manifest["predicted_cycles"],
              "predicted_utilisation": prog.manifest["macs"] / (prog.manifest["predicted_cycles"] * cfg.rows * cfg.cols),
              "weight_memory": prog.manifest["weight_memory"],
              "weights_per_layer": {i["name"]: i["weights"] for i in prog.manifest["layers"] if "weights" in i}}
    if low:
        q = prog.manifest["quant"]
        report |= {"layer_bits": q["layer_bits"], "mixed": q["mixed"], "qat": q["qat"]}
    try:
        write_outputs(prog, args.out, report)
    except OSError as e:
        print(f"python -m compiler: error: cannot write {args.out}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    wm = prog.manifest["weight_memory"]
    pot = f", PoT layers {', '.join(wm['pot_layers'])}" if wm["pot_layers"] else ""
    print(f"compiled {args.model} for {cfg.describe()} ({args.method}, {len(calib)} calibration images, "
          f"{calib_kind}) in {secs:.2f} s: {len(prog.instrs)} instructions, "
          f"{report['predicted_cycles']:,} cycles predicted ({report['predicted_utilisation']:.1%} PE utilisation), "
          f"{report['wmem_rows']} weight rows, weights {wm['bytes']} bytes ({wm['bytes'] / max(wm['int8_bytes'], 1):.1%} "
          f"of 8-bit){pot}{low_bit_summary(prog) if low else ''} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
