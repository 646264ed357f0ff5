"""Block-floating-point activations in the compiler (``QuantOptions.bfp``, :mod:`compiler.dsconv`).

The quantizer's BFP rounding is checked against a scalar reference of the golden model's rule;
compiled BFP programs must give the same outputs on the golden model as ``simulate`` (which
models a BFP tensor by its values) and, under Verilator, the same outputs and cycles on the RTL;
misuse is refused with one clear error.
"""

import numpy as np
import pytest

from compiler.dsconv import bfp_round
from hw.config import AccelConfig
from hw.isa import Opcode

torch = pytest.importorskip("torch")


def _ref_bfp_block(vals, lo, hi, emax):
    """One block by the rule in sim/golden.py, one value at a time."""
    t = [v if v >= 0 else (-v - 1 if lo < 0 else 0) for v in vals]
    e = min(emax, max(0, int(max(t)).bit_length() - int(hi).bit_length()))
    out = []
    for v in vals:
        r = v if e == 0 else (v + (1 << (e - 1)) - (v < 0)) >> e
        out.append(min(max(r, lo), hi))
    return out, e


@pytest.mark.parametrize("lo,hi", [(0, 15), (-8, 7), (0, 255), (-128, 127), (0, 3)])
@pytest.mark.parametrize("emax", [0, 1, 3, 7])
def test_bfp_round_matches_the_rule(lo, hi, emax):
    rng = np.random.default_rng(lo + 7 * hi + emax)
    rows = 4
    # magnitudes from 0 to far past hi << emax (saturation), blocks of all zeros, negatives
    y = rng.integers(-1, 2, (3, 10, 2, 3)) * np.exp2(rng.uniform(0, 20, (3, 10, 2, 3))).astype(np.int64)
    y[0, :4] = 0
    mant, exp = bfp_round(y, lo, hi, emax, rows)
    assert exp.shape == (3, 3, 2, 3)
    for n in range(3):
        for b in range(3):
            for i in range(2):
                for j in range(3):
                    blk = y[n, b * rows:(b + 1) * rows, i, j].tolist()
                    want, e = _ref_bfp_block(blk, lo, hi, emax)
                    assert exp[n, b, i, j] == e
                    assert mant[n, b * rows:(b + 1) * rows, i, j].tolist() == want
    assert exp.max() == emax and exp.min() == 0  # both ends are exercised


def _model(seed=0):
    from compiler.frontend import capture
    from compiler.zoo import QuarryCNN

    torch.manual_seed(seed)
    model = QuarryCNN(width=8).eval()
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.uniform(0, 1, (40, 1, 28, 28)) * (rng.uniform(size=(40, 1, 28, 28)) < 0.3)).float()
    return capture(model, (1, 28, 28)), x


def _cfg(**kw):
    return AccelConfig(rows=8, cols=8, w_bits=4, a_bits=4, block_scale=True, bfp_exp_bits=3, param_depth=256, **kw)


def test_bfp_layers_are_the_conv_to_conv_tensors():
    from compiler.quantize import bfp_layers

    g, _ = _model()
    # stem feeds a pool, res2 adds a residual, pw feeds the average pool, fc is the output
    assert bfp_layers(g) == {"res1_0", "dw_0"}


