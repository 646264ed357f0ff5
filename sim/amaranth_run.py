"""Run programs on the accelerator in Amaranth's Python simulator (small configs, unit tests
and quick debugging; system tests use Verilator through ``sim.verilator``)."""

from __future__ import annotations

import numpy as np
from amaranth.sim import Simulator

from hw import isa
from hw.isa import HostMem
from hw.program import Program, pack_rows, unpack_rows
from hw.top import QuarryTop

__all__ = ["run_amaranth"]

_LAYOUT = {
    HostMem.WMEM: isa.wmem_row_layout, HostMem.SPAD: isa.spad_row_layout,
    HostMem.ACC: isa.acc_row_layout, HostMem.PARAM: isa.param_row_layout,
    HostMem.SPAD_EXP: isa.spad_exp_row_layout,
}
_IMAGE_MEM = {"wmem": HostMem.WMEM, "param": HostMem.PARAM, "spad": HostMem.SPAD, "spad_exp": HostMem.SPAD_EXP}


def run_amaranth(program: Program, writes=(), reads=(), max_cycles: int = 200_000):
    """Load ``program`` + ``writes`` [(HostMem, addr, rows)] through the host port, run to HALT,
    return (cycles, [unpacked rows of each (HostMem, addr, n) in ``reads``])."""
    cfg = program.config
    dut = QuarryTop(cfg)
    out = {}

    def rows_of(mem, rows):
        if isinstance(rows, np.ndarray) or (len(rows) and not isinstance(rows[0], int)):
            return pack_rows(_LAYOUT[mem](cfg), rows)
        return list(rows)

    async def bench(ctx):
        async def write(mem, addr, rows):
            for i, r in enumerate(rows):
                ctx.set(dut.host_mem, mem)
                ctx.set(dut.host_addr, addr + i)
                ctx.set(dut.host_wdata, int(r))
                ctx.set(dut.host_we, 1)
                await ctx.tick()
            ctx.set(dut.host_we, 0)

        await write(HostMem.IMEM, 0, program.words())
        for name, rows in sorted(program.images.items()):  # spad before spad_exp, as sim.verilator
            await write(_IMAGE_MEM[name], 0, rows)
        for mem, addr, rows in writes:
            await write(mem, addr, rows_of(mem, rows))
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        n = 0
        while not ctx.get(dut.done):
            await ctx.tick()
            n += 1
            if n > max_cycles:
                raise TimeoutError(f"no HALT within {max_cycles} cycles")
        out["cycles"] = ctx.get(dut.cycles)
        res = []
        for mem, addr, cnt in reads:
            rows = []
            for i in range(cnt):
                ctx.set(dut.host_mem, mem)
                ctx.set(dut.host_addr, addr + i)
                ctx.set(dut.host_re, 1)
                await ctx.tick()
                ctx.set(dut.host_re, 0)
                rows.append(ctx.get(dut.host_rdata))
            res.append(unpack_rows(_LAYOUT[mem](cfg), rows) if mem in _LAYOUT else rows)
        out["reads"] = res

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return out["cycles"], out["reads"]
