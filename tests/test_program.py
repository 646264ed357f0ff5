"""The program container (``hw.program``): round trips, and every way a file can be bad."""

import hashlib
import json
import os
import struct

import numpy as np
import pytest

from hw import isa
from hw.config import AccelConfig
from hw.isa import Opcode, PoolMode
from hw.program import FORMAT_VERSION, MAGIC, Program, ProgramError, pack_rows, unpack_rows

CFG = AccelConfig(rows=4, cols=3, w_bits=4, a_bits=6, spad_depth=64, acc_depth=32, wmem_depth=40,
                  imem_depth=32, param_depth=5)
OTHER = AccelConfig(rows=4, cols=3, w_bits=4, a_bits=6, spad_depth=64, acc_depth=32, wmem_depth=40,
                    imem_depth=32, param_depth=6)

LAYOUT_CFGS = [CFG, AccelConfig(), AccelConfig(rows=1, cols=7, w_bits=2, a_bits=8, acc_bits=11, mult_bits=8,
                                               shift_bits=4),
               AccelConfig(rows=32, cols=32, wmem_depth=1 << 20, mult_bits=24)]


def _lo_hi(bits, signed):
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _random_params(rng, cfg, n):
    out = {}
    for k, bits, signed in (("bias", cfg.bias_bits, True), ("mult", cfg.mult_bits, False),
                            ("res_mult", cfg.mult_bits, False), ("shift", cfg.shift_bits, False)):
        lo, hi = _lo_hi(bits, signed)
        v = rng.integers(lo, hi, (n, cfg.cols), endpoint=True)
        v[0] = lo  # extremes in every lane
        v[-1] = hi
        out[k] = v
    return out


def sample_program(cfg=CFG, seed=0):
    rng = np.random.default_rng(seed)
    instrs = [
        isa.preload(bank=1, w_addr=3, n_rows=cfg.rows),
        isa.matmul(bank=1, spad_base=2, acc_base=1, in_h=3, in_w=4, out_h=2, out_w=2, off_h=-1, off_w=-2,
                   accumulate=True, a_signed=True),
        isa.post(acc_base=1, spad_base=9, n=4, param_addr=2, n_lanes=2, lo=-3, hi=5, zp=-1, res_base=0,
                 res_signed=True),
        isa.pool(mode=PoolMode.AVG, src_base=1, dst_base=20, in_h=4, in_w=4, out_h=2, out_w=2, k_h=2, k_w=2,
                 stride_h=2, stride_w=2, mult=3, shift=2),
        isa.sync(), isa.nop(), isa.halt(),
    ]
    wlo, whi = _lo_hi(cfg.w_bits, True)
    images = {
        "wmem": pack_rows(isa.wmem_row_layout(cfg), rng.integers(wlo, whi, (7, cfg.cols), endpoint=True)),
        "param": pack_rows(isa.param_row_layout(cfg), _random_params(rng, cfg, 3)),
        "spad": pack_rows(isa.spad_row_layout(cfg), rng.integers(0, 1 << cfg.a_bits, (5, cfg.rows))),
    }
    return Program(cfg, instrs, images, {"layers": [{"name": "conv1", "scale": 0.5}], "seed": seed})


def _split(blob):
    hlen = struct.unpack_from("<I", blob, len(MAGIC))[0]
    hstart = len(MAGIC) + 4
    return json.loads(blob[hstart:hstart + hlen]), blob[hstart + hlen:-32]


def _rebuild(header, body):
    """A well-formed file (valid checksum) from a header dict and body bytes."""
    hb = json.dumps(header, sort_keys=True).encode()
    out = MAGIC + struct.pack("<I", len(hb)) + hb + body
    return out + hashlib.sha256(out).digest()


# -- round trips ------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    p = sample_program()
    path = tmp_path / "prog.qp"
    p.save(path)
    q = Program.load(path, CFG)
    assert q.config == CFG
    assert q.instrs == p.instrs
    assert q.images == p.images
    assert q.manifest == p.manifest
    assert q.to_bytes() == p.to_bytes()
    assert Program.load(path).config == CFG  # without an expected config
    assert os.listdir(tmp_path) == ["prog.qp"]


