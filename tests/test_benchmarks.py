"""The benchmarks run: schedule.py's projection is the schedule times the measured speeds and it runs every
phase; scaling.py, elastic_overhead.py and cost.py print their tables on tiny settings (the figures are theirs to
give)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from ofa.pipeline.config import parse_params
from test_pipeline import ROOT, tiny_params


@pytest.fixture(scope="module")
def schedule_bench():
    spec = importlib.util.spec_from_file_location("schedule_bench", ROOT / "benchmarks" / "schedule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_projection_is_the_schedule_times_the_measured_speeds(schedule_bench):
    raw = tiny_params()
    raw["shrink"]["width"]["first_phase"] = {"epochs": 2, "lr": 0.01}
    raw["space"]["width"] = [2, 3, 4]  # a second width phase
    raw["evaluate"].update(sampled_configs=3)
    raw["evaluate"]["finetune"].update(epochs=2, images_per_epoch=None)
    raw["specialize"].update(trials=20, budgets=[800000, 900000, 1000000], population=None)
    params = parse_params(raw)
    rows = [{"stage": "train_supernet", "phase": "-", "epochs": 2, "images": None, "subnets": 1, "images_per_s": 100.0},
            {"stage": "shrink_kernel", "phase": "-", "epochs": 1, "images": 400, "subnets": 1, "images_per_s": 50.0},
            {"stage": "shrink_depth", "phase": "-", "epochs": 1, "images": None, "subnets": 2, "images_per_s": 40.0},
            {"stage": "shrink_width", "phase": "phase1", "epochs": 2, "images": None, "subnets": 2,
             "images_per_s": 25.0},
            {"stage": "shrink_width", "phase": "-", "epochs": 1, "images": None, "subnets": 2, "images_per_s": 20.0}]
    small = {"calibrate_s": 1.0, "evaluate_per_s": 1000.0, "finetune_per_s": 200.0}
    large = {"calibrate_s": 3.0, "evaluate_per_s": 500.0, "finetune_per_s": 100.0}
    subnets = {"smallest": small, "largest": large, "middling": {"calibrate_s": 2.0, "evaluate_per_s": 750.0,
                                                                 "finetune_per_s": 150.0}}
    parts = schedule_bench.project(params, rows, subnets, n_train=1000, n_val=300, n_test=1500, grid=12)
    got = {(stage, what.split(",")[0].split(":")[0]): seconds for stage, what, seconds, _ in parts}
    assert got[("train_supernet", "train 2 epochs x 1000 images")] == 2 * 1000 / 100
    assert got[("shrink_kernel", "train 1 epochs x 400 images")] == 400 / 50  # its images_per_epoch
    assert got[("shrink_width", "train 2 epochs x 1000 images")] == 2 * 1000 / 25  # the first phase
    assert got[("shrink_width", "train 1 epochs x 1000 images")] == 1000 / 20
    assert got[("train_supernet", "val after each of 2 epochs")] == 2 * (3 + 300 / 500) + (3 + 1500 / 500)
    assert got[("shrink_width", "val after each of 3 epochs")] == 3 * (3 + 300 / 500) + (3 + 1500 / 500) + (
        1 + 1500 / 1000)  # the max config's val each epoch; the max and the min config on test at the end
    assert got[("evaluate_space", "15 configs")] == 15 * (2 + 1500 / 750 + 2 * 1000 / 150 + 1500 / 750)
    assert got[("specialize", "20 trials on val")] == 20 * (2 + 300 / 750) + 2 * 3 * (2 + 1500 / 750)
    images = 7 * 1000  # the baseline, min and max: the params' schedule, 7 epochs of the whole split
    assert got[("baseline", "2 configs alone")] == images / 200 + 1800 / 1000 + images / 100 + 1800 / 500
    assert len(parts) == 2 * 4 + 1 + 3  # train + evaluations per stage (width: two phases), the last three stages


def test_the_schedule_benchmark_measures_every_phase_of_a_tiny_net(schedule_bench, tmp_path, capsys):
    raw = tiny_params()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    schedule_bench.main(["--params", str(tmp_path / "params.yaml"), "--steps", "2", "-S", "supernet.epochs=5"])
    out = capsys.readouterr().out.splitlines()
    assert " train 5 epochs x 384 images" in out[1]  # the override, applied as dvc exp run -S applies it
    stages = [line.split()[0] for line in out[1:-1]]
    assert stages == ["train_supernet"] * 2 + ["shrink_kernel"] * 2 + ["shrink_depth"] * 2 + ["shrink_width"] * 2 + [
        "evaluate_space", "baseline", "specialize"]
    for line in out[1:-1:2][:4]:  # a measured speed beside each training row
        assert re.match(r"^\w+ +\d+\.\d +\d+m \d\ds  train \d+ epochs x 384 images", line), line
    assert re.match(r"^total +\d+m \d\ds  on cpu, one process$", out[-1]), out[-1]


def test_the_schedule_benchmark_refuses_a_bad_override_in_one_line(schedule_bench, capsys):
    with pytest.raises(SystemExit) as info:
        schedule_bench.main(["-S", "supernet.epochs=many"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(": error: supernet.epochs: got 'many' (an integer)")


def _bench(script: str, *args: str) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_scaling_benchmark_measures_one_and_two_processes():
    out = _bench("scaling.py", "--processes", "1", "2", "--steps", "2", "--batch-size", "16", "--subnets", "1",
                 "--device", "cpu")
    assert out[0] == "net quick, batch 16, 1 subnets per step, teacher (kd_ratio 1), device cpu"
    one, two = out[2:]
    assert re.match(r"^ +1 +ours +\d+\.\d +1\.00 +\d+\.\d +- +- +-  \(cpu\)$", one), one
    assert re.match(r"^ +2 +ours +\d+\.\d +\d\.\d\d +\d+\.\d +\d+\.\d\d +\d+\.\d\d +\d+\.\d%  \(cpu\)$", two), two


def test_the_overhead_benchmark_times_profiles_and_splits_the_step_of_three_configs():
    out = _bench("elastic_overhead.py", "--pairs", "2", "--repeats", "2", "--warmup", "0", "--batch", "2",
                 "--threads", "1", "--formats", "channels_last")
    assert [line.split()[:3] for line in out[2:]] == [["channels_last", "min", "k3-d2-w3"],
                                                      ["channels_last", "middle", "k5-d3-w4"],
                                                      ["channels_last", "max", "k7-d4-w6"]]
    for line in out[2:]:  # ratio, pairs' median, IQR, 95% interval, then the ratio of each of the 2 rounds
        assert re.fullmatch(r".*( +\d\.\d{3}){2}( +\d\.\d{3}-\d\.\d{3}){2}( +\d\.\d{3}){2}", line), line
    out = _bench("elastic_overhead.py", "--profile", "min", "--steps", "1", "--rounds", "1", "--warmup", "0",
                 "--batch", "2", "--threads", "1", "--rows", "3")
    assert out[0].startswith("k3-d2-w3 (channels_last), 1 profiled steps each: supernet ")
    assert len(out) == 2 + 3 + 1 and out[-1].startswith("total self CPU")
    out = _bench("elastic_overhead.py", "--parts", "--pairs", "2", "--warmup", "0", "--batch", "2", "--threads", "1",
                 "--formats", "channels_last")
    assert [line.split()[::2][:2] for line in out[2:]] == [[c, m] for c in ("min", "middle", "max")
                                                            for m in ("supernet", "subnet", "difference")]
    for sup, sub, diff in zip(out[2::3], out[3::3], out[4::3]):  # forward, backward, optimizer, step: a difference
        values = [[float(v) for v in line.split()[3:]] for line in (sup, sub, diff)]
        assert len(values[0]) == 4 and all(abs(a - b - d) < 0.016 for a, b, d in zip(*values)), (sup, sub, diff)


def test_the_cost_benchmark_checks_every_config_and_prints_both_ratios():
    out = _bench("cost.py", "--configs", "1", "--threads", "1")
    assert out[0].startswith("9 configs of the default CIFAR-10 network, 3x32x32, 1 threads: all equal")
    assert [line.split()[0] for line in out[2:]] == ["macs", "num_params", "both"]
    for line in out[2:]:  # from the config; on the extracted subnet and the ratio; with extraction and the ratio
        assert re.fullmatch(r"\w+ +[\d.]+ us +[\d.]+ ms +\d+x +[\d.]+ ms +\d+x", line), line


def test_the_latency_benchmark_prints_the_tables_figures():
    out = _bench("latency.py", "--configs", "2", "--runtime", "torch")
    assert out[0].startswith(f"torch {torch.__version__}, 1 thread(s), batch 1, ")
    assert re.match(r"^table: 24 block variants, stem, head, overhead \d+\.\d{4} ms; built in \d+\.\d s$", out[1])
    assert re.match(r"^10 configs measured whole in \d+\.\d s: \d+\.\d{4}-\d+\.\d{4} ms$", out[2]), out[2]
    assert re.match(r"^predicted vs measured: Kendall tau -?\d\.\d{3}, mean abs error \d+\.\d%, within \+-10%: "
                    r"\d+%, mean predicted / measured \d+\.\d{3}$", out[3]), out[3]
    assert re.match(r"^MACs vs measured: Kendall tau -?\d\.\d{3}$", out[4]), out[4]


def test_the_evaluation_benchmark_times_calibration_and_evaluation_at_each_batch_size_of_both_ends(tmp_path):
    raw = tiny_params(image_size=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = _bench("evaluation.py", "--params", str(tmp_path / "params.yaml"), "--batches", "16", "64",
                 "--images", "128", "--repeats", "1", "--threads", "1")
    params = parse_params(raw)
    assert out[0] == (f"{params.data.dataset} 3x8x8, 1 threads, 128 images evaluated, "
                      f"{params.evaluate.bn_calibration_images} calibrated, medians of 1 runs "
                      f"(train.eval_batch_size {params.train.eval_batch_size})")
    for name, start in (("min", 2), ("max", 6)):
        assert out[start].split()[:2] == [name, "config"], out
        rows = out[start + 1:start + 3]
        assert [int(line.split()[0]) for line in rows] == [16, 64]
        for line in rows:
            assert re.fullmatch(r" +\d+ +\d+ \( *\d+\.\d\dx\) +\d+ \( *\d+\.\d\dx\) +\d+%", line), line
        assert rows[1].count("( 1.00x)") == 2  # the largest batch is the reference


def test_the_depthwise_benchmark_times_every_conv_of_the_max_config_and_a_step_of_both_ends(tmp_path):
    raw = tiny_params(image_size=8)  # 8x8 images: the last unit's maps are 4x4, under the max config's 7x7 kernels
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = _bench("depthwise.py", "--params", str(tmp_path / "params.yaml"), "--pairs", "1", "--batch", "4",
                 "--threads", "1")
    params = parse_params(raw)
    assert out[0] == f"{params.data.dataset} 3x8x8, batch 4, 1 threads, medians of 1 runs"
    convs = out[3:out.index("", 3)]
    assert convs and all(re.fullmatch(r" +\d+ channels \d+x\d+, kernel \d, stride [12].* +\d+\.\d +\d+\.\d +\d+\.\d\dx",
                                      line) for line in convs), convs
    assert [line.split()[2] for line in convs if "(kernel wider than the map)" in line] == ["4x4,"]  # unit 2, 7x7
    steps = out[-2:]
    assert [line.split()[0] for line in steps] == ["min", "max"]
    for line in steps:
        assert re.fullmatch(r" +(min|max) +\d+ \( *\d+\) +\d+ \( *\d+\) +\d+\.\d\dx", line), line
