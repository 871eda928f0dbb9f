"""Several processes, one stage: torch.distributed (NCCL on CUDA, gloo on CPU), launched by torchrun's engine.

A stage run with ``train.processes: N`` (N > 1) starts N copies of its own script through torch.distributed's
launcher API (``elastic_launch``, what ``torchrun --standalone`` runs), one per GPU or, on a CPU, one per
share of the cores; a script started by ``torchrun`` itself (several machines) joins the job it describes.
What each stage does with its processes:

- training: every rank takes its share of each global batch (``train.batch_size`` images), every rank draws
  the same subnet configs (one seed), and the gradients are averaged with one all-reduce per step
  (``average_gradients``); batch norm keeps per-rank statistics as official OFA does, or synchronises them
  (``train.sync_bn``); running statistics are averaged at the end of each epoch;
- BN calibration and evaluation deal their images out across ranks and all-reduce the counts;
- evaluate_space and specialize deal their configs out across ranks (``map_ordered``);
- rank 0 alone writes checkpoints, metrics, curves and resume states.

With one process nothing here runs: no process group, no collective, the same bytes as before.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

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


# --- launching -------------------------------------------------------------------------------------------


def launch(processes: int, script: str, args: Sequence[str] = ()) -> int:
    """Run `script` as `processes` workers on this machine (torchrun --standalone); the stage's exit status.

    A worker's user error (a bad param, a divergence, ...) reaches the console as the one line of the lowest
    failing rank; a worker that dies (killed, out of memory) ends every other worker within a fraction of a
    second (the launcher's monitor), and the stage fails naming it.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its own report would bury ours
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=0.1, local_addr="127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="ofa-errors-") as errors:
        os.environ[ERRORS_ENV] = errors
        try:
            elastic_launch(config, entrypoint=sys.executable)(script, *args)
            return 0
        except ChildFailedError as e:
            rank = _cause(Path(errors), e.failures)
            message = failure_message(Path(errors), rank, e.failures[rank].exitcode, processes)
            newline = "" if _reported(Path(errors), rank) else "\n"  # a dead rank's progress bar was cut short
            print(f"{newline}error: {message}", file=sys.stderr)
            code = e.failures[rank].exitcode
            return code if code > 0 else 1
        except (KeyboardInterrupt, SignalException) as e:  # Ctrl-C, or a kill of the launcher: it ends the workers
            sig = signal.Signals(getattr(e, "sigval", signal.SIGINT))
            print(f"\nerror: {interrupted(sig)}", file=sys.stderr)
            return 128 + sig
        finally:
            os.environ.pop(ERRORS_ENV, None)


def interrupted(sig: signal.Signals = signal.SIGINT) -> str:
    """The one line of a stage stopped by a signal."""
    return f"stopped by {sig.name}; rerun the stage to resume where it stopped"


def _reported(errors: Path, rank: int) -> bool:
    return (errors / f"rank{rank}.json").is_file()


def _cause(errors: Path, failures: dict[int, Any]) -> int:
    """The failed rank to report: the lowest that reported its own error; else the lowest killed by a signal
    other than the SIGTERM with which the launcher ends the survivors (a rank killed outright is the cause, a
    peer that then exited on its broken connection the consequence); else the lowest that exited on its own."""
    def order(r: int) -> tuple[bool, bool, bool, int]:
        code = failures[r].exitcode
        return not _reported(errors, r), code == -signal.SIGTERM, code > 0, r

    return min(failures, key=order)


def failure_message(errors: Path, rank: int, exitcode: int, processes: int) -> str:
    """A rank's own error line, or how it died."""
    if _reported(errors, rank):
        return json.loads((errors / f"rank{rank}.json").read_text())["message"]
    how = f"was killed by {signal.Signals(-exitcode).name}" if exitcode < 0 else f"exited with status {exitcode}"
    return f"rank {rank} of {processes} {how}; the other ranks were stopped (rerun the stage to resume it)"


def report_error(message: str) -> None:
    """A worker's one-line error: to the launcher's folder when there is one, else to stderr (rank-prefixed)."""
    rank = int(os.environ.get("RANK", 0)) if launched() else 0
    folder = os.environ.get(ERRORS_ENV)
    if folder and Path(folder).is_dir():  # renamed into place: the launcher never reads half a file
        part = Path(folder) / f"rank{rank}.json.part"
        part.write_text(json.dumps({"message": message}))
        os.replace(part, part.with_suffix(""))
    else:
        print(f"error: {message}" if rank == 0 else f"error (rank {rank}): {message}", file=sys.stderr)


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


# --- batch norm over the whole batch ---------------------------------------------------------------------


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
