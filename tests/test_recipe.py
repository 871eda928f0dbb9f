"""The progressive-shrinking recipe: loss reduction, subnets per step, phases, teacher, and the official head and init."""

from __future__ import annotations

import copy
import random
import shutil

import pytest
import torch

import ofa
from conftest import PAPER_SPACE, SEED_SPACE, TINY_UNITS, committed_params, perturb
from ofa.pipeline import recipe
from ofa.pipeline.config import parse_params
from ofa.train import Schedule, fit
from test_pipeline import tiny_params


DIMS = ("kernel", "depth", "width")


def _params(**shrink):
    raw = tiny_params()
    for key, value in shrink.items():
        node, *path = key.split(".")
        target = raw["shrink"]
        for part in [node, *path][:-1]:
            target = target[part]
        target[[node, *path][-1]] = value
    return parse_params(raw)


def _widths(configs) -> set:
    """The widths of the active blocks of `configs`."""
    return {w for c in configs for u, ws in enumerate(c.width) for w in ws[: c.depth[u]]}


def test_the_shipped_recipe_is_the_official_one():
    s = parse_params(committed_params()).shrink
    assert (s.reduce, s.teacher, s.teacher_bn, s.sample) == ("sum", "full", "train", "random")
    assert [s.subnets(dim) for dim in DIMS] == [1, 2, 4]
    assert (s.depth.first_phase.epochs, s.width.first_phase.epochs) == (25, 25)
    assert (s.depth.first_phase.warmup_epochs, s.width.first_phase.warmup_epochs) == (0, 0)


def test_shrink_subnets_per_step_sets_every_stage_and_a_stage_key_wins():
    shared = _params(subnets_per_step=3, **{"width.subnets_per_step": None})
    assert [shared.shrink.subnets(dim) for dim in DIMS] == [3, 3, 3]
    assert [p.subnets_per_step for stage in ("shrink_kernel", "shrink_depth", "shrink_width")
            for p in recipe.phases(shared, stage, PAPER_SPACE)] == [3, 3, 3, 3, 3]
    own = _params(subnets_per_step=3)  # the tiny params set shrink.width.subnets_per_step: 2
    assert [own.shrink.subnets(dim) for dim in DIMS] == [3, 3, 2]
    official = _params(**{"width.subnets_per_step": None})
    assert [official.shrink.subnets(dim) for dim in DIMS] == [1, 2, 4]


def test_summed_losses_step_as_far_as_their_count_times_the_mean(synthetic):
    """Two copies of one subnet per step: with reduce=sum the first SGD step moves every weight twice as far."""
    moves = {}
    for reduce in ("sum", "mean"):
        torch.manual_seed(0)
        net = ofa.OFANet(SEED_SPACE, 3, 10, units=TINY_UNITS, stem_channels=8, final_channels=32)
        before = copy.deepcopy(net.state_dict())
        cfg = net.min_config()
        schedule = Schedule(epochs=1, lr=0.05, batch_size=32, momentum=0.0, weight_decay=0.0, warmup_epochs=0,
                            flip=False, crop_padding=0, images_per_epoch=32)
        fit(net, synthetic, schedule, sample=lambda rng: [cfg, cfg], reduce=reduce, progress=False)
        moves[reduce] = net.classifier.weight.detach() - before["classifier.weight"]
    assert moves["mean"].abs().max() > 0
    torch.testing.assert_close(moves["sum"], 2 * moves["mean"], rtol=1e-4, atol=1e-7)


