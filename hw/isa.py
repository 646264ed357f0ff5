"""The Quarry instruction set, defined once.

Opcodes are an :class:`amaranth.lib.enum.Enum`; every instruction format is an
:class:`amaranth.lib.data.StructLayout` computed from an :class:`~hw.config.AccelConfig`.
The RTL decodes with these layouts, and host code encodes/decodes with the very same layouts
(``layout.const(...).as_bits()`` / ``layout.from_bits(...)``): nothing packs bits by hand.

Machine model (see ``docs/ISA.md``, generated from this file):

* **spad** — activation scratchpad, ``spad_depth`` rows of ``rows`` activations (raw ``a_bits``
  patterns; each instruction that reads them says whether they are signed). A tensor of shape
  (C, H, W) is stored as ``ceil(C / rows)`` channel blocks, each ``H*W`` consecutive rows.
* **wmem** — weight memory, rows of ``cols`` ``w_bits`` weights; row ``k`` holds the weights of
  reduction index ``k`` for ``cols`` output channels. A lane is a signed integer weight, or (for
  a MATMUL with ``pot = 1``) a power-of-two weight code (``pot_code_layout``). On a
  ``packed_weights`` config a PRELOAD with ``pack_bits = k`` reads lanes that each hold
  ``p = w_bits // k`` narrower INT weights (``packed_lane_layout``: field ``f`` at bits
  ``f*k .. f*k + k - 1``, the top ``w_bits - p*k`` bits 0) of ``p`` consecutive bank rows; the
  loader sign-extends each field to ``w_bits`` (one wmem read per bank row as unpacked, so
  PRELOAD takes the same cycles). Packing is for INT weights only: a PoT code is sign and
  magnitude, so a sign-extended narrow code is not the ``w_bits`` code of the same weight; the
  compiler keeps PoT layers unpacked (``compiler.kernels.conv2d`` refuses to pack them).
* **acc** — accumulator memory, rows of ``cols`` signed ``acc_width`` accumulators.
* **param** — per-channel requantization parameters, rows of ``cols`` lanes.
* **spad_exp** — ``bfp_exp_bits > 0`` configs only: one unsigned block-floating-point exponent
  per spad row (``spad_exp_row_layout``), beside spad. MATMUL sees lane ``l`` of spad row ``r``
  as ``raw(l) * 2**spad_exp[r]`` (its block rescale absorbs the exponent); POST with ``bfp = 1``
  writes mantissas and their row's exponent, every other spad writer writes exponent 0
  (``sim/golden.py``).
* two weight banks in the array (double buffering): ``PRELOAD`` fills one while ``MATMUL`` uses
  the other.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from amaranth.hdl import signed, unsigned
from amaranth.lib import data, enum

from .config import AccelConfig

__all__ = [
    "Opcode", "PoolMode", "IsaError", "Instr", "FIELDS", "instr_layout", "args_layout", "instr_bits",
    "wmem_row_layout", "spad_row_layout", "acc_row_layout", "param_lane_layout", "param_row_layout",
    "spad_exp_row_layout", "check_bfp_post", "HostMem", "host_mems", "host_row_bits", "host_depths", "host_data_bits", "host_addr_bits",
    "pot_code_layout", "pot_values", "pot_encode", "pot_decode", "PotError", "POT_MODES", "check_pot_mode",
    "packed_lane_layout", "pack_factor", "pack_weights", "unpack_weights", "PackError", "check_pack_bits",
    "encode", "decode", "OPCODE_BITS", "STRIDE_BITS", "OFFSET_BITS", "KERNEL_BITS", "POOL_SHIFT_BITS",
]

OPCODE_BITS = 4
#: Convolution/pooling strides 1..7.
STRIDE_BITS = 3
#: Signed window offsets (kernel tap minus padding), -32..31.
OFFSET_BITS = 6
#: Pooling window 1..31 per side.
KERNEL_BITS = 5
#: Average-pooling right shift 0..31.
POOL_SHIFT_BITS = 5


class Opcode(enum.Enum, shape=OPCODE_BITS):
    """Instruction opcodes."""

    #: Do nothing.
    NOP = 0
    #: Wait until every engine is idle, then stop; the cycle counter freezes.
    HALT = 1
    #: Barrier: wait until every engine is idle.
    SYNC = 2
    #: Load ``n_rows`` weight rows from wmem into a weight bank of the array (rest zero).
    PRELOAD = 3
    #: Stream activation vectors through the array (2-D strided window with zero padding) into acc.
    MATMUL = 4
    #: Post-process acc rows: bias, requantize, (+residual), zero point, clamp; write spad lanes.
    POST = 5
    #: Max or average pooling, spad to spad, 2-D window with padding.
    POOL = 6


class PoolMode(enum.Enum, shape=1):
    MAX = 0
    AVG = 1


class IsaError(ValueError):
    """An instruction field value is out of range, or a word does not decode."""


class PotError(IsaError):
    """A value is not a PoT weight of the config, or a code is not a legal PoT code."""


class PackError(IsaError):
    """A packed-weight width ``k`` is not legal for the config, or a weight does not fit ``k`` bits."""


@dataclass(frozen=True)
class Field:
    name: str
    width: object  # int or callable(cfg) -> int
    signed: bool
    doc: str

    def shape(self, cfg: AccelConfig):
        w = self.width(cfg) if callable(self.width) else self.width
        return signed(w) if self.signed else unsigned(w)


def _f(name, width, doc, signed=False):
    return Field(name, width, signed, doc)


_dim = lambda c: c.dim_bits  # noqa: E731

#: Per-opcode argument fields, in layout order (LSB first). The single definition of the ISA.
FIELDS: dict[Opcode, tuple[Field, ...]] = {
    Opcode.NOP: (),
    Opcode.HALT: (),
    Opcode.SYNC: (),
    Opcode.PRELOAD: (
        _f("bank", 1, "weight bank to fill"),
        _f("w_addr", lambda c: c.wmem_addr_bits, "first wmem row"),
        _f("n_rows", lambda c: c.row_count_bits, "rows to load (0..rows); bank rows >= n_rows become 0"),
        # Last, and 0 bits unless packed_weights: every other config's words are unchanged.
        _f("pack_bits", lambda c: (c.w_bits - 1).bit_length() if c.packed_weights else 0,
           "packed_weights configs only (else 0 bits): 0 = one w_bits weight per lane; k in "
           "1..w_bits-1 = every lane holds p = w_bits // k k-bit two's-complement INT weights "
           "(packed_lane_layout), bank row i is field i % p of wmem row w_addr + i // p, sign-extended"),
    ),
    Opcode.MATMUL: (
        _f("bank", 1, "weight bank to multiply with"),
        _f("accumulate", 1, "1: acc += product; 0: acc = product"),
        _f("a_signed", 1, "activations are signed a_bits (else unsigned)"),
        _f("spad_base", lambda c: c.spad_addr_bits, "spad row of input pixel (0, 0)"),
        _f("in_h", _dim, "input height (rows outside 0..in_h-1 read as zero)"),
        _f("in_w", _dim, "input width, also the row pitch"),
        _f("out_h", _dim, "output height"),
        _f("out_w", _dim, "output width; out_h*out_w vectors are streamed"),
        _f("stride_h", STRIDE_BITS, "vertical stride"),
        _f("stride_w", STRIDE_BITS, "horizontal stride"),
        _f("off_h", OFFSET_BITS, "input row of output row 0 (kernel tap minus padding)", signed=True),
        _f("off_w", OFFSET_BITS, "input column of output column 0", signed=True),
        _f("acc_base", lambda c: c.acc_addr_bits, "acc row of output pixel (0, 0); rows are consecutive"),
        # Last, so programs written before PoT PEs existed decode unchanged (pot = 0).
        _f("pot", 1, "bank weights are PoT codes (pe_kind pot: must be 1; int: 0; hybrid: either)"),
        _f("scale_addr", lambda c: c.param_addr_bits if c.block_scale else 0,
           "block_scale configs only (else 0 bits): param row whose per-lane mult/shift rescale the "
           "sums, round_shift(sum * mult, shift), before they are accumulated (DSConv block scales)"),
        _f("overlap", lambda c: 1 if c.post_overlap else 0,
           "post_overlap configs only (else 0 bits): 1 = may issue while the previous POST still runs "
           "(hw.timing.overlap_hazard: reads no spad row that POST writes, writes each acc row after "
           "POST has read it; sim.golden rejects a program that breaks this)"),
    ),
    Opcode.POST: (
        _f("acc_base", lambda c: c.acc_addr_bits, "first acc row"),
        _f("spad_base", lambda c: c.spad_addr_bits, "first spad row written"),
        _f("n", lambda c: c.acc_addr_bits + 1, "rows to process"),
        _f("param_addr", lambda c: c.param_addr_bits, "param row (per-lane bias, mult, res_mult, shift)"),
        _f("src_lane", lambda c: c.lane_bits, "first acc lane used"),
        _f("dst_lane", lambda c: c.lane_bits, "spad lane it is written to"),
        _f("n_lanes", lambda c: c.lane_bits, "lanes written; other spad lanes keep their value"),
        _f("zp", lambda c: c.a_bits + 1, "output zero point", signed=True),
        _f("lo", lambda c: c.a_bits + 1, "clamp low bound (after zero point); the clamp tests lo "
           "first, so with lo > hi values below lo give lo and all others hi", signed=True),
        _f("hi", lambda c: c.a_bits + 1, "clamp high bound", signed=True),
        _f("res_en", 1, "add residual: spad[res_base + i] lane * res_mult before rounding"),
        _f("res_signed", 1, "residual activations are signed"),
        _f("res_base", lambda c: c.spad_addr_bits, "first spad row of the residual tensor"),
        _f("bfp", lambda c: 1 if c.bfp_exp_bits else 0,
           "bfp_exp_bits configs only (else 0 bits): 1 = block-floating-point output: requantize "
           "without zp/clamp, shared exponent e = min(emax, max(0, bitlen(max lane magnitude) - "
           "bitlen(hi))) of the row, lanes = clamp(round_shift(y, e), lo, hi), spad_exp[row] = e "
           "(needs zp = 0, res_en = 0, hi >= 1); 0 = as without BFP, spad_exp[row] = 0"),
        _f("overlap", lambda c: 1 if c.post_overlap else 0,
           "post_overlap configs only (else 0 bits): 1 = may issue while earlier MATMULs still stream "
           "or drain (hw.timing.post_hazard: every acc row it reads is final before it reads it, it "
           "writes no spad row they read; a residual POST still waits for their spad reads)"),
    ),
    Opcode.POOL: (
        _f("mode", PoolMode, "MAX or AVG"),
        _f("a_signed", 1, "activations are signed"),
        _f("src_base", lambda c: c.spad_addr_bits, "spad row of input pixel (0, 0)"),
        _f("in_h", _dim, "input height"),
        _f("in_w", _dim, "input width, also the row pitch"),
        _f("out_h", _dim, "output height"),
        _f("out_w", _dim, "output width"),
        _f("k_h", KERNEL_BITS, "window height"),
        _f("k_w", KERNEL_BITS, "window width"),
        _f("stride_h", STRIDE_BITS, "vertical stride"),
        _f("stride_w", STRIDE_BITS, "horizontal stride"),
        _f("off_h", OFFSET_BITS, "input row of window (0, 0) for output row 0 (minus padding)", signed=True),
        _f("off_w", OFFSET_BITS, "input column of window (0, 0) for output column 0", signed=True),
        _f("dst_base", lambda c: c.spad_addr_bits, "spad row of output pixel (0, 0)"),
        _f("mult", lambda c: c.pool_mult_bits, "AVG: sum * mult >> shift (rounded)"),
        _f("shift", POOL_SHIFT_BITS, "AVG: right shift"),
    ),
}


def _field_shape(f: Field, cfg):
    if isinstance(f.width, type) and issubclass(f.width, enum.Enum):
        return f.width
    return f.shape(cfg)


@functools.lru_cache(maxsize=None)
def args_layout(cfg: AccelConfig, op: Opcode) -> data.StructLayout:
    """Layout of the argument fields of ``op``."""
    return data.StructLayout({f.name: _field_shape(f, cfg) for f in FIELDS[op]})


@functools.lru_cache(maxsize=None)
def instr_bits(cfg: AccelConfig) -> int:
    """Instruction word width: opcode plus the widest argument layout, rounded up to 32 bits."""
    widest = max(args_layout(cfg, op).size for op in Opcode)
    return -(-(OPCODE_BITS + widest) // 32) * 32


@functools.lru_cache(maxsize=None)
def instr_layout(cfg: AccelConfig) -> data.StructLayout:
    """Layout of one instruction word: ``op`` then a union of every opcode's arguments."""
    args = data.UnionLayout({op.name.lower(): args_layout(cfg, op) for op in Opcode if FIELDS[op]})
    pad = instr_bits(cfg) - OPCODE_BITS - args.size
    return data.StructLayout({"op": Opcode, "args": args, "pad": unsigned(pad)})


