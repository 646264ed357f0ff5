"""Quantization-aware fine-tuning: LSQ, and PACT with SAWB weights (../shared/METHODS.md,
"Training-time methods"), on the BN-folded graph the compiler lowers.

Integer form
------------
QAT does not add a number format: it learns the numbers PTQ would otherwise estimate, and hands
them to the same :func:`compiler.quantize.quantize` and :func:`compiler.lower.lower`:

* the float weights and biases of every conv/linear layer (BN is already folded, so what is
  trained is what is quantized);
* each conv's per-output-channel weight scale ``s_w`` (``w_scales``): the lowering rounds
  ``w / s_w`` to nearest (ties to even) and clamps to ``[-2**(b-1), 2**(b-1) - 1]``;
* each tensor's activation scale ``s`` (``act_scales``; the model input and every conv output;
  pools keep their input's): codes ``[0, 2**b - 1]`` after a ReLU, ``[-2**(b-1), 2**(b-1) - 1]``
  otherwise, zero point 0, exactly the ranges PTQ uses.

The training forward (:class:`FakeQuantNet`) is the integer network in real units: input
``clamp(round(x / s))`` (ties to even, as the host quantizes), weights as above, bias
``round(b / (s_x s_w))`` (the hardware's ``bias_q``), a residual added before the requantization
as POST does, outputs ``clamp(round(y / s_y))`` with ties away from zero (POST's rounding shift),
average pools as the POOL instruction (window sum x the same ``avg_pool_mult`` constants, ties
away from zero, the input's scale), max pools exact, and the output layer's raw accumulators
``(acc + bias_q) s_x s_w``. Rounding and clamps pass gradients straight through (STE). The only
difference from the accelerator is that POST multiplies by the ``mult_bits`` fixed-point
``M = s_x s_w / s_y`` rather than the real quotient (relative error < 2**-23), which moves a code
by one only when a value sits on a rounding boundary; ``tests/test_qat.py`` measures the
agreement with :func:`compiler.quantize.simulate` (itself bit-exact with the golden model).

Methods
-------
* ``lsq`` (Esser et al. 2020): ``v_hat = round(clamp(v / s, -Q_N, Q_P)) * s`` with ``s``
  learned for every activation tensor and every weight output channel, its gradient scaled by
  ``1 / sqrt(N * Q_P)`` (``N``: elements per channel for weights, per image for activations;
  with Adam the scale mostly cancels). Everything starts from the PTQ result (its integer
  weights, corrected biases and scales: the first forward pass is the PTQ network), not LSQ's
  ``2 mean|v| / sqrt(Q_P)``.
* ``pact`` (Choi et al. 2018): every activation is clipped at a learned ``alpha`` (``s =
  alpha / Q_P``; the gradient reaches ``alpha`` through the clip only, as in the paper, with an
  L2 penalty ``pact_decay * alpha**2``), starting from the PTQ clip; weights use SAWB:
  per-channel ``alpha_w = c1 sqrt(E[w^2]) - c2 E|w|`` recomputed every step. SAWB's
  coefficients come from a least-squares fit of the MSE-optimal clip over several weight
  distributions; :func:`sawb_coefficients` re-does that fit for Quarry's grid (its 2**(b-1)
  negative and 2**(b-1) - 1 positive codes), so they differ from the paper's table, which is for a
  symmetric grid without zero.

Training: Adam on weights, biases and scales/clips with learning rates relative to each layer's
quantization step (:func:`_param_groups`; ``lr`` 0.05 = a twentieth of a weight step per Adam step), cosine learning rate, cross-entropy with the
zoo recipe's label smoothing, sampling and augmentation (:func:`compiler.pot.retrain_recipe`),
``epochs`` passes. Deterministic for a ``seed`` (seeded shuffling and augmentation,
deterministic kernels, fixed thread count). A tqdm bar shows loss and running accuracy.
"""

