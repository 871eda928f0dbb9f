"""Batch norm over the whole batch of a job: training-mode batch statistics summed across ranks (``train.sync_bn``),
the same normalisation as one process with the whole batch."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks whose gradient is the sum over the ranks too (every rank's loss used the sum)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # noqa: D102
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def batch_norm_over_ranks(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                          weight: torch.Tensor | None, bias: torch.Tensor | None, momentum: float | None,
                          eps: float) -> torch.Tensor:
    """Training-mode batch norm with the statistics of every rank's share of the batch: one all-reduce.

    The per-channel sums and sums of squares of each rank's (B/N, C, H, W) share (less the running mean,
    for precision) are summed across ranks,
    so every rank normalises with the statistics of all B images, as one process with the whole batch does,
    and the gradient flows back through the sum to every rank's share. Plain tensor ops: it runs on gloo
    (CPU) as on NCCL, and on the sliced channels of an elastic batch norm (torch's SyncBatchNorm module is
    CUDA-only and would replace the supernet's modules).
    """
    c = x.shape[1]
    xf = x.float()
    # sums of x - shift, with the same shift on every rank: the running mean (every rank updates it alike),
    # close to the batch's, so the variance is no small difference of two large float32 sums
    shift = (running_mean.detach().float() if running_mean is not None else xf.new_zeros(c))[None, :, None, None]
    d = xf - shift
    count = torch.full((1,), xf.numel() // c, dtype=torch.float32, device=x.device)
    stats = _AllReduceSum.apply(torch.cat([d.sum((0, 2, 3)), (d * d).sum((0, 2, 3)), count]))
    n = stats[-1]
    mean_d = stats[:c] / n
    mean = shift.flatten() + mean_d
    var = (stats[c : 2 * c] / n - mean_d * mean_d).clamp_min(0)  # biased, as batch norm normalises
    if running_mean is not None and running_var is not None:
        m = 0.1 if momentum is None else momentum
        with torch.no_grad():  # running statistics may be views of an elastic layer's full buffers: write through
            running_mean.mul_(1 - m).add_(mean, alpha=m)
            running_var.mul_(1 - m).add_(var * n / (n - 1).clamp_min(1), alpha=m)
    scale = torch.rsqrt(var + eps) if weight is None else weight * torch.rsqrt(var + eps)
    shift = -mean * scale if bias is None else bias - mean * scale
    return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


def _batch_norm_args(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                     eps=1e-5):
    return input, running_mean, running_var, weight, bias, training, momentum, eps


class _OverRanks(TorchFunctionMode):
    """Every training-mode F.batch_norm call (plain and elastic layers alike) becomes batch_norm_over_ranks."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            x, mean, var, weight, bias, training, momentum, eps = _batch_norm_args(*args, **kwargs)
            if training:
                return batch_norm_over_ranks(x, mean, var, weight, bias, momentum, eps)
        return func(*args, **kwargs)


def synced_batch_norm(enabled: bool = True):
    """A context in which training-mode batch norm uses the whole batch across ranks (``train.sync_bn``)."""
    return _OverRanks() if enabled else nullcontext()
