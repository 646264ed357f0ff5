"""The trained zoo model through the compiler (spad reuse changes nothing), and models quantized
by PyTorch's own FX flow (``prepare_fx``/``convert_fx``) imported with ``compiler.fx_import``.

PyTorch requantizes in float with ties to even and rounds a conv's output before a quantized
add; Quarry uses integer multipliers and one rounding (../shared/METHODS.md), so the comparison
with PyTorch's quantized model is "within +-1 LSB on most elements", not bit-exact.
The zoo model is trained on first use and cached in ``build/zoo``.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import compiler
from compiler import data, zoo
from compiler.frontend import CaptureError, UnsupportedOpError, capture
from compiler.fx_import import SUPPORTED_FX_OPS, compile_fx, import_fx, is_fx_quantized
from compiler.kernels import SpadTensor
from compiler.lower import lower
from compiler.quantize import QuantOptions, quantize
from hw.config import AccelConfig
from hw.program import output_region, quantize_input
from tests.helpers import place, read
from tests.compiler_models import ROOT, acc_to_chw, run_golden

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.ao.quantization import (MinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping,
                                       get_default_qconfig_mapping)
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx


@pytest.fixture(scope="module")
def mnist():
    return data.load("mnist")


@pytest.fixture(scope="module")
def zoo_model():
    return zoo.trained(cache=ROOT / "build" / "zoo", log=lambda s: None)


def test_epoch_override_is_cached_apart_from_the_reference(tmp_path):
    """``trained(epochs=, threads=)`` (``python -m bench --quick``'s short-trained models) trains
    once, caches under its own name next to a record saying how, and never writes the reference
    model's file."""
    logs = []
    m1 = zoo.trained("quarry_cnn", "mnist", cache=tmp_path, epochs=1, threads=1, log=logs.append)
    assert sorted(f.name for f in tmp_path.glob("*.pt")) == [f"quarry_cnn-mnist-r{zoo.RECIPE_VERSION}-e1-t1.pt"]
    rec = zoo.info("quarry_cnn", "mnist", cache=tmp_path, epochs=1, threads=1)
    assert rec["epochs"] == 1 and rec["threads"] == 1
    assert zoo.info("quarry_cnn", "mnist", cache=tmp_path) is None
    logs.clear()
    m2 = zoo.trained("quarry_cnn", "mnist", cache=tmp_path, epochs=1, threads=1, log=logs.append)
    assert not logs  # loaded, not trained again
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def ptq(model, calib, mapping):
    p = prepare_fx(copy.deepcopy(model).eval(), mapping, (calib[:1],))
    with torch.no_grad():
        for i in range(0, len(calib), 64):
            p(calib[i:i + 64])
    return convert_fx(p)


def qmapping(symmetric: bool = False) -> QConfigMapping:
    """Per-channel symmetric int8 weights; quint8 activations, affine or symmetric (zero point 128)."""
    act = MinMaxObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_symmetric if symmetric
                                   else torch.per_tensor_affine)
    w = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    return QConfigMapping().set_global(QConfig(activation=act, weight=w))


