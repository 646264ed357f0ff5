"""Shared test helpers: tensors in spad, program assembly, and self-contained random cases.

The golden-model tests use these, and the RTL tests reuse them to run the very same programs on
the RTL. A *case* is everything a fresh or stale machine needs to produce a defined result:

* ``program`` — a :class:`~hw.program.Program` whose ``wmem``/``param`` images hold every weight
  and parameter row it reads (images load at row 0);
* ``spad_writes`` — ``[(addr, rows)]``, raw ``a_bits`` patterns of shape ``(n, cfg.rows)``, covering
  every spad row the program reads, including zero-filled output rows (``POST`` leaves the lanes
  it does not write unchanged);
* ``outputs`` — ``[(addr, n_rows)]`` spad ranges holding the results.

Writing ``spad_writes`` then running ``program`` gives the same ``outputs`` on any initial memory
contents. Every random generator takes a seeded :class:`numpy.random.Generator` and a config and
respects all of the config's depths and field widths (shrinking the case until it fits).

Import with ``from tests import helpers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from compiler import kernels
from compiler.kernels import Kernel, KernelError, Requant, SpadTensor
from hw import isa, timing
from hw.config import PE_KINDS, AccelConfig
from hw.isa import Opcode, PoolMode
from hw.program import Program, ProgramError, pack_rows

__all__ = [
    "Case", "CaseError", "ConvSpec", "PoolSpec", "Builder", "MAX_INSTRS",
    "act_range", "w_range", "WEIGHT_MODES", "weight_values", "pick_weight_mode", "use_pot",
    "rand_acts", "rand_weights", "random_requant", "random_block_scale", "random_pack_bits",
    "tensor_rows", "zero_rows", "place", "read", "apply_writes", "read_outputs", "assemble",
    "random_conv_spec", "random_gemm_spec", "random_pool_spec",
    "random_conv_case", "random_gemm_case", "random_pool_case", "random_residual_case",
    "random_config", "scramble", "run_case", "with_bfp",
]

#: Upper bound on instructions per random case (keeps RTL simulations short).
MAX_INSTRS = 300


class CaseError(ValueError):
    """The config is too small for any case of the requested kind."""


class _NoFit(Exception):
    """A sampled case does not fit the config; sample a smaller one."""


class Case(NamedTuple):
    program: Program
    spad_writes: list[tuple[int, np.ndarray]]
    outputs: list[tuple[int, int]]


# -- value ranges and random data -------------------------------------------------------------------

def act_range(cfg: AccelConfig, signed: bool) -> tuple[int, int]:
    b = cfg.a_bits
    return (-(1 << (b - 1)), (1 << (b - 1)) - 1) if signed else (0, (1 << b) - 1)


def w_range(cfg: AccelConfig) -> tuple[int, int]:
    return -(1 << (cfg.w_bits - 1)), (1 << (cfg.w_bits - 1)) - 1


#: How a random case's weights are stored and multiplied. ``int``: int weights, MATMUL pot=0;
#: ``pot``: PoT weights (the full exponent range), every MATMUL pot=1; ``mixed``: weights that
#: are both int and PoT values, each weight tile in a random mode (hybrid: consecutive MATMULs
#: in different modes share the array).
WEIGHT_MODES = {"int": ("int",), "pot": ("pot",), "hybrid": ("int", "pot", "mixed")}
assert set(WEIGHT_MODES) == set(PE_KINDS)


def weight_values(cfg: AccelConfig, mode: str, bits: int | None = None) -> np.ndarray:
    """Every weight value a case in ``mode`` may use, ascending (INT values within ``bits``
    when given: weights stored packed at that width)."""
    lo, hi = w_range(cfg) if bits is None else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    ints = np.arange(lo, hi + 1, dtype=np.int64)
    if mode == "int":
        return ints
    pots = isa.pot_values(cfg)
    return pots if mode == "pot" else np.intersect1d(ints, pots)


def pick_weight_mode(rng: np.random.Generator, cfg: AccelConfig) -> str:
    modes = WEIGHT_MODES[cfg.pe_kind]
    return modes[0] if len(modes) == 1 else str(rng.choice(modes))


def rand_acts(rng: np.random.Generator, cfg: AccelConfig, shape, signed: bool) -> np.ndarray:
    lo, hi = act_range(cfg, signed)
    return rng.integers(lo, hi + 1, shape, dtype=np.int64)


def rand_weights(rng: np.random.Generator, cfg: AccelConfig, shape, p_zero: float = 0.1,
                 mode: str = "int", bits: int | None = None) -> np.ndarray:
    if mode == "int":
        lo, hi = w_range(cfg) if bits is None else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        w = rng.integers(lo, hi + 1, shape, dtype=np.int64)
    else:
        w = rng.choice(weight_values(cfg, mode, bits), shape)
    return np.where(rng.random(shape) < p_zero, 0, w)


def use_pot(cfg: AccelConfig, kernel: Kernel, w_base: int, choose) -> None:
    """Run the weight tiles ``choose(w_addr)`` picks in PoT mode: encode their wmem rows with
    ``pot_encode`` and set ``pot`` in the MATMULs that use them (in place).

    A tile is the wmem rows one PRELOAD loads; a MATMUL uses the last PRELOAD of its bank. A
    tile preloaded several times (one per output-row chunk) keeps the mode chosen first.
    """
    modes: dict[tuple[int, int], bool] = {}
    bank_tile = {}
    for i, ins in enumerate(kernel.instrs):
        if ins.op is Opcode.PRELOAD:
            # An empty tile (n_rows 0) shares its address with the next real one: key by both.
            tile = (ins.w_addr, ins.n_rows)
            if tile not in modes:
                # Packed tiles stay INT (packing is for INT weights only, see hw.isa.pack_weights).
                modes[tile] = bool(choose(ins.w_addr)) and ins.pack_bits == 0
                if modes[tile]:
                    rows = slice(ins.w_addr - w_base, ins.w_addr - w_base + ins.n_rows)
                    kernel.wmem[rows] = isa.pot_encode(kernel.wmem[rows], cfg)
            bank_tile[ins.bank] = tile
        elif ins.op is Opcode.MATMUL and modes[bank_tile[ins.bank]]:
            kernel.instrs[i] = isa.Instr(Opcode.MATMUL, dict(ins.args, pot=1))


def random_pack_bits(rng: np.random.Generator, cfg: AccelConfig, mode: str) -> int:
    """PRELOAD ``pack_bits`` for a random case's weights: on a ``packed_weights`` config, INT and
    (half the time) mixed cases get a random width ``k`` in 1..w_bits (``w_bits``: unpacked, 0);
    PoT cases and other configs are unpacked."""
    if not cfg.packed_weights or mode == "pot" or (mode == "mixed" and rng.random() < 0.5):
        return 0
    k = int(rng.integers(1, cfg.w_bits + 1))
    return 0 if k == cfg.w_bits else k


def random_block_scale(rng: np.random.Generator, cfg: AccelConfig, shape) -> tuple[np.ndarray, np.ndarray]:
    """Random DSConv block scales ``(mult, shift)`` of ``shape``: mostly gains up to 2 (as the
    compiler emits, where mult <= 2**shift), sometimes any mult and shift (wrapping sums)."""
    max_shift = (1 << cfg.shift_bits) - 1
    shift = rng.integers(0, min(cfg.mult_bits, max_shift) + 1, shape)
    mult = rng.integers(0, 1 << np.minimum(shift + 1, cfg.mult_bits))
    wild = rng.random(shape) < 0.05
    mult = np.where(wild, rng.integers(0, 1 << cfg.mult_bits, shape), mult)
    shift = np.where(wild, rng.integers(0, max_shift + 1, shape), shift)
    return mult.astype(np.int64), shift.astype(np.int64)


def random_requant(rng: np.random.Generator, cfg: AccelConfig, cout: int, terms: int, *,
                   out_signed: bool, residual: bool = False, w_mag_bits: int | None = None) -> Requant:
    """Per-channel requantization whose outputs mostly land inside the output range.

    ``terms`` is the reduction length; typical |acc| is about sqrt(terms) full-scale products.
    ``w_mag_bits`` is log2 of the largest weight magnitude (default: int weights, ``w_bits - 1``).
    """
    lo_a, hi_a = act_range(cfg, out_signed)
    w_mag_bits = cfg.w_bits - 1 if w_mag_bits is None else w_mag_bits
    acc_mag = w_mag_bits + cfg.a_bits - 1 + max(0, math.ceil(math.log2(max(terms, 1)) / 2))
    if rng.random() < 0.1:  # edge: tiny multipliers and shifts, mostly clamped outputs
        mult = rng.integers(0, 4, cout)
        shift = rng.integers(0, 3, cout)
    else:
        mult = rng.integers(1 << (cfg.mult_bits - 2), 1 << cfg.mult_bits, cout)
        shift = acc_mag + cfg.mult_bits - cfg.a_bits + rng.integers(-2, 3, cout)
    shift = np.clip(shift, 0, (1 << cfg.shift_bits) - 1)
    bmax = min(1 << acc_mag, (1 << (cfg.bias_bits - 1)) - 1)
    bias = rng.integers(-bmax, bmax + 1, cout)
    if out_signed:
        zp = int(rng.integers(-2, 3))
    else:
        zp = int(rng.integers(0, (hi_a + 1) // 2 + 1))
    lo, hi = lo_a, hi_a
    if rng.random() < 0.3:  # a narrower clamp (fused ReLU6-like bounds)
        lo = int(rng.integers(lo_a, (lo_a + hi_a) // 2 + 1))
        hi = int(rng.integers(max(lo, (lo_a + hi_a) // 2), hi_a + 1))
    res_mult = None
    if residual:
        # Residual weight of 0..2 output LSBs per residual LSB, within mult_bits.
        cap = np.minimum((np.int64(1) << np.minimum(shift + 1, cfg.mult_bits)) + 1, 1 << cfg.mult_bits)
        res_mult = np.array([rng.integers(0, c) for c in cap], np.int64)
    return Requant(bias=bias, mult=mult, shift=shift, zp=zp, lo=lo, hi=hi, res_mult=res_mult)


# -- tensors <-> spad rows ---------------------------------------------------------------------------

def tensor_rows(cfg: AccelConfig, t: SpadTensor, values) -> list[tuple[int, np.ndarray]]:
    """Raw spad rows holding ``values`` (C, H, W) in ``t``'s channel-block layout, one entry per
    block; lanes beyond the tensor's channels are 0."""
    v = np.asarray(values, np.int64)
    if v.shape != (t.c, t.h, t.w):
        raise ValueError(f"values have shape {v.shape}, tensor is {(t.c, t.h, t.w)}")
    lo, hi = act_range(cfg, t.signed)
    if v.size and (v.min() < lo or v.max() > hi):
        raise ValueError(f"values outside {lo}..{hi}")
    raw = v & ((1 << cfg.a_bits) - 1)
    R = cfg.rows
    out = []
    for b in range(t.blocks(cfg)):
        rows = np.zeros((t.h * t.w, R), np.int64)
        blk = raw[b * R:(b + 1) * R].reshape(-1, t.h * t.w).T
        rows[:, :blk.shape[1]] = blk
        out.append((t.block_base(cfg, b), rows))
    return out