def test_bytes_layout():
    p = sample_program()
    blob = p.to_bytes()
    assert blob.startswith(MAGIC)
    header, body = _split(blob)
    assert header["version"] == FORMAT_VERSION and header["config_hash"] == CFG.hash
    assert header["n_instr"] == len(p.instrs) and header["instr_bits"] == isa.instr_bits(CFG)
    ib = isa.instr_bits(CFG) // 8
    # Instruction words first, little-endian, exactly the ISA encoding.
    for i, ins in enumerate(p.instrs):
        assert int.from_bytes(body[i * ib:(i + 1) * ib], "little") == ins.encode(CFG)
    assert blob[-32:] == hashlib.sha256(blob[:-32]).digest()


def test_empty_program_round_trip():
    p = Program(CFG, [])
    q = Program.from_bytes(p.to_bytes(), CFG)
    assert q.instrs == [] and q.images == {} and q.manifest == {}


# -- bad files ---------------------------------------------------------------------------------------

def test_truncated():
    blob = sample_program().to_bytes()
    hlen = struct.unpack_from("<I", blob, len(MAGIC))[0]
    body = len(MAGIC) + 4 + hlen
    ib = isa.instr_bits(CFG) // 8
    cuts = [0, 3, len(MAGIC), len(MAGIC) + 2, len(MAGIC) + 4, len(MAGIC) + 4 + hlen // 2, body, body + 1,
            body + ib, body + 3 * ib + 5, len(blob) - 40, len(blob) - 33, len(blob) - 32, len(blob) - 1]
    for cut in cuts:
        assert 0 <= cut < len(blob)
        with pytest.raises(ProgramError, match="truncated") as ei:
            Program.from_bytes(blob[:cut])
        assert "Traceback" not in str(ei.value), cut


def test_truncated_file_on_disk(tmp_path):
    path = tmp_path / "p.qp"
    blob = sample_program().to_bytes()
    path.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(ProgramError, match="truncated"):
        Program.load(path, CFG)


def test_padded():
    blob = sample_program().to_bytes()
    header, body = _split(blob)
    with pytest.raises(ProgramError, match=r"^truncated or padded program"):
        Program.from_bytes(_rebuild(header, body + b"\0" * 4))


def test_flipped_byte():
    blob = sample_program().to_bytes()
    hlen = struct.unpack_from("<I", blob, len(MAGIC))[0]
    body = len(MAGIC) + 4 + hlen
    positions = [len(MAGIC) + 4 + 1, len(MAGIC) + 4 + hlen // 2, body, body + 17, len(blob) - 40,
                 len(blob) - 32, len(blob) - 1]
    for pos in positions:
        for mask in (0x01, 0x80):
            bad = bytearray(blob)
            bad[pos] ^= mask
            with pytest.raises(ProgramError, match=r"checksum|corrupt"):
                Program.from_bytes(bytes(bad))


def test_bad_magic():
    blob = sample_program().to_bytes()
    with pytest.raises(ProgramError, match=r"^not a Quarry program \(bad magic\)$"):
        Program.from_bytes(b"QUARRYPX" + blob[len(MAGIC):])
    with pytest.raises(ProgramError, match=r"bad magic"):
        Program.from_bytes(b"\0" * len(blob))


def test_wrong_version():
    header, body = _split(sample_program().to_bytes())
    for v in (FORMAT_VERSION + 1, 0, "1"):
        header["version"] = v
        with pytest.raises(ProgramError, match=rf"^program format version {v!r} is not supported \(expected {FORMAT_VERSION}\)$"):
            Program.from_bytes(_rebuild(header, body))


def test_wrong_format_name():
    header, body = _split(sample_program().to_bytes())
    header["format"] = "something-else"
    with pytest.raises(ProgramError, match=r"header format"):
        Program.from_bytes(_rebuild(header, body))


