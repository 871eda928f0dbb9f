"""OFANet: exact extraction over whole spaces, gradients, channel sorting, MACs and BN calibration."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import ofa
import ofa.model.subnet
from ofa.model import fold_batch_norm
from ofa.model.subnet import expanded_channels
from conftest import PAPER_SPACE, SEED_SPACE, perturb, tiny_net

SPACES = {"seed": SEED_SPACE, "paper": PAPER_SPACE}


def configs_of(net: ofa.OFANet, n_random: int = 8) -> list[ofa.SubnetConfig]:
    rng = random.Random(1234)
    return net.uniform_configs() + [net.sample_config(rng) for _ in range(n_random)]


def assert_plain(subnet: nn.Module) -> None:
    """Only torch.nn layers, ofa.model.subnet's static containers and the depthwise Conv2d; no elastic module, no
    transform matrix."""
    for name, module in subnet.named_modules():
        origin = type(module).__module__
        assert origin.startswith("torch.nn") or origin in ("ofa.model.subnet", "ofa.model.depthwise"), f"{name}: {type(module)}"
        assert "Elastic" not in type(module).__name__
    assert not any("transform" in name for name, _ in subnet.named_parameters())


@pytest.mark.parametrize("space_name", SPACES)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_extract_equals_supernet_for_the_whole_grid_and_random_configs(space_name, in_channels):
    net = perturb(tiny_net(SPACES[space_name], in_channels)).eval()
    x = torch.randn(2, in_channels, 16, 16)
    configs = configs_of(net)
    assert len(set(configs)) == len(configs)
    for cfg in configs:
        sub = net.extract(cfg)
        assert isinstance(sub, ofa.Subnet) and not sub.training and sub.config == cfg
        assert_plain(sub)
        # holds exactly the active blocks with the active kernel and width
        assert len(sub.units) == net.num_units
        for u, unit in enumerate(sub.units):
            assert len(unit) == cfg.depth[u]
            for b, (block, (k, w)) in enumerate(zip(unit, cfg.active(u))):
                assert block.depthwise.kernel_size == (k, k)
                assert block.depthwise.out_channels == expanded_channels(net.units[u].blocks[b].in_channels, w)
        assert_close(sub(x), net(x, cfg))
    # the copy owns its weights: training it leaves the supernet alone
    sub = net.extract(configs[0])
    before = net(x, configs[0])
    with torch.no_grad():
        for p in sub.parameters():
            p.add_(1.0)
    assert_close(net(x, configs[0]), before)


def test_default_call_is_the_max_config_and_param_counts_shrink():
    net = perturb(tiny_net(SEED_SPACE)).eval()
    x = torch.randn(2, 3, 16, 16)
    assert_close(net(x), net(x, net.max_config()))
    sizes = [ofa.count_params(net.extract(c)) for c in (net.min_config(), net.max_config())]
    assert sizes[0] < sizes[1] < ofa.count_params(net)


def test_seed_reduced_supernet_is_expressible():
    # OFAnet(num_units=1, max_width=4, max_depth=3, max_kernel_size=7) over [[5, 7], [2, 3], [2, 4]]
    net = ofa.OFANet(SEED_SPACE, in_channels=3, num_classes=10, units=[{"channels": 24, "stride": 2, "se": True}])
    assert net.num_units == 1 and len(net.units[0].blocks) == 3
    block = net.units[0].blocks[1]
    assert block.depthwise.weight.shape[-1] == 7 and block.depthwise.out_channels == expanded_channels(24, 4)
    assert [str(c) for c in net.uniform_configs()] == [
        "k5-d2-w2", "k5-d2-w4", "k5-d3-w2", "k5-d3-w4", "k7-d2-w2", "k7-d2-w4", "k7-d3-w2", "k7-d3-w4"]
    assert net(torch.randn(2, 3, 32, 32), net.min_config()).shape == (2, 10)


def test_default_macro_structure_suits_32x32():
    net = ofa.OFANet(PAPER_SPACE)
    assert net.num_units == 5 and [u["stride"] for u in net.arch["units"]].count(2) == 3  # 32 -> 4 pixels
    sub = net.extract(net.max_config()).eval()
    feats = sub.units(sub.stem(torch.randn(1, 3, 32, 32)))
    assert feats.shape[-2:] == (4, 4)


def test_gradients_reach_active_transforms_and_skip_inactive_blocks():
    net = tiny_net(PAPER_SPACE)
    cfg = ofa.SubnetConfig(kernel=[[3, 7, 7, 7], [5, 5, 7, 7]], depth=[2, 3], width=[[3] * 4, [6] * 4])
    F.cross_entropy(net(torch.randn(4, 3, 16, 16), cfg), torch.tensor([0, 1, 2, 3])).backward()
    units = net.units
    t = lambda u, b, name: units[u].blocks[b].depthwise.transforms[name].grad  # noqa: E731
    assert t(0, 0, "7to5") is not None and t(0, 0, "5to3") is not None
    assert t(0, 0, "5to3").abs().sum() > 0
    assert t(0, 1, "7to5") is None  # kernel 7: no transform used
    assert t(1, 0, "7to5").abs().sum() > 0 and t(1, 0, "5to3") is None
    for u, depth in enumerate(cfg.depth):
        for b, block in enumerate(units[u].blocks):
            grads = [p.grad for p in block.parameters()]
            if b < depth:
                assert block.expand.weight.grad.abs().sum() > 0
            else:
                assert all(g is None for g in grads), f"inactive block {u}.{b} got gradients"
    # width 3 of 6: the inactive middle channels get zero gradient
    mid = expanded_channels(units[0].blocks[0].in_channels, 3)
    g = units[0].blocks[0].expand.weight.grad
    assert g[:mid].abs().sum() > 0 and torch.all(g[mid:] == 0)


def test_sort_channels_preserves_the_max_config_output():
    net = perturb(tiny_net(PAPER_SPACE)).eval()
    x = torch.randn(3, 3, 16, 16)
    before = net(x)
    net.sort_channels()
    assert_close(net(x), before)
    for unit in net.units:
        for block in unit.blocks:
            imp = block.project.weight.abs().sum(dim=(0, 2, 3))
            assert torch.all(imp[:-1] >= imp[1:])
    # extraction stays exact after sorting
    cfg = net.min_config()
    assert_close(net.extract(cfg)(x), net(x, cfg))


def test_invalid_configs_raise_on_the_network():
    net = tiny_net(SEED_SPACE)
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"kernel 3 not in space.kernel \[5, 7\]"):
        net(x, PAPER_SPACE.min_config(2).__class__(kernel=[[3] * 3] * 2, depth=[2, 2], width=[[2] * 3] * 2))
    with pytest.raises(ValueError, match="config has 3 units, the network has 2"):
        net.extract(SEED_SPACE.uniform(3, 5, 2, 2))
    with pytest.raises(ValueError, match="4 block slots, the space has max depth 3"):
        net(x, PAPER_SPACE.uniform(2, 5, 2, 4))
    with pytest.raises(ValueError, match="unit stride 3 is not allowed"):
        ofa.OFANet(SEED_SPACE, units=[{"channels": 8, "stride": 3}])
    with pytest.raises(ValueError, match="activation 'gelu' is not allowed"):
        ofa.UnitSpec(8, activation="gelu")


def test_count_macs_counts_multiply_accumulates_of_plain_layers():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False)).train()
    assert ofa.count_macs(conv, (1, 3, 8, 8)) == 8 * 3 * 9 * 64
    assert conv.training  # left as it was


def test_macs_grow_strictly_along_each_axis_of_the_uniform_grid():
    for space in SPACES.values():
        net = tiny_net(space)
        macs = {
            (k, d, w): ofa.count_macs(net.extract(net.uniform_config(k, d, w)), (1, 3, 16, 16))
            for k in space.kernel for d in space.depth for w in space.width
        }
        for (k, d, w), m in macs.items():
            for axis, choices in enumerate((space.kernel, space.depth, space.width)):
                key = [k, d, w]
                i = choices.index(key[axis])
                if i + 1 < len(choices):
                    key[axis] = choices[i + 1]
                    assert macs[tuple(key)] > m, f"{(k, d, w)} -> {tuple(key)}"


def test_calibrate_bn_sets_plain_average_of_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(4)).eval()
    model[0].running_mean.fill_(5.0)
    batches = [torch.randn(8, 4, 3, 3) * s + s for s in (1.0, 2.0, 3.0)]
    assert ofa.calibrate_bn(model, batches) == 24
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches])
    vars_ = torch.stack([b.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True) for b in batches])
    assert_close(model[0].running_mean, means.mean(0))
    assert_close(model[0].running_var, vars_.mean(0))
    assert not model.training and model[0].momentum == 0.1
    with pytest.raises(ValueError, match="no batches"):
        ofa.calibrate_bn(model, [])


def test_calibration_recovers_a_subnet_from_shared_statistics():
    """After calibration, the extracted subnet's BN statistics fit the subnet's own features."""
    net = perturb(tiny_net(SEED_SPACE)).eval()
    cfg = net.min_config()
    sub = net.extract(cfg)
    data = [torch.randn(16, 3, 16, 16) for _ in range(4)]
    ofa.calibrate_bn(sub, data)
    bn = sub.units[0][0].expand_bn
    feats = torch.cat([sub.units[0][0].expand(sub.stem(x)) for x in data])
    assert_close(bn.running_mean, feats.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)


def test_folded_batch_norm_gives_the_subnets_logits_without_a_batch_norm():
    net = perturb(tiny_net(SEED_SPACE)).eval()
    x = torch.randn(8, 3, 16, 16)
    for cfg in configs_of(net, n_random=2):
        sub = net.extract(cfg).train()
        bns = sum(isinstance(m, nn.BatchNorm2d) for m in sub.modules())
        folded = fold_batch_norm(sub)
        assert not folded.training and not any(p.requires_grad for p in folded.parameters())
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
        assert folded.stem[0].bias is not None and folded.units[0][0].depthwise.bias is not None
        assert sub.training and sum(isinstance(m, nn.BatchNorm2d) for m in sub.modules()) == bns > 0  # left as it was
        with torch.no_grad():
            assert_close(folded(x), sub.eval()(x), atol=1e-5, rtol=1e-4)


def test_in_place_activations_give_the_gradients_of_out_of_place_ones():
    """Every activation runs in place (after a BatchNorm); training through them is unchanged."""
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])

    def grads(inplace: bool) -> dict[str, torch.Tensor]:
        net = perturb(tiny_net(SEED_SPACE)).train()
        acts = [m for m in net.modules() if isinstance(m, (nn.ReLU, nn.Hardswish))]
        assert {type(m) for m in acts} == {nn.ReLU, nn.Hardswish} and all(m.inplace for m in acts)
        for m in acts:
            m.inplace = inplace
        for cfg in (net.max_config(), net.min_config()):
            F.cross_entropy(net(x, cfg), y).backward()
        return {n: p.grad for n, p in net.named_parameters() if p.grad is not None}

    assert_close(grads(True), grads(False), atol=0, rtol=0)
