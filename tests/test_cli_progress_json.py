"""Issue 12, items 8 and 10 (part): progress of long jobs (a rich bar on a terminal, timestamped lines
elsewhere) and a documented ``schema`` id on every ``--json`` output.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from faults import cli
from normsurgeon.cli.output import SCHEMAS
from normsurgeon.cli.progress import ProgressReporter, interval_from_env

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-gpt2"
TINY = "normsurgeon.testing:tiny_gpt2"
TEXT = "DEF F(X):\n    RETURN X + 1\nA = (B, 2)  # C\n" * 200  # bytes < 96 (the tiny models' vocabulary)
TEXT_FLAGS = ["--tokenizer", "bytes", "--seq-len", "16", "--batch-size", "2"]
STAMP = r"· \d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


@pytest.fixture()
def text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text(TEXT)
    return p


def _progress_lines(err: str, label: str) -> list[str]:
    return [ln for ln in err.splitlines() if re.match(STAMP + re.escape(label) + ": ", ln)]


# -- the reporter -----------------------------------------------------------------------------------------
def test_plain_lines_every_n_seconds_with_rate_and_eta():
    c = Console(file=io.StringIO(), width=300, color_system=None)
    clock = iter(range(0, 1000, 10))  # 10 s between calls
    p = ProgressReporter(console=c, tty=False, every=30, clock=lambda: next(clock), stamp=lambda: "T")
    for step in range(0, 11):
        p("removal (fine-tune)", step, 10, unit="step", loss=1.0 / (step + 1), stage="attn")
    lines = c.file.getvalue().splitlines()
    assert lines[0] == "· T removal (fine-tune): 0/10 steps (0%); loss 1.0000, stage attn"
    assert lines[1].startswith("· T removal (fine-tune): 3/10 steps (30%), 0.1 steps/s, 1m10s left")
    assert lines[-1].startswith("· T removal (fine-tune): 10/10 steps (100%), 0.1 steps/s, done in 1m40s")
    assert len(lines) == 5  # start, every 30 s (3 times), the end


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv("NORMSURGEON_PROGRESS_EVERY", "5")
    assert interval_from_env() == 5
    monkeypatch.setenv("NORMSURGEON_PROGRESS_EVERY", "soon")
    assert interval_from_env() == 30
    monkeypatch.delenv("NORMSURGEON_PROGRESS_EVERY")
    assert interval_from_env() == 30


def test_terminal_gets_a_rich_bar_with_rate_and_eta():
    c = Console(file=io.StringIO(), width=160, force_terminal=True, color_system=None)
    p = ProgressReporter(console=c)
    assert p.tty
    p("convert", 0, 4_000_000, unit="B")
    p("convert", 2_000_000, 4_000_000, unit="B")
    p.close()
    shown = c.file.getvalue()
    assert "convert" in shown and "2.0 MB of 4.0 MB" in shown and "50%" in shown and "eta" in shown
    assert "━" in shown  # the bar


# -- every long job reports ---------------------------------------------------------------------------------
def test_streaming_convert_and_layerwise_verify_report_bytes_and_blocks(capfd, tmp_path):
    out = tmp_path / "s"
    code, _, err = cli(capfd, "convert", EXAMPLE, "-o", out, "--stream", "--verify-mode", "layerwise")
    assert code == 0, err
    lines = _progress_lines(err, "convert")
    assert lines[0].endswith("(0%)") and re.search(r"MB of 3\.\d MB \(100%\), [\d.]+ [kMG]?B/s, done in", lines[-1]), lines
    blocks = _progress_lines(err, "verify (layer by layer)")  # 4 blocks: the source's pass, then the conversion's
    assert blocks and blocks[-1].split(": ", 1)[1].startswith("8/8 blocks (100%)"), blocks
    code, _, err = cli(capfd, "verify", EXAMPLE, out, "--layerwise")
    assert code == 0 and "8/8 blocks (100%)" in err
    code, _, err = cli(capfd, "convert", EXAMPLE, "-o", tmp_path / "q", "--stream", "--no-progress")
    assert code == 0 and not _progress_lines(err, "convert")


def test_training_runs_have_distinct_labels_and_a_whole_job(capfd, tmp_path, text_file):
    code, _, err = cli(capfd, "remove-ln", TINY, "--data", text_file, *TEXT_FLAGS, "--finetune", "--control",
                       "--steps", "3", "-o", tmp_path / "ln")
    assert code == 0, err
    assert "removal (fine-tune): 0/3 steps (0%)" in _progress_lines(err, "removal (fine-tune)")[0]  # from the start
    assert "removal (fine-tune): 3/3 steps (100%)" in err and "control (with norms): 3/3 steps (100%)" in err
    assert "whole job: 6/6 steps (100%)" in err and "loss " in err
    code, _, err = cli(capfd, "prepbn", TINY, "--data", text_file, *TEXT_FLAGS, "--finetune", "--steps", "2",
                       "--recalib-batches", "2", "-o", tmp_path / "pb")
    assert code == 0 and "fine-tune (LN -> RepBN): 2/2 steps (100%)" in err, err


def test_diagnose_reports_its_passes_and_json_or_quiet_silence_it(capfd, tmp_path, text_file):
    args = ["diagnose", TINY, "--data", text_file, "--tokenizer", "bytes", "--num-seqs", "4", "--seq-len", "16"]
    code, _, err = cli(capfd, *args)
    assert code == 0 and "stats pass: 4/4 sequences (100%)" in err and "layer removal: 2/2 layers (100%)" in err, err
    assert "· stats pass: 2/4" not in err  # the counted status lines became progress
    for quiet in (["--json"], ["-q"], ["--no-progress"]):
        code, _, err = cli(capfd, *args, *quiet)
        assert code == 0 and not _progress_lines(err, "stats pass"), (quiet, err)


# -- --json: a documented schema on every output ---------------------------------------------------------------
def _sections(doc: str) -> dict[str, str]:
    parts = re.split(r"^## `([^`]+)`\s*$", doc, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _json_runs(tmp: Path, text: Path) -> dict[str, list]:
    return {
        "inspect": ["inspect", EXAMPLE],
        "convert": ["convert", EXAMPLE, "-o", tmp / "rms"],
        "verify": ["verify", EXAMPLE, tmp / "rms"],
        "verify --layerwise": ["verify", EXAMPLE, tmp / "rms", "--layerwise"],
        "convert --stream": ["convert", EXAMPLE, "-o", tmp / "s", "--stream"],
        "convert --dry-run": ["convert", EXAMPLE, "-o", tmp / "x", "--dry-run"],
        "plan": ["plan", EXAMPLE],
        "recipes": ["recipes"],
        "fold-bn": ["fold-bn", "normsurgeon.batchnorm.examples:conv_bn_net", "--input-shape", "2,3,8,8", "-o", tmp / "bn"],
        "remove-ln": ["remove-ln", TINY, "--data", text, *TEXT_FLAGS, "--finetune", "--control", "--steps", "2",
                      "-o", tmp / "ln"],
        "prepbn": ["prepbn", TINY, "--data", text, *TEXT_FLAGS, "--recalib-batches", "2", "-o", tmp / "pb"],
        "interrupted": ["prepbn", TINY, "--data", text, *TEXT_FLAGS, "--finetune", "--steps", "4", "--stop-after", "2",
                        "--recalib-batches", "2", "-o", tmp / "pi"],
        "place": ["place", EXAMPLE, "--scheme", "lns", "--calib-seqs", "2", "--eval-seqs", "2", "--seq-len", "32",
                  "-o", tmp / "pl"],
        "diagnose": ["diagnose", TINY, "--data", text, "--tokenizer", "bytes", "--num-seqs", "2", "--seq-len", "16",
                     "-o", tmp / "dg"],
        "error": ["inspect", tmp / "no-such-model"],
        "usage error": ["convert", EXAMPLE, "-o", tmp / "u", "--to", "layernorm"],
    }


def test_every_json_output_has_a_documented_schema(capfd, tmp_path, text_file):
    sections = _sections((ROOT / "docs" / "json.md").read_text())
    assert set(SCHEMAS.values()) == set(sections), set(SCHEMAS.values()) ^ set(sections)
    seen = set()
    for what, argv in _json_runs(tmp_path, text_file).items():
        code, out, err = cli(capfd, *argv, "--json")
        assert (code == 0) == ("error" not in what), (what, code, err)
        doc = json.loads(out)  # stdout is one JSON document and nothing else
        schema = doc.get("schema")
        assert schema in sections, f"{what}: schema {schema!r} is not documented in docs/json.md"
        assert list(doc)[0] == "schema", what
        undocumented = [k for k in doc if f"`{k}`" not in sections[schema]]
        assert not undocumented, f"{what}: fields {undocumented} of {schema} are not in docs/json.md"
        seen.add(schema)
    assert seen == set(SCHEMAS.values()), set(SCHEMAS.values()) - seen


def test_docs_show_the_progress_bars_and_the_html_report():
    page = (ROOT / "docs" / "cli.md").read_text()
    for image in ("img/progress.svg", "img/progress_convert.svg", "img/diagnose_report.png"):
        assert f"]({image})" in page and (ROOT / "docs" / image).stat().st_size > 1000, image
    svg = (ROOT / "docs" / "img" / "progress.svg").read_text()
    assert svg.startswith("<svg") and "whole&#160;job" in svg and "control&#160;(with&#160;norms)" in svg
