"""Deploying a subnet: save/load it without the supernet, export it to ONNX checked with onnxruntime.

A saved subnet (``save_subnet``) is its architecture, its config and its weights; ``load_subnet`` rebuilds
the plain torch layers from the first two and loads the weights with ``torch.load(weights_only=True)``.
An ONNX export (``export_onnx``) given the training data's per-channel mean and std normalises inside,
so the model takes raw pixel values: float32 (N, C, H, W) in 0..255, any batch size N. It is traced with its batch
norm folded into the convs (``fold_batch_norm``): the exporter's optimiser would fold it into the same graph, after a
third more time spent tracing it; the check is against the subnet itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import functools
import json
import logging
import math
import multiprocessing
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from ..io import atomic_write, load_tensors
from ..model import Subnet, SubnetConfig, fold_batch_norm

FORMAT = "ofa-subnet/1"
ONNX_TOLERANCE = 1e-4  # max abs difference of onnxruntime's logits from PyTorch's, fp32
EXPORT_PROCESSES = 2  # exports at once: tracing is single-threaded CPU work, seconds a model here
T = TypeVar("T")


class ExportError(RuntimeError):
    """A subnet file that cannot be loaded, or an export that does not reproduce the PyTorch subnet."""


class Normalized(nn.Module):
    """A model behind a fixed per-channel normalisation: takes raw pixel values (N, C, H, W) in 0..255."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def _cpu_copy(subnet: Subnet) -> Subnet:
    """A float32, eval-mode copy on the CPU in the default memory format: the exporter traces a channels-last
    module (a subnet of a supernet trained so) into a graph of extra shape operations that runs 20-100% slower
    on onnxruntime."""
    if not isinstance(subnet, Subnet) or subnet.arch is None:
        raise ExportError("expected a Subnet from OFANet.extract or load_subnet (it carries arch and config)")
    return copy.deepcopy(subnet).cpu().float().to(memory_format=torch.contiguous_format).eval()


def save_subnet(subnet: Subnet, path: str | Path) -> None:
    """Atomically save a subnet's architecture, config and weights (loadable without the supernet)."""
    sub = _cpu_copy(subnet)
    state = {k: v.detach().contiguous().clone() for k, v in sub.state_dict().items()}
    obj = {"format": FORMAT, "arch": sub.arch, "config": sub.config.to_dict(), "state_dict": state}
    atomic_write(Path(path), lambda f: torch.save(obj, f), binary=True)


def load_subnet(path: str | Path) -> Subnet:
    """The subnet saved by save_subnet, as plain torch layers in eval mode (weights_only loading)."""
    obj = load_tensors(Path(path), {"format", "arch", "config", "state_dict"}, ExportError, "saved subnet")
    if obj["format"] != FORMAT:
        raise ExportError(f"{path}: format {obj['format']!r}, this version reads {FORMAT!r}")
    try:
        config = SubnetConfig.from_dict(obj["config"])
        subnet = Subnet.build(obj["arch"], config)
        subnet.load_state_dict(obj["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ExportError(f"{path}: not a consistent saved subnet ({' '.join(str(e).split())[:200]})") from None
    return subnet.eval()


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's notes that concern neither this model nor its user (torchvision ops, deprecations)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _check_input(subnet: Subnet, input_shape: Sequence[int], mean: Sequence[float] | None,
                 std: Sequence[float] | None) -> tuple[int, int, int]:
    """ValueError naming the argument unless input_shape is (C, H, W) with the subnet's C and mean / std are
    both given, or neither, with C finite values each (std positive)."""
    shape = tuple(int(v) for v in input_shape)
    channels = (subnet.arch or {}).get("in_channels", shape[0] if shape else None)
    if len(shape) != 3 or min(shape) < 1 or shape[0] != channels:
        raise ValueError(f"export_onnx: input_shape {shape}: expected (C, H, W) with C = {channels}, the subnet's "
                         "input channels")
    if (mean is None) != (std is None):
        raise ValueError("export_onnx: give both mean and std, or neither")
    for name, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        values = [float(v) for v in values]
        if len(values) != channels or not all(math.isfinite(v) for v in values) or (
                name == "std" and min(values) <= 0):
            raise ValueError(f"export_onnx: {name} {values}: expected {channels} finite values, one per input channel"
                             + (", each positive" if name == "std" else ""))
    return shape


def export_onnx(
    subnet: Subnet,
    path: str | Path,
    input_shape: Sequence[int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    check_inputs: torch.Tensor | None = None,
) -> float:
    """Export `subnet` to ONNX (dynamic batch), check it with onnxruntime; returns the max abs logit difference.

    With `mean` and `std` the model takes raw pixels in 0..255 and normalises inside; without, it takes the
    subnet's own (normalised) input. `check_inputs` (N, C, H, W) in the model's input range is what the check
    runs on (default: 8 random images). The file is written only if the difference is at most ONNX_TOLERANCE.
    """
    import onnx
    import onnxruntime

    input_shape = _check_input(subnet, input_shape, mean, std)
    sub = _cpu_copy(subnet)
    model = sub if mean is None else Normalized(sub, mean, std).eval()
    folded = fold_batch_norm(model)  # the same graph as the optimiser makes of `model`, traced in a third less time
    if check_inputs is None:
        g = torch.Generator().manual_seed(0)
        check_inputs = torch.rand(8, *input_shape, generator=g)
        check_inputs = check_inputs * 255 if mean is not None else check_inputs * 4 - 2
    x = check_inputs.detach().float().cpu().contiguous()
    if tuple(x.shape[1:]) != input_shape:
        raise ValueError(f"export_onnx: check_inputs of shape {tuple(x.shape)}, expected (N, {input_shape})")
    with _quiet_exporter():
        program = torch.onnx.export(
            folded, (x[:2],), input_names=["pixels" if mean is not None else "input"], output_names=["logits"],
            dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), external_data=False,
            optimize=True, verbose=False,
        )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, _metadata(sub, input_shape, mean, std))
    data = proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    diff = float((got - expected).abs().max())
    if not diff <= ONNX_TOLERANCE:
        raise ExportError(f"{path}: onnxruntime output differs from PyTorch by {diff:.3g} (> {ONNX_TOLERANCE:g})")
    atomic_write(Path(path), lambda f: f.write(data), binary=True)
    return diff


