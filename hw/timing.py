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
    """Cycles from a vector's address cycle to its accumulator write (inclusive of both ends).

    Spad read (1), mask (1), row skew (rows - 1), psum down the rows (rows), column de-skew
    (cols - 1), acc read (1), acc write (1).
    """
    return 2 * cfg.rows + cfg.cols + 2


def post_latency(cfg: AccelConfig) -> int:
    """Cycles from a POST row's acc read to its spad write: read, add bias, multiply, add
    residual, round+shift, clamp+write."""
    return 6


def pool_latency(cfg: AccelConfig) -> int:
    """Cycles from the last window read of a POOL output pixel to its spad write."""
    return 4
