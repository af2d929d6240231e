"""Helpers for the fault-injection suite (tests/test_faults*.py): run the real console entry point,
and check the README's promises after a failure.

A failed command must: exit with its documented code, print exactly one ``error:`` line on stderr
(status lines start with ``·``), no traceback, leave nothing at or beside the destination, and leave
every input byte-identical (sha256 of every file).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from normsurgeon.io.destination import hidden_stem

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "COLUMNS": "60"}


def cli(capfd, *argv) -> tuple[int, str, str]:
    """Run ``normsurgeon ARGV`` in this process through the console entry point; (code, stdout, stderr)."""
    from normsurgeon.cli import main

    capfd.readouterr()
    code = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def cli_subprocess(*argv, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run ``normsurgeon ARGV`` in a fresh interpreter (for real signals, limits and locks)."""
    return subprocess.run([sys.executable, "-m", "normsurgeon.cli", *map(str, argv)], capture_output=True,
                          text=True, env=ENV, timeout=timeout, **kw)


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (symlinks followed), by path."""
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def error_line(err: str) -> str:
    """The single ``error:`` line of ``err``; fails on tracebacks or any other non-status line."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("·")]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]


def leftovers(out: Path) -> list[str]:
    """What a failed run left at or beside ``out`` (the destination, hidden staging/lock siblings)."""
    out = Path(out)
    found = []
    if out.exists() or out.is_symlink():
        found.append(out.name)
    if out.parent.is_dir():
        prefix = f".{hidden_stem(out)}."
        found += sorted(p.name for p in out.parent.iterdir() if p.name.startswith(prefix))
    return found


def assert_failed_cleanly(result: tuple[int, str, str], code: int, out: Path | None, digest_before: dict,
                          *roots: Path, words: tuple[str, ...] = ()) -> str:
    """The promises above for an in-process or subprocess result; returns the error line."""
    got, stdout, err = result
    assert got == code, f"exit {got}, expected {code}\nstdout: {stdout}\nstderr: {err}"
    line = error_line(err)
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    if out is not None:
        assert leftovers(out) == [], leftovers(out)
    assert tree_digest(*roots) == digest_before, "an input changed"
    return line


def as_tuple(p: subprocess.CompletedProcess) -> tuple[int, str, str]:
    return p.returncode, p.stdout, p.stderr


def json_error(stdout: str) -> dict:
    doc = json.loads(stdout)
    assert doc["schema"] == "normsurgeon.error/1" and doc["status"] == "error", doc
    return doc
