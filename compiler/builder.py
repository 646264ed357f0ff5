"""Assemble layer kernels into one program: memory allocation + instruction stream + images."""

from __future__ import annotations

import numpy as np

from hw import isa
from hw.config import AccelConfig
from hw.isa import PoolMode
from hw.program import Program, pack_rows

from .kernels import Kernel, KernelError, Requant, SpadTensor, conv2d, pool2d

__all__ = ["ProgramBuilder"]


class ProgramBuilder:
    """Bump-allocates spad tensors, weight rows and param rows, and concatenates kernels.

    >>> b = ProgramBuilder(cfg)
    >>> x = b.tensor(1, 28, 28)
    >>> y = b.conv2d(x, w, rq, padding=(1, 1))
    >>> prog = b.build(manifest={"input": ..., "output": ...})
    """

    def __init__(self, cfg: AccelConfig):
        self.cfg = cfg
        self.instrs: list[isa.Instr] = []
        self._spad = 0
        self._wmem: list[np.ndarray] = []
        self._w_rows = 0
        self._params: list[dict] = []
        self._p_rows = 0
        self.macs = 0

    def _need(self, memory: str, used: int, depth: int, what: str):
        if used > depth:
            raise KernelError(f"{what}: {memory} needs {used} rows, {memory}_depth is {depth}")

    def tensor(self, c: int, h: int, w: int, signed: bool = False, name: str = "tensor") -> SpadTensor:
        t = SpadTensor(self._spad, c, h, w, signed)
        self._need("spad", self._spad + t.rows(self.cfg), self.cfg.spad_depth, name)
        self._spad += t.rows(self.cfg)
        return t

    def add(self, k: Kernel, name: str = "kernel") -> None:
        if k.wmem is not None and len(k.wmem):
            self._need("wmem", self._w_rows + len(k.wmem), self.cfg.wmem_depth, name)
            self._wmem.append(k.wmem)
            self._w_rows += len(k.wmem)
        if k.params is not None:
            n = len(k.params["bias"])
            self._need("param", self._p_rows + n, self.cfg.param_depth, name)
            self._params.append(k.params)
            self._p_rows += n
        self.instrs.extend(k.instrs)
        self.macs += k.macs

    def conv2d(self, x: SpadTensor, w, rq: Requant, *, stride=(1, 1), padding=(0, 0), groups: int = 1,
               residual: SpadTensor | None = None, out_signed: bool = False, name: str = "conv") -> SpadTensor:
        w = np.asarray(w)
        kh, kw = w.shape[2:]
        oh = (x.h + 2 * padding[0] - kh) // stride[0] + 1
        ow = (x.w + 2 * padding[1] - kw) // stride[1] + 1
        y = self.tensor(w.shape[0], oh, ow, out_signed, name)
        k = conv2d(self.cfg, x, y, w, rq, stride=stride, padding=padding, groups=groups,
                   w_base=self._w_rows, param_base=self._p_rows, residual=residual)
        self.add(k, name)
        return y

    def conv2d_to_acc(self, x: SpadTensor, w, *, stride=(1, 1), padding=(0, 0), groups: int = 1,
                      acc_base: int = 0, name: str = "conv") -> dict:
        """A conv whose raw accumulators stay in acc (block ``j`` at ``acc_base + j*oh*ow``)."""
        w = np.asarray(w)
        kh, kw = w.shape[2:]
        oh = (x.h + 2 * padding[0] - kh) // stride[0] + 1
        ow = (x.w + 2 * padding[1] - kw) // stride[1] + 1
        zero = Requant(bias=0, mult=0, shift=0, zp=0, lo=0, hi=0)
        k = conv2d(self.cfg, x, SpadTensor(0, w.shape[0], oh, ow), w, zero, stride=stride, padding=padding,
                   groups=groups, w_base=self._w_rows, acc_base=acc_base, acc_out=True)
        k.params = None
        self.add(k, name)
        return {"acc_base": acc_base, "channels": int(w.shape[0]), "h": oh, "w": ow,
                "blocks": -(-int(w.shape[0]) // self.cfg.cols)}

    def pool2d(self, x: SpadTensor, mode: PoolMode, kernel, *, stride=None, padding=(0, 0),
               name: str = "pool") -> SpadTensor:
        kh, kw = kernel
        sh, sw = stride or kernel
        oh = (x.h + 2 * padding[0] - kh) // sh + 1
        ow = (x.w + 2 * padding[1] - kw) // sw + 1
        y = self.tensor(x.c, oh, ow, x.signed, name)
        self.add(pool2d(self.cfg, x, y, mode, kernel, stride=stride, padding=padding), name)
        return y

    def build(self, manifest: dict | None = None) -> Program:
        cfg = self.cfg
        instrs = self.instrs + [isa.halt()]
        self._need("imem", len(instrs), cfg.imem_depth, "program")
        images = {}
        if self._wmem:
            images["wmem"] = pack_rows(isa.wmem_row_layout(cfg), np.concatenate(self._wmem))
        if self._params:
            images["param"] = pack_rows(isa.param_row_layout(cfg), {
                k: np.concatenate([p[k] for p in self._params]) for k in self._params[0]})
        man = dict(manifest or {})
        man.setdefault("macs", self.macs)
        man.setdefault("spad_rows_used", self._spad)
        return Program(cfg, instrs, images, man)
