"""Assemble layer kernels into one program: memory allocation + instruction stream + images."""

from __future__ import annotations

import bisect

import numpy as np

from hw import isa, timing
from hw.config import AccelConfig
from hw.isa import PoolMode
from hw.program import Program, pack_rows

from .kernels import Kernel, KernelError, Requant, SpadTensor, conv2d, memory_message, pool2d

__all__ = ["ProgramBuilder", "SpadAllocator"]


class SpadAllocator:
    """First-fit allocator over scratchpad row ranges.

    Freed ranges are kept as sorted, coalesced holes below ``top`` (one past the highest row in
    use). An allocation takes the lowest hole that is large enough, else it grows ``top`` (taking
    over a hole that ends at ``top``). It never fails: ``peak`` (the high-water mark of ``top``) is
    the spad depth the program needs, compared with the real depth by the caller, so an error can
    say how many rows were needed. First fit is not optimal, but lowering allocates in graph order
    and frees right after each tensor's last use, so holes are few and large.
    """

    def __init__(self):
        self._holes: list[tuple[int, int]] = []  # (start, end), sorted, disjoint, non-adjacent
        self._live: dict[int, int] = {}  # start -> rows
        self.top = 0
        self.peak = 0

    def alloc(self, n: int) -> int:
        if n <= 0:
            raise ValueError(f"allocation of {n} rows")
        for i, (s, e) in enumerate(self._holes):
            if e - s >= n:
                if e - s == n:
                    del self._holes[i]
                else:
                    self._holes[i] = (s + n, e)
                self._live[s] = n
                return s
        start = self.top
        if self._holes and self._holes[-1][1] == self.top:
            start = self._holes.pop()[0]
        self.top = start + n
        self.peak = max(self.peak, self.top)
        self._live[start] = n
        return start

    def free(self, start: int) -> None:
        n = self._live.pop(start, None)
        if n is None:
            raise ValueError(f"spad row {start} is not the start of a live allocation")
        s, e = start, start + n
        i = bisect.bisect_left(self._holes, (s, e))
        if i < len(self._holes) and self._holes[i][0] == e:  # merge with the hole above
            e = self._holes.pop(i)[1]
        if i > 0 and self._holes[i - 1][1] == s:  # and with the hole below
            s = self._holes.pop(i - 1)[0]
            i -= 1
        if e == self.top:
            self.top = s
        else:
            self._holes.insert(i, (s, e))
        while self._holes and self._holes[-1][1] == self.top:
            self.top = self._holes.pop()[0]

    @property
    def live_rows(self) -> int:
        return sum(self._live.values())


