"""Post-training quantization: range estimators, weight scales, bias correction, requant
multipliers, and the vectorised integer simulator against the golden model. All seeded, fast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from compiler.frontend import capture
from compiler.quantize import (
    BIAS_CORRECTIONS, METHODS, QuantError, QuantOptions, aciq_clip, aciq_k, analytic_bias_correction,
    estimate_clip, fake_quant, gptq_round, mse_clip, mult_shift, pooled_mse_clip, qrange, quantize, simulate,
    weight_scales,
)
from hw.config import AccelConfig

SEED = 20240611


@pytest.fixture
def rng(request):
    seed = SEED + sum(map(ord, request.node.name))
    print(f"seed {seed}")  # shown on failure
    return np.random.default_rng(seed)


def _samples(rng, kind, n=20_000):
    if kind == "gauss":
        return rng.normal(0.3, 1.0, n)
    if kind == "laplace":
        return rng.laplace(0.0, 0.5, n)
    return np.maximum(rng.normal(0.2, 1.0, n), 0)  # "relu": a ReLU output


def _mse(x, clip, bits, signed):
    return float(np.mean((x - fake_quant(x, clip, bits, signed)) ** 2))


# -- range estimators ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gauss", "laplace", "relu"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_clip_never_worse_than_minmax(rng, kind, bits):
    x = _samples(rng, kind)
    signed = kind != "relu"
    top = np.abs(x).max()
    c = mse_clip(x, bits, signed)
    assert 0 < c <= top
    assert _mse(x, c, bits, signed) <= _mse(x, top, bits, signed)
    # ... and it is a local optimum: 2 % either side is not better.
    for f in (0.98, 1.02):
        if c * f <= top:
            assert _mse(x, c, bits, signed) <= _mse(x, c * f, bits, signed) * (1 + 1e-9)


def test_mse_clip_shrinks_with_fewer_bits(rng):
    x = _samples(rng, "laplace")
    clips = [mse_clip(x, b, True) for b in (2, 4, 8)]
    assert clips[0] < clips[1] < clips[2]


@pytest.mark.parametrize("signed", [True, False])
def test_percentile_monotonic(rng, signed):
    x = _samples(rng, "laplace" if signed else "relu")
    ps = [90, 99, 99.9, 99.99, 100]
    clips = [estimate_clip(x, 4, signed, "percentile", p) for p in ps]
    assert all(a <= b for a, b in zip(clips, clips[1:]))
    assert clips[-1] == pytest.approx(estimate_clip(x, 4, signed, "minmax"))


def test_aciq_tables_match_methods_md():
    # ../shared/METHODS.md, Banner et al.
    assert [aciq_k(b, True, "laplace") for b in range(2, 9)] == [2.83, 3.89, 5.03, 6.20, 7.41, 8.64, 9.89]
    assert [aciq_k(b, False, "laplace") for b in range(2, 9)] == [3.89, 5.02, 6.20, 7.41, 8.64, 9.89, 11.16]
    assert [aciq_k(b, True, "gauss") for b in range(2, 9)] == [1.71, 2.15, 2.55, 2.93, 3.28, 3.61, 3.92]
    # one-sided Gaussian = two-sided with one more bit
    assert aciq_k(4, False, "gauss") == aciq_k(5, True, "gauss")


@pytest.mark.parametrize("bits", range(2, 9))
def test_aciq_tables_are_the_noise_optimum(bits):
    """Re-derive the tables: argmin of clip noise + rounding noise (Banner et al., eq. 5 / 6)."""
    a = np.linspace(0.5, 15, 29_001)
    lap = 2 * np.exp(-a) + a ** 2 / (3 * 4 ** bits)
    erf = np.vectorize(math.erf)
    gau = (a ** 2 + 1) * (1 - erf(a / math.sqrt(2))) - math.sqrt(2 / math.pi) * a * np.exp(-a ** 2 / 2) \
        + a ** 2 / (3 * 4 ** bits)
    assert aciq_k(bits, True, "laplace") == pytest.approx(a[np.argmin(lap)], abs=0.01)
    assert aciq_k(bits, True, "gauss") == pytest.approx(a[np.argmin(gau)], abs=0.01)
    lap1 = 2 * np.exp(-a) + a ** 2 / (3 * 4 ** (bits + 1))  # one-sided: 2^b levels on [0, a]
    assert aciq_k(bits, False, "laplace") == pytest.approx(a[np.argmin(lap1)], abs=0.01)


def test_aciq_clip_uses_table(rng):
    x = rng.laplace(0.1, 0.5, 50_000)
    b = np.mean(np.abs(x - x.mean()))
    assert aciq_clip(x, 4, True) == pytest.approx(min(abs(x.mean()) + 5.03 * b, np.abs(x).max()))
    assert aciq_clip(x, 4, True, "gauss") == pytest.approx(min(abs(x.mean()) + 2.55 * x.std(), np.abs(x).max()))
    r = np.maximum(x, 0)
    assert aciq_clip(r, 3, False) == pytest.approx(min(5.02 * r[r > 0].mean(), r.max()))
    # never beyond the data
    assert aciq_clip(x, 8, True) <= np.abs(x).max()


@pytest.mark.parametrize("method", METHODS)
def test_every_estimator_positive_and_bounded(rng, method):
    for kind in ("gauss", "relu"):
        x = _samples(rng, kind, 5000)
        c = estimate_clip(x, 4, kind != "relu", method)
        assert 0 < c <= np.abs(x).max() + 1e-12
    assert estimate_clip(np.zeros(10), 4, False, method) == 1.0


def test_weight_mse_scales_not_worse_per_channel(rng):
    w = rng.laplace(0, 0.1, (8, 4, 3, 3))
    w[0] = 0  # a dead channel keeps a valid scale
    for bits in (2, 4, 8):
        q = qrange(bits, True)[1]
        for method in ("minmax", "mse"):
            s = weight_scales(w, bits, method)
            assert s.shape == (8,) and (s > 0).all()
        s_mm, s_mse = weight_scales(w, bits, "minmax"), weight_scales(w, bits, "mse")
        flat = w.reshape(8, -1)
        e = lambda s: ((flat - fake_quant(flat, (s * q)[:, None], bits, True)) ** 2).sum(1)  # noqa: E731
        assert (e(s_mse) <= e(s_mm) + 1e-15).all()


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("groups", [1, 3])
def test_gptq_lowers_output_error(rng, bits, groups):
    """GPTQ rounding keeps codes in range and beats round-to-nearest on the layer output error
    E||(W - W_q) x||^2 for correlated inputs (the case it is built for)."""
    cout, cin_g, k = 6, 4, 3
    w = rng.laplace(0, 0.1, (cout, cin_g, k, k))
    kk = cin_g * k * k
    mix = rng.normal(size=(groups * kk, groups * kk))
    x = np.maximum(rng.normal(size=(4000, groups * kk)) @ mix * 0.3 + 0.5, 0)  # correlated, ReLU-like
    s = weight_scales(w, bits, "mse")
    lo, hi = qrange(bits, True)
    rtn = np.clip(np.round(w / s[:, None, None, None]), lo, hi)
    g = gptq_round(w, s, bits, x, groups)
    assert g.dtype == np.int64 and g.shape == w.shape and g.min() >= lo and g.max() <= hi

    def out_err(q):
        per_g = cout // groups
        e = 0.0
        for gi in range(groups):
            d = (w[gi * per_g:(gi + 1) * per_g] - q[gi * per_g:(gi + 1) * per_g] * s[gi * per_g:(gi + 1) * per_g, None, None, None])
            e += float((((x[:, gi * kk:(gi + 1) * kk]) @ d.reshape(per_g, -1).T) ** 2).mean())
        return e
    assert out_err(g) < out_err(rtn)


def test_pooled_clip_beats_tensor_clip_on_pooled_error(rng):
    """For a tensor read only by a global average pool, the pool-aware clip gives a smaller
    error of the pooled, re-quantized values than the tensor's own OMSE clip."""
    from compiler.frontend import Layer

    x = torch.from_numpy(np.maximum(rng.laplace(0.3, 1.0, (64, 8, 7, 7)), 0))
    gap = Layer("gap", "avgpool", ["t"], kernel=(7, 7), stride=(7, 7))
    bits = 4
    lo, hi = qrange(bits, False)

    def pooled_err(c):
        s = c / hi
        xq = torch.clamp(torch.round(x / s), lo, hi)
        p = torch.clamp(torch.round(torch.nn.functional.avg_pool2d(xq, 7)), lo, hi) * s
        return float(((p - torch.nn.functional.avg_pool2d(x, 7)) ** 2).sum())

    c_pool = pooled_mse_clip(x, bits, False, [gap])
    c_tensor = mse_clip(x.numpy(), bits, False)
    assert c_pool < c_tensor
    assert pooled_err(c_pool) < pooled_err(c_tensor)


