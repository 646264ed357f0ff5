"""Host side of the UART protocol, written once and driven two ways.

Every operation is a generator that yields request frames (bytes) and receives the reply
frames; it neither reads nor writes a port itself ("sans-IO"). :class:`Device` drives them over a
serial port (pyserial) for a real board; :mod:`boards.cocotb_soc` drives the *same* generators
over the simulated UART pins of the SoC under Verilator. A generator may also yield
:data:`PAUSE` (between STATUS polls) and gets ``None`` back.

::

    dev = Device(serial.Serial("/dev/ttyUSB0", 115200, timeout=1))
    info = dev.run(link.get_info())
    dev.run(link.load_program(prog))
    out, cycles = dev.run(link.infer(prog, image))
"""

from __future__ import annotations

import time
from typing import Generator

from hw import isa
from hw.isa import HostMem
from hw.program import Program, output_region, pack_rows, quantize_input, unpack_rows

from . import protocol as P
from .protocol import Cmd, DeviceError, Info, ProtocolError, Status

__all__ = ["PAUSE", "Op", "call", "get_info", "check_info", "write_rows", "read_rows", "start", "status",
           "read_cycles", "load_program", "infer", "Device", "drive", "MismatchError"]

#: Yielded between STATUS polls: the driver may wait a little (a real port needs nothing).
PAUSE = object()
#: Largest WRITE payload sent in one frame; a checksum error costs at most this much resend.
CHUNK_BYTES = 1024
#: Resends of a WRITE frame that came back ERR_CHECKSUM (a line glitch) before giving up.
RETRIES = 3

Op = Generator[object, object, object]


class MismatchError(RuntimeError):
    """The board's bitstream was built for another config or other weights than the program."""


def call(cmd: Cmd, payload: bytes = b"") -> Op:
    """One request; returns the OK reply's payload, raises :class:`DeviceError` otherwise."""
    reply = yield P.encode_request(cmd, payload)
    code, data = P.decode_frame(reply)
    try:
        status = Status(code)
    except ValueError:
        raise ProtocolError(f"unknown reply status {code:#04x}") from None
    if status is not Status.OK:
        raise DeviceError(status, data[0] if data else Cmd(cmd).value)
    return data


def get_info() -> Op:
    return Info.from_payload((yield from call(Cmd.INFO)))


def check_info(info: Info, prog: Program, rom_id: int) -> None:
    """Raise :class:`MismatchError` unless the device runs ``prog``'s config and ROM."""
    if info.version != P.VERSION:
        raise MismatchError(f"device speaks protocol version {info.version}, this host {P.VERSION}")
    if info.config_hash != prog.config.hash:
        raise MismatchError(f"the bitstream is for config {info.config_hash}, the program for "
                            f"{prog.config.hash} ({prog.config.describe()}): rebuild or pick the matching program")
    if info.rom_id != rom_id:
        raise MismatchError(f"the bitstream holds other weights (ROM id {info.rom_id:016x}, program "
                            f"{rom_id:016x}): rebuild it with this model")


