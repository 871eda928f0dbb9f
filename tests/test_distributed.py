"""Several processes (torch.distributed, gloo on CPU): the same training, evaluation and stages as one process.

Each test runs real ranks: separate processes joined in one gloo group, one CPU thread each.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from conftest import SEED_SPACE, committed_params, perturb, tiny_net
from ofa import data as data_mod
from ofa.data import memory
from ofa.train import distributed, launch, sync_bn
from ofa.pipeline.config import ParamsError, parse_params
from ofa.train import DeviceData, DivergenceError, Schedule, calibrate_bn, evaluate, fit
from test_pipeline import ROOT, STAGES, TRAINING, new_project, ran, run, tiny_params


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, size: int, port: int, out: Path, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        fn(rank, out, *args)
    except BaseException:
        (out / f"failed{rank}.txt").write_text(traceback.format_exc())
        raise
    dist.destroy_process_group()


def spawn(fn, out: Path, *args, size: int = 2, timeout: float = 120) -> None:
    """Run fn(rank, out, *args) on `size` ranks of one gloo group; fail on any rank's error or a hang."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, size, port, out, args)) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    failures = "\n".join(f.read_text() for f in sorted(out.glob("failed*.txt")))
    assert not hung, f"ranks hung:\n{failures}"
    assert all(p.exitcode == 0 for p in procs), failures


def _all_jobs(rank: int, out: Path) -> None:
    """Every rank-side job of the tests below, in one job of 2 ranks (starting ranks costs seconds each)."""
    for mutant in ("", "no_average", "own_subnets"):
        _train_rank(rank, out, "frozen", mutant)
    for bn in ("sync", "rank"):
        _train_rank(rank, out, bn, "")
    for job in (_hash_rank, _evaluate_rank, _diverge_rank, _resume_rank, _map_rank, _inputs_rank,
                _unused_rank):
        (out / job.__name__).mkdir(exist_ok=True)
        job(rank, out / job.__name__)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    """The folder where the two ranks of `_all_jobs` left their results."""
    out = tmp_path_factory.mktemp("ranks")
    spawn(_all_jobs, out, timeout=300)
    return out


def _data() -> DeviceData:
    """conftest's synthetic set, built here too: the ranks are fresh processes."""
    train, test = data_mod.synthetic(seed=0)
    train, val = data_mod.hold_out(train, 64, seed=0)
    return DeviceData(train, val, test, torch.full((1, 3, 1, 1), 128.0), torch.full((1, 3, 1, 1), 64.0),
                      torch.device("cpu"))


SCHEDULE = Schedule(epochs=1, lr=0.01, batch_size=64, images_per_epoch=64 * 4, warmup_epochs=0.5)  # crop + flip


def _frozen_bn(net: torch.nn.Module) -> torch.nn.Module:
    """Batch norm in eval mode (running statistics) also while training: nothing couples a rank's images."""
    def train(mode: bool = True):
        torch.nn.Module.train(net, mode)
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        return net

    net.train = train
    return net


def _train(bn: str, mutant: str = ""):
    """The tiny supernet after 4 steps of 2 sampled subnets each; `mutant` breaks one rule of data parallelism.

    bn: "frozen" (running statistics), "sync" (train.sync_bn: statistics of the whole batch) or "rank"
    (statistics of each rank's share, official OFA's way).
    """
    net = perturb(tiny_net(SEED_SPACE))
    if bn == "frozen":
        _frozen_bn(net)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if mutant == "own_subnets":  # rank 0 draws as one process does, rank 1 subnets of its own
        own = random.Random(1000 + rank)

        def sample(rng):
            shared = [net.sample_config(rng) for _ in range(2)]
            return shared if rank == 0 else [net.sample_config(own) for _ in range(2)]
    else:

        def sample(rng):
            return [net.sample_config(rng) for _ in range(2)]
    if mutant == "no_average":
        real = distributed.average_gradients
        distributed.average_gradients = lambda params, w: None
    try:
        fit(net, _data(), SCHEDULE, sample=sample, progress=False, sync_bn=bn == "sync")
    finally:
        if mutant == "no_average":
            distributed.average_gradients = real
    return net


def _weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def _train_rank(rank: int, out: Path, bn: str, mutant: str) -> None:
    net = _train(bn, mutant)
    if rank == 0:
        torch.save(_weights(net), out / f"weights-{bn}{mutant}.pt")


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_processes_train_the_weights_one_process_does_and_the_test_can_tell(ranks):
    """Same global batch, batch norm in eval mode: the same weights after 4 steps, to float rounding.

    The comparison fails if the gradients are not averaged or the ranks draw their own subnets: the two
    mutants, run beside it, show it does.
    """
    one = _weights(_train("frozen"))
    for mutant in ("", "no_average", "own_subnets"):
        diff = _max_diff(one, torch.load(ranks / f"weights-frozen{mutant}.pt", weights_only=True))
        assert diff > 5e-4 if mutant else diff < 1e-6, (mutant, diff)  # measured: 7e-9 to 1.5e-8; 4e-3 and 1.5e-3


