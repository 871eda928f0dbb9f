"""Launching a stage as several processes on this machine (torchrun --standalone's engine), and the one-line report
of how a job of them failed."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .distributed import ERRORS_ENV, launched


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
