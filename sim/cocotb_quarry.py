"""cocotb test that drives ``quarry_top`` through its host port for :mod:`sim.verilator`.

It is started by :meth:`sim.verilator.RtlSim.run` inside the simulator and is not meant to be run
by hand. It reads a JSON job list from ``$QUARRY_COCOTB_JOBS``, runs every job in one test (the
simulator starts once), and writes a JSON result list to ``$QUARRY_COCOTB_RESULTS``. Rows arrive
already packed, so this module knows nothing of layouts or configs: it only moves integers.

Job (JSON)::

    {"writes": [[mem, addr, [row, ...]], ...],   # applied in order, one row per cycle
     "start": bool,                              # pulse start, wait for done
     "timeout_cycles": int,                      # no done within this many cycles: reset
     "reads": [[mem, first_row, count], ...]}    # read back after done, one row per cycle

Protocol of the port (see ``hw/top.py``): inputs are sampled at the rising edge of ``clk``; this
module drives them after the falling edge (cocotb 2 refuses writes in ReadOnly, TOOLCHAIN.md
pitfall 5) and samples ``host_rdata`` at the next falling edge, half a cycle after the rising edge
that registered the read, so reads are pipelined at one row per cycle.
"""

from __future__ import annotations

import json
import os
import time

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, RisingEdge, SimTimeoutError, with_timeout

JOBS_ENV = "QUARRY_COCOTB_JOBS"
RESULTS_ENV = "QUARRY_COCOTB_RESULTS"
#: Clock period; arbitrary (cycle counts come from the design's counter), 10 ns reads well in traces.
PERIOD_NS = 10
#: Reset cycles; the design's reset is synchronous, one edge would do, two is margin.
RESET_CYCLES = 2
#: How long busy may stay high after done rises before that counts as a design bug.
IDLE_GRACE_CYCLES = 16


class _Port:
    """Host-port driver. Every method starts and ends just after a falling edge of ``clk``."""

    def __init__(self, dut):
        self.dut = dut
        self.fall = FallingEdge(dut.clk)
        self.rows = 0

    async def reset(self):
        d = self.dut
        d.rst.value = 1
        d.start.value = 0
        d.host_we.value = 0
        d.host_re.value = 0
        for _ in range(RESET_CYCLES):
            await self.fall
        d.rst.value = 0

    async def write(self, mem: int, addr: int, rows: list[int]):
        d = self.dut
        d.host_mem.value = mem
        d.host_we.value = 1
        for i, row in enumerate(rows):
            d.host_addr.value = addr + i
            d.host_wdata.value = row
            await self.fall
        d.host_we.value = 0
        self.rows += len(rows)

    async def read(self, mem: int, addr: int, count: int) -> list[int]:
        d = self.dut
        out = []
        if count == 0:
            return out
        d.host_mem.value = mem
        d.host_re.value = 1
        d.host_addr.value = addr
        for i in range(1, count + 1):
            await self.fall
            out.append(int(d.host_rdata.value))  # LogicArray -> int works at any width
            if i < count:
                d.host_addr.value = addr + i
        d.host_re.value = 0
        self.rows += count
        return out

    async def until_idle(self, job: int):
        """Host accesses count only while not busy; done and busy may settle a few cycles apart."""
        for _ in range(IDLE_GRACE_CYCLES):
            if not self.dut.busy.value:
                return
            await self.fall
        raise AssertionError(f"job {job}: done is high but busy stayed high for {IDLE_GRACE_CYCLES} cycles")

    async def run(self, timeout_cycles: int) -> tuple[int, bool]:
        """Pulse start, wait for done; returns (cycle counter, timed out)."""
        d = self.dut
        d.start.value = 1
        await self.fall
        d.start.value = 0
        # done was cleared by the start edge, so its next rising edge is this run's HALT.
        timed_out = False
        try:
            await with_timeout(RisingEdge(d.done), timeout_cycles * PERIOD_NS, "ns")
        except SimTimeoutError:
            timed_out = True
        await self.fall
        cycles = int(d.cycles.value)
        if timed_out:
            await self.reset()
        return cycles, timed_out


@cocotb.test()
async def run_jobs(dut):
    test_started = time.time()
    with open(os.environ[JOBS_ENV]) as f:
        spec = json.load(f)
    restore = spec.get("restore_on_timeout")
    Clock(dut.clk, PERIOD_NS, unit="ns").start(start_high=False)
    port = _Port(dut)
    dut.host_mem.value = 0
    dut.host_addr.value = 0
    dut.host_wdata.value = 0
    await port.fall
    await port.reset()

    results = []
    for n, job in enumerate(spec["jobs"]):
        t0 = time.perf_counter()
        for mem, addr, rows in job["writes"]:
            await port.write(mem, addr, rows)
        cycles, timed_out = None, False
        if job["start"]:
            cycles, timed_out = await port.run(job["timeout_cycles"])
            if timed_out:
                dut._log.warning("job %d: no done within %d cycles; reset", n, job["timeout_cycles"])
            else:
                await port.until_idle(n)
        reads = [await port.read(mem, addr, count) for mem, addr, count in job["reads"]]
        if timed_out and restore:
            # Whatever the hung program wrote is unknown: put every memory back to power-on.
            for mem, rows in restore.items():
                await port.write(int(mem), 0, rows)
        results.append({"cycles": cycles, "timed_out": timed_out, "reads": reads,
                        "wall_seconds": time.perf_counter() - t0})

    out = {"jobs": results, "test_started": test_started, "test_finished": time.time(),
           "host_rows": port.rows}
    path = os.environ[RESULTS_ENV]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, path)
