"""storage.retention: which objects of a training may go once a round has closed. Pure: the engine
decides which global models, the aggregator turns a decision into keys and deletes them.

What stays, whatever the policy: every manifest and the history, the sites' private states, the
global models of the last `keepGlobalModels` rounds (the newest is what the next round, the final
evaluation and a resume start from) and the best round's (the best merged model is made from it).
"""

from __future__ import annotations

from fedtrain.api import FederatedTrainingSpec, RetentionSpec
from fedtrain.layout import SECAGG_KINDS, SECAGG_SITE_KINDS, TrainingLayout


def oldest_kept_model(retention: RetentionSpec, newest: int) -> int:
    """The oldest global model the window keeps once model `newest` exists (0: all of them)."""
    if retention.keep_global_models is None:
        return 0
    return max(0, newest + 1 - retention.keep_global_models)


def models_to_delete(
    retention: RetentionSpec,
    newest: int,
    best_before: int | None,
    best_after: int | None,
    window_moved: bool = True,
) -> tuple[int, ...]:
    """The global models that may go now that model `newest` exists (`window_moved`: it has just been
    written) and the best model moved from `best_before` to `best_after`: the one that just left the
    window, and a former best outside it. Each is asked for once, when it stops being needed."""
    if retention.keep_global_models is None:
        return ()
    oldest = oldest_kept_model(retention, newest)
    candidates = {oldest - 1} if oldest > 0 and window_moved else set()
    if best_before is not None and best_before != best_after and best_before < oldest:
        candidates.add(best_before)
    return tuple(sorted(model for model in candidates if model != best_after))


def update_keys(layout: TrainingLayout, spec: FederatedTrainingSpec, round_index: int) -> list[str]:
    """Every object the sites uploaded in a round: their updates, SWAG moments and secure-aggregation
    messages."""
    keys = []
    swag = spec.evaluation.uncertainty.collects_swag(round_index, spec.training.rounds)
    for site in spec.sites:
        keys.append(layout.update(round_index, site.name))
        if swag:  # folded into the window's running SWAG at the close
            keys.append(layout.site_swag(round_index, site.name))
        if spec.privacy.secure_aggregation is not None:
            keys.extend(layout.secagg(round_index, kind, site.name) for kind in SECAGG_SITE_KINDS)
    if spec.privacy.secure_aggregation is not None:
        shared = (kind for kind in SECAGG_KINDS if kind not in SECAGG_SITE_KINDS)
        keys.extend(layout.secagg(round_index, kind) for kind in shared)
    return keys


def model_keys(layout: TrainingLayout, model: int) -> list[str]:
    """A global model and its fp32 copy (written where the sites receive a lower precision)."""
    return [layout.global_model(model), layout.exact_global_model(model)]
