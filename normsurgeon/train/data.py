"""Training text: load it, tokenize it, split it, and cut it into windows.

``--data`` accepts
- a text file (one document; the last 5 % of its tokens are held out),
- a folder of text files (every UTF-8 file below it, sorted by path; each file is a document),
- JSON Lines (``.jsonl``; one document per line, field ``text`` by default),
- a ``datasets`` dataset saved with ``save_to_disk`` (needs the optional ``datasets`` package),
- a factory ``package.module:function`` called as ``function("train")`` and ``function("heldout")``,
  returning bytes, a string or a list of documents (e.g. ``examples.stdlib_corpus:load_stdlib_corpus``).

With several documents, every 20th (``i % 20 == 19``) is held out, as in ``examples/stdlib_corpus.py``.
Tokens: the model's tokenizer (its folder's tokenizer files), or raw bytes for byte-level models
(vocabulary of 256 and no tokenizer files). Held-out windows use the same rule as
``stdlib_corpus.heldout_windows`` (``random.Random(seed)``, sorted starts), so the example's numbers
follow its published protocol exactly.

>>> ids = ByteTokenizer().encode("ab")
>>> ids
[97, 98]
>>> data = TokenData(torch.arange(100), torch.arange(50), {})
>>> train_batch(data, step=3, batch_size=2, block_size=8, seed=0).shape
torch.Size([2, 8])
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any, Protocol

import torch

from normsurgeon.errors import InputError, UsageError
from normsurgeon.io.factory import resolve_attribute

HELDOUT_EVERY = 20
HELDOUT_FRACTION = 0.05
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class Tokenizer(Protocol):
    name: str
    eos_id: int | None

    def encode(self, text: str | bytes) -> list[int]: ...


class ByteTokenizer:
    """Token id = byte value (UTF-8 for strings); no special tokens, no separators."""

    name = "bytes"
    eos_id = None

    def encode(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder; documents are separated by its EOS token."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.name = f"{type(self.tok).__name__}({folder})"
        self.eos_id = self.tok.eos_token_id

    def encode(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self.tok(text, add_special_tokens=False)["input_ids"]


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


def is_byte_tokenizer(folder: Path) -> bool:
    """Does the folder's ``tokenizer.json`` map every byte to its own value and nothing else (byte-level BPE
    without merges, special or added tokens, normalizer or prefix space), like the embedded tiny GPT-2's
    (``examples/build_byte_tokenizer.py``)? Then ``ByteTokenizer`` gives the same ids."""
    try:
        tj = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
        cfg_path = Path(folder) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    except (OSError, ValueError):
        return False
    model, pre = tj.get("model") or {}, tj.get("pre_tokenizer") or {}
    return (model.get("type") == "BPE" and not model.get("merges") and model.get("vocab") == _byte_alphabet()
            and not tj.get("added_tokens") and tj.get("normalizer") is None and tj.get("post_processor") is None
            and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space")
            and not any(cfg.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                                             "cls_token", "additional_special_tokens")))


def tokenizer_for(folder: Path | None, vocab_size: int | None, spec: str | None = None) -> Tokenizer:
    """``spec``: "bytes" or a tokenizer folder; default: the model folder's tokenizer, else bytes for
    a 256-token vocabulary, else an error naming the fix."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec:
        return ByteTokenizer() if Path(spec).is_dir() and is_byte_tokenizer(Path(spec)) else HFTokenizer(spec)
    if folder is not None and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                    "vocab.json", "tokenizer.model")):
        if is_byte_tokenizer(folder):  # the same ids, without tokenizing megabytes through BPE
            return ByteTokenizer()
        return HFTokenizer(folder)
    if vocab_size == 256:
        return ByteTokenizer()
    raise InputError("the model has no tokenizer files and its vocabulary is not bytes (256); "
                     "pass --tokenizer FOLDER (or --tokenizer bytes)")


@dataclasses.dataclass
class TokenData:
    train: torch.Tensor  # [n_train] int64
    heldout: torch.Tensor  # [n_heldout] int64
    description: dict[str, Any]


def _documents_from_path(path: Path, text_field: str) -> list[str | bytes]:
    if path.is_dir():
        if any((path / m).is_file() for m in _DATASET_MARKERS):
            return _documents_from_datasets(path, text_field)
        docs = []
        for p in sorted(q for q in path.rglob("*") if q.is_file() and not any(s.startswith(".") for s in q.relative_to(path).parts)):
            raw = p.read_bytes()
            if b"\0" in raw[:4096]:
                continue  # binary
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            docs.append(raw)
        if not docs:
            raise InputError(f"no UTF-8 text files under {path}")
        return docs
    if path.suffix in (".jsonl", ".ndjson"):
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{i + 1}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise InputError(f"{path}:{i + 1}: no string field {text_field!r} (use --text-field)")
            docs.append(row[text_field])
        return docs
    return [path.read_bytes()]


