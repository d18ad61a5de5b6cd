"""storage.retention: which global models go as rounds close (the pure policy over a whole training),
and what the aggregator deletes and refuses to delete in a real store. Both drivers run it through a
killed driver and a suspension in tests/test_contract.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from jobs import tiny_spec

from fedtrain.aggregator.rounds import RoundAggregator, UnknownRoundError
from fedtrain.api import RetentionSpec
from fedtrain.codec import Metadata, PayloadKind, decode, encode
from fedtrain.layout import TrainingLayout
from fedtrain.retention import models_to_delete, oldest_kept_model, update_keys
from fedtrain.store import LocalStore

LAYOUT = TrainingLayout("lab", "kept")


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_over_a_training_exactly_the_window_and_the_best_model_stay(keep: int) -> None:
    """Ten rounds whose best model moves back and forth: after each close the models left are the
    window of the newest `keep` and the best one, and no model is asked for twice."""
    retention = RetentionSpec(keep_global_models=keep)
    best_by_round = [0, 1, 1, 1, 4, 4, 4, 4, 8, 8]  # the best after round r scored model r
    existing, asked, best = {0}, [], None
    for round_index, best_after in enumerate(best_by_round):
        newest = round_index + 1
        existing.add(newest)
        doomed = models_to_delete(retention, newest, best, best_after)
        asked.extend(doomed)
        existing -= set(doomed)
        best = best_after
        window = set(range(oldest_kept_model(retention, newest), newest + 1))
        assert existing == window | {best}, (round_index, existing)
    assert len(asked) == len(set(asked))


def test_without_keep_global_models_no_model_goes() -> None:
    assert models_to_delete(RetentionSpec(delete_updates=True), 9, 0, 5) == ()


def _spec_with(retention: dict[str, object], secure: bool = False) -> object:
    privacy = {"clipNorm": 5.0, "secureAggregation": {}} if secure else {}
    storage = {"retention": retention}
    return tiny_spec(("fab-a", "fab-b", "fab-c"), storage=storage, privacy=privacy)


def _update(aggregator: RoundAggregator, round_index: int, site: str) -> bytes:
    global_model = decode(aggregator.store.get_bytes(LAYOUT.global_model(round_index)))
    delta = {name: torch.full_like(tensor, 0.01) for name, tensor in global_model.tensors.items()}
    meta = Metadata(
        kind=PayloadKind.UPDATE,
        training=LAYOUT.name,
        round=round_index,
        site=site,
        samples=10,
        base_fingerprint=global_model.meta.base_fingerprint,
    )
    return encode(delta, meta)


def test_the_aggregator_deletes_a_closed_rounds_uploads_and_old_models_and_refuses_the_rest(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    spec = _spec_with({"deleteUpdates": True, "keepGlobalModels": 1})
    aggregator = RoundAggregator(store, LAYOUT, spec)
    aggregator.initialize()
    for site in ("fab-a", "fab-b"):
        store.put_bytes(LAYOUT.update(0, site), _update(aggregator, 0, site))
        assert aggregator.submit(0, site).accepted
    with pytest.raises(UnknownRoundError, match="the round is not closed"):
        aggregator.apply_retention(0, updates=True, models=[])
    aggregator.close(0, ["fab-a", "fab-b"])
    with pytest.raises(UnknownRoundError, match=r"global models \[1\] stay: .* keeps models 1 to 1"):
        aggregator.apply_retention(0, updates=False, models=[1])
    before = set(store.list(LAYOUT.root))

    deleted = aggregator.apply_retention(0, updates=True, models=[0])

    gone = before - set(store.list(LAYOUT.root))
    assert gone == {LAYOUT.update(0, "fab-a"), LAYOUT.update(0, "fab-b"), LAYOUT.global_model(0)}
    assert deleted == 3 + 2, (
        "fab-c's update and model 0's fp32 copy were never written: deleting is idempotent"
    )
    assert aggregator.apply_retention(0, updates=True, models=[0]) == deleted
    assert store.exists(LAYOUT.manifest(0))
    assert aggregator.manifest(0) is not None


def test_a_spec_that_keeps_updates_refuses_to_delete_them(tmp_path: Path) -> None:
    aggregator = RoundAggregator(LocalStore(tmp_path), LAYOUT, _spec_with({"keepGlobalModels": 2}))
    aggregator.initialize()
    with pytest.raises(UnknownRoundError, match=r"storage\.retention keeps them"):
        aggregator.apply_retention(0, updates=True, models=[])


def test_a_secure_rounds_protocol_objects_go_with_its_updates() -> None:
    spec = _spec_with({"deleteUpdates": True}, secure=True)
    keys = update_keys(LAYOUT, spec, 3)  # type: ignore[arg-type]
    assert LAYOUT.update(3, "fab-b") in keys
    assert LAYOUT.secagg(3, "reveal", "fab-c") in keys
    assert LAYOUT.secagg(3, "roster") in keys
    assert all(key.startswith(LAYOUT.round_dir(3)) for key in keys)


def test_a_swag_rounds_site_moments_go_with_its_updates_and_the_window_swag_stays() -> None:
    uncertainty = {"method": "swag", "swagRounds": 1}
    spec = tiny_spec(
        storage={"retention": {"deleteUpdates": True}},
        evaluation={"testFraction": 0.2, "uncertainty": uncertainty},
    )
    last, earlier = update_keys(LAYOUT, spec, 1), update_keys(LAYOUT, spec, 0)
    assert LAYOUT.site_swag(1, "fab-a") in last, "folded into the window's SWAG at the close"
    assert not any("/swag" in key for key in earlier), "round 0 is outside the window"
    assert LAYOUT.swag(1) not in last, "the final evaluation and the export read the window's SWAG"
