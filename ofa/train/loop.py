"""The training loop: SGD on sampled subnet configs, knowledge distillation, divergence guard, resume per epoch.

The whole dataset lives on the training device as uint8; each batch is augmented there (``ofa.data.augment``)
and normalised. One loop serves every phase: a step samples configs (just ``None`` for a plain module,
the max config for the supernet phase, random subnets for the shrink phases), accumulates their
gradients, and adds distillation from a frozen teacher.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data import augment
from ..model import SubnetConfig
from . import distributed, state, sync_bn
from .device_data import DeviceData
from .distributed import World
from .evaluation import autocast, run_model

SYNC_EVERY = 20  # training steps between host reads of the loss (progress bar, divergence check)
REDUCE = ("sum", "mean")  # a step's subnet losses: summed (official OFA) | averaged


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class Schedule:
    """SGD with Nesterov momentum, linear warm-up then cosine decay to zero, label smoothing."""

    epochs: int
    lr: float
    batch_size: int
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 3e-5
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    crop_padding: int = 4
    flip: bool = True
    images_per_epoch: int | None = None  # None: the whole training split

    def lr_at(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        warmup = min(int(self.warmup_epochs * steps_per_epoch), total_steps // 2)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * self.lr * (1 + math.cos(math.pi * progress))


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy against the teacher's probabilities (knowledge distillation, OFA's KD loss)."""
    return torch.sum(-soft_targets * F.log_softmax(logits, dim=1), dim=1).mean()


@dataclass
class EpochStats:
    epoch: int
    loss: float
    accuracy: float  # training accuracy of the first sampled config of each step
    lr: float
    images: int
    seconds: float
    logged: dict  # the epoch's figures: train/loss, train/accuracy, lr and the epoch_metrics
    points: list[dict]  # the curves' points: {"step", "train/loss", "train/accuracy", "lr"} every SYNC_EVERY steps


def fit(
    model: nn.Module,
    data: DeviceData,
    schedule: Schedule,
    *,
    sample: Callable[[random.Random], Sequence[SubnetConfig | None]] = lambda rng: [None],
    parameters: Iterable[nn.Parameter] | None = None,
    teacher: nn.Module | None = None,
    kd_ratio: float = 0.0,
    reduce: str = "sum",
    seed: int = 0,
    desc: str = "train",
    epoch_metrics: Callable[[], dict[str, float]] | None = None,
    log: Callable[[dict[str, float]], None] | None = None,
    resume: Path | None = None,
    resume_key: str = "",
    progress: bool = True,
    world: World | None = None,
    sync_bn: bool = False,
) -> list[EpochStats]:
    """Train `model` for `schedule.epochs`; each step accumulates the gradients of the configs `sample` draws.

    `reduce` combines the configs' losses of a step: "sum" (official OFA) or "mean". `parameters` restricts
    what the optimizer updates (default: all). With a `teacher` and kd_ratio > 0 the loss adds kd_ratio x soft
    cross entropy against the teacher's predictions; the teacher runs in the mode it is given (train mode:
    batch statistics, as in official OFA). Every random draw comes from `seed`, dropout's too: the call seeds
    torch's global generator. With `log`, the curves go there point by point: every SYNC_EVERY steps and at
    each epoch's end, the training loss and accuracy (the first config's) of the steps since the last point, the
    lr and the step (counted over the whole schedule); `epoch_metrics()` joins each epoch's last point. After
    each epoch, with `resume`, the whole training state is saved there; a later call with the same
    `resume_key` continues after the last finished epoch (its points replayed to `log`) and ends exactly where
    an uninterrupted run would. A non-finite loss raises DivergenceError naming the epoch, step and learning rate of its first
    occurrence; it is noted on the device and read back every SYNC_EVERY steps and at each epoch's end, before
    anything is saved or logged.

    In a job of several processes (`world`, default the current one) every rank takes its share of each
    batch of `schedule.batch_size` images and draws the same configs, the gradients are averaged across
    ranks before each update (``distributed.average_gradients``), batch-norm running statistics are
    averaged at each epoch's end, a divergence on any rank stops them all, and rank 0 alone logs and saves.
    With `sync_bn` training-mode batch norm (the teacher's too) normalises with the statistics of the whole
    batch, every rank's share (``sync_bn.synced_batch_norm``), as one process does.
    """
    w = world or distributed.world()
    loop = _new_loop(model, data, schedule, w, sample=sample, parameters=parameters, teacher=teacher,
                     kd_ratio=kd_ratio, reduce=reduce, seed=seed, desc=desc, progress=progress, sync_bn=sync_bn,
                     curves=log is not None)
    history = loop.resume(resume, resume_key, log)
    model.train()
    for epoch in range(len(history), schedule.epochs):
        history.append(_train_epoch(loop, epoch, epoch_metrics))
        if log is not None and w.main:
            for point in history[-1].points:
                log(point)
        if resume is not None:
            loop.save(resume, resume_key, history)
    return history


