"""Packed weight storage (``packed_weights`` configs, PRELOAD ``pack_bits``): a layer whose INT
weights use ``k < w_bits`` bits is stored ``w_bits // k`` bank rows per wmem row and unpacked
(sign-extended) by the loader.

Pure Python: the pack/unpack round trip at every ``k`` in 1..w_bits for w_bits 2..8 (through
the program file's wmem image), the ISA field (0 bits and unchanged hashes/words elsewhere), the
errors, random packed programs on the golden model against an independent convolution, and a
mixed-precision model using fewer wmem rows with the same outputs. Under Verilator: random
packed programs on an int and a hybrid build, and the mixed-precision model, bit- and
cycle-exact against the golden model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from compiler.__main__ import main as cli_main
from compiler.frontend import capture
from compiler.kernels import KernelError, Requant, SpadTensor, conv2d
from compiler.lower import lower
from compiler.quantize import QuantOptions, quantize, simulate
from hw import isa
from hw.build import main as build_main
from hw.config import AccelConfig, ConfigError
from hw.isa import Opcode
from hw.program import Program, pack_rows, unpack_rows
from sim.golden import GoldenError, Machine

from tests import helpers
from tests.compiler_models import run_golden, tiny

SEED = 20261127
_SMALL = dict(spad_depth=512, acc_depth=40, wmem_depth=512, imem_depth=512, param_depth=16)
CONFIGS = {
    # p = 8 // k fields: up to 8 rows per word on a 4-row array (partial groups), odd k.
    "4x4_int_w8a4_pk": AccelConfig(rows=4, cols=4, w_bits=8, a_bits=4, packed_weights=True, **_SMALL),
    # w_bits 6: k = 2 packs 3 rows per word (not a power of two) on a 5-row array; the compiled
    # mixed-precision models below run on this build too.
    "5x3_hybrid_w6a8_pk": AccelConfig(rows=5, cols=3, w_bits=6, a_bits=8, pe_kind="hybrid", mult_bits=16,
                                      pool_mult_bits=12, packed_weights=True, **_SMALL),
}
HYBRID = CONFIGS["5x3_hybrid_w6a8_pk"]


# -- ISA and config -----------------------------------------------------------------------------------

def test_config_field_keeps_hashes_and_words():
    base = AccelConfig(rows=4, cols=4)
    pk = dataclasses.replace(base, packed_weights=True)
    assert "packed_weights" not in base.to_dict() and pk.to_dict()["packed_weights"] is True
    assert base.hash != pk.hash and AccelConfig.from_json(pk.to_json()) == pk
    # 0 bits without the field: the PRELOAD layout (and every word) is what it was.
    assert isa.args_layout(base, Opcode.PRELOAD).size == 1 + base.wmem_addr_bits + base.row_count_bits
    assert isa.args_layout(pk, Opcode.PRELOAD)["pack_bits"].shape.width == 3  # 0..7 at w_bits 8
    assert isa.instr_bits(base) == isa.instr_bits(pk)
    ins = isa.preload(bank=1, w_addr=17, n_rows=3)
    assert isa.decode(base, ins.encode(base)) == ins and ins.encode(base) == ins.encode(pk)
    assert "packed" in pk.describe()
    with pytest.raises(ConfigError, match="packed_weights must be true or false, not 1"):
        AccelConfig(packed_weights=1)


@pytest.mark.parametrize("w_bits", range(2, 9))
def test_pack_round_trip_every_width(w_bits):
    """Every k in 1..w_bits: pack -> wmem image (program bytes) -> unpack gives the weights back,
    in ceil(n / p) rows, with the layout's field order and zero top bits."""
    rng = np.random.default_rng(SEED + w_bits)
    cfg = AccelConfig(rows=4, cols=5, w_bits=w_bits, packed_weights=True, wmem_depth=64)
    for k in range(1, w_bits + 1):
        lay = isa.packed_lane_layout(cfg, k)
        p = lay.length
        assert p == w_bits // k and lay.size <= w_bits
        for n in (0, 1, p, p + 1, 3 * p + 2):
            v = rng.integers(-(1 << (k - 1)), 1 << (k - 1), (n, cfg.cols))
            lanes = isa.pack_weights(cfg, k, v)
            assert lanes.shape == (-(-n // p), cfg.cols)
            assert lanes.min(initial=0) >= -(1 << (w_bits - 1)) and lanes.max(initial=0) < (1 << (w_bits - 1))
            # Through the ROM image and the program file, as the compiler writes it.
            rows = pack_rows(isa.wmem_row_layout(cfg), lanes)
            prog = Program.from_bytes(Program(cfg, [isa.halt()], {"wmem": rows} if n else {}).to_bytes(), cfg)
            back = unpack_rows(isa.wmem_row_layout(cfg), prog.images.get("wmem", []))
            got = isa.unpack_weights(cfg, k, back.reshape(-1, cfg.cols))
            assert got.shape == (len(lanes) * p, cfg.cols)
            np.testing.assert_array_equal(got[:n], v)
            assert not got[n:].any()
            if n:  # field f of lane (0, 0) is bits f*k .. f*k + k - 1 of its pattern (amaranth's layout)
                pattern = int(lanes[0, 0]) & ((1 << w_bits) - 1)
                view = lay.from_bits(pattern)
                assert [int(view[f]) for f in range(min(p, n))] == list(v[:p, 0])
                assert pattern >> lay.size == 0


def test_pack_errors():
    cfg = AccelConfig(rows=4, cols=2, w_bits=4, packed_weights=True)
    for k in (0, 5, -1, True, 2.0):
        with pytest.raises(isa.PackError, match=r"packed weight width must be an integer in 1..w_bits \(4\)"):
            isa.pack_weights(cfg, k, np.zeros((2, 2), np.int64))
    with pytest.raises(isa.PackError, match=r"weight 2 does not fit 2 bits \(-2..1\)"):
        isa.pack_weights(cfg, 2, np.array([[1, 2]]))
    with pytest.raises(isa.PackError, match="does not fit w_bits 4"):
        isa.unpack_weights(cfg, 2, np.array([[16, 0]]))
    # The instruction field: 0 or 1..w_bits-1, and only on packed_weights configs.
    with pytest.raises(isa.IsaError, match=r"PRELOAD.pack_bits = 4 does not fit \(0..3\)"):
        isa.preload(bank=0, w_addr=0, n_rows=1, pack_bits=4).encode(cfg)
    plain = dataclasses.replace(cfg, packed_weights=False)
    with pytest.raises(isa.PackError, match=r"pack_bits = 2 does not fit \(0..0\) .* need a packed_weights config"):
        isa.preload(bank=0, w_addr=0, n_rows=1, pack_bits=2).encode(plain)
    w6 = AccelConfig(w_bits=6, packed_weights=True)  # 3-bit field: 6 and 7 fit it, but not w_bits 6
    with pytest.raises(isa.PackError, match=r"pack_bits = 6 must be 0 \(unpacked\) or 1..5"):
        isa.preload(bank=0, w_addr=0, n_rows=1, pack_bits=6).encode(w6)
    with pytest.raises(isa.PackError, match="needs a packed_weights config"):
        Machine(plain).execute(isa.preload(bank=0, w_addr=0, n_rows=1, pack_bits=2))
    x, y = SpadTensor(0, 2, 1, 1), SpadTensor(8, 2, 1, 1)
    rq = Requant(bias=0, mult=1, shift=0, zp=0, lo=0, hi=15)
    w = np.ones((2, 2, 1, 1), np.int64)
    with pytest.raises(KernelError, match="needs a packed_weights config"):
        conv2d(plain, x, y, w, rq, pack_bits=2)
    with pytest.raises(KernelError, match="INT weights only"):
        conv2d(dataclasses.replace(cfg, pe_kind="hybrid"), x, y, w, rq, pack_bits=2, pot=True)
    with pytest.raises(KernelError, match=r"pack_bits 1: weight 1 does not fit 1 bits"):
        conv2d(cfg, x, y, w, rq, pack_bits=1)


def test_golden_preload_unpacks_fields():
    """PRELOAD pack_bits k: bank row i is field i % p of wmem row w_addr + i // p, sign-extended
    (checked against bit arithmetic on the raw lane, not the packing helper)."""
    rng = np.random.default_rng(SEED)
    cfg = AccelConfig(rows=7, cols=3, w_bits=8, packed_weights=True, wmem_depth=32)
    for k in range(1, 8):
        p = 8 // k
        m = Machine(cfg)
        m.wmem[:] = rng.integers(-128, 128, m.wmem.shape)
        n = int(rng.integers(0, cfg.rows + 1))
        m.execute(isa.preload(bank=1, w_addr=5, n_rows=n, pack_bits=k))
        for i in range(cfg.rows):
            for c in range(cfg.cols):
                raw = (int(m.wmem[5 + i // p, c]) & 0xFF) >> (k * (i % p)) & ((1 << k) - 1)
                want = (raw - (1 << k) if raw >> (k - 1) else raw) if i < n else 0
                assert m.banks[1, i, c] == want, (k, i, c)
    with pytest.raises(GoldenError, match="wmem rows 29..32 outside 0..31"):
        m.execute(isa.preload(bank=0, w_addr=29, n_rows=7, pack_bits=3))  # 4 words (2 rows each)
    m.execute(isa.preload(bank=0, w_addr=28, n_rows=7, pack_bits=3))  # exactly fits


@pytest.mark.parametrize("seed", range(24))
def test_random_packed_programs_match_reference(seed):
    """Random convs on random packed configs: packed preloads at random widths, the golden model's
    outputs equal an independent integer convolution."""
    from tests.test_golden import _check_conv

    rng = np.random.default_rng(SEED + seed)
    cfg = dataclasses.replace(helpers.random_config(rng), packed_weights=True)
    spec = helpers.random_conv_spec(rng, cfg, residual=bool(seed % 3 == 2))
    _check_conv(cfg, spec, seed)


def test_random_cases_pack_on_packed_configs_only():
    for name, cfg in CONFIGS.items():
        rng = np.random.default_rng(SEED)
        packs = [i.pack_bits for _ in range(30) for i in helpers.random_conv_case(rng, cfg).program.instrs
                 if i.op is Opcode.PRELOAD]
        assert len(set(packs)) >= 3 and 0 in packs, name
        plain = dataclasses.replace(cfg, packed_weights=False)
        assert not any(i.pack_bits for _ in range(10) for i in helpers.random_conv_case(rng, plain).program.instrs
                       if i.op is Opcode.PRELOAD)


# -- compiler: mixed precision ---------------------------------------------------------------------------

def _mixed_programs(cfg):
    """The tiny model at different bits per layer (INT: 2-bit conv, 3 rows per 6-bit lane, and
    3-bit linear, 2 per lane), compiled for ``cfg`` unpacked and packed."""
    x = torch.rand((12, 1, 8, 8), generator=torch.Generator().manual_seed(SEED))
    g = capture(tiny(), (1, 8, 8))
    bits = {"conv": (2, 6), "fc": (3, None)}
    opts = QuantOptions("mse", weight_method="mse")
    qg = quantize(g, dataclasses.replace(cfg, packed_weights=False), x[:8], opts, layer_bits=bits)
    qgp = quantize(g, dataclasses.replace(cfg, packed_weights=True), x[:8], opts, layer_bits=bits)
    return x, qg, lower(qg), qgp, lower(qgp)


def test_mixed_precision_uses_less_wmem_same_outputs():
    x, qg, prog, qgp, progp = _mixed_programs(HYBRID)
    wm, wmp = prog.manifest["weight_memory"], progp.manifest["weight_memory"]
    assert wmp["wmem_rows"] < wm["wmem_rows"] and wmp["wmem_bytes"] < wm["wmem_bytes"]
    assert wmp["wmem_rows"] == len(progp.images["wmem"]) and wm["bytes"] == wmp["bytes"]
    per = {i["name"]: i["weights"] for i in progp.manifest["layers"] if "weights" in i}
    assert per["conv"]["stored_bits"] == 2 and per["fc"]["stored_bits"] == 3
    packs = {i.pack_bits for i in progp.instrs if i.op is Opcode.PRELOAD}
    assert packs == {2, 3}
    assert not any(i.pack_bits for i in prog.instrs if i.op is Opcode.PRELOAD)
    assert progp.manifest["predicted_cycles"] == prog.manifest["predicted_cycles"]
    out, _, _ = run_golden(progp, x[8:])
    ref, _, _ = run_golden(prog, x[8:])
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(out, simulate(qgp, x[8:]))


def test_cli_packed_weights(tmp_path, capsys):
    out = tmp_path / "hw"
    assert build_main(["--pe", "4x4", "--packed-weights", "--out", str(out)]) == 0
    import json

    info = json.loads((out / "build.json").read_text())
    assert info["packed_weights"] is True and info["config"]["packed_weights"] is True
    assert build_main(["--pe", "4x4", "--out", str(tmp_path / "plain")]) == 0
    assert json.loads((tmp_path / "plain" / "build.json").read_text())["packed_weights"] is False
    args = ["tests.compiler_models:tiny", "--input-shape", "1x8x8", "--pe", "4x4", "--calib", "8",
            "--layer-bits", "conv=2,fc=3"]
    assert cli_main(args + ["--out", str(tmp_path / "m0")]) == 0
    assert "build with --packed-weights" in capsys.readouterr().out
    assert cli_main(args + ["--packed-weights", "--out", str(tmp_path / "m1")]) == 0
    r0, r1 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("m0", "m1"))
    assert r1["weight_memory"]["wmem_rows"] < r0["weight_memory"]["wmem_rows"] == r0["wmem_rows"]
    assert r1["config"]["packed_weights"] is True


# -- RTL -------------------------------------------------------------------------------------------------------

@pytest.mark.rtl
@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_programs_packed(name):
    from tests.test_rtl_system import _check

    _check(CONFIGS[name], 3000 + list(CONFIGS).index(name), 40, name)


@pytest.mark.rtl
def test_mixed_precision_packed_golden_vs_verilator():
    """On the hybrid packed build of the random programs: the packed mixed-precision model
    (2-bit conv, 3-bit linear), and a program with a PoT conv (unpacked: 5-bit codes, 4-bit
    activations) beside a packed 3-bit INT linear layer. Raw outputs and cycle counts of the RTL
    equal the golden model's, image by image."""
    from sim.run import compare_runs, run_golden as golden_run, run_verilator

    x, _, prog, qgp, progp = _mixed_programs(HYBRID)
    assert len(progp.images["wmem"]) < len(prog.images["wmem"])
    g = capture(tiny(), (1, 8, 8))
    qpot = quantize(g, HYBRID, x[:8], QuantOptions("mse", weight_method="inq", pot_bits=5, pot_layers=("conv",)),
                    layer_bits={"conv": (6, 4), "fc": (3, None)})
    assert qpot.layers["conv"].pot and not qpot.layers["fc"].pot
    ppot = lower(qpot)
    assert {i.pack_bits for i in ppot.instrs if i.op is Opcode.PRELOAD} == {0, 3}
    assert {i.pot for i in ppot.instrs if i.op is Opcode.MATMUL} == {0, 1}
    images = x[8:].numpy()
    for p, q in ((progp, qgp), (ppot, qpot)):
        gres = golden_run(p, images, progress=False)
        r = run_verilator(p, images, rom=False, progress=False, optimize=False)
        assert not compare_runs(gres, r)
        np.testing.assert_array_equal(np.stack(gres.logits), simulate(q, images).reshape(len(images), -1))