class _Record(fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def torch_values(gm, x):
    """Every node's value when PyTorch's quantized GraphModule runs ``x``."""
    r = _Record(gm)
    r.values = {}
    with torch.no_grad():
        r.run(x)
    return r.values


def _torch_int(tv, ql):
    """PyTorch's integer codes of a layer's output, as Quarry stores them (q - offset)."""
    return tv[ql.layer.torch_node].int_repr().numpy().astype(np.int64)[0] - ql.offset


def lsb_agreement(gm, prog, qg, x):
    """|ours - PyTorch's int_repr| for every element of every layer, over the images of ``x``,
    each layer run in isolation on PyTorch's own integer inputs (so the +-1 LSB differences of
    one layer do not propagate into the next). The output layer's raw accumulators are
    requantized on the host as PyTorch's last module does. ``prog`` must keep every tensor
    (``reuse_spad=False``).

    Where Quarry fuses PyTorch nodes into one POST (conv + add, conv + dequantize-ReLU-quantize),
    PyTorch clamps the conv's own output to its range first; elements where that clamp was hit
    are left out (the fused result is the unclamped, more accurate one)."""
    from sim.golden import Machine

    layers = prog.manifest["layers"]
    starts = np.cumsum([0] + [l["instructions"] for l in layers])
    diffs = {}
    for i in range(len(x)):
        tv = torch_values(gm, x[i:i + 1])
        m = Machine(prog.config)
        m.load_images(prog)
        for k, info in enumerate(layers):
            ql = qg.layers[info["name"]]
            l = ql.layer
            ref = _torch_int(tv, ql)
            if l.kind == "input":
                addr, rows = quantize_input(prog, x[i].numpy())  # the host's quantization of the input
                m.spad[addr:addr + len(rows)] = rows
                ours = read(m, SpadTensor(info["spad_base"], *info["shape"], info["signed"]))
            else:
                for src in list(l.inputs) + ([l.residual] if l.residual else []):
                    si = next(t for t in layers if t["name"] == src)
                    t = SpadTensor(si["spad_base"], *si["shape"], si["signed"])
                    place(m, t, _torch_int(tv, qg.layers[src]).reshape(t.c, t.h, t.w))
                for ins in prog.instrs[starts[k]:starts[k + 1]]:
                    m.execute(ins)
                if "spad_base" in info:
                    ours = read(m, SpadTensor(info["spad_base"], *info["shape"], info["signed"]))
                else:
                    o = prog.manifest["output"]
                    a0, n = output_region(prog)
                    acc = acc_to_chw(prog, m.acc[a0:a0 + n]).reshape(o["channels"], -1)
                    real = (acc + np.asarray(o["bias_q"])[:, None]) * np.asarray(o["scales"])[:, None]
                    lo, hi = (-128, 127) if ql.torch_dtype == "qint8" else (0, 255)
                    ours = np.clip(np.round(real / ql.scale) + ql.torch_zp, lo, hi) - ql.offset
            d = np.abs(ours.reshape(-1) - ref.reshape(-1))
            if getattr(ql, "fused", ()):
                inner = tv[l.name].int_repr().numpy().reshape(-1)  # the conv's own output
                lo, hi = (-128, 127) if ql.torch_dtype == "qint8" else (0, 255)
                d = d[(inner > lo) & (inner < hi)]
            diffs.setdefault(info["name"], []).append(d)
    return {k: np.concatenate(v) for k, v in diffs.items()}


# -- the zoo model -------------------------------------------------------------------------------------

def test_zoo_model_spad_reuse_is_bit_identical(zoo_model, mnist):
    xtr, _, xte, _ = mnist
    cfg = AccelConfig()
    qg = quantize(capture(zoo_model, (1, 28, 28)), cfg, xtr[:128], QuantOptions("percentile"))
    prog, flat = lower(qg), lower(qg, reuse_spad=False)
    assert prog.manifest["spad_rows_peak"] < flat.manifest["spad_rows_peak"]
    _, a1, _ = run_golden(prog, xte[:6])
    _, a2, _ = run_golden(flat, xte[:6])
    assert np.array_equal(a1, a2)


def test_zoo_model_fits_smaller_spad_with_reuse(zoo_model, mnist):
    """With reuse, the 5x3 array (4-lane-poor channel blocks) fits a spad the bump allocator overflowed."""
    xtr = mnist[0]
    qg = quantize(capture(zoo_model, (1, 28, 28)), AccelConfig(rows=5, cols=3, spad_depth=5000, imem_depth=2048,
                                                                 param_depth=128), xtr[:64], QuantOptions("minmax"))
    assert lower(qg).manifest["spad_rows_peak"] <= 5000
    with pytest.raises(compiler.CompileError, match=r"^layer \w+: spad needs \d+ rows \(\d+ bytes\), spad_depth "
                                                    r"is 5000 rows \(\d+ bytes\)"):
        lower(qg, reuse_spad=False)


# -- FX import ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fx_zoo(zoo_model, mnist):
    xtr = mnist[0]
    return ptq(zoo_model, xtr[:128], get_default_qconfig_mapping("fbgemm"))


def test_fx_zoo_accuracy_matches_pytorch(fx_zoo, mnist):
    _, _, xte, yte = mnist
    n = 200
    assert is_fx_quantized(fx_zoo)
    cfg = AccelConfig()
    prog = compiler.compile(fx_zoo, xte[:2], cfg)
    assert prog.manifest["quant"]["method"] == "torch.ao.quantization.quantize_fx"
    logits, _, _ = run_golden(prog, xte[:n])
    with torch.no_grad():
        theirs = fx_zoo(xte[:n])
    ours_acc = float((torch.from_numpy(logits).argmax(1) == yte[:n]).float().mean())
    torch_acc = float((theirs.argmax(1) == yte[:n]).float().mean())
    assert abs(ours_acc - torch_acc) <= 0.01, f"golden {ours_acc:.3f} vs PyTorch quantized {torch_acc:.3f}"
    assert ours_acc > 0.9
    agree = float((torch.from_numpy(logits).argmax(1) == theirs.argmax(1)).float().mean())
    assert agree >= 0.98, f"golden and PyTorch agree on {agree:.3f} of the predictions"


def test_fx_zoo_integers_within_one_lsb(fx_zoo, mnist):
    xte = mnist[2]
    cfg = AccelConfig(rows=8, cols=4)  # channel blocks that split the 16/32 channels differently
    qg = import_fx(fx_zoo, (1, 28, 28), cfg)
    prog = lower(qg, reuse_spad=False, im2col_input=False)  # keep every layer tensor (in its own layout) to compare them all
    diffs = lsb_agreement(fx_zoo, prog, qg, xte[:6])
    assert not diffs["quantize_per_tensor"].any()  # the host quantizes the input exactly as PyTorch
    for name, d in diffs.items():
        # res2_0 carries the fused add: PyTorch rounds the conv to its own scale first, so up
        # to 2 LSB there; everywhere else float vs fixed-point requantization, ties: 1 LSB.
        assert d.max() <= (2 if qg.layers[name].fused else 1), f"{name}: max difference {d.max()} LSB"
        assert float(np.mean(d == 0)) >= 0.7, f"{name}: only {np.mean(d == 0):.3f} of elements exact"
    all_d = np.concatenate(list(diffs.values()))
    assert float(np.mean(all_d <= 1)) >= 0.999


class _NoPadTail(nn.Module):
    """conv-ReLU, then a conv without ReLU (its quint8 output has a non-zero zero point) read by an
    unpadded conv and a linear: the zero point is folded into their biases."""

    def __init__(self, pad_second: bool = False):
        super().__init__()
        torch.manual_seed(1)
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 5, 3)  # no ReLU: outputs of both signs
        self.c3 = nn.Conv2d(5, 7, 3, padding=1 if pad_second else 0)
        self.fc = nn.Linear(7 * (6 if pad_second else 4) ** 2, 4)

    def forward(self, x):
        x = self.c3(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.flatten(x, 1))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 6, 1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x) + x)
        x = self.pool(self.c3(x) + x)
        return self.fc(torch.flatten(x, 1))  # (Tensor.flatten would leave a float region PyTorch requantizes)