# -- memory row layouts (shared by RTL views and host-side image packing) ------------------------

@functools.lru_cache(maxsize=None)
def wmem_row_layout(cfg: AccelConfig) -> data.ArrayLayout:
    return data.ArrayLayout(signed(cfg.w_bits), cfg.cols)


@functools.lru_cache(maxsize=None)
def pot_code_layout(cfg: AccelConfig) -> data.StructLayout:
    """A power-of-two weight code, one ``w_bits`` wmem lane (LSB first).

    ``mag`` = k (``w_bits - 1`` bits), ``sign`` = the MSB. ``k == 0`` is the weight 0 (either
    sign); ``1 <= k <= cfg.pot_max_exp + 1`` is ``(-1)**sign * 2**(k-1)``; larger ``k`` (only
    possible when ``POT_EXP_CAP`` caps the exponent) is illegal. A PE multiplies by such a weight
    with an arithmetic shift of the activation by ``k - 1``.
    """
    return data.StructLayout({"mag": unsigned(cfg.w_bits - 1), "sign": unsigned(1)})


def _check_k(cfg: AccelConfig, k) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= cfg.w_bits:
        raise PackError(f"packed weight width must be an integer in 1..w_bits ({cfg.w_bits}), not {k!r}")
    return int(k)


@functools.lru_cache(maxsize=None)
def packed_lane_layout(cfg: AccelConfig, k: int) -> data.ArrayLayout:
    """One ``w_bits`` wmem lane holding ``p = w_bits // k`` signed ``k``-bit weights (LSB first).

    Field ``f`` belongs to bank row ``f`` of the lane's group of ``p`` rows; the top
    ``w_bits - p*k`` bits are 0. ``k == w_bits`` is one field: the unpacked lane.
    """
    k = _check_k(cfg, k)
    return data.ArrayLayout(signed(k), cfg.w_bits // k)


def pack_factor(cfg: AccelConfig, pack_bits: int) -> int:
    """Bank rows per wmem row for a PRELOAD ``pack_bits`` value (0: unpacked, 1 row)."""
    return 1 if pack_bits == 0 else packed_lane_layout(cfg, pack_bits).length


def check_pack_bits(cfg: AccelConfig, pack_bits: int) -> None:
    """Raise :class:`PackError` unless a PRELOAD with this ``pack_bits`` runs on ``cfg``."""
    if pack_bits == 0:
        return
    if not cfg.packed_weights:
        raise PackError(f"PRELOAD.pack_bits = {pack_bits} needs a packed_weights config "
                        f"(hw.build --packed-weights); {cfg.describe()} has none")
    if not 1 <= pack_bits < cfg.w_bits:
        raise PackError(f"PRELOAD.pack_bits = {pack_bits} must be 0 (unpacked) or 1..{cfg.w_bits - 1} "
                        f"(narrower than w_bits {cfg.w_bits})")


def _lane_patterns(cfg: AccelConfig, lanes) -> np.ndarray:
    v = np.asarray(lanes)
    if v.dtype.kind not in "iu":
        raise PackError(f"wmem lanes must be integers, not {v.dtype} values")
    v = v.astype(np.int64)
    lo, hi = -(1 << (cfg.w_bits - 1)), (1 << cfg.w_bits) - 1
    if v.size and (v.min() < lo or v.max() > hi):
        bad = v[(v < lo) | (v > hi)].flat[0]
        raise PackError(f"wmem lane {int(bad)} does not fit w_bits {cfg.w_bits} ({lo}..{hi})")
    return v & ((1 << cfg.w_bits) - 1)


def pack_weights(cfg: AccelConfig, k: int, rows) -> np.ndarray:
    """Pack bank rows of ``k``-bit INT weights into wmem rows (the ROM image's lane values).

    ``rows`` is ``(n, cols)`` signed integers in ``-2**(k-1) .. 2**(k-1) - 1``; row ``i`` goes
    to field ``i % p`` of wmem row ``i // p`` (:func:`packed_lane_layout`), a last partial group
    leaves its fields 0. Returns ``(ceil(n / p), cols)`` signed ``w_bits`` lane values, which
    ``pack_rows(wmem_row_layout(cfg), ...)`` writes like any wmem rows. :func:`unpack_weights`
    (the golden model's loader) inverts it; the RTL loader selects the same fields.
    """
    lay = packed_lane_layout(cfg, k)
    v = np.asarray(rows)
    if v.dtype.kind not in "iu" or v.ndim != 2:
        raise PackError(f"weights to pack must be an (n, cols) integer array, not {v.dtype} {v.shape}")
    v = v.astype(np.int64)
    lo, hi = -(1 << (k - 1)), (1 << (k - 1)) - 1
    if v.size and (v.min() < lo or v.max() > hi):
        bad = v[(v < lo) | (v > hi)].flat[0]
        raise PackError(f"weight {int(bad)} does not fit {k} bits ({lo}..{hi})")
    p = lay.length
    n = -(-len(v) // p)
    groups = np.zeros((n * p, v.shape[1]), np.int64)
    groups[:len(v)] = v
    groups = groups.reshape(n, p, v.shape[1])
    out = np.zeros((n, v.shape[1]), np.int64)
    for f, fld in lay:
        out |= (groups[:, f] & ((1 << fld.width) - 1)) << fld.offset
    return np.where(out >> (cfg.w_bits - 1), out - (1 << cfg.w_bits), out)  # lane values are signed


def unpack_weights(cfg: AccelConfig, k: int, lanes) -> np.ndarray:
    """Bank rows of wmem rows packed at ``k`` bits: ``(m, cols)`` lane values (signed or raw
    ``w_bits`` patterns) -> ``(m * p, cols)`` weights, each field sign-extended."""
    lay = packed_lane_layout(cfg, k)
    pat = _lane_patterns(cfg, lanes)
    if pat.ndim != 2:
        raise PackError(f"wmem rows to unpack must be an (m, cols) array, not shape {pat.shape}")
    out = np.zeros((pat.shape[0], lay.length, pat.shape[1]), np.int64)
    for f, fld in lay:
        w = fld.width
        x = (pat >> fld.offset) & ((1 << w) - 1)
        out[:, f] = np.where(x >> (w - 1), x - (1 << w), x)
    return out.reshape(-1, pat.shape[1])


#: Marks an illegal code in the decode table (no weight is this value).
_ILLEGAL = np.iinfo(np.int64).min


def _lane_value(cfg: AccelConfig, pattern: int) -> int:
    """A ``w_bits`` pattern as the signed integer a wmem lane (``wmem_row_layout``) holds."""
    return pattern - (1 << cfg.w_bits) if pattern >> (cfg.w_bits - 1) else pattern


@functools.lru_cache(maxsize=None)
def _pot_tables(cfg: AccelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value of every code pattern 0..2**w_bits-1 (``_ILLEGAL`` where illegal), sorted legal
    values, the lane value of each one's code), built through :func:`pot_code_layout`."""
    lay = pot_code_layout(cfg)
    decode = np.full(1 << cfg.w_bits, _ILLEGAL, np.int64)
    for pattern in range(1 << cfg.w_bits):
        c = lay.from_bits(pattern)
        k, sign = int(c.mag), int(c.sign)
        if k <= cfg.pot_max_exp + 1:
            decode[pattern] = 0 if k == 0 else (-1) ** sign << (k - 1)
    values = np.unique(decode[decode != _ILLEGAL])
    # Zero's code has sign 0; 2**e has k = e + 1 = bit_length.
    codes = np.array([_lane_value(cfg, lay.const({"mag": abs(int(v)).bit_length(), "sign": int(v < 0)}).as_bits())
                      for v in values], np.int64)
    return decode, values, codes


def pot_values(cfg: AccelConfig) -> np.ndarray:
    """Every weight value a PoT code of ``cfg`` can hold, ascending: 0 and ``+-2**e`` for
    ``0 <= e <= cfg.pot_max_exp``."""
    return _pot_tables(cfg)[1].copy()


def pot_encode(value, cfg: AccelConfig):
    """PoT code(s) of weight value(s) (int or integer array; vectorised).

    A code is returned as the signed ``w_bits`` integer with the code's bit pattern, i.e. the
    value a wmem lane holds (:func:`wmem_row_layout` is signed), so PoT weights pack, unpack and
    travel exactly like int weights. Raises :class:`PotError` naming the first value that is not
    0 or ``+-2**e`` with ``0 <= e <= cfg.pot_max_exp``.
    """
    _, values, codes = _pot_tables(cfg)
    v = np.asarray(value)
    if v.dtype.kind not in "iu" and not (v.dtype.kind == "f" and np.array_equal(v, np.round(v))):
        raise PotError(f"PoT weights must be integers, not {v.dtype} values")
    v = v.astype(np.int64)
    i = np.clip(np.searchsorted(values, v), 0, len(values) - 1)
    bad = values[i] != v
    if bad.any():
        raise PotError(f"{int(v[bad].flat[0])} is not a PoT weight of w_bits {cfg.w_bits} "
                       f"(0 or +-2**e, 0 <= e <= {cfg.pot_max_exp})")
    out = codes[i]
    return int(out) if out.ndim == 0 else out


def pot_decode(code, cfg: AccelConfig):
    """Weight value(s) of PoT code(s) (int or integer array; vectorised).

    A code may be given as its unsigned ``w_bits`` pattern or as the signed lane value
    :func:`pot_encode` returns and the golden model's wmem holds. Raises :class:`PotError` for a
    value outside both ranges or a code whose exponent exceeds ``cfg.pot_max_exp``.
    """
    table = _pot_tables(cfg)[0]
    c = np.asarray(code)
    if c.dtype.kind not in "iu":
        raise PotError(f"PoT codes must be integers, not {c.dtype} values")
    c = c.astype(np.int64)
    lo, hi = -(1 << (cfg.w_bits - 1)), (1 << cfg.w_bits) - 1
    out_of_range = (c < lo) | (c > hi)
    if out_of_range.any():
        raise PotError(f"PoT code {int(c[out_of_range].flat[0])} does not fit w_bits {cfg.w_bits} ({lo}..{hi})")
    out = table[c & ((1 << cfg.w_bits) - 1)]
    bad = out == _ILLEGAL
    if bad.any():
        pattern = int(c[bad].flat[0]) & ((1 << cfg.w_bits) - 1)
        raise PotError(f"PoT code {pattern:#x} has exponent {int(pot_code_layout(cfg).from_bits(pattern).mag) - 1} "
                       f"> pot_max_exp {cfg.pot_max_exp} (w_bits {cfg.w_bits})")
    return int(out) if out.ndim == 0 else out


#: MATMUL ``pot`` values each ``pe_kind`` executes.
POT_MODES = {"int": (0,), "pot": (1,), "hybrid": (0, 1)}


def check_pot_mode(cfg: AccelConfig, pot: int) -> None:
    """Raise :class:`IsaError` unless a MATMUL with this ``pot`` field runs on ``cfg``'s PEs."""
    if pot not in POT_MODES[cfg.pe_kind]:
        raise IsaError(f"MATMUL.pot = {pot} is not allowed for pe_kind {cfg.pe_kind} "
                       f"(allowed: {', '.join(map(str, POT_MODES[cfg.pe_kind]))})")


@functools.lru_cache(maxsize=None)
def spad_row_layout(cfg: AccelConfig) -> data.ArrayLayout:
    """Raw activation patterns; signedness is chosen by the instruction that reads them."""
    return data.ArrayLayout(unsigned(cfg.a_bits), cfg.rows)


@functools.lru_cache(maxsize=None)
def spad_exp_row_layout(cfg: AccelConfig) -> data.ArrayLayout:
    """One ``spad_exp`` row: the unsigned ``bfp_exp_bits`` shared exponent of the spad row with the
    same address (one lane; 0 bits on a config without BFP, which has no such memory)."""
    return data.ArrayLayout(unsigned(cfg.bfp_exp_bits), 1)


def check_bfp_post(cfg: AccelConfig, args: Mapping[str, int]) -> None:
    """Raise :class:`IsaError` unless a POST with these arguments may set ``bfp``: a BFP POST
    needs a ``bfp_exp_bits`` config, ``zp = 0``, ``res_en = 0`` and ``hi >= 1``."""
    if not args.get("bfp", 0):
        return
    if not cfg.bfp_exp_bits:
        raise IsaError(f"POST.bfp = 1 needs a bfp_exp_bits config (hw.build --bfp-exp-bits); "
                       f"{cfg.describe()} has none")
    for name, ok, need in (("zp", args["zp"] == 0, "0"), ("res_en", args["res_en"] == 0, "0"),
                           ("hi", args["hi"] >= 1, ">= 1")):
        if not ok:
            raise IsaError(f"POST.{name} = {args[name]} with bfp = 1: a block-floating-point POST needs {name} {need}")


@functools.lru_cache(maxsize=None)
def acc_row_layout(cfg: AccelConfig) -> data.ArrayLayout:
    return data.ArrayLayout(signed(cfg.acc_width), cfg.cols)


@functools.lru_cache(maxsize=None)
def param_lane_layout(cfg: AccelConfig) -> data.StructLayout:
    """One output channel's post-processing parameters.

    ``y = clamp(zp + round_shift((acc + bias) * mult + residual * res_mult, shift), lo, hi)``.
    """
    return data.StructLayout({
        "bias": signed(cfg.bias_bits),
        "mult": unsigned(cfg.mult_bits),
        "res_mult": unsigned(cfg.mult_bits),
        "shift": unsigned(cfg.shift_bits),
    })


@functools.lru_cache(maxsize=None)
def param_row_layout(cfg: AccelConfig) -> data.ArrayLayout:
    return data.ArrayLayout(param_lane_layout(cfg), cfg.cols)


# -- host-side encode / decode -------------------------------------------------------------------

def _range(shape) -> tuple[int, int]:
    if isinstance(shape, type) and issubclass(shape, enum.Enum):
        vals = [m.value for m in shape]
        return min(vals), max(vals)
    s = shape if not hasattr(shape, "signed") else shape
    if s.signed:
        return -(1 << (s.width - 1)), (1 << (s.width - 1)) - 1
    return 0, (1 << s.width) - 1


@dataclass(frozen=True)
class Instr:
    """One decoded instruction: an opcode and its argument values (missing fields are 0)."""

    op: Opcode
    args: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "op", Opcode(self.op))
        names = {f.name for f in FIELDS[self.op]}
        unknown = set(self.args) - names
        if unknown:
            raise IsaError(f"{self.op.name} has no field {sorted(unknown)[0]!r} (fields: {', '.join(sorted(names)) or 'none'})")
        full = {f.name: 0 for f in FIELDS[self.op]}
        for k, v in self.args.items():
            full[k] = int(v.value if isinstance(v, enum.Enum) else v)
        object.__setattr__(self, "args", full)

    def __getattr__(self, name):
        args = object.__getattribute__(self, "args")
        if name in args:
            return args[name]
        raise AttributeError(name)

    def check(self, cfg: AccelConfig) -> None:
        """Raise :class:`IsaError` naming the first field whose value does not fit its width."""
        lay = args_layout(cfg, self.op)
        for name, v in self.args.items():
            lo, hi = _range(lay[name].shape)
            if not lo <= v <= hi:
                why = ("; packed weights need a packed_weights config (hw.build --packed-weights)"
                       if name == "pack_bits" and not cfg.packed_weights else "")
                if name == "bfp" and not cfg.bfp_exp_bits:
                    raise IsaError(f"{self.op.name}.{name} = {v} does not fit ({lo}..{hi}) for {cfg.describe()}; "
                                   "block-floating-point POSTs need a bfp_exp_bits config (hw.build --bfp-exp-bits)")
                raise (PackError if why else IsaError)(
                    f"{self.op.name}.{name} = {v} does not fit ({lo}..{hi}) for {cfg.describe()}{why}")
        if self.op is Opcode.MATMUL:
            check_pot_mode(cfg, self.args["pot"])
        if self.op is Opcode.PRELOAD:
            check_pack_bits(cfg, self.args["pack_bits"])
        if self.op is Opcode.POST:
            check_bfp_post(cfg, self.args)

    def encode(self, cfg: AccelConfig) -> int:
        self.check(cfg)
        lay = instr_layout(cfg)
        init = {"op": self.op}
        if FIELDS[self.op]:
            args = dict(self.args)
            if self.op is Opcode.POOL:
                args["mode"] = PoolMode(args["mode"])
            init["args"] = {self.op.name.lower(): args}
        return lay.const(init).as_bits()

    def __str__(self):
        return self.op.name + "".join(f" {k}={v}" for k, v in self.args.items())


def encode(cfg: AccelConfig, instr: Instr) -> int:
    return instr.encode(cfg)


def decode(cfg: AccelConfig, word: int) -> Instr:
    """Decode an instruction word; raises :class:`IsaError` for an unknown opcode or stray bits."""
    lay = instr_layout(cfg)
    if not 0 <= word < (1 << lay.size):
        raise IsaError(f"instruction word does not fit in {lay.size} bits")
    op_raw = word & ((1 << OPCODE_BITS) - 1)
    try:
        op = Opcode(op_raw)
    except ValueError:
        raise IsaError(f"unknown opcode {op_raw}") from None
    used = OPCODE_BITS + args_layout(cfg, op).size
    if word >> used:
        raise IsaError(f"{op.name} word has non-zero bits above bit {used - 1}")
    view = lay.from_bits(word)
    if not FIELDS[op]:
        return Instr(op)
    args = getattr(view.args, op.name.lower())
    vals = {}
    for f in FIELDS[op]:
        v = getattr(args, f.name)
        vals[f.name] = int(v.value if isinstance(v, enum.Enum) else v)
    return Instr(op, vals)


# -- builders (the assembler) ----------------------------------------------------------------------

def nop() -> Instr:
    return Instr(Opcode.NOP)


def halt() -> Instr:
    return Instr(Opcode.HALT)


def sync() -> Instr:
    return Instr(Opcode.SYNC)


def preload(*, bank: int, w_addr: int, n_rows: int, pack_bits: int = 0) -> Instr:
    return Instr(Opcode.PRELOAD, dict(bank=bank, w_addr=w_addr, n_rows=n_rows, pack_bits=pack_bits))


def matmul(*, bank: int, spad_base: int, acc_base: int, in_h: int = 1, in_w: int, out_h: int = 1,
           out_w: int, stride_h: int = 1, stride_w: int = 1, off_h: int = 0, off_w: int = 0,
           accumulate: bool = False, a_signed: bool = False, pot: bool = False,
           scale_addr: int = 0, overlap: bool = False) -> Instr:
    return Instr(Opcode.MATMUL, dict(
        bank=bank, accumulate=int(accumulate), a_signed=int(a_signed), spad_base=spad_base,
        in_h=in_h, in_w=in_w, out_h=out_h, out_w=out_w, stride_h=stride_h, stride_w=stride_w,
        off_h=off_h, off_w=off_w, acc_base=acc_base, pot=int(pot), scale_addr=scale_addr,
        overlap=int(overlap)))


def post(*, acc_base: int, spad_base: int, n: int, param_addr: int, n_lanes: int, lo: int, hi: int,
         src_lane: int = 0, dst_lane: int = 0, zp: int = 0, res_base: int | None = None,
         res_signed: bool = False, overlap: bool = False, bfp: bool = False) -> Instr:
    return Instr(Opcode.POST, dict(
        acc_base=acc_base, spad_base=spad_base, n=n, param_addr=param_addr, src_lane=src_lane,
        dst_lane=dst_lane, n_lanes=n_lanes, zp=zp, lo=lo, hi=hi, res_en=int(res_base is not None),
        res_signed=int(res_signed), res_base=res_base or 0, bfp=int(bfp), overlap=int(overlap)))


def pool(*, mode: PoolMode, src_base: int, dst_base: int, in_h: int, in_w: int, out_h: int,
         out_w: int, k_h: int, k_w: int, stride_h: int = 1, stride_w: int = 1, off_h: int = 0,
         off_w: int = 0, a_signed: bool = False, mult: int = 0, shift: int = 0) -> Instr:
    return Instr(Opcode.POOL, dict(
        mode=PoolMode(mode).value, a_signed=int(a_signed), src_base=src_base, in_h=in_h, in_w=in_w,
        out_h=out_h, out_w=out_w, k_h=k_h, k_w=k_w, stride_h=stride_h, stride_w=stride_w,
        off_h=off_h, off_w=off_w, dst_base=dst_base, mult=mult, shift=shift))


# -- host port ---------------------------------------------------------------------------------------

class HostMem(enum.Enum, shape=3):
    """Memory selected on the accelerator's host port (``host_mem``)."""

    IMEM = 0
    WMEM = 1
    SPAD = 2
    ACC = 3
    PARAM = 4
    #: ``bfp_exp_bits`` configs only: the spad row exponents (``spad_exp_row_layout``).
    SPAD_EXP = 5


def host_mems(cfg: AccelConfig) -> tuple[HostMem, ...]:
    """The host-visible memories ``cfg`` has (``SPAD_EXP`` only with ``bfp_exp_bits``)."""
    return tuple(m for m in HostMem if m is not HostMem.SPAD_EXP or cfg.bfp_exp_bits)


def host_row_bits(cfg: AccelConfig) -> dict[HostMem, int]:
    """Row width of each host-visible memory of ``cfg`` (:func:`host_mems`)."""
    out = {
        HostMem.IMEM: instr_bits(cfg),
        HostMem.WMEM: cfg.wmem_row_bits,
        HostMem.SPAD: cfg.spad_row_bits,
        HostMem.ACC: cfg.acc_row_bits,
        HostMem.PARAM: cfg.param_row_bits,
    }
    if cfg.bfp_exp_bits:
        out[HostMem.SPAD_EXP] = cfg.bfp_exp_bits
    return out


def host_depths(cfg: AccelConfig) -> dict[HostMem, int]:
    """Depth of each host-visible memory of ``cfg`` (:func:`host_mems`)."""
    out = {
        HostMem.IMEM: cfg.imem_depth,
        HostMem.WMEM: cfg.wmem_depth,
        HostMem.SPAD: cfg.spad_depth,
        HostMem.ACC: cfg.acc_depth,
        HostMem.PARAM: cfg.param_depth,
    }
    if cfg.bfp_exp_bits:
        out[HostMem.SPAD_EXP] = cfg.spad_depth
    return out


def host_data_bits(cfg: AccelConfig) -> int:
    """Width of ``host_wdata``/``host_rdata``: the widest memory row."""
    return max(host_row_bits(cfg).values())


def host_addr_bits(cfg: AccelConfig) -> int:
    return max(max(d - 1, 1).bit_length() for d in host_depths(cfg).values())
