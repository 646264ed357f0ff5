"""Rounding and requantization of ``sim.golden`` against an exact reference.

The reference uses :class:`fractions.Fraction` and Python integers only: ``x / 2**s`` rounded to
nearest, halves away from zero (the rule in ``sim/golden.py``'s module docstring).
"""

import zlib
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hw.config import AccelConfig
from sim.golden import requantize, round_shift

INT64_SAFE = (1 << 62) - 1  # |x| bound for which round_shift's x + 2**(s-1) stays in int64 (s <= 63)
MAX_SHIFT = (1 << 6) - 1  # widest shift field the config allows (shift_bits <= 6)


def ref_round(q: Fraction) -> int:
    """Nearest integer to ``q``, ties away from zero."""
    mag = abs(q)
    r = (mag + Fraction(1, 2)).numerator // (mag + Fraction(1, 2)).denominator  # floor(|q| + 1/2)
    return r if q >= 0 else -r


def ref_round_shift(x: int, s: int) -> int:
    return ref_round(Fraction(x, 1 << s))


def ref_requant(acc, bias, mult, shift, zp, lo, hi, residual=0, res_mult=0) -> int:
    t = (acc + bias) * mult + residual * res_mult
    return min(max(zp + ref_round_shift(t, shift), lo), hi)


def act_range(bits, signed):
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def rs(x, s) -> int:
    return int(round_shift(np.int64(x), s))


def test_reference_rounding_itself():
    # Pin the reference on hand-checkable values before trusting it as an oracle.
    cases = {(5, 1): 3, (-5, 1): -3, (3, 1): 2, (-3, 1): -2, (1, 1): 1, (-1, 1): -1, (2, 2): 1,
             (-2, 2): -1, (1, 2): 0, (-1, 2): 0, (3, 2): 1, (-3, 2): -1, (6, 2): 2, (-6, 2): -2,
             (7, 0): 7, (-7, 0): -7, (0, 5): 0}
    for (x, s), y in cases.items():
        assert ref_round_shift(x, s) == y, (x, s)


# -- round_shift ---------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [1, 2, 3, 7, 16, 31, 32, 40, 61, 62])
def test_exact_ties(s):
    half = 1 << (s - 1)
    ks = [k for k in (0, 1, 2, 3, 1000, (1 << max(0, 61 - s)) - 1) if (k << s) + half <= INT64_SAFE]
    assert len(ks) >= 2
    for k in ks:
        for sign in (1, -1):
            x = sign * ((k << s) + half)  # exactly k + 0.5 (times sign)
            want = sign * (k + 1)
            assert ref_round_shift(x, s) == want
            assert rs(x, s) == want, f"x={x} s={s}"
            # One below / above a tie rounds towards the nearer integer.
            for d in (-1, 1):
                assert rs(x + d, s) == ref_round_shift(x + d, s), f"x={x + d} s={s}"


@pytest.mark.parametrize("x", [0, 1, -1, 2, -2, 12345, -12345, INT64_SAFE, -INT64_SAFE,
                               (1 << 31) - 1, -(1 << 31), (1 << 47) - 1, -(1 << 47)])
def test_shift_zero_and_one(x):
    assert rs(x, 0) == x
    assert rs(x, 1) == ref_round_shift(x, 1), f"x={x}"


@pytest.mark.parametrize("s", list(range(0, MAX_SHIFT + 1)))
def test_extremes_every_shift(s):
    for x in (INT64_SAFE, -INT64_SAFE, (1 << 31) - 1, -(1 << 31), (1 << 60) + 3, -(1 << 60) - 3, 1, -1, 0):
        assert rs(x, s) == ref_round_shift(x, s), f"x={x} s={s}"


def test_round_shift_vectorised_broadcast():
    rng = np.random.default_rng(7)
    x = rng.integers(-(1 << 40), 1 << 40, (50, 3))
    s = rng.integers(0, 45, 3)
    got = round_shift(x, s)
    assert got.dtype == np.int64
    for i in range(50):
        for j in range(3):
            assert got[i, j] == ref_round_shift(int(x[i, j]), int(s[j])), f"seed 7 x={x[i, j]} s={s[j]}"


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(st.integers(-INT64_SAFE, INT64_SAFE), st.integers(0, MAX_SHIFT))
def test_round_shift_property(x, s):
    assert rs(x, s) == ref_round_shift(x, s)


# -- requantize ------------------------------------------------------------------------------------

def _acc_extremes(width):
    return [-(1 << (width - 1)), (1 << (width - 1)) - 1, -1, 0, 1]


