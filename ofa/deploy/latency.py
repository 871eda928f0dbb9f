"""Latency on the device a subnet will run on: measured, and predicted from a table of its parts.

``measure_latency`` times a model as a deployer runs it: exported to ONNX and run by onnxruntime on the CPU
(``runtime="onnxruntime"``), or in PyTorch's eager mode (``"torch"``; on CUDA timed with CUDA events after a
synchronisation). ``LatencyTable.build`` times every distinct part a subnet of an architecture can have, each
alone (every block variant: a block position's input shape and stride with each kernel and width, SE where the
block has it; the stem; the head) and the fixed cost of one inference; ``predict(cfg)`` is that cost plus the
sum of the config's parts. It needs the architecture only, no trained weights: on the target machine,

    python -m ofa.deploy.latency build --arch models/arch.json --out table.json [--runtime ... --threads ...]

builds a table with nothing but this package installed.

A time is the least of ROUNDS medians, each over at least MIN_REPEATS runs and MIN_SECONDS of runs, after WARMUP
runs: at 0.05-0.2 ms a run, a few thousand runs a round. Repeated medians of one model agree within about 1%
here, except now and then one that reads up to 1.5x the rest (a slow spell of the machine); the least of three
leaves those out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import write_json
from ..model import ConfigSpace, OFANet, Subnet, SubnetConfig
from ..model.subnet import BlockShape, MBBlock, block_shapes, classify, conv_output_size, expanded_channels
from .export import _quiet_exporter, export_onnx

RUNTIMES = ("onnxruntime", "torch")
FORMAT = "ofa-latency-table/1"
WARMUP = 10  # runs before timing: allocations, caches and the runtime's first-run work
MIN_REPEATS = 50  # timed runs at least ...
MIN_SECONDS = 0.2  # ... and for at least this long, in each of
ROUNDS = 3  # rounds, the least of whose medians counts


class LatencyError(ValueError):
    """A latency table that cannot be used here: another architecture, input or format, or an unreadable file."""


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


def _median_ms(run, times_itself: bool = False) -> float:
    """The least of ROUNDS medians of `run()`'s milliseconds, each over MIN_REPEATS runs and MIN_SECONDS at least,
    after WARMUP runs: a median ignores single slow runs, the least of a few ignores a slow spell of the machine
    (here one in eight medians of the same model read 1.5x the others). `times_itself`: `run()` returns its own
    milliseconds (CUDA events), else it is timed here."""
    for _ in range(WARMUP):
        run()
    medians = []
    for _ in range(ROUNDS):
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < MIN_REPEATS or time.perf_counter() - start < MIN_SECONDS:
            times.append(run() if times_itself else _timed(run))
        medians.append(statistics.median(times))
    return min(medians)


def _timed(run) -> float:
    t = time.perf_counter_ns()
    run()
    return (time.perf_counter_ns() - t) / 1e6


def _onnx_bytes(model: nn.Module, x: torch.Tensor) -> bytes:
    """`model` exported as deployment exports it (torch.onnx, dynamo, optimised, a dynamic batch)."""
    with _quiet_exporter():
        program = torch.onnx.export(model, (x,), input_names=["input"], output_names=["output"], dynamo=True,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), external_data=False,
                                    optimize=True, verbose=False)
    return program.model_proto.SerializeToString()


def _onnx_ms(data: bytes, x: torch.Tensor, threads: int) -> float:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return _median_ms(lambda: session.run(None, feed))


def _torch_ms(model: nn.Module, x: torch.Tensor, threads: int, device: str) -> float:
    model = model.to(device).eval()
    x = x.to(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run() -> float:
            torch.cuda.synchronize()
            start.record()
            model(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        with torch.no_grad():
            return _median_ms(run, times_itself=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return _median_ms(lambda: model(x))
    finally:
        torch.set_num_threads(previous)


def _time_module(model: nn.Module, input_shape: tuple[int, ...], runtime: str, batch_size: int, threads: int,
                 device: str) -> float:
    """Median milliseconds per batch of `model` on random inputs of (batch_size, *input_shape)."""
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0))
    model = model.eval()
    if runtime == "torch":
        return _torch_ms(model, x, threads, device)
    return _onnx_ms(_onnx_bytes(model, x), x, threads)


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], *, runtime: str = "onnxruntime",
                    batch_size: int = 1, threads: int = 1, device: str = "cpu") -> float:
    """Median milliseconds per batch of `batch_size` inputs of `input_shape` (C, H, W), as a deployer runs `model`.

    onnxruntime: a Subnet goes through ``export_onnx`` (as specialize exports it, checked against PyTorch), any
    other module through the same exporter; both run on the CPU execution provider with `threads` intra-op
    threads. torch: eager mode, `threads` CPU threads, or on CUDA timed with CUDA events.
    """
    check_runtime(runtime, device)
    input_shape = tuple(int(v) for v in input_shape)
    if runtime == "onnxruntime" and isinstance(model, Subnet):
        x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory(prefix="ofa-latency-") as tmp:
            export_onnx(model, Path(tmp) / "model.onnx", input_shape)
            data = (Path(tmp) / "model.onnx").read_bytes()
        return _onnx_ms(data, x, threads)
    return _time_module(model, input_shape, runtime, batch_size, threads, device)


class _Head(nn.Module):
    """The final 1x1 layer, pooling, feature mix, dropout and classifier of a subnet: its head."""

    def __init__(self, sub: Subnet) -> None:
        super().__init__()
        self.final, self.mix, self.dropout, self.classifier = sub.final, sub.mix, sub.dropout, sub.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return classify(self.final(x), self.mix, self.dropout, self.classifier)


class _Overhead(nn.Module):
    """As little work as a model can do on the input: what one inference costs beyond its layers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1, :1, :1] + 1


