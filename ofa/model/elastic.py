"""Elastic modules: layers that hold the largest weights and compute as any smaller choice (OFA paper, 3.2-3.3).

Each ``ElasticX`` has ``forward(x, <choice>)`` and ``extract(<choice>) -> X`` (the static module of
``ofa.model.subnet``); both go through one method that slices and transforms the weights, so the supernet and
an extracted subnet compute with identical tensors. Choices are passed explicitly; no module keeps an
"active subnet" state.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .depthwise import DepthwiseConv2d, depthwise_conv2d
from .subnet import (
    MBBlock,
    SqueezeAndExcite,
    Unit,
    expanded_channels,
    has_residual,
    make_activation,
    se_channels,
)


def _permute_(param: torch.Tensor | None, perm: torch.Tensor, dim: int) -> None:
    if param is not None:
        param.data.copy_(param.data.index_select(dim, perm))


@functools.lru_cache(maxsize=None)
def _crop_columns(size: int, small: int, device: torch.device) -> torch.Tensor:
    """Positions of the centre small x small crop in a flattened size x size kernel.

    Cached, and made outside inference mode even when first asked for inside it: an inference tensor could
    not index a later training step (index_select keeps its index for the backward pass).
    """
    start = (size - small) // 2
    with torch.inference_mode(False):
        return torch.tensor([r * size + c for r in range(start, start + small) for c in range(start, start + small)],
                            device=device)


@functools.lru_cache(maxsize=None)
def _crop_rows(channels: int, size: int, small: int, device: torch.device) -> torch.Tensor:
    """Positions of the centre crops of the first `channels` kernels in a flattened (C, 1, size, size) weight."""
    columns = _crop_columns(size, small, torch.device("cpu"))
    with torch.inference_mode(False):
        return (torch.arange(channels)[:, None] * size * size + columns).reshape(-1).to(device)


def _importance_order(weight: torch.Tensor, dim: int, bands: Sequence[int] = ()) -> torch.Tensor:
    """Indices along `dim` sorted by descending L1 norm of the weight over all other dims (ties keep order).

    `bands` (channel counts) protect leading groups: the first bands[0] channels stay first (sorted among
    themselves), then the channels up to bands[1], and so on; the rest is sorted after them.
    """
    other = [d for d in range(weight.dim()) if d != dim]
    importance = weight.detach().abs().sum(dim=other)
    order, start = [], 0
    for end in [*sorted(b for b in set(bands) if 0 < b < len(importance)), len(importance)]:
        order.append(start + torch.argsort(importance[start:end], descending=True, stable=True))
        start = end
    return torch.cat(order)


class ElasticConv2d(nn.Module):
    """A conv that stores its largest weight and computes with the first channels and a smaller kernel.

    Channels: the first ``out_channels`` filters over the first ``in_channels`` inputs (pointwise convs,
    elastic width). Kernel (depthwise convs, elastic kernel, paper 3.2): the k x k kernel is the centre
    crop of the next larger active kernel times a learnable (k*k, k*k) transform matrix, one per
    transition, shared by all channels and identity-initialised, so 7 -> 5 -> 3 chains two matrices
    (computed as one gather of the largest kernel's centre and one product with the chain's matrices
    multiplied together: fewer operators per training step than cropping and transforming in turn).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_sizes: Sequence[int] = (1,),
        stride: int = 1,
        depthwise: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        kernel_sizes = tuple(sorted(set(kernel_sizes)))
        if any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes {list(kernel_sizes)}: odd positive integers only")
        if len(kernel_sizes) > 1 and not depthwise:
            raise ValueError(f"kernel_sizes {list(kernel_sizes)}: several sizes only for a depthwise conv (elastic kernel)")
        if depthwise and in_channels != out_channels:
            raise ValueError(f"depthwise conv needs in_channels == out_channels, got {in_channels} and {out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_sizes, self.stride, self.depthwise = kernel_sizes, stride, depthwise
        k = kernel_sizes[-1]
        self.weight = nn.Parameter(torch.empty(out_channels, 1 if depthwise else in_channels, k, k))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.transforms = nn.ParameterDict(
            {f"{big}to{small}": nn.Parameter(torch.eye(small * small)) for small, big in zip(kernel_sizes, kernel_sizes[1:])}
        )

    def active_params(self, in_channels: int, out_channels: int, kernel_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight (out, in or 1, k, k) and bias of the given choice: sliced channels, transformed kernel."""
        if kernel_size not in self.kernel_sizes:
            raise ValueError(f"kernel size {kernel_size} not in {list(self.kernel_sizes)}")
        if not 0 < out_channels <= self.out_channels or not 0 < in_channels <= self.in_channels:
            raise ValueError(
                f"channels {in_channels}->{out_channels} outside 1..{self.in_channels} -> 1..{self.out_channels}"
            )
        if self.depthwise and in_channels != out_channels:
            raise ValueError(f"depthwise conv needs in == out channels, got {in_channels} and {out_channels}")
        w = self.weight
        if kernel_size < self.kernel_sizes[-1]:  # depthwise: rows and centre crop in one gather, one product
            crop, matrix = self._kernel_transform(kernel_size)
            w = w.reshape(-1).index_select(0, _crop_rows(out_channels, self.kernel_sizes[-1], crop, w.device))
            w = (w.view(out_channels, crop * crop) @ matrix).view(out_channels, 1, kernel_size, kernel_size)
        else:
            if out_channels < self.out_channels:
                w = w[:out_channels]
            if not self.depthwise and in_channels < self.in_channels:
                w = w[:, :in_channels].contiguous()  # conv kernels are faster on a dense weight
        bias = None if self.bias is None else self.bias[:out_channels]
        return w, bias

    def _kernel_transform(self, kernel_size: int) -> tuple[int, torch.Tensor]:
        """The chain of transforms from the largest kernel down to `kernel_size` as one matrix.

        Cropping the centre of a transformed kernel selects columns of its matrix, so
        crop(crop(W) T1) T2 = crop(W) (T1[:, centre] T2): returns the size of the first crop of the largest
        kernel and that (first^2, k^2) product of the chain's matrices.
        """
        size, first, matrix = self.kernel_sizes[-1], 0, None
        for small in reversed(self.kernel_sizes[:-1]):
            if small < kernel_size:
                break
            step = self.transforms[f"{size}to{small}"]  # (small^2, small^2)
            if matrix is None:
                first, matrix = small, step
            else:
                matrix = matrix.index_select(1, _crop_columns(size, small, step.device)) @ step
            size = small
        return first, matrix

    def forward(self, x: torch.Tensor, out_channels: int | None = None, kernel_size: int | None = None) -> torch.Tensor:
        in_channels = x.shape[1]
        if self.depthwise:
            out_channels = in_channels
        k = self.kernel_sizes[-1] if kernel_size is None else kernel_size
        w, b = self.active_params(in_channels, out_channels or self.out_channels, k)
        if self.depthwise and b is None:
            return depthwise_conv2d(x, w, self.stride)
        return F.conv2d(x, w, b, self.stride, k // 2, 1, in_channels if self.depthwise else 1)

    def extract(self, in_channels: int, out_channels: int | None = None, kernel_size: int | None = None) -> nn.Conv2d:
        """A plain Conv2d (a DepthwiseConv2d for a depthwise one) holding exactly the weights this conv computes with."""
        if self.depthwise:
            out_channels = in_channels
        out_channels = out_channels or self.out_channels
        k = self.kernel_sizes[-1] if kernel_size is None else kernel_size
        w, b = self.active_params(in_channels, out_channels, k)
        if self.depthwise and b is None:
            conv: nn.Conv2d = DepthwiseConv2d(in_channels, k, self.stride)
        else:
            conv = nn.Conv2d(in_channels, out_channels, k, self.stride, k // 2,
                             groups=in_channels if self.depthwise else 1, bias=b is not None)
        conv = conv.to(w.device, w.dtype)
        conv.weight.data.copy_(w.detach())
        if b is not None:
            conv.bias.data.copy_(b.detach())
        return conv

    def permute_(self, out: torch.Tensor | None = None, in_: torch.Tensor | None = None) -> None:
        """Reorder output channels (and bias) by `out`, input channels by `in_`."""
        if out is not None:
            _permute_(self.weight, out, 0)
            _permute_(self.bias, out, 0)
        if in_ is not None and not self.depthwise:
            _permute_(self.weight, in_, 1)


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """Batch norm over the first c channels: affine weights and running statistics are sliced, shared by all widths."""

    def active_params(self, channels: int) -> tuple[torch.Tensor, ...]:
        """Weight, bias, running mean and running variance of the first `channels` channels."""
        if not 0 < channels <= self.num_features:
            raise ValueError(f"batch norm on {channels} channels, it has {self.num_features}")
        if channels == self.num_features:
            return self.weight, self.bias, self.running_mean, self.running_var
        return (self.weight[:channels], self.bias[:channels], self.running_mean[:channels], self.running_var[:channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, mean, var = self.active_params(x.shape[1])
        momentum = self.momentum if self.momentum is not None else 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        # running_mean/var are views into the full buffers: the in-place update writes through.
        return F.batch_norm(x, mean, var, weight, bias, self.training, momentum, self.eps)

    def extract(self, channels: int) -> nn.BatchNorm2d:
        """A plain BatchNorm2d with the first `channels` channels' weights and statistics."""
        bn = nn.BatchNorm2d(channels, self.eps, self.momentum).to(self.weight.device, self.weight.dtype)
        for dst, src in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), self.active_params(channels)):
            dst.data.copy_(src.detach())
        bn.num_batches_tracked.copy_(self.num_batches_tracked)
        return bn.train(self.training)

    def permute_(self, perm: torch.Tensor) -> None:
        """Reorder all channels by `perm`."""
        for t in (self.weight, self.bias, self.running_mean, self.running_var):
            _permute_(t, perm, 0)


