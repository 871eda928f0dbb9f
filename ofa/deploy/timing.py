"""Timing a model as a deployer runs it: exported to ONNX and run by onnxruntime on the CPU, or PyTorch eager (on
CUDA timed with CUDA events after a synchronisation); and the machine it runs on.

A time is the least of ROUNDS medians, each over at least MIN_REPEATS runs and MIN_SECONDS of runs, after WARMUP
runs: at 0.01-0.2 ms a run, a thousand runs or more a round. Repeated medians of one model agree within about 1%
here, except now and then one that reads up to 2x the rest (a slow spell of the machine, lasting seconds):
several models are timed in interleaved rounds, so that such a spell falls on one round of several of them,
and the least of three rounds leaves it out.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model import fold_batch_norm
from .export import EXPORT_PROCESSES, _quiet_exporter, in_processes

RUNTIMES = ("onnxruntime", "torch")
WARMUP = 10  # runs before timing: allocations, caches and the runtime's first-run work
MIN_REPEATS = 50  # timed runs at least ...
MIN_SECONDS = 0.1  # ... and for at least this long (thousands of runs of a part), in each of
ROUNDS = 3  # rounds, the least of whose medians counts


def check_runtime(runtime: str, device: str) -> None:
    """ValueError naming the runtime or device when it cannot run here (unknown, its package missing, no GPU)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not allowed ({' or '.join(RUNTIMES)})")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not allowed (cpu or cuda)")
    if runtime == "onnxruntime":
        if device != "cpu":
            raise ValueError("runtime onnxruntime runs on the CPU here (its CPU execution provider); device cpu")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ValueError("runtime onnxruntime: the onnxruntime package is not installed (pip install "
                             "onnxruntime, or runtime torch)") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA device on this machine (device cpu)")


class _Runner:
    """One model ready to run: `run()` does one inference (returning its own milliseconds when `times_itself`:
    CUDA events)."""

    def __init__(self, run: Callable[[], Any], times_itself: bool = False) -> None:
        self.run, self.times_itself = run, times_itself

    def median_ms(self) -> float:
        """WARMUP runs (caches, after other models ran), then the median of at least MIN_REPEATS runs and
        MIN_SECONDS."""
        for _ in range(WARMUP):
            self.run()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < MIN_REPEATS or time.perf_counter() - start < MIN_SECONDS:
            times.append(self.run() if self.times_itself else _timed(self.run))
        return statistics.median(times)


def _least_medians(runners: Sequence[_Runner], progress: str | None = None) -> list[float]:
    """Per runner the least of ROUNDS medians. The rounds go over all runners in turn (the first round of each,
    then the second, ...): a slow spell of the machine, which lasts for seconds, then falls on one round of
    several models, not on every round of one; a median ignores single slow runs."""
    best = [math.inf] * len(runners)
    for r in range(ROUNDS):
        if progress:
            print(f"{progress}: timing round {r + 1}/{ROUNDS} of {len(runners)} models", file=sys.stderr, flush=True)
        for i, runner in enumerate(runners):
            best[i] = min(best[i], runner.median_ms())
    return best


def _timed(run) -> float:
    t = time.perf_counter_ns()
    run()
    return (time.perf_counter_ns() - t) / 1e6


def _onnx_bytes(model: nn.Module, x: torch.Tensor, output_names: Sequence[str] = ("output",)) -> bytes:
    """`model` exported as deployment exports it (traced with its batch norm folded, torch.onnx, dynamo, optimised,
    a dynamic batch); its input named "input", its outputs `output_names`."""
    with _quiet_exporter():
        program = torch.onnx.export(fold_batch_norm(model), (x,), input_names=["input"],
                                    output_names=list(output_names), dynamo=True,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), external_data=False,
                                    optimize=True, verbose=False)
    return program.model_proto.SerializeToString()


def _onnx_runner(data: bytes, x: torch.Tensor, threads: int) -> _Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return _Runner(lambda: session.run(None, feed))


