"""Small plain-torch models for doctests and for trying ``fold-bn`` on a factory.

>>> type(conv_bn_net()).__name__
'Sequential'
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
