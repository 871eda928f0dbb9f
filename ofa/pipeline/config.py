"""Typed pipeline parameters: params.yaml parsed into frozen dataclasses, validated before any work.

Every mistake raises ``ParamsError`` whose message is one line ``<key.path>: <what is wrong> (<what is
allowed>)``; unknown keys get a did-you-mean (``typed``). This is the only module that reads params.yaml.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data import DATASETS, TRAIN_IMAGES
from ..deploy.predictor import KINDS as PREDICTORS
from ..deploy.timing import RUNTIMES
from ..io import DuplicateKey, load_yaml
from ..model import ConfigSpace, SubnetConfig, UnitSpec
from ..model.subnet import ACTIVATIONS as _ACTIVATIONS
from ..model.supernet import INITS
from ..train import REDUCE
from .typed import ParamsError, parse, rule

DEVICES = ("auto", "cpu", "cuda")
ACTIVATIONS = tuple(_ACTIVATIONS)
MAX_KERNEL = 9  # a depthwise kernel wider than the late feature maps (4x4 to 8x8) only adds padding


# sampled subnets per step of each shrink stage when neither the stage nor shrink.subnets_per_step sets it
OFFICIAL_SUBNETS_PER_STEP = {"kernel": 1, "depth": 2, "width": 4}


@dataclass(frozen=True)
class DataParams:
    dataset: str = rule(choices=DATASETS, default="cifar10")
    source_dir: str | None = None  # a local directory holding the official files (offline use)
    train_limit: int | None = rule(min=1, default=None)  # first N training images; null = all
    test_limit: int | None = rule(min=1, default=None)  # first N test images; null = all
    val_images: int = rule(min=1, default=5000)  # held out of the training split for validation
    image_size: int | None = rule(min=8, default=None)  # resize (shorter side, centre crop); null = native size


@dataclass(frozen=True)
class SpaceParams:
    kernel: tuple[int, ...] = (5, 7)
    depth: tuple[int, ...] = (2, 3)
    width: tuple[float, ...] = (2, 4)

    def build(self) -> ConfigSpace:
        return ConfigSpace(kernel=self.kernel, depth=self.depth, width=self.width)


@dataclass(frozen=True)
class UnitParams:
    channels: int = rule(min=1)
    stride: int = rule(choices=(1, 2), default=1)
    activation: str = rule(choices=ACTIVATIONS, default="relu")
    se: bool = False


@dataclass(frozen=True)
class NetParams:
    units: tuple[UnitParams, ...]
    stem_channels: int = rule(min=1, default=16)
    stem_stride: int = rule(choices=(1, 2), default=1)
    final_channels: int = rule(min=1, default=640)
    feature_mix_channels: int | None = rule(min=1, default=None)  # official OFA's head: 1280; null = none
    dropout: float = rule(min=0, lt=1, default=0.0)  # before the classifier (official OFA: 0.1)
    init: str = rule(choices=INITS, default="he_fout")

    def unit_specs(self) -> list[UnitSpec]:
        return [UnitSpec(**dataclasses.asdict(u)) for u in self.units]


@dataclass(frozen=True)
class TrainParams:
    batch_size: int = rule(min=1, default=128)
    eval_batch_size: int = rule(min=1, default=1000)
    momentum: float = rule(min=0, lt=1, default=0.9)
    nesterov: bool = True
    weight_decay: float = rule(min=0, default=3e-5)
    warmup_epochs: float = rule(min=0, default=1.0)  # linear warm-up, then cosine to 0
    label_smoothing: float = rule(min=0, lt=1, default=0.1)
    crop_padding: int = rule(min=0, max=64, default=4)  # random crop with this zero padding; 0 = no crop
    flip: bool = True  # random horizontal flip
    device: str = rule(choices=DEVICES, default="auto")
    processes: int = rule(min=1, default=1)  # on this machine: one per GPU (NCCL), or CPU processes (gloo)
    sync_bn: bool = False  # with several processes: BN statistics over the whole batch, not each rank's share


@dataclass(frozen=True)
class PhaseParams:
    epochs: int = rule(min=0)
    lr: float = rule(gt=0)
    images_per_epoch: int | None = rule(min=1, default=None)  # drawn anew each epoch; null = the whole split


@dataclass(frozen=True)
class KernelPhaseParams(PhaseParams):
    subnets_per_step: int | None = rule(min=1, default=None)  # null: ShrinkParams.subnets("kernel")
    transforms_only: bool = False  # the source's variant: train only the kernel transform matrices


@dataclass(frozen=True)
class FirstPhaseParams:
    epochs: int = rule(min=0, default=25)  # 0: no first phase
    lr: float = rule(gt=0, default=0.005)
    warmup_epochs: float = rule(min=0, default=0.0)  # official OFA: none (the second phase: train.warmup_epochs)


@dataclass(frozen=True)
class ElasticPhaseParams(PhaseParams):
    subnets_per_step: int | None = rule(min=1, default=None)  # null: ShrinkParams.subnets(<dimension>)
    # with 3+ choices of the stage's dimension: a first phase on all but the smallest choice (official OFA)
    first_phase: FirstPhaseParams = field(default_factory=FirstPhaseParams)


TEACHERS = ("full", "previous")  # train_supernet's full network (official OFA) | the previous stage's max net
SAMPLES = ("random", "sandwich")  # a step's subnets: all drawn at random (official OFA) | the largest and smallest too
TEACHER_BN = ("train", "eval")  # the teacher's batch norm: batch statistics (official OFA) | running statistics


@dataclass(frozen=True)
class ShrinkParams:
    kernel: KernelPhaseParams
    depth: ElasticPhaseParams
    width: ElasticPhaseParams
    kd_ratio: float = rule(min=0, default=1.0)  # weight of distillation from the teacher
    teacher: str = rule(choices=TEACHERS, default="full")
    teacher_bn: str = rule(choices=TEACHER_BN, default="train")
    reduce: str = rule(choices=REDUCE, default="sum")
    sample: str = rule(choices=SAMPLES, default="random")  # sandwich: a step's first two subnets its space's ends
    subnets_per_step: int | None = rule(min=1, default=None)  # every shrink stage's, unless the stage sets its own

    def subnets(self, dim: str) -> int:
        """Sampled subnets per step of the shrink stage of `dim` (kernel | depth | width), gradients accumulated:
        the stage's own count, else shrink.subnets_per_step, else official OFA's (1 / 2 / 4)."""
        return (getattr(self, dim).subnets_per_step or self.subnets_per_step
                or OFFICIAL_SUBNETS_PER_STEP[dim])


@dataclass(frozen=True)
class EvaluateParams:
    finetune: PhaseParams
    bn_calibration_images: int = rule(min=1, default=2000)
    sampled_configs: int = rule(min=0, max=10_000, default=0)  # random per-block configs besides the uniform grid


COSTS = ("macs", "latency")  # what specialize.budgets bound: MACs per image | predicted ms per batch
HARDWARE = ("cpu", "cuda")
LATENCY_TABLES = Path("latency_tables")  # where latency.table files live: the latency stage depends on the folder


@dataclass(frozen=True)
class LatencyParams:
    runtime: str = rule(choices=RUNTIMES, default="onnxruntime")
    batch_size: int = rule(min=1, default=1)  # images per inference
    threads: int = rule(min=1, default=1)  # intra-op threads
    device: str = "this-machine"  # a name for the target: a new name measures a new table
    hardware: str = rule(choices=HARDWARE, default="cpu")  # where the torch runtime runs (onnxruntime: cpu)
    validate: int = rule(min=0, default=50)  # random configs measured whole against the table, besides the uniform
    table: str | None = None  # a table built on the target (under latency_tables/); null = measure here


STRATEGIES = ("direct", "predictor")  # every trial scored for real | searched on an accuracy predictor, verified


@dataclass(frozen=True)
class PredictorParams:  # specialize.strategy predictor (ofa.deploy.predictor_search)
    kind: str = rule(choices=PREDICTORS, default="ridge")
    samples: int = rule(min=2, default=100)  # random configs scored for real (besides the uniform grid)
    held_out: float = rule(gt=0, lt=1, default=0.2)  # share of the samples kept out of the fit, to validate it
    trials: int = rule(min=1, default=3000)  # NSGA-II trials on the predictions
    verify: int = rule(min=1, default=5)  # best predicted configs per budget scored for real

    def population(self, opening: int) -> int:
        """NSGA-II population on the predictions: 25 generations, at least `opening` (the direct search's)."""
        return max(opening, self.trials // 25)


@dataclass(frozen=True)
class SpecializeParams:
    budgets: tuple[float, ...]  # per budget one searched, exported subnet; MACs per image, or ms (cost: latency)
    cost: str = rule(choices=COSTS, default="macs")  # latency: the latency table's prediction
    strategy: str = rule(choices=STRATEGIES, default="direct")
    trials: int = rule(min=1, default=300)  # NSGA-II trials, the uniform configs first (strategy direct)
    population: int | None = rule(min=2, default=None)  # NSGA-II population; null = max(16, uniform configs)
    predictor: PredictorParams = field(default_factory=PredictorParams)

    def macs_budgets(self) -> list[int]:
        """The budgets in MACs (cost macs); none with cost latency."""
        return [int(b) for b in self.budgets] if self.cost == "macs" else []

    def budget_values(self) -> list[float]:
        """The budgets as the search compares them: MACs (integers) or milliseconds."""
        return [float(b) for b in self.macs_budgets()] if self.cost == "macs" else [float(b) for b in self.budgets]


CONFIG_NAMES = ("min", "max")  # baseline.configs' names for the space's smallest and largest config


@dataclass(frozen=True)
class BaselineParams:  # stage baseline: configs trained alone from the seed's init (ofa.pipeline.baseline)
    configs: tuple[str, ...] = rule(default=CONFIG_NAMES, empty=True)  # min | max | a config string; [] = none
    epochs: int | None = rule(min=1, default=None)  # null: the whole progressive-shrinking schedule's
    lr: float | None = rule(gt=0, default=None)  # null: supernet.lr
    kd: bool = False  # true: distil from train_supernet's full network (official OFA's distillation)

    def resolve(self, space: ConfigSpace, num_units: int) -> list[SubnetConfig]:
        """The configs baseline.configs names, in order; ParamsError naming the first that is not a config of the
        space, or a config named twice."""
        named = {"min": space.min_config(num_units), "max": space.max_config(num_units)}
        configs: dict[SubnetConfig, str] = {}
        for i, text in enumerate(self.configs):
            try:
                cfg = named.get(text) or space.parse(text, num_units)
            except ValueError as e:
                raise ParamsError(f"baseline.configs[{i}]: {e}; or min, max") from None
            if cfg in configs:
                raise ParamsError(f"baseline.configs[{i}]: {text!r} is {configs[cfg]!r} again ({cfg}; each config once)")
            configs[cfg] = text
        return list(configs)


@dataclass(frozen=True)
class Params:
    data: DataParams
    space: SpaceParams
    net: NetParams
    train: TrainParams
    supernet: PhaseParams
    shrink: ShrinkParams
    evaluate: EvaluateParams
    specialize: SpecializeParams
    latency: LatencyParams = field(default_factory=LatencyParams)
    baseline: BaselineParams = field(default_factory=BaselineParams)
    seed: int = rule(min=0, max=2**32 - 1, default=0)

    def search_population(self) -> int:
        """NSGA-II population: specialize.population, or enough for every uniform config and at least 16."""
        return self.specialize.population or max(16, self.space.build().grid_size())


def parse_params(raw: Any) -> Params:
    """Typed, validated Params from the mapping in params.yaml; ParamsError names the first bad key."""
    params = parse(Params, raw, "")
    try:
        params.space.build()
    except ValueError as e:  # ConfigSpace messages already start with "space.<key>:"
        raise ParamsError(str(e)) from None
    for k in params.space.kernel:
        if k > MAX_KERNEL:
            raise ParamsError(f"space.kernel: {k} is too large (odd sizes from 1 to {MAX_KERNEL})")
    _check_data(params.data)
    _check_specialize(params)
    _check_latency(params.latency)
    params.baseline.resolve(params.space.build(), len(params.net.units))
    t = params.train
    if t.batch_size % t.processes:
        raise ParamsError(f"train.batch_size: {t.batch_size} images per step do not split evenly across "
                          f"train.processes = {t.processes} (a multiple of {t.processes})")
    return params


def _check_data(d: DataParams) -> None:
    if d.dataset == "folder":
        if not d.source_dir:
            raise ParamsError("data.source_dir: required for data.dataset folder (a directory holding "
                              "train/<class>/<image> and test/<class>/<image>)")
        if d.image_size is None:
            raise ParamsError("data.image_size: required for data.dataset folder (the side, in pixels, that every "
                              "image is resized and centre-cropped to; at least 8)")
        return  # the number of images is known once the folder is read: download checks val_images
    train = min(TRAIN_IMAGES[d.dataset], d.train_limit or TRAIN_IMAGES[d.dataset])
    if d.val_images >= train:
        raise ParamsError(f"data.val_images: {d.val_images} is not smaller than the {train} training images of "
                          f"{d.dataset}{' (data.train_limit)' if d.train_limit else ''} (fewer, to leave images to train on)")


def _check_specialize(params: Params) -> None:
    s = params.specialize
    for i, b in enumerate(s.budgets):
        if s.cost == "macs" and not b >= 1:
            raise ParamsError(f"specialize.budgets[{i}]: {b!r} is not allowed (MACs per image, a positive number)")
        if s.cost == "latency" and not b > 0:
            raise ParamsError(f"specialize.budgets[{i}]: {b!r} is not allowed (with specialize.cost latency: "
                              f"milliseconds per batch of latency.batch_size, a positive number)")
    if len(set(s.budget_values())) != len(s.budgets):
        raise ParamsError(f"specialize.budgets: duplicate budgets in {list(s.budgets)} (each budget once)")
    grid = params.space.build().grid_size()
    if s.trials < grid:
        raise ParamsError(f"specialize.trials: {s.trials} is fewer than the {grid} uniform configs the search "
                          f"starts with (at least {grid})")
    if s.predictor.trials < grid:
        raise ParamsError(f"specialize.predictor.trials: {s.predictor.trials} is fewer than the {grid} uniform configs "
                          f"the search on predictions starts with (at least {grid})")
    if s.population is not None and s.population < grid:
        raise ParamsError(f"specialize.population: {s.population} is smaller than the {grid} uniform configs of "
                          f"the first generation (at least {grid}, or null)")


def _check_latency(lat: LatencyParams) -> None:
    if lat.runtime == "onnxruntime" and lat.hardware != "cpu":
        raise ParamsError(f"latency.hardware: {lat.hardware} is not allowed with latency.runtime onnxruntime (cpu: "
                          "its CPU execution provider; or latency.runtime torch)")
    if not lat.device.strip():
        raise ParamsError("latency.device: empty (a name for the target device, e.g. pi4 or this-machine)")
    if lat.table is not None:
        path = Path(lat.table)
        if path.is_absolute() or path.parts[:1] != LATENCY_TABLES.parts or ".." in path.parts or len(path.parts) < 2:
            raise ParamsError(f"latency.table: {lat.table} is not allowed (a file under {LATENCY_TABLES}/, the latency "
                              "stage's DVC dependency, e.g. latency_tables/pi4.json; or null to measure here)")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the project root)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ParamsError(f"{path}: cannot read it ({type(e).__name__}: {' '.join(str(e).split())})") from None
    except DuplicateKey as e:
        raise ParamsError(f"{path}: line {e.line}: {e.key} is given twice (each key once in a mapping; the second "
                          "would replace the first)") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    return parse_params(raw)
