"""DP-FedAvg's aggregate (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): the sum of the round's clipped updates plus Gaussian noise, divided by a fixed number.

Each update is clipped to L2 norm C (privacy.clipNorm) before it is folded, so adding or removing one
site changes the sum by at most C (its sensitivity). Noise N(0, (sigma C)^2) on every coordinate of
the sum makes one round a Gaussian mechanism with noise multiplier sigma; the engine's accountant
composes the rounds. The sum is divided by the number of sites a round selects, not by the number
whose update arrived: a denominator that depended on who took part would itself change with one site,
and the sensitivity would no longer be C / that number. Sites are weighted equally (the spec requires
aggregation.weighting uniform): a weight a site claims would scale its influence past the clip.

The noise comes from fedtrain.dp's CSPRNG-seeded source, so no one who knows the spec or the round
can predict and subtract it; a repeated close after a crash draws fresh noise, which is harmless: the
manifest, written last, names the one model the round produced.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedtrain.codec import SparseDelta, UpdateTensor
from fedtrain.dp import secure_gaussian

from .strategies import WeightedMean


def scaled(tensor: UpdateTensor, factor: float) -> UpdateTensor:
    """`tensor` times `factor` (a sparse one's values), in float32; the same tensor for factor 1."""
    if factor == 1.0:
        return tensor
    if isinstance(tensor, SparseDelta):
        return SparseDelta(tensor.index, tensor.values.to(torch.float32) * factor, tensor.shape)
    return tensor.to(torch.float32) * factor


class NoisyMean(WeightedMean):
    """(sum of the folded updates + N(0, noise_std^2) per coordinate) / denominator."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], noise_std: float, denominator: int) -> None:
        if not noise_std > 0:
            raise ValueError(f"the noise's standard deviation must be > 0, got {noise_std}")
        if denominator < 1:
            raise ValueError(f"the denominator (sites a round selects) must be >= 1, got {denominator}")
        super().__init__(shapes)
        self.noise_std = noise_std
        self.denominator = denominator

    def result(self) -> dict[str, torch.Tensor]:
        if self.updates == 0:
            raise ValueError("no update was added: a round needs at least one accepted update")
        for running in self._sum.values():
            noise = torch.from_numpy(secure_gaussian(running.numel(), self.noise_std))
            running.add_(noise.view(running.shape).to(torch.float32)).div_(self.denominator)
        return self._sum