# -- bias correction -----------------------------------------------------------------------------

def _conv_model(rng, cin=6, cout=8, groups=1):
    torch.manual_seed(int(rng.integers(1 << 30)))
    m = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups))
    with torch.no_grad():
        # Skewed weights (a mean shift per channel) make rounding bias visible at low bit widths.
        m[0].weight.copy_(torch.from_numpy(rng.laplace(0.02, 0.1, m[0].weight.shape)).float())
    return m


def _relu_inputs(rng, n, cin, hw=8):
    # Positive inputs with a non-zero mean, like a ReLU output.
    return torch.from_numpy(np.maximum(rng.normal(0.5, 1.0, (n, cin, hw, hw)), 0)).float()


def _mean_err(qg, model, x):
    with torch.no_grad():
        yf = model(x).numpy()
    yq = simulate(qg, x).reshape(yf.shape)
    return np.abs((yf - yq).mean(axis=(0, 2, 3)))


@pytest.mark.parametrize("groups", [1, 2])
def test_bias_correction_reduces_mean_output_error(rng, groups):
    model = _conv_model(rng, groups=groups)
    graph = capture(model, (6, 8, 8))
    calib, test = _relu_inputs(rng, 128, 6), _relu_inputs(rng, 128, 6)
    cfg = AccelConfig(w_bits=3, a_bits=8)
    err = {bc: _mean_err(quantize(graph, cfg, calib, QuantOptions("minmax", bias_correction=bc)), model, test)
           for bc in BIAS_CORRECTIONS}
    assert err["analytic"].mean() < err["none"].mean()
    assert err["empirical"].mean() < 0.25 * err["none"].mean()
    assert err["both"].mean() < 0.25 * err["none"].mean()


