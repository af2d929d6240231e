"""A tiny CNN with BatchNorm for the 8x8 digits images bundled with scikit-learn.

``pretrained()`` loads the shipped ``model.safetensors`` (trained by ``train.py``), so it can be used as a
normsurgeon factory from the repository root (factories resolve from the current folder; elsewhere put the
repository root on the path: ``PYTHONPATH=/path/to/normsurgeon normsurgeon fold-bn ...``)::

    normsurgeon fold-bn examples.tiny_cnn.model:pretrained -o /tmp/tiny_cnn_folded --input-shape 8,1,8,8
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("model.safetensors")


class TinyCNN(nn.Module):
    """conv-BN-ReLU x2 (the second depthwise+pointwise), BN before a 1x1 conv, pooled BN1d head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw_bn, self.pw = nn.BatchNorm2d(16), nn.Conv2d(16, 32, 1)
        self.head_bn, self.head = nn.BatchNorm1d(32), nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 1, 8, 8]
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.pw(self.pw_bn(x)))  # BN before an unpadded conv: folds forward
        x = x.mean((2, 3))  # [N, 32]
        return self.head(self.head_bn(x))


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn digits scaled to [0, 1], 75/25 stratified split: x_train, y_train, x_test, y_test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
    y = torch.tensor(d.target)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=0.25, random_state=seed, stratify=d.target)
    return x[tr], y[tr], x[te], y[te]


def pretrained() -> TinyCNN:
    from safetensors.torch import load_file

    model = TinyCNN()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval()
