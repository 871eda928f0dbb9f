"""Shared helpers: tiny supernets, weights moved away from their initial values, a model that diverges,
synthetic data, image folders."""

from __future__ import annotations

import builtins
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import ofa
from ofa import data as data_mod
from ofa.train import DeviceData

ROOT = Path(__file__).resolve().parents[1]


def committed_text(name: str) -> str:
    """A file of the repository as its last commit holds it, not as the workspace does: users edit params.yaml and
    run experiments there (``dvc exp run`` applies an experiment's params to it), and the suite passes whatever
    they did. Outside a git checkout (an unpacked archive), the file itself."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:{name}"], capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return (ROOT / name).read_text()


def committed_params() -> dict:
    """The shipped params.yaml (``committed_text``), parsed as YAML."""
    return yaml.safe_load(committed_text("params.yaml"))


def without_onnxruntime(monkeypatch) -> None:
    """From now on in the test, `import onnxruntime` fails as on a machine without the package."""
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)


SEED_SPACE = ofa.ConfigSpace(kernel=(5, 7), depth=(2, 3), width=(2, 4))
PAPER_SPACE = ofa.ConfigSpace(kernel=(3, 5, 7), depth=(2, 3, 4), width=(3, 4, 6))
# Small but complete: both activations, SE on and off, strides 1 and 2, a residual and a non-residual first block.
TINY_UNITS = [
    ofa.UnitSpec(8, stride=1, activation="relu", se=False),
    ofa.UnitSpec(16, stride=2, activation="hswish", se=True),
]


def tiny_net(space: ofa.ConfigSpace, in_channels: int = 3, num_classes: int = 10) -> ofa.OFANet:
    torch.manual_seed(0)
    return ofa.OFANet(space, in_channels, num_classes, units=TINY_UNITS, stem_channels=8, final_channels=32)


@torch.no_grad()
def perturb(module: nn.Module, seed: int = 1) -> nn.Module:
    """Move every weight, transform matrix and BN statistic off its initial value (identities and 0/1 stats hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        p.add_(0.2 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return module


class BlowsUp(torch.nn.Module):
    """A linear classifier whose output turns NaN from its `at`-th training forward on."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 16 * 16, 10)
        self.at, self.calls = at, 0

    def forward(self, x):
        self.calls += self.training
        out = self.linear(x.flatten(1))
        return out * float("nan") if self.calls >= self.at else out


FOLDER_CLASSES = ["cat", "dog", "fish"]  # written below in another order: the sorted names decide the labels


def write_folder(root: Path, per_class: dict[str, int], corrupt: str | None = None) -> Path:
    """train/, test/ of small PNG and JPEG images of several sizes, one of them grayscale; classes by colour."""
    from PIL import Image

    colour = {"cat": (200, 40, 40), "dog": (40, 200, 40), "fish": (40, 40, 200)}
    for split, n in per_class.items():
        for c in reversed(FOLDER_CLASSES):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                size = (20 + 2 * (i % 3), 16 + 3 * (i % 2))  # non-square, several sizes
                shade = tuple(max(0, min(255, v + 9 * (i % 5) - 18)) for v in colour[c])
                img = Image.new("RGB", size, shade)
                if i == 1 and c == "dog":
                    img = img.convert("L")  # one grayscale image in an RGB dataset
                img.save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    if corrupt:
        (root / corrupt).write_bytes((root / "train" / "cat" / "001.png").read_bytes()[:60])
    return root



@pytest.fixture(scope="module")
def synthetic() -> DeviceData:
    """The synthetic dataset (64 images held out as val) on the CPU, as the training loop takes it."""
    train, test = data_mod.synthetic(seed=0)
    train, val = data_mod.hold_out(train, 64, seed=0)
    return DeviceData(train, val, test, torch.full((1, 3, 1, 1), 128.0), torch.full((1, 3, 1, 1), 64.0),
                      torch.device("cpu"))


# `make test` runs the suite as 2 pytest-xdist workers (--dist loadfile): each worker, and every stage process it
# starts, gets its share of the cores, so two workers never fight over threads.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
THREADS = max(1, (os.cpu_count() or 1) // WORKERS) if WORKERS > 1 else 2
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
# The modules whose stage processes take most of the suite's time, longest first: a worker that starts one
# of them early leaves the short modules to fill in around it (with --no-loadscope-reorder).
LONGEST = ("test_distributed.py", "test_pipeline.py", "test_reliability.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: LONGEST.index(item.path.name) if item.path.name in LONGEST else len(LONGEST))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)
