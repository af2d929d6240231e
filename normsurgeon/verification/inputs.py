"""Deterministic verification inputs: token batches, real text, or images.

>>> import torch
>>> b = random_token_batches(vocab_size=50, num=2, seq_len=5, seed=0)
>>> b[0]["input_ids"].shape
torch.Size([2, 5])
"""
from __future__ import annotations

from pathlib import Path

import torch

from normsurgeon.errors import InputError
from normsurgeon.io.example_inputs import max_seq_len, random_batches

# A fixed English + code sample so the default batches include natural text as well as random ids.
BUILTIN_TEXT = (
    "Normalization layers rescale each token's features before the attention and feed-forward "
    "sublayers read them. def mean(xs):\n    return sum(xs) / len(xs)\n\nThe residual stream "
    "carries every sublayer's contribution forward, and a Pre-LN block reads it through a norm.\n"
)


def random_token_batches(vocab_size: int, num: int, seq_len: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab_size, (num, seq_len), generator=gen)}]


def tokenize(text: str, model_dir: Path | None, vocab_size: int) -> torch.Tensor:
    """Token ids for ``text``: the model's tokenizer if the folder has one, else raw UTF-8 bytes."""
    if model_dir is not None and any((model_dir / f).exists() for f in
                                     ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
            return torch.tensor(tok(text)["input_ids"], dtype=torch.long)
        except Exception as e:
            raise InputError(f"cannot load the tokenizer in {model_dir}: {e}") from None
    if vocab_size < 256:
        raise InputError(f"the model has no tokenizer and its vocabulary ({vocab_size}) is too small for bytes")
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def text_batches(text: str, model_dir: Path | None, vocab_size: int, num: int, seq_len: int) -> list[dict]:
    ids = tokenize(text, model_dir, vocab_size)
    if ids.numel() < 2:
        raise InputError("the text gives fewer than two tokens")
    seq = min(seq_len, ids.numel())
    windows = [ids[i:i + seq] for i in range(0, ids.numel() - seq + 1, seq)][:num]
    return [{"input_ids": torch.stack(windows)}]


def image_batches(image_size: int, channels: int, num: int, seed: int, folder: Path | None = None) -> list[dict]:
    """Seeded random pixels (normalised range), or the images in ``folder`` resized and normalised."""
    if folder is None:
        gen = torch.Generator().manual_seed(seed)
        return [{"pixel_values": torch.randn(num, channels, image_size, image_size, generator=gen)}]
    from PIL import Image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    if not files:
        raise InputError(f"no images (*.png, *.jpg) in {folder}")
    pix = []
    for f in files[:num]:
        img = Image.open(f).convert("RGB" if channels == 3 else "L").resize((image_size, image_size))
        t = torch.tensor(list(img.getdata()), dtype=torch.float32).view(image_size, image_size, -1)
        pix.append((t.permute(2, 0, 1) / 255.0 - 0.5) / 0.5)  # [C, H, W] in [-1, 1]
    return [{"pixel_values": torch.stack(pix)}]


def default_batches(model: torch.nn.Module, model_dir: Path | None, num: int = 4, seq_len: int = 64,
                    seed: int = 0, text_file: Path | None = None, image_dir: Path | None = None) -> list[dict]:
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values" and image_dir is not None:
        cfg = model.config
        size = getattr(cfg, "image_size", 64)
        size = size if isinstance(size, int) else size[0]
        return image_batches(size, getattr(cfg, "num_channels", 3), num, seed, image_dir)
    if main != "input_ids" or getattr(model, "config", None) is None:
        return random_batches(model, num, seq_len, seed)  # images, audio, plain modules
    cfg = model.config
    seq_len = min(seq_len, max_seq_len(model) or seq_len)
    if text_file is not None:
        if not Path(text_file).is_file():
            raise InputError(f"no such text file: {text_file}")
        text = text_batches(Path(text_file).read_text(errors="replace"), model_dir, cfg.vocab_size, num, seq_len)
        return _with_other_inputs(model, text, seed)
    batches = random_batches(model, num, seq_len, seed)
    try:
        batches += _with_other_inputs(model, text_batches(BUILTIN_TEXT, model_dir, cfg.vocab_size, 2, seq_len), seed)
    except InputError:
        pass  # no tokenizer and a small vocabulary: random ids only
    return batches


def _with_other_inputs(model: torch.nn.Module, batches: list[dict], seed: int) -> list[dict]:
    """Text ids completed with whatever else the model needs (decoder ids of an encoder-decoder)."""
    return [{**random_batches(model, *b["input_ids"].shape, seed)[0], **b} for b in batches]
