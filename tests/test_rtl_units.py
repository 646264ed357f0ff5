"""Amaranth-simulator unit tests of the RTL blocks against the golden model's arithmetic."""

import numpy as np
import pytest
from amaranth.sim import Simulator

from hw.array import IntPE, SystolicArray
from hw.config import AccelConfig
from hw.ppu import RequantLane
from sim.golden import requantize, wrap


def _run(dut, bench):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def _srange(bits):
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


@pytest.mark.parametrize("w_bits,a_bits", [(2, 2), (2, 8), (4, 4), (8, 2), (8, 8), (3, 5)])
def test_int_pe_multiply_accumulate(w_bits, a_bits):
    seed = w_bits * 10 + a_bits
    rng = np.random.default_rng(seed)
    cfg = AccelConfig(rows=1, cols=1, w_bits=w_bits, a_bits=a_bits, wmem_depth=16)
    dut = IntPE(cfg)
    wlo, whi = _srange(w_bits)
    alo, ahi = -(1 << a_bits), (1 << a_bits) - 1  # extended activations cover signed and unsigned
    plo, phi = _srange(cfg.acc_width)
    weights = [int(rng.integers(wlo, whi + 1)), int(rng.integers(wlo, whi + 1))]
    cases = [(int(rng.integers(alo, ahi + 1)), int(rng.integers(plo, phi + 1)), int(rng.integers(0, 2)))
             for _ in range(200)]
    # Extremes: largest products and wrap-around of the partial sum.
    cases += [(alo, phi, 0), (ahi, plo, 1), (alo, plo, 1), (ahi, phi, 0)]

    async def bench(ctx):
        for bank, wv in enumerate(weights):
            ctx.set(dut.w_we, 1)
            ctx.set(dut.w_bank, bank)
            ctx.set(dut.w_data, wv)
            await ctx.tick()
        ctx.set(dut.w_we, 0)
        for a, p, bank in cases:
            ctx.set(dut.a_in, a)
            ctx.set(dut.psum_in, p)
            ctx.set(dut.bank_in, bank)
            await ctx.tick()
            got = ctx.get(dut.psum_out)
            want = int(wrap(p + weights[bank] * a, cfg.acc_width))
            assert got == want, f"seed {seed}: a={a} p={p} bank={bank} w={weights[bank]}: {got} != {want}"
            assert ctx.get(dut.a_out) == a and ctx.get(dut.bank_out) == bank

    _run(dut, bench)