class ProgramBuilder:
    """Allocates spad tensors, weight rows and param rows, and concatenates kernels.

    Weight and param rows are bump-allocated (every layer keeps its own). Spad tensors come from
    a :class:`SpadAllocator`; :meth:`free` returns a tensor's rows once its last reader has been
    emitted. With ``reuse_spad=False`` :meth:`free` does nothing, so every tensor stays readable
    after the run (for debugging and per-layer comparisons).

    Every ``name`` is a layer name; a memory that overflows raises :class:`KernelError` naming it,
    the memory, the rows (and bytes) needed and the depth.

    >>> b = ProgramBuilder(cfg)
    >>> x = b.tensor(1, 28, 28)
    >>> y = b.conv2d(x, w, rq, padding=(1, 1))
    >>> b.free(x)
    >>> prog = b.build(manifest={"input": ..., "output": ...})
    """

    def __init__(self, cfg: AccelConfig, *, reuse_spad: bool = True):
        self.cfg = cfg
        self.reuse_spad = reuse_spad
        self.instrs: list[isa.Instr] = []
        self.spad = SpadAllocator()
        self._wmem: list[np.ndarray] = []
        self._w_rows = 0
        self._params: list[dict] = []
        self._p_rows = 0
        self.macs = 0

    @property
    def spad_rows_peak(self) -> int:
        return self.spad.peak

    @property
    def wmem_rows(self) -> int:
        """Weight-memory rows allocated so far."""
        return self._w_rows

    def _need(self, memory: str, used: int, name: str | None):
        if used > getattr(self.cfg, f"{memory}_depth"):
            where = "program" if name is None else f"layer {name}"
            raise KernelError(f"{where}: {memory_message(self.cfg, memory, used)}")

    def tensor(self, c: int, h: int, w: int, signed: bool = False, name: str = "tensor") -> SpadTensor:
        rows = -(-c // self.cfg.rows) * h * w
        peak = self.spad.peak
        base = self.spad.alloc(rows)
        if self.spad.peak > self.cfg.spad_depth:
            need = self.spad.peak
            self.spad.free(base)  # leave the builder as it was, as for every other error
            self.spad.peak = peak
            raise KernelError(f"layer {name}: {memory_message(self.cfg, 'spad', need)}; "
                              f"its output takes {rows} rows, live tensors hold {self.spad.live_rows}")
        return SpadTensor(base, c, h, w, signed)

    def free(self, t: SpadTensor) -> None:
        """The rows of ``t`` may be reused by tensors allocated from now on."""
        if self.reuse_spad:
            self.spad.free(t.base)

    def add(self, k: Kernel, name: str = "kernel") -> None:
        # Memory sizes first: an overflowing memory also makes address fields overflow, and
        # "wmem needs N rows" says more than "w_addr does not fit".
        self._need("imem", len(self.instrs) + len(k.instrs) + 1, name)  # + 1: the final HALT
        n_w = 0 if k.wmem is None else len(k.wmem)
        n_p = 0 if k.params is None else len(k.params["bias"])
        self._need("wmem", self._w_rows + n_w, name)
        self._need("param", self._p_rows + n_p, name)
        for ins in k.instrs:  # name the layer if a field is out of range (else Program would)
            try:
                ins.check(self.cfg)
            except isa.IsaError as e:
                raise KernelError(f"layer {name}: {e}") from None
        if n_w:
            self._wmem.append(k.wmem)
            self._w_rows += n_w
        if k.params is not None:
            self._params.append(k.params)
            self._p_rows += n_p
        self.instrs.extend(k.instrs)
        self.macs += k.macs

    def conv2d(self, x: SpadTensor, w, rq: Requant, *, stride=(1, 1), padding=(0, 0), groups: int = 1,
               residual: SpadTensor | None = None, out_signed: bool = False, name: str = "conv",
               pot: bool = False, block_scale=None, pack_bits: int = 0) -> SpadTensor:
        w = np.asarray(w)
        kh, kw = w.shape[2:]
        oh = (x.h + 2 * padding[0] - kh) // stride[0] + 1
        ow = (x.w + 2 * padding[1] - kw) // stride[1] + 1
        y = self.tensor(w.shape[0], oh, ow, out_signed, name)
        k = conv2d(self.cfg, x, y, w, rq, stride=stride, padding=padding, groups=groups,
                   w_base=self._w_rows, param_base=self._p_rows, residual=residual, pot=pot,
                   block_scale=block_scale, pack_bits=pack_bits)
        self.add(k, name)
        return y

    def conv2d_to_acc(self, x: SpadTensor, w, *, stride=(1, 1), padding=(0, 0), groups: int = 1,
                      acc_base: int = 0, name: str = "conv", pot: bool = False, block_scale=None,
                      pack_bits: int = 0) -> dict:
        """A conv whose raw accumulators stay in acc (block ``j`` at ``acc_base + j*oh*ow``)."""
        w = np.asarray(w)
        kh, kw = w.shape[2:]
        oh = (x.h + 2 * padding[0] - kh) // stride[0] + 1
        ow = (x.w + 2 * padding[1] - kw) // stride[1] + 1
        zero = Requant(bias=0, mult=0, shift=0, zp=0, lo=0, hi=0)
        k = conv2d(self.cfg, x, SpadTensor(0, w.shape[0], oh, ow), w, zero, stride=stride, padding=padding,
                   groups=groups, w_base=self._w_rows, param_base=self._p_rows, acc_base=acc_base,
                   acc_out=True, pot=pot, block_scale=block_scale, pack_bits=pack_bits)
        if not self.cfg.block_scale:  # no POST: only block-scale rows would be read
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

    def schedule(self) -> list[isa.Instr]:
        """The program's instructions, HALT included, with MATMUL ``overlap`` bits set where a
        MATMUL may stream while the previous POST runs (:func:`hw.timing.mark_overlaps`)."""
        return timing.mark_overlaps(self.cfg, self.instrs + [isa.halt()])

    def build(self, manifest: dict | None = None) -> Program:
        cfg = self.cfg
        instrs = self.schedule()
        self._need("imem", len(instrs), None)
        images = {}
        if self._wmem:
            images["wmem"] = pack_rows(isa.wmem_row_layout(cfg), np.concatenate(self._wmem))
        if self._params:
            images["param"] = pack_rows(isa.param_row_layout(cfg), {
                k: np.concatenate([p[k] for p in self._params]) for k in self._params[0]})
        man = dict(manifest or {})
        man.setdefault("macs", self.macs)
        man.setdefault("spad_rows_peak", self.spad.peak)
        man.setdefault("spad_reuse", self.reuse_spad)
        return Program(cfg, instrs, images, man)
