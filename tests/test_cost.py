"""net.macs / net.num_params: computed from the config alone, equal to calflops and count_params on the extract."""

from __future__ import annotations

import random

import pytest
import torch

import ofa
from conftest import PAPER_SPACE, SEED_SPACE, TINY_UNITS


def _net(space: ofa.ConfigSpace, in_channels: int, stem_stride: int, units=TINY_UNITS) -> ofa.OFANet:
    torch.manual_seed(0)
    return ofa.OFANet(space, in_channels, 10, units=units, stem_channels=8, stem_stride=stem_stride,
                      final_channels=32)


def _configs(net: ofa.OFANet, samples: int, seed: int) -> list[ofa.SubnetConfig]:
    rng = random.Random(seed)
    return net.uniform_configs() + [net.sample_config(rng) for _ in range(samples)]


@pytest.mark.parametrize("space", [SEED_SPACE, PAPER_SPACE], ids=["seed-space", "paper-space"])
@pytest.mark.parametrize("in_channels,size,stem_stride", [(1, 28, 2), (1, 32, 1), (3, 28, 1), (3, 32, 2)])
def test_macs_and_params_equal_calflops_on_the_extracted_subnet(space, in_channels, size, stem_stride):
    net = _net(space, in_channels, stem_stride)
    shape = (in_channels, size, size)
    for cfg in _configs(net, samples=4, seed=size + in_channels):
        sub = net.extract(cfg)
        assert net.macs(cfg, shape) == ofa.count_macs(sub, (1, *shape)), cfg
        assert net.num_params(cfg) == ofa.count_params(sub), cfg


def test_macs_equal_calflops_on_the_default_cifar_network():
    net = ofa.OFANet(SEED_SPACE, in_channels=3, num_classes=10)
    for cfg in [net.min_config(), net.max_config(), net.sample_config(random.Random(3))]:
        sub = net.extract(cfg)
        assert net.macs(cfg, (3, 32, 32)) == ofa.count_macs(sub, (1, 3, 32, 32))
        assert net.num_params(cfg) == ofa.count_params(sub)


def test_cost_grows_with_every_dimension_and_rejects_bad_input():
    net = _net(SEED_SPACE, 3, 1)
    shape = (3, 32, 32)
    base = net.macs(net.uniform_config(5, 2, 2), shape)
    for k, d, w in [(7, 2, 2), (5, 3, 2), (5, 2, 4)]:
        assert net.macs(net.uniform_config(k, d, w), shape) > base
        assert net.num_params(net.uniform_config(k, d, w)) > net.num_params(net.uniform_config(5, 2, 2))
    with pytest.raises(ValueError, match="channels"):
        net.macs(net.max_config(), (1, 32, 32))
    with pytest.raises(ValueError, match="C, H, W"):
        net.macs(net.max_config(), (32, 32))
    with pytest.raises(ValueError, match="kernel 3 not in"):
        net.macs(ofa.SubnetConfig(kernel=[[3, 3, 3]] * 2, depth=[2, 2], width=[[2, 2, 2]] * 2), shape)
