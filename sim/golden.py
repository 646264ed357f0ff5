"""Bit-exact NumPy model of the Quarry accelerator, and its cycle model.

This executes the same program containers the RTL executes, instruction by instruction, with
integer semantics that the RTL must match bit for bit.

Rounding (the one place it is defined)
---------------------------------------
Quarry uses **single rounding, ties away from zero** for every right shift with rounding::

    round_shift(x, s) = x                                          if s == 0
                      = floor((x + 2**(s-1) - (x < 0)) / 2**s)     otherwise

i.e. ``x / 2**s`` rounded to nearest, halves away from zero (gemmlowp's ``RoundingDivideByPOT``
tie rule, applied once to the full product instead of after a high-multiply). It costs one adder
with a sign-dependent constant in hardware and is more accurate than gemmlowp's double rounding.

Packed weights (PRELOAD with ``pack_bits = k`` on a ``packed_weights`` config): bank row ``i``
is field ``i % p`` (``p = w_bits // k``) of wmem row ``w_addr + i // p``, sign-extended from
``k`` bits (:func:`hw.isa.unpack_weights`, the helper that also packs the ROM).

Block rescaling (MATMUL on a ``block_scale`` config, DSConv), per lane, before the sums are
accumulated (wrapping at ``acc_width`` like every accumulation)::

    sum' = round_shift(sum * mult, shift)        # mult, shift: param row scale_addr

Block floating point (``bfp_exp_bits > 0`` configs, DSConv's BFP activations; they have
``block_scale``). Every spad row ``r`` has an unsigned exponent ``spad_exp[r]`` (0..``bfp_emax``,
memory ``spad_exp`` beside spad, program image ``spad_exp``); MATMUL sees lane ``l`` of row ``r``
as ``raw(l) * 2**spad_exp[r]``. A block is one spad row (one pixel, ``rows`` channels).

* MATMUL: vector ``j`` comes from spad row ``a_j`` with exponent ``e_j = spad_exp[a_j]`` (0 for
  a padding position). ``S_j`` are the array's column sums wrapped at ``acc_width`` as above;
  per lane::

      sum'_j = round_shift(S_j * mult, shift - e_j)      if e_j <= shift
             = (S_j * mult) << (e_j - shift)              otherwise
      acc    = wrap(old + wrap(sum'_j, acc_width), acc_width)

* POST with ``bfp = 1`` (needs ``zp == 0``, ``res_en == 0``, ``hi >= 1``: ``hw.isa.check_bfp_post``
  raises :class:`hw.isa.IsaError` naming the field), for each output row, over the POST's lanes
  ``l`` (``src_lane .. src_lane + n_lanes - 1``)::

      y_l    = round_shift((acc_l + bias_l) * mult_l, shift_l)      # no zero point, no clamp
      t_l    = y_l if y_l >= 0 else ((-y_l - 1) if lo < 0 else 0)   # one's-complement magnitude
      e      = min(emax, max(0, bitlen(max_l t_l) - bitlen(hi)))    # bitlen(0) = 0
      mant_l = clamp(round_shift(y_l, e), lo, hi)                   # -> spad lanes dst_lane..
      spad_exp[row] = e

  (hardware: ``bitlen`` of the OR of the ``t_l``, a priority encoder; same value as the max.)
  Lanes of the row outside the POST keep their raw value; the row's exponent is overwritten.
* POST with ``bfp = 0``: requantization as below, and ``spad_exp[row] = 0``.
* A residual POST reads its residual rows' raw lanes and ignores their exponents; POOL compares
  and averages raw lanes ignoring exponents and writes exponent 0 on its output rows. (The
  compiler only uses BFP tensors as MATMUL inputs.)
* A host write to spad (``HostMem.SPAD``, and the ``spad`` image) sets the rows' exponents to 0,
  so no exponent an earlier program left survives a new input; a host write to ``HostMem.SPAD_EXP``
  (and the ``spad_exp`` image, loaded after ``spad``) sets them. :meth:`Machine.write_spad` sets
  both (``exp`` defaults to 0).
* Timing: on a BFP config every POST (``bfp`` or not) takes :func:`hw.timing.post_bfp_stages`
  more cycles (magnitude/saturate, OR + priority encode, then the shift and clamp); the RTL
  saturates ``y_l`` to ``a_bits + 2 + emax`` bits first, which changes neither ``e`` nor a
  mantissa (a saturated lane takes ``e = emax`` and clamps either way).

Overlap (MATMUL ``overlap = 1`` on a ``post_overlap`` config): the MATMUL may run while the
POST before it is still running. Execution here stays sequential; the cycle model
(:class:`hw.timing.CycleModel`) raises :class:`hw.timing.HazardError` if the two would exchange
data through memory (:func:`hw.timing.overlap_hazard`), so an accepted program means the same on
the RTL.

Requantization of one output channel (POST)::

    y = clamp(zp + round_shift((acc + bias) * mult + residual * res_mult, shift), lo, hi)

with ``mult``/``res_mult`` unsigned ``mult_bits`` fixed-point multipliers (the compiler chooses
``mult = round(M * 2**shift)`` for the real multiplier ``M = s_x*s_w/s_y``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hw import isa, timing
from hw.config import AccelConfig
from hw.isa import Opcode, PoolMode
from hw.program import Program, ProgramError, unpack_rows

__all__ = ["round_shift", "requantize", "Machine", "GoldenError", "RunResult", "wrap"]


class GoldenError(RuntimeError):
    """The program asked for something the machine cannot do (address out of range, ...)."""


def wrap(x, bits: int):
    """Two's-complement wrap of int64 values to ``bits`` bits."""
    x = np.asarray(x, dtype=np.int64)
    half = np.int64(1) << np.int64(bits - 1)
    return ((x + half) & ((half << 1) - 1)) - half