@pytest.mark.parametrize("make, shape, symmetric, folded", [
    (_NoPadTail, (1, 8, 8), False, True),
    (_Residual, (3, 8, 8), False, True),
    (_Residual, (3, 8, 8), True, False),
])
def test_fx_small_models_within_one_lsb(make, shape, symmetric, folded):
    g = torch.Generator().manual_seed(0)
    x = torch.rand((64, *shape), generator=g) * (2 if symmetric else 1) - (1 if symmetric else 0)
    gm = ptq(make(), x[:48], qmapping(symmetric))
    cfg = AccelConfig(rows=4, cols=3)
    qg = import_fx(gm, shape, cfg)
    assert any(ql.zp != 0 for ql in qg.layers.values()) == folded  # the bias-folding path is used
    assert all(ql.torch_zp == 128 for ql in qg.layers.values()) or not symmetric
    prog = lower(qg, reuse_spad=False, im2col_input=False)  # layer tensors in their own layout
    diffs = lsb_agreement(gm, prog, qg, x[48:56])
    for name, d in diffs.items():
        assert d.max() <= (2 if qg.layers[name].fused else 1), f"{make.__name__} {name}: {d.max()} LSB off"
        assert float(np.mean(d <= 1)) >= 0.99, f"{make.__name__} {name}: {np.mean(d <= 1):.3f} within +-1 LSB"
    reuse = lower(qg)
    assert np.array_equal(run_golden(reuse, x[48:52])[1], run_golden(prog, x[48:52])[1])


