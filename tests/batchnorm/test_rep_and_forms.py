"""Structural re-parameterization (RepVGG), RepBN, Unified Normalization and frozen BNs.

Tolerances as in helpers: float64 <= 1e-10, float32 <= 1e-4 relative to the output scale.
"""
from __future__ import annotations

import pytest
import torch
from bn_helpers import actions, assert_equivalent, randomise

from normsurgeon.batchnorm.apply import ZeroBranch
from normsurgeon.batchnorm.fold import fold_batchnorms

nn = torch.nn


class RepVGGBlock(nn.Module):
    def __init__(self, c=4, groups=1, stride=1, identity=True):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(c))
        self.one = nn.Sequential(nn.Conv2d(c, c, 1, stride, 0, groups=groups, bias=False), nn.BatchNorm2d(c))
        self.idbn = nn.BatchNorm2d(c) if identity else None

    def forward(self, x):
        y = self.dense(x) + self.one(x)
        return torch.relu(y + self.idbn(x) if self.idbn is not None else y)


@pytest.mark.parametrize("groups", [1, 2])
def test_repvgg_merges_into_one_conv(groups):
    model = randomise(RepVGGBlock(4, groups))
    x = torch.randn(2, 4, 6, 6)
    r = fold_batchnorms(model, (x,))
    assert actions(r) == {"dense.1": "folded", "one.1": "folded", "idbn": "merged"}
    assert isinstance(r.deploy.one[0], ZeroBranch) and isinstance(r.deploy.idbn, ZeroBranch)
    assert all(e["stock"] == "exact identity" for e in r.entries)
    assert_equivalent(model, r, (x,))


def test_repvgg_stride2_has_no_identity():
    model = randomise(RepVGGBlock(4, stride=2, identity=False))
    x = torch.randn(2, 4, 8, 8)
    r = fold_batchnorms(model, (x,))
    assert isinstance(r.deploy.one[0], ZeroBranch)
    assert_equivalent(model, r, (x,))


class RepBN(nn.Module):
    """SLAB RepBN: ``BN(x) + alpha * x`` over the channels of a (B, N, C) token tensor."""

    def __init__(self, c):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor([0.7]))
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2) + self.alpha * x


class UN1d(nn.Module):
    """Unified Normalization, eval form: ``w * x / sqrt(running_var + eps) + b`` (no mean subtraction)."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.eps = eps

    def forward(self, x):  # x: (B, N, C)
        return self.weight * x / torch.sqrt(self.running_var + self.eps) + self.bias


class TokenBlock(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm, self.fc = norm, nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.norm(x))


@pytest.mark.parametrize("norm", [lambda: RepBN(8), lambda: UN1d(8)])
def test_affine_inference_forms_fold_into_next_linear(norm):
    model = randomise(TokenBlock(norm()))
    x = torch.randn(2, 7, 8)
    r = fold_batchnorms(model, (x,))
    assert actions(r) == {"norm": "folded"}
    assert r.entries[0]["axis"] == 2
    assert isinstance(r.deploy.norm, nn.Identity)
    assert_equivalent(model, r, (x,))


def test_hf_frozen_batchnorm():
    from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d

    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), DetrFrozenBatchNorm2d(4)))
    x = torch.randn(2, 3, 6, 6)
    r = fold_batchnorms(model, (x,))
    assert actions(r) == {"1": "folded"} and r.entries[0]["stock"] == "exact identity"
    assert_equivalent(model, r, (x,))


def test_float64_model_meets_1e10():
    model = randomise(RepVGGBlock(4)).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    r = fold_batchnorms(model, (x,))
    with torch.no_grad():
        assert (r.deploy(x) - model(x)).abs().max() <= 1e-10
        assert (r.stock(x) - model(x)).abs().max() <= 1e-10