from __future__ import annotations

import copy
import functools
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hw.config import AccelConfig

__all__ = ["QAT_METHODS", "FakeQuantNet", "qat", "sawb_coefficients", "build", "DEFAULTS"]

QAT_METHODS = ("lsq", "pact")
#: Training defaults (keywords of :func:`qat`).
DEFAULTS = {"lr": 0.05, "scale_lr": 0.01, "pact_decay": 2e-4}


def _qerr(msg):
    from .quantize import QuantError

    return QuantError(msg)


# -- straight-through pieces ---------------------------------------------------------------------

def _round_ste(x):
    return x + (torch.round(x) - x).detach()


def _round_away(x):
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def _round_away_ste(x):
    return x + (_round_away(x) - x).detach()


def _grad_scale(s, g: float):
    """``s`` in the forward pass, gradient times ``g`` in the backward pass (LSQ)."""
    return (s - s * g).detach() + s * g


# -- SAWB ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def sawb_coefficients(bits: int) -> tuple[float, float]:
    """``(c1, c2)`` of SAWB's ``alpha = c1 sqrt(E[w^2]) - c2 E|w|`` for Quarry's ``bits``-bit weight
    grid (codes ``-2**(b-1) .. 2**(b-1) - 1``, scale ``alpha / (2**(b-1) - 1)``).

    As in the SAWB paper: for several unit-variance distributions (Gaussian, Laplace, uniform,
    logistic, Student-t with 4 degrees of freedom, and a 50/50 Gaussian/Laplace mix) find the clip
    with the least mean squared error on 100,000 seeded samples, and fit ``alpha`` on the two
    statistics by least squares without intercept."""
    from .quantize import qrange

    lo, hi = qrange(bits, True)
    rng = np.random.default_rng(bits)
    n = 50_000
    dists = [rng.standard_normal(n), rng.laplace(size=n), rng.uniform(-1, 1, n), rng.logistic(size=n),
             rng.standard_t(4, n), np.where(rng.uniform(size=n) < 0.5, rng.standard_normal(n), rng.laplace(size=n))]
    feats, best = [], []
    for w in dists:
        w = w / w.std()
        grid = np.linspace(0.05, 1.0, 200) * np.abs(w).max()
        err = [float(((w - np.clip(np.round(w / (a / hi)), lo, hi) * (a / hi)) ** 2).mean()) for a in grid]
        best.append(grid[int(np.argmin(err))])
        feats.append((math.sqrt(float((w ** 2).mean())), float(np.abs(w).mean())))
    A = np.array(feats)
    c, *_ = np.linalg.lstsq(A, np.array(best), rcond=None)
    return float(c[0]), float(-c[1])


# -- the fake-quantized network ------------------------------------------------------------------------

