"""The DVC pipeline end to end: a real `dvc repro` of a tiny profile in a temporary git repo, on a user's own
image folders (PNG and JPEG of several sizes, one grayscale): classes and input shape come from the data."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FOLDER_CLASSES, committed_params, committed_text, without_onnxruntime, write_folder
import ofa
from ofa import data as data_mod
from ofa.data import memory
from ofa.deploy.latency import kendall_tau
from ofa.model import ConfigSpace, SubnetConfig
from ofa.pipeline import context, download, training
from ofa.pipeline.config import ParamsError, parse_params
from ofa.train import DeviceData

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["download", "latency", "train_supernet", "shrink_kernel", "shrink_depth", "shrink_width", "baseline",
          "evaluate_space", "compare", "specialize"]  # in the order dvc repro runs them
TRAINING = STAGES[2:6]


def tiny_params(**data) -> dict:
    """The shipped params.yaml shrunk to a net and schedule that run in seconds on a CPU."""
    p = committed_params()
    p["data"].update({"dataset": "synthetic", "val_images": 128, **data})
    p["net"] = {"stem_channels": 8, "stem_stride": 1, "final_channels": 32, "units": [
        {"channels": 8, "stride": 1, "activation": "relu", "se": False},
        {"channels": 16, "stride": 2, "activation": "hswish", "se": True}]}
    p["train"].update(batch_size=64, eval_batch_size=256, warmup_epochs=0.5, device="cpu")
    p["supernet"] = {"epochs": 2, "lr": 0.1}
    for phase in ("kernel", "depth", "width"):
        p["shrink"][phase].update(epochs=1, lr=0.05)
    p["shrink"]["width"]["subnets_per_step"] = 2  # of 4: the tests need the mechanics, not the schedule
    p["evaluate"].update(bn_calibration_images=128, sampled_configs=1)
    p["evaluate"]["finetune"].update(epochs=1, lr=0.01, images_per_epoch=128)
    p["specialize"].update(budgets=[800000, 1500000], trials=14, population=8)  # the space: 0.62M-2.55M MACs
    p.setdefault("latency", {}).update(runtime="torch", validate=2)  # eager: no export per part, seconds in all
    return p


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def new_project(repo: Path, params: dict) -> Path:
    """A git repo holding the pipeline (dvc.yaml, stages, ofa) and `params` as params.yaml, committed."""
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("stages", "ofa", ".dvc"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    (repo / "latency_tables").mkdir()  # as committed: the workspace's may hold a user's tables
    (repo / "latency_tables" / "README.md").write_text(committed_text("latency_tables/README.md"))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-C", str(repo)]
    run([*git, "init", "-q"], repo)
    run([*git, "config", "user.email", "test@localhost"], repo)
    run([*git, "config", "user.name", "test"], repo)
    run([*git, "add", "-A"], repo)
    run([*git, "commit", "-qm", "tiny profile"], repo)
    return repo


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    source = write_folder(tmp_path_factory.mktemp("images"), {"train": 20, "test": 6})
    raw = tiny_params(dataset="folder", source_dir=str(source), image_size=16, val_images=12)
    return new_project(tmp_path_factory.mktemp("project"), raw)


@pytest.fixture(scope="module")
def repro(project) -> tuple[Path, str, str]:
    """First `dvc repro` (all stages) and a second one (nothing)."""
    dvc = [sys.executable, "-m", "dvc"]
    first = run([*dvc, "repro"], project)
    second = run([*dvc, "repro"], project)
    return project, first, second


def test_repro_runs_every_stage_then_nothing(repro):
    _, first, second = repro
    assert ran(first) == STAGES
    assert ran(second) == []
    assert "Data and pipelines are up to date" in second


def test_specialize_picks_within_budget_beat_uniform_on_val_and_export_what_they_report(repro):
    import numpy as np
    import onnxruntime
    import torch

    import ofa
    from ofa.train import DeviceData, evaluate

    project, _, _ = repro
    summary = json.loads((project / "metrics" / "picks.json").read_text())
    searched = json.loads((project / "metrics" / "search.json").read_text())
    assert summary["configs_evaluated"] == len(searched) >= 8 and summary["trials"] == 14
    timing = json.loads((project / "metrics" / "timing" / "specialize.json").read_text())
    assert (timing["configs_scored"], timing["configs_reused"]) == (len(searched), 0)  # a first search
    assert [r["uniform"] for r in searched[:8]] == [True] * 8  # the first generation holds every uniform config
    assert len({r["config"] for r in searched}) == len(searched)
    assert json.loads((project / "metrics" / "predictor.json").read_text()) == {"strategy": "direct", "records": []}
    assert json.loads((project / "metrics" / "search_plot" / "predictor_held_out.json").read_text()) == []
    front = [r for r in searched if r["pareto"]]
    assert summary["pareto_front"] == len(front) >= 1
    point = lambda r: (r["macs"], r["val_accuracy"])  # noqa: E731
    dominated = lambda r: any(o["macs"] <= r["macs"] and o["val_accuracy"] >= r["val_accuracy"]  # noqa: E731
                              and point(o) != point(r) for o in searched)
    assert sorted(point(r) for r in front) == sorted({point(r) for r in searched if not dominated(r)})
    plot = json.loads((project / "metrics" / "search_plot" / "pareto_front.json").read_text())
    assert [p["config"] for p in plot] == [r["config"] for r in front]
    data = DeviceData.load(project / "data" / "prepared", torch.device("cpu"))
    space = {r["config"]: r for r in json.loads((project / "metrics" / "space.json").read_text())}
    mean, std = summary["input"]["mean"], summary["input"]["std"]
    assert list(summary["budgets"]) == ["macs-0.8M", "macs-1.5M"]
    for name, pick in summary["budgets"].items():
        budget, uniform = pick["budget"], pick["uniform"]
        fits = [r for r in searched if r["macs"] <= budget]
        assert pick["macs"] <= budget and uniform["macs"] <= budget
        assert pick["val_accuracy"] == max(r["val_accuracy"] for r in fits)
        assert uniform["val_accuracy"] == max(r["val_accuracy"] for r in fits if r["uniform"]) <= pick["val_accuracy"]
        assert 0 <= pick["accuracy"] <= 1 and 0 <= uniform["accuracy"] <= 1 and pick["onnx_max_abs_diff"] <= 1e-4
        sub = ofa.load_subnet(project / "models" / "specialized" / f"{name}.pt")
        assert str(sub.config) == pick["config"] and ofa.count_macs(sub, (1, 3, 16, 16)) == pick["macs"]
        assert evaluate(sub.to(memory_format=torch.channels_last), data, batch_size=256) == pick["accuracy"]
        assert uniform["accuracy"] == space[uniform["config"]]["accuracy"]  # evaluate_space's calibration
        pixels = data.val.images[:32].float()
        with torch.no_grad():
            expected = sub((pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1))
        session = onnxruntime.InferenceSession(str(project / "models" / "specialized" / f"{name}.onnx"))
        got = session.run(None, {"pixels": pixels.numpy()})[0]
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)


def test_curves_and_the_search_score_on_val_and_report_on_test(repro):
    """Recomputed from the final checkpoint: the val curve, the stage metrics and the search's scores are
    accuracies on val, the reported ones on test (swapping a split anywhere changes a figure here)."""
    import csv

    import torch

    import ofa
    from ofa.pipeline import context
    from ofa.pipeline.config import load_params
    from ofa.model.space import SubnetConfig
    from ofa.train import calibrate_bn, subnet_accuracy

    p, _, _ = repro
    params = load_params(p / "params.yaml")
    bs = params.train.eval_batch_size

    def accuracies(stage: str, cfg_of: object) -> tuple[float, float]:
        ctx = context.StageContext.open(params, p, stage)  # the stage's own BN calibration images
        ctx.load("shrink_width")
        cfg = cfg_of(ctx.net)
        return tuple(subnet_accuracy(ctx.net.eval(), cfg, ctx.data, ctx.calibration, bs, split)
                     for split in ("val", "test"))

    metrics = json.loads((p / "metrics" / "shrink_width.json").read_text())
    with open(p / "metrics" / "live" / "shrink_width" / "plots" / "metrics" / "val" / "accuracy_max.tsv") as f:
        curve = list(csv.DictReader(f, delimiter="\t"))
    val, test = accuracies("shrink_width", lambda net: net.max_config())
    assert float(curve[-1]["accuracy_max"]) == metrics["val_accuracy_max"] == val
    assert metrics["accuracy_max"] == test
    pick = json.loads((p / "metrics" / "picks.json").read_text())["budgets"]["macs-1.5M"]
    record = next(r for r in json.loads((p / "metrics" / "search.json").read_text()) if r["config"] == pick["config"])
    val, test = accuracies("specialize", lambda net: SubnetConfig.from_dict(record["subnet"]))
    assert record["val_accuracy"] == pick["val_accuracy"] == val and pick["accuracy"] == test
    # the export holds the subnet that was scored: extracted, then BN-calibrated on evaluate_space's images
    ctx = context.StageContext.open(params, p, "specialize")
    ctx.load("shrink_width")
    expected = ctx.net.extract(SubnetConfig.from_dict(record["subnet"]))
    calibrate_bn(expected, ctx.calibration)
    exported = ofa.load_subnet(p / "models" / "specialized" / "macs-1.5M.pt").state_dict()
    assert exported.keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(exported[name], tensor), name
    assert val != test  # on this data the two splits give the pick different accuracies: the test tells them apart


def test_folder_dataset_runs_every_stage_with_its_own_classes(repro):
    import onnx
    import torch

    import ofa

    p, _, _ = repro
    assert json.loads((p / "data" / "prepared" / "classes.json").read_text()) == FOLDER_CLASSES
    info = {name: torch.load(p / "data" / "prepared" / f"{name}.pt", weights_only=True) for name in ("train", "val", "test")}
    assert [len(info[s]["labels"]) for s in ("train", "val", "test")] == [48, 12, 18]
    assert tuple(info["train"]["images"].shape[1:]) == (3, 16, 16)
    assert sorted(set(info["test"]["labels"].tolist())) == [0, 1, 2]
    ckpt = torch.load(p / "models" / "shrink_width.pt", weights_only=True)
    assert ckpt["arch"]["num_classes"] == 3 and ckpt["arch"]["classes"] == FOLDER_CLASSES
    assert ckpt["state_dict"]["classifier.weight"].shape[0] == 3
    summary = json.loads((p / "metrics" / "picks.json").read_text())
    assert summary["classes"] == FOLDER_CLASSES
    sub = ofa.load_subnet(p / "models" / "specialized" / "macs-1.5M.pt")
    assert sub.classes == FOLDER_CLASSES and sub(torch.zeros(2, 3, 16, 16)).shape == (2, 3)
    model = onnx.load(p / "models" / "specialized" / "macs-1.5M.onnx")
    meta = {m.key: m.value for m in model.metadata_props}
    assert json.loads(meta["ofa.classes"]) == FOLDER_CLASSES
    space = json.loads((p / "metrics" / "space.json").read_text())
    assert len(space) == 9 and all(0 <= r["accuracy"] <= 1 for r in space)


def test_a_corrupt_image_is_named_before_any_training(tmp_path):
    source = write_folder(tmp_path / "images", {"train": 3, "test": 2}, corrupt="train/dog/002.png")
    (tmp_path / "p").mkdir()
    raw = tiny_params(dataset="folder", source_dir=str(source), image_size=16, val_images=2)
    (tmp_path / "p" / "params.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, str(ROOT / "stages" / "download.py")], cwd=tmp_path / "p",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(source / "train" / "dog" / "002.png") in last, result.stderr
    assert not (tmp_path / "p" / "data" / "prepared").exists()


def test_a_folders_val_is_the_validation_split_and_train_is_all_of_train(tmp_path):
    source = write_folder(tmp_path / "images", {"train": 4, "test": 2, "val": 3})
    raw = tiny_params(dataset="folder", source_dir=str(source), image_size=16, val_images=1000)  # unused here
    summary = download.download(parse_params(raw), tmp_path)
    assert (summary["train_images"], summary["val_images"], summary["test_images"]) == (12, 9, 6)
    ds = data_mod.prepare("folder", tmp_path / "unused", source_dir=source, image_size=16, progress=False)
    for name in ("train", "val", "test"):
        saved = data_mod.load_split(tmp_path / "data" / "prepared" / f"{name}.pt")
        split = getattr(ds, name)
        assert torch.equal(saved.images, split.images) and torch.equal(saved.labels, split.labels), name


def test_a_relative_or_home_source_dir_is_found_from_the_project(tmp_path, monkeypatch):
    write_folder(tmp_path / "project" / "images", {"train": 4, "test": 2, "val": 3})
    monkeypatch.setenv("HOME", str(tmp_path / "project"))
    monkeypatch.chdir(tmp_path)  # not the project: a relative path is the project's
    for source_dir in ("images", "~/images"):
        raw = tiny_params(dataset="folder", source_dir=source_dir, image_size=16)
        summary = download.download(parse_params(raw), tmp_path / "project")
        assert (summary["train_images"], summary["val_images"], summary["test_images"]) == (12, 9, 6), source_dir


def test_val_images_must_leave_a_folder_without_val_images_to_train_on(tmp_path):
    source = write_folder(tmp_path / "images", {"train": 4, "test": 2})
    raw = tiny_params(dataset="folder", source_dir=str(source), image_size=16, val_images=12)
    with pytest.raises(data_mod.DataError, match=r"^data\.val_images: 12 is not smaller than the 12 training "
                                                 r"images \(fewer, to leave images to train on\)$"):
        download.download(parse_params(raw), tmp_path)
    assert not (tmp_path / "data").exists()


def test_another_dataset_refuses_the_checkpoint(repro):
    """A checkpoint trained on the folder's 3 classes is refused once the data has other classes."""
    p, _, _ = repro
    classes = p / "data" / "prepared" / "classes.json"
    original = classes.read_text()
    classes.write_text(json.dumps(["cat", "dog", "bird"]))
    try:
        result = subprocess.run([sys.executable, str(ROOT / "stages" / "shrink_kernel.py")], cwd=p,
                                capture_output=True, text=True, timeout=300)
    finally:
        classes.write_text(original)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: models/train_supernet.pt: trained on classes 'cat', 'dog', 'fish', the prepared data has classes "
        "'cat', 'dog', 'bird' (data.dataset; rerun the upstream stages: dvc repro)")


