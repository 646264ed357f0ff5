"""Lowering: a quantized graph -> one Quarry program (instructions + weight/param images).

Every layer becomes a kernel from :mod:`compiler.kernels`; the graph's output layer (a conv or
linear) leaves its raw accumulators in acc memory, so the host reads exact integer logits.
"""

from __future__ import annotations

import numpy as np

from hw.isa import PoolMode
from hw.program import Program

from .builder import ProgramBuilder
from .kernels import KernelError, Requant
from .quantize import QGraph

__all__ = ["lower", "LowerError"]


class LowerError(ValueError):
    """A layer cannot be placed on the configured accelerator (names layer and memory)."""


def lower(qg: QGraph) -> Program:
    cfg = qg.config
    b = ProgramBuilder(cfg)
    tensors = {}
    layers_info = []
    out_info = None
    try:
        for l in qg.graph.layers:
            ql = qg.layers[l.name]
            info = {"name": l.name, "kind": l.kind, "shape": list(l.shape), "scale": ql.scale,
                    "signed": ql.signed}
            n0 = len(b.instrs)
            if l.kind == "input":
                tensors[l.name] = b.tensor(*l.shape, signed=ql.signed, name=l.name)
            elif l.kind == "conv" and l.name == qg.graph.output:
                x = tensors[l.inputs[0]]
                out_info = b.conv2d_to_acc(x, ql.w_q, stride=l.stride, padding=l.padding, groups=l.groups,
                                           name=l.name)
                xs = qg.layers[l.inputs[0]].scale
                out_info.update(bias_q=ql.bias_q.tolist(), scales=(xs * ql.w_scale).tolist())
            elif l.kind == "conv":
                x = tensors[l.inputs[0]]
                rq = Requant(bias=ql.bias_q, mult=ql.mult, shift=ql.shift, zp=0, lo=ql.lo, hi=ql.hi,
                             res_mult=ql.res_mult)
                tensors[l.name] = b.conv2d(x, ql.w_q, rq, stride=l.stride, padding=l.padding, groups=l.groups,
                                           residual=tensors[l.residual] if l.residual else None,
                                           out_signed=ql.signed, name=l.name)
            else:
                mode = PoolMode.MAX if l.kind == "maxpool" else PoolMode.AVG
                tensors[l.name] = b.pool2d(tensors[l.inputs[0]], mode, l.kernel, stride=l.stride,
                                           padding=l.padding, name=l.name)
            if l.name in tensors:
                info["spad_base"] = tensors[l.name].base
            info["instructions"] = len(b.instrs) - n0
            layers_info.append(info)
    except KernelError as e:
        raise LowerError(f"layer {l.name}: {e}") from None
    if out_info is None:
        raise LowerError(f"the model output ({qg.graph.output}) must be a conv or linear layer")
    inp = qg.graph.layers[0]
    manifest = {
        "input": {"spad_base": tensors[inp.name].base, "shape": list(inp.shape),
                  "scale": qg.layers[inp.name].scale, "signed": qg.layers[inp.name].signed},
        "output": out_info,
        "layers": layers_info,
        "quant": {"method": qg.options.method, "w_bits": qg.w_bits, "a_bits": qg.a_bits,
                  "bias_correction": qg.options.bias_correction},
    }
    return b.build(manifest)
