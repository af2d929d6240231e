"""Markdown helpers shared by every report writer: one table function that escapes its cells.

A cell holding ``|`` (``top1/median |h|``, ``max |Δ log-prob|``) or a newline would otherwise end the
cell or the row and shift every column after it.

>>> print(md_table(["metric", "value"], [["max |Δ log-prob|", 1e-7], ["two\\nlines", None]]))
| metric | value |
|---|---|
| max \\|Δ log-prob\\| | 1e-07 |
| two<br>lines | — |
>>> md_cell("a|b\\\\|c")
'a\\\\|b\\\\|c'
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

_UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def md_cell(value: Any, empty: str = "—") -> str:
    """``value`` as the text of one Markdown table cell: ``|`` escaped (an already escaped ``\\|`` is kept),
    line breaks as ``<br>``, ``None`` as ``empty``."""
    if value is None:
        return empty
    text = str(value).replace("\r\n", "\n").replace("\r", "\n").strip("\n")
    text = _UNESCAPED_PIPE.sub(r"\\|", text)
    return text.replace("\n", "<br>")


def md_table(header: Sequence[Any], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table (no trailing newline). ``align``: one of ``"l"``, ``"r"``, ``"c"``
    or ``""`` per column (default: none)."""
    head = [md_cell(h, empty="") for h in header]
    marks = {"l": ":---", "r": "---:", "c": ":---:", "": "---"}
    rule = [marks[a] for a in (align or [""] * len(head))]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for row in rows:
        cells = [md_cell(c) for c in row]
        cells += [""] * (len(head) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def md_code(value: Any) -> str:
    """``value`` as inline code (backticks inside are handled by a longer fence).

    >>> md_code("a`b")
    '``a`b``'
    """
    text = str(value)
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"
