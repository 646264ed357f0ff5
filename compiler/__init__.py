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

    A model already quantized with PyTorch's FX flow (``convert_fx``) is imported with its own
    scales and zero points (:mod:`compiler.fx_import`); ``calibration`` then only gives the input
    shape, and the quantization options must be left at their defaults.
    """
    from .frontend import capture, check_calibration
    from .fx_import import compile_fx, is_fx_quantized
    from .lower import lower
    from .quantize import QuantOptions, quantize

    calibration = check_calibration(calibration)
    if is_fx_quantized(model):
        given = [name for name, v, default in (("method", method, "percentile"), ("w_bits", w_bits, None),
                                               ("a_bits", a_bits, None), ("bias_correction", bias_correction, False),
                                               ("weight_method", weight_method, "minmax")) if v != default]
        if given:
            raise CompileError(f"the model is already quantized by PyTorch (FX): {', '.join(given)} do not apply")
        return compile_fx(model, tuple(calibration.shape[1:]), config)
    graph = capture(model, tuple(calibration.shape[1:]))
    opts = QuantOptions(method=method, bias_correction=bias_correction, weight_method=weight_method)
    return lower(quantize(graph, config, calibration, opts, w_bits=w_bits, a_bits=a_bits))