def _documents_from_datasets(path: Path, text_field: str) -> list[str]:
    try:
        import datasets  # noqa: F401
        from datasets import load_from_disk
    except ImportError:
        raise InputError(f"{path} is a `datasets` dataset saved on disk; reading it needs the optional "
                         "package `datasets` (pip install datasets)") from None
    ds = load_from_disk(str(path))
    if hasattr(ds, "keys"):  # DatasetDict: use "train" (or the first split)
        ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
    if text_field not in ds.column_names:
        raise InputError(f"dataset {path} has no column {text_field!r} (columns: {ds.column_names}; use --text-field)")
    return list(ds[text_field])


def _call_factory(spec: str, split: str) -> Any:
    return resolve_attribute(spec, "data factory")(split)


def _encode_all(docs: list[str | bytes], tok: Tokenizer) -> torch.Tensor:
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode(d))
        if tok.eos_id is not None:
            ids.append(tok.eos_id)
    return torch.tensor(ids, dtype=torch.long)


def _as_docs(obj: Any) -> list[str | bytes]:
    if isinstance(obj, (bytes, bytearray, str)):
        return [bytes(obj) if isinstance(obj, bytearray) else obj]
    if isinstance(obj, (list, tuple)):
        return list(obj)
    raise InputError(f"a data factory must return bytes, str or a list of documents, not {type(obj).__name__}")


def load_token_data(spec: str, tok: Tokenizer, text_field: str = "text") -> TokenData:
    """Load ``spec`` (see the module docstring), tokenize it with ``tok`` and split it."""
    path = Path(spec)
    desc: dict[str, Any] = {"source": spec, "tokenizer": tok.name}
    if not path.exists() and ":" in spec and not spec.startswith(("/", ".")):
        train = _encode_all(_as_docs(_call_factory(spec, "train")), tok)
        held = _encode_all(_as_docs(_call_factory(spec, "heldout")), tok)
        desc["split"] = "the factory's own train / heldout splits"
    elif not path.exists():
        raise InputError(f"no such data file or folder: {spec}")
    else:
        docs = _documents_from_path(path, text_field)
        if len(docs) >= HELDOUT_EVERY:
            train = _encode_all([d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1], tok)
            held = _encode_all([d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1], tok)
            desc["split"] = f"document i is held out iff i % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1} ({len(docs)} documents)"
        else:
            ids = _encode_all(docs, tok)
            cut = int(len(ids) * (1 - HELDOUT_FRACTION))
            train, held = ids[:cut], ids[cut:]
            desc["split"] = f"last {HELDOUT_FRACTION:.0%} of the tokens held out ({len(docs)} documents)"
    desc.update(train_tokens=int(train.numel()), heldout_tokens=int(held.numel()))
    return TokenData(train, held, desc)


def check_lengths(data: TokenData, block_size: int) -> None:
    for split, t in (("train", data.train), ("held-out", data.heldout)):
        if t.numel() < block_size + 1:
            raise UsageError(f"the {split} split has {t.numel()} tokens, fewer than one window of "
                             f"{block_size}; use a smaller --block-size or more data")


def check_fits(data: TokenData, block_size: int, vocab_size: int | None, tok: Tokenizer) -> None:
    """Both splits hold a window (``check_lengths``) and every token id is inside the model's vocabulary."""
    check_lengths(data, block_size)
    check_vocabulary([data.train, data.heldout], vocab_size, tok)


def check_vocabulary(parts: list[torch.Tensor], vocab_size: int | None, tok: Tokenizer) -> None:
    """Every token id of ``parts`` is inside the model's vocabulary (else an InputError naming the fix)."""
    top = max(int(t.max()) for t in parts)
    if vocab_size is not None and top >= vocab_size:
        raise InputError(f"the data has token id {top}, outside the model's vocabulary of {vocab_size} "
                         f"(tokenizer {tok.name}); pass the model's --tokenizer")


def train_batch(data: TokenData, step: int, batch_size: int, block_size: int, seed: int) -> torch.Tensor:
    """The windows of one optimizer step, a pure function of (seed, step): [batch_size, block_size].

    Resuming at any step therefore sees exactly the batches an uninterrupted run sees.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    n = data.train.numel()
    starts = torch.randint(0, n - block_size + 1, (batch_size,), generator=gen)  # [B]
    return data.train[starts[:, None] + torch.arange(block_size)[None, :]]  # [B, T]


def heldout_windows(tokens: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    """Fixed evaluation windows, the same rule as ``stdlib_corpus.heldout_windows``: [n, length]."""
    if tokens.numel() < length:
        raise UsageError(f"held-out split has {tokens.numel()} tokens, fewer than length={length}")
    rng = random.Random(seed)
    starts = sorted(rng.randrange(tokens.numel() - length + 1) for _ in range(n))
    return torch.stack([tokens[s: s + length] for s in starts])  # [n, length]
