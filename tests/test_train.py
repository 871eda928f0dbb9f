"""The training loop: schedule, what trains, distillation, evaluation and the learning itself."""

from __future__ import annotations

import pytest
import torch

from ofa.train import SYNC_EVERY, DivergenceError, Schedule, calibrate_bn, evaluate, fit, soft_cross_entropy
from conftest import SEED_SPACE, BlowsUp, tiny_net


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_zero():
    s = Schedule(epochs=4, lr=0.4, batch_size=8, warmup_epochs=1.0)
    lrs = [s.lr_at(i, 40, 10) for i in range(40)]
    assert lrs[0] == pytest.approx(0.04) and lrs[9] == pytest.approx(0.4)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[10] == pytest.approx(0.4) and lrs[-1] < 0.002 and s.lr_at(40, 40, 10) == pytest.approx(0.0)
    assert s.lr_at(25, 40, 10) == pytest.approx(0.2, abs=0.02)  # half way through the cosine


def test_soft_cross_entropy_is_minimal_at_the_teacher():
    target = torch.softmax(torch.tensor([[2.0, 0.0, -1.0]]), 1)
    at_teacher = soft_cross_entropy(torch.tensor([[2.0, 0.0, -1.0]]), target)
    assert at_teacher == pytest.approx(float(-(target * target.log()).sum()))
    assert soft_cross_entropy(torch.tensor([[0.0, 2.0, -1.0]]), target) > at_teacher


def test_fit_learns_the_synthetic_set(synthetic):
    net = tiny_net(SEED_SPACE)
    history = fit(net, synthetic, Schedule(epochs=3, lr=0.2, batch_size=32, warmup_epochs=0.5), progress=False,
                  sample=lambda rng: [net.max_config()])
    assert [h.epoch for h in history] == [1, 2, 3] and history[-1].loss < history[0].loss
    sub = net.extract(net.max_config())
    calibrate_bn(sub, synthetic.calibration_batches(256, 64, seed=0))
    assert evaluate(sub, synthetic) > 0.5  # chance is 0.1


def test_only_the_given_parameters_train(synthetic):
    net = tiny_net(SEED_SPACE)
    transforms = [p for n, p in net.named_parameters() if ".transforms." in n]
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    fit(net, synthetic, Schedule(epochs=1, lr=0.05, batch_size=64), parameters=transforms, progress=False,
        sample=lambda rng: [net.sample_config(rng, depth=False, width=False)])
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".transforms." in n for n in changed)


def test_teacher_changes_the_loss(synthetic):
    losses = []
    for kd in (0.0, 1.0):
        net = tiny_net(SEED_SPACE)
        teacher = tiny_net(SEED_SPACE).extract(net.max_config()).eval()
        h = fit(net, synthetic, Schedule(epochs=1, lr=0.01, batch_size=64), teacher=teacher, kd_ratio=kd,
                progress=False, sample=lambda rng: [net.min_config(), net.max_config()])
        losses.append(h[0].loss)
    assert losses[1] > losses[0] + 0.5  # a random teacher's soft targets add about log(10)


def test_non_finite_loss_names_its_step_and_nothing_is_saved(synthetic, tmp_path):
    model = BlowsUp(at=3)  # 448 training images / batch 32: 14 steps, read back after steps 1 and 14
    with pytest.raises(DivergenceError, match=r"^t: loss is nan at epoch 1 step 3 \(lr 0\.06\); lower the learning rate$"):
        fit(model, synthetic, Schedule(epochs=2, lr=0.1, batch_size=32, warmup_epochs=0.4), desc="t",
            resume=tmp_path / "state.pt", progress=False)
    assert model.calls == 14 and list(tmp_path.iterdir()) == []  # stopped at the end of epoch 1, nothing saved


def test_a_non_finite_loss_mid_epoch_stops_at_the_next_read_back_naming_its_first_step(synthetic, tmp_path):
    model = BlowsUp(at=5)  # 2 * SYNC_EVERY steps of 8 images: read back after steps 1, SYNC_EVERY + 1, ...
    schedule = Schedule(epochs=1, lr=0.1, batch_size=8, warmup_epochs=0.0, images_per_epoch=8 * 2 * SYNC_EVERY)
    with pytest.raises(DivergenceError, match=r"^t: loss is nan at epoch 1 step 5 \(lr 0\.\d+\); lower the"):
        fit(model, synthetic, schedule, desc="t", resume=tmp_path / "state.pt", progress=False)
    assert model.calls == SYNC_EVERY + 1 and list(tmp_path.iterdir()) == []  # not to the epoch's end, nothing saved


def test_the_loop_reads_the_device_once_per_sync_interval(synthetic, monkeypatch):
    """Reading a CUDA tensor on the host waits for the device: the divergence guard must not do it every step."""
    reads = []
    net = tiny_net(SEED_SPACE)
    teacher = tiny_net(SEED_SPACE).extract(net.max_config()).requires_grad_(False)
    for name in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=original, _n=name: reads.append(_n) or _o(self))
    # a shrink stage's step: a supernet, two sampled subnets, augmentation, a teacher in train mode
    schedule = Schedule(epochs=1, lr=0.01, batch_size=8, images_per_epoch=8 * 2 * SYNC_EVERY)
    fit(net, synthetic, schedule, teacher=teacher, kd_ratio=0.5, progress=False,
        sample=lambda rng: [net.sample_config(rng) for _ in range(2)])
    assert reads == ["__int__"] * 3 + ["__float__", "__int__"], reads  # after steps 1, 21 and 40; the epoch's means
