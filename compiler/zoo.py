"""Reference models, trained deterministically on the CPU and cached under ``build/zoo``.

``quarry_cnn`` (the bundled default): conv-BN-ReLU, max-pool, one residual block, a depthwise
3x3 (stride 2) and a pointwise conv, global average pooling and a linear classifier
(about 1.05 M MACs at width 16: a 16-channel layer fills a 16x16 array exactly).

Training (:data:`RECIPES`): AdamW with a one-cycle learning rate and label smoothing; MNIST
(4,000 images) adds random affine augmentation (small shifts, rotations and zooms), Fashion-MNIST
draws 10,000 of its 60,000 images per epoch. Measured on an idle 2-core machine: MNIST 52 s,
Fashion-MNIST 122 s. It is deterministic: seeded generators for
initialisation, shuffling and augmentation, ``torch.use_deterministic_algorithms`` and a fixed
thread count (CPU kernels may split reductions differently with another thread count). The
cache file name carries :data:`RECIPE_VERSION`, so a changed recipe never loads stale weights;
a JSON sidecar records how the cached model was trained.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data

__all__ = ["QuarryCNN", "PeerLeNet", "trained", "train", "evaluate", "info", "MODELS", "RECIPES", "RECIPE_VERSION"]

#: Bump when a recipe or model changes: cached weights are keyed by it.
RECIPE_VERSION = 2
#: Threads used for training, whatever the machine has (determinism; see module docstring).
TRAIN_THREADS = 2


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


class PeerLeNet(nn.Module):
    """The network ../shared/PEERS.md measured NNgen on (``bench.peers``): conv 3x3 1->8 (no
    padding) + ReLU, max-pool 2, conv 3x3 8->16 + ReLU, max-pool 2, linear 400->10; 192,064 MACs."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 8, 3)
        self.conv1 = nn.Conv2d(8, 16, 3)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(16 * 5 * 5, classes)

    def forward(self, x):
        x = self.pool(self.relu(self.conv0(x)))
        x = self.pool(self.relu(self.conv1(x)))
        return self.fc(torch.flatten(x, 1))


MODELS = {"quarry_cnn": QuarryCNN, "peer_lenet": PeerLeNet}

#: Per data set training recipe. ``per_epoch``: training images drawn (without replacement) per
#: epoch, ``None`` for all; ``shift`` in pixels, ``rotate`` in degrees, ``scale`` relative.
RECIPES = {
    "mnist": {"epochs": 60, "batch": 128, "lr": 1e-2, "weight_decay": 1e-4, "label_smoothing": 0.1,
              "per_epoch": None, "shift": 2.0, "rotate": 10.0, "scale": 0.1, "hflip": False},
    # No augmentation: at this width the model underfits Fashion-MNIST, and shifts or flips cost
    # 0.4-1.5 points on a held-out part of the training set; more samples help instead.
    "fashion": {"epochs": 40, "batch": 128, "lr": 1e-2, "weight_decay": 1e-4, "label_smoothing": 0.1,
                "per_epoch": 10_000, "shift": 0.0, "rotate": 0.0, "scale": 0.0, "hflip": False},
}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).float().mean())


def augment(x: torch.Tensor, g: torch.Generator, shift: float = 0.0, rotate: float = 0.0, scale: float = 0.0,
            hflip: bool = False) -> torch.Tensor:
    """Random affine warp per image (zero fill): uniform shift in +-``shift`` px, rotation in
    +-``rotate`` degrees, zoom in 1 +- ``scale``; optional random horizontal flip.

    Without rotation and zoom the shift is a whole number of pixels and sampling is nearest, so
    the image is moved, not blurred (sub-pixel bilinear shifts cost Fashion-MNIST accuracy)."""
    n, _, h, w = x.shape
    u = lambda: torch.rand(n, generator=g) * 2 - 1  # noqa: E731
    ang, zoom = u() * math.radians(rotate), 1 + u() * scale
    rigid = rotate == 0 and scale == 0
    dx, dy = u() * shift, u() * shift
    if rigid:
        dx, dy = torch.round(dx), torch.round(dy)
    tx, ty = dx * 2 / w, dy * 2 / h
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if hflip else torch.ones(n)
    cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest" if rigid else "bilinear", padding_mode="zeros",
                         align_corners=False)


