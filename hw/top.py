"""The accelerator top: controller, engines, memories, systolic array and host port.

Engines and what they own:

* **front end** — fetches one instruction per cycle from imem and issues it when its engine
  and its hazards allow (rules in :mod:`hw.timing`, mirrored by the cycle model in
  ``sim.golden``). Instructions issue in program order.
* **loader** (PRELOAD) — copies weight rows wmem -> one bank of the array, one row per cycle
  (on a ``packed_weights`` config, unpacking ``pack_bits``-wide fields on the way).
* **matmul engine** (MATMUL) — 2-D window address generator over spad with zero padding; one
  vector per cycle into the array; the array's sums are added into (or overwrite) acc rows.
  Each vector carries its MATMUL's ``bank`` and ``pot`` bits through the array, so the next
  MATMUL (other bank, other mode on a hybrid array) can enter behind it.
* **post engine** (POST) — acc rows through ``cols`` requantization lanes into spad lanes.
* **pool engine** (POOL) — max/avg over 2-D windows, spad to spad.

Block floating point (``bfp_exp_bits`` configs): a memory ``spad_exp`` beside spad holds one
exponent per spad row. Its read port follows spad's read address, so each MATMUL vector's
exponent arrives with its lanes and travels with the array control to the block rescale, which
shifts by ``shift - exponent`` (left when negative). POST ends in two more stages: the OR of the
row's lane magnitudes, priority-encoded into the shared exponent, then each lane's rounding shift
and clamp; POST writes the row's exponent (0 unless ``bfp``) with its lanes, POOL and a host SPAD
write write 0.

Hazards are kept simple and conservative: PRELOAD waits until the previous MATMUL on its bank
has drained from the array; MATMUL waits for POST/POOL; POST, POOL, SYNC and HALT wait until
every engine (and the array pipeline) is idle. On ``post_overlap`` configs a MATMUL or POST with
its ``overlap`` bit set waits only for the engines it shares a port with (POST has its own
accumulator read port); the program guarantees it exchanges no data with what it overlaps
(``hw.timing.overlap_hazard`` / ``post_hazard``, checked by the golden model).
"""

from __future__ import annotations

from amaranth.hdl import Array, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from . import isa, timing
from .array import SystolicArray, delay
from .config import AccelConfig, ConfigError
from .isa import HostMem, Opcode, PoolMode
from .ppu import RequantLane

__all__ = ["QuarryTop", "CYCLE_BITS", "unpack_row"]

CYCLE_BITS = 32


def _ext(raw, signed_flag, bits):
    """Sign- or zero-extend a raw ``bits``-wide activation to ``bits + 1``."""
    return Mux(signed_flag, raw.as_signed(), raw.as_unsigned())


def unpack_row(m: Module, cfg: AccelConfig, row, pack, field):
    """The bank row a packed wmem row holds: field ``field`` of every lane
    (:func:`hw.isa.packed_lane_layout` for ``pack`` = PRELOAD's ``pack_bits``), sign-extended
    to ``w_bits``; ``pack`` 0 passes the lanes through. Combinational; returns a
    ``wmem_row_layout`` signal."""
    out = Signal(isa.wmem_row_layout(cfg))
    for c in range(cfg.cols):
        lane = row[c].as_unsigned()
        with m.Switch(pack):
            for k in range(1, cfg.w_bits):
                lay = isa.packed_lane_layout(cfg, k)
                fields = data.View(lay, lane[:lay.size])
                with m.Case(k):
                    m.d.comb += out[c].eq(Array(fields[f] for f in range(lay.length))[field])
            with m.Default():
                m.d.comb += out[c].eq(row[c])
    return out


