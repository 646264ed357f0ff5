"""The program container: instruction words + memory images + JSON manifest, in one file.

File layout (all integers little-endian)::

    b"QUARRYPG"            magic, 8 bytes
    u32 header_len         length of the JSON header in bytes
    header                 JSON: format version, full config, config hash, instruction count,
                           image row counts and widths, free-form manifest
    instructions           n_instr words of instr_bits/8 bytes
    images                 for each image in header order: rows of ceil(row_bits/8) bytes
    sha256                 32 bytes over everything before it

Memory rows are packed with the layouts of :mod:`hw.isa` (``pack_rows``/``unpack_rows``), so the
host, the golden model and the RTL agree on every bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from amaranth.hdl import Shape
from amaranth.lib import data

from . import isa
from .config import AccelConfig, ConfigError

__all__ = ["Program", "ProgramError", "FORMAT_VERSION", "pack_rows", "unpack_rows", "IMAGE_LAYOUTS",
           "image_depth", "atomic_write", "atomic_dir", "write_readmemh"]

MAGIC = b"QUARRYPG"
FORMAT_VERSION = 1

#: Memory images a program may carry, and the row layout of each.
IMAGE_LAYOUTS = {
    "wmem": isa.wmem_row_layout,
    "param": isa.param_row_layout,
    "spad": isa.spad_row_layout,
    #: ``bfp_exp_bits`` configs only (:func:`image_depth`).
    "spad_exp": isa.spad_exp_row_layout,
}


def image_depth(cfg: AccelConfig, name: str) -> int:
    """Rows of the memory image ``name`` loads into; raises :class:`ProgramError` for an image the
    config has no memory for (``spad_exp`` without ``bfp_exp_bits``)."""
    if name == "spad_exp":
        if not cfg.bfp_exp_bits:
            raise ProgramError(f"image spad_exp needs a bfp_exp_bits config; {cfg.describe()} has none")
        return cfg.spad_depth
    return getattr(cfg, f"{name}_depth")


class ProgramError(ValueError):
    """A program file or object is malformed, truncated, corrupt or built for another config."""


def _size(shape) -> int:
    return shape.size if isinstance(shape, data.Layout) else Shape.cast(shape).width


def _leaves(layout, offset=0):
    """Yield (path, offset, shape) for every scalar leaf of a layout."""
    if isinstance(layout, data.ArrayLayout):
        for i in range(layout.length):
            yield from ((((i,) + p), o, s) for p, o, s in _leaves(layout.elem_shape, offset + i * _size(layout.elem_shape)))
    elif isinstance(layout, data.StructLayout):
        for name, f in layout:
            yield from ((((name,) + p), o, s) for p, o, s in _leaves(f.shape, offset + f.offset))
    else:
        yield (), offset, Shape.cast(layout)


def pack_rows(layout: data.Layout, values) -> list[int]:
    """Pack rows into integers with ``layout``.

    ``values`` is an integer array of shape (n, lanes) for an array of scalars, or a dict of such
    arrays keyed by struct field for an array of structs (e.g. the param layout).
    """
    leaves = list(_leaves(layout))
    if isinstance(values, dict):
        n = len(next(iter(values.values())))
        get = lambda path: np.asarray(values[path[1]])[:, path[0]]  # noqa: E731
    else:
        values = np.asarray(values)
        n = values.shape[0]
        get = lambda path: values[:, path[0]]  # noqa: E731
    rows = [0] * n
    for path, off, shape in leaves:
        w = shape.width
        col = get(path).astype(object)
        lo = -(1 << (w - 1)) if shape.signed else 0
        hi = lo + (1 << w) - 1
        bad = [int(v) for v in col if not lo <= int(v) <= hi]
        if bad:
            raise ProgramError(f"value {bad[0]} does not fit field {'.'.join(map(str, path))} ({lo}..{hi})")
        mask = (1 << w) - 1
        for r, v in enumerate(col):
            rows[r] |= (int(v) & mask) << off
    return rows


def unpack_rows(layout: data.Layout, rows) -> np.ndarray | dict:
    """Inverse of :func:`pack_rows`: int64 array (n, lanes), or dict of them for struct lanes."""
    leaves = list(_leaves(layout))
    n = len(rows)
    out: dict = {}
    for path, off, shape in leaves:
        w = shape.width
        mask = (1 << w) - 1
        col = np.fromiter(((r >> off) & mask for r in rows), dtype=np.int64, count=n) if n else np.zeros(0, np.int64)
        if shape.signed:
            col = np.where(col >= (1 << (w - 1)), col - (1 << w), col)
        key = path[1] if len(path) > 1 else None
        out.setdefault(key, []).append(col)
    res = {k: np.stack(v, axis=1) if n else np.zeros((0, len(v)), np.int64) for k, v in out.items()}
    return res[None] if list(res) == [None] else res


def atomic_write(path, payload: bytes | str) -> None:
    """Write a file via a temporary sibling and rename, so no half-written file is ever seen."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload.encode() if isinstance(payload, str) else payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(out):
    """Fill a temporary sibling of directory ``out``, then swap it in; on any error nothing is
    left behind and an existing ``out`` is untouched. Yields the temporary directory."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_readmemh(path, rows: list[int], row_bits: int) -> None:
    digits = -(-row_bits // 4)
    atomic_write(path, "".join(f"{r:0{digits}x}\n" for r in rows))


def _row_bytes(bits: int) -> int:
    return -(-bits // 8)


def _expected_size(header_bytes: bytes, body_start: int) -> int | None:
    """File size an (unverified) header implies, or None if the header does not parse."""
    try:
        h = json.loads(header_bytes)
        cfg = AccelConfig.from_dict(h["config"])
        n = body_start + h["n_instr"] * isa.instr_bits(cfg) // 8
        n += sum(s["rows"] * _row_bytes(s["row_bits"]) for s in h.get("images", {}).values())
        return n + 32
    except Exception:  # any malformed header: fall back to the plain checksum message
        return None


@dataclass
class Program:
    """A program for one :class:`AccelConfig`.

    ``images`` maps an image name in :data:`IMAGE_LAYOUTS` to packed rows (ints), loaded at row 0
    of that memory. ``manifest`` is free-form JSON (layers, input/output tensors, scales, ...).
    """

    config: AccelConfig
    instrs: list[isa.Instr]
    images: dict[str, list[int]] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)

    def __post_init__(self):
        cfg = self.config
        for i, ins in enumerate(self.instrs):
            try:
                ins.check(cfg)
            except isa.IsaError as e:
                raise ProgramError(f"instruction {i}: {e}") from None
        if len(self.instrs) > cfg.imem_depth:
            raise ProgramError(f"program has {len(self.instrs)} instructions, imem holds {cfg.imem_depth}")
        for name, rows in self.images.items():
            if name not in IMAGE_LAYOUTS:
                raise ProgramError(f"unknown memory image {name!r} (known: {', '.join(IMAGE_LAYOUTS)})")
            depth = image_depth(cfg, name)
            if len(rows) > depth:
                raise ProgramError(f"image {name} has {len(rows)} rows, memory holds {depth}")

    def words(self) -> list[int]:
        return [ins.encode(self.config) for ins in self.instrs]

    # -- serialisation ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        cfg = self.config
        ib = isa.instr_bits(cfg)
        header = {
            "format": "quarry-program", "version": FORMAT_VERSION,
            "config": cfg.to_dict(), "config_hash": cfg.hash,
            "n_instr": len(self.instrs), "instr_bits": ib,
            "images": {k: {"rows": len(v), "row_bits": data.Layout.cast(IMAGE_LAYOUTS[k](cfg)).size}
                       for k, v in self.images.items()},
            "manifest": self.manifest,
        }
        hb = json.dumps(header, sort_keys=True).encode()
        out = bytearray(MAGIC + struct.pack("<I", len(hb)) + hb)
        for w in self.words():
            out += w.to_bytes(ib // 8, "little")
        for k in sorted(self.images):  # the header's (sorted) order
            rows = self.images[k]
            nb = _row_bytes(header["images"][k]["row_bits"])
            for r in rows:
                out += int(r).to_bytes(nb, "little")
        out += hashlib.sha256(out).digest()
        return bytes(out)

    @classmethod
    def from_bytes(cls, blob: bytes, config: AccelConfig | None = None) -> "Program":
        """Parse a program; if ``config`` is given, refuse one built for a different config."""
        if len(blob) < len(MAGIC) + 4 + 32:
            raise ProgramError(f"truncated program: {len(blob)} bytes is shorter than any program")
        if blob[:len(MAGIC)] != MAGIC:
            raise ProgramError("not a Quarry program (bad magic)")
        (hlen,) = struct.unpack_from("<I", blob, len(MAGIC))
        hstart = len(MAGIC) + 4
        if hstart + hlen + 32 > len(blob):
            raise ProgramError(f"truncated program: header says {hlen} bytes, file has {len(blob) - hstart - 32}")
        if hashlib.sha256(blob[:-32]).digest() != blob[-32:]:
            # A file cut after its header also fails the checksum; say "truncated" when the
            # header's own sizes show the file is too short.
            need = _expected_size(blob[hstart:hstart + hlen], hstart + hlen)
            if need is not None and len(blob) < need:
                raise ProgramError(f"truncated program: expected {need} bytes, found {len(blob)} (checksum mismatch)")
            raise ProgramError("corrupt program: checksum mismatch")
        try:
            header = json.loads(blob[hstart:hstart + hlen])
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ProgramError("corrupt program: header is not valid JSON") from None
        if header.get("format") != "quarry-program":
            raise ProgramError("not a Quarry program (header format)")
        if header.get("version") != FORMAT_VERSION:
            raise ProgramError(f"program format version {header.get('version')!r} is not supported (expected {FORMAT_VERSION})")
        try:
            cfg = AccelConfig.from_dict(header["config"])
        except (ConfigError, TypeError, KeyError) as e:
            raise ProgramError(f"program config is invalid: {e}") from None
        if cfg.hash != header.get("config_hash"):
            raise ProgramError("corrupt program: config hash does not match its config")
        if config is not None and config.hash != cfg.hash:
            raise ProgramError(f"program was built for config {cfg.hash} ({cfg.describe()}), "
                               f"not {config.hash} ({config.describe()})")
        ib = isa.instr_bits(cfg)
        pos = hstart + hlen
        need = pos + header["n_instr"] * ib // 8
        img_specs = header.get("images", {})
        for k, spec in img_specs.items():
            if k not in IMAGE_LAYOUTS:
                raise ProgramError(f"unknown memory image {k!r}")
            need += spec["rows"] * _row_bytes(spec["row_bits"])
        if need != len(blob) - 32:
            raise ProgramError(f"truncated or padded program: expected {need + 32} bytes, found {len(blob)}")
        instrs = []
        for i in range(header["n_instr"]):
            w = int.from_bytes(blob[pos:pos + ib // 8], "little")
            pos += ib // 8
            try:
                instrs.append(isa.decode(cfg, w))
            except isa.IsaError as e:
                raise ProgramError(f"instruction {i}: {e}") from None
        images = {}
        for k, spec in img_specs.items():
            nb = _row_bytes(spec["row_bits"])
            images[k] = [int.from_bytes(blob[pos + j * nb:pos + (j + 1) * nb], "little") for j in range(spec["rows"])]
            pos += spec["rows"] * nb
        return cls(cfg, instrs, images, header.get("manifest", {}))

    def save(self, path) -> None:
        atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path, config: AccelConfig | None = None) -> "Program":
        try:
            blob = Path(path).read_bytes()
        except OSError as e:
            raise ProgramError(f"cannot read program {path}: {e.strerror}") from None
        return cls.from_bytes(blob, config)


# -- model I/O (the manifest's "input" / "output" entries, written by compiler.lower) -------------

def quantize_input(program: Program, x: np.ndarray) -> tuple[int, np.ndarray]:
    """Quantize a float (C, H, W) input as the compiled model expects and lay it out in spad
    channel blocks (im2col'd first if the manifest's ``input.im2col`` says so: channel
    ``c*kh*kw + dy*kw + dx`` of output pixel (i, j) is input (c, i*sh + dy - ph, j*sw + dx - pw),
    zero outside). Returns (first spad row, raw rows (n, rows))."""
    cfg = program.config
    spec = program.manifest["input"]
    c, h, w = spec["shape"]
    x = np.asarray(x, dtype=np.float64).reshape(c, h, w)
    a = cfg.a_bits
    lo, hi = (-(1 << (a - 1)), (1 << (a - 1)) - 1) if spec["signed"] else (0, (1 << a) - 1)
    # A model quantized at fewer activation bits than the array's gives its own (narrower) range.
    lo, hi = max(lo, spec.get("lo", lo)), min(hi, spec.get("hi", hi))
    q = np.clip(np.round(x / spec["scale"]), lo, hi).astype(np.int64)
    if "im2col" in spec:
        (kh, kw), (sh, sw), (ph, pw) = (spec["im2col"][k] for k in ("kernel", "stride", "padding"))
        _, oh, ow = spec["im2col"]["shape"]
        qp = np.pad(q, ((0, 0), (ph, ph), (pw, pw)))
        cols = [qp[:, dy:dy + sh * (oh - 1) + 1:sh, dx:dx + sw * (ow - 1) + 1:sw]
                for dy in range(kh) for dx in range(kw)]
        q = np.stack(cols, axis=1).reshape(c * kh * kw, oh, ow)
        c, h, w = q.shape
    nb = -(-c // cfg.rows)
    rows = np.zeros((nb, h * w, cfg.rows), np.int64)
    for b in range(nb):
        blk = q[b * cfg.rows:(b + 1) * cfg.rows].reshape(-1, h * w).T
        rows[b, :, :blk.shape[1]] = blk
    return spec["spad_base"], rows.reshape(nb * h * w, cfg.rows) & ((1 << a) - 1)


def output_region(program: Program) -> tuple[int, int]:
    """(first acc row, row count) holding the model's raw output accumulators."""
    o = program.manifest["output"]
    return o["acc_base"], o["blocks"] * o["h"] * o["w"]


def decode_output(program: Program, acc_rows: np.ndarray) -> np.ndarray:
    """Float outputs (channels, h, w) from the raw accumulator rows of :func:`output_region`."""
    cfg = program.config
    o = program.manifest["output"]
    hw_ = o["h"] * o["w"]
    acc = np.asarray(acc_rows, np.int64).reshape(o["blocks"], hw_, cfg.cols)
    acc = acc.transpose(0, 2, 1).reshape(o["blocks"] * cfg.cols, hw_)[:o["channels"]]
    vals = (acc + np.asarray(o["bias_q"])[:, None]) * np.asarray(o["scales"])[:, None]
    return vals.reshape(o["channels"], o["h"], o["w"])
