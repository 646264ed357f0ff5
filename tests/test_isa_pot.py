"""The power-of-two weight format (``hw.isa.pot_*``) and the MATMUL ``pot`` / ``pe_kind`` rule.

The reference here is the format's definition, applied one code at a time: bit ``w_bits - 1``
is the sign, the bits below it the magnitude code k; k == 0 is 0, k >= 1 is +-2**(k-1).
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hw import isa
from hw.config import POT_EXP_CAP, PE_KINDS, AccelConfig, ConfigError
from hw.isa import IsaError, PotError
from hw.program import pack_rows, unpack_rows

SETTINGS = settings(max_examples=200, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
W_BITS = range(2, 9)


def _cfg(w_bits, pe_kind="pot"):
    return AccelConfig(rows=2, cols=2, w_bits=w_bits, a_bits=8, pe_kind=pe_kind)


def spec_value(pattern, w_bits):
    """Weight of an unsigned code pattern, straight from the format's definition (None: illegal)."""
    sign, k = pattern >> (w_bits - 1), pattern & ((1 << (w_bits - 1)) - 1)
    if k == 0:
        return 0
    if k - 1 > min((1 << (w_bits - 1)) - 2, POT_EXP_CAP):
        return None
    return -(1 << (k - 1)) if sign else 1 << (k - 1)


@pytest.mark.parametrize("w_bits", W_BITS)
def test_max_exponent(w_bits):
    cfg = _cfg(w_bits)
    assert cfg.pot_max_exp == min(2 ** (w_bits - 1) - 2, POT_EXP_CAP)
    assert isa.pot_values(cfg).tolist() == sorted(
        [0] + [s * (1 << e) for e in range(cfg.pot_max_exp + 1) for s in (1, -1)])


@pytest.mark.parametrize("w_bits", W_BITS)
def test_decode_every_pattern(w_bits):
    """All 2**w_bits patterns, as unsigned patterns and as the signed lane values wmem holds."""
    cfg = _cfg(w_bits)
    for pattern in range(1 << w_bits):
        lane = pattern - (1 << w_bits) if pattern >> (w_bits - 1) else pattern
        want = spec_value(pattern, w_bits)
        for code in (pattern, lane):
            if want is None:
                with pytest.raises(PotError, match=rf"^PoT code {pattern:#x} has exponent \d+ > pot_max_exp "):
                    isa.pot_decode(code, cfg)
            else:
                got = isa.pot_decode(code, cfg)
                assert got == want and isinstance(got, int), (w_bits, pattern, code)


