"""Training, evaluation, knowledge distillation and batch-norm re-calibration.

The whole dataset lives on the training device as uint8; each batch is augmented there (``data.augment``)
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

from . import data as data_mod
from . import distributed
from .distributed import World
from .io import atomic_write
from .space import SubnetConfig


SPLITS = ("train", "val", "test")
SYNC_EVERY = 20  # training steps between host reads of the loss (progress bar, divergence check)
REDUCE = ("sum", "mean")  # a step's subnet losses: summed (official OFA) | averaged


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda is not available on this machine (auto or cpu)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


@dataclass
class DeviceData:
    """The three splits resident on the training device (uint8) plus the normalisation of the training split.

    train: training only; val: held out of the training split (curves, search, selection); test: reported
    numbers only.
    """

    train: data_mod.Split
    val: data_mod.Split
    test: data_mod.Split
    mean: torch.Tensor  # (1, C, 1, 1) float
    std: torch.Tensor  # (1, C, 1, 1) float
    device: torch.device

    @classmethod
    def load(cls, prepared_dir: Path, device: torch.device) -> DeviceData:
        train, val, test = (data_mod.load_split(Path(prepared_dir) / f"{name}.pt") for name in SPLITS)
        mean, std = data_mod.channel_stats(train)
        move = lambda s: data_mod.Split(s.images.to(device), s.labels.to(device))  # noqa: E731
        return cls(move(train), move(val), move(test), mean.to(device), std.to(device), device)

    def split(self, name: str) -> data_mod.Split:
        """The split called `name` ('train', 'val' or 'test')."""
        if name not in SPLITS:
            raise ValueError(f"split {name!r} is not allowed ({', '.join(SPLITS)})")
        return getattr(self, name)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float, channels_last (faster for depthwise convs on CPU and GPU)."""
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def calibration_batches(self, images: int, batch_size: int, seed: int) -> list[torch.Tensor]:
        """A fixed random subset of un-augmented training images, in batches, for BN re-calibration."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.train), generator=g)[: min(images, len(self.train))].to(self.device)
        return [self.inputs(self.train.images[idx[i : i + batch_size]]) for i in range(0, len(idx), batch_size)]


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


def _call(model: nn.Module, x: torch.Tensor, cfg: SubnetConfig | None) -> torch.Tensor:
    return model(x) if cfg is None else model(x, cfg)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, data: DeviceData, cfg: SubnetConfig | None = None, batch_size: int = 1000,
             split: str = "test", world: World | None = None) -> float:
    """Top-1 accuracy on a split, 'test' by default (eval mode, restored afterwards).

    In a job of several processes (`world`, default the current one) each rank scores its contiguous share
    of the split and the counts are summed: the same figure as one process scoring it all.
    """
    w = world or distributed.world()
    labels = data.split(split).labels
    lo, hi = len(labels) * w.rank // w.size, len(labels) * (w.rank + 1) // w.size
    images, labels_mine = data.split(split).images[lo:hi], labels[lo:hi]
    training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=data.device)
    try:
        for i in range(0, len(labels_mine), batch_size):
            with _autocast(data.device):
                logits = _call(model, data.inputs(images[i : i + batch_size]), cfg)
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
            with _autocast(x.device):
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


@dataclass
class EpochStats:
    epoch: int
    loss: float
    accuracy: float  # training accuracy of the first sampled config of each step
    lr: float
    images: int
    seconds: float
    logged: dict  # what went to the curves: train/loss, train/accuracy, lr and the epoch_metrics


def _load_state(path: Path | None, key: str) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable resume state is only a lost shortcut
        return None
    return state if isinstance(state, dict) and state.get("key") == key else None


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
    torch's global generator. After each epoch the curves entry (training loss/accuracy, lr, plus
    `epoch_metrics()`) goes to `log`, and with `resume` the whole training state is saved there; a later call
    with the same `resume_key` continues after the last finished epoch and ends exactly where an uninterrupted
    run would. A non-finite loss raises DivergenceError naming the epoch, step and learning rate of its first
    occurrence; it is noted on the device and read back every SYNC_EVERY steps and at each epoch's end, before
    anything is saved or logged.

    In a job of several processes (`world`, default the current one) every rank takes its share of each
    batch of `schedule.batch_size` images and draws the same configs, the gradients are averaged across
    ranks before each update (``distributed.average_gradients``), batch-norm running statistics are
    averaged at each epoch's end, a divergence on any rank stops them all, and rank 0 alone logs and saves.
    With `sync_bn` training-mode batch norm (the teacher's too) normalises with the statistics of the whole
    batch, every rank's share (``distributed.synced_batch_norm``), as one process does.
    """
    w = world or distributed.world()
    loop = _new_loop(model, data, schedule, w, sample=sample, parameters=parameters, teacher=teacher,
                     kd_ratio=kd_ratio, reduce=reduce, seed=seed, desc=desc, progress=progress, sync_bn=sync_bn)
    history = loop.resume(resume, resume_key, log)
    model.train()
    for epoch in range(len(history), schedule.epochs):
        history.append(_train_epoch(loop, epoch, epoch_metrics))
        if log is not None and w.main:
            log(history[-1].logged)
        if resume is not None:
            loop.save(resume, resume_key, history)
    return history