def test_a_dataset_too_large_for_the_device_is_one_line_before_loading(repro, monkeypatch):
    p, _, _ = repro
    params = parse_params(yaml.safe_load((p / "params.yaml").read_text()))
    monkeypatch.setattr(memory, "available_memory", lambda device: 1000)
    loads = []
    monkeypatch.setattr(DeviceData, "load", lambda *args: loads.append(args))
    files = sum(f.stat().st_size for f in context.prepared_files(p))  # about 60 KiB
    n = min(128, len(data_mod.load_split(p / "data" / "prepared" / "train.pt").labels))  # calibration images
    size = memory.size_text(files + 4 * n * 3 * 16 * 16)  # they are kept as float32
    with pytest.raises(data_mod.DataError, match=rf"^the prepared dataset with {n} BN calibration images needs "
                                                 rf"{size} but cpu has 1\.0 KiB available; lower "
                                                 r"data\.image_size, data\.train_limit or "
                                                 r"evaluate\.bn_calibration_images$"):
        context.StageContext.open(params, p, "train_supernet")
    assert not loads


def test_fashion_mnist_subset_trains_well_above_chance(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed (.ci/run installs it)")
    raw = tiny_params(dataset="fashion_mnist", train_limit=4500, test_limit=1000, val_images=500)
    raw["net"]["stem_stride"] = 2
    raw["supernet"] = {"epochs": 3, "lr": 0.2}
    raw["train"].update(crop_padding=2)
    params = parse_params(raw)
    info = download.download(params, tmp_path)
    assert info == {"dataset": "fashion_mnist", "classes": 10, "train_images": 4000, "val_images": 500, "test_images": 1000,
                    "image_shape": [1, 28, 28]}
    metrics = training.train_stage(params, "train_supernet", tmp_path, progress=False)
    assert metrics["accuracy_max"] >= 0.7, metrics  # chance is 0.1


def test_exp_run_with_new_width_lr_reruns_exactly_the_stages_after_it(repro):
    project, _, _ = repro
    run(["git", "-C", str(project), "add", "-A"], project)
    run(["git", "-C", str(project), "commit", "-qm", "results"], project)
    out = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "shrink.width.lr=0.02"], project)
    assert ran(out) == ["shrink_width", "evaluate_space", "compare", "specialize"]  # not baseline
    assert yaml.safe_load((project / "params.yaml").read_text())["shrink"]["width"]["lr"] == 0.02


