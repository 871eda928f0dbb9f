"""The training stages: train_supernet, then shrink_kernel, shrink_depth and shrink_width (progressive shrinking).

Each loads the previous stage's supernet, trains its phases (``recipe``) and writes its checkpoint, curves
and metrics. After every epoch the training state goes to .resume/<stage>[.phase1].pt (outside DVC's
outputs); rerunning an interrupted stage with the same params and inputs continues from there. With several
processes every rank trains (``ofa.train.distributed``) and rank 0 alone writes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..io import write_json
from ..model import OFANet
from ..train import EpochStats, fit, subnet_accuracy
from . import figures, recipe
from .checkpoint import save_checkpoint
from .config import Params
from .context import METRICS, MODELS, RESUME, TRAINING_STAGES, StageContext


def train_stage(params: Params, stage: str, root: Path = Path("."), progress: bool = True) -> dict[str, Any]:
    """Run one training stage: load the previous stage's supernet, train its phases, save checkpoint, curves, metrics.

    What each stage trains, in which phases and against which teacher is ``ofa.pipeline.recipe``. Resume
    states are removed once the outputs are written.
    """
    ctx = StageContext.open(params, root, stage)
    previous = TRAINING_STAGES[stage]
    if previous is not None:
        ctx.load(previous)
        if params.shrink.kd_ratio > 0 and params.shrink.teacher == "full":
            ctx.depend_on(root / MODELS / "train_supernet.pt")
    key = ctx.key()  # before any collective: a rank with other inputs is named
    teacher = None if previous is None else recipe.teacher(
        params, ctx.net, root / MODELS / "train_supernet.pt", ctx.calibration, ctx.data.input_shape)
    curves = _Curves(root, stage, ctx.world.main)
    history, states = _train_phases(ctx, teacher, key, curves, progress)
    metrics = _stage_metrics(ctx, history, shrink=previous is not None)
    train_s = sum(h.seconds for h in history)
    timing = ctx.timing(epochs=len(history), train_s=round(train_s, 1),
                        images_per_s=round(sum(h.images for h in history) / train_s, 1) if train_s else None)
    if ctx.world.main:
        save_checkpoint(ctx.net, root / MODELS / f"{stage}.pt")
        write_json(root / METRICS / f"{stage}.json", metrics)
        ctx.write_timing(timing)
        curves.publish()
        for state in states:
            state.unlink(missing_ok=True)
    return {**metrics, **timing}


def _trained_parameters(params: Params, stage: str, net: OFANet) -> list[torch.nn.Parameter] | None:
    """The parameters a training stage updates: the kernel transforms alone when shrink.kernel.transforms_only
    says so, else None (all)."""
    if stage == "shrink_kernel" and params.shrink.kernel.transforms_only:
        return [p for name, p in net.named_parameters() if ".transforms." in name]
    return None


def _train_phases(ctx: StageContext, teacher: torch.nn.Module | None, key: str, curves: _Curves,
                  progress: bool) -> tuple[list[EpochStats], list[Path]]:
    """Train a stage's phases in order (``recipe``); the epochs' stats of all of them, and their resume states."""
    params, stage, net = ctx.params, ctx.stage, ctx.net
    eval_bs = params.train.eval_batch_size
    parameters = _trained_parameters(params, stage, net)
    history, states = [], []
    for phase in recipe.phases(params, stage, net.space):
        curves.next_phase()
        if stage == "shrink_width":
            net.sort_channels(phase.protect)  # before each phase: narrower widths take the most important channels
        states.append(ctx.resume_path(f"{stage}{phase.suffix}.pt"))
        plan = recipe.schedule(params, phase.schedule, warmup_epochs=phase.warmup_epochs)
        history += fit(
            net, ctx.data, plan, sample=phase.sampler(net, stage), parameters=parameters,
            teacher=teacher, kd_ratio=params.shrink.kd_ratio if teacher is not None else 0.0,
            reduce=params.shrink.reduce, seed=params.seed * 1000 + ctx.index + (50 if phase.suffix else 0),
            desc=stage + phase.suffix, log=curves.log, resume=states[-1], resume_key=key + phase.suffix,
            progress=progress, sync_bn=params.train.sync_bn,
            epoch_metrics=lambda: {
                "val/accuracy_max": subnet_accuracy(net, net.max_config(), ctx.data, ctx.calibration, eval_bs, "val")},
        )
    return history, states


def _stage_metrics(ctx: StageContext, history: list[EpochStats], shrink: bool) -> dict[str, Any]:
    """The max config's test and val accuracy (and the min config's for a shrink stage), the final training loss."""
    net, data, calibration, eval_bs = ctx.net, ctx.data, ctx.calibration, ctx.params.train.eval_batch_size
    val = history[-1].logged["val/accuracy_max"] if history else None  # the final weights' accuracy
    metrics: dict[str, Any] = {
        "accuracy_max": subnet_accuracy(net, net.max_config(), data, calibration, eval_bs),
        "val_accuracy_max": val if val is not None else subnet_accuracy(
            net, net.max_config(), data, calibration, eval_bs, "val"),
    }
    if shrink:
        metrics["accuracy_min"] = subnet_accuracy(net, net.min_config(), data, calibration, eval_bs)
    metrics["train_loss"] = round(history[-1].loss, 6) if history else None
    return metrics


class _Curves:
    """A stage's curves (DVCLive, rank 0 only), a point every few steps, and their figure (curves.png): written
    beside the resume state while the stage runs, moved to metrics/live/<stage> when it succeeds, so a failed
    stage leaves none in its outputs."""

    def __init__(self, root: Path, stage: str, main: bool) -> None:
        self.stage, self.dir, self.final = stage, root / RESUME / "live" / stage, root / METRICS / "live" / stage
        self.live, self.points = None, []
        self.offset = 0  # the steps of the stage's earlier phases: a phase's curve goes on where the last one ended
        if main:
            from dvclive import Live

            shutil.rmtree(self.dir, ignore_errors=True)
            self.live = Live(dir=str(self.dir), save_dvc_exp=False, dvcyaml=None)

    def next_phase(self) -> None:
        self.offset = self.points[-1]["step"] if self.points else 0

    def log(self, point: dict[str, float]) -> None:  # rank 0 only (fit logs nowhere else)
        point = {**point, "step": self.offset + point["step"]}
        self.points.append(point)
        self.live.step = point["step"]
        for name, value in point.items():
            if name != "step":
                self.live.log_metric(name, value)

    def publish(self) -> None:
        self.live.end()
        self.dir.mkdir(parents=True, exist_ok=True)  # DVCLive writes nothing when there are no epochs
        figures.training_curves(self.points, self.stage, self.dir / "curves.png")
        shutil.rmtree(self.final, ignore_errors=True)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.dir.rename(self.final)
