"""Loss-spike detection: a loss above ``factor`` x the median of the last ``window`` accepted losses.

>>> d = SpikeDetector(factor=1.5, window=5)
>>> [d.is_spike(x) for x in [2.0, 2.1, 1.9, 2.0, 2.05, 2.0, 3.5]]
[False, False, False, False, False, False, True]
"""
from __future__ import annotations

import statistics


class SpikeDetector:
    def __init__(self, factor: float = 1.5, window: int = 20):
        self.factor, self.window = factor, window
        self.recent: list[float] = []

    def is_spike(self, loss: float) -> bool:
        """Judge ``loss``; accepted (non-spike) losses enter the window."""
        if len(self.recent) >= self.window and loss > self.factor * statistics.median(self.recent):
            return True
        self.recent = (self.recent + [loss])[-self.window:]
        return False

    def state_dict(self) -> dict:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.recent = list(state.get("recent", []))