def _new_loop(model: nn.Module, data: DeviceData, schedule: Schedule, w: World, *,
              sample: Callable[[random.Random], Sequence[SubnetConfig | None]],
              parameters: Iterable[nn.Parameter] | None, teacher: nn.Module | None, kd_ratio: float, reduce: str,
              seed: int, desc: str, progress: bool, sync_bn: bool, curves: bool) -> _Loop:
    """Check fit's `reduce`, then set up its optimizer and its training loop (the teacher only when kd_ratio > 0)."""
    if reduce not in REDUCE:
        raise ValueError(f"reduce {reduce!r} is not allowed ({' or '.join(REDUCE)})")
    params, optimizer = _optimizer(model, parameters, schedule)
    return _Loop(model=model, data=data, schedule=schedule, steps=_Steps.plan(len(data.train), schedule, w),
                 params=params, optimizer=optimizer, sample=sample,
                 soft_targets=teacher if teacher is not None and kd_ratio > 0 else None, kd_ratio=kd_ratio,
                 reduce=reduce, desc=desc, show=progress and w.main, curves=curves and w.main, world=w,
                 sync_bn=sync_bn, seed=seed)


def _train_epoch(loop: _Loop, epoch: int, epoch_metrics: Callable[[], dict[str, float]] | None) -> EpochStats:
    """Train one epoch; its stats (training loss/accuracy, lr, then `epoch_metrics()`, also on its last point)."""
    loss_sum, correct, lr, seconds, points = loop.epoch(epoch)
    steps = loop.steps.per_epoch
    mean_loss = float(loss_sum) / max(1, steps)
    accuracy = int(correct) / max(1, steps * loop.steps.batch)
    logged = {"train/loss": round(mean_loss, 6), "train/accuracy": round(accuracy, 6), "lr": lr}
    if epoch_metrics is not None:
        figures = epoch_metrics()
        logged.update(figures)
        if points:
            points[-1].update(figures)
    return EpochStats(epoch + 1, mean_loss, accuracy, lr, steps * loop.steps.batch, seconds, logged, points)


def _optimizer(model: nn.Module, parameters: Iterable[nn.Parameter] | None,
               schedule: Schedule) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
    """The parameters that train (`parameters`, default all: the rest get no gradient at all) and their SGD."""
    if parameters is not None:
        chosen = {id(p) for p in parameters}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # BN and biases: no weight decay
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": schedule.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=schedule.lr, momentum=schedule.momentum, nesterov=schedule.nesterov and schedule.momentum > 0,
    )
    return params, optimizer


