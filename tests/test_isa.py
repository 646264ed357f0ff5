"""ISA encode/decode properties, field range checks, builders, and "opcodes are defined once"."""

import re
from pathlib import Path

import pytest
from amaranth.hdl import Shape
from amaranth.lib import enum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hw import isa
from hw.config import AccelConfig
from hw.isa import Instr, IsaError, Opcode, PoolMode

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = [
    AccelConfig(rows=2, cols=2, w_bits=8, a_bits=8),
    AccelConfig(rows=4, cols=4, w_bits=4, a_bits=4),
    AccelConfig(rows=8, cols=4, w_bits=2, a_bits=8),
    AccelConfig(),
    AccelConfig(rows=32, cols=32, w_bits=8, a_bits=8, spad_depth=1 << 20, acc_depth=1 << 16,
                wmem_depth=1 << 20, imem_depth=1 << 16, param_depth=1 << 12, dim_bits=12),
    # Non-power-of-two depths and narrow fields.
    AccelConfig(rows=3, cols=5, w_bits=3, a_bits=5, spad_depth=100, acc_depth=33, wmem_depth=17,
                imem_depth=9, param_depth=3, mult_bits=8, shift_bits=4, pool_mult_bits=4, dim_bits=4),
    AccelConfig(rows=4, cols=4, w_bits=4, a_bits=8, pe_kind="pot"),
    AccelConfig(rows=8, cols=8, w_bits=8, a_bits=8, pe_kind="hybrid"),
]
CFG_IDS = [c.describe() for c in CONFIGS]

SETTINGS = settings(max_examples=40, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def field_range(shape):
    """(lo, hi) of a layout field, from its shape (never from hard-coded widths)."""
    if isinstance(shape, type) and issubclass(shape, enum.Enum):
        vals = [m.value for m in shape]
        return min(vals), max(vals)
    s = Shape.cast(shape)
    if s.signed:
        return -(1 << (s.width - 1)), (1 << (s.width - 1)) - 1
    return 0, (1 << s.width) - 1


def field_width(shape):
    return Shape.cast(shape).width


def legal_range(cfg, op, name, shape):
    """Field range, narrowed by the ISA's config rules (MATMUL.pot must suit cfg.pe_kind)."""
    if op is Opcode.MATMUL and name == "pot":
        modes = isa.POT_MODES[cfg.pe_kind]
        return min(modes), max(modes)
    return field_range(shape)


def minimal_instr(cfg, op):
    """The legal instruction with every field at the bottom of its legal range."""
    return Instr(op, {n: legal_range(cfg, op, n, f.shape)[0] for n, f in isa.args_layout(cfg, op)})


def args_strategy(cfg, op):
    lay = isa.args_layout(cfg, op)
    return st.fixed_dictionaries({name: st.integers(*legal_range(cfg, op, name, f.shape)) for name, f in lay})


def check_round_trip(cfg, op, args):
    ins = Instr(op, args)
    word = ins.encode(cfg)
    nbits = isa.instr_bits(cfg)
    assert 0 <= word < (1 << nbits), f"{ins} encodes to {word:#x}, wider than {nbits} bits"
    assert word & ((1 << isa.OPCODE_BITS) - 1) == op.value
    back = isa.decode(cfg, word)
    assert back == ins, f"{ins} -> {word:#x} -> {back}"
    # Each field sits where instr_layout says (opcode first, then the args union): this is what the
    # RTL decoder and docs/ISA.md rely on.
    args_off = isa.instr_layout(cfg)["args"].offset
    assert args_off == isa.OPCODE_BITS
    for name, f in isa.args_layout(cfg, op):
        w = field_width(f.shape)
        assert (word >> (args_off + f.offset)) & ((1 << w) - 1) == args[name] & ((1 << w) - 1), name
    assert word >> (args_off + isa.args_layout(cfg, op).size) == 0
    return word


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("op", list(Opcode), ids=lambda o: o.name)
def test_encode_decode_round_trip(cfg, op):
    @SETTINGS
    @given(args_strategy(cfg, op))
    def prop(args):
        check_round_trip(cfg, op, args)

    prop()


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("op", [op for op in Opcode if isa.FIELDS[op]], ids=lambda o: o.name)
def test_field_extremes_round_trip(cfg, op):
    lay = isa.args_layout(cfg, op)
    for pick in (0, 1):
        check_round_trip(cfg, op, {n: legal_range(cfg, op, n, f.shape)[pick] for n, f in lay})


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_instr_bits(cfg):
    nbits = isa.instr_bits(cfg)
    widest = max(isa.args_layout(cfg, op).size for op in Opcode)
    assert nbits % 32 == 0 and isa.OPCODE_BITS + widest <= nbits < isa.OPCODE_BITS + widest + 32
    assert isa.instr_layout(cfg).size == nbits
    # Opcodes fit the opcode field, and field names are unique within an opcode.
    assert max(op.value for op in Opcode) < (1 << isa.OPCODE_BITS)
    for op in Opcode:
        names = [f.name for f in isa.FIELDS[op]]
        assert len(names) == len(set(names)), op


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=CFG_IDS[:4])
@pytest.mark.parametrize("op", [op for op in Opcode if isa.FIELDS[op]], ids=lambda o: o.name)
def test_out_of_range_field_raises(cfg, op):
    lay = isa.args_layout(cfg, op)
    for name, f in lay:
        lo, hi = field_range(f.shape)
        for bad in (lo - 1, hi + 1):
            ins = Instr(op, {name: bad})
            with pytest.raises(IsaError, match=rf"^{op.name}\.{name} = {bad} does not fit \({lo}\.\.{hi}\)"):
                ins.encode(cfg)
            with pytest.raises(IsaError, match=rf"^{op.name}\.{name} = "):
                ins.check(cfg)


