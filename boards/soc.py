"""The board-independent SoC: :class:`hw.top.QuarryTop` with its weight/param ROM, a UART and
the framed host protocol of :mod:`boards.protocol`.

::

    uart_rx ─► UARTRx ─► HostBridge ─► QuarryTop host port / start
    uart_tx ◄─ UARTTx ◄─┘    (parses request frames, checks them, answers each with one reply)

Everything runs in the ``sync`` domain; a board wrapper (:mod:`boards.platforms`) provides it
(the board clock, or a PLL where the board needs another frequency).
"""

import functools
import operator

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hw import isa
from hw.config import AccelConfig
from hw.isa import HostMem
from hw.top import CYCLE_BITS, QuarryTop

from . import protocol as P
from .protocol import Cmd, Status
from .uart import UARTRx, UARTTx

__all__ = ["HostBridge", "QuarrySoC", "LEDS"]

#: What the ``leds`` bits show, in order.
LEDS = ("busy", "done", "error")

# Commands whose payload is a REGION, and commands with an empty payload.
_REGION_CMDS = (Cmd.WRITE, Cmd.READ)
_EMPTY_CMDS = (Cmd.INFO, Cmd.START, Cmd.STATUS, Cmd.CYCLES)


def _crc_next(crc, byte):
    """One CRC-8 byte update in gateware, from the taps :func:`boards.protocol.crc8_matrix` derives."""
    x = crc ^ byte
    return Cat(*[functools.reduce(operator.xor, [x[i] for i in taps], Const(0, 1))
                 for taps in P.crc8_matrix()])


def _mul_const(x, k: int):
    """``x * k`` for a constant ``k`` as shift-adds (``yosys -dsp`` would spend a DSP on it)."""
    terms = [x << i for i in range(k.bit_length()) if k >> i & 1]
    return functools.reduce(operator.add, terms) if terms else Const(0)