def _block_key(shape, size: tuple[int, int]) -> str:
    """A block variant: its input (channels and spatial size), expanded channels, kernel, stride, output, SE."""
    return (f"in{shape.in_channels}x{size[0]}x{size[1]}-mid{shape.mid_channels}-k{shape.kernel}-s{shape.stride}"
            f"-out{shape.out_channels}-{shape.activation}{'-se' if shape.se else ''}")


def _block_inputs(arch: Mapping[str, Any], input_shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """The spatial size each unit's first block takes (its other blocks take the first one's output)."""
    h = conv_output_size(input_shape[1], arch["stem_stride"])
    w = conv_output_size(input_shape[2], arch["stem_stride"])
    sizes = []
    for unit in arch["units"]:
        sizes.append((h, w))
        h, w = conv_output_size(h, unit["stride"]), conv_output_size(w, unit["stride"])
    return sizes


def _variants(arch: Mapping[str, Any], input_shape: tuple[int, ...]) -> dict[str, tuple]:
    """Every distinct block variant of the space: key -> (BlockShape, its input (C, H, W))."""
    space = arch["space"]
    sizes = _block_inputs(arch, input_shape)
    variants: dict[str, tuple] = {}
    channels = arch["stem_channels"]
    for unit, size in zip(arch["units"], sizes):
        out = unit["channels"]
        after = (conv_output_size(size[0], unit["stride"]), conv_output_size(size[1], unit["stride"]))
        for b in range(max(space["depth"])):
            cin, stride, here = (channels, unit["stride"], size) if b == 0 else (out, 1, after)
            for kernel in space["kernel"]:
                for width in space["width"]:
                    shape = BlockShape(cin, expanded_channels(cin, width), out, kernel, stride, unit["activation"],
                                       unit["se"])
                    variants.setdefault(_block_key(shape, here), (shape, (cin, *here)))
        channels = out
    return variants


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


def _runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    return f"torch {torch.__version__}"


def _cost_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    """What a subnet's latency depends on: the architecture without the class names."""
    return {k: v for k, v in arch.items() if k != "classes"}


@dataclass
class LatencyTable:
    """Milliseconds per batch of every part a subnet of `arch` can have, measured alone on one machine.

    ``predict(cfg)`` = overhead + stem + each active block + head, each part's own time less the overhead
    its measurement included.
    """

    arch: dict[str, Any]
    input_shape: tuple[int, int, int]
    runtime: str
    runtime_version: str
    threads: int
    batch_size: int
    device: str
    host: dict[str, Any]
    overhead_ms: float
    stem_ms: float
    head_ms: float
    blocks: dict[str, float] = field(default_factory=dict)  # block variant (``_block_key``) -> ms
    build_s: float = 0.0

    @classmethod
    def build(cls, net: OFANet | Mapping[str, Any], input_shape: tuple[int, ...], *, runtime: str = "onnxruntime",
              batch_size: int = 1, threads: int = 1, device: str = "cpu", progress: bool = True) -> LatencyTable:
        """Time the parts of the supernet `net` (or its architecture, ``OFANet.arch``) for inputs of (C, H, W)."""
        check_runtime(runtime, device)
        start = time.perf_counter()
        arch = json.loads(json.dumps(net.arch if isinstance(net, OFANet) else dict(net)))
        shape = tuple(int(v) for v in input_shape)
        if len(shape) != 3 or shape[0] != arch["in_channels"]:
            raise ValueError(f"input_shape {shape}: expected (C, H, W) with C = {arch['in_channels']}")
        torch.manual_seed(0)
        sub = Subnet.build(arch, ConfigSpace(**arch["space"]).min_config(len(arch["units"])))
        last = arch["units"][-1]
        h, w = _block_inputs(arch, shape)[-1]
        head_input = (last["channels"], conv_output_size(h, last["stride"]), conv_output_size(w, last["stride"]))

        def timed(name: str, model: nn.Module, input_shape: tuple[int, ...]) -> float:
            ms = _time_module(model, input_shape, runtime, batch_size, threads, device)
            if progress:
                print(f"latency {name}: {ms:.4f} ms", file=sys.stderr, flush=True)
            return ms

        overhead = timed("overhead", _Overhead(), shape)
        part = lambda name, model, inp: max(0.0, timed(name, model, inp) - overhead)  # noqa: E731
        stem = part("stem", sub.stem, shape)
        head = part("head", _Head(sub), head_input)
        blocks = {key: part(key, MBBlock.build(block), block_input)
                  for key, (block, block_input) in _variants(arch, shape).items()}
        return cls(arch, shape, runtime, _runtime_version(runtime), threads, batch_size, device, host(),
                   round(overhead, 5), round(stem, 5), round(head, 5), {k: round(v, 5) for k, v in blocks.items()},
                   round(time.perf_counter() - start, 1))

    def predict(self, cfg: SubnetConfig) -> float:
        """Predicted milliseconds per batch of subnet `cfg`: the overhead, the stem, its active blocks, the head."""
        total = self.overhead_ms + self.stem_ms + self.head_ms
        sizes = _block_inputs(self.arch, self.input_shape)
        for unit, size, blocks in zip(self.arch["units"], sizes, block_shapes(self.arch, cfg)):
            after = (conv_output_size(size[0], unit["stride"]), conv_output_size(size[1], unit["stride"]))
            for b, block in enumerate(blocks):
                key = _block_key(block, size if b == 0 else after)
                if key not in self.blocks:
                    raise LatencyError(f"latency table: no entry for block {key} of {cfg} (a config of another "
                                       "space; build the table for this architecture)")
                total += self.blocks[key]
        return total

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self), "input_shape": list(self.input_shape)}

    def save(self, path: str | Path) -> None:
        """Write the table as JSON (atomically)."""
        write_json(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path, arch: Mapping[str, Any] | None = None,
             input_shape: tuple[int, ...] | None = None) -> LatencyTable:
        """The table saved at `path`; with `arch` / `input_shape`, LatencyError unless it was built for them."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.pop("format") != FORMAT:
                raise ValueError("format")
            table = cls(**{**data, "input_shape": tuple(data["input_shape"])})
        except FileNotFoundError:
            raise LatencyError(f"{path}: latency table not found") from None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            raise LatencyError(f"{path}: not a latency table of this version ({FORMAT})") from None
        if arch is not None and _cost_arch(table.arch) != _cost_arch(arch):
            differ = sorted(k for k in set(_cost_arch(arch)) | set(_cost_arch(table.arch))
                            if table.arch.get(k) != arch.get(k))
            raise LatencyError(f"{path}: built for another architecture ({', '.join(differ)} differ); build it for "
                               "this one (python -m ofa.deploy.latency build --arch models/arch.json)")
        if input_shape is not None and tuple(input_shape) != table.input_shape:
            raise LatencyError(f"{path}: built for input {list(table.input_shape)}, the data has "
                               f"{list(input_shape)}")
        return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ofa.deploy.latency",
                                     description="Build a latency table on this machine from an architecture file.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="time every part of the architecture's subnets here")
    build.add_argument("--arch", required=True, type=Path,
                       help="the architecture file the pipeline writes (models/arch.json)")
    build.add_argument("--out", required=True, type=Path, help="where to write the table (JSON)")
    build.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES)
    build.add_argument("--threads", type=int, default=1)
    build.add_argument("--batch-size", type=int, default=1)
    build.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    try:
        spec = json.loads(args.arch.read_text())
        table = LatencyTable.build(spec["arch"], tuple(spec["input_shape"]), runtime=args.runtime,
                                   batch_size=args.batch_size, threads=args.threads, device=args.device)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: {args.arch}: {e}", file=sys.stderr)
        return 2
    table.save(args.out)
    print(f"{args.out}: {len(table.blocks)} block variants, stem, head and overhead in {table.build_s} s "
          f"({table.runtime_version}, {table.threads} threads, batch {table.batch_size}, {table.host['cpu']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