def test_each_stage_samples_its_own_number_of_subnets_from_its_own_space():
    params = _params(**{"kernel.subnets_per_step": 1, "depth.subnets_per_step": 2, "width.subnets_per_step": 4})
    net = ofa.OFANet(PAPER_SPACE, 3, 10, units=TINY_UNITS, stem_channels=8, final_channels=32)
    rng = random.Random(0)
    (kernel,) = recipe.phases(params, "shrink_kernel", net.space)
    assert len(kernel.sampler(net, "shrink_kernel")(rng)) == 1
    first, second = recipe.phases(params, "shrink_depth", net.space)
    drawn = [c for _ in range(200) for c in first.sampler(net, "shrink_depth")(rng)]
    assert len(first.sampler(net, "shrink_depth")(rng)) == 2
    assert {d for c in drawn for d in c.depth} == {3, 4}  # the first phase: all depths but the smallest
    assert _widths(drawn) == {6}  # width not sampled yet
    assert (first.schedule.epochs, first.schedule.lr, first.suffix) == (25, 0.005, ".phase1")
    from ofa.pipeline.recipe import schedule
    warmups = [schedule(params, p.schedule, warmup_epochs=p.warmup_epochs).warmup_epochs for p in (first, second)]
    assert warmups == [0, params.train.warmup_epochs] and params.train.warmup_epochs > 0  # official: none, then 5
    drawn = [c for _ in range(200) for c in second.sampler(net, "shrink_depth")(rng)]
    assert {d for c in drawn for d in c.depth} == {2, 3, 4} and second.suffix == ""
    first, second = recipe.phases(params, "shrink_width", net.space)
    drawn = [c for _ in range(100) for c in first.sampler(net, "shrink_width")(rng)]
    assert len(first.sampler(net, "shrink_width")(rng)) == 4
    assert _widths(drawn) == {4, 6}
    assert (first.protect, second.protect) == ((), (4, 6))  # the second sort keeps width 4's channels in place
    assert len(recipe.phases(params, "shrink_depth", SEED_SPACE)) == 1  # 2 choices: one phase on both
    no_first = _params(**{"depth.first_phase": {"epochs": 0, "lr": 0.005}})
    assert len(recipe.phases(no_first, "shrink_depth", PAPER_SPACE)) == 1


def test_sandwich_steps_train_their_spaces_largest_and_smallest_config_and_draw_the_rest():
    """Each phase's step: first the max config, then the smallest of the phase's space in the dimensions the stage
    samples (a first phase's space lacks the smallest choice), then random ones drawn as shrink.sample random draws
    them; one subnet per step (the official kernel stage) is drawn."""
    counts = {"kernel.subnets_per_step": 1, "depth.subnets_per_step": 2, "width.subnets_per_step": 4}
    net = ofa.OFANet(PAPER_SPACE, 3, 10, units=TINY_UNITS, stem_channels=8, final_channels=32)
    uniform = lambda k, d, w: PAPER_SPACE.uniform(net.num_units, k, d, w)  # noqa: E731
    smallest = {("shrink_kernel", ""): None, ("shrink_depth", ".phase1"): uniform(3, 3, 6),
                ("shrink_depth", ""): uniform(3, 2, 6), ("shrink_width", ".phase1"): uniform(3, 2, 4),
                ("shrink_width", ""): uniform(3, 2, 3)}
    sandwich, drawn = _params(sample="sandwich", **counts), _params(**counts)
    seen = set()
    for stage in ("shrink_kernel", "shrink_depth", "shrink_width"):
        for phase, plain in zip(recipe.phases(sandwich, stage, net.space), recipe.phases(drawn, stage, net.space)):
            assert phase.sandwich and not plain.sandwich
            configs = phase.sampler(net, stage)(random.Random(1))
            expected = plain.sampler(net, stage)(random.Random(1))
            ends = smallest[stage, phase.suffix]
            seen.add((stage, phase.suffix))
            if ends is None:
                assert configs == expected  # one subnet per step: drawn
                continue
            assert len(configs) == phase.subnets_per_step and configs[:2] == [net.max_config(), ends]
            assert configs[2:] == expected[: len(configs) - 2]  # the rest drawn from the same stream
    assert seen == set(smallest)