def zero_rows(cfg: AccelConfig, t: SpadTensor) -> list[tuple[int, np.ndarray]]:
    return [(t.base, np.zeros((t.rows(cfg), cfg.rows), np.int64))]


def apply_writes(machine, writes) -> None:
    """Write raw spad rows into a golden :class:`~sim.golden.Machine`."""
    for addr, rows in writes:
        machine.write_spad(addr, rows, signed=False)


def place(machine, t: SpadTensor, values) -> None:
    apply_writes(machine, tensor_rows(machine.cfg, t, values))


def read(machine, t: SpadTensor) -> np.ndarray:
    """The (C, H, W) tensor ``t`` as stored in a golden machine's spad (signed per ``t.signed``)."""
    cfg = machine.cfg
    blocks = [machine.read_spad(t.block_base(cfg, b), t.h * t.w, t.signed)[:, :min(cfg.rows, t.c - b * cfg.rows)]
              for b in range(t.blocks(cfg))]
    return np.concatenate(blocks, axis=1).T.reshape(t.c, t.h, t.w)


def read_outputs(machine, outputs) -> list[np.ndarray]:
    return [machine.spad[addr:addr + n].copy() for addr, n in outputs]


# -- assembling ----------------------------------------------------------------------------------------

def assemble(cfg: AccelConfig, placed: Sequence[tuple[Kernel, int, int]], *, halt: bool = True,
             manifest: dict | None = None) -> Program:
    """One program from kernels emitted at ``(kernel, w_base, param_base)``.

    The kernels' instructions run in order (then HALT); their weight and param rows are put at the
    bases they were emitted for, in ``wmem``/``param`` images that start at row 0 (unused rows 0).
    """
    C = cfg.cols
    w_end = max([wb + len(k.wmem) for k, wb, _ in placed if k.wmem is not None and len(k.wmem)], default=0)
    p_end = max([pb + len(k.params["bias"]) for k, _, pb in placed if k.params is not None], default=0)
    wmem = np.zeros((w_end, C), np.int64)
    wused = np.zeros(w_end, bool)
    params = {f: np.zeros((p_end, C), np.int64) for f in ("bias", "mult", "res_mult", "shift")}
    pused = np.zeros(p_end, bool)
    instrs = []
    for k, wb, pb in placed:
        if k.wmem is not None and len(k.wmem):
            if wused[wb:wb + len(k.wmem)].any():
                raise ValueError(f"weight rows at {wb} overlap another kernel's")
            wmem[wb:wb + len(k.wmem)] = k.wmem
            wused[wb:wb + len(k.wmem)] = True
        if k.params is not None:
            n = len(k.params["bias"])
            if pused[pb:pb + n].any():
                raise ValueError(f"param rows at {pb} overlap another kernel's")
            for f in params:
                params[f][pb:pb + n] = k.params[f]
            pused[pb:pb + n] = True
        instrs += k.instrs
    if halt:
        instrs.append(isa.halt())
    instrs = timing.mark_overlaps(cfg, instrs)  # as ProgramBuilder.schedule does
    images = {}
    if w_end:
        images["wmem"] = pack_rows(isa.wmem_row_layout(cfg), wmem)
    if p_end:
        images["param"] = pack_rows(isa.param_row_layout(cfg), params)
    return Program(cfg, instrs, images, manifest or {})


