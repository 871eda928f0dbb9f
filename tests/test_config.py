"""params.yaml: the shipped defaults, and one-line errors naming the key for every kind of mistake."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, committed_params, committed_text
from ofa.pipeline.config import ParamsError, load_params, parse_params

RAW = committed_params()


def test_defaults_are_the_source_experiment(tmp_path):
    (tmp_path / "params.yaml").write_text(committed_text("params.yaml"))
    p = load_params(tmp_path / "params.yaml")
    assert p.data.dataset == "cifar10"
    assert (p.space.kernel, p.space.depth, p.space.width) == ((5, 7), (2, 3), (2, 4))
    assert (p.supernet.epochs, p.shrink.kernel.epochs, p.shrink.depth.epochs, p.shrink.width.epochs) == (180, 25, 25, 25)
    assert p.evaluate.finetune.epochs == 25
    assert (p.train.momentum, p.train.weight_decay, p.train.nesterov) == (0.9, 3e-5, True)
    # linear scaling of the paper's rates (2048 images per step) to this batch size
    scale = p.train.batch_size / 2048
    assert p.supernet.lr == pytest.approx(2.6 * scale)
    assert p.shrink.kernel.lr == pytest.approx(0.96 * scale)
    assert p.shrink.depth.lr == pytest.approx(0.08 * scale) == p.shrink.width.lr
    assert len(p.space.build().uniform_grid(len(p.net.units))) == 8


def test_dvc_yaml_params_exist_in_params_yaml():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        assert stage["cmd"] == f"python stages/{name}.py"
        for key in stage["params"]:
            node = RAW
            for part in key.split("."):
                assert part in node, f"{name}: {key} not in params.yaml"
                node = node[part]


def with_change(path: str, value):
    raw = copy.deepcopy(RAW)
    *parents, last = path.split(".")
    node = raw
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return raw


BAD = [
    ("shrink.width.lrr", 0.1, r"^shrink\.width\.lrr: unknown key \(did you mean shrink\.width\.lr\?\)$"),
    ("evaluate.finetun", {}, r"^evaluate\.finetun: unknown key \(did you mean evaluate\.finetune\?\)$"),
    ("space.kernel", [4, 7], r"^space\.kernel: 4 is even \(odd kernel sizes only"),
    ("space.kernel", [5, 11], r"^space\.kernel: 11 is too large \(odd sizes from 1 to 9\)$"),
    ("space.kernel", "5", r"^space\.kernel: got '5' \(a list of an integer\)$"),
    ("space.depth", [], r"^space\.depth: empty list"),
    ("space.width", [0, 4], r"^space\.width: 0 is not allowed \(positive numbers\)$"),
    ("supernet.lr", 0, r"^supernet\.lr: 0 is out of range \(> 0\)$"),
    ("shrink.kernel.lr", -1.0, r"^shrink\.kernel\.lr: -1\.0 is out of range \(> 0\)$"),
    ("shrink.depth.epochs", -1, r"^shrink\.depth\.epochs: -1 is out of range \(>= 0\)$"),
    ("supernet.epochs", 2.5, r"^supernet\.epochs: got 2\.5 \(an integer\)$"),
    ("train.batch_size", 0, r"^train\.batch_size: 0 is out of range \(>= 1\)$"),
    ("train.nesterov", "yes", r"^train\.nesterov: got 'yes' \(true or false\)$"),
    ("train.momentum", 1.0, r"^train\.momentum: 1\.0 is out of range \(>= 0 and < 1\)$"),
    ("data.dataset", "imagenet", r"^data\.dataset: 'imagenet' is not allowed \(one of cifar10, cifar100, fashion_mnist, "
                                 r"folder, synthetic\)$"),
    ("data.dataset", "folder", r"^data\.source_dir: required for data\.dataset folder \(a directory holding "),
    ("data.image_size", 4, r"^data\.image_size: 4 is out of range \(>= 8\)$"),
    ("shrink.reduce", "avg", r"^shrink\.reduce: 'avg' is not allowed \(one of sum, mean\)$"),
    ("shrink.teacher", "best", r"^shrink\.teacher: 'best' is not allowed \(one of full, previous\)$"),
    ("shrink.teacher_bn", "frozen", r"^shrink\.teacher_bn: 'frozen' is not allowed \(one of train, eval\)$"),
    ("shrink.sample", "bignas", r"^shrink\.sample: 'bignas' is not allowed \(one of random, sandwich\)$"),
    ("shrink.width.subnets_per_step", 0, r"^shrink\.width\.subnets_per_step: 0 is out of range \(>= 1\)$"),
    ("shrink.depth.first_phase", {"epochs": 5, "lr": 0}, r"^shrink\.depth\.first_phase\.lr: 0 is out of range"),
    ("shrink.subnets_per_step", 0, r"^shrink\.subnets_per_step: 0 is out of range \(>= 1\)$"),
    ("shrink.width.first_phase", {"epochs": 1, "lr": 0.1, "warmup_epochs": -1},
     r"^shrink\.width\.first_phase\.warmup_epochs: -1 is out of range \(>= 0\)$"),
    ("net.dropout", 1.0, r"^net\.dropout: 1\.0 is out of range \(>= 0 and < 1\)$"),
    ("net.init", "xavier", r"^net\.init: 'xavier' is not allowed \(one of he_fout, torch\)$"),
    ("net.feature_mix_channels", 0, r"^net\.feature_mix_channels: 0 is out of range \(>= 1\)$"),
    ("data.train_limit", 0, r"^data\.train_limit: 0 is out of range \(>= 1\)$"),
    ("evaluate.bn_calibration_images", 0, r"^evaluate\.bn_calibration_images: 0 is out of range \(>= 1\)$"),
    ("evaluate.sampled_configs", -2, r"^evaluate\.sampled_configs: -2 is out of range \(>= 0 and <= 10000\)$"),
    ("net.units.0.stride", 3, r"^net\.units\[0\]\.stride: 3 is not allowed \(one of 1, 2\)$"),
    ("net.units.1.activation", "gelu", r"^net\.units\[1\]\.activation: 'gelu' is not allowed \(one of relu, hswish\)$"),
    ("net.units.0.channels", KeyError, r"^net\.units\[0\]\.channels: missing \(an integer\)$"),
    ("shrink.kernel", KeyError, r"^shrink\.kernel: missing \(a mapping\)$"),
    ("seed", None, r"^seed: got None \(an integer\)$"),
    ("data.val_images", 0, r"^data\.val_images: 0 is out of range \(>= 1\)$"),
    ("data.val_images", 50000, r"^data\.val_images: 50000 is not smaller than the 50000 training images of cifar10 "),
    ("data.train_limit", 5000, r"^data\.val_images: 5000 is not smaller than the 5000 training images of cifar10 "
                               r"\(data\.train_limit\)"),
    ("specialize.budgets", [], r"^specialize\.budgets: empty list"),
    ("specialize.budgets", [3.0e7, 0], r"^specialize\.budgets\[1\]: 0 is not allowed \(MACs per image, a positive"),
    ("specialize.budgets", [-4.0e7], r"^specialize\.budgets\[0\]: -40000000\.0 is not allowed"),
    ("specialize.budgets", [3.0e7, float("inf")], r"^specialize\.budgets\[1\]: inf is not allowed \(a finite number\)$"),
    ("train.warmup_epochs", float("inf"), r"^train\.warmup_epochs: inf is not allowed \(a finite number\)$"),
    ("space.width", [float("nan"), 4], r"^space\.width\[0\]: nan is not allowed \(a finite number\)$"),
    ("seed", 2**64, r"^seed: 18446744073709551616 is out of range \(>= 0 and <= 4294967295\)$"),
    ("train.crop_padding", 10**6, r"^train\.crop_padding: 1000000 is out of range \(>= 0 and <= 64\)$"),
    ("evaluate.sampled_configs", 10**12, r"^evaluate\.sampled_configs: 1000000000000 is out of range \(>= 0 and <= 10000\)$"),
    ("specialize.budgets", ["2.5e6"], r"^specialize\.budgets\[0\]: got '2\.5e6' \(a number\)$"),
    ("specialize.budgets", [3.0e7, 30000000], r"^specialize\.budgets: duplicate budgets"),
    ("specialize.trials", 0, r"^specialize\.trials: 0 is out of range \(>= 1\)$"),
    ("specialize.trials", 5, r"^specialize\.trials: 5 is fewer than the 8 uniform configs the search starts with"),
    ("specialize.population", 4, r"^specialize\.population: 4 is smaller than the 8 uniform configs"),
    ("specialize.budgets", KeyError, r"^specialize\.budgets: missing \(a list of a number\)$"),
    ("specialize.cost", "flops", r"^specialize\.cost: 'flops' is not allowed \(one of macs, latency\)$"),
    ("specialize.strategy", "random", r"^specialize\.strategy: 'random' is not allowed \(one of direct, predictor\)$"),
    ("specialize.predictor.samples", 1, r"^specialize\.predictor\.samples: 1 is out of range \(>= 2\)$"),
    ("specialize.predictor.verify", 0, r"^specialize\.predictor\.verify: 0 is out of range \(>= 1\)$"),
    ("specialize.predictor.held_out", 0, r"^specialize\.predictor\.held_out: 0 is out of range \(> 0 and < 1\)$"),
    ("specialize.predictor.held_out", 1.0, r"^specialize\.predictor\.held_out: 1\.0 is out of range \(> 0 and < 1\)$"),
    ("specialize.predictor.kind", "forest", r"^specialize\.predictor\.kind: 'forest' is not allowed \(one of ridge, mlp\)$"),
    ("specialize.predictor.trials", 5, r"^specialize\.predictor\.trials: 5 is fewer than the 8 uniform configs the search "),
    ("latency.runtime", "tensorrt", r"^latency\.runtime: 'tensorrt' is not allowed \(one of onnxruntime, torch\)$"),
    ("latency.threads", 0, r"^latency\.threads: 0 is out of range \(>= 1\)$"),
    ("latency.batch_size", 0, r"^latency\.batch_size: 0 is out of range \(>= 1\)$"),
    ("latency.validate", -1, r"^latency\.validate: -1 is out of range \(>= 0\)$"),
    ("latency.hardware", "tpu", r"^latency\.hardware: 'tpu' is not allowed \(one of cpu, cuda\)$"),
    ("latency.hardware", "cuda", r"^latency\.hardware: cuda is not allowed with latency\.runtime onnxruntime \(cpu"),
    ("latency.device", " ", r"^latency\.device: empty \(a name for the target device"),
    ("latency.table", "/tmp/pi4.json", r"^latency\.table: /tmp/pi4\.json is not allowed \(a file under latency_tables/, "
                                       r"the latency stage's DVC dependency"),
    ("latency.table", "models/latency_table.json", r"^latency\.table: models/latency_table\.json is not allowed"),
    ("latency.table", "latency_tables/../x.json", r"^latency\.table: latency_tables/\.\./x\.json is not allowed"),
    ("baseline.configs", ["min", "k3-d2-w4"], r"^baseline\.configs\[1\]: 'k3-d2-w4' is not a config of the space "
                                              r"\(unit 0 block 0: kernel 3 not in space\.kernel \[5, 7\]\): "
                                              r"k<kernel>-d<depth>-w<width> or kxw-.* \(5 units; .*\); or min, max$"),
    ("baseline.configs", ["kxw-7x4|7x4"], r"^baseline\.configs\[0\]: 'kxw-7x4\|7x4' is not a config of the space"),
    ("baseline.configs", ["max", "k7-d3-w4"], r"^baseline\.configs\[1\]: 'k7-d3-w4' is 'max' again \(k7-d3-w4; each "
                                              r"config once\)$"),
    ("baseline.configs", "max", r"^baseline\.configs: got 'max' \(a list of a string\)$"),
    ("baseline.configs", [5], r"^baseline\.configs\[0\]: got 5 \(a string\)$"),
    ("baseline.epochs", 0, r"^baseline\.epochs: 0 is out of range \(>= 1\)$"),
    ("baseline.lr", 0, r"^baseline\.lr: 0 is out of range \(> 0\)$"),
    ("baseline.kd", "yes", r"^baseline\.kd: got 'yes' \(true or false\)$"),
]


@pytest.mark.parametrize("path, value, message", BAD, ids=[f"{p}={v}" for p, v, _ in BAD])
def test_bad_params_raise_one_line_naming_the_key(path, value, message):
    with pytest.raises(ParamsError, match=message) as info:
        parse_params(with_change(path, value))
    assert "\n" not in str(info.value)


def test_baseline_configs_name_configs_of_the_space_in_any_printed_form():
    """min and max, Table 2's strings and specialize's per-block strings; [] trains none."""
    space = RAW["space"]
    pick = "kxw-7x4.5x2.7x4|7x2.5x2|5x4.5x4|7x4.7x2|5x2.5x2.7x2"  # 5 units: 3 + 2 + 2 + 2 + 3 blocks
    params = parse_params(with_change("baseline.configs", ["k5-d3-w4", pick, "max"]))
    built = params.space.build()
    configs = params.baseline.resolve(built, 5)
    assert [str(c) for c in configs] == ["k5-d3-w4", pick, "k7-d3-w4"] and space["kernel"] == [5, 7]
    assert configs[2] == built.max_config(5)
    assert parse_params(with_change("baseline.configs", [])).baseline.resolve(built, 5) == []
    assert parse_params(RAW).baseline.configs == ("min", "max")  # the default: the space's two ends


def test_latency_budgets_are_positive_milliseconds():
    raw = with_change("specialize.cost", "latency")
    raw["specialize"]["budgets"] = [0.5, 0]
    with pytest.raises(ParamsError, match=r"^specialize\.budgets\[1\]: 0 is not allowed \(with specialize\.cost latency: "
                                          r"milliseconds per batch of latency\.batch_size, a positive number\)$"):
        parse_params(raw)
    raw["specialize"]["budgets"] = [0.5, 0.25]
    params = parse_params(raw)  # well below a MACs budget's smallest: milliseconds
    assert params.specialize.budget_values() == [0.5, 0.25] and params.specialize.macs_budgets() == []


def test_a_folder_dataset_needs_its_image_size():
    raw = with_change("data.dataset", "folder")
    raw["data"]["source_dir"] = "/data/flowers"
    with pytest.raises(ParamsError, match=r"^data\.image_size: required for data\.dataset folder \(the side"):
        parse_params(raw)
    raw["data"].update(image_size=64, val_images=10**6)  # the folder's size is known only once it is read
    assert parse_params(raw).data.image_size == 64


def test_params_yaml_read_errors_are_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(committed_text("params.yaml") + "train:\n  batch_size: 32\n")  # a second train section
    line = len(committed_text("params.yaml").splitlines()) + 1
    with pytest.raises(ParamsError, match=rf"^\S+params\.yaml: line {line}: train is given twice \(each key once"):
        load_params(path)
    path.write_text("seed: 0\nsupernet: {epochs: 2, lr: 0.1, lr: 0.2}\n")
    with pytest.raises(ParamsError, match=r"^\S+params\.yaml: line 2: lr is given twice"):
        load_params(path)
    path.write_bytes(b"seed: \xff\n")
    with pytest.raises(ParamsError, match=r"^\S+params\.yaml: cannot read it \(UnicodeDecodeError: "):
        load_params(path)
    path.unlink()
    path.mkdir()
    with pytest.raises(ParamsError, match=r"^\S+params\.yaml: cannot read it \(IsADirectoryError: "):
        load_params(path)
    with pytest.raises(ParamsError, match=r"^\S+absent\.yaml: file not found"):
        load_params(tmp_path / "absent.yaml")


def test_top_level_must_be_a_mapping():
    with pytest.raises(ParamsError, match=r"^params: got \[1, 2\]"):
        parse_params([1, 2])


def test_stage_script_fails_fast_without_traceback_or_outputs(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_change("shrink.width.lr", -0.05)))
    result = subprocess.run([sys.executable, str(ROOT / "stages" / "train_supernet.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: shrink.width.lr: -0.05 is out of range (> 0)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_budget_below_the_smallest_subnet_fails_before_any_training(tmp_path):
    from test_pipeline import tiny_params

    raw = tiny_params()
    raw["specialize"]["budgets"] = [2_000_000, 600_000]  # the tiny space's smallest subnet: 616512 MACs
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, str(ROOT / "stages" / "download.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)  # the first stage that knows the input
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("error: specialize.budgets[1]: 600000 MACs is below the smallest subnet "
                                     "(k5-d2-w2: 616512 MACs on 3x16x16 input); at least 616512")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
    # budgets that fit, then a net whose smallest subnet outgrows them: the next stage stops before training
    from ofa.pipeline import context, download

    raw["specialize"]["budgets"] = [800_000, 1_500_000]
    download.download(parse_params(raw), tmp_path)
    raw["net"]["final_channels"] = 256  # the smallest subnet: about 0.85M MACs
    with pytest.raises(ParamsError, match=r"^specialize\.budgets\[0\]: 800000 MACs is below the smallest subnet "
                       r"\(k5-d2-w2: (\d+) MACs on 3x16x16 input\); at least \1$"):
        context.StageContext.open(parse_params(raw), tmp_path, "train_supernet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]

def test_download_checks_budgets_before_fetching_anything(tmp_path):
    from ofa.pipeline import download
    from test_pipeline import tiny_params

    raw = tiny_params(dataset="cifar10", source_dir=str(tmp_path / "empty"))  # no archive anywhere, no network
    raw["specialize"]["budgets"] = [1000]
    with pytest.raises(ParamsError, match=r"^specialize\.budgets\[0\]: 1000 MACs is below the smallest subnet "
                                          r"\(k5-d2-w2: \d+ MACs on 3x32x32 input\)"):
        download.download(parse_params(raw), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
