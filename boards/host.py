"""``python -m boards.host --port /dev/ttyUSB0 (--image FILE [FILE ...] | --dataset mnist --n 100)``

Talks to a board running a ``boards.build`` bitstream over its UART (protocol:
:mod:`boards.protocol`, host side: :mod:`boards.link`): checks that the bitstream holds the
program's config and weights, loads the program's instructions, then for each image sends the
quantized input, starts the accelerator, waits for it, reads the raw output accumulators and
prints the prediction, the accelerator's cycle count, its compute latency (cycles / clock) and
the host's round-trip time.

``--model`` is the board build directory (``build/boards/<board>``, holding the
``program.qprog`` made for that bitstream) or a ``.qprog``; without it the program whose config
hash and ROM id match the board's INFO reply is looked up under ``build/boards/``.

Images: ``.npy`` (floats in [0, 1], or uint8 0..255) or PNG/PGM/JPEG (Pillow), one image of the
model's input shape (e.g. 28x28 grey). Errors print one line and exit 2.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from hw.program import Program, ProgramError

from . import link
from . import protocol as P

__all__ = ["main", "load_image", "find_program", "HostError"]

DEFAULT_BAUD = 115200


class HostError(RuntimeError):
    """A user-fixable problem: one line, exit 2."""


def load_image(path: Path, shape) -> np.ndarray:
    """A float image in [0, 1] of the model's input ``shape`` (C, H, W)."""
    if not path.exists():
        raise HostError(f"--image {path}: no such file")
    if path.suffix.lower() == ".npy":
        try:
            x = np.load(path)
        except (OSError, ValueError) as e:
            raise HostError(f"--image {path}: not a NumPy array ({e})") from None
    else:
        try:
            from PIL import Image
        except ImportError:
            raise HostError(f"--image {path}: reading {path.suffix} needs Pillow (pip install pillow); "
                            "or pass a .npy") from None
        try:
            x = np.asarray(Image.open(path).convert("L"))
        except OSError as e:
            raise HostError(f"--image {path}: {e}") from None
    x = np.asarray(x)
    if x.dtype == np.uint8:
        x = x / 255.0
    if x.size != int(np.prod(shape)):
        raise HostError(f"--image {path}: {x.shape} does not match the model input {tuple(shape)}")
    x = x.astype(np.float64).reshape(shape)
    if x.min() < 0 or x.max() > 1:
        raise HostError(f"--image {path}: values must be in [0, 1] (or uint8), found {x.min():g}..{x.max():g}")
    return x


def rom_id_of(prog: Program) -> int:
    return P.rom_id(prog.config, prog.images.get("wmem"), prog.images.get("param"))


def find_program(info: P.Info, root: Path = Path("build/boards")) -> Program:
    """The program under ``root`` built for the bitstream that sent ``info``."""
    for path in sorted(root.glob("*/program.qprog")):
        try:
            prog = Program.load(path)
        except ProgramError:
            continue
        if prog.config.hash == info.config_hash and rom_id_of(prog) == info.rom_id:
            return prog
    raise HostError(f"no program under {root}/ matches the board (config {info.config_hash}, ROM "
                    f"{info.rom_id:016x}): pass --model with the build directory of its bitstream")


def _load_model(path: Path) -> Program:
    qprog = path / "program.qprog" if path.is_dir() else path
    try:
        return Program.load(qprog)
    except ProgramError as e:
        raise HostError(f"--model {path}: {e}") from None


def _open_port(port: str, baud: int):
    try:
        import serial
    except ImportError:
        raise HostError("pyserial is not installed (pip install pyserial)") from None
    try:
        return serial.Serial(port, baud, timeout=0.05)
    except (serial.SerialException, OSError, ValueError) as e:
        raise HostError(f"cannot open {port}: {e}") from None


def _images(args, prog: Program):
    shape = prog.manifest["input"]["shape"]
    if args.image:
        return [load_image(Path(p), shape) for p in args.image], None
    from compiler import data

    try:
        _, _, x, y = data.load(args.dataset)
    except data.DataError as e:
        raise HostError(str(e)) from None
    return list(x[:args.n].numpy()), y[:args.n].numpy()


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    p = _Parser(prog="python -m boards.host", description="Run images on a Quarry board over its UART.")
    p.add_argument("--port", required=True, help="serial port of the board (e.g. /dev/ttyUSB0)")
    p.add_argument("--baud", type=int, default=DEFAULT_BAUD, help=f"baud rate (default {DEFAULT_BAUD})")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", help="image file(s): .npy, .png, .pgm, ...")
    src.add_argument("--dataset", help="test images of a bundled data set (mnist, fashion)")
    p.add_argument("--n", type=int, default=100, help="images from --dataset (default 100)")
    p.add_argument("--model", type=Path, help="board build directory or .qprog (default: found by the board's INFO)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for a reply (default 2)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, not {args.n}")
    port = None
    try:
        prog = _load_model(args.model) if args.model is not None else None
        for path in args.image or ():
            if not Path(path).is_file():
                raise HostError(f"--image {path}: no such file")
        port = _open_port(args.port, args.baud)
        dev = link.Device(port, reply_timeout=args.timeout)
        info = dev.run(link.get_info())
        if prog is None:
            prog = find_program(info)
        link.check_info(info, prog, rom_id_of(prog))
        images, labels = _images(args, prog)
        return _run(dev, info, prog, images, labels)
    except (HostError, P.ProtocolError, P.DeviceError, link.MismatchError) as e:
        print(f"python -m boards.host: error: {e}", file=sys.stderr)
        return 2
    finally:
        if port is not None:
            port.close()


def _run(dev, info: P.Info, prog: Program, images, labels) -> int:
    from sim.run import ModelRun

    res = ModelRun("board")
    t0 = time.perf_counter()
    dev.run(link.load_program(prog))
    print(f"board: {prog.config.describe()} at {info.clk_hz / 1e6:g} MHz, {info.clk_hz // info.clocks_per_bit} baud; "
          f"program of {len(prog.instrs)} instructions loaded in {time.perf_counter() - t0:.2f} s")
    trips = []
    for i, img in enumerate(images):
        t = time.perf_counter()
        out, cycles = dev.run(link.infer(prog, img))
        trips.append(time.perf_counter() - t)
        res.add(prog, out, cycles)
        label = f" (label {labels[i]})" if labels is not None else ""
        print(f"image {i}: prediction {res.predictions[-1]}{label}, {cycles} cycles = "
              f"{1e3 * cycles / info.clk_hz:.3f} ms compute, {1e3 * trips[-1]:.0f} ms round trip")
    if len(images) > 1:
        acc = f"accuracy {res.accuracy(labels):.1%}, " if labels is not None else ""
        print(f"{len(images)} images: {acc}mean {np.mean(res.cycles):.0f} cycles "
              f"({1e3 * np.mean(res.cycles) / info.clk_hz:.3f} ms compute), mean round trip {1e3 * np.mean(trips):.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
