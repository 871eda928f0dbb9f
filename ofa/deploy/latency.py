"""Latency on the device a subnet will run on, predicted from a table of its parts measured there.

``LatencyTable.build`` times (``ofa.deploy.timing``) every distinct part a subnet of an architecture can have,
each alone (every block variant: a block position's input shape and stride with each kernel and width, SE where
the block has it; the stem; the head) and the fixed cost of one inference; ``predict(cfg)`` is that cost plus
the sum of the config's parts. On onnxruntime each part is cut out of the export of a whole subnet that holds
it (``covering_configs``, ``_cut``): an export per subnet, none per part, and any other subnet timed whole is
those parts' graphs run one after another (``_chain``). It needs the architecture only, no trained weights: on
the target machine,

    python -m ofa.latency build --arch models/arch.json --out table.json [--runtime ... --threads ...]

(``ofa.latency``, the command line) builds a table with nothing but this package installed. ``validate``
measures whole subnets against the table's predictions (Kendall's tau, mean absolute percentage error, share
within 10%).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io import write_json
from ..model import ConfigSpace, OFANet, Subnet, SubnetConfig, macs
from ..model.subnet import BlockShape, block_shapes, conv_output_size, expanded_channels
from .parts import _time_subnets
from .timing import RUNTIMES, check_runtime, host, runtime_version  # noqa: F401 - RUNTIMES

FORMAT = "ofa-latency-table/2"
CALIBRATION_SEED = 20261206  # the random subnets a table is calibrated on: drawn apart from any check's
CALIBRATE = 2  # random subnets timed whole to fit a table's scale


class LatencyError(ValueError):
    """A latency table that cannot be used here: another architecture, input or format, or an unreadable file."""


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


def _block_keys(arch: Mapping[str, Any], input_shape: tuple[int, ...], cfg: SubnetConfig) -> list[str]:
    """The block variant (``_block_key``) of each of the config's active blocks, in order."""
    keys = []
    for unit, size, blocks in zip(arch["units"], _block_inputs(arch, input_shape), block_shapes(arch, cfg)):
        after = (conv_output_size(size[0], unit["stride"]), conv_output_size(size[1], unit["stride"]))
        keys += [_block_key(block, size if b == 0 else after) for b, block in enumerate(blocks)]
    return keys


def _variants(arch: Mapping[str, Any], input_shape: tuple[int, ...]) -> dict[str, tuple]:
    """Every distinct block variant of the space: key -> (BlockShape, its input (C, H, W))."""
    variants: dict[str, tuple] = {}
    for slot_choices, slot_inputs in _slots(arch, input_shape):
        for choices, size in zip(slot_choices, slot_inputs):
            for _, shape in choices:
                variants.setdefault(_block_key(shape, size), (shape, (shape.in_channels, *size)))
    return variants


def _slots(arch: Mapping[str, Any], input_shape: tuple[int, ...]) -> list[tuple[list[list], list[tuple[int, int]]]]:
    """Per unit, per block slot: every (width, BlockShape) choice the slot can take, and the slot's input size."""
    space = arch["space"]
    sizes = _block_inputs(arch, input_shape)
    units, channels = [], arch["stem_channels"]
    for unit, size in zip(arch["units"], sizes):
        out = unit["channels"]
        after = (conv_output_size(size[0], unit["stride"]), conv_output_size(size[1], unit["stride"]))
        choices, inputs = [], []
        for b in range(max(space["depth"])):
            cin, stride, here = (channels, unit["stride"], size) if b == 0 else (out, 1, after)
            choices.append([(width, BlockShape(cin, expanded_channels(cin, width), out, kernel, stride,
                                               unit["activation"], unit["se"]))
                            for kernel in space["kernel"] for width in space["width"]])
            inputs.append(here)
        units.append((choices, inputs))
        channels = out
    return units


def _cost_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    """What a subnet's latency depends on: the architecture without the class names."""
    return {k: v for k, v in arch.items() if k != "classes"}


