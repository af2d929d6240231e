"""Running one support-matrix cell: the real CLI in a subprocess (offline, one thread, with a timeout),
classified; with a traceback's place for an internal error; and the versions a run records.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from support_matrix_lib import ROOT
from support_matrix_lib.cells import command
from support_matrix_lib.classify import classify
from model_zoo import ZOO  # noqa: E402 - on sys.path through support_matrix_lib


def run_cell(name: str, recipe: str, prep: dict, work: Path, text: str, timeout: float, debug_errors: bool) -> dict:
    out = work / name / f"out-{recipe}"
    args = command(recipe, name, prep, str(out), text)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONWARNINGS="ignore", TERM="dumb", COLUMNS="400")
    env.pop("NORMSURGEON_DEBUG", None)
    t = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "normsurgeon.cli", *args], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=str(work))
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = None, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
            else (e.stdout or ""), (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) \
            else (e.stderr or "")
    wall = time.time() - t
    res = classify(recipe, rc, stdout, stderr, out if out.exists() else None, prep)
    res.update(name=name, recipe=recipe, kind=ZOO[name].kind, wall_s=round(wall, 2),
               command="normsurgeon " + " ".join(a.replace(str(work) + "/", "") for a in args))
    if rc == 1 and debug_errors:  # where it broke: the traceback's last frames
        shutil.rmtree(out, ignore_errors=True)
        try:
            p = subprocess.run([sys.executable, "-m", "normsurgeon.cli", *args], capture_output=True, text=True,
                               timeout=timeout, env=dict(env, NORMSURGEON_DEBUG="1"), cwd=str(work))
            res["where"] = traceback_place(p.stderr)
        except subprocess.TimeoutExpired:
            res["where"] = None
    shutil.rmtree(out, ignore_errors=True)
    return res


def traceback_place(stderr: str) -> str | None:
    """'path:line in func' of the last frame inside normsurgeon (else the last frame), and the exception."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', stderr)
    if not frames:
        return None
    mine = [f for f in frames if "/normsurgeon/" in f[0] and "site-packages" not in f[0]]
    path, line, func = (mine or frames)[-1]
    path = re.sub(r".*/(normsurgeon|transformers|torch)/", r"\1/", path)
    exc = [ln.strip() for ln in stderr.splitlines() if re.match(r"^\w[\w.]*(Error|Exception)\b", ln.strip())]
    return f"{path}:{line} in {func}" + (f" ({exc[-1][:160]})" if exc else "")


def versions() -> dict:
    import torch
    import transformers

    import normsurgeon

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            return ""

    return {"normsurgeon": getattr(normsurgeon, "__version__", "?"), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "git": git("rev-parse", "--short", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--", "normsurgeon"))}