@dataclass(frozen=True)
class _Steps:
    """How a schedule's epochs divide into steps, and this rank's share of each step's batch."""

    images: int  # training images, drawn from in a new order each epoch
    batch: int  # images per step, every rank's together
    local: int  # this rank's share of a batch: its images [lo, lo + local)
    lo: int
    per_epoch: int  # steps per epoch
    total: int  # steps of the whole schedule

    @classmethod
    def plan(cls, images: int, schedule: Schedule, w: World) -> _Steps:
        per_epoch = min(images, schedule.images_per_epoch or images)
        batch = min(schedule.batch_size, per_epoch)
        distributed.check_batch(batch, w, epoch_images=batch < schedule.batch_size)
        local = batch // w.size
        return cls(images, batch, local, w.rank * local, per_epoch // batch, per_epoch // batch * schedule.epochs)


@dataclass
class _Loop:
    """One fit call's training: its parts, its generators (seeded from `seed`), an epoch of steps, resume states."""

    model: nn.Module
    data: DeviceData
    schedule: Schedule
    steps: _Steps
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    sample: Callable[[random.Random], Sequence[SubnetConfig | None]]
    soft_targets: nn.Module | None  # the teacher, when distillation is on
    kd_ratio: float
    reduce: str
    desc: str
    show: bool  # the progress bar: rank 0's only
    curves: bool  # the curves' points: rank 0's only, when fit logs them
    world: World
    sync_bn: bool
    seed: int

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.shuffle = torch.Generator().manual_seed(self.seed)
        self.aug = torch.Generator(device=self.data.device).manual_seed(self.seed + 1)
        # dropout draws from torch's global generator: seeded per call, like the rest, and per rank (other images)
        torch.manual_seed(self.seed + 2 + 1_000_003 * self.world.rank)

    def lr(self, epoch: int, step: int) -> float:
        return self.schedule.lr_at(epoch * self.steps.per_epoch + step, self.steps.total, self.steps.per_epoch)

    def resume(self, path: Path | None, key: str, log: Callable[[dict[str, float]], None] | None) -> list[EpochStats]:
        """The epochs a saved state under `key` had finished, put back (and replayed to `log`); none without one."""
        w = self.world
        saved = distributed.broadcast(state.load(path, key) if w.main else None, w)
        if saved is None:
            return []
        finished = state.restore(saved, self.model, self.optimizer, self.rng, self.shuffle, self.aug,
                                 self.data.device, w)
        history = [EpochStats(**h) for h in finished]
        if w.main:
            print(f"{self.desc}: resuming after epoch {len(history)}/{self.schedule.epochs} from {path}",
                  file=sys.stderr)
            for h in history:
                for point in h.points if log is not None else ():
                    log(point)
        return history

    def save(self, path: Path, key: str, history: list[EpochStats]) -> None:
        state.save(path, self.world, {
            "key": key, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.getstate(), "shuffle": self.shuffle.get_state(), "aug": self.aug.get_state().cpu(),
            "history": [asdict(h) for h in history],
        }, self.data.device)

    def epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, float, float, list[dict]]:
        """Train one epoch: its summed step losses and first-config hits (every rank's), last lr, seconds and the
        curves' points (this rank's images; none unless `curves`)."""
        steps, w, device = self.steps, self.world, self.data.device
        points: list[dict] = []
        last = (0, 0.0, 0)  # steps, summed loss and hits at the last point
        order = torch.randperm(steps.images, generator=self.shuffle)[: steps.per_epoch * steps.batch].to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        guard = _DivergenceGuard(self.desc, device, w)
        start = time.perf_counter()
        bar = tqdm(range(steps.per_epoch), desc=f"{self.desc} {epoch + 1}/{self.schedule.epochs}",
                   disable=not self.show, file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0,
                   leave=True)
        for step in bar:
            lr = self.lr(epoch, step)
            step_loss, step_correct = self._step(order[step * steps.batch : (step + 1) * steps.batch], lr)
            correct += step_correct
            guard.record(step_loss, step)
            loss_sum += step_loss
            if step % SYNC_EVERY == 0 or step == steps.per_epoch - 1:  # the only host reads of the loop
                guard.check(lambda s: f"epoch {epoch + 1} step {s + 1} (lr {self.lr(epoch, s):.4g})")  # noqa: B023
                if self.curves or self.show:  # one read of the running sums serves both
                    now = (step + 1, float(loss_sum), int(correct))
                if self.curves:
                    n = now[0] - last[0]
                    points.append({"step": epoch * steps.per_epoch + now[0],
                                   "train/loss": round((now[1] - last[1]) / n, 6),
                                   "train/accuracy": round((now[2] - last[2]) / (n * steps.local), 6), "lr": lr})
                    last = now
                if self.show:
                    seen = (step + 1) * steps.batch  # this rank's loss and accuracy, every rank's images per second
                    bar.set_postfix(loss=f"{now[1] / now[0]:.3f}", acc=f"{now[2] / (now[0] * steps.local):.3f}",
                                    lr=f"{lr:.3g}", img_s=f"{seen / (time.perf_counter() - start):.0f}",
                                    refresh=False)
        bar.close()
        if w.active:  # the epoch's figures over every rank's images; running statistics averaged
            loss_sum, correct = distributed.all_sum_(torch.stack([loss_sum.double() / w.size, correct.double()]), w)
            distributed.average_buffers(self.model, w)
        return loss_sum, correct, lr, time.perf_counter() - start, points

    def _step(self, idx: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One update on the batch `idx` at `lr`: its mean loss over the sampled configs and the first's hits."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = _batch(self.data, idx, self.schedule, self.aug, self.steps.lo, self.steps.local)
        configs = list(self.sample(self.rng))
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.data.device), sync_bn.synced_batch_norm(self.sync_bn and self.world.active):
            step_loss, correct = _backward(self.model, x, y, configs, self.soft_targets, self.kd_ratio,
                                           self.schedule.label_smoothing, self.reduce)
        distributed.average_gradients(self.params, self.world)
        self.optimizer.step()
        return step_loss, correct


