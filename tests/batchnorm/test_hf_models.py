"""Hugging Face BN models from tiny configs (random weights, randomised BN statistics).

Each is folded, checked (float64 <= 1e-10, float32 <= 1e-4 relative), and the stock form is saved with
``save_pretrained`` and reloaded with the stock class (no remote code): outputs match the source.
"""
from __future__ import annotations

import pytest
import torch
import transformers as T
from bn_helpers import assert_equivalent, randomise

from normsurgeon.batchnorm.fold import fold_batchnorms
from normsurgeon.batchnorm.units import candidates

MODELS = {
    "resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck", num_labels=5)),
    "regnet": lambda: T.RegNetForImageClassification(T.RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, num_labels=5)),
    "mobilenet_v1": lambda: T.MobileNetV1ForImageClassification(T.MobileNetV1Config(
        depth_multiplier=0.25, image_size=32, num_labels=5)),
    "mobilenet_v2": lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
        depth_multiplier=0.35, image_size=32, num_labels=5)),
}
# Further BN models transformers ships: every BN must be reported; most fold.
MORE = {
    "efficientnet": lambda: T.EfficientNetForImageClassification(T.EfficientNetConfig(
        image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, num_labels=5)),
    "levit": lambda: T.LevitForImageClassification(T.LevitConfig(
        image_size=32, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8],
        num_labels=5)),
    "mobilevit": lambda: T.MobileViTForImageClassification(T.MobileViTConfig(
        image_size=32, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16], num_labels=5)),
}


def _check(make, full: bool):
    torch.manual_seed(0)
    model = randomise(make())
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    r = fold_batchnorms(model, (), x)
    assert {e["name"] for e in r.entries} == set(candidates(model))  # every BN is reported
    if full:
        assert r.counts["left"] == 0, [e for e in r.entries if e["action"] == "left"]
    assert_equivalent(model, r, (), x)
    return model, r, x


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hf_cnn_folds_and_stock_reloads(name, tmp_path):
    model, r, x = _check(MODELS[name], full=True)
    r.stock.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref, got = model(**x).logits, reloaded(**x).logits
    assert (ref - got).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("name", sorted(MORE))
def test_more_hf_bn_models(name):
    _check(MORE[name], full=False)