class ElasticSqueezeAndExcite(nn.Module):
    """Squeeze-and-excite on the first c input channels; its hidden width is ``se_channels(c)``.

    Both 1x1 convs are elastic: reduce takes the first c inputs to the first hidden channels, expand the
    reverse, so every width shares the leading (most important, after sorting) channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = se_channels(channels)
        self.reduce = ElasticConv2d(channels, hidden, bias=True)
        self.expand = ElasticConv2d(hidden, channels, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        s = F.adaptive_avg_pool2d(x, 1)  # (B, C, 1, 1)
        s = self.expand(F.relu(self.reduce(s, se_channels(c))), c)
        return x * F.hardsigmoid(s)

    def extract(self, channels: int) -> SqueezeAndExcite:
        hidden = se_channels(channels)
        return SqueezeAndExcite(self.reduce.extract(channels, hidden), self.expand.extract(hidden, channels))

    def sort_channels(self, perm: torch.Tensor) -> None:
        """Apply the block's middle-channel order `perm`, then sort hidden channels by L1 importance."""
        self.reduce.permute_(in_=perm)
        self.expand.permute_(out=perm)
        hidden = _importance_order(self.expand.weight, dim=1)
        self.reduce.permute_(out=hidden)
        self.expand.permute_(in_=hidden)


