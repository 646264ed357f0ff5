"""docs/ISA.md is generated from hw/isa.py (``python -m hw.isa_doc``) and must not be stale."""

import dataclasses
import subprocess
import sys

import pytest

from hw import isa, isa_doc
from hw.config import AccelConfig
from hw.isa import Opcode

ROOT = isa_doc.DEFAULT_PATH.parent.parent


def test_checked_in_doc_is_current():
    path = isa_doc.DEFAULT_PATH
    assert path.exists(), "docs/ISA.md is missing; run: python -m hw.isa_doc"
    assert path.read_text() == isa_doc.render(), "docs/ISA.md is stale; run: python -m hw.isa_doc"


def test_member_docs_read_from_source():
    docs = isa_doc.member_docs(Opcode)
    assert set(docs) == {op.name for op in Opcode}
    assert all(docs.values()), docs
    assert docs["HALT"].startswith("Wait until every engine is idle")


@pytest.mark.parametrize("cfg", [AccelConfig(), AccelConfig(rows=4, cols=8, w_bits=4, a_bits=2, spad_depth=100)],
                         ids=lambda c: c.describe())
def test_field_rows_match_encoding(cfg):
    """The bit ranges the document prints are where encode() puts each field."""
    # Encode on the hybrid twin, where every MATMUL.pot value is legal; layouts ignore pe_kind.
    enc_cfg = dataclasses.replace(cfg, pe_kind="hybrid")
    assert isa.instr_layout(enc_cfg) == isa.instr_layout(cfg)
    for op in Opcode:
        rows = isa_doc.field_rows(cfg, op)
        assert [r[0] for r in rows] == ["op"] + [f.name for f in isa.FIELDS[op]]
        covered = 0
        for name, lsb, msb, width, signed, _ in rows:
            assert msb - lsb + 1 == width
            assert covered == lsb, f"{op.name}.{name} leaves a gap or overlaps"
            covered = msb + 1
            if name == "op":
                continue
            # Encode the field's all-ones pattern (-1 if signed) alone.
            val = -1 if signed else (1 << width) - 1
            word = isa.Instr(op, {name: val}).encode(enc_cfg)
            assert word == op.value | (((1 << width) - 1) << lsb), f"{op.name}.{name}"
        assert covered <= isa.instr_bits(cfg)


def test_render_contents():
    cfg = AccelConfig()
    text = isa_doc.render(cfg)
    for op in Opcode:
        assert f"### {op.name} ({op.value})" in text
        for f in isa.FIELDS[op]:
            assert f"| `{f.name}` |" in text
    assert f"one {isa.instr_bits(cfg)}-bit word" in text
    assert "round_shift((acc + bias) * mult + residual * res_mult, shift)" in text
    assert cfg.hash in text
    assert "``" not in text.replace("```", "") and ":class:" not in text  # reST markup converted


def test_render_depends_on_config():
    a = isa_doc.render(AccelConfig())
    b = isa_doc.render(dataclasses.replace(AccelConfig(), spad_depth=100))
    assert a != b


def test_check_cli(tmp_path):
    path = tmp_path / "ISA.md"
    assert isa_doc.main(["--check", "--path", str(path)]) == 1  # missing
    assert isa_doc.main(["--path", str(path)]) == 0
    assert path.read_text() == isa_doc.render()
    assert [p.name for p in tmp_path.iterdir()] == ["ISA.md"]  # no temp files left
    assert isa_doc.main(["--check", "--path", str(path)]) == 0
    path.write_text(path.read_text().replace("| `NOP` | 0 |", "| `NOP` | 9 |"))
    r = subprocess.run([sys.executable, "-m", "hw.isa_doc", "--check", "--path", str(path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "stale" in lines[0] and "python -m hw.isa_doc" in lines[0], r.stderr
