"""``python -m hw.build``: generate the accelerator's Verilog for a configuration.

Writes ``OUT/quarry_top.v``, ``OUT/config.json`` and ``OUT/build.json`` (config, PE count,
whether weights may be stored packed, memory sizes, Verilog line count, generation seconds).
Bad options exit 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import PE_KINDS, AccelConfig, ConfigError

__all__ = ["generate", "write_verilog", "main"]


def generate(cfg: AccelConfig, *, wmem_init=None, param_init=None) -> str:
    """Verilog text of the accelerator top (module ``quarry_top``)."""
    from amaranth.back import verilog

    from .top import QuarryTop

    top = QuarryTop(cfg, wmem_init=wmem_init, param_init=param_init)
    return verilog.convert(top, name="quarry_top", emit_src=False)


def write_verilog(cfg: AccelConfig, out_dir, *, wmem_init=None, param_init=None) -> Path:
    """Write ``out_dir/quarry_top.v`` (atomically) and return its path."""
    from .program import atomic_write

    path = Path(out_dir) / "quarry_top.v"
    atomic_write(path, generate(cfg, wmem_init=wmem_init, param_init=param_init))
    return path


def _load_rom(rom_dir: Path, cfg: AccelConfig):
    """Weight / param images of a compiled model directory (its ``program.qprog``)."""
    from .program import Program, ProgramError

    path = rom_dir / "program.qprog" if rom_dir.is_dir() else rom_dir
    try:
        prog = Program.load(path, cfg)
    except ProgramError as e:
        raise ConfigError("rom", f"--rom {rom_dir}: {e}") from None
    return prog.images.get("wmem"), prog.images.get("param")


def build(cfg: AccelConfig, out: Path, rom: Path | None = None) -> dict:
    """Generate everything into ``out`` via a temporary directory, so a failure leaves nothing."""
    t0 = time.perf_counter()
    wmem_init = param_init = None
    if rom is not None:
        wmem_init, param_init = _load_rom(rom, cfg)
    text = generate(cfg, wmem_init=wmem_init, param_init=param_init)
    seconds = time.perf_counter() - t0
    info = {
        "config": cfg.to_dict(),
        "config_hash": cfg.hash,
        "pe_kind": cfg.pe_kind,
        "pe_count": cfg.pe_count,
        "packed_weights": cfg.packed_weights,
        "post_overlap": cfg.post_overlap,
        "bfp_exp_bits": cfg.bfp_exp_bits,
        "acc_width": cfg.acc_width,
        "memory_bits": cfg.memory_bits(),
        "verilog_lines": text.count("\n"),
        "generation_seconds": round(seconds, 3),
        "rom": str(rom) if rom else None,
    }
    from .program import atomic_dir

    with atomic_dir(out) as tmp:
        (tmp / "quarry_top.v").write_text(text)
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        (tmp / "build.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def config_from_args(args) -> AccelConfig:
    kw = {}
    if args.pe is not None:
        kw["rows"], kw["cols"] = AccelConfig.parse_pe(args.pe)
    if args.bits is not None:
        kw["w_bits"] = kw["a_bits"] = args.bits
    if args.wbits is not None:
        kw["w_bits"] = args.wbits
    if args.abits is not None:
        kw["a_bits"] = args.abits
    for name in ("pe_kind", "spad_depth", "acc_depth", "wmem_depth", "imem_depth", "param_depth", "acc_bits",
                 "block_scale", "packed_weights", "post_overlap", "bfp_exp_bits"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    return AccelConfig(**kw)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pe", help="array shape ROWSxCOLS (default 16x16)")
    p.add_argument("--bits", type=int, help="weight and activation bits (2..8)")
    p.add_argument("--wbits", type=int, help="weight bits (2..8), overrides --bits")
    p.add_argument("--abits", type=int, help="activation bits (2..8), overrides --bits")
    p.add_argument("--pe-kind", dest="pe_kind", help=f"PE kind ({', '.join(PE_KINDS)})")
    for name in ("spad", "acc", "wmem", "imem", "param"):
        p.add_argument(f"--{name}-depth", dest=f"{name}_depth", type=int, help=f"{name} memory depth in rows")
    p.add_argument("--acc-bits", dest="acc_bits", type=int, help="accumulator width (default: derived)")
    p.add_argument("--block-scale", dest="block_scale", action="store_true", default=None,
                   help="DSConv block rescaling in the accumulator path (for --weight-method dsconv)")
    p.add_argument("--bfp-exp-bits", dest="bfp_exp_bits", type=int,
                   help="block-floating-point activations: bits of the shared exponent per spad row "
                        "(1..3, needs --block-scale; default 0 = off)")
    p.add_argument("--packed-weights", dest="packed_weights", action="store_true", default=None,
                   help="store weights narrower than w_bits packed in wmem (PRELOAD pack_bits; "
                        "mixed precision and low-bit models take fewer weight rows)")
    p.add_argument("--no-post-overlap", dest="post_overlap", action="store_false", default=None,
                   help="MATMUL always waits for POST (one accumulator read port, half the accumulator "
                        "block RAM; default: the next block's MATMULs stream while POST runs)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    p = _Parser(prog="python -m hw.build", description="Generate Quarry accelerator Verilog.")
    add_config_args(p)
    p.add_argument("--rom", type=Path, help="compiled model directory (or .qprog) whose weights go into ROM")
    p.add_argument("--out", type=Path, default=Path("build/hw"), help="output directory (default build/hw)")
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
        info = build(cfg, args.out, args.rom)
    except ConfigError as e:
        print(f"python -m hw.build: error: {e}", file=sys.stderr)
        return 2
    mem = sum(info["memory_bits"].values())
    print(f"{cfg.describe()}: {info['pe_count']} PEs, {mem / 8192:.1f} KiB of memories, "
          f"{info['verilog_lines']} Verilog lines in {info['generation_seconds']:.2f} s -> {args.out}/quarry_top.v")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
