"""Aggregation strategies: pure tensor arithmetic, no I/O.

A strategy makes an accumulator that takes updates one at a time (so memory does not grow with
the number of sites) and then applies the aggregate to the global model. The split leaves room
for what comes later: a server optimizer (FedAdam) changes `apply`, a robust aggregator keeps
what it needs in its own accumulator, secure aggregation adds masked updates the same way.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from fedtrain.api import StrategyName, Weighting


def site_weight(weighting: Weighting, samples: int, explicit: float | None) -> float:
    """Unnormalised weight of one update."""
    if weighting is Weighting.SAMPLES:
        if samples <= 0:
            raise ValueError(f"weighting by samples needs a positive sample count, got {samples}")
        return float(samples)
    if weighting is Weighting.UNIFORM:
        return 1.0
    if explicit is None or not (explicit > 0 and math.isfinite(explicit)):
        raise ValueError(f"weighting is explicit but the site's weight is {explicit}, not a positive number")
    return float(explicit)


class Accumulator(ABC):
    @abstractmethod
    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one update in; `delta` may be lazily read, each tensor is read once."""

    @abstractmethod
    def result(self) -> dict[str, torch.Tensor]:
        """The aggregate delta, fp32."""


class WeightedMean(Accumulator):
    """Running fp32 sum of weight x delta; divided by the total weight at the end."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._sum = {name: torch.zeros(shape, dtype=torch.float32) for name, shape in shapes.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        if not (weight > 0 and math.isfinite(weight)):  # NaN compares false, so it fails here too
            raise ValueError(f"an update's weight must be a positive finite number, got {weight}")
        for name, running in self._sum.items():
            # In-place add promotes bf16/fp16 into the fp32 sum without a temporary copy.
            running.add_(delta[name], alpha=weight)
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("no update was added: a round needs at least one accepted update")
        return {name: running / self.total_weight for name, running in self._sum.items()}


class Strategy(ABC):
    name: StrategyName

    @abstractmethod
    def accumulator(self, shapes: Mapping[str, tuple[int, ...]]) -> Accumulator: ...

    @abstractmethod
    def apply(
        self, global_tensors: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The next global model from the current one and the aggregate delta."""


class FedAvg(Strategy):
    """McMahan et al. 2017: the next model is the weighted mean of the sites' models."""

    name = StrategyName.FEDAVG

    def accumulator(self, shapes: Mapping[str, tuple[int, ...]]) -> Accumulator:
        return WeightedMean(shapes)

    def apply(
        self, global_tensors: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {name: global_tensors[name].float() + aggregate[name] for name in global_tensors}


STRATEGIES: dict[StrategyName, type[Strategy]] = {StrategyName.FEDAVG: FedAvg}


def make_strategy(name: StrategyName) -> Strategy:
    return STRATEGIES[name]()
