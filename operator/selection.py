"""Which sites a training round selects: all of them, or a seeded sample of aggregation.siteFraction.

The sample is a function of the spec (training.seed) and the round alone, so both drivers, a restarted
operator and the privacy accountant (operator/privacy_budget.py) agree on it without storing it; it
is also known to whoever can read the spec, which is why the accountant claims no amplification by
sampling from it.
"""

from __future__ import annotations

import random

from fedtrain.api import FederatedTrainingSpec


def select_sites(spec: FederatedTrainingSpec, round_index: int) -> list[str]:
    """Sites taking part in a training round: all, or a seeded sample of siteFraction of them."""
    names = [site.name for site in spec.sites]
    count = spec.aggregation.sites_per_round(len(names))
    if count >= len(names):
        return names
    chosen = set(random.Random(spec.training.seed * 1_000_003 + round_index).sample(sorted(names), count))
    return [name for name in names if name in chosen]
