"""The shipped tiny CNN (sklearn digits): fold-bn keeps test accuracy identical and every prediction."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from bn_helpers import actions, assert_equivalent

from normsurgeon.batchnorm.fold import fold_batchnorms

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_cnn_accuracy_identical():
    spec = importlib.util.spec_from_file_location("tiny_cnn_model", ROOT / "examples" / "tiny_cnn" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    load_digits_split, pretrained = mod.load_digits_split, mod.pretrained
    model = pretrained()
    _, _, x_te, y_te = load_digits_split()
    r = fold_batchnorms(model, (x_te[:8],))
    assert set(actions(r).values()) == {"folded"}, r.entries  # all 4 BNs, including BN->1x1 conv and BN1d->Linear
    assert_equivalent(model, r, (x_te,))
    with torch.no_grad():
        ref, dep, stock = model(x_te).argmax(-1), r.deploy(x_te).argmax(-1), r.stock(x_te).argmax(-1)
    assert torch.equal(ref, dep) and torch.equal(ref, stock)
    assert (ref == y_te).float().mean() > 0.9
