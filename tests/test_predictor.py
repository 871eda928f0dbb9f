"""The accuracy predictor: it ranks held-out configs of an additive accuracy function with noise, its save and
load round-trip exactly (weights-only), and bad use is one line."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import SEED_SPACE
from ofa.deploy.latency import kendall_tau
from ofa.deploy.predictor import AccuracyPredictor, PredictorError, encode

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
