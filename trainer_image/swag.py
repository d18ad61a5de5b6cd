"""evaluation.uncertainty swag at a site (fedtrain.swag holds the arithmetic): snapshots of the
exchanged tensors over the local steps of a SWAG round, their moments for the aggregator, and the
final evaluation's class probabilities averaged over draws from the combined SWAG."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedtrain.codec import PayloadKind, decode
from fedtrain.model import FederatedModel
from fedtrain.swag import Moments, SwagError, from_tensors, sample, snapshot_moments, snapshot_steps


class Snapshots:
    """The exchanged tensors after the steps `snapshot_steps` picks (on the CPU, float32)."""

    def __init__(self, model: FederatedModel, steps: int, count: int) -> None:
        self.model = model
        self.at = set(snapshot_steps(steps, count))
        self.taken: list[dict[str, torch.Tensor]] = []

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (`step` from 0)."""
        if step + 1 in self.at:
            state = self.model.exchanged_state()
            self.taken.append({name: tensor.float().cpu() for name, tensor in state.items()})

    def moments(self) -> Moments:
        return snapshot_moments(self.taken, 1.0)


def read_moments(data: bytes, model: FederatedModel, source: str) -> Moments:
    """The combined SWAG the aggregator wrote, checked against this model's exchanged tensors."""
    payload = decode(data, name=source)
    if payload.meta.kind is not PayloadKind.SWAG:
        raise SwagError(f"{source} holds a {payload.meta.kind.value}, not SWAG moments")
    return from_tensors(dict(payload.tensors), model.exchanged_shapes(), 1.0, source)


def averaged_probabilities(
    model: FederatedModel,
    moments: Moments,
    samples: int,
    seed: int,
    predict: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """The mean of `predict()`'s class probabilities over `samples` seeded draws of the exchanged
    tensors; the model's own exchanged tensors are put back afterwards."""
    own = {name: tensor.detach().clone() for name, tensor in model.exchanged_state().items()}
    generator = torch.Generator().manual_seed(seed)
    total: torch.Tensor | None = None
    try:
        for _ in range(samples):
            model.load_exchanged(sample(moments, generator))
            probabilities = predict()
            total = probabilities if total is None else total + probabilities
    finally:
        model.load_exchanged(own)
    if total is None:
        raise SwagError("SWAG needs at least one draw")
    return total / samples