def write_rows(cfg, mem: HostMem, addr: int, rows) -> Op:
    """Write packed rows (ints) at ``addr``, in frames of at most :data:`CHUNK_BYTES`."""
    nb = P.row_bytes(cfg, mem)
    per = max(1, CHUNK_BYTES // nb)
    rows = [int(r) for r in rows]
    bits = isa.host_row_bits(cfg)[HostMem(mem)]
    bad = [r for r in rows if not 0 <= r < 1 << bits]
    if bad:
        raise ValueError(f"{HostMem(mem).name} row {bad[0]:#x} does not fit in {bits} bits")
    for i in range(0, len(rows), per):
        part = rows[i:i + per]
        payload = P.region(mem, addr + i, len(part)) + b"".join(r.to_bytes(nb, "little") for r in part)
        for attempt in range(RETRIES + 1):
            try:
                yield from call(Cmd.WRITE, payload)
                break
            except DeviceError as e:
                if e.status is not Status.ERR_CHECKSUM or attempt == RETRIES:
                    raise


def read_rows(cfg, mem: HostMem, addr: int, count: int) -> Op:
    """Packed rows (ints) ``addr .. addr + count - 1`` of ``mem``."""
    nb = P.row_bytes(cfg, mem)
    per = max(1, P.MAX_PAYLOAD // nb)
    out = []
    for i in range(0, count, per):
        n = min(per, count - i)
        data = yield from call(Cmd.READ, P.region(mem, addr + i, n))
        if len(data) != n * nb:
            raise ProtocolError(f"READ of {n} rows returned {len(data)} bytes, expected {n * nb}")
        out += [int.from_bytes(data[j * nb:(j + 1) * nb], "little") for j in range(n)]
    return out


def start() -> Op:
    yield from call(Cmd.START)


def status() -> Op:
    data = yield from call(Cmd.STATUS)
    v = P.STATUS_LAYOUT.from_bits(data[0])
    return {"busy": bool(v.busy), "done": bool(v.done), "error": bool(v.error)}


def read_cycles() -> Op:
    data = yield from call(Cmd.CYCLES)
    return int.from_bytes(data, "little")


def load_program(prog: Program) -> Op:
    """The instruction words into IMEM (weights and parameters are in the bitstream's ROM)."""
    yield from write_rows(prog.config, HostMem.IMEM, 0, prog.words())


def run_loaded() -> Op:
    """START, then poll STATUS until the program is done; returns the cycle counter."""
    yield from start()
    while True:
        st = yield from status()
        if st["done"] and not st["busy"]:
            break
        yield PAUSE
    return (yield from read_cycles())


def infer(prog: Program, image) -> Op:
    """Run the loaded program on one float image: returns (raw output acc rows (n, cols), cycles)."""
    cfg = prog.config
    addr, rows = quantize_input(prog, image)
    yield from write_rows(cfg, HostMem.SPAD, addr, pack_rows(isa.spad_row_layout(cfg), rows))
    cycles = yield from run_loaded()
    a0, na = output_region(prog)
    raw = yield from read_rows(cfg, HostMem.ACC, a0, na)
    return unpack_rows(isa.acc_row_layout(cfg), raw), cycles


# -- drivers ------------------------------------------------------------------------------------------

def drive(op: Op, transact, pause=lambda: None):
    """Run ``op`` to completion with a blocking ``transact(request_frame) -> reply_frame``."""
    try:
        item = next(op)
        while True:
            if item is PAUSE:
                pause()
                item = op.send(None)
            else:
                item = op.send(transact(item))
    except StopIteration as stop:
        return stop.value


class Device:
    """A board on a serial port (anything with pyserial's ``read(n)``/``write(b)`` and a timeout).

    Parameters
    ----------
    port : serial.Serial-like
    reply_timeout : float
        Seconds to wait for a reply before raising :class:`ProtocolError`.
    """

    def __init__(self, port, *, reply_timeout: float = 2.0):
        self.port = port
        self.reply_timeout = reply_timeout

    def _read(self, n: int, deadline: float) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.port.read(n - len(out))
            if chunk:
                out += chunk
            elif time.monotonic() > deadline:
                raise ProtocolError(f"no reply from the device within {self.reply_timeout:.1f} s "
                                    f"(got {len(out)} of {n} bytes): is the bitstream loaded and the baud rate right?")
        return out

    def transact(self, frame: bytes) -> bytes:
        self.port.write(frame)
        deadline = time.monotonic() + self.reply_timeout
        first = self._read(1, deadline)
        skipped = 0
        while first[0] != P.RSP_SYNC:  # stray bytes (e.g. a board reset): hunt for the sync byte
            skipped += 1
            if skipped > P.MAX_PAYLOAD:
                raise ProtocolError("no reply sync byte in 64 KiB of data from the device")
            first = self._read(1, deadline)
        head = first + self._read(P.HEADER_BYTES - 1, deadline)
        return head + self._read(P.frame_length(head) - len(head), deadline)

    def run(self, op: Op):
        return drive(op, self.transact)