def test_sync_bn_normalises_every_rank_with_the_whole_batch(ranks):
    """train.sync_bn: two processes train as one with the whole batch (train-mode batch norm).

    Train-mode batch norm makes this net sensitive: a 1e-6 change of the weights grows to about 6e-5 in
    these 4 steps, hence the bound of 2e-4; with per-rank statistics (bn "rank") the difference is 1.3e-3.
    """
    one = _weights(_train("sync"))
    for bn in ("sync", "rank"):
        diff = _max_diff(one, torch.load(ranks / f"weights-{bn}.pt", weights_only=True))
        assert diff < 2e-4 if bn == "sync" else diff > 5e-4, (bn, diff)


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _hash_rank(rank: int, out: Path) -> None:
    net = tiny_net(SEED_SPACE)  # per-rank batch-norm statistics (official OFA's way)
    hashes = []

    def sample(rng):  # called before each step: the weights after the previous one
        hashes.append(_digest(net.parameters()))
        return [net.sample_config(rng) for _ in range(2)]

    inputs = []  # (images, digest) of each training forward: the rank's share of the batch
    net.register_forward_pre_hook(lambda m, args: inputs.append((args[0].shape[0], _digest([args[0]])))
                                  if m.training else None)
    fit(net, _data(), SCHEDULE, sample=sample, progress=False)
    hashes.append(_digest(net.parameters()))
    buffers = _digest(b for n, b in net.named_buffers() if "running" in n)
    torch.save({"steps": hashes, "buffers": buffers, "inputs": inputs}, out / f"hashes{rank}.pt")