def test_exp_run_with_new_budgets_reruns_only_specialize(repro):
    project, _, _ = repro
    out = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "specialize.budgets=[700000,2600000]"], project)
    assert ran(out) == ["specialize"]
    assert "search: reusing the first 14 of 14 trials" in out and "search 1/" not in out  # nothing re-evaluated
    timing = json.loads((project / "metrics" / "timing" / "specialize.json").read_text())
    summary = json.loads((project / "metrics" / "picks.json").read_text())
    assert timing["configs_scored"] == 0 and timing["configs_reused"] == summary["configs_evaluated"] >= 8
    assert list(summary["budgets"]) == ["macs-0.7M", "macs-2.6M"]
    headline = json.loads((project / "metrics" / "specialize.json").read_text())
    assert headline == {name: p["accuracy"] for name, p in summary["budgets"].items()}
    assert sorted(p.name for p in (project / "models" / "specialized").iterdir()) == [
        "macs-0.7M.onnx", "macs-0.7M.pt", "macs-2.6M.onnx", "macs-2.6M.pt"]


def test_exp_run_with_the_predictor_strategy_reuses_the_real_scores_and_respects_every_budget(repro):
    """specialize.strategy predictor reruns specialize alone; the configs the direct search scored are not scored
    again; each pick fits its budget and is the best config scored for real within it, never below the best
    uniform one on val; metrics/predictor.json's figures come from its held-out records; the saved predictor
    gives the predictions it reports."""
    project, _, _ = repro
    before = (project / "params.yaml").read_text()
    try:
        _predictor_strategy_run(project)
    finally:  # the tests after this one search directly: their next exp run reruns specialize from these params
        (project / "params.yaml").write_text(before)


