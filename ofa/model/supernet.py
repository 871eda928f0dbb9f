"""OFANet: the once-for-all supernet (stem -> elastic units -> final 1x1 -> pool -> classifier)."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from . import cost
from .elastic import ElasticMBBlock, ElasticUnit
from .space import ConfigSpace, Number, SubnetConfig
from .subnet import ACTIVATIONS, Subnet, classify, conv_bn_act, head_layers

INITS = ("he_fout", "torch")  # weight init of the stem, final layer, feature mix and classifier


@dataclass(frozen=True)
class UnitSpec:
    """One unit of the macro structure: output channels, stride of its first block, activation, squeeze-excite."""

    channels: int
    stride: int = 1
    activation: str = "relu"
    se: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"unit channels {self.channels!r} is not allowed (a positive integer)")
        if self.stride not in (1, 2):
            raise ValueError(f"unit stride {self.stride!r} is not allowed (1 or 2)")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unit activation {self.activation!r} is not allowed ({' or '.join(ACTIVATIONS)})")
        if not isinstance(self.se, bool):
            raise ValueError(f"unit se {self.se!r} is not allowed (true or false)")


# A MobileNetV3-style macro structure for 32x32 inputs: 32 -> 32 -> 16 -> 8 -> 8 -> 4 pixels.
CIFAR_UNITS: tuple[UnitSpec, ...] = (
    UnitSpec(24, 1, "relu", False),
    UnitSpec(40, 2, "relu", True),
    UnitSpec(80, 2, "hswish", False),
    UnitSpec(112, 1, "hswish", True),
    UnitSpec(160, 2, "hswish", True),
)


def architecture(
    space: ConfigSpace,
    in_channels: int = 3,
    num_classes: int = 10,
    units: Sequence[UnitSpec | Mapping] | None = None,
    stem_channels: int = 16,
    stem_stride: int = 1,
    final_channels: int = 640,
    classes: Sequence[str] | None = None,
    feature_mix_channels: int | None = None,
    dropout: float = 0.0,
) -> dict[str, Any]:
    """The supernet's architecture as plain JSON values (``OFANet.arch``), checked; no layer is built.

    What checkpoints, saved subnets and exports record, and all that ``cost.macs`` and ``cost.num_params``
    need: a stage can price a config (e.g. check budgets) without building or initialising a network.
    """
    if feature_mix_channels is not None and (isinstance(feature_mix_channels, bool) or not isinstance(
            feature_mix_channels, int) or feature_mix_channels < 1):
        raise ValueError(f"feature_mix_channels {feature_mix_channels!r} is not allowed (a positive integer or None)")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout {dropout!r} is not allowed (0 <= dropout < 1)")
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"classes: {len(classes)} names for num_classes {num_classes} (one name per class)")
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                        ("stem_channels", stem_channels), ("final_channels", final_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} {value!r} is not allowed (a positive integer)")
    if stem_stride not in (1, 2):
        raise ValueError(f"stem_stride {stem_stride!r} is not allowed (1 or 2)")
    specs = tuple(u if isinstance(u, UnitSpec) else UnitSpec(**u) for u in (CIFAR_UNITS if units is None else units))
    if not specs:
        raise ValueError("units: empty (at least one unit)")
    return json.loads(json.dumps({  # plain JSON values: saved with checkpoints and subnets
        "space": asdict(space), "in_channels": in_channels, "num_classes": num_classes,
        "units": [asdict(u) for u in specs], "stem_channels": stem_channels,
        "stem_stride": stem_stride, "final_channels": final_channels,
        "classes": None if classes is None else [str(c) for c in classes],
        "feature_mix_channels": feature_mix_channels, "dropout": float(dropout),
    }))


class OFANet(nn.Module):
    """The supernet: every subnet of `space` is ``net(x, cfg)``, and ``net.extract(cfg)`` cuts it out exactly.

    Each unit holds ``space.max_depth`` elastic blocks; the stem, the final 1x1 layer and the classifier are
    shared by all subnets (the last unit's output channels are fixed). ``classes``, the names of the
    classifier's outputs in order, go into ``arch`` and from there into checkpoints, saved subnets and exports.
    """

    def __init__(
        self,
        space: ConfigSpace,
        in_channels: int = 3,
        num_classes: int = 10,
        units: Sequence[UnitSpec | Mapping] | None = None,
        stem_channels: int = 16,
        stem_stride: int = 1,
        final_channels: int = 640,
        classes: Sequence[str] | None = None,
        feature_mix_channels: int | None = None,
        dropout: float = 0.0,
        init: str = "he_fout",
    ) -> None:
        """The arguments of ``architecture`` (checked there), and the weights' init (one of INITS)."""
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init {init!r} is not allowed ({' or '.join(INITS)})")
        self.space = space
        self.arch = arch = architecture(space, in_channels, num_classes, units, stem_channels, stem_stride,
                                        final_channels, classes, feature_mix_channels, dropout)
        specs = [UnitSpec(**u) for u in arch["units"]]
        in_channels, stem_channels, stem_stride = arch["in_channels"], arch["stem_channels"], arch["stem_stride"]
        self.stem = conv_bn_act(in_channels, stem_channels, 3, stem_stride, specs[0].activation)
        blocks_in = stem_channels
        units_ = []
        for spec in specs:
            blocks = []
            for i in range(space.max_depth):
                blocks.append(ElasticMBBlock(
                    blocks_in, spec.channels, spec.stride if i == 0 else 1,
                    space.kernel, space.width, spec.activation, spec.se,
                ))
                blocks_in = spec.channels
            units_.append(ElasticUnit(blocks))
        self.units = nn.ModuleList(units_)
        self.final = conv_bn_act(blocks_in, arch["final_channels"], 1, 1, specs[-1].activation)
        self.mix, self.dropout, self.classifier = head_layers(arch["final_channels"], arch["num_classes"],
                                                              arch["feature_mix_channels"], arch["dropout"])
        self._init_head(init)

    def _init_head(self, init: str) -> None:
        """he_fout (official OFA): every conv N(0, 2 / (k*k*out)) like the elastic ones, the classifier
        U(+-1/sqrt(in)); torch: PyTorch's default for the stem, final and mix convs, the classifier N(0, 0.01)."""
        if init == "he_fout":
            for m in (*self.stem.modules(), *self.final.modules(), *(self.mix.modules() if self.mix else ())):
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out")
            bound = 1 / self.classifier.in_features ** 0.5
            nn.init.uniform_(self.classifier.weight, -bound, bound)
        else:
            nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    @property
    def num_units(self) -> int:
        return len(self.units)

    def uniform_config(self, kernel: int, depth: int, width: Number) -> SubnetConfig:
        return self.space.uniform(self.num_units, kernel, depth, width)

    def sample_config(self, rng: random.Random, *, kernel: bool = True, depth: bool = True, width: bool = True) -> SubnetConfig:
        """A random subnet: kernel and width per block, depth per unit; dimensions not sampled stay at max."""
        return self.space.sample(self.num_units, rng, kernel=kernel, depth=depth, width=width)

    def max_config(self) -> SubnetConfig:
        return self.space.max_config(self.num_units)

    def min_config(self) -> SubnetConfig:
        return self.space.min_config(self.num_units)

    def uniform_configs(self) -> list[SubnetConfig]:
        """Every uniform config (kernel x depth x width), the grid of the seed's Table 2."""
        return self.space.uniform_grid(self.num_units)

    def check_config(self, cfg: SubnetConfig) -> None:
        """Raise ValueError unless cfg is a subnet of this network."""
        self.space.check(cfg, self.num_units)

    def macs(self, cfg: SubnetConfig, input_shape: Sequence[int]) -> int:
        """Exact MACs of subnet cfg on one (C, H, W) image, from the config alone (equals count_macs of the extract)."""
        self.check_config(cfg)
        return cost.macs(self.arch, cfg, input_shape)

    def num_params(self, cfg: SubnetConfig) -> int:
        """Exact parameter count of subnet cfg, from the config alone (equals count_params of the extract)."""
        self.check_config(cfg)
        return cost.num_params(self.arch, cfg)

    def forward(self, x: torch.Tensor, cfg: SubnetConfig | None = None) -> torch.Tensor:
        cfg = self.max_config() if cfg is None else cfg
        self.check_config(cfg)
        x = self.stem(x)  # (B, stem, H, W)
        for u, unit in enumerate(self.units):
            x = unit(x, cfg.kernel[u], cfg.width[u], cfg.depth[u])
        x = self.final(x)  # (B, final, H', W')
        return classify(x, self.mix, self.dropout, self.classifier)

    def extract(self, cfg: SubnetConfig) -> Subnet:
        """The subnet `cfg` as plain torch layers holding copies of exactly the weights it computes with."""
        self.check_config(cfg)
        units = nn.Sequential(*(
            unit.extract(cfg.kernel[u], cfg.width[u], cfg.depth[u]) for u, unit in enumerate(self.units)
        ))
        subnet = Subnet(copy.deepcopy(self.stem), units, copy.deepcopy(self.final), copy.deepcopy(self.classifier), cfg,
                        copy.deepcopy(self.arch), copy.deepcopy(self.mix), copy.deepcopy(self.dropout))
        return subnet.train(self.training)

    @torch.no_grad()
    def sort_channels(self, protect: Sequence[float] = ()) -> None:
        """Reorder every block's middle channels by importance so that narrower subnets keep the most important.

        Widths in `protect` keep their channels (sorted within), as when a second phase adds a smaller width.
        """
        for unit in self.units:
            for block in unit.blocks:
                block.sort_channels(protect)