def test_analytic_bias_correction_folds_mean_with_receptive_field(rng):
    w = rng.laplace(0.05, 0.1, (4, 3, 3, 3))
    s = np.abs(w).reshape(4, -1).max(1) / 3
    wq = np.clip(np.round(w / s[:, None, None, None]), -4, 3)
    in_mean = rng.uniform(0, 1, (3, 3, 3))
    s2, b2 = analytic_bias_correction(w, wq, s, np.zeros(4), in_mean)
    wr = wq * s2[:, None, None, None]
    # corrected weights: std matches the float weights; bias carries the mean shift times sum E[x]
    assert np.allclose(wr.reshape(4, -1).std(1), w.reshape(4, -1).std(1))
    d = w.reshape(4, -1).mean(1) - wr.reshape(4, -1).mean(1)
    assert np.allclose(b2, d * in_mean.sum())


# -- requantization multipliers ------------------------------------------------------------------

@pytest.mark.parametrize("mult_bits", [8, 16, 24, 32])
def test_mult_shift_precision(rng, mult_bits):
    cfg = AccelConfig(mult_bits=mult_bits)
    m = np.exp(rng.uniform(np.log(1e-6), np.log(100.0), 500))
    r = np.exp(rng.uniform(np.log(1e-3), np.log(10.0), 500))  # a second (residual) multiplier
    (qm, qr), shift = mult_shift(cfg, [m, r])
    top = (1 << mult_bits) - 1
    assert (qm >= 0).all() and (qm <= top).all() and (qr >= 0).all() and (qr <= top).all()
    assert (shift >= 0).all() and (shift < 1 << cfg.shift_bits).all()
    big = np.maximum(m, r)
    qbig = np.where(m >= r, qm, qr)
    assert (np.abs(qbig / np.exp2(shift) - big) / big <= 2.0 ** -(mult_bits - 2)).all()
    # the smaller multiplier shares the shift: within half an LSB of it
    for q, real in ((qm, m), (qr, r)):
        assert (np.abs(q - real * np.exp2(shift)) <= 0.5 + 1e-9).all()
    # single multipliers keep full precision
    (q1,), s1 = mult_shift(cfg, [m])
    assert (np.abs(q1 / np.exp2(s1) - m) / m <= 2.0 ** -(mult_bits - 2)).all()


