"""The DVC pipeline end to end: a real `dvc repro` of a tiny synthetic profile in a temporary git repo."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ofa import pipeline
from ofa.config import parse_params

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["download", "train_supernet", "shrink_kernel", "shrink_depth", "shrink_width", "evaluate_space"]


def tiny_params(**data) -> dict:
    """The shipped params.yaml shrunk to a net and schedule that run in seconds on a CPU."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"].update({"dataset": "synthetic", **data})
    p["net"] = {"stem_channels": 8, "stem_stride": 1, "final_channels": 32, "units": [
        {"channels": 8, "stride": 1, "activation": "relu", "se": False},
        {"channels": 16, "stride": 2, "activation": "hswish", "se": True}]}
    p["train"].update(batch_size=64, eval_batch_size=256, warmup_epochs=0.5, device="cpu")
    p["supernet"] = {"epochs": 2, "lr": 0.1}
    for phase in ("kernel", "depth", "width"):
        p["shrink"][phase].update(epochs=1, lr=0.05)
    p["evaluate"].update(bn_calibration_images=128, sampled_configs=1)
    p["evaluate"]["finetune"].update(epochs=1, lr=0.01, images_per_epoch=128)
    return p


def run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("stages", "ofa", ".dvc"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    git = ["git", "-C", str(repo)]
    run([*git, "init", "-q"], repo)
    run([*git, "config", "user.email", "test@localhost"], repo)
    run([*git, "config", "user.name", "test"], repo)
    run([*git, "add", "-A"], repo)
    run([*git, "commit", "-qm", "tiny profile"], repo)
    return repo


@pytest.fixture(scope="module")
def repro(project) -> tuple[Path, str, str]:
    """First `dvc repro` (all stages) and a second one (nothing)."""
    dvc = [sys.executable, "-m", "dvc"]
    first = run([*dvc, "repro"], project)
    second = run([*dvc, "repro"], project)
    return project, first, second


def test_repro_runs_six_stages_then_nothing(repro):
    _, first, second = repro
    assert ran(first) == STAGES
    assert ran(second) == []
    assert "Data and pipelines are up to date" in second


def test_exp_run_with_new_width_lr_reruns_exactly_two_stages(repro):
    project, _, _ = repro
    run(["git", "-C", str(project), "add", "-A"], project)
    run(["git", "-C", str(project), "commit", "-qm", "results"], project)
    out = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "shrink.width.lr=0.02"], project)
    assert ran(out) == ["shrink_width", "evaluate_space"]
    assert yaml.safe_load((project / "params.yaml").read_text())["shrink"]["width"]["lr"] == 0.02


def test_outputs_have_the_documented_shape(repro):
    project, _, _ = repro
    records = json.loads((project / "metrics" / "space.json").read_text())
    assert [r["config"] for r in records[:8]] == [
        f"k{k}-d{d}-w{w}" for k in (5, 7) for d in (2, 3) for w in (2, 4)]
    assert len(records) == 9  # 8 uniform + 1 sampled per-block config
    for r in records:
        assert {"config", "kernel", "depth", "width", "macs", "params", "accuracy", "accuracy_finetuned"} <= set(r)
        assert isinstance(r["macs"], int) and r["macs"] > 0 and isinstance(r["params"], int) and r["params"] > 0
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["accuracy_finetuned"] <= 1.0
    for r in records[:8]:
        assert r["config"] == f"k{r['kernel']}-d{r['depth']}-w{r['width']}"
    assert records[8]["kernel"] is None and records[8]["config"].startswith("kxw-")
    by = {r["config"]: r for r in records}
    assert by["k7-d3-w4"]["macs"] > by["k5-d3-w4"]["macs"] > by["k5-d2-w4"]["macs"] > by["k5-d2-w2"]["macs"]
    summary = json.loads((project / "metrics" / "evaluate_space.json").read_text())
    assert summary["configs"] == 9 and summary["accuracy_largest"] == by["k7-d3-w4"]["accuracy"]
    for stage in STAGES[1:5]:
        m = json.loads((project / "metrics" / f"{stage}.json").read_text())
        assert m["epochs"] >= 1 and 0 <= m["accuracy_max"] <= 1
        timing = json.loads((project / "metrics" / "timing" / f"{stage}.json").read_text())
        assert timing["images_per_s"] > 0 and timing["wall_s"] >= timing["train_s"] > 0 and timing["device"] == "cpu"
        assert ("accuracy_min" in m) == (stage != "train_supernet")
        assert (project / "models" / f"{stage}.pt").is_file()
        loss = (project / "metrics" / "live" / stage / "plots" / "metrics" / "train" / "loss.tsv").read_text()
        assert loss.splitlines()[0].split("\t") == ["step", "loss"] and len(loss.splitlines()) == m["epochs"] + 1
    shown = json.loads(run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], project))
    files = next(iter(shown.values()))["data"]
    assert {"metrics/train_supernet.json", "metrics/evaluate_space.json"} <= set(files)


def test_fashion_mnist_subset_trains_well_above_chance(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed (.ci/run installs it)")
    raw = tiny_params(dataset="fashion_mnist", train_limit=4000, test_limit=1000)
    raw["net"]["stem_stride"] = 2
    raw["supernet"] = {"epochs": 3, "lr": 0.2}
    raw["train"].update(crop_padding=2)
    params = parse_params(raw)
    info = pipeline.download(params, tmp_path)
    assert info == {"dataset": "fashion_mnist", "train_images": 4000, "test_images": 1000, "image_shape": [1, 28, 28]}
    metrics = pipeline.train_stage(params, "train_supernet", tmp_path, progress=False)
    assert metrics["accuracy_max"] >= 0.7, metrics  # chance is 0.1
