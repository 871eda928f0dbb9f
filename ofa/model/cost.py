"""Exact cost of a subnet from its config and the supernet's architecture: no extraction, no tracing.

``macs`` counts what ``ofa.count_macs`` (calflops) counts on the extracted subnet: the multiply-accumulates
of every convolution (k*k x in/groups x out per output position; the feature mix of the official head
included) and of the classifier; batch norm, dropout, activations, pooling, the squeeze-excite gating and
residual additions count none. ``num_params`` counts every parameter of the extracted subnet (BN affine
weights and conv/linear biases included, BN running statistics not). Both are what the search calls
thousands of times instead of calflops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .space import SubnetConfig
from .subnet import block_shapes, conv_output_size, se_channels


def macs(arch: Mapping[str, Any], config: SubnetConfig, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass of subnet `config` on one (C, H, W) image."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape {tuple(input_shape)}: expected (C, H, W)")
    c, h, w = (int(v) for v in input_shape)
    if c != arch["in_channels"]:
        raise ValueError(f"input_shape {tuple(input_shape)}: the network takes {arch['in_channels']} channels")
    stride = arch["stem_stride"]
    h, w = conv_output_size(h, stride), conv_output_size(w, stride)
    total = 9 * c * arch["stem_channels"] * h * w  # 3x3 stem
    for unit in block_shapes(arch, config):
        for cin, mid, cout, k, stride, _, se in unit:  # tuple unpacking: this runs for every candidate
            total += cin * mid * h * w  # expand 1x1
            if stride != 1:
                h, w = conv_output_size(h, stride), conv_output_size(w, stride)
            total += (k * k + cout) * mid * h * w  # depthwise kxk, project 1x1
            if se:
                total += 2 * mid * se_channels(mid)  # reduce and expand 1x1 on the pooled (1, 1) map
    final, mix = arch["final_channels"], arch.get("feature_mix_channels")
    total += arch["units"][-1]["channels"] * final * h * w  # final 1x1
    if mix:
        total += final * mix  # feature mix 1x1 on the pooled (1, 1) map
    return total + (mix or final) * arch["num_classes"]  # classifier


def num_params(arch: Mapping[str, Any], config: SubnetConfig) -> int:
    """Parameters of subnet `config` (what ``ofa.count_params`` gives on the extracted subnet)."""
    stem = arch["stem_channels"]
    total = 9 * arch["in_channels"] * stem + 2 * stem  # stem conv + BN
    for unit in block_shapes(arch, config):
        for cin, mid, cout, k, _, _, se in unit:
            total += (cin + 2 + k * k + 2 + cout) * mid + 2 * cout  # expand + BN, depthwise + BN, project + BN
            if se:
                hidden = se_channels(mid)
                total += 2 * mid * hidden + hidden + mid  # two 1x1 convs with biases
    final, classes, mix = arch["final_channels"], arch["num_classes"], arch.get("feature_mix_channels")
    total += arch["units"][-1]["channels"] * final + 2 * final  # final 1x1 + BN
    if mix:
        total += final * mix  # feature mix 1x1, no bias, no BN
    return total + (mix or final) * classes + classes  # classifier