def _predictor_strategy_run(project):
    budgets = [800000, 1500000]
    out = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "specialize.strategy=predictor", "-S",
               "specialize.cost=macs", "-S", f"specialize.budgets={json.dumps(budgets)}", "-S",
               "specialize.predictor.samples=10", "-S", "specialize.predictor.held_out=0.3", "-S",
               "specialize.predictor.trials=300", "-S", "specialize.predictor.verify=2"], project)
    assert ran(out) == ["specialize"]
    assert re.search(r"^sample: 18 configs to score for real, (\d+) of them stored$", out, re.M)
    summary = json.loads((project / "metrics" / "picks.json").read_text())
    records = json.loads((project / "metrics" / "search.json").read_text())
    predictor = json.loads((project / "metrics" / "predictor.json").read_text())
    timing = json.loads((project / "metrics" / "timing" / "specialize.json").read_text())
    assert summary["strategy"] == "predictor" and summary["trials"] == 300
    assert summary["configs_evaluated"] == len(records) == predictor["real_evaluations"] <= 8 + 10 + 2 * 2
    assert timing["configs_reused"] >= 8 and timing["configs_scored"] + timing["configs_reused"] == len(records)
    assert (predictor["fitted"], predictor["held_out"], len(predictor["records"])) == (8 + 7, 3, 3)
    plotted = json.loads((project / "metrics" / "search_plot" / "predictor_held_out.json").read_text())
    assert plotted == predictor["records"]
    held = [r["measured"] for r in predictor["records"]]
    guess = [r["predicted"] for r in predictor["records"]]
    assert predictor["kendall_tau"] == round(kendall_tau(guess, held), 4)
    assert predictor["rmse_points"] == round(100 * (sum((g - h) ** 2 for g, h in zip(guess, held)) / 3) ** 0.5, 3)
    by_config = {r["config"]: r for r in records}
    assert all(by_config[r["config"]]["val_accuracy"] == r["measured"] for r in predictor["records"])
    for budget, (name, pick) in zip(budgets, summary["budgets"].items()):
        assert name == f"macs-{budget / 1e6:g}M" and pick["macs"] <= budget
        assert pick["val_accuracy"] == max(r["val_accuracy"] for r in records if r["macs"] <= budget)
        assert pick["val_accuracy"] >= pick["uniform"]["val_accuracy"]
        verified = predictor["verified"][name]
        assert 1 <= len(verified) <= 2 and all(by_config[v["config"]]["macs"] <= budget for v in verified)
    saved = ofa.AccuracyPredictor.load(project / "models" / "specialized" / "predictor.pt")
    configs = [SubnetConfig.from_dict(r["subnet"]) for r in predictor["records"]]
    assert [round(v, 6) for v in saved.predict(configs)] == guess
    assert all(by_config[str(c)]["predicted_accuracy"] == g for c, g in zip(configs, guess))


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
    assert summary == {  # the headline figures; space.json holds every config's
        "accuracy_max": by["k7-d3-w4"]["accuracy"], "accuracy_min": by["k5-d2-w2"]["accuracy"],
        "finetuned_mean": round(sum(r["accuracy_finetuned"] for r in records) / 9, 6)}
    import torch

    train = len(torch.load(project / "data" / "prepared" / "train.pt", weights_only=True)["labels"])
    batch = min(yaml.safe_load((project / "params.yaml").read_text())["train"]["batch_size"], train)
    steps = train // batch  # an epoch's: a curve point after its first step and its last
    for stage in TRAINING:
        m = json.loads((project / "metrics" / f"{stage}.json").read_text())
        shrink = {"accuracy_min"} if stage != "train_supernet" else set()  # the min config is trained from here on
        assert set(m) == {"accuracy_max", "val_accuracy_max", "train_loss", *shrink}
        timing = json.loads((project / "metrics" / "timing" / f"{stage}.json").read_text())
        assert timing["images_per_s"] > 0 and timing["wall_s"] >= timing["train_s"] > 0 and timing["device"] == "cpu"
        assert timing["epochs"] >= 1 and 0 <= m["accuracy_max"] <= 1
        assert (project / "models" / f"{stage}.pt").is_file()
        curves = project / "metrics" / "live" / stage
        loss = (curves / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
        assert loss[0].split("\t") == ["step", "loss"]
        assert [int(line.split("\t")[0]) for line in loss[1:]] == sorted(
            {e * steps + s for e in range(timing["epochs"]) for s in (1, steps)})
        val = (curves / "plots" / "metrics" / "val" / "accuracy_max.tsv").read_text().splitlines()
        assert [int(line.split("\t")[0]) for line in val[1:]] == [e * steps for e in range(1, timing["epochs"] + 1)]
        assert float(val[-1].split("\t")[1]) == m["val_accuracy_max"]
        assert (curves / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for png in ("space.png", "search_plot/search.png"):
        assert (project / "metrics" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = run([sys.executable, "-m", "dvc", "metrics", "show"], project)
    assert max(len(line) for line in out.splitlines()) <= 200, out  # a terminal shows it
    shown = json.loads(run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], project))
    files = next(iter(shown.values()))["data"]
    assert set(files) == {f"metrics/{stage}.json" for stage in STAGES[1:] if stage != "baseline"}  # compare's


def test_class_names_that_are_not_a_list_of_distinct_names_are_refused(tmp_path):
    from ofa.data import DataError

    path = tmp_path / "data" / "prepared" / "classes.json"
    path.parent.mkdir(parents=True)
    for bad in (["cat"], ["cat", "cat"], ["cat", 3], {"0": "cat", "1": "dog"}):
        path.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=r"classes\.json: not a list of at least 2 distinct class names \(rerun the "
                                            r"download stage\)$"):
            context.load_classes(tmp_path)
    path.write_text(json.dumps(["cat", "dog"]))
    assert context.load_classes(tmp_path) == ["cat", "dog"]