class QuarryTop(wiring.Component):
    """The generated accelerator.

    Parameters
    ----------
    cfg : AccelConfig
    wmem_init, param_init : list of int, optional
        Packed rows (``hw.program.pack_rows``) baked into the weight / param memories.

    Ports: see ``sim/verilator.py``: ``start``, ``busy``, ``done``, ``cycles`` and the host port
    ``host_mem``/``host_addr``/``host_wdata``/``host_we``/``host_re``/``host_rdata`` (read data
    valid the cycle after ``host_re``; accesses are ignored while ``busy``, so the host cannot
    corrupt a running program).
    """

    def __init__(self, cfg: AccelConfig, *, wmem_init=None, param_init=None):
        self._cfg = cfg
        self._wmem_init = list(wmem_init or [])
        self._param_init = list(param_init or [])
        for name, init, depth in (("wmem", self._wmem_init, cfg.wmem_depth),
                                  ("param", self._param_init, cfg.param_depth)):
            if len(init) > depth:
                raise ConfigError(f"{name}_depth", f"{name} image has {len(init)} rows, {name}_depth is {depth}")
        dbits = isa.host_data_bits(cfg)
        super().__init__({
            "start": In(1), "busy": Out(1), "done": Out(1), "cycles": Out(CYCLE_BITS),
            "host_mem": In(HostMem), "host_addr": In(isa.host_addr_bits(cfg)),
            "host_wdata": In(dbits), "host_we": In(1), "host_re": In(1), "host_rdata": Out(dbits),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        R, C = cfg.rows, cfg.cols
        A = cfg.a_bits

        # -- memories --------------------------------------------------------------------------
        m.submodules.imem = imem = Memory(shape=isa.instr_bits(cfg), depth=cfg.imem_depth, init=[])
        m.submodules.wmem = wmem = Memory(shape=cfg.wmem_row_bits, depth=cfg.wmem_depth, init=self._wmem_init)
        m.submodules.spad = spad = Memory(shape=cfg.spad_row_bits, depth=cfg.spad_depth, init=[])
        m.submodules.acc = accm = Memory(shape=cfg.acc_row_bits, depth=cfg.acc_depth, init=[])
        m.submodules.param = param = Memory(shape=cfg.param_row_bits, depth=cfg.param_depth, init=self._param_init)
        bfp = cfg.bfp_exp_bits > 0
        if bfp:
            m.submodules.spad_exp = spad_exp = Memory(shape=cfg.bfp_exp_bits, depth=cfg.spad_depth, init=[])
            spe_w = spad_exp.write_port()
            spe_r = spad_exp.read_port()  # follows spad_r's address (below)

        imem_w = imem.write_port()
        imem_r = imem.read_port()
        wmem_w = wmem.write_port()
        wmem_r = wmem.read_port()
        spad_w = spad.write_port(granularity=A)
        spad_r = spad.read_port()
        acc_w = accm.write_port()
        # Transparent: a MATMUL accumulating into the row written in the same cycle sees the new value.
        acc_r = accm.read_port(transparent_for=(acc_w,))
        # POST's own accumulator read port on post_overlap configs (yosys duplicates the memory),
        # so the next block's MATMULs can accumulate while POST reads. It never reads a row in the
        # cycle it is written (hw.timing.overlap_hazard), so it needs no transparency.
        acc_pr = accm.read_port() if cfg.post_overlap else acc_r
        param_w = param.write_port()
        param_r = param.read_port()  # POST's; block rescale reads its own when they can overlap
        param_bs = param.read_port() if cfg.block_scale and cfg.post_overlap else param_r

        busy = Signal()
        done = Signal()
        cycles = Signal(CYCLE_BITS)
        m.d.comb += [self.busy.eq(busy), self.done.eq(done), self.cycles.eq(cycles)]

        # -- host port (only while idle) ---------------------------------------------------------
        host_ok = ~busy
        hsel = Signal(HostMem)
        m.d.sync += hsel.eq(self.host_mem)
        for mem_sel, wp in ((HostMem.IMEM, imem_w), (HostMem.WMEM, wmem_w), (HostMem.ACC, acc_w),
                            (HostMem.PARAM, param_w)):
            with m.If(host_ok & self.host_we & (self.host_mem == mem_sel)):
                m.d.comb += [wp.addr.eq(self.host_addr), wp.data.eq(self.host_wdata), wp.en.eq(1)]
        with m.If(host_ok & self.host_we & (self.host_mem == HostMem.SPAD)):
            m.d.comb += [spad_w.addr.eq(self.host_addr), spad_w.data.eq(self.host_wdata), spad_w.en.eq(-1)]
        host_reads = [(HostMem.IMEM, imem_r), (HostMem.WMEM, wmem_r), (HostMem.SPAD, spad_r),
                      (HostMem.ACC, acc_r), (HostMem.PARAM, param_r)]
        if bfp:
            # A host SPAD write sets the row's exponent to 0 (the row is a plain integer row until
            # a SPAD_EXP write says otherwise), so no exponent left by an earlier program survives.
            with m.If(host_ok & self.host_we & (self.host_mem == HostMem.SPAD)):
                m.d.comb += [spe_w.addr.eq(self.host_addr), spe_w.data.eq(0), spe_w.en.eq(1)]
            with m.If(host_ok & self.host_we & (self.host_mem == HostMem.SPAD_EXP)):
                m.d.comb += [spe_w.addr.eq(self.host_addr), spe_w.data.eq(self.host_wdata), spe_w.en.eq(1)]
        with m.Switch(hsel):
            for mem_sel, rp in host_reads:
                with m.Case(mem_sel):
                    m.d.comb += self.host_rdata.eq(rp.data)
            if bfp:
                with m.Case(HostMem.SPAD_EXP):
                    m.d.comb += self.host_rdata.eq(spe_r.data)
        host_rd = host_ok & self.host_re
        # A host read of SPAD_EXP puts its address on spad_r, which spe_r follows.
        for mem_sel, rp in host_reads + ([(HostMem.SPAD_EXP, spad_r)] if bfp else []):
            with m.If(host_rd & (self.host_mem == mem_sel)):
                m.d.comb += rp.addr.eq(self.host_addr)

        # -- front end: fetch (imem read) -> decode register -> issue ------------------------------
        # The issue logic sees only registers: the fetched word is latched into ``word``, so no
        # path runs from the instruction memory's output (slow on ECP5 block RAM) through the
        # window multipliers into an engine.
        fpc = Signal(cfg.imem_addr_bits)  # address of the word imem presents
        fvalid = Signal()  # imem's output holds word fpc
        dvalid = Signal()  # ``word`` holds the next instruction to issue
        word = Signal(isa.instr_layout(cfg))
        fetched = data.View(isa.instr_layout(cfg), imem_r.data)
        op = word.op
        issue = Signal()  # the instruction in `word` issues this cycle
        load = Signal()
        m.d.comb += load.eq(busy & fvalid & (~dvalid | issue))
        with m.If(busy):
            m.d.comb += imem_r.addr.eq(Mux(load, fpc + 1, fpc))
            m.d.sync += [fvalid.eq(1), cycles.eq(cycles + 1)]
        with m.If(load):
            m.d.sync += [fpc.eq(fpc + 1), word.eq(fetched), dvalid.eq(1)]
        with m.Elif(issue):
            m.d.sync += dvalid.eq(0)
        with m.If(self.start & ~busy):
            m.d.sync += [busy.eq(1), done.eq(0), fpc.eq(0), fvalid.eq(0), dvalid.eq(0), cycles.eq(0)]

        # Window products of the decoded word (registers to multiplier to the engine's registers):
        # ``d_pitch`` = stride_h * in_w, ``d_row0`` = base + off_h * in_w (+ off_w for POOL,
        # whose engine walks addresses).
        addr_bits = cfg.spad_addr_bits + cfg.dim_bits + isa.STRIDE_BITS + isa.OFFSET_BITS + 4
        w_mm, w_pool = word.args.matmul, word.args.pool
        w_is_pool = word.op == Opcode.POOL
        w_in_w = Mux(w_is_pool, w_pool.in_w, w_mm.in_w)
        w_off_h = Mux(w_is_pool, w_pool.off_h, w_mm.off_h)
        w_stride_h = Mux(w_is_pool, w_pool.stride_h, w_mm.stride_h)
        w_base = Mux(w_is_pool, w_pool.src_base + w_pool.off_w, w_mm.spad_base)
        d_pitch = Signal(cfg.dim_bits + isa.STRIDE_BITS)
        d_row0 = Signal(signed(addr_bits))
        m.d.comb += [d_pitch.eq(w_stride_h * w_in_w), d_row0.eq(w_base + w_off_h * w_in_w)]

        a_pre = word.args.preload
        a_mm = word.args.matmul
        a_post = word.args.post
        a_pool = word.args.pool

        # -- loader ----------------------------------------------------------------------------------
        ld_busy = Signal()
        ld_bank = Signal()
        ld_addr = Signal(cfg.wmem_addr_bits)
        ld_idx = Signal(range(R + 1))  # row being read
        ld_n = Signal(range(R + 1))
        ld_wr = Signal()  # a read was issued last cycle: write it now
        ld_wr_idx = Signal(range(R))
        ld_wr_zero = Signal()

        # -- matmul engine state ----------------------------------------------------------------------
        mm_busy = Signal()
        mm = {n: Signal(shape, name=f"mm_{n}") for n, shape in (
            ("bank", 1), ("acc_mode", 1), ("a_signed", 1), ("pot", 1),
            ("in_h", cfg.dim_bits), ("in_w", cfg.dim_bits), ("out_h", cfg.dim_bits), ("out_w", cfg.dim_bits),
            ("stride_h", isa.STRIDE_BITS), ("stride_w", isa.STRIDE_BITS),
            ("off_w", signed(isa.OFFSET_BITS)), ("pitch", cfg.dim_bits + isa.STRIDE_BITS),
            ("scale", cfg.param_addr_bits if cfg.block_scale else 0))}
        mm_oh = Signal(cfg.dim_bits)
        mm_ow = Signal(cfg.dim_bits)
        mm_ih = Signal(signed(cfg.dim_bits + isa.STRIDE_BITS + isa.OFFSET_BITS + 2))
        mm_iw = Signal(signed(cfg.dim_bits + isa.STRIDE_BITS + isa.OFFSET_BITS + 2))
        mm_row = Signal(signed(addr_bits))
        mm_acc = Signal(cfg.acc_addr_bits)
        mm_last = Signal()
        m.d.comb += mm_last.eq(mm_busy & (mm_ow == mm["out_w"] - 1) & (mm_oh == mm["out_h"] - 1))

        drain = [Signal(range(timing.matmul_drain(cfg) + 1), name=f"drain{b}") for b in range(2)]
        pipe_cnt = Signal(range(timing.matmul_latency(cfg) + 1))

        # -- post / pool engines ------------------------------------------------------------------------
        misc_busy = Signal()  # POST or POOL running (including its pipeline)
        pool_busy = Signal()  # POOL running (including its pipeline)
        po_spad = Signal()  # POST reading spad (a residual POST's address phase)

        all_idle = ~ld_busy & ~mm_busy & (pipe_cnt == 0) & ~misc_busy

        # -- issue ---------------------------------------------------------------------------------------
        can = Signal()
        with m.Switch(op):
            with m.Case(Opcode.NOP):
                m.d.comb += can.eq(1)
            with m.Case(Opcode.PRELOAD):
                b = a_pre.bank
                m.d.comb += can.eq(~ld_busy & (Array(drain)[b] == 0) & ~(mm_busy & (mm["bank"] == b)))
            with m.Case(Opcode.MATMUL):
                # overlap = 1: only POOL and a POST's spad reads hold it (the spad read port).
                mm_wait = Mux(a_mm.overlap, pool_busy | po_spad, misc_busy) if cfg.post_overlap else misc_busy
                m.d.comb += can.eq((~mm_busy | mm_last) & ~(ld_busy & (ld_bank == a_mm.bank)) & ~mm_wait)
            if cfg.post_overlap:
                with m.Case(Opcode.POST):
                    # overlap = 1: only another POST/POOL holds it, and for a residual POST the
                    # MATMUL engine's spad reads (the spad read port).
                    m.d.comb += can.eq(Mux(a_post.overlap, ~misc_busy & ~(mm_busy & a_post.res_en), all_idle))
            with m.Default():
                m.d.comb += can.eq(all_idle)
        m.d.comb += issue.eq(busy & dvalid & can)

        with m.If(issue & (op == Opcode.HALT)):
            m.d.sync += [busy.eq(0), done.eq(1)]

        # -- loader ------------------------------------------------------------------------------------
        with m.If(issue & (op == Opcode.PRELOAD)):
            m.d.sync += [ld_busy.eq(1), ld_bank.eq(a_pre.bank), ld_addr.eq(a_pre.w_addr),
                         ld_n.eq(a_pre.n_rows), ld_idx.eq(0)]
        reading = ld_busy & (ld_idx < R)
        if cfg.packed_weights:
            # Packed rows: still one wmem read per bank row (PRELOAD timing does not depend on
            # the packing), of the word holding the row; the word address steps every p rows.
            # ``ld_f`` is the row's field in that word, ``ld_wr_f`` the field written next cycle.
            maxp = max(isa.pack_factor(cfg, k) for k in range(1, cfg.w_bits))
            ld_pack = Signal(range(cfg.w_bits))
            ld_plast = Signal(range(maxp))  # p - 1
            ld_f = Signal(range(maxp))
            ld_wr_f = Signal(range(maxp))
            plast = Array(Const(isa.pack_factor(cfg, k) - 1, range(maxp)) for k in range(cfg.w_bits))
            with m.If(issue & (op == Opcode.PRELOAD)):
                m.d.sync += [ld_pack.eq(a_pre.pack_bits), ld_plast.eq(plast[a_pre.pack_bits]), ld_f.eq(0)]
            with m.If(reading):
                m.d.comb += wmem_r.addr.eq(ld_addr)
                m.d.sync += ld_wr_f.eq(ld_f)
                with m.If(ld_f == ld_plast):
                    m.d.sync += [ld_f.eq(0), ld_addr.eq(ld_addr + 1)]
                with m.Else():
                    m.d.sync += ld_f.eq(ld_f + 1)
        with m.If(reading):
            if not cfg.packed_weights:
                m.d.comb += wmem_r.addr.eq(ld_addr + ld_idx)
            m.d.sync += [ld_idx.eq(ld_idx + 1), ld_wr.eq(1), ld_wr_idx.eq(ld_idx), ld_wr_zero.eq(ld_idx >= ld_n)]
        with m.Else():
            m.d.sync += ld_wr.eq(0)
        with m.If(ld_busy & ~reading & ld_wr):
            m.d.sync += ld_busy.eq(0)  # last row is written this cycle

        # -- matmul engine: address generation ---------------------------------------------------------
        mm_valid = Signal()
        mm_inside = Signal()
        with m.If(issue & (op == Opcode.MATMUL)):
            m.d.sync += [
                mm_busy.eq(1),
                mm["bank"].eq(a_mm.bank), mm["acc_mode"].eq(a_mm.accumulate), mm["a_signed"].eq(a_mm.a_signed),
                mm["pot"].eq(a_mm.pot), mm["scale"].eq(a_mm.scale_addr),
                mm["in_h"].eq(a_mm.in_h), mm["in_w"].eq(a_mm.in_w), mm["out_h"].eq(a_mm.out_h),
                mm["out_w"].eq(a_mm.out_w), mm["stride_h"].eq(a_mm.stride_h), mm["stride_w"].eq(a_mm.stride_w),
                mm["off_w"].eq(a_mm.off_w), mm["pitch"].eq(d_pitch),
                mm_oh.eq(0), mm_ow.eq(0), mm_ih.eq(a_mm.off_h), mm_iw.eq(a_mm.off_w),
                mm_row.eq(d_row0), mm_acc.eq(a_mm.acc_base),
            ]
        with m.Elif(mm_last):
            m.d.sync += mm_busy.eq(0)
        with m.If(mm_busy):
            m.d.comb += [
                mm_valid.eq(1),
                mm_inside.eq((mm_ih >= 0) & (mm_ih < mm["in_h"]) & (mm_iw >= 0) & (mm_iw < mm["in_w"])),
                spad_r.addr.eq(mm_row + mm_iw),
            ]
            with m.If(~(issue & (op == Opcode.MATMUL))):
                m.d.sync += mm_acc.eq(mm_acc + 1)
                with m.If(mm_ow == mm["out_w"] - 1):
                    m.d.sync += [mm_ow.eq(0), mm_iw.eq(mm["off_w"]), mm_oh.eq(mm_oh + 1),
                                 mm_ih.eq(mm_ih + mm["stride_h"]), mm_row.eq(mm_row + mm["pitch"])]
                with m.Else():
                    m.d.sync += [mm_ow.eq(mm_ow + 1), mm_iw.eq(mm_iw + mm["stride_w"])]

        for b in range(2):
            with m.If(mm_valid & (mm["bank"] == b)):
                m.d.sync += drain[b].eq(timing.matmul_drain(cfg))
            with m.Elif(drain[b] != 0):
                m.d.sync += drain[b].eq(drain[b] - 1)
        with m.If(mm_valid):
            m.d.sync += pipe_cnt.eq(timing.matmul_latency(cfg) - 1)
        with m.Elif(pipe_cnt != 0):
            m.d.sync += pipe_cnt.eq(pipe_cnt - 1)

        # Stage B (spad data arrives): mask + extend, register into the array edge (stage C).
        ctl_layout = data.StructLayout({"valid": 1, "acc": 1, "addr": cfg.acc_addr_bits,
                                        "scale": cfg.param_addr_bits if cfg.block_scale else 0,
                                        # the vector's BFP exponent (0 for padding), from stage C on
                                        **({"exp": cfg.bfp_exp_bits} if bfp else {})})
        ctl_a = Signal(ctl_layout)
        m.d.comb += [ctl_a.valid.eq(mm_valid), ctl_a.acc.eq(mm["acc_mode"]), ctl_a.addr.eq(mm_acc),
                     ctl_a.scale.eq(mm["scale"])]
        ctl_b = Signal(ctl_layout)
        inside_b = Signal()
        bank_b = Signal()
        signed_b = Signal()
        pot_b = Signal()
        m.d.sync += [ctl_b.eq(ctl_a), inside_b.eq(mm_inside), bank_b.eq(mm["bank"]), signed_b.eq(mm["a_signed"]),
                     pot_b.eq(mm["pot"])]

        m.submodules.array = arr = SystolicArray(cfg)
        spad_view = data.View(isa.spad_row_layout(cfg), spad_r.data)
        ctl_c = Signal(ctl_layout)
        m.d.sync += [ctl_c.eq(ctl_b), arr.a_bank.eq(bank_b), arr.a_pot.eq(pot_b)]
        if bfp:
            m.d.sync += ctl_c.exp.eq(Mux(inside_b, spe_r.data, 0))
        for r in range(R):
            m.d.sync += arr.a_vec[r].eq(Mux(inside_b, _ext(spad_view[r], signed_b, A), 0))

        # Weight writes from the loader.
        wrow = data.View(isa.wmem_row_layout(cfg), wmem_r.data)
        if cfg.packed_weights:
            wrow = unpack_row(m, cfg, wrow, ld_pack, ld_wr_f)
        m.d.comb += [arr.w_we.eq(ld_wr), arr.w_bank.eq(ld_bank), arr.w_row_idx.eq(ld_wr_idx)]
        for c in range(C):
            m.d.comb += arr.w_row[c].eq(Mux(ld_wr_zero, 0, wrow[c]))

        # Array output (aligned) with its control.
        ctl_d = delay(m, ctl_c, SystolicArray.latency(cfg), "ctl")
        psum_d = arr.psum
        if cfg.block_scale:
            # Block rescale (DSConv): D reads the param row, S multiplies, T rounds and shifts
            # (into E's register) while the accumulator row is read.
            bs_read = ctl_d  # drives param_r.addr at the end (it takes precedence over POST's)
            ctl_s = Signal(ctl_layout)
            psum_s = Signal(data.ArrayLayout(signed(cfg.acc_width), C))
            m.d.sync += [ctl_s.eq(ctl_d), psum_s.eq(psum_d)]
            srow = data.View(isa.param_row_layout(cfg), param_bs.data)
            prod_bits = cfg.acc_width + cfg.mult_bits + 1
            ctl_t = Signal(ctl_layout)
            prod_t = [Signal(signed(prod_bits), name=f"bs_prod{c}") for c in range(C)]
            shift_t = [Signal(range(prod_bits + 2), name=f"bs_shift{c}") for c in range(C)]
            m.d.sync += ctl_t.eq(ctl_s)
            ctl_d = ctl_t  # the accumulator is read in T; E adds the rounded sums
            psum_d = Signal(data.ArrayLayout(signed(cfg.acc_width), C))
            for c in range(C):
                sh = srow[c].shift
                if bfp:
                    # Net shift ``shift - exponent``: right (rounding) when >= 0, else left by
                    # ``exponent - shift`` (at most emax); the left shift's low acc_width bits are
                    # the wrapped sum.
                    d = Signal(signed(cfg.shift_bits + 1), name=f"bs_d{c}")
                    lsh_t = Signal(range(cfg.bfp_emax + 1), name=f"bs_lsh{c}")
                    m.d.comb += d.eq(sh - ctl_s.exp)
                    m.d.sync += [prod_t[c].eq(psum_s[c] * srow[c].mult),
                                 shift_t[c].eq(Mux(d < 0, 0, Mux(d > prod_bits + 1, prod_bits + 1, d))),
                                 lsh_t.eq(Mux(d < 0, -d, 0))]
                else:
                    # A shift past prod_bits + 1 rounds like prod_bits + 1 (to 0), as in RequantLane.
                    m.d.sync += [prod_t[c].eq(psum_s[c] * srow[c].mult),
                                 shift_t[c].eq(Mux(sh > prod_bits + 1, prod_bits + 1, sh))]
                half = Mux(shift_t[c] == 0, 0, (Const(1, unsigned(prod_bits + 2)) << shift_t[c]) >> 1)
                neg = (prod_t[c] < 0) & (shift_t[c] != 0)
                if bfp:
                    m.d.comb += psum_d[c].eq(Mux(lsh_t != 0, prod_t[c] << lsh_t,
                                                 (prod_t[c] + half - neg) >> shift_t[c]))
                else:
                    m.d.comb += psum_d[c].eq((prod_t[c] + half - neg) >> shift_t[c])

        # Register once more while acc is read.
        ctl_e = Signal(ctl_layout)
        psum_e = Signal(data.ArrayLayout(signed(cfg.acc_width), C))
        m.d.sync += [ctl_e.eq(ctl_d), psum_e.eq(psum_d)]

        # -- post engine ---------------------------------------------------------------------------------
        po = {n: Signal(shape, name=f"po_{n}") for n, shape in (
            ("acc_base", cfg.acc_addr_bits), ("spad_base", cfg.spad_addr_bits), ("n", cfg.acc_addr_bits + 1),
            ("src", cfg.lane_bits), ("dst", cfg.lane_bits), ("nl", cfg.lane_bits),
            ("zp", signed(A + 1)), ("lo", signed(A + 1)), ("hi", signed(A + 1)),
            ("res_en", 1), ("res_signed", 1), ("res_base", cfg.spad_addr_bits),
            ("param_addr", cfg.param_addr_bits), *((("bfp", 1),) if bfp else ()))}
        po_busy = Signal()  # issuing reads
        po_i = Signal(cfg.acc_addr_bits + 1)
        # Registers from a row's acc read to its spad write (timing.post_latency - 1).
        po_lat = timing.post_latency(cfg) - 1
        po_tail = Signal(range(po_lat + 2))
        with m.If(issue & (op == Opcode.POST)):
            m.d.sync += [po_busy.eq(1), po_i.eq(0)]
            for n, src in (("acc_base", a_post.acc_base), ("spad_base", a_post.spad_base), ("n", a_post.n),
                           ("src", a_post.src_lane), ("dst", a_post.dst_lane), ("nl", a_post.n_lanes),
                           ("zp", a_post.zp), ("lo", a_post.lo), ("hi", a_post.hi), ("res_en", a_post.res_en),
                           ("res_signed", a_post.res_signed), ("res_base", a_post.res_base),
                           ("param_addr", a_post.param_addr), *((("bfp", a_post.bfp),) if bfp else ())):
                m.d.sync += po[n].eq(src)
        po_rd = po_busy
        with m.If(busy):
            m.d.comb += param_r.addr.eq(po["param_addr"])
        with m.If(po_rd):
            m.d.comb += acc_pr.addr.eq(po["acc_base"] + po_i)
            with m.If(po["res_en"]):  # the spad read port is the MATMUL's while a POST overlaps it
                m.d.comb += spad_r.addr.eq(po["res_base"] + po_i)
            m.d.sync += po_i.eq(po_i + 1)
            with m.If(po_i == po["n"] - 1):
                m.d.sync += [po_busy.eq(0), po_tail.eq(po_lat)]
        with m.Elif(po_tail != 0):
            m.d.sync += po_tail.eq(po_tail - 1)
        po_valid = delay(m, po_rd, po_lat, "po_v")
        po_waddr = delay(m, (po["spad_base"] + po_i)[:cfg.spad_addr_bits], po_lat, "po_a")

        acc_view = data.View(isa.acc_row_layout(cfg), acc_pr.data)
        prow = data.View(isa.param_row_layout(cfg), param_r.data)
        res_view = data.View(isa.spad_row_layout(cfg), spad_r.data)
        res_lanes = Array(_ext(res_view[r], po["res_signed"], A) for r in range(R))
        ys = []
        for c in range(C):
            lane = RequantLane(cfg)
            m.submodules[f"rq{c}"] = lane
            # Residual for acc lane c sits in spad lane c - src + dst.
            rl = Signal(signed(cfg.lane_bits + 2), name=f"rl{c}")
            m.d.comb += rl.eq(c - po["src"] + po["dst"])
            res_val = Mux(po["res_en"] & (rl >= 0) & (rl < R), res_lanes[rl[:max(1, (R - 1).bit_length())]], 0)
            m.d.comb += [
                lane.acc.eq(acc_view[c]), lane.res.eq(res_val),
                lane.bias.eq(prow[c].bias), lane.mult.eq(prow[c].mult), lane.res_mult.eq(prow[c].res_mult),
                lane.shift.eq(prow[c].shift), lane.zp.eq(po["zp"]), lane.lo.eq(po["lo"]), lane.hi.eq(po["hi"]),
            ]
            ys.append(lane.y[:A])
        if bfp:
            ys, po_exp = self._bfp_post(m, cfg, po, [m.submodules[f"rq{c}"] for c in range(C)])
        y_arr = Array(ys)
        po_wdata = Signal(cfg.spad_row_bits)
        po_wen = Signal(R)
        po_wrow = data.View(isa.spad_row_layout(cfg), po_wdata)
        for r in range(R):
            sl = Signal(signed(cfg.lane_bits + 2), name=f"sl{r}")
            m.d.comb += sl.eq(r - po["dst"] + po["src"])
            m.d.comb += [
                po_wrow[r].eq(y_arr[sl[:max(1, (C - 1).bit_length())]]),
                po_wen[r].eq((r >= po["dst"]) & (r < po["dst"] + po["nl"])),
            ]

        # -- pool engine ---------------------------------------------------------------------------------
        pl = {n: Signal(shape, name=f"pl_{n}") for n, shape in (
            ("avg", 1), ("a_signed", 1), ("in_h", cfg.dim_bits), ("in_w", cfg.dim_bits),
            ("out_h", cfg.dim_bits), ("out_w", cfg.dim_bits), ("k_h", isa.KERNEL_BITS), ("k_w", isa.KERNEL_BITS),
            ("stride_h", isa.STRIDE_BITS), ("stride_w", isa.STRIDE_BITS), ("off_w", signed(isa.OFFSET_BITS)),
            ("dst", cfg.spad_addr_bits), ("mult", cfg.pool_mult_bits), ("shift", isa.POOL_SHIFT_BITS),
            ("src", cfg.spad_addr_bits), ("off_h", signed(isa.OFFSET_BITS)))}
        pl_busy = Signal()
        pl_tail = Signal(range(8))
        pl_oh = Signal(cfg.dim_bits)
        pl_ow = Signal(cfg.dim_bits)
        pl_dy = Signal(isa.KERNEL_BITS)
        pl_dx = Signal(isa.KERNEL_BITS)
        pl_ih0 = Signal(signed(cfg.dim_bits + isa.STRIDE_BITS + isa.OFFSET_BITS + 2))  # window row 0
        pl_iw0 = Signal(signed(cfg.dim_bits + isa.STRIDE_BITS + isa.OFFSET_BITS + 2))
        pl_o = Signal(cfg.spad_addr_bits)  # output address
        # Read address, walked incrementally (no multiplier in the address path): ``pl_ad`` is the
        # element read now, ``pl_cb`` its window's origin, ``pl_rb`` the origin of the output row's
        # first window; ``pl_dyinc`` steps from a window row's last element to the next row's first.
        pl_ad = Signal(signed(addr_bits))
        pl_cb = Signal(signed(addr_bits))
        pl_rb = Signal(signed(addr_bits))
        pl_pitch = Signal(cfg.dim_bits + isa.STRIDE_BITS)
        pl_dyinc = Signal(signed(cfg.dim_bits + 2))
        with m.If(issue & (op == Opcode.POOL)):
            m.d.sync += [pl_busy.eq(1), pl_oh.eq(0), pl_ow.eq(0), pl_dy.eq(0), pl_dx.eq(0),
                         pl_ih0.eq(a_pool.off_h), pl_iw0.eq(a_pool.off_w), pl_o.eq(a_pool.dst_base),
                         pl_ad.eq(d_row0), pl_cb.eq(d_row0), pl_rb.eq(d_row0), pl_pitch.eq(d_pitch),
                         pl_dyinc.eq(a_pool.in_w - a_pool.k_w + 1)]
            for n, src in (("avg", a_pool.mode == PoolMode.AVG), ("a_signed", a_pool.a_signed),
                           ("in_h", a_pool.in_h), ("in_w", a_pool.in_w), ("out_h", a_pool.out_h),
                           ("out_w", a_pool.out_w), ("k_h", a_pool.k_h), ("k_w", a_pool.k_w),
                           ("stride_h", a_pool.stride_h), ("stride_w", a_pool.stride_w),
                           ("off_w", a_pool.off_w), ("off_h", a_pool.off_h), ("dst", a_pool.dst_base),
                           ("mult", a_pool.mult), ("shift", a_pool.shift), ("src", a_pool.src_base)):
                m.d.sync += pl[n].eq(src)
        pl_ih = pl_ih0 + pl_dy
        pl_iw = pl_iw0 + pl_dx
        pl_first = (pl_dy == 0) & (pl_dx == 0)
        pl_lastwin = (pl_dy == pl["k_h"] - 1) & (pl_dx == pl["k_w"] - 1)
        pl_lastpix = (pl_oh == pl["out_h"] - 1) & (pl_ow == pl["out_w"] - 1)
        with m.If(pl_busy):
            m.d.comb += spad_r.addr.eq(pl_ad)
            with m.If(pl_dx == pl["k_w"] - 1):
                m.d.sync += pl_dx.eq(0)
                with m.If(pl_dy == pl["k_h"] - 1):
                    m.d.sync += pl_dy.eq(0)
                    with m.If(pl_ow == pl["out_w"] - 1):
                        m.d.sync += [pl_ow.eq(0), pl_iw0.eq(pl["off_w"]), pl_oh.eq(pl_oh + 1),
                                     pl_ih0.eq(pl_ih0 + pl["stride_h"]), pl_rb.eq(pl_rb + pl_pitch),
                                     pl_cb.eq(pl_rb + pl_pitch), pl_ad.eq(pl_rb + pl_pitch)]
                        with m.If(pl_lastpix):
                            m.d.sync += [pl_busy.eq(0), pl_tail.eq(4)]
                    with m.Else():
                        m.d.sync += [pl_ow.eq(pl_ow + 1), pl_iw0.eq(pl_iw0 + pl["stride_w"]),
                                     pl_cb.eq(pl_cb + pl["stride_w"]), pl_ad.eq(pl_cb + pl["stride_w"])]
                with m.Else():
                    m.d.sync += [pl_dy.eq(pl_dy + 1), pl_ad.eq(pl_ad + pl_dyinc)]
            with m.Else():
                m.d.sync += [pl_dx.eq(pl_dx + 1), pl_ad.eq(pl_ad + 1)]
        with m.Elif(pl_tail != 0):
            m.d.sync += pl_tail.eq(pl_tail - 1)
        # Stage 1: data arrives; fold into max/sum.
        pl_v1 = Signal()
        pl_in1 = Signal()
        pl_first1 = Signal()
        pl_last1 = Signal()
        m.d.sync += [pl_v1.eq(pl_busy), pl_in1.eq((pl_ih >= 0) & (pl_ih < pl["in_h"]) & (pl_iw >= 0) & (pl_iw < pl["in_w"])),
                     pl_first1.eq(pl_first), pl_last1.eq(pl_lastwin)]
        sum_bits = A + 1 + 2 * isa.KERNEL_BITS
        pl_view = data.View(isa.spad_row_layout(cfg), spad_r.data)
        pl_any = Signal()
        pl_max = [Signal(signed(A + 1), name=f"pl_max{r}") for r in range(R)]
        pl_sum = [Signal(signed(sum_bits), name=f"pl_sum{r}") for r in range(R)]
        # Stage 2: the folded window of a finished pixel.
        pl_v2 = Signal()
        pl_any2 = Signal()
        pl_max2 = [Signal(signed(A + 1), name=f"pl_maxo{r}") for r in range(R)]
        pl_sum2 = [Signal(signed(sum_bits), name=f"pl_sumo{r}") for r in range(R)]
        any_new = Mux(pl_first1, pl_in1, pl_any | pl_in1)
        m.d.sync += pl_v2.eq(pl_v1 & pl_last1)
        with m.If(pl_v1):
            m.d.sync += pl_any.eq(any_new)
            with m.If(pl_last1):
                m.d.sync += pl_any2.eq(any_new)
        for r in range(R):
            x = _ext(pl_view[r], pl["a_signed"], A)
            take = pl_in1 & (pl_first1 | ~pl_any | (x > pl_max[r]))
            new_max = Mux(take, x, Mux(pl_first1, 0, pl_max[r]))
            new_sum = Mux(pl_first1, 0, pl_sum[r]) + Mux(pl_in1, x, 0)
            with m.If(pl_v1):
                m.d.sync += [pl_max[r].eq(new_max), pl_sum[r].eq(new_sum)]
                with m.If(pl_last1):
                    m.d.sync += [pl_max2[r].eq(new_max), pl_sum2[r].eq(new_sum)]
        # Stage 3: average product; stage 4: rounding shift + clamp; then write.
        pl_v3 = Signal()
        pl_v4 = Signal()
        m.d.sync += [pl_v3.eq(pl_v2), pl_v4.eq(pl_v3)]
        pl_row4 = Signal(cfg.spad_row_bits)
        pl_view4 = data.View(isa.spad_row_layout(cfg), pl_row4)
        lo = Mux(pl["a_signed"], -(1 << (A - 1)), 0)
        hi = Mux(pl["a_signed"], (1 << (A - 1)) - 1, (1 << A) - 1)
        for r in range(R):
            prod3 = Signal(signed(sum_bits + cfg.pool_mult_bits + 1), name=f"pl_prod{r}")
            max3 = Signal(signed(A + 1), name=f"pl_max3_{r}")
            m.d.sync += [prod3.eq(pl_sum2[r] * pl["mult"]), max3.eq(Mux(pl_any2, pl_max2[r], 0))]
            sh = pl["shift"]
            half = Mux(sh == 0, 0, (Const(1, unsigned(32)) << sh) >> 1)
            rnd = (prod3 + half - ((prod3 < 0) & (sh != 0))) >> sh
            avg = Mux(rnd < lo, lo, Mux(rnd > hi, hi, rnd))
            m.d.sync += pl_view4[r].eq(Mux(pl["avg"], avg, max3)[:A])
        # Output address advances once per written pixel.
        with m.If(pl_v4):
            m.d.sync += pl_o.eq(pl_o + 1)

        m.d.comb += [pool_busy.eq(pl_busy | (pl_tail != 0)), po_spad.eq(po_busy & po["res_en"]),
                     misc_busy.eq(po_busy | (po_tail != 0) | pool_busy)]

        # -- spad write port: post / pool (host handled above, only while idle) -------------------------
        with m.If(busy & po_valid):
            m.d.comb += [spad_w.addr.eq(po_waddr), spad_w.data.eq(po_wdata), spad_w.en.eq(po_wen)]
            if bfp:
                m.d.comb += [spe_w.addr.eq(po_waddr), spe_w.data.eq(po_exp), spe_w.en.eq(1)]
        with m.Elif(busy & pl_v4):
            m.d.comb += [spad_w.addr.eq(pl_o), spad_w.data.eq(pl_row4), spad_w.en.eq(-1)]
            if bfp:
                m.d.comb += [spe_w.addr.eq(pl_o), spe_w.data.eq(0), spe_w.en.eq(1)]

        # -- accumulator read-modify-write -----------------------------------------------------------------
        with m.If(busy & ctl_d.valid):
            m.d.comb += acc_r.addr.eq(ctl_d.addr)
        old = data.View(isa.acc_row_layout(cfg), acc_r.data)
        new = Signal(data.ArrayLayout(signed(cfg.acc_width), C))
        for c in range(C):
            m.d.comb += new[c].eq(Mux(ctl_e.acc, old[c], 0) + psum_e[c])
        with m.If(busy & ctl_e.valid):
            m.d.comb += [acc_w.addr.eq(ctl_e.addr), acc_w.data.eq(new), acc_w.en.eq(1)]

        if cfg.block_scale:
            with m.If(busy & bs_read.valid):
                m.d.comb += param_bs.addr.eq(bs_read.scale)
        if bfp:
            m.d.comb += spe_r.addr.eq(spad_r.addr)  # exponents are read beside their rows

        # -- observation hook for formal checks (drives nothing) -------------------------------------------
        # Per memory, a list of (used, address) per read port: ``used`` is 1 in the cycle an engine
        # puts on the port an address whose data it will use. Engines also drive addresses whose data
        # they drop (the loader's rows past n_rows, MATMUL/POOL padding, POST's residual read without
        # res_en, the accumulator read of a MATMUL that overwrites); those are not "used". Host reads
        # excluded.
        pl_inside = (pl_ih >= 0) & (pl_ih < pl["in_h"]) & (pl_iw >= 0) & (pl_iw < pl["in_w"])
        mm_acc_rd = busy & ctl_d.valid & ctl_d.acc
        bs_rd = (busy & bs_read.valid) if cfg.block_scale else Const(0)
        self.used_reads = {
            "wmem": [(reading & (ld_idx < ld_n), wmem_r.addr)],
            "spad": [((mm_busy & mm_inside) | (po_rd & po["res_en"]) | (pl_busy & pl_inside), spad_r.addr)],
            "acc": ([(mm_acc_rd, acc_r.addr), (po_rd, acc_pr.addr)] if cfg.post_overlap
                    else [(po_rd | mm_acc_rd, acc_r.addr)]),
            "param": ([(po_rd, param_r.addr), (bs_rd, param_bs.addr)] if param_bs is not param_r
                      else [(po_rd | bs_rd, param_r.addr)]),
        }
        if bfp:  # only MATMUL uses the exponents it reads
            self.used_reads["spad_exp"] = [(mm_busy & mm_inside, spe_r.addr)]

        return m

    @staticmethod
    def _bfp_post(m: Module, cfg: AccelConfig, po: dict, lanes: list) -> tuple[list, Signal]:
        """The block-floating-point POST stages after the requantization lanes' rounding
        (``timing.post_bfp_stages``); each lane's ``rounded`` enters in the lanes' clamp stage.

        5: ``y`` = ``rounded`` saturated to ``a_bits + 2 + emax`` bits (a saturated lane takes
           exponent emax and clamps, exactly as unsaturated), its one's-complement magnitude
           ``t`` (0 for a negative ``y`` when ``lo >= 0``, and for lanes outside the POST's);
        6: ``e = min(emax, max(0, bitlen(OR of the t) - bitlen(hi)))`` (priority encoders);
        7: ``clamp(round_shift(y, e), lo, hi)`` on a ``bfp`` POST, else the lane's ``y`` two
           stages later; the exponent written is ``e`` on a ``bfp`` POST, else 0.

        Returns (per acc lane the ``a_bits`` result, the row's exponent), both registers."""
        A, C, emax = cfg.a_bits, cfg.cols, cfg.bfp_emax
        W = A + 2 + emax
        top, bot = (1 << (W - 1)) - 1, -(1 << (W - 1))

        def bitlen(v, n, name):
            out = Signal(range(n + 1), name=name)
            for i in range(n):  # the highest set bit wins (the last assignment)
                with m.If(v[i]):
                    m.d.comb += out.eq(i + 1)
            return out

        y5, t5, y6p = [], [], []
        for c, lane in enumerate(lanes):
            r = lane.rounded
            y = Signal(signed(W), name=f"bfp_y5_{c}")
            t = Signal(unsigned(W - 1), name=f"bfp_t5_{c}")
            sat = Signal(signed(W), name=f"bfp_sat{c}")
            m.d.comb += sat.eq(Mux(r > top, top, Mux(r < bot, bot, r)))
            active = (c >= po["src"]) & (c < po["src"] + po["nl"])
            mag = Mux(sat >= 0, sat, Mux(po["lo"] < 0, ~sat, 0))
            m.d.sync += [y.eq(sat), t.eq(Mux(active, mag, 0))]
            yp = Signal(signed(A + 1), name=f"bfp_yp6_{c}")
            m.d.sync += yp.eq(lane.y)
            y5.append(y)
            t5.append(t)
            y6p.append(yp)
        orv = Signal(unsigned(W - 1), name="bfp_or")
        acc_or = Const(0, unsigned(W - 1))
        for t in t5:
            acc_or = acc_or | t
        m.d.comb += orv.eq(acc_or)
        bl_hi = bitlen(po["hi"].as_unsigned(), A, "bfp_bl_hi")  # hi >= 1 on a bfp POST: sign bit 0
        bl = bitlen(orv, W - 1, "bfp_bl")
        diff = Signal(signed(W.bit_length() + 2), name="bfp_diff")
        m.d.comb += diff.eq(bl - bl_hi)
        e6 = Signal(range(emax + 1), name="bfp_e6")
        m.d.sync += e6.eq(Mux(diff < 0, 0, Mux(diff > emax, emax, diff)))
        y6 = [Signal(signed(W), name=f"bfp_y6_{c}") for c in range(C)]
        m.d.sync += [a.eq(b) for a, b in zip(y6, y5)]
        outs = []
        for c in range(C):
            half = Mux(e6 == 0, 0, (Const(1, unsigned(emax + 1)) << e6) >> 1)
            neg = (y6[c] < 0) & (e6 != 0)
            rnd = Signal(signed(W), name=f"bfp_rnd{c}")
            m.d.comb += rnd.eq((y6[c] + half - neg) >> e6)
            mant = Mux(rnd < po["lo"], po["lo"], Mux(rnd > po["hi"], po["hi"], rnd))
            o = Signal(signed(A + 1), name=f"bfp_out{c}")
            m.d.sync += o.eq(Mux(po["bfp"], mant, y6p[c]))
            outs.append(o[:A])
        exp7 = Signal(cfg.bfp_exp_bits, name="bfp_exp7")
        m.d.sync += exp7.eq(Mux(po["bfp"], e6, 0))
        return outs, exp7