class FakeQuantNet(nn.Module):
    """The integer network of a PTQ ``QGraph`` in real units, with trainable weights, biases and
    scales (``lsq``) or clips (``pact``, SAWB weights). See the module docstring."""

    def __init__(self, qg, method: str = "lsq", init: str = "ptq"):
        super().__init__()
        if method not in QAT_METHODS:
            raise _qerr(f"QAT method must be one of {', '.join(QAT_METHODS)}, not {method!r}")
        if init not in ("ptq", "float"):
            raise _qerr(f"QAT init must be ptq or float, not {init!r}")
        from .kernels import avg_pool_mult

        self.method = method
        self.graph = qg.graph
        self.cfg = qg.config
        self.info = {}
        self.weights = nn.ParameterDict()
        self.biases = nn.ParameterDict()
        self.w_steps = nn.ParameterDict()
        self.a_steps = nn.ParameterDict()  # lsq: the step; pact: the clip alpha
        self.bias_max = (1 << (qg.config.bias_bits - 1)) - 1
        src = {}
        for l in self.graph.layers:
            ql = qg.layers[l.name]
            key = _key(l.name)
            info = {"lo": ql.lo, "hi": ql.hi, "signed": ql.signed, "layer": l}
            if l.kind in ("maxpool", "avgpool"):
                src[l.name] = src[l.inputs[0]]
                if l.kind == "avgpool":
                    kh, kw = l.kernel
                    m, s = avg_pool_mult(qg.config, kh * kw)
                    info["pool"] = (kh * kw, m / 2.0 ** s)
            else:
                src[l.name] = l.name
                if l.name != self.graph.output:
                    n = int(np.prod(l.shape))
                    info["g"] = 1.0 / math.sqrt(n * ql.hi)
                    v = ql.scale if method == "lsq" else ql.scale * ql.hi
                    self.a_steps[key] = nn.Parameter(torch.tensor(float(v)))
                    cap = 6.0 if l.act == "relu6" else l.act[1] if isinstance(l.act, tuple) else None
                    info["cap"] = cap
            if l.kind == "conv":
                if init == "ptq":  # the PTQ network itself: its integer weights and bias_q in real units
                    unit = qg.layers[l.inputs[0]].scale * np.asarray(ql.w_scale, np.float64)
                    w = torch.from_numpy(ql.w_q * np.asarray(ql.w_scale, np.float64).reshape(-1, 1, 1, 1)).float()
                    b = torch.from_numpy(ql.bias_q * unit).float()
                else:
                    w = l.weight.detach().clone().float()
                    b = l.bias.detach().clone().float() if l.bias is not None else torch.zeros(l.weight.shape[0])
                self.weights[key] = nn.Parameter(w)
                self.biases[key] = nn.Parameter(b)
                bits = ql.code_bits or qg.w_bits
                qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
                info["wq"] = (qmin, qmax, bits)
                info["gw"] = 1.0 / math.sqrt(int(np.prod(l.weight.shape[1:])) * qmax)
                if method == "lsq":
                    self.w_steps[key] = nn.Parameter(torch.from_numpy(np.asarray(ql.w_scale, np.float64)).float())
            self.info[l.name] = info
        self.src = src

    # scales ---------------------------------------------------------------------------------------
    def act_scale(self, name: str, train: bool = True):
        """Activation scale of tensor ``name`` (a pool: its input's); with LSQ's gradient scale."""
        name = self.src[name]
        info = self.info[name]
        p = self.a_steps[_key(name)]
        if self.method == "lsq":
            s = p.clamp(min=1e-8)
            if info["cap"] is not None:
                s = s.clamp(max=info["cap"] / info["hi"])
            return _grad_scale(s, info["g"]) if train else s
        a = p.clamp(min=1e-8)
        if info["cap"] is not None:
            a = a.clamp(max=info["cap"])
        return a / info["hi"]

    def weight_scale(self, name: str):
        info = self.info[name]
        qmin, qmax, bits = info["wq"]
        if self.method == "lsq":
            return _grad_scale(self.w_steps[_key(name)].clamp(min=1e-12), info["gw"]).reshape(-1, 1, 1, 1)
        w = self.weights[_key(name)].detach()
        flat = w.reshape(len(w), -1)
        c1, c2 = sawb_coefficients(bits)
        alpha = c1 * flat.pow(2).mean(1).sqrt() - c2 * flat.abs().mean(1)
        alpha = torch.where(alpha > 0, alpha, flat.abs().max(1).values.clamp(min=1e-8))
        return (alpha / qmax).reshape(-1, 1, 1, 1)

    def fake_weight(self, name: str):
        info = self.info[name]
        qmin, qmax, _ = info["wq"]
        w = self.weights[_key(name)]
        s = self.weight_scale(name)
        if self.method == "lsq":
            return _round_ste(torch.clamp(w / s, qmin, qmax)) * s
        wc = torch.maximum(torch.minimum(w, qmax * s), qmin * s)
        return wc + (torch.clamp(torch.round(wc / s), qmin, qmax) * s - wc).detach()

    def _quant_act(self, name: str, y, ties_away: bool):
        info = self.info[name]
        lo, hi = info["lo"], info["hi"]
        rnd = _round_away_ste if ties_away else _round_ste
        if self.method == "lsq":
            s = self.act_scale(name)
            return rnd(torch.clamp(y / s, lo, hi)) * s
        # PACT: clip at alpha (the gradient reaches alpha through the clip), quantize with STE.
        a = self.a_steps[_key(name)].clamp(min=1e-8)
        if info["cap"] is not None:
            a = a.clamp(max=info["cap"])
        s = a / hi
        yc = torch.minimum(y, a)
        yc = torch.maximum(yc, a * (lo / hi)) if lo < 0 else torch.relu(yc)
        sd = s.detach()
        q = torch.clamp((_round_away if ties_away else torch.round)(yc.detach() / sd), lo, hi) * sd
        return yc + (q - yc).detach()

    def forward(self, x):
        vals = {}
        for l in self.graph.layers:
            if l.kind == "input":
                y = self._quant_act(l.name, x, ties_away=False)
            elif l.kind == "conv":
                xin = vals[l.inputs[0]]
                sx = self.act_scale(l.inputs[0]).detach() if self.method == "pact" else self.act_scale(l.inputs[0])
                w = self.fake_weight(l.name)
                sw = self.weight_scale(l.name).reshape(-1)
                unit = sx * sw
                b = self.biases[_key(l.name)]
                bq = torch.clamp(_round_ste(b / unit), -self.bias_max - 1, self.bias_max) * unit
                y = F.conv2d(xin, w, bq, l.stride, l.padding, 1, l.groups)
                if l.residual:
                    y = y + vals[l.residual]
                if l.name != self.graph.output:
                    y = self._quant_act(l.name, y, ties_away=True)
            elif l.kind == "maxpool":
                y = F.max_pool2d(vals[l.inputs[0]], l.kernel, l.stride, l.padding)
            else:
                s = self.act_scale(l.name)
                info = self.info[l.name]
                count, m = info["pool"]
                codes = F.avg_pool2d(vals[l.inputs[0]] / s, l.kernel, l.stride, l.padding) * count
                src = self.info[self.src[l.name]]
                y = torch.clamp(_round_away_ste(codes * m), src["lo"], src["hi"]) * s
            vals[l.name] = y
        return vals[self.graph.output].reshape(len(x), -1)

    # export -----------------------------------------------------------------------------------------
    def export(self):
        """(graph with the trained float weights and biases, act_scales, w_scales) for
        :func:`compiler.quantize.quantize`."""
        g = copy.deepcopy(self.graph)
        act, wsc = {}, {}
        with torch.no_grad():
            for l in g.layers:
                if l.kind == "conv":
                    l.weight = self.weights[_key(l.name)].detach().clone()
                    l.bias = self.biases[_key(l.name)].detach().clone()
                    wsc[l.name] = self.weight_scale(l.name).reshape(-1).double().numpy()
                if l.kind in ("input", "conv") and l.name != g.output:
                    act[l.name] = float(self.act_scale(l.name, train=False))
        return g, act, wsc