def test_unknown_field_name_raises():
    with pytest.raises(IsaError, match=r"^MATMUL has no field 'bogus'"):
        Instr(Opcode.MATMUL, {"bogus": 1})
    with pytest.raises(IsaError, match=r"^HALT has no field 'n'"):
        Instr(Opcode.HALT, {"n": 1})


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=CFG_IDS[:4])
def test_unknown_opcode_raises(cfg):
    used = {op.value for op in Opcode}
    for raw in range(1 << isa.OPCODE_BITS):
        if raw in used:
            continue
        with pytest.raises(IsaError, match=rf"^unknown opcode {raw}$"):
            isa.decode(cfg, raw)
        # Even with argument bits set.
        with pytest.raises(IsaError, match=rf"^unknown opcode {raw}$"):
            isa.decode(cfg, raw | (1 << isa.OPCODE_BITS))


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("op", list(Opcode), ids=lambda o: o.name)
def test_stray_high_bits_raise(cfg, op):
    nbits = isa.instr_bits(cfg)
    word = minimal_instr(cfg, op).encode(cfg)
    used = isa.OPCODE_BITS + isa.args_layout(cfg, op).size
    for bit in sorted({used, (used + nbits - 1) // 2, nbits - 1}):
        if bit < used:
            continue
        with pytest.raises(IsaError, match=rf"^{op.name} word has non-zero bits above bit {used - 1}$"):
            isa.decode(cfg, word | (1 << bit))
    for bad in (1 << nbits, -1):
        with pytest.raises(IsaError, match=rf"^instruction word does not fit in {nbits} bits$"):
            isa.decode(cfg, word + bad if bad > 0 else bad)


# -- builders ------------------------------------------------------------------------------------

def _builder_case(cfg, op, args):
    """Call the builder for ``op`` with ``args`` mapped to its keyword arguments."""
    if op is Opcode.PRELOAD:
        return isa.preload(**args), args
    if op is Opcode.MATMUL:
        kw = dict(args, accumulate=bool(args["accumulate"]), a_signed=bool(args["a_signed"]), pot=bool(args["pot"]))
        return isa.matmul(**kw), args
    if op is Opcode.POST:
        kw = {k: v for k, v in args.items() if k not in ("res_en", "res_base")}
        kw["res_signed"] = bool(args["res_signed"])
        if args["res_en"]:
            kw["res_base"] = args["res_base"]
        expect = dict(args, res_base=args["res_base"] if args["res_en"] else 0)
        return isa.post(**kw), expect
    if op is Opcode.POOL:
        kw = dict(args, mode=PoolMode(args["mode"]), a_signed=bool(args["a_signed"]))
        return isa.pool(**kw), args
    raise AssertionError(op)


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[3]], ids=[CFG_IDS[1], CFG_IDS[3]])
@pytest.mark.parametrize("op", [Opcode.PRELOAD, Opcode.MATMUL, Opcode.POST, Opcode.POOL], ids=lambda o: o.name)
def test_builders_produce_given_fields(cfg, op):
    @SETTINGS
    @given(args_strategy(cfg, op))
    def prop(args):
        ins, expect = _builder_case(cfg, op, args)
        assert ins.op is op
        assert ins.args == expect, f"{op.name} builder: {ins.args} != {expect}"
        assert isa.decode(cfg, ins.encode(cfg)) == ins

    prop()