def _new_loop(model: nn.Module, data: DeviceData, schedule: Schedule, w: World, *,
              sample: Callable[[random.Random], Sequence[SubnetConfig | None]],
              parameters: Iterable[nn.Parameter] | None, teacher: nn.Module | None, kd_ratio: float, reduce: str,
              seed: int, desc: str, progress: bool, sync_bn: bool) -> _Loop:
    """Check fit's `reduce`, then set up its optimizer and its training loop (the teacher only when kd_ratio > 0)."""
    if reduce not in REDUCE:
        raise ValueError(f"reduce {reduce!r} is not allowed ({' or '.join(REDUCE)})")
    params, optimizer = _optimizer(model, parameters, schedule)
    return _Loop(model=model, data=data, schedule=schedule, steps=_Steps.plan(len(data.train), schedule, w),
                 params=params, optimizer=optimizer, sample=sample,
                 soft_targets=teacher if teacher is not None and kd_ratio > 0 else None, kd_ratio=kd_ratio,
                 reduce=reduce, desc=desc, show=progress and w.main, world=w, sync_bn=sync_bn, seed=seed)


def _train_epoch(loop: _Loop, epoch: int, epoch_metrics: Callable[[], dict[str, float]] | None) -> EpochStats:
    """Train one epoch; its stats, with the curves entry (training loss/accuracy, lr, then `epoch_metrics()`)."""
    loss_sum, correct, lr, seconds = loop.epoch(epoch)
    steps = loop.steps.per_epoch
    mean_loss = float(loss_sum) / max(1, steps)
    accuracy = int(correct) / max(1, steps * loop.steps.batch)
    logged = {"train/loss": round(mean_loss, 6), "train/accuracy": round(accuracy, 6), "lr": lr}
    if epoch_metrics is not None:
        logged.update(epoch_metrics())
    return EpochStats(epoch + 1, mean_loss, accuracy, lr, steps * loop.steps.batch, seconds, logged)


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
        state = distributed.broadcast(_load_state(path, key) if w.main else None, w)
        if state is None:
            return []
        history = _restore(state, self.model, self.optimizer, self.rng, self.shuffle, self.aug, self.data.device, w)
        if w.main:
            print(f"{self.desc}: resuming after epoch {len(history)}/{self.schedule.epochs} from {path}",
                  file=sys.stderr)
            for h in history:
                if log is not None:
                    log(h.logged)
        return history

    def save(self, path: Path, key: str, history: list[EpochStats]) -> None:
        _save_state(path, self.world, {
            "key": key, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.getstate(), "shuffle": self.shuffle.get_state(), "aug": self.aug.get_state().cpu(),
            "history": [asdict(h) for h in history],
        }, self.data.device)

    def epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """Train one epoch: its summed step losses and first-config hits (every rank's), last lr and seconds."""
        steps, w, device = self.steps, self.world, self.data.device
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
                if self.show:
                    seen = (step + 1) * steps.batch  # this rank's loss and accuracy, every rank's images per second
                    bar.set_postfix(loss=f"{float(loss_sum) / (step + 1):.3f}",
                                    acc=f"{int(correct) / ((step + 1) * steps.local):.3f}", lr=f"{lr:.3g}",
                                    img_s=f"{seen / (time.perf_counter() - start):.0f}", refresh=False)
        bar.close()
        if w.active:  # the epoch's figures over every rank's images; running statistics averaged
            loss_sum, correct = distributed.all_sum_(torch.stack([loss_sum.double() / w.size, correct.double()]), w)
            distributed.average_buffers(self.model, w)
        return loss_sum, correct, lr, time.perf_counter() - start

    def _step(self, idx: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One update on the batch `idx` at `lr`: its mean loss over the sampled configs and the first's hits."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = _batch(self.data, idx, self.schedule, self.aug, self.steps.lo, self.steps.local)
        configs = list(self.sample(self.rng))
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.data.device), distributed.synced_batch_norm(self.sync_bn and self.world.active):
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
        images = data_mod.augment(images, aug, schedule.crop_padding, schedule.flip, rows_of=(lo, len(idx)))
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
        logits = _call(model, x, cfg).float()
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if soft is not None:
            loss = loss + kd_ratio * soft_cross_entropy(logits, soft)
        if loss.requires_grad:  # e.g. only transforms train and this subnet uses none
            (loss if reduce == "sum" else loss / len(configs)).backward()
        step_loss += loss.detach() / len(configs)
        if i == 0:
            correct = (logits.argmax(1) == y).sum()
    return step_loss, correct


def _restore(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, rng: random.Random,
             shuffle: torch.Generator, aug: torch.Generator, device: torch.device, w: World) -> list[EpochStats]:
    """Put a saved training state back (this rank's dropout generator among them); the epochs it had finished."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng.setstate(_tuples(state["rng"]))
    shuffle.set_state(state["shuffle"])
    aug.set_state(state["aug"].to(aug.get_state().device))
    _set_global_rng(state["global_rng"] if not w.active else state["global_rngs"][w.rank], device)
    return [EpochStats(**h) for h in state["history"]]


def _save_state(path: Path, w: World, state: dict, device: torch.device) -> None:
    """Rank 0 writes the training state; dropout's generator (torch's global one) is every rank's own."""
    rngs = distributed.gather(_global_rng(device), w)
    if w.main:
        state["global_rng"] = rngs[0]
        if w.active:
            state["global_rngs"] = rngs
        atomic_write(path, lambda f: torch.save(state, f), binary=True)


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


def _global_rng(device: torch.device) -> torch.Tensor:
    """torch's global generator state on `device` (CPU, or the current CUDA device)."""
    return (torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()).cpu()


def _set_global_rng(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _tuples(x):
    """random.Random state comes back from torch.load with lists where setstate wants tuples."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