@pytest.mark.parametrize("w_bits", W_BITS)
def test_encode_every_value(w_bits):
    """Each legal value's code has the sign in the MSB and k = exponent + 1 below it; zero is +0."""
    cfg = _cfg(w_bits)
    lay = isa.wmem_row_layout(cfg)
    lo, hi = -(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1
    for v in isa.pot_values(cfg).tolist():
        code = isa.pot_encode(v, cfg)
        assert isinstance(code, int) and lo <= code <= hi  # a wmem lane value (signed w_bits)
        assert lay.elem_shape.signed and lay.elem_shape.width == w_bits
        pattern = code & ((1 << w_bits) - 1)
        assert pattern >> (w_bits - 1) == (v < 0)
        assert pattern & ((1 << (w_bits - 1)) - 1) == (0 if v == 0 else abs(v).bit_length())
        assert spec_value(pattern, w_bits) == v


@pytest.mark.parametrize("w_bits", W_BITS)
def test_round_trips(w_bits):
    cfg = _cfg(w_bits)
    values = isa.pot_values(cfg)

    @SETTINGS
    @given(st.lists(st.sampled_from(values.tolist()), max_size=40))
    def prop(vals):
        v = np.array(vals, np.int64)
        rows = v[:len(v) // cfg.cols * cfg.cols].reshape(-1, cfg.cols)
        for arr in (v, rows):
            codes = isa.pot_encode(arr, cfg)
            assert codes.shape == arr.shape and codes.dtype == np.int64
            assert np.array_equal(isa.pot_decode(codes, cfg), arr)
        # Codes pack into wmem rows and come back unchanged.
        codes = isa.pot_encode(rows, cfg)
        lay = isa.wmem_row_layout(cfg)
        assert np.array_equal(unpack_rows(lay, pack_rows(lay, codes)).reshape(codes.shape), codes)

    prop()

    @SETTINGS
    @given(st.integers(0, (1 << w_bits) - 1))
    def legal_codes(pattern):
        if spec_value(pattern, w_bits) is None:
            return
        v = isa.pot_decode(pattern, cfg)
        back = isa.pot_encode(v, cfg) & ((1 << w_bits) - 1)
        # Every legal pattern survives, except "-0", which encodes as +0.
        assert back == (0 if v == 0 else pattern)

    legal_codes()


@pytest.mark.parametrize("w_bits", W_BITS)
def test_encode_rejects_non_pot_values(w_bits):
    cfg = _cfg(w_bits)
    top = 1 << cfg.pot_max_exp
    bad = [3, -3, 5, 6, -12, 2 * top, -2 * top, top + 1, 1 << 40]
    for v in bad:
        msg = rf"^{v} is not a PoT weight of w_bits {w_bits} \(0 or \+-2\*\*e, 0 <= e <= {cfg.pot_max_exp}\)$"
        with pytest.raises(PotError, match=msg):
            isa.pot_encode(v, cfg)
        with pytest.raises(PotError, match=msg):
            isa.pot_encode(np.array([[0, 1], [v, 2]]), cfg)  # the first bad element is named
    with pytest.raises(PotError, match=r"^PoT weights must be integers, not float64 values$"):
        isa.pot_encode(np.array([1.0, 0.5]), cfg)
    assert isa.pot_encode(np.array([1.0, -1.0]), cfg).tolist() == isa.pot_encode([1, -1], cfg).tolist()


@pytest.mark.parametrize("w_bits", W_BITS)
def test_decode_rejects_out_of_range(w_bits):
    cfg = _cfg(w_bits)
    for c in (-(1 << (w_bits - 1)) - 1, 1 << w_bits):
        with pytest.raises(PotError, match=rf"^PoT code {c} does not fit w_bits {w_bits} "):
            isa.pot_decode(c, cfg)
    with pytest.raises(PotError, match=r"^PoT codes must be integers"):
        isa.pot_decode(np.array([1.5]), cfg)


def test_pot_error_is_an_isa_error():
    assert issubclass(PotError, IsaError) and issubclass(PotError, ValueError)


# -- accumulator width ------------------------------------------------------------------------

@pytest.mark.parametrize("pe_kind", PE_KINDS)
@pytest.mark.parametrize("w_bits", W_BITS)
@pytest.mark.parametrize("a_bits,depth", [(2, 2), (8, 4096), (5, 1000), (8, 1 << 16)])
def test_acc_width_holds_every_reduction(pe_kind, w_bits, a_bits, depth):
    """``wmem_depth`` products of the largest weight magnitude (of every mode the PE kind runs)
    and the most extreme activation fit the signed accumulator."""
    cfg = AccelConfig(w_bits=w_bits, a_bits=a_bits, wmem_depth=depth, pe_kind=pe_kind, mult_bits=8)
    w_lo = []
    if pe_kind != "pot":
        w_lo.append(-(1 << (w_bits - 1)))
    if pe_kind != "int":
        w_lo.append(-(1 << cfg.pot_max_exp))
    worst = max(depth * abs(w) * ((1 << a_bits) - 1) for w in w_lo)  # |most negative sum|
    assert worst <= 1 << (cfg.acc_width - 1)
    assert cfg.acc_width == cfg.product_bits + max(1, (depth - 1).bit_length())
    # And not much wider: one bit less would not hold the largest single product times depth.
    assert worst > 1 << (cfg.acc_width - 3)


def test_pot_acc_bits_lower_bound():
    cfg = AccelConfig(w_bits=4, a_bits=8, pe_kind="pot")
    assert cfg.product_bits == 8 + 1 + 6
    AccelConfig(w_bits=4, a_bits=8, pe_kind="pot", acc_bits=16)
    with pytest.raises(ConfigError, match=r"^acc_bits must be an integer in 16\.\.48, not 15$"):
        AccelConfig(w_bits=4, a_bits=8, pe_kind="pot", acc_bits=15)


# -- MATMUL.pot and pe_kind -------------------------------------------------------------------

@pytest.mark.parametrize("pe_kind", PE_KINDS)
@pytest.mark.parametrize("pot", [0, 1])
def test_matmul_pot_rule(pe_kind, pot):
    cfg = AccelConfig(rows=2, cols=2, w_bits=4, a_bits=4, pe_kind=pe_kind)
    ins = isa.matmul(bank=0, spad_base=0, acc_base=0, in_w=2, out_w=2, pot=bool(pot))
    assert ins.pot == pot
    legal = {"int": pot == 0, "pot": pot == 1, "hybrid": True}[pe_kind]
    if legal:
        isa.check_pot_mode(cfg, pot)
        assert isa.decode(cfg, ins.encode(cfg)) == ins
    else:
        msg = rf"^MATMUL\.pot = {pot} is not allowed for pe_kind {pe_kind} \(allowed: {1 - pot}\)$"
        with pytest.raises(IsaError, match=msg):
            isa.check_pot_mode(cfg, pot)
        with pytest.raises(IsaError, match=msg):
            ins.encode(cfg)


def test_matmul_builder_default_is_int():
    assert isa.matmul(bank=0, spad_base=0, acc_base=0, in_w=1, out_w=1).pot == 0


@pytest.mark.parametrize("cfg", [AccelConfig(pe_kind=k) for k in PE_KINDS] +
                         [AccelConfig(rows=32, cols=32, pe_kind="hybrid", spad_depth=1 << 20, acc_depth=1 << 16,
                                      wmem_depth=1 << 16, imem_depth=1 << 16, param_depth=1 << 12, dim_bits=12, mult_bits=16)],
                         ids=lambda c: c.describe())
def test_pot_field_keeps_instruction_width(cfg):
    """The new MATMUL field does not widen the instruction word: MATMUL stays narrower than POST."""
    widths = {op: isa.args_layout(cfg, op).size for op in isa.Opcode}
    assert widths[isa.Opcode.MATMUL] < max(widths.values())
    if cfg.rows == 16:
        assert isa.instr_bits(cfg) == 128
