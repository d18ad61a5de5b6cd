"""privacy.dp's budget in the engine: epsilon at delta after a number of training rounds, from the RDP
accountant of Google's dp-accounting (fedtrain.dp), and whether one more round stays within
privacy.dp.targetEpsilon.

The sampling rate is the share of sites a round selects (aggregation.siteFraction, at least
minSites): 1.0 (the default, every site every round) claims no amplification by sampling. Below 1.0
the accountant treats each round as Poisson sampling at that rate, the approximation DP-FedAvg's
authors and TensorFlow Federated make for a sample of fixed size; it also assumes nobody outside
can tell which sites a round selected.
"""

from __future__ import annotations

from fedtrain.api import FederatedTrainingSpec
from fedtrain.dp import epsilon_after, max_rounds_within


def sampling_rate(spec: FederatedTrainingSpec) -> float:
    """The share of the sites one training round selects."""
    return spec.aggregation.sites_per_round(len(spec.sites)) / len(spec.sites)


def epsilon_spent(spec: FederatedTrainingSpec, rounds: int) -> float | None:
    """epsilon at privacy.dp.delta after `rounds` training rounds; None without privacy.dp."""
    dp = spec.privacy.dp
    if dp is None:
        return None
    return epsilon_after(rounds, dp.noise_multiplier, sampling_rate(spec), dp.delta)


def within_budget(spec: FederatedTrainingSpec, rounds: int) -> bool:
    """Whether `rounds` training rounds keep epsilon at most privacy.dp.targetEpsilon (True without one)."""
    dp = spec.privacy.dp
    if dp is None or dp.target_epsilon is None:
        return True
    spent = epsilon_spent(spec, rounds)
    return spent is not None and spent <= dp.target_epsilon


def budget_problem(spec: FederatedTrainingSpec) -> str | None:
    """Why not even one round fits privacy.dp.targetEpsilon, with the fix; None if one does."""
    dp = spec.privacy.dp
    if dp is None or dp.target_epsilon is None or within_budget(spec, 1):
        return None
    first = epsilon_spent(spec, 1) or 0.0
    return (
        f"privacy.dp: one round spends epsilon {first:.3g} at delta {dp.delta:g}, above targetEpsilon "
        f"{dp.target_epsilon:g}: raise noiseMultiplier or targetEpsilon"
    )


def budget_message(spec: FederatedTrainingSpec, rounds: int) -> str:
    """Why the training stops after `rounds` training rounds: the next one would exceed the budget."""
    dp = spec.privacy.dp
    if dp is None or dp.target_epsilon is None:
        return "no privacy budget is set"
    now, after = epsilon_spent(spec, rounds) or 0.0, epsilon_spent(spec, rounds + 1) or 0.0
    allowed = max_rounds_within(
        dp.target_epsilon, dp.noise_multiplier, sampling_rate(spec), dp.delta, spec.training.rounds
    )
    return (
        f"privacy budget reached: {rounds} rounds spent epsilon {now:.3g} at delta {dp.delta:g}; one "
        f"more would take it to {after:.3g}, above targetEpsilon {dp.target_epsilon:g} "
        f"({allowed} of the {spec.training.rounds} rounds fit)"
    )