@dataclass
class LatencyTable:
    """Milliseconds per batch of every part a subnet of `arch` can have, measured alone on one machine.

    ``predict(cfg)`` = overhead + scale x (stem + each active block + head), each part's own time less the
    overhead its measurement included. A part timed alone runs with its weights and activations in cache, and
    the runtime cannot fuse or reorder across parts; a whole subnet costs more than the sum of its parts (about
    9% for the quick profile's net here, alike across configs). `scale` is that ratio, fitted on a few random
    subnets measured whole (`calibration`); 1 with none.
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
    scale: float = 1.0  # whole subnets / the sum of their parts, beyond the overhead
    calibration: list[dict[str, Any]] = field(default_factory=list)  # {"config", "measured_ms", "parts_ms"}
    build_s: float = 0.0

    @classmethod
    def build(cls, net: OFANet | Mapping[str, Any], input_shape: tuple[int, ...], *, runtime: str = "onnxruntime",
              batch_size: int = 1, threads: int = 1, device: str = "cpu", calibrate: int = CALIBRATE,
              progress: bool = True) -> LatencyTable:
        """Time the parts of the supernet `net` (or its architecture, ``OFANet.arch``) for inputs of (C, H, W), and
        `calibrate` random subnets whole to fit `scale` (``build_and_measure`` without configs of its own)."""
        return cls.build_and_measure(net, input_shape, (), runtime=runtime, batch_size=batch_size, threads=threads,
                                     device=device, calibrate=calibrate, progress=progress)[0]

    @classmethod
    def build_and_measure(cls, net: OFANet | Mapping[str, Any], input_shape: tuple[int, ...],
                          configs: Sequence[SubnetConfig], *, runtime: str = "onnxruntime", batch_size: int = 1,
                          threads: int = 1, device: str = "cpu", calibrate: int = CALIBRATE,
                          progress: bool = True) -> tuple[LatencyTable, list[float]]:
        """The table (``build``), and each of `configs` timed whole in the same rounds (milliseconds per batch).

        The parts are cut out of the uniform configs at the largest depth (``covering_configs``: every block
        variant is in one of them), so on onnxruntime those, one per kernel and width, are the only subnets exported
        (an export costs seconds, its timing a fraction of one): every other subnet timed whole, the calibration's and
        `configs`, is its parts' graphs run one after another (``ofa.deploy.parts._chain``), the operators its own
        export would have.
        """
        check_runtime(runtime, device)
        start = time.perf_counter()
        arch = json.loads(json.dumps(net.arch if isinstance(net, OFANet) else dict(net)))
        shape = tuple(int(v) for v in input_shape)
        if len(shape) != 3 or shape[0] != arch["in_channels"]:
            raise ValueError(f"input_shape {shape}: expected (C, H, W) with C = {arch['in_channels']}")
        covering, calibration = covering_configs(arch), calibration_configs(arch, calibrate)
        order = list(dict.fromkeys([*covering, *calibration, *configs]))  # covering first: part indices below
        torch.manual_seed(0)
        subnets = [Subnet.build(arch, cfg) for cfg in order]

        def names(cfg: SubnetConfig) -> list[str]:  # a config's parts, in order
            return ["stem", *_block_keys(arch, shape, cfg), "head"]

        wanted: dict[str, tuple[int, int]] = {}  # part name -> (subnet, part): each distinct part once
        for i, cfg in enumerate(covering):
            for j, name in enumerate(names(cfg)):
                wanted.setdefault(name, (i, j))
        chains = {i: [wanted[name] for name in names(cfg)] for i, cfg in enumerate(order) if i >= len(covering)}
        overhead, whole, part_ms = _time_subnets(subnets, shape, list(wanted.values()), runtime, batch_size, threads,
                                                 device, progress="latency table" if progress else None, chains=chains)
        measured = dict(zip(order, whole))
        part = {name: round(max(0.0, ms - overhead), 5) for name, ms in zip(wanted, part_ms)}  # less the overhead
        table = cls(arch, shape, runtime, runtime_version(runtime), threads, batch_size, device, host(),
                    round(overhead, 5), part["stem"], part["head"], {key: part[key] for key in _variants(arch, shape)})
        for cfg in calibration:
            table.calibration.append({"config": str(cfg), "measured_ms": round(measured[cfg], 5),
                                      "parts_ms": round(table.predict(cfg), 5)})
        parts = sum(c["parts_ms"] - table.overhead_ms for c in table.calibration)
        if parts > 0:
            table.scale = round(sum(c["measured_ms"] - table.overhead_ms for c in table.calibration) / parts, 5)
        table.build_s = round(time.perf_counter() - start, 1)
        return table, [measured[cfg] for cfg in configs]

    def predict(self, cfg: SubnetConfig) -> float:
        """Predicted milliseconds per batch of subnet `cfg`: the overhead, then the stem, its active blocks and the
        head, scaled."""
        total = self.stem_ms + self.head_ms
        for key in _block_keys(self.arch, self.input_shape, cfg):
            if key not in self.blocks:
                raise LatencyError(f"latency table: no entry for block {key} of {cfg} (a config of another "
                                   "space; build the table for this architecture)")
            total += self.blocks[key]
        return self.overhead_ms + self.scale * total

    def fastest(self) -> tuple[SubnetConfig, float]:
        """The subnet with the least predicted latency, and its prediction: per block slot its fastest variant, per
        unit the depth whose first blocks sum least (exact: the prediction is a sum over independent choices)."""
        space = ConfigSpace(**self.arch["space"])
        kernel, width, depth = [], [], []
        for slot_choices, slot_inputs in _slots(self.arch, self.input_shape):
            best = [min((self.blocks[_block_key(shape, size)], shape.kernel, w) for w, shape in choices)
                    for choices, size in zip(slot_choices, slot_inputs)]
            depth.append(min(space.depth, key=lambda d: (sum(b[0] for b in best[:d]), d)))
            kernel.append([b[1] for b in best])
            width.append([b[2] for b in best])
        config = SubnetConfig(kernel=kernel, depth=depth, width=width)
        return config, self.predict(config)

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
                               "this one (python -m ofa.latency build --arch models/arch.json)")
        if input_shape is not None and tuple(input_shape) != table.input_shape:
            raise LatencyError(f"{path}: built for input {list(table.input_shape)}, the data has "
                               f"{list(input_shape)}")
        return table


def covering_configs(arch: Mapping[str, Any]) -> list[SubnetConfig]:
    """The uniform configs at the largest depth, one per kernel and width: together they hold every block variant
    of the space (each block slot of each unit with each kernel and width), the stem and the head."""
    space = ConfigSpace(**arch["space"])
    return [space.uniform(len(arch["units"]), kernel, max(space.depth), width)
            for kernel in space.kernel for width in space.width]


def calibration_configs(arch: Mapping[str, Any], count: int) -> list[SubnetConfig]:
    """The `count` random per-block configs a table's scale is fitted on (CALIBRATION_SEED), none uniform."""
    space = ConfigSpace(**arch["space"])
    n = len(arch["units"])
    rng, configs = random.Random(CALIBRATION_SEED), []
    for _ in range(100 * (count + 1)):
        if len(configs) == count:
            break
        cfg = space.sample(n, rng)
        if cfg.uniform_values() is None and cfg not in configs:
            configs.append(cfg)
    return configs