def test_config_hash_mismatch_inside_file():
    header, body = _split(sample_program().to_bytes())
    header["config"]["rows"] = 5
    with pytest.raises(ProgramError, match=r"config hash does not match"):
        Program.from_bytes(_rebuild(header, body))


def test_invalid_config_inside_file():
    header, body = _split(sample_program().to_bytes())
    header["config"]["rows"] = 0
    with pytest.raises(ProgramError, match=r"^program config is invalid: rows must be an integer"):
        Program.from_bytes(_rebuild(header, body))


def test_other_config_refused(tmp_path):
    path = tmp_path / "p.qp"
    sample_program().save(path)
    assert CFG.hash != OTHER.hash
    with pytest.raises(ProgramError) as ei:
        Program.load(path, OTHER)
    msg = str(ei.value)
    assert CFG.hash in msg and OTHER.hash in msg, msg
    assert msg.index(CFG.hash) < msg.index(OTHER.hash)  # "built for <file's>, not <expected>"


@pytest.mark.parametrize("index", [0, 3, 6])
@pytest.mark.parametrize("raw_op", [7, 15])
def test_unknown_opcode_in_file(index, raw_op):
    p = sample_program()
    header, body = _split(p.to_bytes())
    ib = isa.instr_bits(CFG) // 8
    body = bytearray(body)
    body[index * ib:(index + 1) * ib] = raw_op.to_bytes(ib, "little")
    with pytest.raises(ProgramError, match=rf"^instruction {index}: unknown opcode {raw_op}$"):
        Program.from_bytes(_rebuild(header, bytes(body)), CFG)


def test_stray_bits_in_file():
    p = sample_program()
    header, body = _split(p.to_bytes())
    ib = isa.instr_bits(CFG) // 8
    body = bytearray(body)
    body[5 * ib + ib - 1] |= 0x80  # the NOP's top bit
    with pytest.raises(ProgramError, match=r"^instruction 5: NOP word has non-zero bits"):
        Program.from_bytes(_rebuild(header, bytes(body)), CFG)


def test_unknown_image_in_file():
    header, body = _split(sample_program().to_bytes())
    header["images"]["acc"] = {"rows": 0, "row_bits": 8}
    with pytest.raises(ProgramError, match=r"^unknown memory image 'acc'$"):
        Program.from_bytes(_rebuild(header, body))


def test_load_missing_file(tmp_path):
    with pytest.raises(ProgramError, match=r"^cannot read program .*nope\.qp: "):
        Program.load(tmp_path / "nope.qp")


# -- atomic save ----------------------------------------------------------------------------------------

def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "out.qp"

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        sample_program().save(path)
    assert list(tmp_path.iterdir()) == [], "a failed save left files behind"
    # An existing file is left untouched by a failed save.
    monkeypatch.undo()
    sample_program(seed=1).save(path)
    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        sample_program(seed=2).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.qp"]


# -- construction checks ------------------------------------------------------------------------------

def test_constructor_checks():
    with pytest.raises(ProgramError, match=r"^instruction 1: PRELOAD\.n_rows = "):
        Program(CFG, [isa.nop(), isa.preload(bank=0, w_addr=0, n_rows=1 << CFG.row_count_bits)])
    with pytest.raises(ProgramError, match=rf"^program has {CFG.imem_depth + 1} instructions, imem holds {CFG.imem_depth}$"):
        Program(CFG, [isa.nop()] * (CFG.imem_depth + 1))
    Program(CFG, [isa.nop()] * CFG.imem_depth)
    with pytest.raises(ProgramError, match=r"^unknown memory image 'acc'"):
        Program(CFG, [], {"acc": [0]})
    with pytest.raises(ProgramError, match=rf"^image param has {CFG.param_depth + 1} rows, memory holds {CFG.param_depth}$"):
        Program(CFG, [], {"param": [0] * (CFG.param_depth + 1)})


