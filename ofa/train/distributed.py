"""Several processes, one stage: torch.distributed (NCCL on CUDA, gloo on CPU): the job's world, its process
group and the collectives every stage uses.

A stage run with ``train.processes: N`` (N > 1) starts N copies of its own script through torch.distributed's
launcher API (``ofa.train.launch``: ``elastic_launch``, what ``torchrun --standalone`` runs), one per
GPU or, on a CPU, one per share of the cores; a script started by ``torchrun`` itself (several machines)
joins the job it describes.
What each stage does with its processes:

- training: every rank takes its share of each global batch (``train.batch_size`` images), every rank draws
  the same subnet configs (one seed), and the gradients are averaged with one all-reduce per step
  (``average_gradients``); batch norm keeps per-rank statistics as official OFA does, or synchronises them
  (``train.sync_bn``: ``ofa.train.sync_bn``); running statistics are averaged at the end of each epoch;
- BN calibration and evaluation deal their images out across ranks and all-reduce the counts;
- evaluate_space and specialize deal their configs out across ranks (``map_ordered``);
- rank 0 alone writes checkpoints, metrics, curves and resume states.

With one process nothing here runs: no process group, no collective, the same bytes as before.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

# torch.distributed.nn.functional binds the default group into its functions' default arguments when it is
# first imported. Imported while a group exists (a torch.optim optimizer imports it, through torch._dynamo),
# it would keep that group alive past destroy_process_group, and gloo's threads would then meet the
# interpreter's shutdown: an occasional SIGABRT ("terminate called without an active exception") of a rank
# whose stage had succeeded. Hence its import here, before any group exists.
if dist.is_available():
    import torch.distributed.nn  # noqa: F401

T = TypeVar("T")
R = TypeVar("R")
ERRORS_ENV = "OFA_ERRORS"  # the folder where the ranks of a launched stage leave their one-line errors
TIMEOUT = timedelta(minutes=30)  # a training collective waiting longer than this fails (a peer hung)
# The object collectives that deal out configs and gather their records wait for a whole config's work on a
# peer (evaluate_space: a fine-tuning of hours on a CPU): they go through a gloo group of their own, this patient.
CONTROL_TIMEOUT = timedelta(days=7)
_control: Any = None  # that group, while this process is in a job (None: the default group)


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank (0 = the one that writes), size (processes in all)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: collectives are needed."""
        return self.size > 1


SINGLE = World()  # a process working alone, also inside a job (a rank fine-tuning its own config)


def world() -> World:
    """The current job's world (SINGLE without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size())


def local_processes() -> int:
    """The processes of this job on this machine (1 outside a job)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if launched() else 1


