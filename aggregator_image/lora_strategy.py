"""`lora.aggregation: product` in the aggregator: FedAvg for every tensor, then each adapted layer's
LoRA factors replaced by the factorised weighted mean of the sites' weight changes (lora_product).

While a round is open, the accumulator keeps each accepted update's LoRA factor deltas beside the
running mean (N x the adapter's factors, which are small beside the model: r x (in + out) per layer);
when it closes, each layer is done on its own: site i's factors are the round's global factors plus
its deltas, sum_i w_i s B_i A_i is accumulated in one out x in float64 matrix, and its truncated SVD
gives the next global factors. Memory: the factors of N sites plus one layer's dense matrix.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedtrain.codec import UpdateTensor

from .lora_product import ProductSum
from .strategies import Accumulator, FedAvg, WeightedMean

LORA_A, LORA_B = ".lora_A.", ".lora_B."


def lora_pairs(names: list[str] | Mapping[str, object]) -> list[tuple[str, str]]:
    """(A, B) name pairs of the adapted layers among `names`, both factors present."""
    present = set(names)
    return sorted(
        (name, name.replace(LORA_A, LORA_B))
        for name in present
        if LORA_A in name and name.replace(LORA_A, LORA_B) in present
    )


def layer_name(a_name: str) -> str:
    """The adapted layer a factor belongs to: `blocks.0.attn.qkv` for its lora_A."""
    return a_name.split(LORA_A, 1)[0].removeprefix("base_model.model.")


class LoraProductMean(WeightedMean):
    """The weighted mean of every tensor, and each update's LoRA factor deltas kept per update."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        super().__init__(shapes)
        self.pairs = lora_pairs(shapes)
        self._factor_names = {name for pair in self.pairs for name in pair}
        self._pending: dict[str, torch.Tensor] = {}
        self.factors: list[tuple[float, dict[str, torch.Tensor]]] = []

    def add_tensor(self, name: str, tensor: UpdateTensor, weight: float) -> None:
        super().add_tensor(name, tensor, weight)
        if name in self._factor_names and isinstance(tensor, torch.Tensor):
            self._pending[name] = tensor.to(torch.float32).clone()  # one thread per name: no race

    def count(self, weight: float) -> None:
        super().count(weight)
        self.factors.append((weight, self._pending))
        self._pending = {}

    def refactorise(
        self, global_tensors: Mapping[str, torch.Tensor], next_tensors: dict[str, torch.Tensor], scale: float
    ) -> dict[str, float]:
        """Replace each layer's factors in `next_tensors` by the factorised mean change; the energy
        each truncation kept, by layer."""
        energy: dict[str, float] = {}
        for a_name, b_name in self.pairs:
            a_global = global_tensors[a_name].to(torch.float32)
            b_global = global_tensors[b_name].to(torch.float32)
            product = ProductSum(b_global.shape[0], a_global.shape[1])
            for weight, factors in self.factors:
                if a_name in factors and b_name in factors:
                    product.add(b_global + factors[b_name], a_global + factors[a_name], weight, scale)
            if product.sites == 0:
                continue
            # The singular values into B: a dead component keeps a live A row to regrow from.
            result = product.factorise(a_global.shape[0], scale, into_b=True)
            next_tensors[a_name], next_tensors[b_name] = result.a, result.b
            energy[layer_name(a_name)] = result.energy
        return energy


class LoraProduct(FedAvg):
    """FedAvg whose LoRA factors the round's close replaces by the factorised mean weight change."""

    def accumulator(self, shapes: Mapping[str, tuple[int, ...]]) -> Accumulator:
        return LoraProductMean(shapes)

    def parameters(self) -> dict[str, float]:
        return {"loraProduct": 1.0}