@pytest.mark.parametrize("which", ["full", "previous"])
@pytest.mark.parametrize("bn", ["train", "eval"])
def test_the_teacher_is_the_chosen_network_in_the_chosen_bn_mode(which, bn, tmp_path, synthetic):
    from ofa.pipeline.checkpoint import build_net, save_checkpoint

    params = _params(teacher=which, teacher_bn=bn)
    classes = [str(i) for i in range(10)]
    full = perturb(build_net(params, (3, 16, 16), classes), seed=1)
    save_checkpoint(full, tmp_path / "train_supernet.pt")
    previous = perturb(build_net(params, (3, 16, 16), classes), seed=2)
    calibration = synthetic.calibration_batches(64, 32, seed=0)
    teacher = recipe.teacher(params, previous, tmp_path / "train_supernet.pt", calibration, (3, 16, 16))
    source = full if which == "full" else previous
    expected = source.extract(source.max_config()).state_dict()
    got = teacher.state_dict()
    weights = [k for k in expected if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(got[k], expected[k]) for k in weights)
    assert teacher.training == (bn == "train") and not any(p.requires_grad for p in teacher.parameters())
    calibrated = not torch.equal(got["final.1.running_mean"], expected["final.1.running_mean"])
    assert calibrated == (bn == "eval")  # running statistics re-estimated only where they are used
    assert recipe.teacher(_params(kd_ratio=0.0), previous, tmp_path / "x.pt", calibration, (3, 16, 16)) is None


def test_the_full_and_previous_teachers_of_the_same_weights_compute_the_same_bits(tmp_path):
    """shrink_kernel's previous stage is train_supernet: either teacher is that network, in the memory format
    the pipeline trains in (channels_last), whether it comes from the stage's net or from the checkpoint (one
    input channel: the stem's weight is one whose layout the format changes)."""
    from ofa.pipeline.checkpoint import build_net, save_checkpoint

    net = perturb(build_net(_params(), (1, 16, 16), [str(i) for i in range(10)]), seed=1)
    net = net.to(memory_format=torch.channels_last)
    save_checkpoint(net, tmp_path / "train_supernet.pt")
    x = torch.randn(16, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    out = [recipe.teacher(_params(teacher=which), net, tmp_path / "train_supernet.pt", [], (1, 16, 16))(x)
           for which in ("full", "previous")]
    assert torch.equal(out[0], out[1])


def test_the_teacher_runs_without_dropout_as_official_ofa_builds_it(tmp_path):
    from ofa.pipeline.checkpoint import build_net, save_checkpoint

    raw = tiny_params()
    raw["net"]["dropout"] = 0.5
    params = parse_params(raw)
    net = perturb(build_net(params, (3, 16, 16), [str(i) for i in range(10)]), seed=1)
    save_checkpoint(net, tmp_path / "train_supernet.pt")
    teacher = recipe.teacher(params, net, tmp_path / "train_supernet.pt", [], (3, 16, 16))
    x = torch.randn(8, 3, 16, 16)
    assert teacher.training and torch.equal(teacher(x), teacher(x))  # batch statistics, no dropout
    student = net.extract(net.max_config()).train()
    assert student.dropout.p == 0.5 and not torch.equal(student(x), student(x))


def test_the_official_head_is_counted_extracted_and_saved_exactly(tmp_path):
    torch.manual_seed(0)
    net = perturb(ofa.OFANet(SEED_SPACE, 3, 10, units=TINY_UNITS, stem_channels=8, final_channels=32,
                             feature_mix_channels=48, dropout=0.1)).eval()
    plain = ofa.OFANet(SEED_SPACE, 3, 10, units=TINY_UNITS, stem_channels=8, final_channels=32)
    x = torch.randn(4, 3, 16, 16)
    for cfg in [net.min_config(), net.max_config(), net.sample_config(random.Random(1))]:
        sub = net.extract(cfg).eval()
        assert net.macs(cfg, (3, 16, 16)) == ofa.count_macs(sub, (1, 3, 16, 16))
        assert net.num_params(cfg) == ofa.count_params(sub)
        assert net.macs(cfg, (3, 16, 16)) - plain.macs(cfg, (3, 16, 16)) == 32 * 48 + (48 - 32) * 10
        torch.testing.assert_close(sub(x), net(x, cfg))
    ofa.save_subnet(sub, tmp_path / "s.pt")
    loaded = ofa.load_subnet(tmp_path / "s.pt")
    assert isinstance(loaded.mix[0], torch.nn.Conv2d) and loaded.dropout.p == 0.1
    torch.testing.assert_close(loaded(x), sub(x))
    net.train()
    assert not torch.equal(net(x, cfg), net(x, cfg))  # dropout is active in training


def test_he_fout_init_of_every_conv_and_the_classifier():
    from ofa.model.elastic import ElasticConv2d

    torch.manual_seed(0)
    net = ofa.OFANet(SEED_SPACE, 3, 10, feature_mix_channels=1280)  # default macro structure and init he_fout
    stem, final = net.stem[0].weight, net.final[0].weight
    assert stem.std().item() == pytest.approx((2 / (9 * 16)) ** 0.5, rel=0.1)
    assert final.std().item() == pytest.approx((2 / 640) ** 0.5, rel=0.1)
    convs = {name: m.weight for name, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, ElasticConv2d))}
    assert {"mix.0", "units.4.blocks.0.depthwise", "units.4.blocks.0.se.reduce"} <= set(convs)
    for name, w in convs.items():  # N(0, 2 / (k k out)); the ones with enough weights to tell
        if w.numel() >= 2000:
            assert w.std().item() == pytest.approx((2 / (w.shape[0] * w.shape[2] * w.shape[3])) ** 0.5, rel=0.1), name
    bound = 1 / 1280 ** 0.5
    assert bound * 0.95 < net.classifier.weight.abs().max().item() <= bound
    torch.manual_seed(0)
    legacy = ofa.OFANet(SEED_SPACE, 3, 10, init="torch")
    assert legacy.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert legacy.stem[0].weight.abs().max().item() <= (1 / 27) ** 0.5  # PyTorch's kaiming_uniform(a=sqrt(5))
    with pytest.raises(ValueError, match="init 'xavier' is not allowed"):
        ofa.OFANet(SEED_SPACE, 3, 10, init="xavier")


