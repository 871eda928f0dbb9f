"""The CUDA path, each part checked against the same work on the CPU: training (bf16 autocast, channels_last,
data and augmentation on the GPU), BN re-calibration and evaluation, resume, the divergence guard, export of a
subnet trained on the GPU, latency on the GPU (torch runtime, CUDA events), and the stages run in one process on
``train.device: cuda``, the latency table built there.

Skipped without CUDA. ``OFA_TEST_DEVICE=cpu`` runs them on the CPU instead, which checks the tests themselves
(there every comparison with the CPU is exact).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

import ofa
from conftest import SEED_SPACE, BlowsUp, tiny_net
from ofa import data as data_mod
from ofa.train import DeviceData, DivergenceError, Schedule, calibrate_bn, evaluate, fit

DEVICE = os.environ.get("OFA_TEST_DEVICE", "cuda")
SCHEDULE = Schedule(epochs=3, lr=0.2, batch_size=32, warmup_epochs=0.5)


@pytest.fixture(scope="module")
def device() -> torch.device:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    return torch.device(DEVICE)


def on(data: DeviceData, device: torch.device) -> DeviceData:
    """The same splits and normalisation on `device`."""
    move = lambda s: data_mod.Split(s.images.to(device), s.labels.to(device))  # noqa: E731
    return DeviceData(move(data.train), move(data.val), move(data.test), data.mean.to(device), data.std.to(device),
                      device)


def two_subnets(net: ofa.OFANet):
    """A step's configs: the max config and a random one (so the GPU slices and transforms the weights)."""
    return lambda rng: [net.max_config(), net.sample_config(rng)]


@pytest.fixture(scope="module")
def trained(synthetic, device) -> dict[str, tuple[ofa.OFANet, list]]:
    """The same tiny supernet trained on the CPU and on the device: {"cpu"|"device": (net, history)}."""
    runs = {}
    for name, where in (("cpu", torch.device("cpu")), ("device", device)):
        net = tiny_net(SEED_SPACE).to(where)
        history = fit(net, on(synthetic, where), SCHEDULE, sample=two_subnets(net), progress=False)
        runs[name] = net, history
    return runs


def test_training_on_the_device_learns_as_on_the_cpu(trained, synthetic, device):
    cpu_hist, (net, hist) = trained["cpu"][1], trained["device"]
    assert {p.device.type for p in net.parameters()} == {device.type}
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert hist[-1].loss < hist[0].loss
    for a, b in zip(cpu_hist, hist):  # bf16 autocast on CUDA rounds the forward: close, not equal
        assert b.loss == pytest.approx(a.loss, rel=0 if device.type == "cpu" else 0.1)
    data = on(synthetic, device)
    sub = net.extract(net.max_config())
    calibrate_bn(sub, data.calibration_batches(256, 64, seed=0))
    assert evaluate(sub, data) > 0.5  # chance is 0.1


def test_calibration_and_evaluation_on_the_device_match_the_cpu(trained, synthetic, device):
    cfg = SEED_SPACE.uniform_grid(2)[1]
    results = {}
    for name, where in (("cpu", torch.device("cpu")), ("device", device)):
        net = copy.deepcopy(trained["cpu"][0]).to(where)
        data = on(synthetic, where)
        sub = net.extract(cfg)
        calibrate_bn(sub, data.calibration_batches(256, 64, seed=0))
        stats = [t.detach().cpu() for n, t in sub.state_dict().items() if n.endswith(("running_mean", "running_var"))]
        results[name] = stats, evaluate(sub, data), evaluate(net, data, cfg)
    (cpu_stats, cpu_sub, cpu_net), (stats, acc_sub, acc_net) = results["cpu"], results["device"]
    tolerance = 0 if device.type == "cpu" else 3e-2  # batch statistics of bf16 activations
    for a, b in zip(cpu_stats, stats):
        assert torch.allclose(a, b, rtol=tolerance, atol=tolerance)
    # the calibrated subnet and the supernet at its config (its own statistics) score as on the CPU; near-ties
    # may flip under bf16
    assert acc_sub == pytest.approx(cpu_sub, abs=0 if device.type == "cpu" else 0.03)
    assert acc_net == pytest.approx(cpu_net, abs=0 if device.type == "cpu" else 0.03)


class _Stop(Exception):
    pass