def export_onnx_many(jobs: Sequence[tuple[Subnet, str | Path]], input_shape: Sequence[int],
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     check_inputs: torch.Tensor | None = None) -> list[float]:
    """``export_onnx`` of each (subnet, path), with the same input and check, by up to EXPORT_PROCESSES processes
    at once (``in_processes``); returns each export's max abs logit difference. A failed export raises its error
    here; those already written stay."""
    export = functools.partial(export_onnx, input_shape=input_shape, mean=mean, std=std, check_inputs=check_inputs)
    return in_processes(export, [(_cpu_copy(sub), path) for sub, path in jobs])  # a forked process can't use CUDA


def in_processes(fn: Callable[..., T], jobs: Sequence[tuple]) -> list[T]:
    """``[fn(*job) for job in jobs]``, by up to EXPORT_PROCESSES forked processes of one thread each where there
    are two jobs or more and the cores for them (exports: tracing uses one core whatever torch's thread count)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(EXPORT_PROCESSES, len(jobs), cores)
    if workers < 2:
        return [fn(*job) for job in jobs]
    context = multiprocessing.get_context("fork")  # the models as they are, no re-import of the caller's script
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads,
                                                initargs=(1,)) as pool:
        return list(pool.map(fn, *zip(*jobs)))


def _input_contract(input_shape: tuple[int, ...], raw: bool) -> str:
    """The input the model takes, in words (its metadata's ofa.input)."""
    c, h, w = input_shape
    shape = f"float32 (N, {c}, {h}, {w})"
    if not raw:
        return f"normalised input, {shape}"
    colour = "RGB" if c == 3 else "grey" if c == 1 else f"{c} channels"
    return (f"raw pixel values 0..255, {colour}, {shape}; an image of another size: its shorter side resized to "
            f"{min(h, w)} (bicubic), then the centre {h}x{w}, as the training images were")


def _metadata(sub: Subnet, input_shape: tuple[int, ...], mean: Sequence[float] | None,
              std: Sequence[float] | None) -> dict[str, str]:
    """What the ONNX file says about itself: config, architecture, input contract, classes, normalisation."""
    meta = {
        "ofa.config": sub.config.to_json(),
        "ofa.subnet": str(sub.config),
        "ofa.arch": json.dumps(sub.arch, separators=(",", ":")),
        "ofa.input": _input_contract(input_shape, raw=mean is not None),
    }
    if sub.classes is not None:
        meta["ofa.classes"] = json.dumps(sub.classes)  # output i is class sub.classes[i]
    if mean is not None:
        meta["ofa.mean"], meta["ofa.std"] = json.dumps([float(m) for m in mean]), json.dumps([float(s) for s in std])
    return meta
