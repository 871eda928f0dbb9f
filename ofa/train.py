"""Training, evaluation and batch-norm re-calibration."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def calibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute every BatchNorm's running statistics as the plain average over `batches`; returns images seen.

    Subnets share the supernet's statistics, which fit none of them: re-calibrate before evaluating.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(bn.momentum, bn.training) for bn in bns]
    training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: equal weight for every batch
    model.train()
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += x.shape[0]
    finally:
        model.train(training)
        for bn, (momentum, bn_training) in zip(bns, saved):
            bn.momentum = momentum
            bn.train(bn_training)
    if seen == 0:
        raise ValueError("calibrate_bn: no batches given (at least one batch of training images is needed)")
    return seen
