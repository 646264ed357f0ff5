"""``python -m compiler MODEL --pe 16x16 --bits 4 --method aciq --calib 256 --data mnist --out build/model``

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
from .quantize import METHODS, QuantError, QuantOptions


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
    p.add_argument("--weight-method", default="minmax", help="weight range: minmax or mse")
    p.add_argument("--bias-correction", action="store_true")
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
        QuantOptions(method=args.method, weight_method=args.weight_method, bias_correction=args.bias_correction)
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
        prog = compile_model(model, calib, cfg, method=args.method, bias_correction=args.bias_correction,
                             weight_method=args.weight_method)
        secs = time.perf_counter() - t0
    except (ConfigError, CompileError, UnsupportedOpError, QuantError, LowerError, KernelError, data.DataError) as e:
        print(f"python -m compiler: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    report = {"model": args.model, "data": args.data or ("mnist" if args.input_shape is None else None),
              "config": cfg.to_dict(), "config_hash": cfg.hash, "method": args.method,
              "bias_correction": args.bias_correction, "calibration": {"images": len(calib), "kind": calib_kind},
              "compile_seconds": round(secs, 3), "instructions": len(prog.instrs),
              "wmem_rows": len(prog.images.get("wmem", [])), "macs": prog.manifest["macs"]}
    try:
        write_outputs(prog, args.out, report)
    except OSError as e:
        print(f"python -m compiler: error: cannot write {args.out}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"compiled {args.model} for {cfg.describe()} ({args.method}, {len(calib)} calibration images, "
          f"{calib_kind}) in {secs:.2f} s: {len(prog.instrs)} instructions, "
          f"{report['wmem_rows']} weight rows -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