# -- row packing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", LAYOUT_CFGS, ids=lambda c: c.describe())
def test_pack_unpack_round_trip(cfg):
    rng = np.random.default_rng(cfg.rows * 100 + cfg.cols)
    for layout, bits, signed, lanes, row_bits in (
            (isa.wmem_row_layout(cfg), cfg.w_bits, True, cfg.cols, cfg.wmem_row_bits),
            (isa.spad_row_layout(cfg), cfg.a_bits, False, cfg.rows, cfg.spad_row_bits),
            (isa.acc_row_layout(cfg), cfg.acc_width, True, cfg.cols, cfg.acc_row_bits)):
        lo, hi = _lo_hi(bits, signed)
        v = rng.integers(lo, hi, (9, lanes), endpoint=True)
        v[0], v[1] = lo, hi
        rows = pack_rows(layout, v)
        assert all(0 <= r < (1 << row_bits) for r in rows)
        # Lane i occupies bits i*bits .. i*bits + bits - 1 (two's complement).
        for i in range(lanes):
            assert (rows[0] >> (i * bits)) & ((1 << bits) - 1) == lo & ((1 << bits) - 1)
        back = unpack_rows(layout, rows)
        assert back.dtype == np.int64 and np.array_equal(back, v)
    params = _random_params(rng, cfg, 4)
    rows = pack_rows(isa.param_row_layout(cfg), params)
    assert all(0 <= r < (1 << cfg.param_row_bits) for r in rows)
    back = unpack_rows(isa.param_row_layout(cfg), rows)
    assert set(back) == {"bias", "mult", "res_mult", "shift"}
    for k in params:
        assert np.array_equal(back[k], params[k]), k
    assert unpack_rows(isa.wmem_row_layout(cfg), []).shape == (0, cfg.cols)


@pytest.mark.parametrize("cfg", LAYOUT_CFGS[:3], ids=lambda c: c.describe())
def test_pack_out_of_range(cfg):
    wl = isa.wmem_row_layout(cfg)
    lo, hi = _lo_hi(cfg.w_bits, True)
    for bad in (lo - 1, hi + 1):
        v = np.zeros((2, cfg.cols), np.int64)
        v[1, -1] = bad
        with pytest.raises(ProgramError, match=rf"^value {bad} does not fit field {cfg.cols - 1} \({lo}\.\.{hi}\)$"):
            pack_rows(wl, v)
    with pytest.raises(ProgramError, match=r"does not fit field 0 "):
        pack_rows(isa.spad_row_layout(cfg), np.full((1, cfg.rows), -1))
    params = _random_params(np.random.default_rng(0), cfg, 2)
    params["shift"][1, 0] = 1 << cfg.shift_bits
    with pytest.raises(ProgramError, match=rf"does not fit field 0\.shift \(0\.\.{(1 << cfg.shift_bits) - 1}\)"):
        pack_rows(isa.param_row_layout(cfg), params)
    params = _random_params(np.random.default_rng(0), cfg, 2)
    params["mult"][0, 0] = -1
    with pytest.raises(ProgramError, match=r"does not fit field 0\.mult"):
        pack_rows(isa.param_row_layout(cfg), params)


def test_images_reach_the_golden_machine():
    from sim.golden import Machine

    p = sample_program()
    m = Machine(CFG)
    m.load_images(p)
    assert np.array_equal(m.wmem[:7], unpack_rows(isa.wmem_row_layout(CFG), p.images["wmem"]))
    assert np.array_equal(m.spad[:5], unpack_rows(isa.spad_row_layout(CFG), p.images["spad"]))
    params = unpack_rows(isa.param_row_layout(CFG), p.images["param"])
    for k in params:
        assert np.array_equal(m.param[k][:3], params[k])
    assert not m.wmem[7:].any()
    with pytest.raises(ProgramError, match=CFG.hash):
        Machine(OTHER).load_images(p)
    assert Opcode.HALT in {i.op for i in p.instrs}
