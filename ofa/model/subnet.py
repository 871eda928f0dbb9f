"""Static modules: what ``OFANet.extract`` produces. Plain torch layers, no elastic choices, no transforms.

The channel arithmetic shared with the elastic twins in ``ofa.model.elastic`` lives here, one function each.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .depthwise import DepthwiseConv2d

M = TypeVar("M", bound=nn.Module)

ACTIVATIONS = {"relu": nn.ReLU, "hswish": nn.Hardswish}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of divisor, at least divisor, never more than 10% below value (MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@functools.cache  # a handful of distinct arguments, and the cost functions call it for every block
def expanded_channels(in_channels: int, width: float) -> int:
    """Middle channels of an MBConv block with expand ratio `width`."""
    return make_divisible(in_channels * width)


@functools.cache
def se_channels(channels: int, reduction: int = 4) -> int:
    """Hidden channels of a squeeze-and-excite layer on `channels` channels."""
    return make_divisible(channels / reduction)


def has_residual(in_channels: int, out_channels: int, stride: int) -> bool:
    """An MBConv block adds its input back iff it keeps the shape: stride 1 and equal channels."""
    return stride == 1 and in_channels == out_channels


def conv_output_size(size: int, stride: int) -> int:
    """Spatial size after a conv with an odd kernel k, padding k // 2 and `stride`."""
    return (size - 1) // stride + 1


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name ('relu' or 'hswish'), in place: every activation here follows a BatchNorm
    whose output nothing else reads (and whose backward needs only its input), so no fresh tensor is needed."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not allowed ({' or '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name](inplace=True)


