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

from fedtrain.api import AggregationSpec, StrategyName, Weighting
from fedtrain.codec import SparseDelta, UpdateTensor


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


def _check_weight(weight: float) -> None:
    if not (weight > 0 and math.isfinite(weight)):  # NaN compares false, so it fails here too
        raise ValueError(f"an update's weight must be a positive finite number, got {weight}")


class Accumulator(ABC):
    """Takes updates one at a time. `add_tensor` may be called from several threads at once for
    different tensors of one update; `count` then records the update as a whole. An update may send
    some tensors only (exchange policy dynamic), and a tensor as some of its elements (sparse)."""

    @abstractmethod
    def add_tensor(self, name: str, tensor: UpdateTensor, weight: float) -> None:
        """Fold one tensor of an update in."""

    @abstractmethod
    def count(self, weight: float) -> None:
        """Record an update whose tensors were all added with `weight`."""

    def add(self, delta: Mapping[str, UpdateTensor], weight: float) -> None:
        """Fold a whole update in."""
        _check_weight(weight)
        for name in delta:
            self.add_tensor(name, delta[name], weight)
        self.count(weight)

    @abstractmethod
    def result(self) -> dict[str, torch.Tensor]:
        """The aggregate delta, fp32. Consumes the accumulator: it may hand over its own buffers."""


class WeightedMean(Accumulator):
    """Running fp32 sum of weight x delta per tensor, divided at the end by the weights of the
    updates that sent that tensor; a tensor no update sent comes out zero (its global value stays).
    A sparse tensor is added element by element into the sum (never made dense): its weight counts
    for the whole tensor, the elements it did not send being zero in its delta."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._sum = {name: torch.zeros(shape, dtype=torch.float32) for name, shape in shapes.items()}
        self.tensor_weights = dict.fromkeys(shapes, 0.0)
        self.total_weight = 0.0
        self.updates = 0

    def add_tensor(self, name: str, tensor: UpdateTensor, weight: float) -> None:
        running = self._sum[name]
        if isinstance(tensor, SparseDelta):
            running.view(-1).index_add_(0, tensor.index, tensor.values.to(torch.float32), alpha=weight)
        else:
            # In-place add promotes bf16/fp16 into the fp32 sum without a temporary copy.
            running.add_(tensor, alpha=weight)
        # One thread per tensor name: the read-modify-write of one key never races with itself.
        self.tensor_weights[name] += weight

    def count(self, weight: float) -> None:
        _check_weight(weight)
        self.total_weight += weight
        self.updates += 1

    def result(self) -> dict[str, torch.Tensor]:
        if self.updates == 0:
            raise ValueError("no update was added: a round needs at least one accepted update")
        for name, running in self._sum.items():
            if self.tensor_weights[name] > 0:
                running.div_(self.tensor_weights[name])  # in place: a ViT-B-sized copy is 343 MB
        return self._sum


class Strategy(ABC):
    name: StrategyName

    @abstractmethod
    def accumulator(self, shapes: Mapping[str, tuple[int, ...]]) -> Accumulator: ...

    @abstractmethod
    def apply(
        self, global_tensors: Mapping[str, torch.Tensor], aggregate: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The next global model from the current one and the aggregate delta (which it may reuse)."""

    @property
    def keeps_state(self) -> bool:
        """Whether the strategy carries state from round to round (a server optimizer's moments)."""
        return False

    def parameters(self) -> dict[str, float]:
        """The settings the strategy runs with, as the round manifest records them."""
        return {}

    def step(
        self,
        global_tensors: Mapping[str, torch.Tensor],
        aggregate: dict[str, torch.Tensor],
        state: Mapping[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The next global model and the strategy's next state, from its state after the previous
        round (empty in the first). A pure function of its inputs: a repeated close gives the same."""
        return self.apply(global_tensors, aggregate), {}


class FedAvg(Strategy):
    """McMahan et al. 2017: the next model is the weighted mean of the sites' models."""

    name = StrategyName.FEDAVG

    def accumulator(self, shapes: Mapping[str, tuple[int, ...]]) -> Accumulator:
        return WeightedMean(shapes)

    def apply(
        self, global_tensors: Mapping[str, torch.Tensor], aggregate: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        for name, delta in aggregate.items():
            delta.add_(global_tensors[name])  # global + mean delta, in the aggregate's own buffer
        return aggregate


def make_strategy(name: StrategyName, aggregation: AggregationSpec | None = None) -> Strategy:
    """The strategy `name` with the settings of `aggregation` (the defaults without it)."""
    from .robust_strategies import ROBUST_STRATEGIES  # they build on this module
    from .server_optimizers import SERVER_OPTIMIZERS

    settings = aggregation or AggregationSpec(strategy=name)
    if name is StrategyName.FEDAVG:
        return FedAvg()
    if name in SERVER_OPTIMIZERS:
        return SERVER_OPTIMIZERS[name](settings.server_optimizer)
    if name in ROBUST_STRATEGIES:
        return ROBUST_STRATEGIES[name](settings.robust_settings)
    raise ValueError(f"aggregation.strategy {name.value} is not built into this aggregator")
