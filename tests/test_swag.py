"""SWAG (fedtrain.swag): a site's moments against numpy's of its snapshots, the sites' combination
against the moments of their pooled snapshots, the truncation against numpy's best low-rank
covariance, and draws against the mean and variance they should have."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from jobs import tiny_spec
from typer.testing import CliRunner

from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.aggregator.swag_rounds import SwagRounds
from fedtrain.api import FederatedTrainingSpec
from fedtrain.codec import Metadata, PayloadKind, decode, encode, tensors_digest
from fedtrain.job import TrainerJob
from fedtrain.layout import TrainingLayout
from fedtrain.model import build_model
from fedtrain.operator.cli import app
from fedtrain.operator.core import build_trainer_job
from fedtrain.operator.engine import StartSiteJob
from fedtrain.store import LocalStore
from fedtrain.swag import (
    DEVIATIONS,
    MEAN,
    SQUARES,
    Moments,
    SwagError,
    combine,
    combine_all,
    from_tensors,
    sample,
    sampled_weights,
    snapshot_moments,
    snapshot_steps,
    to_tensors,
)
from fedtrain.trainer.data import generate_wafer_maps
from fedtrain.trainer.predict import load_swag_model
from fedtrain.trainer.train import run_job

SHAPES = {"a": (3, 2), "b": (4,)}


def snapshots(count: int, seed: int, shift: float = 0.0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {name: torch.randn(shape, generator=generator) + shift for name, shape in SHAPES.items()}
        for _ in range(count)
    ]


def flat(snaps: list[dict[str, torch.Tensor]]) -> np.ndarray:
    """Snapshots as rows of numpy vectors, the tensors in the moments' order."""
    return np.stack(
        [np.concatenate([snap[name].double().numpy().ravel() for name in SHAPES]) for snap in snaps]
    )