class ElasticMBBlock(nn.Module):
    """An MBConv block with elastic kernel (depthwise conv) and width (expand ratio of the middle channels).

    Stores the middle channels of the largest ratio; ratio e uses the first ``expanded_channels(in, e)``.
    Residual iff stride 1 and in == out channels. Input and output channels are fixed.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        kernel_sizes: Sequence[int],
        widths: Sequence[float],
        activation: str = "relu",
        se: bool = False,
    ) -> None:
        super().__init__()
        mid = expanded_channels(in_channels, max(widths))
        self.in_channels, self.out_channels, self.activation = in_channels, out_channels, activation
        self.expand = ElasticConv2d(in_channels, mid)
        self.expand_bn = ElasticBatchNorm2d(mid)
        self.depthwise = ElasticConv2d(mid, mid, kernel_sizes, stride, depthwise=True)
        self.depthwise_bn = ElasticBatchNorm2d(mid)
        self.se = ElasticSqueezeAndExcite(mid) if se else None
        self.project = ElasticConv2d(mid, out_channels)
        self.project_bn = nn.BatchNorm2d(out_channels)
        self.act = make_activation(activation)
        self.residual = has_residual(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor, kernel_size: int, width: float) -> torch.Tensor:
        mid = expanded_channels(self.in_channels, width)
        h = self.act(self.expand_bn(self.expand(x, mid)))  # (B, mid, H, W)
        h = self.act(self.depthwise_bn(self.depthwise(h, kernel_size=kernel_size)))  # (B, mid, H/s, W/s)
        if self.se is not None:
            h = self.se(h)
        h = self.project_bn(self.project(h))  # (B, out, H/s, W/s)
        return x + h if self.residual else h

    def extract(self, kernel_size: int, width: float) -> MBBlock:
        mid = expanded_channels(self.in_channels, width)
        return MBBlock(
            expand=self.expand.extract(self.in_channels, mid),
            expand_bn=self.expand_bn.extract(mid),
            depthwise=self.depthwise.extract(mid, kernel_size=kernel_size),
            depthwise_bn=self.depthwise_bn.extract(mid),
            se=None if self.se is None else self.se.extract(mid),
            project=self.project.extract(mid, self.out_channels),
            project_bn=copy.deepcopy(self.project_bn),
            activation=self.activation,
            residual=self.residual,
        )

    @torch.no_grad()
    def sort_channels(self, protect: Sequence[float] = ()) -> None:
        """Reorder middle channels by the L1 norm of the projection weights over them, in every tensor that touches them.

        The channels of each width in `protect` (widths already trained) stay within that width, sorted among
        themselves (the official OFA's re-sort before a second width phase).
        """
        bands = [expanded_channels(self.in_channels, w) for w in protect]
        perm = _importance_order(self.project.weight, dim=1, bands=bands)
        self.expand.permute_(out=perm)
        self.expand_bn.permute_(perm)
        self.depthwise.permute_(out=perm)
        self.depthwise_bn.permute_(perm)
        if self.se is not None:
            self.se.sort_channels(perm)
        self.project.permute_(in_=perm)


class ElasticUnit(nn.Module):
    """A stack of up to D blocks with elastic depth: depth d runs the first d (paper 3.3)."""

    def __init__(self, blocks: Sequence[ElasticMBBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, kernels: Sequence[int], widths: Sequence[float], depth: int) -> torch.Tensor:
        for block, k, w in zip(self.blocks[:depth], kernels, widths):
            x = block(x, k, w)
        return x

    def extract(self, kernels: Sequence[int], widths: Sequence[float], depth: int) -> Unit:
        return Unit(*(block.extract(k, w) for block, k, w in zip(self.blocks[:depth], kernels, widths)))
