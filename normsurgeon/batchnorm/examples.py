"""Small plain-torch models for doctests and for trying ``fold-bn`` on a factory.

>>> type(conv_bn_net()).__name__
'Sequential'
>>> m = quartznet_like()
>>> tuple(m(*m.example_inputs()).shape)
(2, 10, 25)
"""
from __future__ import annotations

import torch


def conv_bn_net(seed: int = 0) -> torch.nn.Module:
    """Conv-BN-ReLU, a BN before a padded conv (left: not exact), BN before a 1x1 conv, pooling and a head."""
    nn = torch.nn
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.5, generator=gen)
                mod.running_var.uniform_(0.3, 2.0, generator=gen)
                mod.weight.uniform_(0.5, 1.5, generator=gen)
                mod.bias.normal_(0, 0.3, generator=gen)
    return m.eval()


def _randomise_bns(m: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(0, 0.5, generator=gen)
                mod.running_var.uniform_(0.3, 2.0, generator=gen)
                mod.weight.uniform_(0.5, 1.5, generator=gen)
                mod.bias.normal_(0, 0.3, generator=gen)


class SeparableBlock(torch.nn.Module):
    """QuartzNet block: ``repeats`` x [depthwise Conv1d (dilated, padded) -> pointwise Conv1d -> BN -> ReLU];
    the last ReLU comes after the residual (pointwise Conv1d -> BN) is added."""

    def __init__(self, c_in: int, c_out: int, kernel: int, repeats: int = 2, dilation: int = 1):
        super().__init__()
        nn = torch.nn
        pad = dilation * (kernel - 1) // 2
        self.dw = nn.ModuleList()
        self.pw = nn.ModuleList()
        self.bn = nn.ModuleList()
        for r in range(repeats):
            c = c_in if r == 0 else c_out
            self.dw.append(nn.Conv1d(c, c, kernel, padding=pad, dilation=dilation, groups=c, bias=False))
            self.pw.append(nn.Conv1d(c, c_out, 1, bias=False))
            self.bn.append(nn.BatchNorm1d(c_out))
        self.res = nn.Sequential(nn.Conv1d(c_in, c_out, 1, bias=False), nn.BatchNorm1d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (dw, pw, bn) in enumerate(zip(self.dw, self.pw, self.bn)):
            h = bn(pw(dw(h)))
            h = torch.relu(h + self.res(x) if i == len(self.dw) - 1 else h)
        return h


class QuartzNetLike(torch.nn.Module):
    """A small QuartzNet-style CTC acoustic model on ``[B, features, T]`` spectrograms.

    Feature BatchNorm -> grouped 'valid' Conv1d (a BN folded forward, into a grouped conv);
    prologue: strided depthwise + pointwise Conv1d + BN + ReLU; two separable blocks (the second dilated);
    epilogue: depthwise Conv1d -> BN (folded into the depthwise conv, groups = channels) -> ReLU ->
    pointwise Conv1d -> BN -> ReLU; a 1x1 Conv1d decoder giving ``[B, classes, T']`` logits.
    """

    def __init__(self, features: int = 16, channels: int = 24, classes: int = 10):
        super().__init__()
        nn = torch.nn
        self.features = features
        self.feature_norm = nn.BatchNorm1d(features)
        self.group_conv = nn.Conv1d(features, features, 3, groups=4)
        self.prologue = nn.Sequential(
            nn.Conv1d(features, features, 11, stride=2, padding=5, groups=features, bias=False),
            nn.Conv1d(features, channels, 1, bias=False), nn.BatchNorm1d(channels), nn.ReLU())
        self.blocks = nn.Sequential(SeparableBlock(channels, channels, 5), SeparableBlock(channels, 32, 3, dilation=2))
        self.epilogue = nn.Sequential(
            nn.Conv1d(32, 32, 7, padding=6, dilation=2, groups=32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Conv1d(32, 32, 1, bias=False), nn.BatchNorm1d(32), nn.ReLU())
        self.decoder = nn.Conv1d(32, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.group_conv(self.feature_norm(x))  # [B, F, T - 2]
        return self.decoder(self.epilogue(self.blocks(self.prologue(h))))  # [B, classes, T']

    def example_inputs(self) -> tuple[torch.Tensor]:
        return (torch.randn(2, self.features, 52),)  # [B, F, T]


def quartznet_like(seed: int = 0) -> torch.nn.Module:
    """``QuartzNetLike`` with seeded weights and randomised BN statistics and affine, eval mode."""
    torch.manual_seed(seed)
    m = QuartzNetLike()
    _randomise_bns(m, seed)
    return m.eval()
