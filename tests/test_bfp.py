"""DSConv block-floating-point activations (``bfp_exp_bits``): config, ISA, program image, the
golden model's rules against a plain-Python reference of the spec, timing, and (``rtl``) random
BFP programs on the generated Verilog under Verilator against the golden model.

The reference here is written from the spec with Python integers, independently of
``sim/golden.py``'s NumPy code.
"""

import dataclasses
import json

import numpy as np
import pytest

from hw import isa, timing
from hw.config import AccelConfig, ConfigError
from hw.isa import HostMem, IsaError, Opcode
from hw.program import Program, ProgramError, pack_rows
from sim.golden import GoldenError, Machine, clamp, requantize

from tests import helpers

_SMALL = dict(spad_depth=64, acc_depth=32, wmem_depth=64, imem_depth=64, param_depth=8)
#: W4A4, 4x4, emax 3.
CFG = AccelConfig(rows=4, cols=4, w_bits=4, a_bits=4, block_scale=True, bfp_exp_bits=2, **_SMALL)
#: emax 7 (the widest exponent).
CFG3 = AccelConfig(rows=3, cols=2, w_bits=6, a_bits=5, block_scale=True, bfp_exp_bits=3, **_SMALL)


# -- plain-Python reference of the spec ---------------------------------------------------------------

def ref_round_shift(x: int, s: int) -> int:
    if s == 0:
        return x
    return (x + (1 << (s - 1)) - (1 if x < 0 else 0)) >> s


def ref_wrap(x: int, bits: int) -> int:
    x &= (1 << bits) - 1
    return x - (1 << bits) if x >> (bits - 1) else x


def ref_rescale(cfg, s: int, mult: int, shift: int, e: int) -> int:
    s = ref_wrap(s, cfg.acc_width)
    v = ref_round_shift(s * mult, shift - e) if e <= shift else (s * mult) << (e - shift)
    return ref_wrap(v, cfg.acc_width)


def ref_bfp_row(cfg, ys: list[int], lo: int, hi: int) -> tuple[list[int], int]:
    t = [y if y >= 0 else ((-y - 1) if lo < 0 else 0) for y in ys]
    e = min(cfg.bfp_emax, max(0, max(t).bit_length() - hi.bit_length()))
    return [min(max(ref_round_shift(y, e), lo), hi) for y in ys], e


# -- config, ISA, program image ------------------------------------------------------------------------

def test_config_field():
    assert "bfp_exp_bits" not in AccelConfig(block_scale=True).to_dict()  # old hashes unchanged
    assert AccelConfig().bfp_emax == 0 and CFG.bfp_emax == 3 and CFG3.bfp_emax == 7
    assert "bfp2" in CFG.describe() and AccelConfig.from_json(CFG.to_json()) == CFG
    assert CFG.memory_bits()["spad_exp"] == CFG.spad_depth * 2
    assert "spad_exp" not in AccelConfig().memory_bits()
    with pytest.raises(ConfigError, match=r"^bfp_exp_bits = 1 needs block_scale") as ei:
        AccelConfig(bfp_exp_bits=1)
    assert ei.value.field == "bfp_exp_bits"
    for bad in (-1, 4, True, 1.0):
        with pytest.raises(ConfigError, match=r"^bfp_exp_bits must be an integer in 0\.\.3") as ei:
            AccelConfig(block_scale=True, bfp_exp_bits=bad)


