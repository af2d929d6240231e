"""Every fold pattern on randomised weights and randomised BN statistics/affine.

Tolerances: float64 (deploy form before the cast) max|delta| <= 1e-10; float32 (stock and deploy forms)
max|delta| <= 1e-4 * max|source output| (helpers.TOL32_REL).
"""
from __future__ import annotations

import pytest
import torch
from bn_helpers import actions, assert_equivalent, randomise

from normsurgeon.batchnorm.fold import fold_batchnorms
from normsurgeon.errors import UsageError

nn = torch.nn


class ForFold(nn.Module):
    def __init__(self, *mods):
        super().__init__()
        self.m = nn.ModuleList(mods)

    def forward(self, x):
        for m in self.m:
            x = m(x)
        return x


CASES = {
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3, stride=2), nn.BatchNorm1d(6)), (2, 3, 11)),
    "conv2d_grouped_dilated_strided": (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, 2, 2, 2, groups=2, bias=False),
                                                             nn.BatchNorm2d(6)), (2, 4, 12, 12)),
    "conv2d_depthwise": (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4)), (2, 4, 7, 7)),
    "conv3d_affine_false": (lambda: nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4, affine=False)), (2, 2, 5, 5, 5)),
    "convT_g1": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6)), (2, 4, 5, 5)),
    "convT_g2": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False),
                                       nn.BatchNorm2d(6)), (2, 4, 5, 5)),  # pytorch#180995
    "convT1d_g2": (lambda: nn.Sequential(nn.ConvTranspose1d(4, 8, 4, stride=2, groups=2), nn.BatchNorm1d(8)), (2, 4, 6)),
    "linear_bn1d_2d": (lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), (4, 5)),
    "linear_bn1d_affine_false": (lambda: nn.Sequential(nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6, affine=False)),
                                 (4, 5)),  # pytorch#72049
    "bn1d_linear": (lambda: nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 6)), (4, 5)),
    "bn_conv_unpadded_grouped": (lambda: nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2)), (2, 4, 6, 6)),
    "bn_conv_reflect_padded": (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1,
                                                                                 padding_mode="reflect")), (2, 3, 6, 6)),
    "bn_subclass": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), type("MyBN", (nn.BatchNorm2d,), {})(4)), (2, 3, 5, 5)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_pattern_folds(name):
    make, shape = CASES[name]
    torch.manual_seed(0)
    model = randomise(make())
    x = torch.randn(shape)
    r = fold_batchnorms(model, (x,))
    assert set(actions(r).values()) == {"folded"}, r.entries
    # a bias-less layer before an affine=False BN has nowhere to keep the shift in the stock structure
    want = "unchanged" if name == "linear_bn1d_affine_false" else "exact identity"
    assert all(e["stock"].startswith(want) for e in r.entries), r.entries
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in r.deploy.modules())
    assert_equivalent(model, r, (x,))


class LinearTokens(nn.Module):
    """Linear on (N, L, C) then BN1d over C through transposes (3-D input, feature axis checked)."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x).transpose(1, 2)).transpose(1, 2)


class LinearFlatten(nn.Module):
    """timm LeViT ``LinearNorm``: BN1d on ``flatten(0, 1)`` of the tokens."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.fc(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


@pytest.mark.parametrize("cls", [LinearTokens, LinearFlatten])
def test_linear_bn_3d_folds(cls):
    model = randomise(cls())
    x = torch.randn(2, 3, 4)
    r = fold_batchnorms(model, (x,))
    assert actions(r) == {"bn": "folded"}
    assert_equivalent(model, r, (x,))


def test_linear_bn_wrong_axis_is_left():
    """(N, C, L) with L == C: BN1d normalizes dim 1, the Linear acts on the last (peer: 2.47 silent error)."""
    model = randomise(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    x = torch.randn(2, 4, 4)
    r = fold_batchnorms(model, (x,))
    assert actions(r) == {"1": "left"}
    assert "axis" in r.entries[0]["reason"]
    assert_equivalent(model, r, (x,))


def test_bn_before_padded_conv_is_left_with_reason():
    model = randomise(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)))
    x = torch.randn(2, 3, 6, 6)
    r = fold_batchnorms(model, (x,))
    assert actions(r) == {"0": "left"} and "borders" in r.entries[0]["reason"]
    assert_equivalent(model, r, (x,))


class SharedConv(nn.Module):
    """One conv on two paths, only one with BN (peer: fx fuse corrupts the other path, 1.27)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(2 * x)


class ConvTwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([self.bn(y), y], 1)


class PreActivation(nn.Module):
    """Registered conv-then-BN, but the BN runs first on the input (mmcv registration order: 0.55)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x)))


class Unconnected(nn.Module):
    """Conv and BN adjacent by name and registration, but on different tensors (fuse_modules: 7.69)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(x) + self.bn(x * 3)


class BNTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.c1(x)) + self.bn(self.c2(x))


@pytest.mark.parametrize("cls,phrase", [(SharedConv, "called 2 times"), (ConvTwoUsers, "used elsewhere"),
                                        (PreActivation, "not a conv"), (Unconnected, "not a conv"),
                                        (BNTwice, "called 2 times")])
def test_refusals_never_corrupt(cls, phrase):
    model = randomise(cls())
    x = torch.randn(2, 3, 5, 5)
    r = fold_batchnorms(model, (x,))
    assert actions(r) == {"bn": "left"}, r.entries
    assert phrase in r.entries[0]["reason"], r.entries[0]["reason"]
    assert_equivalent(model, r, (x,))


def test_training_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).train()
    with pytest.raises(UsageError, match="training mode"):
        fold_batchnorms(model, (torch.randn(2, 3, 4, 4),))


def test_batch_stats_and_fused_activation_are_left():
    class BNAct(nn.BatchNorm2d):  # timm BatchNormAct2d-like: BN followed by ReLU inside forward
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False),
                                    nn.Conv2d(4, 4, 1), BNAct(4))).eval()
    x = torch.randn(2, 3, 5, 5)
    r = fold_batchnorms(model, (x,))
    reasons = {e["name"]: e.get("reason", "") for e in r.entries}
    assert actions(r) == {"1": "left", "3": "left"}
    assert "batch statistics" in reasons["1"] and "per-channel" in reasons["3"]


def test_source_model_is_not_modified():
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_batchnorms(model, (torch.randn(1, 3, 6, 6),))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[1], nn.BatchNorm2d)