def _torch_runner(model: nn.Module, x: torch.Tensor, device: str) -> _Runner:
    model, x = model.to(device).eval(), x.to(device)
    if device != "cuda":
        return _Runner(lambda: model(x))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run() -> float:
        torch.cuda.synchronize()
        start.record()
        model(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return _Runner(run, times_itself=True)


def _time_modules(items: Sequence[tuple[nn.Module, tuple[int, ...]]], runtime: str, batch_size: int, threads: int,
                  device: str, progress: str | None = None) -> list[float]:
    """Median milliseconds per batch of each (model, input shape): random inputs of (batch_size, *input_shape),
    every model exported first (onnxruntime: ``_export_all``), then all timed in interleaved rounds
    (``_least_medians``)."""
    inputs = [torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(0)) for _, shape in items]
    if runtime == "torch":
        runners = [_torch_runner(model.eval(), x, device) for (model, _), x in zip(items, inputs)]
    else:
        exported = _export_all([(model.eval(), x, ("output",)) for (model, _), x in zip(items, inputs)], progress)
        return _time_onnx(list(zip(exported, inputs)), threads, progress)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the torch runtime's; onnxruntime's sessions have their own
    try:
        with torch.no_grad():
            return _least_medians(runners, progress)
    finally:
        torch.set_num_threads(previous)


def _time_onnx(graphs: Sequence[tuple[bytes, torch.Tensor]], threads: int, progress: str | None = None) -> list[float]:
    """Median milliseconds of each (ONNX model, input) on onnxruntime's CPU execution provider with `threads`
    intra-op threads, all timed in interleaved rounds (``_least_medians``)."""
    return _least_medians([_onnx_runner(data, x, threads) for data, x in graphs], progress)


def _export_all(models: Sequence[tuple[nn.Module, torch.Tensor, Sequence[str]]], progress: str | None) -> list[bytes]:
    """Each (model, example input, output names) exported (``_onnx_bytes``), by up to EXPORT_PROCESSES processes at
    once (``in_processes``): nothing is timed meanwhile, so they slow no measurement."""
    if progress:
        print(f"{progress}: exporting {len(models)} models (up to {EXPORT_PROCESSES} at a time)", file=sys.stderr,
              flush=True)
    return in_processes(_onnx_bytes, models)


def measure_many(models: Sequence[nn.Module], input_shape: tuple[int, ...], *, runtime: str = "onnxruntime",
                 batch_size: int = 1, threads: int = 1, device: str = "cpu",
                 progress: str | None = None) -> list[float]:
    """``measure_latency`` of several models, timed in interleaved rounds: a slow spell of the machine falls on
    one round of several models rather than every round of one. `progress`: a label for lines on stderr."""
    check_runtime(runtime, device)
    shape = tuple(int(v) for v in input_shape)
    return _time_modules([(m, shape) for m in models], runtime, batch_size, threads, device, progress)


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], *, runtime: str = "onnxruntime",
                    batch_size: int = 1, threads: int = 1, device: str = "cpu") -> float:
    """Median milliseconds per batch of `batch_size` inputs of `input_shape` (C, H, W), as a deployer runs `model`:
    exported as ``export_onnx`` exports (dynamo, optimised, a dynamic batch) and run on onnxruntime's CPU
    execution provider with `threads` intra-op threads; or in torch eager mode, `threads` CPU threads, or on
    CUDA timed with CUDA events."""
    return measure_many([model], input_shape, runtime=runtime, batch_size=batch_size, threads=threads,
                        device=device)[0]


def measure_onnx(path: str | Path, input_shape: tuple[int, ...], *, batch_size: int = 1, threads: int = 1) -> float:
    """Median milliseconds per batch of an exported ONNX file (``export_onnx``'s: dynamic batch) on onnxruntime's
    CPU execution provider, fed random inputs of (batch_size, *input_shape) in 0..255 (raw pixels)."""
    return measure_onnx_many([path], input_shape, batch_size=batch_size, threads=threads)[0]


def measure_onnx_many(paths: Sequence[str | Path], input_shape: tuple[int, ...], *, batch_size: int = 1,
                      threads: int = 1) -> list[float]:
    """``measure_onnx`` of several files, timed in interleaved rounds: a slow spell of the machine falls on one
    round of several models rather than on every round of one."""
    check_runtime("onnxruntime", "cpu")
    x = torch.rand(batch_size, *(int(v) for v in input_shape), generator=torch.Generator().manual_seed(0)) * 255
    return _time_onnx([(Path(path).read_bytes(), x) for path in paths], threads)


def host() -> dict[str, Any]:
    """The machine a table is measured on: CPU model, cores, GPU (None without one), OS."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": cores, "gpu": gpu, "os": platform.platform()}


def runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    return f"torch {torch.__version__}"
