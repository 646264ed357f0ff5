"""boards/: protocol, UART and host bridge (Amaranth simulator), board defaults, CLI errors.

The SoC end to end under Verilator is in ``test_boards_soc.py``; a real iCEBreaker build in
``test_boards_build.py``.
"""

import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from amaranth.hdl import Module
from amaranth.sim import Simulator

from boards import link
from boards import protocol as P
from boards.protocol import Cmd, Status
from boards.soc import HostBridge
from boards.uart import UARTRx, UARTTx, clocks_per_bit
from hw import isa
from hw.config import AccelConfig
from hw.isa import HostMem
from hw.top import QuarryTop

ROOT = Path(__file__).resolve().parent.parent
SMALL = AccelConfig(rows=2, cols=2, w_bits=4, a_bits=4, spad_depth=64, acc_depth=16, wmem_depth=16,
                    imem_depth=16, param_depth=4)


# -- protocol ------------------------------------------------------------------------------------

def test_crc8_is_the_standard_smbus_crc():
    # Published check value of CRC-8/SMBUS (poly 0x07, init 0): crc("123456789") = 0xF4.
    assert P.crc8(b"123456789") == 0xF4


def test_crc8_matrix_matches_the_byte_update():
    rng = random.Random(1)
    taps = P.crc8_matrix()
    for _ in range(500):
        c, b = rng.randrange(256), rng.randrange(256)
        x = c ^ b
        hw = sum((sum(x >> i & 1 for i in taps[j]) & 1) << j for j in range(8))
        assert hw == P.crc8(bytes([b]), c)


def test_frames_round_trip_and_reject_damage():
    frame = P.encode_reply(Status.OK, b"\x01\x02\x03")
    assert P.decode_frame(frame) == (Status.OK.value, b"\x01\x02\x03")
    assert P.frame_length(frame[:P.HEADER_BYTES]) == len(frame)
    with pytest.raises(P.ProtocolError, match="checksum"):
        P.decode_frame(frame[:-1] + bytes([frame[-1] ^ 1]))
    with pytest.raises(P.ProtocolError, match="sync"):
        P.decode_frame(bytes([0]) + frame[1:])
    with pytest.raises(P.ProtocolError, match="header says"):
        P.decode_frame(frame[:-2] + frame[-1:])
    with pytest.raises(ValueError, match="exceeds"):
        P.encode_request(Cmd.WRITE, bytes(P.MAX_PAYLOAD + 1))


def test_info_payload_round_trips():
    info = P.Info(P.VERSION, 50_000_000, 434, SMALL.hash, 0x0123456789ABCDEF)
    assert P.Info.from_payload(info.payload()) == info
    with pytest.raises(P.ProtocolError):
        P.Info.from_payload(info.payload()[:-1])