@pytest.mark.parametrize("cfg", [
    AccelConfig(w_bits=2, a_bits=2, acc_bits=5, mult_bits=32),  # narrowest accumulator
    AccelConfig(acc_bits=32, mult_bits=28),  # INT32 accumulator
    AccelConfig(),  # derived width (28 bits)
    AccelConfig(acc_bits=48, mult_bits=12),  # widest accumulator
], ids=lambda c: f"acc{c.acc_width}_mult{c.mult_bits}")
def test_requantize_extremes(cfg):
    assert cfg.acc_width + cfg.mult_bits <= 60
    aw, mb = cfg.acc_width, cfg.mult_bits
    mults = [0, 1, (1 << mb) - 1, 1 << (mb - 1)]
    shifts = [0, 1, mb - 1, mb, aw + mb, (1 << cfg.shift_bits) - 1]
    for bits in (2, 8):
        for signed in (False, True):
            lo, hi = act_range(bits, signed)
            zp = 0 if not signed else -1
            for acc in _acc_extremes(aw):
                for bias in _acc_extremes(aw):
                    for mult in mults:
                        for shift in shifts:
                            for res, rm in ((0, 0), (lo, (1 << mb) - 1), (hi, (1 << mb) - 1)):
                                want = ref_requant(acc, bias, mult, shift, zp, lo, hi, res, rm)
                                got = int(requantize(acc, bias, mult, shift, zp, lo, hi, res, rm))
                                assert got == want, (acc, bias, mult, shift, zp, lo, hi, res, rm)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_requantize_every_output_width(bits, signed, with_residual):
    seed = bits * 4 + 2 * signed + with_residual
    rng = np.random.default_rng(seed)
    lo, hi = act_range(bits, signed)
    n = 400
    acc = rng.integers(-(1 << 20), 1 << 20, n)
    bias = rng.integers(-(1 << 10), 1 << 10, n)
    mult = rng.integers(1 << 14, 1 << 16, n)
    shift = rng.integers(20, 40, n)
    zp = int(rng.integers(lo, hi + 1)) if not signed else 0
    res = rng.integers(lo, hi + 1, n) if with_residual else None
    rm = rng.integers(0, 1 << 24, n) if with_residual else None
    got = requantize(acc, bias, mult, shift, zp, lo, hi, res, rm)
    assert got.min() >= lo and got.max() <= hi, f"seed {seed}"
    clamped = 0
    for i in range(n):
        r = 0 if res is None else int(res[i])
        m = 0 if rm is None else int(rm[i])
        want = ref_requant(int(acc[i]), int(bias[i]), int(mult[i]), int(shift[i]), zp, lo, hi, r, m)
        assert got[i] == want, f"seed {seed} i={i}"
        clamped += want in (lo, hi)
    assert clamped < n, f"seed {seed}: every output clamped, the test exercises nothing"


def _fixed_point(M, mult_bits):
    """mult = round(M * 2**shift) with the largest shift that keeps mult within mult_bits."""
    M = Fraction(M)
    shift = 0
    while round(M * (1 << (shift + 1))) < (1 << mult_bits) and shift + 1 <= MAX_SHIFT:
        shift += 1
    mult = round(M * (1 << shift))
    assert 0 < mult < (1 << mult_bits)
    return mult, shift


@pytest.mark.parametrize("M", ["0.000731", "0.0213", "0.49999", "0.5", "0.75", "0.999", "1",
                               "1.5", "3.25", "7.9", "100.3"])
@pytest.mark.parametrize("mult_bits", [8, 16, 24, 32])
def test_real_multiplier(M, mult_bits):
    """M < 1 and M > 1 (METHODS.md's negative and positive exponents) as mult / 2**shift."""
    M = Fraction(M)
    mult, shift = _fixed_point(M, mult_bits)
    Mq = Fraction(mult, 1 << shift)
    assert abs(Mq - M) <= Fraction(1, 1 << (shift + 1))
    seed = zlib.crc32(f"{M}/{mult_bits}".encode())
    rng = np.random.default_rng(seed)
    acc = np.concatenate([rng.integers(-(1 << 20), 1 << 20, 200), [0, 1, -1, (1 << 20) - 1, -(1 << 20)]])
    big = 1 << 40
    got = requantize(acc, 0, mult, shift, 0, -big, big)
    for a, g in zip(acc.tolist(), got.tolist()):
        assert g == ref_round(a * Mq), f"M={M} mult_bits={mult_bits} acc={a}"
        # And the result is within half an LSB plus the multiplier's quantization error of a*M.
        assert abs(g - a * M) <= Fraction(1, 2) + abs(a) * abs(Mq - M), f"M={M} acc={a}"


def _cfg_params():
    """Random (acc_width, mult_bits) pairs that a valid config allows (acc + mult <= 60)."""
    return st.integers(5, 48).flatmap(
        lambda aw: st.tuples(st.just(aw), st.integers(8, min(32, 60 - aw))))


@settings(max_examples=400, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(_cfg_params(), st.data())
def test_requantize_property(widths, data):
    aw, mb = widths
    bits = data.draw(st.integers(2, 8))
    signed = data.draw(st.booleans())
    lo_a, hi_a = act_range(bits, signed)
    acc = data.draw(st.integers(-(1 << (aw - 1)), (1 << (aw - 1)) - 1))
    bias = data.draw(st.integers(-(1 << (aw - 1)), (1 << (aw - 1)) - 1))
    mult = data.draw(st.integers(0, (1 << mb) - 1))
    res_mult = data.draw(st.integers(0, (1 << mb) - 1))
    shift = data.draw(st.integers(0, MAX_SHIFT))
    res = data.draw(st.integers(lo_a, hi_a))
    zp = data.draw(st.integers(-(1 << bits), (1 << bits) - 1))
    lo = data.draw(st.integers(lo_a, hi_a))
    hi = data.draw(st.integers(lo, hi_a))
    use_res = data.draw(st.booleans())
    want = ref_requant(acc, bias, mult, shift, zp, lo, hi, res if use_res else 0, res_mult if use_res else 0)
    got = requantize(acc, bias, mult, shift, zp, lo, hi, res if use_res else None, res_mult if use_res else None)
    assert int(got) == want
