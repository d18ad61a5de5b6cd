"""privacy.dp's budget in the engine: epsilon at delta after a number of training rounds, from the RDP
accountant of Google's dp-accounting (fedtrain.dp), and whether one more round stays within
privacy.dp.targetEpsilon.

A round is a Gaussian mechanism for the sites it selects and touches no other site's data. Which
sites a round selects (aggregation.siteFraction) follows from the spec's seed (operator/selection.py),
so anyone who reads the spec knows it: no amplification by sampling can be claimed. The epsilon of
`rounds` rounds is therefore that of the most-selected site: its rounds composed without sampling
(every round with siteFraction 1, the default). That is exact for a known selection, and never less
than what a secret Poisson sample of the same rate would be credited with.
"""

from __future__ import annotations

from collections import Counter

from fedtrain.api import FederatedTrainingSpec
from fedtrain.dp import epsilon_after, max_rounds_within

from .selection import select_sites

#: The sampling rate the accountant is given: none is claimed (the selection is public, see above).
SAMPLING_RATE = 1.0


def running_participations(spec: FederatedTrainingSpec, rounds: int) -> list[int]:
    """Element r (0 to `rounds`): how many of the first r training rounds the most-selected site takes
    part in; one pass over the rounds (every round, when each selects every site)."""
    if spec.aggregation.sites_per_round(len(spec.sites)) >= len(spec.sites):
        return list(range(rounds + 1))
    counts: Counter[str] = Counter()
    most, running = 0, [0]
    for round_index in range(rounds):
        selected = select_sites(spec, round_index)
        counts.update(selected)
        most = max([most, *(counts[site] for site in selected)])
        running.append(most)
    return running


def participations(spec: FederatedTrainingSpec, rounds: int) -> int:
    """How many of the first `rounds` training rounds the most-selected site takes part in."""
    return running_participations(spec, rounds)[-1]


def epsilon_spent(spec: FederatedTrainingSpec, rounds: int) -> float | None:
    """epsilon at privacy.dp.delta after `rounds` training rounds; None without privacy.dp."""
    dp = spec.privacy.dp
    if dp is None:
        return None
    return epsilon_after(participations(spec, rounds), dp.noise_multiplier, SAMPLING_RATE, dp.delta)


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


def rounds_within(spec: FederatedTrainingSpec, target_epsilon: float) -> int:
    """The most training rounds (at most training.rounds) whose epsilon stays within `target_epsilon`:
    the last round count whose most-selected site has at most the participations the budget allows."""
    dp = spec.privacy.dp
    running = running_participations(spec, spec.training.rounds)
    if dp is None:
        return len(running) - 1
    allowed = max_rounds_within(target_epsilon, dp.noise_multiplier, SAMPLING_RATE, dp.delta, running[-1])
    return max(r for r, taken in enumerate(running) if taken <= allowed)


def budget_message(spec: FederatedTrainingSpec, rounds: int) -> str:
    """Why the training stops after `rounds` training rounds: the next one would exceed the budget."""
    dp = spec.privacy.dp
    if dp is None or dp.target_epsilon is None:
        return "no privacy budget is set"
    now, after = epsilon_spent(spec, rounds) or 0.0, epsilon_spent(spec, rounds + 1) or 0.0
    allowed = rounds_within(spec, dp.target_epsilon)
    return (
        f"privacy budget reached: {rounds} rounds spent epsilon {now:.3g} at delta {dp.delta:g}; one "
        f"more would take it to {after:.3g}, above targetEpsilon {dp.target_epsilon:g} "
        f"({allowed} of the {spec.training.rounds} rounds fit)"
    )
