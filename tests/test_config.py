"""AccelConfig: validation messages, derived widths, JSON round trip, hash, ``parse_pe``."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from hw.config import AccelConfig, ConfigError

MAX_DEPTH = 1 << 20


def _msg(name, lo, hi, v):
    return rf"^{name} must be an integer in {lo}\.\.{hi}, not {re.escape(repr(v))}$"


# (field, bad value, message regex); bounds are the documented ranges of each field.
BAD = [
    *[(f, v, _msg(f, 1, 32, v)) for f in ("rows", "cols") for v in (0, 33, -1, "4", True, 4.0, None)],
    *[(f, v, _msg(f, 2, 8, v)) for f in ("w_bits", "a_bits") for v in (1, 9, 0, "8", False)],
    ("pe_kind", "foo", r"^pe_kind must be one of int, pot, hybrid, not 'foo'$"),
    ("pe_kind", "INT", r"^pe_kind must be one of int, pot, hybrid, not 'INT'$"),
    *[(f, v, _msg(f, 2, MAX_DEPTH, v))
      for f in ("spad_depth", "acc_depth", "wmem_depth", "imem_depth", "param_depth")
      for v in (0, 1, MAX_DEPTH + 1, "64", True)],
    *[("mult_bits", v, _msg("mult_bits", 8, 32, v)) for v in (7, 33)],
    *[("shift_bits", v, _msg("shift_bits", 4, 6, v)) for v in (3, 7)],
    *[("pool_mult_bits", v, _msg("pool_mult_bits", 4, 16, v)) for v in (3, 17)],
    *[("dim_bits", v, _msg("dim_bits", 4, 12, v)) for v in (3, 13)],
    # acc_bits must hold at least one product plus a sign bit: w_bits + a_bits + 1 (17 for W8A8).
    *[("acc_bits", v, _msg("acc_bits", 17, 48, v)) for v in (16, 8, 49, "32", True)],
]


@pytest.mark.parametrize("field,value,pattern", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_field_value(field, value, pattern):
    with pytest.raises(ConfigError, match=pattern) as ei:
        AccelConfig(**{field: value})
    assert ei.value.field == field


@pytest.mark.parametrize("w,a", [(2, 2), (4, 8), (8, 3)])
def test_acc_bits_lower_bound_follows_operand_widths(w, a):
    lo = w + a + 1
    assert AccelConfig(w_bits=w, a_bits=a, acc_bits=lo).acc_width == lo
    with pytest.raises(ConfigError, match=_msg("acc_bits", lo, 48, lo - 1)) as ei:
        AccelConfig(w_bits=w, a_bits=a, acc_bits=lo - 1)
    assert ei.value.field == "acc_bits"


def test_acc_plus_mult_width_limit():
    # Explicit accumulator width.
    assert AccelConfig(acc_bits=36, mult_bits=24).acc_width == 36
    with pytest.raises(ConfigError, match=r"^acc width \(37\) \+ mult_bits \(24\) must be <= 60$") as ei:
        AccelConfig(acc_bits=37, mult_bits=24)
    assert ei.value.field == "mult_bits"
    # Derived accumulator width: W8A8 with a 2**20-row weight memory needs 36 bits.
    big = AccelConfig(wmem_depth=MAX_DEPTH, mult_bits=24)
    assert big.acc_width == 36
    with pytest.raises(ConfigError, match=r"^acc width \(36\) \+ mult_bits \(25\) must be <= 60$") as ei:
        AccelConfig(wmem_depth=MAX_DEPTH, mult_bits=25)
    assert ei.value.field == "mult_bits"


@pytest.mark.parametrize("field,lo,hi", [
    ("rows", 1, 32), ("cols", 1, 32), ("w_bits", 2, 8), ("a_bits", 2, 8), ("spad_depth", 2, MAX_DEPTH),
    ("acc_depth", 2, MAX_DEPTH), ("wmem_depth", 2, MAX_DEPTH), ("imem_depth", 2, MAX_DEPTH), ("param_depth", 2, MAX_DEPTH),
    ("mult_bits", 8, 32), ("shift_bits", 4, 6), ("pool_mult_bits", 4, 16), ("dim_bits", 4, 12),
])
def test_field_bounds_are_accepted(field, lo, hi):
    # mult_bits 32 needs a narrow accumulator to respect acc + mult <= 60.
    extra = {"acc_bits": 28} if field == "mult_bits" else {}
    for v in (lo, hi):
        assert getattr(AccelConfig(**{field: v}, **extra), field) == v


def test_pe_kinds_accepted():
    for k in ("int", "pot", "hybrid"):
        assert AccelConfig(pe_kind=k).pe_kind == k


# -- derived widths ---------------------------------------------------------------------------

def _ceil_log2(n):
    return max(1, (n - 1).bit_length())


@pytest.mark.parametrize("depth", [2, 3, 4, 5, 1000, 1024, 1025, 4096, MAX_DEPTH])
@pytest.mark.parametrize("w,a", [(2, 2), (8, 8), (3, 7)])
def test_acc_width_formula(depth, w, a):
    cfg = AccelConfig(w_bits=w, a_bits=a, wmem_depth=depth, mult_bits=8)
    assert cfg.acc_width == w + a + _ceil_log2(depth)
    # The docstring's reason: the largest reduction (wmem_depth terms of the most negative weight
    # times the largest unsigned or most negative signed activation) fits the signed accumulator.
    worst_neg = depth * -(1 << (w - 1)) * ((1 << a) - 1)
    worst_pos = depth * (1 << (w - 1)) * (1 << (a - 1))
    assert -(1 << (cfg.acc_width - 1)) <= worst_neg
    assert worst_pos <= (1 << (cfg.acc_width - 1)) - 1
    assert cfg.bias_bits == cfg.acc_width


def test_acc_bits_override():
    cfg = AccelConfig(acc_bits=20)
    assert cfg.acc_width == 20 and cfg.acc_row_bits == 20 * cfg.cols


@pytest.mark.parametrize("cfg", [
    AccelConfig(), AccelConfig(rows=8, cols=4, w_bits=2, a_bits=8, spad_depth=100, acc_depth=33),
    AccelConfig(rows=1, cols=32, w_bits=4, a_bits=4, param_depth=2, imem_depth=3),
], ids=lambda c: c.describe())
def test_derived_widths(cfg):
    from hw import isa

    assert cfg.spad_row_bits == cfg.rows * cfg.a_bits
    assert cfg.wmem_row_bits == cfg.cols * cfg.w_bits
    assert cfg.acc_row_bits == cfg.cols * cfg.acc_width
    assert cfg.param_lane_bits == cfg.acc_width + 2 * cfg.mult_bits + cfg.shift_bits
    assert cfg.param_row_bits == cfg.cols * cfg.param_lane_bits
    assert cfg.act_ext_bits == cfg.a_bits + 1
    assert cfg.pe_count == cfg.rows * cfg.cols
    # Address fields can name every row, and are no wider than needed.
    for name in ("spad", "acc", "wmem", "imem", "param"):
        depth, bits = getattr(cfg, f"{name}_depth"), getattr(cfg, f"{name}_addr_bits")
        assert (depth - 1) < (1 << bits) and bits == _ceil_log2(depth), name
    # Lane counts go up to max(rows, cols) inclusive; weight-row counts up to rows inclusive.
    assert max(cfg.rows, cfg.cols) < (1 << cfg.lane_bits) and cfg.lane_bits == _ceil_log2(max(cfg.rows, cfg.cols) + 1)
    assert cfg.rows < (1 << cfg.row_count_bits) and cfg.row_count_bits == _ceil_log2(cfg.rows + 1)
    mb = cfg.memory_bits()
    assert set(mb) == {"spad", "acc", "wmem", "imem", "param"}
    assert mb == {
        "spad": cfg.spad_depth * cfg.spad_row_bits,
        "acc": cfg.acc_depth * cfg.acc_row_bits,
        "wmem": cfg.wmem_depth * cfg.wmem_row_bits,
        "imem": cfg.imem_depth * isa.instr_bits(cfg),
        "param": cfg.param_depth * cfg.param_row_bits,
    }


# -- serialisation and hash -------------------------------------------------------------------

CONFIGS = [
    AccelConfig(),
    AccelConfig(rows=2, cols=2),
    AccelConfig(rows=8, cols=4, w_bits=2, a_bits=8, pe_kind="pot", acc_bits=20),
    AccelConfig(rows=32, cols=32, spad_depth=MAX_DEPTH, acc_depth=3, wmem_depth=MAX_DEPTH,
                imem_depth=2, param_depth=7, mult_bits=16, shift_bits=5, pool_mult_bits=4, dim_bits=12),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_json_round_trip(cfg):
    text = cfg.to_json()
    back = AccelConfig.from_json(text)
    assert back == cfg
    assert back.to_json() == text
    # Every field, except later additions left at their default value (block_scale and
    # packed_weights off, post_overlap on, bfp_exp_bits 0).
    full = dataclasses.asdict(cfg)
    later = {"block_scale": False, "packed_weights": False, "post_overlap": True, "bfp_exp_bits": 0}
    assert json.loads(text) == {k: v for k, v in full.items() if k not in later or v != later[k]}
    assert AccelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_hash_stable(cfg):
    h = cfg.hash
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    assert cfg.hash == h
    assert dataclasses.replace(cfg).hash == h
    assert AccelConfig.from_json(cfg.to_json()).hash == h


def test_hash_stable_across_processes():
    # Catches a hash that depends on Python's per-process string hashing or dict order.
    code = ("import sys; from hw.config import AccelConfig; "
            "print(AccelConfig.from_json(sys.argv[1]).hash)")
    hashes = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=os.pathsep.join(sys.path))
        out = subprocess.run([sys.executable, "-c", code, CONFIGS[2].to_json()], env=env,
                             capture_output=True, text=True, check=True)
        hashes.add(out.stdout.strip())
    assert hashes == {CONFIGS[2].hash}


# One valid alternative value per field; the test fails if a field is added without one here.
ALTERNATIVES = {
    "rows": 4, "cols": 8, "w_bits": 4, "a_bits": 4, "pe_kind": "pot", "spad_depth": 2048,
    "acc_depth": 512, "wmem_depth": 2048, "imem_depth": 512, "param_depth": 32, "acc_bits": 30,
    "mult_bits": 16, "shift_bits": 5, "pool_mult_bits": 8, "dim_bits": 8, "block_scale": True,
    "packed_weights": True,
    "post_overlap": False, "bfp_exp_bits": 2,
}
#: Other fields an alternative needs (bfp_exp_bits needs block_scale).
NEEDS = {"bfp_exp_bits": {"block_scale": True}}


def test_every_single_field_change_changes_hash():
    base = AccelConfig()
    names = [f.name for f in dataclasses.fields(AccelConfig)]
    assert sorted(names) == sorted(ALTERNATIVES)
    hashes = {base.hash}
    for name in names:
        other = dataclasses.replace(base, **NEEDS.get(name, {}), **{name: ALTERNATIVES[name]})
        assert other != base
        assert other.hash != base.hash, name
        hashes.add(other.hash)
    assert len(hashes) == len(names) + 1


def test_from_json_rejects_unknown_field():
    d = AccelConfig().to_dict()
    d["rowz"] = 4
    with pytest.raises(ConfigError, match=r"^unknown config field 'rowz'$") as ei:
        AccelConfig.from_json(json.dumps(d))
    assert ei.value.field == "rowz"


@pytest.mark.parametrize("text", ["", "{", "{'rows': 4}", "rows=4", '{"rows": 4,}'])
def test_from_json_rejects_invalid_json(text):
    with pytest.raises(ConfigError, match=r"^config is not valid JSON: ") as ei:
        AccelConfig.from_json(text)
    assert ei.value.field == "config"


@pytest.mark.parametrize("text,kind", [("[16, 16]", "list"), ("16", "int"), ('"16x16"', "str"), ("null", "NoneType")])
def test_from_json_rejects_non_object(text, kind):
    with pytest.raises(ConfigError, match=rf"^config must be a JSON object, not {kind}$"):
        AccelConfig.from_json(text)


def test_from_json_validates_values():
    with pytest.raises(ConfigError, match=_msg("rows", 1, 32, 0)) as ei:
        AccelConfig.from_json('{"rows": 0}')
    assert ei.value.field == "rows"
    assert AccelConfig.from_json('{"rows": 4}') == AccelConfig(rows=4)


# -- parse_pe -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expect", [
    ("16x16", (16, 16)), ("8X4", (8, 4)), (" 2x3 ", (2, 3)), ("1x32", (1, 32)), ("32 x 1", (32, 1)),
])
def test_parse_pe_accepts(text, expect):
    assert AccelConfig.parse_pe(text) == expect


@pytest.mark.parametrize("text,field,pattern", [
    ("16", "pe", r"^pe must look like ROWSxCOLS \(e\.g\. 16x16\), not '16'$"),
    ("axb", "pe", r"^pe must look like ROWSxCOLS \(e\.g\. 16x16\), not 'axb'$"),
    ("4x-4", "pe", r"^pe must look like ROWSxCOLS \(e\.g\. 16x16\), not '4x-4'$"),
    ("", "pe", r"^pe must look like ROWSxCOLS \(e\.g\. 16x16\), not ''$"),
    ("0x4", "rows", r"^rows must be an integer in 1\.\.32, not 0 \(from pe '0x4'\)$"),
    ("33x4", "rows", r"^rows must be an integer in 1\.\.32, not 33 \(from pe '33x4'\)$"),
    ("4x33", "cols", r"^cols must be an integer in 1\.\.32, not 33 \(from pe '4x33'\)$"),
])
def test_parse_pe_rejects(text, field, pattern):
    with pytest.raises(ConfigError, match=pattern) as ei:
        AccelConfig.parse_pe(text)
    assert ei.value.field == field