def test_builder_defaults_and_flags():
    m = isa.matmul(bank=1, spad_base=5, acc_base=7, in_w=3, out_w=2)
    assert (m.in_h, m.out_h, m.stride_h, m.stride_w, m.off_h, m.off_w, m.accumulate, m.a_signed) == (1, 1, 1, 1, 0, 0, 0, 0)
    p = isa.post(acc_base=1, spad_base=2, n=3, param_addr=4, n_lanes=5, lo=-6, hi=7)
    assert (p.res_en, p.res_base, p.res_signed, p.zp, p.src_lane, p.dst_lane) == (0, 0, 0, 0, 0, 0)
    # res_base=0 is a real address: it must enable the residual.
    p = isa.post(acc_base=1, spad_base=2, n=3, param_addr=4, n_lanes=5, lo=-6, hi=7, res_base=0, res_signed=True)
    assert (p.res_en, p.res_base, p.res_signed) == (1, 0, 1)
    q = isa.pool(mode=PoolMode.AVG, src_base=1, dst_base=2, in_h=3, in_w=4, out_h=1, out_w=2, k_h=3, k_w=3)
    assert q.mode == PoolMode.AVG.value and (q.stride_h, q.off_w, q.mult, q.shift) == (1, 0, 0, 0)
    assert isa.nop().op is Opcode.NOP and isa.halt().op is Opcode.HALT and isa.sync().op is Opcode.SYNC
    assert isa.encode(AccelConfig(), m) == m.encode(AccelConfig())


# -- the ISA is defined once -----------------------------------------------------------------------

def _python_sources():
    """Every project .py file except hw/isa.py and the tests (skips the venv and build outputs)."""
    for top in sorted(ROOT.iterdir()):
        if top.name.startswith(".") or top.name in ("tests", "build") or not top.is_dir():
            continue
        for p in sorted(top.rglob("*.py")):
            rel = p.relative_to(ROOT)
            if rel != Path("hw/isa.py"):
                yield rel, p.read_text(errors="replace")


def test_opcodes_declared_only_in_isa():
    names = "|".join(op.name for op in Opcode)
    member = re.compile(rf"^\s*(?:{names})\s*(?::[^=]*)?=\s*(?:0x[0-9a-fA-F]+|\d+)\s*(?:#.*)?$", re.M)
    table = re.compile(rf"[\"'](?:{names})[\"']\s*:\s*(?:0x[0-9a-fA-F]+|\d+)\b")
    offenders = []
    for rel, text in _python_sources():
        if re.search(r"\bclass\s+\w*Op(?:code)?\b.*Enum", text) or "class Opcode" in text:
            offenders.append(f"{rel}: declares an opcode enum")
        if member.search(text) or table.search(text):
            offenders.append(f"{rel}: assigns an opcode name a number")
    assert not offenders, "opcodes must only be declared in hw/isa.py:\n" + "\n".join(offenders)
    # The check itself must see the repository (guards against an empty walk).
    assert any(rel == Path("sim/golden.py") for rel, _ in _python_sources())
