"""How a streaming conversion verifies: the whole model in memory, or layer by layer.

Whole-model verification (``pipeline._verify(..., "whole", ...)``) loads the source and the output,
casts both to the compute dtype (float32; float64 for float64 outputs), keeps a float64 copy of the
source for the round-off figure, and then does it all again with the output loaded by the stock class.
Its peak resident memory was measured (``benchmarks/measure_verify_memory.py``: ``ru_maxrss`` of a fresh
process, 2026-12-02, torch 2.13 CPU, default 4 x 64 + built-in tokens) at:

========================  ==========  =======  =========  ===============
shape                      parameters  stored   peak RSS   bytes / param
========================  ==========  =======  =========  ===============
GPT-2 small                124.4 M     float32  3.19 GB    25.6
GPT-2 small                124.4 M     bfloat16 3.32 GB    26.6
GPT-2 XL, 12 of 48 layers  450.9 M     bfloat16 9.10 GB    20.2
OPT-1.3B, 12 of 24 layers  711.5 M     bfloat16 13.88 GB   19.5
OPT-1.3B, 12 of 24 layers  711.5 M     float32  12.65 GB   17.8
OPT-1.3B                   1315.8 M    float32  22.45 GB   17.1
========================  ==========  =======  =========  ===============

(The bfloat16 OPT-1.3B, estimated at 25.5 GB, does not fit on the 24 GiB machine these were measured
on; the float32 one does because half of its 22.45 GB are the mapped checkpoint files.) A float32
checkpoint costs about 16 bytes per parameter: the source and the output in float32 (4 + 4; here
the mapped checkpoint files) and the float64 copy of the source (8). A half-precision one costs about
18: the same 16, now all new memory, and the casts run while the half-precision pages are still
mapped. On top comes about 1 GB (interpreter, libraries, the logits in float64). ``whole_verify_bytes``
is ``BYTES_PER_PARAM[dtype] x parameters + CONSTANT_BYTES``, at or above every measured point; a
bfloat16 GPT-2 XL (1.56 B) comes to about 30 GB, where the 24 GiB machine was OOM-killed at 22.3 GB.

``choose_verify_mode``: a conversion that streams because the model does not fit in memory verifies
layer by layer unless whole verification is asked for; otherwise "auto" verifies the whole model only
when the estimate, times ``MARGIN``, fits in ``--max-memory`` (or the memory available).

>>> import tempfile, pathlib
>>> from normsurgeon.testing import tiny_gpt2
>>> from normsurgeon.stream.plan import plan_streaming
>>> d = pathlib.Path(tempfile.mkdtemp()); tiny_gpt2().save_pretrained(d)
>>> plan = plan_streaming(d, "rmsnorm", "stock", None)
>>> choose_verify_mode(plan, "auto", available=24 << 30)[0]
'whole'
>>> mode, why = choose_verify_mode(plan, "auto", streamed_for_memory=True)
>>> mode, why.split(" (")[0]
('layerwise', 'the model was streamed because it does not fit in memory')
>>> round(whole_verify_bytes(1_557_611_200, [torch.bfloat16]) / 2**30, 1)  # GPT-2 XL, bfloat16
28.0
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from normsurgeon.errors import UsageError

MODES = ("auto", "whole", "layerwise", "none")
BYTES_PER_PARAM = {torch.float32: 16.5, torch.bfloat16: 18.5, torch.float16: 18.5, torch.float64: 18.5}
"""Measured for float32 and bfloat16; float16 takes the same path as bfloat16; float64 (not measured:
two float64 models, no extra copy) is given the larger figure."""
CONSTANT_BYTES = 1_200_000_000
MARGIN = 1.25

# (parameters, stored dtype, measured peak RSS in bytes): the points above; the tests check the estimate.
MEASURED = [(124_439_808, torch.float32, 3_187_625_984), (124_439_808, torch.bfloat16, 3_315_908_608),
            (450_942_400, torch.bfloat16, 9_103_998_976), (711_458_816, torch.bfloat16, 13_880_700_928),
            (711_458_816, torch.float32, 12_650_999_808), (1_315_758_080, torch.float32, 22_447_591_424)]


def whole_verify_bytes(numel: int, dtypes: Iterable[torch.dtype]) -> int:
    """Estimated peak resident memory of whole-model verification for ``numel`` source parameters
    stored in ``dtypes`` (the source's and the output's floating dtypes; the costliest one counts).

    >>> all(whole_verify_bytes(n, [d]) >= peak for n, d, peak in MEASURED)
    True
    """
    per = max((BYTES_PER_PARAM.get(d, max(BYTES_PER_PARAM.values())) for d in dtypes), default=18.5)
    return int(per * numel) + CONSTANT_BYTES


def choose_verify_mode(plan, requested: str = "auto", *, budget: int | None = None,
                       streamed_for_memory: bool = False, available: int | None = None) -> tuple[str, str]:
    """Return (mode, one-line reason) for verifying the streamed conversion of ``plan`` (a StreamPlan).

    ``requested``: auto, whole, layerwise or none (anything but auto is honoured). ``budget``: the
    ``--max-memory`` bytes, which take the place of ``available`` (default: ``available_memory()``).
    ``streamed_for_memory``: the conversion streams because the model does not fit in memory.
    """
    if requested not in MODES:
        raise UsageError(f"verify mode must be auto, whole, layerwise or none, not {requested!r}")
    numel = sum(t.numel for t in plan.checkpoint.tensors.values())
    need = whole_verify_bytes(numel, plan_dtypes(plan))
    gib = f"about {need / 2**30:.1f} GiB"
    if requested != "auto":
        return requested, f"{requested} verification as asked (whole-model would need {gib})"
    if streamed_for_memory:
        return "layerwise", (f"the model was streamed because it does not fit in memory (whole-model verification "
                             f"would need {gib}; ask for it with --verify-mode whole)")
    if budget is not None:
        room, where = budget, "--max-memory"
    else:
        room, where = (available if available is not None else available_memory()), "available"
    if need * MARGIN <= room:
        return "whole", f"whole-model verification needs {gib} (x{MARGIN} margin), {room / 2**30:.1f} GiB {where}"
    return "layerwise", (f"whole-model verification would need {gib} (x{MARGIN} margin), above the "
                         f"{room / 2**30:.1f} GiB {where}")


def plan_dtypes(plan) -> list[torch.dtype]:
    """The floating dtypes a StreamPlan's source is stored in, and its output dtype."""
    stored = {t.dtype for t in plan.checkpoint.tensors.values() if t.dtype.is_floating_point}
    return sorted(stored | {plan.out_dtype}, key=str)


def available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (8 GiB where it cannot be read).

    >>> available_memory() > 0
    True
    """
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30