def test_the_summary_prints_the_stages_table_2_and_the_picks(repro):
    """What make quick ends with: one line per stage, Table 2, the picks, all read back from the outputs."""
    project, _, _ = repro
    out = run([sys.executable, "-m", "ofa.pipeline.summary"], project)
    width = json.loads((project / "metrics" / "shrink_width.json").read_text())
    (line,) = [line for line in out.splitlines() if line.startswith("shrink_width ")]
    assert line.split()[-2:] == [f"{width['accuracy_max']:.4f}", f"{width['accuracy_min']:.4f}"]
    for stage in STAGES[1:]:
        assert re.search(rf"^{stage} ", out, re.M), stage
    records = json.loads((project / "metrics" / "space.json").read_text())
    for r in records[:8]:
        assert re.search(rf"^ *\({r['kernel']}, {r['depth']}, {r['width']}\) .* {r['accuracy']:.4f} +"
                         rf"{r['accuracy_finetuned']:.4f}$", out, re.M), r["config"]
    picks = json.loads((project / "metrics" / "picks.json").read_text())["budgets"]
    for name, pick in picks.items():
        assert re.search(rf"^ *{re.escape(name)} +{re.escape(pick['config'])} ", out, re.M), name
    assert max(len(line) for line in out.splitlines()) <= 120


