"""ConfigSpace and SubnetConfig: validation, normalisation, naming, JSON, grid and sampling."""

from __future__ import annotations

import itertools
import json
import random

import pytest

import ofa
from conftest import PAPER_SPACE, SEED_SPACE


def test_space_sorts_and_exposes_max_depth():
    space = ofa.ConfigSpace(kernel=[7, 3, 5], depth=[4, 2], width=[6, 3])
    assert space.kernel == (3, 5, 7) and space.depth == (2, 4) and space.width == (3, 6)
    assert space.max_depth == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kernel": (4, 7)}, "space.kernel: 4 is even"),
        ({"kernel": ()}, "space.kernel: empty"),
        ({"depth": (0, 2)}, "space.depth: 0 is not allowed"),
        ({"depth": (2.5,)}, "space.depth: 2.5 is not allowed"),
        ({"width": (-1, 4)}, "space.width: -1 is not allowed"),
        ({"width": (4, 4)}, "space.width: duplicate"),
        ({"kernel": "357"}, "space.kernel: expected a list"),
        ({"depth": (True, 2)}, "space.depth: True is not allowed"),
    ],
)
def test_space_rejects_bad_choices(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        ofa.ConfigSpace(**kwargs)


def test_inactive_slots_are_normalised():
    a = ofa.SubnetConfig(kernel=[[7, 5, 3]], depth=[2], width=[[4, 2, 6]])
    b = ofa.SubnetConfig(kernel=[[7, 5, 7]], depth=[2], width=[[4, 2, 4]])
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.kernel == ((7, 5, 0),) and a.width == ((4, 2, 0),)
    assert a != ofa.SubnetConfig(kernel=[[7, 5, 7]], depth=[3], width=[[4, 2, 4]])


def test_str_of_uniform_and_per_block_configs():
    assert str(SEED_SPACE.uniform(3, 5, 2, 4)) == "k5-d2-w4"
    assert str(PAPER_SPACE.uniform(1, 7, 4, 6)) == "k7-d4-w6"
    assert str(ofa.ConfigSpace(width=(0.5, 1.5)).uniform(2, 3, 2, 1.5)) == "k3-d2-w1.5"
    mixed = ofa.SubnetConfig(kernel=[[7, 5, 5], [5, 5, 5]], depth=[2, 3], width=[[4, 2, 2], [2, 2, 2]])
    assert str(mixed) == "kxw-7x4.5x2|5x2.5x2.5x2"
    # uniform values but unequal depths is not uniform
    assert mixed.uniform_values() is None
    assert ofa.SubnetConfig(kernel=[[5] * 3] * 2, depth=[2, 3], width=[[2] * 3] * 2).uniform_values() is None


def test_json_round_trip():
    rng = random.Random(3)
    configs = PAPER_SPACE.uniform_grid(3) + [PAPER_SPACE.sample(3, rng) for _ in range(20)]
    for cfg in configs:
        back = ofa.SubnetConfig.from_json(json.loads(json.dumps(cfg.to_json())))
        assert back == cfg and str(back) == str(cfg)
        assert ofa.SubnetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_uniform_grid_order_and_extremes():
    grid = SEED_SPACE.uniform_grid(2)
    assert [str(c) for c in grid] == [
        f"k{k}-d{d}-w{w}" for k, d, w in itertools.product((5, 7), (2, 3), (2, 4))
    ]
    assert SEED_SPACE.max_config(2) == grid[-1] and SEED_SPACE.min_config(2) == grid[0]
    assert len(PAPER_SPACE.uniform_grid(5)) == 27


def test_sampling_is_seeded_per_block_and_covers_the_space():
    a = [PAPER_SPACE.sample(4, random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(0)
    samples = [PAPER_SPACE.sample(4, rng) for _ in range(300)]
    for cfg in samples:
        PAPER_SPACE.check(cfg, 4)
    kernels = {k for c in samples for u in range(4) for k, _ in c.active(u)}
    widths = {w for c in samples for u in range(4) for _, w in c.active(u)}
    depths = {d for c in samples for d in c.depth}
    assert kernels == {3, 5, 7} and widths == {3, 4, 6} and depths == {2, 3, 4}
    # per block, not per network: some sample mixes kernels inside one unit
    assert any(len({k for k, _ in c.active(0)}) > 1 for c in samples)
    assert len(set(samples)) > 250


def test_sampling_only_some_dimensions_keeps_the_rest_at_max():
    rng = random.Random(0)
    for _ in range(50):
        cfg = PAPER_SPACE.sample(3, rng, depth=False, width=False)
        assert cfg.depth == (4, 4, 4)
        assert all(w == 6 for u in range(3) for _, w in cfg.active(u))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kernel": [[5, 5]], "depth": [3], "width": [[2, 2]]}, "unit 0 depth 3 not in 1..2"),
        ({"kernel": [[5, 5]], "depth": [0], "width": [[2, 2]]}, "unit 0 depth 0"),
        ({"kernel": [[4, 5]], "depth": [2], "width": [[2, 2]]}, "kernel 4 is not a positive odd"),
        ({"kernel": [[5, 5]], "depth": [2], "width": [[2, -2]]}, "width -2 is not a positive"),
        ({"kernel": [[5, 5]], "depth": [1, 1], "width": [[2, 2]]}, "2 depths but 1 kernel units"),
        ({"kernel": [[5, 5]], "depth": [2], "width": [[2, 2, 2]]}, "2 kernel slots but 3 width slots"),
        ({"kernel": 5, "depth": [2], "width": [[2, 2]]}, "must be lists of lists"),
        ({"kernel": [], "depth": [], "width": []}, "no units"),
    ],
)
def test_invalid_configs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ofa.SubnetConfig(**kwargs)


def test_space_check_names_what_is_wrong():
    with pytest.raises(ValueError, match=r"kernel 3 not in space.kernel \[5, 7\]"):
        SEED_SPACE.check(ofa.SubnetConfig(kernel=[[3, 5, 5]], depth=[2], width=[[2, 2, 2]]), 1)
    with pytest.raises(ValueError, match=r"width 3 not in space.width \[2, 4\]"):
        SEED_SPACE.check(ofa.SubnetConfig(kernel=[[5, 5, 5]], depth=[2], width=[[2, 3, 2]]), 1)
    with pytest.raises(ValueError, match=r"depth 1 not in space.depth \[2, 3\]"):
        SEED_SPACE.check(ofa.SubnetConfig(kernel=[[5, 5, 5]], depth=[1], width=[[2, 2, 2]]), 1)
    with pytest.raises(ValueError, match="config has 1 units, the network has 2"):
        SEED_SPACE.check(SEED_SPACE.uniform(1, 5, 2, 2), 2)
    with pytest.raises(ValueError, match="4 block slots, the space has max depth 3"):
        SEED_SPACE.check(ofa.SubnetConfig(kernel=[[5] * 4], depth=[2], width=[[2] * 4]), 1)
    with pytest.raises(ValueError, match="from_dict|keys kernel, depth, width"):
        ofa.SubnetConfig.from_dict({"kernel": [[5]], "depth": [1]})


def test_parse_reads_back_every_config_str_prints():
    """ConfigSpace.parse is str's inverse: the uniform grid, random per-block configs, and widths that hold a dot
    themselves ("7x1.5.5x1" is two blocks)."""
    rng = random.Random(0)
    fractional = ofa.ConfigSpace(kernel=(3, 5, 7), depth=(2, 3, 4), width=(0.75, 1, 1.5))
    for space, units in ((SEED_SPACE, 3), (PAPER_SPACE, 5), (fractional, 4)):
        configs = space.uniform_grid(units) + [space.sample(units, rng) for _ in range(300)]
        assert all(space.parse(str(c), units) == c for c in configs)
    two = fractional.parse("kxw-7x1.5.5x1|3x0.75.3x1.5", 2)
    assert (two.kernel, two.depth) == (((7, 5, 0, 0), (3, 3, 0, 0)), (2, 2))
    assert two.width == ((1.5, 1, 0, 0), (0.75, 1.5, 0, 0))


@pytest.mark.parametrize("text, why", [
    ("k3-d2-w4", " (unit 0 block 0: kernel 3 not in space.kernel [5, 7])"),
    ("k5-d4-w4", " (SubnetConfig: unit 0 depth 4 not in 1..3 (its block slots))"),
    ("kxw-7x4.5x4|5x4.5x2", ""),  # two units, the net has three
    ("kxw-7x4|5x4.5x2|7x2.7x2", " (unit 0: depth 1 not in space.depth [2, 3])"),
    ("kxw-7x3.5x4|5x4.5x2|7x2.7x2", ""),  # width 3 is no choice
    ("k5_d2_w4", ""),
])
def test_parse_names_the_string_and_the_space_when_it_is_no_config(text, why):
    with pytest.raises(ValueError) as e:
        SEED_SPACE.parse(text, 3)
    assert str(e.value) == (f"{text!r} is not a config of the space{why}: k<kernel>-d<depth>-w<width> or "
                            "kxw-<kernel>x<width>.<...>|<...> (3 units; kernels [5, 7], depths [2, 3], "
                            "widths ['2', '4'])")
