"""Layer kernels: one quantized layer -> Quarry instructions + the memory rows it needs.

These are the building blocks of lowering (``compiler.lower``) and of the ISA-level tests. Each
emitter takes integer tensors that are already quantized and placed in memory, and returns a
:class:`Kernel`: instructions plus weight-memory rows and param rows to place at the bases given.

Spad tensor layout: a (C, H, W) tensor at ``base`` is ``ceil(C / rows)`` channel blocks; block
``b`` holds channels ``b*rows .. b*rows + rows - 1`` in its lanes, pixel (h, w) at row
``base + b*H*W + h*W + w``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hw import isa, timing
from hw.config import AccelConfig
from hw.isa import PoolMode

__all__ = ["SpadTensor", "Requant", "Kernel", "conv2d", "pool2d", "KernelError", "memory_message", "dense_weights"]


class KernelError(ValueError):
    """A layer cannot be expressed with this config (too large a field, memory too small, ...)."""


def _row_bits(cfg: AccelConfig, memory: str) -> int:
    if memory == "imem":
        return isa.instr_bits(cfg)
    return getattr(cfg, f"{memory}_row_bits")


def memory_message(cfg: AccelConfig, memory: str, need: int, available: int | None = None,
                   what: str = "") -> str:
    """``"spad needs 5000 rows (80000 bytes), spad_depth is 4096 rows (65536 bytes)"``.

    ``memory`` is one of spad, acc, wmem, param, imem; ``available`` defaults to the whole depth.
    Bytes are the rows' bits rounded up to whole bytes, so they read like the memory's size.
    """
    depth = getattr(cfg, f"{memory}_depth")
    unit = "instructions" if memory == "imem" else "rows"
    bits = _row_bits(cfg, memory)
    size = lambda n: f"{n} {unit} ({-(-n * bits // 8)} bytes)"  # noqa: E731
    msg = f"{memory} needs {size(need)}{what}, "
    if available is None or available == depth:
        return msg + f"{memory}_depth is {size(depth)}"
    return msg + f"{size(available)} of {memory}_depth {depth} are available"


def dense_weights(w: np.ndarray, groups: int) -> np.ndarray:
    """Grouped conv weights (Cout, Cin/groups, kh, kw) as dense (Cout, Cin, kh, kw): zero outside
    each output channel's group (how the array sees them)."""
    cout, cin_g, kh, kw = w.shape
    dense = np.zeros((cout, cin_g * groups, kh, kw), w.dtype)
    per = cout // groups
    for g in range(groups):
        dense[g * per:(g + 1) * per, g * cin_g:(g + 1) * cin_g] = w[g * per:(g + 1) * per]
    return dense


