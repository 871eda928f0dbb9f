"""The accuracy predictor: it ranks held-out configs of an additive accuracy function with noise, its save and
load round-trip exactly (weights-only), and bad use is one line. The search on it respects budgets, picks the
best config scored for real, resumes after a kill without scoring a config twice, and shares its real scores
with the direct search."""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from conftest import SEED_SPACE
from ofa.deploy.latency import kendall_tau
from ofa.deploy import search
from ofa.deploy.predictor import AccuracyPredictor, PredictorError, encode
from ofa.deploy.predictor_search import predictor_search
from ofa.model import SubnetConfig

UNITS = 3


def synthetic(configs, seed: int = 0, noise: float = 0.002) -> list[float]:
    """An accuracy additive in per-block choices (each slot's kernel and width, each unit's depth), plus noise."""
    rng = random.Random(seed)
    effect = {key: rng.uniform(0, 0.01) for key in
              [(u, b, "k", k) for u in range(UNITS) for b in range(3) for k in SEED_SPACE.kernel]
              + [(u, b, "w", w) for u in range(UNITS) for b in range(3) for w in SEED_SPACE.width]
              + [(u, "d", d) for u in range(UNITS) for d in SEED_SPACE.depth]}
    noisy = random.Random(seed + 1)
    out = []
    for cfg in configs:
        acc = 0.8 + sum(effect[(u, "d", cfg.depth[u])] for u in range(UNITS))
        for u in range(UNITS):
            for b in range(cfg.depth[u]):
                acc += effect[(u, b, "k", cfg.kernel[u][b])] + effect[(u, b, "w", cfg.width[u][b])]
        out.append(acc + noisy.gauss(0, noise))
    return out