def test_weights_are_identical_on_every_rank_after_every_step(ranks):
    tmp_path = ranks / "_hash_rank"  # where this test's rank-side job wrote
    r0, r1 = (torch.load(tmp_path / f"hashes{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["steps"] == r1["steps"] and len(r0["steps"]) == 5 and len(set(r0["steps"])) == 5  # all moved
    assert r0["buffers"] == r1["buffers"]  # running statistics averaged at the epoch's end


def test_each_rank_trains_on_its_own_half_of_every_batch(ranks):
    """Global batch 64 over 2 ranks: each forward of each rank sees 32 images, and not the other rank's."""
    tmp_path = ranks / "_hash_rank"
    r0, r1 = (torch.load(tmp_path / f"hashes{r}.pt", weights_only=True)["inputs"] for r in (0, 1))
    assert len(r0) == len(r1) == 4 * 2  # 4 steps of 2 subnets
    assert {n for n, _ in r0 + r1} == {SCHEDULE.batch_size // 2}
    assert all(a != b for (_, a), (_, b) in zip(r0, r1))  # the two halves differ at every forward
    assert r0[0][1] == r0[1][1] != r0[2][1]  # both subnets of a step see the same half; the next step, the next


def _evaluated_subnet():
    """Seen, BN statistics, test and val accuracy of a calibrated subnet; and the images this process computed."""
    net = perturb(tiny_net(SEED_SPACE))
    data = _data()
    sub = net.extract(net.sample_config(random.Random(3)))
    computed = []
    sub.register_forward_pre_hook(lambda module, args: computed.append(args[0].shape[0]))
    batches = data.calibration_batches(300, 128, seed=0)  # 3 batches (128, 128, 44): rank 0 takes 2, rank 1 one
    seen = calibrate_bn(sub, batches)
    stats = {n: b.clone() for n, b in sub.named_buffers() if "running" in n}
    calibrated, computed[:] = list(computed), []
    accuracy = evaluate(sub, data, batch_size=50), evaluate(sub, data, batch_size=50, split="val")
    return seen, stats, accuracy, calibrated, sum(computed)


def _evaluate_rank(rank: int, out: Path) -> None:
    torch.save(_evaluated_subnet(), out / f"evaluated{rank}.pt")


def test_calibration_and_evaluation_split_across_ranks_report_what_one_process_does(ranks):
    tmp_path = ranks / "_evaluate_rank"  # where this test's rank-side job wrote
    seen, stats, accuracy, _, _ = _evaluated_subnet()
    shares = {0: ([128, 44], 128 + 32), 1: ([128], 128 + 32)}  # batches dealt out; test (256) and val (64) halved
    for rank in (0, 1):
        r_seen, r_stats, r_accuracy, calibrated, evaluated = torch.load(tmp_path / f"evaluated{rank}.pt",
                                                                         weights_only=True)
        assert (r_seen, r_accuracy) == (seen, accuracy) and seen == 300
        assert (calibrated, evaluated) == shares[rank]
        for name in stats:  # the ranks' threads sum in another order: near-constant channels' variances move
            torch.testing.assert_close(r_stats[name], stats[name], rtol=1e-4, atol=1e-5)


class _BlowsUpOnRank1(torch.nn.Module):
    """A linear classifier whose output turns NaN from its 3rd training forward on, on rank 1 only."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 16 * 16, 10)
        self.calls = 0

    def forward(self, x):
        self.calls += self.training
        out = self.linear(x.flatten(1))
        return out * float("nan") if self.calls >= 3 and dist.get_rank() == 1 else out


def _diverge_rank(rank: int, out: Path) -> None:
    try:
        fit(_BlowsUpOnRank1(), _data(), Schedule(epochs=2, lr=0.1, batch_size=32, warmup_epochs=0.4), desc="t",
            resume=out / "state.pt", progress=False)
    except DivergenceError as e:
        (out / f"error{rank}.txt").write_text(str(e))


def test_a_divergence_on_one_rank_stops_every_rank_with_the_same_line(ranks):
    tmp_path = ranks / "_diverge_rank"  # where this test's rank-side job wrote
    errors = [(tmp_path / f"error{r}.txt").read_text() for r in (0, 1)]
    assert errors[0] == errors[1] == "t: loss is nan at epoch 1 step 3 (lr 0.06); lower the learning rate"
    assert not (tmp_path / "state.pt").exists()  # stopped before the epoch's state was saved


class _Stop(Exception):
    pass


def _resume_rank(rank: int, out: Path) -> None:
    def run(state: Path, stop_at: int | None = None):
        net = tiny_net(SEED_SPACE)
        epochs = []

        def after_epoch():
            epochs.append(1)
            if len(epochs) == stop_at:
                raise _Stop
            return {}

        schedule = Schedule(epochs=3, lr=0.1, batch_size=64, images_per_epoch=128, warmup_epochs=0.5)
        try:
            fit(net, _data(), schedule, sample=lambda rng: [net.sample_config(rng)], progress=False,
                resume=state, resume_key="k", epoch_metrics=after_epoch)
        except _Stop:
            return None, sorted(p.name for p in out.iterdir() if p.suffix == ".pt")
        return {k: v.clone() for k, v in net.state_dict().items()}, len(epochs)

    import ofa.train.state

    writes, real = [], ofa.train.state.atomic_write
    ofa.train.state.atomic_write = lambda path, *a, **k: writes.append(Path(path).name) or real(path, *a, **k)
    whole, _ = run(out / "a.pt")
    _, files = run(out / "b.pt", stop_at=2)  # killed after epoch 1's state was saved, in epoch 2
    dist.barrier()
    resumed, epochs_run = run(out / "b.pt")
    torch.save({"whole": whole, "resumed": resumed, "files": files, "epochs_run": epochs_run, "writes": writes},
               out / f"resume{rank}.pt")


def test_an_interrupted_two_process_run_resumes_where_it_stopped(ranks):
    tmp_path = ranks / "_resume_rank"  # where this test's rank-side job wrote
    for rank in (0, 1):
        r = torch.load(tmp_path / f"resume{rank}.pt", weights_only=True)
        assert r["files"] == ["a.pt", "b.pt"]  # the uninterrupted run's and the interrupted one's
        assert r["writes"] == (["a.pt"] * 3 + ["b.pt"] * 3 if rank == 0 else [])  # rank 0 alone writes
        assert r["epochs_run"] == 2  # epochs 2 and 3: epoch 1 came from the state
        for k, v in r["whole"].items():
            assert torch.equal(r["resumed"][k], v), k


def test_one_process_in_a_process_group_trains_the_same_bytes(tmp_path):
    alone = _train("sync").state_dict()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        grouped = _train("sync").state_dict()
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(alone[k], grouped[k]) for k in alone)


def test_batch_norm_over_ranks_keeps_its_precision_far_from_zero():
    """Channels whose values sit far from zero: the sums are taken less the running mean, so the variance
    is no small difference of large float32 sums (without the shift the output here was off by over 1000)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 4, 4, generator=g) + torch.tensor([3e4, -5e3, 0.0]).view(1, 3, 1, 1)
    running_mean, running_var = torch.tensor([3e4, -5e3, 0.0]), torch.ones(3)
    expected = torch.nn.functional.batch_norm(x.double(), running_mean.double().clone(), running_var.double().clone(),
                                              training=True, momentum=0.1, eps=1e-5)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        got = sync_bn.batch_norm_over_ranks(x, running_mean, running_var, None, None, 0.1, 1e-5)
    finally:
        dist.destroy_process_group()
    assert float((got.double() - expected).abs().max()) < 1e-2
    assert torch.allclose(running_var, 0.9 + 0.1 * x.double().var((0, 2, 3)).float(), rtol=1e-3)


def test_cpu_ranks_share_the_cores_and_more_ranks_than_cores_get_a_note(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert distributed.cpu_share(1) == (4, None)
    assert distributed.cpu_share(2) == (2, None)
    assert distributed.cpu_share(3) == (1, None)
    assert distributed.cpu_share(6) == (1, "train.processes: 6 processes share 4 CPU cores; each gets one thread "
                                           "and they run slower than 4 would")


def test_a_batch_that_does_not_split_evenly_is_one_line(synthetic):
    raw = committed_params()
    raw["train"].update(batch_size=100, processes=3)
    with pytest.raises(ParamsError, match=r"^train\.batch_size: 100 images per step do not split evenly across "
                                          r"train\.processes = 3 \(a multiple of 3\)$"):
        parse_params(raw)
    with pytest.raises(ValueError, match=r"^train\.batch_size: 64 images per step do not split evenly across 3"):
        fit(tiny_net(SEED_SPACE), synthetic, Schedule(epochs=1, lr=0.1, batch_size=64), progress=False,
            world=distributed.World(0, 3))
    epoch = len(synthetic.train)  # a step capped at an epoch's images says so
    with pytest.raises(ValueError, match=rf"^train\.batch_size: {epoch} images per step \(all of an epoch's, fewer than "
                                         r"train\.batch_size\) do not split evenly across 5"):
        fit(tiny_net(SEED_SPACE), synthetic, Schedule(epochs=1, lr=0.1, batch_size=4096), progress=False,
            world=distributed.World(0, 5))


def test_map_ordered_deals_items_round_robin_and_gathers_in_order(ranks):
    tmp_path = ranks / "_map_rank"  # where this test's rank-side job wrote
    for rank, mine in ((0, [0, 2, 4, 7]), (1, [1, 3])):
        assert json.loads((tmp_path / f"map{rank}.json").read_text()) == {"results": [0, 1, 4, 9, 16], "mine": mine}


def _map_rank(rank: int, out: Path) -> None:
    w = distributed.world()
    mine = []

    def square(x):
        mine.append(x)
        return x * x

    results = distributed.map_ordered(square, range(5), w)
    if w.main:  # rank 0 leads one more round of a single item: it is rank 0's
        assert distributed.lead(square, [7], w) == [49]
        distributed.dismiss(w)
    else:
        distributed.serve(square, w)
    (out / f"map{rank}.json").write_text(json.dumps({"results": results, "mine": mine}))


def _unused_rank(rank: int, out: Path) -> None:
    used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    used.grad = torch.full((2,), float(rank + 1))  # 1 on rank 0, 2 on rank 1
    optimizer = torch.optim.SGD([used, unused], lr=0.1, momentum=0.9, weight_decay=0.5)
    distributed.average_gradients([used, unused], distributed.world())
    result = {"used_grad": used.grad.tolist(), "unused_grad": unused.grad}
    optimizer.step()
    result.update(unused=unused.tolist(), unused_state=sorted(optimizer.state[unused]), used=used.tolist())
    (out / f"unused{rank}.json").write_text(json.dumps(result))


def test_a_parameter_no_subnet_used_stays_without_gradient_and_the_step_leaves_it_alone(ranks):
    """Its slot crosses the all-reduce as zeros but comes back as no gradient: no weight decay, no momentum."""
    for rank in (0, 1):
        result = json.loads((ranks / "_unused_rank" / f"unused{rank}.json").read_text())
        assert result == {"used_grad": [1.5, 1.5], "unused_grad": None, "unused": [1.0, 1.0, 1.0],
                          "unused_state": [], "used": [pytest.approx(1 - 0.1 * (1.5 + 0.5))] * 2}


def _inputs_rank(rank: int, out: Path) -> None:
    w, errors = distributed.world(), []
    version = torch.__version__
    for key, torch_version in (("same", version), (f"rank {rank}'s", version), ("same", f"{version}-rank{rank}")):
        torch.__version__ = torch_version  # as if this machine had its own torch
        try:
            distributed.check_same_inputs(key, w, "params.yaml, data/prepared/")
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
        finally:
            torch.__version__ = version
    (out / f"errors{rank}.json").write_text(json.dumps(errors))


def test_ranks_whose_inputs_or_torch_differ_from_rank_0s_stop_naming_the_rank(ranks):
    """On several machines each reads its own copy of params.yaml, the data and the checkpoint."""
    host = socket.gethostname()
    for rank in (0, 1):  # every rank stops with the same line
        assert json.loads((ranks / "_inputs_rank" / f"errors{rank}.json").read_text()) == [
            None,
            f"rank 1 of 2 (host {host}) has other inputs than rank 0 (host {host}): params.yaml, data/prepared/ "
            "must be the same on every machine",
            f"rank 1 of 2 (host {host}) runs torch {torch.__version__}-rank1, rank 0 torch {torch.__version__}-rank0: "
            "install the same on every machine"]


_RELEASE_JOB = """
import os, sys, torch
from ofa.train import distributed
with distributed.process_group("cpu") as w:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    torch.optim.SGD([p], lr=0.1).step()  # as a stage trains: SGD imports torch._dynamo, torch.distributed.nn
    distributed.all_sum_(p.grad, w)
threads = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
open(os.path.join(sys.argv[1], f"threads{os.environ['RANK']}.txt"), "w").write(" ".join(threads))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists the threads in /proc (Linux)")
def test_a_rank_has_released_its_process_group_when_it_exits(tmp_path):
    """No gloo thread outlives the group into the interpreter's shutdown (where it could abort the rank)."""
    job = tmp_path / "job.py"
    job.write_text(_RELEASE_JOB)
    assert launch.launch(2, str(job), [str(tmp_path)]) == 0
    for rank in (0, 1):
        threads = (tmp_path / f"threads{rank}.txt").read_text().split()
        assert threads and not [t for t in threads if "gloo" in t], threads


_PATIENT_JOB = """
import json, os, sys, time
import torch
from datetime import timedelta
from ofa.train import distributed
distributed.TIMEOUT = timedelta(seconds=4)  # the training collectives' limit, made short
with distributed.process_group("cpu") as w:
    def work(i):  # rank 1's item takes longer than a training collective may wait
        time.sleep(10 if i == 1 else 0)
        return i * 10
    results = distributed.map_ordered(work, [0, 1, 2], w)
    distributed.all_sum_(torch.ones(1), w)  # the training collectives still work after it
open(os.path.join(sys.argv[1], f"results{os.environ['RANK']}.json"), "w").write(json.dumps(results))
"""


def test_ranks_dealt_configs_wait_for_the_slowest_longer_than_training_collectives_do(tmp_path):
    """A rank waits in map_ordered for a peer's whole config (evaluate_space: hours of fine-tuning on a CPU);
    the object collectives have their own group and limit, so that wait is not a hung peer."""
    job = tmp_path / "job.py"
    job.write_text(_PATIENT_JOB)
    assert launch.launch(2, str(job), [str(tmp_path)]) == 0
    for rank in (0, 1):
        assert json.loads((tmp_path / f"results{rank}.json").read_text()) == [0, 10, 20]


# --- the stages with train.processes: 2 ---------------------------------------------------------------------


def _stage(name: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py")], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


_NO_LAUNCH = """
import runpy, sys
from ofa.train import launch as launching
def launch(*args):  # a stage that starts workers exits 99 instead
    sys.exit(99)
launching.launch = launch
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def test_download_runs_as_one_process_whatever_train_processes_says(tmp_path):
    """Nothing in download divides among processes: it starts no workers (each would fetch the dataset)."""
    raw = tiny_params()
    raw["train"]["processes"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-c", _NO_LAUNCH, str(ROOT / "stages" / "download.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["train_images"] == 384
    assert sorted(p.name for p in (tmp_path / "data" / "prepared").iterdir()) == [
        "classes.json", "test.pt", "train.pt", "val.pt"]
    result = subprocess.run([sys.executable, "-c", _NO_LAUNCH, str(ROOT / "stages" / "train_supernet.py")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 99  # the training stages do start their workers
    assert not (tmp_path / "models").exists()


# Loaded by every Python process started with its folder on PYTHONPATH: a stage's worker (RANK in its
# environment) logs each file it opens for writing or renames into place, as "<rank> <open|rename> <path>".
_WRITE_LOG = """
import builtins, io, os
if "RANK" in os.environ and "OFA_TEST_WRITES" in os.environ:
    _open, _replace, _rename, _log_path = builtins.open, os.replace, os.rename, os.environ["OFA_TEST_WRITES"]

    def _log(how, path):
        with _open(_log_path, "a") as f:
            f.write(f"{os.environ['RANK']} {how} {os.path.abspath(path)}\\n")

    def _logged_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            _log("open", file)
        return _open(file, mode, *args, **kwargs)

    def _logged_replace(src, dst, *args, **kwargs):
        _log("rename", dst)
        return _replace(src, dst, *args, **kwargs)

    def _logged_rename(src, dst, *args, **kwargs):
        _log("rename", dst)
        return _rename(src, dst, *args, **kwargs)

    builtins.open = io.open = _logged_open
    os.replace, os.rename = _logged_replace, _logged_rename
"""


@pytest.fixture(scope="module")
def two_process_repro(tmp_path_factory) -> tuple[Path, str, list[tuple[str, str, str]]]:
    """The tiny project run by `dvc repro` with train.processes 2: its folder, the output, and the workers'
    writes (rank, open or rename, path relative to the project)."""
    raw = tiny_params()
    raw["train"]["processes"] = 2
    raw["supernet"]["epochs"] = 1
    raw["specialize"].update(trials=8, population=8, budgets=[1500000])  # the uniform grid; one export
    project = new_project(tmp_path_factory.mktemp("two_processes"), raw)
    hooks = tmp_path_factory.mktemp("hooks")
    (hooks / "sitecustomize.py").write_text(_WRITE_LOG)
    log = hooks / "writes.log"
    out = run([sys.executable, "-m", "dvc", "repro"], project,
              env={"PYTHONPATH": str(hooks), "OFA_TEST_WRITES": str(log)})
    writes = [line.split(" ", 2) for line in log.read_text().splitlines()]
    return project, out, [(rank, how, os.path.relpath(path, project)) for rank, how, path in writes]


def test_only_rank_0_writes_outputs_and_every_output_is_renamed_into_place(two_process_repro):
    project, _, writes = two_process_repro
    inside = [(rank, how, path) for rank, how, path in writes if not path.startswith("..")]
    rank0 = {path for rank, how, path in inside if rank == "0" and how == "rename"}
    assert {"models/train_supernet.pt", "models/shrink_width.pt", "metrics/train_supernet.json",
            "metrics/space.json", "metrics/specialize.json", "metrics/live/train_supernet",
            "models/specialized", "models/baseline", "metrics/baseline.json"} <= rank0  # the log sees the writes
    # rank 1 writes nothing but the fine-tuning state of the configs it evaluates
    assert {path for rank, how, path in inside if rank != "0"} <= {".resume/evaluate_space.rank1.pt"}
    # nothing is written in place in models/ or metrics/: each file or folder is renamed there when complete
    in_place = [path for _, how, path in inside if how == "open" and path.split("/")[0] in ("models", "metrics")]
    assert not in_place, in_place


def test_repro_with_two_processes_runs_every_stage_on_two_ranks(two_process_repro):
    project, out, _ = two_process_repro
    assert ran(out) == STAGES
    assert out.count("error") == 0 and len(re.findall(r"^\[1/9\]", out, re.M)) == 1  # rank 0 alone reports
    for stage in STAGES[2:]:  # latency runs as one process: timings of two at once would slow each other
        assert json.loads((project / "metrics" / "timing" / f"{stage}.json").read_text())["processes"] == 2
    for stage in TRAINING:
        m = json.loads((project / "metrics" / f"{stage}.json").read_text())
        timing = json.loads((project / "metrics" / "timing" / f"{stage}.json").read_text())
        assert timing["epochs"] >= 1 and m["accuracy_max"] > 0.2  # chance is 0.1
    records = json.loads((project / "metrics" / "space.json").read_text())
    assert [r["config"] for r in records[:8]] == [f"k{k}-d{d}-w{w}" for k in (5, 7) for d in (2, 3) for w in (2, 4)]
    assert len(records) == 9 and all(0.2 < r["accuracy"] <= 1 for r in records[:8])
    rows = json.loads((project / "metrics" / "baseline.json").read_text())["configs"]  # trained data-parallel
    assert [r["config"] for r in rows] == ["k5-d2-w2", "k7-d3-w4"] and all(r["alone"]["accuracy"] > 0.15 for r in rows)
    assert [r["supernet"]["accuracy"] for r in rows] == [records[0]["accuracy"], records[7]["accuracy"]]
    picks = json.loads((project / "metrics" / "picks.json").read_text())["budgets"]
    assert list(picks) == ["macs-1.5M"] and picks["macs-1.5M"]["macs"] <= 1500000
    assert sorted(p.name for p in (project / "models" / "specialized").iterdir()) == ["macs-1.5M.onnx", "macs-1.5M.pt"]
    assert [p.name for p in (project / ".resume").rglob("*") if p.is_file()] == ["specialize.db"]  # the search


def test_evaluate_space_on_two_ranks_records_what_one_process_does(two_process_repro):
    """Each config is evaluated and fine-tuned by one rank alone, with its own seed: the same records."""
    project, _, _ = two_process_repro
    two = (project / "metrics" / "space.json").read_text()
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"]["processes"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        result = _stage("evaluate_space", project)
        assert result.returncode == 0, result.stderr
        assert (project / "metrics" / "space.json").read_text() == two
    finally:
        run(["git", "-C", str(project), "checkout", "params.yaml"], project)


def test_the_predictor_strategy_on_latency_deals_out_its_scoring_and_picks_what_one_process_does(two_process_repro):
    """specialize.strategy predictor with specialize.cost latency on two ranks: each new config is scored by one
    rank, every pick fits its budget in predicted milliseconds, and one process scoring everything afresh fits
    the same predictor and picks the same."""
    project, _, _ = two_process_repro
    checked = json.loads((project / "metrics" / "latency_validation.json").read_text())
    budget = sorted(r["predicted_ms"] for r in checked["records"] if r["uniform"])[4]  # room for half the grid
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["specialize"].update(strategy="predictor", cost="latency", budgets=[budget])
    raw["specialize"]["predictor"] = {"samples": 6, "held_out": 0.3, "trials": 200, "verify": 2}
    results = {}
    try:
        for processes in (2, 1):
            raw["train"]["processes"] = processes
            (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
            shutil.rmtree(project / ".resume", ignore_errors=True)  # score every config afresh
            result = _stage("specialize", project)
            assert result.returncode == 0, result.stderr
            picks = json.loads((project / "metrics" / "picks.json").read_text())
            results[processes] = (json.loads((project / "metrics" / "predictor.json").read_text()),
                                  {n: (p["config"], p["val_accuracy"]) for n, p in picks["budgets"].items()})
            assert picks["strategy"] == "predictor" and picks["cost"] == "latency"
            assert all(p["predicted_ms"] <= budget for p in picks["budgets"].values())
            timing = json.loads((project / "metrics" / "timing" / "specialize.json").read_text())
            assert timing["processes"] == processes and timing["configs_scored"] == picks["configs_evaluated"]
    finally:
        run(["git", "-C", str(project), "checkout", "params.yaml"], project)
    predictor, chosen = results[2]
    assert (predictor["fitted"], predictor["held_out"]) == (8 + 4, 2) and len(predictor["records"]) == 2
    for r in results.values():
        r[0].pop("search_s")
    diff = {k: (v, results[1][0].get(k)) for k, v in results[2][0].items() if results[1][0].get(k) != v}
    assert not diff, diff
    assert results[1] == results[2]


def _resume_space_rank(rank: int, out: Path, project: Path) -> None:
    """evaluate_space on two ranks: whole; stopped one fine-tuning epoch into the second round; resumed."""
    from ofa.pipeline import evaluate_space
    from ofa.train import state as train_state

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["evaluate"]["finetune"]["epochs"] = 2
    params = parse_params(raw)
    save, saves = train_state.save, []

    def counted(*args):
        save(*args)
        saves.append(args[0].name)
        if stop and len(saves) == 5:  # round 1: configs 1 and 2 (2 epochs each); then 1 epoch of configs 3 and 4
            raise KeyboardInterrupt

    train_state.save = counted
    for name, stop in (("whole", False), ("stopped", True), ("stopped", False)):
        root = out / name
        if not root.exists() and rank == 0:
            for d in ("data/prepared", "models"):
                shutil.copytree(project / d, root / d)
        dist.barrier()
        saves.clear()
        try:
            evaluate_space.evaluate_space(params, root, progress=False)
        except KeyboardInterrupt:
            dist.barrier()  # both ranks stopped
            (out / f"stopped{rank}.json").write_text(json.dumps(sorted(p.name for p in (root / ".resume").iterdir())))
        (out / f"saves_{name}{'_stop' if stop else ''}{rank}.json").write_text(json.dumps(saves))


def test_evaluate_space_on_two_ranks_resumes_each_ranks_fine_tuning_and_writes_what_a_whole_run_does(
        two_process_repro, tmp_path):
    project, _, _ = two_process_repro
    spawn(_resume_space_rank, tmp_path, project, timeout=300)
    # stopped inside round 2: the records of round 1, and each rank's state of the config it was fine-tuning
    assert json.loads((tmp_path / "stopped0.json").read_text()) == [
        "evaluate_space.json", "evaluate_space.pt", "evaluate_space.rank1.pt"]
    for rank in (0, 1):
        whole = json.loads((tmp_path / f"saves_whole{rank}.json").read_text())
        resumed = json.loads((tmp_path / f"saves_stopped{rank}.json").read_text())
        assert len(whole) == (10 if rank == 0 else 8) and len(resumed) == len(whole) - 5  # nothing trained twice
    space = [(tmp_path / name / "metrics" / "space.json").read_bytes() for name in ("whole", "stopped")]
    assert space[0] == space[1]


def _workers(marker: str) -> dict[int, int]:
    """rank -> pid of the stage workers whose environment carries `marker`."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError):
            continue
        if env.get("OFA_TEST_MARKER") == marker and "RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory) -> Path:
    """A synthetic project, downloaded, whose train_supernet runs 2 processes for 12 epochs of 2 steps."""
    root = tmp_path_factory.mktemp("downloaded")
    raw = tiny_params(train_limit=256)  # 128 training images after val
    raw["train"]["processes"] = 2
    raw["supernet"]["epochs"] = 12
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    assert _stage("download", root).returncode == 0
    return root


@pytest.fixture()
def long_training(downloaded, tmp_path) -> tuple[Path, dict]:
    """A fresh copy of `downloaded` and the environment to run its stages in (a marker finds the workers)."""
    cwd = tmp_path / "project"
    shutil.copytree(downloaded, cwd)
    return cwd, {**os.environ, "OFA_TEST_MARKER": str(cwd), "PYTHONUNBUFFERED": "1"}


def _start_and_wait_for_an_epoch(cwd: Path, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages" / "train_supernet.py")], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (cwd / ".resume" / "train_supernet.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("victim", ["rank 1", "the launcher"])
def test_a_killed_process_ends_the_stage_within_seconds_and_writes_no_output(long_training, victim):
    cwd, env = long_training
    proc = _start_and_wait_for_an_epoch(cwd, env)
    workers = _workers(env["OFA_TEST_MARKER"])
    assert sorted(workers) == [0, 1]
    os.kill(workers[1] if victim == "rank 1" else proc.pid, signal.SIGKILL)
    start = time.monotonic()
    if victim == "rank 1":
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1
        assert err.splitlines()[-1] == ("error: rank 1 of 2 was killed by SIGKILL; the other ranks were stopped "
                                        "(rerun the stage to resume it)")
    else:
        proc.communicate(timeout=60)
        while _workers(env["OFA_TEST_MARKER"]):  # the workers die with their launcher
            assert time.monotonic() - start < 10
            time.sleep(0.05)
    assert time.monotonic() - start < 30
    assert not (cwd / "models").exists() and not (cwd / "metrics").exists()
    if victim == "rank 1":  # a rerun with the same two processes continues from rank 0's state
        result = _stage("train_supernet", cwd, env)
        assert result.returncode == 0, result.stderr
        assert re.search(r"train_supernet: resuming after epoch [1-9][0-9]?/12", result.stderr)
        assert json.loads((cwd / "metrics" / "timing" / "train_supernet.json").read_text())["epochs"] == 12


def test_a_stage_started_by_torchrun_on_two_nodes_joins_their_job(long_training):
    """As on two machines: two torchrun launchers of one process each, meeting at a c10d rendezvous."""
    cwd, env = long_training
    raw = yaml.safe_load((cwd / "params.yaml").read_text())
    raw["train"]["processes"] = 1  # unused under torchrun: the world is the launchers'
    raw["supernet"]["epochs"] = 1
    (cwd / "params.yaml").write_text(yaml.safe_dump(raw))
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "two-nodes"]
    nodes = [subprocess.Popen([*torchrun, "--node-rank", str(n), str(ROOT / "stages" / "train_supernet.py")],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (0, 1)]
    outs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs
    assert sum('"accuracy_max"' in out for out, _ in outs) == 1  # global rank 0 alone reports
    assert json.loads((cwd / "metrics" / "timing" / "train_supernet.json").read_text())["processes"] == 2
    assert (cwd / "models" / "train_supernet.pt").is_file()


def test_a_divergence_stops_both_ranks_with_one_line(long_training):
    cwd, env = long_training
    raw = yaml.safe_load((cwd / "params.yaml").read_text())
    raw["supernet"]["lr"] = 1.0e12
    (cwd / "params.yaml").write_text(yaml.safe_dump(raw))
    result = _stage("train_supernet", cwd, env)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and re.fullmatch(r"error: train_supernet: loss is (nan|inf) at epoch \d+ step \d+ "
                                             r"\(lr [0-9.e+]+\); lower the learning rate", errors[0]), result.stderr
    assert "Traceback" not in result.stderr
    assert not (cwd / "models").exists() and not (cwd / "metrics").exists()


def test_the_ranks_of_a_machine_each_hold_the_dataset_in_its_memory(downloaded, monkeypatch):
    from ofa.pipeline import context

    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(memory, "available_memory", lambda device: 1000)
    params = parse_params(yaml.safe_load((downloaded / "params.yaml").read_text()))
    files = sum(f.stat().st_size for f in context.prepared_files(downloaded))
    size = memory.size_text(2 * (files + 4 * 128 * 3 * 16 * 16))  # 2 copies, each with its calibration images
    with pytest.raises(data_mod.DataError, match=rf"^the prepared dataset with 128 BN calibration images, once per "
                                                 rf"process \(2\), needs {size} but cpu has 1\.0 KiB available; lower "
                                                 r"data\.image_size, data\.train_limit, "
                                                 r"evaluate\.bn_calibration_images or train\.processes$"):
        context.StageContext.open(params, downloaded, "train_supernet")


def test_on_a_gpu_the_host_memory_the_dataset_passes_through_is_checked_too(downloaded, monkeypatch):
    from ofa.pipeline import context

    files = sum(f.stat().st_size for f in context.prepared_files(downloaded))
    params = parse_params(yaml.safe_load((downloaded / "params.yaml").read_text()))
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**40 if device.type == "cuda" else files - 1)
    with pytest.raises(data_mod.DataError, match=r"^reading the prepared dataset into host memory on its way to "
                                                 r"cuda:0 needs .* but cpu has .* available; lower data\.image_size "
                                                 r"or data\.train_limit$"):
        context.check_memory(params, downloaded, torch.device("cuda", 0), 100, (3, 16, 16))
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**40 if device.type == "cuda" else files)
    context.check_memory(params, downloaded, torch.device("cuda", 0), 100, (3, 16, 16))  # just fits


def test_a_cuda_rank_joins_with_nccl_on_the_gpu_of_its_local_rank(monkeypatch):
    """The CUDA branch of process_group, with torch.cuda and the process group stood in for (no GPU here)."""
    calls = []
    env = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "LOCAL_RANK": "1",
           "LOCAL_WORLD_SIZE": "2"}  # the second process of the second machine
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(distributed.ERRORS_ENV, raising=False)
    gpus = {"count": 2}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus["count"] > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus["count"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend, kw.get("device_id"), kw.get("timeout"))))
    monkeypatch.setattr(dist, "new_group", lambda backend, timeout: calls.append(("group", backend, timeout)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    threads = torch.get_num_threads()
    try:
        with distributed.process_group("auto"):
            pass
        control = ("group", "gloo", distributed.CONTROL_TIMEOUT)  # dealing configs out, gathering records
        assert calls == [("set_device", 1), ("init", "nccl", torch.device("cuda", 1), distributed.TIMEOUT),
                         control, ("destroy",)]
        calls.clear()
        with distributed.process_group("cpu"):  # train.device cpu: gloo, whatever GPUs there are
            pass
        assert calls == [("init", "gloo", None, distributed.TIMEOUT), control, ("destroy",)]
        for count, what in ((1, "1 CUDA devices"), (0, "no CUDA device")):
            gpus["count"] = count
            with pytest.raises(ValueError, match=rf"^train\.processes: 2 processes on this machine but {what} "
                                                 r"\(at most one process per GPU\)$"):
                with distributed.process_group("cuda"):
                    pass
    finally:
        torch.set_num_threads(threads)


def test_the_launcher_names_the_rank_that_caused_the_failure(tmp_path):
    """When several ranks fail at once, the one reported is the cause, not a peer that failed because of it."""
    from types import SimpleNamespace as Failure

    killed, exited, stopped = Failure(exitcode=-signal.SIGKILL), Failure(exitcode=1), Failure(exitcode=-signal.SIGTERM)
    assert launch._cause(tmp_path, {0: exited, 1: killed}) == 1  # rank 0 exited on its broken connection
    assert launch._cause(tmp_path, {0: stopped, 1: exited}) == 1  # rank 0 was stopped by the launcher
    assert launch._cause(tmp_path, {0: exited, 1: exited}) == 0
    (tmp_path / "rank1.json").write_text(json.dumps({"message": "train_supernet: loss is nan"}))
    assert launch._cause(tmp_path, {0: killed, 1: exited}) == 1  # its own one-line error comes first
    assert launch.failure_message(tmp_path, 1, 2, 2) == "train_supernet: loss is nan"
    assert launch.failure_message(tmp_path, 0, -signal.SIGKILL, 2) == (
        "rank 0 of 2 was killed by SIGKILL; the other ranks were stopped (rerun the stage to resume it)")