def _key(name: str) -> str:
    return name.replace(".", "_")


# -- training ------------------------------------------------------------------------------------------

def _param_groups(net: FakeQuantNet, qg, lr: float, scale_lr: float) -> list[dict]:
    """Adam parameter groups with learning rates relative to each layer's quantization step.

    Adam moves every parameter by about its learning rate per step whatever the gradient's size,
    so one absolute rate is far too small for a layer whose weight step is 1.0 (nothing ever
    crosses a rounding boundary) and too large for one whose step is 0.01. Here a layer's weights
    move by about ``lr`` of their mean initial weight step per Adam step, its bias by ``lr`` of its
    output activation step (the output layer: of its mean initial |bias|), and every scale or clip
    by ``scale_lr`` of its initial value."""
    groups = []
    for l in net.graph.layers:
        if l.kind != "conv":
            continue
        key = _key(l.name)
        ws = float(np.mean(qg.layers[l.name].w_scale))
        groups.append({"params": [net.weights[key]], "lr": lr * ws})
        b0 = float(net.biases[key].detach().abs().mean())
        unit = qg.layers[l.name].scale if l.name != net.graph.output else max(b0, 1e-3)
        groups.append({"params": [net.biases[key]], "lr": lr * unit})
        if key in net.w_steps:
            groups.append({"params": [net.w_steps[key]], "lr": scale_lr * ws})
    for key, p in net.a_steps.items():
        groups.append({"params": [p], "lr": scale_lr * float(p.detach())})
    return groups


