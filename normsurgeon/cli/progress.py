"""Progress of long jobs on stderr: a rich progress bar when stderr is a terminal; elsewhere (SLURM,
nohup, a pipe) plain timestamped ``·`` lines, one when a job starts, then at most every N seconds
(``NORMSURGEON_PROGRESS_EVERY``, default 30) and one when it ends.

The library reports through a plain callable and never imports the command line:
``progress(label, completed, total, unit="", **fields)``; ``label`` names one bar (``convert``,
``fine-tune with removal``, ``whole job``...), ``unit`` is ``"B"`` for bytes (then the rate is bytes/s)
or a word such as ``"step"``; ``fields`` (``loss``, ``stage``) are shown after the bar. Callers:
``stream.pipeline.stream_convert``, ``verification.layerwise.verify_layerwise``,
``diagnose.run.run_diagnose``, ``lnfree.run.remove_ln``, ``prepbn.run.run_prepbn`` (all ``progress=``).

>>> import io
>>> from rich.console import Console
>>> c = Console(file=io.StringIO(), width=200, color_system=None)
>>> t = iter([0.0, 10.0, 40.0, 50.0])
>>> p = ProgressReporter(console=c, tty=False, every=30, clock=lambda: next(t), stamp=lambda: "12:00:00")
>>> p("convert", 0, 1000, unit="B"); p("convert", 100, 1000, unit="B"); p("convert", 400, 1000, unit="B")
>>> p("convert", 1000, 1000, unit="B"); p.close()
>>> print(c.file.getvalue().strip())
· 12:00:00 convert: 0 B of 1.0 kB (0%)
· 12:00:00 convert: 400 B of 1.0 kB (40%), 10 B/s, 1m00s left
· 12:00:00 convert: 1.0 kB of 1.0 kB (100%), 20 B/s, done in 50s
"""
from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
from typing import Any, Callable, Iterator

from normsurgeon.cli.console import err_console

ENV_EVERY = "NORMSURGEON_PROGRESS_EVERY"
DEFAULT_EVERY = 30.0


def interval_from_env() -> float:
    """Seconds between plain progress lines: ``NORMSURGEON_PROGRESS_EVERY`` (default 30; a bad value: 30)."""
    try:
        value = float(os.environ.get(ENV_EVERY, DEFAULT_EVERY))
    except ValueError:
        return DEFAULT_EVERY
    return value if value >= 0 else DEFAULT_EVERY