def test_a_three_width_space_trains_the_width_stage_in_two_phases_and_resumes_in_the_second(tmp_path, monkeypatch):
    """The stage hands each phase the recipe (reduce, teacher, subnets per step, sort); stopped one epoch into
    its second phase, a rerun resumes there (the sorts redone) and saves the checkpoint of an uninterrupted run."""
    from ofa.pipeline import checkpoint, download, training
    from ofa.train import state as train_state

    raw = tiny_params()
    raw["space"] = {"kernel": [5, 7], "depth": [2, 3], "width": [2, 3, 4]}
    raw["specialize"]["population"] = raw["specialize"]["trials"] = 12
    raw["shrink"].update(reduce="mean", teacher="previous")  # not fit's defaults: the stage must pass them
    raw["shrink"]["width"].update(epochs=2, first_phase={"epochs": 1, "lr": 0.01}, subnets_per_step=3)
    params = parse_params(raw)
    roots = {name: tmp_path / name for name in ("whole", "stopped")}
    net = checkpoint.build_net(params, (3, 16, 16), [str(i) for i in range(10)])
    for seed, stage in enumerate(("train_supernet", "shrink_depth")):
        checkpoint.save_checkpoint(perturb(net, seed), tmp_path / stage)
    for root in roots.values():
        download.download(params, root)
        (root / "models").mkdir()
        for stage in ("train_supernet", "shrink_depth"):
            shutil.copy(tmp_path / stage, root / "models" / f"{stage}.pt")
    sorts, calls = [], []
    sort = ofa.OFANet.sort_channels
    monkeypatch.setattr(ofa.OFANet, "sort_channels",
                        lambda self, protect=(): sorts.append(tuple(protect)) or sort(self, protect))

    def recorded_fit(net, data, plan, **kw):
        rng = random.Random(0)
        draws = [kw["sample"](rng) for _ in range(20)]
        calls.append((kw["reduce"], kw["teacher"] is not None, {len(d) for d in draws},
                      _widths([c for d in draws for c in d])))
        return fit(net, data, plan, **kw)

    monkeypatch.setattr(training, "fit", recorded_fit)
    metrics = training.train_stage(params, "shrink_width", roots["whole"], progress=False)
    assert metrics["epochs"] == 3  # the first phase on widths {3, 4}, then all widths
    assert sorts == [(), (3, 4)]  # before each phase; the second keeps the first phase's widths on their channels
    assert calls == [("mean", True, {3}, {3, 4}), ("mean", True, {3}, {2, 3, 4})]  # the phases' widths
    lr = (roots["whole"] / "metrics" / "live" / "shrink_width" / "plots" / "metrics" / "lr.tsv").read_text()
    steps = [int(line.split("\t")[0]) for line in lr.splitlines()[1:]]  # 6 steps an epoch, a point after 1 and 6
    assert steps == [1, 6, 7, 12, 13, 18] and not list((roots["whole"] / ".resume").glob("*.pt"))  # one curve

    save, saves = train_state.save, []

    def stop_in_the_second_phase(path, *args):
        save(path, *args)
        saves.append(path.name)
        if path.name == "shrink_width.pt":  # the second phase's first epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(train_state, "save", stop_in_the_second_phase)
    with pytest.raises(KeyboardInterrupt):
        training.train_stage(params, "shrink_width", roots["stopped"], progress=False)
    assert saves == ["shrink_width.phase1.pt", "shrink_width.pt"]
    monkeypatch.setattr(train_state, "save", lambda path, *args: saves.append(path.name) or save(path, *args))
    sorts.clear()
    saves.clear()
    training.train_stage(params, "shrink_width", roots["stopped"], progress=False)
    assert sorts == [(), (3, 4)] and saves == ["shrink_width.pt"]  # only the second phase's second epoch trained
    checkpoints = [(root / "models" / "shrink_width.pt").read_bytes() for root in roots.values()]
    assert checkpoints[0] == checkpoints[1]


