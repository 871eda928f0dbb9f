"""An accuracy predictor fitted on a supernet's own (subnet config, val accuracy) pairs.

Scoring a subnet for real costs a BN re-calibration and a pass over val (about a second for the quick profile
on a CPU); a predictor scores thousands in that time, so a search can look at many more configs and verify
the few that matter.

The encoding is the official OFA predictor's: per block slot a one-hot kernel and a one-hot width, all zeros
for a slot its unit's depth leaves inactive, and per unit a one-hot depth. Two models fit it:

- ``ridge``: least squares with an L2 penalty on the encoding. The encoding makes it an additive model of the
  per-block choices, which is how accuracy mostly varies across a supernet's subnets, and it has one
  closed-form fit: nothing to tune but the penalty, nothing random.
- ``mlp``: the official predictor's kind, a small multilayer perceptron (torch, Adam, mean squared error),
  which can also fit interactions between blocks, at the price of more samples.

Both predict the accuracy itself (targets are centred and scaled inside). ``save`` / ``load`` keep the model,
its kind and the space as tensors and plain values, loaded weights-only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import atomic_write, load_tensors
from ..model import ConfigSpace, SubnetConfig

KINDS = ("ridge", "mlp")
FORMAT = "ofa-accuracy-predictor/1"


class PredictorError(ValueError):
    """A predictor that cannot be fitted, used or read: one line naming what is wrong."""


def encode(cfg: SubnetConfig, space: ConfigSpace) -> list[float]:
    """The config as features: per unit a one-hot depth, then per block slot a one-hot kernel and a one-hot width
    (zeros for an inactive slot)."""
    features: list[float] = []
    for u in range(cfg.num_units):
        depth = cfg.depth[u]
        features += [float(depth == d) for d in space.depth]
        for b in range(space.max_depth):
            active = b < depth
            features += [float(active and cfg.kernel[u][b] == k) for k in space.kernel]
            features += [float(active and cfg.width[u][b] == w) for w in space.width]
    return features


class AccuracyPredictor:
    """Predicts a subnet's accuracy from its config; ``fit`` first."""

    def __init__(self, space: ConfigSpace, num_units: int, kind: str = "ridge", *, penalty: float = 1.0,
                 hidden: int = 64, epochs: int = 500, seed: int = 0) -> None:
        if kind not in KINDS:
            raise PredictorError(f"predictor kind {kind!r} is not allowed ({' or '.join(KINDS)})")
        self.space, self.num_units, self.kind = space, num_units, kind
        self.penalty, self.hidden, self.epochs, self.seed = penalty, hidden, epochs, seed
        self.model: nn.Module | None = None
        self.mean, self.scale = 0.0, 1.0

    def _features(self, configs: Sequence[SubnetConfig]) -> torch.Tensor:
        for cfg in configs:
            if cfg.num_units != self.num_units:
                raise PredictorError(f"config {cfg}: {cfg.num_units} units, the predictor's space has {self.num_units}")
        return torch.tensor([encode(c, self.space) for c in configs], dtype=torch.float64)

    def _build(self, features: int) -> nn.Module:
        if self.kind == "ridge":
            return nn.Linear(features, 1, dtype=torch.float64)
        return nn.Sequential(nn.Linear(features, self.hidden, dtype=torch.float64), nn.ReLU(),
                             nn.Linear(self.hidden, self.hidden, dtype=torch.float64), nn.ReLU(),
                             nn.Linear(self.hidden, 1, dtype=torch.float64))

    def fit(self, configs: Sequence[SubnetConfig], accuracies: Sequence[float]) -> AccuracyPredictor:
        """Fit on (config, accuracy) pairs, at least 2 of them, deterministically from `seed`."""
        if len(configs) != len(accuracies):
            raise PredictorError(f"fit: {len(configs)} configs but {len(accuracies)} accuracies")
        if len(configs) < 2:
            raise PredictorError(f"fit: {len(configs)} configs; at least 2")
        x = self._features(configs)
        y = torch.tensor([float(a) for a in accuracies], dtype=torch.float64)
        self.mean, self.scale = float(y.mean()), float(y.std()) or 1.0
        target = (y - self.mean) / self.scale
        torch.manual_seed(self.seed)
        self.model = self._build(x.shape[1])
        if self.kind == "ridge":
            self._fit_ridge(x, target)
        else:
            self._fit_mlp(x, target)
        return self

    def _fit_ridge(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Closed form on centred features: (X'X + penalty I)^-1 X'y; the intercept is the target's mean (0)."""
        centre = x.mean(dim=0)
        xc = x - centre
        weight = torch.linalg.solve(xc.T @ xc + self.penalty * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ target)
        with torch.no_grad():
            self.model.weight.copy_(weight[None])
            self.model.bias.fill_(float(-(centre @ weight)))

    def _fit_mlp(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Adam on the mean squared error, full batch, with weight decay as the L2 penalty."""
        optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2, weight_decay=1e-2 * self.penalty)
        for _ in range(self.epochs):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(self.model(x).squeeze(1), target)
            loss.backward()
            optimizer.step()

    def predict(self, configs: Sequence[SubnetConfig]) -> list[float]:
        """Predicted accuracy of each config."""
        if self.model is None:
            raise PredictorError("predict: the predictor is not fitted (fit or load it first)")
        if not configs:
            return []
        with torch.no_grad():
            out = self.model(self._features(configs)).squeeze(1)
        return [self.mean + self.scale * float(v) for v in out]

    def save(self, path: str | Path) -> None:
        """Write the fitted predictor (atomically): its kind, space, target scaling and weights."""
        if self.model is None:
            raise PredictorError("save: the predictor is not fitted")
        state = {"format": FORMAT, "kind": self.kind, "num_units": self.num_units, "mean": self.mean,
                 "scale": self.scale, "hidden": self.hidden,
                 "space": {"kernel": list(self.space.kernel), "depth": list(self.space.depth),
                           "width": [float(w) for w in self.space.width]},
                 "state_dict": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}
        atomic_write(Path(path), lambda f: torch.save(state, f), binary=True)

    @classmethod
    def load(cls, path: str | Path) -> AccuracyPredictor:
        """A predictor ``save`` wrote, read weights-only; PredictorError for anything else."""
        state: dict[str, Any] = load_tensors(Path(path), {"format", "kind", "space", "state_dict"}, PredictorError,
                                             "saved predictor")
        if state["format"] != FORMAT or state["kind"] not in KINDS:
            raise PredictorError(f"{path}: not an accuracy predictor of this version ({FORMAT})")
        predictor = cls(ConfigSpace(**state["space"]), state["num_units"], state["kind"], hidden=state["hidden"])
        predictor.mean, predictor.scale = state["mean"], state["scale"]
        predictor.model = predictor._build(len(encode(predictor.space.min_config(predictor.num_units),
                                                       predictor.space)))
        predictor.model.load_state_dict(state["state_dict"])
        return predictor
