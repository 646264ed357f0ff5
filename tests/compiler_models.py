"""Small models for the compiler tests: seeded random CNNs over every supported op, factories
for the CLI tests (``python -m compiler tests.compiler_models:tiny --input-shape 1x8x8``), and
helpers that run a compiled model on the golden machine.

Nothing here trains: weights are random (seeded), BatchNorm statistics are random so folding is
not the identity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hw.program import Program, decode_output, output_region, quantize_input
from sim.golden import Machine

__all__ = ["RandomNet", "random_net", "tiny", "bad", "Bad", "Tiny", "ACTS", "ROOT", "run_golden", "acc_to_chw"]

ROOT = Path(__file__).resolve().parent.parent

#: Activation forms a random conv block may use ("none": no activation).
ACTS = ("ReLU", "ReLU6", "Hardtanh", "torch.relu", "F.relu", "Tensor.relu", "F.relu6", "F.hardtanh", "none")


def _bn(c: int, g: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(c, generator=g))
        bn.bias.copy_(0.2 * torch.randn(c, generator=g))
        bn.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return bn.eval()


class RandomNet(nn.Module):
    """A random stack of blocks; ``plan`` is a list of (kind, options) replayed by ``forward``.

    Block kinds: ``conv`` (dense/grouped/depthwise, any kernel/stride/padding, optional BN and
    activation in module or functional form), ``res`` (conv + residual add via ``+``/``torch.add``/
    ``+=``, operand order varies), ``pool`` (max/avg, module or functional, optional ReLU after a
    max-pool), then a head (global average pool, flatten/view and one or two Linear, or a
    1x1 conv output).
    """

    def __init__(self, seed: int, in_shape=(3, 9, 9)):
        super().__init__()
        rng = np.random.default_rng(seed)
        g = torch.Generator().manual_seed(seed)
        self.mods = nn.ModuleList()
        self.plan = []
        c, h, w = in_shape
        self.in_shape = tuple(in_shape)

        def add(m):
            self.mods.append(m)
            return len(self.mods) - 1

        def act_choice():
            """(form, module index or None): module, functional and method activations."""
            form = str(rng.choice(list(ACTS)))
            hi = float(rng.uniform(0.5, 3))
            mod = {"ReLU": lambda: nn.ReLU(), "ReLU6": lambda: nn.ReLU6(),
                   "Hardtanh": lambda: nn.Hardtanh(0.0, hi)}.get(form)
            return dict(act=form, act_mod=add(mod()) if mod else None, hi=hi)

        for _ in range(int(rng.integers(2, 5))):
            kind = str(rng.choice(["conv", "conv", "res", "pool"]))
            if kind == "pool" and min(h, w) >= 2:
                k = int(rng.integers(1, min(3, h, w) + 1))
                s = int(rng.integers(1, 3))
                p = int(rng.integers(0, k // 2 + 1))
                mode = str(rng.choice(["max", "avg", "max_f", "avg_f"]))
                relu_after = mode.startswith("max") and bool(rng.integers(0, 2)) and self.plan \
                    and self.plan[-1][0] == "conv"
                if relu_after:  # relu(maxpool(conv)): the front end moves the ReLU into the conv
                    self.plan[-1][1].update(act="none", act_mod=None)
                mod = None
                if mode == "max":
                    mod = add(nn.MaxPool2d(k, s, p))
                elif mode == "avg":
                    mod = add(nn.AvgPool2d(k, s, p))
                self.plan.append(("pool", dict(mode=mode, mod=mod, k=k, s=s, p=p, relu_after=bool(relu_after))))
                h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            elif kind == "res":
                k = int(rng.choice([1, 3]))
                conv = nn.Conv2d(c, c, k, padding=k // 2, bias=bool(rng.integers(0, 2)))
                self.plan.append(("res", dict(
                    conv=add(conv), bn=add(_bn(c, g)) if rng.integers(0, 2) else None,
                    op=str(rng.choice(["plus", "torch_add", "iadd"])), conv_first=bool(rng.integers(0, 2)),
                    relu=bool(rng.integers(0, 2)))))
            else:
                mode = str(rng.choice(["dense", "depthwise", "grouped"]))
                kh, kw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
                kh, kw = min(kh, h + 2), min(kw, w + 2)
                sh, sw = int(rng.integers(1, 3)), int(rng.integers(1, 3))
                ph, pw = int(rng.integers(0, kh // 2 + 1)), int(rng.integers(0, kw // 2 + 1))
                if h + 2 * ph < kh or w + 2 * pw < kw:
                    continue
                if mode == "depthwise":
                    groups, cout = c, c * int(rng.integers(1, 3))
                elif mode == "grouped" and c > 1 and any(c % d == 0 for d in range(2, c + 1)):
                    groups = int(rng.choice([d for d in range(2, c + 1) if c % d == 0]))
                    cout = groups * int(rng.integers(1, 3))
                else:
                    groups, cout = 1, int(rng.integers(1, 10))
                conv = nn.Conv2d(c, cout, (kh, kw), (sh, sw), (ph, pw), groups=groups, bias=bool(rng.integers(0, 2)))
                self.plan.append(("conv", dict(conv=add(conv), bn=add(_bn(cout, g)) if rng.integers(0, 2) else None,
                                               mode=mode, **act_choice())))
                c, h, w = cout, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        head = str(rng.choice(["gap_linear", "flatten_linear", "view_mlp", "conv1x1"]))
        n_out = int(rng.integers(1, 8))
        if head == "conv1x1":
            self.plan.append(("head_conv", dict(conv=add(nn.Conv2d(c, n_out, 1)))))
        elif head == "gap_linear":
            self.plan.append(("head_gap", dict(gap=add(nn.AdaptiveAvgPool2d(1)), fc=add(nn.Linear(c, n_out)))))
        elif head == "flatten_linear":
            self.plan.append(("head_flat", dict(flat=add(nn.Flatten()), fc=add(nn.Linear(c * h * w, n_out)))))
        else:
            hid = int(rng.integers(1, 12))
            self.plan.append(("head_mlp", dict(fc1=add(nn.Linear(c * h * w, hid)), fc2=add(nn.Linear(hid, n_out)))))
        with torch.no_grad():  # weights from the seeded generator, not torch's global one
            for m in self.mods:
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    fan_in = m.weight[0].numel()
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.5 / fan_in) ** 0.5)
                    if m.bias is not None:
                        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        self.eval()

    def _act(self, x, o):
        if o["act_mod"] is not None:
            return self.mods[o["act_mod"]](x)
        act = o["act"]
        if act == "torch.relu":
            return torch.relu(x)
        if act == "F.relu":
            return F.relu(x)
        if act == "Tensor.relu":
            return x.relu()
        if act == "F.relu6":
            return F.relu6(x)
        if act == "F.hardtanh":
            return F.hardtanh(x, 0.0, o["hi"])
        return x

    def forward(self, x):
        m = self.mods
        for kind, o in self.plan:
            if kind == "conv":
                x = m[o["conv"]](x)
                if o["bn"] is not None:
                    x = m[o["bn"]](x)
                x = self._act(x, o)
            elif kind == "res":
                y = m[o["conv"]](x)
                if o["bn"] is not None:
                    y = m[o["bn"]](y)
                if o["op"] == "plus":
                    x = (y + x) if o["conv_first"] else (x + y)
                elif o["op"] == "torch_add":
                    x = torch.add(y, x) if o["conv_first"] else torch.add(x, y)
                else:
                    y += x
                    x = y
                if o["relu"]:
                    x = F.relu(x)
            elif kind == "pool":
                k, s, p = o["k"], o["s"], o["p"]
                if o["mod"] is not None:
                    x = m[o["mod"]](x)
                elif o["mode"] == "max_f":
                    x = F.max_pool2d(x, kernel_size=k, stride=s, padding=p)
                else:
                    x = F.avg_pool2d(x, k, s, p)
                if o["relu_after"]:
                    x = F.relu(x)
            elif kind == "head_conv":
                x = m[o["conv"]](x)
            elif kind == "head_gap":
                x = m[o["fc"]](torch.flatten(m[o["gap"]](x), 1))
            elif kind == "head_flat":
                x = m[o["fc"]](m[o["flat"]](x))
            else:
                x = m[o["fc2"]](F.relu(m[o["fc1"]](x.view(x.size(0), -1))))
        return x


def random_net(seed: int, in_shape=(3, 9, 9)) -> RandomNet:
    return RandomNet(seed, in_shape)


class Tiny(nn.Module):
    """conv-BN-ReLU, max-pool, linear: compiles in a fraction of a second."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(x, 1))


