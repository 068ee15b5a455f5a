"""ResNet-20 for CIFAR (He et al. 2016, Section 4.2): 3 stages x 3 basic blocks,
16/32/64 channels, option-A (zero-padded identity) shortcuts, ~0.27M parameters.

For influence the network is evaluated in eval mode: batch norm then uses its
running statistics and is a fixed per-channel affine map, so the GNH is a
fixed linear operator and examples do not interact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResNetCIFAR", "resnet20"]


class _ZeroPadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = (_ZeroPadShortcut(channels - in_channels)
                         if stride != 1 or in_channels != channels else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    def __init__(self, blocks_per_stage: int = 3, widths=(16, 32, 64), num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for k in range(blocks_per_stage):
                layers.append(BasicBlock(channels, width, 2 if stage > 0 and k == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = F.relu(self.bn(self.conv(x)))
        out = self.blocks(out)
        return self.fc(out.mean((2, 3)))


def resnet20(num_classes: int = 10, seed: int | None = None, widths=(16, 32, 64), in_channels: int = 3) -> ResNetCIFAR:
    """ResNet-20 (0.27M parameters); ``seed`` makes the initialisation reproducible; ``in_channels`` 1 for MNIST."""
    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return ResNetCIFAR(3, widths, num_classes, in_channels)
    return ResNetCIFAR(3, widths, num_classes, in_channels)
