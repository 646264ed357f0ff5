"""``python -m hw.build``: outputs, and one-line errors (exit 2) that leave nothing behind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hw.build import main
from hw.config import AccelConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("args,pattern", [
    (["--pe", "0x4"], r"rows must be an integer in 1\.\.32, not 0"),
    (["--pe", "16"], r"pe must look like ROWSxCOLS"),
    (["--pe", "4x33"], r"cols must be an integer in 1\.\.32, not 33"),
    (["--bits", "1"], r"w_bits must be an integer in 2\.\.8, not 1"),
    (["--bits", "9"], r"w_bits must be an integer in 2\.\.8, not 9"),
    (["--abits", "9"], r"a_bits must be an integer in 2\.\.8, not 9"),
    (["--pe-kind", "fp16"], r"pe_kind must be one of int, pot, hybrid, not 'fp16'"),
    # A PoT W8 accumulator (a + 1 + 15 exponent bits + log2 depth) outgrows the requant budget.
    (["--pe-kind", "pot", "--wmem-depth", "1048576"], r"acc width \(44\) \+ mult_bits \(24\) must be <= 60"),
    (["--bits", "x"], r"argument --bits: invalid int value"),
    (["--spad-depth", "1"], r"spad_depth must be an integer in 2\.\."),
])
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, args, pattern):
    out = tmp_path / "hw"
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(args + ["--out", str(out)]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    import re
    assert re.search(pattern, err), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir()], "nothing half-written may be left"


@pytest.mark.parametrize("pe_kind", ["int", "pot", "hybrid"])
def test_build_writes_verilog_config_and_report(tmp_path, pe_kind):
    out = tmp_path / "hw"
    r = subprocess.run([sys.executable, "-m", "hw.build", "--pe", "3x2", "--wbits", "4", "--abits", "6",
                        "--pe-kind", pe_kind, *(["--no-post-overlap"] if pe_kind == "hybrid" else []),
                        "--spad-depth", "64", "--acc-depth", "16", "--wmem-depth", "64", "--imem-depth", "32",
                        "--param-depth", "4", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "build.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rows"] == 3 and cfg["cols"] == 2 and cfg["w_bits"] == 4 and cfg["a_bits"] == 6
    assert cfg["pe_kind"] == pe_kind and info["pe_kind"] == pe_kind
    assert info["post_overlap"] == (pe_kind != "hybrid") == AccelConfig.from_dict(cfg).post_overlap
    assert info["pe_count"] == 6 and info["acc_width"] == AccelConfig.from_dict(cfg).acc_width
    text = (out / "quarry_top.v").read_text()
    assert "module quarry_top" in text
    assert info["verilog_lines"] == text.count("\n")
    assert set(info["memory_bits"]) == {"spad", "acc", "wmem", "imem", "param"}
    assert info["memory_bits"]["spad"] == 64 * 3 * 6


def test_bad_rom_is_one_line(tmp_path, capsys):
    bogus = tmp_path / "model"
    bogus.mkdir()
    (bogus / "program.qprog").write_bytes(b"not a program")
    assert main(["--pe", "2x2", "--rom", str(bogus), "--out", str(tmp_path / "hw")]) == 2
    err = capsys.readouterr().err
    assert "not a Quarry program" in err or "truncated" in err
    assert not (tmp_path / "hw").exists()