def launched() -> bool:
    """Whether this process is a worker of a torchrun-style launch (its environment names its rank)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


# --- the process group -----------------------------------------------------------------------------------


@contextmanager
def process_group(device: str) -> Iterator[World]:
    """Join the job this process was launched into (NCCL for CUDA, gloo for CPU); nothing without one.

    `device` is train.device; each CUDA rank takes the GPU of its local rank; each CPU rank takes its share
    of the cores.
    """
    if not launched():
        yield SINGLE
        return
    if os.environ.get(ERRORS_ENV):
        _die_with_parent()
    local_rank, local_size = int(os.environ.get("LOCAL_RANK", 0)), local_processes()
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local_size > gpus:
            raise ValueError(f"train.processes: {local_size} processes on this machine but "
                             f"{f'{gpus} CUDA devices' if gpus else 'no CUDA device'} (at most one process per GPU)")
        torch.cuda.set_device(local_rank)
    else:
        threads, note = cpu_share(local_size)
        torch.set_num_threads(threads)
        if note and local_rank == 0:
            print(f"note: {note}", file=sys.stderr, flush=True)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT,
                            device_id=torch.device("cuda", local_rank) if cuda else None)
    global _control
    _control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    yield world()
    _control = None
    # only after success: a rank that failed exits at once (its peers may be inside a collective, which a
    # tear-down would wait for); the launcher then stops the others
    dist.destroy_process_group()


def cpu_share(local_size: int) -> tuple[int, str | None]:
    """The threads each of `local_size` CPU ranks of this machine takes, and a note when they outnumber its cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    note = None
    if local_size > cores:
        note = (f"train.processes: {local_size} processes share {cores} CPU cores; each gets one thread and "
                f"they run slower than {cores} would")
    return max(1, cores // local_size), note


def _die_with_parent() -> None:
    """Linux: end this worker when the stage process that launched it dies (killed, even by SIGKILL)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the launcher's own shutdown is all there is
        return


def device(name: torch.device) -> torch.device:
    """The device of this rank: its local GPU for CUDA, else `name`."""
    if name.type == "cuda" and dist.is_available() and dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return name


def check_batch(batch_size: int, w: World, epoch_images: bool = False) -> None:
    """ValueError naming train.batch_size when a global batch does not split evenly across the processes.

    epoch_images: the step is an epoch's images, fewer than train.batch_size (a small data.train_limit).
    """
    if batch_size % w.size:
        what = f"{batch_size} images per step" + (" (all of an epoch's, fewer than train.batch_size)" if epoch_images
                                                  else "")
        raise ValueError(f"train.batch_size: {what} do not split evenly across {w.size} processes (a multiple of "
                         f"{w.size}, or another train.processes)")


# --- collectives -----------------------------------------------------------------------------------------


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One float32 vector of all `tensors` (for one collective instead of one per tensor)."""
    return torch.cat([t.reshape(-1).float() for t in tensors])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The pieces of `flat` shaped (and typed) like `like`, in order."""
    offset = 0
    for t in like:
        yield flat[offset : offset + t.numel()].view(t.shape).to(t.dtype)
        offset += t.numel()


def average_gradients(params: Sequence[nn.Parameter], w: World) -> None:
    """Average every parameter's gradient across ranks, in one all-reduce; each rank's missing gradient counts as 0.

    A parameter the step's subnets did not use has no gradient (.grad is None), and the same one on every
    rank, since every rank samples the same configs. Its slot in the buffer goes across as zeros, so the
    all-reduce is always the same size on every rank (nothing to hang on), and it comes back without a
    gradient, so the optimizer skips it exactly as a single process does (no weight decay, no momentum).
    This is what DistributedDataParallel's find_unused_parameters does too (zeros for unused parameters),
    without its search of the autograd graph. Which parameters were used is known on the host, so nothing is
    read back from the device: the step does not wait for the all-reduce to finish.
    """
    if not w.active or not params:
        return
    used = [p.grad is not None for p in params]
    grads = [p.grad if u else torch.zeros_like(p) for p, u in zip(params, used)]
    flat = flatten(grads)
    dist.all_reduce(flat)
    for p, g, u in zip(params, unflatten(flat, grads), used):
        if not u:
            p.grad = None
        elif p.grad is None:
            p.grad = g.div_(w.size)
        else:
            p.grad.copy_(g).div_(w.size)


def average_buffers(model: nn.Module, w: World) -> None:
    """Average the batch-norm running statistics across ranks (each rank's come from its own images)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if not w.active or not bns:
        return
    stats = [t for bn in bns for t in (bn.running_mean, bn.running_var)]
    flat = flatten(stats)
    dist.all_reduce(flat)
    for t, avg in zip(stats, unflatten(flat / w.size, stats)):
        t.copy_(avg)


def all_sum_(t: torch.Tensor, w: World) -> torch.Tensor:
    """Sum a tensor over the ranks, in place; returns it."""
    if w.active:
        dist.all_reduce(t)
    return t


def all_min_(t: torch.Tensor, w: World) -> torch.Tensor:
    """Element-wise minimum over the ranks, in place; returns it."""
    if w.active:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def broadcast(obj: T, w: World) -> T:
    """Rank 0's `obj` on every rank (any picklable object)."""
    if not w.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def gather(obj: T, w: World) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not w.active:
        return [obj]
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj, group=_control)
    return out


def check_same_inputs(key: str, w: World, inputs: str) -> None:
    """ValueError on every rank when some rank's stage inputs are not rank 0's (machines with their own copies).

    `key` digests what the stage computes from (params and the content of its input files, as its resume key
    does); the torch version goes with it (the same seed gives other initial weights in another version).
    `inputs` names those inputs in the message.
    """
    if not w.active:
        return
    import socket

    ranks = gather((key, torch.__version__, socket.gethostname()), w)
    first_key, first_torch, first_host = ranks[0]
    for rank, (k, version, host) in enumerate(ranks):
        where = f"rank {rank} of {w.size} (host {host})"
        if k != first_key:
            raise ValueError(f"{where} has other inputs than rank 0 (host {first_host}): {inputs} must be the same "
                             "on every machine")
        if version != first_torch:
            raise ValueError(f"{where} runs torch {version}, rank 0 torch {first_torch}: install the same on every "
                             "machine")


def map_ordered(fn: Callable[[T], R], items: Sequence[T], w: World) -> list[R]:
    """[fn(x) for x in items], the items dealt out round-robin to the ranks; every rank gets all results, in order.

    Every rank must call it with the same items.
    """
    mine = [fn(x) for x in items[w.rank :: w.size]]
    if not w.active:
        return mine
    per_rank = gather(mine, w)
    return [per_rank[i % w.size][i // w.size] for i in range(len(items))]


def serve(fn: Callable[[T], R], w: World) -> None:
    """A worker rank's side of `lead`: map `fn` over each list rank 0 sends, until rank 0 sends None."""
    while (items := broadcast(None, w)) is not None:
        map_ordered(fn, items, w)


def lead(fn: Callable[[T], R], items: Sequence[T], w: World) -> list[R]:
    """Rank 0's side: map `fn` over `items` on all ranks (they run `serve`), results in order."""
    return map_ordered(fn, broadcast(list(items), w), w)


def dismiss(w: World) -> None:
    """Rank 0 ends the ranks' `serve` loops."""
    broadcast(None, w)