def test_exp_run_with_new_latency_threads_reruns_latency_and_specialize_only(repro):
    """The table is the architecture's on the device: a latency param reruns it and the stage that uses it, and a
    MACs search, which does not depend on the table, is reused whole; every pick records its MACs, its predicted
    latency and its measured latency here."""
    project, _, _ = repro
    out = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "latency.threads=2"], project)
    assert ran(out) == ["latency", "specialize"]
    assert "search: reusing the first 14 of 14 trials" in out and "search 1/" not in out
    table = json.loads((project / "models" / "latency_table.json").read_text())
    assert table["threads"] == 2 and table["runtime"] == "torch" and table["arch"]["units"][1]["channels"] == 16
    arch = json.loads((project / "models" / "arch.json").read_text())
    assert arch["input_shape"] == [3, 16, 16] and arch["arch"]["classes"] == FOLDER_CLASSES
    checked = json.loads((project / "metrics" / "latency_validation.json").read_text())
    records = checked.pop("records")
    assert len(records) == 8 + 2 and sum(r["uniform"] for r in records) == 8  # the grid and latency.validate more
    assert checked["configs"] == 10 and checked["threads"] == 2 and checked["fastest_ms"] > 0
    errors = [abs(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] for r in records]
    assert checked["mape_pct"] == round(100 * sum(errors) / 10, 2) and checked["host"].endswith(" cores")
    metrics = json.loads((project / "metrics" / "latency.json").read_text())
    assert metrics == {k: checked[k] for k in ("kendall_tau", "mape_pct", "within_10pct")}
    assert (project / "metrics" / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((project / "metrics" / "picks.json").read_text())
    assert summary["cost"] == "macs" and summary["latency"]["threads"] == 2
    for name, p in summary["budgets"].items():
        assert p["macs"] <= p["budget"] and p["predicted_ms"] > 0 and p["uniform"]["predicted_ms"] > 0
        assert p["measured_onnx_ms"] > 0 and p["measured_torch_ms"] > 0, name


def test_specialize_on_latency_picks_the_best_config_within_each_budget_by_prediction(repro):
    """specialize.cost latency: budgets in ms, the search's cost the table's prediction, a budget below every
    scored config met by the fastest subnet; a change of cost reruns specialize alone."""
    from ofa.deploy import LatencyTable
    from ofa.pipeline.specialize import budget_name

    project, _, _ = repro
    table = LatencyTable.load(project / "models" / "latency_table.json")
    fastest_config, fastest = table.fastest()
    largest = ConfigSpace(**table.arch["space"]).max_config(len(table.arch["units"]))
    budgets = [math.ceil(fastest * 1e5) / 1e5, round((fastest + table.predict(largest)) / 2, 5)]
    macs_search = project.parent / "macs_search.json"
    shutil.copy(project / "metrics" / "search.json", macs_search)
    out = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "specialize.cost=latency", "-S",
               f"specialize.budgets={json.dumps(budgets)}"], project)
    assert ran(out) == ["specialize"]
    summary = json.loads((project / "metrics" / "picks.json").read_text())
    records = json.loads((project / "metrics" / "search.json").read_text())
    assert summary["cost"] == "latency" and list(summary["budgets"]) == [budget_name(b, "latency") for b in budgets]
    for b, p in zip(budgets, summary["budgets"].values()):
        fits = [r for r in records if r["predicted_ms"] <= b]
        assert p["budget"] == b and p["predicted_ms"] <= b and p["val_accuracy"] == max(r["val_accuracy"] for r in fits)
    assert summary["budgets"][budget_name(budgets[0], "latency")]["config"] == str(fastest_config)
    assert (project / "models" / "specialized" / f"{budget_name(budgets[1], 'latency')}.onnx").is_file()
    # benchmarks/latency_search.py sets each pick beside the MACs search's and the best uniform config, timed here
    bench = run([sys.executable, str(ROOT / "benchmarks" / "latency_search.py"), "--macs-search", str(macs_search)],
                project)
    rows = [line.split(" | ") for line in bench.splitlines() if re.match(r"^\| [\d.]+ \| ", line)]
    assert [r[1] for r in rows] == ["latency search", "MACs search, fits measured", "best uniform, fits measured"] * 2
    for row, (name, p) in zip(rows[::3], summary["budgets"].items()):
        assert row[2] == f"`{p['config']}`" and row[4] == f"{p['measured_onnx_ms']:.4f}", name


def _copy_inputs(project: Path, root: Path) -> None:
    """The prepared data and the latency table of `project` under `root`: another project of the same
    architecture, whose params a test may change without touching the module's project."""
    shutil.copytree(project / "data" / "prepared", root / "data" / "prepared")
    (root / "models").mkdir()
    shutil.copy(project / "models" / "latency_table.json", root / "models" / "latency_table.json")


def test_bad_latency_settings_are_one_line_before_any_work(repro, tmp_path, monkeypatch):
    """A budget below the fastest subnet's prediction, a table built for another architecture or with other
    latency params, a runtime whose package is missing: one line naming the key or file, before any work."""
    from ofa.deploy import LatencyError, LatencyTable
    from ofa.pipeline import latency, specialize

    project, _, _ = repro
    _copy_inputs(project, tmp_path)
    raw = tiny_params(dataset="folder", source_dir=str(tmp_path / "absent"), image_size=16, val_images=12)
    raw["latency"].update(threads=2)  # as the table in the project now
    table = LatencyTable.load(tmp_path / "models" / "latency_table.json")
    fastest_config, fastest = table.fastest()
    raw["specialize"].update(cost="latency", budgets=[round(fastest * 2, 5), round(fastest * 0.9, 5)])

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(specialize.StageContext, "open", no_work)
    monkeypatch.setattr(LatencyTable, "build", no_work)
    with pytest.raises(ParamsError, match=rf"^specialize\.budgets\[1\]: {round(fastest * 0.9, 5):g} ms is below the "
                                          rf"fastest subnet's predicted latency on this-machine \({re.escape(str(fastest_config))}: "
                                          rf"{fastest:.4f} ms\); at least {fastest:.4f}$"):
        specialize.specialize(parse_params(raw), tmp_path, progress=False)

    (tmp_path / "latency_tables").mkdir()
    other = json.loads((tmp_path / "models" / "latency_table.json").read_text())
    other["arch"]["final_channels"] = 64
    (tmp_path / "latency_tables" / "other.json").write_text(json.dumps(other))
    raw["latency"]["table"] = "latency_tables/other.json"
    with pytest.raises(LatencyError, match=r"^\S+other\.json: built for another architecture \(final_channels differ\)"):
        latency.latency(parse_params(raw), tmp_path, progress=False)
    shutil.copy(tmp_path / "models" / "latency_table.json", tmp_path / "latency_tables" / "here.json")
    raw["latency"].update(table="latency_tables/here.json", runtime="onnxruntime")
    with pytest.raises(ParamsError, match=r"^latency\.table: latency_tables/here\.json was built with runtime torch, 2 "
                                          r"thread\(s\), batch 1 on cpu; set latency\.runtime"):
        latency.latency(parse_params(raw), tmp_path, progress=False)
    raw["latency"].update(runtime="torch")  # as built: taken as it is, nothing measured, nothing checked here
    assert "kendall_tau" not in latency.latency(parse_params(raw), tmp_path, progress=False)
    assert LatencyTable.load(tmp_path / "models" / "latency_table.json") == table
    assert json.loads((tmp_path / "metrics" / "latency_validation.json").read_text())["records"] == []
    assert json.loads((tmp_path / "metrics" / "latency.json").read_text()) == {}

    raw["latency"].update(table=None, runtime="onnxruntime", threads=1)
    without_onnxruntime(monkeypatch)
    with pytest.raises(ValueError, match=r"^runtime onnxruntime: the onnxruntime package is not installed"):
        latency.latency(parse_params(raw), tmp_path, progress=False)
    raw["specialize"].update(cost="macs", budgets=[1500000])
    with pytest.raises(ValueError, match=r"^runtime onnxruntime: the onnxruntime package is not installed"):
        specialize.specialize(parse_params(raw), tmp_path, progress=False)  # it times the exported picks


