"""Quarry compiler: PyTorch CNN -> quantized integer graph -> Quarry program + weight ROMs."""

from __future__ import annotations

__all__ = ["compile", "CompileError"]


class CompileError(ValueError):
    """Any compile failure a user can fix (unsupported op, memory too small, bad option)."""


def compile(model, calibration, config, *, method: str = "percentile", w_bits: int | None = None,
            a_bits: int | None = None, bias_correction: bool = False, weight_method: str = "minmax"):
    """Quantize ``model`` with ``calibration`` images (N, C, H, W) and lower it for ``config``.

    Returns a :class:`hw.program.Program` whose manifest describes the input quantization and
    where the raw output accumulators are.
    """
    from .frontend import capture
    from .lower import lower
    from .quantize import QuantOptions, quantize

    graph = capture(model, tuple(calibration.shape[1:]))
    opts = QuantOptions(method=method, bias_correction=bias_correction, weight_method=weight_method)
    return lower(quantize(graph, config, calibration, opts, w_bits=w_bits, a_bits=a_bits))