def _batch(data: DeviceData, idx: torch.Tensor, schedule: Schedule, aug: torch.Generator, lo: int,
           local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's inputs and labels of a batch: images [lo, lo + local) of it, augmented as in the whole batch."""
    mine = idx[lo : lo + local]
    images = data.train.images[mine]
    if schedule.crop_padding or schedule.flip:  # drawn for the whole batch: the same draws at any world size
        images = augment(images, aug, schedule.crop_padding, schedule.flip, rows_of=(lo, len(idx)))
    return data.inputs(images), data.train.labels[mine]


def _backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, configs: Sequence[SubnetConfig | None],
              teacher: nn.Module | None, kd_ratio: float, label_smoothing: float,
              reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the gradients of every config's loss (plus distillation); their mean loss and the first's hits."""
    soft = None
    if teacher is not None:
        with torch.no_grad():
            soft = F.softmax(teacher(x).float(), dim=1)
    step_loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for i, cfg in enumerate(configs):
        logits = run_model(model, x, cfg).float()
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if soft is not None:
            loss = loss + kd_ratio * soft_cross_entropy(logits, soft)
        if loss.requires_grad:  # e.g. only transforms train and this subnet uses none
            (loss if reduce == "sum" else loss / len(configs)).backward()
        step_loss += loss.detach() / len(configs)
        if i == 0:
            correct = (logits.argmax(1) == y).sum()
    return step_loss, correct


class _DivergenceGuard:
    """Notes the first non-finite step loss on the device, without waiting for it; `check` reads it back.

    Reading a loss on the host stalls a GPU until the step is done, so the loop records on the device and
    checks every SYNC_EVERY steps and at the end of each epoch: always before anything is saved or
    evaluated, so a non-finite update never reaches a checkpoint, a resume state or the curves.
    """

    def __init__(self, desc: str, device: torch.device, world: World = distributed.SINGLE) -> None:
        self.desc, self.world = desc, world
        self.step = torch.full((), -1, dtype=torch.long, device=device)  # the first bad step, -1 while none
        self.loss = torch.zeros((), device=device)

    def record(self, loss: torch.Tensor, step: int) -> None:
        first = (self.step < 0) & ~torch.isfinite(loss)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss, self.loss)

    def check(self, where: Callable[[int], str]) -> None:
        """DivergenceError naming `where(step)` of the first bad step on any rank, if there was one (on every rank)."""
        if self.world.active:  # the earliest bad step of all ranks, and its loss: every rank stops together
            never = torch.iinfo(torch.long).max
            first = distributed.all_min_(torch.where(self.step < 0, never, self.step), self.world)
            loss = torch.where(self.step == first, self.loss, torch.zeros_like(self.loss))
            mine = (self.step == first).float()
            both = distributed.all_sum_(torch.stack([loss.float(), mine]), self.world)
            if int(first) == never:
                return
            self.step, self.loss = first, both[0] / both[1].clamp_min(1)
        step = int(self.step)
        if step >= 0:
            raise DivergenceError(f"{self.desc}: loss is {float(self.loss)} at {where(step)}; lower the learning rate")


