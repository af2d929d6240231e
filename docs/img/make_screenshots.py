"""Make the screenshots of docs/cli.md: ``progress.svg`` and ``progress_convert.svg`` (the progress bars
of a terminal, recorded with rich's ``Console(record=True)``), ``progress_lines.txt`` (the same job without a terminal) and
``diagnose_report.png`` (the HTML report of ``diagnose``, taken with a headless Chromium when one is
installed: ``apt-get install chromium-headless-shell``).

    python docs/img/make_screenshots.py            # from the repository root
"""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from normsurgeon.cli.progress import ProgressReporter, make_bars  # noqa: E402

RUNS = [("removal (fine-tune)", 300), ("control (with norms)", 300)]
STATUS = ["claimed out/tiny-gpt2-lnfree", "loading the model",
          "loading data (examples.stdlib_corpus:load_stdlib_corpus, tokenizer bytes)",
          "calibrating 9 norms on 8 batches", "fine-tuning with staged removal (300 steps, 1 process(es))",
          "fine-tuning the with-norm control (300 steps)"]


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def progress_svg(path: Path) -> None:
    """remove-ln --finetune --control, the control run a third done: three bars with rates and ETAs."""
    console = Console(record=True, width=118, force_terminal=True, file=io.StringIO(), color_system="truecolor")
    for line in STATUS:
        console.print(f"[dim]· {line}[/]", highlight=False)
    clock = _Clock()
    bars = make_bars(console)
    bars.get_time = clock
    tasks = {}
    job = None
    done = 0
    for label, steps in RUNS:
        tasks[label] = bars.add_task(label, total=steps, unit="step", info="")  # a bar appears when its run starts
        if job is None:
            job = bars.add_task("whole job", total=sum(s for _, s in RUNS), unit="step", info="")
        for step in range(1, steps + 1):
            if label.startswith("control") and step > 100:
                break
            clock.t += 0.71  # seconds per step
            loss = 2.9 - 1.2 * step / steps + (0.05 if label.startswith("removal") else 0.0)
            stage = ("ln_2 -> fixed" if step < 120 else "ln_1 qk -> fixed" if step < 200 else "all removed") \
                if label.startswith("removal") else ""
            bars.update(tasks[label], completed=step, info=f"loss {loss:.4f}" + (f", stage {stage}" if stage else ""))
            done += 1
            bars.update(job, completed=done)
    console.print(bars.get_renderable())
    console.save_svg(str(path), title="normsurgeon remove-ln --finetune --control")


def convert_svg(path: Path) -> None:
    """convert --stream of a 13 GB bfloat16 checkpoint, a third written: bytes, bytes/s and the ETA."""
    console = Console(record=True, width=118, force_terminal=True, file=io.StringIO(), color_system="truecolor")
    for line in ("claimed out/llama-13b-rms", "planning from config.json, the safetensors headers and the norm shifts",
                 "group 16/42: model.layers.14"):
        console.print(f"[dim]· {line}[/]", highlight=False)
    clock = _Clock()
    bars = make_bars(console)
    bars.get_time = clock
    total = 13_015_864_320
    task = bars.add_task("convert", total=total, unit="B", info="")
    for i in range(1, 81):
        clock.t += 0.2
        bars.update(task, completed=min(total, int(i * 0.2 * 302e6)))
    console.print(bars.get_renderable())
    console.save_svg(str(path), title="normsurgeon convert --stream")


def progress_lines(path: Path) -> None:
    """The same job with stderr not a terminal (SLURM, nohup): a line every 30 s per bar."""
    console = Console(width=200, file=io.StringIO(), color_system=None)
    clock = _Clock()
    seconds = iter(range(7 * 3600))
    reporter = ProgressReporter(console=console, tty=False, every=30, clock=clock,
                                stamp=lambda: f"2025-06-02 14:{3 + int(clock.t) // 60:02d}:{int(clock.t) % 60:02d}")
    done = 0
    for label, steps in RUNS:
        for step in range(0, steps + 1):
            if label.startswith("control") and step > 100:
                break
            clock.t = next(seconds) * 0.71
            reporter(label, step, steps, unit="step", loss=2.9 - 1.2 * step / steps)
            done += step > 0
            reporter("whole job", done, 600, unit="step")
    path.write_text(console.file.getvalue())


def report_png(path: Path) -> bool:
    """diagnose's report.html of the embedded GPT-2, as a headless Chromium shows it."""
    browser = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    if browser is None:
        print("no headless Chromium: diagnose_report.png left as it is", file=sys.stderr)
        return False
    from normsurgeon.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "diag"
        code = main(["diagnose", "examples/tiny-gpt2", "--data", "examples.stdlib_corpus:load_stdlib_corpus",
                     "--num-seqs", "8", "--seq-len", "128", "-o", str(out), "-q"])
        assert code == 0, code
        subprocess.run([browser, "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1100,1370",
                        f"--screenshot={path}", (out / "report.html").as_uri()], check=True, capture_output=True)
    return True


if __name__ == "__main__":
    progress_svg(HERE / "progress.svg")
    convert_svg(HERE / "progress_convert.svg")
    progress_lines(HERE / "progress_lines.txt")
    report_png(HERE / "diagnose_report.png")