class HostBridge(wiring.Component):
    """Request parser and reply generator between a byte stream and the accelerator host port.

    Parameters
    ----------
    cfg : AccelConfig
    info : boards.protocol.Info
        The INFO reply (a constant of the bitstream).
    timeout_cycles : int
        A frame that stops arriving for this many cycles is dropped with ``ERR_TIMEOUT``.

    Ports
    -----
    rx : In(stream of 8)
        Received bytes.
    tx : Out(stream of 8)
        Bytes to send.
    start, host_mem, host_addr, host_wdata, host_we, host_re : Out
        Drive :class:`hw.top.QuarryTop`'s ports of the same names.
    busy, done, cycles, host_rdata : In
        From :class:`hw.top.QuarryTop`.
    error : Out(1)
        The last reply was an error.
    """

    def __init__(self, cfg: AccelConfig, *, info: P.Info, timeout_cycles: int):
        if not isinstance(timeout_cycles, int) or timeout_cycles < 16:
            raise ValueError(f"timeout_cycles must be an integer >= 16, not {timeout_cycles!r}")
        self._cfg = cfg
        self._info = info
        self._timeout = timeout_cycles
        dbits = isa.host_data_bits(cfg)
        super().__init__({
            "rx": In(stream.Signature(8)), "tx": Out(stream.Signature(8)),
            "start": Out(1), "busy": In(1), "done": In(1), "cycles": In(CYCLE_BITS),
            "host_mem": Out(HostMem), "host_addr": Out(isa.host_addr_bits(cfg)), "host_wdata": Out(dbits),
            "host_we": Out(1), "host_re": Out(1), "host_rdata": In(dbits),
            "error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        rb = {mem: P.row_bytes(cfg, mem) for mem in set(P.WRITABLE) | set(P.READABLE)}
        depth = isa.host_depths(cfg)
        hdr_bytes, rgn_bytes = P.FRAME_HEADER.size // 8, P.REGION.size // 8
        info_bytes = P.INFO_LAYOUT.const(self._info.fields()).as_bits().to_bytes(P.INFO_LAYOUT.size // 8, "little")
        # One row buffer serves both directions (never at once). Received bytes are written at
        # their byte index, so the buffer *is* the row (LSB byte first, as on the wire) and
        # feeds host_wdata without a multiplexer; a READ row is loaded whole from host_rdata.
        nrow = max(rb.values())
        buf = Signal(8 * nrow)

        rx, tx = self.rx, self.tx
        byte = rx.payload
        got = Signal()  # a byte is consumed this cycle
        m.d.comb += got.eq(rx.valid & rx.ready)

        crc = Signal(8)
        hdr = Signal(P.FRAME_HEADER)
        rgn = Signal(P.REGION)
        nhdr = Signal(range(max(hdr_bytes, rgn_bytes) + 1))
        left = Signal(16)           # payload bytes still to come
        err = Signal(Status)        # first error found in this frame (OK: none yet)
        idx = Signal(range(max(nrow, len(info_bytes), P.CYCLES_BYTES) + 1))  # byte within row / payload
        row_last = Signal()         # idx is the last byte of a row of ``mem``
        addr = Signal(16)
        rows = Signal(16)           # READ: rows still to send
        wr_pending = Signal()       # a received row is complete: write it this cycle
        timer = Signal(range(self._timeout + 1))
        timed_out = Signal()
        rsp_len = Signal(16)
        cycles_latch = Signal(CYCLE_BITS)
        tx_done = Signal()          # the reply's last byte has been taken
        err_led = Signal()
        cmd = hdr.code
        mem = rgn.mem

        def fail(code):
            """Record ``code`` unless an earlier check of this frame already failed."""
            with m.If(err == Status.OK):
                m.d.sync += err.eq(code)

        def crc_in():
            m.d.sync += crc.eq(_crc_next(crc, byte))

        with m.Switch(mem):
            for mm in sorted(rb, key=lambda x: x.value):
                with m.Case(mm.value):
                    m.d.comb += row_last.eq(idx == rb[mm] - 1)

        # The host port: address and memory come straight from the registers; only the
        # strobes are decoded.
        m.d.comb += [self.host_mem.eq(mem), self.host_addr.eq(addr), self.host_wdata.eq(buf)]
        with m.If(wr_pending):
            m.d.comb += self.host_we.eq(1)
            m.d.sync += [wr_pending.eq(0), addr.eq(addr + 1)]

        # -- receive -------------------------------------------------------------------------------
        with m.FSM(name="rx_fsm") as rx_fsm:
            # A frame that stalls part way is dropped (the host may have died mid-frame); the
            # timer restarts with every byte.
            in_frame = ~rx_fsm.ongoing("SYNC") & ~rx_fsm.ongoing("REPLY")
            m.d.sync += timer.eq(Mux(in_frame & ~got, timer + 1, 0))
            m.d.comb += timed_out.eq(timer == self._timeout)

            def abort_on_timeout():
                with m.If(timed_out):
                    m.d.sync += err.eq(Status.ERR_TIMEOUT)
                    m.next = "REPLY"

            with m.State("SYNC"):
                m.d.comb += rx.ready.eq(1)
                with m.If(got & (byte == P.REQ_SYNC)):
                    m.d.sync += [crc.eq(0), nhdr.eq(0), err.eq(Status.OK)]
                    m.next = "HEADER"
            def collect(view, nbytes, then):
                """Shift ``nbytes`` received bytes into ``view`` (LSB byte first), then go on."""
                m.d.comb += rx.ready.eq(1)
                abort_on_timeout()
                with m.If(got):
                    crc_in()
                    m.d.sync += [view.eq(Cat(view.as_value()[8:], byte)), nhdr.eq(nhdr + 1)]
                    with m.If(nhdr == nbytes - 1):
                        m.next = then

            with m.State("HEADER"):
                collect(hdr, hdr_bytes, "DISPATCH")
            with m.State("DISPATCH"):
                m.d.sync += [left.eq(hdr.length), nhdr.eq(0)]
                m.next = "SKIP"
                with m.Switch(cmd):
                    with m.Case(*_REGION_CMDS):
                        with m.If(self.busy):
                            fail(Status.ERR_BUSY)
                        with m.If(hdr.length < rgn_bytes):
                            fail(Status.ERR_LENGTH)
                        with m.Else():
                            m.d.sync += left.eq(hdr.length - rgn_bytes)
                            m.next = "REGION"
                    with m.Case(*_EMPTY_CMDS):
                        with m.If((cmd == Cmd.START) & self.busy):
                            fail(Status.ERR_BUSY)
                        with m.If(hdr.length != 0):
                            fail(Status.ERR_LENGTH)
                    with m.Default():
                        fail(Status.ERR_COMMAND)
            with m.State("REGION"):
                collect(rgn, rgn_bytes, "CHECK")
            with m.State("CHECK"):
                bad_addr, bad_len = Signal(), Signal()
                end = Signal(17)
                nbytes = Signal(16 + max(rb.values()).bit_length())
                m.d.comb += end.eq(rgn.addr + rgn.count)
                m.d.sync += [addr.eq(rgn.addr), rows.eq(rgn.count), idx.eq(0), rsp_len.eq(nbytes)]
                with m.Switch(mem):
                    for mm in sorted(rb, key=lambda x: x.value):
                        with m.Case(mm.value):
                            allowed = ((cmd == Cmd.WRITE) & (mm in P.WRITABLE)) | ((cmd == Cmd.READ) & (mm in P.READABLE))
                            m.d.comb += [bad_addr.eq(~allowed | (end > depth[mm])),
                                         nbytes.eq(_mul_const(rgn.count, rb[mm]))]
                    with m.Default():
                        m.d.comb += bad_addr.eq(1)
                m.d.comb += bad_len.eq(Mux(cmd == Cmd.WRITE, left != nbytes, (left != 0) | (nbytes > P.MAX_PAYLOAD)))
                with m.If(bad_addr):
                    fail(Status.ERR_ADDRESS)
                with m.Elif(bad_len):
                    fail(Status.ERR_LENGTH)
                # Only a frame whose header passed every check writes anything.
                m.next = "SKIP"
                with m.If((err == Status.OK) & ~bad_addr & ~bad_len & (cmd == Cmd.WRITE)):
                    m.next = "DATA"
            with m.State("DATA"):
                m.d.comb += rx.ready.eq(~wr_pending & (left != 0))
                abort_on_timeout()
                with m.If(left == 0):
                    m.next = "CRC"
                with m.Elif(got):
                    crc_in()
                    m.d.sync += [buf.word_select(idx, 8).eq(byte), left.eq(left - 1), idx.eq(idx + 1)]
                    with m.If(row_last):
                        m.d.sync += [idx.eq(0), wr_pending.eq(1)]
            with m.State("SKIP"):
                m.d.comb += rx.ready.eq(left != 0)
                abort_on_timeout()
                with m.If(left == 0):
                    m.next = "CRC"
                with m.Elif(got):
                    crc_in()
                    m.d.sync += left.eq(left - 1)
            with m.State("CRC"):
                m.d.comb += rx.ready.eq(~wr_pending)
                abort_on_timeout()
                with m.If(got):
                    with m.If(byte != crc):
                        m.d.sync += err.eq(Status.ERR_CHECKSUM)  # overrides any other error
                    m.next = "ACT"
            with m.State("ACT"):
                m.d.sync += cycles_latch.eq(self.cycles)
                with m.If(err != Status.OK):
                    m.d.sync += rsp_len.eq(1)
                with m.Else():
                    with m.Switch(cmd):
                        with m.Case(Cmd.START):
                            m.d.comb += self.start.eq(1)
                        with m.Case(Cmd.INFO):
                            m.d.sync += rsp_len.eq(len(info_bytes))
                        with m.Case(Cmd.STATUS):
                            m.d.sync += rsp_len.eq(1)
                        with m.Case(Cmd.CYCLES):
                            m.d.sync += rsp_len.eq(P.CYCLES_BYTES)
                        with m.Case(Cmd.READ):
                            pass  # set in CHECK
                        with m.Default():
                            m.d.sync += rsp_len.eq(0)
                m.next = "REPLY"
            with m.State("REPLY"):
                with m.If(tx_done):
                    m.next = "SYNC"

        # -- transmit ------------------------------------------------------------------------------
        tcrc = Signal(8)
        thdr = Signal(P.FRAME_HEADER)
        tn = Signal(range(hdr_bytes + 1))
        status_byte = Signal(P.STATUS_LAYOUT)
        m.d.comb += [status_byte.busy.eq(self.busy), status_byte.done.eq(self.done),
                     status_byte.error.eq(err_led), self.error.eq(err_led)]
        info_rom = Array(Const(b, 8) for b in info_bytes)
        # The byte at ``idx`` of a non-READ payload.
        payload_byte = Signal(8)
        with m.If(err != Status.OK):
            m.d.comb += payload_byte.eq(cmd)
        with m.Else():
            with m.Switch(cmd):
                with m.Case(Cmd.INFO):
                    m.d.comb += payload_byte.eq(info_rom[idx])
                with m.Case(Cmd.STATUS):
                    m.d.comb += payload_byte.eq(status_byte.as_value())
                with m.Case(Cmd.CYCLES):
                    m.d.comb += payload_byte.eq(cycles_latch.word_select(idx[:2], 8))

        covered = Signal()  # the byte on tx is part of the CRC (everything but sync and CRC)
        with m.If(tx.valid & tx.ready & covered):
            m.d.sync += tcrc.eq(_crc_next(tcrc, tx.payload))

        def emit(value):
            """Offer a CRC-covered byte; true in the cycle the transmitter takes it."""
            m.d.comb += [tx.valid.eq(1), tx.payload.eq(value), covered.eq(1)]
            return tx.ready

        with m.FSM(name="tx_fsm"):
            with m.State("IDLE"):
                with m.If(rx_fsm.ongoing("REPLY")):
                    m.d.sync += [thdr.code.eq(err), thdr.length.eq(rsp_len), tcrc.eq(0), tn.eq(0), idx.eq(0)]
                    m.next = "SYNC"
            with m.State("SYNC"):
                m.d.comb += [tx.valid.eq(1), tx.payload.eq(P.RSP_SYNC)]  # not part of the CRC
                with m.If(tx.ready):
                    m.next = "HEADER"
            with m.State("HEADER"):
                with m.If(emit(thdr.as_value()[:8])):
                    m.d.sync += [thdr.eq(thdr.as_value() >> 8), tn.eq(tn + 1)]
                    with m.If(tn == hdr_bytes - 1):
                        with m.If((err == Status.OK) & (cmd == Cmd.READ)):
                            m.next = "FETCH"
                        with m.Elif(rsp_len == 0):
                            m.next = "CRC"
                        with m.Else():
                            m.next = "PAYLOAD"
            with m.State("FETCH"):  # READ: one row per visit
                with m.If(rows == 0):
                    m.next = "CRC"
                with m.Else():
                    m.d.comb += self.host_re.eq(1)
                    m.d.sync += [addr.eq(addr + 1), rows.eq(rows - 1), idx.eq(0)]
                    m.next = "LOAD"
            with m.State("LOAD"):  # read data is valid the cycle after host_re
                m.d.sync += buf.eq(self.host_rdata)
                m.next = "ROW"
            with m.State("ROW"):
                with m.If(emit(buf.word_select(idx, 8))):
                    m.d.sync += idx.eq(idx + 1)
                    with m.If(row_last):
                        m.next = "FETCH"
            with m.State("PAYLOAD"):  # rsp_len (1..) bytes of payload_byte
                with m.If(emit(payload_byte)):
                    m.d.sync += idx.eq(idx + 1)
                    with m.If(idx == rsp_len - 1):
                        m.next = "CRC"
            with m.State("CRC"):
                m.d.comb += [tx.valid.eq(1), tx.payload.eq(tcrc)]
                with m.If(tx.ready):
                    m.next = "DONE"
            with m.State("DONE"):
                # Latched after the reply, so a STATUS reply shows how the frame *before* it went.
                m.d.comb += tx_done.eq(1)
                m.d.sync += err_led.eq(err != Status.OK)
                m.next = "IDLE"
        return m


class QuarrySoC(wiring.Component):
    """QuarryTop with its ROM, a UART and the host protocol: the whole design behind the pins.

    Parameters
    ----------
    cfg : AccelConfig
    wmem_init, param_init : list of int
        Packed weight / parameter rows (a compiled program's images), baked into the bitstream.
    clk_hz : int
        Frequency of the ``sync`` domain (reported by INFO; the host derives latency from it).
    clocks_per_bit : int
        UART bit period in ``sync`` cycles (:func:`boards.uart.clocks_per_bit`).
    timeout_cycles : int, optional
        Inter-byte timeout of a request frame; default 0.1 s worth of clock, at least 64 bit times
        (USB-serial adapters deliver host bytes in packets a few milliseconds apart).

    Ports
    -----
    uart_rx : In(1)     serial data from the host (idle high)
    uart_tx : Out(1)    serial data to the host
    leds : Out(3)       busy, done, error (see :data:`LEDS`)
    """

    uart_rx: In(1, init=1)
    uart_tx: Out(1, init=1)
    leds: Out(len(LEDS))

    def __init__(self, cfg: AccelConfig, *, wmem_init=None, param_init=None, clk_hz: int,
                 clocks_per_bit: int, timeout_cycles: int | None = None):
        self._cfg = cfg
        self._wmem_init = list(wmem_init or [])
        self._param_init = list(param_init or [])
        self._cpb = clocks_per_bit
        if timeout_cycles is None:
            timeout_cycles = max(int(clk_hz) // 10, 64 * clocks_per_bit)
        self._timeout = timeout_cycles
        self.info = P.Info(version=P.VERSION, clk_hz=int(clk_hz), clocks_per_bit=clocks_per_bit,
                           config_hash=cfg.hash, rom_id=P.rom_id(cfg, self._wmem_init, self._param_init))
        super().__init__()

    @property
    def cfg(self) -> AccelConfig:
        return self._cfg

    def elaborate(self, platform):
        m = Module()
        m.submodules.top = top = QuarryTop(self._cfg, wmem_init=self._wmem_init, param_init=self._param_init)
        m.submodules.rx = rx = UARTRx(self._cpb)
        m.submodules.tx = tx = UARTTx(self._cpb)
        m.submodules.bridge = br = HostBridge(self._cfg, info=self.info, timeout_cycles=self._timeout)
        wiring.connect(m, rx.data, br.rx)
        wiring.connect(m, br.tx, tx.data)
        m.d.comb += [rx.rx.eq(self.uart_rx), self.uart_tx.eq(tx.tx)]
        for name in ("start", "host_mem", "host_addr", "host_wdata", "host_we", "host_re"):
            m.d.comb += getattr(top, name).eq(getattr(br, name))
        for name in ("busy", "done", "cycles", "host_rdata"):
            m.d.comb += getattr(br, name).eq(getattr(top, name))
        m.d.comb += self.leds.eq(Cat(top.busy, top.done, br.error))
        return m