def train(name: str, dataset: str, epochs: int | None = None, seed: int = 0, log=print,
          recipe: dict | None = None, threads: int | None = None) -> tuple[nn.Module, dict]:
    """Train ``name`` on ``dataset`` with its recipe on ``threads`` threads (default
    :data:`TRAIN_THREADS`); returns (model, training record)."""
    rc = dict(RECIPES[dataset], **(recipe or {}))
    if epochs is not None:
        rc["epochs"] = epochs
    xtr, ytr, xte, yte = data.load(dataset)
    train_threads = threads or TRAIN_THREADS
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(train_threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MODELS[name]()
        g = torch.Generator().manual_seed(seed)
        per_epoch = min(rc["per_epoch"] or len(xtr), len(xtr))
        bs = rc["batch"]
        opt = torch.optim.AdamW(model.parameters(), lr=rc["lr"], weight_decay=rc["weight_decay"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=rc["lr"], pct_start=0.25,
                                                    total_steps=rc["epochs"] * -(-per_epoch // bs))
        t0, c0 = time.perf_counter(), time.process_time()
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=rc["epochs"] * -(-per_epoch // bs), desc=f"train {name} {dataset}", unit="step",
                   leave=False, dynamic_ncols=True)
        for ep in range(rc["epochs"]):
            model.train()
            perm = torch.randperm(len(xtr), generator=g)[:per_epoch]
            for i in range(0, per_epoch, bs):
                idx = perm[i:i + bs]
                xb = xtr[idx]
                if rc["shift"] or rc["rotate"] or rc["scale"] or rc["hflip"]:
                    xb = augment(xb, g, rc["shift"], rc["rotate"], rc["scale"], rc["hflip"])
                loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=rc["label_smoothing"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
            if (ep + 1) % 10 == 0 or ep + 1 == rc["epochs"]:
                log(f"  epoch {ep + 1}/{rc['epochs']}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
        bar.close()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        model.eval()
        acc = evaluate(model, xte, yte)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    log(f"  test top-1 {acc:.4f} on {len(xte)} images, {seconds:.0f} s")
    record = {"model": name, "dataset": dataset, "recipe_version": RECIPE_VERSION, "recipe": rc, "seed": seed,
              "epochs": rc["epochs"], "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
              "threads": train_threads,
              "test_top1": acc, "test_images": len(xte), "torch": torch.__version__}
    return model, record


def _paths(name: str, dataset: str, cache: Path, epochs: int | None = None,
           threads: int | None = None) -> tuple[Path, Path]:
    stem = (Path(cache) / f"{name}-{dataset}-r{RECIPE_VERSION}{'' if epochs is None else f'-e{epochs}'}"
            f"{'' if threads is None else f'-t{threads}'}")
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


def info(name: str = "quarry_cnn", dataset: str = "mnist", cache: Path = Path("build/zoo"),
         epochs: int | None = None, threads: int | None = None) -> dict | None:
    """Training record of the cached model (``epochs``, ``threads``: the one trained with those
    overrides), or ``None`` if it is not cached."""
    _, meta = _paths(name, dataset, cache, epochs, threads)
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError):
        return None


def trained(name: str = "quarry_cnn", dataset: str = "mnist", cache: Path = Path("build/zoo"),
            epochs: int | None = None, log=print, threads: int | None = None) -> nn.Module:
    """Load the cached trained model, training (deterministically) if the cache is empty.

    ``epochs`` overrides the recipe's epoch count (the one-cycle schedule is compressed to fit),
    ``threads`` :data:`TRAIN_THREADS` (CPU kernels may reduce differently with another count). The
    result is not the reference model: it is cached under its own name (``...-e<epochs>-t<threads>.pt``),
    never in place of the reference weights. ``python -m bench --quick`` uses this.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    path, meta = _paths(name, dataset, cache, epochs, threads)
    model = MODELS[name]()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Several processes (pytest-xdist workers, a benchmark next to the tests) may ask for the
        # same model at once: one trains, the others wait for it and load its result.
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                what = "" if epochs is None else f" for {epochs} epochs (not the reference recipe)"
                what += "" if threads is None else f" on {threads} thread(s)"
                log(f"training {name} on {dataset}{what} (cached at {path}) ...")
                model, record = train(name, dataset, epochs, log=log, threads=threads)
                for dst, write in ((path, lambda p: torch.save(model.state_dict(), p)),
                                   (meta, lambda p: p.write_text(json.dumps(record, indent=1) + "\n"))):
                    tmp = dst.with_suffix(dst.suffix + f".{os.getpid()}.tmp")
                    write(tmp)
                    tmp.replace(dst)
                return model
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()