@dataclass
class Builder:
    """Allocates spad tensors, weight rows and param rows for a sequence of kernels."""

    cfg: AccelConfig
    spad_next: int = 0
    w_next: int = 0
    p_next: int = 0
    acc_base: int = 0
    placed: list = field(default_factory=list)

    def tensor(self, c: int, h: int, w: int, signed: bool = False) -> SpadTensor:
        t = SpadTensor(self.spad_next, c, h, w, signed)
        self.spad_next += t.rows(self.cfg)
        if self.spad_next > self.cfg.spad_depth:
            raise _NoFit("spad")
        return t

    def conv2d(self, x, y, w, rq, *, pot=False, **kw) -> Kernel:
        """``kernels.conv2d``; ``pot`` (a bool, or a function of a tile's wmem address) runs the
        chosen weight tiles in PoT mode (:func:`use_pot`)."""
        k = kernels.conv2d(self.cfg, x, y, w, rq, w_base=self.w_next, param_base=self.p_next,
                           acc_base=self.acc_base, **kw)
        use_pot(self.cfg, k, self.w_next, pot if callable(pot) else lambda _addr: pot)
        self.placed.append((k, self.w_next, self.p_next))
        self.w_next += len(k.wmem)
        self.p_next += len(k.params["bias"])
        return k

    def pool2d(self, x, y, mode, kernel, **kw) -> Kernel:
        k = kernels.pool2d(self.cfg, x, y, mode, kernel, **kw)
        self.placed.append((k, self.w_next, self.p_next))
        return k

    def program(self, manifest=None) -> Program:
        n = sum(len(k.instrs) for k, _, _ in self.placed) + 1
        if n > min(self.cfg.imem_depth, MAX_INSTRS) or self.w_next > self.cfg.wmem_depth \
                or self.p_next > self.cfg.param_depth:
            raise _NoFit("imem/wmem/param")
        return assemble(self.cfg, self.placed, manifest=manifest)


