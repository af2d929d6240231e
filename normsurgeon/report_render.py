"""Show a Markdown report on the terminal with rich (headings, tables, lists) instead of raw Markdown.

Terminals cannot show images, so ``![alt](loss_curve.png)`` becomes a line naming the picture and the
file to open (relative to the report's folder when ``folder`` is given).

>>> import io
>>> from rich.console import Console
>>> c = Console(file=io.StringIO(), width=60, color_system=None)
>>> render_markdown("# Report\\n\\n| a | b |\\n|---|---|\\n| x \\\\| y | 2 |\\n\\n![loss curve](loss.png)", c, "out")
>>> text = c.file.getvalue()
>>> "x | y" in text and "loss curve: out/loss.png" in text and "![" not in text
True
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_IMAGE = re.compile(r"!\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def images_as_text(text: str, folder: str | Path | None = None) -> str:
    """Replace every Markdown image by ``[image] alt: path`` (``path`` joined to ``folder`` unless it is a
    URL or absolute).

    >>> images_as_text("see ![the curve](c.png) here", "out")
    'see *[image] the curve: out/c.png* here'
    """
    def repl(m: re.Match) -> str:
        alt, src = m.group(1).strip(), m.group(2)
        if folder is not None and not re.match(r"^[a-z][a-z0-9+.-]*:", src) and not Path(src).is_absolute():
            src = str(Path(folder) / src)
        label = f"{alt}: {src}" if alt and alt != Path(src).name else src
        return f"*[image] {label}*"

    return _IMAGE.sub(repl, text)


def render_markdown(text: str, console: Any = None, folder: str | Path | None = None) -> None:
    """Print ``text`` (Markdown) rendered by ``rich.markdown.Markdown``; images named, not drawn."""
    from rich.console import Console
    from rich.markdown import Markdown

    console = console if console is not None else Console()
    console.print(Markdown(images_as_text(text, folder).replace("<br>", " ")))  # table cells: md_cell


def render_report(path: str | Path, console: Any = None) -> None:
    """Render the Markdown report at ``path`` (``lnfree_report.md``, ``equivalence_report.md``,
    ``placement_report.md``...), its images named relative to its folder.

    >>> import io, tempfile, pathlib
    >>> from rich.console import Console
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.md"; _ = p.write_text("# T\\n\\n- item\\n")
    >>> c = Console(file=io.StringIO(), width=40, color_system=None); render_report(p, c)
    >>> "item" in c.file.getvalue()
    True
    """
    path = Path(path)
    render_markdown(path.read_text(encoding="utf-8", errors="replace"), console, path.parent)
