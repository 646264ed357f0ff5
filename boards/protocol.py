"""The UART host protocol, defined once: the gateware (:mod:`boards.soc`) and the host
(:mod:`boards.host`, and the cocotb test through it) both import this module.

Frames (all multi-byte integers little-endian, as the layouts below pack them)::

    request  REQ_SYNC  code=Cmd     length u16  payload[length]  crc8
    reply    RSP_SYNC  code=Status  length u16  payload[length]  crc8

``code``/``length`` are :data:`FRAME_HEADER`; ``crc8`` is CRC-8 (polynomial 0x07, init 0, not
reflected) over the header and the payload, without the sync byte. The device answers every
request frame with exactly one reply frame.

Commands and their payloads (request -> OK reply):

* ``INFO``   — empty -> :data:`INFO_LAYOUT` (protocol version, clock, config hash, ROM id).
* ``WRITE``  — :data:`REGION` + ``count`` rows -> empty. Rows are ``row_bytes(cfg, mem)`` bytes
  each, least significant byte first, packed with the :mod:`hw.isa` row layouts (the same bytes
  a :class:`hw.program.Program` stores).
* ``READ``   — :data:`REGION` -> ``count`` rows, same row format.
* ``START``  — empty -> empty (the accelerator starts at instruction 0).
* ``STATUS`` — empty -> one :data:`STATUS_LAYOUT` byte.
* ``CYCLES`` — empty -> u32 cycle counter of the last (or running) program.

Errors: a reply whose code is not ``OK`` carries one payload byte, the request's command byte.
The device checks, in this order: inter-byte timeout (``ERR_TIMEOUT``), checksum
(``ERR_CHECKSUM``), command (``ERR_COMMAND``), accelerator busy for WRITE/READ/START
(``ERR_BUSY``), memory and row range (``ERR_ADDRESS``: the memory is not in :data:`WRITABLE` /
:data:`READABLE` or ``addr + count`` exceeds its depth), length (``ERR_LENGTH``: the payload is
not what the command needs, or a READ reply would exceed 65535 bytes).

A WRITE with a valid header writes its rows as they arrive, before the checksum is seen (the
device holds one row, not a frame): on ``ERR_CHECKSUM`` those rows may hold garbage and the host
must write them again before it sends START (:mod:`boards.host` retries the frame). A frame with
a bad header writes nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from amaranth.lib import data, enum

from hw import isa
from hw.config import AccelConfig
from hw.isa import HostMem

__all__ = [
    "VERSION", "REQ_SYNC", "RSP_SYNC", "Cmd", "Status", "FRAME_HEADER", "REGION", "STATUS_LAYOUT",
    "INFO_LAYOUT", "CYCLES_BYTES", "WRITABLE", "READABLE", "MAX_PAYLOAD", "ProtocolError", "DeviceError",
    "crc8", "crc8_matrix", "row_bytes", "rom_id", "encode_frame", "encode_request", "encode_reply", "decode_frame",
    "frame_length", "region", "Info",
]

#: Bumped when anything in this module changes the bytes on the wire.
VERSION = 1
REQ_SYNC = 0xA5
RSP_SYNC = 0x5A
#: ``length`` is 16 bits.
MAX_PAYLOAD = 0xFFFF
#: Polynomial of :func:`crc8` (x^8 + x^2 + x + 1, "CRC-8/SMBUS").
CRC_POLY = 0x07


class Cmd(enum.Enum, shape=8):
    """Request codes."""

    INFO = 0x01
    WRITE = 0x02
    READ = 0x03
    START = 0x04
    STATUS = 0x05
    CYCLES = 0x06


class Status(enum.Enum, shape=8):
    """Reply codes."""

    OK = 0x00
    #: The crc8 byte does not match the frame.
    ERR_CHECKSUM = 0x01
    #: Unknown command byte.
    ERR_COMMAND = 0x02
    #: Memory not accessible this way, or rows beyond its depth.
    ERR_ADDRESS = 0x03
    #: Payload length wrong for the command, or a READ reply longer than MAX_PAYLOAD.
    ERR_LENGTH = 0x04
    #: WRITE, READ or START while the accelerator runs (its host port is closed then).
    ERR_BUSY = 0x05
    #: The frame stopped arriving part way (no byte for the device's timeout); it was dropped.
    ERR_TIMEOUT = 0x06


#: Header after the sync byte: the command (request) or status (reply), and the payload length.
FRAME_HEADER = data.StructLayout({"code": 8, "length": 16})
#: WRITE/READ payload header: memory (:class:`hw.isa.HostMem` value), first row, row count.
REGION = data.StructLayout({"mem": 8, "addr": 16, "count": 16})
#: STATUS reply byte.
STATUS_LAYOUT = data.StructLayout({"busy": 1, "done": 1, "error": 1, "pad": 5})
#: INFO reply: what the bitstream is, so a host refuses a program built for something else.
INFO_LAYOUT = data.StructLayout({
    "version": 8,
    "clk_hz": 32,            # the accelerator's clock, for latency = cycles / clk_hz
    "clocks_per_bit": 16,    # UART divider (baud = clk_hz / clocks_per_bit)
    "config_hash": 64,       # AccelConfig.hash (16 hex digits) as an integer
    "rom_id": 64,            # rom_id() of the baked weight / param images
})
CYCLES_BYTES = 4

#: Memories the host may write / read over the link. Weights and parameters are ROM in the
#: bitstream (the INFO reply identifies them); leaving them out keeps the row buffer narrow.
WRITABLE = (HostMem.IMEM, HostMem.SPAD)
READABLE = (HostMem.IMEM, HostMem.SPAD, HostMem.ACC)


class ProtocolError(RuntimeError):
    """A reply is malformed (bad sync, checksum, length) or does not come at all."""


class DeviceError(RuntimeError):
    """The device answered with an error status; ``status`` holds it."""

    def __init__(self, status: Status, cmd: int, message: str | None = None):
        self.status, self.cmd = status, cmd
        try:
            name = Cmd(cmd).name
        except ValueError:
            name = f"{cmd:#04x}"
        super().__init__(message or f"device replied {status.name} to {name}")


# -- CRC-8 ---------------------------------------------------------------------------------------

def _crc8_byte(crc: int, byte: int) -> int:
    crc ^= byte
    for _ in range(8):
        crc = ((crc << 1) ^ CRC_POLY) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def crc8(payload: bytes, crc: int = 0) -> int:
    for b in payload:
        crc = _crc8_byte(crc, b)
    return crc


def crc8_matrix() -> list[list[int]]:
    """The byte update as GF(2) taps, for the gateware.

    ``_crc8_byte(c, b)`` is linear in ``x = c ^ b``: output bit ``j`` is the XOR of the bits
    ``x[i]`` for ``i`` in ``crc8_matrix()[j]``. Derived from :func:`_crc8_byte` itself, so the
    hardware cannot disagree with the host."""
    cols = [_crc8_byte(1 << i, 0) for i in range(8)]
    return [[i for i in range(8) if cols[i] >> j & 1] for j in range(8)]


# -- rows ----------------------------------------------------------------------------------------

def row_bytes(cfg: AccelConfig, mem: HostMem) -> int:
    """Bytes of one row of ``mem`` on the wire."""
    return -(-isa.host_row_bits(cfg)[HostMem(mem)] // 8)


def rom_id(cfg: AccelConfig, wmem_rows, param_rows) -> int:
    """64-bit id of the weight and parameter images baked into a bitstream."""
    h = hashlib.sha256(cfg.hash.encode())
    for mem, rows in ((HostMem.WMEM, wmem_rows), (HostMem.PARAM, param_rows)):
        nb = row_bytes(cfg, mem)
        h.update(len(rows or ()).to_bytes(4, "little"))
        for r in rows or ():
            h.update(int(r).to_bytes(nb, "little"))
    return int.from_bytes(h.digest()[:8], "little")


# -- frames --------------------------------------------------------------------------------------

def _layout_bytes(layout: data.StructLayout, fields: dict) -> bytes:
    return layout.const(fields).as_bits().to_bytes(-(-layout.size // 8), "little")


def encode_frame(sync: int, code: int, payload: bytes) -> bytes:
    """Any frame, valid code or not (tests send unknown commands with it)."""
    payload = bytes(payload)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    body = _layout_bytes(FRAME_HEADER, {"code": int(code), "length": len(payload)}) + payload
    return bytes([sync]) + body + bytes([crc8(body)])


def encode_request(cmd: Cmd, payload: bytes = b"") -> bytes:
    return encode_frame(REQ_SYNC, Cmd(cmd).value, payload)


def encode_reply(status: Status, payload: bytes = b"") -> bytes:
    return encode_frame(RSP_SYNC, Status(status).value, payload)


HEADER_BYTES = 1 + FRAME_HEADER.size // 8


def frame_length(head: bytes) -> int:
    """Total frame length, given its first :data:`HEADER_BYTES` bytes."""
    hdr = FRAME_HEADER.from_bits(int.from_bytes(head[1:HEADER_BYTES], "little"))
    return HEADER_BYTES + int(hdr.length) + 1


def decode_frame(frame: bytes, sync: int = RSP_SYNC) -> tuple[int, bytes]:
    """(code, payload) of one complete frame; raises :class:`ProtocolError` if it is malformed."""
    if len(frame) < HEADER_BYTES + 1:
        raise ProtocolError(f"short frame ({len(frame)} bytes)")
    if frame[0] != sync:
        raise ProtocolError(f"bad sync byte {frame[0]:#04x} (expected {sync:#04x})")
    if len(frame) != frame_length(frame):
        raise ProtocolError(f"frame is {len(frame)} bytes, its header says {frame_length(frame)}")
    if crc8(frame[1:-1]) != frame[-1]:
        raise ProtocolError(f"reply checksum mismatch ({crc8(frame[1:-1]):#04x} != {frame[-1]:#04x})")
    hdr = FRAME_HEADER.from_bits(int.from_bytes(frame[1:HEADER_BYTES], "little"))
    return int(hdr.code), frame[HEADER_BYTES:-1]


def region(mem: HostMem, addr: int, count: int) -> bytes:
    """WRITE/READ payload header."""
    return _layout_bytes(REGION, {"mem": HostMem(mem).value, "addr": addr, "count": count})


@dataclass(frozen=True)
class Info:
    """The INFO reply, decoded."""

    version: int
    clk_hz: int
    clocks_per_bit: int
    config_hash: str
    rom_id: int

    @classmethod
    def from_payload(cls, payload: bytes) -> "Info":
        if len(payload) != INFO_LAYOUT.size // 8:
            raise ProtocolError(f"INFO reply has {len(payload)} bytes, expected {INFO_LAYOUT.size // 8}")
        v = INFO_LAYOUT.from_bits(int.from_bytes(payload, "little"))
        return cls(int(v.version), int(v.clk_hz), int(v.clocks_per_bit), f"{int(v.config_hash):016x}",
                   int(v.rom_id))

    def fields(self) -> dict:
        """Field values for :data:`INFO_LAYOUT`."""
        return {"version": self.version, "clk_hz": self.clk_hz, "clocks_per_bit": self.clocks_per_bit,
                "config_hash": int(self.config_hash, 16), "rom_id": self.rom_id}

    def payload(self) -> bytes:
        return _layout_bytes(INFO_LAYOUT, self.fields())