def sample(n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [SEED_SPACE.sample(UNITS, rng) for _ in range(n)]


@pytest.mark.parametrize("kind", ["ridge", "mlp"])
def test_the_predictor_ranks_held_out_configs_of_an_additive_accuracy(kind):
    train, held_out = sample(150, seed=1), sample(100, seed=2)
    predictor = AccuracyPredictor(SEED_SPACE, UNITS, kind).fit(train, synthetic(train))
    truth = synthetic(held_out)
    predicted = predictor.predict(held_out)
    assert kendall_tau(predicted, truth) >= 0.9
    rmse = (sum((p - t) ** 2 for p, t in zip(predicted, truth)) / len(truth)) ** 0.5
    assert rmse < 0.006, rmse  # the noise is 0.002, the accuracies spread over about 0.1


def test_the_encoding_is_one_hot_per_slot_and_zero_for_inactive_slots():
    cfg = SEED_SPACE.uniform(UNITS, kernel=7, depth=2, width=4)
    features = encode(cfg, SEED_SPACE)
    per_unit = 2 + 3 * (2 + 2)  # a one-hot depth, then kernel and width of 3 slots
    assert len(features) == UNITS * per_unit
    unit = features[:per_unit]
    assert unit[:2] == [1.0, 0.0]  # depth 2 of (2, 3)
    assert unit[2:6] == [0.0, 1.0, 0.0, 1.0] * 1 and unit[6:10] == [0.0, 1.0, 0.0, 1.0]  # k7, w4 twice
    assert unit[10:14] == [0.0] * 4  # the third slot is inactive


def test_a_saved_predictor_loads_to_the_same_predictions(tmp_path):
    train, other = sample(60, seed=3), sample(20, seed=4)
    for kind in ("ridge", "mlp"):
        predictor = AccuracyPredictor(SEED_SPACE, UNITS, kind, epochs=50).fit(train, synthetic(train))
        predictor.save(tmp_path / f"{kind}.pt")
        loaded = AccuracyPredictor.load(tmp_path / f"{kind}.pt")
        assert loaded.kind == kind and loaded.predict(other) == predictor.predict(other)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(PredictorError, match=r"other\.pt: not a saved predictor of this project"):
        AccuracyPredictor.load(tmp_path / "other.pt")


def test_bad_use_is_one_line():
    with pytest.raises(PredictorError, match=r"^predictor kind 'forest' is not allowed \(ridge or mlp\)$"):
        AccuracyPredictor(SEED_SPACE, UNITS, "forest")
    predictor = AccuracyPredictor(SEED_SPACE, UNITS)
    with pytest.raises(PredictorError, match=r"^predict: the predictor is not fitted"):
        predictor.predict(sample(1, seed=0))
    with pytest.raises(PredictorError, match=r"^fit: 1 configs; at least 2$"):
        predictor.fit(sample(1, seed=0), [0.5])
    with pytest.raises(PredictorError, match=r"^fit: 2 configs but 1 accuracies$"):
        predictor.fit(sample(2, seed=0), [0.5])
    with pytest.raises(PredictorError, match=r"units, the predictor's space has 3$"):
        predictor.fit([SEED_SPACE.sample(2, random.Random(0))] * 2, [0.5, 0.6])


# The search on a predictor (ofa.deploy.predictor_search): a real score is the synthetic accuracy of the config,
# its noise drawn from the config itself so that a score does not depend on when it is asked for.

def real_accuracy(cfg) -> float:
    noise = random.Random(zlib.crc32(str(cfg).encode())).gauss(0, 0.002)
    return synthetic([cfg], noise=0)[0] + noise


def cost(cfg) -> float:
    return float(sum(k * w for u in range(cfg.num_units) for k, w in cfg.active(u)))


BUDGETS = [90.0, 140.0, 200.0]  # the space: 60 (min) to 252 (max)
SETTINGS = dict(samples=30, held_out=0.25, trials=400, verify=3, population=24, seed=0, progress=False)


def counted(calls: list, fail_after: int | None = None, batch: int = 1):
    def score_many(cfgs):
        assert 1 <= len(cfgs) <= batch
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt  # a kill: what was scored before it is stored
        calls.extend(cfgs)
        return [real_accuracy(c) for c in cfgs]
    return score_many


def test_the_predictor_search_respects_budgets_and_picks_the_best_config_scored_for_real():
    calls: list = []
    found = predictor_search(SEED_SPACE, UNITS, counted(calls), cost, BUDGETS, **SETTINGS)
    scored = {c.config: c.accuracy for c in found.candidates}
    assert len(calls) == len(scored) == len(found.candidates)  # each config scored once
    assert all(scored[c] == real_accuracy(c) for c in scored)
    uniform = SEED_SPACE.uniform_grid(UNITS)
    assert set(uniform) <= set(scored) and len(scored) <= len(uniform) + 30 + 3 * len(BUDGETS)
    # the held-out configs: a quarter of the samples, never fitted on, their figures recomputable from the records
    held = [SubnetConfig.from_dict(r["subnet"]) for r in found.held_out]
    assert len(held) == round(0.25 * 30) and not set(held) & set(found.fitted)
    assert len(found.fitted) == len(uniform) + 30 - len(held)
    assert [r["measured"] for r in found.held_out] == [real_accuracy(c) for c in held]
    assert found.kendall_tau == kendall_tau([r["predicted"] for r in found.held_out],
                                            [r["measured"] for r in found.held_out]) >= 0.5
    improved = 0
    for budget in BUDGETS:
        verified = found.verified[budget]
        assert 1 <= len(verified) <= 3 and all(cost(SubnetConfig.from_dict(v["subnet"])) <= budget for v in verified)
        assert [v["predicted"] for v in verified] == sorted((v["predicted"] for v in verified), reverse=True)
        pick = search.best_within(found.candidates, budget)
        best_uniform = search.best_within(found.candidates, budget, uniform_only=True)
        assert pick.cost <= budget and pick.accuracy == max(a for c, a in scored.items() if cost(c) <= budget)
        assert pick.accuracy >= best_uniform.accuracy
        improved += pick.accuracy > best_uniform.accuracy
    assert improved >= 2  # per-block choices beat the uniform grid on an additive accuracy


@pytest.mark.parametrize("killed_after", [20, 8 + 30 + 2], ids=["while sampling", "while verifying"])
def test_a_killed_predictor_search_resumes_without_scoring_a_finished_config_again(killed_after, tmp_path):
    whole = predictor_search(SEED_SPACE, UNITS, counted([], batch=2), cost, BUDGETS, batch=2,
                             memo=search.ScoreMemo(tmp_path / "whole.db", "k"), **SETTINGS)
    before: list = []
    with pytest.raises(KeyboardInterrupt):
        predictor_search(SEED_SPACE, UNITS, counted(before, killed_after, batch=2), cost, BUDGETS, batch=2,
                         memo=search.ScoreMemo(tmp_path / "killed.db", "k"), **SETTINGS)
    after: list = []
    resumed = predictor_search(SEED_SPACE, UNITS, counted(after, batch=2), cost, BUDGETS, batch=2,
                               memo=search.ScoreMemo(tmp_path / "killed.db", "k"), **SETTINGS)
    assert len(before) == killed_after and not set(before) & set(after)
    assert len(before) + len(after) == len(whole.candidates)
    assert resumed.candidates == whole.candidates and resumed.verified == whole.verified
    assert resumed.held_out == whole.held_out


def test_the_direct_search_and_the_predictor_search_share_their_real_scores(tmp_path):
    """Scores are kept under what a score depends on: a predictor search after a direct one (or the reverse, after
    a change of strategy) scores none of the configs the other scored."""
    direct: list = []
    memo = search.ScoreMemo(tmp_path / "s.db", "scores")
    cands = search.search(SEED_SPACE, UNITS, real_accuracy, cost, trials=24, population=8, seed=0, progress=False,
                          storage=tmp_path / "s.db", key="direct", evaluate_many=memo.memoised(counted(direct, batch=99)))
    memo.close()
    assert len(direct) == len(cands)
    predicted: list = []
    found = predictor_search(SEED_SPACE, UNITS, counted(predicted), cost, BUDGETS,
                             memo=search.ScoreMemo(tmp_path / "s.db", "scores"), **SETTINGS)
    assert not set(direct) & set(predicted)
    assert set(SEED_SPACE.uniform_grid(UNITS)) <= set(direct)  # so the predictor search scored none of them
    assert len(found.candidates) == len(predicted) + len(set(direct) & {c.config for c in found.candidates})
    other = search.ScoreMemo(tmp_path / "s.db", "other scores")  # another checkpoint: nothing shared
    assert len(other) == 0 and len(search.ScoreMemo(tmp_path / "s.db", "scores")) == len(set(direct) | set(predicted))
