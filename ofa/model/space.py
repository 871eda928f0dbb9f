"""The configuration space of the supernet and the explicit subnet configurations it contains.

A ``SubnetConfig`` names one subnet: a kernel size and a width (expand ratio) for every block slot of every
unit, and a depth per unit. Slots beyond a unit's depth are inactive; they are normalised to 0 so that two
configs describing the same subnet compare (and hash) equal.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass
from typing import Any

Number = int | float


def _fmt(value: Number) -> str:
    return f"{value:g}"


def _check_choices(name: str, values: Any, kind: type | tuple[type, ...]) -> tuple:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"space.{name}: expected a list of numbers, got {values!r}")
    values = tuple(values)
    if not values:
        raise ValueError(f"space.{name}: empty (at least one choice is needed)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, kind) or v <= 0:
            raise ValueError(f"space.{name}: {v!r} is not allowed (positive {'integers' if kind is int else 'numbers'})")
    if len(set(values)) != len(values):
        raise ValueError(f"space.{name}: duplicate choices in {list(values)}")
    return tuple(sorted(values))


def _blocks(unit: str, widths: dict[str, Number]) -> list[tuple[int, Number]] | None:
    """The (kernel, width) blocks of one unit of a `kxw-` string ("7x4.5x2"), or None if it is not one. A width
    may hold a dot itself ("7x1.5.5x1"): a token that leaves no block after it is taken back."""
    m = re.match(r"(\d+)x", unit)
    if m is None:
        return None
    rest = unit[m.end():]
    for token, width in widths.items():
        if rest == token:
            return [(int(m[1]), width)]
        if rest.startswith(token + "."):
            tail = _blocks(rest[len(token) + 1:], widths)
            if tail is not None:
                return [(int(m[1]), width), *tail]
    return None


@dataclass(frozen=True)
class ConfigSpace:
    """The choices of each elastic dimension: odd kernel sizes, unit depths, expand ratios (width)."""

    kernel: tuple[int, ...] = (3, 5, 7)
    depth: tuple[int, ...] = (2, 3, 4)
    width: tuple[Number, ...] = (3, 4, 6)

    def __post_init__(self) -> None:
        kernel = _check_choices("kernel", self.kernel, int)
        for k in kernel:
            if k % 2 == 0:
                raise ValueError(f"space.kernel: {k} is even (odd kernel sizes only, e.g. [3, 5, 7])")
        object.__setattr__(self, "kernel", kernel)
        object.__setattr__(self, "depth", _check_choices("depth", self.depth, int))
        object.__setattr__(self, "width", _check_choices("width", self.width, (int, float)))

    @property
    def max_depth(self) -> int:
        return self.depth[-1]

    def uniform(self, num_units: int, kernel: int, depth: int, width: Number) -> SubnetConfig:
        """The config using one kernel, depth and width everywhere."""
        cfg = SubnetConfig(
            kernel=((kernel,) * self.max_depth,) * num_units,
            depth=(depth,) * num_units,
            width=((width,) * self.max_depth,) * num_units,
        )
        self.check(cfg, num_units)
        return cfg

    def grid_size(self) -> int:
        """Number of uniform configs."""
        return len(self.kernel) * len(self.depth) * len(self.width)

    def uniform_grid(self, num_units: int) -> list[SubnetConfig]:
        """Every uniform config, ordered by kernel, then depth, then width (the seed's Table 2 order)."""
        return [self.uniform(num_units, k, d, w) for k, d, w in itertools.product(self.kernel, self.depth, self.width)]

    def max_config(self, num_units: int) -> SubnetConfig:
        return self.uniform(num_units, self.kernel[-1], self.depth[-1], self.width[-1])

    def min_config(self, num_units: int) -> SubnetConfig:
        return self.uniform(num_units, self.kernel[0], self.depth[0], self.width[0])

    def sample(
        self,
        num_units: int,
        rng: random.Random,
        *,
        kernel: bool = True,
        depth: bool = True,
        width: bool = True,
    ) -> SubnetConfig:
        """A random config: kernel and width drawn per block, depth per unit; a dimension not sampled stays at its max."""
        n = self.max_depth
        pick = lambda choices, on: rng.choice(choices) if on else choices[-1]  # noqa: E731
        depths = tuple(pick(self.depth, depth) for _ in range(num_units))
        kernels = tuple(tuple(pick(self.kernel, kernel) for _ in range(n)) for _ in range(num_units))
        widths = tuple(tuple(pick(self.width, width) for _ in range(n)) for _ in range(num_units))
        return SubnetConfig(kernel=kernels, depth=depths, width=widths)

    def parse(self, text: str, num_units: int) -> SubnetConfig:
        """The config a string names, as ``str(SubnetConfig)`` prints it: `k5-d2-w4` (one kernel, depth and width
        everywhere) or `kxw-7x4.5x4|5x4.5x2` (kernel x width of each active block, blocks separated by `.`, units
        by `|`; a unit's depth is its number of blocks). ValueError, naming the string, unless it is a config of
        this space for `num_units` units."""
        widths = {_fmt(w): w for w in sorted(self.width, key=lambda w: -len(_fmt(w)))}  # longest token first
        form = (f"k<kernel>-d<depth>-w<width> or kxw-<kernel>x<width>.<...>|<...> ({num_units} units; kernels "
                f"{list(self.kernel)}, depths {list(self.depth)}, widths {[_fmt(w) for w in self.width]})")
        w_re = "|".join(re.escape(t) for t in widths)
        uniform = re.fullmatch(rf"k(\d+)-d(\d+)-w({w_re})", text) if isinstance(text, str) else None
        units = text[4:].split("|") if isinstance(text, str) and text.startswith("kxw-") else None
        blocks = [_blocks(u, widths) for u in units] if units is not None and len(units) == num_units else None
        pad = lambda row: (*row, *(0,) * (self.max_depth - len(row)))  # noqa: E731
        try:
            if uniform is not None:
                cfg = self.uniform(num_units, int(uniform[1]), int(uniform[2]), widths[uniform[3]])
            elif blocks is not None and all(b is not None and len(b) <= self.max_depth for b in blocks):
                cfg = SubnetConfig(tuple(pad([k for k, _ in b]) for b in blocks), tuple(len(b) for b in blocks),
                                   tuple(pad([w for _, w in b]) for b in blocks))
                self.check(cfg, num_units)
            else:
                raise ValueError("")
        except ValueError as e:
            raise ValueError(f"{text!r} is not a config of the space{f' ({e})' if str(e) else ''}: {form}") from None
        return cfg

    def check(self, cfg: SubnetConfig, num_units: int) -> None:
        """Raise ValueError unless cfg has num_units units of max_depth slots with every active choice in the space."""
        if not isinstance(cfg, SubnetConfig):
            raise ValueError(f"expected a SubnetConfig, got {type(cfg).__name__}")
        if cfg.num_units != num_units:
            raise ValueError(f"config has {cfg.num_units} units, the network has {num_units}")
        for u in range(num_units):
            if len(cfg.kernel[u]) != self.max_depth:
                raise ValueError(f"unit {u}: {len(cfg.kernel[u])} block slots, the space has max depth {self.max_depth}")
            if cfg.depth[u] not in self.depth:
                raise ValueError(f"unit {u}: depth {cfg.depth[u]} not in space.depth {list(self.depth)}")
            for b in range(cfg.depth[u]):
                if cfg.kernel[u][b] not in self.kernel:
                    raise ValueError(f"unit {u} block {b}: kernel {cfg.kernel[u][b]} not in space.kernel {list(self.kernel)}")
                if cfg.width[u][b] not in self.width:
                    raise ValueError(f"unit {u} block {b}: width {cfg.width[u][b]} not in space.width {list(self.width)}")


@dataclass(frozen=True)
class SubnetConfig:
    """One subnet: ``kernel[u][b]`` and ``width[u][b]`` per block slot, ``depth[u]`` per unit.

    Inactive slots (``b >= depth[u]``) are set to 0. Structural mistakes raise ValueError; whether the
    choices belong to a space is checked by ``ConfigSpace.check``.
    """

    kernel: tuple[tuple[int, ...], ...]
    depth: tuple[int, ...]
    width: tuple[tuple[Number, ...], ...]

    def __post_init__(self) -> None:
        try:
            kernel = tuple(tuple(unit) for unit in self.kernel)
            width = tuple(tuple(unit) for unit in self.width)
            depth = tuple(self.depth)
        except TypeError as e:
            raise ValueError(f"SubnetConfig: kernel and width must be lists of lists, depth a list ({e})") from None
        if not depth:
            raise ValueError("SubnetConfig: no units (depth is empty)")
        if len(kernel) != len(depth) or len(width) != len(depth):
            raise ValueError(
                f"SubnetConfig: {len(depth)} depths but {len(kernel)} kernel units and {len(width)} width units"
            )
        for u, (ks, ws, d) in enumerate(zip(kernel, width, depth)):
            if len(ks) != len(ws):
                raise ValueError(f"SubnetConfig: unit {u} has {len(ks)} kernel slots but {len(ws)} width slots")
            if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= len(ks):
                raise ValueError(f"SubnetConfig: unit {u} depth {d!r} not in 1..{len(ks)} (its block slots)")
            for b in range(d):
                k, w = ks[b], ws[b]
                if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
                    raise ValueError(f"SubnetConfig: unit {u} block {b} kernel {k!r} is not a positive odd integer")
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
                    raise ValueError(f"SubnetConfig: unit {u} block {b} width {w!r} is not a positive number")
        object.__setattr__(self, "kernel", tuple(ks[:d] + (0,) * (len(ks) - d) for ks, d in zip(kernel, depth)))
        object.__setattr__(self, "width", tuple(ws[:d] + (0,) * (len(ws) - d) for ws, d in zip(width, depth)))
        object.__setattr__(self, "depth", depth)

    @property
    def num_units(self) -> int:
        return len(self.depth)

    def active(self, unit: int) -> list[tuple[int, Number]]:
        """(kernel, width) of each active block of a unit."""
        d = self.depth[unit]
        return list(zip(self.kernel[unit][:d], self.width[unit][:d]))

    def uniform_values(self) -> tuple[int, int, Number] | None:
        """(kernel, depth, width) if every active block and unit uses the same values, else None."""
        ks = {k for u in range(self.num_units) for k, _ in self.active(u)}
        ws = {w for u in range(self.num_units) for _, w in self.active(u)}
        ds = set(self.depth)
        if len(ks) == len(ds) == len(ws) == 1:
            return ks.pop(), ds.pop(), ws.pop()
        return None

    def __str__(self) -> str:
        uniform = self.uniform_values()
        if uniform is not None:
            k, d, w = uniform
            return f"k{k}-d{d}-w{_fmt(w)}"
        units = [
            ".".join(f"{k}x{_fmt(w)}" for k, w in self.active(u)) for u in range(self.num_units)
        ]
        return "kxw-" + "|".join(units)

    def to_dict(self) -> dict[str, list]:
        return {"kernel": [list(u) for u in self.kernel], "depth": list(self.depth), "width": [list(u) for u in self.width]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubnetConfig:
        if not isinstance(data, dict) or set(data) != {"kernel", "depth", "width"}:
            raise ValueError(f"SubnetConfig: expected an object with keys kernel, depth, width, got {data!r}")
        return cls(kernel=data["kernel"], depth=data["depth"], width=data["width"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SubnetConfig:
        return cls.from_dict(json.loads(text))
