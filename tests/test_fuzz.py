"""The fuzz driver (:mod:`sim.fuzz`) without the RTL: resumable state, deterministic programs,
minimization of a failing program and the run record. The RTL fuzz run itself is
``tests/test_rtl_system.py::test_fuzz_random_configs`` and ``make fuzz``."""

import json

import pytest

from hw.isa import HostMem, Opcode
from sim import fuzz


def _ok_backend(calls):
    def backend(cfg, cases):
        calls.append(len(cases))
        return [[] for _ in cases], [1 for _ in cases]
    return backend


def test_cases_are_reproducible_from_config_seed_and_index():
    cs = fuzz.config_seed(7, 3)
    cfg = fuzz.fuzz_config(cs)
    a = fuzz.make_case(cfg, cs, 5)
    b = fuzz.make_case(fuzz.fuzz_config(cs), cs, 5)
    assert a[0] == b[0] == fuzz.KINDS[5 % 4]
    assert a[1].program.words() == b[1].program.words()


def test_fuzz_configs_cover_every_pe_kind_and_narrow_accumulators():
    cfgs = [fuzz.fuzz_config(fuzz.config_seed(1, k)) for k in range(4)]
    assert {c.pe_kind for c in cfgs[:3]} == {"int", "pot", "hybrid"}
    narrow = [c for c in cfgs if c.acc_bits is not None]
    assert narrow and all(c.product_bits < c.acc_width <= c.product_bits + 3 for c in narrow)


def test_fuzz_configs_include_block_scale_with_scaled_matmuls():
    """Some configs have DSConv block rescaling, and their programs' MATMULs use scale rows."""
    cfgs = [(cs, fuzz.fuzz_config(cs)) for cs in (fuzz.config_seed(1, k) for k in range(10))]
    bs = [(cs, c) for cs, c in cfgs if c.block_scale]
    assert 2 <= len(bs) <= 6 and {c.pe_kind for _, c in bs} == {"int", "pot", "hybrid"}
    assert all(c.param_depth >= 64 for _, c in bs) and any(not c.block_scale for _, c in cfgs)
    cs, cfg = bs[0]
    scaled = 0
    for j in range(8):
        _, case = fuzz.make_case(cfg, cs, j)
        scaled += any(i.op is Opcode.MATMUL and i.args["scale_addr"] for i in case.program.instrs)
    assert scaled >= 2


def test_fuzz_configs_include_bfp_with_bfp_posts():
    """A fraction of the block-scale configs have BFP activations; their cases carry a spad_exp
    image and BFP POSTs, and their jobs read the output rows' exponents back."""
    cfgs = [(cs, fuzz.fuzz_config(cs)) for cs in (fuzz.config_seed(1, k) for k in range(20))]
    bfp = [(cs, c) for cs, c in cfgs if c.bfp_exp_bits]
    n_bs = sum(1 for _, c in cfgs if c.block_scale)
    assert 1 <= len(bfp) < n_bs and all(c.block_scale for _, c in bfp)
    cs, cfg = bfp[0]
    posts = 0
    for j in range(8):
        _, case = fuzz.make_case(cfg, cs, j)
        assert "spad_exp" in case.program.images
        posts += sum(1 for i in case.program.instrs if i.op is Opcode.POST and i.args["bfp"])
        reads = fuzz.case_job(case).reads
        assert [r for r in reads if r[0] is HostMem.SPAD_EXP] == [(HostMem.SPAD_EXP, a, n) for a, n in case.outputs]
    assert posts >= 2