def qat(qg, x, y, *, method: str = "lsq", epochs: int = 3, lr: float = DEFAULTS["lr"],
        scale_lr: float = DEFAULTS["scale_lr"], pact_decay: float = DEFAULTS["pact_decay"], batch: int = 128,
        per_epoch: int | None = None, augment: dict | None = None, label_smoothing: float = 0.1, seed: int = 0,
        threads: int = 1, init: str = "ptq", progress: bool = True, log=None):
    """Fine-tune the PTQ graph ``qg`` on training images ``x`` / labels ``y``.

    ``init="ptq"`` starts from ``qg`` itself (weights ``w_q * s_w``, biases ``bias_q * s_x s_w``,
    its scales), so with ``lsq`` the first forward pass is the PTQ integer network, whatever
    rounding (GPTQ) and bias correction made it (``pact`` starts from the same weights and clips,
    but SAWB recomputes the weight scales, so its first pass already differs: on MNIST W2A2 it
    starts at 33 % against PTQ's 53 %); ``init="float"`` starts from the float weights with ``qg``'s
    scales. Returns ``(graph, act_scales, w_scales, record)``: pass the first three (with ``qg``'s
    bit widths) to :func:`compiler.quantize.quantize` to get the integer graph."""
    from . import zoo

    if epochs < 1:
        raise _qerr(f"QAT epochs must be >= 1, not {epochs}")
    old_threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    net = FakeQuantNet(qg, method, init)
    gen = torch.Generator().manual_seed(seed)
    n = min(per_epoch or len(x), len(x))
    steps = epochs * -(-n // batch)
    opt = torch.optim.Adam(_param_groups(net, qg, lr, scale_lr))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"QAT {method}", unit="step", leave=False)
    history = []
    try:
        for ep in range(epochs):
            perm = torch.randperm(len(x), generator=gen)[:n]
            tot_loss, correct, seen = 0.0, 0, 0
            for i in range(0, n, batch):
                idx = perm[i:i + batch]
                xb = x[idx]
                if augment:
                    xb = zoo.augment(xb, gen, **augment)
                out = net(xb)
                loss = F.cross_entropy(out, y[idx], label_smoothing=label_smoothing)
                if method == "pact":
                    loss = loss + pact_decay * sum(a ** 2 for a in net.a_steps.values())
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                tot_loss += loss.item() * len(idx)
                correct += int((out.argmax(1) == y[idx]).sum())
                seen += len(idx)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"epoch {ep + 1}/{epochs} loss {tot_loss / seen:.3f} acc {correct / seen:.3f}")
            history.append({"epoch": ep + 1, "loss": round(tot_loss / seen, 4), "train_acc": round(correct / seen, 4)})
            if log:
                log(f"  QAT {method} epoch {ep + 1}/{epochs}: loss {tot_loss / seen:.3f}, train accuracy "
                    f"{correct / seen:.3f} ({time.perf_counter() - t0:.0f} s)")
    finally:
        if bar is not None:
            bar.close()
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(det)
    net.eval()
    graph, act, wsc = net.export()
    record = {"method": method, "init": init, "epochs": epochs, "per_epoch": n, "batch": batch, "lr": lr, "scale_lr": scale_lr,
              "label_smoothing": label_smoothing, "augment": augment, "seed": seed, "history": history,
              "seconds": round(time.perf_counter() - t0, 1)}
    if method == "pact":
        record |= {"pact_decay": pact_decay,
                   "sawb": {b: sawb_coefficients(b) for b in sorted({i["wq"][2] for i in net.info.values() if "wq" in i})}}
    return graph, act, wsc, record