def test_rows_on_the_wire_are_the_isa_rows():
    for mem in isa.host_mems(SMALL):
        assert P.row_bytes(SMALL, mem) == -(-isa.host_row_bits(SMALL)[mem] // 8)


# -- UART ----------------------------------------------------------------------------------------

def test_clocks_per_bit():
    assert clocks_per_bit(12e6, 115200) == round(12e6 / 115200)
    with pytest.raises(ValueError, match="off"):
        clocks_per_bit(1e6, 115200)  # 8.68 -> 9 is 3.5 % off
    with pytest.raises(ValueError, match="at least"):
        clocks_per_bit(300e3, 115200)
    with pytest.raises(ValueError, match="clocks_per_bit must be"):
        UARTRx(3)


@pytest.mark.parametrize("cpb", [4, 7, 16])
def test_uart_loopback(cpb):
    m = Module()
    m.submodules.tx = tx = UARTTx(cpb)
    m.submodules.rx = rx = UARTRx(cpb)
    m.d.comb += rx.rx.eq(tx.tx)
    data = bytes(random.Random(cpb).randrange(256) for _ in range(20)) + b"\x00\xff\x55"
    got = []

    async def send(ctx):
        for b in data:
            ctx.set(tx.data.payload, b)
            ctx.set(tx.data.valid, 1)
            await ctx.tick().until(tx.data.ready)
        ctx.set(tx.data.valid, 0)

    async def receive(ctx):
        ctx.set(rx.data.ready, 1)
        while len(got) < len(data):
            _, _, valid, payload, overrun, framing = await ctx.tick().sample(
                rx.data.valid, rx.data.payload, rx.overrun, rx.framing)
            assert not overrun and not framing
            if valid:
                got.append(payload)

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(send)
    sim.add_testbench(receive)
    sim.run_until(1e-6 * cpb * 10 * (len(data) + 4))
    assert bytes(got) == data


def test_uart_rx_flags_a_missing_stop_bit():
    cpb = 4
    m = Module()
    m.submodules.rx = rx = UARTRx(cpb)
    flags = []

    async def drive(ctx):
        for bit in [0] + [1, 0, 1, 0, 1, 0, 1, 0] + [0] * 3 + [1] * 2:  # stop bit low
            ctx.set(rx.rx, bit)
            for _ in range(cpb):
                _, _, framing, valid = await ctx.tick().sample(rx.framing, rx.data.valid)
                flags.append((framing, valid))

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(drive)
    sim.run()
    assert any(f for f, _ in flags) and not any(v for _, v in flags)


# -- bridge + QuarryTop in the Amaranth simulator -------------------------------------------------

def _bridge_sim(body, timeout_cycles=300):
    """Run ``body(run, raw)`` against QuarryTop(SMALL) + HostBridge, bytes straight into the
    bridge's streams. ``run(op)`` drives a :mod:`boards.link` generator; ``raw(frame)`` sends any
    bytes and returns the reply frame."""
    info = P.Info(P.VERSION, 1_000_000, 4, SMALL.hash, 99)
    m = Module()
    m.submodules.top = top = QuarryTop(SMALL)
    m.submodules.br = br = HostBridge(SMALL, info=info, timeout_cycles=timeout_cycles)
    for name in ("start", "host_mem", "host_addr", "host_wdata", "host_we", "host_re"):
        m.d.comb += getattr(top, name).eq(getattr(br, name))
    for name in ("busy", "done", "cycles", "host_rdata"):
        m.d.comb += getattr(br, name).eq(getattr(top, name))

    async def tb(ctx):
        async def send(data, gap=2):
            for b in data:
                ctx.set(br.rx.payload, b)
                ctx.set(br.rx.valid, 1)
                while not (await ctx.tick().sample(br.rx.ready))[2]:
                    pass
                ctx.set(br.rx.valid, 0)
                if gap:
                    await ctx.tick().repeat(gap)

        async def reply():
            out = bytearray()
            ctx.set(br.tx.ready, 1)
            for _ in range(100_000):
                _, _, valid, payload = await ctx.tick().sample(br.tx.valid, br.tx.payload)
                if valid:
                    out.append(payload)
                    if len(out) >= P.HEADER_BYTES and len(out) == P.frame_length(bytes(out)):
                        ctx.set(br.tx.ready, 0)
                        return bytes(out)
            raise AssertionError(f"no complete reply ({bytes(out).hex()})")

        async def raw(frame, gap=2):
            await send(frame, gap)
            return await reply()

        async def run(op):
            try:
                item = next(op)
                while True:
                    if item is link.PAUSE:
                        await ctx.tick().repeat(20)
                        item = op.send(None)
                    else:
                        item = op.send(await raw(item))
            except StopIteration as stop:
                return stop.value

        await body(run, raw, send, reply, info)

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()


def _status(frame: bytes) -> Status:
    return Status(P.decode_frame(frame)[0])


def test_bridge_info_write_read_start():
    async def body(run, raw, send, reply, info):
        assert await run(link.get_info()) == info
        rows = [0x12, 0xAB, 0x55, 0x00, 0xFF]
        await run(link.write_rows(SMALL, HostMem.SPAD, 7, rows))
        assert await run(link.read_rows(SMALL, HostMem.SPAD, 6, 7)) == [0] + rows + [0]
        words = [isa.halt().encode(SMALL), isa.nop().encode(SMALL)]
        await run(link.write_rows(SMALL, HostMem.IMEM, 0, words))
        assert await run(link.read_rows(SMALL, HostMem.IMEM, 0, 2)) == words
        assert await run(link.status()) == {"busy": False, "done": False, "error": False}
        cycles = await run(link.run_loaded())  # HALT at 0
        assert (await run(link.status()))["done"]
        assert cycles == await run(link.read_cycles()) and cycles > 0

    _bridge_sim(body)


def test_bridge_rejects_bad_frames_and_writes_nothing():
    async def body(run, raw, send, reply, info):
        await run(link.write_rows(SMALL, HostMem.SPAD, 0, [0x11, 0x22]))
        good = P.encode_request(Cmd.WRITE, P.region(HostMem.SPAD, 0, 2) + b"\x33\x44")
        assert _status(await raw(good[:-1] + bytes([good[-1] ^ 0x5A]))) is Status.ERR_CHECKSUM
        unknown = max(c.value for c in Cmd) + 1
        assert _status(await raw(P.encode_frame(P.REQ_SYNC, unknown, b"\x01\x02"))) is Status.ERR_COMMAND
        depth = isa.host_depths(SMALL)
        for frame in (P.encode_request(Cmd.WRITE, P.region(HostMem.SPAD, depth[HostMem.SPAD] - 1, 2) + b"\x66\x77"),
                      P.encode_request(Cmd.WRITE, P.region(HostMem.WMEM, 0, 1) + b"\x66"),
                      P.encode_request(Cmd.READ, P.region(HostMem.PARAM, 0, 1)),
                      P.encode_request(Cmd.READ, P.REGION.const({"mem": 7, "addr": 0, "count": 1})
                                       .as_bits().to_bytes(P.REGION.size // 8, "little"))):
            assert _status(await raw(frame)) is Status.ERR_ADDRESS
        for frame in (P.encode_request(Cmd.WRITE, P.region(HostMem.SPAD, 0, 2) + b"\x66"),
                      P.encode_request(Cmd.READ, P.region(HostMem.SPAD, 0, 2) + b"\x00"),
                      P.encode_request(Cmd.WRITE, b"\x02\x00"),
                      P.encode_request(Cmd.START, b"\x00")):
            assert _status(await raw(frame)) is Status.ERR_LENGTH
        # A frame cut short times out, and the device is ready for the next one.
        await send(P.encode_request(Cmd.WRITE, P.region(HostMem.SPAD, 0, 2) + b"\x66\x77")[:8])
        assert _status(await reply()) is Status.ERR_TIMEOUT
        assert (await run(link.status()))["error"]  # the last reply was an error
        # Only the checksum-failed frame (valid header) may have written; the rest wrote nothing.
        assert await run(link.read_rows(SMALL, HostMem.SPAD, 0, 2)) in ([0x11, 0x22], [0x33, 0x44])
        assert not (await run(link.status()))["error"]

    _bridge_sim(body)


def test_bridge_is_busy_while_the_program_runs():
    async def body(run, raw, send, reply, info):
        # A long POOL keeps the accelerator busy for hundreds of cycles.
        prog = [isa.pool(mode=isa.PoolMode.MAX, src_base=0, dst_base=0, in_h=16, in_w=4, out_h=16, out_w=4,
                         k_h=3, k_w=3, off_h=-1, off_w=-1), isa.halt()]
        await run(link.write_rows(SMALL, HostMem.IMEM, 0, [i.encode(SMALL) for i in prog]))
        await run(link.start())
        assert _status(await raw(P.encode_request(Cmd.START), gap=0)) is Status.ERR_BUSY
        assert _status(await raw(P.encode_request(Cmd.READ, P.region(HostMem.SPAD, 0, 1)), gap=0)) is Status.ERR_BUSY
        assert (await run(link.status()))["busy"]
        while (await run(link.status()))["busy"]:
            pass

    _bridge_sim(body)


def test_link_refuses_a_foreign_bitstream():
    from hw.program import Program

    prog = Program(SMALL, [isa.halt()], {}, {})
    info = P.Info(P.VERSION, 1, 4, SMALL.hash, 5)
    link.check_info(info, prog, 5)
    with pytest.raises(link.MismatchError, match="other weights"):
        link.check_info(info, prog, 6)
    with pytest.raises(link.MismatchError, match="config"):
        link.check_info(P.Info(P.VERSION, 1, 4, "0" * 16, 5), prog, 5)
    with pytest.raises(ValueError, match="does not fit"):
        next(link.write_rows(SMALL, HostMem.SPAD, 0, [1 << 8]))


# -- CLIs: one line, exit 2, nothing written -----------------------------------------------------------

def _cli(module, args, cwd):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("args,pattern", [
    (["--board", "nexys", "--model", "quarry_cnn"], r"invalid choice: 'nexys'"),
    (["--board", "icebreaker"], r"the following arguments are required: --model"),
    (["--board", "icebreaker", "--model", "no/such/dir"], r"--model no/such/dir: not a compiled model"),
    (["--board", "icebreaker", "--model", "quarry_cnn", "--pe", "4"], r"pe must look like ROWSxCOLS"),
    (["--board", "icebreaker", "--model", "quarry_cnn", "--bits", "9"], r"w_bits must be an integer in 2\.\.8"),
    (["--board", "icebreaker", "--model", "bogus.qprog"], r"cannot read program bogus\.qprog"),
    (["--board", "icebreaker", "--model", "quarry_cnn", "--freq", "24"], r"--freq: icebreaker runs at its 12 MHz"),
    (["--board", "ulx3s-85f", "--model", "quarry_cnn", "--freq", "77.7"], r"--freq: no ECP5 PLL setting makes 77\.7 MHz"),
])
def test_build_cli_bad_options(tmp_path, args, pattern):
    r = _cli("boards.build", args + ["--out", str(tmp_path / "out")], tmp_path)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(pattern, r.stderr), r.stderr
    assert list(tmp_path.iterdir()) == [], "nothing may be written"


def test_build_cli_program_without_the_tool(tmp_path):
    env_path = str(Path(sys.executable).parent)  # the venv: no iceprog in it
    r = subprocess.run([sys.executable, "-m", "boards.build", "--board", "icebreaker", "--model", "quarry_cnn",
                        "--program", "--out", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": env_path, "PYTHONPATH": str(ROOT), "ICEPROG": ""})
    assert r.returncode == 2
    assert re.fullmatch(r"python -m boards\.build: error: --program: iceprog not found .*\n", r.stderr), r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,pattern", [
    (["--port", "/dev/quarry-no-such-port", "--dataset", "mnist", "--n", "1"], r"cannot open /dev/quarry-no-such-port"),
    (["--port", "/dev/null0", "--image", "missing.npy"], r"--image missing\.npy: no such file"),
    (["--port", "/dev/null0", "--dataset", "mnist", "--n", "0"], r"--n must be >= 1"),
    (["--dataset", "mnist"], r"required: --port"),
    (["--port", "x", "--dataset", "mnist", "--model", "nope"], r"--model nope: cannot read program"),
])
def test_host_cli_errors(tmp_path, args, pattern):
    r = _cli("boards.host", args, tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(pattern, r.stderr), r.stderr


def test_host_loads_images(tmp_path):
    from boards.host import HostError, load_image

    np.save(tmp_path / "a.npy", np.full((28, 28), 255, np.uint8))
    assert load_image(tmp_path / "a.npy", (1, 28, 28)).max() == 1.0
    np.save(tmp_path / "b.npy", np.zeros((14, 14)))
    with pytest.raises(HostError, match="does not match the model input"):
        load_image(tmp_path / "b.npy", (1, 28, 28))
    np.save(tmp_path / "c.npy", np.full((28, 28), 3.0))
    with pytest.raises(HostError, match=r"values must be in \[0, 1\]"):
        load_image(tmp_path / "c.npy", (1, 28, 28))


def test_report_parsing_of_a_failed_place():
    from boards.build import _utilisation_from_log

    log = ("Info: Device utilisation:\nInfo: \t         ICESTORM_LC:  11306/ 5280   214%\n"
           "Info: \t        ICESTORM_RAM:    110/   30   366%\nInfo: \n"
           "ERROR: Unable to place cell 'x', no BELs remaining to implement cell type 'ICESTORM_LC'\n")
    assert _utilisation_from_log(log) == {"ICESTORM_LC": {"used": 11306, "available": 5280},
                                          "ICESTORM_RAM": {"used": 110, "available": 30}}


# -- board defaults ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["icebreaker", "ulx3s-85f"])
def test_board_depths_are_what_its_default_model_needs(name):
    """The rows a program needs depend on the model's structure only, so an untrained instance
    (no training in the test) gives the default model's needs."""
    from dataclasses import replace

    import torch

    from boards import tiny
    from boards.build import _MEASURE_DEPTHS, board_config, memory_needs
    from boards.platforms import get_board
    from compiler import compile as compile_model
    from compiler import zoo

    board = get_board(name)
    tiny.register()
    torch.manual_seed(0)
    model = zoo.MODELS[board.default_model]().eval()
    calib = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    prog = compile_model(model, calib, replace(board.config, **_MEASURE_DEPTHS))
    assert board_config(board.config, memory_needs(prog)) == board.config
    compile_model(model, calib, board.config)  # and it compiles for the board as is


def test_pseudo_clocks_are_dropped_and_real_ones_kept():
    from boards.build import _pseudo_clock

    assert _pseudo_clock("$PACKER_GND_NET")
    assert not _pseudo_clock("$glbnet$clk") and not _pseudo_clock("cd_sync.clk")


def test_host_finds_the_program_of_the_bitstream(tmp_path):
    from boards.host import HostError, find_program, rom_id_of
    from hw.program import Program

    progs = [Program(SMALL, [isa.halt()], {}, {}), Program(SMALL, [isa.nop(), isa.halt()], {"wmem": [3]}, {})]
    for i, prog in enumerate(progs):
        prog.save(tmp_path / f"board{i}" / "program.qprog")
    for prog in progs:
        info = P.Info(P.VERSION, 1, 4, SMALL.hash, rom_id_of(prog))
        assert find_program(info, tmp_path).images == prog.images
    with pytest.raises(HostError, match="no program under"):
        find_program(P.Info(P.VERSION, 1, 4, SMALL.hash, 12345), tmp_path)