@dataclass(frozen=True)
class SpadTensor:
    base: int
    c: int
    h: int
    w: int
    signed: bool = False

    def blocks(self, cfg: AccelConfig) -> int:
        return -(-self.c // cfg.rows)

    def block_base(self, cfg: AccelConfig, b: int) -> int:
        return self.base + b * self.h * self.w

    def rows(self, cfg: AccelConfig) -> int:
        return self.blocks(cfg) * self.h * self.w


@dataclass
class Requant:
    """Per-output-channel requantization (see ``sim.golden.requantize``)."""

    bias: np.ndarray
    mult: np.ndarray
    shift: np.ndarray
    zp: int
    lo: int
    hi: int
    res_mult: np.ndarray | None = None
    #: Block-floating-point output (POST ``bfp``, ``bfp_exp_bits`` configs): ``zp`` 0, no residual.
    bfp: bool = False


@dataclass
class Kernel:
    instrs: list = field(default_factory=list)
    wmem: np.ndarray | None = None  # (n, cols) signed weights, placed at w_base
    params: dict | None = None  # {bias, mult, res_mult, shift}: (n, cols), placed at param_base
    macs: int = 0


def _param_rows(cfg: AccelConfig, rq: Requant, cout: int) -> dict:
    nb = -(-cout // cfg.cols)
    out = {}
    for k in ("bias", "mult", "res_mult", "shift"):
        v = getattr(rq, k)
        v = np.zeros(cout, np.int64) if v is None else np.broadcast_to(np.asarray(v, np.int64), (cout,))
        pad = np.zeros(nb * cfg.cols, np.int64)
        pad[:cout] = v
        out[k] = pad.reshape(nb, cfg.cols)
    return out


def _post_segments(cfg: AccelConfig, j: int, cout: int):
    """Split output block j (channels j*cols ..) into (src_lane, spad block, dst_lane, n) pieces."""
    lo, hi = j * cfg.cols, min((j + 1) * cfg.cols, cout)
    ch = lo
    while ch < hi:
        b = ch // cfg.rows
        end = min(hi, (b + 1) * cfg.rows)
        yield ch - lo, b, ch - b * cfg.rows, end - ch
        ch = end


def conv2d(cfg: AccelConfig, x: SpadTensor, y: SpadTensor, w: np.ndarray, rq: Requant, *,
           stride=(1, 1), padding=(0, 0), groups: int = 1, w_base: int = 0, param_base: int = 0,
           acc_base: int = 0, acc_rows: int | None = None, residual: SpadTensor | None = None,
           acc_out: bool = False, pot: bool = False, block_scale=None, pack_bits: int = 0,
           tail_rows: int | None = None) -> Kernel:
    """Convolution (and, with a 1x1 kernel on a 1xM image, a GEMM) into ``y``.

    ``w`` has shape (Cout, Cin/groups, kh, kw), signed integers of ``cfg.w_bits``. For each
    output-channel block, every (tap, input-channel block) weight tile that is not all zero is
    preloaded (alternating banks so loads overlap the previous tile's streaming) and streamed
    over the output pixels, accumulating in acc; then POST writes the block to ``y``.

    With ``acc_out`` there is no POST: output block ``j`` stays in acc rows
    ``acc_base + j*oh*ow ..`` (raw accumulators, e.g. a classifier's logits); ``y`` is ignored.

    With ``pot`` the weights are power-of-two values (0 or +-2**e): wmem gets their codes
    (:func:`hw.isa.pot_encode`) and every MATMUL has ``pot = 1``. Tiles are chosen on the values,
    so an all-zero tile is skipped whatever zero's code is.

    On a ``block_scale`` config every MATMUL names a param row (``scale_addr``) whose per-lane
    ``mult``/``shift`` rescale its sums before they are accumulated. ``block_scale`` gives them
    (DSConv): ``(mult, shift)``, each ``(Cout, ceil(Cin / rows), kh, kw)`` over the input's
    channel blocks, so each weight tile (one tap, one channel block, one output block) gets its
    own row after the requantization rows. Without it, every MATMUL uses one identity row
    (mult 1, shift 0).

    With ``pack_bits = k`` (1..w_bits-1, a ``packed_weights`` config, INT weights of ``k`` bits)
    each tile's rows are stored packed (:func:`hw.isa.pack_weights`: ``w_bits // k`` rows per
    wmem row) and its PRELOADs carry ``pack_bits``, so the layer takes fewer wmem rows.
    """
    R, C = cfg.rows, cfg.cols
    w = np.asarray(w, np.int64)
    cout, cin_g, kh, kw = w.shape
    sh, sw = stride
    ph, pw = padding
    if x.c != cin_g * groups or cout % groups or (not acc_out and y.c != cout):
        raise KernelError(f"conv shapes disagree: x has {x.c} channels, w {w.shape}, groups {groups}, y {y.c}")
    oh = (x.h + 2 * ph - kh) // sh + 1
    ow = (x.w + 2 * pw - kw) // sw + 1
    # A stride along an axis with one output is never applied; 1 keeps it within STRIDE_BITS.
    sh, sw = (1 if oh == 1 else sh), (1 if ow == 1 else sw)
    if not acc_out and (oh, ow) != (y.h, y.w):
        raise KernelError(f"conv output is {oh}x{ow}, y is {y.h}x{y.w}")
    dense = dense_weights(w, groups)
    acc_rows = cfg.acc_depth - acc_base if acc_rows is None else acc_rows
    if ow > acc_rows:
        raise KernelError(memory_message(cfg, "acc", ow, acc_rows, " for one output row"))
    rows_per_chunk = min(oh, acc_rows // ow)
    n_blocks = -(-cout // C)
    # Passes: (output block, output rows r0..r1-1), each MATMULs over every weight tile then POST.
    # Ping-pong: on a post_overlap config, consecutive passes take turns in two acc regions, so a pass's POSTs run while the next pass's MATMULs stream, and those need not
    # wait for the array to drain (hw.timing.post_hazard). The last pass's POST is the one
    # nothing overlaps: it may be split off as a short pass of ``tail_rows`` output rows
    # (``None``: the cycle model picks, 0: no split).
    half = acc_rows // 2
    pp_ok = cfg.post_overlap and not acc_out and half >= ow
    if pp_ok and (n_blocks > 1 or oh > rows_per_chunk):
        rows_per_chunk = min(oh, half // ow)
    chunks = {j: [(r0, min(oh, r0 + rows_per_chunk)) for r0 in range(0, oh, rows_per_chunk)]
              for j in range(n_blocks)}
    if pp_ok and tail_rows is None:
        r0, r1 = chunks[n_blocks - 1][-1]
        best = None
        for t in [0] + sorted({-(-(r1 - r0) // n) for n in range(2, min(r1 - r0, 16) + 1)}):
            if t and max(r1 - r0 - t, t) * ow > half:
                continue
            kt = conv2d(cfg, x, y, w, rq, stride=stride, padding=padding, groups=groups, w_base=w_base,
                        param_base=param_base, acc_base=acc_base, acc_rows=acc_rows, residual=residual,
                        acc_out=acc_out, pot=pot, block_scale=block_scale, pack_bits=pack_bits, tail_rows=t)
            cyc = timing.predict(cfg, timing.mark_overlaps(cfg, kt.instrs + [isa.halt()]))[2]
            if best is None or cyc < best[0]:
                best = (cyc, kt)
        return best[1]
    if tail_rows:
        r0, r1 = chunks[n_blocks - 1].pop()
        if not 0 < tail_rows < r1 - r0 or max(r1 - r0 - tail_rows, tail_rows) * ow > half or not pp_ok:
            raise KernelError(f"tail_rows {tail_rows}: cannot split the last pass of rows {r0}..{r1 - 1}")
        chunks[n_blocks - 1] += [(r0, r1 - tail_rows), (r1 - tail_rows, r1)]
    pingpong = pp_ok and sum(map(len, chunks.values())) > 1
    # The second half starts right after the largest pass (not at acc_rows / 2): a program takes
    # as few acc rows as it can, so a board sized from it (boards.build.memory_needs) stays small.
    pp_off = max((r1 - r0) * ow for c in chunks.values() for r0, r1 in c)
    if acc_out and n_blocks * oh * ow > acc_rows:
        raise KernelError(memory_message(cfg, "acc", n_blocks * oh * ow, acc_rows, " for the raw output"))
    if pack_bits:
        try:
            isa.check_pack_bits(cfg, pack_bits)
        except isa.PackError as e:
            raise KernelError(str(e)) from None
        if pot:
            raise KernelError(f"packed weights (pack_bits {pack_bits}) hold INT weights only: a PoT code is "
                              "sign and magnitude, so a sign-extended narrow code is not the w_bits code")
    if rq.bfp and not acc_out:
        why = ("the accelerator has no bfp_exp_bits" if not cfg.bfp_exp_bits else
               f"zero point {rq.zp} (must be 0)" if rq.zp else
               "a residual add" if residual is not None else
               f"cols {C} not a multiple of rows {R} (a spad row would be written by several POSTs)"
               if C % R else None)
        if why:
            raise KernelError(f"block-floating-point output impossible: {why}")
    k = Kernel(params=_param_rows(cfg, rq, cout))
    n_cb = x.blocks(cfg)
    if block_scale is not None and not cfg.block_scale:
        raise KernelError("block scales (DSConv) need an accelerator with block_scale enabled")
    if block_scale is not None:
        bs_mult, bs_shift = (np.asarray(v, np.int64) for v in block_scale)
        if bs_mult.shape != (cout, n_cb, kh, kw) or bs_shift.shape != bs_mult.shape:
            raise KernelError(f"block scales must have shape {(cout, n_cb, kh, kw)}, not {bs_mult.shape}")
    scale_rows = []  # (mult, shift) rows of cols lanes, placed after the requantization rows

    def scale_row(j, dy, dx, cb):
        if block_scale is None:
            if not scale_rows:
                scale_rows.append((np.ones(C, np.int64), np.zeros(C, np.int64)))
            return 0
        mult, shift = np.zeros(C, np.int64), np.zeros(C, np.int64)
        n = min(C, cout - j * C)
        mult[:n], shift[:n] = bs_mult[j * C:j * C + n, cb, dy, dx], bs_shift[j * C:j * C + n, cb, dy, dx]
        scale_rows.append((mult, shift))
        return len(scale_rows) - 1

    n_rq = len(k.params["bias"])
    # A pass's POSTs are emitted inside the next pass: without ping-pong after its first PRELOAD
    # (which fills its bank while the array drains for the POSTs; the MATMULs behind may overlap
    # the POSTs), with ping-pong after as many of its MATMULs as cover the array's drain (the
    # POSTs then overlap those MATMULs, the rest overlap the POSTs). ``overlap`` bits: set by
    # ``hw.timing.mark_overlaps`` where the timing allows.
    posts: list[isa.Instr] = []
    n_pass = 0
    wrows = []
    wcount = 0
    tile = 0
    for j in range(-(-cout // C)):
        tiles = []
        for dy in range(kh):
            for dx in range(kw):
                for cb in range(x.blocks(cfg)):
                    blk = dense[j * C:(j + 1) * C, cb * R:(cb + 1) * R, dy, dx]  # (<=C, <=R)
                    if not blk.any():
                        continue
                    rows = np.zeros((blk.shape[1], C), np.int64)
                    rows[:, :blk.shape[0]] = blk.T
                    srow = scale_row(j, dy, dx, cb) if cfg.block_scale else 0
                    tiles.append((dy, dx, cb, wcount, len(rows), srow))
                    if pack_bits:
                        try:
                            rows = isa.pack_weights(cfg, pack_bits, rows)
                        except isa.PackError as e:
                            raise KernelError(f"pack_bits {pack_bits}: {e}") from None
                    wrows.append(rows)
                    wcount += len(rows)
        if not tiles:  # an all-zero block still needs its acc rows cleared
            tiles.append((0, 0, 0, wcount, 0, scale_row(j, 0, 0, 0) if cfg.block_scale else 0))
        for r0, r1 in chunks[j]:
            top = r0 * sh - ph  # input row of window tap 0 for output row r0
            skip = max(0, top)
            base = acc_base + j * oh * ow if acc_out else acc_base + (n_pass % 2) * pp_off if pingpong else acc_base
            n_pass += 1
            # MATMULs of this pass ahead of the previous pass's POSTs (ping-pong).
            ahead = -(-(timing.matmul_latency(cfg) - 1) // ((r1 - r0) * ow))
            for t, (dy, dx, cb, woff, n_rows, srow) in enumerate(tiles):
                bank = tile % 2
                tile += 1
                k.instrs.append(isa.preload(bank=bank, w_addr=w_base + woff, n_rows=n_rows, pack_bits=pack_bits))
                if not pingpong:
                    k.instrs.extend(posts)
                    posts.clear()
                k.instrs.append(isa.matmul(
                    bank=bank, accumulate=t > 0, a_signed=x.signed,
                    spad_base=x.block_base(cfg, cb) + skip * x.w, in_h=x.h - skip, in_w=x.w,
                    out_h=r1 - r0, out_w=ow, stride_h=sh, stride_w=sw,
                    off_h=top - skip + dy, off_w=dx - pw, acc_base=base, pot=pot,
                    scale_addr=param_base + n_rq + srow if cfg.block_scale else 0))
                if t + 1 >= ahead:
                    k.instrs.extend(posts)
                    posts.clear()
            k.instrs.extend(posts)
            posts.clear()
            if acc_out:
                continue
            for src, b, dst, n in _post_segments(cfg, j, cout):
                posts.append(isa.post(
                    acc_base=base, spad_base=y.block_base(cfg, b) + r0 * ow, n=(r1 - r0) * ow,
                    param_addr=param_base + j, src_lane=src, dst_lane=dst, n_lanes=n,
                    zp=rq.zp, lo=rq.lo, hi=rq.hi,
                    res_base=None if residual is None else residual.block_base(cfg, b) + r0 * ow,
                    res_signed=bool(residual is not None and residual.signed),
                    bfp=rq.bfp))
    k.instrs.extend(posts)
    k.wmem = np.concatenate(wrows) if wrows else np.zeros((0, C), np.int64)
    if scale_rows:
        zeros = np.zeros((len(scale_rows), C), np.int64)
        extra = {"bias": zeros, "res_mult": zeros, "mult": np.stack([r[0] for r in scale_rows]),
                 "shift": np.stack([r[1] for r in scale_rows])}
        k.params = {f: np.concatenate([k.params[f], extra[f]]) for f in k.params}
    if pot:
        try:
            k.wmem = np.asarray(isa.pot_encode(k.wmem, cfg), np.int64).reshape(-1, C)
        except isa.PotError as e:
            raise KernelError(str(e)) from None
    k.macs = oh * ow * cout * cin_g * kh * kw
    return k


def avg_pool_mult(cfg: AccelConfig, count: int) -> tuple[int, int]:
    """(mult, shift) with mult / 2**shift ~= 1 / count, mult within ``pool_mult_bits``."""
    shift = min((1 << isa.POOL_SHIFT_BITS) - 1, cfg.pool_mult_bits - 1 + int(math.floor(math.log2(count))))
    mult = round((1 << shift) / count)
    while mult >= (1 << cfg.pool_mult_bits):
        shift -= 1
        mult = round((1 << shift) / count)
    return mult, shift


def pool2d(cfg: AccelConfig, x: SpadTensor, y: SpadTensor, mode: PoolMode, kernel, *, stride=None,
           padding=(0, 0)) -> Kernel:
    """Max or average pooling (average counts padding as zeros, like PyTorch's default)."""
    kh, kw = kernel
    sh, sw = stride or kernel
    ph, pw = padding
    oh = (x.h + 2 * ph - kh) // sh + 1
    ow = (x.w + 2 * pw - kw) // sw + 1
    if (oh, ow) != (y.h, y.w) or x.c != y.c:
        raise KernelError(f"pool output is {x.c}x{oh}x{ow}, y is {y.c}x{y.h}x{y.w}")
    # A stride along an axis with one output (e.g. global pooling) is never applied.
    sh, sw = (1 if oh == 1 else sh), (1 if ow == 1 else sw)
    mult, shift = avg_pool_mult(cfg, kh * kw) if mode is PoolMode.AVG else (0, 0)
    k = Kernel()
    for b in range(x.blocks(cfg)):
        k.instrs.append(isa.pool(
            mode=mode, a_signed=x.signed, src_base=x.block_base(cfg, b), dst_base=y.block_base(cfg, b),
            in_h=x.h, in_w=x.w, out_h=oh, out_w=ow, k_h=kh, k_w=kw, stride_h=sh, stride_w=sw,
            off_h=-ph, off_w=-pw, mult=mult, shift=shift))
    return k