# -- PTQ -> (mixed precision) -> QAT -> integer graph ---------------------------------------------------

#: The PTQ that QAT starts from by default (:mod:`bench.accuracy`'s recommended setting).
QAT_START = {"method": "mse", "weight_method": "gptq", "bias_correction": "empirical"}


def build(graph, cfg: AccelConfig, calib, *, opts=None, w_bits: int | None = None, a_bits: int | None = None,
          layer_bits: dict | None = None, budget_bits: int | None = None, qat_method: str | None = None,
          train: tuple | None = None, epochs: int = 3, seed: int = 0, progress: bool = True, log=None,
          **qat_kw):
    """Quantize ``graph`` with optional per-layer bits under ``budget_bits`` (:mod:`compiler.mixed`),
    pinned ``layer_bits`` ({layer: (W, A)}), and optional QAT (``qat_method`` ``lsq``/``pact``
    on ``train = (x, y)``, starting from the PTQ network ``opts`` makes, default
    :data:`QAT_START`). Returns the :class:`~compiler.quantize.QGraph` with a
    ``quant_manifest`` that records all of it (the lowering puts it in the manifest)."""
    from . import mixed
    from .quantize import QuantOptions, quantize

    opts = opts or QuantOptions(**QAT_START)
    calib = torch.as_tensor(calib, dtype=torch.float32)
    wb, ab = w_bits or cfg.w_bits, a_bits or cfg.a_bits
    pinned = dict(layer_bits or {})
    mixed_rec = None
    if budget_bits is not None:
        bits, mixed_rec = mixed.plan(graph, cfg, calib, opts, budget_bits, a_bits=ab, pinned=pinned)
    else:
        bits = pinned
    qg = quantize(graph, cfg, calib, opts, w_bits=wb, a_bits=ab, layer_bits=bits)
    qat_rec = None
    if qat_method is not None:
        if train is None:
            raise _qerr("QAT needs training images and labels")
        if opts.weight_method not in ("minmax", "mse", "gptq"):
            raise _qerr(f"QAT trains INT weights, not weight_method {opts.weight_method}")
        g2, act, wsc, qat_rec = qat(qg, *train, method=qat_method, epochs=epochs, seed=seed, progress=progress,
                                    log=log, **qat_kw)
        qat_rec["start"] = {"method": opts.method, "weight_method": opts.weight_method,
                            "bias_correction": opts.bias_correction}
        # Every scale is given and the biases are trained: no estimator or correction may touch them.
        qg = quantize(g2, cfg, calib, QuantOptions("mse", weight_method="mse", bias_correction="none"),
                      w_bits=wb, a_bits=ab, layer_bits=bits,
                      act_scales=act, w_scales=wsc)
    o = qg.options
    per_layer = {l.name: [qg.layers[l.name].code_bits, qg.layers[l.name].hi.bit_length()
                          + (1 if qg.layers[l.name].signed else 0)]
                 for l in graph.layers if l.kind == "conv"}
    qg.quant_manifest = {"method": o.method if qat_method is None else qat_method,
                         "w_bits": wb, "a_bits": ab, "bias_correction": o.bias_correction if qat_method is None else "none",
                         "weight_method": o.weight_method if qat_method is None else qat_method,
                         "layer_bits": per_layer, "mixed": mixed_rec, "qat": qat_rec}
    return qg
