"""DSConv block rescaling: ``block_scale`` configs rescale every MATMUL's sums per lane
(``round_shift(sum * mult, shift)`` from param row ``scale_addr``) before accumulating.

Random programs with random block scales (gains up to 2, and 5 % wild ones that wrap the
accumulators) run on the generated Verilog under Verilator and must match the golden model in
every output word and the cycle counter; the golden model's rescale is checked against an
independent NumPy reference; the compiler's DSConv lowering runs end to end.
"""

import numpy as np
import pytest

from compiler.kernels import KernelError, Requant, SpadTensor, conv2d
from hw import isa, timing
from hw.config import AccelConfig
from hw.isa import Opcode
from sim.golden import Machine, round_shift, wrap

from tests import helpers

_SMALL = dict(spad_depth=512, acc_depth=40, wmem_depth=512, imem_depth=512, param_depth=64)
CONFIGS = {
    "4x4_int_w4a4_bs": AccelConfig(rows=4, cols=4, w_bits=4, a_bits=4, block_scale=True, **_SMALL),
    "3x5_hybrid_w6a3_bs": AccelConfig(rows=3, cols=5, w_bits=6, a_bits=3, pe_kind="hybrid", mult_bits=16,
                                      pool_mult_bits=12, block_scale=True, **_SMALL),
}


def test_config_field_and_hash():
    base = AccelConfig(rows=4, cols=4)
    bs = AccelConfig(rows=4, cols=4, block_scale=True)
    assert "block_scale" not in base.to_dict()  # configs written before the field keep their hash
    assert bs.hash != base.hash and AccelConfig.from_json(bs.to_json()) == bs
    assert "blockscale" in bs.describe()
    assert timing.matmul_latency(bs) == timing.matmul_latency(base) + 2
    # The field costs instruction bits only where it exists.
    assert isa.args_layout(base, Opcode.MATMUL)["scale_addr"].shape.width == 0
    assert isa.args_layout(bs, Opcode.MATMUL)["scale_addr"].shape.width == bs.param_addr_bits
    with pytest.raises(isa.IsaError, match="scale_addr"):
        isa.matmul(bank=0, spad_base=0, acc_base=0, in_w=1, out_w=1, scale_addr=1).encode(base)


def test_kernel_refuses_block_scales_without_hardware():
    cfg = AccelConfig(rows=4, cols=4, w_bits=4, a_bits=4)
    x, y = SpadTensor(0, 4, 3, 3), SpadTensor(9, 4, 3, 3)
    rq = Requant(bias=0, mult=1, shift=0, zp=0, lo=0, hi=15)
    z = np.zeros((4, 1, 1, 1), np.int64)
    with pytest.raises(KernelError, match="block_scale"):
        conv2d(cfg, x, y, np.ones((4, 4, 1, 1)), rq, block_scale=(z, z))


@pytest.mark.parametrize("seed", range(3))
def test_golden_rescale_matches_reference(seed):
    """One MATMUL with a random scale row, against sums computed directly."""
    rng = np.random.default_rng(seed)
    cfg = CONFIGS["4x4_int_w4a4_bs"]
    m = Machine(cfg)
    helpers.scramble(m, rng)
    acc0 = m.acc.copy()
    a = dict(bank=1, accumulate=1, a_signed=1, spad_base=5, in_h=1, in_w=6, out_h=1, out_w=6,
             stride_h=1, stride_w=1, off_h=0, off_w=0, acc_base=3, pot=0, scale_addr=7)
    m.execute(isa.Instr(Opcode.MATMUL, a))
    x = np.where(m.spad[5:11] >= 8, m.spad[5:11] - 16, m.spad[5:11])
    psum = wrap(x @ m.banks[1], cfg.acc_width)
    want = wrap(acc0[3:9] + round_shift(psum * m.param["mult"][7], m.param["shift"][7]), cfg.acc_width)
    assert np.array_equal(m.acc[3:9], want)
    assert np.array_equal(m.acc[:3], acc0[:3]) and np.array_equal(m.acc[9:], acc0[9:])


@pytest.mark.rtl
@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_programs_block_scale(name):
    from tests.test_rtl_system import _check

    _check(CONFIGS[name], 2000 + list(CONFIGS).index(name), 40, name)


# -- compiler: DSConv weights ---------------------------------------------------------------------------

