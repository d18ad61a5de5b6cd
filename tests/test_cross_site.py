"""evaluation.crossSite on three sites, in process: real trainers through the jobs the drivers build,
the aggregator library, the engine's matrix. Each site's local model is the round's global model plus
its update; the matrix has a row per site and a column per site's model plus the global one; its
diagonal is each site's own model on its own test split, computed again here; the evaluation jobs
get model URLs only."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from jobs import tiny_spec

from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.api import GLOBAL_MODEL_KEY, FederatedTrainingSpec, RoundRecord, SiteRoundStatus
from fedtrain.codec import decode
from fedtrain.layout import TrainingLayout
from fedtrain.model import build_model
from fedtrain.operator.core import build_trainer_job
from fedtrain.operator.engine import StartSiteJob, cross_site_accuracy, cross_site_matrix
from fedtrain.operator.report import cross_site_document, plot_cross_site
from fedtrain.store import LocalStore
from fedtrain.trainer.data import load_site_data
from fedtrain.trainer.train import evaluate, run_job

SITES = ("fab-a", "fab-b", "fab-c")
LAYOUT = TrainingLayout("lab", "cross")


def cross_site_spec() -> FederatedTrainingSpec:
    sites = [{"name": name, "data": {"synthetic": {"samples": 48, "dirichletAlpha": 0.3}}} for name in SITES]
    return tiny_spec(
        sites, training={"rounds": 2, "localSteps": 4}, evaluation={"testFraction": 0.25, "crossSite": True}
    )


def test_every_site_scores_every_sites_local_model_and_the_global_one(tmp_path: Path) -> None:
    spec = cross_site_spec()
    store = LocalStore(tmp_path / "store")
    aggregator = RoundAggregator(store, LAYOUT, spec)
    aggregator.initialize()
    deadline = datetime.now(UTC) + timedelta(minutes=5)
    for round_index in (0, 1):
        for site in SITES:
            action = StartSiteJob(site=site, round=round_index, attempt=0, mode="train")
            job = build_trainer_job(spec, LAYOUT, action, store, 600, None, deadline)
            assert job.cross_site_urls == {}, "a training round gets no other site's model"
            run_job(job)
            assert aggregator.submit(round_index, site).accepted
        aggregator.close(round_index, list(SITES))
    assert not any(store.exists(LAYOUT.local_model(0, site)) for site in SITES), "only the last round's stay"

    # Each local model is the round's global model plus the site's update, tensor by tensor.
    start = decode(store.get_bytes(LAYOUT.global_model(1))).tensors
    for site in SITES:
        local = decode(store.get_bytes(LAYOUT.local_model(1, site))).tensors
        update = decode(store.get_bytes(LAYOUT.update(1, site))).tensors
        assert set(local) == set(start)
        for name, tensor in start.items():
            expected = tensor.double().numpy() + update[name].double().numpy()
            assert local[name].double().numpy() == pytest.approx(expected, abs=1e-6), name

    statuses = []
    for site in SITES:
        action = StartSiteJob(site=site, round=2, attempt=0, mode="evaluate")
        job = build_trainer_job(spec, LAYOUT, action, store, 600, None, deadline)
        assert set(job.cross_site_urls) == set(SITES)
        models = {
            Path(url.removeprefix("file://")).relative_to(store.root) for url in job.cross_site_urls.values()
        }
        assert models == {Path(LAYOUT.local_model(1, name)) for name in SITES}, "models only, no data"
        run_job(job)
        verdict = aggregator.submit(2, site)
        assert verdict.accepted, verdict.message
        statuses.append(
            SiteRoundStatus(name=site, test_evaluation=verdict.test_evaluation, cross_site=verdict.cross_site)
        )

    matrix = cross_site_matrix(statuses)
    assert set(matrix) == set(SITES)
    assert all(set(column) == set(SITES) for column in matrix.values())
    record = RoundRecord(
        round=2,
        kind="evaluate",
        started_at=deadline,
        closed_at=deadline,
        cross_site=matrix,
        site_test_evaluation={
            status.name: status.test_evaluation for status in statuses if status.test_evaluation
        },
    )
    accuracy = cross_site_accuracy(record)
    assert set(accuracy) == {*SITES, GLOBAL_MODEL_KEY}, "N site models and the global one"
    check_diagonal(spec, store, matrix)

    document = cross_site_document(record)
    assert document is not None
    assert document["models"] == [*sorted(SITES), GLOBAL_MODEL_KEY]
    (tmp_path / "cross-site.json").write_text(json.dumps(document))
    plot_cross_site(document, tmp_path / "cross-site.png")
    assert (tmp_path / "cross-site.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_diagonal(
    spec: FederatedTrainingSpec, store: LocalStore, matrix: dict[str, dict[str, object]]
) -> None:
    """Each site's own local model on its own test split, scored here from the stored model."""
    for site in SITES:
        data = load_site_data(spec.site(site).data, spec.model, spec.evaluation, site, spec.training.seed)
        assert data.test_images is not None
        assert data.test_labels is not None
        model = build_model(spec)
        model.load_exchanged(dict(decode(store.get_bytes(LAYOUT.local_model(1, site))).tensors))
        own = evaluate(
            model.module,
            data.test_images,
            data.test_labels,
            spec.model.class_names(),
            8,
            torch.device("cpu"),
            None,
        )
        reported = matrix[site][site]
        assert reported.samples == own.metrics.samples == 12  # type: ignore[attr-defined]
        assert reported.accuracy == pytest.approx(own.metrics.accuracy)  # type: ignore[attr-defined]
        assert reported.loss == pytest.approx(own.metrics.loss, rel=1e-5)  # type: ignore[attr-defined]


def test_cross_site_refuses_what_it_cannot_score_naming_the_fix() -> None:
    with pytest.raises(ValueError, match=r"crossSite needs evaluation\.testFraction above 0.*drop crossSite"):
        tiny_spec(evaluation={"crossSite": True})
    with pytest.raises(ValueError, match=r"no privacy\.secureAggregation"):
        tiny_spec(
            evaluation={"crossSite": True, "testFraction": 0.2},
            privacy={"clipNorm": 1.0, "secureAggregation": {}},
        )
    with pytest.raises(ValueError, match="exchange policy all"):
        tiny_spec(
            evaluation={"crossSite": True, "testFraction": 0.2},
            exchange={"policy": "exclude", "layers": ["head.*"]},
        )