def round_shift(x, s):
    """``x / 2**s`` rounded to nearest, ties away from zero (see module docstring). int64 arrays."""
    x = np.asarray(x, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64)
    half = np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 0)
    return np.right_shift(x + half - ((x < 0) & (s > 0)), s)


def requantize(acc, bias, mult, shift, zp, lo, hi, residual=None, res_mult=None):
    """Integer requantization exactly as POST does it (arrays broadcast per lane)."""
    t = (np.asarray(acc, np.int64) + np.asarray(bias, np.int64)) * np.asarray(mult, np.int64)
    if residual is not None:
        t = t + np.asarray(residual, np.int64) * np.asarray(res_mult, np.int64)
    y = round_shift(t, shift) + np.int64(zp)
    return clamp(y, lo, hi)


def clamp(y, lo, hi):
    """POST's clamp as the hardware does it: ``lo`` if ``y < lo``, else ``hi`` if ``y > hi``, else
    ``y``. It equals ``np.clip`` when ``lo <= hi`` (every program the compiler emits); with
    ``lo > hi`` values below ``lo`` give ``lo`` and all others ``hi`` (``np.clip`` gives ``hi``)."""
    y = np.asarray(y, np.int64)
    return np.where(y < lo, lo, np.where(y > hi, hi, y)).astype(np.int64)


def _bitlen(x):
    """Bit length of non-negative int64 values (``bitlen(0) = 0``), vectorised."""
    x = np.asarray(x, np.int64)
    return sum(((x >> np.int64(k)) != 0).astype(np.int64) for k in range(63))


def _as_signed(raw, bits, is_signed):
    raw = np.asarray(raw, dtype=np.int64)
    if is_signed:
        return np.where(raw >= (1 << (bits - 1)), raw - (1 << bits), raw)
    return raw


@dataclass
class RunResult:
    """What a run did: total cycles (HALT issue + 1), per-instruction (issue, done) cycles, MACs."""

    cycles: int
    issue: list[int] = field(default_factory=list)
    done: list[int] = field(default_factory=list)
    macs: int = 0
    executed: int = 0


