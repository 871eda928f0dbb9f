"""Static modules: what ``OFANet.extract`` produces. Plain torch layers, no elastic choices, no transforms.

The channel arithmetic shared with the elastic twins in ``ofa.elastic`` lives here, one function each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "hswish": nn.Hardswish}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of divisor, at least divisor, never more than 10% below value (MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def expanded_channels(in_channels: int, width: float) -> int:
    """Middle channels of an MBConv block with expand ratio `width`."""
    return make_divisible(in_channels * width)


def se_channels(channels: int, reduction: int = 4) -> int:
    """Hidden channels of a squeeze-and-excite layer on `channels` channels."""
    return make_divisible(channels / reduction)


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name ('relu' or 'hswish')."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not allowed ({' or '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name](inplace=False)


class SqueezeAndExcite(nn.Module):
    """Channel gating: global pool -> 1x1 reduce -> ReLU -> 1x1 expand -> hard sigmoid -> scale."""

    def __init__(self, reduce: nn.Conv2d, expand: nn.Conv2d) -> None:
        super().__init__()
        self.reduce = reduce
        self.expand = expand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)  # (B, C, 1, 1)
        s = self.expand(F.relu(self.reduce(s)))
        return x * F.hardsigmoid(s)


class MBBlock(nn.Module):
    """Mobile inverted bottleneck: expand 1x1 -> depthwise kxk -> SE (optional) -> project 1x1 (+ residual)."""

    def __init__(
        self,
        expand: nn.Conv2d,
        expand_bn: nn.BatchNorm2d,
        depthwise: nn.Conv2d,
        depthwise_bn: nn.BatchNorm2d,
        se: SqueezeAndExcite | None,
        project: nn.Conv2d,
        project_bn: nn.BatchNorm2d,
        activation: str,
        residual: bool,
    ) -> None:
        super().__init__()
        self.expand, self.expand_bn = expand, expand_bn
        self.depthwise, self.depthwise_bn = depthwise, depthwise_bn
        self.se = se
        self.project, self.project_bn = project, project_bn
        self.act = make_activation(activation)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.expand_bn(self.expand(x)))
        h = self.act(self.depthwise_bn(self.depthwise(h)))
        if self.se is not None:
            h = self.se(h)
        h = self.project_bn(self.project(h))
        return x + h if self.residual else h


class Unit(nn.Sequential):
    """The active blocks of one unit, in order."""


class Subnet(nn.Module):
    """A fixed network cut out of an OFANet: stem, the active blocks of each unit, final layer, classifier."""

    def __init__(self, stem: nn.Module, units: nn.Sequential, final: nn.Module, classifier: nn.Linear, config) -> None:
        super().__init__()
        self.stem = stem
        self.units = units
        self.final = final
        self.classifier = classifier
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final(self.units(self.stem(x)))  # (B, C, H, W)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