def conv_bn_act(in_channels: int, out_channels: int, kernel: int, stride: int, activation: str) -> nn.Sequential:
    """Conv (no bias, padding k // 2) -> BatchNorm -> activation: the stem and the final layer."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        make_activation(activation),
    )


def head_layers(final_channels: int, num_classes: int, mix_channels: int | None = None,
                dropout: float = 0.0) -> tuple[nn.Module | None, nn.Module | None, nn.Linear]:
    """The layers after the final 1x1 and the pooling: the feature mix (official OFA's head: a 1x1 conv to
    `mix_channels`, no BN, h-swish; None without), dropout (None at 0) and the classifier."""
    mix = None
    if mix_channels:
        mix = nn.Sequential(nn.Conv2d(final_channels, mix_channels, 1, bias=False), nn.Hardswish())
    return mix, (nn.Dropout(dropout) if dropout > 0 else None), nn.Linear(mix_channels or final_channels, num_classes)


def classify(x: torch.Tensor, mix: nn.Module | None, dropout: nn.Module | None, classifier: nn.Linear) -> torch.Tensor:
    """Final feature maps (B, C, H, W) -> logits: global average pool, feature mix, dropout, classifier."""
    x = F.adaptive_avg_pool2d(x, 1)
    if mix is not None:
        x = mix(x)
    x = torch.flatten(x, 1)
    if dropout is not None:
        x = dropout(x)
    return classifier(x)


class BlockShape(NamedTuple):
    """The static shape of one active MBConv block of a subnet (a named tuple: the cost functions build many)."""

    in_channels: int
    mid_channels: int
    out_channels: int
    kernel: int
    stride: int
    activation: str
    se: bool

    @property
    def residual(self) -> bool:
        return has_residual(self.in_channels, self.out_channels, self.stride)

    @property
    def se_channels(self) -> int:
        return se_channels(self.mid_channels)


def block_shapes(arch: Mapping[str, Any], config) -> list[list[BlockShape]]:
    """The active blocks of each unit of subnet `config` of the supernet described by `arch` (``OFANet.arch``)."""
    shapes = []
    channels = arch["stem_channels"]
    for unit, kernels, widths, depth in zip(arch["units"], config.kernel, config.width, config.depth):
        out, stride, activation, se = unit["channels"], unit["stride"], unit["activation"], unit["se"]
        blocks = []
        for b in range(depth):
            blocks.append(BlockShape(channels, expanded_channels(channels, widths[b]), out, kernels[b],
                                     stride if b == 0 else 1, activation, se))
            channels = out
        shapes.append(blocks)
    return shapes


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


    @classmethod
    def build(cls, shape: BlockShape) -> MBBlock:
        """A freshly initialised block of the given shape (the skeleton ``load_subnet`` fills)."""
        mid = shape.mid_channels
        se = None
        if shape.se:
            hidden = shape.se_channels
            se = SqueezeAndExcite(nn.Conv2d(mid, hidden, 1), nn.Conv2d(hidden, mid, 1))
        return cls(
            expand=nn.Conv2d(shape.in_channels, mid, 1, bias=False),
            expand_bn=nn.BatchNorm2d(mid),
            depthwise=DepthwiseConv2d(mid, shape.kernel, shape.stride),
            depthwise_bn=nn.BatchNorm2d(mid),
            se=se,
            project=nn.Conv2d(mid, shape.out_channels, 1, bias=False),
            project_bn=nn.BatchNorm2d(shape.out_channels),
            activation=shape.activation,
            residual=shape.residual,
        )


class Unit(nn.Sequential):
    """The active blocks of one unit, in order."""


class Subnet(nn.Module):
    """A fixed network cut out of an OFANet: stem, the active blocks of each unit, final layer, classifier.

    ``config`` is its SubnetConfig and ``arch`` the supernet's architecture (``OFANet.arch``): together they
    determine every layer's shape, which is how ``ofa.load_subnet`` rebuilds it without the supernet.
    """

    def __init__(self, stem: nn.Module, units: nn.Sequential, final: nn.Module, classifier: nn.Linear, config,
                 arch: Mapping[str, Any] | None = None, mix: nn.Module | None = None,
                 dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = stem
        self.units = units
        self.final = final
        self.mix = mix
        self.dropout = dropout
        self.classifier = classifier
        self.config = config
        self.arch = arch

    @classmethod
    def build(cls, arch: Mapping[str, Any], config) -> Subnet:
        """A freshly initialised subnet with the layer shapes of `config` in the supernet `arch`."""
        units = arch["units"]
        stem = conv_bn_act(arch["in_channels"], arch["stem_channels"], 3, arch["stem_stride"], units[0]["activation"])
        blocks = nn.Sequential(*(Unit(*(MBBlock.build(s) for s in unit)) for unit in block_shapes(arch, config)))
        final = conv_bn_act(units[-1]["channels"], arch["final_channels"], 1, 1, units[-1]["activation"])
        mix, dropout, classifier = head_layers(arch["final_channels"], arch["num_classes"],
                                               arch.get("feature_mix_channels"), arch.get("dropout", 0.0))
        return cls(stem, blocks, final, classifier, config, arch, mix, dropout)

    @property
    def classes(self) -> list[str] | None:
        """The names of the outputs, in order (None when the supernet was built without them)."""
        return None if self.arch is None else self.arch.get("classes")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final(self.units(self.stem(x)))  # (B, C, H, W)
        return classify(x, self.mix, self.dropout, self.classifier)


def fold_batch_norm(subnet: M) -> M:
    """A copy of `subnet` (or of any module built of its parts) for inference: each BatchNorm's running statistics
    and affine folded into the conv before it (a bias added), the BatchNorm replaced by an identity. The same outputs
    as `subnet` in eval mode, to float rounding, for one pass less over every feature map and a smaller traced
    graph; the copy is in eval mode and has no gradients (its depthwise convs leave out their bias in training
    mode). `subnet` itself is left as it was."""
    folded = copy.deepcopy(subnet).eval().requires_grad_(False)
    for module in list(folded.modules()):  # listed first: the loop replaces children
        if isinstance(module, MBBlock):
            for conv, bn in (("expand", "expand_bn"), ("depthwise", "depthwise_bn"), ("project", "project_bn")):
                setattr(module, conv, fuse_conv_bn_eval(getattr(module, conv), getattr(module, bn)))
                setattr(module, bn, nn.Identity())
        elif isinstance(module, nn.Sequential):  # the stem and the final layer: conv, BN, activation
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                    module[i + 1] = nn.Identity()
    return folded
