"""Byte-level corpus built from the running interpreter's standard library.

The tiny GPT-2 in ``examples/tiny-gpt2`` was trained on this corpus, and every
recipe that fine-tunes or diagnoses it should use the same train / held-out
split and the same evaluation windows, so that losses are comparable.

Corpus definition
-----------------
* every ``*.py`` file below ``sysconfig.get_paths()["stdlib"]``;
* directories named ``site-packages``, ``test``, ``tests``, ``idlelib`` or
  ``lib2to3`` are skipped wherever they occur;
* files are ordered by their POSIX path relative to the stdlib root;
* the file with index ``i`` in that order is held out when
  ``i % HELDOUT_EVERY == HELDOUT_EVERY - 1`` (every 20th file), the rest is
  training data;
* a split is the plain concatenation of the raw file bytes in that order
  (no separators, no decoding): token id == byte value, vocabulary of 256.

The corpus depends on the Python version (its stdlib), so record
``corpus_description()`` next to any number computed from it.
"""

from __future__ import annotations

import os
import random
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

import torch

#: Directory names that are skipped anywhere in the stdlib tree.
SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
#: Every HELDOUT_EVERY-th file (in sorted order) goes to the held-out split.
HELDOUT_EVERY = 20
#: Names of the two splits.
SPLITS = ("train", "heldout")


def stdlib_root() -> Path:
    """Return the directory of the running interpreter's standard library.

    >>> (stdlib_root() / "os.py").is_file()
    True
    """
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=None)
def stdlib_files(split: str) -> tuple[str, ...]:
    """Return the sorted relative paths (POSIX style) of the files in ``split``.

    >>> train, heldout = stdlib_files("train"), stdlib_files("heldout")
    >>> len(heldout) > 0 and not set(train) & set(heldout)
    True
    >>> "os.py" in train + heldout
    True
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = stdlib_root()
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune skipped directories in place so os.walk does not descend.
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                paths.append((Path(dirpath) / name).relative_to(root).as_posix())
    paths.sort()
    held = [i % HELDOUT_EVERY == HELDOUT_EVERY - 1 for i in range(len(paths))]
    want_held = split == "heldout"
    return tuple(p for p, h in zip(paths, held) if h == want_held)


@lru_cache(maxsize=None)
def load_stdlib_corpus(split: str) -> bytes:
    """Return the raw bytes of split ``"train"`` or ``"heldout"``.

    The bytes are the concatenated file contents, in sorted-path order;
    token ids are simply the byte values (0..255).

    >>> data = load_stdlib_corpus("heldout")
    >>> isinstance(data, bytes) and len(data) > 100_000
    True
    >>> len(load_stdlib_corpus("train")) > 10 * len(data)
    True
    """
    root = stdlib_root()
    return b"".join((root / rel).read_bytes() for rel in stdlib_files(split))


def bytes_to_tensor(data: bytes) -> torch.Tensor:
    """Return ``data`` as a 1-D int64 tensor of token ids (= byte values).

    >>> bytes_to_tensor(b"ab\\n").tolist()
    [97, 98, 10]
    """
    # bytearray makes the buffer writable, which torch.frombuffer prefers.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()  # [len(data)]


def heldout_windows(data: bytes, n: int, length: int, seed: int) -> torch.Tensor:
    """Return ``n`` fixed windows of ``length`` bytes from ``data``, shape ``[n, length]``.

    Window starts are drawn uniformly from ``0 .. len(data) - length`` with
    Python's ``random.Random(seed)`` (stable across platforms and versions),
    then sorted; the result is an int64 tensor of byte values. The standard
    evaluation of the tiny GPT-2 is
    ``heldout_windows(load_stdlib_corpus("heldout"), 64, 256, seed=1234)``,
    scored as the mean next-byte cross-entropy over all ``64 * 255``
    predicted positions (see ``heldout_loss``).

    >>> w = heldout_windows(b"0123456789" * 10, n=3, length=8, seed=0)
    >>> w.shape, w.dtype
    (torch.Size([3, 8]), torch.int64)
    >>> torch.equal(w, heldout_windows(b"0123456789" * 10, 3, 8, seed=0))
    True
    """
    if len(data) < length:
        raise ValueError(f"data has {len(data)} bytes, fewer than length={length}")
    rng = random.Random(seed)
    starts = sorted(rng.randrange(len(data) - length + 1) for _ in range(n))
    tokens = bytes_to_tensor(data)  # [len(data)]
    return torch.stack([tokens[s : s + length] for s in starts])  # [n, length]


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-byte cross-entropy (nats/byte) of a causal LM on ``windows``.

    Each window ``[length]`` is fed whole; position ``t`` predicts byte
    ``t + 1``, so every window contributes ``length - 1`` predictions and the
    result is the plain mean over all ``n * (length - 1)`` of them. The model
    is put in eval mode and run in float32.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> _ = torch.manual_seed(0)
    >>> m = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=16, n_embd=8, n_layer=1, n_head=1))
    >>> w = heldout_windows(bytes(range(256)), n=4, length=16, seed=0)
    >>> 5.0 < heldout_loss(m, w) < 6.0  # untrained: close to ln(256) = 5.55
    True
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):  # chunk: [b, T]
        logits = model(input_ids=chunk).logits.float()  # [b, T, 256]
        pred = logits[:, :-1].reshape(-1, logits.size(-1))  # [b*(T-1), 256]
        target = chunk[:, 1:].reshape(-1)  # [b*(T-1)]
        total += torch.nn.functional.cross_entropy(pred, target, reduction="sum").item()
        count += target.numel()
    model.train(was_training)
    return total / count


def corpus_description() -> dict:
    """Return a JSON-ready summary of the corpus (Python version, split sizes).

    >>> d = corpus_description()
    >>> d["train"]["files"] > d["heldout"]["files"] > 0
    True
    """
    return {
        "source": "*.py files of the Python standard library (sysconfig stdlib path)",
        "python_version": sys.version.split()[0],
        "skipped_dirs": sorted(SKIP_DIRS),
        "order": "sorted POSIX paths relative to the stdlib root",
        "split_rule": f"file index i (in sorted order) is held out iff i % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1}",
        "encoding": "raw bytes concatenated without separators; token id = byte value (vocab 256)",
        **{
            split: {"files": len(stdlib_files(split)), "bytes": len(load_stdlib_corpus(split))}
            for split in SPLITS
        },
    }


if __name__ == "__main__":
    import json

    print(json.dumps(corpus_description(), indent=2))
