"""Quarry compiler: PyTorch CNN -> quantized integer graph -> Quarry program + weight ROMs."""

from __future__ import annotations

__all__ = ["compile", "CompileError"]


class CompileError(ValueError):
    """Any compile failure a user can fix (unsupported op, memory too small, bad option)."""


def compile(model, calibration, config, *, method: str = "percentile", w_bits: int | None = None,
            a_bits: int | None = None, bias_correction: bool | str = False, weight_method: str = "minmax",
            inq_retrain: dict | None = None, **pot_options):
    """Quantize ``model`` with ``calibration`` images (N, C, H, W) and lower it for ``config``.

    Returns a :class:`hw.program.Program` whose manifest describes the input quantization and
    where the raw output accumulators are.

    A model already quantized with PyTorch's FX flow (``convert_fx``) is imported with its own
    scales and zero points (:mod:`compiler.fx_import`), and so is a PT2E graph from torchao's
    ``convert_pt2e`` (:mod:`compiler.pt2e`, e.g. with ``QuarryQuantizer``); ``calibration`` then
    only gives the input shape, and the quantization options must be left at their defaults.

    Power-of-two weights (``weight_method`` ``inq``, ``doubleq``, ``doubleqext``) take the
    :class:`~compiler.quantize.QuantOptions` fields ``pot_bits``, ``pot_granularity``,
    ``pot_scale``, ``pot_rounding``, ``pot_budget`` and ``pot_layers`` as keywords. ``inq_retrain`` (``inq`` only)
    runs INQ's incremental re-training first: a dict with the training images ``x`` and labels
    ``y`` and any other keyword of :func:`compiler.pot.inq_retrain` (``epochs``, ``seed``, ...).
    """
    from .frontend import capture, check_calibration
    from .fx_import import compile_fx, is_fx_quantized
    from .lower import lower
    from .quantize import QuantOptions, quantize

    calibration = check_calibration(calibration)
    if _is_pt2e_quantized(model):  # torchao convert_pt2e output (compiler.pt2e): its own numbers
        given = [name for name, v, default in (("method", method, "percentile"), ("w_bits", w_bits, None),
                                               ("a_bits", a_bits, None), ("bias_correction", bias_correction, False),
                                               ("weight_method", weight_method, "minmax"),
                                               ("inq_retrain", inq_retrain, None)) if v != default]
        if given or pot_options:
            raise CompileError(f"the model is already quantized by PT2E: {', '.join(given + sorted(pot_options))} "
                               "do not apply")
        from .pt2e import compile_pt2e

        return compile_pt2e(model, tuple(calibration.shape[1:]), config)
    if is_fx_quantized(model):
        given = [name for name, v, default in (("method", method, "percentile"), ("w_bits", w_bits, None),
                                               ("a_bits", a_bits, None), ("bias_correction", bias_correction, False),
                                               ("weight_method", weight_method, "minmax"),
                                               ("inq_retrain", inq_retrain, None)) if v != default]
        given += sorted(pot_options)
        if given:
            raise CompileError(f"the model is already quantized by PyTorch (FX): {', '.join(given)} do not apply")
        return compile_fx(model, tuple(calibration.shape[1:]), config)
    unknown = sorted(set(pot_options) - POT_OPTIONS)
    if unknown:
        raise TypeError(f"compile() got an unexpected keyword argument {unknown[0]!r}")
    opts = QuantOptions(method=method, bias_correction=bias_correction, weight_method=weight_method, **pot_options)
    if inq_retrain is not None and weight_method != "inq":
        raise CompileError(f"inq_retrain applies to weight_method inq, not {weight_method}")
    graph = capture(model, tuple(calibration.shape[1:]))
    record = None
    if inq_retrain is not None:
        from .pot import inq_retrain as retrain

        kw = dict(inq_retrain)
        bits = opts.pot_bits or w_bits or config.w_bits
        graph, record = retrain(graph, kw.pop("x"), kw.pop("y"), config, bits, granularity=opts.pot_granularity, **kw)
    qg = quantize(graph, config, calibration, opts, w_bits=w_bits, a_bits=a_bits)
    if record is not None:  # the manifest's quant.pot_selection says how the weights were trained
        qg.pot_info = dict(qg.pot_info or {}, inq_retrain=record)
    return lower(qg)


def _is_pt2e_quantized(model) -> bool:
    """A ``GraphModule`` from torchao's ``convert_pt2e`` (quantized_decomposed Q/DQ nodes); checked
    here so that compiling any other model does not import torchao."""
    import torch.fx as fx

    return isinstance(model, fx.GraphModule) and any(
        n.op == "call_function" and getattr(n.target, "namespace", None) == "quantized_decomposed"
        for n in model.graph.nodes)


#: Keywords of :func:`compile` that go to ``QuantOptions`` (power-of-two weights).
POT_OPTIONS = frozenset({"pot_bits", "pot_granularity", "pot_scale", "pot_rounding", "pot_budget", "pot_layers",
                         "dsconv_block", "bfp"})