def test_block_quantize_follows_the_paper():
    from compiler.dsconv import block_quantize

    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 8, 2, 2))
    w[0, :4, 0, 0] = [-2.0, 0.5, 1.0, -0.1]  # block with a negative extreme: the paper's mapping
    w[0, 4:, 0, 0] = [2.0, 0.5, -1.0, 0.1]  # positive extreme: mirrored, alpha stays >= 0
    q, alpha = block_quantize(w, 4, 4, 4)
    assert q.shape == w.shape and alpha.shape == (3, 2, 2, 2) and (alpha >= 0).all()
    assert list(q[0, :4, 0, 0]) == [-8, 2, 4, 0] and list(q[0, 4:, 0, 0]) == [7, 2, -4, 0]
    b = w[0, :4, 0, 0]
    assert alpha[0, 0, 0, 0] == pytest.approx(b @ q[0, :4, 0, 0] / (q[0, :4, 0, 0] @ q[0, :4, 0, 0]))
    # blocks of 8 channels on a 4-row array: both array blocks carry the block's one scale
    _, a8 = block_quantize(w, 4, 8, 4)
    assert np.array_equal(a8[:, 0], a8[:, 1])
    from compiler.dsconv import DSConvError
    with pytest.raises(DSConvError, match="multiple"):
        block_quantize(w, 4, 6, 4)


def _small_model(seed=0):
    from compiler.frontend import capture
    from compiler.zoo import QuarryCNN

    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    model = QuarryCNN(width=8).eval()
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.uniform(0, 1, (40, 1, 28, 28)) * (rng.uniform(size=(40, 1, 28, 28)) < 0.3)).float()
    return model, capture(model, (1, 28, 28)), x


@pytest.mark.parametrize("kind,blk,bc", [("int", None, "none"), ("hybrid", 16, "empirical")])
def test_dsconv_program_golden_equals_simulate(kind, blk, bc):
    from compiler.lower import lower
    from compiler.quantize import QuantOptions, quantize, simulate
    from tests.compiler_models import run_golden

    _, g, x = _small_model()
    cfg = AccelConfig(rows=8, cols=8, w_bits=4, a_bits=4, pe_kind=kind, block_scale=True, param_depth=256)
    qg = quantize(g, cfg, x[:32], QuantOptions("mse", weight_method="dsconv", dsconv_block=blk, bias_correction=bc))
    prog = lower(qg)
    got, _, _ = run_golden(prog, x[32:35])
    assert np.array_equal(got, simulate(qg, x[32:35]))
    info = [i for i in prog.manifest["layers"] if "weights" in i]
    assert {i["weights"]["format"] for i in info} == {"dsconv"}
    assert prog.manifest["quant"]["weight_method"] == "dsconv"
    # every MATMUL names its own scale row (per tap and channel block), not one shared row
    rows = {ins.args["scale_addr"] for ins in prog.instrs if ins.op is Opcode.MATMUL}
    assert len(rows) > len(info)


def test_dsconv_needs_block_scale_hardware():
    from compiler.quantize import QuantError, QuantOptions, quantize

    _, g, x = _small_model()
    with pytest.raises(QuantError, match="block_scale"):
        quantize(g, AccelConfig(rows=8, cols=8, w_bits=4, a_bits=4), x[:8], QuantOptions(weight_method="dsconv"))
    with pytest.raises(QuantError, match="multiple"):
        quantize(g, AccelConfig(rows=8, cols=8, w_bits=4, a_bits=4, block_scale=True), x[:8],
                 QuantOptions(weight_method="dsconv", dsconv_block=12))


def test_cli_dsconv(tmp_path, monkeypatch, capsys):
    import json
    from pathlib import Path

    from compiler.__main__ import main as cli_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    args = ["tests.compiler_models:tiny", "--input-shape", "1x8x8", "--calib", "8", "--pe", "4x4", "--out", "out"]
    assert cli_main(args + ["--weight-method", "dsconv"]) == 2  # no --block-scale
    assert "block_scale" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert cli_main(args + ["--dsconv-block", "8"]) == 2
    assert "--dsconv-block applies to --weight-method dsconv" in capsys.readouterr().err
    assert cli_main(args + ["--weight-method", "dsconv", "--block-scale", "--dsconv-block", "8"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["block_scale"] is True


@pytest.mark.rtl
def test_dsconv_model_golden_vs_verilator():
    """A tiny model with DSConv weights on a 4x4 block_scale array: raw outputs and cycle counts
    of the RTL equal the golden model's, image by image."""
    import torch

    from compiler import compile as compile_model
    from sim.run import compare_runs, run_golden, run_verilator
    from tests.compiler_models import tiny

    x = torch.rand((10, 1, 8, 8), generator=torch.Generator().manual_seed(5))
    from tests.test_bfp_compiler import RTL_CFG as cfg  # one Verilator build for both tests

    assert cfg.block_scale
    prog = compile_model(tiny(), x[:8], cfg, weight_method="dsconv", bias_correction="empirical")
    images = x[8:].numpy()
    g = run_golden(prog, images, progress=False)
    r = run_verilator(prog, images, progress=False, optimize=False)
    assert not compare_runs(g, r)
