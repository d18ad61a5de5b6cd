"""Server optimizers: the round's weighted mean update taken as a pseudo-gradient step (pure tensor math).

Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2, and Hsu et al. 2019 for
server momentum. With Δ the weighted mean of the sites' deltas of a round (`WeightedMean`), per tensor
and element-wise, η the server learning rate:

    fedavgm:     m ← β·m + Δ                              x ← x + η·m
    fedadagrad:  m ← β1·m + (1-β1)·Δ    v ← v + Δ²                          x ← x + η·m / (√v + τ)
    fedadam:     m ← β1·m + (1-β1)·Δ    v ← β2·v + (1-β2)·Δ²                x ← x + η·m / (√v + τ)
    fedyogi:     m ← β1·m + (1-β1)·Δ    v ← v - (1-β2)·Δ²·sign(v - Δ²)      x ← x + η·m / (√v + τ)

with m starting at 0 and v at τ² (the paper's v₋₁ ≥ τ²), no bias correction (as in the paper).
A tensor no site sent in a round (exchange policy dynamic) has Δ = 0 there: its moments decay and it
still moves by its momentum. The state (m, and v) is fp32, the size of the exchanged tensors; the
aggregator keeps it in the store per round, written before the round's manifest.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedtrain.api import ServerOptimizerSpec, StrategyName

from .strategies import Accumulator, Strategy, WeightedMean

MOMENT = "m."
SECOND_MOMENT = "v."


class ServerOptimizer(Strategy):
    """A strategy whose next model is a server optimizer's step with the round's mean update."""

    default_learning_rate = 0.1
    adaptive = True

    def __init__(self, settings: ServerOptimizerSpec) -> None:
        self.settings = settings
        self.learning_rate = settings.learning_rate or self.default_learning_rate

    def accumulator(self, shapes: Mapping[str, tuple[int, ...]]) -> Accumulator:
        return WeightedMean(shapes)

    @property
    def keeps_state(self) -> bool:
        return True

    def parameters(self) -> dict[str, float]:
        settings = self.settings
        if not self.adaptive:
            return {"learningRate": self.learning_rate, "momentum": settings.momentum}
        decays = {"beta1": settings.beta1} | (
            {} if self.name is StrategyName.FEDADAGRAD else {"beta2": settings.beta2}
        )
        return {"learningRate": self.learning_rate, **decays, "tau": settings.tau}

    def apply(
        self, global_tensors: Mapping[str, torch.Tensor], aggregate: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """One step from a fresh state (the first round's)."""
        return self.step(global_tensors, aggregate, {})[0]

    def step(
        self,
        global_tensors: Mapping[str, torch.Tensor],
        aggregate: dict[str, torch.Tensor],
        state: Mapping[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        next_tensors: dict[str, torch.Tensor] = {}
        next_state: dict[str, torch.Tensor] = {}
        for name, delta in aggregate.items():
            moment = self._moment(name, delta, state)
            if self.adaptive:
                second = self._second_moment(name, delta, state)
                step = moment / (second.sqrt() + self.settings.tau)
                next_state[SECOND_MOMENT + name] = second
            else:
                step = moment
            next_state[MOMENT + name] = moment
            next_tensors[name] = global_tensors[name].to(torch.float32) + self.learning_rate * step
        return next_tensors, next_state

    def _moment(self, name: str, delta: torch.Tensor, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        previous = _fitting(state, MOMENT + name, delta)
        beta1 = self.settings.beta1
        return previous * beta1 + delta * (1 - beta1) if previous is not None else delta * (1 - beta1)

    def _second_moment(
        self, name: str, delta: torch.Tensor, state: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        previous = _fitting(state, SECOND_MOMENT + name, delta)
        if previous is None:
            previous = torch.full_like(delta, self.settings.tau**2)
        return self.update_second_moment(previous, delta * delta)

    def update_second_moment(self, previous: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _fitting(state: Mapping[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor | None:
    """A state tensor of the shape of `like`, in fp32; None when there is none (the first round)."""
    tensor = state.get(key)
    if tensor is None:
        return None
    if tuple(tensor.shape) != tuple(like.shape):
        raise ValueError(f"server state {key} has shape {tuple(tensor.shape)}, the model {tuple(like.shape)}")
    return tensor.to(torch.float32)


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al. 2019): m ← β·m + Δ, x ← x + η·m."""

    name = StrategyName.FEDAVGM
    default_learning_rate = 1.0
    adaptive = False

    def _moment(self, name: str, delta: torch.Tensor, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        previous = _fitting(state, MOMENT + name, delta)
        return previous * self.settings.momentum + delta if previous is not None else delta.clone()


class FedAdagrad(ServerOptimizer):
    name = StrategyName.FEDADAGRAD

    def update_second_moment(self, previous: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        return previous + squared


class FedAdam(ServerOptimizer):
    name = StrategyName.FEDADAM

    def update_second_moment(self, previous: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        beta2 = self.settings.beta2
        return previous * beta2 + squared * (1 - beta2)


class FedYogi(ServerOptimizer):
    name = StrategyName.FEDYOGI

    def update_second_moment(self, previous: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        return previous - (1 - self.settings.beta2) * squared * torch.sign(previous - squared)


SERVER_OPTIMIZERS: dict[StrategyName, type[ServerOptimizer]] = {
    optimizer.name: optimizer for optimizer in (FedAvgM, FedAdagrad, FedAdam, FedYogi)
}
