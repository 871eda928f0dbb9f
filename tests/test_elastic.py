"""Each elastic module computes exactly what its extracted static twin computes, for every choice."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from ofa.model.depthwise import DepthwiseConv2d
from ofa.model import elastic
from ofa.model.elastic import (
    ElasticBatchNorm2d,
    ElasticConv2d,
    ElasticMBBlock,
    ElasticSqueezeAndExcite,
    ElasticUnit,
)
from ofa.model.subnet import MBBlock, SqueezeAndExcite, Unit, expanded_channels, make_divisible, se_channels
from conftest import perturb


def test_width_arithmetic():
    assert [make_divisible(v) for v in (3, 8, 12, 13, 20, 100)] == [8, 8, 16, 16, 24, 104]
    assert expanded_channels(16, 3) == 48 and expanded_channels(24, 4) == 96 and expanded_channels(10, 2.5) == 24
    assert se_channels(96) == 24 and se_channels(48) == 16


def crop(w: torch.Tensor, k: int) -> torch.Tensor:
    s = (w.shape[-1] - k) // 2
    return w[..., s : s + k, s : s + k]


@pytest.mark.parametrize("kernels", [(3, 5, 7), (5, 7), (3, 7), (3, 5, 7, 9)])
def test_depthwise_kernel_transform_chain_matches_reference(kernels):
    torch.manual_seed(0)
    conv = perturb(ElasticConv2d(16, 16, kernels, stride=1, depthwise=True))
    assert set(conv.transforms) == {f"{b}to{s}" for s, b in zip(kernels, kernels[1:])}
    x = torch.randn(2, 16, 9, 9)
    for k, c in itertools.product(kernels, (8, 16)):
        # independent reference: crop the next larger (already transformed) kernel, times its matrix
        w = conv.weight[:c]
        for small, big in reversed(list(zip(kernels, kernels[1:]))):
            if small < k:
                break
            w = (crop(w, small).reshape(c, -1) @ conv.transforms[f"{big}to{small}"]).reshape(c, 1, small, small)
        expected = F.conv2d(x[:, :c], w, None, 1, k // 2, 1, c)
        assert_close(conv(x[:, :c], kernel_size=k), expected)
        static = conv.extract(c, kernel_size=k)
        assert type(static) is DepthwiseConv2d and static.kernel_size == (k, k) and static.groups == c  # a Conv2d
        assert_close(static(x[:, :c]), expected)


@pytest.mark.parametrize("kernels", [(3, 5, 7), (3, 5, 7, 9)])
def test_kernel_transform_gradients_match_the_step_by_step_chain(kernels):
    """One gather and one product of the chain's matrices: the same weight and gradients as cropping and
    transforming kernel by kernel (double precision, so only the order of the sums differs)."""
    torch.manual_seed(0)
    conv = perturb(ElasticConv2d(6, 6, kernels, depthwise=True)).double().to(memory_format=torch.channels_last)
    for k, c in itertools.product(kernels[:-1], (3, 6)):
        w = conv.weight[:c]
        for small, big in reversed(list(zip(kernels, kernels[1:]))):
            if small < k:
                break
            w = (crop(w, small).reshape(c, -1) @ conv.transforms[f"{big}to{small}"]).reshape(c, 1, small, small)
        probe = torch.randn_like(w)
        expected = torch.autograd.grad((w * probe).sum(), list(conv.parameters()), allow_unused=True)
        got_w, _ = conv.active_params(c, c, k)
        got = torch.autograd.grad((got_w * probe).sum(), list(conv.parameters()), allow_unused=True)
        assert_close(got_w, w, rtol=1e-12, atol=1e-12)
        for g, e in zip(got, expected):
            assert (g is None) == (e is None)
            if e is not None:
                assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_a_small_kernel_first_run_in_inference_mode_still_trains():
    elastic._crop_columns.cache_clear()  # the crop indices are cached per process: make them here, first
    elastic._crop_rows.cache_clear()
    conv = ElasticConv2d(5, 5, (3, 5, 7), depthwise=True)
    x = torch.randn(1, 5, 6, 6)
    with torch.inference_mode():
        conv(x, kernel_size=3)
    conv(x, kernel_size=3).sum().backward()
    assert conv.transforms["5to3"].grad is not None


def test_transforms_are_identity_initialised_so_small_kernels_start_as_centre_crops():
    conv = ElasticConv2d(4, 4, (3, 5, 7), depthwise=True)
    for name, m in conv.transforms.items():
        assert_close(m.detach(), torch.eye(m.shape[0]))
    w, _ = conv.active_params(4, 4, 3)
    assert_close(w, crop(conv.weight, 3))


def test_pointwise_conv_slices_channels_and_bias():
    torch.manual_seed(0)
    conv = perturb(ElasticConv2d(12, 20, bias=True))
    x = torch.randn(2, 12, 5, 5)
    for cin, cout in [(12, 20), (8, 20), (12, 8), (5, 3)]:
        static = conv.extract(cin, cout)
        assert static.weight.shape == (cout, cin, 1, 1)
        assert_close(static.weight, conv.weight[:cout, :cin])
        assert_close(static(x[:, :cin]), conv(x[:, :cin], cout))


def test_conv_rejects_bad_choices():
    conv = ElasticConv2d(8, 8, (5, 7), depthwise=True)
    with pytest.raises(ValueError, match=r"kernel size 3 not in \[5, 7\]"):
        conv(torch.randn(1, 8, 5, 5), kernel_size=3)
    with pytest.raises(ValueError, match="channels 9->9 outside"):
        conv.extract(9, kernel_size=5)
    with pytest.raises(ValueError, match="odd positive"):
        ElasticConv2d(8, 8, (4, 7), depthwise=True)
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        ElasticConv2d(8, 4, (3,), depthwise=True)
    with pytest.raises(ValueError, match="outside"):
        ElasticConv2d(8, 4)(torch.randn(1, 8, 2, 2), 5)
    with pytest.raises(ValueError, match="several sizes only for a depthwise conv"):
        ElasticConv2d(8, 8, (3, 5))


def test_batch_norm_slices_weights_and_statistics():
    torch.manual_seed(0)
    bn = perturb(ElasticBatchNorm2d(16)).eval()
    for c in (4, 10, 16):
        x = torch.randn(3, c, 4, 4)
        static = bn.extract(c)
        assert type(static) is nn.BatchNorm2d and static.num_features == c
        assert_close(static(x), bn(x))


def test_batch_norm_training_updates_only_the_active_statistics():
    torch.manual_seed(0)
    bn = perturb(ElasticBatchNorm2d(16)).train()
    reference = bn.extract(10).train()
    before = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(8, 10, 4, 4) * 2 + 1
    assert_close(bn(x), reference(x))
    assert_close(bn.running_mean[:10], reference.running_mean)
    assert_close(bn.running_var[:10], reference.running_var)
    assert not torch.allclose(bn.running_mean[:10], before[0][:10])
    assert torch.equal(bn.running_mean[10:], before[0][10:]) and torch.equal(bn.running_var[10:], before[1][10:])
    assert int(bn.num_batches_tracked) == 1


def test_squeeze_and_excite_uses_shared_hidden_width():
    torch.manual_seed(0)
    se = perturb(ElasticSqueezeAndExcite(48))
    for c in (16, 32, 48):
        x = torch.randn(2, c, 4, 4)
        static = se.extract(c)
        assert type(static) is SqueezeAndExcite
        assert static.reduce.out_channels == se_channels(c) == static.expand.in_channels
        assert_close(static(x), se(x))


@pytest.mark.parametrize("stride, in_channels, out_channels, activation, se", [
    (1, 16, 16, "relu", False),
    (1, 16, 16, "hswish", True),
    (2, 8, 16, "hswish", True),
    (1, 8, 16, "relu", True),
])
def test_block_extract_equals_elastic_for_every_choice(stride, in_channels, out_channels, activation, se):
    torch.manual_seed(0)
    block = perturb(ElasticMBBlock(in_channels, out_channels, stride, (3, 5, 7), (3, 4, 6), activation, se)).eval()
    assert block.residual == (stride == 1 and in_channels == out_channels)
    x = torch.randn(2, in_channels, 8, 8)
    for k, w in itertools.product((3, 5, 7), (3, 4, 6)):
        static = block.extract(k, w).eval()
        assert type(static) is MBBlock and static.residual == block.residual
        assert static.depthwise.kernel_size == (k, k)
        assert static.expand.out_channels == expanded_channels(in_channels, w)
        assert (static.se is None) == (not se)
        assert_close(static(x), block(x, k, w))


def test_unit_runs_the_first_d_blocks():
    torch.manual_seed(0)
    blocks = [ElasticMBBlock(8 if i == 0 else 16, 16, 2 if i == 0 else 1, (5, 7), (2, 4)) for i in range(3)]
    unit = perturb(ElasticUnit(blocks)).eval()
    x = torch.randn(2, 8, 8, 8)
    for depth in (1, 2, 3):
        kernels, widths = (7, 5, 5)[:depth], (4, 2, 4)[:depth]
        static = unit.extract(kernels, widths, depth).eval()
        assert type(static) is Unit and len(static) == depth
        expected = x
        for b in range(depth):
            expected = blocks[b](expected, kernels[b], widths[b])
        assert_close(unit(x, kernels, widths, depth), expected)
        assert_close(static(x), expected)


def test_gradients_reach_the_transforms_of_the_active_kernel_only():
    torch.manual_seed(0)
    conv = ElasticConv2d(8, 8, (3, 5, 7), depthwise=True)
    x = torch.randn(2, 8, 6, 6)
    expected = {7: set(), 5: {"7to5"}, 3: {"7to5", "5to3"}}
    for k, names in expected.items():
        conv.zero_grad(set_to_none=True)
        conv(x, kernel_size=k).square().sum().backward()
        got = {n for n, m in conv.transforms.items() if m.grad is not None and m.grad.abs().sum() > 0}
        assert got == names
        assert conv.weight.grad is not None


def test_sort_channels_orders_by_importance_and_keeps_the_full_block():
    torch.manual_seed(0)
    block = perturb(ElasticMBBlock(16, 16, 1, (3, 5), (2, 4), "hswish", se=True)).eval()
    x = torch.randn(2, 16, 6, 6)
    before = block(x, 5, 4)
    importance = block.project.weight.abs().sum(dim=(0, 2, 3))
    block.sort_channels()
    after_importance = block.project.weight.abs().sum(dim=(0, 2, 3))
    assert_close(after_importance, importance.sort(descending=True).values)
    se_importance = block.se.expand.weight.abs().sum(dim=(0, 2, 3))
    assert torch.all(se_importance[:-1] >= se_importance[1:])
    assert_close(block(x, 5, 4), before)
    # narrower widths now take the most important channels
    top = importance.sort(descending=True).values[: expanded_channels(16, 2)]
    assert_close(block.extract(5, 2).project.weight.abs().sum(dim=(0, 2, 3)), top)


def test_protected_sort_keeps_each_trained_width_s_channels_within_it():
    """Before a second width phase adds width 3, the channels of width 4 stay the first ones (sorted among themselves)."""
    torch.manual_seed(0)
    block = perturb(ElasticMBBlock(8, 8, 1, (3,), (3, 4, 6), "relu", se=False)).eval()
    x = torch.randn(2, 8, 5, 5)
    before, width4 = block(x, 3, 6), block(x, 3, 4)
    importance = block.project.weight.abs().sum(dim=(0, 2, 3))
    band = expanded_channels(8, 4)  # 32 of 48 channels
    block.sort_channels(protect=[4])
    after = block.project.weight.abs().sum(dim=(0, 2, 3))
    assert_close(after[:band], importance[:band].sort(descending=True).values)
    assert_close(after[band:], importance[band:].sort(descending=True).values)
    assert not torch.equal(after, importance.sort(descending=True).values)  # a plain sort would mix the bands
    assert_close(block(x, 3, 6), before)
    assert_close(block(x, 3, 4), width4)  # width 4 computes with the same channels as before
