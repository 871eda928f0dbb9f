"""The baseline's length and the comparison's projection, without training: the schedule's epochs and images, the
epochs of a config trained alone, and the seconds of Table 2's configs projected from those measured."""

from __future__ import annotations

import pytest

from conftest import committed_params
from ofa.pipeline import compare
from ofa.pipeline.baseline import baseline_phase, config_seed, file_name, schedule_length
from ofa.pipeline.compare import seconds_per_image, totals
from ofa.pipeline.config import parse_params


def params(**changes):
    raw = committed_params()
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = value
    return parse_params(raw)


def test_the_schedule_is_every_training_stage_with_its_first_phases():
    p = params()  # 180 + 25 + 25 + 25 epochs of the whole split; two depths and widths: no first phases
    assert schedule_length(p, p.space.build(), 45000) == (255, 255 * 45000)
    p = params(**{"space.width": [2, 3, 4], "shrink.kernel.images_per_epoch": 1000})  # 3 widths: a first phase
    assert schedule_length(p, p.space.build(), 45000) == (280, 180 * 45000 + 25 * 1000 + 75 * 45000)
    q = params(**{"supernet.images_per_epoch": 90000})  # more than the split: the split
    assert schedule_length(q, q.space.build(), 45000) == (255, 255 * 45000)


def test_a_baseline_sees_the_schedules_images_or_its_own_epochs_of_the_average_epoch():
    p = params(**{"supernet.epochs": 2, "shrink.kernel.epochs": 1, "shrink.kernel.images_per_epoch": 7500,
                  "shrink.depth.epochs": 1, "shrink.depth.images_per_epoch": 7500, "shrink.width.epochs": 1,
                  "shrink.width.images_per_epoch": 40000, "supernet.lr": 0.2})
    phase = baseline_phase(p, p.space.build(), 55000)  # the quick profile's: 165000 images in 5 epochs
    assert (phase.epochs, phase.images_per_epoch, phase.lr) == (5, 33000, 0.2)
    p = params(**{"baseline.epochs": 2, "baseline.lr": 0.05})
    phase = baseline_phase(p, p.space.build(), 45000)
    assert (phase.epochs, phase.images_per_epoch, phase.lr) == (2, None, 0.05)  # None: the whole split


def test_a_configs_seed_and_file_are_its_own():
    p = params()
    space = p.space.build()
    small, large = space.min_config(5), space.max_config(5)
    assert config_seed(0, small) == config_seed(0, small) != config_seed(0, large) != config_seed(1, large)
    pick = space.parse("kxw-7x4.5x2|7x2.5x2|5x4.5x4|7x4.7x2|5x2.5x2", 5)
    assert file_name(pick) == "kxw-7x4.5x2_7x2.5x2_5x4.5x4_7x4.7x2_5x2.5x2.pt" and file_name(large) == "k7-d3-w4.pt"


def test_seconds_per_image_is_a_line_in_macs_or_proportional_to_them():
    line = seconds_per_image([(1_000_000, 0.001), (3_000_000, 0.002)])
    assert line(2_000_000) == pytest.approx(0.0015) and line(5_000_000) == pytest.approx(0.003)
    one = seconds_per_image([(2_000_000, 0.004)])
    assert one(1_000_000) == pytest.approx(0.002)
    falling = seconds_per_image([(1_000_000, 0.003), (3_000_000, 0.001)])  # noise: no line through it
    assert falling(2_000_000) == pytest.approx(0.5 * (0.003 + 0.001 / 3) * 2)
    assert seconds_per_image([]) is None


def test_totals_measure_the_trained_and_project_the_rest_of_table_2():
    rows = [{"config": c, "macs": m, "alone": {"train_s": s, "images": 1000}}
            for c, m, s in (("a", 1_000_000, 10.0), ("pick", 2_000_000, 15.0), ("b", 3_000_000, 20.0))]
    table2 = [("a", 1_000_000), ("c", 4_000_000), ("b", 3_000_000)]
    alone = {"epochs": 2, "images_per_epoch": 500}
    t = totals(rows, table2, alone, {"train_s": 50.0, "images": 3000})
    assert t["alone"]["measured_s"] == {"a": 10.0, "b": 20.0}  # Table 2's only: the pick is not in it
    assert t["alone"]["projected_s"] == {"c": 25.0} and t["alone"]["train_s"] == 55.0
    assert t["alone_over_supernet"] == 1.1 and t["table2_configs"] == 3
    none = totals([], table2, alone, {"train_s": 50.0, "images": 3000})
    assert none["alone"]["projected_s"] is None and "train_s" not in none["alone"]
    result = {"configs": rows, "totals": t}
    assert compare.totals_line(result).endswith("(1000 images each; 2 measured, 1 projected from seconds per image "
                                                "linear in MACs): 1.1x the supernet's")
    one = totals(rows[:1], table2, alone, {"train_s": 50.0, "images": 3000})  # one config: proportional to MACs
    assert one["alone"]["projected_s"] == {"c": 40.0, "b": 30.0}
    assert "(1000 images each; 1 measured, 2 projected in proportion to MACs): 1.6x" in compare.totals_line(
        {"configs": rows[:1], "totals": one})