@pytest.mark.parametrize("kind,wm,bc", [("int", "dsconv", "empirical"), ("hybrid", "minmax", "none")])
def test_bfp_program_golden_equals_simulate(kind, wm, bc):
    from compiler.lower import lower
    from compiler.quantize import QuantOptions, quantize, simulate
    from tests.compiler_models import acc_to_chw, run_golden

    g, x = _model()
    cfg = _cfg(pe_kind=kind)
    qg = quantize(g, cfg, x[:32], QuantOptions("mse", weight_method=wm, bias_correction=bc, bfp=True))
    assert {n for n, ql in qg.layers.items() if ql.bfp} == {"res1_0", "dw_0"}
    prog = lower(qg, reuse_spad=False)  # every tensor stays readable after the run
    assert prog.manifest["quant"]["activations"] == "bfp"
    assert [i["name"] for i in prog.manifest["layers"] if i.get("bfp")] == ["res1_0", "dw_0"]
    assert any(ins.args.get("bfp") for ins in prog.instrs if ins.op is Opcode.POST)
    want = simulate(qg, x[32:36], record=True)
    _, accs, machines = run_golden(prog, x[32:36])
    info = next(l for l in prog.manifest["layers"] if l["name"] == "res1_0")
    c, h, w = info["shape"]
    exps = set()
    for i, m in enumerate(machines):
        assert np.array_equal(acc_to_chw(prog, accs[i]), want["fc"][i])
        # the BFP layer's spad rows hold mantissas and exponents whose values are simulate's codes
        mant = m.read_spad(info["spad_base"], h * w, signed=False)[:, :c]
        e = m.spad_exp[info["spad_base"]:info["spad_base"] + h * w]
        assert np.array_equal((mant << e[:, None]).T.reshape(c, h, w), want["res1_0"][i])
        exps |= set(e.tolist())
    assert len(exps) > 1  # the exponents really vary from pixel to pixel


def test_bfp_refused_without_hardware(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from compiler.__main__ import main as cli_main
    from compiler.kernels import KernelError, Requant, SpadTensor, conv2d
    from compiler.quantize import QuantError, QuantOptions, quantize

    g, x = _model()
    with pytest.raises(QuantError, match="bfp_exp_bits"):
        quantize(g, AccelConfig(rows=8, cols=8, w_bits=4, a_bits=4, block_scale=True), x[:8], QuantOptions(bfp=True))
    with pytest.raises(QuantError, match="multiple of rows"):
        quantize(g, AccelConfig(rows=8, cols=4, w_bits=4, a_bits=4, block_scale=True, bfp_exp_bits=2), x[:8],
                 QuantOptions(bfp=True))
    cfg = _cfg()
    xt, yt = SpadTensor(0, 8, 4, 4), SpadTensor(64, 8, 4, 4)
    rq = Requant(bias=np.zeros(8, np.int64), mult=np.ones(8, np.int64), shift=np.zeros(8, np.int64), zp=1, lo=0,
                 hi=15, bfp=True)
    with pytest.raises(KernelError, match="zero point 1"):
        conv2d(cfg, xt, yt, np.ones((8, 8, 1, 1), np.int64), rq)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    args = ["tests.compiler_models:tiny", "--input-shape", "1x8x8", "--calib", "8", "--pe", "4x4", "--out", "out",
            "--bfp", "--block-scale"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "bfp_exp_bits" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert cli_main(args + ["--bfp-exp-bits", "2"]) == 0


#: Also the config of tests/test_dsconv.py's RTL test (one Verilator build).
RTL_CFG = AccelConfig(rows=4, cols=4, w_bits=4, a_bits=4, spad_depth=512, acc_depth=256, wmem_depth=256,
                      imem_depth=256, param_depth=128, block_scale=True, bfp_exp_bits=2)


@pytest.mark.rtl
def test_bfp_model_golden_vs_verilator():
    """A DSConv model with BFP activations on a 4x4 array: raw outputs and cycle counts of the
    RTL equal the golden model's, image by image."""
    from compiler import compile as compile_model
    from compiler.zoo import QuarryCNN
    from sim.run import compare_runs, run_golden, run_verilator

    torch.manual_seed(1)
    model = QuarryCNN(width=4).eval()
    x = torch.rand((10, 1, 12, 12), generator=torch.Generator().manual_seed(5))
    prog = compile_model(model, x[:8], RTL_CFG, weight_method="dsconv", bfp=True)
    assert any(ins.args.get("bfp") for ins in prog.instrs if ins.op is Opcode.POST)
    images = x[8:].numpy()
    g = run_golden(prog, images, progress=False)
    r = run_verilator(prog, images, progress=False, optimize=False)
    assert not compare_runs(g, r)
