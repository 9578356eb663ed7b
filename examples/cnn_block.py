"""The CNN block of the engine's performance bars, for `secdfd bench model`:

    secdfd bench model examples/cnn_block.py:build --input-shape 1,3,128,128

conv3x3 stride 2 (3->32) + BN + ReLU, depthwise 3x3 (32) + pointwise (32->64) + BN + ReLU,
max-pool 3x3/2, CBAM (channel MLP 64->4->64 with ReLU and sigmoid on the avg and max pools; spatial:
channel mean and max, conv7x7 2->1, sigmoid), global average pool, linear 64->2. Weights are seeded
random numbers (public benchmark data) with non-trivial BatchNorm statistics.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelAttention(nn.Module):
    def __init__(self, c: int, r: int = 16) -> None:
        super().__init__()
        self.avg, self.max = nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1)
        self.mlp = nn.Sequential(nn.Conv2d(c, c // r, 1, bias=False), nn.ReLU(), nn.Conv2d(c // r, c, 1, bias=False))
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.mlp(self.avg(x)) + self.mlp(self.max(x)))


class SpatialAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))


class CNNBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 32, 3, 2, bias=False), nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.pw, self.b2 = nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.ca, self.sa = ChannelAttention(64), SpatialAttention()
        self.gap, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.b1(self.c1(x)))
        x = self.relu2(self.b2(self.pw(self.dw(x))))
        x = self.pool(x)
        x = self.ca(x) * x
        x = self.sa(x) * x
        return self.fc(torch.flatten(self.gap(x), 1))


def build() -> nn.Module:
    torch.manual_seed(0)
    m = CNNBlock().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.running_mean.copy_(torch.rand(b.num_features, generator=g) - 0.5)
                b.running_var.copy_(torch.rand(b.num_features, generator=g) + 0.5)
                b.weight.copy_(torch.rand(b.num_features, generator=g) + 0.5)
                b.bias.copy_(torch.rand(b.num_features, generator=g) * 0.4 - 0.2)
    return m
