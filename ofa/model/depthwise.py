"""Depthwise convolution with a fast weight gradient where PyTorch's CPU kernel is slow: kernels wider than the input.

On the CPU, PyTorch computes a depthwise conv's weight gradient 3x to 15x slower when the kernel is larger than
the feature map (a 7x7 or 5x5 kernel on the 4x4 maps of the last unit, in the quick profile's net and in the
CIFAR-10 one: ``benchmarks/depthwise.py`` prints the figures). There the conv is computed as what it is, a
small linear map per channel: the (H*W -> H'*W') matrix whose entries are the kernel's weights placed by a
fixed index (the Toeplitz form). The forward pass and the input gradient stay PyTorch's; the weight gradient is one batched
matrix product over the channels, scattered back to the kernel by that index. Same figures up to float
rounding; everywhere else (GPU, no gradient, kernel within the map, another dtype or CPU autocast) it is
``F.conv2d`` itself.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """A depthwise conv of `x` (B, C, H, W) with `weight` (C, 1, k, k), 'same' padding k // 2, no bias."""
    k = weight.shape[-1]
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and weight.requires_grad
            and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and k > min(x.shape[-2:])):
        return _WideKernel.apply(x, weight, stride)
    return F.conv2d(x, weight, None, stride, k // 2, 1, x.shape[1])


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False)`` that trains through ``depthwise_conv2d``.

    The same module in every other respect (its state dict, its ONNX export in eval mode).
    """

    def __init__(self, channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(channels, channels, kernel_size, stride, kernel_size // 2, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return depthwise_conv2d(x, self.weight, self.stride[0])


@functools.lru_cache(maxsize=64)
def _toeplitz_index(height: int, width: int, k: int, stride: int, device: torch.device) -> torch.Tensor:
    """(H'*W', H*W): for each output and input pixel, the kernel entry (ky * k + kx) joining them; k*k where none."""
    pad = k // 2
    out_h, out_w = (height + 2 * pad - k) // stride + 1, (width + 2 * pad - k) // stride + 1
    ky = torch.arange(height).view(1, 1, height, 1) - torch.arange(out_h).view(out_h, 1, 1, 1) * stride + pad
    kx = torch.arange(width).view(1, 1, 1, width) - torch.arange(out_w).view(1, out_w, 1, 1) * stride + pad
    inside = (ky >= 0) & (ky < k) & (kx >= 0) & (kx < k)
    index = torch.where(inside, ky * k + kx, torch.full_like(ky * kx, k * k))
    return index.reshape(out_h * out_w, height * width).to(device)


class _WideKernel(torch.autograd.Function):
    """Forward and input gradient by PyTorch's conv; the weight gradient in Toeplitz form (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        return F.conv2d(x, weight, None, stride, weight.shape[-1] // 2, 1, x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        batch, channels, height, width = x.shape
        k, stride = weight.shape[-1], ctx.stride
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [stride] * 2, [k // 2] * 2, [1, 1], False, [0, 0], channels,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            index = _toeplitz_index(height, width, k, stride, x.device)
            g = grad.permute(1, 2, 3, 0).reshape(channels, -1, batch)  # (C, H'*W', B)
            inputs = x.permute(1, 0, 2, 3).reshape(channels, batch, height * width)  # (C, B, H*W)
            per_pair = torch.bmm(g, inputs).reshape(channels, -1)  # d loss / d matrix entry, (C, H'*W' * H*W)
            grad_w = per_pair.new_zeros(channels, k * k + 1).index_add_(1, index.reshape(-1), per_pair)
            grad_w = grad_w[:, : k * k].reshape(weight.shape)
        return grad_x, grad_w, None
