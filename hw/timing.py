"""Pipeline timing of the generated accelerator, as functions of the config.

The RTL (``hw.top``) sizes its drain counters from these functions, and the cycle model in
``sim.golden`` uses them to predict cycles; ``tests/test_rtl_system.py`` checks the prediction
against the RTL's cycle counter. Cycle numbering: the cycle after ``start`` is 0; the first
instruction can issue in cycle 1 (one cycle of instruction-memory read latency); at most one
instruction issues per cycle.
"""

from __future__ import annotations

from .config import AccelConfig

__all__ = ["preload_busy", "matmul_drain", "matmul_latency", "post_latency", "pool_latency"]


def preload_busy(cfg: AccelConfig) -> int:
    """Cycles from PRELOAD issue until the loader (and the bank it fills) is free/ready.

    One wmem read per weight row, plus one cycle of read latency, plus the issue cycle.
    """
    return cfg.rows + 2


def matmul_drain(cfg: AccelConfig) -> int:
    """Cycles after a MATMUL's last vector is issued during which its weight bank is still read.

    Spad read (1) + zero-mask register (1) + row skew (rows - 1) + one PE per column (cols) + 1.
    """
    return cfg.rows + cfg.cols + 2


def matmul_latency(cfg: AccelConfig) -> int:
    """Cycles from a MATMUL's last vector address cycle until the array pipeline is empty.

    Spad read (1), mask register (1), array (rows + cols - 1, skew included), acc read (1),
    acc write (1), plus the cycle in which an idle engine may issue.
    """
    return cfg.rows + cfg.cols + 3


def post_latency(cfg: AccelConfig) -> int:
    """Cycles from a POST row's acc read to its spad write: read, add bias, multiply, add
    residual, round+shift, clamp+write."""
    return 6


def pool_latency(cfg: AccelConfig) -> int:
    """Cycles from POOL's last window read until the pool engine is idle: data (1), fold (1),
    average multiply (1), round/clamp (1), write (1)."""
    return 5