def test_a_stopped_fit_on_the_device_resumes_from_its_last_epoch(synthetic, device, tmp_path):
    data = on(synthetic, device)

    def run(state: Path | None, stop_at: int | None = None) -> tuple[ofa.OFANet, list[int]]:
        net = tiny_net(SEED_SPACE).to(device)
        epochs: list[int] = []

        def epoch_metrics() -> dict[str, float]:
            epochs.append(len(epochs) + 1)
            if stop_at is not None and len(epochs) == stop_at:
                raise _Stop
            return {}

        try:
            fit(net, data, SCHEDULE, sample=two_subnets(net), progress=False, resume=state, resume_key="k",
                epoch_metrics=epoch_metrics)
        except _Stop:
            pass
        return net, epochs

    whole, _ = run(None)
    run(tmp_path / "state.pt", stop_at=2)  # epoch 1 saved, stopped in epoch 2
    resumed, epochs = run(tmp_path / "state.pt")
    assert epochs == [1, 2]  # epochs 2 and 3 of the schedule: epoch 1 came from the saved state
    # on CUDA the convolutions' backward may sum in another order from run to run (cuDNN): close, not equal
    tolerance = 0 if device.type == "cpu" else 1e-3
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=tolerance, atol=tolerance), name


def test_the_divergence_guard_on_the_device_names_the_step_and_saves_nothing(synthetic, device, tmp_path):
    model = BlowsUp(at=3).to(device)
    with pytest.raises(DivergenceError, match=r"^t: loss is nan at epoch 1 step 3 \(lr 0\.06\); lower the learning rate$"):
        fit(model, on(synthetic, device), Schedule(epochs=2, lr=0.1, batch_size=32, warmup_epochs=0.4), desc="t",
            resume=tmp_path / "state.pt", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_subnet_trained_on_the_device_exports_and_reloads(trained, synthetic, device, tmp_path):
    net = trained["device"][0]
    data = on(synthetic, device)
    sub = net.extract(SEED_SPACE.uniform_grid(2)[0])
    calibrate_bn(sub, data.calibration_batches(256, 64, seed=0))
    mean, std = data.mean.flatten().tolist(), data.std.flatten().tolist()
    diff = ofa.export_onnx(sub, tmp_path / "sub.onnx", (3, 16, 16), mean=mean, std=std)
    assert diff <= 1e-4 and (tmp_path / "sub.onnx").is_file()
    ofa.save_subnet(sub, tmp_path / "sub.pt")
    loaded = ofa.load_subnet(tmp_path / "sub.pt")
    saved, back = sub.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys()
    assert all(torch.equal(saved[name].cpu(), back[name].cpu()) for name in saved)


def test_the_stages_run_on_the_device(device, tmp_path):
    for module in ("dvclive", "optuna", "calflops", "matplotlib"):  # the stages' own imports, absent from a bare
        pytest.importorskip(module)  # GPU image
    from ofa.pipeline import context, download, evaluate_space, latency, specialize, training
    from ofa.pipeline.config import parse_params
    from test_pipeline import tiny_params

    raw = tiny_params()
    raw["train"]["device"] = DEVICE
    raw["latency"].update(runtime="torch", hardware=device.type, validate=2)
    params = parse_params(raw)
    download.download(params, tmp_path)
    checked = latency.latency(params, tmp_path, progress=False)
    assert checked["configs"] == 10 and checked["fastest_ms"] > 0
    for stage in context.TRAINING_STAGES:
        training.train_stage(params, stage, tmp_path, progress=False)
    evaluate_space.evaluate_space(params, tmp_path, progress=False)
    summary = specialize.specialize(params, tmp_path, progress=False)
    metrics = tmp_path / "metrics"
    for stage in context.TRAINING_STAGES:
        assert json.loads((metrics / "timing" / f"{stage}.json").read_text())["device"] == device.type
    assert json.loads((metrics / "shrink_width.json").read_text())["accuracy_max"] > 0.5
    space = json.loads((metrics / "space.json").read_text())
    assert len(space) == 9 and all(r["accuracy"] > 0.3 for r in space)
    assert all(b["onnx_max_abs_diff"] <= 1e-4 and b["macs"] <= b["budget"] for b in summary["budgets"].values())
    assert all(b["measured_torch_ms"] > 0 and b["predicted_ms"] > 0 for b in summary["budgets"].values())


def test_latency_on_the_device_is_timed_with_cuda_events(device):
    """The torch runtime on the GPU: a larger subnet takes longer, and a table of its parts predicts both."""
    from ofa.deploy import LatencyTable

    net = tiny_net(SEED_SPACE)
    small, large = (net.extract(c).eval() for c in (net.min_config(), net.max_config()))
    ms = [ofa.measure_latency(sub, (3, 16, 16), runtime="torch", batch_size=64, device=device.type)
          for sub in (small, large)]
    assert 0 < ms[0] < ms[1] < 1000, ms
    table = LatencyTable.build(net, (3, 16, 16), runtime="torch", batch_size=64, device=device.type, progress=False)
    assert table.device == device.type and (table.host["gpu"] is not None) == (device.type == "cuda")
    assert 0 < table.predict(net.min_config()) < table.predict(net.max_config())