def test_a_table_built_on_the_target_replaces_the_measurement(repro):
    """The README's round trip: a table from another machine, put under latency_tables/ and named by
    latency.table, is taken as it is (checked against the architecture, not measured here), and specialize
    predicts with it."""
    project, _, _ = repro
    built = json.loads((project / "models" / "latency_table.json").read_text())
    built["host"]["cpu"] = "the target's CPU"
    (project / "latency_tables" / "target.json").write_text(json.dumps(built))
    out = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "latency.table=latency_tables/target.json", "-S",
               "latency.device=target"], project)
    assert ran(out) == ["latency", "specialize"] and "latency check" not in out  # nothing measured here
    assert json.loads((project / "models" / "latency_table.json").read_text()) == built
    assert json.loads((project / "metrics" / "latency.json").read_text()) == {}
    summary = json.loads((project / "metrics" / "picks.json").read_text())
    assert summary["latency"]["device"] == "target" and summary["latency"]["table_host"] == "the target's CPU"


def test_the_predictor_benchmark_fits_on_scored_configs_and_checks_on_held_out_ones(repro):
    """benchmarks/predictor.py on the trained supernet: every config scored once and kept, each kind fitted per
    sample count, a second run scores nothing again."""
    project, _, _ = repro
    bench = [sys.executable, str(ROOT / "benchmarks" / "predictor.py"), "--samples", "4", "8", "--held-out", "6"]
    out = run(bench, project)
    assert "14 configs scored for real on val (14 now, " in out
    rows = [line.split(" | ") for line in out.splitlines() if re.match(r"^\| \d+ \| ", line)]
    assert [(r[0], r[1]) for r in rows] == [("| 4", "ridge"), ("| 4", "mlp"), ("| 8", "ridge"), ("| 8", "mlp")]
    assert all(-1 <= float(r[2]) <= 1 and float(r[3]) >= 0 for r in rows)
    (scores,) = json.loads((project / ".resume" / "predictor_bench.json").read_text()).values()
    assert len(scores) == 14 and all(0 <= v <= 1 for v in scores.values())
    assert "(0 now, " in run(bench, project)



def test_the_strategies_benchmark_compares_picks_at_the_same_number_of_real_evaluations(repro):
    """benchmarks/strategies.py: per setting, the predictor search's pick, the direct search's pick after as many
    distinct real evaluations, and the best uniform config, each within its budget and neither pick below the
    uniform one on val; a rerun scores nothing again."""
    project, _, _ = repro
    bench = [sys.executable, str(ROOT / "benchmarks" / "strategies.py"), "--settings", "6:2",
             "-S", "specialize.cost=macs", "-S", "specialize.budgets=[800000,1500000]",
             "-S", "specialize.predictor.trials=200"]
    out = run(bench, project)
    fits = [line.split(" | ") for line in out.splitlines() if re.match(r"^\| \d+:\d+ \| ", line)]
    assert [(f[0], int(f[2]), int(f[3])) for f in fits] == [("| 6:2", 8 + 5, 1)]
    rows = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| macs-")]
    assert len(rows) == 2 * 3
    for i in range(0, len(rows), 3):
        (budget, n, *_), names = rows[i], [r[2] for r in rows[i:i + 3]]
        assert names[1:] == ["direct", "best uniform"] and names[0].startswith("predictor ")
        assert {r[1] for r in rows[i:i + 3]} == {n} and 8 + 6 <= int(n) <= 8 + 6 + 2 * 2
        assert all(float(r[4].rstrip("M")) <= float(budget[5:].rstrip("M")) for r in rows[i:i + 3])
        uniform = float(rows[i + 2][5])
        assert float(rows[i][5]) >= uniform and float(rows[i + 1][5]) >= uniform
    assert re.findall(r"configs scored for real \((\d+) new", run(bench, project)) == ["0"]


