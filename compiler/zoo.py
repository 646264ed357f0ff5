"""Reference models, trained deterministically on the CPU and cached under ``build/zoo``.

``quarry_cnn`` (the bundled default): conv-BN-ReLU, max-pool, one residual block, a depthwise
3x3 (stride 2) and a pointwise conv, global average pooling and a linear classifier.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from . import data

__all__ = ["QuarryCNN", "trained", "evaluate", "MODELS"]


class QuarryCNN(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.res1 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.res2 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w))
        self.relu = nn.ReLU()
        self.dw = nn.Sequential(nn.Conv2d(w, w, 3, stride=2, padding=1, groups=w, bias=False),
                                nn.BatchNorm2d(w), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(w, 2 * w, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = self.relu(self.res2(self.res1(x)) + x)
        x = self.pw(self.dw(x))
        return self.fc(torch.flatten(self.gap(x), 1))


MODELS = {"quarry_cnn": QuarryCNN}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).float().mean())


def train(name: str, dataset: str, epochs: int = 8, seed: int = 0, log=print) -> nn.Module:
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = data.load(dataset)
    model = MODELS[name]()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * (-(-len(xtr) // 64)))
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"  epoch {ep + 1}/{epochs}: loss {loss.item():.3f}, test acc {evaluate(model, xte, yte):.4f} "
            f"({time.perf_counter() - t0:.0f} s)")
    return model.eval()


def trained(name: str = "quarry_cnn", dataset: str = "mnist", cache: Path = Path("build/zoo"),
            epochs: int | None = None, log=print) -> nn.Module:
    """Load the cached trained model, training (deterministically) if the cache is empty."""
    path = Path(cache) / f"{name}-{dataset}.pt"
    model = MODELS[name]()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    log(f"training {name} on {dataset} (cached at {path}) ...")
    model = train(name, dataset, epochs or (8 if dataset == "mnist" else 3), log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model