def test_mult_shift_rejects_oversized_multiplier():
    cfg = AccelConfig(mult_bits=8)
    with pytest.raises(QuantError, match="too large for mult_bits=8"):
        mult_shift(cfg, [np.array([300.0])])


# -- options -------------------------------------------------------------------------------------

def test_options_validation():
    with pytest.raises(QuantError, match="method must be one of .*, not 'max'"):
        QuantOptions("max")
    with pytest.raises(QuantError, match="weight_method must be one of"):
        QuantOptions(weight_method="aciq")
    with pytest.raises(QuantError, match="bias_correction must be one of .*, not 'yes'"):
        QuantOptions(bias_correction="yes")
    with pytest.raises(QuantError, match="percentile must be in"):
        QuantOptions(percentile=0)
    assert QuantOptions(bias_correction=True).bias_correction == "analytic"
    assert QuantOptions(bias_correction=False).bias_correction == "none"


# -- simulate() against the golden model ---------------------------------------------------------

@pytest.mark.parametrize("bits,opts", [
    ((8, 8), QuantOptions("percentile")),
    ((4, 4), QuantOptions("mse", weight_method="mse", bias_correction="empirical")),
    ((2, 8), QuantOptions("aciq", bias_correction="both")),
    ((4, 8), QuantOptions("aciq_gauss", weight_method="gptq", bias_correction="analytic", pool_aware=False)),
])
def test_simulate_matches_golden(rng, bits, opts):
    from compiler.lower import lower
    from compiler.zoo import QuarryCNN
    from hw.program import decode_output, output_region, quantize_input
    from sim.golden import Machine

    torch.manual_seed(int(rng.integers(1 << 30)))
    model = QuarryCNN(width=8).eval()
    x = torch.from_numpy(rng.uniform(0, 1, (34, 1, 28, 28)) * (rng.uniform(size=(34, 1, 28, 28)) < 0.3)).float()
    cfg = AccelConfig(rows=8, cols=8, w_bits=bits[0], a_bits=bits[1])
    qg = quantize(capture(model, (1, 28, 28)), cfg, x[:32], opts)
    prog = lower(qg)
    want = simulate(qg, x[32:])
    a0, na = output_region(prog)
    for i in range(2):
        mach = Machine(cfg)
        addr, rows = quantize_input(prog, x[32 + i].numpy())
        mach.spad[addr:addr + len(rows)] = rows
        mach.run(prog)
        assert np.array_equal(decode_output(prog, mach.acc[a0:a0 + na]).reshape(-1), want[i])