def test_fx_zero_point_with_padding_fails_preflight():
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gm = ptq(_NoPadTail(pad_second=True), x, qmapping())
    with pytest.raises(UnsupportedOpError, match=r"^unsupported ops: c3 \(Conv2d\): its input \(c2\) has zero "
                                                 r"point \d+: .*exact only for a conv without padding"):
        import_fx(gm, (1, 8, 8), AccelConfig())


def test_fx_input_zero_point_fails_preflight():
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.3 - 0.3  # zero point ~59
    gm = ptq(_NoPadTail(), x, qmapping())
    qpt = next(n for n in gm.graph.nodes if n.target is torch.quantize_per_tensor)
    zp = int(getattr(gm, qpt.args[2].target))
    assert zp not in (0, 128)
    with pytest.raises(UnsupportedOpError, match=rf"quantize_per_tensor \(torch\.quantize_per_tensor\): the input "
                                                 rf"has zero point {zp}: the host quantizes inputs with zero point 0"):
        compiler.compile(gm, x[:1], AccelConfig())


class _FxBad(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3)
        self.sig = nn.Sigmoid()
        self.c2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        x = self.sig(self.c1(x))
        x = torch.nn.functional.hardswish(self.c2(x))
        return self.fc(x.flatten(1))


def test_fx_preflight_lists_every_problem():
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gm = ptq(_FxBad(), x, qmapping())
    with pytest.raises(UnsupportedOpError) as e:
        import_fx(gm, (1, 8, 8), AccelConfig())
    names = [p[0] for p in e.value.problems]
    assert any("sig" in n for n in names) and any("hardswish" in n for n in names), names
    assert str(e.value).endswith("Supported: " + ", ".join(SUPPORTED_FX_OPS))


def test_fx_needs_8bit_activations():
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gm = ptq(_NoPadTail(), x, qmapping())
    with pytest.raises(CaptureError, match=r"8-bit activations; the accelerator has a_bits=4"):
        compile_fx(gm, (1, 8, 8), AccelConfig(a_bits=4))
    with pytest.raises(UnsupportedOpError, match=r"c1 \(Conv2d\): integer weights span -\d+\.\.\d+, the "
                                                 r"accelerator's w_bits=4 holds -8\.\.7"):
        compile_fx(gm, (1, 8, 8), AccelConfig(w_bits=4))


def test_peer_lenet_is_the_network_peers_md_measured(mnist):
    """bench.peers' model is PEERS.md's NNgen network (192,064 MACs) and compiles for a 4x4 W8A8
    array; the golden model's logits track the float model's."""
    torch.manual_seed(0)
    model = zoo.PeerLeNet().eval()
    x = mnist[0][:16]
    prog = compiler.compile(model, x, AccelConfig(rows=4, cols=4, w_bits=8, a_bits=8), method="minmax")
    assert prog.manifest["macs"] == 192_064
    assert [l["kind"] for l in prog.manifest["layers"][1:]] == ["conv", "maxpool", "conv", "maxpool", "conv"]
    got, _, _ = run_golden(prog, x[:4])
    with torch.no_grad():
        ref = model(x[:4]).numpy()
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