def vector(tensors: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([tensors[name].double().numpy().ravel() for name in SHAPES])


def covariance(moments: Moments) -> np.ndarray:
    """D^T D over the flattened tensors."""
    rows = np.concatenate(
        [moments.deviations[name].double().numpy().reshape(moments.rows, -1) for name in SHAPES], axis=1
    )
    return rows.T @ rows


def test_a_sites_moments_are_its_snapshots_mean_mean_of_squares_and_covariance() -> None:
    snaps = snapshots(5, seed=1)
    moments = snapshot_moments(snaps, weight=3.0)
    samples = flat(snaps)
    assert moments.weight == 3.0
    assert moments.rows == 5
    assert vector(moments.mean) == pytest.approx(samples.mean(0), abs=1e-6)
    assert vector(moments.squares) == pytest.approx((samples**2).mean(0), abs=1e-6)
    assert covariance(moments) == pytest.approx(np.cov(samples, rowvar=False, bias=True), abs=1e-5)


def test_the_sites_moments_combine_to_those_of_their_pooled_snapshots() -> None:
    """Weighted by their snapshot counts, three sites' moments are those of all snapshots together
    (a rank above the rows: nothing truncated); weighted otherwise, those of the weighted mixture."""
    groups = [snapshots(3, seed=2), snapshots(4, seed=3, shift=1.5), snapshots(2, seed=4, shift=-0.5)]
    sites = [snapshot_moments(snaps, weight=len(snaps)) for snaps in groups]
    combined = combine_all(sites, rank=32)
    pooled = np.concatenate([flat(snaps) for snaps in groups])
    assert combined.weight == 9
    assert vector(combined.mean) == pytest.approx(pooled.mean(0), abs=1e-5)
    assert vector(combined.squares) == pytest.approx((pooled**2).mean(0), abs=1e-5)
    assert covariance(combined) == pytest.approx(np.cov(pooled, rowvar=False, bias=True), abs=1e-4)

    weights = np.array([0.5, 0.2, 0.3])
    mixture = combine_all([site.reweighted(w) for site, w in zip(sites, weights, strict=True)], rank=32)
    means = [flat(snaps).mean(0) for snaps in groups]
    mean = sum(w * m for w, m in zip(weights, means, strict=True))
    expected = sum(
        w * (np.cov(flat(snaps), rowvar=False, bias=True) + np.outer(m - mean, m - mean))
        for w, snaps, m in zip(weights, groups, means, strict=True)
    )
    assert vector(mixture.mean) == pytest.approx(mean, abs=1e-5)
    assert covariance(mixture) == pytest.approx(expected, abs=1e-4)


def test_beyond_the_rank_a_combination_keeps_the_best_low_rank_covariance() -> None:
    first, second = (
        snapshot_moments(snapshots(4, seed=5), 1.0),
        snapshot_moments(snapshots(3, seed=6, shift=2), 2.0),
    )
    exact = covariance(combine(first, second, rank=32))
    truncated = combine(first, second, rank=2)
    assert truncated.rows == 2
    values, vectors = np.linalg.eigh(exact)
    best = (vectors[:, -2:] * values[-2:]) @ vectors[:, -2:].T  # numpy's best rank-2 approximation
    assert covariance(truncated) == pytest.approx(best, abs=1e-4)
    assert vector(truncated.mean) == pytest.approx(vector(combine(first, second, rank=32).mean))


def test_draws_have_the_swag_mean_and_covariance() -> None:
    moments = combine_all(
        [snapshot_moments(snapshots(3, seed=7), 1.0), snapshot_moments(snapshots(3, seed=8, shift=1), 1.0)],
        rank=3,
    )
    generator = torch.Generator().manual_seed(0)
    draws = np.stack([vector(sample(moments, generator)) for _ in range(20000)])
    spread = np.sqrt(vector(moments.sample_variance()))
    assert np.abs(draws.mean(0) - vector(moments.mean)).max() < 4 * spread.max() / np.sqrt(20000)
    assert draws.var(0) == pytest.approx(vector(moments.sample_variance()), rel=0.05)
    expected = (np.diag(vector(moments.diagonal())) + covariance(moments)) / 2
    assert np.diag(expected) == pytest.approx(vector(moments.sample_variance()), abs=1e-6)
    assert np.cov(draws, rowvar=False) == pytest.approx(expected, abs=0.05)


def test_snapshots_spread_over_the_second_half_of_the_steps() -> None:
    assert snapshot_steps(6, 3) == [4, 5, 6]
    assert snapshot_steps(12, 3) == [8, 10, 12]
    assert snapshot_steps(2, 3) == [2], "a short round takes fewer snapshots"
    with pytest.raises(ValueError, match="steps >= 1"):
        snapshot_steps(0, 3)


def test_moments_that_do_not_fit_are_refused_naming_the_tensor() -> None:
    good = to_tensors(snapshot_moments(snapshots(3, seed=9), 1.0))
    assert from_tensors(good, SHAPES, 1.0, "site").rows == 3
    cases = [
        ({k: v for k, v in good.items() if k != MEAN + "a"}, "names differ"),
        ({**good, SQUARES + "b": torch.zeros(5)}, r"b are not shaped \[4\]"),
        (
            {**good, DEVIATIONS + "a": torch.full((3, 3, 2), float("nan"))},
            "deviations of a holds a non-finite",
        ),
        ({**good, SQUARES + "a": torch.full((3, 2), -1.0)}, "below its mean squared"),
        ({**good, DEVIATIONS + "b": torch.zeros(2, 4)}, "one row count"),
    ]
    for tensors, message in cases:
        with pytest.raises(SwagError, match=message):
            from_tensors(tensors, SHAPES, 1.0, "site")


def test_swag_refuses_what_it_cannot_sample_naming_the_fix() -> None:
    swag = {"testFraction": 0.2, "uncertainty": {"method": "swag"}}
    assert tiny_spec(evaluation=swag).evaluation.uncertainty.swag_rank == 5
    cases = [
        ({"evaluation": {**swag, "patience": 2}}, "no evaluation.patience"),
        (
            {"evaluation": {**swag, "uncertainty": {"method": "swag", "swagRounds": 3}}},
            r"swagRounds \(3\) at most",
        ),
        (
            {"evaluation": swag, "privacy": {"clipNorm": 1.0, "dp": {"noiseMultiplier": 1.0}}},
            "no privacy.secure",
        ),
        ({"evaluation": swag, "aggregation": {"strategy": "median"}}, "a robust strategy"),
        ({"evaluation": swag, "lora": {"aggregation": "product"}}, "no lora.aggregation product"),
        ({"evaluation": swag, "exchange": {"policy": "sparse", "topK": 0.1}}, "exchange policy all"),
        ({"evaluation": {"uncertainty": {"method": "swag"}}}, "set evaluation.testFraction"),
    ]
    for sections, message in cases:
        with pytest.raises(ValueError, match=message):
            tiny_spec(**sections)


# --------------------------------------------------------------------------------------------------
# three sites in process: real trainers through the jobs the drivers build, the aggregator library

SITES = ("fab-a", "fab-b", "fab-c")
LAYOUT = TrainingLayout("lab", "swag")


def swag_spec() -> FederatedTrainingSpec:
    uncertainty = {"method": "swag", "samples": 4, "swagRank": 2, "swagRounds": 2}
    return tiny_spec(
        SITES,
        samples=48,
        training={"rounds": 3, "localSteps": 6},
        evaluation={"testFraction": 0.25, "uncertainty": uncertainty},
    )


def site_job(
    spec: FederatedTrainingSpec, store: LocalStore, site: str, round_index: int, mode: str
) -> TrainerJob:
    action = StartSiteJob(site=site, round=round_index, attempt=0, mode=mode)
    return build_trainer_job(spec, LAYOUT, action, store, 600, None, datetime.now(UTC) + timedelta(minutes=5))


def test_swag_in_process_from_the_sites_snapshots_to_predict(tmp_path: Path) -> None:
    """Rounds 1 and 2 of 3 are SWAG's: their jobs get a PUT URL for their moments, round 0's none; a
    site whose moments do not fit is refused; an aggregator restarted before round 2's close
    rebuilds it from the store; each close folds the round's sites, weighted like their
    updates, into the window's SWAG (its mean and squares are the sites' by numpy, each round weighing
    one); the final evaluation scores draws from it; the export's plain weights are the model merged at
    the SWAG mean, and a draw moves them exactly as the peft model with the drawn factors computes."""
    spec = swag_spec()
    store = LocalStore(tmp_path / "store")
    aggregator = RoundAggregator(store, LAYOUT, spec)
    aggregator.initialize()
    for round_index in (0, 1, 2):
        for site in SITES:
            job = site_job(spec, store, site, round_index, "train")
            assert (job.swag_put_url is not None) == (round_index > 0), "the last two rounds are SWAG's"
            assert job.swag_get_url is None
            run_job(job)
            if round_index == 1 and site == "fab-c":  # moments other than those the update names
                tensors = dict(decode(store.get_bytes(LAYOUT.site_swag(1, site))).tensors)
                name = next(key for key in tensors if key.startswith(SQUARES))
                tensors[name] = -torch.ones_like(tensors[name])
                meta = decode(store.get_bytes(LAYOUT.site_swag(1, site))).meta
                store.put_bytes(LAYOUT.site_swag(1, site), encode(tensors, meta))
                verdict = aggregator.submit(round_index, site)
                assert (verdict.accepted, verdict.reason) == (False, "swag")
                assert "other SWAG moments than the update's swag_sha256 names" in (verdict.message or "")
                continue
            verdict = aggregator.submit(round_index, site)
            assert verdict.accepted
            uploaded = len(store.get_bytes(LAYOUT.update(round_index, site)))
            if round_index > 0:  # the moments left the site too
                uploaded += len(store.get_bytes(LAYOUT.site_swag(round_index, site)))
            assert verdict.update_bytes == uploaded
        participants = [site for site in SITES if (round_index, site) != (1, "fab-c")]
        if round_index == 2:  # a restart between the updates and the close: the sum and the SWAG
            aggregator = RoundAggregator(store, LAYOUT, spec)  # are rebuilt from the store
        aggregator.close(round_index, participants)
    assert aggregator.close(1, ["fab-a", "fab-b"]).round == 1, "a closed round answers its manifest"
    check_window(spec, store)

    evaluations = []
    for site in SITES:
        job = site_job(spec, store, site, 3, "evaluate")
        assert job.swag_put_url is None
        assert job.swag_get_url is not None
        assert job.swag_get_url.endswith("00002/swag.safetensors")
        run_job(job)
        verdict = aggregator.submit(3, site)
        assert verdict.accepted, verdict.message
        evaluations.append(verdict)
    for verdict in evaluations:
        assert verdict.test_uncertainty is not None
        assert verdict.test_evaluation is not None
        assert verdict.test_uncertainty.samples == verdict.test_evaluation.samples == 12
        assert verdict.test_uncertainty.loss != verdict.test_evaluation.loss, "draws move the probabilities"

    reply = aggregator.merge(3)
    assert reply.swag_model_uri == store.uri(LAYOUT.swag_model())
    assert aggregator.merge(3) == reply, "idempotent"
    check_export(spec, store, tmp_path)


def check_window(spec: FederatedTrainingSpec, store: LocalStore) -> None:
    """The window's SWAG after round 2: mean and squares by numpy from the sites' stored moments, each
    round's sites weighted like their updates (the manifest's normalised weights), rounds alike."""
    assert not store.exists(LAYOUT.swag(0))
    assert not store.exists(LAYOUT.site_swag(0, "fab-a"))
    combined = decode(store.get_bytes(LAYOUT.swag(2)))
    assert combined.meta.config["rounds"] == 2
    expected: dict[str, dict[str, np.ndarray]] = {MEAN: {}, SQUARES: {}}
    for round_index in (1, 2):
        manifest = json.loads(store.get_bytes(LAYOUT.manifest(round_index)))
        weights = {entry["site"]: entry["weight"] for entry in manifest["participants"]}
        assert set(weights) == ({"fab-a", "fab-b"} if round_index == 1 else set(SITES))
        for site, weight in weights.items():
            own = decode(store.get_bytes(LAYOUT.site_swag(round_index, site))).tensors
            assert own[next(k for k in own if k.startswith(DEVIATIONS))].shape[0] == 3, "swagRank + 1 rows"
            for prefix, sums in expected.items():
                for name in (k for k in own if k.startswith(prefix)):
                    sums[name] = sums.get(name, 0) + 0.5 * weight * own[name].double().numpy()
    for sums in expected.values():
        for name, value in sums.items():
            assert combined.tensors[name].double().numpy() == pytest.approx(value, abs=1e-5), name
    rows = {t.shape[0] for k, t in combined.tensors.items() if k.startswith(DEVIATIONS)}
    assert rows == {2}, "swagRank rows"


def check_export(spec: FederatedTrainingSpec, store: LocalStore, tmp_path: Path) -> None:
    exported = decode(store.get_bytes(LAYOUT.swag_model()))
    moments = from_tensors(
        {k: v for k, v in exported.tensors.items() if k.startswith("swag.")},
        {k.removeprefix(MEAN): tuple(v.shape) for k, v in exported.tensors.items() if k.startswith(MEAN)},
        1.0,
        "export",
    )
    model = build_model(spec)
    model.load_exchanged(moments.mean)
    at_mean = model.merged_state_dict()
    plain = {k: v for k, v in exported.tensors.items() if not k.startswith("swag.")}
    assert set(plain) == set(at_mean)
    assert all(torch.allclose(plain[k], at_mean[k], atol=1e-6) for k in plain), "merged at the SWAG mean"

    path = tmp_path / "model-swag.safetensors"
    path.write_bytes(store.get_bytes(LAYOUT.swag_model()))
    network, _, sampler = load_swag_model(path, draws=3)
    drawn = sample(moments, torch.Generator().manual_seed(1))
    images = torch.randn(4, 3, 28, 28)
    model.load_exchanged(drawn)
    model.module.eval()
    replaced = sampled_weights(sampler.targets, sampler.weights, moments, sampler.frozen, drawn)
    assert "head.weight" in replaced, "the head is replaced by its draw"
    assert sampler.targets.lora, "LoRA layers move by their drawn factors' product"
    with torch.no_grad():
        expected = model.module(images)
        got = torch.func.functional_call(network, replaced, (images,))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    maps, _ = generate_wafer_maps(6, 28, 1.0, seed=3)
    archive = tmp_path / "maps.npz"
    np.savez(archive, maps=maps)
    runner = CliRunner()
    plain_run = runner.invoke(app, ["predict", str(path), str(archive), "--json"])
    swag_run = runner.invoke(app, ["predict", str(path), str(archive), "--json", "--swag", "5"])
    assert plain_run.exit_code == swag_run.exit_code == 0, swag_run.output
    assert json.loads(swag_run.stdout)["predictions"] != json.loads(plain_run.stdout)["predictions"]
    merged = tmp_path / "model-merged.safetensors"
    merged.write_bytes(store.get_bytes(LAYOUT.merged_model()))
    refused = runner.invoke(app, ["predict", str(merged), str(archive), "--swag", "5"])
    assert refused.exit_code == 2
    assert "carries no SWAG moments" in " ".join(refused.output.split())
    both = runner.invoke(app, ["predict", str(path), str(archive), "--swag", "5", "--mc-dropout", "2"])
    assert both.exit_code == 2
    # A file whose SWAG targets name a weight the model does not have is refused, naming it.
    config = json.loads(json.dumps(exported.meta.config))
    name = next(iter(config["swag"]["targets"]["plain"]))
    config["swag"]["targets"]["plain"][name] = "nope.weight"
    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(encode(dict(exported.tensors), exported.meta.model_copy(update={"config": config})))
    refused = runner.invoke(app, ["predict", str(forged), str(archive), "--swag", "2"])
    assert refused.exit_code == 2
    assert f"SWAG tensor {name} does not fit the plain weight nope.weight" in " ".join(refused.output.split())


def test_a_window_round_without_moments_carries_the_window_swag_forward(tmp_path: Path) -> None:
    """A site's moments count only where they are those its accepted update names; a SWAG round
    that folds no site's moments keeps the window's SWAG as the previous round left it; a window with
    no moments at all exports no SWAG model."""
    spec = swag_spec()
    store = LocalStore(tmp_path / "store")
    rounds = SwagRounds(store, LAYOUT, spec)
    shapes = {"a": (3, 2), "b": (4,)}
    moments = snapshot_moments(snapshots(3, seed=10), 1.0)
    meta = Metadata(kind=PayloadKind.SWAG, training="swag", round=1, site="fab-a")
    store.put_bytes(LAYOUT.site_swag(1, "fab-a"), encode(to_tensors(moments), meta))
    rounds.close(1, {}, {}, shapes)
    assert not store.exists(LAYOUT.swag(1)), "nothing to carry yet"
    rounds.close(1, {"fab-a": 2.0}, {"fab-a": "0" * 64}, shapes)
    assert not store.exists(LAYOUT.swag(1)), "moments the update does not name are left out"
    rounds.close(1, {"fab-a": 2.0}, {"fab-a": tensors_digest(to_tensors(moments))}, shapes)
    rounds.close(2, {"fab-b": 1.0}, {}, shapes)  # fab-b's moments are missing: left out
    assert store.get_bytes(LAYOUT.swag(2)) == store.get_bytes(LAYOUT.swag(1))
    assert vector(rounds.running(2, shapes).mean) == pytest.approx(vector(moments.mean))
    empty = SwagRounds(LocalStore(tmp_path / "empty"), LAYOUT, spec)
    assert empty.export(build_model(spec), {}) is None
