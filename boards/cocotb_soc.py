"""cocotb test that talks to the SoC (``quarry_soc``) over its simulated UART pins.

Started by :func:`boards.simulate.run_soc` inside the simulator; not meant to be run by hand.
The job (JSON, ``$QUARRY_SOC_JOB``) names a program file, an ``.npy`` of images, the UART bit
period and the STATUS poll interval; or, with ``pty_file``, asks the test to serve the UART on a
pseudo-terminal for a host program (``python -m boards.host --port <pty>``) instead. The host side is :mod:`boards.link`, unchanged: the very
generators :class:`boards.link.Device` drives over a serial port are driven here by an async
loop whose transport is a bit-level UART on ``uart_rx`` / ``uart_tx``.

After the images it sends a few deliberately bad frames (bad checksum, unknown command, rows out
of range, a read-only memory, a wrong length, START while busy, a frame cut short) and records
the status each reply carries. Results go to ``$QUARRY_SOC_RESULTS`` as JSON.
"""

import json
import os
import time

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import Event, FallingEdge, SimTimeoutError, Timer, with_timeout

from boards import link
from boards import protocol as P
from hw import isa
from hw.isa import HostMem
from hw.program import Program

JOB_ENV = "QUARRY_SOC_JOB"
RESULTS_ENV = "QUARRY_SOC_RESULTS"
PERIOD_NS = 10
#: A reply byte that does not start within this many byte times counts as no reply.
REPLY_BYTE_TIMEOUT = 200


class Uart:
    """The host end of the serial line: bit-level transmit on ``uart_rx``, a receiver coroutine on
    ``uart_tx`` collecting bytes."""

    def __init__(self, dut, cpb: int):
        self.dut, self.cpb = dut, cpb
        self.bit_ns = cpb * PERIOD_NS
        self.rx = bytearray()
        self.event = Event()
        self.bits = 0

    async def send(self, data: bytes):
        for byte in data:
            for bit in [0] + [(byte >> i) & 1 for i in range(8)] + [1]:  # start, LSB first, stop
                self.dut.uart_rx.value = bit
                await Timer(self.bit_ns, "ns")
            self.bits += 10

    async def receive(self):
        tx = self.dut.uart_tx
        while True:
            await FallingEdge(tx)
            await Timer(self.bit_ns * 3 // 2, "ns")  # middle of data bit 0
            v = 0
            for i in range(8):
                v |= int(tx.value) << i
                await Timer(self.bit_ns, "ns")
            if not int(tx.value):
                raise AssertionError("framing error: stop bit is 0 on uart_tx")
            self.rx.append(v)
            self.bits += 10
            self.event.set()

    async def reply(self) -> bytes:
        """The next complete frame from the device."""
        while True:
            if self.rx and self.rx[0] != P.RSP_SYNC:
                raise AssertionError(f"reply starts with {self.rx[0]:#04x}, not the sync byte")
            if len(self.rx) >= P.HEADER_BYTES and len(self.rx) >= P.frame_length(bytes(self.rx)):
                n = P.frame_length(bytes(self.rx))
                frame, self.rx[:] = bytes(self.rx[:n]), self.rx[n:]
                return frame
            self.event.clear()
            try:
                await with_timeout(self.event.wait(), REPLY_BYTE_TIMEOUT * 10 * self.bit_ns, "ns")
            except SimTimeoutError:
                raise AssertionError(f"no reply byte within {REPLY_BYTE_TIMEOUT} byte times "
                                     f"(have {bytes(self.rx).hex()})") from None

    async def transact(self, frame: bytes) -> bytes:
        await self.send(frame)
        return await self.reply()


async def run(uart: Uart, op, poll_ns: int):
    """Async twin of :func:`boards.link.drive`: same generators, simulated transport."""
    try:
        item = next(op)
        while True:
            if item is link.PAUSE:
                await Timer(poll_ns, "ns")
                item = op.send(None)
            else:
                item = op.send(await uart.transact(item))
    except StopIteration as stop:
        return stop.value


async def status_of(uart: Uart, frame: bytes) -> str:
    """Send a raw frame; the reply's status name."""
    code, _ = P.decode_frame(await uart.transact(frame))
    return P.Status(code).name


async def serve_pty(uart: Uart, job: dict) -> dict:
    """Be the far end of a pseudo-terminal: bytes a host program writes to its slave side go
    out on ``uart_rx``, bytes from ``uart_tx`` come back. Runs until ``job["stop_file"]`` exists
    (or ``job["wall_limit"]`` seconds pass)."""
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)  # no echo or line editing before the host's pyserial configures it
    os.set_blocking(master, False)
    with open(job["pty_file"] + ".tmp", "w") as f:
        f.write(os.ttyname(slave))
    os.replace(job["pty_file"] + ".tmp", job["pty_file"])
    idle_ns = 20 * uart.bit_ns
    t0 = time.time()
    moved = 0
    while not os.path.exists(job["stop_file"]) and time.time() - t0 < job["wall_limit"]:
        try:
            data = os.read(master, 4096)
        except (BlockingIOError, OSError):
            data = b""
        if uart.rx:
            os.write(master, bytes(uart.rx))
            moved += len(uart.rx)
            uart.rx.clear()
        if data:
            await uart.send(data)
            moved += len(data)
        else:
            await Timer(idle_ns, "ns")
    os.close(master)
    os.close(slave)
    return {"pty_bytes": moved}


