"""``--device``: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``, checked before any
work (a CUDA device on a machine without CUDA is a one-line usage error, exit 2), and handed to the
fine-tuning commands' accelerate through its environment (``ACCELERATE_USE_CPU``,
``ACCELERATE_TORCH_DEVICE``), the only place the library chooses a device.

>>> resolve_device("cpu"), resolve_device("CPU")
('cpu', 'cpu')
>>> resolve_device("auto") in ("cpu", "cuda")
True
>>> resolve_device("gpu")
Traceback (most recent call last):
...
ValueError: 'gpu' is not a device: use auto, cpu, cuda or cuda:N
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator

DEVICE_HELP = "Where the model runs: auto (cuda if available, else cpu), cpu, cuda or cuda:N."
_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def resolve_device(spec: str) -> str:
    """The device ``spec`` names, checked against this machine (ValueError with a one-line reason)."""
    text = str(spec).strip().lower()
    m = _SPEC.match(text)
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ValueError(f"{spec!r} is not a device: use auto, cpu, cuda or cuda:N")
    import torch

    kind, index = m.group(1), m.group(2)
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"{spec} was asked for, but CUDA is not available on this machine ({why}); "
                         "use --device cpu or auto")
    if index is not None and int(index) >= torch.cuda.device_count():
        raise ValueError(f"{spec} was asked for, but this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return text


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def accelerate_device(device: str) -> Iterator[None]:
    """Run the block with accelerate placed on ``device`` (a resolved one); the environment is restored.

    ``cpu``: ``ACCELERATE_USE_CPU=1``; ``cuda:N``: ``ACCELERATE_TORCH_DEVICE`` (one process; a multi-process
    launch gives every process its own GPU: choose them with ``CUDA_VISIBLE_DEVICES``); ``cuda``:
    accelerate's own choice. An accelerate state left by an earlier command of this process on another
    device is reset (single process only).
    """
    from normsurgeon.errors import UsageError

    env: dict[str, str] = {}
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    elif device.startswith("cuda:"):
        if _world_size() > 1:
            raise UsageError(f"--device {device} with {_world_size()} processes: each process takes its own GPU; "
                             "choose them with CUDA_VISIBLE_DEVICES and --device cuda")
        env["ACCELERATE_TORCH_DEVICE"] = device
    saved = {k: os.environ.get(k) for k in ("ACCELERATE_USE_CPU", "ACCELERATE_TORCH_DEVICE")}
    os.environ.update(env)
    _reset_if_elsewhere(device)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _reset_if_elsewhere(device: str) -> None:
    if _world_size() > 1:
        return
    try:
        from accelerate.state import AcceleratorState, PartialState
    except ImportError:  # accelerate is a dependency; without it the commands fail with their own message
        return
    shared = PartialState._shared_state
    if not shared or shared.get("device") is None:
        return
    current = str(shared["device"])
    if current == device or (device == "cuda" and current.startswith("cuda")):
        return
    AcceleratorState._reset_state(reset_partial_state=True)
