"""`lora.aggregation: product` in the aggregator: FedAvg for every tensor, then each adapted layer's
LoRA factors replaced by the factorised weighted mean of the sites' weight changes (lora_product).

While a round is open, the accumulator keeps each accepted update's LoRA factor deltas (N x the
adapter's factors, which are small beside the model: r x (in + out) per layer); the factors are not
summed into the running mean, which the close replaces anyway. When the round closes, each layer is
done on its own: site i's factors are the round's global factors as that site received them (fitted
to its rank r_i, sites[].loraRank, fedtrain.lora_ranks) plus its deltas, sum_i w_i s_i B_i A_i is
accumulated in one out x in float64 matrix, and its truncated SVD gives the next global factors.
Memory: the factors of N sites plus one layer's dense matrix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from fedtrain.codec import UpdateTensor
from fedtrain.lora_ranks import fit_to_rank, layer_name, lora_pairs, lora_scale

from .lora_product import ProductSum, energy_at_ranks
from .strategies import Accumulator, FedAvg, WeightedMean


class LoraProductMean(WeightedMean):
    """The weighted mean of every other tensor, and each update's LoRA factor deltas kept per update.

    `alpha` is lora.alpha (None: 2 x rank), from which a site of a lower rank gets its scale;
    `site_ranks` are the ranks of the sites below the global rank, whose truncation energy the close
    reports."""

    def __init__(
        self, shapes: Mapping[str, tuple[int, ...]], alpha: int | None = None, site_ranks: Iterable[int] = ()
    ) -> None:
        super().__init__(shapes)
        self.pairs = lora_pairs(shapes)
        self.alpha = alpha
        self.site_ranks = sorted(set(site_ranks))
        self._factor_names = {name for pair in self.pairs for name in pair}
        self._pending: dict[str, torch.Tensor] = {}
        self.factors: list[tuple[float, dict[str, torch.Tensor]]] = []

    def add_tensor(self, name: str, tensor: UpdateTensor, weight: float) -> None:
        if name in self._factor_names and isinstance(tensor, torch.Tensor):
            # Kept, not summed: a site of a lower rank sends smaller factors, and the close replaces
            # the factors by the factorised mean change anyway.
            self._pending[name] = tensor.to(torch.float32).clone()  # one thread per name: no race
            return
        super().add_tensor(name, tensor, weight)

    def count(self, weight: float) -> None:
        super().count(weight)
        self.factors.append((weight, self._pending))
        self._pending = {}

    def _layer_sum(
        self, a_name: str, b_name: str, global_tensors: Mapping[str, torch.Tensor], scale: float
    ) -> ProductSum:
        """sum_i w_i s_i B_i A_i of one layer, each site's factors being the global factors fitted
        to its rank (as it received them) plus its deltas."""
        global_pair = {a_name: global_tensors[a_name], b_name: global_tensors[b_name]}
        product = ProductSum(global_pair[b_name].shape[0], global_pair[a_name].shape[1])
        for weight, factors in self.factors:
            if a_name not in factors or b_name not in factors:
                continue
            rank = factors[a_name].shape[0]
            site_scale = scale if rank == global_pair[a_name].shape[0] else lora_scale(rank, self.alpha)
            received = fit_to_rank(global_pair, rank, scale, site_scale)
            product.add(
                received[b_name].to(torch.float32) + factors[b_name],
                received[a_name].to(torch.float32) + factors[a_name],
                weight,
                site_scale,
            )
        return product

    def refactorise(
        self, global_tensors: Mapping[str, torch.Tensor], next_tensors: dict[str, torch.Tensor], scale: float
    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Replace each layer's factors in `next_tensors` by the factorised mean change. Returns the
        energy each layer's truncation to the global rank kept, and for each site rank below it the
        energy the truncation to that rank keeps (str(rank) -> layer -> energy)."""
        energy: dict[str, float] = {}
        by_rank: dict[str, dict[str, float]] = {}
        for a_name, b_name in self.pairs:
            product = self._layer_sum(a_name, b_name, global_tensors, scale)
            if product.sites == 0:
                continue
            global_rank = global_tensors[a_name].shape[0]
            # The singular values into B: a dead component keeps a live A row to regrow from.
            result = product.factorise(global_rank, scale, into_b=True)
            next_tensors[a_name], next_tensors[b_name] = result.a, result.b
            layer = layer_name(a_name)
            energy[layer] = result.energy
            lower = [rank for rank in self.site_ranks if rank < global_rank]
            for rank, kept in energy_at_ranks(result.spectrum, lower).items():
                by_rank.setdefault(str(rank), {})[layer] = kept
        return energy, by_rank


class LoraProduct(FedAvg):
    """FedAvg whose LoRA factors the round's close replaces by the factorised mean weight change.

    `alpha` is lora.alpha; `site_ranks` the sites' own ranks (sites[].loraRank) where set."""

    def __init__(self, alpha: int | None = None, site_ranks: Iterable[int] = ()) -> None:
        self.alpha = alpha
        self.site_ranks = sorted(set(site_ranks))

    def accumulator(self, shapes: Mapping[str, tuple[int, ...]]) -> Accumulator:
        return LoraProductMean(shapes, self.alpha, self.site_ranks)

    def parameters(self) -> dict[str, float]:
        return {"loraProduct": 1.0}