class Bad(nn.Module):
    """Uses torch.sigmoid and an LSTM: both must be reported by the pre-flight check."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.lstm = nn.LSTM(36, 8)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        x = torch.sigmoid(self.conv(x))
        y, _ = self.lstm(x.flatten(2))
        return self.fc(y.flatten(1))


def tiny() -> nn.Module:
    return Tiny().eval()


def bad() -> nn.Module:
    return Bad().eval()


# -- running compiled models on the golden machine ---------------------------------------------------

def run_golden(prog: Program, x: torch.Tensor):
    """Run every image of a batch; returns (decoded float outputs (N, -1), raw acc rows, machines)."""
    outs, accs, machines = [], [], []
    for img in x:
        m = Machine(prog.config)
        addr, rows = quantize_input(prog, img.numpy())
        m.spad[addr:addr + len(rows)] = rows
        m.run(prog)
        a0, n = output_region(prog)
        accs.append(m.acc[a0:a0 + n].copy())
        outs.append(decode_output(prog, accs[-1]).reshape(-1))
        machines.append(m)
    return np.stack(outs), np.stack(accs), machines


def acc_to_chw(prog, acc):
    o = prog.manifest["output"]
    C = prog.config.cols
    a = acc.reshape(o["blocks"], o["h"] * o["w"], C).transpose(0, 2, 1).reshape(o["blocks"] * C, o["h"], o["w"])
    return a[:o["channels"]]
