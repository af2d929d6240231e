"""Loss / gradient-norm spike score from a training log (OLMo-core stability monitor rule).

A step is a spike when its value exceeds mean + 6 std of the previous ``window`` (128) values; the
score is the fraction of scored steps that spike. Steps with fewer than ``min_history`` (10) earlier
values are not scored, so short logs use a shorter window rather than none.

The log may be JSON (a list of per-step objects, or an object with a ``history`` list as written by
``normsurgeon.train``), JSON Lines, CSV with a header, or plain text with one loss per line.

>>> r = spike_score([1.0, 1.01, 0.99] * 10 + [5.0] + [1.0] * 9)
>>> r["spikes"], r["steps_scored"], round(r["score"], 4)
([30], 30, 0.0333)
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from normsurgeon.errors import InputError

LOSS_KEYS = ("loss", "train_loss", "ce", "train/loss")
GRAD_KEYS = ("grad_norm", "gnorm", "grad-norm", "train/grad_norm")


def spike_score(values: list[float], window: int = 128, sigmas: float = 6.0, min_history: int = 10) -> dict:
    """Spike indices (positions in ``values``), number of scored steps and the spike rate."""
    spikes, scored = [], 0
    for i, v in enumerate(values):
        prev = [x for x in values[max(0, i - window):i] if math.isfinite(x)]
        if len(prev) < min_history:
            continue
        scored += 1
        mean = sum(prev) / len(prev)
        std = math.sqrt(sum((x - mean) ** 2 for x in prev) / len(prev))
        if not math.isfinite(v) or v > mean + sigmas * std:
            spikes.append(i)
    return {"spikes": spikes, "steps_scored": scored, "score": len(spikes) / scored if scored else 0.0,
            "window": window, "sigmas": sigmas}


def _rows(path: Path) -> list[dict] | list[float]:
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = [json.loads(line) for line in text.splitlines() if line.strip()]  # JSON Lines
        if isinstance(obj, dict):
            for key in ("history", "log", "steps"):
                if isinstance(obj.get(key), list):
                    return obj[key]
            lists = {k: v for k, v in obj.items() if isinstance(v, list)}
            if lists:
                n = max(len(v) for v in lists.values())
                return [{k: v[i] for k, v in lists.items() if i < len(v)} for i in range(n)]
            raise InputError(f"{path}: no per-step list (expected a `history` list or lists of values)")
        return obj
    first = stripped.splitlines()[0] if stripped else ""
    if "," in first and any(c.isalpha() for c in first):
        return list(csv.DictReader(io.StringIO(text)))
    try:
        return [float(line.split()[0]) for line in text.splitlines() if line.strip()]
    except ValueError:
        raise InputError(f"{path}: cannot read a training log (JSON, JSON Lines, CSV or one loss per line)") from None


def _series(rows, keys) -> list[float] | None:
    for key in keys:
        vals = [r.get(key) for r in rows if isinstance(r, dict)]
        vals = [float(v) for v in vals if v not in (None, "")]
        if vals:
            return vals
    return None


def log_spikes(path: str | Path) -> dict:
    """Spike scores of the loss and (if logged) the gradient norm in a training log."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such training log: {path}")
    rows = _rows(path)
    if rows and not isinstance(rows[0], dict):
        series = {"loss": [float(v) for v in rows]}
    else:
        series = {"loss": _series(rows, LOSS_KEYS), "grad_norm": _series(rows, GRAD_KEYS)}
    series = {k: v for k, v in series.items() if v}
    if not series:
        raise InputError(f"{path}: no `loss` (or {', '.join(LOSS_KEYS[1:])}) values found")
    return {"log": str(path), **{k: {**spike_score(v), "values": v} for k, v in series.items()}}
