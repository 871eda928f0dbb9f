"""A stage script's process: read params.yaml, start the stage's workers when it runs as several, run it, and end
with an exit status that says what went wrong (a mistake in params or data, a failed write, a bug)."""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, NoReturn

import torch

from ..data import DataError
from ..deploy import ExportError
from ..train import DivergenceError, distributed, launch
from .checkpoint import CheckpointError
from .config import Params, ParamsError, load_params


def main(stage: Callable[[Params], Any], parallel: bool = True) -> None:
    """Run a stage script: load params.yaml, run, print the result; a failure the user can act on is one line.

    Exit status 2 for a mistake in params or data (a bad value, a checkpoint of other params, a divergence),
    1 for a failed write or exhausted memory, 130 for Ctrl-C; any other exception is a bug and shows its
    traceback. With train.processes > 1 the script starts that many copies of itself
    (``ofa.train.launch``) and waits for them; a copy started so, or by torchrun, joins its job
    (``ofa.train.distributed.process_group``). A stage with nothing to divide among processes (download) passes
    ``parallel=False``: it runs as this one process whatever train.processes says.
    """
    try:
        params = load_params("params.yaml")
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        _exit(2)
    if parallel and params.train.processes > 1 and not distributed.launched():
        _exit(launch.launch(params.train.processes, sys.argv[0], sys.argv[1:]))
    group = distributed.process_group(params.train.device) if parallel else nullcontext(distributed.SINGLE)
    try:
        with group as w:
            result = stage(params)
    except KeyboardInterrupt:  # Ctrl-C: what a training stage finished is in its resume state
        if not distributed.launched():  # a worker's launcher reports it, once for all of them
            print(f"\nerror: {launch.interrupted()}", file=sys.stderr)
        _exit(128 + signal.SIGINT)
    except Exception as e:
        failure = _failure(e)
        if failure is None and distributed.world().active:  # a bug on a rank: its traceback, then leave at once
            traceback.print_exc()
            _exit(1)
        if failure is None:
            raise
        launch.report_error(failure[0])
        _exit(failure[1])
    if result is not None and w.main:
        print(json.dumps(result, indent=2))
    _exit(0)


def _failure(e: Exception) -> tuple[str, int] | None:
    """The one line and exit status of an exception a stage ended with; None for a bug."""
    if isinstance(e, (ParamsError, DataError, CheckpointError, DivergenceError, ExportError, ValueError)):
        return str(e), 2
    if isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)):
        return (f"out of memory ({_allocation_failure(e)}); lower train.batch_size or train.eval_batch_size, or "
                "the network (net.units, net.final_channels, space.width)"), 1
    if isinstance(e, OSError):  # a write that failed: a full disk, a read-only folder, a file where a folder goes
        return f"{type(e).__name__}: {' '.join(str(e).split())}", 1
    return None


def _allocation_failure(e: RuntimeError) -> str:
    """The first two sentences of an allocator's message, on one line (CUDA's goes on with tuning advice)."""
    text = re.sub(r"^\[enforce fail at [^\]]*\] \S+ == 0\. ", "", " ".join(str(e).split()))
    return ". ".join(text.split(". ")[:2]).rstrip(".")


def _exit(code: int) -> NoReturn:
    """Exit a stage script. Its outputs are written and closed by now; freezing the objects first keeps the
    garbage collections of the interpreter's shutdown off the ~300,000 objects that torch and torch._dynamo
    (which the optimizer imports) create: about 0.8 s of every stage process on a 2-core CPU
    (benchmarks/stage_exit.py).

    A rank that failed inside its job leaves at once, without the interpreter's shutdown: its process group
    is still up (its peers may be inside a collective, which tearing it down would wait for), and gloo's
    threads destroyed by that shutdown end the process now and then with SIGABRT ("terminate called without
    an active exception") after its error was reported, which would turn exit status 2 into a crash.
    """
    if distributed.world().active:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    gc.freeze()
    sys.exit(code)
