"""A support-matrix cell's inputs (the zoo model built tiny and saved, with its float64 copy and images)
and its command line: the smallest settings of each recipe.
"""
from __future__ import annotations

import random
import re
import time
from pathlib import Path

import model_zoo  # noqa: E402 - on sys.path through support_matrix_lib
from model_zoo import ZOO  # noqa: E402

TEXT_FLAGS = ("--tokenizer", "bytes")
BLOCK = 32  # tokens per window for the trained / diagnostic recipes


def corpus_text(chars: int = 24_000, seed: int = 0) -> str:
    """Deterministic text of bytes 10..95 only (upper case, digits, punctuation, newline): every byte id is
    inside the zoo's vocabulary of 96 with ``--tokenizer bytes``."""
    words = ("THE NORM OF A RESIDUAL STREAM IS READ BY EVERY BLOCK ; DEF MEAN(XS): RETURN SUM(XS) / LEN(XS) "
             "= 42 [0] <1> ? @ ! # $ % & * + - , . 0123456789 LAYER SCALE GAIN SHIFT BIAS WRITER READER").split()
    rng = random.Random(seed)
    lines, n = [], 0
    while n < chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))
        lines.append(line)
        n += len(line) + 1
    text = "\n".join(lines) + "\n"
    assert max(text.encode()) < model_zoo.V
    return text


# Norms inside these submodules do not read the residual stream: an MLM head's transform, an attention-pooling
# head, a speech model's convolutional feature extractor and its projection.
OFF_STREAM_PARTS = {"lm_head", "cls", "head", "predictions", "generator_predictions", "vocab_layer_norm",
                    "feature_extractor", "feature_projection", "conv_layers"}


def layer_norm_names(model) -> list[str]:
    """LayerNorm modules of the source (recognised by what they compute: ``graph.norm_kinds``; T5's
    "T5LayerNorm" is an RMSNorm) that a complete ``convert`` replaces, bakes or keeps deliberately:
    QK-norms and norms inside heads and feature extractors (``OFF_STREAM_PARTS``) are not counted."""
    from normsurgeon.graph.norm_kinds import classify_norm

    out = []
    for name, mod in model.named_modules():
        kind = classify_norm(mod) if not list(mod.children()) else None
        if kind is None or kind.family != "layernorm":
            continue
        leaf = name.rsplit(".", 1)[-1].lower()
        if re.fullmatch(r"(q|k|query|key)_?(layer_?)?norm", leaf) or set(name.split(".")) & OFF_STREAM_PARTS:
            continue
        out.append(name)
    return out


def image_shape(model) -> tuple[int, int]:
    cfg = getattr(model.config, "vision_config", None) or model.config
    size = getattr(cfg, "image_size", 32)
    return getattr(cfg, "num_channels", 3), size if isinstance(size, int) else size[0]


def prepare(name: str, recipes: list[str], work: Path) -> dict:
    """Build and save the zoo entry (and its float64 copy, image data) under work/NAME; what the runs need."""
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    entry = ZOO[name]
    folder = work / name
    folder.mkdir(parents=True)
    t = time.time()
    model = model_zoo.build_zoo(name)
    prep = {"model": str(folder / "model"), "layer_norms": layer_norm_names(model)}
    model.save_pretrained(prep["model"])
    if "convert-f64" in recipes:
        prep["model64"] = str(folder / "model64")
        model.double().save_pretrained(prep["model64"])
    if entry.modality == "image":
        ch, size = image_shape(model)
        prep["image_size"] = size
        if "prepbn" in recipes:
            gen = torch.Generator().manual_seed(0)
            labels = int(getattr(model.config, "num_labels", 2) or 2)
            arrays = {f"x_{s}": torch.randn(n, ch, size, size, generator=gen).numpy() for s, n in
                      (("train", 16), ("test", 8))}
            arrays |= {f"y_{s}": (torch.arange(n) % labels).numpy() for s, n in (("train", 16), ("test", 8))}
            prep["images"] = str(folder / "images.npz")
            np.savez(prep["images"], **arrays)
    prep["build_s"] = round(time.time() - t, 3)
    return prep


def command(recipe: str, name: str, prep: dict, out: str, text: str) -> list[str]:
    """The CLI arguments (after ``normsurgeon``) of one cell: the smallest settings of each recipe."""
    entry, model = ZOO[name], prep["model"]
    if recipe == "inspect":
        return ["inspect", model, "--json"]
    if recipe == "convert":
        return ["convert", model, "--to", "rmsnorm", "-o", out, "--json"]
    if recipe == "convert-f64":
        return ["convert", prep["model64"], "--to", "rmsnorm", "-o", out, "--json"]
    if recipe == "place":
        return ["place", model, "--scheme", "lns", "--data", text, *TEXT_FLAGS, "--calib-seqs", "2",
                "--eval-seqs", "2", "--seq-len", str(BLOCK), "-o", out, "--json"]
    if recipe == "remove-ln":
        return ["remove-ln", model, "--data", text, *TEXT_FLAGS, "--block-size", str(BLOCK), "--batch-size", "2",
                "--no-progress", "-o", out, "--json"]
    if recipe == "prepbn":
        data = ["--data", prep["images"], "--batch-size", "4"] if entry.modality == "image" else \
            ["--data", text, *TEXT_FLAGS, "--block-size", str(BLOCK), "--batch-size", "2"]
        return ["prepbn", model, *data, "--recalib-batches", "2", "--no-progress", "-o", out, "--json"]
    if recipe == "diagnose":
        return ["diagnose", model, "--data", text, *TEXT_FLAGS, "--num-seqs", "2", "--seq-len", str(BLOCK),
                "--micro-batch", "2", "--removal-seqs", "1", "--grad-seqs", "1", "--no-plots", "--json"]
    if recipe == "fold-bn":
        shape = ["--input-shape", "2,800"] if entry.modality == "audio" else \
            ["--image-size", str(prep.get("image_size", 32))]
        return ["fold-bn", model, *shape, "-o", out, "--json"]
    raise ValueError(recipe)