def validation_configs(arch: Mapping[str, Any], samples: int, seed: int = 0,
                       exclude: Sequence[str] = ()) -> list[SubnetConfig]:
    """Every uniform config, then `samples` distinct random per-block configs (seeded) not among them nor in
    `exclude` (config strings: a table's calibration configs, so that a check is out of sample)."""
    space = ConfigSpace(**arch["space"])
    n = len(arch["units"])
    configs = dict.fromkeys(space.uniform_grid(n))
    rng, target, tries = random.Random(seed), len(configs) + samples, 0
    while len(configs) < target and tries < 100 * (samples + 1):  # a tiny space may hold fewer
        cfg = space.sample(n, rng)
        if str(cfg) not in exclude:
            configs.setdefault(cfg)
        tries += 1
    return list(configs)


def validate(table: LatencyTable, configs: Sequence[SubnetConfig],
             measure: Callable[[list[SubnetConfig]], list[float]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Each config's predicted and `measure`d milliseconds (all measured in one call: ``measure_many`` times them
    in interleaved rounds, ``LatencyTable.build_and_measure`` beside the table's parts); the figures: Kendall's
    tau, the mean absolute percentage error, the share within 10% of measured, and Kendall's tau of MACs against
    measured."""
    configs = list(configs)
    records = [{"config": str(cfg), "macs": macs(table.arch, cfg, table.input_shape),
                "predicted_ms": round(table.predict(cfg), 5), "measured_ms": round(ms, 5),
                "uniform": cfg.uniform_values() is not None, "subnet": cfg.to_dict()}
               for cfg, ms in zip(configs, measure(configs), strict=True)]
    return validation_figures(records), records


def validation_figures(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Kendall's tau, mean absolute % error, share within 10% (predicted against measured) and MACs' tau."""
    predicted = [r["predicted_ms"] for r in records]
    measured = [r["measured_ms"] for r in records]
    errors = [abs(p - m) / m for p, m in zip(predicted, measured)]
    return {"configs": len(records), "kendall_tau": round(kendall_tau(predicted, measured), 4),
            "mape_pct": round(100 * sum(errors) / len(errors), 2),
            "within_10pct": round(sum(e <= 0.1 for e in errors) / len(errors), 4),
            "macs_kendall_tau": round(kendall_tau([r["macs"] for r in records], measured), 4)}


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b of two paired lists (ties in either count as neither concordant nor discordant); 0 when
    either is constant."""
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    pairs = concordant + discordant
    denominator = ((pairs + ties_a) * (pairs + ties_b)) ** 0.5
    return (concordant - discordant) / denominator if denominator else 0.0