def test_build_cli(tmp_path, capsys):
    from hw import build

    args = build._Parser()
    build.add_config_args(args)
    cfg = build.config_from_args(args.parse_args(["--block-scale", "--bfp-exp-bits", "2", "--pe", "2x2"]))
    assert cfg.bfp_exp_bits == 2 and cfg.block_scale
    assert build.main(["--pe", "2x2", "--bfp-exp-bits", "2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bfp_exp_bits = 2 needs block_scale" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
    out = tmp_path / "ok"
    assert build.main(["--pe", "2x2", "--bits", "4", "--block-scale", "--bfp-exp-bits", "3", "--spad-depth", "32",
                       "--acc-depth", "16", "--wmem-depth", "32", "--imem-depth", "32", "--out", str(out)]) == 0
    info = json.loads((out / "build.json").read_text())
    assert info["bfp_exp_bits"] == 3 and info["memory_bits"]["spad_exp"] == 32 * 3
    assert info["config"]["bfp_exp_bits"] == 3
    assert "spad_exp" in (out / "quarry_top.v").read_text()


def test_post_field_and_checks():
    base = AccelConfig(rows=4, cols=4, w_bits=4, a_bits=4, block_scale=True, **_SMALL)
    assert isa.args_layout(base, Opcode.POST)["bfp"].shape.width == 0
    lay = isa.args_layout(CFG, Opcode.POST)
    assert lay["bfp"].shape.width == 1
    names = [n for n, _ in lay]
    assert names[-2:] == ["bfp", "overlap"]  # overlap stays last
    ins = isa.post(acc_base=1, spad_base=2, n=3, param_addr=1, n_lanes=2, lo=-8, hi=7, bfp=True, overlap=True)
    assert isa.decode(CFG, ins.encode(CFG)) == ins
    with pytest.raises(IsaError, match=r"^POST\.bfp = 1 does not fit \(0\.\.0\).*bfp_exp_bits config"):
        ins.encode(base)
    for kw, field in ((dict(zp=1), "zp"), (dict(res_base=5), "res_en"), (dict(hi=0), "hi"), (dict(lo=-8, hi=-1), "hi")):
        args = dict(acc_base=0, spad_base=0, n=1, param_addr=0, n_lanes=1, lo=0, hi=7, bfp=True)
        bad = isa.post(**{**args, **kw})
        with pytest.raises(IsaError, match=rf"^POST\.{field} = .* with bfp = 1"):
            bad.check(CFG)
        with pytest.raises(ProgramError, match=rf"^instruction 0: POST\.{field} = "):
            Program(CFG, [bad, isa.halt()])
        m = Machine(CFG)  # the golden model refuses it too, naming the field
        with pytest.raises(IsaError, match=rf"POST\.{field} = "):
            m.execute(bad)
        isa.post(**{**args, **kw, "bfp": False}).check(CFG)  # fine without bfp


def test_spad_exp_image_and_host_mem():
    exps = np.array([[3], [0], [1], [2]])
    prog = Program(CFG, [isa.halt()], {"spad_exp": pack_rows(isa.spad_exp_row_layout(CFG), exps)})
    back = Program.from_bytes(prog.to_bytes())
    assert back.images == prog.images
    m = Machine(CFG)
    m.run(back)
    assert list(m.read_spad_exp(0, 5)) == [3, 0, 1, 2, 0]
    base = AccelConfig(rows=4, cols=4, w_bits=4, a_bits=4, block_scale=True, **_SMALL)
    with pytest.raises(ProgramError, match=r"^image spad_exp needs a bfp_exp_bits config"):
        Program(base, [isa.halt()], {"spad_exp": [0]})
    with pytest.raises(ProgramError, match=r"does not fit"):
        pack_rows(isa.spad_exp_row_layout(CFG), [[4]])
    assert HostMem.SPAD_EXP not in isa.host_depths(base) and HostMem.SPAD_EXP not in isa.host_mems(base)
    assert isa.host_depths(CFG)[HostMem.SPAD_EXP] == CFG.spad_depth
    assert isa.host_row_bits(CFG)[HostMem.SPAD_EXP] == 2
    # the exponent memory never widens the host port
    assert isa.host_data_bits(CFG) == max(v for k, v in isa.host_row_bits(CFG).items() if k is not HostMem.SPAD_EXP)


def test_write_spad_exponents():
    m = Machine(CFG)
    m.write_spad(3, [[1, 2], [3, 4], [5, 6]], exp=[1, 3, 0])
    assert list(m.read_spad_exp(2, 5)) == [0, 1, 3, 0, 0]
    m.write_spad(3, [[1, 2]], exp=2)
    m.write_spad(4, [[1, 2]])  # default exponent 0
    assert list(m.read_spad_exp(3, 2)) == [2, 0]
    for bad in (4, -1, [0, 5]):
        with pytest.raises(GoldenError, match=r"spad exponents outside 0\.\.3"):
            m.write_spad(0, [[1], [2]], exp=bad)
    with pytest.raises(GoldenError, match=r"outside 0\.\.0"):
        Machine(AccelConfig(rows=2, cols=2)).write_spad(0, [[1]], exp=1)


def test_post_latency_in_one_place():
    base = dataclasses.replace(CFG, bfp_exp_bits=0)
    assert timing.post_bfp_stages(base) == 0 and timing.post_bfp_stages(CFG) == 2
    assert timing.post_latency(CFG) == timing.post_latency(base) + 2
    post = isa.post(acc_base=0, spad_base=0, n=3, param_addr=0, n_lanes=1, lo=0, hi=7)
    for cfg in (base, CFG):
        model = timing.CycleModel(cfg)
        i, d = model.step(post)
        assert d - i == 3 + timing.post_latency(cfg)
    # A MATMUL may overlap the POST only once POST has written its last spad row (and exponent):
    # the hazard window grows with the latency.
    mm = dict(out_h=1, out_w=1, in_h=1, in_w=1, stride_h=1, stride_w=1, off_h=0, off_w=0,
              spad_base=0, acc_base=5)
    pa = post.args
    t_ok = 10 + 3 + timing.post_latency(CFG)
    assert timing.overlap_hazard(CFG, pa, 10, mm, t_ok) is None
    assert timing.overlap_hazard(CFG, pa, 10, mm, t_ok - 1) is not None
    assert timing.overlap_hazard(base, pa, 10, mm, t_ok - 2) is None


# -- MATMUL: the exponent in the block rescale ------------------------------------------------------

def _matmul_case(cfg, rng, exps, mult, shift, *, off_w=0, acc_bits=None):
    m = Machine(cfg)
    helpers.scramble(m, rng)
    n = len(exps)
    m.spad_exp[5:5 + n] = exps
    m.param["mult"][2] = mult
    m.param["shift"][2] = shift
    acc0 = m.acc.copy()
    a = dict(bank=0, accumulate=1, a_signed=1, spad_base=5, in_h=1, in_w=n, out_h=1, out_w=n,
             stride_h=1, stride_w=1, off_h=0, off_w=off_w, acc_base=3, pot=0, scale_addr=2)
    m.execute(isa.Instr(Opcode.MATMUL, a))
    want = np.zeros((n, cfg.cols), np.int64)
    half = 1 << (cfg.a_bits - 1)
    for j in range(n):
        col = j + off_w
        inside = 0 <= col < n
        x = [(int(v) - 2 * half if v >= half else int(v)) if inside else 0 for v in m.spad[5 + col if inside else 0]]
        e = int(exps[col]) if inside else 0
        for c in range(cfg.cols):
            s = sum(x[r] * int(m.banks[0][r, c]) for r in range(cfg.rows))
            v = ref_rescale(cfg, s, int(mult[c]), int(shift[c]), e)
            want[j, c] = ref_wrap(int(acc0[3 + j, c]) + v, cfg.acc_width)
    return m, want, acc0


@pytest.mark.parametrize("seed", range(4))
def test_matmul_exponents_both_branches(seed):
    """Random exponents against per-lane shifts 0..4: e < shift rounds, e == shift is exact,
    e > shift shifts left (negative sums included)."""
    rng = np.random.default_rng(seed)
    cfg = CFG3 if seed % 2 else CFG
    exps = rng.integers(0, cfg.bfp_emax + 1, 8)
    mult = rng.integers(1, 40, cfg.cols)
    shift = rng.integers(0, 5, cfg.cols)
    m, want, _ = _matmul_case(cfg, rng, exps, mult, shift)
    assert np.array_equal(m.acc[3:11], want)
    assert (exps[:, None] > shift[None, :]).any() and (exps[:, None] < shift[None, :]).any()


def test_matmul_left_shift_wraps_at_acc_width():
    cfg = dataclasses.replace(CFG3, acc_bits=14)  # product_bits 11 + 3: a left shift by 7 wraps
    rng = np.random.default_rng(7)
    exps = np.full(4, 7)
    m, want, _ = _matmul_case(cfg, rng, exps, np.array([255, 3]), np.array([0, 0]))
    assert np.array_equal(m.acc[3:7], want)
    assert np.abs(want).max() < (1 << 13)


def test_matmul_padding_has_exponent_zero():
    """A window position outside the input reads the zero vector with exponent 0, whatever
    spad_exp holds at the row its address would wrap to."""
    rng = np.random.default_rng(3)
    exps = np.array([3, 3, 3, 3])
    m, want, _ = _matmul_case(CFG, rng, exps, np.array([5, 7, 9, 11]), np.array([1, 0, 2, 4]), off_w=-1)
    assert np.array_equal(m.acc[3:7], want)


# -- POST: exponent selection ---------------------------------------------------------------------------

def _post_rows(cfg, ys, lo, hi, *, src=0, dst=0, bfp=1, zp=0):
    """Run one POST whose lanes requantize to exactly ``ys`` (bias 0, mult 1, shift 0)."""
    ys = np.asarray(ys, np.int64)
    n, nl = ys.shape
    m = Machine(cfg)
    m.spad[:] = 0b0101 & ((1 << cfg.a_bits) - 1)
    m.spad_exp[:] = 1
    m.acc[0:n, src:src + nl] = ys
    m.param["mult"][0] = 1
    m.execute(isa.post(acc_base=0, spad_base=10, n=n, param_addr=0, src_lane=src, dst_lane=dst,
                       n_lanes=nl, lo=lo, hi=hi, zp=zp, bfp=bool(bfp)))
    return m


@pytest.mark.parametrize("lo,hi,ys,exp_e", [
    (0, 15, [[3, 15, 0]], 0),                    # fits: e == 0
    (0, 15, [[16, 31, 2]], 1),                   # bitlen 5 - bitlen(15) 4
    (0, 15, [[100, 5, 0]], 3),                   # bitlen 7 - 4 = 3 = emax
    (0, 15, [[1000, 5, 0]], 3),                  # saturates at emax 3, mantissa clamps to hi
    (-8, 7, [[-8, 7, 0]], 0),                    # one's complement: -8 -> 7, fits 3 bits
    (-8, 7, [[-9, 3, 0]], 1),                    # -9 -> 8: bitlen 4 - 3
    (-8, 7, [[-1000, 3, 0]], 3),                 # negative saturation: clamps to lo
    (0, 7, [[-1000, 9, 0]], 1),                  # lo >= 0: negatives count 0
    (0, 7, [[-1000, -3, 0]], 0),
    (2, 5, [[0, 1, 12]], 1),                     # hi 5 (bitlen 3), lo > 0 clamps the small lane
    (-8, 1, [[-3, 2, 0]], 1),                    # hi 1: bitlen 1
])
def test_post_exponent_selection(lo, hi, ys, exp_e):
    m = _post_rows(CFG, ys, lo, hi)
    mant, e = ref_bfp_row(CFG, ys[0], lo, hi)
    assert e == exp_e
    assert m.read_spad_exp(10, 1)[0] == e
    got = m.read_spad(10, 1, signed=lo < 0)[0, :3]
    assert list(got) == mant


def test_post_bfp_lanes_and_neighbours():
    """Only the POST's lanes count towards the exponent and are written; the other lanes keep
    their raw value; the row's exponent is overwritten; rounding is ties away from zero."""
    ys = [[6, -6, 1], [5, -5, 200], [-7, 0, 0]]
    m = _post_rows(CFG, ys, -8, 3, src=1, dst=0)
    for r, row in enumerate(ys):
        mant, e = ref_bfp_row(CFG, row, -8, 3)
        assert m.read_spad_exp(10 + r, 1)[0] == e
        assert list(m.read_spad(10 + r, 1, signed=True)[0, :3]) == mant
        assert m.spad[10 + r, 3] == 0b0101  # not one of the POST's lanes
    assert m.read_spad_exp(9, 1)[0] == 1 and m.read_spad_exp(13, 1)[0] == 1


@pytest.mark.parametrize("seed", range(6))
def test_post_bfp_random_against_reference(seed):
    """Random acc/bias/mult/shift rows (the full requantization, not just pass-through)."""
    rng = np.random.default_rng(100 + seed)
    cfg = CFG3 if seed % 2 else CFG
    m = Machine(cfg)
    helpers.scramble(m, rng)
    m.param["shift"][:] = rng.integers(0, 12, m.param["shift"].shape)
    m.param["mult"][:] = rng.integers(0, 1 << 12, m.param["mult"].shape)
    A = cfg.a_bits
    lo = int(rng.integers(-(1 << A - 1), 1 << A - 1))
    hi = int(rng.integers(max(lo, 1), 1 << A - 1))
    sl, nl = int(rng.integers(0, cfg.cols)), 0
    nl = int(rng.integers(1, min(cfg.cols - sl, cfg.rows) + 1))
    dl = int(rng.integers(0, cfg.rows - nl + 1))
    before = m.spad.copy()
    m.execute(isa.post(acc_base=2, spad_base=20, n=6, param_addr=3, src_lane=sl, dst_lane=dl, n_lanes=nl,
                       lo=lo, hi=hi, bfp=True))
    for r in range(6):
        ys = [ref_round_shift((int(m.acc[2 + r, c]) + int(m.param["bias"][3, c])) * int(m.param["mult"][3, c]),
                              int(m.param["shift"][3, c])) for c in range(sl, sl + nl)]
        mant, e = ref_bfp_row(cfg, ys, lo, hi)
        assert m.spad_exp[20 + r] == e
        assert list(m.read_spad(20 + r, 1, signed=lo < 0)[0, dl:dl + nl]) == mant
        keep = [i for i in range(cfg.rows) if not dl <= i < dl + nl]
        assert np.array_equal(m.spad[20 + r, keep], before[20 + r, keep])


def test_non_bfp_post_and_pool_write_exponent_zero():
    m = _post_rows(CFG, [[3, 2, 1], [-5, 6, 0]], -8, 7, bfp=0, zp=1)
    assert list(m.read_spad_exp(9, 4)) == [1, 0, 0, 1]
    assert list(m.read_spad(10, 2, signed=True)[:, :3].ravel()) == [4, 3, 2, -4, 7, 1]  # zp 1, clamp 7
    m.spad_exp[:] = 2
    m.write_spad(0, [[1, 2, 3, 4]] * 4, exp=3)
    m.execute(isa.pool(mode=isa.PoolMode.MAX, src_base=0, dst_base=30, in_h=2, in_w=2, out_h=1, out_w=2,
                       k_h=2, k_w=1))
    assert list(m.read_spad_exp(29, 4)) == [2, 0, 0, 2]
    assert list(m.read_spad(30, 2)[0]) == [1, 2, 3, 4]  # raw lanes, exponents ignored


def test_residual_post_ignores_exponents():
    m = Machine(CFG)
    m.acc[0, :] = [4, 4, 4, 4]
    m.param["mult"][0] = 1
    m.param["res_mult"][0] = 1
    m.write_spad(5, [[1, 2, 3, 4]], exp=3)
    m.execute(isa.post(acc_base=0, spad_base=10, n=1, param_addr=0, n_lanes=4, lo=-8, hi=7, res_base=5,
                       res_signed=True))
    assert list(m.read_spad(10, 1, signed=True)[0]) == [5, 6, 7, 7]
    assert m.read_spad_exp(10, 1)[0] == 0


def test_random_bfp_cases_run_on_golden():
    """tests.helpers.with_bfp turns random cases into BFP ones the golden model accepts."""
    rng = np.random.default_rng(11)
    seen_bfp = 0
    for kind in ("conv", "gemm", "pool", "residual") * 3:
        case = helpers.with_bfp(rng, getattr(helpers, f"random_{kind}_case")(rng, CFG))
        seen_bfp += sum(1 for i in case.program.instrs if i.op is Opcode.POST and i.args["bfp"])
        m = Machine(CFG)
        for addr, rows in case.spad_writes:  # host writes: raw lanes, exponents from the image
            m.spad[addr:addr + len(rows)] = rows
        m.run(case.program)
    assert seen_bfp > 0


# -- RTL (Verilator) against the golden model ---------------------------------------------------------

#: Overlapping MATMUL/POST, emax 3; the RTL test's config (one Verilator build).
RTL_CFG = AccelConfig(rows=4, cols=4, w_bits=4, a_bits=4, block_scale=True, bfp_exp_bits=2,
                      spad_depth=256, acc_depth=40, wmem_depth=256, imem_depth=512, param_depth=64)
RTL_KINDS = ("conv", "gemm", "pool", "residual", "chain")


def random_chain_case(rng, cfg) -> helpers.Case:
    """Two 3x3 convolutions (padding 1), the second reading the first's output: with
    :func:`tests.helpers.with_bfp` the second's MATMULs read exponents that the first's BFP POSTs
    wrote (through the overlap rules when they overlap). Block shifts are often below emax, so the
    rescale's left shift is common."""

    H, W = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    c0, c1, c2 = (int(rng.integers(1, 2 * cfg.rows + 1)) for _ in range(3))
    b = helpers.Builder(cfg, spad_next=int(rng.integers(0, 8)))
    s0, s1, s2 = (bool(rng.integers(0, 2)) for _ in range(3))
    x, y1, y2 = b.tensor(c0, H, W, s0), b.tensor(c1, H, W, s1), b.tensor(c2, H, W, s2)
    xv = helpers.rand_acts(rng, cfg, (c0, H, W), s0)
    for ci, co, src, dst in ((c0, c1, x, y1), (c1, c2, y1, y2)):
        w = helpers.rand_weights(rng, cfg, (co, ci, 3, 3), mode="int")
        rq = helpers.random_requant(rng, cfg, co, ci * 9, out_signed=dst.signed)
        mult, shift = helpers.random_block_scale(rng, cfg, (co, src.blocks(cfg), 3, 3))
        small = rng.random(shift.shape) < 0.5
        shift = np.where(small, rng.integers(0, cfg.bfp_emax + 2, shift.shape), shift)
        mult = np.where(small, rng.integers(0, 1 << 4, shift.shape), mult)
        b.conv2d(src, dst, w, rq, padding=(1, 1), block_scale=(mult, shift))
    prog = b.program({"case": "chain"})
    writes = helpers.tensor_rows(cfg, x, xv) + helpers.zero_rows(cfg, y1) + helpers.zero_rows(cfg, y2)
    return helpers.Case(prog, writes, [(y1.base, y1.rows(cfg)), (y2.base, y2.rows(cfg))])


def bfp_job(case):
    cfg = case.program.config
    return helpers.rtl_job(case, [(HostMem.SPAD, 0, cfg.spad_depth), (HostMem.SPAD_EXP, 0, cfg.spad_depth),
                                  (HostMem.ACC, 0, cfg.acc_depth)])


def random_bfp_cases(cfg, seed, n):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        kind = RTL_KINDS[i % len(RTL_KINDS)]
        make = random_chain_case if kind == "chain" else getattr(helpers, f"random_{kind}_case")
        cases.append((kind, helpers.with_bfp(rng, make(rng, cfg), p_post=0.6)))
    return cases


def test_chain_case_uses_bfp_exponents():
    """The chain cases really hand exponents from a BFP POST to a MATMUL (golden only)."""
    rng = np.random.default_rng(5)
    hit = 0
    for _ in range(6):
        case = helpers.with_bfp(rng, random_chain_case(rng, RTL_CFG), p_post=1.0)
        m = Machine(RTL_CFG)
        for addr, rows in case.spad_writes:
            m.spad[addr:addr + len(rows)] = rows
        m.load_images(case.program)
        m.run(case.program)
        (a1, n1), _ = case.outputs
        hit += int(m.spad_exp[a1:a1 + n1].any())
    assert hit >= 3


@pytest.mark.rtl
def test_rtl_random_bfp_programs():
    """Random BFP programs (random spad exponents under every row, 60 % of the non-residual POSTs
    BFP, two-layer chains) on the Verilog under Verilator: every spad lane, every spad exponent,
    every accumulator and the cycle counter equal the golden model's."""
    from sim.rtlrun import compare
    from sim.verilator import build

    rtl = build(RTL_CFG)
    cases = random_bfp_cases(RTL_CFG, 5000, 50)
    n_bfp = sum(1 for _, c in cases for i in c.program.instrs if i.op is Opcode.POST and i.args["bfp"])
    assert n_bfp >= 30
    report = compare(RTL_CFG, [bfp_job(c) for _, c in cases], rtl)
    details = "; ".join(f"job {m.job} ({cases[m.job][0]}): {m}" for m in report[:5])
    assert not report, f"{len(report)} mismatches: {details}"
    assert all(f.rtl == f.predicted for f in report.cycles)


def with_lo_above_hi(rng, case: helpers.Case) -> helpers.Case:
    """``case`` with every other POST (the first, third...) clamping to ``lo > hi`` (BFP POSTs keep
    ``hi >= 1``)."""
    cfg = case.program.config
    top = (1 << cfg.a_bits) - 1
    instrs, posts = [], 0
    for ins in case.program.instrs:
        posts += ins.op is Opcode.POST
        if ins.op is Opcode.POST and posts % 2:
            hi = int(rng.integers(1 if ins.args["bfp"] else -top, top))
            ins = isa.Instr(Opcode.POST, {**ins.args, "hi": hi, "lo": int(rng.integers(hi + 1, top + 1))})
        instrs.append(ins)
    return case._replace(program=Program(cfg, instrs, case.program.images, case.program.manifest))


def test_clamp_tests_lo_first():
    """POST's clamp with ``lo > hi``: below ``lo`` gives ``lo``, everything else ``hi`` (the
    hardware's order; ``np.clip`` would give ``hi`` everywhere)."""
    y = np.arange(-4, 5)
    assert list(clamp(y, 2, -1)) == [2] * 6 + [-1] * 3
    assert list(clamp(y, -1, 2)) == list(np.clip(y, -1, 2))
    assert list(requantize(y, 0, 1, 0, 0, 2, -1)) == [2] * 6 + [-1] * 3


@pytest.mark.rtl
def test_rtl_post_with_lo_above_hi():
    """POSTs whose clamp has ``lo > hi`` (plain and BFP) on the Verilog under Verilator equal the
    golden model: the ISA defines that case, it is not left to the implementation."""
    from sim.rtlrun import compare
    from sim.verilator import build

    rng = np.random.default_rng(77)
    cases = [with_lo_above_hi(rng, c) for _, c in random_bfp_cases(RTL_CFG, 7700, 16)]
    assert sum(1 for c in cases for i in c.program.instrs if i.op is Opcode.POST and i.args["lo"] > i.args["hi"]) >= 10
    report = compare(RTL_CFG, [bfp_job(c) for c in cases], build(RTL_CFG))
    assert not report, f"{len(report)} mismatches: {report.summary(5)}"


@pytest.mark.rtl
def test_rtl_host_spad_write_clears_exponents():
    """On the RTL as in the golden model, a host SPAD write sets the row's exponent to 0: the
    exponents a BFP program leaves do not survive the next input written over those rows, and
    rows not written keep theirs (``isolate=False``: nothing restores the rows between jobs)."""
    from sim.rtlrun import golden_job
    from sim.verilator import Job, build

    rng = np.random.default_rng(11)
    case = helpers.with_bfp(rng, random_chain_case(rng, RTL_CFG), p_post=1.0)
    (base, n), _ = case.outputs
    depth = RTL_CFG.spad_depth
    first = Job(case.program, helpers.host_writes(case), [(HostMem.SPAD_EXP, 0, depth)])
    second = Job(None, [(HostMem.SPAD, base, np.zeros((n, RTL_CFG.rows), np.int64))],
                 [(HostMem.SPAD_EXP, 0, depth)])
    r1, r2 = build(RTL_CFG).run([first, second], isolate=False)
    _, (expected,) = golden_job(RTL_CFG, first)
    assert np.array_equal(r1.reads[0], expected)
    assert r1.reads[0][base:base + n].any(), "the program left no exponent to clear"
    assert not r2.reads[0][base:base + n].any()
    keep = np.r_[0:base, base + n:depth]
    assert np.array_equal(r2.reads[0][keep], r1.reads[0][keep])