def test_resume_after_kill_and_extend(tmp_path):
    state = tmp_path / "state.json"
    calls = []
    ok = _ok_backend(calls)

    def killed(cfg, cases):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return ok(cfg, cases)

    with pytest.raises(KeyboardInterrupt):
        fuzz.run(20, 3, per_config=10, batch=5, state_path=state, backend=killed, log=lambda s: None)
    assert json.loads(state.read_text())["done"] == 10  # two batches finished before the kill
    calls.clear()
    st = fuzz.run(20, 3, per_config=10, batch=5, state_path=state, backend=ok, log=lambda s: None)
    assert st["done"] == 20 and sum(calls) + sum(c["skipped"] for c in st["configs"]) == 10
    calls.clear()
    st = fuzz.run(25, 3, per_config=10, batch=5, state_path=state, backend=ok, log=lambda s: None)
    assert st["done"] == 25 and len(st["configs"]) == 3 and sum(calls) <= 5
    assert [c["programs"] + c["skipped"] for c in st["configs"]] == [10, 10, 5]
    # A zero budget stops before any batch; the state is unchanged.
    st = fuzz.run(40, 3, per_config=10, batch=5, state_path=state, backend=ok, budget=0, log=lambda s: None)
    assert st["done"] == 25 and st["sessions"][-1]["stopped"] == "budget"
    with pytest.raises(SystemExit):  # a state file of another seed is not silently reused
        fuzz.run(40, 4, per_config=10, batch=5, state_path=state, backend=ok, log=lambda s: None)


def _buggy(case):
    """A fake RTL bug: any program with a PRELOAD, a MATMUL and a POST with n_lanes >= 2 'fails'."""
    ops = [i.op for i in case.program.instrs]
    return (Opcode.PRELOAD in ops and Opcode.MATMUL in ops
            and any(i.op is Opcode.POST and i.n_lanes >= 2 for i in case.program.instrs))


def test_mismatch_is_recorded_minimized_and_saved(tmp_path):
    def backend(cfg, cases):
        return [["job: fake difference"] if _buggy(c) else [] for c in cases], [1 for _ in cases]

    logs = []
    st = fuzz.run(8, 11, per_config=8, batch=8, state_path=tmp_path / "s.json", backend=backend,
                  log=logs.append)
    bad = [m for m in st["mismatches"]]
    assert bad, "the seed must produce at least one conv/gemm case with a multi-lane POST"
    m = bad[0]
    assert m["minimized"]["instructions"] <= 4 < m["instructions"]  # PRELOAD MATMUL POST HALT
    text = (tmp_path / "failures" / f"c{m['config_seed']}_p{m['program']}_min.txt").read_text()
    assert "PRELOAD" in text and "MATMUL" in text and "POST" in text and "HALT" in text
    assert any("MISMATCH: fuzz seed 11" in s for s in logs)
    assert any("minimized failing program" in s for s in logs)
    fuzz.write_record(st, 8, tmp_path / "rec")
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["summary"]["mismatching_programs"] == len(bad) and rec["summary"]["programs"] == 8
    assert "mismatching programs: **" in (tmp_path / "rec.md").read_text()


def test_minimize_halves_count_fields():
    cs = fuzz.config_seed(5, 0)
    cfg = fuzz.fuzz_config(cs)
    case = next(c for j in range(0, 40, 4) for k, c in [fuzz.make_case(cfg, cs, j)]
                if any(i.op is Opcode.MATMUL and i.out_w >= 4 for i in c.program.instrs))

    def fails(cases):
        return [any(i.op is Opcode.MATMUL and i.out_w >= 2 for i in c.program.instrs) for c in cases]

    small, _ = fuzz.minimize(case, fails, log=lambda s: None)
    mm = [i for i in small.program.instrs if i.op is Opcode.MATMUL]
    assert len(small.program.instrs) <= 3 and len(mm) == 1 and mm[0].out_w in (2, 3)


def test_fast_words_equal_the_isa_encoder():
    """The fuzz driver's shift-and-mask encoder against hw.isa's (Amaranth layouts), on every
    instruction of random programs of random configs (all opcodes, signed offsets, enum fields)."""
    from hw.program import Program

    seen = set()
    for k in range(12):
        cs = fuzz.config_seed(9, k)
        cfg = fuzz.fuzz_config(cs)
        for j in range(8):
            try:
                _, case = fuzz.make_case(cfg, cs, j)
            except Exception:
                continue
            p = case.program
            plain = Program(p.config, p.instrs, p.images, p.manifest)
            assert fuzz.fast_words(p) == plain.words() == p.words()
            seen |= {i.op for i in p.instrs}
    assert seen >= {Opcode.PRELOAD, Opcode.MATMUL, Opcode.POST, Opcode.POOL, Opcode.HALT}
