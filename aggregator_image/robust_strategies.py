"""Robust strategies (median, trimmedMean, krum, multiKrum): every accepted update of a round, at once.

They cannot be folded as updates arrive: a median needs all values of a coordinate. While a round is
open each update is only checked (`check_update`: names, shapes, dtypes, finite values, norm bound,
checksum); when it closes, `combine` reads the participants' updates again, one tensor at a time
(`StoredUpdates.stack`: an N x tensor stack, int8 dequantised, sparse made dense for that tensor
only, in one buffer of N x the largest tensor reused for every tensor), so peak memory is that buffer
plus the model being written (one fp32 block for every tensor of the aggregate, allocated at the start)
plus one chunk of work, never N models. Krum reads every update once for the pairwise distances,
then the chosen ones again to average them.

Robust strategies are unweighted: a site's sample count must not buy it influence over a median.
Under exchange policy dynamic a tensor is combined over the sites that sent it (krum's distances
count a tensor a site did not send as a zero change). The manifest names the sites krum left out
and, for trimmedMean, the share of each site's values that were trimmed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedtrain.api import RobustSpec, StrategyName

from .robust import (
    PairwiseDistances,
    coordinate_median,
    krum_select,
    trim_count,
    trimmed_mean,
    unweighted_mean,
)
from .strategies import Accumulator, Strategy, _check_weight

#: As Flower's FedTrimmedAvg: with 5 sites one is trimmed at each end (0.1 would trim none below 10).
DEFAULT_TRIM_FRACTION = 0.2


class StoredUpdates(Protocol):
    """A round's accepted updates in the store, read one tensor at a time."""

    @property
    def sites(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name` in the global model."""
        ...

    def stack(
        self, name: str, among: Collection[str] | None = None, zeros: bool = False
    ) -> tuple[list[str], torch.Tensor]:
        """The sites (of `among`, default all) that sent tensor `name` and their changes of it,
        stacked (N, *shape), fp32; with `zeros`, one row per site of `among`, zeros for a site that
        did not send it. Valid until the next call (the stacks may share one buffer)."""
        ...


@dataclass
class RobustOutcome:
    """The aggregate delta and who was left out of it."""

    delta: dict[str, torch.Tensor]
    not_selected: list[str] = field(default_factory=list)
    trimmed_share: dict[str, float] = field(default_factory=dict)


class CheckedOnly(Accumulator):
    """Records which updates were accepted; the tensors are combined from the store at close."""

    def __init__(self) -> None:
        self.updates = 0

    def add_tensor(self, name: str, tensor: object, weight: float) -> None:
        """Nothing to fold: the update was checked, and is read again when the round closes."""

    def count(self, weight: float) -> None:
        _check_weight(weight)
        self.updates += 1

    def result(self) -> dict[str, torch.Tensor]:
        raise ValueError("a robust strategy combines the stored updates: call combine")


class RobustStrategy(Strategy):
    """Base of the strategies that combine a round's stored updates when it closes."""

    def __init__(self, settings: RobustSpec) -> None:
        self.settings = settings

    def accumulator(self, shapes: Mapping[str, tuple[int, ...]]) -> Accumulator:
        return CheckedOnly()

    def apply(
        self, global_tensors: Mapping[str, torch.Tensor], aggregate: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        for name, delta in aggregate.items():
            delta.add_(global_tensors[name])
        return aggregate

    def combine(self, updates: StoredUpdates, names: list[str]) -> RobustOutcome:
        """The round's aggregate delta of every tensor in `names`."""
        raise NotImplementedError


def _aggregate_tensors(updates: StoredUpdates, names: list[str]) -> dict[str, torch.Tensor]:
    """Uninitialised fp32 tensors for the aggregate of `names`: views of one block, allocated before
    any stack so that the tensors kept are not interleaved with the freed work of each tensor."""
    shapes = [updates.shape(name) for name in names]
    block = torch.empty(sum(math.prod(shape) for shape in shapes), dtype=torch.float32)
    views, start = {}, 0
    for name, shape in zip(names, shapes, strict=True):
        views[name] = block[start : start + math.prod(shape)].view(shape)
        start += math.prod(shape)
    return views


class CoordinateWise(RobustStrategy):
    """A reduction of each coordinate over the sites that sent the tensor."""

    def reduce(self, stack: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reduced(self, stack: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The reduction into `out`, or zeros where no site sent the tensor (it keeps its global value)."""
        return self.reduce(stack, out) if stack.shape[0] else out.zero_()

    def combine(self, updates: StoredUpdates, names: list[str]) -> RobustOutcome:
        delta = _aggregate_tensors(updates, names)
        for name in names:
            self.reduced(updates.stack(name)[1], delta[name])
        return RobustOutcome(delta)


class Median(CoordinateWise):
    """Coordinate-wise median (Yin et al. 2018); the mean of the middle two for an even count."""

    name = StrategyName.MEDIAN

    def reduce(self, stack: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return coordinate_median(stack, out=out)


class TrimmedMean(CoordinateWise):
    """Coordinate-wise mean without the floor(beta x N) largest and smallest values (Yin et al. 2018)."""

    name = StrategyName.TRIMMED_MEAN

    @property
    def trim_fraction(self) -> float:
        fraction = self.settings.trim_fraction
        return DEFAULT_TRIM_FRACTION if fraction is None else fraction

    def parameters(self) -> dict[str, float]:
        return {"trimFraction": self.trim_fraction}

    def reduce(self, stack: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return trimmed_mean(stack, self.trim_fraction, out=out)

    def combine(self, updates: StoredUpdates, names: list[str]) -> RobustOutcome:
        trimmed = dict.fromkeys(updates.sites, 0)
        seen = dict.fromkeys(updates.sites, 0)
        delta = _aggregate_tensors(updates, names)
        for name in names:
            senders, stack = updates.stack(name)
            self.reduced(stack, delta[name])
            if senders:
                _count_trimmed(senders, stack, trim_count(len(senders), self.trim_fraction), trimmed, seen)
        share = {site: trimmed[site] / seen[site] for site in updates.sites if seen[site]}
        return RobustOutcome(delta, trimmed_share=share)


#: Values (all N rows together) ranked at once when counting trimmed values: bounds the sort's work
#: memory to this x 12 bytes (the values and their int64 order), whatever N.
_COUNT_CHUNK_ELEMENTS = 1 << 21


def _count_trimmed(
    senders: list[str], stack: torch.Tensor, cut: int, trimmed: dict[str, int], seen: dict[str, int]
) -> None:
    """Add, per site, how many of its values fell among the `cut` smallest or largest of a coordinate.

    One stable sort of each chunk of columns: the rows its first and last `cut` positions name are
    the trimmed ones, counted per row; the chunks bound the memory to _COUNT_CHUNK_ELEMENTS indices."""
    flat = stack.reshape(len(senders), -1)
    for site in senders:
        seen[site] += flat.shape[1]
    if cut == 0:
        return
    counts = torch.zeros(len(senders), dtype=torch.long)
    width = max(1, _COUNT_CHUNK_ELEMENTS // len(senders))
    for begin in range(0, flat.shape[1], width):
        order = flat[:, begin : begin + width].argsort(dim=0, stable=True)
        outside = torch.cat([order[:cut], order[len(senders) - cut :]]).reshape(-1)
        counts += torch.bincount(outside, minlength=len(senders))
        del order, outside  # freed before the next chunk's sort
    for index, site in enumerate(senders):
        trimmed[site] += int(counts[index])


class Krum(RobustStrategy):
    """Krum (Blanchard et al. 2017): the update closest to its n - f - 2 nearest others; multiKrum
    averages the `select` best-scored ones."""

    name = StrategyName.KRUM

    @property
    def byzantine(self) -> int:
        if self.settings.byzantine is None:
            raise ValueError("krum needs aggregation.robust.byzantine")
        return self.settings.byzantine

    def select_count(self, sites: int) -> int:
        return 1

    def parameters(self) -> dict[str, float]:
        return {"byzantine": float(self.byzantine)}

    def combine(self, updates: StoredUpdates, names: list[str]) -> RobustOutcome:
        sites = updates.sites
        distances = PairwiseDistances(len(sites))
        for name in names:
            distances.add(updates.stack(name, zeros=True)[1])
        chosen = [
            sites[i] for i in krum_select(distances.matrix, self.byzantine, self.select_count(len(sites)))
        ]
        del distances  # its chunk of float64 work
        delta = _aggregate_tensors(updates, names)
        for name in names:
            senders, stack = updates.stack(name, among=chosen)  # only the chosen sites are read again
            if senders:
                unweighted_mean(stack, out=delta[name])
            else:
                delta[name].zero_()
        return RobustOutcome(delta, not_selected=[site for site in sites if site not in chosen])


class MultiKrum(Krum):
    name = StrategyName.MULTI_KRUM

    def select_count(self, sites: int) -> int:
        return self.settings.select if self.settings.select is not None else sites - self.byzantine

    def parameters(self) -> dict[str, float]:
        chosen = {} if self.settings.select is None else {"select": float(self.settings.select)}
        return super().parameters() | chosen


ROBUST_STRATEGIES: dict[StrategyName, Callable[[RobustSpec], RobustStrategy]] = {
    StrategyName.MEDIAN: Median,
    StrategyName.TRIMMED_MEAN: TrimmedMean,
    StrategyName.KRUM: Krum,
    StrategyName.MULTI_KRUM: MultiKrum,
}