def human_bytes(n: float) -> str:
    """
    >>> human_bytes(0), human_bytes(1500), human_bytes(3.2e9)
    ('0 B', '1.5 kB', '3.2 GB')
    """
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def duration(seconds: float) -> str:
    """
    >>> duration(5.2), duration(75), duration(3725)
    ('5s', '1m15s', '1h02m05s')
    """
    s = int(round(max(seconds, 0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def amount(completed: float, total: float | None, unit: str) -> str:
    """
    >>> amount(3, 10, "step"), amount(1, None, ""), amount(2e6, 4e6, "B")
    ('3/10 steps', '1', '2.0 MB of 4.0 MB')
    """
    if unit == "B":
        return human_bytes(completed) + (f" of {human_bytes(total)}" if total else "")
    word = f" {unit}s" if unit and (total or completed) != 1 else f" {unit}" if unit else ""
    return f"{completed:g}" + (f"/{total:g}" if total else "") + word


def rate(per_second: float, unit: str) -> str:
    """
    >>> rate(3.14159, "step"), rate(2.5e8, "B")
    ('3.14 steps/s', '250.0 MB/s')
    """
    if unit == "B":
        return f"{human_bytes(per_second)}/s"
    return f"{per_second:.3g} {unit or 'item'}s/s"


def format_fields(fields: dict[str, Any]) -> str:
    """
    >>> format_fields({"loss": 3.14159, "stage": "", "lr": None, "block": "h.3"})
    'loss 3.1416, block h.3'
    """
    parts = []
    for k, v in fields.items():
        if v is None or v == "":
            continue
        parts.append(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}")
    return ", ".join(parts)


class _Line:
    """What the plain-line mode remembers of one label."""

    def __init__(self, t: float, completed: float):
        self.t0, self.c0, self.last, self.done = t, completed, None, False


class ProgressReporter:
    """``progress(label, completed, total, unit="", **fields)``; ``close()`` (or the ``with`` block) ends it.

    ``tty``: draw rich bars (default: whether ``console`` is a terminal); ``every``: seconds between
    plain lines (default: ``NORMSURGEON_PROGRESS_EVERY`` or 30). Safe to call from several threads (the
    streaming writer reports bytes from its own thread).
    """

    def __init__(self, *, console=None, tty: bool | None = None, every: float | None = None,
                 clock: Callable[[], float] = time.monotonic, stamp: Callable[[], str] | None = None):
        self.console = console if console is not None else err_console
        self.tty = self.console.is_terminal if tty is None else tty
        self.every = interval_from_env() if every is None else every
        self.clock = clock
        self.stamp = stamp or (lambda: datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"))
        self._lock = threading.Lock()
        self._lines: dict[str, _Line] = {}
        self._bars = None
        self._tasks: dict[str, int] = {}

    # -- the callable the library gets
    def __call__(self, label: str, completed: float, total: float | None = None, unit: str = "",
                 **fields: Any) -> None:
        with self._lock:
            if self.tty:
                self._bar(label, completed, total, unit, fields)
            else:
                self._line(label, completed, total, unit, fields)

    def close(self) -> None:
        with self._lock:
            if self._bars is not None:
                self._bars.stop()
                self._bars = None

    def __enter__(self) -> "ProgressReporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- a terminal: rich bars, one per label
    def _bar(self, label: str, completed: float, total: float | None, unit: str, fields: dict) -> None:
        if self._bars is None:
            self._bars = make_bars(self.console)
            self._bars.start()
        info = format_fields(fields)
        if label not in self._tasks:
            self._tasks[label] = self._bars.add_task(label, total=total, completed=completed, unit=unit, info=info)
        else:
            self._bars.update(self._tasks[label], total=total, completed=completed, info=info)

    # -- not a terminal: timestamped lines
    def _line(self, label: str, completed: float, total: float | None, unit: str, fields: dict) -> None:
        now = self.clock()
        st = self._lines.get(label)
        if st is None:
            st = self._lines[label] = _Line(now, completed)
        finished = total is not None and completed >= total
        due = st.last is None or (finished and not st.done) or now - st.last >= self.every
        if not due or (st.done and finished):
            return
        st.last, st.done = now, finished
        text = f"{label}: {amount(completed, total, unit)}"
        if total:
            text += f" ({100 * completed / total:.0f}%)"
        spent, moved = now - st.t0, completed - st.c0
        if spent > 0 and moved > 0:
            per_s = moved / spent
            text += f", {rate(per_s, unit)}"
            if finished:
                text += f", done in {duration(spent)}"
            elif total:
                text += f", {duration((total - completed) / per_s)} left"
        info = format_fields(fields)
        self.console.print(f"· {self.stamp()} {text}" + (f"; {info}" if info else ""), markup=False,
                           highlight=False, soft_wrap=True)


def make_bars(console):
    """The rich ``Progress`` of a terminal: label, bar, amount, rate, time left, fields."""
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.text import Text

    class Amount(ProgressColumn):
        def render(self, task):
            return Text(amount(task.completed, task.total, task.fields.get("unit", "")), style="progress.download")

    class Rate(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text(rate(speed, task.fields.get("unit", "")) if speed else "", style="progress.data.speed")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    Amount(), Rate(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=console, transient=False)


@contextlib.contextmanager
def progress_for(enabled: bool, **kw) -> Iterator[ProgressReporter | None]:
    """A reporter for one command (None when disabled: ``--json``, ``-q``, ``--no-progress``), closed at the
    end of the block so that an error line prints below the bars."""
    from normsurgeon.cli.console import is_quiet

    if not enabled or is_quiet():
        yield None
        return
    reporter = ProgressReporter(**kw)
    try:
        yield reporter
    finally:
        reporter.close()