def test_baseline_trains_each_config_alone_and_compare_sets_it_beside_the_supernets_subnet(repro):
    """baseline.configs [min, max] trained alone for the whole schedule's epochs (2 + 1 + 1 + 1, of the whole
    split here) at supernet.lr; compare reports each beside evaluate_space's figures of the same config, the
    supernet's four stages' seconds, and Table 2's other six configs projected between the two measured."""
    from ofa.pipeline.baseline import file_name
    from ofa.train import evaluate

    project, _, _ = repro
    alone = json.loads((project / "metrics" / "baseline_alone.json").read_text())
    result = json.loads((project / "metrics" / "baseline.json").read_text())
    space = {r["config"]: r for r in json.loads((project / "metrics" / "space.json").read_text())}
    train = len(torch.load(project / "data" / "prepared" / "train.pt", weights_only=True)["labels"])
    assert (alone["epochs"], alone["images_per_epoch"], alone["lr"], alone["kd"]) == (5, train, 0.1, False)
    assert alone["schedule"] == {"epochs": 5, "images": 5 * train}
    assert [(r["config"], r["name"]) for r in result["configs"]] == [("k5-d2-w2", "min"), ("k7-d3-w4", "max")]
    timing = {s: json.loads((project / "metrics" / "timing" / f"{s}.json").read_text()) for s in TRAINING}
    supernet_s = round(sum(t["train_s"] for t in timing.values()), 1)
    data = DeviceData.load(project / "data" / "prepared", torch.device("cpu"))
    for row, record in zip(result["configs"], alone["records"]):
        evaluated = space[row["config"]]
        model = ofa.load_subnet(project / "models" / "baseline" / file_name(SubnetConfig.from_dict(record["subnet"])))
        assert evaluate(model, data, batch_size=256) == row["alone"]["accuracy"] == record["accuracy"]
        assert (row["macs"], row["params"]) == (evaluated["macs"], evaluated["params"])  # calflops' count too
        assert row["alone"] == {"accuracy": record["accuracy"], "val_accuracy": record["val_accuracy"],
                                "train_s": record["train_s"], "images": 5 * train, "epochs": 5}
        assert row["supernet"] == {
            "accuracy": evaluated["accuracy"], "accuracy_finetuned": evaluated["accuracy_finetuned"],
            "from": "evaluate_space", "train_s": supernet_s, "images": 5 * train}
        assert row["alone_minus_supernet"] == round(record["accuracy"] - evaluated["accuracy"], 4)
    totals = result["totals"]
    measured, projected = totals["alone"]["measured_s"], totals["alone"]["projected_s"]
    assert totals["table2_configs"] == 8 and list(measured) == ["k5-d2-w2", "k7-d3-w4"] and len(projected) == 6
    lo, hi = measured["k5-d2-w2"], measured["k7-d3-w4"]
    assert all(min(lo, hi) - 0.1 <= s <= max(lo, hi) + 0.1 for s in projected.values())  # MACs lie between theirs
    assert totals["alone"]["train_s"] == round(sum(measured.values()) + sum(projected.values()), 1)
    assert totals["supernet"]["train_s"] == supernet_s
    assert json.loads((project / "metrics" / "compare.json").read_text()) == {
        "accuracy_max": result["configs"][1]["alone"]["accuracy"],
        "accuracy_min": result["configs"][0]["alone"]["accuracy"]}
    plot = json.loads((project / "metrics" / "baseline_plot.json").read_text())
    assert plot == [{"config": r["config"], "macs": r["macs"], "trained_alone": r["alone"]["accuracy"],
                     "supernet_subnet": r["supernet"]["accuracy"]} for r in result["configs"]]
    assert (project / "metrics" / "baseline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = run([sys.executable, "-m", "ofa.pipeline.summary", str(project)], ROOT)
    assert "Trained alone (baseline) vs the supernet's subnets" in summary and "Table 2's 8 configs trained alone" in summary


def _reported_as_a_pick(project: Path, trial: dict) -> dict:
    """A config the search scored, reported as specialize reports a pick: its test accuracy after BN re-calibration
    on the stage's calibration images (``_Subnets.report``)."""
    from ofa.deploy.search import Candidate
    from ofa.pipeline.specialize import _Subnets

    params = parse_params(yaml.safe_load((project / "params.yaml").read_text()))
    ctx = context.StageContext.open(params, project, "specialize")
    ctx.load("shrink_width")
    subnets = _Subnets(ctx.net.eval(), ctx.data, ctx.calibration, params.train.eval_batch_size)
    cfg = SubnetConfig.from_dict(trial["subnet"])
    return subnets.report(Candidate(cfg, trial["macs"], trial["val_accuracy"], trial["trial"]))


def test_exp_run_with_new_baseline_configs_reruns_only_baseline_and_compare(repro):
    """A config trains to the same bytes whichever others are listed; a config evaluate_space did not evaluate (a
    pick of specialize) gets its supernet figure from compare, BN re-calibrated on the same images: the test
    accuracy specialize reports for it. Last of the exp runs on the shared project (it leaves other outputs)."""
    project, _, _ = repro
    before = (project / "params.yaml").read_text()
    largest = (project / "models" / "baseline" / "k7-d3-w4.pt").read_bytes()
    space = {r["config"] for r in json.loads((project / "metrics" / "space.json").read_text())}
    picks = json.loads((project / "metrics" / "picks.json").read_text())["budgets"].values()
    pick = next((p for p in picks if p["config"] not in space), None)
    if pick is None:  # the last search picked uniform configs only (on synthetic data val accuracy can reach 1.0)
        trials = json.loads((project / "metrics" / "search.json").read_text())
        pick = _reported_as_a_pick(project, next(t for t in trials if t["config"] not in space))
    try:
        out = run([sys.executable, "-m", "dvc", "exp", "run", "-S", f'baseline.configs=[max,"{pick["config"]}"]'],
                  project)
    finally:
        (project / "params.yaml").write_text(before)
    assert ran(out) == ["baseline", "compare"]
    assert (project / "models" / "baseline" / "k7-d3-w4.pt").read_bytes() == largest
    assert len(list((project / "models" / "baseline").iterdir())) == 2
    rows = json.loads((project / "metrics" / "baseline.json").read_text())["configs"]
    assert [r["name"] for r in rows] == ["max", pick["config"]]
    assert rows[1]["supernet"]["from"] == "compare" and rows[1]["supernet"]["accuracy_finetuned"] is None
    assert rows[1]["supernet"]["accuracy"] == pick["accuracy"] and rows[1]["macs"] == pick["macs"]
    assert json.loads((project / "metrics" / "compare.json").read_text()) == {
        "accuracy_max": rows[0]["alone"]["accuracy"]}  # the min config was not trained alone this time
