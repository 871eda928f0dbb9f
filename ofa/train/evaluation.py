"""Evaluation and batch-norm re-calibration of a model, a supernet config or an extracted subnet, on one process or
dealt out across the ranks of a job."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..model import OFANet, Subnet, SubnetConfig, fold_batch_norm
from . import distributed
from .device_data import DeviceData
from .distributed import World


def run_model(model: nn.Module, x: torch.Tensor, cfg: SubnetConfig | None) -> torch.Tensor:
    return model(x) if cfg is None else model(x, cfg)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, data: DeviceData, cfg: SubnetConfig | None = None, batch_size: int = 1000,
             split: str = "test", world: World | None = None) -> float:
    """Top-1 accuracy on a split, 'test' by default (eval mode, restored afterwards).

    An extracted subnet is scored through a copy with its batch norm folded into its convs (``fold_batch_norm``:
    the same logits to float rounding, some 10% faster). In a job of several processes (`world`, default the
    current one) each rank scores its contiguous share of the split and the counts are summed: the same figure
    as one process scoring it all.
    """
    w = world or distributed.world()
    labels = data.split(split).labels
    lo, hi = len(labels) * w.rank // w.size, len(labels) * (w.rank + 1) // w.size
    images, labels_mine = data.split(split).images[lo:hi], labels[lo:hi]
    training = model.training
    model.eval()
    scored = fold_batch_norm(model) if cfg is None and isinstance(model, Subnet) else model
    correct = torch.zeros((), dtype=torch.long, device=data.device)
    try:
        for i in range(0, len(labels_mine), batch_size):
            with autocast(data.device):
                logits = run_model(scored, data.inputs(images[i : i + batch_size]), cfg)
            correct += (logits.argmax(1) == labels_mine[i : i + batch_size]).sum()
    finally:
        model.train(training)
    return int(distributed.all_sum_(correct, w)) / len(labels)


@torch.no_grad()
def calibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], world: World | None = None) -> int:
    """Recompute every BatchNorm's running statistics as the plain average over `batches`; returns images seen.

    Subnets share the supernet's statistics, which fit none of them: re-calibrate before evaluating. In a job
    of several processes (`world`, default the current one) the batches are dealt out round-robin to the
    ranks and each rank's averages are combined weighted by its number of batches: the statistics of one
    process going through them all (to float rounding), on every rank.
    """
    w = world or distributed.world()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(bn.momentum, bn.training) for bn in bns]
    training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: equal weight for every batch
    model.train()
    mine = list(batches)[w.rank :: w.size]
    seen = 0
    try:
        for x in mine:
            with autocast(x.device):
                model(x)
            seen += x.shape[0]
    finally:
        model.train(training)
        for bn, (momentum, bn_training) in zip(bns, saved):
            bn.momentum = momentum
            bn.train(bn_training)
    if w.active:
        seen = _combine_calibration(bns, len(mine), seen, w)
    if seen == 0:
        raise ValueError("calibrate_bn: no batches given (at least one batch of training images is needed)")
    return seen


def _combine_calibration(bns: list[nn.Module], batches: int, seen: int, w: World) -> int:
    """Every rank's BN averages weighted by its batches, summed: the average over all ranks' batches."""
    stats = [t for bn in bns for t in (bn.running_mean, bn.running_var) if t is not None]
    device = stats[0].device if stats else torch.device("cpu")
    flat = torch.cat([distributed.flatten(stats) * batches if stats else torch.zeros(0, device=device),
                      torch.tensor([batches, seen], dtype=torch.float32, device=device)])
    distributed.all_sum_(flat, w)
    total_batches, total_seen = int(flat[-2]), int(flat[-1])
    for t, avg in zip(stats, distributed.unflatten(flat[:-2] / max(1, total_batches), stats)):
        t.copy_(avg)
    for bn in bns:
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(total_batches)
    return total_seen


def subnet_accuracy(net: OFANet, cfg: SubnetConfig, data: DeviceData, calibration: list[torch.Tensor],
                    batch_size: int, split: str = "test") -> float:
    """Accuracy of subnet cfg on a split (test by default): extract, re-calibrate BN, evaluate."""
    sub = net.extract(cfg)
    calibrate_bn(sub, calibration)
    return evaluate(sub, data, batch_size=batch_size, split=split)
