"""The progressive-shrinking recipe: what each training stage trains, in which phases, on which optimiser schedule,
against which teacher.

A translation of the official OFA schedule (train_ofa_net.py, progressive_shrinking.py) with every
difference a param: ``shrink.<stage>.subnets_per_step`` or, for all three, ``shrink.subnets_per_step``
(official: 1 / 2 / 4 for kernel / depth / width),
``shrink.reduce`` (official: the subnets' losses of a step are summed), a first phase on all but the smallest
choice of the stage's dimension when it has 3+ choices (``shrink.<depth|width>.first_phase``; official: 25
epochs at a third of the second phase's rate), the width stage's channel sort before each phase (before the
second one protecting the widths the first trained), and the teacher (``shrink.teacher``: the full network
of train_supernet, official, or the previous stage's max network; ``shrink.teacher_bn``: batch statistics,
official, or running statistics after re-calibration).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..model import ConfigSpace, OFANet
from ..train import Schedule, calibrate_bn
from .checkpoint import build_net, load_checkpoint
from .config import Params, PhaseParams

# stage -> which dimensions it samples (train_supernet trains the max config only)
SAMPLED: dict[str, dict[str, bool]] = {
    "shrink_kernel": {"kernel": True, "depth": False, "width": False},
    "shrink_depth": {"kernel": True, "depth": True, "width": False},
    "shrink_width": {"kernel": True, "depth": True, "width": True},
}


@dataclass(frozen=True)
class Phase:
    """One training phase of a stage: its epochs and lr, the space its subnets are drawn from, and the suffix of
    its resume state; for the width stage, the widths whose channels the sort before it keeps in place; its own
    warm-up, or None for train.warmup_epochs."""

    schedule: PhaseParams
    space: ConfigSpace | None  # None: the max config only
    subnets_per_step: int = 1
    suffix: str = ""
    protect: tuple[float, ...] = ()
    warmup_epochs: float | None = None
    sandwich: bool = False

    def sampler(self, net: OFANet, stage: str):
        """rng -> the configs of one step: `subnets_per_step` drawn from the phase's space; with `sandwich` and 2+
        subnets per step, the first two are the space's largest and smallest configs (the smallest choice of each
        dimension the stage samples, the largest of the others), the rest drawn."""
        if self.space is None:
            return lambda rng: [net.max_config()]
        space, dims, n = self.space, SAMPLED[stage], self.subnets_per_step
        draw = lambda rng: space.sample(net.num_units, rng, **dims)  # noqa: E731
        if not self.sandwich or n < 2:
            return lambda rng: [draw(rng) for _ in range(n)]
        end = lambda dim: getattr(space, dim)[0 if dims[dim] else -1]  # noqa: E731
        ends = [space.max_config(net.num_units), space.uniform(net.num_units, end("kernel"), end("depth"), end("width"))]
        return lambda rng: ends + [draw(rng) for _ in range(n - 2)]


def phases(params: Params, stage: str, space: ConfigSpace) -> list[Phase]:
    """The phases of a training stage, in order."""
    if stage == "train_supernet":
        return [Phase(params.supernet, None)]
    sandwich = params.shrink.sample == "sandwich"
    if stage == "shrink_kernel":
        return [Phase(params.shrink.kernel, space, params.shrink.subnets("kernel"), sandwich=sandwich)]
    dim = stage.removeprefix("shrink_")
    p = getattr(params.shrink, dim)
    choices = getattr(space, dim)
    n = params.shrink.subnets(dim)
    main = Phase(p, space, n, sandwich=sandwich)
    if len(choices) < 3 or p.first_phase.epochs == 0:
        return [main]
    larger = dataclasses.replace(space, **{dim: choices[1:]})
    f = p.first_phase
    first = Phase(PhaseParams(f.epochs, f.lr, p.images_per_epoch), larger, n, ".phase1",
                  warmup_epochs=f.warmup_epochs, sandwich=sandwich)
    if dim == "width":  # the second phase's sort keeps the first phase's widths on their channels
        main = Phase(p, space, n, protect=tuple(choices[1:]), sandwich=sandwich)
    return [first, main]


def teacher(params: Params, net: OFANet, full: Path, calibration: list[torch.Tensor],
            input_shape: tuple[int, int, int]) -> nn.Module | None:
    """The frozen network a shrink stage distils from, in the BN mode it runs in (None without distillation).

    `net` holds the previous stage's weights; `full` is train_supernet's checkpoint.
    """
    s = params.shrink
    if s.kd_ratio == 0:
        return None
    source = net
    if s.teacher == "full":
        source = build_net(params, input_shape, net.arch["classes"])
        load_checkpoint(source, full)
    return frozen_max(source, next(net.parameters()).device, calibration if s.teacher_bn == "eval" else None)


def frozen_max(source: OFANet, device: torch.device, calibration: list[torch.Tensor] | None = None) -> nn.Module:
    """`source`'s max network as a frozen teacher on `device`: batch statistics in its BN (official OFA), or
    running statistics re-calibrated on `calibration` when given."""
    # in the memory format the stages train in: a network rebuilt from the checkpoint is not yet
    model = source.extract(source.max_config()).to(device, memory_format=torch.channels_last)
    model.dropout = None  # official OFA builds its teacher with dropout_rate=0, also in train mode
    if calibration is not None:
        calibrate_bn(model, calibration)  # running statistics that fit the max network
    return model.requires_grad_(False).train(calibration is None)


def schedule(params: Params, phase: PhaseParams, warmup_epochs: float | None = None) -> Schedule:
    """The optimiser schedule of a phase: its epochs, lr and images per epoch, the rest from train (warm-up unless
    given)."""
    t = params.train
    warmup = t.warmup_epochs if warmup_epochs is None else warmup_epochs
    return Schedule(epochs=phase.epochs, lr=phase.lr, batch_size=t.batch_size, momentum=t.momentum,
                    nesterov=t.nesterov, weight_decay=t.weight_decay, warmup_epochs=warmup,
                    label_smoothing=t.label_smoothing, crop_padding=t.crop_padding, flip=t.flip,
                    images_per_epoch=phase.images_per_epoch)
