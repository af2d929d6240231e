"""A tiny Hugging Face ViT for the 8x8 digits images bundled with scikit-learn.

The trained model ships as a standard Hugging Face folder, ``examples/tiny_vit/checkpoint``
(``ViTForImageClassification``: Pre-LN, 3 layers, width 48, 2x2 patches, 17 tokens with CLS), written by
``python examples/tiny_vit/train.py``. ``digits`` is the matching ``--data`` factory (same 75/25 split as
``examples/tiny_cnn``)::

    normsurgeon prepbn examples/tiny_vit/checkpoint --finetune --data examples.tiny_vit.vit:digits \\
        -o out/tiny-vit-prepbn
"""
from __future__ import annotations

from pathlib import Path

import torch

CHECKPOINT = Path(__file__).with_name("checkpoint")


def tiny_vit_config():
    import transformers as T

    return T.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=48, num_hidden_layers=3,
                       num_attention_heads=4, intermediate_size=96, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=10,
                       id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)})


def load_digits_split(seed: int = 0):
    """x_train, y_train, x_test, y_test: the tiny CNN example's split (images scaled to [0, 1])."""
    from examples.tiny_cnn.model import load_digits_split as split

    return split(seed)


def digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``--data`` factory: ``("train" | "heldout") -> (pixel_values [N, 1, 8, 8], labels [N])``."""
    x_tr, y_tr, x_te, y_te = load_digits_split()
    return (x_tr, y_tr) if split == "train" else (x_te, y_te)


def pretrained():
    """The shipped model (eval mode), for use as a factory ``examples.tiny_vit.vit:pretrained``."""
    import transformers as T

    return T.ViTForImageClassification.from_pretrained(str(CHECKPOINT), local_files_only=True).eval()