# -- random cases --------------------------------------------------------------------------------------

@dataclass
class ConvSpec:
    """A random convolution (or GEMM, or residual block) and the case that runs it."""

    x: SpadTensor
    y: SpadTensor
    xv: np.ndarray  # (Cin, H, W) input values
    w: np.ndarray  # (Cout, Cin/groups, kh, kw)
    rq: Requant
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    acc_base: int
    case: Case
    res: SpadTensor | None = None
    rv: np.ndarray | None = None  # (Cout, OH, OW) residual values


@dataclass
class PoolSpec:
    x: SpadTensor
    y: SpadTensor
    xv: np.ndarray
    mode: PoolMode
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    case: Case


def _picker(rng, scale):
    def pick(lo, hi):
        """Integer in lo..lo + scale*(hi - lo): shrinks towards lo as scale goes to 0."""
        return int(rng.integers(lo, lo + max(0, round((hi - lo) * scale)) + 1))
    return pick


def _fit(make, rng, cfg, kind):
    for attempt in range(40):
        scale = max(0.0, 1.0 - attempt / 12)
        try:
            return make(rng, cfg, scale)
        except (_NoFit, KernelError, ProgramError, isa.IsaError):
            continue
    raise CaseError(f"no {kind} case fits {cfg.describe()}")