@cocotb.test()
async def talk_to_soc(dut):
    t_start = time.time()
    with open(os.environ[JOB_ENV]) as f:
        job = json.load(f)
    cpb = job["clocks_per_bit"]
    Clock(dut.clk, PERIOD_NS, unit="ns").start(start_high=False)
    dut.uart_rx.value = 1
    dut.rst.value = 1
    for _ in range(4):
        await FallingEdge(dut.clk)
    dut.rst.value = 0
    uart = Uart(dut, cpb)
    cocotb.start_soon(uart.receive())
    if job.get("pty_file"):
        return _write_results({**await serve_pty(uart, job), "test_seconds": time.time() - t_start})

    prog = Program.load(job["program"])
    images = np.load(job["images"])
    poll_ns = job["poll_cycles"] * PERIOD_NS

    info = await run(uart, link.get_info(), poll_ns)
    link.check_info(info, prog, job["rom_id"])
    t0 = time.time()
    await run(uart, link.load_program(prog), poll_ns)
    load_s = time.time() - t0
    outputs, cycles = [], []
    for img in images:
        out, cyc = await run(uart, link.infer(prog, img), poll_ns)
        outputs.append(np.asarray(out).tolist())
        cycles.append(cyc)

    probes = {}
    if job.get("probes", True):
        good = P.encode_request(P.Cmd.STATUS)
        probes["bad_checksum"] = await status_of(uart, good[:-1] + bytes([good[-1] ^ 0xFF]))
        unknown = max(c.value for c in P.Cmd) + 1
        probes["unknown_command"] = await status_of(uart, P.encode_frame(P.REQ_SYNC, unknown, b""))
        cfg = prog.config
        depth = isa.host_depths(cfg)
        probes["read_out_of_range"] = await status_of(uart, P.encode_request(
            P.Cmd.READ, P.region(HostMem.ACC, depth[HostMem.ACC] - 1, 2)))
        probes["write_rom"] = await status_of(uart, P.encode_request(
            P.Cmd.WRITE, P.region(HostMem.WMEM, 0, 1) + bytes(P.row_bytes(cfg, HostMem.WMEM))))
        probes["bad_length"] = await status_of(uart, P.encode_request(P.Cmd.STATUS, b"\x00"))
        probes["start"] = await status_of(uart, P.encode_request(P.Cmd.START))
        probes["start_while_busy"] = await status_of(uart, P.encode_request(P.Cmd.START))
        probes["write_while_busy"] = await status_of(uart, P.encode_request(
            P.Cmd.WRITE, P.region(HostMem.SPAD, 0, 0)))
        while (await run(uart, link.status(), poll_ns))["busy"]:
            await Timer(poll_ns, "ns")
        await uart.send(P.encode_request(P.Cmd.CYCLES)[:2])  # then silence: the frame times out
        probes["cut_short"] = P.Status(P.decode_frame(await uart.reply())[0]).name
        probes["after_errors"] = await status_of(uart, P.encode_request(P.Cmd.INFO))

    _write_results({"info": info.__dict__, "outputs": outputs, "cycles": cycles, "probes": probes,
                    "program_load_seconds": load_s, "uart_bits": uart.bits,
                    "test_seconds": time.time() - t_start})


def _write_results(out: dict) -> None:
    path = os.environ[RESULTS_ENV]
    with open(f"{path}.tmp", "w") as f:
        json.dump(out, f)
    os.replace(f"{path}.tmp", path)