def test_a_stage_draws_its_images_per_epoch_anew_each_epoch_in_every_phase(synthetic, monkeypatch):
    """images_per_epoch sets the epoch of each phase of its stage (the first phase too) and of train_supernet;
    null is the whole training split, and each epoch draws its images anew."""
    params = _params(**{"width.images_per_epoch": 96})
    first, second = recipe.phases(params, "shrink_width", PAPER_SPACE)
    assert [recipe.schedule(params, p.schedule).images_per_epoch for p in (first, second)] == [96, 96]
    (depth,) = recipe.phases(_params(), "shrink_depth", SEED_SPACE)
    assert recipe.schedule(params, depth.schedule).images_per_epoch is None
    net = ofa.OFANet(SEED_SPACE, 3, 10, units=TINY_UNITS, stem_channels=8, final_channels=32)
    seen = []
    real = synthetic.inputs
    monkeypatch.setattr(synthetic, "inputs", lambda images: seen.append(images.clone()) or real(images))
    schedule = Schedule(epochs=2, lr=0.01, batch_size=32, warmup_epochs=0, flip=False, crop_padding=0,
                        images_per_epoch=64)
    fit(net, synthetic, schedule, progress=False)
    assert [len(batch) for batch in seen] == [32] * 4  # two epochs of 64 images
    epochs = [torch.cat(seen[:2]), torch.cat(seen[2:])]
    assert not torch.equal(epochs[0], epochs[1])  # another draw of the training split