@pytest.mark.parametrize("rows,cols,w_bits,a_bits", [(1, 1, 8, 8), (2, 3, 4, 4), (4, 2, 2, 8), (5, 5, 8, 3)])
def test_systolic_array_double_buffered(rows, cols, w_bits, a_bits):
    """Vectors alternate banks every few cycles while the idle bank is rewritten: every output
    must equal vec @ W[bank] for the weights the bank held when that vector entered."""
    seed = rows * 1000 + cols * 100 + w_bits * 10 + a_bits
    rng = np.random.default_rng(seed)
    cfg = AccelConfig(rows=rows, cols=cols, w_bits=w_bits, a_bits=a_bits, wmem_depth=64)
    dut = SystolicArray(cfg)
    lat = SystolicArray.latency(cfg)
    wlo, whi = _srange(w_bits)
    # A bank may be rewritten once the last vector that used it has passed every PE
    # (rows + cols - 2 cycles after it entered); the test reloads right after that.
    first_load = rows + cols
    n_tiles, per_tile = 6, first_load + rows + 1
    tiles = [rng.integers(wlo, whi + 1, (rows, cols)) for _ in range(n_tiles)]
    vecs = [rng.integers(-(1 << a_bits), 1 << a_bits, rows) for _ in range(n_tiles * per_tile)]
    expected = [wrap(vecs[i] @ tiles[i // per_tile], cfg.acc_width) for i in range(len(vecs))]
    got = {}

    async def bench(ctx):
        async def load(bank, w):
            for r in range(rows):
                ctx.set(dut.w_we, 1)
                ctx.set(dut.w_bank, bank)
                ctx.set(dut.w_row_idx, r)
                ctx.set(dut.w_row, [int(v) for v in w[r]])
                await ctx.tick()
            ctx.set(dut.w_we, 0)

        await load(0, tiles[0])
        t = 0
        for i in range(len(vecs) + lat + 1):
            tile = i // per_tile
            # Preload the next tile into the other bank while this one streams (one row per cycle).
            j = i % per_tile - first_load
            if tile + 1 < n_tiles and 0 <= j < rows and i < len(vecs):
                ctx.set(dut.w_we, 1)
                ctx.set(dut.w_bank, (tile + 1) % 2)
                ctx.set(dut.w_row_idx, j)
                ctx.set(dut.w_row, [int(v) for v in tiles[tile + 1][j]])
            else:
                ctx.set(dut.w_we, 0)
            if i < len(vecs):
                ctx.set(dut.a_vec, [int(v) for v in vecs[i]])
                ctx.set(dut.a_bank, tile % 2)
            else:
                ctx.set(dut.a_vec, [0] * rows)
            k = i - lat
            if 0 <= k < len(vecs):
                got[k] = [int(v) for v in ctx.get(dut.psum)]
            await ctx.tick()
            t += 1

    _run(dut, bench)
    for k, want in enumerate(expected):
        assert got[k] == [int(v) for v in want], f"seed {seed}: vector {k}: {got[k]} != {list(want)}"


@pytest.mark.parametrize("a_bits,acc_bits,mult_bits", [(8, 32, 24), (4, 20, 16), (2, 12, 8)])
def test_requant_lane_matches_golden(a_bits, acc_bits, mult_bits):
    seed = a_bits * 100 + acc_bits
    rng = np.random.default_rng(seed)
    cfg = AccelConfig(rows=1, cols=1, w_bits=a_bits, a_bits=a_bits, acc_bits=acc_bits, mult_bits=mult_bits)
    dut = RequantLane(cfg)
    alo, ahi = _srange(acc_bits)
    mmax = (1 << mult_bits) - 1
    smax = (1 << cfg.shift_bits) - 1
    rlo, rhi = -(1 << a_bits), (1 << a_bits) - 1
    sets = []
    for _ in range(12):
        signed_out = bool(rng.integers(0, 2))
        lo, hi = (-(1 << (a_bits - 1)), (1 << (a_bits - 1)) - 1) if signed_out else (0, (1 << a_bits) - 1)
        if rng.random() < 0.3:
            lo = max(lo, 0)  # ReLU-style clamp
        params = dict(bias=int(rng.integers(alo, ahi + 1)) // 4, mult=int(rng.integers(0, mmax + 1)),
                      res_mult=int(rng.integers(0, mmax + 1)), shift=int(rng.integers(0, min(smax, 60) + 1)),
                      zp=int(rng.integers(lo, hi + 1)) if not signed_out else 0, lo=lo, hi=hi)
        accs = [int(v) for v in rng.integers(alo, ahi + 1, 40)] + [alo, ahi, 0, -1, 1]
        # Exact ties: acc * mult == (2k + 1) * 2**(shift-1).
        if params["shift"] > 0 and params["mult"] == 1 << params["shift"] >> 1:
            pass
        ress = [int(v) for v in rng.integers(rlo, rhi + 1, len(accs))]
        sets.append((params, accs, ress))
    # Tie cases: mult = 1, shift = 1, odd accumulators give exact halves.
    sets.append((dict(bias=0, mult=1, res_mult=0, shift=1, zp=0, lo=-(1 << (a_bits - 1)), hi=(1 << (a_bits - 1)) - 1),
                 [-5, -3, -1, 1, 3, 5], [0] * 6))
    lat = RequantLane.LATENCY

    async def bench(ctx):
        for params, accs, ress in sets:
            for k, v in params.items():
                ctx.set(getattr(dut, k), v)
            outs = []
            for i in range(len(accs) + lat):
                if i < len(accs):
                    ctx.set(dut.acc, accs[i])
                    ctx.set(dut.res, ress[i])
                await ctx.tick()
                if i + 1 >= lat:
                    outs.append(ctx.get(dut.y))
            want = requantize(np.array(accs), params["bias"], params["mult"], params["shift"], params["zp"],
                              params["lo"], params["hi"], np.array(ress), params["res_mult"])
            bad = [(a, r, o, int(w)) for a, r, o, w in zip(accs, ress, outs, want) if o != w]
            assert not bad, f"seed {seed}: params {params}: (acc, res, got, want) {bad[:5]}"

    _run(dut, bench)
