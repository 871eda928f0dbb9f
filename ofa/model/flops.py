"""MACs and parameter counts of extracted subnets (calflops).

Count the extracted ``Subnet``, never the supernet: on the supernet calflops would also count the kernel
transform matmuls and the full-size weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulate operations of one forward pass of `model` on an input of `input_shape` (calflops)."""
    from calflops import calculate_flops  # imports transformers: slow, so only when needed

    training = model.training
    try:
        with torch.no_grad():
            _, macs, _ = calculate_flops(
                model=model, input_shape=tuple(input_shape), print_results=False,
                print_detailed=False, output_as_string=False,
            )
    finally:
        model.train(training)
    return int(macs)


def count_params(model: nn.Module) -> int:
    """Number of parameters of `model`."""
    return sum(p.numel() for p in model.parameters())
