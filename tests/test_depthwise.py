"""The depthwise conv's own weight gradient (kernels wider than the map) equals PyTorch's, and is taken only there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ofa.model import DepthwiseConv2d, OFANet, UnitSpec, depthwise_conv2d
from ofa.model.space import ConfigSpace


def _grads(conv, x, weight, stride, grad_out):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    y = conv(x, weight, stride)
    y.backward(grad_out)
    return y, x.grad, weight.grad


def _reference(x, weight, stride):
    return F.conv2d(x, weight, None, stride, weight.shape[-1] // 2, 1, x.shape[1])


@pytest.mark.parametrize("size, kernel, stride", [
    ((4, 4), 7, 1), ((4, 4), 5, 1), ((4, 4), 7, 2), ((2, 2), 3, 1), ((3, 5), 7, 2), ((5, 3), 5, 1), ((6, 6), 7, 1),
])
@pytest.mark.parametrize("channels_last", [True, False])
def test_wide_kernels_give_pytorchs_output_and_gradients(size, kernel, stride, channels_last):
    torch.manual_seed(0)
    x = torch.randn(6, 5, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(5, 1, kernel, kernel)
    out_ref = _reference(x, weight, stride)
    grad_out = torch.randn_like(out_ref)
    y, gx, gw = _grads(depthwise_conv2d, x, weight, stride, grad_out)
    y_ref, gx_ref, gw_ref = _grads(_reference, x, weight, stride, grad_out)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5)
    assert gw.abs().sum() > 0 and gx.abs().sum() > 0


def test_the_own_gradient_is_taken_only_where_the_kernel_is_wider_than_the_map():
    weight = torch.randn(4, 1, 5, 5, requires_grad=True)
    assert "WideKernel" in type(depthwise_conv2d(torch.randn(2, 4, 4, 4), weight).grad_fn).__name__
    assert "Convolution" in type(depthwise_conv2d(torch.randn(2, 4, 5, 5), weight).grad_fn).__name__  # fits
    with torch.no_grad():
        assert depthwise_conv2d(torch.randn(2, 4, 4, 4), weight).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_conv2d(torch.randn(2, 4, 4, 4), weight)
    assert "Convolution" in type(out.grad_fn).__name__ and out.dtype == torch.bfloat16
    assert "Convolution" in type(depthwise_conv2d(torch.randn(2, 4, 4, 4).double(), weight.double()).grad_fn).__name__
    frozen = weight.detach()
    assert "Convolution" in type(depthwise_conv2d(torch.randn(2, 4, 4, 4, requires_grad=True), frozen).grad_fn).__name__


def test_an_input_without_a_gradient_still_gets_the_weights_own_gradient():
    torch.manual_seed(1)
    x, weight = torch.randn(3, 4, 4, 4), torch.randn(4, 1, 7, 7)
    grad_out = torch.randn(3, 4, 4, 4)
    w = weight.clone().requires_grad_()
    out = depthwise_conv2d(x, w)
    assert "WideKernel" in type(out.grad_fn).__name__
    out.backward(grad_out)
    w_ref = weight.clone().requires_grad_()
    _reference(x, w_ref, 1).backward(grad_out)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-5)


def test_the_module_is_a_conv2d_with_its_state_and_eval_path():
    torch.manual_seed(2)
    conv = DepthwiseConv2d(6, 7, stride=2)
    plain = nn.Conv2d(6, 6, 7, 2, 3, groups=6, bias=False)
    plain.load_state_dict(conv.state_dict())
    assert list(conv.state_dict()) == ["weight"] and isinstance(conv, nn.Conv2d)
    x = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(conv(x), plain(x))
    conv.eval()
    assert conv(x).grad_fn.__class__ is plain(x).grad_fn.__class__  # eval: PyTorch's conv itself (exports as Conv)


def test_supernet_and_extracted_subnet_train_to_the_same_gradients():
    """The 2x2 and 1x1 maps of the last two units under the max config's 5x5 kernels: the supernet's elastic conv
    and the extracted subnet's DepthwiseConv2d both take the own weight gradient, and agree."""
    torch.manual_seed(3)
    units = [UnitSpec(8, 2, "relu", False), UnitSpec(16, 2, "hswish", True)]
    net = OFANet(ConfigSpace(kernel=(3, 5), depth=(1, 2), width=(2, 3)), in_channels=1, num_classes=4, units=units,
                 stem_channels=8, stem_stride=2, final_channels=32)
    cfg = net.max_config()
    sub = net.extract(cfg)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 4, (4,))
    net.train(), sub.train()
    F.cross_entropy(net(x, cfg), y).backward()
    F.cross_entropy(sub(x), y).backward()
    wide = [m for m in sub.modules() if isinstance(m, DepthwiseConv2d) and m.kernel_size[0] > 2]
    assert wide, "the test net has no kernel wider than its maps"
    for name, p in sub.named_parameters():
        if name.endswith("depthwise.weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the supernet's gradient of the largest kernel equals the subnet's (the max config uses it untransformed)
    torch.testing.assert_close(net.units[-1].blocks[-1].depthwise.weight.grad,
                               sub.units[-1][-1].depthwise.weight.grad, rtol=1e-5, atol=1e-6)
