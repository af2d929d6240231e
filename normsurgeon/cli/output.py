"""What a command prints as its result: ``--json`` documents, each with a ``schema`` id (documented in
``docs/json.md``), and Markdown reports rendered with rich (``normsurgeon.report_render``).

>>> import io, contextlib
>>> buf = io.StringIO()
>>> with contextlib.redirect_stdout(buf):
...     emit({"status": "ok"}, "inspect")
>>> buf.getvalue().splitlines()[1]
'  "schema": "normsurgeon.inspect/1",'
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# One id per kind of document; a library report that carries its own ``schema`` keeps it.
SCHEMAS = {
    "inspect": "normsurgeon.inspect/1",
    "equivalence": "normsurgeon.equivalence/1",  # convert, verify, fold-bn (verification/report.py SCHEMA)
    "plan": "normsurgeon.plan/1",  # plan, convert --dry-run
    "recipes": "normsurgeon.recipes/1",
    "remove-ln": "normsurgeon.lnfree/1",
    "prepbn": "normsurgeon.prepbn/1",  # prepbn/run.py SCHEMA
    "place": "normsurgeon.placement/1",
    "diagnose": "normsurgeon.diagnose/1",
    "interrupted": "normsurgeon.interrupted/1",
    "error": "normsurgeon.error/1",
}


def with_schema(doc: dict, kind: str) -> dict:
    """``doc`` with ``schema`` first: its own when it has one, else the id of ``kind``."""
    return {"schema": doc.get("schema") or SCHEMAS[kind], **{k: v for k, v in doc.items() if k != "schema"}}


def emit(doc: dict, kind: str) -> None:
    """Print ``doc`` as the command's JSON document on stdout."""
    print(json.dumps(with_schema(doc, kind), indent=2, default=str))


def report_file(folder: Path, *names: str) -> Path | None:
    """The Markdown report in ``folder``: the first of ``names`` that exists, else any ``*report.md``."""
    folder = Path(folder)
    for name in (*names, "report.md", "equivalence_report.md"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*report.md"))
    return found[0] if found else None


def show_report(console: Any, folder: Path | None, names: tuple[str, ...], markdown: str | None = None) -> None:
    """Render the report written in ``folder`` (or, with nothing written, the ``markdown`` text) with rich:
    headings, tables and lists instead of raw Markdown; images are named, not drawn."""
    from normsurgeon.report_render import render_markdown, render_report

    path = report_file(folder, *names) if folder is not None else None
    if path is not None:
        render_report(path, console)
    elif markdown is not None:
        render_markdown(markdown, console, folder)
