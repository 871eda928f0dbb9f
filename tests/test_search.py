"""The specialize search: NSGA-II over per-block configs, budgets, Pareto front, memoisation, resume."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch

import ofa
from ofa import data as data_mod
from ofa.deploy import search
from ofa.train import DeviceData, calibrate_bn, evaluate
from conftest import PAPER_SPACE, SEED_SPACE, perturb, tiny_net


def _score(cfg: ofa.SubnetConfig) -> float:
    """A cheap deterministic stand-in for val accuracy: more MACs help, plus a per-config jitter."""
    jitter = int(hashlib.sha256(cfg.to_json().encode()).hexdigest()[:6], 16) / 16**6
    return round(sum(k * w for u in range(cfg.num_units) for k, w in cfg.active(u)) / 100 + 0.05 * jitter, 6)


def test_params_round_trip_and_inactive_slots_collapse():
    net = tiny_net(PAPER_SPACE)
    rng = random.Random(0)
    for cfg in net.uniform_configs() + [net.sample_config(rng) for _ in range(20)]:
        params = search.to_params(cfg, PAPER_SPACE)
        assert set(params) == set(search.distributions(PAPER_SPACE, net.num_units))
        assert search.from_params(params, PAPER_SPACE, net.num_units) == cfg
    params = search.to_params(net.uniform_config(5, 2, 4), PAPER_SPACE)
    params["u0.b3.kernel"], params["u0.b3.width"] = 7, 6  # an inactive slot: the same subnet
    assert search.from_params(params, PAPER_SPACE, net.num_units) == net.uniform_config(5, 2, 4)


def test_pareto_front_and_best_within_budget():
    net = tiny_net(SEED_SPACE)
    u = net.uniform_configs()
    cands = [search.Candidate(u[0], 100, 0.50, 0), search.Candidate(u[1], 200, 0.70, 1),
             search.Candidate(u[2], 150, 0.45, 2), search.Candidate(net.sample_config(random.Random(1)), 180, 0.72, 3),
             search.Candidate(u[3], 300, 0.72, 4)]
    assert [c.trial for c in search.pareto_front(cands)] == [0, 3]
    assert search.best_within(cands, 199).trial == 3
    assert search.best_within(cands, 199, uniform_only=True).trial == 0
    assert search.best_within(cands, 1000).trial == 3  # ties on accuracy: fewer MACs
    assert search.best_within(cands, 99) is None


def test_search_opens_with_every_uniform_config_and_memoises_repeats():
    net = tiny_net(SEED_SPACE)
    calls: list[ofa.SubnetConfig] = []

    def score(cfg):
        calls.append(cfg)
        return _score(cfg)

    cands = search.search(SEED_SPACE, net.num_units, score, lambda c: net.macs(c, (3, 16, 16)),
                          trials=40, population=8, seed=0, progress=False)
    assert [c.config for c in cands[:8]] == net.uniform_configs()
    assert len(calls) == len(set(calls)) == len(cands)  # each config scored once
    assert len(cands) > 8 and not all(c.uniform for c in cands)
    assert all(c.accuracy == _score(c.config) and c.cost == net.macs(c.config, (3, 16, 16)) for c in cands)
    again = search.search(SEED_SPACE, net.num_units, _score, lambda c: net.macs(c, (3, 16, 16)),
                          trials=40, population=8, seed=0, progress=False)
    assert again == cands  # deterministic from the seed
    other = search.search(SEED_SPACE, net.num_units, _score, lambda c: net.macs(c, (3, 16, 16)),
                          trials=40, population=8, seed=1, progress=False)
    assert [c.config for c in other] != [c.config for c in cands]
    big = search.search(SEED_SPACE, net.num_units, _score, lambda c: net.macs(c, (3, 16, 16)),
                        trials=10, population=8, seed=2**32 - 1, progress=False)  # numpy takes seeds below 2**32
    assert len(big) >= 8


def test_interrupted_search_resumes_without_re_evaluating(tmp_path):
    net = tiny_net(SEED_SPACE)
    macs = lambda c: net.macs(c, (3, 16, 16))  # noqa: E731
    kwargs = dict(trials=30, population=8, seed=3, progress=False)
    whole = search.search(SEED_SPACE, net.num_units, _score, macs, **kwargs)

    first: list[ofa.SubnetConfig] = []

    def dies_after_12(cfg):
        if len(first) == 12:
            raise KeyboardInterrupt  # killed in the middle of the 13th evaluation
        first.append(cfg)
        return _score(cfg)

    db = tmp_path / "search.db"
    with pytest.raises(KeyboardInterrupt):
        search.search(SEED_SPACE, net.num_units, dies_after_12, macs, storage=db, key="k", **kwargs)
    second: list[ofa.SubnetConfig] = []

    def counts(cfg):
        second.append(cfg)
        return _score(cfg)

    resumed = search.search(SEED_SPACE, net.num_units, counts, macs, storage=db, key="k", **kwargs)
    assert not set(first) & set(second)  # nothing finished before the kill is evaluated again
    assert len(first) + len(second) == len(whole)
    assert [(c.config, c.cost, c.accuracy) for c in resumed] == [(c.config, c.cost, c.accuracy) for c in whole]
    third: list[ofa.SubnetConfig] = []
    search.search(SEED_SPACE, net.num_units, lambda c: third.append(c) or _score(c), macs, storage=db, key="other",
                  **kwargs)
    assert len(third) == len(whole)  # another key (other params or inputs) starts afresh
    again: list[ofa.SubnetConfig] = []
    back = search.search(SEED_SPACE, net.num_units, lambda c: again.append(c) or _score(c), macs, storage=db,
                         key="k", **kwargs)
    assert again == [] and back == resumed  # the first key's search is still there


def test_the_storage_keeps_the_searches_used_last(tmp_path):
    net = tiny_net(SEED_SPACE)
    db, scored = tmp_path / "search.db", []

    def run(key: str) -> int:
        before = len(scored)
        search.search(SEED_SPACE, net.num_units, lambda c: scored.append(c) or _score(c),
                      lambda c: net.macs(c, (3, 16, 16)), trials=8, population=8, progress=False, storage=db, key=key)
        return len(scored) - before  # configs scored: 0 when the search was stored

    assert [run(k) for k in ("a", "b", "c", "d")] == [8] * 4
    assert run("a") == 0  # a is now the one used last, b the one used longest ago
    assert run("e") == 8  # a fifth: b is dropped
    assert [run(k) for k in ("a", "c", "d", "e")] == [0] * 4
    assert run("b") == 8
    assert search.KEPT_SEARCHES == 4
    db.write_bytes(b"not a database")  # damaged: replaced by a new search
    assert run("a") == 8 and run("a") == 0


def test_a_stored_search_serves_fewer_trials_and_goes_on_for_more(tmp_path):
    """What a search of N trials gives, whether fresh or from a stored search of M: its first N trials."""
    net = tiny_net(SEED_SPACE)
    macs = lambda c: net.macs(c, (3, 16, 16))  # noqa: E731
    calls: list[ofa.SubnetConfig] = []

    def run(trials: int, batch: int = 1, storage=None):
        return [(c.config, c.cost, c.accuracy, c.trial) for c in search.search(
            SEED_SPACE, net.num_units, lambda c: calls.append(c) or _score(c), macs, trials=trials, population=8,
            seed=5, progress=False, batch=batch, storage=storage, key="k",
            evaluate_many=lambda cfgs: [calls.append(c) or _score(c) for c in cfgs])]

    fresh = {n: run(n) for n in (12, 20)}
    db = tmp_path / "search.db"
    assert run(12, storage=db) == fresh[12]
    calls.clear()
    assert run(20, storage=db) == fresh[20]  # the stored 12 go on to 20
    assert 0 < len(calls) == len(fresh[20]) - len(fresh[12])  # only the new configs are evaluated
    calls.clear()
    assert run(12, storage=db) == fresh[12] and calls == []  # the first 12 of the stored 20: nothing evaluated
    fresh = {n: run(n, batch=2) for n in (13, 16)}
    db.unlink()
    assert run(13, batch=2, storage=db) == fresh[13]
    calls.clear()
    assert run(16, batch=2, storage=db) == fresh[16]  # 13 trials ended inside a batch of 2: it cannot go on
    assert len(calls) == len(fresh[16])  # exactly, so it starts afresh


@pytest.mark.parametrize("killed_in", ["tell 14", "ask 14", "evaluation 7"])
def test_a_batched_search_killed_mid_batch_resumes_to_the_uninterrupted_result(killed_in, tmp_path, monkeypatch):
    """Batches of 2 (two processes): a kill between the two tells of a batch, between its two asks, or while
    it is scored; the resumed search completes that batch and ends where an uninterrupted one does."""
    import optuna

    net = tiny_net(SEED_SPACE)
    macs = lambda c: net.macs(c, (3, 16, 16))  # noqa: E731
    kwargs = dict(trials=30, population=8, seed=3, progress=False, batch=2)
    scored: list[list[ofa.SubnetConfig]] = []

    def many(cfgs):
        scored.append(list(cfgs))
        if killed_in == "evaluation 7" and len(scored) == 7:
            raise KeyboardInterrupt
        return [_score(c) for c in cfgs]

    whole = search.search(SEED_SPACE, net.num_units, _score, macs, evaluate_many=lambda c: [_score(x) for x in c],
                          **kwargs)
    method, at = killed_in.split()
    if method != "evaluation":
        calls = [0]
        original = getattr(optuna.study.Study, method)

        def dies(self, *args, **kw):
            calls[0] += 1
            if calls[0] == int(at):  # the 14th: the second of the batch of trials 12 and 13
                raise KeyboardInterrupt
            return original(self, *args, **kw)

        monkeypatch.setattr(optuna.study.Study, method, dies)
    db = tmp_path / "search.db"
    with pytest.raises(KeyboardInterrupt):
        search.search(SEED_SPACE, net.num_units, _score, macs, evaluate_many=many, storage=db, key="k", **kwargs)
    monkeypatch.undo()
    resumed = search.search(SEED_SPACE, net.num_units, _score, macs, evaluate_many=many, storage=db, key="k",
                            **kwargs)
    assert [(c.config, c.cost, c.accuracy, c.trial) for c in resumed] == [
        (c.config, c.cost, c.accuracy, c.trial) for c in whole]


def test_search_on_a_tiny_net_respects_budgets_and_beats_uniform_on_val():
    torch.manual_seed(0)
    net = perturb(tiny_net(SEED_SPACE)).eval()
    train, test = data_mod.synthetic(seed=0)
    train, val = data_mod.hold_out(train, 128, seed=0)
    data = DeviceData(train, val, test, torch.full((1, 3, 1, 1), 128.0), torch.full((1, 3, 1, 1), 64.0),
                      torch.device("cpu"))
    calibration = data.calibration_batches(128, 64, seed=0)

    def val_accuracy(cfg):
        sub = net.extract(cfg)
        calibrate_bn(sub, calibration)
        return evaluate(sub, data, batch_size=256, split="val")

    shape = (3, 16, 16)
    cands = search.search(SEED_SPACE, net.num_units, val_accuracy, lambda c: net.macs(c, shape),
                          trials=24, population=8, seed=0, progress=False)
    assert len({c.accuracy for c in cands}) > 3  # the scores really differ between subnets
    for budget in (net.macs(net.min_config(), shape), 900_000, 1_300_000, 3_000_000):
        pick = search.best_within(cands, budget)
        uniform = search.best_within(cands, budget, uniform_only=True)
        assert pick.cost <= budget and uniform.cost <= budget and uniform.uniform
        assert pick.accuracy >= uniform.accuracy
        assert pick.accuracy == max(c.accuracy for c in cands if c.cost <= budget)


def test_search_refuses_too_few_trials_or_a_small_population():
    with pytest.raises(ValueError, match="trials 7: fewer than the 8 uniform"):
        search.search(SEED_SPACE, 2, _score, lambda c: 1, trials=7, population=8, progress=False)
    with pytest.raises(ValueError, match="population 4: smaller than the 8 uniform"):
        search.search(SEED_SPACE, 2, _score, lambda c: 1, trials=8, population=4, progress=False)


def test_the_stored_search_is_keyed_by_what_scores_a_trial(tmp_path):
    """Budgets, trials and other stages' params (whose effect on the checkpoint is in its content) keep the stored
    search; what changes a trial's score or the sampler, or the inputs' content, starts a new one."""
    from ofa.pipeline.config import parse_params
    from ofa.pipeline.strategy import score_values, search_key
    from test_pipeline import tiny_params

    inputs = [tmp_path / "shrink_width.pt"]
    inputs[0].write_bytes(b"weights")

    def changed_params(change: dict | None):
        raw = tiny_params()
        for path, value in (change or {}).items():
            *parents, leaf = path.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return parse_params(raw)

    def key(change: dict | None = None) -> str:
        return search_key(changed_params(change), inputs)

    same = key()
    if not torch.cuda.is_available():  # auto is the device it resolves to: scores of the same device
        assert key({"train.device": "auto"}) == same
    for kept in ({"specialize.budgets": [900000]}, {"specialize.trials": 30}, {"evaluate.finetune.lr": 0.5},
                 {"shrink.width.lr": 0.5}, {"supernet.epochs": 9}, {"train.batch_size": 32}):
        assert key(kept) == same, kept
    for changed in ({"seed": 1}, {"specialize.population": 12}, {"evaluate.bn_calibration_images": 64},
                    {"train.eval_batch_size": 100}, {"net.final_channels": 48}, {"space.kernel": [3, 5]}):
        assert key(changed) != same, changed
    # the real scores are kept under what a score depends on alone: any strategy, cost or population shares them
    scores = score_values(changed_params(None))
    for shared in ({"specialize.population": 12}, {"specialize.strategy": "predictor"}, {"specialize.cost": "latency",
                   "specialize.budgets": [0.5]}, {"specialize.predictor.samples": 7}):
        assert score_values(changed_params(shared)) == scores, shared
    for changed in ({"seed": 1}, {"evaluate.bn_calibration_images": 64}, {"train.eval_batch_size": 100}):
        assert score_values(changed_params(changed)) != scores, changed
    inputs[0].write_bytes(b"other weights")
    assert key() != same
    inputs[0].write_bytes(b"weights")
    assert key() == same


def test_the_stored_search_is_keyed_by_the_code_that_scored_it(tmp_path, monkeypatch):
    """A library changed since the search (its scoring, its cost, the sampler's versions) searches afresh:
    dvc reruns specialize on a change under ofa/, and the stored scores are not the new code's."""
    import optuna
    from ofa.pipeline import strategy
    from ofa.pipeline.config import parse_params
    from test_pipeline import tiny_params

    inputs = [tmp_path / "shrink_width.pt"]
    inputs[0].write_bytes(b"weights")
    version = strategy.code_version()
    assert version == strategy.code_version() and len(version) == 64
    same = strategy.search_key(parse_params(tiny_params()), inputs)
    strategy.code_version.cache_clear()
    monkeypatch.setattr(optuna, "__version__", "0.0.1")
    assert strategy.code_version() != version
    strategy.code_version.cache_clear()
    monkeypatch.undo()
    monkeypatch.setattr(strategy, "code_version", lambda: "edited library")
    assert strategy.search_key(parse_params(tiny_params()), inputs) != same


def test_an_unreadable_storage_is_discarded_and_a_readable_or_locked_one_kept(tmp_path, monkeypatch):
    """What the storage holds is a shortcut: a file of something else or a truncated copy is removed (with why);
    a good one, or one another search holds locked (no evidence of a bad file), stays."""
    import sqlite3

    good = tmp_path / "good.db"
    memo = search.ScoreMemo(good, "key")
    memo.memoised(lambda cfgs: [0.5] * len(cfgs))(PAPER_SPACE.uniform_grid(2))
    memo.close()
    assert search.discard_unreadable(good) is None and good.is_file()
    assert search.discard_unreadable(tmp_path / "absent.db") is None
    junk = tmp_path / "junk.db"
    junk.write_text("not a database\n")
    assert search.discard_unreadable(junk) == "file is not a database" and not junk.exists()
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert search.discard_unreadable(truncated) and not truncated.exists()
    monkeypatch.setattr(search, "BUSY_TIMEOUT_S", 0.1)
    holder = sqlite3.connect(good, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        assert search.discard_unreadable(good) is None and good.is_file()
    finally:
        holder.close()
    assert len(search.ScoreMemo(good, "key")) == len(PAPER_SPACE.uniform_grid(2))  # its scores still there