def _dim_max(cfg):
    return (1 << cfg.dim_bits) - 1


def _make_conv(rng, cfg, scale, *, residual, gemm, depthwise):
    pick = _picker(rng, scale)
    dmax = _dim_max(cfg)
    if gemm:
        kh = kw = 1
        sh = sw = 1
        ph = pw = 0
        M = pick(1, min(24, cfg.acc_depth, dmax))
        H, W = 1, M
        cin = pick(1, 20)
        groups = 1
        cout = pick(1, 12)
    else:
        kh, kw = pick(1, 5), pick(1, 5)
        sh, sw = pick(1, 2), pick(1, 2)
        ph, pw = pick(0, 2), pick(0, 2)
        H = pick(max(1, kh - 2 * ph), min(9, dmax))
        W = pick(max(1, kw - 2 * pw), min(9, dmax))
        cin = pick(1, 7)
        mode = "depthwise" if depthwise else ("dense" if depthwise is False else
                                               rng.choice(["dense", "dense", "depthwise", "grouped"]))
        if mode == "depthwise":
            groups = cin
        elif mode == "grouped":
            divs = [g for g in range(2, cin) if cin % g == 0]  # a proper divisor, else dense
            groups = int(rng.choice(divs)) if divs else 1
        else:
            groups = 1
        cout = groups * pick(1, max(1, 8 // groups)) if groups > 1 else pick(1, 9)
    oh = (H + 2 * ph - kh) // sh + 1
    ow = (W + 2 * pw - kw) // sw + 1
    if oh < 1 or ow < 1 or ow > cfg.acc_depth or max(H, W, oh, ow) > dmax:
        raise _NoFit("shape")
    x_signed = bool(rng.integers(0, 2))
    y_signed = bool(rng.integers(0, 2))
    R = cfg.rows
    need = -(-cin // R) * H * W + -(-cout // R) * oh * ow * (2 if residual else 1)
    if need > cfg.spad_depth:
        raise _NoFit("spad")
    b = Builder(cfg, spad_next=int(rng.integers(0, cfg.spad_depth - need + 1)))
    b.acc_base = int(rng.integers(0, cfg.acc_depth - ow + 1))
    b.w_next = int(rng.integers(0, 3))
    b.p_next = int(rng.integers(0, 2))
    x = b.tensor(cin, H, W, x_signed)
    y = b.tensor(cout, oh, ow, y_signed)
    res = b.tensor(cout, oh, ow, bool(rng.integers(0, 2))) if residual else None
    xv = rand_acts(rng, cfg, (cin, H, W), x_signed)
    mode = pick_weight_mode(rng, cfg)
    pack = random_pack_bits(rng, cfg, mode)
    w = rand_weights(rng, cfg, (cout, cin // groups, kh, kw), mode=mode, bits=pack or None)
    rv = rand_acts(rng, cfg, (cout, oh, ow), res.signed) if residual else None
    w_mag_bits = max(0, int(np.abs(weight_values(cfg, mode, pack or None)).max()).bit_length() - 1)
    rq = random_requant(rng, cfg, cout, (cin // groups) * kh * kw, out_signed=y_signed, residual=residual,
                        w_mag_bits=w_mag_bits)
    pot = {"int": False, "pot": True, "mixed": lambda _addr: bool(rng.integers(0, 2))}[mode]
    bs = random_block_scale(rng, cfg, (cout, x.blocks(cfg), kh, kw)) if cfg.block_scale else None
    b.conv2d(x, y, w, rq, stride=(sh, sw), padding=(ph, pw), groups=groups, residual=res, pot=pot,
             block_scale=bs, pack_bits=pack)
    kind = "gemm" if gemm else ("residual" if residual else "conv")
    manifest = {"case": kind, "x": [cin, H, W], "y": [cout, oh, ow], "kernel": [kh, kw],
                "stride": [sh, sw], "padding": [ph, pw], "groups": groups, "weights": mode,
                **({"pack_bits": pack} if pack else {})}
    prog = b.program(manifest)
    writes = tensor_rows(cfg, x, xv) + zero_rows(cfg, y)
    if residual:
        writes += tensor_rows(cfg, res, rv)
    case = Case(prog, writes, [(y.base, y.rows(cfg))])
    return ConvSpec(x, y, xv, w, rq, (sh, sw), (ph, pw), groups, b.acc_base, case, res, rv)


def random_conv_spec(rng, cfg, *, residual=False, depthwise=None) -> ConvSpec:
    """Random convolution; ``depthwise`` True/False forces the grouping, None picks at random
    (dense, depthwise or grouped)."""
    return _fit(lambda r, c, s: _make_conv(r, c, s, residual=residual, gemm=False, depthwise=depthwise),
                rng, cfg, "conv")


def random_gemm_spec(rng, cfg) -> ConvSpec:
    """Random GEMM (M x K activations times K x N weights) as a 1x1 conv on a 1 x M image."""
    return _fit(lambda r, c, s: _make_conv(r, c, s, residual=False, gemm=True, depthwise=False),
                rng, cfg, "gemm")


def _make_pool(rng, cfg, scale):
    pick = _picker(rng, scale)
    dmax = _dim_max(cfg)
    kh, kw = pick(1, 4), pick(1, 4)
    sh, sw = pick(1, 3), pick(1, 3)
    ph, pw = pick(0, 1), pick(0, 1)
    H = pick(max(1, kh - 2 * ph), min(9, dmax))
    W = pick(max(1, kw - 2 * pw), min(9, dmax))
    c = pick(1, 9)
    oh = (H + 2 * ph - kh) // sh + 1
    ow = (W + 2 * pw - kw) // sw + 1
    if oh < 1 or ow < 1 or max(H, W, oh, ow) > dmax:
        raise _NoFit("shape")
    signed = bool(rng.integers(0, 2))
    mode = PoolMode.AVG if rng.integers(0, 2) else PoolMode.MAX
    R = cfg.rows
    need = -(-c // R) * (H * W + oh * ow)
    if need > cfg.spad_depth:
        raise _NoFit("spad")
    b = Builder(cfg, spad_next=int(rng.integers(0, cfg.spad_depth - need + 1)))
    x = b.tensor(c, H, W, signed)
    y = b.tensor(c, oh, ow, signed)
    xv = rand_acts(rng, cfg, (c, H, W), signed)
    b.pool2d(x, y, mode, (kh, kw), stride=(sh, sw), padding=(ph, pw))
    prog = b.program({"case": "pool", "mode": mode.name, "x": [c, H, W], "kernel": [kh, kw],
                      "stride": [sh, sw], "padding": [ph, pw]})
    case = Case(prog, tensor_rows(cfg, x, xv) + zero_rows(cfg, y), [(y.base, y.rows(cfg))])
    return PoolSpec(x, y, xv, mode, (kh, kw), (sh, sw), (ph, pw), case)


def random_pool_spec(rng, cfg) -> PoolSpec:
    return _fit(_make_pool, rng, cfg, "pool")


def random_conv_case(rng, cfg) -> Case:
    return random_conv_spec(rng, cfg).case


def random_gemm_case(rng, cfg) -> Case:
    return random_gemm_spec(rng, cfg).case


def random_pool_case(rng, cfg) -> Case:
    return random_pool_spec(rng, cfg).case


def random_residual_case(rng, cfg) -> Case:
    return random_conv_spec(rng, cfg, residual=True).case


def with_bfp(rng, case: Case, p_post: float = 0.5) -> Case:
    """``case`` on a ``bfp_exp_bits`` config with block floating point: a ``spad_exp`` image of
    random exponents (0..``bfp_emax``, a third of the rows 0) under every spad row, so every
    MATMUL reads exponents and the block rescale shifts both ways; each non-residual POST becomes
    a BFP POST with probability ``p_post`` (``zp = 0``, ``hi >= 1``, ``lo <= hi``). Outputs are
    unchanged (read ``spad_exp`` beside them: POST and POOL write their rows' exponents)."""
    cfg = case.program.config
    if not cfg.bfp_exp_bits:
        return case
    exps = rng.integers(0, cfg.bfp_emax + 1, (cfg.spad_depth, 1))
    exps[rng.random(cfg.spad_depth) < 1 / 3] = 0
    instrs = []
    for ins in case.program.instrs:
        a = ins.args
        if ins.op is Opcode.POST and not a["res_en"] and rng.random() < p_post:
            hi = max(a["hi"], 1)
            ins = isa.Instr(Opcode.POST, {**a, "bfp": 1, "zp": 0, "hi": hi, "lo": min(a["lo"], hi)})
        instrs.append(ins)
    images = {**case.program.images, "spad_exp": pack_rows(isa.spad_exp_row_layout(cfg), exps)}
    return case._replace(program=Program(cfg, instrs, images, case.program.manifest))


# -- configs and machines ------------------------------------------------------------------------------

def random_config(rng, *, max_dim: int = 6) -> AccelConfig:
    """A small random config (rows/cols 1..max_dim, non-square, 2..8-bit operands, any PE kind,
    small depths so kernels chunk their output rows)."""
    return AccelConfig(
        rows=int(rng.integers(1, max_dim + 1)), cols=int(rng.integers(1, max_dim + 1)),
        w_bits=int(rng.integers(2, 9)), a_bits=int(rng.integers(2, 9)),
        spad_depth=int(rng.choice([512, 1000, 2048])), acc_depth=int(rng.choice([9, 16, 40, 64])),
        wmem_depth=int(rng.choice([300, 1024])), imem_depth=int(rng.choice([200, 256, 1024])),
        param_depth=int(rng.choice([8, 16])), mult_bits=int(rng.choice([16, 24])),
        pool_mult_bits=int(rng.integers(10, 17)),
        pe_kind=str(rng.choice(PE_KINDS)),  # drawn last: the other fields stay what they were
    )


def scramble(machine, rng) -> None:
    """Fill every memory and weight bank of a golden machine with random (valid) garbage."""
    cfg = machine.cfg

    def fill(arr, bits, signed):
        lo = -(1 << (bits - 1)) if signed else 0
        arr[...] = rng.integers(lo, lo + (1 << bits), arr.shape)

    fill(machine.spad, cfg.a_bits, False)
    fill(machine.acc, cfg.acc_width, True)
    fill(machine.wmem, cfg.w_bits, True)
    fill(machine.banks, cfg.w_bits, True)
    fill(machine.param["bias"], cfg.bias_bits, True)
    fill(machine.param["mult"], cfg.mult_bits, False)
    fill(machine.param["res_mult"], cfg.mult_bits, False)
    fill(machine.param["shift"], cfg.shift_bits, False)
    if cfg.bfp_exp_bits:
        fill(machine.spad_exp, cfg.bfp_exp_bits, False)


def host_writes(case: Case) -> list:
    """The host-port writes that load ``case`` after its program images: its ``spad_writes``, then
    (BFP cases) its ``spad_exp`` image once more, because a host SPAD write sets the row's
    exponent to 0 and the case wants its random exponents under the rows it wrote."""
    writes = [(isa.HostMem.SPAD, addr, rows) for addr, rows in case.spad_writes]
    if "spad_exp" in case.program.images and writes:
        writes.append((isa.HostMem.SPAD_EXP, 0, list(case.program.images["spad_exp"])))
    return writes


def rtl_job(case: Case, reads):
    """A Verilator :class:`sim.verilator.Job` running ``case``: :func:`host_writes`, then the
    program, then ``reads`` (``[(HostMem, first row, rows)]``)."""
    from sim.verilator import Job

    return Job(case.program, host_writes(case), list(reads))


def run_case(case: Case, machine=None):
    """Run a case on a golden machine (fresh unless given); returns (outputs, RunResult)."""
    from sim.golden import Machine

    m = machine or Machine(case.program.config)
    apply_writes(m, case.spad_writes)
    res = m.run(case.program)
    return read_outputs(m, case.outputs), res