class Machine:
    """Architectural state of one accelerator and an interpreter for its programs."""

    def __init__(self, cfg: AccelConfig):
        self.cfg = cfg
        R, C = cfg.rows, cfg.cols
        self.spad = np.zeros((cfg.spad_depth, R), np.int64)  # raw a_bits patterns
        self.acc = np.zeros((cfg.acc_depth, C), np.int64)
        self.wmem = np.zeros((cfg.wmem_depth, C), np.int64)
        self.param = {k: np.zeros((cfg.param_depth, C), np.int64) for k in ("bias", "mult", "res_mult", "shift")}
        self.spad_exp = np.zeros(cfg.spad_depth, np.int64)  # BFP exponents (all 0 without BFP)
        self.banks = np.zeros((2, R, C), np.int64)

    # -- memory access ---------------------------------------------------------------------------

    def load_images(self, program: Program) -> None:
        if program.config.hash != self.cfg.hash:
            raise ProgramError(f"program was built for config {program.config.hash} "
                               f"({program.config.describe()}), not {self.cfg.hash} ({self.cfg.describe()})")
        for name, rows in sorted(program.images.items()):  # the RTL runners' order: spad, then spad_exp
            vals = unpack_rows(isa.__dict__[f"{name}_row_layout"](self.cfg), rows)
            if name == "param":
                for k in self.param:
                    self.param[k][:len(rows)] = vals[k]
            elif name == "spad_exp":
                self.spad_exp[:len(rows)] = vals[:, 0]
            else:
                getattr(self, name)[:len(rows)] = vals
                if name == "spad":  # a host SPAD write sets the row's exponent to 0
                    self.spad_exp[:len(rows)] = 0

    def write_spad(self, addr: int, values, signed: bool = False, exp=None) -> None:
        """Write activation rows (lanes beyond the given width keep 0) starting at ``addr``, and
        their BFP exponents ``exp`` (scalar or one per row, 0..``bfp_emax``; default 0)."""
        v = np.asarray(values, np.int64)
        if v.ndim == 1:
            v = v[:, None]
        lo = -(1 << (self.cfg.a_bits - 1)) if signed else 0
        hi = lo + (1 << self.cfg.a_bits) - 1
        if v.size and (v.min() < lo or v.max() > hi):
            raise GoldenError(f"activation values outside {lo}..{hi}")
        if addr < 0 or addr + len(v) > self.cfg.spad_depth or v.shape[1] > self.cfg.rows:
            raise GoldenError(f"spad write of {v.shape} at {addr} does not fit")
        e = np.broadcast_to(np.asarray(0 if exp is None else exp), (len(v),))
        if e.dtype.kind not in "iu":
            raise GoldenError(f"spad exponents must be integers, not {e.dtype} values")
        if e.size and (e.min() < 0 or e.max() > self.cfg.bfp_emax):
            raise GoldenError(f"spad exponents outside 0..{self.cfg.bfp_emax} (bfp_exp_bits {self.cfg.bfp_exp_bits})")
        self.spad_exp[addr:addr + len(v)] = e
        self.spad[addr:addr + len(v)] = 0
        self.spad[addr:addr + len(v), :v.shape[1]] = v & ((1 << self.cfg.a_bits) - 1)

    def read_spad(self, addr: int, n: int, signed: bool = False) -> np.ndarray:
        return _as_signed(self.spad[addr:addr + n], self.cfg.a_bits, signed)

    def read_spad_exp(self, addr: int, n: int) -> np.ndarray:
        """BFP exponents of spad rows ``addr .. addr + n - 1``."""
        return self.spad_exp[addr:addr + n].copy()

    # -- execution -------------------------------------------------------------------------------

    def run(self, program: Program, max_instrs: int = 10_000_000) -> RunResult:
        """Execute from instruction 0 until HALT (or the end of the program)."""
        self.load_images(program)
        model = timing.CycleModel(self.cfg)
        res = RunResult(cycles=0)
        for pc, ins in enumerate(program.instrs):
            if pc >= max_instrs:
                raise GoldenError(f"no HALT within {max_instrs} instructions")
            try:
                res.macs += self.execute(ins)
                issue, done = model.step(ins)  # HazardError: an overlap the RTL would not honour
            except (GoldenError, isa.IsaError) as e:
                raise type(e)(f"instruction {pc} ({ins.op.name}): {e}") from None
            res.issue.append(issue)
            res.done.append(done)
            res.executed += 1
            if ins.op is Opcode.HALT:
                res.cycles = issue + 1
                return res
        raise GoldenError("program ended without HALT")

    def execute(self, ins: isa.Instr) -> int:
        """Apply one instruction to the state; returns the useful MACs it performed."""
        op = ins.op
        if op in (Opcode.NOP, Opcode.SYNC, Opcode.HALT):
            return 0
        return getattr(self, f"_{op.name.lower()}")(ins.args)

    def _check(self, what, lo, hi, depth):
        if lo < 0 or hi > depth:
            raise GoldenError(f"{what} rows {lo}..{hi - 1} outside 0..{depth - 1}")

    def _preload(self, a) -> int:
        cfg = self.cfg
        R = cfg.rows
        n, k = a["n_rows"], a["pack_bits"]
        if n > R:
            raise GoldenError(f"n_rows {n} > rows {R}")
        isa.check_pack_bits(cfg, k)
        p = isa.pack_factor(cfg, k)  # bank rows per wmem row
        words = -(-n // p)
        self._check("wmem", a["w_addr"], a["w_addr"] + words, cfg.wmem_depth)
        rows = self.wmem[a["w_addr"]:a["w_addr"] + words]
        bank = np.zeros((R, cfg.cols), np.int64)
        bank[:n] = (isa.unpack_weights(cfg, k, rows) if k else rows)[:n]
        self.banks[a["bank"]] = bank
        return 0

    def _window(self, base, in_h, in_w, out_h, out_w, sh, sw, oh0, ow0):
        """Spad row per output pixel of a strided window, and whether it is inside the input."""
        oh = np.arange(out_h)[:, None]
        ow = np.arange(out_w)[None, :]
        ih = oh * sh + oh0
        iw = ow * sw + ow0
        inside = (ih >= 0) & (ih < in_h) & (iw >= 0) & (iw < in_w)
        addr = base + ih * in_w + iw
        if inside.any():
            used = addr[inside]
            self._check("spad", int(used.min()), int(used.max()) + 1, self.cfg.spad_depth)
        return np.where(inside, addr, 0).reshape(-1), inside.reshape(-1)

    def _matmul(self, a) -> int:
        cfg = self.cfg
        isa.check_pot_mode(cfg, a["pot"])
        m = a["out_h"] * a["out_w"]
        if m == 0 or a["in_w"] == 0:
            raise GoldenError("out_h, out_w and in_w must be > 0")
        self._check("acc", a["acc_base"], a["acc_base"] + m, cfg.acc_depth)
        addr, inside = self._window(a["spad_base"], a["in_h"], a["in_w"], a["out_h"], a["out_w"],
                                    a["stride_h"], a["stride_w"], a["off_h"], a["off_w"])
        x = _as_signed(self.spad[addr], cfg.a_bits, a["a_signed"]) * inside[:, None]
        w = self.banks[a["bank"]]
        if a["pot"]:
            try:
                w = isa.pot_decode(w, cfg)
            except isa.PotError as e:
                raise isa.PotError(f"bank {a['bank']}: {e}") from None
        psum = x @ w
        if cfg.block_scale:  # DSConv block rescale, per lane, before accumulating
            self._check("param", a["scale_addr"], a["scale_addr"] + 1, cfg.param_depth)
            psum = wrap(psum, cfg.acc_width)  # the array's column sums are acc_width wide
            prod = psum * self.param["mult"][a["scale_addr"]]
            d = self.param["shift"][a["scale_addr"]][None, :] - (self.spad_exp[addr] * inside)[:, None]
            # BFP exponent above the shift: an exact left shift (int64 wraps mod 2**64, and the
            # result is wrapped to acc_width < 64 bits anyway).
            psum = np.where(d >= 0, round_shift(prod, np.maximum(d, 0)),
                            np.left_shift(prod, np.maximum(-d, 0)))
            psum = wrap(psum, cfg.acc_width)
        rows = slice(a["acc_base"], a["acc_base"] + m)
        old = self.acc[rows] if a["accumulate"] else 0
        self.acc[rows] = wrap(old + psum, cfg.acc_width)
        return m * cfg.rows * cfg.cols

    def _post(self, a) -> int:
        cfg = self.cfg
        n, sl, dl, nl = a["n"], a["src_lane"], a["dst_lane"], a["n_lanes"]
        if n == 0 or nl == 0:
            raise GoldenError("n and n_lanes must be > 0")
        if sl + nl > cfg.cols or dl + nl > cfg.rows:
            raise GoldenError(f"lanes src {sl}+{nl} / dst {dl}+{nl} exceed cols {cfg.cols} / rows {cfg.rows}")
        self._check("acc", a["acc_base"], a["acc_base"] + n, cfg.acc_depth)
        self._check("spad", a["spad_base"], a["spad_base"] + n, cfg.spad_depth)
        self._check("param", a["param_addr"], a["param_addr"] + 1, cfg.param_depth)
        p = {k: v[a["param_addr"], sl:sl + nl] for k, v in self.param.items()}
        acc = self.acc[a["acc_base"]:a["acc_base"] + n, sl:sl + nl]
        residual = None
        if a["res_en"]:
            self._check("spad", a["res_base"], a["res_base"] + n, cfg.spad_depth)
            residual = _as_signed(self.spad[a["res_base"]:a["res_base"] + n, dl:dl + nl],
                                  cfg.a_bits, a["res_signed"])
        rows = slice(a["spad_base"], a["spad_base"] + n)
        if a.get("bfp", 0):
            isa.check_bfp_post(cfg, a)
            y = round_shift((acc + p["bias"]) * p["mult"], p["shift"])
            t = np.where(y >= 0, y, (-y - 1) if a["lo"] < 0 else 0)
            e = np.clip(_bitlen(t.max(axis=1)) - int(a["hi"]).bit_length(), 0, cfg.bfp_emax)
            y = clamp(round_shift(y, e[:, None]), a["lo"], a["hi"])
            self.spad_exp[rows] = e
        else:
            y = requantize(acc, p["bias"], p["mult"], p["shift"], a["zp"], a["lo"], a["hi"],
                           residual, p["res_mult"])
            self.spad_exp[rows] = 0
        self.spad[rows, dl:dl + nl] = y & ((1 << cfg.a_bits) - 1)
        return 0

    def _pool(self, a) -> int:
        cfg = self.cfg
        oh, ow, kh, kw = a["out_h"], a["out_w"], a["k_h"], a["k_w"]
        if 0 in (oh, ow, kh, kw, a["in_w"]):
            raise GoldenError("out_h, out_w, k_h, k_w and in_w must be > 0")
        self._check("spad", a["dst_base"], a["dst_base"] + oh * ow, cfg.spad_depth)
        best = None
        total = np.zeros((oh * ow, cfg.rows), np.int64)
        for dy in range(kh):
            for dx in range(kw):
                addr, inside = self._window(a["src_base"], a["in_h"], a["in_w"], oh, ow,
                                            a["stride_h"], a["stride_w"], a["off_h"] + dy, a["off_w"] + dx)
                x = _as_signed(self.spad[addr], cfg.a_bits, a["a_signed"])
                total += x * inside[:, None]
                cand = np.where(inside[:, None], x, np.iinfo(np.int64).min)
                best = cand if best is None else np.maximum(best, cand)
        if a["mode"] == PoolMode.MAX.value:
            y = np.zeros_like(total) if best is None else np.where(best == np.iinfo(np.int64).min, 0, best)
        else:
            y = round_shift(total * a["mult"], a["shift"])
            lo = -(1 << (cfg.a_bits - 1)) if a["a_signed"] else 0
            y = np.clip(y, lo, lo + (1 << cfg.a_bits) - 1)
        self.spad[a["dst_base"]:a["dst_base"] + oh * ow] = y & ((1 << cfg.a_bits) - 1)
        self.spad_exp[a["dst_base"]:a["dst_base"] + oh * ow] = 0
        return 0
