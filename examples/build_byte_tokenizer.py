"""Write the byte-level tokenizer of the embedded tiny GPT-2 (``examples/tiny-gpt2``): token id == byte value.

The model was trained on raw UTF-8 bytes (``examples/stdlib_corpus.py``: vocabulary 256, no separators,
no special tokens). This script writes a Hugging Face tokenizer that encodes exactly that, so
``AutoTokenizer`` and ``transformers.pipeline("text-generation", model=...)`` work on the folder and on
every normsurgeon output made from it (the tokenizer files travel with the weights):

- ``tokenizer.json``: built with the ``tokenizers`` library: GPT-2's byte-level pre-tokenizer (each
  byte as one printable character, no regex split, no prefix space), a BPE model with the 256 byte
  characters as its vocabulary (id = byte value) and no merges, and the byte-level decoder (invalid UTF-8
  decodes to U+FFFD);
- ``tokenizer_config.json``: ``PreTrainedTokenizerFast``, no special tokens (all 256 ids are bytes);
- ``config.json`` / ``generation_config.json``: ``bos_token_id`` 10 (the newline byte: every file of the
  corpus starts after the previous file's final newline), so generation without a prompt has a start
  token. ``eos_token_id`` stays null: nothing in the corpus marks an end, so generation stops at
  ``max_new_tokens``. The weights are not touched.

    python examples/build_byte_tokenizer.py [FOLDER]      # default: examples/tiny-gpt2

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> tok = build_tokenizer()
>>> text = "déf f(x):\\n\\treturn x\\x00"
>>> tok.encode(text).ids == list(text.encode("utf-8")), tok.decode(list(text.encode("utf-8"))) == text
(True, True)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BOS_TOKEN_ID = 10  # b"\n"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (the byte-level alphabet of ``tokenizers``)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_tokenizer():
    """The ``tokenizers.Tokenizer``: byte-level, id == byte value, no merges, no special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "clean_up_tokenization_spaces": False,
    "add_prefix_space": False,
    "bos_token": None,
    "eos_token": None,
    "unk_token": None,
    "pad_token": None,
}


def _set_json(path: Path, **values) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(values)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write(folder: str | Path) -> list[str]:
    """Write the tokenizer files into ``folder`` and set the start token in its configs; returns the names."""
    folder = Path(folder)
    build_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    names = ["tokenizer.json", "tokenizer_config.json"]
    for name in ("config.json", "generation_config.json"):
        if (folder / name).is_file():
            _set_json(folder / name, bos_token_id=BOS_TOKEN_ID)
            names.append(name)
    return names


def check(folder: str | Path) -> None:
    """Load the folder's tokenizer with ``AutoTokenizer`` and check id == byte on a sample of source text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    sample = (HERE / "stdlib_corpus.py").read_text()[:4000] + "é€😀\x00\x7f"
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    assert ids == list(sample.encode("utf-8")), "token ids differ from the UTF-8 bytes"
    assert tok.decode(ids) == sample, "decoding does not give the text back"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "tiny-gpt2"
    written = write(target)
    check(target)
    print(f"wrote {', '.join(written)} in {target} (token id == byte value, checked)")
