"""The read-ahead thread: right tensors in order, out of order and repeated, within its byte budget,
and never a hang when the taker does something unexpected."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from normsurgeon.stream.headers import read_checkpoint_index, read_tensor
from normsurgeon.stream.prefetch import Prefetcher


@pytest.fixture
def index(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(64 + i, 300, generator=gen) for i in range(12)}  # 77-90 KB each
    save_file(tensors, str(tmp_path / "m.safetensors"))
    return read_checkpoint_index(tmp_path), tensors


def _with_timeout(fn, seconds=20):
    out: list = []
    th = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), "prefetcher hung"
    return out[0]


def test_in_order_with_a_small_budget(index):
    idx, tensors = index
    entries = [idx.tensors[f"t{i}"] for i in range(12)]
    p = Prefetcher(entries, max_bytes=1)  # holds one tensor at a time

    def slow_taker():  # a taker slower than the reads (as the float64 math is): every tensor is ready
        out = []
        for e in entries:
            time.sleep(0.1)
            out.append(p.take(e))
        return out

    got = _with_timeout(slow_taker)
    p.close()
    for i, g in enumerate(got):
        assert g is not None and torch.equal(g, tensors[f"t{i}"])


def test_out_of_order_and_repeated_takes(index):
    idx, tensors = index
    order = [0, 1, 1, 2, 3, 4, 5]
    entries = [idx.tensors[f"t{i}"] for i in order]
    p = Prefetcher(entries, max_bytes=200_000)

    def run():
        res = {}
        for i in [5, 3, 0, 1, 1, 2, 4, 7]:  # 7 is not in the list: the caller must read it
            e = idx.tensors[f"t{i}"]
            t = p.take(e)
            res.setdefault(i, []).append(t if t is not None else read_tensor(e))
        return res

    res = _with_timeout(run)
    p.close()
    for i, ts in res.items():
        for t in ts:
            assert torch.equal(t, tensors[f"t{i}"])
    assert p.take(idx.tensors["t0"]) is None  # each listed read is handed out once


def test_close_while_reading_ahead_returns(index):
    idx, _ = index
    p = Prefetcher([idx.tensors[f"t{i}"] for i in range(12)], max_bytes=10**9)
    _with_timeout(p.close)
